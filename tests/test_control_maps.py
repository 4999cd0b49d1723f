"""utils/make_control_maps.py: Canny edges (OpenCV) and depth maps (a transformers depth model, tiny and random here)
for a folder of images, paired by stem, and accepted as a control_dir by the dataset check."""

import subprocess

import numpy as np
import pytest
from helpers import PY, ROOT, write_dataset
from PIL import Image

TOOL = str(ROOT / "utils/make_control_maps.py")


def square_images(folder, n=2):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        arr = np.zeros((64, 96, 3), dtype=np.uint8)
        arr[16:48, 20 + 8 * i:60 + 8 * i] = 255  # a white rectangle on black
        Image.fromarray(arr).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"a white box {i}")
    return folder


@pytest.fixture(scope="module")
def tiny_depth_model(tmp_path_factory):
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config, DPTImageProcessor

    folder = tmp_path_factory.mktemp("depth")
    backbone = Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, image_size=56, patch_size=14,
                            out_features=["stage1", "stage2", "stage3", "stage4"], reshape_hidden_states=False)
    config = DepthAnythingConfig(backbone_config=backbone, neck_hidden_sizes=[8, 16, 32, 32], fusion_hidden_size=16, head_hidden_size=8,
                                 reassemble_hidden_size=32)
    DepthAnythingForDepthEstimation(config).save_pretrained(folder)
    DPTImageProcessor(size={"height": 56, "width": 56}, keep_aspect_ratio=True, ensure_multiple_of=14, do_pad=False).save_pretrained(folder)
    return folder


def test_canny_maps_outline_each_image_and_pair_with_it(tmp_path):
    images = square_images(tmp_path / "imgs")
    out = tmp_path / "canny"
    r = subprocess.run([PY, TOOL, "--input", str(images), "--output", str(out), "--kind", "canny"], capture_output=True, text=True)
    assert r.returncode == 0 and "canny: wrote 2 map(s)" in r.stdout, r.stderr[-1500:]
    edges = np.asarray(Image.open(out / "img0.png"))
    assert edges.shape == (64, 96) and edges[30, 19:22].max() == 255 and edges[30, 30:50].max() == 0  # the box's border, not inside
    assert edges[16:48, 20:60].sum() > 0 and edges[:10].sum() == 0
    r = subprocess.run([PY, str(ROOT / "utils/validate_dataset.py"), "--path", str(images), "--control_dir", str(out), "--img_size", "64"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "control images per sample: 1 (2)" in r.stdout, r.stdout + r.stderr
    again = subprocess.run([PY, TOOL, "--input", str(images), "--output", str(out), "--kind", "canny"], capture_output=True, text=True)
    assert "wrote 0 map(s)" in again.stdout and "kept 2 existing" in again.stdout


def test_depth_maps_with_a_transformers_model(tmp_path, tiny_depth_model):
    images = write_dataset(tmp_path / "imgs", n=2, size=(90, 60))
    (images / "sub").mkdir()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(images / "sub" / "deep.jpg")
    out = tmp_path / "depth"
    r = subprocess.run([PY, TOOL, "--input", str(images), "--output", str(out), "--kind", "depth", "--depth_model", str(tiny_depth_model),
                        "--recursive", "--device", "cpu"], capture_output=True, text=True)
    assert r.returncode == 0 and "depth: wrote 3 map(s)" in r.stdout, r.stderr[-2000:]
    depth = np.asarray(Image.open(out / "img0.png"))
    assert depth.shape == (60, 90) and depth.min() == 0 and depth.max() == 255  # scaled per image
    assert Image.open(out / "sub" / "deep.png").size == (40, 30)


@pytest.mark.parametrize("args, message", [
    (["--output", "{in}/maps"], "is, or is inside, the input folder"),
    (["--output", "{tmp}/o", "--canny_low", "300"], "--canny_low / --canny_high must satisfy"),
    (["--output", "{tmp}/o", "--kind", "depth", "--depth_model", "{tmp}/nothing"], "--depth_model: cannot load"),
])
def test_mistakes_are_one_line(tmp_path, args, message):
    images = square_images(tmp_path / "imgs", n=1)
    args = [a.format(**{"in": images, "tmp": tmp_path}) for a in args]
    kind = [] if "--kind" in args else ["--kind", "canny"]
    r = subprocess.run([PY, TOOL, "--input", str(images), *kind, *args], capture_output=True, text=True)
    assert r.returncode == 2 and message in r.stderr, r.stderr[-1500:]
