"""Folder of images with same-stem caption files -> training samples, and a deterministic size-grouping sampler."""

from __future__ import annotations

import logging
import os
import random
import re
from pathlib import Path
from typing import Hashable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from . import scan_index
from .captions import CaptionRule
from .masks import attach_masks, load_mask
from .images import BadImageError, images_by_stem, is_image_file, load_image, resize_and_crop, resize_views, target_size, to_tensor
from .samples import ReferenceRule, ReferenceSizer, Sample, ScanResult, _shared, add_sample, column_gap, control_columns
from .sources import scan_hf_dataset, scan_webdataset

logger = logging.getLogger(__name__)


def read_caption(path: Path) -> str:
    """UTF-8 caption text (a BOM is accepted), whitespace collapsed. Raises ValueError with the file name."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: caption is not UTF-8 text (byte {e.start}); re-save it as UTF-8") from None
    return " ".join(text.split())


def bucket_sizes(resolution: int, multiple: int = 16, max_ratio: float = 4.0) -> list[tuple[int, int]]:
    """(width, height) buckets of about resolution**2 pixels, sides multiples of `multiple`, aspect 1:4 to 4:1."""
    area, out = resolution * resolution, set()
    for w in range(multiple, int(resolution * max_ratio**0.5) + multiple, multiple):
        h = area // w // multiple * multiple
        if h >= multiple and 1 / max_ratio <= w / h <= max_ratio:
            out.add((w, h))
    return sorted(out)


def nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    import math

    ratio = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


def expand_samples(samples: list[Sample], resolutions: Sequence[int], bucketing: bool, repeats: int,
                   reference_sizes: ReferenceSizer | None = None, multiple: int = 16, aligned: bool = False) -> list[Sample]:
    """Training entries: every sample once per resolution (sizes snapped to buckets when bucketing), times repeats;
    sides are multiples of `multiple` (the family's).

    References get the family's sizes (`reference_sizes`); with bucketing their VAE view snaps to a bucket of the
    same area, so that batches form. `aligned` (FLUX Control): every control image takes its image's size."""
    from dataclasses import replace

    bucket_cache: dict[int, list[tuple[int, int]]] = {}

    def buckets(res: int) -> list[tuple[int, int]]:
        return bucket_cache.setdefault(res, bucket_sizes(res, multiple))

    out = []
    for res in resolutions:
        def size(src: tuple[int, int]) -> tuple[int, int]:
            return nearest_bucket(*src, buckets(res)) if bucketing else target_size(*src, res, multiple)

        for s in samples:
            if not s.control_source_sizes and size(s.source_size) == s.size:  # nothing changes: the same object
                out.append(s)
                continue
            if aligned:
                target = _shared(size(s.source_size))
                out.append(replace(s, size=target, control_sizes=_shared((target,) * len(s.controls))))
                continue
            views = [reference_sizes(*c) if reference_sizes else (size(c),) for c in s.control_source_sizes]
            vae = []
            for src, (w, h) in zip(s.control_source_sizes, (v[0] for v in views)):
                vae.append(nearest_bucket(*src, buckets(max(multiple, round((w * h) ** 0.5 / multiple) * multiple))) if bucketing else (w, h))
            out.append(replace(s, size=_shared(size(s.source_size)), control_sizes=_shared(tuple(vae)),
                               condition_sizes=_shared(tuple(v[1] for v in views if len(v) > 1))))
    return out * repeats


def _find_control(control_dir: Path, stem: str, listings: dict) -> Path | None:
    """The image named `stem`.* in control_dir (the first in name order); `listings` memoizes each folder's listing
    for one scan, so a dataset of N pairs lists each control folder once, not N times."""
    return images_by_stem(control_dir, listings).get(stem)


def _list_files(root: Path, recursive: bool, warnings: list[str] | None = None) -> tuple[list[Path], int]:
    """(files under root, sorted; images in subfolders when not recursive), with os.scandir's entry types instead
    of a stat per file. Each real folder is entered once (a link back up the tree is a loop, reported and skipped);
    without `recursive` only the direct subfolders are looked into, to count their images. An unreadable subfolder
    is reported in `warnings` and skipped."""
    files, nested, stack = [], 0, [(str(root), ())]
    seen: set[tuple[int, int]] = set()
    while stack:
        folder, parts = stack.pop()
        try:
            st = os.stat(folder)
            if (st.st_dev, st.st_ino) in seen:
                if warnings is not None:
                    warnings.append(f"{folder}: a link to a folder already scanned (a loop, or the same folder twice); skipped")
                continue
            seen.add((st.st_dev, st.st_ino))
            with os.scandir(folder) as entries:
                listed = list(entries)
        except OSError as e:
            if not parts:
                raise
            if warnings is not None:
                warnings.append(f"{folder}: unreadable folder ({e.strerror or e}); skipped")
            continue
        for e in listed:
            try:
                is_dir, is_file = e.is_dir(), e.is_file()
            except OSError:
                continue
            if is_dir:
                if recursive or not parts:
                    stack.append((e.path, (*parts, e.name)))
            elif is_file:
                if not parts or recursive:
                    files.append((*parts, e.name))  # sorted as Path sorts: by path components
                elif is_image_file(Path(e.name)):
                    nested += 1
    return [root.joinpath(*f) for f in sorted(files)], nested


def scan_caption_folder(
    img_dir: str | Path, img_size: int, caption_ext: str = "txt", decode: bool = True,
    control_dir: str | Path | list | None = None, recursive: bool = False, rule: ReferenceRule | None = None,
) -> ScanResult:
    """Pair every image with its caption (and its same-stem control images when control_dir is given: one folder,
    or a list of folders holding reference 1, 2, 3, ... in order) and check it.

    decode=True fully decodes each image, which catches truncated files that a header read would miss. With
    recursive=True images in subfolders are used too (captions beside them, controls under the same relative path);
    otherwise they are counted and reported.
    """
    root = Path(img_dir)
    result = ScanResult()
    ext = "." + caption_ext.lstrip(".")
    files, nested = _list_files(root, recursive, result.warnings)
    images = [p for p in files if is_image_file(p)]
    if not recursive:
        if nested:
            result.warnings.append(f"{root}: {nested} image(s) in subfolders are not used (set data_config.recursive: true to use them)")
    if not images:
        captions = [p for p in files if p.suffix.lower() == ext]
        what = f"only {len(captions)} caption file(s)" if captions else "no files"
        result.problems.append(f"{root}: no images found (jpg, jpeg, png, webp, bmp); the folder has {what}")
        return result
    listings: dict = {}
    by_stem: dict[tuple[Path, str], list[Path]] = {}
    for p in files:
        if p.suffix.lower() == ext.lower():
            by_stem.setdefault((p.parent, p.stem), []).append(p)
    index = scan_index.active()
    for n, img in enumerate(images):
        if index is not None and n % 1000 == 0:  # the scan index's rows a thousand files at a time
            index.prefetch(images[n:n + 1000])
        cap = img.with_suffix(ext)
        alt = by_stem.get((img.parent, img.stem))  # the listing's caption files of this stem (any letter case of ext)
        if not alt:
            result.problems.append(f"{img}: no caption file {cap.name}")
            continue
        if cap not in alt:
            cap = alt[0]
        try:
            caption = read_caption(cap)
        except (OSError, ValueError) as e:
            result.problems.append(str(e))
            continue
        controls, folders = [], [] if control_dir is None else [control_dir] if isinstance(control_dir, (str, Path)) else control_dir
        found = [_find_control(Path(f) / img.parent.relative_to(root), img.stem, listings) for f in folders]
        if folders and found[0] is None and (rule is None or rule.low > 0 or len(folders) == 1):
            result.problems.append(f"{img}: no control image named {img.stem}.* in {Path(folders[0]) / img.parent.relative_to(root)}")
            continue
        gap = next((k for k in range(1, len(found)) if found[k] is not None and found[k - 1] is None), None)
        if gap is not None:
            result.problems.append(f"{img}: reference {gap + 1} ({found[gap]}) is there but reference {gap} (in {folders[gap - 1]}) "
                                   "is not; references fill the folders in order")
            continue
        controls = [c for c in found if c is not None]
        problem = rule.problem(str(img), len(controls)) if rule else None
        if problem:
            result.problems.append(problem)
            continue
        add_sample(result, img, caption, str(cap), controls, img_size, decode, rule)
    return result


def scan_dataset(d, decode: bool = True, reference_sizes: ReferenceSizer | None = None, rule: ReferenceRule | None = None,
                 multiple: int = 16) -> ScanResult:
    """The dataset a DataConfig describes: WebDataset shards, a Hugging Face dataset, a metadata file, or a caption
    folder (with control_dir for edit pairs),
    expanded over data_config.resolutions / bucketing / repeats (sides multiples of `multiple`), references sized by
    the family's `reference_sizes` and counted against the model's `rule`."""
    if d.webdataset:
        result = scan_webdataset(d.webdataset, d.img_size, d.caption_type, decode, rule)
    elif d.hf_dataset:
        result = scan_hf_dataset(d.hf_dataset, d.hf_split, d.img_size, d.image_column, d.caption_column, decode, rule)
    elif d.metadata_file:
        result = scan_metadata(d.metadata_file, d.img_size, decode, rule, d.caption_column or "prompt")
    else:
        result = scan_caption_folder(d.img_dir, d.img_size, d.caption_type, decode, d.control_dir, d.recursive, rule)
    captions = CaptionRule.of(d)
    for s in result.samples:
        s.caption = captions.finish(s.caption)
    attach_masks(result, d, decode)
    result.samples = expand_samples(result.samples, d.resolutions or [d.img_size], d.bucketing, d.repeats, reference_sizes, multiple,
                                    bool(rule and rule.aligned))
    return result


def read_metadata(path: Path) -> tuple[list[tuple[int, dict]], list[str]]:
    """(line number, row) of every row of a metadata.csv / .jsonl file, and one problem line ("file:line: why") per
    row that cannot be read: a JSON line that is not a JSON object, a CSV row with more or fewer cells than the
    header, a CSV quote left open (which would swallow the rows after it)."""
    import csv
    import io
    import json

    text = path.read_text(encoding="utf-8-sig")
    rows, problems = [], []
    if path.suffix.lower() != ".csv":
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                problems.append(f"{path}:{n}: not valid JSON ({e.msg})")
                continue
            if not isinstance(row, dict):
                problems.append(f"{path}:{n}: not a JSON object (got {type(row).__name__}); write one {{\"image\": ..., \"prompt\": ...}} per line")
                continue
            rows.append((n, row))
        return rows, problems
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        return [], []
    while True:
        start = reader.line_num + 1
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            problems.append(f"{path}:{start}: not valid CSV ({e})")
            break
        if not any(c.strip() for c in cells):
            continue
        spanned = [c for c in cells if "\n" in c]
        if spanned and any(is_image_file(Path(line.split(",")[0].strip().strip('"'))) for c in spanned for line in c.splitlines()[1:]):
            problems.append(f"{path}:{start}: a quote opened here is not closed before line {reader.line_num}; "
                            f"the rows in between were read as one cell")
            continue
        if len(cells) != len(header):
            problems.append(f"{path}:{start}: {len(cells)} cell(s), but the header has {len(header)} ({', '.join(header)})")
            continue
        rows.append((start, dict(zip(header, cells))))
    return rows, problems


DIFFSYNTH_REFERENCE_COLUMNS = ("edit_image", "kontext_images")  # DiffSynth-Studio's names: one path or a list of paths


def reference_cells(row: dict, where: str) -> tuple[list[tuple[str, str]], str | None]:
    """((column, path) of each reference image in order, problem) of one metadata row. References are ours
    (control_image, control_image_2, ...: one path each, filled in order) or DiffSynth-Studio's (edit_image /
    kontext_images: a path, or a list of paths: a JSON list in a .jsonl row, or written as one in a CSV cell)."""
    import json

    ours, theirs = control_columns(row), [c for c in DIFFSYNTH_REFERENCE_COLUMNS if c in row]
    if len(theirs) > 1 or ours and theirs:
        return [], f"{where}: reference images in {', '.join(ours + theirs)}; use one layout (control_image, control_image_2, ... or one {theirs[0]} column)"
    if theirs:
        column, value = theirs[0], row[theirs[0]]
        if isinstance(value, str) and value.strip().startswith("["):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                return [], f"{where}: '{column}' looks like a list but is not valid JSON ({e.msg})"
        values = value if isinstance(value, list) else [] if value is None else [value]
        if not all(isinstance(v, str) for v in values):
            return [], f"{where}: '{column}' must be a path or a list of paths"
        return [(column, v.strip()) for v in values if v.strip()], None
    values = [row[c] for c in ours]
    bad = [c for c, v in zip(ours, values) if v is not None and not isinstance(v, str)]
    if bad:
        return [], f"{where}: '{bad[0]}' must be a path, got {type(row[bad[0]]).__name__}"
    filled = [bool(v and v.strip()) for v in values]
    problem = column_gap(where, ours, filled)
    return ([] if problem else [(c, v.strip()) for c, v, f in zip(ours, values, filled) if f]), problem


def scan_metadata(metadata_file: str | Path, img_size: int, decode: bool = True, rule: ReferenceRule | None = None,
                  caption_column: str = "prompt") -> ScanResult:
    """Samples from metadata.csv / .jsonl with columns image, prompt and the references: control_image[,
    control_image_2, ...], or DiffSynth-Studio's edit_image / kontext_images (a path or a list of paths). A
    text-to-image file has image and prompt only (DiffSynth's layout too).

    Relative paths are resolved from the metadata file's folder. Every row-level problem is reported as file:line.
    """
    meta = Path(metadata_file)
    result = ScanResult()
    try:
        rows, result.problems = read_metadata(meta)
    except (OSError, UnicodeDecodeError) as e:
        result.problems.append(f"{meta}: cannot read metadata ({e})")
        return result
    if not rows and not result.problems:
        result.problems.append(f"{meta}: no rows")
        return result
    for column, value in (rows[0][1] if rows else {}).items():  # a column of image paths that nothing reads
        if (column not in ("image", caption_column, "mask", *DIFFSYNTH_REFERENCE_COLUMNS) and not re.fullmatch(r"control_image(_\d+)?", column)
                and isinstance(value, str) and is_image_file(Path(value.strip()))):
            result.warnings.append(f"{meta}: column '{column}' holds image paths but is not read (reference images go in "
                                   "control_image, control_image_2, ... or DiffSynth's edit_image / kontext_images)")
    for n, row in rows:
        where = f"{meta}:{n}"
        image, prompt = row.get("image"), row.get(caption_column)
        if caption_column not in row:
            result.problems.append(f"{where}: no '{caption_column}' (expected image, {caption_column}, control_image, ...)")
            continue
        if not isinstance(image, str) or not image.strip():
            result.problems.append(f"{where}: no 'image' path (expected image, prompt, control_image, ...)")
            continue
        if prompt is not None and not isinstance(prompt, str):
            result.problems.append(f"{where}: '{caption_column}' must be text, got {type(prompt).__name__}")
            continue
        given, problem = reference_cells(row, where)
        if problem:
            result.problems.append(problem)
            continue
        problem = rule.problem(where, len(given)) if rule else None
        if problem:
            result.problems.append(problem)
            continue
        mask = row.get("mask")
        if mask is not None and not isinstance(mask, str):
            result.problems.append(f"{where}: 'mask' must be a path, got {type(mask).__name__}")
            continue
        mask = meta.parent / mask.strip() if mask and mask.strip() else None
        resolved = [meta.parent / p for p in [image.strip()] + [v for _, v in given]]
        absent = [str(p) for p in resolved + ([mask] if mask else []) if not p.is_file()]
        if absent:
            result.problems.append(f"{where}: file(s) not found: {', '.join(absent)}")
            continue
        caption = " ".join(str(prompt or "").split())
        add_sample(result, resolved[0], caption, where, resolved[1:], img_size, decode, rule, mask)
    return result


def sample_rng(seed: int, epoch: int, index: int) -> random.Random:
    """Per-(epoch, sample) RNG, so augmentation and caption dropout do not depend on worker count or resume point."""
    return random.Random(f"{seed}-{epoch}-{index}")


class CaptionDataset(Dataset):
    """Indexable by (index, epoch): returns pixels in [-1, 1], the caption (possibly dropped) and the file name."""

    def __init__(
        self,
        samples: Sequence[Sample],
        caption_dropout_rate: float | Sequence[float] = 0.0,
        random_crop: bool = False,
        seed: int = 0,
        load_pixels: bool = True,
        empty_caption: str = "",
        reference_transform=resize_views,
        keep_alpha: bool = False,
        cached=None,
        captions: CaptionRule | Sequence[CaptionRule | None] | None = None,
        aligned_controls: bool = False,
        random_masks: bool = False,
    ):
        self.samples = list(samples)
        # per dataset (Sample.dataset): caption dropout and per-epoch caption changes (tag shuffling) or None
        self.dropout = list(caption_dropout_rate) if isinstance(caption_dropout_rate, (list, tuple)) else [caption_dropout_rate]
        self.captions = list(captions) if isinstance(captions, (list, tuple)) else [captions]
        self.random_crop = random_crop
        self.seed = seed
        self.load_pixels = load_pixels  # False when every latent is precomputed: no decoding at all
        self.empty_caption = empty_caption  # what a dropped caption becomes (the family's empty prompt)
        # (original reference image, view sizes) -> the views; picklable, it runs in DataLoader workers
        self.reference_transform = reference_transform
        self.keep_alpha = keep_alpha  # RGBA pixels for families whose VAE reads alpha
        self.cached = cached  # (index, dropped) -> the sample's disk-cache entries (trainer.cache.CacheReader), or None
        self.aligned_controls = aligned_controls  # control images cropped with their image (FLUX Control)
        self.random_masks = random_masks  # samples without a mask get random_mask(...) (FLUX Fill's inpainting masks)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, epoch = key
        s = self.samples[index]
        rng = sample_rng(self.seed, epoch, index)
        drop = rng.random() < self.dropout[s.dataset % len(self.dropout)]
        rule = self.captions[s.dataset % len(self.captions)]
        caption = self.empty_caption if drop else rule.shuffled(s.caption, rng) if rule else s.caption
        item = {"index": index, "epoch": epoch, "dropped": drop, "caption": caption, "path": str(s.image), "size": s.size,
                "loss_weight": s.loss_weight, "control_mode": s.control_mode}
        if self.cached is not None:
            item["cached"] = self.cached(index, drop)
        crop_state = rng.getstate()  # the mask is cropped where its image is
        if s.mask is not None:
            mask = self._mask(s, random.Random() if self.random_crop else None, crop_state)
            item["mask"] = torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)[None]
        elif self.random_masks:
            item["mask"] = random_mask(s.size, random.Random(f"{self.seed}-{epoch}-{index}-mask"))
        if not self.load_pixels:
            return {**item, "pixel_values": None, "controls": [], "condition_images": []}
        img = resize_and_crop(self._load(s.image, s.size), s.size, rng if self.random_crop else None)
        # References are made from the original file the way the family's pipeline makes them (no JPEG draft
        # decoding), once per view: the VAE view first, then the text encoder's when it has one.
        controls, views = [], []
        for k, (path, size) in enumerate(zip(s.controls, s.control_sizes)):
            ref = self._load(path, size, draft=False)
            if self.aligned_controls:  # where its image is cropped; Lanczos, as the pipeline resizes a control image
                crop = random.Random() if self.random_crop else None
                if crop is not None:
                    crop.setstate(crop_state)
                controls.append(to_tensor(resize_and_crop(ref, s.size, crop, Image.Resampling.LANCZOS)))
                continue
            made = self.reference_transform(ref, (size, s.condition_sizes[k]) if s.condition_sizes else (size,))
            controls.append(to_tensor(made[0]))
            views += [to_tensor(v) for v in made[1:]]
        return {**item, "pixel_values": to_tensor(img), "controls": controls, "condition_images": views}


    def _mask(self, s: Sample, rng: random.Random | None, state):
        if rng is not None:
            rng.setstate(state)
        try:
            return resize_and_crop(load_mask(s.mask, s.mask_alpha), s.size, rng)
        except BadImageError as e:  # changed after the scan: the whole image trains this time
            logger.warning("%s; training this sample without its mask", e)
            from PIL import Image

            return Image.new("L", s.size, 255)

    def _load(self, path: Path, size: tuple[int, int], draft: bool = True):
        try:
            return load_image(path, draft_size=size if draft else None, keep_alpha=self.keep_alpha)
        except BadImageError as e:
            # The file changed or broke after the start-up scan: keep training, say which file.
            logger.warning("%s; using a grey image for this sample", e)
            from PIL import Image

            return Image.new("RGBA" if self.keep_alpha else "RGB", size, (127, 127, 127, 255) if self.keep_alpha else (127, 127, 127))


def random_mask(size: tuple[int, int], rng: random.Random) -> torch.Tensor:
    """An inpainting mask (1 x H x W, 1 = repainted) for a sample without one: the union of 1 to 3 rectangles, each
    side 1/8 to 1/2 of the image's, at random places; drawn per (seed, epoch, sample), so a resumed run draws the same."""
    w, h = size
    mask = torch.zeros(1, h, w)
    for _ in range(rng.randint(1, 3)):
        mw, mh = rng.randint(max(1, w // 8), max(1, w // 2)), rng.randint(max(1, h // 8), max(1, h // 2))
        x, y = rng.randint(0, w - mw), rng.randint(0, h - mh)
        mask[:, y : y + mh, x : x + mw] = 1.0
    return mask


def collate(items: list[dict]) -> dict:
    n_controls = len(items[0]["controls"])
    pixels = [it["pixel_values"] for it in items]
    return {
        "indices": [it["index"] for it in items],
        "epochs": [it["epoch"] for it in items],
        "dropped": [it["dropped"] for it in items],
        "pixel_values": None if pixels[0] is None else torch.stack(pixels),
        "controls": [torch.stack([it["controls"][k] for it in items]) for k in range(n_controls)],
        "condition_images": [it.get("condition_images", []) for it in items],  # per sample: text-encoder views
        "captions": [it["caption"] for it in items],
        "loss_weights": torch.tensor([it["loss_weight"] for it in items]),
        # a Union ControlNet's mode per sample (None when the run has no modes)
        "control_modes": None if items[0].get("control_mode") is None else torch.tensor([it["control_mode"] for it in items]),
        "paths": [it["path"] for it in items],
        "cached": [it["cached"] for it in items] if "cached" in items[0] else None,  # disk-cache entries, read by the loader
        # loss masks at the training size (B x 1 x H x W, 1 = trained); a sample without one trains everywhere
        "masks": torch.stack([it["mask"] if "mask" in it else torch.ones(1, it["size"][1], it["size"][0]) for it in items])
        if any("mask" in it for it in items) else None,
    }


class SizeGroupedBatchSampler(Sampler):
    """Shuffled batches in which every item has the same group (training size, control sizes).

    The order is a pure function of (seed, epoch), so a resumed run sees exactly the batches the uninterrupted run
    would have seen, and every process gets the same number of batches.
    """

    def __init__(self, groups: Sequence[Hashable], batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 shares: Sequence[float] | None = None, datasets: Sequence[int] | None = None):
        ids: dict = {}
        self.groups = [ids.setdefault(g, len(ids)) for g in groups]  # e.g. Sample.group, as small ints: items in one batch share it
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self._len: int | None = None  # batches per epoch: the same every epoch, only the order changes
        self.epoch = 0
        self.start_batch = 0
        self.quotas = self._quotas(shares, datasets) if shares is not None else None

    def _quotas(self, shares: Sequence[float], datasets: Sequence[int]) -> list[tuple[list[int], int]]:
        """Weighted datasets: (members, entries per epoch) of every (dataset, size group) cell. Dataset i gets
        shares[i] / sum(shares) of the epoch's len(groups) entries, spread over its groups by their sizes; the
        counts are fixed, so every epoch has the same batches per group (and the same length)."""
        cells: dict[tuple[int, int], list[int]] = {}
        for i, (d, g) in enumerate(zip(datasets, self.groups)):
            cells.setdefault((d, g), []).append(i)
        sizes = [sum(1 for x in datasets if x == d) for d in range(len(shares))]
        total = len(self.groups)
        out = []
        for (d, _g), members in sorted(cells.items()):
            wanted = shares[d] / sum(shares) * total
            out.append((members, max(1, round(wanted * len(members) / sizes[d]))))
        return out

    def epoch_items(self, epoch: int) -> list[int]:
        """The entries an epoch trains on: every entry once, or (weighted datasets) each cell's quota taken from an
        endless run of shuffles of its members, so that over epochs every member is used equally often."""
        if self.quotas is None:
            return list(range(len(self.groups)))
        items = []
        for c, (members, quota) in enumerate(self.quotas):
            start, m = epoch * quota, len(members)
            for k in range(start // m, (start + quota - 1) // m + 1):
                order = list(members)
                random.Random(f"{self.seed}-cell-{c}-{k}").shuffle(order)
                lo, hi = max(start - k * m, 0), min(start + quota - k * m, m)
                items += order[lo:hi]
        return items

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """Global batches (batch_size x world_size items of one group) of an epoch, in training order."""
        rng = random.Random(f"{self.seed}-batches-{epoch}")
        order = self.epoch_items(epoch)
        rng.shuffle(order)
        groups: dict[Hashable, list[int]] = {}
        for i in order:
            groups.setdefault(self.groups[i], []).append(i)
        size = self.batch_size * self.world_size
        batches = [g[k : k + size] for g in groups.values() for k in range(0, len(g), size)]
        if self.world_size > 1:  # every process needs its full share of each global batch
            batches = [b for b in batches if len(b) == size]
        rng.shuffle(batches)
        return batches

    def __len__(self) -> int:
        if self._len is None:
            self._len = len(self.epoch_batches(0))
        return self._len

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        # Process r takes items [r*B, (r+1)*B) of every global batch, so N processes at batch B see exactly the
        # samples one process sees at batch N*B.
        lo = self.rank * self.batch_size
        for b in self.epoch_batches(self.epoch)[self.start_batch :]:
            yield [(i, self.epoch) for i in b[lo : lo + self.batch_size]]
