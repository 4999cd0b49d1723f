"""Dry-run GPU memory planner: will this config fit my card?

    python utils/estimate_memory.py --config train_configs/train_lora_4090.yaml [--resolution 1024] [--vram_gb 24] [key=value ...]

The transformer is built from its config on PyTorch's meta device (no weights are read or allocated), so this works
for the real 20B Qwen-Image and 12B FLUX.1 models without downloading them: a local model folder or a cached hub
model gives its own config; otherwise the diffusers default constructor arguments are used, which are the released
Qwen-Image / FLUX.1 architectures. Weights, LoRA, gradients and optimizer states are counted exactly; activations
are an estimate (see `activation_bytes`). With `blocks_to_swap=N` the last N blocks' weights are counted in host RAM
and one swapped block on the GPU; when the config does not fit, the smallest blocks_to_swap that would is printed.
With `training_method=full` it prints the per-GPU memory of a full fine-tune for one GPU, FSDP2, ZeRO-2 and ZeRO-3
on 1, 2, 4 and 8 GPUs (`full_plan`).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

GB = 1024**3
# Bytes per weight of a quantized Linear, scales included (quanto: per-channel scales, qint4 group 128 with
# scale + shift; bitsandbytes nf4: 4 bits + double-quantized absmax per 64 weights; int8 and the W8A8 modes: one
# fp32 scale per output row, 4 / 3072 bytes per weight at a 3072-wide input, counted as 1.0).
QUANT_BYTES = {"none": 2.0, "qfloat8": 1.0, "qint8": 1.0, "int8": 1.0, "qint4": 0.5 + 4 / 128, "nf4": 0.5 + 1 / 64,
               "int8_w8a8": 1.0, "fp8_w8a8": 1.0}
SLACK = 1.0 * GB  # CUDA context (~0.5 GiB) + what the caching allocator reserves beyond allocated (0.2-0.4 GiB measured)
# fp32 optimizer state per trainable parameter
OPTIMIZER_BYTES = {"adamw": 8.0, "adamw8bit": 2.0, "adafactor": 0.5, "prodigy": 16.0}


@dataclass
class Row:
    component: str
    params: int
    bytes_: float
    note: str = ""


def _local_file(name: str, rel: str) -> Path | None:
    p = Path(name) / rel
    if p.is_file():
        return p
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(name, rel, local_files_only=True))
    except Exception:
        return None


def model_adapter(cfg):
    """The family adapter (no weights) from model_index.json, or from a well-known hub id when it is not here."""
    from trainer.models import families, lookup
    from trainer.models.base import control_of

    index = _local_file(cfg.pretrained_model_name_or_path, "model_index.json")
    if index is not None:
        found = lookup(json.loads(index.read_text())["_class_name"])
        if found is None:
            raise ValueError(f"{cfg.pretrained_model_name_or_path}: its pipeline is not one this trainer trains")
        cls, variant = found
        return cls(cfg, cls.controlled(variant, control_of(cfg)))
    hits = [(cls, cls.variant_from_hub_id(cfg.pretrained_model_name_or_path)) for cls in families()]
    hits = [(cls, v) for cls, v in hits if v is not None]
    if not hits:
        raise ValueError(f"cannot tell the family of '{cfg.pretrained_model_name_or_path}' without its model_index.json")
    cls, variant = max(hits, key=lambda h: max(len(x) for x in h[1].hub_hints if x in cfg.pretrained_model_name_or_path.lower()))
    return cls(cfg, cls.controlled(variant, control_of(cfg)))


def build_transformer_on_meta(adapter):
    """The family's transformer on the meta device: from the model's own config.json when it is here, else the
    released architecture the family file names."""
    import diffusers
    import torch

    cls = getattr(diffusers, adapter.transformer_class)
    cfg_file = _local_file(adapter.cfg.pretrained_model_name_or_path, "transformer/config.json")
    if cfg_file is not None:
        config, source = cls.load_config(str(cfg_file.parent)), str(cfg_file)
    else:
        config, source = adapter.released_transformer_config(), f"{cls.__name__} released architecture"
    with torch.device("meta"):
        model = adapter.prepare_transformer(cls.from_config(config))  # FLUX Control / Fill from FLUX.1-dev: widened
    return model, source


def controlnet_params(model, adapter, lora: bool = False) -> tuple[int, int] | tuple[int, int, int]:
    """(parameters, blocks) of the ControlNet the run trains: a new one built from the meta-device transformer as
    training builds it, or the given one's config (no weights are read); lora: (its parameters, blocks, the
    parameters of controlnet_lora's LoRA on it)."""
    import diffusers
    import torch

    cfg = adapter.cfg
    with torch.device("meta"):
        if cfg.controlnet_model_name_or_path:
            cls = getattr(diffusers, adapter.controlnet_class)
            net = cls.from_config(cls.load_config(cfg.controlnet_model_name_or_path))
        else:
            net = adapter.make_controlnet(model)
    blocks = sum(len(getattr(net, name, None) or []) for name in ("transformer_blocks", "single_transformer_blocks", "control_layers"))
    total = sum(p.numel() for p in net.parameters())
    if not lora:
        return total, blocks
    from trainer.methods.controlnet import ControlNetMethod

    return total, blocks, sum(p.numel() for p in ControlNetMethod(cfg, adapter).attach_lora(net))


def lora_params(model, cfg, adapter) -> int:
    """Trainable parameters of the run's adapter, of any type (LoRA, DoRA, LoKr, LoHa; rank_pattern included): peft
    builds it on a copy of the meta-device transformer, which costs no memory."""
    import copy

    from peft import inject_adapter_in_model

    from trainer.methods.lora import LoRAMethod

    meta = copy.deepcopy(model)
    inject_adapter_in_model(LoRAMethod(cfg, adapter).lora_config(), meta, adapter_name="planned")
    return sum(p.numel() for n, p in meta.named_parameters() if ".planned" in n)


def activation_bytes(model, resolution: int, batch: int, checkpointing: bool, text_tokens: int, width: int = 0, frames: int = 1,
                     token_pixels: int = 16) -> float:
    """Estimate of what the backward pass keeps, bf16.

    With gradient checkpointing only each block's input (S x D, both streams) is stored, plus one block's internals
    while it is recomputed; without it every block keeps ~24 S x D values (q, k, v, attention output, 4x MLP, norms,
    both streams). Flash / memory-efficient attention is assumed (no S^2 term). Calibrated against the H100
    measurements in bench/results/h100_real_size.md (bench/planner_check.py prints the error per row).
    """
    d = width or model.config.num_attention_heads * model.config.attention_head_dim
    from trainer.quantize import repeated_blocks

    blocks = len(repeated_blocks(model))
    seq = frames * (resolution // token_pixels) ** 2 + text_tokens  # frames: image-sized token blocks per sample (Qwen-Image-Layered)
    per_block_full = 24 * seq * d * 2 * batch
    per_block_input = 1.25 * seq * d * 2 * batch  # the stream states in bf16, x1.25 fitted to the H100 peaks
    return blocks * per_block_input + per_block_full if checkpointing else blocks * per_block_full


def plan(cfg, resolution: int) -> tuple[list[Row], dict]:
    import torch

    from trainer.quantize import repeated_blocks

    adapter = model_adapter(cfg)
    model, source = build_transformer_on_meta(adapter)
    quant = cfg.quantize
    blocks = repeated_blocks(model)  # forward order, the blocks the trainer quantizes and swaps

    def block_size(block) -> tuple[int, int, float]:
        """(params, Linear weights, bytes): the trainer quantizes the Linear layers of the blocks only."""
        lin = sum(m.weight.numel() for m in block.modules() if isinstance(m, torch.nn.Linear))
        n = sum(p.numel() for p in block.parameters())
        return n, lin, lin * QUANT_BYTES[quant] + (n - lin) * 2

    sizes = [block_size(b) for b in blocks]
    block_bytes = [size[2] for size in sizes]
    total = sum(p.numel() for p in model.parameters())
    quantizable = sum(size[1] for size in sizes)
    all_bytes = sum(block_bytes) + (total - sum(size[0] for size in sizes)) * 2
    swap = cfg.blocks_to_swap
    if swap >= len(blocks):
        raise ValueError(f"config key 'blocks_to_swap' is {swap}, but this transformer has {len(blocks)} blocks; use at most {len(blocks) - 1}")

    def resident(n_swapped: int) -> float:
        """Transformer bytes on the GPU with the last n blocks swapped: the rest plus one swapped block in flight."""
        swapped = block_bytes[len(blocks) - n_swapped :] if n_swapped else []
        return all_bytes - sum(swapped) + max(swapped, default=0)

    note = f"{quantizable / total:.1%} of weights quantizable"
    if swap:
        host = sum(block_bytes[len(blocks) - swap :])
        note += f"; last {swap} of {len(blocks)} blocks in host RAM ({host / GB:.2f} GiB), one at a time on the GPU"
    rows = [Row(f"transformer ({quant}{', blocks_to_swap ' + str(swap) if swap else ''})", total, resident(swap), note)]

    spec = adapter.planner_spec()
    enc_rows = []
    for label, n, quantized in spec.encoders:
        q = cfg.quantize_text_encoder if quantized else "none"
        enc_rows.append(Row(f"{label} ({q})", n, n * QUANT_BYTES[q] * 0.97 + n * 2 * 0.03))
    enc_rows.append(Row("VAE (bf16)", spec.vae_params, spec.vae_params * 2))

    batch = cfg.data_config.train_batch_size
    activations = activation_bytes(model, resolution, batch, cfg.gradient_checkpointing, spec.text_tokens, spec.token_width, spec.image_frames,
                                   spec.token_pixels)
    weight_bytes, frozen_net = 4, []
    if cfg.training_method == "controlnet" and cfg.controlnet_lora:  # frozen in bf16, a LoRA on it in fp32
        n_net, net_blocks, n_lora = controlnet_params(model, adapter, lora=True)
        frozen_net = [Row("ControlNet weights (frozen, bf16)", n_net, n_net * 2)]
        what, grads = f"LoRA on the ControlNet (rank {cfg.rank}, fp32)", "LoRA gradients (fp32)"
        activations *= 1 + net_blocks / max(1, sum(int(model.config[k]) for k in adapter.block_count_keys))
    elif cfg.training_method == "controlnet":  # trained whole (full_weights); its blocks add their share of the activations
        n_lora, net_blocks = controlnet_params(model, adapter)
        weight_bytes = 2 if cfg.full_weights == "bf16" else 4
        what = (f"ControlNet weights ({cfg.controlnet_layers} + {cfg.controlnet_single_layers} blocks, {cfg.full_weights})"
                if not cfg.controlnet_model_name_or_path else f"ControlNet weights ({cfg.full_weights})")
        activations *= 1 + net_blocks / max(1, sum(int(model.config[k]) for k in adapter.block_count_keys))
        grads = f"ControlNet gradients ({cfg.full_weights})"
    else:
        n_lora = lora_params(model, cfg, adapter)
        what = f"{'DoRA' if cfg.use_dora else {'lokr': 'LoKr', 'loha': 'LoHa'}.get(cfg.lora_type, 'LoRA')} weights (rank {cfg.rank}, fp32)"
        grads = "LoRA gradients (fp32)"
    train_rows = [
        *frozen_net,
        Row(what, n_lora, n_lora * weight_bytes),
        *([Row(f"unconditional transformer for previews ({quant})", spec.preview_params, resident(swap) * spec.preview_params / total,
               "placed as the transformer; validation previews on")] if spec.preview_params and (cfg.validation_prompts or cfg.validation_samples) else []),
        Row(grads, n_lora, n_lora * weight_bytes),
        Row(f"optimizer state ({cfg.optimizer})", n_lora, n_lora * OPTIMIZER_BYTES[cfg.optimizer]),
        Row(f"activations ({resolution}px, batch {batch}, checkpointing {'on' if cfg.gradient_checkpointing else 'off'})", 0,
            activations, "estimate"),
        Row("CUDA context + allocator slack", 0, SLACK, "typical"),
    ]
    cached = cfg.precompute_text_embeddings and cfg.precompute_image_embeddings
    enc_total = sum(r.bytes_ for r in enc_rows)

    def train_peak(n_swapped: int) -> float:
        return sum(r.bytes_ for r in rows + train_rows) - rows[0].bytes_ + resident(n_swapped)

    def peak_with(n_swapped: int) -> float:
        # With precomputed embeddings the encoders run first and are freed before the transformer loads.
        return max(train_peak(n_swapped), enc_total + 1.0 * GB) if cached else train_peak(n_swapped) + enc_total

    phase = ("encoders freed before the transformer loads (precomputed embeddings)" if cached
             else "text encoder and VAE stay resident (no precomputed embeddings)")
    info = {"family": adapter.variant.name, "pipeline": adapter.variant.pipeline, "source": source, "peak": peak_with(swap), "phase": phase,
            "transformer_params": total, "lora_params": n_lora, "blocks": len(blocks), "encoder_peak": enc_total + 1.0 * GB, "cached": bool(cached),
            "peak_by_swap": [peak_with(n) for n in range(len(blocks))], "train_peak": train_peak(swap), "slack": SLACK}
    return rows + enc_rows + train_rows, info


ENGINES = ("one GPU / DDP", "FSDP2", "ZeRO-2", "ZeRO-3")


@dataclass
class FullRow:
    engine: str
    gpus: int
    weights: float
    grads: float
    optimizer: float
    ema: float
    activations: float

    @property
    def peak(self) -> float:
        return self.weights + self.grads + self.optimizer + self.ema + self.activations + SLACK


def full_components(model, cfg, frozen_bytes: float = 2.0) -> tuple[float, float, float, float, int]:
    """(weights, gradients, optimizer state, EMA) bytes of a full fine-tune of `model` on one GPU, and the number of
    trained weights. Frozen weights (outside trainable_modules) are `frozen_bytes` each (bf16)."""
    patterns = cfg.trainable_modules
    chosen = [p for n, p in model.named_parameters() if patterns is None or any(s in n for s in patterns)]
    trained = sum(p.numel() for p in chosen)
    total = sum(p.numel() for p in model.parameters())
    w = 4.0 if cfg.full_weights == "fp32" else 2.0
    if cfg.optimizer == "adafactor":  # factored second moment: a row and a column vector per matrix, fp32
        optimizer = sum(4.0 * (sum(p.shape[-2:]) if p.dim() >= 2 else p.numel()) for p in chosen)
    else:
        optimizer = trained * OPTIMIZER_BYTES[cfg.optimizer]
    return trained * w + (total - trained) * frozen_bytes, trained * w, optimizer, trained * 4.0 if cfg.ema_decay else 0.0, trained


def full_plan(cfg, resolution: int, gpu_counts=(1, 2, 4, 8)) -> tuple[list[FullRow], dict]:
    """Per-GPU memory of training_method: full for each engine and GPU count.

    Trained weights are fp32 master weights (4 B) or bf16 (2 B, `full_weights: bf16`), their gradients the same;
    frozen weights (outside trainable_modules) bf16; optimizer state per trained weight as in OPTIMIZER_BYTES; EMA 4 B.
    FSDP2 shards weights, gradients, optimizer state and EMA N ways and gathers one block at a time (two in flight
    with prefetch); ZeRO-2 shards gradients and optimizer state and keeps whole weights on every GPU; ZeRO-3 shards
    everything (one gathered block in flight). DDP keeps everything whole on every GPU.
    """
    from trainer.quantize import repeated_blocks

    adapter = model_adapter(cfg)
    model, source = build_transformer_on_meta(adapter)
    weights, grads, optimizer, ema, trained = full_components(model, cfg)
    total = sum(p.numel() for p in model.parameters())
    largest_block = max(sum(p.numel() for p in b.parameters()) for b in repeated_blocks(model)) * 2.0  # gathered in bf16
    spec = adapter.planner_spec()
    acts = activation_bytes(model, resolution, cfg.data_config.train_batch_size, cfg.gradient_checkpointing, spec.text_tokens,
                            spec.token_width, spec.image_frames, spec.token_pixels)
    # the trainer refuses adamw8bit under FSDP2 (bitsandbytes cannot update sharded tensors): its rows count adamw
    fsdp_optimizer = optimizer
    if cfg.optimizer == "adamw8bit":
        import dataclasses

        fsdp_optimizer = full_components(model, dataclasses.replace(cfg, optimizer="adamw"))[2]
    rows = []
    for engine in ENGINES:
        for n in gpu_counts:
            if engine == "one GPU / DDP":
                if n > 1:
                    continue
                rows.append(FullRow(engine, n, weights, grads, optimizer, ema, acts))
            elif engine == "FSDP2":
                rows.append(FullRow(engine, n, weights / n + (2 * largest_block if n > 1 else 0), grads / n, fsdp_optimizer / n, ema / n, acts))
            elif engine == "ZeRO-2":
                rows.append(FullRow(engine, n, weights, grads / n, optimizer / n, ema, acts))
            else:
                rows.append(FullRow(engine, n, weights / n + (largest_block if n > 1 else 0), grads / n, optimizer / n, ema / n, acts))
    info = {"family": adapter.variant.name, "pipeline": adapter.variant.pipeline, "source": source, "transformer_params": total,
            "trained_params": trained}
    return rows, info


def print_full_plan(cfg, resolution: int, vram_gb: float) -> int:
    rows, info = full_plan(cfg, resolution)
    print(f"model: {cfg.pretrained_model_name_or_path} ({info['pipeline']}), transformer config: {info['source']}")
    print(f"full fine-tuning: {info['trained_params']:,} of {info['transformer_params']:,} transformer weights trained "
          f"({cfg.full_weights} weights, {cfg.optimizer}{', EMA' if cfg.ema_decay else ''}); {resolution}px, batch "
          f"{cfg.data_config.train_batch_size} per GPU, checkpointing {'on' if cfg.gradient_checkpointing else 'off'}")
    print("encoders are freed before the transformer loads with precomputed embeddings (see the LoRA plan for their size)")
    print(f"{'engine':14} {'GPUs':>4} {'weights':>8} {'grads':>8} {'optim':>8} {'EMA':>6} {'activ.':>7} {'peak/GPU':>9}  fits {vram_gb:g} GB")
    for r in rows:
        print(f"{r.engine:14} {r.gpus:>4} {r.weights / GB:>8.2f} {r.grads / GB:>8.2f} {r.optimizer / GB:>8.2f} {r.ema / GB:>6.2f} "
              f"{r.activations / GB:>7.2f} {r.peak / GB:>9.2f}  {'yes' if r.peak <= vram_gb * GB else 'no'}")
    if cfg.optimizer == "adamw8bit":
        print("FSDP2 rows count optimizer=adamw: adamw8bit cannot update FSDP2's sharded tensors (the trainer refuses it there)")
    fitting = [r for r in rows if r.peak <= vram_gb * GB]
    if fitting:
        best = min(fitting, key=lambda r: (r.gpus, ENGINES.index(r.engine)))
        print(f"smallest setup that fits: {best.engine} on {best.gpus} GPU(s) ({best.peak / GB:.2f} GiB per GPU)")
    else:
        print("hint: nothing here fits; add GPUs, train fewer weights (trainable_modules), use full_weights: bf16 / adamw8bit, or use LoRA")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--resolution", type=int, default=None, help="default: data_config.img_size")
    p.add_argument("--vram_gb", type=float, default=24.0, help="card size to check against")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = p.parse_args(argv)

    import logging

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()  # optional-dependency notices (torchvision) are not our output
    from trainer.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides, check_paths=False)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    resolution = args.resolution or cfg.data_config.img_size
    if cfg.training_method == "full":
        try:
            return print_full_plan(cfg, resolution, args.vram_gb)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    try:
        rows, info = plan(cfg, resolution)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"model: {cfg.pretrained_model_name_or_path} ({info['pipeline']}), transformer config: {info['source']}")
    print(f"{'component':58} {'params':>15} {'GiB':>8}")
    for r in rows:
        print(f"{r.component:58} {r.params:>15,} {r.bytes_ / GB:>8.2f}  {r.note}")
    print(f"{'peak (' + info['phase'] + ')':58} {'':>15} {info['peak'] / GB:>8.2f}")
    fits = info["peak"] <= args.vram_gb * GB
    print(f"{'fits a ' + format(args.vram_gb, 'g') + ' GB card':58} {'':>15} {'yes' if fits else 'NO':>8}")
    if not fits:
        enough = [n for n, peak in enumerate(info["peak_by_swap"]) if peak <= args.vram_gb * GB]
        if enough:
            print(f"hint: blocks_to_swap={enough[0]} (of {info['blocks']}) would bring the peak to "
                  f"{info['peak_by_swap'][enough[0]] / GB:.2f} GiB, at the cost of copying those blocks to the GPU twice per step")
        elif info["cached"] and info["encoder_peak"] > args.vram_gb * GB:
            if cfg.quantize_text_encoder in ("nf4", "qint4"):
                print(f"hint: the caching phase (text encoder + VAE) alone needs {info['encoder_peak'] / GB:.2f} GiB with the text "
                      f"encoder in {cfg.quantize_text_encoder}; this card cannot encode the prompts, use one with more memory")
            else:
                print(f"hint: the caching phase (text encoder + VAE) alone needs {info['encoder_peak'] / GB:.2f} GiB; "
                      "set quantize_text_encoder (qfloat8 or nf4), then run this again")
        else:
            print("hint: even swapping all but one block does not fit; lower the resolution / batch or quantize further")
    return 0


if __name__ == "__main__":
    sys.exit(main())
