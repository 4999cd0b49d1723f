"""Image reading and geometry: every colour mode to RGB (or RGBA), EXIF orientation, aspect-keeping resize + crop."""

from __future__ import annotations

import random
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from .members import open_binary

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")  # what a dataset folder's images may be

# Above this many pixels we refuse the file instead of letting PIL allocate gigabytes (PIL's own guard is 179 MP).
MAX_PIXELS = 180_000_000
# Large camera files (100+ MP) are legitimate training data; warn-and-refuse only beyond MAX_PIXELS.
Image.MAX_IMAGE_PIXELS = MAX_PIXELS


class BadImageError(ValueError):
    """An image that cannot be used; the message says why, without a traceback."""


def images_by_stem(folder: Path, listings: dict) -> dict[str, Path]:
    """stem -> the first image file of that stem in `folder` (name order); `listings` memoizes folders already
    listed (one scan lists each folder once). A folder that cannot be listed has no images."""
    import os

    found = listings.get(folder)
    if found is None:
        found = {}
        try:
            names = sorted(e.name for e in os.scandir(folder) if e.is_file())
        except OSError:
            names = []
        for name in names:
            if is_image_file(Path(name)):
                found.setdefault(Path(name).stem, folder / name)
        listings[folder] = found
    return found


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit / float greyscale: PIL's convert('L') clips at 255, so rescale by the real range.
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if arr.max() > 255 else 255.0
        arr = np.clip(arr / hi * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB") if img.mode != "RGB" else img


def _to_rgba(img: Image.Image) -> Image.Image:
    """Alpha kept (palette transparency included); images without one get an opaque alpha channel."""
    if img.mode == "P" and "transparency" in img.info or img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        return img.convert("RGBA")
    return _to_rgb(img).convert("RGBA")


def oriented_size(path: Path) -> tuple[int, int]:
    """(width, height) after EXIF rotation, read from the header only.

    PIL's PNG getexif() decodes the whole image when the eXIf chunk was not seen before the pixel data (most PNGs
    have none): a PNG's orientation is read only from an eXIf chunk ahead of the pixels, which is where writers put it."""
    with _open(path) as img:
        w, h = img.size
        if img.format == "PNG" and "exif" not in img.info:
            orientation = 1
        else:
            orientation = img.getexif().get(0x0112, 1)
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def _open(path: Path) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(open_binary(path))  # a file path, or the bytes of a tar member / table cell
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise BadImageError(f"{path}: image is too large to decode safely (over {MAX_PIXELS // 1_000_000} MP)") from None
    except Exception as e:  # PIL raises many types for garbage input
        raise BadImageError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None
    if img.size[0] * img.size[1] > MAX_PIXELS:
        img.close()
        raise BadImageError(f"{path}: image is too large ({img.size[0]}x{img.size[1]}, over {MAX_PIXELS // 1_000_000} MP)")
    if img.size[0] < 1 or img.size[1] < 1:
        raise BadImageError(f"{path}: image has zero size")
    return img


def load_image(path: Path, draft_size: tuple[int, int] | None = None, keep_alpha: bool = False) -> Image.Image:
    """Decode fully to RGB (keep_alpha: RGBA) with EXIF orientation applied. draft_size lets JPEGs decode at reduced
    scale. Without keep_alpha, transparency is composited over white."""
    img = _open(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            if draft_size is not None and img.format == "JPEG":
                img.draft("RGB", draft_size)
            img.load()
            img = ImageOps.exif_transpose(img)
            return _to_rgba(img) if keep_alpha else _to_rgb(img)
    except BadImageError:
        raise
    except Exception as e:
        raise BadImageError(f"{path}: image data is corrupt or truncated ({type(e).__name__}: {e})") from None


def target_size(width: int, height: int, img_size: int, multiple: int = 16) -> tuple[int, int]:
    """Size with about img_size**2 pixels, the source's aspect ratio, and both sides multiples of `multiple`."""
    scale = (img_size * img_size / (width * height)) ** 0.5
    w = max(multiple, int(width * scale) // multiple * multiple)
    h = max(multiple, int(height * scale) // multiple * multiple)
    return w, h


def resize_and_crop(img: Image.Image, size: tuple[int, int], rng: random.Random | None = None, resample=None) -> Image.Image:
    """Resize to cover `size` keeping aspect (`resample`, default bicubic up / Lanczos down), then crop (centre, or
    random when rng is given)."""
    tw, th = size
    w, h = img.size
    scale = max(tw / w, th / h)
    rw, rh = max(tw, round(w * scale)), max(th, round(h * scale))
    if (rw, rh) != (w, h):
        img = img.resize((rw, rh), resample or (Image.Resampling.BICUBIC if scale > 1 else Image.Resampling.LANCZOS))
    if rng is None:
        left, top = (rw - tw) // 2, (rh - th) // 2
    else:
        left, top = rng.randint(0, rw - tw), rng.randint(0, rh - th)
    return img.crop((left, top, left + tw, top + th))


def resize_exact(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Resize to exactly `size` (aspect not kept, no crop) with Lanczos: what diffusers' VaeImageProcessor.resize
    does to the reference images of the edit pipelines, so training sees the pixels inference sees."""
    return img if img.size == tuple(size) else img.resize(tuple(size), Image.Resampling.LANCZOS)


def resize_views(img: Image.Image, sizes) -> list[Image.Image]:
    """The default reference transform: one Lanczos resize of the original per view size (see resize_exact)."""
    return [resize_exact(img, s) for s in sizes]


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB (RGBA) PIL image -> float32 3xHxW (4xHxW) in [-1, 1]."""
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)
