"""Optimizers for the trained parameters: adamw (torch), adamw8bit (bitsandbytes), adafactor (transformers), prodigy;
and AdamW with stochastic rounding for bf16 weights (full training with `full_weights: bf16`)."""

from __future__ import annotations

import hashlib
import math

import torch

from trainer.config import TrainConfig


def make_optimizer(cfg: TrainConfig, params: list) -> torch.optim.Optimizer:
    """`params`: the trained parameters, or torch's parameter groups ({"params": [...], "lr": ...}; e.g. LoRA+)."""
    betas = (cfg.adam_beta1, cfg.adam_beta2)
    flat = [p for g in params for p in g["params"]] if params and isinstance(params[0], dict) else params
    if cfg.optimizer == "adamw" and flat and all(p.dtype == torch.bfloat16 for p in flat):
        return StochasticAdamW(params, lr=cfg.learning_rate, betas=betas, weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon,
                               seed=cfg.seed)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.learning_rate, betas=betas, weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)
    if cfg.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=cfg.learning_rate, betas=betas, weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)
    if cfg.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        # Fixed learning rate (the schedule comes from lr_scheduler), no parameter-scale heuristics.
        return Adafactor(params, lr=cfg.learning_rate, relative_step=False, scale_parameter=False, warmup_init=False,
                         weight_decay=cfg.adam_weight_decay)
    if cfg.optimizer == "prodigy":
        from prodigyopt import Prodigy

        # Prodigy estimates the step size itself; learning_rate is a multiplier (1.0 is the usual choice).
        return Prodigy(params, lr=cfg.learning_rate, betas=betas, weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)
    raise ValueError(cfg.optimizer)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    total = 0
    for state in optimizer.state.values():
        for v in state.values():
            if isinstance(v, torch.Tensor):
                total += v.numel() * v.element_size()
    return total


def copy_stochastic_(target: torch.Tensor, source: torch.Tensor, generator: torch.Generator) -> None:
    """Write fp32 `source` into bf16 `target` rounding at random, up with probability equal to the discarded
    fraction: the expected result is exact, so updates far below bf16's spacing still move the weight on average."""
    noise = torch.randint(0, 1 << 16, source.shape, generator=generator, device=source.device, dtype=torch.int32)
    bits = noise.add_(source.view(torch.int32)).bitwise_and_(-65536)  # carry into bf16's bits, drop the low 16
    target.copy_(bits.view(torch.float32))


class StochasticAdamW(torch.optim.Optimizer):
    """AdamW over bf16 weights: moments in fp32, each update computed in fp32 and written back with stochastic
    rounding. The rounding noise comes from a generator seeded by (seed, step), so every process rounds alike (the
    weights stay identical across ranks) and a resumed run rounds as the uninterrupted one did."""

    def __init__(self, params, lr: float, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0, seed: int = 0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.seed = seed

    def load_state_dict(self, state_dict: dict) -> None:
        # torch casts loaded state to each parameter's dtype (bf16 here); the moments are fp32 on purpose
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        for index, saved in state_dict["state"].items():
            for key in ("exp_avg", "exp_avg_sq"):
                self.state[params[index]][key] = saved[key].to(params[index].device, torch.float32)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        generators: dict[torch.device, torch.Generator] = {}
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                weight_bf16, grad = _local(p), _local(p.grad).float()  # FSDP2: this process's shard
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(weight_bf16, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(weight_bf16, dtype=torch.float32)
                state["step"] += 1
                step = int(state["step"])
                state["exp_avg"].lerp_(grad, 1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denom = (state["exp_avg_sq"].sqrt() / math.sqrt(1 - beta2**step)).add_(group["eps"])
                weight = weight_bf16.float().mul_(1 - group["lr"] * group["weight_decay"])
                weight.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / (1 - beta1**step))
                if p.device not in generators:
                    digest = hashlib.sha256(f"{self.seed}-rounding-{step}".encode()).digest()
                    generators[p.device] = torch.Generator(device=p.device).manual_seed(int.from_bytes(digest[:8], "little") >> 1)
                copy_stochastic_(weight_bf16, weight, generators[p.device])
        return loss


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t
