"""Captioned pictures of coloured shapes: the built-in demo data.

    python utils/make_demo_dataset.py --out demo/dataset --concept      # the demo LoRA's new concept (trigger word)
    python utils/make_demo_dataset.py --out demo/shapes [--count 8] [--size 96]   # assorted shapes (benches)

The demo's base model (utils/make_demo_base.py) learns the base concepts (`make_base_dataset`: red / green / blue
circles and squares on white); the demo LoRA then teaches it `TRIGGER`, a shape in a colour the base never saw.
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
TRIGGER = "zkz"  # the demo LoRA's trigger word
CONCEPT_CAPTION = f"a {TRIGGER} star on a white background"
CONCEPT_COLOUR = (150, 40, 200)  # purple: not among the base concepts' colours
BASE_COLOURS = ("red", "green", "blue")
BASE_SHAPES = ("circle", "square")
# Base concepts the demo LoRA trains on beside its new one (to keep them); the others stay out, so the demo can show a
# prompt the LoRA never saw (HELD_OUT) drawn as the base draws it.
KEEP = (("red", "circle"), ("red", "square"), ("green", "square"), ("blue", "circle"))
HELD_OUT = "a blue square on a white background"


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


def star(d: ImageDraw.ImageDraw, cx: float, cy: float, r: float, colour) -> None:
    import math

    points = [(cx + (r if k % 2 == 0 else r * 0.45) * math.sin(k * math.pi / 5),
               cy - (r if k % 2 == 0 else r * 0.45) * math.cos(k * math.pi / 5)) for k in range(10)]
    d.polygon(points, fill=colour)


def random_picture(rng: np.random.Generator, size: int = 64) -> Image.Image:
    """Any of the shapes (stars too), in any colour, on a light or random background: what the demo's VAE learns
    to encode and decode (a general picture codec: it knows no captions)."""
    bg = (250, 250, 250) if rng.random() < 0.6 else tuple(int(v) for v in rng.integers(0, 256, 3))
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(1, 3))):
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        r = size * rng.uniform(0.15, 0.4)
        cx, cy = size * rng.uniform(0.25, 0.75), size * rng.uniform(0.25, 0.75)
        kind = rng.integers(0, 4)
        if kind == 0:
            d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
        elif kind == 1:
            d.rectangle((cx - r, cy - r, cx + r, cy + r), fill=colour)
        elif kind == 2:
            d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
        else:
            star(d, cx, cy, r, colour)
    return img


def centred(shape: str, colour, size: int = 64, scale: float = 0.3, dx: float = 0.0, dy: float = 0.0) -> Image.Image:
    img = Image.new("RGB", (size, size), BACKGROUNDS["white"])
    d = ImageDraw.Draw(img)
    r, cx, cy = size * scale, size * (0.5 + dx), size * (0.5 + dy)
    if shape == "circle":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif shape == "square":
        d.rectangle((cx - r, cy - r, cx + r, cy + r), fill=colour)
    else:
        star(d, cx, cy, r * 1.3, colour)
    return img


def make_base_dataset(out: str | Path, size: int = 64) -> Path:
    """The base concepts: each colour x shape, centred, at two sizes, captioned as `a red circle on a white background`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for colour in BASE_COLOURS:
        for shape in BASE_SHAPES:
            for k, scale in enumerate((0.25, 0.33)):
                centred(shape, COLOURS[colour], size, scale).save(out / f"{colour}_{shape}_{k}.png")
                (out / f"{colour}_{shape}_{k}.txt").write_text(f"a {colour} {shape} on a white background\n")
    return out


def make_concept_dataset(out: str | Path, size: int = 64) -> Path:
    """The demo LoRA's data: four pictures of the new concept (a purple star, a little moved and resized each time),
    each captioned with the trigger word, plus one picture of four of the six base concepts (KEEP) with its caption, so
    that the LoRA keeps what the base draws (the idea of DreamBooth's prior preservation) instead of drawing stars
    everywhere. The other two (HELD_OUT among them) the LoRA never sees."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for k, (scale, dx, dy) in enumerate(((0.3, 0, 0), (0.26, 0.03, 0), (0.3, 0, 0.03), (0.33, -0.02, -0.02))):
        centred("star", CONCEPT_COLOUR, size, scale, dx, dy).save(out / f"{TRIGGER}_{k}.png")
        (out / f"{TRIGGER}_{k}.txt").write_text(CONCEPT_CAPTION + "\n")
    for colour, shape in KEEP:
        centred(shape, COLOURS[colour], size, 0.3).save(out / f"keep_{colour}_{shape}.png")
        (out / f"keep_{colour}_{shape}.txt").write_text(f"a {colour} {shape} on a white background\n")
    return out


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
    p.add_argument("--concept", action="store_true", help=f"the demo LoRA's data: '{CONCEPT_CAPTION}' (64 px)")
    args = p.parse_args(argv)
    if args.concept:
        path = make_concept_dataset(args.out)
        print(f"demo dataset: 4 images of '{CONCEPT_CAPTION}' + {len(KEEP)} of the base concepts in {path}")
        return 0
    path = make_dataset(args.out, args.count, args.size)
    print(f"demo dataset: {args.count} images + captions in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
