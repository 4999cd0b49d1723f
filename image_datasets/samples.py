"""What a dataset scan produces (samples, problems, warnings) and the checks every source applies to a sample:
decodable images, sizes, references per model. The folder / metadata scan (caption_dataset.py) and the shard /
table scans (sources.py) both build their samples through `add_sample`."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import scan_index
from .images import BadImageError, load_image, oriented_size, target_size

# (source width, source height) -> (VAE view size, [text-encoder view size]) of a reference image; the family's
# `ModelAdapter.reference_sizes`. Without one, references are sized like targets.
ReferenceSizer = Callable[[int, int], tuple[tuple[int, int], ...]]


@dataclass(slots=True)
class Sample:
    image: Path  # a file, or a Member: an image inside a tar shard / a datasets table (image_datasets/members.py)
    caption: str
    size: tuple[int, int]  # training (width, height) after resize + crop
    controls: tuple[Path, ...] = ()  # reference / source images (files or Members) for edit and Kontext training
    control_sizes: tuple[tuple[int, int], ...] = ()  # each reference's VAE view (width, height)
    condition_sizes: tuple[tuple[int, int], ...] = ()  # each reference's text-encoder view, when the family has one
    source_size: tuple[int, int] = (0, 0)  # the file's own (width, height), EXIF orientation applied
    control_source_sizes: tuple[tuple[int, int], ...] = ()
    mask: Path | None = None  # loss mask (image_datasets/masks.py): a file, or the image itself with mask_alpha
    mask_alpha: bool = False
    loss_weight: float = 1.0  # this sample's share of the loss (prior-preservation images: prior_loss_weight)
    dataset: int = 0  # which of data_config.datasets it came from
    control_mode: int | None = None  # a Union ControlNet's mode index for its control image (its dataset's control_mode)

    @property
    def group(self) -> tuple:
        """Samples with equal groups can share a batch (every tensor in it has the same shape)."""
        return (self.size, self.control_sizes)


@dataclass
class ScanResult:
    samples: list[Sample] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # one line per unusable file
    warnings: list[str] = field(default_factory=list)  # usable, but worth knowing
    masks: tuple[int, float] | None = None  # (samples with a loss mask, their mean coverage)


@dataclass(frozen=True)
class ReferenceRule:
    """How many reference (control) images each sample must have for the model being trained."""

    low: int
    high: int
    model: str  # e.g. "QwenImageEditPipeline", for the messages
    hint: str = ""  # appended when a sample has more than `high`
    min_side: int = 0  # the pipeline refuses reference images with a shorter side
    max_aspect: float = 0.0  # ... or a more extreme aspect ratio (0 = no limit)
    aligned: bool = False  # control images are pixel-aligned with their image (FLUX Control): same aspect, cropped with it

    def size_problem(self, where: str, width: int, height: int) -> str | None:
        if self.min_side and min(width, height) < self.min_side:
            return f"{where}: reference image is {width}x{height}; a {self.model} model needs both sides >= {self.min_side}"
        if self.max_aspect and max(width / height, height / width) > self.max_aspect:
            return f"{where}: reference image is {width}x{height}; a {self.model} model takes aspect ratios up to {self.max_aspect:g}:1"
        return None

    def problem(self, where: str, n: int) -> str | None:
        if n > self.high:
            return f"{where}: {n} control image(s), more than the {self.high} a {self.model} model takes{self.hint}"
        if n < self.low:
            return f"{where}: {n} control image(s); a {self.model} model needs {self.low}" + (f" to {self.high}" if self.high > self.low else "")
        return None


def check_image(path: Path, img_size: int, decode: bool, result: ScanResult) -> tuple[int, int] | None:
    """Source (width, height) of one usable image, or None (and a problem line) when it cannot be used.

    A file the run's scan index (image_datasets/scan_index.py) already checked, unchanged since, is not opened."""
    index = scan_index.active()
    known = index.get(path) if index is not None else None
    try:
        w, h = known[:2] if known else oriented_size(path)
        size = target_size(w, h, img_size)
        if decode and not known:
            load_image(path, draft_size=size)
            if index is not None and index.writable:
                index.put(path, w, h, scan_index.sha256_file(path))
    except BadImageError as e:
        result.problems.append(str(e))
        return None
    if min(w, h) < min(size) // 2:
        result.warnings.append(f"{path}: {w}x{h} is much smaller than the training size {size[0]}x{size[1]} and will be upscaled")
    return w, h


def add_sample(result: ScanResult, image: Path, caption: str, caption_name: str, controls: list[Path], img_size: int, decode: bool,
                rule: ReferenceRule | None = None, mask: Path | None = None) -> None:
    """Check one sample (its image and references decodable, references the sizes the model takes) and add it, or
    add its problem lines. `mask`: the loss mask its source names (checked later, by masks.attach_masks)."""
    source = check_image(image, img_size, decode, result)
    control_sources = [check_image(c, img_size, decode, result) for c in controls]
    if source is None or any(cs is None for cs in control_sources):
        return
    sized = [rule.size_problem(str(c), *cs) for c, cs in zip(controls, control_sources)] if rule else []
    if rule and rule.aligned:
        sized += [f"{c}: control image is {cs[0]}x{cs[1]}, but its image {image} is {source[0]}x{source[1]}; a {rule.model} model "
                  "needs each control image at its image's aspect ratio (it is sized and cropped with the image)"
                  for c, cs in zip(controls, control_sources) if abs(cs[0] * source[1] - cs[1] * source[0]) > 0.01 * cs[1] * source[0]]
    if any(sized):
        result.problems.extend(p for p in sized if p)
        return
    if not caption:
        result.warnings.append(f"{caption_name}: caption is empty (the image trains unconditionally)")
    size = _shared(target_size(*source, img_size))
    result.samples.append(Sample(
        image, caption, size, controls=tuple(controls), source_size=_shared(source),
        control_sizes=tuple(size if rule and rule.aligned else target_size(*c, img_size) for c in control_sources),
        control_source_sizes=tuple(control_sources), mask=mask,
    ))


_SIZES: dict = {}


def _shared(size: tuple) -> tuple:
    """One tuple object per distinct size (a dataset has few): ~100 bytes less per sample at a million samples."""
    if len(_SIZES) > 100_000:
        _SIZES.clear()
    return _SIZES.setdefault(size, size)


def control_columns(names) -> list[str]:
    """control_image, control_image_2, control_image_3, ... among `names`, in reference order."""
    found = [n for n in names if n == "control_image" or re.fullmatch(r"control_image_\d+", n)]
    return sorted(found, key=lambda n: 1 if n == "control_image" else int(n.rsplit("_", 1)[1]))


def column_gap(where: str, columns: list[str], filled: list[bool]) -> str | None:
    """A row whose control_image_k is set while an earlier one is empty: references fill their columns in order."""
    gap = next((k for k in range(1, len(filled)) if filled[k] and not filled[k - 1]), None)
    if gap is None:
        return None
    return f"{where}: {columns[gap]} is set but {columns[gap - 1]} is empty; fill the control images in order"
