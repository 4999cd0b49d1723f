"""Masked loss: masks from a folder, a metadata column or the alpha channel, cropped with their image, at the latents'
size in the loss; a masked-out pixel gets no gradient."""

import subprocess

import numpy as np
import pytest
import torch
from helpers import PY, ROOT, base_overrides, read_losses, write_dataset
from PIL import Image

import trainer.flow_matching as fm
from image_datasets import CaptionDataset, scan_dataset
from trainer.config import ConfigError, DataConfig, load_config
from trainer.loop import train
from trainer.models import resolve


def half_masks(folder, data, n=2, size=(64, 64)):
    """Masks that keep the left half of each image (at twice the image's size: masks only need its aspect)."""
    folder.mkdir(parents=True, exist_ok=True)
    arr = np.zeros((size[1] * 2, size[0] * 2), dtype=np.uint8)
    arr[:, : size[0]] = 255
    for i in range(n):
        Image.fromarray(arr).save(folder / f"img{i}.png")
    return folder


def test_masked_pixels_get_no_gradient():
    pred = torch.randn(2, 4, 8, 8, requires_grad=True)
    mask = torch.zeros(2, 1, 64, 64)
    mask[..., :32] = 1  # left half of the pixels -> left half of the 8x8 latents
    small = fm.latent_mask(mask, pred)
    assert small.shape == (2, 1, 8, 8) and small[..., :4].eq(1).all() and small[..., 4:].eq(0).all()
    fm.flow_matching_loss(pred, torch.zeros_like(pred), torch.full((2,), 0.5), mask=small).backward()
    assert pred.grad[..., 4:].abs().max() == 0 and pred.grad[..., :4].abs().min() > 0
    floored = fm.latent_mask(mask, pred, floor=0.1)
    assert floored[..., 4:].eq(0.1).all()
    five_d = fm.latent_mask(mask, torch.zeros(2, 4, 1, 8, 8))  # video-shaped latents (Qwen-Image's VAE)
    assert five_d.shape == (2, 1, 1, 8, 8)
    weights = fm.flow_matching_loss(torch.ones(2, 1, 2, 2), torch.zeros(2, 1, 2, 2), torch.full((2,), 0.5), sample_weights=torch.tensor([1.0, 0.0]))
    assert weights.item() == pytest.approx(0.5)


def test_masks_are_found_checked_and_cropped_with_their_image(tmp_path):
    data = write_dataset(tmp_path / "d", n=3, size=(96, 64))
    masks = half_masks(tmp_path / "m", data, n=2, size=(96, 64))
    Image.new("L", (50, 50), 255).save(masks / "img2.png")  # wrong aspect ratio
    scan = scan_dataset(DataConfig(img_dir=str(data), img_size=64, mask_dir=str(masks)))
    assert [s.image.name for s in scan.samples] == ["img0.png", "img1.png"]
    assert len(scan.problems) == 1 and "mask is 50x50 but its image is 96x64" in scan.problems[0]
    assert scan.masks == (2, pytest.approx(0.5, abs=0.01))
    # a random crop of a 96x64 image to 64x64 (well, to the training size): the mask follows the same crop
    dataset = CaptionDataset(scan.samples, random_crop=True, seed=3)
    for epoch in range(4):
        item = dataset[(0, epoch)]
        s = scan.samples[0]
        assert item["mask"].shape == (1, s.size[1], s.size[0])
    (masks / "img2.png").unlink()
    Image.new("L", (96, 64), 0).save(masks / "img2.png")
    scan = scan_dataset(DataConfig(img_dir=str(data), img_size=64, mask_dir=str(masks)))
    assert any("all black" in p for p in scan.problems)
    (masks / "img2.png").unlink()
    scan = scan_dataset(DataConfig(img_dir=str(data), img_size=64, mask_dir=str(masks)))
    assert any("no mask named img2.*" in p for p in scan.problems)


def test_mask_crop_matches_the_image_crop(tmp_path):
    """An image whose alpha is its own brightness: every random crop's mask equals the crop's alpha."""
    folder = tmp_path / "a"
    folder.mkdir()
    rng = np.random.default_rng(0)
    rgba = (rng.random((64, 160, 4)) * 255).astype(np.uint8)
    Image.fromarray(rgba, "RGBA").save(folder / "x.png")
    (folder / "x.txt").write_text("x")
    scan = scan_dataset(DataConfig(img_dir=str(folder), img_size=64, alpha_mask=True))
    dataset = CaptionDataset(scan.samples, random_crop=True, seed=1, keep_alpha=True)
    crops = set()
    for epoch in range(6):
        item = dataset[(0, epoch)]
        alpha = (item["pixel_values"][3] + 1) / 2  # pixels in [-1, 1]
        assert torch.allclose(item["mask"][0], alpha, atol=1 / 255 + 1e-6)
        crops.add(item["mask"].sum().item())
    assert len(crops) > 1, "the crops did not move"


def test_metadata_mask_column_and_one_line_refusals(tmp_path):
    data = write_dataset(tmp_path / "d", n=2)
    half_masks(tmp_path / "m", data)
    (tmp_path / "meta.jsonl").write_text('{"image": "d/img0.png", "prompt": "a", "mask": "m/img0.png"}\n{"image": "d/img1.png", "prompt": "b"}\n')
    scan = scan_dataset(DataConfig(metadata_file=str(tmp_path / "meta.jsonl"), img_size=64))
    assert scan.samples[0].mask.name == "img0.png" and scan.samples[1].mask is None and not scan.problems
    for overrides, message in ((["data_config.mask_floor=1.0"], "config key 'data_config.mask_floor' must be in [0, 1)"),
                               (["data_config.mask_dir=x", "data_config.alpha_mask=true"], "config keys 'data_config.mask_dir' and 'data_config.alpha_mask'")):
        with pytest.raises(ConfigError) as e:
            load_config(None, overrides, check_paths=False)
        assert str(e.value).startswith(message)


def test_masked_training_runs_and_changes_the_loss(tiny_qwen, tmp_path):
    data = write_dataset(tmp_path / "d", n=2)
    masks = half_masks(tmp_path / "m", data)
    cls = resolve(str(tiny_qwen))[0]
    train(load_config(None, base_overrides(tiny_qwen, data, tmp_path / "plain", max_train_steps=2)), cls)
    train(load_config(None, base_overrides(tiny_qwen, data, tmp_path / "masked", max_train_steps=2, **{"data_config.mask_dir": str(masks)})), cls)
    assert read_losses(tmp_path / "masked")[0] != read_losses(tmp_path / "plain")[0]
    result = subprocess.run([PY, str(ROOT / "utils/validate_dataset.py"), "--path", str(data), "--img_size", "64", "--mask_dir", str(masks)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "loss masks: 2 sample(s), 50% of their pixels trained" in result.stdout


def test_masks_from_shards_and_dataset_columns(tmp_path, monkeypatch):
    """A WebDataset `key.mask.png` member and a Hugging Face `mask` image column are the samples' loss masks."""
    import io
    import tarfile

    import datasets

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    data = write_dataset(tmp_path / "d", n=2)
    masks = half_masks(tmp_path / "m", data)
    shards = tmp_path / "shards"
    shards.mkdir()
    with tarfile.open(shards / "s-0.tar", "w") as tf:
        for i in range(2):
            files = {f"k{i}.png": data / f"img{i}.png", f"k{i}.txt": data / f"img{i}.txt"}
            if i == 0:
                files[f"k{i}.mask.png"] = masks / f"img{i}.png"
            for name, path in files.items():
                raw = path.read_bytes()
                info = tarfile.TarInfo(name)
                info.size = len(raw)
                tf.addfile(info, io.BytesIO(raw))
    scan = scan_dataset(DataConfig(webdataset=str(shards / "s-0.tar"), img_size=64))
    assert not scan.problems and scan.masks == (1, pytest.approx(0.5, abs=0.01))
    item = CaptionDataset(scan.samples)[(0, 0)]
    assert item["mask"][0, :, :28].min() > 0.9 and item["mask"][0, :, 36:].max() < 0.1  # (resampling rings at the edge)
    image = {"bytes": (masks / "img0.png").read_bytes(), "path": "m.png"}
    rows = {"image": [{"bytes": (data / f"img{i}.png").read_bytes(), "path": f"{i}.png"} for i in range(2)],
            "prompt": ["a", "b"], "mask": [image, None]}
    features = datasets.Features({"image": datasets.Image(), "prompt": datasets.Value("string"), "mask": datasets.Image()})
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "hf"))
    scan = scan_dataset(DataConfig(hf_dataset=str(tmp_path / "hf"), img_size=64))
    assert not scan.problems and scan.samples[0].mask is not None and scan.samples[1].mask is None
    assert CaptionDataset(scan.samples)[(0, 0)]["mask"][0, :, 36:].max() < 0.1
