"""Loss masks: which pixels of a training image the loss counts. White (255) = trained, black (0) = ignored, grey in
between; `data_config.mask_floor` is the least weight any pixel keeps.

A mask comes from `data_config.mask_dir` (an image of the same stem, under the same relative path; any size of the
image's aspect ratio), from a metadata file's `mask` column, or from the image's own alpha channel
(`data_config.alpha_mask`). It is cropped exactly as its image and reaches the loss at the latents' size (area
average over each latent pixel's patch, as the VAE downsamples).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from .images import BadImageError, images_by_stem, load_image, oriented_size
from .samples import ScanResult

ASPECT_TOLERANCE = 0.01


def load_mask(path, alpha: bool = False) -> Image.Image:
    """The mask as an 8-bit greyscale image: a mask file (any colour mode: its luminance) or an image's alpha."""
    img = load_image(path, keep_alpha=alpha)
    return img.getchannel("A") if alpha else img.convert("L")


def mask_problem(where: str, image_size: tuple[int, int], mask: Image.Image) -> str | None:
    (w, h), (mw, mh) = image_size, mask.size
    if abs((mw / mh) / (w / h) - 1) > ASPECT_TOLERANCE:
        return f"{where}: mask is {mw}x{mh} but its image is {w}x{h}; a mask needs the image's aspect ratio"
    if not np.asarray(mask).any():
        return f"{where}: mask is all black: nothing of this image would be trained"
    return None


def attach_masks(result: ScanResult, d, decode: bool = True) -> None:
    """Give each sample its mask (data_config.mask_dir, alpha_mask, or a metadata `mask` already set), checked;
    a sample whose mask is missing or unusable becomes a problem line and leaves the dataset."""
    if not (d.mask_dir or d.alpha_mask or any(s.mask is not None for s in result.samples)):
        return
    listings: dict = {}
    root = Path(d.img_dir) if d.img_dir else None
    kept, coverage = [], []
    for s in result.samples:
        where = str(s.image)
        if d.mask_dir:
            rel = Path(str(s.image)).parent.relative_to(root) if root is not None and Path(str(s.image)).is_relative_to(root) else Path()
            s.mask = images_by_stem(Path(d.mask_dir) / rel, listings).get(Path(str(s.image)).stem)
            if s.mask is None:
                result.problems.append(f"{where}: no mask named {Path(str(s.image)).stem}.* in {Path(d.mask_dir) / rel}")
                continue
        elif d.alpha_mask:
            s.mask, s.mask_alpha = s.image, True
        if s.mask is None:
            kept.append(s)
            continue
        share = None
        try:
            if decode:
                mask = load_mask(s.mask, s.mask_alpha)
                problem = mask_problem(where, s.source_size, mask)
                share = float(np.asarray(mask, dtype=np.float32).mean() / 255)
            else:
                mw, mh = oriented_size(s.mask)
                w, h = s.source_size
                problem = None if abs((mw / mh) / (w / h) - 1) <= ASPECT_TOLERANCE else f"{where}: mask is {mw}x{mh} but its image is {w}x{h}"
        except BadImageError as e:
            problem = str(e)
        if problem:
            result.problems.append(problem)
            continue
        if share is not None:
            coverage.append(share)
        kept.append(s)
    result.samples = kept
    if coverage:
        result.masks = (len(coverage), sum(coverage) / len(coverage))
