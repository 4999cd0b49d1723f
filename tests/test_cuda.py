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
])
def test_bf16_quantized_cached_training_on_gpu(family, adapter, quantize, tiny_models, tmp_path):
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
