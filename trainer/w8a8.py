"""W8A8 frozen Linear layers: 8-bit weights AND 8-bit activations, the matmul itself in 8 bits.

`quantize: int8_w8a8` / `fp8_w8a8`. Each frozen Linear of the transformer blocks keeps its weight in int8 (or fp8
e4m3) with one fp32 scale per output channel. In the forward every token's activations are scaled into 8 bits on the
fly and multiplied in 8 bits (`torch._int_mm` -> int32, or `torch._scaled_mm` with row-wise scales -> fp32), then
rescaled; in the backward the activation gradient goes through the same 8-bit matmul against the same weight (with
the weight's channel scales folded into the incoming gradient first, since they lie along the contraction there).
The weight gets no gradient (it is frozen); a LoRA on top (peft wraps these layers like any nn.Linear) stays in its
own precision. This is what makes the quantized modes faster rather than only smaller: quanto / bitsandbytes modes
dequantize the weight before every bf16 matmul.

On GPUs: int8 tensor cores need every matmul dimension a multiple of 8 (cuBLAS), fp8 row-wise scaling needs sm90
(H100 / H200); layers whose shapes do not fit run a dequantized matmul instead (counted in `fallbacks`).
"""

from __future__ import annotations

import torch
from torch import nn

MODES = {"int8_w8a8": (torch.int8, 127.0), "fp8_w8a8": (torch.float8_e4m3fn, 448.0)}


def quantize_rows(x: torch.Tensor, dtype: torch.dtype, qmax: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row of a 2-D float tensor in 8 bits: (q, scale) with x ~ q * scale, scale one fp32 value per row."""
    x = x.float()
    scale = x.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / qmax
    scaled = x / scale
    q = scaled.round().clamp(-qmax, qmax).to(dtype) if dtype == torch.int8 else scaled.clamp(-qmax, qmax).to(dtype)
    return q, scale


def matmul_8bit(a_q: torch.Tensor, a_scale: torch.Tensor, b_q: torch.Tensor, b_scale: torch.Tensor) -> torch.Tensor:
    """(a_q * a_scale) @ (b_q * b_scale): a_q M x K (row-major), row scales M x 1; b_q K x N, column scales 1 x N;
    the product in 8 bits. fp32 out (bf16 for fp8 on CUDA, the only output row-wise scaled cuBLAS/CUTLASS kernels
    take). CUDA's kernels want the second operand column-major: the forward passes the weight's transposed view, which
    is; the backward's operand is the weight itself, copied transposed (1 byte per weight, freed after the matmul)."""
    if a_q.is_cuda and b_q.stride(0) != 1:
        b_q = b_q.t().contiguous().t()
    if a_q.dtype == torch.int8:
        return torch._int_mm(a_q, b_q).float() * a_scale * b_scale
    out_dtype = torch.bfloat16 if a_q.is_cuda else torch.float32
    return torch._scaled_mm(a_q, b_q, scale_a=a_scale, scale_b=b_scale, out_dtype=out_dtype).float()


def _fits_tensor_cores(m: int, k: int, n: int, device: torch.device) -> bool:
    return device.type != "cuda" or (m > 16 and k % 16 == 0 and n % 16 == 0)


class _W8A8Matmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2d, weight_q, weight_scale, qmax):
        ctx.save_for_backward(weight_q, weight_scale)
        ctx.qmax = qmax
        x_q, x_scale = quantize_rows(x2d, weight_q.dtype, qmax)
        return matmul_8bit(x_q, x_scale, weight_q.t(), weight_scale.view(1, -1))

    @staticmethod
    def backward(ctx, grad_out):
        weight_q, weight_scale = ctx.saved_tensors
        # dx[m, k] = sum_n g[m, n] * s_w[n] * q[n, k]: fold the channel scales into g, quantize its rows, 8-bit matmul
        g_q, g_scale = quantize_rows(grad_out.float() * weight_scale.view(1, -1), weight_q.dtype, ctx.qmax)
        ones = torch.ones(1, weight_q.shape[1], dtype=torch.float32, device=weight_q.device)
        return matmul_8bit(g_q, g_scale, weight_q, ones), None, None, None


class W8A8Linear(nn.Linear):
    """A frozen nn.Linear whose matmuls run in 8 bits (see the module doc). Subclasses nn.Linear so that peft puts a
    LoRA on it as on any Linear; `weight` holds the 8-bit weight, `weight_scale` its per-output-channel scales.

    An fp8 weight is stored as its raw bytes (uint8) and viewed as float8_e4m3fn for the matmul (`weight_8bit`): peft
    casts a new LoRA to the dtype of a floating-point base weight, which would round the LoRA's initial values to fp8
    (and diffusers' load_lora_weights would load a trained LoRA in fp8)."""

    fallbacks = 0  # calls whose shapes could not use the GPU's 8-bit kernels (dequantized matmul instead)

    def __init__(self, linear: nn.Linear, mode: str):
        nn.Module.__init__(self)
        dtype, qmax = MODES[mode]
        self.in_features, self.out_features, self.mode, self.qmax = linear.in_features, linear.out_features, mode, qmax
        q, scale = quantize_rows(linear.weight.detach(), dtype, qmax)
        self.weight = nn.Parameter(q.view(torch.uint8) if q.is_floating_point() else q, requires_grad=False)
        self.weight_scale = nn.Parameter(scale.flatten(), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    @property
    def weight_8bit(self) -> torch.Tensor:
        """The 8-bit weight in its compute dtype (int8, or float8_e4m3fn viewed from its stored bytes)."""
        return self.weight.view(MODES[self.mode][0])

    def dequantized(self) -> torch.Tensor:
        return self.weight_8bit.float() * self.weight_scale.view(-1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, dtype = x.shape, x.dtype
        x2d = x.reshape(-1, shape[-1])
        if _fits_tensor_cores(x2d.shape[0], self.in_features, self.out_features, x.device):
            y = _W8A8Matmul.apply(x2d, self.weight_8bit, self.weight_scale, self.qmax)
        else:
            W8A8Linear.fallbacks += 1
            y = x2d.float() @ self.dequantized().t()
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(dtype).reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}"


def quantize_linears(block: nn.Module, mode: str) -> int:
    """Replace every plain nn.Linear inside `block` with a W8A8Linear; returns how many."""
    return replace_linears(block, lambda linear: W8A8Linear(linear, mode))


def replace_linears(block: nn.Module, convert) -> int:
    """Replace every plain nn.Linear inside `block` with convert(linear); returns how many (quantize.py uses it for the
    bitsandbytes layers too)."""
    count = 0
    for parent in list(block.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, convert(child))
                count += 1
    return count
