"""End-to-end Qwen-Image training on a tiny random-weight pipeline built with the real classes."""

import logging
import shutil
import statistics
import subprocess

import numpy as np
import pytest
import torch
from diffusers import QwenImagePipeline
from helpers import ACCELERATE, PY, ROOT, base_overrides, read_losses, write_dataset
from PIL import Image
from safetensors.torch import load_file

from trainer.checkpoint import complete_checkpoints, latest_checkpoint
from trainer.config import ConfigError, load_config
from trainer.loop import train
from trainer.models.qwen_image import QwenImageAdapter


def generate(pipe, lora_scale=None, seed=0):
    if lora_scale is not None:
        pipe.set_adapters(["lora"], adapter_weights=[lora_scale])
    return pipe(
        "a photo of thing number 1", height=32, width=32, num_inference_steps=2, true_cfg_scale=1.0,
        generator=torch.Generator().manual_seed(seed), output_type="np",
    ).images[0]


@pytest.fixture(scope="module")
def launched_run(tiny_qwen, tmp_path_factory):
    """`accelerate launch train.py` as a user runs it: batch 2, checkpoints every 2 steps, keep 1."""
    tmp = tmp_path_factory.mktemp("launch")
    data = write_dataset(tmp / "data", n=4)
    out = tmp / "out"
    cmd = ACCELERATE + ["train.py", "--config", "train_configs/train_lora.yaml"] + base_overrides(
        tiny_qwen, data, out, **{"data_config.train_batch_size": 2, "data_config.num_workers": 1, "max_train_steps": 4,
                                 "checkpointing_steps": 2, "checkpoints_total_limit": 1, "learning_rate": 5e-3,
                                 "gradient_checkpointing": True}
    )
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out, r


def test_launch_writes_checkpoints_and_final_lora(launched_run):
    out, r = launched_run
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    assert [s for s, _ in complete_checkpoints(out)] == [4], "checkpoints_total_limit=1 keeps only the newest"
    assert not list(out.glob(".tmp-*")), "no temporary checkpoint folders left behind"
    assert len(read_losses(out)) == 4
    assert r.stderr.count("transformer_blocks") <= 1, "parameter names must not be listed (one example in a warning at most)"
    sd = load_file(out / "pytorch_lora_weights.safetensors")
    assert all(k.startswith("transformer.") and ".lora_" in k for k in sd)
    assert all(v.dtype == torch.float32 for v in sd.values())


def test_lora_loads_in_pipeline_without_warnings_and_changes_output(launched_run, tiny_qwen, caplog):
    out, _ = launched_run
    pipe = QwenImagePipeline.from_pretrained(tiny_qwen)
    base = generate(pipe)
    with caplog.at_level(logging.WARNING):
        pipe.load_lora_weights(out, adapter_name="lora")
    assert not [r for r in caplog.records if "unexpected keys" in r.getMessage().lower() or "missing keys" in r.getMessage().lower()]
    with_lora = generate(pipe, 1.0)
    assert np.abs(with_lora - base).max() > 1e-3
    assert np.allclose(generate(pipe, 0.0), base, atol=1e-6)


def test_inference_script_sizes_and_scale_zero(launched_run, tiny_qwen, tmp_path):
    from inference import main as inference_main

    out, _ = launched_run

    def run(*extra, subprocess_run=False):
        path = tmp_path / f"img{len(list(tmp_path.iterdir()))}.png"
        argv = ["--model_name", str(tiny_qwen), "--prompt", "a photo", "--width", "48", "--height", "32",
                "--num_inference_steps", "3", "--seed", "1", "--output_image", str(path), *extra]
        if subprocess_run:  # the script as users run it
            r = subprocess.run([PY, "inference.py", *argv], cwd=ROOT, capture_output=True, text=True, timeout=120)
            assert r.returncode == 0, r.stderr[-2000:]
        else:
            assert inference_main(argv) == 0
        return np.asarray(Image.open(path)).astype(int)

    base = run(subprocess_run=True)
    assert base.shape == (32, 48, 3)
    zero = run("--lora_weights", str(out / "pytorch_lora_weights.safetensors"), "--lora_scale", "0")
    full = run("--lora_weights", str(out / "checkpoint-4"))
    assert np.array_equal(zero, base)
    assert np.abs(full - base).max() > 0
    for mode in ("qint8", "nf4"):  # low-VRAM inference: LoRA on top of the quantized transformer
        q_base = run("--quantize", mode)
        q_full = run("--quantize", mode, "--lora_weights", str(out / "checkpoint-4"))
        assert np.abs(q_full - q_base).max() > 0, f"{mode}: the LoRA changed nothing"
        assert np.abs(q_full - full).mean() < 0.5 * np.abs(full - base).mean(), f"{mode}: far from the unquantized result"
    r = subprocess.run([PY, "inference.py", "--model_name", str(tiny_qwen), "--prompt", "a", "--offload", "model", "--device", "cpu"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--offload" in r.stderr


def test_overfit_one_image_lowers_loss(tiny_qwen, tmp_path):
    data = write_dataset(tmp_path / "one", n=1)
    cfg = load_config(None, base_overrides(tiny_qwen, data, tmp_path / "out", max_train_steps=100, learning_rate=3e-3, rank=8))
    train(cfg, QwenImageAdapter)
    losses = read_losses(tmp_path / "out")
    first, last = statistics.mean(losses[:10]), statistics.mean(losses[-10:])
    assert last < 0.8 * first, (first, last)


def test_padding_does_not_leak_into_prediction(tiny_qwen):
    cfg = load_config(None, base_overrides(tiny_qwen, ROOT, ROOT), check_paths=False)
    adapter = QwenImageAdapter.from_model(cfg)
    adapter.load()
    short, long = "a cat", "a very long caption about a cat sitting on a red chair in the sun at the beach"
    both = adapter.encode_prompts([short, long])
    alone = adapter.encode_prompts([short])
    assert both["prompt_embeds_mask"][0].sum() < both["prompt_embeds_mask"][1].sum(), "captions were padded"
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    sig = torch.tensor([0.5, 0.7])
    with torch.no_grad():
        pb = adapter.predict(adapter.transformer, x, sig, both)
        pa = adapter.predict(adapter.transformer, x[:1], sig[:1], alone)
    assert torch.allclose(pb[0], pa[0], atol=1e-5)


def test_resume_is_bit_identical(tiny_qwen, tmp_path):
    data = write_dataset(tmp_path / "data", n=6)
    common = {"data_config.train_batch_size": 2, "gradient_accumulation_steps": 2, "data_config.caption_dropout_rate": 0.5,
              "max_train_steps": 6, "checkpointing_steps": 3}
    full = tmp_path / "full"
    train(load_config(None, base_overrides(tiny_qwen, data, full, **common)), QwenImageAdapter)

    part = tmp_path / "part"
    train(load_config(None, base_overrides(tiny_qwen, data, part, **{**common, "max_train_steps": 3})), QwenImageAdapter)
    assert latest_checkpoint(part).name == "checkpoint-3"
    train(load_config(None, base_overrides(tiny_qwen, data, part, **common, resume_from_checkpoint="latest")), QwenImageAdapter)

    assert read_losses(full) == read_losses(part)  # exact, per step
    a = load_file(full / "pytorch_lora_weights.safetensors")
    b = load_file(part / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_changed_rank_is_refused(tiny_qwen, tmp_path):
    data = write_dataset(tmp_path / "data", n=2)
    out = tmp_path / "out"
    train(load_config(None, base_overrides(tiny_qwen, data, out, max_train_steps=2)), QwenImageAdapter)
    with pytest.raises(ConfigError, match="rank"):
        train(load_config(None, base_overrides(tiny_qwen, data, out, max_train_steps=4, rank=8,
                                               resume_from_checkpoint="latest")), QwenImageAdapter)
    with pytest.raises(ConfigError, match="seed"):
        train(load_config(None, base_overrides(tiny_qwen, data, out, max_train_steps=4, seed=5,
                                               resume_from_checkpoint="latest")), QwenImageAdapter)
    train(load_config(None, base_overrides(tiny_qwen, data, out, max_train_steps=4, seed=5, resume_from_checkpoint="latest",
                                           resume_allow_config_change=True)), QwenImageAdapter)
    assert len(read_losses(out)) == 4, "continued from step 2 instead of restarting"


def test_half_written_checkpoint_is_never_latest(tmp_path):
    good = tmp_path / "checkpoint-2"
    good.mkdir()
    (good / "training_state.pt").write_bytes(b"x")
    (good / "pytorch_lora_weights.safetensors").write_bytes(b"x")
    (tmp_path / "checkpoint-5").mkdir()  # crashed mid-save in an old layout: no state file
    (tmp_path / ".tmp-checkpoint-7").mkdir()
    assert latest_checkpoint(tmp_path) == good


def test_bad_dataset_refused_at_start_or_skipped(tiny_qwen, tmp_path):
    data = write_dataset(tmp_path / "data", n=2)
    (data / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (data / "broken.txt").write_text("x")
    with pytest.raises(ConfigError, match="broken.jpg"):
        train(load_config(None, base_overrides(tiny_qwen, data, tmp_path / "o1")), QwenImageAdapter)
    out = tmp_path / "o2"
    train(load_config(None, base_overrides(tiny_qwen, data, out, **{"data_config.skip_bad_files": True})), QwenImageAdapter)
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    shutil.rmtree(out)
