"""Generate images with a base model and (optionally) a trained LoRA.

    python inference.py --model_name Qwen/Qwen-Image --lora_weights output/pytorch_lora_weights.safetensors \
        --prompt "a photo of sks dog" --output_image out.png --width 1024 --height 1024 --seed 0

The model family is read from the model's model_index.json; --lora_weights takes the .safetensors file or a
checkpoint folder holding one.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from trainer.config import QUANTIZE_CHOICES  # noqa: E402

LORA_FILE = "pytorch_lora_weights.safetensors"

# model_index.json `_class_name` -> (family, how many --image inputs it takes, guidance style)
FAMILIES = {
    "QwenImagePipeline": ("qwen-image", 0, "true_cfg"),
    "QwenImageEditPipeline": ("qwen-image-edit", 1, "true_cfg"),
    "QwenImageEditPlusPipeline": ("qwen-image-edit-plus", 3, "true_cfg"),
    "FluxPipeline": ("flux", 0, "distilled"),
    "FluxKontextPipeline": ("flux-kontext", 1, "distilled"),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_name", default="Qwen/Qwen-Image", help="diffusers model folder or hub id")
    p.add_argument("--lora_weights", default=None, help="LoRA .safetensors file or a folder containing " + LORA_FILE)
    p.add_argument("--lora_scale", type=float, default=1.0, help="LoRA strength (0 = base model)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--image", action="append", default=[], help="input image for edit / Kontext models (repeat for Edit-2509, up to 3)")
    p.add_argument("--kontext_auto_resize", choices=["true", "false"], default="true",
                   help="Kontext: resize the input image to the nearest resolution Kontext was trained on (pipeline default)")
    p.add_argument("--negative_prompt", default=None, help="negative prompt (Qwen: used when --true_cfg_scale > 1; default ' ')")
    p.add_argument("--true_cfg_scale", type=float, default=4.0, help="Qwen-Image classifier-free guidance scale")
    p.add_argument("--guidance_scale", type=float, default=None, help="FLUX distilled guidance (default 3.5 for dev / Kontext)")
    p.add_argument("--width", type=int, default=None, help="default 1024 (edit models: the input image's aspect at ~1 MP)")
    p.add_argument("--height", type=int, default=None, help="default 1024 (edit models: the input image's aspect at ~1 MP)")
    p.add_argument("--num_inference_steps", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output_image", default="output.png")
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when available)")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp16", "fp32"], default="auto", help="auto = bf16 on GPU, fp32 on CPU")
    p.add_argument("--quantize", choices=QUANTIZE_CHOICES, default="none",
                   help="quantize the transformer's blocks (as in training) before the LoRA is applied: qfloat8 / qint8 / qint4 "
                        "(optimum-quanto), nf4 / int8 (bitsandbytes). Qwen-Image's transformer: 38 GiB bf16, 19 GiB qfloat8, 10 GiB nf4")
    p.add_argument("--offload", choices=["none", "model", "sequential"], default="none",
                   help="GPU only. model: each component (text encoder, transformer, VAE) is on the GPU only while it runs "
                        "(diffusers enable_model_cpu_offload); sequential: layer by layer (least VRAM, slowest)")
    return p.parse_args(argv)


def fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def resolve_lora(path: str) -> tuple[str, str]:
    """(directory, weight_name) for load_lora_weights."""
    p = Path(path)
    if p.is_dir():
        if not (p / LORA_FILE).is_file():
            fail(f"--lora_weights: folder '{path}' has no {LORA_FILE}")
        return str(p), LORA_FILE
    if p.is_file():
        return str(p.parent), p.name
    fail(f"--lora_weights: '{path}' does not exist")


def pipeline_class_name(model_name: str) -> str:
    p = Path(model_name)
    if p.is_dir():
        index = p / "model_index.json"
        if not index.is_file():
            fail(f"--model_name: '{model_name}' has no model_index.json; point it to a diffusers model folder")
    else:
        from huggingface_hub import hf_hub_download

        try:
            index = Path(hf_hub_download(model_name, "model_index.json"))
        except Exception as e:
            fail(f"--model_name: cannot find '{model_name}' locally or on the hub ({type(e).__name__}); "
                 f"download it with `huggingface-cli download {model_name}` or pass a local folder")
    return json.loads(index.read_text())["_class_name"]


def load_pipeline(model_name: str, family: str, dtype, device: str, lora: str | None, lora_scale: float,
                  quantize: str = "none", offload: str = "none"):
    from diffusers import DiffusionPipeline

    extra = {}
    if family.startswith("qwen-image-edit"):
        from trainer.models.qwen_processor import load_qwen_processor

        extra["processor"] = load_qwen_processor(model_name)
    pipe = DiffusionPipeline.from_pretrained(model_name, dtype=dtype, **extra)
    if quantize != "none":
        import torch

        from trainer.quantize import quantize_model

        # Block by block on the target device (the GPU never holds the unquantized transformer); with offloading the
        # quantized transformer then goes back to the CPU until it runs.
        pipe.transformer = quantize_model(pipe.transformer.requires_grad_(False), quantize, torch.device(device), dtype)
    if lora:
        directory, weight_name = resolve_lora(lora)
        pipe.load_lora_weights(directory, weight_name=weight_name, adapter_name="lora")
        pipe.set_adapters(["lora"], adapter_weights=[lora_scale])
    if offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    else:
        pipe.to(device)
    return pipe


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    class_name = pipeline_class_name(args.model_name)
    if class_name not in FAMILIES:
        fail(f"--model_name: pipeline {class_name} is not supported (supported: {', '.join(FAMILIES)})")
    family, max_images, guidance = FAMILIES[class_name]
    if args.lora_weights:
        resolve_lora(args.lora_weights)
    if max_images and not args.image:
        fail(f"--image: {family} models edit an input image; pass --image PATH")
    if len(args.image) > max_images:
        fail(f"--image: {family} takes at most {max_images} input image(s), got {len(args.image)}")
    for path in args.image:
        if not Path(path).is_file():
            fail(f"--image: '{path}' does not exist")

    import torch

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.offload != "none" and device == "cpu":
        fail("--offload moves components between the CPU and a GPU; on the CPU leave it at none")
    dtype_name = args.dtype if args.dtype != "auto" else ("bf16" if device.startswith("cuda") else "fp32")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    pipe = load_pipeline(args.model_name, family, dtype, device, args.lora_weights, args.lora_scale, args.quantize, args.offload)

    kwargs = dict(
        prompt=args.prompt,
        width=args.width or (None if max_images else 1024),
        height=args.height or (None if max_images else 1024),
        num_inference_steps=args.num_inference_steps,
        generator=torch.Generator(device="cpu").manual_seed(args.seed),
    )
    if args.image:
        from PIL import Image, ImageOps

        images = [ImageOps.exif_transpose(Image.open(p)).convert("RGB") for p in args.image]
        kwargs["image"] = images if family == "qwen-image-edit-plus" else images[0]
    if family == "flux-kontext":
        kwargs["_auto_resize"] = args.kontext_auto_resize == "true"
        if args.width and args.height:
            # Kontext treats width/height as an aspect ratio scaled to max_area (1 MP); honour the asked size.
            kwargs["max_area"] = args.width * args.height
    if guidance == "distilled":
        kwargs["guidance_scale"] = 3.5 if args.guidance_scale is None else args.guidance_scale
    if guidance == "true_cfg":
        # Qwen's reference usage enables CFG with a blank negative prompt when none is given.
        negative = args.negative_prompt if args.negative_prompt is not None else (" " if args.true_cfg_scale > 1 else None)
        kwargs.update(negative_prompt=negative, true_cfg_scale=args.true_cfg_scale)
    image = pipe(**kwargs).images[0]
    out = Path(args.output_image)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out)
    print(f"{family}: wrote {out} ({image.width}x{image.height})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
