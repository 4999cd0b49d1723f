"""quantize: int8_w8a8 / fp8_w8a8 — frozen Linear layers whose matmuls run in 8 bits (trainer/w8a8.py).

Bounds (relative Frobenius error against the fp32 layer, forward output and activation gradient): int8 < 1.5%,
fp8 e4m3 < 6% (3 mantissa bits: ~3.5% measured). End to end on the tiny Qwen-Image model, the per-step training
loss stays within 0.01 (int8) / 0.03 (fp8) of the unquantized run over 30 steps.
"""

import logging

import pytest
import torch
from diffusers import QwenImagePipeline
from helpers import base_overrides, read_losses, write_dataset
from peft import LoraConfig, inject_adapter_in_model
from safetensors.torch import load_file
from torch import nn

from trainer.config import load_config
from trainer.loop import train
from trainer.models.qwen_image import QwenImageAdapter
from trainer.quantize import weight_bytes
from trainer.w8a8 import W8A8Linear, quantize_linears

BOUNDS = {"int8_w8a8": 0.015, "fp8_w8a8": 0.06}
LOSS_TOL = {"int8_w8a8": 0.01, "fp8_w8a8": 0.03}


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("mode", list(BOUNDS))
def test_layer_forward_and_activation_gradient_in_8_bits(mode, monkeypatch):
    torch.manual_seed(0)
    ref = nn.Linear(384, 256)
    x = torch.randn(2, 77, 384) * torch.linspace(0.2, 3.0, 384)  # channels of different magnitude, as in real models
    x.requires_grad_(True)
    y_ref = ref(x)
    grad = torch.randn_like(y_ref)
    (gx_ref,) = torch.autograd.grad(y_ref, x, grad)

    calls = []
    kernel = "_int_mm" if mode == "int8_w8a8" else "_scaled_mm"
    real = getattr(torch, kernel)
    monkeypatch.setattr(torch, kernel, lambda *a, **k: calls.append(a[0].dtype) or real(*a, **k))
    layer = nn.Sequential(ref)
    assert quantize_linears(layer, mode) == 1
    q = layer[0]
    assert isinstance(q, W8A8Linear) and q.weight_8bit.dtype in (torch.int8, torch.float8_e4m3fn) and q.weight.element_size() == 1
    y = layer(x)
    (gx,) = torch.autograd.grad(y, x, grad)
    assert len(calls) == 2 and all(d == q.weight_8bit.dtype for d in calls), "forward and backward must both run the 8-bit matmul"
    assert 0 < _rel(y, y_ref) < BOUNDS[mode] and 0 < _rel(gx, gx_ref) < BOUNDS[mode]
    assert y.shape == y_ref.shape and q.weight.grad is None

    # bf16 activations in, bf16 out (the trainer's mixed precision), same bound
    yb = q(x.detach().bfloat16())
    assert yb.dtype == torch.bfloat16 and _rel(yb.float(), y_ref.detach()) < BOUNDS[mode] + 0.01


@pytest.mark.parametrize("mode", list(BOUNDS))
def test_peft_lora_on_a_w8a8_layer_trains_in_fp32(mode):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64))
    ref = nn.Sequential(nn.Linear(64, 64))
    ref.load_state_dict(model.state_dict())
    quantize_linears(model, mode)
    cfg = LoraConfig(r=4, target_modules=["0"], init_lora_weights="gaussian")
    for m in (model, ref):
        torch.manual_seed(1)
        inject_adapter_in_model(cfg, m)
        for n, p in m.named_parameters():
            p.requires_grad_("lora_" in n)
            if "lora_B" in n:
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)))  # B starts at 0: no A gradient
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    assert len(lora) == 2 and all(p.dtype == torch.float32 for p in lora)
    x = torch.randn(16, 64)
    model(x).square().mean().backward()
    ref(x).square().mean().backward()
    for (n, p), (_, r) in zip([(n, p) for n, p in model.named_parameters() if "lora_" in n],
                              [(n, p) for n, p in ref.named_parameters() if "lora_" in n]):
        assert p.grad is not None and _rel(p.grad, r.grad) < BOUNDS[mode], n


@pytest.fixture(scope="module")
def one_image(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("w8a8") / "one", n=1)


@pytest.fixture(scope="module")
def unquantized_losses(tiny_models, one_image, tmp_path_factory):
    out = tmp_path_factory.mktemp("w8a8-none") / "out"
    train(load_config(None, base_overrides(tiny_models("qwen-image"), one_image, out, max_train_steps=30, learning_rate=3e-3,
                                           rank=8, seed=1)), QwenImageAdapter)
    return read_losses(out)


@pytest.mark.parametrize("mode", list(BOUNDS))
def test_training_follows_the_unquantized_run_and_saves_a_normal_lora(mode, tiny_models, one_image, unquantized_losses, tmp_path, caplog):
    tiny = tiny_models("qwen-image")
    out = tmp_path / "out"
    cfg = load_config(None, base_overrides(tiny, one_image, out, max_train_steps=30, learning_rate=3e-3, rank=8, seed=1, quantize=mode))
    train(cfg, QwenImageAdapter)
    losses = read_losses(out)
    assert len(losses) == len(unquantized_losses) == 30
    assert max(abs(a - b) for a, b in zip(losses, unquantized_losses)) < LOSS_TOL[mode]
    assert losses != unquantized_losses, "the quantized run must not silently be the unquantized one"

    adapter = QwenImageAdapter.from_model(cfg)
    adapter.load()
    assert type(adapter.transformer.transformer_blocks[0].attn.to_q) is W8A8Linear
    plain = QwenImagePipeline.from_pretrained(tiny)
    assert weight_bytes(adapter.transformer.transformer_blocks) < 0.55 * weight_bytes(plain.transformer.transformer_blocks)

    sd = load_file(out / "pytorch_lora_weights.safetensors")
    assert all(v.dtype == torch.float32 for v in sd.values()) and all(".base_layer" not in k and "weight_scale" not in k for k in sd)
    with caplog.at_level(logging.WARNING):
        plain.load_lora_weights(out, adapter_name="lora")
    assert not [r for r in caplog.records if "unexpected keys" in r.getMessage().lower()]


def test_w8a8_with_block_swap_and_the_caches(tiny_models, tmp_path, caplog):
    """Swapped blocks move their 8-bit weights and scales like any frozen weight; cached embeddings feed them alike."""
    data = write_dataset(tmp_path / "d", n=2)
    runs = {}
    for swap in (0, 1):
        out = tmp_path / f"s{swap}"
        caplog.clear()
        with caplog.at_level(logging.INFO):
            train(load_config(None, base_overrides(tiny_models("qwen-image"), data, out, quantize="int8_w8a8", blocks_to_swap=swap,
                                                   max_train_steps=3, gradient_checkpointing=True, precompute_text_embeddings=True,
                                                   precompute_image_embeddings=True)), QwenImageAdapter)
        assert "to int8_w8a8" in caplog.text and ("blocks_to_swap: 1 of 2 blocks" in caplog.text) == bool(swap)
        runs[swap] = read_losses(out)
    assert runs[0] == pytest.approx(runs[1], abs=1e-6) and len(runs[0]) == 3
