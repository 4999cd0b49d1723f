"""Training conditions the model exactly as inference does (../shared/CONVENTIONS.md, "A family is done when", 2).

The diffusers pipeline's own __call__ vs the trainer's encode + predict, at the released sequence lengths
(bench/equivalence.py holds the machinery and prints the table in README)."""

import pytest
import torch

from bench.equivalence import (
    CASES,
    PROMPT,
    batch_independence,
    compare,
    expand_timesteps_copy,
    schnell_copy,
    trainer_batch,
    write_inputs,
    zero_cond_copy,
)
from trainer.config import load_config
from trainer.models import resolve
from utils.make_tiny_models import make_tiny_model

BOUND = 1e-4


@pytest.fixture(scope="session")
def realistic(tmp_path_factory):
    """variant -> tiny pipeline with the released processor budgets and templates, built once per session."""
    root = tmp_path_factory.mktemp("realistic")

    def get(variant: str, guidance: bool = True, zero_cond_t: bool = False, expand_timesteps: bool = False):
        model = make_tiny_model(variant, root / variant, realistic=True)
        if zero_cond_t:
            return zero_cond_copy(model, root / f"{variant}-2511")
        if expand_timesteps:
            return expand_timesteps_copy(model, root / f"{variant}-expand")
        return model if guidance else schnell_copy(model, root / f"{variant}-schnell")

    return get


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_trainer_feeds_the_transformer_what_the_pipeline_feeds_it(case, realistic, tmp_path):
    result = compare(case, realistic(case.variant, case.guidance, case.zero_cond_t, case.expand_timesteps), tmp_path)
    inputs = {k: v for k, v in result.items() if k not in ("text_tokens", "image_tokens")}
    assert all(v < BOUND for v in inputs.values()), inputs
    # the sequence lengths are the released ones: a 1 MP reference is ~1,300 vision tokens for Qwen2.5-VL
    # (Edit) and ~4,000 latent tokens for the transformer; 2509's 384x384 views ~200 vision tokens each
    n_target = 32 * 24
    if case.variant == "qwen-image-edit":
        assert result["text_tokens"] > 1300 and result["image_tokens"] > n_target + 4000
    if case.variant == "qwen-image-edit-plus":
        assert result["text_tokens"] > 180 * case.references and result["image_tokens"] > n_target + 4000 * case.references
    if case.variant == "flux":
        assert result["text_tokens"] == 512
    if case.variant == "qwen-image-in-context":  # the control image's tokens, at the output's size, ride after the target's
        assert result["image_tokens"] == 2 * n_target
    if case.variant == "qwen-image-2.1":  # references at 1024^2 area: ~4,000 latent tokens each, 4 per Qwen3-VL slot
        assert result["image_tokens"] >= n_target + 4000 * case.references


@pytest.mark.parametrize("variant, references", [("qwen-image", 0), ("qwen-image-edit-plus", 2), ("flux", 0), ("flux-kontext", 1),
                                                  ("z-image", 0), ("chroma", 0), ("kandinsky5", 0), ("flux2-klein", 1),
                                                  ("qwen-image-2.1", 0), ("qwen-image-2.1", 1), ("ernie-image", 0), ("krea2", 0),
                                                  ("ideogram4", 0), ("hidream-i1", 0), ("z-image-omni", 1), ("wan", 0)])
def test_sample_zero_does_not_see_sample_one(variant, references, realistic, tmp_path):
    """Batch of 2: sample 0's prediction is the same whether sample 1's caption is short or 12x longer."""
    assert batch_independence(realistic(variant), tmp_path, references) < 1e-5


@pytest.mark.parametrize("variant", ["qwen-image-edit", "qwen-image-edit-plus"])
def test_edit_prediction_depends_on_the_caption(variant, realistic, tmp_path):
    """With 1,300+ vision tokens before the caption, a cut at 512 tokens made every caption identical."""
    model = realistic(variant)
    cls, v = resolve(str(model))
    adapter = cls(load_config(None, [f"pretrained_model_name_or_path={model}", "mixed_precision=no"], check_paths=False), v)
    adapter.load()
    target, refs = write_inputs(tmp_path, 1)
    g = torch.Generator().manual_seed(0)
    noisy = torch.randn(1, 4, 48, 64, generator=g)
    preds = {}
    for caption in (PROMPT, "turn the boat into a swan"):
        with torch.no_grad():
            _, cond = adapter.encode_batch(trainer_batch(adapter, target, refs, [caption], tmp_path))
            preds[caption] = (cond["prompt_embeds"].shape[1], adapter.predict(adapter.transformer, noisy, torch.tensor([0.5]), cond))
    (len_a, a), (len_b, b) = preds.values()
    assert max(len_a, len_b) > 512 or variant.endswith("plus")
    assert (a - b).abs().max() > 1e-4
