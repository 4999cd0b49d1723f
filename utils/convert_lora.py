"""Convert a LoRA file between the diffusers and ComfyUI formats.

    python utils/convert_lora.py --in output/pytorch_lora_weights.safetensors --out my_lora_comfy.safetensors --to comfyui
    python utils/convert_lora.py --in some_comfy_lora.safetensors --out diffusers_lora/ --to diffusers --family flux

--family: a variant name (python utils/convert_lora.py --help lists them); optional for this trainer's files (they
name their family) and for files whose layers fit one registered family only. --to diffusers accepts every format
diffusers' own loaders read (ComfyUI, kohya, ...), and writes pytorch_lora_weights.safetensors into the --out folder.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def main(argv=None) -> int:
    from trainer.models import variants

    known = variants()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--in", dest="src", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--to", choices=["comfyui", "diffusers"], required=True)
    p.add_argument("--family", choices=sorted(known), default=None, help="the LoRA's model family (default: read from the file)")
    args = p.parse_args(argv)
    src = Path(args.src)
    if src.is_dir():
        src = src / "pytorch_lora_weights.safetensors"
    if not src.is_file():
        print(f"error: --in: '{args.src}' does not exist", file=sys.stderr)
        return 2
    out_parent = Path(args.out).parent if args.to == "comfyui" else Path(args.out)
    blocker = next((p for p in [out_parent, *out_parent.parents] if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        print(f"error: --out: '{blocker}' is a file, not a folder", file=sys.stderr)
        return 2
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    from trainer.config import TrainConfig
    from trainer.lora_format import comfyui_to_diffusers, guess_variant, save_comfyui

    if args.family is None:
        try:
            args.family = guess_variant(src)
        except Exception as e:  # not a safetensors file at all
            print(f"error: --in: '{src}' is not a LoRA file ({type(e).__name__})", file=sys.stderr)
            return 2
        if args.family is None:
            print(f"error: --in: cannot tell which model family '{src}' is for; pass --family (one of: {', '.join(sorted(known))})",
                  file=sys.stderr)
            return 2
        print(f"family: {args.family} (from the file)")

    cls, variant = known[args.family]
    adapter = cls(TrainConfig(), variant)
    from trainer.lora_format import check_lora_fits

    try:  # every layer must exist in this family's transformer, or the converted file would be half-wrong
        check_lora_fits(src, adapter)
    except ValueError as e:
        print(f"error: --in: {e} (--family {args.family})", file=sys.stderr)
        return 2
    Path(out_parent).mkdir(parents=True, exist_ok=True)  # a new folder for --out is made, as the trainer makes output_dir
    if args.to == "comfyui":
        try:
            out = save_comfyui(src, args.out, adapter)  # each layer's alpha from the file's metadata (none: scale 1)
        except ValueError as e:  # a DoRA file: its ComfyUI form needs the base model
            print(f"error: --in: {e}", file=sys.stderr)
            return 2
    else:
        layers = {k.removeprefix("transformer."): v for k, v in comfyui_to_diffusers(src, adapter.pipeline_class).items()}
        out_dir = Path(args.out)
        adapter.pipeline_class.save_lora_weights(out_dir, transformer_lora_layers=layers)
        out = out_dir / "pytorch_lora_weights.safetensors"
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
