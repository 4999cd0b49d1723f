"""Fuse a LoRA into its base model and save a plain diffusers folder (no LoRA needed at inference).

    python utils/merge_lora.py --model_name Qwen/Qwen-Image --lora_weights output/ --out merged/ [--scale 0.8]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_name", required=True)
    p.add_argument("--lora_weights", required=True, help="LoRA .safetensors file or a folder holding pytorch_lora_weights.safetensors")
    p.add_argument("--out", required=True)
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16", help="dtype of the saved model")
    args = p.parse_args(argv)
    import torch

    from inference import FAMILIES, load_pipeline, pipeline_class_name, resolve_lora

    family = FAMILIES.get(pipeline_class_name(args.model_name), ("?",))[0]
    resolve_lora(args.lora_weights)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    pipe = load_pipeline(args.model_name, family, dtype, "cpu", args.lora_weights, 1.0)
    pipe.fuse_lora(components=["transformer"], lora_scale=args.scale)
    pipe.unload_lora_weights()
    pipe.save_pretrained(args.out)
    print(f"merged {args.lora_weights} (scale {args.scale}) into {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
