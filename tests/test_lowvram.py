"""Quantized base models, the embedding cache, optimizers and the low-VRAM entry."""

import logging
import statistics
import subprocess
import sys

import pytest
import torch
from diffusers import QwenImagePipeline
from helpers import ACCELERATE, ROOT, base_overrides, read_losses, write_dataset
from safetensors.torch import load_file

from trainer.config import load_config
from trainer.loop import train
from trainer.models.qwen_image import QwenImageAdapter
from trainer.quantize import weight_bytes


@pytest.mark.parametrize("mode, layer", [("qfloat8", "QLinear"), ("qint8", "QLinear"), ("nf4", "Linear4bit")])
def test_quantized_training_learns_and_lora_loads_unquantized(mode, layer, tiny_qwen, tmp_path, caplog):
    data = write_dataset(tmp_path / "one", n=1)
    out = tmp_path / "out"
    cfg = load_config(None, base_overrides(tiny_qwen, data, out, max_train_steps=60, learning_rate=3e-3, rank=8, quantize=mode))
    train(cfg, QwenImageAdapter)
    losses = read_losses(out)
    assert statistics.mean(losses[-10:]) < 0.85 * statistics.mean(losses[:10])

    adapter = QwenImageAdapter.from_model(cfg)
    adapter.load()
    assert type(adapter.transformer.transformer_blocks[0].attn.to_q).__name__ == layer
    plain = QwenImagePipeline.from_pretrained(tiny_qwen)
    assert weight_bytes(adapter.transformer.transformer_blocks) < 0.5 * weight_bytes(plain.transformer.transformer_blocks)

    with caplog.at_level(logging.WARNING):
        plain.load_lora_weights(out, adapter_name="lora")
    assert not [r for r in caplog.records if "unexpected keys" in r.getMessage().lower()]
    sd = load_file(out / "pytorch_lora_weights.safetensors")
    assert all(v.dtype == torch.float32 for v in sd.values()) and all(".base_layer" not in k for k in sd)


class Counting(QwenImageAdapter):
    """The real adapter, counting how many samples go through the VAE and the text encoder."""

    calls = {"images": 0, "prompts": 0}

    def encode_images(self, pixels):
        Counting.calls["images"] += pixels.shape[0]
        return super().encode_images(pixels)

    def encode_prompts(self, captions):
        Counting.calls["prompts"] += len(captions)
        return super().encode_prompts(captions)


def _run(tiny_qwen, data, out, **extra):
    Counting.calls = {"images": 0, "prompts": 0}
    cfg = load_config(None, base_overrides(tiny_qwen, data, out, max_train_steps=4, **extra))
    train(cfg, Counting)
    return dict(Counting.calls), read_losses(out)


def test_disk_cache_is_reused_and_invalidated_per_file(tiny_qwen, tmp_path):
    data = write_dataset(tmp_path / "d", n=3)
    cache = {"precompute_text_embeddings": True, "precompute_image_embeddings": True, "save_cache_on_disk": True,
             "cache_dir": str(tmp_path / "cache"), "data_config.caption_dropout_rate": 0.5}
    first, losses1 = _run(tiny_qwen, data, tmp_path / "a", **cache)
    assert first == {"images": 3, "prompts": 4}  # 3 captions + the shared empty caption for dropout

    again, losses2 = _run(tiny_qwen, data, tmp_path / "b", **cache)
    assert again == {"images": 0, "prompts": 0}, "a second run must not call the VAE or the text encoder"
    assert losses1 == losses2

    (data / "img1.txt").write_text("a brand new caption")
    write_dataset(tmp_path / "other", n=1, seed=7)
    (data / "img2.png").write_bytes((tmp_path / "other" / "img0.png").read_bytes())
    changed, _ = _run(tiny_qwen, data, tmp_path / "c", **cache)
    assert changed == {"images": 1, "prompts": 1}


def test_cached_training_matches_uncached(tiny_qwen, tmp_path, caplog):
    data = write_dataset(tmp_path / "d", n=4)
    common = {"data_config.caption_dropout_rate": 0.5}
    plain, losses_plain = _run(tiny_qwen, data, tmp_path / "plain", precompute_text_embeddings=False,
                               precompute_image_embeddings=False, **common)
    assert plain["images"] == 4 and plain["prompts"] == 4  # encoded every step without the cache
    cached, losses_cached = _run(tiny_qwen, data, tmp_path / "cached", **common)  # the default: cached, exactly
    assert cached == {"images": 4, "prompts": 5}  # each image and caption once, plus the empty caption for dropout
    assert (tmp_path / "cached" / "cache" / "latents").is_dir()  # on disk by default
    assert losses_cached == pytest.approx(losses_plain, rel=1e-5, abs=1e-6)
    with caplog.at_level(logging.INFO, logger="trainer"):
        crops, _ = _run(tiny_qwen, data, tmp_path / "crops", **common, **{"data_config.random_ratio": True})
    assert crops == {"images": 4, "prompts": 5}  # random crops: latents every step (4 steps x 1), captions cached
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("conditioning:")]
    assert said == [f"conditioning: prompt embeddings precomputed; images encoded every step (data_config.random_ratio: random crops "
                    f"differ each epoch, so latents cannot be cached exactly) (cache in files in {tmp_path / 'crops' / 'cache'}, read per batch)"]


@pytest.mark.parametrize("optimizer, lr", [("adamw", 1e-3), ("adamw8bit", 1e-3), ("adafactor", 1e-3), ("prodigy", 1.0)])
def test_each_optimizer_trains_and_resumes(optimizer, lr, tiny_qwen, tmp_path):
    data = write_dataset(tmp_path / "d", n=2)
    out = tmp_path / "out"
    ov = dict(optimizer=optimizer, learning_rate=lr, max_train_steps=2, checkpointing_steps=2)
    train(load_config(None, base_overrides(tiny_qwen, data, out, **ov)), QwenImageAdapter)
    sd = load_file(out / "pytorch_lora_weights.safetensors")
    assert any(v.abs().sum() > 0 for k, v in sd.items() if "lora_B" in k), "lora_B starts at zero; a step must move it"
    ov.update(max_train_steps=4, resume_from_checkpoint="latest")
    train(load_config(None, base_overrides(tiny_qwen, data, out, **ov)), QwenImageAdapter)
    assert [s for s in range(1, 5)] == [i + 1 for i, _ in enumerate(read_losses(out))]


def test_train_4090_flymyai_keys_end_to_end(tiny_qwen, tmp_path):
    data = write_dataset(tmp_path / "d", n=2)
    cfg = tmp_path / "4090.yaml"
    cfg.write_text((ROOT / "train_configs" / "train_lora_4090.yaml").read_text())
    out = tmp_path / "out"
    cmd = ACCELERATE + ["train_4090.py", "--config", str(cfg), f"pretrained_model_name_or_path={tiny_qwen}",
                        f"data_config.img_dir={data}", "data_config.img_size=64", "data_config.num_workers=0",
                        f"output_dir={out}", "max_train_steps=3", "report_to=none", "rank=4"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "quantized 2 QwenImageTransformerBlock blocks" in r.stderr and "to qfloat8" in r.stderr
    assert "embedding cache: text 3 encoded" in r.stderr
    assert (out / "pytorch_lora_weights.safetensors").is_file() and any((out / "cache").rglob("*.safetensors"))


def test_memory_planner_counts_the_real_models_without_weights():
    from utils.estimate_memory import plan

    qwen = load_config(ROOT / "train_configs/train_lora_4090.yaml", check_paths=False)
    rows, info = plan(qwen, 1024)
    assert info["transformer_params"] == 20_430_401_088  # Qwen-Image's published 20.43B
    flux = load_config(ROOT / "train_configs/train_flux_config.yaml", check_paths=False)
    _, flux_info = plan(flux, 1024)
    assert flux_info["transformer_params"] == 11_901_408_320  # FLUX.1-dev with its guidance embedder
    _, nf4 = plan(load_config(ROOT / "train_configs/train_lora_4090.yaml", ["quantize=nf4"], check_paths=False), 1024)
    assert nf4["peak"] < 0.75 * info["peak"]
    lora = next(r for r in rows if r.component.startswith("LoRA weights"))
    assert lora.params == info["lora_params"] > 0
    r = subprocess.run([sys.executable, "utils/estimate_memory.py", "--config", "train_configs/train_lora_4090.yaml",
                        "--vram_gb", "24", "quantize=nf4"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and "fits a 24 GB card" in r.stdout and r.stdout.strip().endswith("yes")


def test_memory_planner_counts_swapped_blocks_in_host_ram():
    from utils.estimate_memory import plan

    base_rows, base = plan(load_config(ROOT / "train_configs/train_lora_4090.yaml", check_paths=False), 1024)
    rows, info = plan(load_config(ROOT / "train_configs/train_lora_4090.yaml", ["blocks_to_swap=20"], check_paths=False), 1024)
    assert info["blocks"] == 60
    # Qwen-Image's 60 blocks are identical: 20 swapped, one of them on the GPU at a time
    per_block = (base_rows[0].bytes_ - rows[0].bytes_) / 19
    assert 0.30 * 2**30 < per_block < 0.33 * 2**30  # ~340M weights per block at 1 byte (qfloat8) + bf16 norms / biases
    assert info["peak"] == pytest.approx(base["peak"] - 19 * per_block)
    assert "last 20 of 60 blocks in host RAM" in rows[0].note
    r = subprocess.run([sys.executable, "utils/estimate_memory.py", "--config", "train_configs/train_lora_4090.yaml",
                        "--vram_gb", "16", "quantize_text_encoder=nf4"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and "hint: blocks_to_swap=" in r.stdout
    n = int(r.stdout.split("hint: blocks_to_swap=")[1].split()[0])
    _, q = plan(load_config(ROOT / "train_configs/train_lora_4090.yaml", ["quantize_text_encoder=nf4"], check_paths=False), 1024)
    assert q["peak_by_swap"][n] <= 16 * 2**30 < q["peak_by_swap"][n - 1]
