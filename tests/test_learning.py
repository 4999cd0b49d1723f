"""Every family learns, seen through its own pipeline (trainer/learning.py): after training on a few measurable
pictures, the diffusers pipeline's own __call__ with the saved LoRA (or the exported transformer) renders its training
targets (for the caption / references it was trained with), by a margin over the base; and the same test with the
training target's sign flipped fails, so the check can always fail."""

import pytest

from bench.learning import EXTRA_RUNS, runs
from trainer import learning
from trainer.models import variants
from trainer.models.base import LearningCase

LEARNING = {name: v.learning for name, (_cls, v) in variants().items()}
IN_SUITE = [name for name, case in LEARNING.items() if case is not None and case.in_suite]
EXTRA = {name: run for name, run in runs().items() if name in EXTRA_RUNS and run[1].in_suite}  # full fine-tuning, a quantized base


def run_case(tiny_models, tmp_path, variant: str, case: LearningCase, method: str | None = None, quantize: str = "none",
             wrong_sign: bool = False):
    return learning.run(tiny_models(variant), tmp_path, case, method or case.method, quantize, wrong_sign)[0]


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
def test_wrong_target_sign_does_not_learn(variant, tiny_models, tmp_path):
    report = run_case(tiny_models, tmp_path, variant, LEARNING[variant], wrong_sign=True)
    assert report.failures(), f"{variant}: the learning check passed a model trained with the wrong target sign: {report.summary()}"


@pytest.mark.parametrize("run", list(EXTRA))
@pytest.mark.parametrize("sign", ["right", "wrong"])
def test_full_fine_tuning_and_quantized_base_learn(run, sign, tiny_models, tmp_path):
    variant, case, method, quantize = EXTRA[run]
    report = run_case(tiny_models, tmp_path, variant, case, method, quantize, wrong_sign=sign == "wrong")
    assert bool(report.failures()) == (sign == "wrong"), f"{run}, {sign} sign: {report.summary()}: {report.failures()}"
