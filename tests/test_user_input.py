"""Nothing a user can feed the trainer crashes it after the model has loaded (issue: configs, metadata, disks,
engines, LoRA files). Each test runs the way a user does (entry scripts, real files) and checks the one-line message."""

import json
import logging
import shutil
import signal
import subprocess
import time

import pytest
from helpers import ACCELERATE, PY, ROOT, base_overrides, read_losses, run_each, write_dataset
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from trainer.config import ConfigError, load_config
from trainer.loop import TrainingError, train
from trainer.models.flux import FluxAdapter
from trainer.models.qwen_image import QwenImageAdapter, QwenImageEditAdapter

FLYMYAI = ROOT / "tests" / "fixtures" / "flymyai"


def run(cmd, **kw):
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, **kw)


# --- 1. FlyMyAI's own YAML files, verbatim --------------------------------------------------------------------


@pytest.mark.parametrize("name", ["train_lora.yaml", "train_lora_4090.yaml", "train_lora_qwen_edit.yaml"])
def test_flymyai_yaml_loads_unchanged(name, tmp_path):
    cfg = load_config(FLYMYAI / name, [f"data_config.img_dir={tmp_path}", f"output_dir={tmp_path / 'o'}"]
                      + ([f"data_config.control_dir={tmp_path}"] if "edit" in name else []), check_paths=False)
    assert cfg.report_to == "none", "report_to: null is FlyMyAI's way of turning trackers off"
    assert cfg.rank == 16 and cfg.data_config.caption_dropout_rate == 0.1
    if name == "train_lora_4090.yaml":
        assert cfg.quantize == "qfloat8" and cfg.optimizer == "adamw8bit" and cfg.save_cache_on_disk


@pytest.mark.parametrize("name, entry, family", [
    ("train_lora.yaml", "train.py", "qwen-image"),
    ("train_lora_4090.yaml", "train_4090.py", "qwen-image"),
    ("train_lora_qwen_edit.yaml", "train_qwen_edit_lora.py", "qwen-image-edit"),
])
def test_flymyai_yaml_trains_with_only_paths_changed(name, entry, family, tiny_models, tmp_path):
    """Their files as published (img_size 1024, 4 workers, report_to: null); paths and the step count overridden."""
    data = write_dataset(tmp_path / "img", n=2, size=(96, 64))
    paths = [f"pretrained_model_name_or_path={tiny_models(family)}", f"data_config.img_dir={data}", f"output_dir={tmp_path / 'o'}",
             "max_train_steps=1"]
    if "edit" in name:
        paths.append(f"data_config.control_dir={write_dataset(tmp_path / 'ctrl', n=2, size=(64, 80), seed=3)}")
    r = run(ACCELERATE + [entry, "--config", str(FLYMYAI / name), *paths])
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "o" / "pytorch_lora_weights.safetensors").is_file()


# --- 2. metadata files: every row-level problem named file:line before any model loads ----------------------------


def _edit_data(tmp_path):
    targets = write_dataset(tmp_path / "t", n=3, size=(64, 48))
    controls = write_dataset(tmp_path / "c", n=3, size=(48, 64), seed=5)
    return targets, controls


@pytest.mark.parametrize("kind", ["missing column", "empty cell", "short row", "unclosed quote", "not an object"])
def test_bad_metadata_rows_are_named_before_the_model_loads(kind, tiny_models, tmp_path, monkeypatch):
    t, c = _edit_data(tmp_path)
    ok = [f"{t / f'img{i}.png'},edit {i},{c / f'img{i}.png'}" for i in range(3)]
    if kind == "missing column":
        meta, text = tmp_path / "m.csv", "image,prompt\n" + "".join(f"{t / f'img{i}.png'},edit {i}\n" for i in range(3))
        line = 2
    elif kind == "empty cell":
        meta, text = tmp_path / "m.csv", "image,prompt,control_image\n" + f"{ok[0]}\n{t / 'img1.png'},edit 1,\n{ok[2]}\n"
        line = 3
    elif kind == "short row":
        meta, text = tmp_path / "m.csv", "image,prompt,control_image\n" + f"{ok[0]}\n{t / 'img1.png'},edit 1\n{ok[2]}\n"
        line = 3
    elif kind == "unclosed quote":
        meta = tmp_path / "m.csv"
        text = "image,prompt,control_image\n" + f'{ok[0]}\n{t / "img1.png"},"edit 1,{c / "img1.png"}\n{ok[2]}\n'
        line = 3
    else:
        meta = tmp_path / "m.jsonl"
        rows = [json.dumps({"image": str(t / f"img{i}.png"), "prompt": f"e{i}", "control_image": str(c / f"img{i}.png")}) for i in (0, 2)]
        text = rows[0] + "\n" + json.dumps(["not", "an", "object"]) + "\n" + rows[1] + "\n"
        line = 2
    meta.write_text(text)
    loaded = []
    monkeypatch.setattr(QwenImageEditAdapter, "load_encoders", lambda self: loaded.append(1))
    cfg = load_config(None, base_overrides(tiny_models("qwen-image-edit"), t, tmp_path / "o", **{"data_config.metadata_file": str(meta)}))
    with pytest.raises(ConfigError) as e:
        train(cfg, QwenImageEditAdapter)
    assert f"{meta.name}:{line}:" in str(e.value) and not loaded, str(e.value)
    # the same check, run by the dataset tool on the same config
    yaml = tmp_path / "cfg.yaml"
    yaml.write_text(f"pretrained_model_name_or_path: {tiny_models('qwen-image-edit')}\ndata_config:\n  metadata_file: {meta}\n  img_size: 64\n")
    r = run([PY, "utils/validate_dataset.py", "--config", str(yaml)])
    assert r.returncode == 1 and f"{meta.name}:{line}:" in r.stdout, r.stdout + r.stderr


METADATA_CELL = st.one_of(st.none(), st.just(""), st.sampled_from(["IMG0", "IMG1", "CTRL0", "CTRL1", "nope.png"]),
                          st.text(alphabet="ab,\"' \n", max_size=6), st.integers(-3, 3), st.lists(st.integers(), max_size=2))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fmt=st.sampled_from(["csv", "jsonl"]),
       rows=st.lists(st.dictionaries(st.sampled_from(["image", "prompt", "control_image", "control_image_2", "extra"]),
                                     METADATA_CELL, max_size=5), min_size=1, max_size=4),
       quote_all=st.booleans())
def test_any_metadata_file_is_refused_before_loading_or_trains(fmt, rows, quote_all, tiny_models, tmp_path_factory):
    import csv
    import io

    tmp = tmp_path_factory.mktemp("meta")
    t, c = _edit_data(tmp)
    names = {"IMG0": str(t / "img0.png"), "IMG1": str(t / "img1.png"), "CTRL0": str(c / "img0.png"), "CTRL1": str(c / "img1.png")}
    rows = [{k: names.get(v, v) if isinstance(v, str) else v for k, v in r.items()} for r in rows]
    meta = tmp / f"metadata.{fmt}"
    if fmt == "jsonl":
        meta.write_text("\n".join(json.dumps(r) for r in rows))
    else:
        buf = io.StringIO()
        header = sorted({k for r in rows for k in r}) or ["image"]
        w = csv.writer(buf, quoting=csv.QUOTE_ALL if quote_all else csv.QUOTE_MINIMAL)
        w.writerow(header)
        for r in rows:
            w.writerow(["" if r.get(k) is None else r.get(k) for k in header][: max(1, len(r))])
        meta.write_text(buf.getvalue())
    stage = []

    class Watched(QwenImageEditAdapter):
        def load_encoders(self):
            stage.append("loaded")
            return super().load_encoders()

    cfg = load_config(None, base_overrides(tiny_models("qwen-image-edit-plus"), t, tmp / "o", max_train_steps=2,
                                           **{"data_config.metadata_file": str(meta), "data_config.img_size": 32,
                                              "data_config.control_size": 32}))
    try:
        train(cfg, Watched)
    except ConfigError:
        assert not stage, "a metadata problem was found after the model started loading"
        return
    assert len(read_losses(tmp / "o")) == 2


# --- 3 / 4. engines ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine_launches(tiny_qwen, tmp_path_factory):
    """The shipped DeepSpeed config (1 process) and the FSDP one without CUDA, launched side by side: (result, output_dir) each."""
    tmp = tmp_path_factory.mktemp("engines")
    ds, fsdp, dataset = tmp / "ds", tmp / "fsdp", write_dataset(tmp / "data")
    results = run_each([
        [str(ACCELERATE[0]), "launch", "--config_file", "accelerate_configs/deepspeed_zero2.yaml", "--num_processes", "1", "train.py",
         "--config", "train_configs/train_lora.yaml", *base_overrides(tiny_qwen, dataset, ds, max_train_steps=2)],
        [str(ACCELERATE[0]), "launch", "--config_file", "accelerate_configs/fsdp.yaml", "train.py", "--config", "train_configs/train_lora.yaml",
         *base_overrides(tiny_qwen, dataset, fsdp)],
    ], timeout=600)
    return {"deepspeed": (results[0], ds), "fsdp": (results[1], fsdp)}


def test_shipped_deepspeed_config_starts_training(engine_launches):
    r, out = engine_launches["deepspeed"]
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(read_losses(out)) == 2 and (out / "pytorch_lora_weights.safetensors").is_file()


def test_engine_that_cannot_start_is_refused_not_run_n_times(engine_launches):
    """FSDP without CUDA: accelerate starts 2 processes that would each train alone into one output_dir."""
    r, out = engine_launches["fsdp"]
    assert r.returncode != 0
    assert "launched 2 processes, but they did not join one training" in r.stderr
    assert "loading qwen-image" not in r.stderr and not (out / "pytorch_lora_weights.safetensors").exists()


# --- 5. a LoRA of another family --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def flux_lora(tiny_models, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("flux_lora")
    data = write_dataset(tmp / "d", n=1)
    train(load_config(None, base_overrides(tiny_models("flux"), data, tmp / "out", max_train_steps=1)), FluxAdapter)
    return tmp / "out" / "pytorch_lora_weights.safetensors"


def test_lora_of_another_family_is_refused_by_every_tool(flux_lora, tiny_qwen, tmp_path):
    inference, merge, convert, convert_right = run_each([
        [PY, "inference.py", "--model_name", str(tiny_qwen), "--lora_weights", str(flux_lora), "--prompt", "a", "--output_image",
         str(tmp_path / "x.png")],
        [PY, "utils/merge_lora.py", "--model_name", str(tiny_qwen), "--lora_weights", str(flux_lora), "--out", str(tmp_path / "m")],
        [PY, "utils/convert_lora.py", "--in", str(flux_lora), "--out", str(tmp_path / "c.safetensors"), "--to", "comfyui",
         "--family", "qwen-image"],
        [PY, "utils/convert_lora.py", "--in", str(flux_lora), "--out", str(tmp_path / "c2.safetensors"), "--to", "comfyui",
         "--family", "flux"],
    ])
    r = inference
    assert r.returncode == 2 and "do not fit this qwen-image model" in r.stderr and "LoRA for flux models" in r.stderr, r.stderr
    assert not (tmp_path / "x.png").exists()
    assert merge.returncode == 2 and "LoRA for flux models" in merge.stderr
    assert convert.returncode == 2 and "LoRA for flux models" in convert.stderr
    assert not (tmp_path / "c.safetensors").exists()
    assert convert_right.returncode == 0, convert_right.stderr


# --- 6. disk full -------------------------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], capture_output=True)
    if r.returncode:
        pytest.skip(f"cannot mount a small tmpfs here ({r.stderr.decode().strip()})")
    yield mount
    subprocess.run(["umount", str(mount)])


def test_disk_full_while_checkpointing_says_so_and_resumes(tiny_qwen, dataset, small_disk, caplog):
    out = small_disk / "out"
    filler = small_disk / "filler"

    class FillsTheDisk(QwenImageAdapter):
        calls = 0

        def predict(self, *args):
            FillsTheDisk.calls += 1
            if FillsTheDisk.calls == 3:  # after checkpoint-2 is written: leave 16 KiB
                free = shutil.disk_usage(small_disk).free
                filler.write_bytes(b"\0" * (free - 16 * 1024))
            return super().predict(*args)

    common = dict(max_train_steps=4, checkpointing_steps=2, report_to="none")
    with caplog.at_level(logging.WARNING, logger="trainer"), pytest.raises(TrainingError) as e:
        train(load_config(None, base_overrides(tiny_qwen, dataset, out, **common)), FillsTheDisk)
    msg = str(e.value)
    assert "disk full while writing checkpoint-4" in msg and "checkpoint-2, is intact" in msg and "resume_from_checkpoint=latest" in msg
    assert any("may fill up soon" in r.getMessage() for r in caplog.records), "warned before the save"
    assert not list(out.glob(".tmp-*")), "the half-written checkpoint is removed"
    filler.unlink()
    train(load_config(None, base_overrides(tiny_qwen, dataset, out, **common, resume_from_checkpoint="latest")), QwenImageAdapter)
    assert [json.loads(x)["step"] for x in (out / "train_log.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def test_torch_save_disk_error_becomes_a_clear_message(tiny_qwen, dataset, tmp_path, monkeypatch):
    """The exact error torch.save raises on a full disk, wherever a tmpfs cannot be mounted."""
    import trainer.checkpoint as ckpt

    def full(*_a, **_k):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0")

    monkeypatch.setattr(ckpt.torch, "save", full)
    with pytest.raises(TrainingError, match="disk full while writing checkpoint-2 in .*no earlier checkpoint exists"):
        train(load_config(None, base_overrides(tiny_qwen, dataset, tmp_path / "o", max_train_steps=2)), QwenImageAdapter)


# --- 7. the training log after kill -9 and resume ---------------------------------------------------------------


def test_log_holds_each_step_once_after_kills_and_resumes(tiny_qwen, tmp_path):
    data = write_dataset(tmp_path / "d", n=3)
    out = tmp_path / "out"
    cmd = [PY, "train.py", "--config", "train_configs/train_lora.yaml"] + base_overrides(
        tiny_qwen, data, out, max_train_steps=24, checkpointing_steps=4, logging_steps=3, resume_from_checkpoint="latest")
    for wait_for in ("checkpoint-8", "checkpoint-16"):
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 180
        while not (out / wait_for).is_dir() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        time.sleep(0.15)  # a little past the checkpoint: steps logged after it must not survive the resume
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with open(out / "train_log.jsonl", "a") as f:
        f.write('{"step": 99, "lo')  # a line cut by the kill
    r = run(cmd)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "skipped 1 damaged line" in r.stderr
    assert [json.loads(x)["step"] for x in (out / "train_log.jsonl").read_text().splitlines()] == list(range(1, 25))
    assert (out / "loss_curve.png").is_file()


# --- 8 / 10. config files -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, needle", [
    ("", "is empty or not a mapping"),
    ("seed: 3\n", "does not set pretrained_model_name_or_path"),
    ("pretrained_model_name_or_path: x\n", "sets none of data_config.img_dir, metadata_file, webdataset, hf_dataset"),
    ("rank: 4\ndata_config:\n  img_dir: [a, b\n", "not valid YAML: did not find expected ',' or ']' at line 4, column 1"),
])
def test_config_file_must_name_model_and_data_and_parse(text, needle, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    r = run([PY, "train.py", "--config", str(cfg)])
    assert r.returncode == 2 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_images_in_subfolders_are_reported_or_used(tiny_qwen, tmp_path, caplog):
    data = write_dataset(tmp_path / "d", n=2)
    write_dataset(data / "more", n=3, seed=2)
    with caplog.at_level(logging.WARNING, logger="trainer"):
        train(load_config(None, base_overrides(tiny_qwen, data, tmp_path / "a", max_train_steps=1)), QwenImageAdapter)
    assert any("3 image(s) in subfolders are not used" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="trainer"):
        train(load_config(None, base_overrides(tiny_qwen, data, tmp_path / "b", max_train_steps=1, **{"data_config.recursive": True})),
              QwenImageAdapter)
    assert any(r.getMessage().startswith("5 images") for r in caplog.records)


# --- 9 / 10. inference flags ----------------------------------------------------------------------------------------


def test_inference_takes_flymyai_flags_and_checks_before_generating(tiny_qwen, tmp_path):
    out = tmp_path / "img.png"
    r = run([PY, "inference.py", "--model_name", str(tiny_qwen), "--prompt", "man in the city", "--negative_prompt", " ",
             "--width", "72", "--height", "32", "--num_inference_steps", "2", "--true_cfg_scale", "5.0", "--seed", "655",
             "--quantization", "qint8", "--output_image", str(out)])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "--width 72 is not a multiple of 16; the pipeline renders 64" in r.stderr
    assert Image.open(out).size == (64, 32)
    t = time.time()
    r = run([PY, "inference.py", "--model_name", str(tiny_qwen), "--prompt", "a", "--output_image", str(tmp_path / "noext")])
    assert r.returncode == 2 and "--output_image: " in r.stderr and "needs an image extension" in r.stderr
    assert time.time() - t < 30 and not (tmp_path / "noext").exists()


# --- 10. the planner against the measured GPU figures ----------------------------------------------------------------


def test_planner_matches_measured_h100_peaks_and_the_4090_preset_fits():
    from bench.planner_check import rows

    for model, q, predicted, measured in rows():
        assert abs(predicted - measured) < 0.35, (model, q, predicted, measured)
    r = run([PY, "utils/estimate_memory.py", "--config", "train_configs/train_lora_4090.yaml", "--vram_gb", "24"])
    assert r.returncode == 0 and r.stdout.strip().endswith("yes"), r.stdout
