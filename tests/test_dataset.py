import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import PY, ROOT, write_dataset
from PIL import Image

from image_datasets import (
    CaptionDataset,
    SizeGroupedBatchSampler,
    collate,
    load_image,
    resize_and_crop,
    scan_caption_folder,
    target_size,
)


def _img(path: Path, size=(40, 20), mode="RGB", color=(200, 10, 10), **save):
    Image.new(mode, size, color if mode == "RGB" else 128).save(path, **save)


def test_pairs_every_extension_in_any_case(tmp_path):
    for name in ("a.JPG", "b.jpeg", "c.Png", "d.webp", "e.png"):
        _img(tmp_path / name)
        (tmp_path / Path(name).with_suffix(".txt")).write_text(f"caption {name}\n  with  spaces ")
    (tmp_path / "notes.md").write_text("ignored")
    scan = scan_caption_folder(tmp_path, 32)
    assert not scan.problems
    assert sorted(s.image.name for s in scan.samples) == ["a.JPG", "b.jpeg", "c.Png", "d.webp", "e.png"]
    assert scan.samples[0].caption == "caption a.JPG with spaces"


def test_missing_caption_and_corrupt_image_are_problems_naming_the_file(tmp_path):
    _img(tmp_path / "ok.png")
    (tmp_path / "ok.txt").write_text("fine")
    _img(tmp_path / "nocap.png")
    (tmp_path / "fake.jpg").write_text("this is not a jpeg")
    (tmp_path / "fake.txt").write_text("x")
    scan = scan_caption_folder(tmp_path, 32)
    assert [s.image.name for s in scan.samples] == ["ok.png"]
    assert len(scan.problems) == 2
    assert any("nocap.png" in p and "no caption" in p for p in scan.problems)
    assert any("fake.jpg" in p and "not a readable image" in p for p in scan.problems)


def test_exif_orientation_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 20, 20))  # left half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    img.save(tmp_path / "r.jpg", exif=exif.tobytes(), quality=95)
    out = load_image(tmp_path / "r.jpg")
    assert out.size == (20, 40)
    top = np.asarray(out)[2, 10]
    assert top[2] > 150 and top[0] < 100, "the blue half should be on top after a 90-degree clockwise turn"
    (tmp_path / "r.txt").write_text("x")
    assert scan_caption_folder(tmp_path, 64).samples[0].size[1] > scan_caption_folder(tmp_path, 64).samples[0].size[0]


@pytest.mark.parametrize("w,h,size", [(1024, 1024, 512), (1920, 1080, 512), (300, 1200, 256), (16, 16, 512), (999, 333, 1024)])
def test_target_size_multiple_of_16_keeps_aspect_and_area(w, h, size):
    tw, th = target_size(w, h, size)
    assert tw % 16 == 0 and th % 16 == 0
    assert tw * th <= size * size
    if min(tw, th) > 64:
        assert abs(tw / th - w / h) / (w / h) < 0.08
        assert tw * th > 0.85 * size * size


def test_resize_and_crop_gives_exact_size():
    img = Image.new("RGB", (333, 777))
    assert resize_and_crop(img, (96, 224)).size == (96, 224)
    import random

    assert resize_and_crop(img, (96, 224), random.Random(0)).size == (96, 224)


def test_color_modes_become_rgb(tmp_path):
    Image.new("L", (20, 20), 100).save(tmp_path / "grey.png")
    Image.new("RGBA", (20, 20), (255, 0, 0, 0)).save(tmp_path / "transparent.png")
    Image.new("CMYK", (20, 20), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    arr16 = (np.arange(400).reshape(20, 20) * 160).astype(np.uint16)
    Image.fromarray(arr16).save(tmp_path / "deep.png")
    pal = Image.new("P", (20, 20), 0)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.info["transparency"] = 0
    pal.save(tmp_path / "pal.png", transparency=0)
    for name in ("grey.png", "transparent.png", "cmyk.jpg", "deep.png", "pal.png"):
        img = load_image(tmp_path / name)
        assert img.mode == "RGB" and img.size == (20, 20), name
    assert np.asarray(load_image(tmp_path / "transparent.png")).min() > 240  # composited on white, not black
    deep = np.asarray(load_image(tmp_path / "deep.png"))
    assert deep.max() > 200 and deep.min() < 10  # the 16-bit range is rescaled, not clipped


def test_dataset_item_and_caption_dropout_is_deterministic(tmp_path):
    data = write_dataset(tmp_path / "d", n=8)
    samples = scan_caption_folder(data, 32).samples
    ds = CaptionDataset(samples, caption_dropout_rate=0.5, seed=3)
    item = ds[(0, 0)]
    assert item["pixel_values"].shape == (3, 32, 32)
    assert -1.0 <= item["pixel_values"].min() and item["pixel_values"].max() <= 1.0
    drops = [ds[(i, e)]["caption"] == "" for e in range(4) for i in range(8)]
    assert 6 < sum(drops) < 26
    assert drops == [ds[(i, e)]["caption"] == "" for e in range(4) for i in range(8)]


def test_sampler_real_epochs_same_size_batches_and_seeded():
    sizes = [(64, 64)] * 5 + [(96, 48)] * 3
    s = SizeGroupedBatchSampler(sizes, batch_size=2, seed=0)
    for epoch in range(3):
        s.set_epoch(epoch)
        batches = list(s)
        flat = sorted(i for b in batches for i, e in b)
        assert flat == list(range(8)), "each file exactly once per epoch"
        assert all(len({sizes[i] for i, _ in b}) == 1 for b in batches)
        assert len(batches) == len(s) == 5
    s.set_epoch(0)
    e0 = list(s)
    s.set_epoch(1)
    assert e0 != list(s), "epochs are reshuffled"
    s2 = SizeGroupedBatchSampler(sizes, batch_size=2, seed=0)
    s2.set_epoch(0, start_batch=2)
    assert list(s2) == e0[2:], "resuming inside an epoch continues the same order"


def test_collate_batches_same_size(tmp_path):
    data = write_dataset(tmp_path / "d", n=2)
    ds = CaptionDataset(scan_caption_folder(data, 32).samples)
    batch = collate([ds[(0, 0)], ds[(1, 0)]])
    assert batch["pixel_values"].shape == (2, 3, 32, 32) and len(batch["captions"]) == 2
    assert isinstance(batch["pixel_values"], torch.Tensor)


def test_validate_dataset_exit_codes(tmp_path):
    good = write_dataset(tmp_path / "good", n=2)
    r = subprocess.run([PY, "utils/validate_dataset.py", "--path", str(good)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    bad = write_dataset(tmp_path / "bad", n=2)
    (bad / "img0.txt").unlink()
    (bad / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    (bad / "broken.txt").write_text("x")
    r = subprocess.run([PY, "utils/validate_dataset.py", "--path", str(bad)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 1
    errors = [line for line in r.stdout.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and any("img0.png" in e for e in errors) and any("broken.png" in e for e in errors)
    empty = tmp_path / "empty"
    empty.mkdir()
    r = subprocess.run([PY, "utils/validate_dataset.py", "--path", str(empty)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 1 and "no images found" in r.stdout
