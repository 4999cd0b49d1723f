"""Convert a LoRA file between the diffusers and ComfyUI formats.

    python utils/convert_lora.py --in output/pytorch_lora_weights.safetensors --out my_lora_comfy.safetensors --to comfyui --family qwen-image
    python utils/convert_lora.py --in some_comfy_lora.safetensors --out diffusers_lora/ --to diffusers --family flux

--family: a variant name (python utils/convert_lora.py --help lists them). --to diffusers accepts every format
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
    p.add_argument("--family", choices=sorted(known), required=True)
    p.add_argument("--rank", type=int, default=None, help="only for files without alpha metadata: the LoRA rank")
    args = p.parse_args(argv)
    src = Path(args.src)
    if src.is_dir():
        src = src / "pytorch_lora_weights.safetensors"
    if not src.is_file():
        print(f"error: --in: '{args.src}' does not exist", file=sys.stderr)
        return 2
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    from trainer.config import TrainConfig
    from trainer.lora_format import comfyui_to_diffusers, save_comfyui

    cls, variant = known[args.family]
    adapter = cls(TrainConfig(), variant)
    from trainer.lora_format import check_lora_fits

    try:  # every layer must exist in this family's transformer, or the converted file would be half-wrong
        check_lora_fits(src, adapter)
    except ValueError as e:
        print(f"error: --in: {e} (--family {args.family})", file=sys.stderr)
        return 2
    if args.to == "comfyui":
        from safetensors.torch import load_file

        rank = args.rank or next(v.shape[0] for k, v in load_file(str(src)).items() if ".lora_A." in k)
        out = save_comfyui(src, args.out, adapter, rank)
    else:
        layers = {k.removeprefix("transformer."): v for k, v in comfyui_to_diffusers(src, adapter.pipeline_class).items()}
        out_dir = Path(args.out)
        adapter.pipeline_class.save_lora_weights(out_dir, transformer_lora_layers=layers)
        out = out_dir / "pytorch_lora_weights.safetensors"
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
