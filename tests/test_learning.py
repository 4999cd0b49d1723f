"""Every family learns, seen through its own pipeline (trainer/learning.py): after training on a few measurable
pictures, the diffusers pipeline's own __call__ with the saved LoRA (or the exported transformer) renders its training
targets (for the caption / references it was trained with), by a margin over the base; and the same test with the
training target's sign flipped fails, so the check can always fail."""

import pytest

from trainer import flow_matching as fm
from trainer import learning
from trainer.models import variants
from trainer.models.base import LearningCase

LEARNING = {name: v.learning for name, (_cls, v) in variants().items()}
IN_SUITE = [name for name, case in LEARNING.items() if case is not None and case.in_suite]
# Beside every family's LoRA: full fine-tuning (Qwen-Image and a FLUX-type family) and a quantized base.
FULL = {"qwen-image": LearningCase(steps=300, learning_rate=1e-3), "flux": LearningCase(steps=300, learning_rate=1e-3)}
QUANTIZED = ("qwen-image", "nf4")


def wrong_sign(monkeypatch):
    """The bug a negated-velocity model invites: training toward x0 - noise instead of noise - x0."""
    monkeypatch.setattr(fm, "velocity_target", lambda x0, noise: x0 - noise)


def run_case(tiny_models, tmp_path, variant: str, case: LearningCase, method: str = "lora", quantize: str = "none"):
    model = tiny_models(variant)
    examples, out = learning.train_case(model, tmp_path, case, method, quantize=quantize)
    trained = {"transformer": out} if method == "full" else {"lora": out}
    return learning.measure_learning(model, examples, quantize=quantize, **trained)


def test_every_variant_has_a_learning_case():
    """A family is not done until it learns through its pipeline (../shared/CONVENTIONS.md): a new variant without a
    LearningCase fails here."""
    missing = [name for name, case in LEARNING.items() if case is None]
    assert not missing, f"variants without a learning case (Variant.learning): {missing}"


@pytest.mark.parametrize("variant", IN_SUITE)
def test_learns_through_its_pipeline(variant, tiny_models, tmp_path):
    report = run_case(tiny_models, tmp_path, variant, LEARNING[variant])
    assert not report.failures(), f"{variant}: {report.summary()}: {report.failures()}"


@pytest.mark.parametrize("variant", IN_SUITE)
def test_wrong_target_sign_does_not_learn(variant, tiny_models, tmp_path, monkeypatch):
    wrong_sign(monkeypatch)
    report = run_case(tiny_models, tmp_path, variant, LEARNING[variant])
    assert report.failures(), f"{variant}: the learning check passed a model trained with the wrong target sign: {report.summary()}"


@pytest.mark.parametrize("variant", list(FULL))
@pytest.mark.parametrize("sign", ["right", "wrong"])
def test_full_fine_tuning_learns(variant, sign, tiny_models, tmp_path, monkeypatch):
    if sign == "wrong":
        wrong_sign(monkeypatch)
    report = run_case(tiny_models, tmp_path, variant, FULL[variant], method="full")
    assert bool(report.failures()) == (sign == "wrong"), f"{variant} full, {sign} sign: {report.summary()}: {report.failures()}"


@pytest.mark.parametrize("sign", ["right", "wrong"])
def test_quantized_base_learns(sign, tiny_models, tmp_path, monkeypatch):
    variant, quantize = QUANTIZED
    if sign == "wrong":
        wrong_sign(monkeypatch)
    report = run_case(tiny_models, tmp_path, variant, LEARNING[variant], quantize=quantize)
    assert bool(report.failures()) == (sign == "wrong"), f"{variant} {quantize}, {sign} sign: {report.summary()}: {report.failures()}"
