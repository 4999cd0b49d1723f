"""Turn a full fine-tune into a LoRA: the difference of every Linear weight to the base model, truncated by SVD.

    python utils/extract_lora.py --model_name Qwen/Qwen-Image --transformer output_full --rank 64 --out lora_dir/

The LoRA (diffusers format, `pipe.load_lora_weights(out)`; `--format comfyui` adds the ComfyUI file) holds, for each
Linear layer whose weight changed, up = U_r S_r and down = V_r^T of delta = W_tuned - W_base (alpha = rank, so the
scale is 1). It prints how much of the change each layer keeps (the Frobenius norm of the kept part over the whole).
Changes outside Linear weights (norms, biases, embeddings) cannot be a LoRA; their count and size are printed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def extract(base: dict, tuned: dict, linear: set[str], rank: int, atol: float = 0.0):
    """(layers {module.lora_A/B.weight: tensor}, kept fraction per module, changed tensors that are not Linear weights)."""
    import torch

    layers, kept, other = {}, {}, []
    for key, w in tuned.items():
        delta = w.float() - base[key].float()
        if delta.abs().max() <= atol:
            continue
        module = key[: -len(".weight")] if key.endswith(".weight") else None
        if module not in linear:
            other.append((key, float(delta.abs().max())))
            continue
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        r = min(rank, s.numel())
        up, down = torch.zeros(delta.shape[0], rank), torch.zeros(rank, delta.shape[1])  # narrow layers: zero-padded to rank
        up[:, :r], down[:r] = u[:, :r] * s[:r], vh[:r]
        layers[f"{module}.lora_B.weight"], layers[f"{module}.lora_A.weight"] = up, down
        kept[module] = float(s[:r].square().sum().sqrt() / s.square().sum().sqrt())
    return layers, kept, other


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_name", required=True, help="the base model (diffusers folder or hub id)")
    p.add_argument("--transformer", required=True, help="the fine-tuned transformer folder, or the run's output_dir / checkpoint")
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--out", required=True, help="folder to write pytorch_lora_weights.safetensors into")
    p.add_argument("--format", choices=["diffusers", "comfyui"], default="diffusers", help="comfyui: also write the ComfyUI-named file")
    args = p.parse_args(argv)
    if args.rank < 1:
        print("error: --rank must be >= 1", file=sys.stderr)
        return 2

    import torch

    from trainer.constants import COMFY_FILE, LORA_FILE
    from trainer.lora_format import VARIANT_KEY, add_metadata, save_comfyui
    from trainer.methods.full import read_folder
    from trainer.pipelines import ToolError, adapter_for, load_transformer, resolve_transformer

    try:
        adapter = adapter_for(args.model_name)
        folder = resolve_transformer(args.transformer)
        tuned_model = load_transformer(adapter, str(folder), torch.float32)
    except ToolError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import diffusers

    base_model = getattr(diffusers, adapter.transformer_class).from_pretrained(args.model_name, subfolder="transformer", torch_dtype=torch.float32)
    linear = {n for n, m in base_model.named_modules() if isinstance(m, torch.nn.Linear)}
    layers, kept, other = extract(base_model.state_dict(), read_folder(folder), linear, args.rank)
    del tuned_model
    if not layers:
        print("error: no Linear weight differs from the base model; nothing to extract", file=sys.stderr)
        return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    modules = sorted(kept)
    adapter.pipeline_class.save_lora_weights(
        out, transformer_lora_layers=layers,
        transformer_lora_adapter_metadata={"r": args.rank, "lora_alpha": args.rank, "target_modules": modules})
    add_metadata(out / LORA_FILE, {VARIANT_KEY: adapter.variant.name})
    if args.format == "comfyui":
        save_comfyui(out / LORA_FILE, out / COMFY_FILE, adapter)
    fractions = sorted(kept.values())
    print(f"{len(modules)} layers at rank {args.rank}: the LoRA keeps {fractions[0]:.3f} (worst layer) to {fractions[-1]:.3f} "
          f"(best) of each layer's change; median {fractions[len(fractions) // 2]:.3f}")
    if other:
        worst = max(other, key=lambda t: t[1])
        print(f"{len(other)} changed tensors are not Linear weights and are not in the LoRA (largest change {worst[1]:.3g} in {worst[0]})")
    print(f"wrote {out / LORA_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
