"""Several ordered reference images per sample, optional ones, one design for every edit family."""

import json
import subprocess

import numpy as np
import pytest
import torch
from helpers import PY, ROOT, base_overrides, read_losses, write_dataset
from PIL import Image

from image_datasets import CaptionDataset, collate
from trainer.config import ConfigError, load_config
from trainer.data import scan_for_training
from trainer.loop import train
from trainer.models.flux2 import Flux2Adapter
from trainer.models.qwen_image import QwenImageEditAdapter

ADAPTERS = {"qwen-image-edit-plus": QwenImageEditAdapter, "flux2-klein": Flux2Adapter}


def mixed_dataset(root):
    """8 targets; samples 0-3 have reference 1 only, samples 4-7 have references 1, 2 and 3 (other sizes)."""
    targets = write_dataset(root / "targets", n=8, size=(64, 48))
    folders = []
    for k, size in enumerate([(64, 80), (64, 64), (96, 64)]):  # FLUX.2 refuses references with a side under 64
        folder = root / f"ref{k + 1}"
        folder.mkdir()
        rng = np.random.default_rng(10 + k)
        for i in range(8):
            if k == 0 or i >= 4:
                Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype("uint8")).save(folder / f"img{i}.png")
        folders.append(str(folder))
    return targets, folders


@pytest.mark.parametrize("variant", list(ADAPTERS))
def test_mixed_reference_counts_train_at_batch_2_with_bucketing(variant, tiny_models, tmp_path):
    targets, folders = mixed_dataset(tmp_path)
    out = tmp_path / "out"
    ov = base_overrides(tiny_models(variant), targets, out, max_train_steps=4, **{
        "data_config.train_batch_size": 2, "data_config.bucketing": True, "data_config.control_dir": json.dumps(folders)})
    cfg = load_config(None, ov)
    counts = sorted(len(s.controls) for s in scan_for_training(cfg, ADAPTERS[variant].from_model(cfg)).samples)
    assert counts == [1] * 4 + [3] * 4
    train(cfg, ADAPTERS[variant])
    assert len(read_losses(out)) == 4
    r = subprocess.run([PY, "utils/validate_dataset.py", "--path", str(targets), "--control_dir", *folders[:1]], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0 and "control images per sample: 1 (8)" in r.stdout, r.stdout


@pytest.mark.parametrize("variant", list(ADAPTERS))
def test_every_reference_changes_the_prediction(variant, tiny_models, tmp_path):
    targets, folders = mixed_dataset(tmp_path)
    cfg = load_config(None, base_overrides(tiny_models(variant), targets, tmp_path / "o",
                                           **{"data_config.control_dir": json.dumps(folders)}))
    adapter = ADAPTERS[variant].from_model(cfg)
    adapter.load()
    samples = [s for s in scan_for_training(cfg, adapter).samples if len(s.controls) == 3]
    ds = CaptionDataset(samples, reference_transform=adapter.reference_transform())
    batch = collate([ds[(0, 0)]])
    noisy = torch.randn(adapter.encode_latents(batch)[0].shape, generator=torch.Generator().manual_seed(0))

    def predict(b):
        with torch.no_grad():
            _, cond = adapter.encode_batch(b)
            return adapter.predict(adapter.transformer, noisy, torch.tensor([0.6]), cond)

    base = predict(batch)
    for k in range(3):
        other = dict(batch, controls=[c.clone() for c in batch["controls"]],
                     condition_images=[[v.clone() for v in views] for views in batch["condition_images"]])
        other["controls"][k] = torch.rand_like(other["controls"][k]) * 2 - 1
        if other["condition_images"][0]:
            other["condition_images"][0][k] = torch.rand_like(other["condition_images"][0][k]) * 2 - 1
        assert (predict(other) - base).abs().max() > 1e-5, f"reference {k + 1} is ignored"


def test_reference_folders_must_be_filled_in_order(tiny_models, tmp_path):
    targets, folders = mixed_dataset(tmp_path)
    (tmp_path / "ref2" / "img4.png").unlink()  # sample 4 keeps references 1 and 3 but lost 2
    cfg = load_config(None, base_overrides(tiny_models("qwen-image-edit-plus"), targets, tmp_path / "o",
                                           **{"data_config.control_dir": json.dumps(folders)}))
    with pytest.raises(ConfigError, match=r"img4.png: reference 3 .* is there but reference 2 .* is not"):
        train(cfg, QwenImageEditAdapter)


@pytest.mark.parametrize("variant", list(ADAPTERS))
def test_edit_previews_render_with_their_references(variant, tiny_models, tmp_path):
    targets, folders = mixed_dataset(tmp_path)
    refs = [f"{folders[0]}/img4.png", f"{folders[1]}/img4.png"]
    out = tmp_path / "out"
    prompts = json.dumps([{"prompt": "make it red", "images": refs}, {"prompt": "make it blue", "images": refs[:1]}])
    train(load_config(None, base_overrides(tiny_models(variant), targets, out, max_train_steps=1, validation_prompts=prompts,
                                           validation_num_inference_steps=2, validation_guidance_scale=1.0,
                                           **{"data_config.control_dir": json.dumps(folders[:1]), "data_config.img_size": 32})),
          ADAPTERS[variant])
    assert (out / "samples" / "step-1.png").is_file()
    with pytest.raises(ConfigError, match=r"validation_prompts\[0\].images': file 'nope.png' does not exist"):
        load_config(None, base_overrides(tiny_models(variant), targets, out, validation_prompts=json.dumps([{"prompt": "x", "images": ["nope.png"]}])))


def test_inference_takes_several_references(tiny_models, tmp_path):
    targets, folders = mixed_dataset(tmp_path)
    out = tmp_path / "k.png"
    r = subprocess.run([PY, "inference.py", "--model_name", str(tiny_models("flux2-klein")), "--prompt", "put them together",
                        "--image", f"{folders[0]}/img4.png", "--image", f"{folders[2]}/img4.png", "--width", "64", "--height", "48",
                        "--num_inference_steps", "2", "--true_cfg_scale", "1", "--output_image", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert Image.open(out).size == (64, 48)


def test_references_the_pipeline_would_refuse_are_named_before_loading(tiny_models, tmp_path):
    """FLUX.2's image processor refuses references under 64 px or beyond 8:1; so does the dataset check."""
    targets = write_dataset(tmp_path / "t", n=2, size=(64, 64))
    refs = write_dataset(tmp_path / "r", n=2, size=(48, 96), seed=3)
    cfg = load_config(None, base_overrides(tiny_models("flux2-klein"), targets, tmp_path / "o", **{"data_config.control_dir": str(refs)}))
    with pytest.raises(ConfigError, match=r"img0.png: reference image is 48x96; a Flux2KleinPipeline model needs both sides >= 64"):
        train(cfg, Flux2Adapter)
