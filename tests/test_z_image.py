"""Z-Image: LoRA loading in its pipeline, inference, quantized and block-swapped training, the planner, and the
assistant LoRA used to train on Z-Image-Turbo."""

import logging
import subprocess

import numpy as np
import pytest
import torch
from diffusers import ZImagePipeline
from helpers import PY, ROOT, base_overrides, read_losses, write_dataset
from PIL import Image
from safetensors.torch import load_file

from trainer.config import load_config
from trainer.loop import train
from trainer.methods.lora import LoRAMethod
from trainer.models.z_image import ZImageAdapter


@pytest.fixture(scope="module")
def zimage(tiny_models):
    return tiny_models("z-image")


@pytest.fixture(scope="module")
def trained(zimage, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("zi")
    data = write_dataset(tmp / "d", n=2)
    out = tmp / "out"
    train(load_config(None, base_overrides(zimage, data, out, max_train_steps=4, learning_rate=2e-2, lora_format="comfyui",
                                           validation_prompts="[a red cat]", validation_num_inference_steps=2,
                                           validation_guidance_scale=0.0, **{"data_config.img_size": 32})), ZImageAdapter)
    return out


def render(pipe, **kw):
    return pipe("a photo", height=32, width=32, num_inference_steps=2, guidance_scale=0.0, output_type="np",
                generator=torch.Generator().manual_seed(0), **kw).images[0]


def test_lora_loads_in_the_pipeline_changes_it_and_scale_zero_is_the_base(trained, zimage, caplog):
    pipe = ZImagePipeline.from_pretrained(zimage)
    base = render(pipe)
    with caplog.at_level(logging.WARNING):
        pipe.load_lora_weights(trained, adapter_name="lora")
    assert not [r for r in caplog.records if "unexpected" in r.getMessage().lower() or "missing" in r.getMessage().lower()]
    assert np.abs(render(pipe) - base).max() > 1e-4
    pipe.set_adapters(["lora"], adapter_weights=[0.0])
    assert np.allclose(render(pipe), base, atol=1e-6)
    assert (trained / "samples" / "step-4.png").is_file()


def test_inference_script_renders_with_the_lora(trained, zimage, tmp_path):
    out = tmp_path / "z.png"
    r = subprocess.run([PY, "inference.py", "--model_name", str(zimage), "--lora_weights", str(trained), "--prompt", "a cat",
                        "--width", "48", "--height", "32", "--num_inference_steps", "2", "--true_cfg_scale", "0",
                        "--output_image", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert Image.open(out).size == (48, 32)


@pytest.mark.parametrize("mode", ["qfloat8", "nf4"])
def test_quantized_and_block_swapped_training_match(mode, zimage, tmp_path):
    data = write_dataset(tmp_path / "d", n=2)
    runs = {}
    for swap in (0, 2):
        out = tmp_path / f"{mode}-{swap}"
        train(load_config(None, base_overrides(zimage, data, out, quantize=mode, blocks_to_swap=swap, max_train_steps=3,
                                               gradient_checkpointing=True)), ZImageAdapter)
        runs[swap] = read_losses(out)
    assert runs[0] == pytest.approx(runs[2], abs=1e-6) and all(np.isfinite(runs[0]))


def test_planner_counts_the_released_transformer():
    from utils.estimate_memory import plan

    cfg = load_config(ROOT / "train_configs/train_z_image_lora.yaml", check_paths=False)
    rows, info = plan(cfg, 1024)
    assert info["transformer_params"] == 6_154_908_736 and info["blocks"] == 34  # 30 layers + 2 + 2 refiners
    for card in (24, 16, 12):
        r = subprocess.run([PY, "utils/estimate_memory.py", "--config", "train_configs/train_z_image_lora.yaml", "--vram_gb", str(card),
                            "quantize=nf4"], cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 0 and f"fits a {card} GB card" in r.stdout, r.stdout + r.stderr


def test_assistant_lora_trains_with_it_previews_and_saves_without_it(zimage, tmp_path):
    """Turbo training: a frozen assistant LoRA is active in the training forward, off in sampling, not saved."""
    assistant = tmp_path / "assistant"
    pipe = ZImagePipeline.from_pretrained(zimage)
    torch.manual_seed(3)
    layers = {}
    for name, m in pipe.transformer.named_modules():
        if name.endswith(("attention.to_q", "attention.to_v")):
            layers[f"{name}.lora_A.weight"] = torch.randn(4, m.in_features) * 0.3
            layers[f"{name}.lora_B.weight"] = torch.randn(m.out_features, 4) * 0.3
    ZImagePipeline.save_lora_weights(assistant, transformer_lora_layers=layers)
    data = write_dataset(tmp_path / "d", n=2)
    plain, helped = tmp_path / "plain", tmp_path / "helped"
    train(load_config(None, base_overrides(zimage, data, plain, max_train_steps=3)), ZImageAdapter)
    train(load_config(None, base_overrides(zimage, data, helped, max_train_steps=3, assistant_lora=str(assistant))), ZImageAdapter)
    assert read_losses(plain)[0] != pytest.approx(read_losses(helped)[0], abs=1e-6), "the assistant takes part in training"
    saved = load_file(helped / "pytorch_lora_weights.safetensors")
    assert saved.keys() == load_file(plain / "pytorch_lora_weights.safetensors").keys(), "only the trained LoRA is saved"

    cfg = load_config(None, base_overrides(zimage, data, helped, assistant_lora=str(assistant)))
    adapter = ZImageAdapter.from_model(cfg)
    adapter.load()
    method = LoRAMethod(cfg, adapter)
    params = method.attach(adapter.transformer)
    method.load(adapter.transformer, helped)
    assert all(".default." in n for n, p in adapter.transformer.named_parameters() if p.requires_grad) and params
    g = torch.Generator().manual_seed(0)
    noisy = torch.randn(1, 16, 4, 4, generator=g)
    cond = adapter.encode_prompts(["a cat"])
    with torch.no_grad():
        with method.sampling(adapter.transformer):
            previewed = adapter.predict(adapter.transformer, noisy, torch.tensor([0.5]), cond)
        trained_with = adapter.predict(adapter.transformer, noisy, torch.tensor([0.5]), cond)
        ref = ZImagePipeline.from_pretrained(zimage)
        ref.load_lora_weights(helped)
        as_used = adapter.predict(ref.transformer, noisy, torch.tensor([0.5]), cond)
    assert (previewed - as_used).abs().max() < 1e-5, "previews show the LoRA without the assistant"
    assert (trained_with - as_used).abs().max() > 1e-4
