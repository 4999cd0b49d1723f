"""Precomputed prompt embeddings and VAE latents.

Each sample's text conditioning and latents are computed once (in RAM, or as safetensors files in cache_dir when
save_cache_on_disk is set) and keyed by a hash of everything they depend on: file contents, caption, training size,
control images, the model's component configs and the encoding settings. A later run reuses every entry whose key
still matches, so only changed files are re-encoded. Afterwards the text encoder / VAE can be freed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch
from safetensors.torch import load_file, save_file

from image_datasets import CaptionDataset, Sample, collate
from trainer.config import TrainConfig

if TYPE_CHECKING:
    from trainer.models.base import ModelAdapter

logger = logging.getLogger("trainer")


def file_digest(path: Path, _memo: dict = {}) -> str:  # noqa: B006 - deliberate per-process memo
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _memo:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _memo[key] = h.hexdigest()
    return _memo[key]


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


class EmbeddingCache:
    def __init__(self, adapter: "ModelAdapter", samples: Sequence[Sample], cfg: TrainConfig, directory: Path | None):
        self.adapter = adapter
        self.samples = list(samples)
        self.cfg = cfg
        self.dir = directory
        self.model = model_fingerprint(cfg.pretrained_model_name_or_path, adapter.variant.name, adapter.encoder_folders)
        self.text: dict[str, dict[str, torch.Tensor]] = {}
        self.latents: dict[str, dict[str, torch.Tensor]] = {}
        self.text_keys: list[tuple[str, str]] = []  # per sample: (caption key, empty-caption key)
        self.latent_keys: list[str] = []
        self.encoded = {"text": 0, "latents": 0}
        self.reused = {"text": 0, "latents": 0}

    # --- keys ----------------------------------------------------------------------------------------------
    def _controls(self, s: Sample) -> list:
        return [(file_digest(c), size) for c, size in zip(s.controls, s.control_sizes)] + list(s.condition_sizes)

    def _text_key(self, s: Sample, caption: str) -> str:
        controls = self._controls(s) if self.adapter.text_needs_pixels else []
        return _digest("text", self.model, caption, self.cfg.max_sequence_length, self.cfg.t5_max_sequence_length,
                       controls, str(self.adapter.weight_dtype))

    def _latent_key(self, s: Sample) -> str:
        return _digest("latents", self.model, file_digest(s.image), s.size, self._controls(s))

    # --- storage -------------------------------------------------------------------------------------------
    def _path(self, kind: str, key: str) -> Path:
        return self.dir / kind / f"{key}.safetensors"

    def _lookup(self, kind: str, key: str) -> dict | None:
        store = self.text if kind == "text" else self.latents
        if key in store:
            return store[key]
        if self.dir is not None and self._path(kind, key).is_file():
            try:
                store[key] = load_file(str(self._path(kind, key)))
                return store[key]
            except Exception as e:  # a torn or foreign file: recompute it
                logger.warning("cache file %s unreadable (%s); recomputing", self._path(kind, key), e)
        return None

    def _store(self, kind: str, key: str, tensors: dict[str, torch.Tensor]) -> None:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        (self.text if kind == "text" else self.latents)[key] = tensors
        if self.dir is not None:
            path = self._path(kind, key)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
            save_file(tensors, str(tmp))
            os.replace(tmp, path)

    # --- building ------------------------------------------------------------------------------------------
    def build(self, text: bool, latents: bool, need_empty_captions: bool) -> None:
        """Encode whatever is missing. Runs one sample at a time (a one-off pass; memory stays flat)."""
        ds = CaptionDataset(self.samples, reference_transform=self.adapter.reference_transform())
        for i, s in enumerate(self.samples):
            self.text_keys.append((self._text_key(s, s.caption), self._text_key(s, self.adapter.empty_prompt)))
            self.latent_keys.append(self._latent_key(s))
        for i, s in enumerate(self.samples):
            batch = None
            if latents and self._lookup("latents", self.latent_keys[i]) is None:
                batch = collate([ds[(i, 0)]])
                target, extra = self.adapter.encode_latents(batch)
                tensors = {"latents": target, **{f"control.{k}": c for k, c in enumerate(extra["control_latents"])}}
                self._store("latents", self.latent_keys[i], tensors)
                self.encoded["latents"] += 1
            elif latents:
                self.reused["latents"] += 1
            if not text:
                continue
            captions = [(s.caption, self.text_keys[i][0])]
            if need_empty_captions:
                captions.append((self.adapter.empty_prompt, self.text_keys[i][1]))
            for caption, key in captions:
                if self._lookup("text", key) is not None:
                    self.reused["text"] += 1
                    continue
                batch = batch or collate([ds[(i, 0)]])
                cond = self.adapter.encode_text({**batch, "captions": [caption]})
                self._store("text", key, self.adapter.split_text(cond, 1)[0])
                self.encoded["text"] += 1
        logger.info(
            "embedding cache: text %d encoded / %d reused, latents %d encoded / %d reused%s",
            self.encoded["text"], self.reused["text"], self.encoded["latents"], self.reused["latents"],
            f" (in {self.dir})" if self.dir else " (in RAM)",
        )

    # --- use -----------------------------------------------------------------------------------------------
    def batch_text(self, batch: dict) -> dict:
        items = []
        for i, dropped in zip(batch["indices"], batch["dropped"]):
            entry = self._lookup("text", self.text_keys[i][1 if dropped else 0])
            items.append({k: v.to(self.adapter.device, non_blocking=True) for k, v in entry.items()})
        return self.adapter.merge_text(items)

    def batch_latents(self, batch: dict) -> tuple[torch.Tensor, dict]:
        entries = [self._lookup("latents", self.latent_keys[i]) for i in batch["indices"]]
        dev = self.adapter.device
        target = torch.cat([e["latents"] for e in entries]).to(dev, non_blocking=True)
        n_controls = sum(1 for k in entries[0] if k.startswith("control."))
        controls = [torch.cat([e[f"control.{k}"] for e in entries]).to(dev, non_blocking=True) for k in range(n_controls)]
        return target, {"control_latents": controls}
