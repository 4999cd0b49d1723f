"""The demo's shipped base model (demo_assets/base-qwen-image, made by utils/make_demo_base.py --train) draws what it
was trained on, through QwenImagePipeline's own __call__: the colour a caption names dominates the picture."""

import numpy as np
import pytest
import torch

from helpers import ROOT
from utils.make_demo_base import DONE, SHIPPED, install
from utils.make_demo_dataset import BASE_COLOURS, BASE_SHAPES, COLOURS


@pytest.fixture(scope="module")
def demo_pipe(tmp_path_factory):
    from trainer.pipelines import adapter_for, load_pipeline

    model = install(tmp_path_factory.mktemp("demo") / "base")
    assert (model / DONE).is_file() and SHIPPED.is_relative_to(ROOT)
    return load_pipeline(adapter_for(str(model)), torch.float32, "cpu")


def shape_colour(image) -> np.ndarray:
    """Mean colour of the pixels that are not (near-)white background, in [0, 1]."""
    px = np.asarray(image, dtype=np.float32).reshape(-1, 3) / 255.0
    shape = px[px.min(1) < 0.8]
    assert len(shape) > 0.05 * len(px), "the picture is (almost) all background"
    return shape.mean(0)


@pytest.mark.parametrize("colour", BASE_COLOURS)
def test_shipped_base_draws_the_colour_its_caption_names(colour, demo_pipe):
    prompt = f"a {colour} {BASE_SHAPES[0]} on a white background"
    image = demo_pipe(prompt=prompt, width=64, height=64, num_inference_steps=10, true_cfg_scale=1.0,
                      generator=torch.Generator().manual_seed(0)).images[0]
    got = shape_colour(image)
    want = np.array(COLOURS[colour]) / 255.0
    others = [np.array(COLOURS[c]) / 255.0 for c in BASE_COLOURS if c != colour]
    assert np.abs(got - want).sum() < min(np.abs(got - o).sum() for o in others), (prompt, got)
