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
    save_file({k: v.contiguous() for k, v in converted.items()}, str(out), metadata={"format": "pt", VARIANT_KEY: adapter.variant.name})
    return out


def comfyui_to_diffusers(path: str | Path, pipeline_class) -> dict[str, torch.Tensor]:
    """Any format diffusers understands -> diffusers keys with the alpha folded into lora_B (scale 1)."""
    sd = pipeline_class.lora_state_dict(str(path))
    return dict(sd[0] if isinstance(sd, tuple) else sd)


VARIANT_KEY = "trainer.variant"  # metadata key naming the variant a LoRA was trained for (our own files)


def add_metadata(path: str | Path, extra: dict[str, str]) -> None:
    """Rewrite a safetensors file with `extra` added to its metadata (LoRA files are small)."""
    import os

    path = Path(path)
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
    tensors = load_file(str(path))
    tmp = path.with_name(f".tmp-{path.name}")
    save_file(tensors, str(tmp), metadata={**meta, **extra})
    os.replace(tmp, path)


def lora_layers(sd: dict[str, torch.Tensor]) -> dict[str, tuple[int, int, int]]:
    """transformer module path -> (rank, in_features, out_features) of a diffusers-format LoRA state dict."""
    out: dict[str, list] = {}
    for key, value in sd.items():
        module, sep, kind = key.removeprefix(PREFIX).rpartition(".lora_")
        if not sep or value.ndim != 2:
            continue
        entry = out.setdefault(module, [None, None, None])
        if kind.startswith("A"):
            entry[0], entry[1] = value.shape
        elif kind.startswith("B"):
            entry[2] = value.shape[0]
    return {k: tuple(v) for k, v in out.items()}


def mismatches(layers: dict[str, tuple[int, int, int]], transformer: torch.nn.Module, shapes: bool = True) -> list[str]:
    """LoRA layers that do not map onto `transformer`: a missing module, or (shapes=True) other in / out sizes."""
    modules = dict(transformer.named_modules())
    bad = []
    for name, (_r, fan_in, fan_out) in layers.items():
        m = modules.get(name)
        if m is None or not hasattr(m, "in_features"):
            bad.append(f"{name} (no such layer)")
        elif shapes and (fan_in, fan_out) != (m.in_features, m.out_features):
            bad.append(f"{name} ({fan_in}->{fan_out}, the model's layer is {m.in_features}->{m.out_features})")
    return bad


def read_lora(path: str | Path, pipeline_class) -> dict[str, torch.Tensor]:
    """A LoRA file in any format `pipeline_class`'s loader reads, as diffusers keys; ValueError when it cannot."""
    try:
        return comfyui_to_diffusers(path, pipeline_class)
    except Exception as e:  # the loaders raise many types for foreign files
        raise ValueError(f"not a LoRA file {pipeline_class.__name__} can read ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None


def guess_variant(path: str | Path) -> str | None:
    """The variant a LoRA file was made for: our metadata, else the first registered family whose released
    transformer has every layer the file adapts."""
    from trainer.config import TrainConfig
    from trainer.models import variants

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get(VARIANT_KEY):
        return meta[VARIANT_KEY]
    for name, (cls, variant) in variants().items():
        adapter = cls(TrainConfig(), variant)
        try:
            layers = lora_layers(read_lora(path, adapter.pipeline_class))
        except ValueError:
            continue
        if layers and not mismatches(layers, meta_transformer(adapter), shapes=False):
            return name
    return None


def meta_transformer(adapter, model_name: str | None = None) -> torch.nn.Module:
    """The family's transformer on the meta device (no memory): from a model folder's / hub id's config, or the
    released architecture."""
    import diffusers

    cls = getattr(diffusers, adapter.transformer_class)
    config = cls.load_config(model_name, subfolder="transformer") if model_name else adapter.released_transformer_config()
    with torch.device("meta"):
        return cls.from_config(config)


def check_lora_fits(path: str | Path, adapter, model_name: str | None = None) -> None:
    """ValueError (one line) unless every layer of the LoRA file maps onto this family's transformer: the model's
    own (names and sizes, read from its config before any weight loads) or, without one, the released architecture
    (names). The message says which family the file is for when that can be told."""
    layers = lora_layers(read_lora(path, adapter.pipeline_class))
    bad = mismatches(layers, meta_transformer(adapter, model_name), shapes=model_name is not None)
    if not layers:
        bad = ["(no LoRA layers for the transformer)"]
    if bad:
        guess = guess_variant(path)
        where = f"; it looks like a LoRA for {guess} models" if guess and guess != adapter.variant.name else ""
        raise ValueError(f"{Path(path).name}: {len(bad)} of {len(layers)} LoRA layer(s) do not fit this {adapter.variant.name} model "
                         f"(e.g. {bad[0]}){where}")
