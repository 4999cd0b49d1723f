"""Folder of images with same-stem caption files -> training samples, and a deterministic size-grouping sampler."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch.utils.data import Dataset, Sampler

from .images import BadImageError, is_image_file, load_image, oriented_size, resize_and_crop, target_size, to_tensor

logger = logging.getLogger(__name__)


@dataclass
class Sample:
    image: Path
    caption: str
    size: tuple[int, int]  # training (width, height) after resize + crop


@dataclass
class ScanResult:
    samples: list[Sample] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # one line per unusable file
    warnings: list[str] = field(default_factory=list)  # usable, but worth knowing


def read_caption(path: Path) -> str:
    """UTF-8 caption text (a BOM is accepted), whitespace collapsed. Raises ValueError with the file name."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: caption is not UTF-8 text (byte {e.start}); re-save it as UTF-8") from None
    return " ".join(text.split())


def scan_caption_folder(img_dir: str | Path, img_size: int, caption_ext: str = "txt", decode: bool = True) -> ScanResult:
    """Pair every image with its caption and check it. decode=True fully decodes each image (catches truncation)."""
    root = Path(img_dir)
    result = ScanResult()
    ext = "." + caption_ext.lstrip(".")
    files = sorted(p for p in root.iterdir() if p.is_file())
    images = [p for p in files if is_image_file(p)]
    if not images:
        captions = [p for p in files if p.suffix.lower() == ext]
        what = f"only {len(captions)} caption file(s)" if captions else "no files"
        result.problems.append(f"{root}: no images found (jpg, jpeg, png, webp, bmp); the folder has {what}")
        return result
    for img in images:
        cap = img.with_suffix(ext)
        if not cap.is_file():
            alt = [p for p in files if p.stem == img.stem and p.suffix.lower() == ext]
            if not alt:
                result.problems.append(f"{img}: no caption file {cap.name}")
                continue
            cap = alt[0]
        try:
            caption = read_caption(cap)
        except (OSError, ValueError) as e:
            result.problems.append(str(e))
            continue
        try:
            w, h = oriented_size(img)
            size = target_size(w, h, img_size)
            if decode:
                load_image(img, draft_size=size)
        except BadImageError as e:
            result.problems.append(str(e))
            continue
        if not caption:
            result.warnings.append(f"{cap}: caption is empty (the image trains unconditionally)")
        if min(w, h) < min(size) // 2:
            result.warnings.append(f"{img}: {w}x{h} is much smaller than the training size {size[0]}x{size[1]} and will be upscaled")
        result.samples.append(Sample(img, caption, size))
    return result


def sample_rng(seed: int, epoch: int, index: int) -> random.Random:
    """Per-(epoch, sample) RNG, so augmentation and caption dropout do not depend on worker count or resume point."""
    return random.Random(f"{seed}-{epoch}-{index}")


class CaptionDataset(Dataset):
    """Indexable by (index, epoch): returns pixels in [-1, 1], the caption (possibly dropped) and the file name."""

    def __init__(self, samples: Sequence[Sample], caption_dropout_rate: float = 0.0, random_crop: bool = False, seed: int = 0):
        self.samples = list(samples)
        self.caption_dropout_rate = caption_dropout_rate
        self.random_crop = random_crop
        self.seed = seed

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, epoch = key
        s = self.samples[index]
        rng = sample_rng(self.seed, epoch, index)
        drop = rng.random() < self.caption_dropout_rate
        try:
            img = load_image(s.image, draft_size=s.size)
        except BadImageError as e:
            # The file changed or broke after the start-up scan: keep training, say which file.
            logger.warning("%s; training on a blank image for this sample", e)
            from PIL import Image

            img = Image.new("RGB", s.size, (127, 127, 127))
        img = resize_and_crop(img, s.size, rng if self.random_crop else None)
        return {"pixel_values": to_tensor(img), "caption": "" if drop else s.caption, "path": str(s.image)}


def collate(items: list[dict]) -> dict:
    return {
        "pixel_values": torch.stack([it["pixel_values"] for it in items]),
        "captions": [it["caption"] for it in items],
        "paths": [it["path"] for it in items],
    }


class SizeGroupedBatchSampler(Sampler):
    """Shuffled batches in which every image has the same training size.

    The order is a pure function of (seed, epoch), so a resumed run sees exactly the batches the uninterrupted run
    would have seen. Batches are dealt round-robin to processes (rank::world_size); every process gets the same number.
    """

    def __init__(self, sizes: Sequence[tuple[int, int]], batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.sizes = list(sizes)
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        rng = random.Random(f"{self.seed}-batches-{epoch}")
        order = list(range(len(self.sizes)))
        rng.shuffle(order)
        groups: dict[tuple[int, int], list[int]] = {}
        for i in order:
            groups.setdefault(self.sizes[i], []).append(i)
        batches = [g[k : k + self.batch_size] for g in groups.values() for k in range(0, len(g), self.batch_size)]
        rng.shuffle(batches)
        usable = len(batches) - len(batches) % self.world_size if len(batches) >= self.world_size else len(batches)
        return batches[:usable]

    def __len__(self) -> int:
        return len(self.epoch_batches(0)) // self.world_size or 1

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        batches = self.epoch_batches(self.epoch)
        mine = batches[self.rank :: self.world_size] or batches[:1]
        for b in mine[self.start_batch :]:
            yield [(i, self.epoch) for i in b]
