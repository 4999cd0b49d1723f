"""Block swapping (`blocks_to_swap: N`): train with the frozen weights of N transformer blocks kept in host RAM.

Each swapped block's frozen weights (plain, optimum-quanto or bitsandbytes-4bit) live in pinned host memory (quanto
weights in their portable form; quanto re-packs them for the GPU kernel, e.g. Marlin fp8, on every copy). Between
uses, the block holds empty placeholders on the device, so `model.to(device)`, DDP and `model.device` / `model.dtype`
see an ordinary model. When the block runs, its weights are copied to the device, the block computes, and the copies
are dropped again before the next block starts:

- forward: the swapped block runs under non-reentrant activation checkpointing (diffusers' own when
  `gradient_checkpointing` is on, ours otherwise), so autograd saves none of its tensors, and nothing keeps the
  device copies alive once the block returns;
- backward: checkpointing re-runs the block's forward, which copies the weights in again; autograd holds those copies
  only until the block's backward is done.

The device therefore holds at most one swapped block's weights at a time (plus whatever the caching allocator keeps),
at the price of two host->device copies of every swapped block per step. LoRA weights of swapped blocks are ordinary
trainable parameters on the device and never move.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import types

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

logger = logging.getLogger(__name__)


def _is_quanto(t: torch.Tensor) -> bool:
    return type(t) not in (torch.Tensor, nn.Parameter) and hasattr(t, "__tensor_flatten__")


def _portable(t: torch.Tensor) -> torch.Tensor:
    """optimum-quanto's kernel layouts (Marlin fp8 / int4, TinyGemm, AWQ) exist only on their device; their
    generic WeightQBytesTensor / WeightQBitsTensor form can live anywhere. quanto re-packs it for the device's kernel
    whenever it is moved there."""
    from optimum.quanto.tensor.weights import WeightQBitsTensor, WeightQBytesTensor

    if isinstance(t, WeightQBytesTensor) and type(t) is not WeightQBytesTensor:
        return t.weight_qbytes_tensor()
    if isinstance(t, WeightQBitsTensor) and type(t) is not WeightQBitsTensor:
        return t.weight_qbits_tensor()
    return t


def _map_storage(t: torch.Tensor, fn) -> torch.Tensor:
    """Apply `fn` to every plain tensor inside `t` (quanto tensors nest theirs) and rebuild the same type around them."""
    if _is_quanto(t):
        names, ctx = t.__tensor_flatten__()
        inner = {n: _map_storage(getattr(t, n), fn) for n in names}
        return type(t).__tensor_unflatten__(inner, ctx, t.size(), t.stride())
    return fn(t.detach())


def _map_quant_state(state, fn):
    """A copy of a bitsandbytes QuantState with `fn` applied to each of its tensors (QuantState.to() works in place)."""
    state = copy.copy(state)
    parts = [(state, ("absmax", "code", "offset"))]
    if getattr(state, "nested", False):
        state.state2 = copy.copy(state.state2)
        parts.append((state.state2, ("absmax", "code")))
    for obj, names in parts:
        for name in names:
            if getattr(obj, name, None) is not None:
                setattr(obj, name, fn(getattr(obj, name)))
    return state


def _bnb_classes():
    """(Int8Params, Params4bit, Linear4bit), or empty tuples (isinstance is then False) without bitsandbytes."""
    try:
        from bitsandbytes.nn import Int8Params, Linear4bit, Params4bit
    except ImportError:  # bitsandbytes is optional for this module
        return (), (), ()
    return Int8Params, Params4bit, Linear4bit


def map_weight(p: torch.Tensor, fn) -> nn.Parameter:
    """A frozen parameter whose storage is `fn` of each plain tensor inside `p` (plain, quanto, bitsandbytes 4-bit)."""
    Int8Params, Params4bit, _ = _bnb_classes()
    if isinstance(p, Params4bit):
        return Params4bit(
            fn(p.data), requires_grad=False, quant_state=_map_quant_state(p.quant_state, fn), blocksize=p.blocksize,
            compress_statistics=p.compress_statistics, quant_type=p.quant_type, quant_storage=p.quant_storage,
            module=p.module, bnb_quantized=p.bnb_quantized,
        )
    if isinstance(p, Int8Params):
        raise ValueError("blocks_to_swap does not support bitsandbytes int8 weights; use quantize nf4, qint8 or qfloat8")
    return nn.Parameter(_map_storage(p, fn), requires_grad=False)


def plain_tensors(p: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors holding a weight's bytes (for byte counts and storage tracking)."""
    found = []
    map_weight(p, lambda t: found.append(t) or t)
    return found


def host_copy(p: torch.Tensor, pin: bool) -> nn.Parameter:
    """A host-memory copy of a frozen weight, in a form that can be copied back to any device."""
    def to_host(t):
        return torch.empty_like(t, device="cpu", pin_memory=pin).copy_(t)

    return map_weight(_portable(p) if _is_quanto(p) else p, to_host)


def device_copy(master: torch.Tensor, device: torch.device) -> nn.Parameter:
    """The weight on `device`; asynchronous from pinned memory. quanto picks its kernel layout for the device."""
    if _is_quanto(master):
        return nn.Parameter(master.to(device, non_blocking=True, copy=True), requires_grad=False)
    return map_weight(master, lambda t: t.to(device, non_blocking=True, copy=True))


def _split_quant_state(state) -> tuple[object, list]:
    """A QuantState -> (a copy holding indices instead of tensors, its tensors) for save_for_backward."""
    tensors = []
    return _map_quant_state(state, lambda t: tensors.append(t) or len(tensors) - 1), tensors


def _join_quant_state(skeleton, tensors):
    return _map_quant_state(skeleton, lambda i: tensors[i])


class _Matmul4bit(torch.autograd.Function):
    """`bnb.matmul_4bit` for frozen weights, saving the packed weight through save_for_backward.

    bitsandbytes' own autograd function keeps the weight and its quant state as ctx attributes, which activation
    checkpointing cannot drop: every swapped block's device copy would stay alive from its forward to its backward.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, skeleton, *state_tensors):
        import bitsandbytes as bnb

        ctx.skeleton = skeleton
        ctx.save_for_backward(weight, *state_tensors)
        return bnb.matmul_4bit(x, weight, quant_state=_join_quant_state(skeleton, state_tensors), bias=bias)

    @staticmethod
    def backward(ctx, grad):
        import bitsandbytes.functional as F

        weight, *state_tensors = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            w = F.dequantize_4bit(weight.view(-1, 1), _join_quant_state(ctx.skeleton, state_tensors))
            grad_x = torch.matmul(grad, w.to(grad.dtype))
        return (grad_x, None, None, None, *([None] * len(state_tensors)))


def _linear4bit_forward(self, x: torch.Tensor) -> torch.Tensor:
    """bitsandbytes Linear4bit.forward (training path) on top of _Matmul4bit."""
    inp_dtype = x.dtype
    if self.compute_dtype is not None:
        x = x.to(self.compute_dtype)
    bias = None if self.bias is None else self.bias.to(x.dtype)
    skeleton, tensors = _split_quant_state(self.weight.quant_state)
    return _Matmul4bit.apply(x, self.weight, bias, skeleton, *tensors).to(inp_dtype)


class BlockSwap:
    """Keeps the frozen weights of the given blocks on the host; see the module docstring."""

    def __init__(self, model: nn.Module, device: torch.device):
        self.model = model
        self.device = torch.device(device)
        self.pin = self.device.type == "cuda"
        self.blocks: list[nn.Module] = []
        # per swapped block: (module, parameter name, host master copy, empty device placeholder)
        self.slots: dict[int, list[tuple[nn.Module, str, nn.Parameter, nn.Parameter]]] = {}
        self.host_bytes = 0
        self.onloads = 0  # number of block weight uploads so far (forward + recompute), for tests and logs

    def add(self, block: nn.Module) -> None:
        """Move `block`'s parameters to host memory; the block keeps empty placeholders on the device.

        Call it before LoRA is added: every parameter the block has now is treated as frozen (quanto's freeze()
        leaves its quantized weights with requires_grad=True).
        """
        slots = []
        for module in block.modules():
            for name, p in list(module._parameters.items()):
                if p is None:
                    continue
                master = self._to_host(p)
                slots.append((module, name, master, nn.Parameter(torch.empty(0, dtype=p.dtype, device=self.device), requires_grad=False)))
                module._parameters[name] = slots[-1][3]
                if getattr(module, "quant_state", None) is not None and getattr(master, "quant_state", None) is not None:
                    module.quant_state = master.quant_state  # bitsandbytes keeps a second reference on the module
                self.host_bytes += sum(t.numel() * t.element_size() for t in plain_tensors(master))
        for module in block.modules():
            if isinstance(module, _bnb_classes()[2]):
                module.forward = types.MethodType(_linear4bit_forward, module)
        self.slots[id(block)] = slots
        block.forward = _SwappedForward(self, block, block.forward)
        self.blocks.append(block)

    def _to_host(self, p: torch.Tensor) -> nn.Parameter:
        if self.pin:
            try:  # pinned pages make the copies to the GPU asynchronous and about twice as fast
                return host_copy(p, pin=True)
            except RuntimeError as e:
                self.pin = False
                logger.warning("blocks_to_swap: cannot pin more host memory (%s); using pageable memory (slower copies)", str(e).splitlines()[0])
        return host_copy(p, pin=False)

    def _to_device(self, master: torch.Tensor) -> nn.Parameter:
        return device_copy(master, self.device)

    @contextlib.contextmanager
    def host_weights(self):
        """Give the swapped blocks their real (host) weights for a while, e.g. while peft wraps their layers.

        peft and quanto read the base weights' type, device and quantization attributes when LoRA is added; an
        empty placeholder would not do. Trainable parameters created meanwhile (LoRA) are moved to the device.
        """
        for block in self.blocks:
            for module, name, master, _ in self.slots[id(block)]:
                module._parameters[name] = master
        try:
            yield
        finally:
            for block in self.blocks:
                self.offload(block)
                slots = {id(placeholder) for *_, placeholder in self.slots[id(block)]}
                for p in block.parameters():
                    if id(p) not in slots and p.device != self.device:
                        p.data = p.data.to(self.device)

    def onload(self, block: nn.Module) -> None:
        for module, name, master, _ in self.slots[id(block)]:
            module._parameters[name] = self._to_device(master)
        self.onloads += 1

    def offload(self, block: nn.Module) -> None:
        for module, name, _, placeholder in self.slots[id(block)]:
            module._parameters[name] = placeholder


class _SwappedForward:
    """Replaces a swapped block's forward: weights in, compute, weights out (checkpointed when training)."""

    def __init__(self, swap: BlockSwap, block: nn.Module, forward):
        self.swap, self.block, self.forward = swap, block, forward

    def run(self, *args, **kwargs):
        self.swap.onload(self.block)
        try:
            return self.forward(*args, **kwargs)
        finally:  # also when checkpointing stops a recompute early by raising
            self.swap.offload(self.block)

    def __call__(self, *args, **kwargs):
        if torch.is_grad_enabled() and not getattr(self.swap.model, "gradient_checkpointing", False):
            return checkpoint(self.run, *args, use_reentrant=False, **kwargs)
        return self.run(*args, **kwargs)
