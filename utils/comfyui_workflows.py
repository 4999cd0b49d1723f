"""Write the ComfyUI workflows in comfyui/: per family, load the base model, apply a trained LoRA at strength 1 and
sample with the family's settings.

    python utils/comfyui_workflows.py            # rewrites comfyui/<variant>.json
    python utils/comfyui_workflows.py --check    # exit 1 when a file differs from what this script writes

The files are in ComfyUI's API format (queue them with ComfyUI's /prompt endpoint, or load them in the UI). The LoRA
is `pytorch_lora_weights_comfyui.safetensors` (training with `lora_format: comfyui`, or `utils/convert_lora.py --to
comfyui`), copied into ComfyUI's models/loras/. The base model files are ComfyUI's repackaged ones (models/
diffusion_models, text_encoders, vae); rename them in the file if yours differ. Edit models read `input.png` from
ComfyUI's input/ folder.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "comfyui"
LORA = "pytorch_lora_weights_comfyui.safetensors"  # trainer.constants.COMFY_FILE (kept literal: no heavy imports)


class Graph:
    """A ComfyUI API-format prompt: {id: {"class_type", "inputs", "_meta"}}; a link is [node id, output index]."""

    def __init__(self):
        self.nodes: dict[str, dict] = {}

    def add(self, class_type: str, title: str, **inputs) -> list:
        node_id = str(len(self.nodes) + 1)
        self.nodes[node_id] = {"class_type": class_type, "inputs": inputs, "_meta": {"title": title}}
        return [node_id, 0]


def _tail(g: Graph, model, positive, negative, latent, vae, steps: int, cfg: float, sampler: str, name: str) -> None:
    sampled = g.add("KSampler", "sample", model=model, seed=0, steps=steps, cfg=cfg, sampler_name=sampler, scheduler="simple",
                    positive=positive, negative=negative, latent_image=latent, denoise=1.0)
    image = g.add("VAEDecode", "decode", samples=sampled, vae=vae)
    g.add("SaveImage", "save", images=image, filename_prefix=f"lora_{name}")


def _loaders(g: Graph, unet_name: str, clip_names: tuple[str, ...], clip_type: str, vae_name: str, title: str = "base model"):
    """(model, clip, vae) outputs: the diffusion model, its text encoder(s) (CLIPLoader, or DualCLIPLoader for two), the VAE."""
    unet = g.add("UNETLoader", title, unet_name=unet_name, weight_dtype="default")
    if len(clip_names) == 1:
        clip = g.add("CLIPLoader", "text encoder", clip_name=clip_names[0], type=clip_type)
    else:
        clip = g.add("DualCLIPLoader", "text encoders", clip_name1=clip_names[0], clip_name2=clip_names[1], type=clip_type)
    return unet, clip, g.add("VAELoader", "vae", vae_name=vae_name)


def _lora(g: Graph, model) -> list:
    return g.add("LoraLoaderModelOnly", "the trained LoRA", model=model, lora_name=LORA, strength_model=1.0)


PROMPT = "your trigger word and prompt"
EDIT_PROMPT = "your edit instruction"


def qwen_image(edit: bool) -> dict:
    g = Graph()
    unet, clip, vae = _loaders(g, "qwen_image_edit_bf16.safetensors" if edit else "qwen_image_bf16.safetensors",
                               ("qwen_2.5_vl_7b.safetensors",), "qwen_image", "qwen_image_vae.safetensors")
    model = g.add("ModelSamplingAuraFlow", "shift", model=_lora(g, unet), shift=3.1)
    if edit:
        image = g.add("LoadImage", "input image", image="input.png")
        image = g.add("ImageScaleToTotalPixels", "about 1 MP", image=image, upscale_method="lanczos", megapixels=1.0, resolution_steps=1)
        positive = g.add("TextEncodeQwenImageEdit", "instruction", clip=clip, prompt=EDIT_PROMPT, vae=vae, image=image)
        negative = g.add("TextEncodeQwenImageEdit", "negative", clip=clip, prompt=" ", vae=vae, image=image)
        latent = g.add("VAEEncode", "start from the input", pixels=image, vae=vae)
    else:
        positive = g.add("CLIPTextEncode", "prompt", text=PROMPT, clip=clip)
        negative = g.add("CLIPTextEncode", "negative", text=" ", clip=clip)
        latent = g.add("EmptySD3LatentImage", "size", width=1328, height=1328, batch_size=1)
    _tail(g, model, positive, negative, latent, vae, steps=50, cfg=4.0, sampler="euler", name="qwen_image_edit" if edit else "qwen_image")
    return g.nodes


def flux(kontext: bool) -> dict:
    g = Graph()
    unet, clip, vae = _loaders(g, "flux1-dev-kontext.safetensors" if kontext else "flux1-dev.safetensors",
                               ("clip_l.safetensors", "t5xxl_fp16.safetensors"), "flux", "ae.safetensors")
    model = _lora(g, unet)
    text = g.add("CLIPTextEncode", "prompt", text=EDIT_PROMPT if kontext else PROMPT, clip=clip)
    negative = g.add("ConditioningZeroOut", "no negative (cfg 1)", conditioning=text)
    if kontext:
        image = g.add("LoadImage", "input image", image="input.png")
        image = g.add("FluxKontextImageScale", "Kontext's resolution", image=image)
        latent = g.add("VAEEncode", "the input's latents", pixels=image, vae=vae)
        text = g.add("ReferenceLatent", "the input as reference", conditioning=text, latent=latent)
        positive = g.add("FluxGuidance", "distilled guidance", conditioning=text, guidance=2.5)
    else:
        positive = g.add("FluxGuidance", "distilled guidance", conditioning=text, guidance=3.5)
        latent = g.add("EmptySD3LatentImage", "size", width=1024, height=1024, batch_size=1)
    _tail(g, model, positive, negative, latent, vae, steps=28, cfg=1.0, sampler="euler", name="flux_kontext" if kontext else "flux")
    return g.nodes


def flux_control(fill: bool) -> dict:
    """A FLUX Control / Fill LoRA trained from FLUX.1-dev on FLUX.1-dev: the LoRA file's reshape_weight widens img_in;
    InstructPixToPixConditioning (the control image) / InpaintModelConditioning (the image and its mask, painted in
    input.png's alpha with ComfyUI's mask editor) hand the extra latents to the model. Guidance as the pipelines:
    3.5 (Control), 30 (Fill)."""
    g = Graph()
    unet, clip, vae = _loaders(g, "flux1-dev.safetensors", ("clip_l.safetensors", "t5xxl_fp16.safetensors"), "flux", "ae.safetensors")
    model = _lora(g, unet)
    text = g.add("CLIPTextEncode", "prompt", text=PROMPT, clip=clip)
    negative = g.add("ConditioningZeroOut", "no negative (cfg 1)", conditioning=text)
    positive = g.add("FluxGuidance", "distilled guidance", conditioning=text, guidance=30.0 if fill else 3.5)
    image = g.add("LoadImage", "image to inpaint (mask in its alpha)" if fill else "control image (e.g. Canny edges)", image="input.png")
    if fill:
        cond = g.add("InpaintModelConditioning", "masked image + mask", positive=positive, negative=negative, vae=vae, pixels=image,
                     mask=[image[0], 1], noise_mask=False)
    else:
        cond = g.add("InstructPixToPixConditioning", "control latents", positive=positive, negative=negative, vae=vae, pixels=image)
    _tail(g, model, cond, [cond[0], 1], [cond[0], 2], vae, steps=28, cfg=1.0, sampler="euler", name="flux_fill" if fill else "flux_control")
    return g.nodes


def z_image() -> dict:
    """Z-Image-Turbo with a LoRA trained on Z-Image (Base), as README recommends."""
    g = Graph()
    unet, clip, vae = _loaders(g, "z_image_turbo_bf16.safetensors", ("qwen_3_4b.safetensors",), "lumina2", "ae.safetensors",
                               "base model (Turbo)")
    model = g.add("ModelSamplingAuraFlow", "shift", model=_lora(g, unet), shift=3.0)
    positive = g.add("CLIPTextEncode", "prompt", text=PROMPT, clip=clip)
    negative = g.add("ConditioningZeroOut", "no negative (cfg 1)", conditioning=positive)
    latent = g.add("EmptySD3LatentImage", "size", width=1024, height=1024, batch_size=1)
    _tail(g, model, positive, negative, latent, vae, steps=9, cfg=1.0, sampler="res_multistep", name="z_image")
    return g.nodes


def chroma() -> dict:
    g = Graph()
    unet, clip, vae = _loaders(g, "Chroma1-HD.safetensors", ("t5xxl_fp16.safetensors",), "chroma", "ae.safetensors")
    positive = g.add("CLIPTextEncode", "prompt", text=PROMPT, clip=clip)
    negative = g.add("CLIPTextEncode", "negative", text="low quality, blurry", clip=clip)
    latent = g.add("EmptySD3LatentImage", "size", width=1024, height=1024, batch_size=1)
    _tail(g, _lora(g, unet), positive, negative, latent, vae, steps=28, cfg=5.0, sampler="euler", name="chroma")
    return g.nodes


WORKFLOWS = {  # variant name (trainer/models) -> its workflow
    "qwen-image": lambda: qwen_image(edit=False),
    "qwen-image-edit": lambda: qwen_image(edit=True),
    "flux": lambda: flux(kontext=False),
    "flux-kontext": lambda: flux(kontext=True),
    "flux-control": lambda: flux_control(fill=False),
    "flux-fill": lambda: flux_control(fill=True),
    "z-image": z_image,
    "chroma": chroma,
}


def render(name: str) -> str:
    return json.dumps(WORKFLOWS[name](), indent=1) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="compare comfyui/*.json with what this script writes; exit 1 on a difference")
    args = p.parse_args(argv)
    stale = []
    OUT.mkdir(exist_ok=True)
    for name in WORKFLOWS:
        path = OUT / f"{name}.json"
        text = render(name)
        if args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(path.name)
        else:
            path.write_text(text)
            print(f"wrote {path.relative_to(ROOT)}")
    if stale:
        print(f"out of date: {', '.join(stale)} (run python utils/comfyui_workflows.py)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
