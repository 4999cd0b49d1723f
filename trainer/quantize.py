"""Weight-only quantization of frozen models, one repeated block at a time.

quanto: qfloat8 / qint8 / qint4 (optimum-quanto).  bitsandbytes: nf4 / int8.  Ours: int8_w8a8 / fp8_w8a8
(trainer/w8a8.py: the matmul itself in 8 bits, activations quantized per token; the others dequantize the weight).
Only the Linear layers inside the model's repeated transformer blocks are converted (>95% of the weights); the
small embedders, norms and output projection stay in the load dtype. LoRA then wraps the quantized layers; its own
weights stay fp32 and are saved in the same diffusers format as an unquantized run.
"""

from __future__ import annotations

import contextlib
import gc
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from trainer.config import normalize_mode
from trainer.w8a8 import quantize_linears, replace_linears

if TYPE_CHECKING:
    from trainer.offload import BlockSwap

logger = logging.getLogger(__name__)

QUANTO_MODES = ("qfloat8", "qint8", "qint4")
W8A8_MODES = ("int8_w8a8", "fp8_w8a8")


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's transformer blocks (diffusers lists their class names in `_repeated_blocks`)."""
    names = set(getattr(model, "_repeated_blocks", None) or getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    inner = {id(m) for b in blocks for m in b.modules() if m is not b}
    return [b for b in blocks if id(b) not in inner]


def _to_bnb(linear: nn.Linear, mode: str, compute_dtype: torch.dtype, device: torch.device) -> nn.Module:
    import bitsandbytes as bnb

    has_bias = linear.bias is not None
    if mode == "nf4":
        new = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=has_bias, compute_dtype=compute_dtype,
                                quant_type="nf4", device="meta")
        new.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, quant_type="nf4")
    else:
        new = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=has_bias, has_fp16_weights=False,
                                  threshold=6.0, device="meta")
        new.weight = bnb.nn.Int8Params(linear.weight.data, requires_grad=False, has_fp16_weights=False)
    if has_bias:
        new.bias = nn.Parameter(linear.bias.data, requires_grad=False)
    return new.to(device)  # bitsandbytes quantizes while moving


@dataclass
class Placement:
    """Where a frozen model's weights live: the quantization mode and the blocks whose weights stay in host RAM.

    Returned by `place_model` and passed to the code that needs it (the training method wraps swapped blocks' real
    weights through `host_weights`, benches and tests read `swap`)."""

    device: torch.device
    quantize: str = "none"
    swap: "BlockSwap | None" = None

    def host_weights(self):
        """Context in which swapped blocks hold their real weights (for peft when it wraps their layers)."""
        return self.swap.host_weights() if self.swap is not None else contextlib.nullcontext()


def place_model(
    model: nn.Module, mode: str, device: torch.device, compute_dtype: torch.dtype, blocks_to_swap: int = 0
) -> Placement:
    """Quantize `model` in place block by block, leaving every block on `device`.

    Blocks are moved to the device one at a time and quantized there, so the device never holds more than the
    quantized model plus one unquantized block, and host RAM never holds more than one copy in the load dtype.
    With `blocks_to_swap` = N the last N blocks keep their frozen weights in host RAM (see trainer/offload.py);
    an unquantized swapped block never touches the device here.
    """
    mode = normalize_mode(mode)
    device = torch.device(device)
    if mode == "none" and not blocks_to_swap:
        model.to(device)
        return Placement(device)
    blocks = repeated_blocks(model)
    if not blocks:
        raise ValueError(f"cannot find transformer blocks to quantize or swap in {type(model).__name__}")
    if blocks_to_swap > len(blocks):
        raise ValueError(f"blocks_to_swap={blocks_to_swap} but {type(model).__name__} has {len(blocks)} blocks")
    swapped = {id(b) for b in blocks[len(blocks) - blocks_to_swap :]}
    swap = None
    if swapped:
        from trainer.offload import BlockSwap

        swap = BlockSwap(model, device)
    for block in blocks:
        if mode != "none":
            block.to(device)
            _quantize_block(block, mode, compute_dtype, device)
        if id(block) in swapped:
            swap.add(block)
        else:
            block.to(device)
        if device.type != "cpu":  # a cycle holding the unquantized weights would keep them on the accelerator (on the CPU the
            gc.collect()  # next automatic collection frees them: a full collection per block costs seconds in a large process)
    model.to(device)  # the non-block rest (embedders, norms, output projection) and swapped blocks' placeholders
    if mode != "none":
        logger.info("quantized %d %s blocks of %s to %s", len(blocks), type(blocks[0]).__name__, type(model).__name__, mode)
    if swap is not None:
        logger.info("blocks_to_swap: %d of %d blocks keep their weights in host RAM (%.2f GiB)", len(swap.blocks), len(blocks), swap.host_bytes / 2**30)
    return Placement(device, mode, swap)


def _quantize_block(block: nn.Module, mode: str, compute_dtype: torch.dtype, device: torch.device) -> None:
    if mode in W8A8_MODES:
        quantize_linears(block, mode)
    elif mode in QUANTO_MODES:
        from optimum import quanto

        quanto.quantize(block, weights=getattr(quanto, mode))
        quanto.freeze(block)
    else:
        replace_linears(block, lambda linear: _to_bnb(linear, mode, compute_dtype, device))


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by a model's parameters and buffers, counting quantized storage as stored."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        for part in _storage_parts(t):
            if part.data_ptr() in seen:
                continue
            seen.add(part.data_ptr())
            total += part.numel() * part.element_size()
    return total


def _storage_parts(t: torch.Tensor) -> list[torch.Tensor]:
    """quanto tensors keep data and scales in inner tensors; bitsandbytes keeps a quant_state beside the weight."""
    inner = getattr(t, "__tensor_flatten__", None)
    if inner is not None and type(t) is not torch.Tensor and type(t) is not nn.Parameter:
        names, _ = t.__tensor_flatten__()
        return [p for n in names for p in _storage_parts(getattr(t, n))]
    parts = [t]
    state = getattr(t, "quant_state", None)
    if state is not None:
        parts += [v for v in (getattr(state, "absmax", None), getattr(state, "code", None)) if isinstance(v, torch.Tensor)]
    return parts
