"""Qwen-Image 2.1: block-causal attention as the pipeline runs it, both attention processors, the sampling schedule
training draws its sigmas from, RGBA pixels, and image-conditioned training under accelerate launch."""

import json
import shutil
import subprocess

import numpy as np
import pytest
import torch
from helpers import ACCELERATE, PY, ROOT, base_overrides, read_losses, write_dataset
from PIL import Image

from image_datasets import load_image
from trainer import flow_matching as fm
from trainer.config import load_config
from trainer.models.qwen_image21 import QwenImage21Adapter

REF = 256  # the smallest reference side Qwen3-VL's processor keeps as it is


@pytest.fixture(scope="module")
def model(tiny_models):
    return tiny_models("qwen-image-2.1")


def adapter_for(model, **overrides):
    cfg = load_config(None, [f"pretrained_model_name_or_path={model}", "mixed_precision=no",
                             *(f"{k}={v}" for k, v in overrides.items())], check_paths=False)
    adapter = QwenImage21Adapter.from_model(cfg)
    adapter.load()
    return adapter


def conditioned(adapter, caption: str, refs: int = 1):
    g = torch.Generator().manual_seed(0)
    controls = [torch.rand(1, 4, REF, REF, generator=g) * 2 - 1 for _ in range(refs)]
    for c in controls:
        c[:, 3] = 1.0  # opaque
    cond = adapter.encode_text({"captions": [caption], "controls": controls})
    cond["control_latents"] = [adapter.encode_images(c) for c in controls]
    return cond


def joint_layout(cond, h: int, w: int) -> torch.Tensor:
    """Per joint-sequence position: -1 text, k >= 0 the k-th image block (conditions, then the target), as the
    transformer expands each vision slot into 2x2 = 4 latent tokens."""
    pads = cond["image_pad_mask"][0].bool()
    slots = torch.cat([pads, torch.ones(h * w // 4, dtype=torch.bool)])
    expanded = torch.repeat_interleave(slots, torch.where(slots, 4, 1))
    sizes = [c.shape[-2] * c.shape[-1] for c in cond.get("control_latents", [])] + [h * w]
    labels = torch.full(expanded.shape, -1)
    labels[expanded] = torch.tensor([k for k, n in enumerate(sizes) for _ in range(n)])
    return labels


def test_condition_tokens_do_not_see_the_text_after_them(model):
    """Block-causal: a condition image's tokens (and the text before them) do not depend on the caption that follows
    them; the target does; an image block attends within itself both ways."""
    adapter = adapter_for(model)
    cond = conditioned(adapter, "make the sky purple and add a small red boat")
    noisy = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.6])
    layout = joint_layout(cond, 4, 4)
    text = (layout == -1).nonzero().flatten()
    first_cond = int((layout == 0).nonzero()[0])
    caption = text[text > first_cond]  # the prompt's tokens after the condition image (caption and template end)
    caption_in_prompt = int((~cond["image_pad_mask"][0]).nonzero().flatten()[-len(caption)])  # same tokens, prompt indexing
    with torch.no_grad():
        base = adapter.forward(adapter.transformer, noisy, sigma, cond)
        later = {**cond, "prompt_embeds": cond["prompt_embeds"].clone()}
        later["prompt_embeds"][:, caption_in_prompt:] += torch.randn(later["prompt_embeds"][:, caption_in_prompt:].shape)
        changed = adapter.forward(adapter.transformer, noisy, sigma, later)
        inside = {**cond, "control_latents": [cond["control_latents"][0].clone()]}
        inside["control_latents"][0][..., -1, -1] += 3.0  # the condition image's last token
        moved = adapter.forward(adapter.transformer, noisy, sigma, inside)
    diff = (changed - base).abs().amax(-1)[0]
    before_caption = torch.arange(len(layout)) < int(caption[0])
    assert diff[before_caption].max() == 0, "nothing before the caption may see it"
    assert diff[layout == 1].min() > 1e-4, "every target token sees the caption"
    block = (moved - base).abs().amax(-1)[0]
    assert block[layout == 0][:8].min() > 0, "the condition block's first tokens see its last one (bidirectional)"
    assert block[: first_cond].max() == 0, "the text before the image does not"


def test_flex_and_sdpa_processors_give_the_same_prediction(model):
    """The flex-attention processor (one masked call; what attention_backend auto / flex trains with on CUDA) and
    diffusers' exact multi-pass SDPA fallback (auto on CPU) predict the same. Flex has no CPU backward: the gradients
    are compared in tests/test_cuda.py, and attention_backend=flex on a CPU is refused before training."""
    from diffusers.models.transformers.transformer_qwenimage21 import QwenImage21AttnProcessor, QwenImage21FlexAttnProcessor

    from trainer.config import ConfigError

    adapter = adapter_for(model)
    adapter.configure_attention()
    assert isinstance(adapter.transformer.transformer_blocks[0].attn.processor, QwenImage21AttnProcessor)
    cond = conditioned(adapter, "a red boat", refs=2)
    noisy = torch.randn(1, 16, 4, 6, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        sdpa = adapter.predict(adapter.transformer, noisy, torch.tensor([0.4]), cond)
        adapter.transformer.set_attn_processor(QwenImage21FlexAttnProcessor())
        flex = adapter.predict(adapter.transformer, noisy, torch.tensor([0.4]), cond)
    assert (sdpa - flex).abs().max() < 1e-5
    forced = adapter_for(model, attention_backend="flex")
    with pytest.raises(ConfigError, match="attention_backend"):
        forced.configure_attention()


def test_schedule_sigmas_are_the_pipelines_own(model, tmp_path):
    """timestep_sampling=schedule draws along the sigmas QwenImage21Pipeline steps through: linspace(1, 1/40, 40)
    through the scheduler's resolution shift and terminal stretch, or the model's shipped sample_sigmas."""
    from diffusers import QwenImage21Pipeline

    shipped = tmp_path / "shipped"
    shutil.copytree(model, shipped)
    index = json.loads((shipped / "model_index.json").read_text())
    (shipped / "model_index.json").write_text(json.dumps({**index, "sample_sigmas": [1.0, 0.9, 0.7, 0.4, 0.2]}))
    for folder, steps in ((model, 40), (shipped, 5)):
        adapter = adapter_for(folder)
        pipe = QwenImage21Pipeline.from_pretrained(folder, **adapter.pipeline_components(str(folder)))
        seen = []
        pipe.transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(float(kw["timestep"][0])), with_kwargs=True)
        pipe("a cat", width=96, height=64, output_type="latent", generator=torch.Generator().manual_seed(0))
        path = adapter.sigma_path(6 * 4)
        assert len(seen) == steps and path[-1] == 0
        assert np.allclose(seen, path[:-1].numpy(), atol=1e-6)
    g = torch.Generator().manual_seed(0)
    draws = torch.cat([fm.sample_sigmas(1, "schedule", adapter.scheduler_config, 24, g, path=path) for _ in range(4000)])
    assert draws.min() >= 0 and draws.max() <= 1
    per_step = torch.histc(torch.bucketize(draws, path.flip(0)).float(), bins=len(path) - 1, min=1, max=len(path) - 1)
    assert (per_step / len(draws) - 1 / (len(path) - 1)).abs().max() < 0.03, "uniform over the pipeline's steps"


def test_rgba_pixels_keep_their_alpha(model, tmp_path):
    """Transparent PNGs train their alpha (2.1's VAE reads RGBA); opaque images get alpha 1."""
    arr = np.zeros((64, 64, 4), dtype=np.uint8)
    arr[16:48, 16:48] = (200, 30, 30, 255)  # an opaque red square on a transparent background
    Image.fromarray(arr, "RGBA").save(tmp_path / "sticker.png")
    Image.fromarray(arr[..., :3]).save(tmp_path / "opaque.png")
    sticker = load_image(tmp_path / "sticker.png", keep_alpha=True)
    assert sticker.mode == "RGBA" and load_image(tmp_path / "opaque.png", keep_alpha=True).getchannel("A").getextrema() == (255, 255)
    assert load_image(tmp_path / "sticker.png").mode == "RGB", "other families still get it over white"
    adapter = adapter_for(model)
    from image_datasets import to_tensor

    rgba = to_tensor(sticker).unsqueeze(0)
    white = to_tensor(load_image(tmp_path / "sticker.png").convert("RGBA")).unsqueeze(0)
    assert rgba.shape[1] == 4 and rgba[0, 3, 0, 0] == -1 and rgba[0, 3, 32, 32] == 1
    assert (adapter.encode_images(rgba) - adapter.encode_images(white)).abs().max() > 1e-4, "the VAE sees the alpha"


def test_image_conditioned_training_under_accelerate(model, tmp_path):
    """Two references per sample (other sizes than the target), transparent targets, batch 2 with captions of
    different lengths, a validation preview with its references: the run trains and its LoRA moves."""
    data = write_dataset(tmp_path / "d", n=4, size=(96, 64), captions=["a boat", "a red boat on a lake at dusk, oil painting",
                                                                          "two boats", "a small boat near the shore"])
    for p in data.glob("*.png"):
        img = Image.open(p).convert("RGBA")
        img.putalpha(Image.fromarray(np.tile(np.linspace(0, 255, 96, dtype=np.uint8), (64, 1))))
        img.save(p)
    refs = [write_dataset(tmp_path / f"r{k}", n=4, size=size, seed=k + 3) for k, size in enumerate([(80, 112), (128, 96)])]
    out = tmp_path / "out"
    cmd = ACCELERATE + ["train_qwen_image_21_lora.py", "--config", "train_configs/train_qwen_image_21_lora.yaml"] + base_overrides(
        model, data, out, max_train_steps=4, learning_rate=1e-2, **{
            "data_config.control_dir": f"[{refs[0]},{refs[1]}]", "data_config.control_size": 288, "data_config.train_batch_size": 2,
            "data_config.num_workers": 0, "data_config.bucketing": "false", "precompute_text_embeddings": "false",
            "precompute_image_embeddings": "false", "optimizer": "adamw", "validation_steps": 4, "validation_num_inference_steps": 2,
            "validation_prompts": f"[{{prompt: a boat, images: [{refs[0] / 'img0.png'}, {refs[1] / 'img0.png'}]}}]"})
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    losses = read_losses(out)
    assert len(losses) == 4 and all(np.isfinite(losses))
    assert (out / "samples" / "step-4.png").is_file()
    infer = subprocess.run([PY, "inference.py", "--model_name", str(model), "--lora_weights", str(out), "--prompt", "a boat",
                            "--image", str(refs[0] / "img1.png"), "--image", str(refs[1] / "img1.png"), "--width", "64", "--height", "64",
                            "--num_inference_steps", "2", "--output_image", str(tmp_path / "x.png")],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert infer.returncode == 0, infer.stderr[-2000:]
    assert Image.open(tmp_path / "x.png").size == (64, 64)


def test_references_too_small_for_qwen3_vl_are_refused_before_loading(model, tmp_path):
    from trainer.config import ConfigError
    from trainer.loop import train

    data = write_dataset(tmp_path / "d", n=1)
    refs = write_dataset(tmp_path / "r", n=1, size=(80, 112))
    cfg = load_config(None, base_overrides(model, data, tmp_path / "o", **{"data_config.control_dir": str(refs),
                                                                            "data_config.control_size": 256}))
    with pytest.raises(ConfigError, match="control_size' is 256.*at least 288"):
        train(cfg, QwenImage21Adapter)
