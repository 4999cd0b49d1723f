import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from trainer import flow_matching as fm

QWEN_SCHEDULER = dict(
    base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9, shift=1.0,
    use_dynamic_shifting=True, time_shift_type="exponential",
)


def test_noise_endpoints_and_target_sign():
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    assert torch.allclose(fm.add_noise(x0, noise, torch.zeros(3)), x0)
    assert torch.allclose(fm.add_noise(x0, noise, torch.ones(3)), noise)
    # The velocity is d x_t / d sigma: moving sigma by h moves x_t by h * target.
    s, h = torch.full((3,), 0.3), 1e-2
    dx = (fm.add_noise(x0, noise, s + h) - fm.add_noise(x0, noise, s)) / h
    assert torch.allclose(dx, fm.velocity_target(x0, noise), atol=1e-4)


@pytest.mark.parametrize("scheme", ["uniform", "logit_normal", "shift"])
def test_sigma_range(scheme):
    g = torch.Generator().manual_seed(0)
    s = fm.sample_sigmas(4096, scheme, QWEN_SCHEDULER, 4096, g)
    assert s.dtype == torch.float32 and s.shape == (4096,)
    assert 0 < s.min() and s.max() < 1


def test_shift_pushes_sigmas_up_at_high_resolution():
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    low = fm.sample_sigmas(8192, "shift", QWEN_SCHEDULER, 256, g1).mean()
    high = fm.sample_sigmas(8192, "shift", QWEN_SCHEDULER, 8192, g2).mean()
    assert high > low + 0.05


@pytest.mark.parametrize("seq_len", [256, 1024, 4096])
def test_dynamic_shift_matches_scheduler(seq_len):
    sched = FlowMatchEulerDiscreteScheduler(**QWEN_SCHEDULER)
    base = np.linspace(1.0, 1 / 30, 30)
    mu = fm.calculate_shift(seq_len, 256, 8192, 0.5, 0.9)
    sched.set_timesteps(sigmas=base, mu=mu)
    ours = fm.shift_sigmas(torch.tensor(base), QWEN_SCHEDULER, seq_len)
    assert torch.allclose(ours.float(), sched.sigmas[:-1].float(), atol=1e-5)


def test_static_shift_matches_scheduler():
    cfg = dict(shift=3.0, use_dynamic_shifting=False)
    sched = FlowMatchEulerDiscreteScheduler(**cfg)
    unshifted = np.linspace(1.0, 1 / 20, 20)
    sched.set_timesteps(sigmas=unshifted)
    unshifted = torch.tensor(unshifted)
    assert torch.allclose(fm.shift_sigmas(unshifted, cfg, 0).float(), sched.sigmas[:-1].float(), atol=1e-5)


def test_loss_weighting():
    pred, target = torch.ones(2, 1, 2, 2), torch.zeros(2, 1, 2, 2)
    assert fm.flow_matching_loss(pred, target, torch.tensor([0.5, 0.5])) == pytest.approx(1.0)
    w = fm.flow_matching_loss(pred, target, torch.tensor([0.5, 0.5]), "sigma_sqrt")
    assert w == pytest.approx(4.0)
