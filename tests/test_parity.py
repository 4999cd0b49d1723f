"""A FlyMyAI or DiffSynth-Studio user is at home: DiffSynth's metadata layouts train as they are, the validator
agrees with training and takes what users type."""

import json
import subprocess

import pytest
from helpers import PY, ROOT, base_overrides, read_losses, run_each, write_dataset

from image_datasets import scan_metadata
from trainer.config import ConfigError, load_config
from trainer.loop import train
from trainer.models.qwen_image import QwenImageAdapter, QwenImageEditAdapter


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    root = tmp_path_factory.mktemp("diffsynth")
    write_dataset(root / "images", n=4, seed=1)
    write_dataset(root / "edits", n=4, seed=2)
    return root


def validate(*args):
    return subprocess.run([PY, "utils/validate_dataset.py", *map(str, args)], cwd=ROOT, capture_output=True, text=True)


def test_diffsynth_metadata_trains_text_to_image_and_edit_unchanged(tiny_models, pictures, tmp_path):
    # DiffSynth-Studio's text-to-image layout: metadata.csv with image,prompt, paths relative to the file
    t2i = pictures / "metadata.csv"
    t2i.write_text("image,prompt\n" + "".join(f"images/img{i}.png,a photo of thing {i}\n" for i in range(4)))
    model = tiny_models("qwen-image")
    out = tmp_path / "t2i"
    ov = base_overrides(model, pictures, out, max_train_steps=2, **{"data_config.metadata_file": str(t2i)})
    assert validate("--config", ROOT / "train_configs/train_lora.yaml", *ov).returncode == 0
    train(load_config(None, ov), QwenImageAdapter)
    assert len(read_losses(out)) == 2
    # its edit layout: edit_image beside image and prompt
    edit = pictures / "metadata_edit.csv"
    edit.write_text("image,prompt,edit_image\n" + "".join(f"images/img{i}.png,make it {i},edits/img{i}.png\n" for i in range(4)))
    out = tmp_path / "edit"
    ov = base_overrides(tiny_models("qwen-image-edit"), pictures, out, max_train_steps=2, **{"data_config.metadata_file": str(edit)})
    train(load_config(None, ov), QwenImageEditAdapter)
    assert len(read_losses(out)) == 2
    # ... refused for a text-to-image model by the validator exactly as by training
    ov = base_overrides(model, pictures, tmp_path / "wrong", **{"data_config.metadata_file": str(edit)})
    with pytest.raises(ConfigError, match="1 control image.s., more than the 0 a QwenImagePipeline model takes"):
        train(load_config(None, ov), QwenImageAdapter)
    r = validate("--config", ROOT / "train_configs/train_lora.yaml", *ov)
    assert r.returncode == 1 and "more than the 0 a QwenImagePipeline model takes" in r.stdout


def test_diffsynth_reference_lists_and_unread_columns(pictures, tmp_path):
    rows = [{"image": f"images/img{i}.png", "prompt": f"p{i}", "edit_image": [f"edits/img{i}.png", f"edits/img{(i + 1) % 4}.png"]}
            for i in range(4)]
    jsonl = pictures / "multi.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows))
    r = scan_metadata(jsonl, 64)
    assert not r.problems and [len(s.controls) for s in r.samples] == [2, 2, 2, 2]
    assert r.samples[0].controls[1].name == "img1.png"
    csv = pictures / "kontext.csv"
    csv.write_text('image,prompt,kontext_images,depth,mask\n"images/img0.png",p,"[""edits/img0.png""]",edits/img3.png,edits/img2.png\n')
    r = scan_metadata(csv, 64)
    assert not r.problems and len(r.samples[0].controls) == 1
    assert any("column 'depth' holds image paths but is not read" in w for w in r.warnings)
    assert r.samples[0].mask.name == "img2.png" and not any("'mask'" in w for w in r.warnings)  # a mask column is the loss mask
    both = pictures / "both.csv"
    both.write_text("image,prompt,control_image,edit_image\nimages/img0.png,p,edits/img0.png,edits/img1.png\n")
    assert "use one layout" in scan_metadata(both, 64).problems[0]


def test_validator_takes_what_users_type(tiny_models, pictures, tmp_path):
    targets, refs = pictures / "images", pictures / "edits"
    # a glob the shell expanded (every shard counts), and --config running the checks training runs before its scan (here:
    # control_dir for a text-to-image model)
    import io
    import tarfile

    shards = []
    for k in range(2):
        shard = tmp_path / f"s{k}.tar"
        with tarfile.open(shard, "w") as tf:
            for i in range(2):
                for name in (f"img{i}.png", f"img{i}.txt"):
                    data = (targets / name).read_bytes()
                    info = tarfile.TarInfo(f"k{k}_{name}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
        shards.append(shard)
    ov = base_overrides(tiny_models("qwen-image"), targets, tmp_path / "o", **{"data_config.control_dir": str(refs)})
    runs = run_each([[PY, "utils/validate_dataset.py", *map(str, args)] for args in (
        ("--img_dir", targets, "--control_dir", refs, "--control_dir", refs, "--img_size", 64),
        ("--path", targets, "--control_dir", f"{refs},{refs}", "--img_size", 64),
        ("--path", targets, "max_train_steps=3"),
        ("--webdataset", *shards, "--img_size", 64),
        ("--config", ROOT / "train_configs/train_lora.yaml", *ov))])
    r = runs[0]
    assert r.returncode == 0 and "control images per sample: 2 (4)" in r.stdout, r.stdout + r.stderr
    r = runs[1]
    assert r.returncode == 0 and "control images per sample: 2 (4)" in r.stdout
    r = runs[2]
    assert r.returncode == 2 and "overrides apply to --config only" in r.stderr
    r = runs[3]
    assert r.returncode == 0 and r.stdout.strip().endswith("64x64 (4)"), r.stdout + r.stderr
    r = runs[4]
    assert r.returncode == 2 and "takes no control images" in r.stderr


def test_help_is_truthful_for_every_entry_and_bench():
    import sys

    entries = {"train_4090.py": "quantize (str, default 'qfloat8' (this entry's preset))",
               "train_full_qwen_image.py": "training_method (str, default 'full' (this entry's preset))",
               "train_flux_lora.py": "pretrained_model_name_or_path (str, required: set it in the YAML)"}
    benches = sorted(p.name for p in (ROOT / "bench").glob("*.py") if p.name != "__init__.py")
    procs = {name: subprocess.Popen([sys.executable, f"bench/{name}" if name in benches else name, "--help"], cwd=ROOT,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for name in [*entries, *benches]}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0 and out.startswith("usage:"), (name, out[:300], err[-500:])
        if name in entries:
            assert entries[name] in out, name
    assert "Qwen/Qwen-Image" not in subprocess.run([sys.executable, "train_flux_lora.py", "--help"], cwd=ROOT, capture_output=True,
                                                   text=True).stdout


@pytest.mark.parametrize("override, hint", [("rnak=4", "did you mean 'rank'?"), ("img_dir=x", "did you mean 'data_config.img_dir'?"),
                                            ("lora_rank=8", "did you mean 'rank'?"), ("data_config.img_siz=64", "'data_config.img_size'")])
def test_a_mistyped_key_names_the_nearest_one(override, hint):
    with pytest.raises(ConfigError, match=hint.replace("?", r"\?").replace(".", r"\.")):
        load_config(None, [override], check_paths=False)


def test_what_the_user_asked_is_what_runs(tiny_qwen, dataset, tmp_path, caplog):
    # warm-up with a constant schedule warms up; epochs end the run with the bar's total and a line saying so
    with caplog.at_level("INFO", logger="trainer"):
        train(load_config(None, base_overrides(tiny_qwen, dataset, tmp_path / "o", max_train_steps=50, num_train_epochs=2,
                                               lr_warmup_steps=4)), QwenImageAdapter)
    lrs = [json.loads(x)["lr"] for x in (tmp_path / "o" / "train_log.jsonl").read_text().splitlines()]
    assert len(lrs) == 8 and lrs[0] < lrs[1] < lrs[3] == lrs[7] == 1e-3
    assert any("num_train_epochs=2 ends the run at step 8" in r.getMessage() for r in caplog.records)


def test_convert_lora_reads_the_family_from_the_file(qwen_lora, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    r, blocked = run_each([[PY, "utils/convert_lora.py", "--in", str(qwen_lora), "--out", str(out), "--to", "comfyui"]
                           for out in (tmp_path / "new" / "c.safetensors", blocker / "c.safetensors")])
    assert r.returncode == 0 and "family: qwen-image (from the file)" in r.stdout and (tmp_path / "new" / "c.safetensors").is_file(), r.stderr
    assert blocked.returncode == 2 and "is a file, not a folder" in blocked.stderr and "Traceback" not in blocked.stderr


@pytest.fixture(scope="module")
def qwen_lora(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    data = write_dataset(root / "data")
    train(load_config(None, base_overrides(tiny_models("qwen-image"), data, root / "out", max_train_steps=1)), QwenImageAdapter)
    return root / "out" / "pytorch_lora_weights.safetensors"


def test_samples_by_default_and_the_command_to_try_the_result(tiny_models, pictures, tmp_path, caplog):
    import shlex

    import yaml
    from PIL import Image

    for path in sorted((ROOT / "train_configs").glob("*.yaml")):
        cfg = yaml.safe_load(path.read_text())
        assert cfg.get("validation_prompts") or cfg.get("validation_samples", 0) > 0, path.name
    out = tmp_path / "t2i"
    ov = base_overrides(tiny_models("qwen-image"), pictures / "images", out, max_train_steps=2, validation_samples=2,
                        validation_steps=2, validation_num_inference_steps=2)
    with caplog.at_level("INFO", logger="trainer"):
        train(load_config(ROOT / "train_configs/train_lora.yaml", ov), QwenImageAdapter)
    grids = {p.name: Image.open(p) for p in (out / "samples").glob("*.png")}
    assert sorted(grids) == ["step-0.png", "step-2.png"]
    assert grids["step-0.png"].size[0] == 128 and grids["step-0.png"].size[1] > 64  # two tiles, their captions below
    tried = [r.getMessage() for r in caplog.records if r.getMessage().startswith("try it: ")]
    assert len(tried) == 1 and "--prompt 'a photo of thing number 0'" in tried[0] and "--width 64 --height 64" in tried[0]
    command = shlex.split(tried[0][len("try it: "):])
    assert command[:2] == ["python", "inference.py"]
    r = subprocess.run([PY, *command[1:], "--num_inference_steps", "2"], cwd=ROOT, capture_output=True, text=True)  # this venv's python
    assert r.returncode == 0 and (out / "sample.png").is_file(), r.stderr[-2000:]
    # an edit model samples its training references
    edit = tmp_path / "edit"
    ov = base_overrides(tiny_models("qwen-image-edit"), pictures / "images", edit, max_train_steps=1, validation_samples=1,
                        validation_num_inference_steps=2, **{"data_config.control_dir": str(pictures / "edits")})
    caplog.clear()
    with caplog.at_level("INFO", logger="trainer"):
        train(load_config(None, ov), QwenImageEditAdapter)
    assert sorted(p.name for p in (edit / "samples").glob("*.png")) == ["step-0.png", "step-1.png"]
    assert any("--image " + str(pictures / "edits" / "img0.png") in r.getMessage() for r in caplog.records)


def test_requirements_alone_leave_the_tools_runnable(tmp_path):
    """FlyMyAI's route is `pip install -r requirements.txt`: its last line installs this project, so a tool runs from
    any folder (without it, utils/validate_dataset.py could not import image_datasets)."""
    lines = [x.strip() for x in (ROOT / "requirements.txt").read_text().splitlines()]
    assert "-e ." in lines
    r = subprocess.run([PY, str(ROOT / "utils/validate_dataset.py"), "--path", str(write_dataset(tmp_path / "d", n=2)), "--img_size", "64"],
                       cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0 and "2 usable sample(s)" in r.stdout, r.stderr[-1500:]


def test_one_line_errors_under_the_readmes_accelerate_launch(tmp_path):
    from helpers import ACCELERATE

    cmd = [ACCELERATE[0], "launch", "--quiet", *ACCELERATE[2:], "train.py", "--config", "train_configs/train_lora.yaml", "rnak=4"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.returncode != 0 and lines == ["error: unknown config key 'rnak'; did you mean 'rank'? (see `python train.py --help` for the valid keys)"], r.stderr
    assert "accelerate launch --quiet train.py" in (ROOT / "README.md").read_text()
