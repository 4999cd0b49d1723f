"""Write a small captioned dataset of coloured shapes (the built-in demo data).

    python utils/make_demo_dataset.py --out demo/dataset [--count 8] [--size 96]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 70), "blue": (40, 80, 220), "yellow": (240, 210, 40)}
BACKGROUNDS = {"white": (250, 250, 250), "black": (15, 15, 15), "grey": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle")


def draw(shape: str, colour, background, size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    w, h = size
    img = Image.new("RGB", size, background)
    d = ImageDraw.Draw(img)
    r = int(min(w, h) * rng.uniform(0.25, 0.4))
    cx, cy = int(w * rng.uniform(0.4, 0.6)), int(h * rng.uniform(0.4, 0.6))
    if shape == "circle":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif shape == "square":
        d.rectangle((cx - r, cy - r, cx + r, cy + r), fill=colour)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    return img


def make_dataset(out: str | Path, count: int = 8, size: int = 96, seed: int = 0) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        shape = SHAPES[i % len(SHAPES)]
        colour = list(COLOURS)[i % len(COLOURS)]
        bg = list(BACKGROUNDS)[(i // len(COLOURS)) % len(BACKGROUNDS)]
        # Mostly square, a few landscape images: exercises aspect-keeping crops and size-grouped batches.
        dims = (size, size) if i % 4 else (size * 3 // 2, size)
        draw(shape, COLOURS[colour], BACKGROUNDS[bg], dims, rng).save(out / f"shape_{i:02d}.png")
        (out / f"shape_{i:02d}.txt").write_text(f"a {colour} {shape} on a {bg} background, flat vector art\n")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--count", type=int, default=8)
    p.add_argument("--size", type=int, default=96)
    args = p.parse_args(argv)
    path = make_dataset(args.out, args.count, args.size)
    print(f"demo dataset: {args.count} images + captions in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
