"""Fuse a LoRA into its base model and save a plain diffusers folder (no LoRA needed at inference).

    python utils/merge_lora.py --model_name Qwen/Qwen-Image --lora_weights output/ --out merged/ [--scale 0.8]
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_name", required=True)
    p.add_argument("--lora_weights", required=True, help="LoRA .safetensors file or a folder holding pytorch_lora_weights.safetensors")
    p.add_argument("--out", required=True)
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16", help="dtype of the saved model")
    args = p.parse_args(argv)

    from trainer.constants import torch_dtype
    from trainer.pipelines import ToolError, adapter_for, check_lora, load_pipeline

    try:
        adapter = adapter_for(args.model_name)
        check_lora(args.lora_weights, adapter)
    except ToolError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    pipe = load_pipeline(adapter, torch_dtype(args.dtype), "cpu", args.lora_weights, 1.0)
    pipe.fuse_lora(components=["transformer"], lora_scale=args.scale)
    pipe.unload_lora_weights()
    pipe.save_pretrained(args.out)
    print(f"merged {args.lora_weights} (scale {args.scale}) into {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
