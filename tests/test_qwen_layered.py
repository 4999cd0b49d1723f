"""Qwen-Image-Layered: a layered dataset (composites + their layers, alpha kept, cached or not), the LoRA in
QwenImageLayeredPipeline, inference.py writing the layers, quantized and block-swapped training, the planner.
(Equivalence: tests/test_equivalence.py; learning through the pipeline: tests/test_learning.py.)"""

import logging

import numpy as np
import pytest
import torch
from diffusers import QwenImageLayeredPipeline
from helpers import PY, ROOT, base_overrides, read_losses, run_each
from PIL import Image

from trainer.config import load_config
from trainer.loop import train
from trainer.models.qwen_image_layered import QwenImageLayeredAdapter

SIZES = [(64, 64), (64, 64), (96, 64)]  # two shapes: batches hold one size (and one layer count)


@pytest.fixture(scope="module")
def layered(tmp_path_factory):
    """Composites with transparent corners + .txt captions, and two layer folders with the same file names."""
    root = tmp_path_factory.mktemp("layered")
    rng = np.random.default_rng(0)
    for d in ("composite", "layer1", "layer2"):
        (root / d).mkdir()
    for i, (w, h) in enumerate(SIZES):
        for d in ("composite", "layer1", "layer2"):
            arr = (rng.random((h, w, 4)) * 255).astype("uint8")
            arr[: h // 2, : w // 2, 3] = 0  # a transparent quarter: the alpha must reach the VAE
            Image.fromarray(arr, "RGBA").save(root / d / f"s{i}.png")
        (root / "composite" / f"s{i}.txt").write_text(f"a layered picture number {i}")
    return root


def overrides(model, data, out, **extra):
    return base_overrides(model, data / "composite", out, **{"data_config.control_dir": f"[{data / 'layer1'},{data / 'layer2'}]", **extra})


@pytest.fixture(scope="module")
def trained(tiny_models, layered, tmp_path_factory):
    out = tmp_path_factory.mktemp("layered-run") / "out"
    train(load_config(None, overrides(tiny_models("qwen-image-layered"), layered, out, max_train_steps=4, learning_rate=2e-2,
                                      validation_samples=1, validation_num_inference_steps=2, **{"data_config.train_batch_size": 2})),
          QwenImageLayeredAdapter)
    return out


def test_targets_are_the_composite_then_its_layers_and_the_cache_keeps_alpha(tiny_models, layered, tmp_path):
    """Target = (N + 1) frames, the composite first; the condition = the composite's latents; cached latents equal the
    latents of the RGBA pixels (the cache once composited the alpha away, for Qwen-Image 2.1 too)."""
    from trainer.cache import EmbeddingCache
    from trainer.loop import build_dataset
    from image_datasets import CaptionDataset, collate

    cfg = load_config(None, overrides(tiny_models("qwen-image-layered"), layered, tmp_path / "out"))
    adapter = QwenImageLayeredAdapter.from_model(cfg)
    samples = build_dataset(cfg, adapter)
    adapter.load_encoders()
    cache = EmbeddingCache(adapter, samples, cfg, None)
    cache.build(False, True, False)
    ds = CaptionDataset(samples, keep_alpha=True, aligned_controls=True)
    for i in range(len(samples)):
        batch = collate([ds[(i, 0)]])
        assert batch["pixel_values"].shape[1] == 4 and float(batch["pixel_values"][0, 3].min()) == -1.0  # transparent pixels
        latents, extra = adapter.encode_latents(batch)
        assert latents.shape[2] == 3  # the composite, 2 layers
        torch.testing.assert_close(extra["control_latents"][0], latents[:, :, 0])
        torch.testing.assert_close(latents[:, :, 0], adapter.encode_images(batch["pixel_values"]))
        entry = cache._lookup("latents", cache.latent_keys[i])
        torch.testing.assert_close(entry["latents"], latents, rtol=1e-4, atol=1e-5)


def render(pipe, adapter, size=(64, 64), layers=2):
    from trainer.models.base import InferenceRequest

    arr = (np.random.default_rng(3).random((size[1], size[0], 4)) * 255).astype("uint8")
    image = Image.fromarray(arr, "RGBA")
    kwargs = adapter.inference_kwargs(InferenceRequest(prompt="a photo", images=[image], width=size[0], height=size[1], layers=layers,
                                                       true_cfg_scale=1.0))
    with adapter.render_size(pipe, *size):
        out = pipe(prompt="a photo", num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0), **kwargs)
    return np.stack(out.images[0])


def test_lora_loads_in_the_pipeline_changes_it_and_scale_zero_is_the_base(trained, tiny_models, caplog):
    model = tiny_models("qwen-image-layered")
    adapter = QwenImageLayeredAdapter.from_model(load_config(None, [f"pretrained_model_name_or_path={model}"], check_paths=False))
    pipe = QwenImageLayeredPipeline.from_pretrained(model, **adapter.pipeline_components(str(model)))
    base = render(pipe, adapter)
    assert base.shape == (2, 64, 64, 4)  # 2 RGBA layers at the asked size
    with caplog.at_level(logging.WARNING):
        pipe.load_lora_weights(trained, adapter_name="lora")
    assert not [r for r in caplog.records if "unexpected keys" in r.getMessage().lower() or "missing keys" in r.getMessage().lower()]
    assert np.abs(render(pipe, adapter) - base).max() > 1e-4
    pipe.set_adapters(["lora"], adapter_weights=[0.0])
    assert np.allclose(render(pipe, adapter), base, atol=1e-6)
    assert Image.open(trained / "samples" / "step-4.png").width >= 2 * 64  # the preview: its layers side by side


def test_inference_writes_every_layer_and_the_strip(trained, tiny_models, layered, tmp_path):
    out = tmp_path / "o.png"
    r, = run_each([[PY, "inference.py", "--model_name", str(tiny_models("qwen-image-layered")), "--lora_weights", str(trained),
                    "--prompt", "a cat", "--image", str(layered / "composite" / "s2.png"), "--layers", "3", "--width", "96",
                    "--height", "64", "--num_inference_steps", "2", "--true_cfg_scale", "1", "--output_image", str(out)]])
    assert r.returncode == 0, r.stderr[-2000:]
    layers = [Image.open(tmp_path / f"o-layer{k}.png") for k in (1, 2, 3)]
    assert all(im.size == (96, 64) and im.mode == "RGBA" for im in layers)
    assert Image.open(out).size == (3 * 96, 64)


@pytest.mark.parametrize("mode", ["qfloat8", "nf4"])
def test_quantized_and_block_swapped_training_match(mode, tiny_models, layered, tmp_path):
    runs = {}
    for swap in (0, 1):
        out = tmp_path / f"{mode}-{swap}"
        train(load_config(None, overrides(tiny_models("qwen-image-layered"), layered, out, quantize=mode, blocks_to_swap=swap,
                                          max_train_steps=3, gradient_checkpointing=True)), QwenImageLayeredAdapter)
        runs[swap] = read_losses(out)
    assert runs[0] == pytest.approx(runs[1], abs=1e-6) and all(np.isfinite(runs[0]))


def test_planner_counts_the_released_transformer_and_its_frames():
    from utils.estimate_memory import plan

    cfg = load_config(ROOT / "train_configs" / "train_qwen_layered_lora.yaml", check_paths=False)
    rows, info = plan(cfg, 640)
    assert info["transformer_params"] == 20_430_407_232 and info["blocks"] == 60  # Qwen-Image's + the layer-count embedding
    plain = load_config(ROOT / "train_configs" / "train_lora.yaml", ["quantize=qfloat8"], check_paths=False)
    activations = {r.component.split(" (")[0]: r.bytes_ for r in rows}
    single = {r.component.split(" (")[0]: r.bytes_ for r in plan(plain, 640)[0]}
    assert activations["activations"] > 4 * single["activations"]  # 6 frames of tokens per sample (4 layers by default)
