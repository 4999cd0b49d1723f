"""LoRA file formats: diffusers (what pipe.load_lora_weights reads) and ComfyUI.

ComfyUI key names come from the family (`ModelAdapter.comfyui_names`), e.g.
  Qwen-Image : diffusion_model.<module>.lora_A.weight / .lora_B.weight / .alpha
  FLUX.1     : lora_transformer_<module with . -> _>.lora_down.weight / .lora_up.weight / .alpha
The alpha tensors carry the strength (scale = alpha / rank), so a file converted either way renders the same.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

PREFIX = "transformer."


def read_alpha(path: str | Path, default_rank: int) -> float:
    """lora_alpha stored by diffusers' save_lora_weights in the file metadata (falls back to the rank)."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    raw = meta.get("lora_adapter_metadata")
    if raw:
        info = json.loads(raw)  # flat keys such as "transformer.lora_alpha"
        for key in ("transformer.lora_alpha", "lora_alpha"):
            if info.get(key) is not None:
                return float(info[key])
    return float(default_rank)


def diffusers_to_comfyui(sd: dict[str, torch.Tensor], adapter, alpha: float) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in sd.items():
        module, _, kind = key.removeprefix(PREFIX).rpartition(".lora_")
        down, up, alpha_key = adapter.comfyui_names(module)
        out[down if kind.startswith("A") else up] = value
        out[alpha_key] = torch.tensor(float(alpha))
    return out


def save_comfyui(diffusers_file: str | Path, out: str | Path, adapter, rank: int) -> Path:
    sd = load_file(str(diffusers_file))
    converted = diffusers_to_comfyui(sd, adapter, read_alpha(diffusers_file, rank))
    out = Path(out)
    save_file({k: v.contiguous() for k, v in converted.items()}, str(out), metadata={"format": "pt", "family": adapter.variant.name})
    return out


def comfyui_to_diffusers(path: str | Path, pipeline_class) -> dict[str, torch.Tensor]:
    """Any format diffusers understands -> diffusers keys with the alpha folded into lora_B (scale 1)."""
    sd = pipeline_class.lora_state_dict(str(path))
    return dict(sd[0] if isinstance(sd, tuple) else sd)
