"""Optimizers for the LoRA parameters: adamw (torch), adamw8bit (bitsandbytes), adafactor (transformers), prodigy."""

from __future__ import annotations

import torch

from trainer.config import TrainConfig


def make_optimizer(cfg: TrainConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    betas = (cfg.adam_beta1, cfg.adam_beta2)
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
