"""Fuse a LoRA into its base model and save a plain diffusers folder (no LoRA needed at inference).

    python utils/merge_lora.py --model_name Qwen/Qwen-Image --lora_weights output/ --out merged/ [--lora_scale 0.8]
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_name", required=True)
    p.add_argument("--lora_weights", required=True, help="LoRA .safetensors file or a folder holding pytorch_lora_weights.safetensors")
    p.add_argument("--out", required=True)
    p.add_argument("--lora_scale", "--scale", dest="scale", type=float, default=1.0, help="LoRA strength baked in (as inference.py's --lora_scale)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16", help="dtype of the saved model")
    p.add_argument("--overwrite", action="store_true", help="replace --out when it already holds files")
    args = p.parse_args(argv)

    from trainer.config import inside
    from trainer.constants import torch_dtype
    from trainer.pipelines import ToolError, adapter_for, check_lora, load_pipeline, resolve_lora

    try:
        adapter = adapter_for(args.model_name, args.lora_weights)  # a FLUX Control / Fill LoRA: merged into that pipeline
        check_lora(args.lora_weights, adapter)
        out = Path(args.out)
        if not math.isfinite(args.scale):
            raise ToolError(f"--scale must be a finite number (got {args.scale})")
        if Path(args.model_name).exists() and (inside(out, args.model_name) or inside(args.model_name, out)):
            raise ToolError(f"--out '{out}' is, is inside or holds the base model's folder '{args.model_name}'; the merged model goes into "
                            "a folder of its own")
        if inside(Path(resolve_lora(args.lora_weights)[0]), out):
            raise ToolError(f"--out '{out}' holds the LoRA being merged; write the merged model to another folder")
        if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
            raise ToolError(f"--out '{out}' already exists and is not an empty folder; choose another, or add --overwrite to replace it")
    except ToolError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    pipe = load_pipeline(adapter, torch_dtype(args.dtype), "cpu", args.lora_weights, 1.0)
    pipe.fuse_lora(components=["transformer"], lora_scale=args.scale)
    pipe.unload_lora_weights()
    adapter.record_widening(pipe.transformer)  # a FLUX Control / Fill LoRA widened x_embedder: the saved config says so
    tmp = out.with_name(f".tmp-{out.name}")  # written beside, then put in place: an interrupted merge leaves no half model
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    os.replace(tmp, out)
    print(f"merged {args.lora_weights} (scale {args.scale}) into {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
