"""Precomputed prompt embeddings and VAE latents.

Each sample's text conditioning and latents are computed once (in RAM, or as safetensors files in cache_dir when
save_cache_on_disk is set; see EmbeddingCache for the layout) and keyed by a hash of everything they depend on: file contents, caption, training size,
control images, the model's component configs and the encoding settings. A later run reuses every entry whose key
still matches, so only changed files are re-encoded. Afterwards the text encoder / VAE can be freed.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from image_datasets import CaptionDataset, Sample, collate, scan_index
from trainer.config import ConfigError, TrainConfig

if TYPE_CHECKING:
    from trainer.models.base import ModelAdapter

logger = logging.getLogger("trainer")


def file_digest(path: Path, _memo: dict = {}) -> str:  # noqa: B006 - deliberate per-process memo
    """sha256 of a file's bytes: from the run's scan index when it holds this file version, else computed once."""
    index = scan_index.active()
    known = index.digest(path) if index is not None else None
    if known:
        return known
    key = (scan_index.identity(path), *scan_index.stat_key(path))
    if key not in _memo:
        _memo[key] = scan_index.sha256_file(path)
    return _memo[key]


@contextlib.contextmanager
def gc_paused():
    """No cyclic garbage collection while a million small objects (samples, keys) are made: each full collection
    would walk every object the process holds (measured: 16 us per image of a 16k-image scan). Nothing made there
    forms reference cycles; reference counting frees it as usual."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def file_digests(paths: Sequence) -> list[str]:
    """file_digest of many files: the scan index answers them in chunks of one query each."""
    index = scan_index.active()
    known = index.digests(paths) if index is not None else [None] * len(paths)
    return [k or file_digest(p) for p, k in zip(paths, known)]


class KeyArray:
    """Cache keys (32 hex characters) packed in one numpy array: 32 bytes each instead of an 81-byte str object plus
    a list slot, and no per-key reference counts, so DataLoader workers forked from the main process read them
    without copying their pages."""

    def __init__(self):
        self._chunks: list[np.ndarray] = []
        self._packed: np.ndarray | None = None

    def extend(self, keys: list[str]) -> None:
        self._chunks.append(np.array(keys, dtype="S32"))
        self._packed = None

    def _pack(self) -> np.ndarray:
        if self._packed is None:
            self._packed = np.concatenate(self._chunks) if self._chunks else np.empty(0, dtype="S32")
            self._chunks = [self._packed]
        return self._packed

    def __len__(self) -> int:
        return len(self._pack())

    def __getitem__(self, i: int) -> str:
        return self._pack()[i].decode()


class TextKeys:
    """Per sample (caption key, empty-caption key) without a tuple per sample: the empty caption's key is one string
    shared by every sample, unless the prompt encoder sees the sample's references (then one per sample)."""

    def __init__(self, shared_empty: str | None = None):
        self.captions = KeyArray()
        self.shared = shared_empty
        self.empties = KeyArray()

    def extend(self, caption_keys: list[str], empty_keys: list[str] | None) -> None:
        self.captions.extend(caption_keys)
        if self.shared is None:
            self.empties.extend(empty_keys)

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i: int) -> tuple[str, str]:
        return self.captions[i], self.shared if self.shared is not None else self.empties[i]


def split_for(seen: Sequence[bool], hosts: Sequence[str], me: int) -> tuple[int, int]:
    """(rank, world) of process `me` for building a disk cache: across every process when all of them see the
    same cache folder (`seen`: whether each found the main process's marker file), else among the processes of its
    own machine (`hosts`), so that each machine's own disk gets every entry."""
    if all(seen):
        return me, len(seen)
    mine = [p for p, h in enumerate(hosts) if h == hosts[me]]
    return mine.index(me), len(mine)


def build_split(accelerator, directory: Path) -> tuple[int, int]:
    """This process's share of a disk-cache build. One process: (0, 1). Several: the main process writes a
    marker file in `directory` and every process reports whether it sees it: a cache folder shared by all (one
    machine, or a shared file system) is split across all; a folder local to each machine is built whole per machine."""
    if accelerator.num_processes == 1:
        return 0, 1
    import socket
    import uuid

    from accelerate.utils import broadcast_object_list, gather_object

    token = [uuid.uuid4().hex if accelerator.is_main_process else None]
    broadcast_object_list(token)
    marker = directory / f".shared-{token[0]}"
    if accelerator.is_main_process:
        directory.mkdir(parents=True, exist_ok=True)
        marker.touch()
    accelerator.wait_for_everyone()
    seen = gather_object([(marker.is_file(), socket.gethostname())])
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        marker.unlink(missing_ok=True)
    rank, world = split_for([s for s, _ in seen], [h for _, h in seen], accelerator.process_index)
    if world != accelerator.num_processes and accelerator.is_main_process:
        logger.info("cache_dir %s is not shared by every machine: each machine builds its own full cache", directory)
    return rank, world


def model_fingerprint(name_or_path: str, family: str, folders: Sequence[str]) -> str:
    """Identity of the encoders: the hub id, or a local folder's encoder components (the family's
    `encoder_folders`): their configs and weight file sizes."""
    h = hashlib.sha256(f"{family}\0{name_or_path}".encode())
    root = Path(name_or_path)
    if root.is_dir():
        h = hashlib.sha256(family.encode())
        for p in sorted(root.rglob("*")):
            if p.is_file() and p.parent.name in folders:
                h.update(f"{p.relative_to(root)}\0{p.stat().st_size}\0".encode())
                if p.suffix == ".json":
                    h.update(p.read_bytes())
    return h.hexdigest()


def _digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


class _Framed:
    """_digest(*parts) for parts that differ only at `slots`, without encoding the constant parts again per sample:
    the JSON text around the slots is made once, and each key joins it with the slots' own JSON (the same text, so
    the same keys as _digest: existing caches stay valid)."""

    MARK = "\u0000slot\u0000"

    def __init__(self, parts: tuple, slots: tuple[int, ...]):
        marked = [self.MARK if i in slots else p for i, p in enumerate(parts)]
        self.pieces = json.dumps(marked, sort_keys=True, default=str).split(json.dumps(self.MARK))
        assert len(self.pieces) == len(slots) + 1

    def __call__(self, *values) -> str:
        text = self.pieces[0] + "".join(json.dumps(v, sort_keys=True, default=str) + p for v, p in zip(values, self.pieces[1:]))
        return hashlib.sha256(text.encode()).hexdigest()[:32]


def entry_path(directory: Path, kind: str, key: str) -> Path:
    """Where a disk cache writes an entry: 256 subfolders per kind, by the key's first two characters."""
    return directory / kind / key[:2] / f"{key}.safetensors"


def entry_file(directory: Path, kind: str, key: str) -> Path | None:
    """The entry's file, in the sharded layout or the flat one of earlier versions; None when there is none."""
    for path in (entry_path(directory, kind, key), directory / kind / f"{key}.safetensors"):
        if path.is_file():
            return path
    return None


def entry_intact(path: Path) -> bool:
    """A safetensors file whose header parses and whose size is what the header says: catches the empty and the
    truncated files a full disk, a crash of another tool or a copy cut short leave (reads the header only)."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 0 < n <= 100 << 20:
                return False
            meta = json.loads(f.read(n))
            end = max((v["data_offsets"][1] for k, v in meta.items() if k != "__metadata__"), default=0)
            return os.fstat(f.fileno()).st_size == 8 + n + end
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


class CacheWriteError(ConfigError):
    """cache_dir cannot take the entries (read-only, full); the message names it."""


def read_entry(directory: Path, kind: str, key: str) -> dict | None:
    """One entry of a disk cache; None when it is not there."""
    path = entry_file(directory, kind, key)
    if path is None:
        return None
    try:
        return load_file(str(path))
    except Exception as e:  # a torn or foreign file (writes are atomic, so another tool's doing)
        raise RuntimeError(f"embedding cache file {path} is unreadable ({e}); delete it and start again to re-encode it") from None


class CacheReader:
    """A disk cache's entries for one sample, read inside CaptionDataset.__getitem__: in the DataLoader's worker
    processes when data_config.num_workers > 0, so reading and deserializing overlap the training step and the main
    process only moves tensors to the device. Holds the keys (shared with the cache), never the entries."""

    def __init__(self, directory: Path, text_keys: TextKeys | None, latent_keys: KeyArray | None):
        self.dir, self.text_keys, self.latent_keys = directory, text_keys, latent_keys

    def __call__(self, index: int, dropped: bool) -> dict:
        out = {}
        if self.text_keys is not None:
            out["text"] = self._read("text", self.text_keys[index][1 if dropped else 0])
        if self.latent_keys is not None:
            out["latents"] = self._read("latents", self.latent_keys[index])
        return out

    def _read(self, kind: str, key: str) -> dict:
        entry = read_entry(self.dir, kind, key)
        if entry is None:
            raise RuntimeError(f"embedding cache entry {kind}/{key} is missing from {self.dir} (deleted while training?); "
                               "restart the run to re-encode it")
        return entry


class EmbeddingCache:
    """Text conditioning and latents per sample, keyed by content (see the module doc).

    In RAM (directory None) every entry stays resident: that is what the RAM cache is. On disk, entries are files
    under `<dir>/<kind>/<first 2 key characters>/<key>.safetensors` (256 subfolders per kind, so no folder holds
    millions of files) and are read when a batch needs them, with only the last `lru` entries kept, so a process's
    memory does not grow with the dataset. A disk build is split across processes (each encodes every world-th
    sample, then all wait for each other); samples of equal shapes go through the VAE `batch_size` at a time, and
    captions through the text encoder `batch_size` at a time (families whose prompt encoding does not look at images).
    """

    def __init__(self, adapter: "ModelAdapter", samples: Sequence[Sample], cfg: TrainConfig, directory: Path | None,
                 batch_size: int = 1, lru: int = 64):
        self.adapter = adapter
        self.samples = samples
        self.cfg = cfg
        self.dir = directory
        self.batch_size = max(1, batch_size)
        self.model = model_fingerprint(cfg.pretrained_model_name_or_path, adapter.variant.name, adapter.encoder_folders)
        # RGBA families' latents are keyed apart: before their alpha was kept here, cached latents had it composited away
        self._latent_tag = "latents-rgba" if adapter.pixel_channels == 4 else "latents"
        self.text: dict[str, dict[str, torch.Tensor]] = {}  # RAM cache, or the LRU of a disk cache
        self.latents: dict[str, dict[str, torch.Tensor]] = {}
        self.lru = lru
        self._on_disk: dict[str, set[str]] | None = None  # keys found on disk, while building
        self.text_keys = TextKeys()  # per sample: (caption key, empty-caption key)
        self.latent_keys = KeyArray()
        self._text_framed = self._latent_framed = None  # key makers for samples without references (_Framed)
        self.encoded = {"text": 0, "latents": 0}
        self.reused = {"text": 0, "latents": 0}
        self.healed = 0  # damaged disk entries found and encoded again by the last build

    # --- keys ----------------------------------------------------------------------------------------------
    def _controls(self, s: Sample) -> list:
        aligned = ["cropped with the image"] if self.adapter.aligned_controls and s.controls else []
        return [(file_digest(c), size) for c, size in zip(s.controls, s.control_sizes)] + list(s.condition_sizes) + aligned

    def _text_key(self, s: Sample, caption: str) -> str:
        if not self.adapter.text_needs_pixels:
            if self._text_framed is None:
                self._text_framed = _Framed(("text", self.model, None, self.cfg.max_sequence_length, self.cfg.t5_max_sequence_length,
                                             [], str(self.adapter.weight_dtype)), (2,))
            return self._text_framed(caption)
        return _digest("text", self.model, caption, self.cfg.max_sequence_length, self.cfg.t5_max_sequence_length,
                       self._controls(s), str(self.adapter.weight_dtype))

    def _latent_key(self, s: Sample, digest: str | None = None) -> str:
        if not s.controls:
            if self._latent_framed is None:
                self._latent_framed = _Framed((self._latent_tag, self.model, None, None, []), (2, 3))
            return self._latent_framed(digest or file_digest(s.image), s.size)
        return _digest(self._latent_tag, self.model, digest or file_digest(s.image), s.size, self._controls(s))

    # --- storage -------------------------------------------------------------------------------------------
    def _has(self, kind: str, key: str) -> bool:
        if key in (self.text if kind == "text" else self.latents):
            return True
        if self.dir is None:
            return False
        if self._on_disk is not None:  # during build: one listing per folder (kept current by _store), no stat per entry
            return key in self._on_disk[kind]
        return entry_file(self.dir, kind, key) is not None

    def _list_disk(self) -> dict[str, set[str]]:
        """The keys already on disk per kind (sharded and flat layouts), listed with os.scandir."""
        found: dict[str, set[str]] = {"text": set(), "latents": set()}
        for kind, keys in found.items():
            stack = [self.dir / kind]
            while stack:
                try:
                    with os.scandir(stack.pop()) as entries:
                        for e in entries:
                            if e.is_dir():
                                stack.append(e.path)
                            elif e.name.endswith(".safetensors") and not e.name.startswith("."):
                                keys.add(e.name[: -len(".safetensors")])
                except OSError:
                    continue
        return found

    def _lookup(self, kind: str, key: str) -> dict | None:
        store = self.text if kind == "text" else self.latents
        if key in store:
            if self.dir is not None:  # most recently used last
                store[key] = store.pop(key)
            return store[key]
        entry = read_entry(self.dir, kind, key) if self.dir is not None else None
        if entry is None:
            return None
        store[key] = entry
        while len(store) > self.lru:
            store.pop(next(iter(store)))
        return entry

    def _store(self, kind: str, key: str, tensors: dict[str, torch.Tensor]) -> None:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        if self.dir is None:
            (self.text if kind == "text" else self.latents)[key] = tensors
            return
        path = entry_path(self.dir, kind, key)
        tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file(tensors, str(tmp))
            os.replace(tmp, path)
        except Exception as e:  # OSError, or safetensors' own error type for the same causes
            with contextlib.suppress(OSError):
                tmp.unlink()
            reason = "the disk is full" if "No space" in str(e) or "os error 28" in str(e) else str(e).splitlines()[0][:200]
            raise CacheWriteError(f"config key 'cache_dir': cannot write embedding cache entries in '{self.dir}' ({reason}); free "
                                  "space, make it writable, or point cache_dir to another folder") from None
        if self._on_disk is not None:
            self._on_disk[kind].add(key)

    # --- building ------------------------------------------------------------------------------------------
    def build(self, text: bool, latents: bool, need_empty_captions: bool, rank: int = 0, world: int = 1) -> None:
        """Encode whatever is missing. With a disk cache, process `rank` of `world` encodes samples rank, rank +
        world, ...; the caller waits for all of them before reading. A RAM cache is built whole by each process."""
        from tqdm.auto import tqdm

        if self.dir is None:
            rank, world = 0, 1
        ds = CaptionDataset(self.samples, reference_transform=self.adapter.reference_transform(), aligned_controls=self.adapter.aligned_controls,
                            keep_alpha=self.adapter.pixel_channels == 4)
        # the empty caption's key depends on the sample only when the prompt encoder sees its references
        shared_empty = self._text_key(self.samples[0], self.adapter.empty_prompt) if self.samples and not self.adapter.text_needs_pixels else None
        self.text_keys, self.latent_keys = TextKeys(shared_empty), KeyArray()
        with gc_paused():
            for start in range(0, len(self.samples), 4096):  # keys of 4096 samples at a time, packed as they come
                chunk = self.samples[start:start + 4096]
                self.text_keys.extend([self._text_key(s, s.caption) for s in chunk],
                                      None if shared_empty else [self._text_key(s, self.adapter.empty_prompt) for s in chunk])
                if latents:
                    digests = file_digests([s.image for s in chunk])
                    self.latent_keys.extend([self._latent_key(s, d) for s, d in zip(chunk, digests)])
        mine = range(rank, len(self.samples), world)
        self._on_disk = self._list_disk() if self.dir is not None else None
        if self.dir is not None:
            self._drop_damaged(mine, text, latents, need_empty_captions)
        todo_latents = [i for i in mine if latents and not self._has("latents", self.latent_keys[i])]
        todo_text = []
        for i in mine:
            if not text:
                break
            keys = [(self.samples[i].caption, self.text_keys[i][0])]
            if need_empty_captions:
                keys.append((self.adapter.empty_prompt, self.text_keys[i][1]))
            todo_text += [(i, caption, key) for caption, key in keys]
        self.reused["latents"] = (len(mine) if latents else 0) - len(todo_latents)
        bar = tqdm(total=len(todo_latents) + len(todo_text), desc="caching embeddings", unit="entry",
                   disable=rank != 0 or not (todo_latents or todo_text), dynamic_ncols=True)
        groups: dict[tuple, list[int]] = {}
        for i in todo_latents:
            groups.setdefault(self.samples[i].group, []).append(i)
        for members in groups.values():
            for start in range(0, len(members), self.batch_size):
                window = members[start:start + self.batch_size]
                chunk = [i for i in window if not self._has("latents", self.latent_keys[i])]  # repeats share a key
                self.reused["latents"] += len(window) - len(chunk)
                if chunk:
                    self._encode_latents(ds, chunk)
                bar.update(len(window))
        if self.adapter.text_needs_pixels:  # the prompt encoder sees the sample's references: one sample per call
            for i, caption, key in todo_text:
                if self._has("text", key):
                    self.reused["text"] += 1
                else:
                    cond = self.adapter.encode_text({**collate([ds[(i, 0)]]), "captions": [caption]})
                    self._store("text", key, self.adapter.split_text(cond, 1)[0])
                    self.encoded["text"] += 1
                bar.update(1)
        else:  # captions only: batch_size distinct captions per encoder call (padding is cut per sample)
            pending: dict[str, str] = {}
            for n, (_i, caption, key) in enumerate(todo_text, 1):
                if key in pending or self._has("text", key):
                    self.reused["text"] += 1
                else:
                    pending[key] = caption
                if len(pending) == self.batch_size or (n == len(todo_text) and pending):
                    cond = self.adapter.encode_text({"captions": list(pending.values())})
                    for k, item in zip(pending, self.adapter.split_text(cond, len(pending))):
                        self._store("text", k, item)
                    self.encoded["text"] += len(pending)
                    bar.update(len(pending))
                    pending = {}
            bar.update(self.reused["text"])
        bar.close()
        self._on_disk = None
        logger.info(
            "embedding cache: text %d encoded / %d reused, latents %d encoded / %d reused%s%s",
            self.encoded["text"], self.reused["text"], self.encoded["latents"], self.reused["latents"],
            f" (in {self.dir})" if self.dir else " (in RAM)", f" by process {rank} of {world}" if world > 1 else "",
        )

    def _drop_damaged(self, mine: range, text: bool, latents: bool, need_empty_captions: bool) -> None:
        """Check the header and size of every entry this process would reuse; damaged ones (empty, truncated) are
        deleted, so the build below encodes them again, before any model needs them."""
        wanted: dict[str, set[str]] = {"text": set(), "latents": set()}
        for i in mine:
            if latents:
                wanted["latents"].add(self.latent_keys[i])
            if text:
                caption_key, empty_key = self.text_keys[i]
                wanted["text"].update((caption_key, empty_key) if need_empty_captions else (caption_key,))
        damaged = 0
        for kind, keys in wanted.items():
            for key in keys & self._on_disk[kind]:
                path = entry_file(self.dir, kind, key)
                if path is not None and not entry_intact(path):
                    path.unlink(missing_ok=True)
                    self._on_disk[kind].discard(key)
                    damaged += 1
        self.healed = damaged
        if damaged:
            logger.warning("embedding cache %s: %d damaged entr%s (empty or truncated files) deleted; encoding them again",
                           self.dir, damaged, "y" if damaged == 1 else "ies")

    def _encode_latents(self, ds: CaptionDataset, chunk: list[int]) -> None:
        """VAE latents of samples of one shape group, in one encoder call; stored per sample."""
        target, extra = self.adapter.encode_latents(collate([ds[(i, 0)] for i in chunk]))
        controls = extra["control_latents"]
        if len(chunk) > 1 and (target.shape[0] != len(chunk) or any(c.shape[0] != len(chunk) for c in controls)):
            for i in chunk:  # a family whose latents are not one row per sample: one sample per call
                self._encode_latents(ds, [i])
            return
        for row, i in enumerate(chunk):
            tensors = {"latents": target[row:row + 1], **{f"control.{k}": c[row:row + 1] for k, c in enumerate(controls)}}
            self._store("latents", self.latent_keys[i], tensors)
            self.encoded["latents"] += 1

    # --- use -----------------------------------------------------------------------------------------------
    def reader(self, text: bool, latents: bool) -> "CacheReader | None":
        """For the data loader: a disk cache's entries read per sample where the sample is loaded (see CacheReader)."""
        if self.dir is None:
            return None
        return CacheReader(self.dir, self.text_keys if text else None, self.latent_keys if latents else None)

    @staticmethod
    def _loaded(batch: dict, kind: str) -> list | None:
        cached = batch.get("cached")
        return [c[kind] for c in cached] if cached and kind in cached[0] else None

    def batch_text(self, batch: dict) -> dict:
        entries = self._loaded(batch, "text") or [
            self._lookup("text", self.text_keys[i][1 if dropped else 0]) for i, dropped in zip(batch["indices"], batch["dropped"])]
        items = [{k: v.to(self.adapter.device, non_blocking=True) for k, v in entry.items()} for entry in entries]
        return self.adapter.merge_text(items)

    def batch_latents(self, batch: dict) -> tuple[torch.Tensor, dict]:
        entries = self._loaded(batch, "latents") or [self._lookup("latents", self.latent_keys[i]) for i in batch["indices"]]
        dev = self.adapter.device
        target = torch.cat([e["latents"] for e in entries]).to(dev, non_blocking=True)
        n_controls = sum(1 for k in entries[0] if k.startswith("control."))
        controls = [torch.cat([e[f"control.{k}"] for e in entries]).to(dev, non_blocking=True) for k in range(n_controls)]
        return target, {"control_latents": controls}
