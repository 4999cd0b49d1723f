"""Z-Image-Omni: references through the cache, the batch and the previews; its pipeline's VAE cast; ComfyUI keys.
(Equivalence: tests/test_equivalence.py; LoRA loading, inference, quantized training, planner: test_more_families.py.)"""

from types import SimpleNamespace

import pytest
import torch
from diffusers import AutoencoderKL, ZImageOmniPipeline
from helpers import base_overrides, read_losses, write_dataset
from safetensors.torch import load_file

from comfyui_rules import not_loaded
from trainer.config import load_config
from trainer.loop import train
from trainer.methods.lora import targets
from trainer.models.z_image_omni import OmniPipeline, ZImageOmniAdapter


def test_its_pipeline_encodes_references_as_the_released_one_does_in_bfloat16(tiny_models):
    """OmniPipeline changes one thing: references reach the VAE in the VAE's dtype. With the released bf16 VAE the
    latents are the released pipeline's to the bit; with a float32 VAE the released pipeline cannot encode them."""
    model = tiny_models("z-image-omni")
    image = (torch.rand(1, 64, 96, 3) * 2 - 1).permute(0, 3, 1, 2)  # channels-last, as its image processor hands it over
    bf16 = SimpleNamespace(vae=AutoencoderKL.from_pretrained(model, subfolder="vae", torch_dtype=torch.bfloat16))
    ours = OmniPipeline.prepare_image_latents(bf16, [image], 2, "cpu", torch.float32)
    theirs = ZImageOmniPipeline.prepare_image_latents(bf16, [image], 2, "cpu", torch.float32)
    assert len(ours) == len(theirs) == 2 and ours[0][0].shape == (16, 1, 8, 12)
    assert torch.equal(ours[0][0], theirs[0][0]) and torch.equal(ours[1][0], theirs[1][0])
    fp32 = SimpleNamespace(vae=AutoencoderKL.from_pretrained(model, subfolder="vae"))
    with pytest.raises(RuntimeError):
        ZImageOmniPipeline.prepare_image_latents(fp32, [image], 1, "cpu", torch.float32)
    assert OmniPipeline.prepare_image_latents(fp32, [image], 1, "cpu", torch.float32)[0][0].dtype == torch.float32


def test_references_train_the_same_cached_and_uncached_in_batches(tiny_models, tmp_path):
    """Batches of 2 edit samples (prompt segments, SigLIP2 grids, reference latents): the embedding cache gives the losses
    of encoding every step; previews with the references render; the LoRA leaves the SigLIP refiner alone by default and
    its ComfyUI file maps under ComfyUI's Z-Image key rules."""
    model = tiny_models("z-image-omni")
    data, refs = write_dataset(tmp_path / "d", n=4), write_dataset(tmp_path / "c", n=4, seed=2, size=(96, 64))
    losses = {}
    for cached in (True, False):
        out = tmp_path / f"out-{cached}"
        extra = {"data_config.control_dir": str(refs), "data_config.train_batch_size": 2, "data_config.control_size": "null"}  # the pipeline's sizing
        if cached:
            extra.update(validation_samples=1, validation_steps=3, validation_num_inference_steps=2, lora_format="comfyui")
        train(load_config(None, base_overrides(model, data, out, max_train_steps=3, precompute_text_embeddings=cached,
                                               precompute_image_embeddings=cached, **extra)), ZImageOmniAdapter)
        losses[cached] = read_losses(out)
    assert losses[True] == pytest.approx(losses[False], abs=1e-6) and len(losses[True]) == 3
    out = tmp_path / "out-True"
    assert (out / "samples" / "step-3.png").is_file()
    modules = {k.removeprefix("transformer.").rsplit(".", 2)[0] for k in load_file(out / "pytorch_lora_weights.safetensors")}
    assert modules and not [m for m in modules if m.startswith("siglip")]
    assert any(m.startswith("noise_refiner") for m in modules) and any(m.startswith("layers") for m in modules)
    assert targets(["siglip_refiner.*.attention.to_q"], "siglip_refiner.0.attention.to_q")  # the opt-in name the docstring gives
    pipe = ZImageOmniPipeline.from_pretrained(model)
    assert not_loaded(load_file(out / "pytorch_lora_weights_comfyui.safetensors"), "z-image-omni", pipe.transformer) == []
