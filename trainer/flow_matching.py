"""Rectified-flow objective as small pure functions.

    x_t = (1 - sigma) * x0 + sigma * noise        sigma in [0, 1], sigma = 1 is pure noise
    v   = noise - x0                               the velocity the transformer predicts
    loss = w(sigma) * || v_pred - v ||^2

Sigma sampling follows the scheduler the model ships with, so training spends its steps where inference does.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3


def calculate_shift(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """mu for resolution-dependent shifting: linear in the number of image tokens (as in the pipelines)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + base_shift - m * base_seq_len


def shift_sigmas(sigmas: torch.Tensor, scheduler_config: Mapping[str, Any], image_seq_len: int, mu: float | None = None) -> torch.Tensor:
    """Apply the scheduler's own timestep shift to sigmas in [0, 1].

    Dynamic shifting (Qwen-Image, FLUX.1-dev): mu from the token count, exponential or linear time shift.
    Static shifting (e.g. shift=3.0 schedulers): s*t / (1 + (s-1)*t). shift=1 leaves sigmas unchanged.
    """
    cfg = dict(scheduler_config)
    if mu is not None:  # the pipeline's own mu (FLUX.2's empirical one), exponential time shift
        return math.exp(mu) / (math.exp(mu) + (1.0 / sigmas - 1.0))
    if cfg.get("use_dynamic_shifting", False):
        mu = calculate_shift(
            image_seq_len,
            cfg.get("base_image_seq_len", 256),
            cfg.get("max_image_seq_len", 4096),
            cfg.get("base_shift", 0.5),
            cfg.get("max_shift", 1.15),
        )
        if cfg.get("time_shift_type", "exponential") == "linear":
            return mu / (mu + (1.0 / sigmas - 1.0))
        return math.exp(mu) / (math.exp(mu) + (1.0 / sigmas - 1.0))
    s = float(cfg.get("shift", 1.0))
    return s * sigmas / (1.0 + (s - 1.0) * sigmas)


def sample_sigmas(
    batch_size: int,
    scheme: str,
    scheduler_config: Mapping[str, Any],
    image_seq_len: int,
    generator: torch.Generator,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mu: float | None = None,
    path: torch.Tensor | None = None,
) -> torch.Tensor:
    """Draw one sigma per sample, float32 on the generator's device.

    uniform      : U(0, 1)
    logit_normal : sigmoid(N(logit_mean, logit_std))  (SD3)
    shift        : logit-normal u, then the scheduler's shift for this resolution (what inference uses)
    schedule     : uniform along `path`, the sigmas the pipeline steps through (linear between its steps)
    """
    device = generator.device
    if scheme == "schedule":
        path = path.to(device)
        pos = torch.rand(batch_size, generator=generator, device=device) * (len(path) - 1)
        i = pos.floor().long().clamp(max=len(path) - 2)
        frac = pos - i
        u = path[i] * (1 - frac) + path[i + 1] * frac
    elif scheme == "uniform":
        u = torch.rand(batch_size, generator=generator, device=device)
    else:
        u = compute_density_for_timestep_sampling(
            "logit_normal", batch_size, logit_mean=logit_mean, logit_std=logit_std, device=device, generator=generator
        )
    if scheme == "shift":
        u = shift_sigmas(u, scheduler_config, image_seq_len, mu)
    # Keep sigma strictly inside (0, 1): the endpoints carry no learning signal and 1/sigma appears in shifts.
    return u.float().clamp(1e-5, 1.0 - 1e-5)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    s = sigmas.view(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
    return (1.0 - s) * x0 + s * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return noise - x0


def flow_matching_loss(
    pred: torch.Tensor, target: torch.Tensor, sigmas: torch.Tensor, weighting: str = "none",
    mask: torch.Tensor | None = None, sample_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-sample weighted MSE, averaged over the batch (computed in fp32).

    mask: per-pixel loss weights broadcastable to `pred` (B x 1 x [F x] H x W at the latents' size): each sample's
    error is their weighted mean. sample_weights: each sample's multiplier (B) in the batch average."""
    err = (pred.float() - target.float()).pow(2)
    if mask is None:
        per_sample = err.flatten(1).mean(1)
    else:
        m = mask.float().expand_as(err)
        per_sample = (err * m).flatten(1).sum(1) / m.flatten(1).sum(1).clamp_min(1e-8)
    if weighting != "none":
        per_sample = per_sample * compute_loss_weighting_for_sd3(weighting, sigmas.float()).view(-1)
    if sample_weights is not None:
        per_sample = per_sample * sample_weights.to(per_sample)
    return per_sample.mean()


def latent_mask(mask: torch.Tensor, latents: torch.Tensor, floor: float = 0.0) -> torch.Tensor:
    """A pixel mask (B x 1 x H x W in [0, 1]) at the latents' spatial size (area average: each latent pixel weighs
    what its patch of pixels does), raised to at least `floor`, shaped to broadcast over `latents`."""
    small = torch.nn.functional.interpolate(mask.float(), size=tuple(latents.shape[-2:]), mode="area")
    small = floor + (1.0 - floor) * small
    return small.view(small.shape[0], 1, *([1] * (latents.ndim - 4)), *small.shape[-2:]).to(latents.device)
