"""LoRA file formats: diffusers (what pipe.load_lora_weights reads) and ComfyUI.

ComfyUI key names come from the family (`ModelAdapter.comfyui_names`), e.g.
  Qwen-Image : diffusion_model.<module>.lora_A.weight / .lora_B.weight / .alpha
  FLUX.1     : lora_transformer_<module with . -> _>.lora_down.weight / .lora_up.weight / .alpha
The alpha tensors carry the strength (scale = alpha / rank), so a file converted either way renders the same.
LyCORIS types keep their part names under the same module name (<name>.lokr_w1, <name>.hada_w1_a, ...) and DoRA adds
<name>.dora_scale; `comfyui_delta` in tests/comfyui_rules.py restates what ComfyUI computes from each.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

PREFIX = "transformer."
CONFIG_KEY = "trainer.adapter_config"  # metadata key: the adapter's peft config (JSON), in our own files
LYCORIS_PARTS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")


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


def peft_metadata(config) -> dict:
    """A peft config as JSON-able metadata (sets become sorted lists)."""
    return {k: sorted(v) if isinstance(v, set) else v for k, v in config.to_dict().items()}


def adapter_config(path: str | Path):
    """The peft config a LoRA file was trained with: ours (CONFIG_KEY), else a plain LoRA with the alpha of
    diffusers' metadata, else None (no alpha recorded: loaders apply such a file at scale 1)."""
    from peft import LoraConfig, PeftConfig

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get(CONFIG_KEY):
        info = json.loads(meta[CONFIG_KEY])
        return PeftConfig.from_peft_type(**{k: v for k, v in info.items() if k != "auto_mapping"})
    alpha = read_alpha(path, 0)
    return LoraConfig(r=1, lora_alpha=alpha) if alpha else None


def _pattern(patterns: dict, module: str, default):
    from peft.utils.other import get_pattern_key

    return patterns.get(get_pattern_key(list(patterns), module), default) if patterns else default


def module_scale(config, module: str, rank: int) -> float:
    """peft's multiplier of the adapter's product on this module: alpha / r (alpha / sqrt(r) for rsLoRA), with
    rank_pattern / alpha_pattern applied. `rank`: the module's rank read from its tensors (LoRA)."""
    if config is None:
        return 1.0
    if config.peft_type.value == "LORA":
        alpha = _pattern(config.alpha_pattern, module, config.lora_alpha)
        return alpha / rank**0.5 if config.use_rslora else alpha / rank
    r = _pattern(config.rank_pattern, module, config.r)
    return _pattern(config.alpha_pattern, module, config.alpha) / r


def diffusers_to_comfyui(sd: dict[str, torch.Tensor], adapter, config, dora: dict | None = None) -> dict[str, torch.Tensor]:
    """Our file's tensors under ComfyUI's names, each module's alpha set so that ComfyUI's multiplier (alpha divided
    by the dimension it reads from the tensors) is peft's. DoRA: `dora` maps a module to ||W|| / ||W + dW|| per
    output row (ComfyUI normalises by the frozen weight's own norm; peft by the adapted one's)."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        module, _, part = key.removeprefix(PREFIX).removesuffix(".weight").rpartition(".")
        modules.setdefault(module, {})[part] = value
    out = _fused(modules, adapter, config)
    for module, parts in modules.items():
        down, up, alpha_key = adapter.comfyui_names(module)
        name = alpha_key.removesuffix(".alpha")
        if "lora_A" in parts:
            rank = parts["lora_A"].shape[0]
            out[down], out[up] = parts["lora_A"], parts["lora_B"]
            out[alpha_key] = torch.tensor(module_scale(config, module, rank) * rank)
            if module in adapter.input_layers:  # ComfyUI pads the model's weight with zeros to this shape first
                out[f"{name}.reshape_weight"] = torch.tensor([parts["lora_B"].shape[0], parts["lora_A"].shape[1]])
            if "lora_magnitude_vector" in parts:
                if dora is None or module not in dora:
                    raise ValueError(f"{module}: a DoRA layer's ComfyUI form needs the base model's weights; write it while training "
                                     "(lora_format: comfyui)")
                out[f"{name}.dora_scale"] = (parts["lora_magnitude_vector"] * dora[module]).unsqueeze(1)
        elif "hada_w1_a" in parts:
            out.update({f"{name}.{k}": v for k, v in parts.items()})
            out[alpha_key] = torch.tensor(module_scale(config, module, 0) * parts["hada_w1_b"].shape[0])
        else:  # LoKr: ComfyUI divides alpha by the rank of the decomposed factor (w2's, else w1's); none = no alpha
            out.update({f"{name}.{k}": v for k, v in parts.items()})
            scale = module_scale(config, module, 0)
            dim = parts["lokr_w2_b"].shape[0] if "lokr_w2_b" in parts else parts["lokr_w1_b"].shape[0] if "lokr_w1_b" in parts else None
            if dim is None:
                out[f"{name}.lokr_w1"] = parts["lokr_w1"] * scale
            else:
                out[alpha_key] = torch.tensor(scale * dim)
    return out


def _fused(modules: dict[str, dict[str, torch.Tensor]], adapter, config) -> dict[str, torch.Tensor]:
    """The LoRAs of layers ComfyUI stacks into one weight (`adapter.comfyui_fused`), taken out of `modules` and written
    as one LoRA on the stacked layer: down = the downs stacked, up = block-diagonal of each up times its scale (a layer
    without a LoRA: zero rows), alpha = the stacked rank (ComfyUI's multiplier 1). Exact for plain LoRA only."""
    groups: dict[str, dict[int, tuple[str, dict]]] = {}
    sizes: dict[str, int] = {}
    for module in list(modules):
        group = adapter.comfyui_group(module)
        if group:
            groups.setdefault(group[0], {})[group[1]] = (module, modules.pop(module))
            sizes[group[0]] = group[2]
    out = {}
    for name, members in groups.items():
        for module, parts in members.values():
            if "lora_A" not in parts or "lora_magnitude_vector" in parts:
                raise ValueError(f"{module}: ComfyUI stacks this layer with others ({name}); only a plain LoRA on it can be written "
                                 "in ComfyUI's form (leave it out of lora_target_modules, or use lora_format: diffusers)")
        rows = next(iter(members.values()))[1]["lora_B"].shape[0]
        downs, ups = [], []
        for k in range(sizes[name]):
            if k in members:
                module, parts = members[k]
                rank = parts["lora_A"].shape[0]
                downs.append(parts["lora_A"].float())
                ups.append(parts["lora_B"].float() * module_scale(config, module, rank))
            else:
                ups.append(torch.zeros(rows, 0))
        down_key, up_key, alpha_key = adapter.comfyui_names(name)
        out[down_key], out[up_key] = torch.cat(downs), torch.block_diag(*ups)
        out[alpha_key] = torch.tensor(float(out[down_key].shape[0]))
    return out


def save_comfyui(diffusers_file: str | Path, out: str | Path, adapter, dora: dict | None = None) -> Path:
    sd = load_file(str(diffusers_file))
    converted = diffusers_to_comfyui(sd, adapter, adapter_config(diffusers_file), dora)
    out = Path(out)
    save_file({k: v.float().contiguous() for k, v in converted.items()}, str(out), metadata={"format": "pt", VARIANT_KEY: adapter.variant.name})
    return out


def dora_ratios(transformer: torch.nn.Module, adapter_name: str, whole: dict | None = None) -> dict[str, torch.Tensor]:
    """Per DoRA layer: ||W|| / ||W + scale * B A|| per output row, W the frozen weight (dequantized; gathered when
    sharded; from `whole`, the consolidated state dict, when the engine made one). Every process calls it."""
    from peft.tuners.lora import LoraLayer
    from peft.utils.integrations import dequantize_module_weight

    from trainer.distributed import full

    out = {}
    for name, module in transformer.named_modules():
        if not isinstance(module, LoraLayer) or adapter_name not in getattr(module, "lora_magnitude_vector", {}):
            continue
        def get(key: str, tensor):
            return whole[key] if whole is not None and key in whole else full(tensor.detach())
        base = module.get_base_layer()
        weight = whole[f"{name}.base_layer.weight"] if whole is not None and f"{name}.base_layer.weight" in whole else full(dequantize_module_weight(base).detach())
        a = get(f"{name}.lora_A.{adapter_name}.weight", module.lora_A[adapter_name].weight).float().cpu()
        b = get(f"{name}.lora_B.{adapter_name}.weight", module.lora_B[adapter_name].weight).float().cpu()
        weight = weight.float().cpu()
        adapted = weight + module.scaling[adapter_name] * (b @ a)
        out[name] = weight.norm(dim=1) / adapted.norm(dim=1)
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
    """transformer module path -> (rank, in_features, out_features) of a diffusers-format LoRA state dict (LoKr /
    LoHa: the sizes their factors multiply out to; LoKr's rank 0 when no factor is decomposed)."""
    out: dict[str, list] = {}
    lycoris: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        plain = key.removeprefix(PREFIX)
        module, _, part = plain.rpartition(".")
        if part in LYCORIS_PARTS:
            lycoris.setdefault(module, {})[part] = value
            continue
        module, sep, kind = plain.rpartition(".lora_")
        if not sep or value.ndim != 2:
            continue
        entry = out.setdefault(module, [None, None, None])
        if kind.startswith("A"):
            entry[0], entry[1] = value.shape
        elif kind.startswith("B"):
            entry[2] = value.shape[0]
    for module, p in lycoris.items():
        if "hada_w1_a" in p:
            out[module] = [p["hada_w1_b"].shape[0], p["hada_w1_b"].shape[1], p["hada_w1_a"].shape[0]]
            continue
        w1 = p.get("lokr_w1") if "lokr_w1" in p else (p["lokr_w1_a"] @ p["lokr_w1_b"])
        w2 = p.get("lokr_w2") if "lokr_w2" in p else (p["lokr_w2_a"] @ p["lokr_w2_b"])
        rank = p["lokr_w2_b"].shape[0] if "lokr_w2_b" in p else p["lokr_w1_b"].shape[0] if "lokr_w1_b" in p else 0
        out[module] = [rank, w1.shape[1] * w2.shape[1], w1.shape[0] * w2.shape[0]]
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


def is_lycoris(sd) -> bool:
    return any(k.rpartition(".")[2] in LYCORIS_PARTS for k in sd)


def read_lora(path: str | Path, pipeline_class) -> dict[str, torch.Tensor]:
    """A LoRA file in any format `pipeline_class`'s loader reads, as diffusers keys (our own LoKr / LoHa files
    as they are); ValueError when it cannot."""
    try:
        return comfyui_to_diffusers(path, pipeline_class)
    except Exception as e:  # the loaders raise many types for foreign files
        own = _own_lycoris(path)
        if own is not None:
            return own
        raise ValueError(f"not a LoRA file {pipeline_class.__name__} can read ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None


def _own_lycoris(path: str | Path) -> dict[str, torch.Tensor] | None:
    """Our LoKr / LoHa file (diffusers layout + CONFIG_KEY), which most pipelines' loaders refuse."""
    try:
        with safe_open(str(path), framework="pt") as f:
            ours = CONFIG_KEY in (f.metadata() or {})
        sd = load_file(str(path)) if ours else {}
    except Exception:
        return None
    return sd if sd and is_lycoris(sd) and all(k.startswith(PREFIX) for k in sd) else None


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
        return adapter.prepare_transformer(cls.from_config(config))


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
