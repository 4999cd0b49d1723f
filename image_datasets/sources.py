"""Large-dataset sources read in place: WebDataset tar shards and Hugging Face `datasets` datasets.

Both become the same `Sample`s as a caption folder (image_datasets/members.py: each image is a `Member` read by
offset or by row), checked by the same rules (`add_sample`: decodable, size, references per model) with one
problem line per unusable entry, and ordered deterministically (shards in name order, members in tar order; rows in
table order), so the size-grouped sampler's batches, and with them an exact resume, are the same as for files.

WebDataset layout (https://github.com/webdataset/webdataset): a sample is the group of members sharing a key (the
member's path up to the first dot of its file name): `key.jpg` (or png, webp, jpeg, bmp), `key.txt` (the
caption; or data_config.caption_type, or `key.json` with a "prompt" / "caption" / "text" field) and, for edit
models, `key.control_image.png`, `key.control_image_2.png`, ...; `key.mask.png` is a loss mask. Shards must be plain (uncompressed) tar files:
members are read by offset without extracting anything.

Hugging Face datasets: a `save_to_disk` folder, parquet / arrow file(s) or a folder of them, an `imagefolder`
folder (images + metadata.jsonl), or a hub id (needs the network or the local Hugging Face cache). Columns: the
image column (data_config.image_column), a caption column (data_config.caption_column, or the first of prompt /
text / caption), control_image[, control_image_2, ...] for edit models, and a `mask` image column for the loss
mask. Image cells are read undecoded from the
memory-mapped Arrow table.
"""

from __future__ import annotations

import glob
import json
import os
import tarfile
from pathlib import Path, PurePosixPath

from .images import IMAGE_EXTENSIONS

from .members import ArrowSource, Member, TarSource
from .samples import ScanResult, add_sample, column_gap, control_columns

CAPTION_FIELDS = ("prompt", "caption", "text")
IMAGE_EXTS = {e.lstrip(".") for e in IMAGE_EXTENSIONS}  # WebDataset extensions of image members


def shard_paths(spec) -> list[str]:
    """Every shard a data_config.webdataset value names: a path, a glob, or a list of either; sorted, no repeats."""
    out: list[str] = []
    for item in [spec] if isinstance(spec, str) else list(spec):
        found = sorted(glob.glob(os.path.expanduser(str(item)), recursive=True)) if glob.has_magic(str(item)) else [str(item)]
        out += [f for f in found if f not in out]
    return out


def _split_key(name: str) -> tuple[str, str]:
    """WebDataset's (key, extension): 'dir/abc.control_image.png' -> ('dir/abc', 'control_image.png')."""
    p = PurePosixPath(name)
    base, _, ext = p.name.partition(".")
    return str(p.parent / base) if str(p.parent) != "." else base, ext.lower()


def _caption_from_json(raw: bytes) -> str | None:
    try:
        obj = json.loads(raw.decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if isinstance(obj, dict):
        for k in CAPTION_FIELDS:
            if isinstance(obj.get(k), str):
                return obj[k]
    return None


TEXT_EXTS = {"txt", "json", "caption", "text", "prompt", "tags", "cls"}  # read whole up to MAX_TEXT; other members up to 64 KiB
MAX_TEXT = 16 << 20


def shard_listing(shard: str) -> list[tuple[str, int, int, bytes | None]]:
    """(member name, data offset, size, bytes for small non-image members) of one plain tar shard's files, in tar
    order. Read from the run's scan index while the shard's size and mtime are unchanged (a pass over a shard's
    headers costs ~60 us per member in Python's tarfile); otherwise one pass over the headers, then recorded.

    Python's tarfile stops without a word at a header it cannot read after the first one, and lists a member whose
    data runs past the end of the file: a shard cut short would silently lose its tail. Such damage is recorded as
    entries ("", -1, -1, message), which the scan reports as problems (-2: a warning, for a shard that ends without
    tar's end-of-archive blocks)."""
    from . import scan_index

    index = scan_index.active()
    known = index.get_shard(shard) if index is not None else None
    if known is not None:
        return known
    listing = []
    file_size = os.path.getsize(shard)
    with tarfile.open(shard, mode="r:") as tf:
        while True:
            try:
                m = tf.next()
            except tarfile.ReadError as e:  # the data of the last member listed runs past the end of the file
                listing.append(("", -1, -1, f"cut short at byte {file_size} ({e}): every member from there on is lost; rewrite "
                                            "the shard".encode()))
                break
            if m is None:
                break
            if not m.isfile() or PurePosixPath(m.name).name.startswith("."):
                continue
            if m.offset_data + m.size > file_size:
                listing.append(("", -1, -1, f"{m.name}: member cut short ({file_size - m.offset_data} of {m.size} bytes in the "
                                            "shard); the shard was truncated".encode()))
                continue
            text = None
            ext = _split_key(m.name)[1].rsplit(".", 1)[-1]
            if ext not in IMAGE_EXTS and (m.size < 1 << 16 or ext in TEXT_EXTS and m.size <= MAX_TEXT):  # captions, json
                text = tf.extractfile(m).read()
            listing.append((m.name, m.offset_data, m.size, text))
        end = tf.offset  # where the header after the last member starts
    with open(shard, "rb") as f:
        f.seek(end)
        tail = f.read(1024)
    if listing and listing[-1][1] == -1:
        pass
    elif tail.strip(b"\0"):
        listing.append(("", -1, -1, f"unreadable tar header at byte {end} of {file_size}: every member after it is lost (the shard "
                                    "is cut short or damaged; rewrite it)".encode()))
    elif not tail and listing:
        listing.append(("", -2, -1, f"ends without tar's end-of-archive blocks after {len(listing)} member(s): it may have been cut "
                                    "short between two members".encode()))
    if index is not None:
        index.put_shard(shard, listing)
    return listing


def scan_webdataset(spec, img_size: int, caption_ext: str = "txt", decode: bool = True, rule=None):
    """Samples from WebDataset tar shards (see the module doc), checked like a caption folder's."""

    result = ScanResult()
    shards = shard_paths(spec)
    if not shards:
        result.problems.append(f"{spec}: no tar shards found")
        return result
    cap_ext = caption_ext.lstrip(".").lower()
    for shard in shards:
        try:
            source = TarSource(shard)
            groups: dict[str, dict[str, tuple]] = {}
            texts: dict[tuple[str, str], bytes] = {}
            for name, offset, size, text in shard_listing(shard):
                if offset < 0:  # damage found while listing (-1: members lost; -2: possibly)
                    (result.problems if offset == -1 else result.warnings).append(f"{shard}: {text.decode(errors='replace')}")
                    continue
                key, ext = _split_key(name)
                groups.setdefault(key, {})[ext] = (name, offset, size)
                if text is not None and ext in (cap_ext, "json"):
                    texts[(key, ext)] = text
        except (OSError, tarfile.TarError) as e:
            kind = "compressed" if isinstance(e, tarfile.ReadError) and shard.endswith((".gz", ".tgz", ".bz2", ".xz", ".zst")) else "unreadable"
            result.problems.append(f"{shard}: {kind} tar shard ({e}); shards are read by offset, so store them as plain .tar files")
            continue
        for key, members in groups.items():
            where = f"{shard}:{key}"
            images = sorted(e for e in members if e in IMAGE_EXTS)
            if not images:
                if any(e.split(".")[-1] in IMAGE_EXTS for e in members):  # only references
                    result.problems.append(f"{where}: no target image ({key}.jpg / .png / ...), only {', '.join(sorted(members))}")
                continue  # keys with no image at all (e.g. stray metadata) are not samples
            if (key, cap_ext) in texts:
                raw = texts[(key, cap_ext)]
                try:
                    caption = raw.decode("utf-8-sig")
                except UnicodeDecodeError as e:
                    result.problems.append(f"{where}.{cap_ext}: caption is not UTF-8 text (byte {e.start})")
                    continue
            elif (key, "json") in texts and _caption_from_json(texts[(key, "json")]) is not None:
                caption = _caption_from_json(texts[(key, "json")])
            elif cap_ext in members:
                limit = f"{MAX_TEXT >> 20} MiB" if cap_ext in TEXT_EXTS else "64 KiB"
                result.problems.append(f"{where}.{cap_ext}: caption member of {members[cap_ext][2]:,} bytes is larger than a caption "
                                       f"can be (.{cap_ext} members are read up to {limit})")
                continue
            else:
                result.problems.append(f"{where}: no caption ({key}.{cap_ext}, or {key}.json with a "
                                       f"{' / '.join(CAPTION_FIELDS)} field)")
                continue
            by_column = {}
            for ext in members:
                stem, _, suffix = ext.rpartition(".")
                if stem and suffix in IMAGE_EXTS:
                    by_column.setdefault(stem, ext)
            columns = control_columns(by_column)
            gap = next((k for k in range(1, len(columns)) if columns[k] != f"control_image_{k + 1}"), None)
            if columns and (columns[0] != "control_image" or gap is not None):
                result.problems.append(f"{where}: references must be control_image, control_image_2, ... in order; found {', '.join(columns)}")
                continue
            problem = rule.problem(where, len(columns)) if rule else None
            if problem:
                result.problems.append(problem)
                continue

            def member(ext: str) -> Member:
                name, offset, size = members[ext]
                return Member(source, (offset, size), name)

            add_sample(result, member(images[0]), " ".join(caption.split()), where, [member(by_column[c]) for c in columns],
                       img_size, decode, rule, member(by_column["mask"]) if "mask" in by_column else None)  # key.mask.png
    return result


def load_hf_dataset(spec: str, split: str = "train"):
    """A `datasets.Dataset` from a save_to_disk folder, parquet / arrow file(s), an imagefolder, or a hub id."""
    import datasets

    p = Path(spec).expanduser()
    if p.is_dir() and ((p / "state.json").is_file() or (p / "dataset_dict.json").is_file()):
        ds = datasets.load_from_disk(str(p))
    elif p.exists():
        files = [p] if p.is_file() else sorted(p.rglob("*.parquet")) or sorted(p.rglob("*.arrow"))
        if files and files[0].suffix in (".parquet", ".arrow"):
            ds = datasets.load_dataset(files[0].suffix[1:], data_files=[str(f) for f in files], split="train")
        elif p.is_dir():
            ds = datasets.load_dataset("imagefolder", data_dir=str(p), split=split)
        else:
            raise ValueError(f"{spec}: not a parquet / arrow file")
    else:
        ds = datasets.load_dataset(spec, split=split)
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise ValueError(f"{spec}: no split '{split}' (it has {', '.join(ds)}); set data_config.hf_split")
        ds = ds[split]
    if ds._indices is not None:  # a selected / shuffled view: rows in their own order, read without an indirection
        ds = ds.flatten_indices()
    return ds


def scan_hf_dataset(spec: str, split: str, img_size: int, image_column: str = "image", caption_column: str | None = None,
                    decode: bool = True, rule=None):
    """Samples from a Hugging Face dataset's rows (see the module doc), checked like a metadata file's."""

    result = ScanResult()
    try:
        ds = load_hf_dataset(spec, split)
    except Exception as e:  # datasets raises many types (missing files, offline hub, bad format)
        result.problems.append(f"{spec}: cannot load the dataset ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
        return result
    names = list(ds.column_names)
    caption_column = caption_column or next((c for c in CAPTION_FIELDS if c in names), None)
    missing = [c for c in (image_column, caption_column) if c is None or c not in names]
    if missing:
        result.problems.append(f"{spec}: no column '{missing[0] or ' / '.join(CAPTION_FIELDS)}' (it has {', '.join(names)}); "
                               "set data_config.image_column / caption_column")
        return result
    if len(ds) == 0:
        result.problems.append(f"{spec}: no rows")
        return result
    source = ArrowSource(ds, spec)
    columns = control_columns(names)
    table = ds.data
    captions = table.column(caption_column).to_pylist()
    present = {c: table.column(c).is_valid().to_pylist() for c in [image_column, *columns]}
    masks = table.column("mask").is_valid().to_pylist() if "mask" in names else None
    for row, caption in enumerate(captions):
        where = f"{spec} row {row}"
        if not present[image_column][row]:
            result.problems.append(f"{where}: no image in column '{image_column}'")
            continue
        if caption is not None and not isinstance(caption, str):
            result.problems.append(f"{where}: '{caption_column}' must be text, got {type(caption).__name__}")
            continue
        filled = [present[c][row] for c in columns]
        problem = column_gap(where, columns, filled)
        if problem:
            result.problems.append(problem)
            continue
        given = [c for c, f in zip(columns, filled) if f]
        problem = rule.problem(where, len(given)) if rule else None
        if problem:
            result.problems.append(problem)
            continue
        mask = Member(source, (row, "mask"), f"row {row} mask") if masks is not None and masks[row] else None  # a 'mask' column
        add_sample(result, Member(source, (row, image_column), f"row {row} {image_column}"), " ".join((caption or "").split()),
                    where, [Member(source, (row, c), f"row {row} {c}") for c in given], img_size, decode, rule, mask)
    return result
