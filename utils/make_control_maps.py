"""Control images for a folder of training images: Canny edges or depth maps, one per image, same stem and size.

    python utils/make_control_maps.py --input ./photos --output ./photos_canny --kind canny [--canny_low 100 --canny_high 200]
    python utils/make_control_maps.py --input ./photos --output ./photos_depth --kind depth \\
        [--depth_model depth-anything/Depth-Anything-V2-Small-hf] [--device cuda]

Every image under --input (with --recursive, under the same relative paths) gets `<output>/<stem>.png`: Canny edges
(OpenCV's `cv2.Canny` on the greyscale image: white edges on black) or a depth map (a transformers depth-estimation
model, Depth Anything / DPT; its relative depth scaled per image to 0-255, near = white, as the FLUX / Qwen-Image
depth control models were trained on). EXIF orientation is applied, so each map lines up with the image training
sees. The output folder then serves as `data_config.control_dir`, and `utils/validate_dataset.py --path <input>
--control_dir <output>` checks the pairs. Existing maps are kept unless --overwrite; each file is written beside and
renamed into place. Exit 1 when an image could not be read (each is listed).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image

DEFAULT_DEPTH_MODEL = "depth-anything/Depth-Anything-V2-Small-hf"


def canny(image: Image.Image, low: int, high: int) -> Image.Image:
    import cv2

    grey = np.asarray(image.convert("L"))
    return Image.fromarray(cv2.Canny(grey, low, high))


class Depth:
    """A transformers depth-estimation model and its image processor (PIL backend: no torchvision needed)."""

    def __init__(self, name: str, device: str):
        import torch
        from transformers import AutoImageProcessor, AutoModelForDepthEstimation

        self.torch = torch
        self.processor = AutoImageProcessor.from_pretrained(name, backend="pil")
        self.model = AutoModelForDepthEstimation.from_pretrained(name).to(device).eval()
        self.device = device

    def __call__(self, image: Image.Image) -> Image.Image:
        inputs = self.processor(images=image.convert("RGB"), return_tensors="pt").to(self.device)
        with self.torch.no_grad():
            out = self.model(**inputs)
        depth = self.processor.post_process_depth_estimation(out, target_sizes=[(image.height, image.width)])[0]["predicted_depth"]
        depth = depth.float().cpu().numpy()
        lo, hi = float(depth.min()), float(depth.max())
        scaled = (depth - lo) / (hi - lo) if hi > lo else np.zeros_like(depth)
        return Image.fromarray((scaled * 255).round().astype(np.uint8))


def images_under(root: Path, recursive: bool) -> list[Path]:
    from image_datasets.images import is_image_file

    found = root.rglob("*") if recursive else root.iterdir()
    return sorted(p for p in found if p.is_file() and is_image_file(p))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="folder of training images")
    p.add_argument("--output", required=True, help="folder for the control maps (created; never the input folder)")
    p.add_argument("--kind", choices=["canny", "depth"], required=True)
    p.add_argument("--canny_low", type=int, default=100, help="Canny: lower hysteresis threshold (0-255)")
    p.add_argument("--canny_high", type=int, default=200, help="Canny: upper hysteresis threshold (0-255)")
    p.add_argument("--depth_model", default=DEFAULT_DEPTH_MODEL, help="depth: a transformers depth-estimation model (hub id or folder)")
    p.add_argument("--device", default=None, help="depth: cuda, cpu, ... (default: cuda when available)")
    p.add_argument("--recursive", action="store_true", help="also the images in subfolders (maps under the same relative paths)")
    p.add_argument("--overwrite", action="store_true", help="replace maps that exist already (default: keep them)")
    args = p.parse_args(argv)
    from trainer.config import inside

    src, out = Path(args.input), Path(args.output)
    problem = (f"--input: '{src}' is not a folder" if not src.is_dir()
               else f"--output: '{out}' is, or is inside, the input folder; the maps would become training images" if inside(out, src)
               else f"--output: '{out}' is a file" if out.exists() and not out.is_dir()
               else "--canny_low / --canny_high must satisfy 0 <= low <= high <= 255" if not 0 <= args.canny_low <= args.canny_high <= 255
               else None)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    images = images_under(src, args.recursive)
    if not images:
        print(f"error: --input: no images in '{src}'", file=sys.stderr)
        return 2
    if args.kind == "depth":
        import torch

        try:
            make = Depth(args.depth_model, args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        except Exception as e:  # a missing / foreign model folder, an offline hub id
            print(f"error: --depth_model: cannot load '{args.depth_model}' ({type(e).__name__}: {str(e).splitlines()[0][:200]})", file=sys.stderr)
            return 2
    else:
        def make(image):
            return canny(image, args.canny_low, args.canny_high)

    from image_datasets.images import BadImageError, load_image

    written, kept, bad = 0, 0, []
    for path in images:
        target = out / path.relative_to(src).with_suffix(".png")
        if target.exists() and not args.overwrite:
            kept += 1
            continue
        try:
            image = load_image(path)
        except BadImageError as e:
            bad.append(str(e))
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".tmp-{target.name}")
        make(image).save(tmp, format="PNG")
        os.replace(tmp, target)
        written += 1
    print(f"{args.kind}: wrote {written} map(s) to {out}" + (f", kept {kept} existing (--overwrite replaces them)" if kept else ""))
    for line in bad:
        print(f"error: {line}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
