"""Never lose a run: non-finite steps, signals, unwritable output, and the catalogue of bad inputs."""

import json
import logging
import signal
import struct
import subprocess
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import PY, ROOT, base_overrides, read_losses, write_dataset
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from image_datasets import CaptionDataset, scan_caption_folder
from trainer.checkpoint import latest_checkpoint
from trainer.config import ConfigError, load_config
from trainer.loop import TrainingError, train
from trainer.models.qwen_image import QwenImageAdapter


class NaNAt(QwenImageAdapter):
    """The real adapter, with a NaN injected into the prediction on chosen forward calls."""

    bad_calls: set = set()

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.calls = 0

    def predict(self, transformer, noisy, sigmas, cond):
        out = super().predict(transformer, noisy, sigmas, cond)
        self.calls += 1
        return out * float("nan") if self.calls in self.bad_calls else out


def test_nonfinite_step_is_skipped_and_logged(tiny_qwen, dataset, tmp_path, caplog):
    NaNAt.bad_calls = {2}
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="trainer"):
        train(load_config(None, base_overrides(tiny_qwen, dataset, out, max_train_steps=4)), NaNAt)
    msgs = [r.getMessage() for r in caplog.records if "non-finite" in r.getMessage()]
    assert len(msgs) == 1 and "step 2" in msgs[0] and ".png" in msgs[0]
    assert [json.loads(x)["step"] for x in (out / "train_log.jsonl").read_text().splitlines()] == [1, 3, 4]
    from safetensors.torch import load_file

    assert all(torch.isfinite(v).all() for v in load_file(out / "pytorch_lora_weights.safetensors").values())


def test_too_many_nonfinite_steps_stop_with_clear_error(tiny_qwen, dataset, tmp_path):
    NaNAt.bad_calls = set(range(1, 100))
    with pytest.raises(TrainingError, match="3 non-finite steps in a row"):
        train(load_config(None, base_overrides(tiny_qwen, dataset, tmp_path / "o", max_train_steps=10, max_nonfinite_steps=3)), NaNAt)


def test_sigterm_saves_checkpoint_and_says_how_to_resume(tiny_qwen, dataset, tmp_path):
    out = tmp_path / "out"
    cmd = [PY, "train.py", "--config", "train_configs/train_lora.yaml"] + base_overrides(
        tiny_qwen, dataset, out, max_train_steps=100000, checkpointing_steps=0)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = out / "train_log.jsonl"
    deadline = time.time() + 120
    while not (log.exists() and log.stat().st_size > 0) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "resume_from_checkpoint=latest" in err
    ckpt = latest_checkpoint(out)
    assert ckpt is not None and int(ckpt.name.split("-")[1]) >= 1
    assert (out / "pytorch_lora_weights.safetensors").is_file()


def test_stop_between_updates_still_saves_a_checkpoint(tiny_qwen, tmp_path, monkeypatch):
    """A SIGTERM that lands after an epoch's last update, while the loader winds down (no update follows to save in),
    must still leave the checkpoint the message points to, and the run must resume from it."""
    import image_datasets
    from trainer import loop

    data = write_dataset(tmp_path / "d", n=3)
    out = tmp_path / "out"
    stops = []
    real_enter, real_iter = loop.StopRequest.__enter__, image_datasets.SizeGroupedBatchSampler.__iter__

    def enter(self):
        stops.append(self)
        return real_enter(self)

    def batches(self):
        yield from real_iter(self)
        if self.epoch == 0:
            stops[-1].signum = signal.SIGTERM

    monkeypatch.setattr(loop.StopRequest, "__enter__", enter)
    monkeypatch.setattr(image_datasets.SizeGroupedBatchSampler, "__iter__", batches)
    with pytest.raises(loop.Interrupted, match="checkpoint-3"):
        train(load_config(None, base_overrides(tiny_qwen, data, out, max_train_steps=10)), QwenImageAdapter)
    assert latest_checkpoint(out).name == "checkpoint-3" and len(read_losses(out)) == 3
    monkeypatch.setattr(image_datasets.SizeGroupedBatchSampler, "__iter__", real_iter)
    train(load_config(None, base_overrides(tiny_qwen, data, out, max_train_steps=5, resume_from_checkpoint="latest")), QwenImageAdapter)
    assert len(read_losses(out)) == 5


def test_unwritable_output_dir_fails_at_start(tiny_qwen, dataset, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="output_dir"):
        train(load_config(None, base_overrides(tiny_qwen, dataset, blocker / "out")), QwenImageAdapter)


def test_long_caption_is_truncated_with_a_warning(tiny_qwen, tmp_path, caplog):
    data = write_dataset(tmp_path / "d", n=2, captions=["short", "word " * 200])
    with caplog.at_level(logging.WARNING, logger="trainer"):
        train(load_config(None, base_overrides(tiny_qwen, data, tmp_path / "o", max_train_steps=1, max_sequence_length=16)), QwenImageAdapter)
    assert any("img1.png" in r.getMessage() and "only the first 16" in r.getMessage() for r in caplog.records)


# --- the bad-input catalogue: every entry is named in a clear message, none crashes -----------------------


def _png_header_only(path: Path, w: int, h: int) -> None:
    """A PNG whose header claims w x h pixels (for the decompression-bomb guard) without the pixels."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
    d = tmp_path_factory.mktemp("catalogue")
    good = (np.random.default_rng(0).random((40, 40, 3)) * 255).astype("uint8")

    def cap(name, text="a caption"):
        (d / name).write_bytes(text if isinstance(text, bytes) else text.encode())

    Image.fromarray(good).save(d / "truncated.jpg")
    data = (d / "truncated.jpg").read_bytes()
    (d / "truncated.jpg").write_bytes(data[: len(data) // 2])
    cap("truncated.txt")
    (d / "zero.png").write_bytes(b"")
    cap("zero.txt")
    (d / "text.jpg").write_text("I am not a JPEG")
    cap("text.txt")
    Image.new("CMYK", (40, 40), (0, 200, 200, 0)).save(d / "cmyk.jpg")
    cap("cmyk.txt")
    Image.fromarray((np.arange(1600).reshape(40, 40) * 40).astype(np.uint16)).save(d / "sixteen.png")
    cap("sixteen.txt")
    pal = Image.new("P", (40, 40), 1)
    pal.putpalette([255, 255, 255, 10, 200, 10] + [0] * 762)
    pal.save(d / "palette.png", transparency=0)
    cap("palette.txt")
    Image.fromarray(good).convert("L").save(d / "grey.png")
    cap("grey.txt")
    exif = Image.Exif()
    exif[0x0112] = 8
    Image.new("RGB", (60, 30), (1, 2, 3)).save(d / "rotated.jpg", exif=exif.tobytes())
    cap("rotated.txt")
    Image.fromarray(good[:16, :16]).save(d / "tiny16.png")
    cap("tiny16.txt")
    Image.new("RGB", (12000, 9000), (90, 90, 90)).save(d / "huge.jpg", quality=30)
    cap("huge.txt")
    _png_header_only(d / "bomb.png", 20000, 10000)
    cap("bomb.txt")
    Image.fromarray(good).save(d / "nocaption.png")
    Image.fromarray(good).save(d / "emptycap.png")
    cap("emptycap.txt", "")
    Image.fromarray(good).save(d / "latin1.png")
    cap("latin1.txt", "caf\xe9 cr\xe8me".encode("latin-1"))
    Image.fromarray(good).save(d / "with spaces é ünï.v2.final.png")
    cap("with spaces é ünï.v2.final.txt", "unicode names")
    return d


EXPECTED_PROBLEMS = {
    "truncated.jpg": "corrupt or truncated",
    "zero.png": "not a readable image",
    "text.jpg": "not a readable image",
    "bomb.png": "too large",
    "nocaption.png": "no caption file",
    "latin1.txt": "not UTF-8",
}
USABLE = ["cmyk.jpg", "emptycap.png", "grey.png", "huge.jpg", "palette.png", "rotated.jpg", "sixteen.png", "tiny16.png",
          "with spaces é ünï.v2.final.png"]


def test_catalogue_scan_reports_every_problem_once(catalogue):
    scan = scan_caption_folder(catalogue, 64)
    assert sorted(s.image.name for s in scan.samples) == sorted(USABLE)
    assert len(scan.problems) == len(EXPECTED_PROBLEMS)
    for name, why in EXPECTED_PROBLEMS.items():
        assert any(name in p and why in p for p in scan.problems), (name, scan.problems)
    assert any("emptycap.txt" in w and "empty" in w for w in scan.warnings)
    assert any("tiny16.png" in w and "upscaled" in w for w in scan.warnings)
    ds = CaptionDataset(scan.samples)
    for i, s in enumerate(scan.samples):
        px = ds[(i, 0)]["pixel_values"]
        assert px.shape == (3, s.size[1], s.size[0]) and torch.isfinite(px).all(), s.image.name
    rotated = next(s for s in scan.samples if s.image.name == "rotated.jpg")
    assert rotated.size[1] > rotated.size[0], "EXIF orientation 8 turns 60x30 into portrait"


def test_catalogue_validate_dataset_lists_all_at_once(catalogue):
    r = subprocess.run([PY, "utils/validate_dataset.py", "--path", str(catalogue), "--img_size", "64"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 1
    errors = [line for line in r.stdout.splitlines() if line.startswith("error:")]
    assert len(errors) == len(EXPECTED_PROBLEMS)


def test_catalogue_training_refuses_then_skips(catalogue, tiny_qwen, tmp_path):
    with pytest.raises(ConfigError) as e:
        train(load_config(None, base_overrides(tiny_qwen, catalogue, tmp_path / "a")), QwenImageAdapter)
    assert all(name in str(e.value) for name in EXPECTED_PROBLEMS) and "skip_bad_files" in str(e.value)
    out = tmp_path / "b"
    train(load_config(None, base_overrides(tiny_qwen, catalogue, out, max_train_steps=len(USABLE),
                                           **{"data_config.skip_bad_files": True})), QwenImageAdapter)
    assert len(read_losses(out)) == len(USABLE)


def test_empty_folder_and_captions_only(tmp_path):
    (tmp_path / "empty").mkdir()
    assert "no images found" in scan_caption_folder(tmp_path / "empty", 64).problems[0]
    (tmp_path / "caps").mkdir()
    (tmp_path / "caps" / "a.txt").write_text("x")
    assert "only 1 caption file" in scan_caption_folder(tmp_path / "caps", 64).problems[0]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    files=st.lists(
        st.tuples(
            st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="/\\\0"), min_size=1, max_size=20),
            st.sampled_from([".png", ".JPG", ".jpeg", ".webp", ".txt", ".bmp", ""]),
            st.binary(max_size=300),
        ),
        max_size=6,
    )
)
def test_loader_never_crashes_on_random_bytes_and_names(tmp_path_factory, files):
    d = tmp_path_factory.mktemp("fuzz")
    for stem, ext, data in files:
        name = (stem.strip(". ") or "x") + ext
        try:
            (d / name).write_bytes(data)
        except OSError:
            continue  # a name the filesystem refuses (too long in bytes, ...) is not our input
    scan = scan_caption_folder(d, 32)
    assert scan.samples or scan.problems
    ds = CaptionDataset(scan.samples)
    for i in range(len(scan.samples)):
        assert torch.isfinite(ds[(i, 0)]["pixel_values"]).all()


def test_lora_that_cannot_learn_is_stopped_at_the_first_checkpoint(tiny_qwen, dataset, tmp_path):
    """The no-op guard: with the output layer at zero no gradient reaches the LoRA (the failure mode of a
    zero-initialised or wrongly offloaded model); the run stops with one line instead of saving a LoRA that does
    nothing."""
    from diffusers import QwenImagePipeline

    dead = tmp_path / "dead-model"
    pipe = QwenImagePipeline.from_pretrained(tiny_qwen)
    torch.nn.init.zeros_(pipe.transformer.proj_out.weight)
    pipe.save_pretrained(dead)
    with pytest.raises(TrainingError, match="every lora_B .* is unchanged: the LoRA would do nothing"):
        train(load_config(None, base_overrides(dead, dataset, tmp_path / "o", max_train_steps=4, checkpointing_steps=2)), QwenImageAdapter)
    assert not (tmp_path / "o" / "checkpoint-2").exists()


def test_layers_without_gradient_are_only_warned_about(tiny_qwen, dataset, tmp_path, caplog):
    """Qwen-Image's last block's text projections feed nothing: structural, a warning, training goes on."""
    with caplog.at_level(logging.WARNING, logger="trainer"):
        train(load_config(None, base_overrides(tiny_qwen, dataset, tmp_path / "o", max_train_steps=2)), QwenImageAdapter)
    assert any("receive no gradient" in r.getMessage() and "transformer_blocks.1" in r.getMessage() for r in caplog.records)
