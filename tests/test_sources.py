"""Large-dataset sources (issue 16): WebDataset tar shards and Hugging Face datasets give the same samples, pixels
and training as the same images in a caption folder, with the same checks and an exact resume."""

import io
import json
import subprocess
import tarfile
from pathlib import Path

import pytest
import torch
from helpers import PY, ROOT, base_overrides, read_losses, write_dataset
from image_datasets import CaptionDataset
from trainer.config import ConfigError, load_config
from trainer.data import scan_for_training
from trainer.loop import train
from trainer.models import variants
from trainer.models.qwen_image import QwenImageAdapter


def _adapter(cfg, variant="qwen-image"):
    cls, v = variants()[variant]
    return cls(cfg, v)

SIZES = [(64, 64), (80, 48), (48, 80), (64, 64), (96, 64)]


def _folder(tmp_path: Path) -> Path:
    data = tmp_path / "folder"
    for i, size in enumerate(SIZES):
        write_dataset(data, n=1, size=size, seed=i, captions=[f"caption {i}"])
        (data / "img0.png").rename(data / f"s{i}.png")
        (data / "img0.txt").rename(data / f"s{i}.txt")
    return data


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def _shards(folder: Path, out: Path, extra=()) -> Path:
    """The folder's samples in two plain tar shards (sample 1's caption as JSON), in name order."""
    out.mkdir(parents=True, exist_ok=True)
    stems = sorted(p.stem for p in folder.glob("*.png"))
    for n, part in enumerate((stems[:3], stems[3:])):
        with tarfile.open(out / f"shard-{n:05d}.tar", "w") as tf:
            for stem in part:
                _add(tf, f"{stem}.png", (folder / f"{stem}.png").read_bytes())
                caption = (folder / f"{stem}.txt").read_text()
                if stem == "s1":
                    _add(tf, f"{stem}.json", json.dumps({"prompt": caption, "width": 80}).encode())
                else:
                    _add(tf, f"{stem}.txt", caption.encode())
            if n == 1:
                for name, data in extra:
                    _add(tf, name, data)
    return out


def _pixels(cfg, variant="qwen-image"):
    adapter = _adapter(cfg, variant)
    scan = scan_for_training(cfg, adapter)
    ds = CaptionDataset(scan.samples, reference_transform=adapter.reference_transform())
    return scan, [ds[(i, 0)] for i in range(len(ds))]


def _cfg(tmp_path, **data):
    overrides = [f"data_config.{k}={v}" for k, v in data.items()]
    return load_config(None, ["pretrained_model_name_or_path=x", "data_config.img_size=64", f"output_dir={tmp_path / 'o'}", *overrides],
                       check_paths=False)


def _same_as_folder(folder_cfg, cfg):
    ref_scan, ref = _pixels(folder_cfg)
    scan, items = _pixels(cfg)
    assert not scan.problems and not ref_scan.problems
    assert [(s.caption, s.size, s.source_size) for s in scan.samples] == [(s.caption, s.size, s.source_size) for s in ref_scan.samples]
    for a, b in zip(items, ref):
        assert a["caption"] == b["caption"] and torch.equal(a["pixel_values"], b["pixel_values"])
    return scan


def test_webdataset_shards_give_the_folder_samples_and_report_bad_members(tmp_path):
    folder = _folder(tmp_path)
    bad = [("broken.png", b"\x89PNG\r\n\x1a\nnot really"), ("broken.txt", b"a broken one"),
           ("nocap.png", (folder / "s0.png").read_bytes()), ("extra/meta.json", b"{}")]
    shards = _shards(folder, tmp_path / "shards", extra=bad)
    scan = scan_for_training(c := _cfg(tmp_path, webdataset=f"{shards}/*.tar"), _adapter(c))
    assert len(scan.samples) == 5
    assert any("shard-00001.tar:broken" in p and "not a readable image" in p for p in scan.problems), scan.problems
    assert any("shard-00001.tar:nocap: no caption" in p for p in scan.problems), scan.problems
    assert len(scan.problems) == 2  # a key with no image (extra/meta) is not a sample
    r = subprocess.run([PY, "utils/validate_dataset.py", "--webdataset", f"{shards}/*.tar", "--img_size", "64"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "shard-00001.tar:nocap: no caption" in r.stdout + r.stderr, r.stdout + r.stderr
    clean = _shards(folder, tmp_path / "clean")
    s = _same_as_folder(_cfg(tmp_path, img_dir=folder), _cfg(tmp_path, webdataset=[str(p) for p in sorted(clean.glob("*.tar"))]))
    assert str(s.samples[1].image).endswith("shard-00000.tar:s1.png")

    gz = tmp_path / "shards.tar.gz"
    with tarfile.open(gz, "w:gz") as tf:
        tf.add(folder / "s0.png", "s0.png")
    scan = scan_for_training(c := _cfg(tmp_path, webdataset=str(gz)), _adapter(c))
    assert not scan.samples and "compressed tar shard" in scan.problems[0] and "plain .tar" in scan.problems[0]


def test_shard_listings_are_recorded_in_the_scan_index(tmp_path, monkeypatch):
    """A restart reads each unchanged shard's member listing from the scan index instead of its tar headers; a
    rewritten shard is read again."""
    from image_datasets import scan_index

    folder = _folder(tmp_path)
    shards = _shards(folder, tmp_path / "shards")
    opened = []
    real_open = tarfile.open
    monkeypatch.setattr(tarfile, "open", lambda *a, **k: (k.get("mode") == "r:" and opened.append(str(a[0]))) or real_open(*a, **k))
    cfg = _cfg(tmp_path, webdataset=f"{shards}/*.tar")

    def scan():
        index = scan_index.ScanIndex(tmp_path / "index.sqlite")
        scan_index.use(index)
        try:
            return [(str(x.image), x.caption, x.size) for x in scan_for_training(cfg, _adapter(cfg)).samples]
        finally:
            scan_index.use(None)

    first = scan()
    assert len(opened) == 2 and len(first) == 5
    assert scan() == first and len(opened) == 2  # no tar header read on a restart
    (folder / "s4.txt").write_text("a new caption")
    _shards(folder, shards)  # rewrites both shards (new mtimes; shard 0's content is the same)
    third = scan()
    assert len(opened) == 4 and ("a new caption" in [c for _, c, _ in third])


@pytest.mark.parametrize("layout", ["save_to_disk", "parquet", "imagefolder"])
def test_hf_datasets_give_the_folder_samples(layout, tmp_path, monkeypatch):
    import datasets

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    folder = _folder(tmp_path)
    stems = sorted(p.stem for p in folder.glob("*.png"))
    rows = {"image": [{"bytes": (folder / f"{s}.png").read_bytes(), "path": f"{s}.png"} for s in stems],
            "prompt": [(folder / f"{s}.txt").read_text() for s in stems]}
    features = datasets.Features({"image": datasets.Image(), "prompt": datasets.Value("string")})
    ds = datasets.Dataset.from_dict(rows, features=features)
    if layout == "save_to_disk":
        spec = tmp_path / "saved"
        ds.save_to_disk(str(spec))
    elif layout == "parquet":
        spec = tmp_path / "pq"
        spec.mkdir()
        ds.select(range(3)).to_parquet(str(spec / "part-0.parquet"))
        ds.select(range(3, 5)).to_parquet(str(spec / "part-1.parquet"))
    else:
        spec = tmp_path / "imagefolder"
        spec.mkdir()
        with open(spec / "metadata.jsonl", "w") as f:
            for s in stems:
                (spec / f"{s}.png").write_bytes((folder / f"{s}.png").read_bytes())
                f.write(json.dumps({"file_name": f"{s}.png", "prompt": (folder / f"{s}.txt").read_text()}) + "\n")
    _same_as_folder(_cfg(tmp_path, img_dir=folder), _cfg(tmp_path, hf_dataset=spec))

    scan = scan_for_training(c := _cfg(tmp_path, hf_dataset=spec, caption_column="caption"), _adapter(c))
    assert not scan.samples and "no column 'caption'" in scan.problems[0]


def test_edit_references_from_shards_and_tables(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    folder = _folder(tmp_path)
    png = {s: (folder / f"{s}.png").read_bytes() for s in ("s0", "s1", "s2", "s3")}
    shards = tmp_path / "edit"
    shards.mkdir()
    with tarfile.open(shards / "edit.tar", "w") as tf:
        _add(tf, "a.png", png["s0"])
        _add(tf, "a.control_image.png", png["s1"])
        _add(tf, "a.txt", b"make it blue")
        _add(tf, "b.png", png["s2"])  # no reference: an edit model needs one
        _add(tf, "b.txt", b"no reference")
    cfg = _cfg(tmp_path, webdataset=shards / "edit.tar", control_size=64)
    scan, items = _pixels(cfg, "qwen-image-edit")
    assert len(scan.samples) == 1 and str(scan.samples[0].controls[0]).endswith("edit.tar:a.control_image.png")
    assert "edit.tar:b" in scan.problems[0] and "0 control image(s)" in scan.problems[0]
    assert len(items[0]["controls"]) == 1

    rows = {"image": [{"bytes": png["s0"], "path": None}, {"bytes": png["s2"], "path": None}],
            "control_image": [{"bytes": png["s1"], "path": None}, None],
            "control_image_2": [{"bytes": png["s3"], "path": None}, {"bytes": png["s3"], "path": None}],
            "text": ["two references", "second without first"]}
    features = datasets.Features({"image": datasets.Image(), "control_image": datasets.Image(), "control_image_2": datasets.Image(),
                                  "text": datasets.Value("string")})
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "edit-hf"))
    cfg = _cfg(tmp_path, hf_dataset=tmp_path / "edit-hf", control_size=64)
    scan = scan_for_training(cfg, _adapter(cfg, "qwen-image-edit-plus"))
    assert len(scan.samples) == 1 and len(scan.samples[0].controls) == 2 and scan.samples[0].caption == "two references"
    assert "row 1: control_image_2 is set but control_image is empty" in scan.problems[0]


def test_training_from_shards_equals_the_folder_and_resumes_exactly(tiny_qwen, tmp_path):
    folder = write_dataset(tmp_path / "folder", n=6)
    shards = tmp_path / "shards"
    shards.mkdir()
    with tarfile.open(shards / "all.tar", "w") as tf:
        for p in sorted(folder.iterdir()):
            _add(tf, p.name, p.read_bytes())
    common = {"data_config.train_batch_size": 2, "data_config.caption_dropout_rate": 0.5, "max_train_steps": 4,
              "checkpointing_steps": 2, "precompute_image_embeddings": False, "data_config.num_workers": 1}
    ref = tmp_path / "ref"
    train(load_config(None, base_overrides(tiny_qwen, folder, ref, **common)), QwenImageAdapter)

    def tar_run(out, **extra):
        o = [x for x in base_overrides(tiny_qwen, folder, out, **{**common, **extra}) if not x.startswith("data_config.img_dir=")]
        train(load_config(None, [*o, f"data_config.webdataset={shards}/all.tar"]), QwenImageAdapter)

    full, part = tmp_path / "full", tmp_path / "part"
    tar_run(full)
    assert read_losses(full) == read_losses(ref)  # the same images and captions, the same training, exactly
    tar_run(part, max_train_steps=2)
    tar_run(part, resume_from_checkpoint="latest")
    assert read_losses(part) == read_losses(full)


def test_source_keys_are_checked_before_any_model_loads(tmp_path):
    with pytest.raises(ConfigError, match="data_config.webdataset.*no tar shard"):
        load_config(None, ["pretrained_model_name_or_path=x", f"data_config.webdataset={tmp_path}/*.tar"])
    with pytest.raises(ConfigError, match="exclusive"):
        load_config(None, ["pretrained_model_name_or_path=x", f"data_config.webdataset={tmp_path}/a.tar", f"data_config.hf_dataset={tmp_path}"])
    with pytest.raises(ConfigError, match="data_config.hf_dataset.*does not exist"):
        load_config(None, ["pretrained_model_name_or_path=x", f"data_config.hf_dataset={tmp_path}/missing"])
