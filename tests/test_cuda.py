"""CUDA paths (bf16, quantization, 8-bit optimizer, cache). Skipped without a GPU; run on a lent GPU machine."""

import statistics

import pytest
import torch
from helpers import base_overrides, read_losses, write_dataset

from trainer.config import load_config
from trainer.loop import train
from trainer.models.flux import FluxAdapter
from trainer.models.qwen_image import QwenImageAdapter

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("family, adapter, quantize", [
    ("qwen-image", QwenImageAdapter, "nf4"), ("qwen-image", QwenImageAdapter, "qfloat8"), ("flux", FluxAdapter, "nf4"),
    ("qwen-image", QwenImageAdapter, "int8_w8a8"), ("qwen-image", QwenImageAdapter, "fp8_w8a8"), ("flux", FluxAdapter, "int8_w8a8"),
])
def test_bf16_quantized_cached_training_on_gpu(family, adapter, quantize, tiny_models, tmp_path):
    if quantize == "fp8_w8a8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 matmuls need an Ada / Hopper GPU")
    data = write_dataset(tmp_path / "one", n=1)
    out = tmp_path / "out"
    cfg = load_config(None, base_overrides(
        tiny_models(family), data, out, max_train_steps=60, learning_rate=3e-3, rank=8, mixed_precision="bf16",
        quantize=quantize, optimizer="adamw8bit", precompute_text_embeddings=True, precompute_image_embeddings=True,
        gradient_checkpointing=True, t5_max_sequence_length=32))
    torch.cuda.reset_peak_memory_stats()
    train(cfg, adapter)
    losses = read_losses(out)
    assert all(l == l for l in losses), "no NaN losses in bf16"
    assert statistics.mean(losses[-10:]) < 0.9 * statistics.mean(losses[:10])
    assert torch.cuda.max_memory_allocated() > 0


def grads(params) -> torch.Tensor:
    """All LoRA gradients as one vector (the last block's text-stream LoRA gets none: its output is unused)."""
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten().float() for p in params])


@pytest.mark.parametrize("quantize", ["none", "qfloat8", "nf4"])
def test_blocks_to_swap_lowers_peak_memory_and_keeps_gradients(quantize):
    """Width-1024, 6-block Qwen-Image transformer in bf16: swapping 4 blocks must free about 3 blocks of weights from
    the peak (one swapped block is on the GPU at a time) and give the same loss and LoRA gradients."""
    from diffusers import QwenImageTransformer2DModel

    from trainer.config import TrainConfig
    from trainer.methods.lora import LoRAMethod
    from trainer.models import variants
    from trainer.quantize import place_model, weight_bytes

    device = torch.device("cuda")
    results = {}
    for swap in (0, 4):
        torch.manual_seed(0)
        model = QwenImageTransformer2DModel(num_layers=6, attention_head_dim=128, num_attention_heads=8, joint_attention_dim=256,
                                            axes_dims_rope=(16, 56, 56)).to(torch.bfloat16).requires_grad_(False)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        placement = place_model(model, quantize, device, torch.bfloat16, swap)
        block_bytes = weight_bytes(model.transformer_blocks[0]) if not swap else None
        cfg = TrainConfig(rank=8)
        adapter = QwenImageAdapter(cfg, variants()["qwen-image"][1], device, torch.bfloat16)
        torch.manual_seed(1)
        params = LoRAMethod(cfg, adapter).attach(model, placement)
        model.enable_gradient_checkpointing()
        g = torch.Generator(device=device).manual_seed(2)
        x = torch.randn(1, 16, 64, 64, generator=g, device=device)
        cond = {"prompt_embeds": torch.randn(1, 32, 256, generator=g, device=device).to(torch.bfloat16),
                "prompt_embeds_mask": torch.ones(1, 32, dtype=torch.long, device=device)}
        torch.cuda.reset_peak_memory_stats()
        with torch.autocast("cuda", torch.bfloat16):
            loss = adapter.predict(model, x, torch.tensor([0.5], device=device), cond).float().pow(2).mean()
        loss.backward()
        results[swap] = (loss.item(), grads(params), torch.cuda.max_memory_allocated() - base, block_bytes)
        del model, adapter, params, loss
    (l0, g0, peak0, block), (l1, g1, peak1, _) = results[0], results[4]
    assert l0 == pytest.approx(l1, rel=1e-3)
    assert torch.allclose(g0, g1, rtol=2e-2, atol=1e-4)
    assert peak1 < peak0 - 2.5 * block, (peak0, peak1, block)


def test_qwen_image_21_compiled_flex_attention_matches_sdpa(tiny_models):
    """attention_backend auto on CUDA: compiled flex attention, same prediction and input gradients as the SDPA path."""
    from trainer.models.qwen_image21 import QwenImage21Adapter

    model = tiny_models("qwen-image-2.1")
    results = {}
    for backend in ("sdpa", "auto"):
        cfg = load_config(None, [f"pretrained_model_name_or_path={model}", "mixed_precision=no", f"attention_backend={backend}"],
                          check_paths=False)
        adapter = QwenImage21Adapter(cfg, QwenImage21Adapter.variant_of(str(model)), "cuda")
        adapter.load()
        adapter.configure_attention()
        g = torch.Generator().manual_seed(0)
        controls = [torch.rand(1, 4, 256, 256, generator=g) * 2 - 1]
        cond = adapter.encode_text({"captions": ["a red boat"], "controls": controls})
        cond["control_latents"] = [adapter.encode_images(c) for c in controls]
        noisy = torch.randn(1, 16, 4, 6, generator=g).cuda().requires_grad_(True)
        pred = adapter.predict(adapter.transformer, noisy, torch.tensor([0.4], device="cuda"), cond)
        pred.square().mean().backward()
        results[backend] = (pred.detach().cpu(), noisy.grad.cpu())
    (p0, g0), (p1, g1) = results.values()
    assert (p0 - p1).abs().max() < 1e-4 and (g0 - g1).abs().max() < 1e-5


@pytest.mark.parametrize("stage, method", [(2, "lora"), (3, "full")])
def test_deepspeed_trains_checkpoints_and_resumes_exactly(stage, method, tiny_models, tmp_path):
    """DeepSpeed ZeRO-2 (LoRA) / ZeRO-3 (full) on the lent GPU: engine checkpoints, exact resume, the exported file."""
    import os
    import subprocess

    from helpers import ACCELERATE, ROOT

    data = write_dataset(tmp_path / "d", n=4)
    config = ["--config_file", f"accelerate_configs/deepspeed_zero{stage}.yaml", "--num_processes", "1", "--mixed_precision", "bf16"]
    launch = [ACCELERATE[0], "launch", *config, "train.py", "--config", "train_configs/train_lora.yaml"]
    common = dict(training_method=method, checkpointing_steps=2, learning_rate=1e-3, mixed_precision="bf16")
    runs = {}
    for name, steps in (("straight", 4), ("resumed", 2), ("resumed", 4)):
        extra = {"resume_from_checkpoint": "latest"} if name == "resumed" and steps == 4 else {}
        r = subprocess.run(launch + base_overrides(tiny_models("qwen-image"), data, tmp_path / name, max_train_steps=steps, **common, **extra),
                           cwd=ROOT, capture_output=True, text=True, timeout=600, env=os.environ)
        assert r.returncode == 0, r.stderr[-3000:]
        runs[name] = tmp_path / name
    assert (runs["straight"] / "checkpoint-2" / "deepspeed").is_dir()
    if method == "lora":
        from safetensors.torch import load_file

        a, b = (load_file(runs[n] / "pytorch_lora_weights.safetensors") for n in ("straight", "resumed"))
    else:
        from trainer.methods.full import read_folder

        a, b = (read_folder(runs[n] / "transformer") for n in ("straight", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("mode, bound", [("int8_w8a8", 0.015), ("fp8_w8a8", 0.06)])
def test_w8a8_layer_on_gpu_uses_8bit_kernels_within_bounds(mode, bound):
    """A Qwen-Image-sized MLP layer (3072 -> 12288, 4096 tokens) in bf16: 8-bit forward and activation gradient on the
    GPU's kernels (no dequantized fallback), error against the bf16 layer within the CPU-tested bounds; prints times."""
    import time

    from trainer.w8a8 import W8A8Linear, quantize_linears

    if mode == "fp8_w8a8" and torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("row-wise scaled fp8 matmuls need a Hopper GPU")
    torch.manual_seed(0)
    ref = torch.nn.Sequential(torch.nn.Linear(3072, 12288)).cuda().bfloat16().requires_grad_(False)
    q = torch.nn.Sequential(torch.nn.Linear(3072, 12288)).cuda().bfloat16().requires_grad_(False)
    q.load_state_dict(ref.state_dict())
    quantize_linears(q, mode)
    x = torch.randn(4096, 3072, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(4096, 12288, device="cuda", dtype=torch.bfloat16)
    before = W8A8Linear.fallbacks
    times = {}
    for name, layer in (("bf16", ref), (mode, q)):
        for i in range(6):
            if i == 1:
                torch.cuda.synchronize()
                t = time.perf_counter()
            y = layer(x)
            (gx,) = torch.autograd.grad(y, x, g)
        torch.cuda.synchronize()
        times[name] = (time.perf_counter() - t) / 5
        if name == "bf16":
            y_ref, gx_ref = y.float(), gx.float()
    assert W8A8Linear.fallbacks == before
    assert ((y.float() - y_ref).norm() / y_ref.norm()).item() < bound
    assert ((gx.float() - gx_ref).norm() / gx_ref.norm()).item() < bound
    print(f"{mode}: forward + activation gradient {times[mode] * 1e3:.2f} ms vs bf16 {times['bf16'] * 1e3:.2f} ms")
