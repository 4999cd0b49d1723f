"""Generate images with a base model and (optionally) a trained LoRA or a fully fine-tuned transformer.

    python inference.py --model_name Qwen/Qwen-Image --lora_weights output/pytorch_lora_weights.safetensors \
        --prompt "a photo of sks dog" --output_image out.png --width 1024 --height 1024 --seed 0
    python inference.py --model_name Qwen/Qwen-Image --transformer output_full --prompt "..."   # training_method: full

The model family is read from the model's model_index.json; --lora_weights takes the .safetensors file or a
checkpoint folder holding one. Edit / Kontext models take --image (repeat it for several references); FLUX Control
models and LoRAs take --control_image (the output keeps its aspect ratio); FLUX Fill models and LoRAs inpaint --image
where --mask is white. Qwen-Image in-context control LoRAs (control_type: in-context) take --control_image, resized to
the output's size (--in_context for such LoRAs trained elsewhere, e.g. DiffSynth-Studio's In-Context-Control-Union).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from trainer.config import IMAGE_EXTENSIONS, QUANTIZE_CHOICES
from trainer.constants import LORA_FILE


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_name", default="Qwen/Qwen-Image", help="diffusers model folder or hub id")
    p.add_argument("--lora_weights", default=None, help="LoRA .safetensors file or a folder containing " + LORA_FILE)
    p.add_argument("--lora_scale", type=float, default=1.0, help="LoRA strength (0 = base model)")
    p.add_argument("--transformer", default=None,
                   help="a fully fine-tuned transformer (training_method: full): its folder, or the run's output_dir / checkpoint")
    p.add_argument("--prompt", required=True)
    p.add_argument("--image", "--control_image", dest="image", action="append", default=[],
                   help="reference image for edit / Kontext models (repeat for several); the control image (e.g. a Canny / depth map) "
                        "for FLUX Control models and LoRAs")
    p.add_argument("--controlnet", default=None,
                   help="a trained ControlNet (training_method: controlnet): its folder, or the run's output_dir / checkpoint; "
                        "with --control_image")
    p.add_argument("--control_mode", type=int, default=None,
                   help="a Union ControlNet's control mode for --control_image (its training's data_config.control_mode; InstantX's "
                        "FLUX.1 Union: 0 canny, 1 tile, 2 depth, 3 blur, 4 pose, 5 gray, 6 low quality)")
    p.add_argument("--in_context", action="store_true",
                   help="Qwen-Image: --control_image as in-context control tokens (needed only for LoRAs trained elsewhere, e.g. "
                        "DiffSynth-Studio's In-Context-Control-Union; ours say so in their metadata)")
    p.add_argument("--controlnet_scale", type=float, default=1.0, help="the ControlNet's strength (controlnet_conditioning_scale; 0 = the base model)")
    p.add_argument("--layers", type=int, default=None, help="Qwen-Image-Layered: how many layers to decompose --image into (default: the pipeline's, 4)")
    p.add_argument("--mask", default=None, help="FLUX Fill: the inpainting mask for --image (white = repainted, black = kept)")
    p.add_argument("--kontext_auto_resize", choices=["true", "false"], default="true",
                   help="Kontext: resize the input image to the nearest resolution Kontext was trained on (pipeline default)")
    p.add_argument("--negative_prompt", default=None, help="negative prompt (Qwen: used when --true_cfg_scale > 1; default ' ')")
    p.add_argument("--true_cfg_scale", type=float, default=None,
                   help="classifier-free guidance scale, 1 = none, for every family (default: the family's: 4.0; Qwen-Image 2.1 1.0 "
                        "as its pipeline; Z-Image 6.0, its pipeline's guidance_scale 5.0, which counts from 0)")
    p.add_argument("--guidance_scale", type=float, default=None, help="FLUX distilled guidance (default: the pipeline's, 3.5 for FLUX.1 dev / Kontext, 4.0 for FLUX.2 dev)")
    p.add_argument("--max_sequence_length", type=int, default=None, help="prompt tokens (default: the pipeline's)")
    p.add_argument("--width", type=int, default=None, help="default 1024 (edit models: the input image's aspect at ~1 MP)")
    p.add_argument("--height", type=int, default=None, help="default 1024 (edit models: the input image's aspect at ~1 MP)")
    p.add_argument("--num_inference_steps", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output_image", default="output.png")
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when available)")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp16", "fp32"], default="auto", help="auto = bf16 on GPU, fp32 on CPU")
    p.add_argument("--quantize", "--quantization", dest="quantize", choices=QUANTIZE_CHOICES, default="none",
                   help="quantize the transformer's blocks (as in training) before the LoRA is applied: qfloat8 / qint8 / qint4 "
                        "(optimum-quanto), nf4 / int8 (bitsandbytes), int8_w8a8 / fp8_w8a8 (8-bit matmuls). Qwen-Image's transformer: 38 GiB bf16, 19 GiB qfloat8, 10 GiB nf4. "
                        "--quantization is FlyMyAI's name for it")
    p.add_argument("--offload", choices=["none", "model", "sequential"], default="none",
                   help="GPU only. model: each component (text encoder, transformer, VAE) is on the GPU only while it runs "
                        "(diffusers enable_model_cpu_offload); sequential: layer by layer (least VRAM, slowest)")
    return p.parse_args(argv)


def fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


MAX_SIDE = 8192  # pixels: beyond this no released model renders, and the latents alone would fill a GPU
MAX_SEED = 2**63 - 1


def check_numbers(args: argparse.Namespace) -> None:
    """Numbers the pipeline would crash on (or hang with): one line each, before any model loads."""
    import math

    if not 1 <= args.num_inference_steps <= 1000:
        fail(f"--num_inference_steps must be between 1 and 1000 (got {args.num_inference_steps})")
    for flag, value in (("--width", args.width), ("--height", args.height)):
        if value is not None and value > MAX_SIDE:
            fail(f"{flag} must be at most {MAX_SIDE} (got {value})")
    if not 0 <= args.seed <= MAX_SEED:
        fail(f"--seed must be between 0 and {MAX_SEED} (got {args.seed})")
    for flag, value in (("--lora_scale", args.lora_scale), ("--true_cfg_scale", args.true_cfg_scale),
                        ("--guidance_scale", args.guidance_scale)):
        if value is not None and not math.isfinite(value):
            fail(f"{flag} must be a finite number (got {value})")
    if args.true_cfg_scale is not None and args.true_cfg_scale < 0:
        fail(f"--true_cfg_scale must be >= 0 (got {args.true_cfg_scale}; 1 = no guidance)")
    if args.max_sequence_length is not None and args.max_sequence_length < 1:
        fail(f"--max_sequence_length must be >= 1 (got {args.max_sequence_length})")


def image_problem(path: str) -> str | None:
    """Why PIL cannot use this file as an input image (None when it can), read the way training reads images."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        return f"is not an image PIL can read ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else 'unreadable'})"
    return None


def main(argv=None) -> int:
    args = parse_args(argv)
    from trainer.cli import printable_names

    printable_names()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    from trainer.models.base import InferenceRequest
    from trainer.pipelines import ToolError, adapter_for, check_lora, load_pipeline, output_images, resolve_transformer

    try:
        adapter = adapter_for(args.model_name, args.lora_weights, controlnet=args.controlnet is not None, in_context=args.in_context)
    except ToolError as e:
        fail(f"--model_name: {e}")
    try:
        if args.lora_weights:
            check_lora(args.lora_weights, adapter)
    except ToolError as e:
        fail(f"--lora_weights: {e}")
    if args.transformer:
        try:
            resolve_transformer(args.transformer)
        except ToolError as e:
            fail(f"--transformer: {e}")
    if args.controlnet_scale != 1.0 and not args.controlnet:
        fail("--controlnet_scale sets the strength of --controlnet; pass --controlnet PATH (or leave the scale out)")
    if args.controlnet:
        from trainer.pipelines import controlnet_folder

        try:
            folder = controlnet_folder(adapter, args.controlnet)
        except ToolError as e:
            fail(f"--controlnet: {e}")
        from trainer.methods.controlnet import num_modes

        modes = num_modes(str(folder))
        if modes and (args.control_mode is None or not 0 <= args.control_mode < modes):
            fail(f"--control_mode: this ControlNet is a Union of {modes} control modes; pass --control_mode 0 to {modes - 1} "
                 "(the mode it was trained with for such control images)")
        if not modes and args.control_mode is not None:
            fail("--control_mode: this ControlNet has no control modes (a Union ControlNet's config has num_mode)")
    elif args.control_mode is not None:
        fail("--control_mode sets a Union ControlNet's mode; pass --controlnet PATH")
    if Path(args.output_image).is_dir():
        fail(f"--output_image: '{args.output_image}' is a folder; give a file name such as {Path(args.output_image) / 'out.png'}")
    if Path(args.output_image).suffix.lower() not in IMAGE_EXTENSIONS:
        fail(f"--output_image: '{args.output_image}' needs an image extension ({', '.join(IMAGE_EXTENSIONS)})")
    if any(p.exists() and not p.is_dir() for p in Path(args.output_image).parents):
        fail(f"--output_image: a parent of '{args.output_image}' is a file, not a folder")
    check_numbers(args)
    multiple = adapter.size_multiple
    for flag, value in (("--width", args.width), ("--height", args.height)):
        if value is not None and value < multiple:
            fail(f"{flag} must be at least {multiple} (got {value})")
        if value is not None and value % multiple:
            print(f"note: {flag} {value} is not a multiple of {multiple}; the pipeline renders "
                  f"{max(multiple, value // multiple * multiple)}", file=sys.stderr)
    low, high = adapter.variant.references
    name = adapter.variant.name
    if adapter.masks_are_inputs:  # FLUX Fill: one image to inpaint and its mask
        low = high = 1
        if not args.mask:
            fail(f"--mask: {name} models inpaint --image where the mask is white; pass --mask PATH")
        if not Path(args.mask).is_file():
            fail(f"--mask: '{args.mask}' does not exist")
        problem = image_problem(args.mask)
        if problem:
            fail(f"--mask: '{args.mask}' {problem}")
    elif args.mask:
        fail(f"--mask: {name} models take no inpainting mask (FLUX Fill models and LoRAs do)")
    if low and not args.image and adapter.masks_are_inputs:
        fail(f"--image: {name} models inpaint an image; pass --image PATH --mask PATH")
    if args.mask and args.image and Path(args.image[0]).is_file() and not image_problem(args.image[0]):
        from PIL import Image as PILImage, ImageOps as PILOps

        (w, h), (mw, mh) = (PILOps.exif_transpose(PILImage.open(p)).size for p in (args.image[0], args.mask))
        if abs(mw * h - mh * w) > 0.01 * mh * w:
            fail(f"--mask: '{args.mask}' is {mw}x{mh} but --image is {w}x{h}; the mask needs the image's aspect ratio")
    if low and not args.image:
        fail(f"--control_image: {name} models follow a control image; pass --control_image PATH" if adapter.aligned_controls
             else f"--image: {name} models edit an input image; pass --image PATH")
    if args.negative_prompt is not None and not adapter.takes_negative_prompt:
        fail(f"--negative_prompt: {name} models take no negative prompt (their guidance runs a model without text)")
    if len(args.image) > high:
        fail(f"--image: {name} takes at most {high} input image(s), got {len(args.image)}")
    for path in args.image:
        if not Path(path).is_file():
            fail(f"--image: '{path}' does not exist")
        problem = image_problem(path)
        if problem:
            fail(f"--image: '{path}' {problem}")

    import torch
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.offload != "none" and device == "cpu":
        fail("--offload moves components between the CPU and a GPU; on the CPU leave it at none")
    from trainer.constants import torch_dtype

    dtype = torch_dtype(args.dtype if args.dtype != "auto" else ("bf16" if device.startswith("cuda") else "fp32"))
    try:
        pipe = load_pipeline(adapter, dtype, device, args.lora_weights, args.lora_scale, args.quantize, args.offload, args.transformer,
                             args.controlnet)
    except ToolError as e:
        fail(f"{'--controlnet' if args.controlnet and adapter.controlnet_class in str(e) else '--transformer'}: {e}")

    from PIL import Image, ImageOps

    images = []
    if args.image:
        mode = "RGBA" if adapter.pixel_channels == 4 else "RGB"  # Qwen-Image 2.1 reads the alpha channel
        images = [ImageOps.exif_transpose(Image.open(p)).convert(mode) for p in args.image]
    request = InferenceRequest(
        prompt=args.prompt, images=images, width=args.width, height=args.height, guidance_scale=args.guidance_scale,
        true_cfg_scale=adapter.default_true_cfg_scale if args.true_cfg_scale is None else args.true_cfg_scale, negative_prompt=args.negative_prompt, max_sequence_length=args.max_sequence_length,
        auto_resize=args.kontext_auto_resize == "true",
        mask=ImageOps.exif_transpose(Image.open(args.mask)).convert("L") if args.mask else None,
        conditioning_scale=args.controlnet_scale, control_mode=args.control_mode, layers=args.layers,
    )
    width, height = args.width or (None if high else 1024), args.height or (None if high else 1024)
    if adapter.aligned_controls and not args.width and not args.height:  # the control image's (Fill: the image's) aspect at ~1 MP
        from image_datasets import target_size

        width, height = target_size(*images[0].size, 1024, multiple)
    kwargs = dict(
        prompt=args.prompt,
        **adapter.size_kwargs(width, height),  # Qwen-Image-Layered: none (a resolution from --width / --height, in its own arguments)
        num_inference_steps=args.num_inference_steps,
        generator=torch.Generator(device="cpu").manual_seed(args.seed),
        **adapter.inference_kwargs(request),
    )
    allowed = getattr(pipe, "resolutions", None)  # Kandinsky 5 renders a fixed list of sizes and resizes any other request
    if allowed and width and height and (width, height) not in allowed:
        w, h = min(allowed, key=lambda r: abs(r[0] / r[1] - width / height))
        print(f"note: {name} renders only {', '.join(f'{a}x{b}' for a, b in allowed)}; {width}x{height} "
              f"becomes {w}x{h} (the nearest aspect ratio)", file=sys.stderr)
    with adapter.render_size(pipe, width, height):  # HiDream-I1 would scale the request to 1024x1024's area
        image = output_images(pipe(**kwargs))[0]
    out = Path(args.output_image)
    out.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(image, list):  # Qwen-Image-Layered: its layers, each as a file, and side by side as --output_image
        for k, layer in enumerate(image):
            layer.save(out.with_name(f"{out.stem}-layer{k + 1}.png"))
        print(f"{name}: wrote {len(image)} layers as {out.stem}-layer1.png ... -layer{len(image)}.png", file=sys.stderr)
        image = adapter.preview_image(image)
    if image.mode == "RGBA" and out.suffix.lower() in (".jpg", ".jpeg", ".bmp"):
        print(f"note: {out.suffix} has no alpha channel; the transparent image is composited over white (use .png to keep it)",
              file=sys.stderr)
        image = Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image).convert("RGB")
    image.save(out)
    print(f"{name}: wrote {out} ({image.width}x{image.height})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
