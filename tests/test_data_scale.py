"""The data path at scale: the persisted scan index, header-only PNG reads, a disk cache that is not kept in RAM,
its sharded layout, a build split across processes and batched VAE calls."""

import os
import time

import numpy as np
import pytest
import torch
from helpers import base_overrides, write_dataset
from PIL import Image

import image_datasets.samples as scan_checks  # where the scan opens images (check_image)
import image_datasets.images as images
from image_datasets import scan_index
from trainer.cache import EmbeddingCache
from trainer.config import ConfigError, load_config
from trainer.loop import build_dataset
from trainer.models.qwen_image import QwenImageAdapter


def test_png_size_and_orientation_come_from_the_header(tmp_path, monkeypatch):
    plain = tmp_path / "plain.png"
    Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(plain)
    rotated = tmp_path / "rotated.png"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: width and height swap
    Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(rotated, exif=exif)
    loads = []
    real = Image.Image.load
    monkeypatch.setattr(Image.Image, "load", lambda self, *a: loads.append(self) or real(self, *a))
    assert images.oriented_size(plain) == (60, 40)
    assert images.oriented_size(rotated) == (40, 60)
    decoded = [im for im in loads if getattr(im, "im", None) is not None and im.size == (60, 40)]
    assert not decoded, "reading a PNG's size must not decode its pixels"
    assert images.load_image(rotated).size == (40, 60)  # and training sees the same orientation


class Counter:
    def __init__(self, monkeypatch):
        self.opened, self.decoded = 0, 0
        real_size, real_load = scan_checks.oriented_size, scan_checks.load_image

        def size(path):
            self.opened += 1
            return real_size(path)

        def load(path, *a, **k):
            self.decoded += 1
            return real_load(path, *a, **k)

        monkeypatch.setattr(scan_checks, "oriented_size", size)
        monkeypatch.setattr(scan_checks, "load_image", load)


def test_scan_index_skips_unchanged_files_and_rechecks_changed_ones(tiny_qwen, tmp_path, monkeypatch):
    data = write_dataset(tmp_path / "d", n=5)
    cfg = load_config(None, base_overrides(tiny_qwen, data, tmp_path / "out"))
    adapter = QwenImageAdapter.from_model(cfg)
    count = Counter(monkeypatch)
    first = build_dataset(cfg, adapter)
    assert (count.opened, count.decoded) == (5, 5)
    assert (tmp_path / "out" / "cache" / scan_index.FILE_NAME).is_file()

    count.opened = count.decoded = 0
    again = build_dataset(cfg, adapter)
    assert (count.opened, count.decoded) == (0, 0), "a restart must not open unchanged images"
    assert [(s.image, s.size) for s in again] == [(s.image, s.size) for s in first]

    # a replaced file (new size and mtime) is checked again; a now-truncated one is refused, not trusted
    Image.fromarray(np.zeros((96, 64, 3), np.uint8)).save(data / "img1.png")
    raw = (data / "img2.png").read_bytes()
    (data / "img2.png").write_bytes(raw[: len(raw) // 2])
    os.utime(data / "img2.png", ns=(time.time_ns(), time.time_ns() + 10**9))
    count.opened = count.decoded = 0
    with pytest.raises(ConfigError, match="img2.png"):
        build_dataset(cfg, adapter)
    assert count.decoded == 2
    digest = scan_index.active().digest(data / "img1.png")
    assert digest == scan_index.sha256_file(data / "img1.png")


def _with_encoders(tiny_qwen, tmp_path, n):
    """(config with the disk caches on, adapter with its encoders loaded, the scanned samples) for n images."""
    data = write_dataset(tmp_path / "d", n=n)
    cfg = load_config(None, base_overrides(tiny_qwen, data, tmp_path / "out", precompute_text_embeddings=True,
                                           precompute_image_embeddings=True, save_cache_on_disk=True))
    adapter = QwenImageAdapter.from_model(cfg)
    samples = build_dataset(cfg, adapter)
    adapter.load_encoders()
    return cfg, adapter, samples


def test_disk_cache_is_sharded_and_not_kept_in_ram(tiny_qwen, tmp_path):
    cfg, adapter, samples = _with_encoders(tiny_qwen, tmp_path, 6)
    cache = EmbeddingCache(adapter, samples, cfg, tmp_path / "cache", batch_size=4, lru=2)
    cache.build(True, True, False)
    assert cache.encoded == {"text": 6, "latents": 6}
    assert not cache.text and not cache.latents, "building a disk cache must not keep its entries"
    files = sorted((tmp_path / "cache").rglob("*.safetensors"))
    assert len(files) == 12 and all(f.parent.name == f.stem[:2] and f.parent.parent.name in ("text", "latents") for f in files)
    for i in range(6):
        batch = {"indices": [i], "dropped": [False]}
        cache.batch_text(batch)
        cache.batch_latents(batch)
        assert len(cache.text) <= 2 and len(cache.latents) <= 2

    # the same latents, encoded one per VAE call, equal the batched ones
    single = EmbeddingCache(adapter, samples, cfg, None, batch_size=1)
    single.build(False, True, False)
    for i in range(6):
        batch = {"indices": [i], "dropped": [False]}
        torch.testing.assert_close(cache.batch_latents(batch)[0], single.batch_latents(batch)[0], rtol=1e-5, atol=1e-5)


def test_framed_cache_keys_equal_the_plain_digest():
    """The fast key makers must give the keys earlier versions wrote (an existing cache stays valid)."""
    from trainer.cache import _digest, _Framed

    text = _Framed(("text", "model-fp", None, 1024, 512, [], "torch.bfloat16"), (2,))
    for caption in ["", "a cat", 'quotes " and \\ backslash', "猫 🐈 \u0000 \n\t", "x" * 1000]:
        assert text(caption) == _digest("text", "model-fp", caption, 1024, 512, [], "torch.bfloat16")
    latent = _Framed(("latents", "model-fp", None, None, []), (2, 3))
    for digest, size in [("ab" * 32, (64, 48)), ("0" * 64, (1024, 1024))]:
        assert latent(digest, size) == _digest("latents", "model-fp", digest, size, [])


def test_disk_cache_entries_are_read_in_dataloader_workers(tiny_qwen, tmp_path):
    from image_datasets import CaptionDataset, SizeGroupedBatchSampler, collate

    cfg, adapter, samples = _with_encoders(tiny_qwen, tmp_path, 6)
    cache = EmbeddingCache(adapter, samples, cfg, tmp_path / "cache", batch_size=4)
    cache.build(True, True, True)
    ds = CaptionDataset(samples, caption_dropout_rate=0.5, load_pixels=False, cached=cache.reader(True, True))
    loader = torch.utils.data.DataLoader(ds, batch_sampler=SizeGroupedBatchSampler([s.group for s in samples], 2, 0),
                                         collate_fn=collate, num_workers=2)
    batches = [(batch, cache.batch_text(batch), cache.batch_latents(batch)) for batch in loader]
    assert not cache.text and not cache.latents, "the main process must not read entries the workers loaded"
    assert sorted(i for b, _, _ in batches for i in b["indices"]) == list(range(6))
    for batch, text, (latents, _) in batches:
        again = {**batch, "cached": None}  # the same batch looked up in the main process
        torch.testing.assert_close(text, cache.batch_text(again), rtol=0, atol=0)
        torch.testing.assert_close(latents, cache.batch_latents(again)[0], rtol=0, atol=0)

    # a cache folder shared by all processes is split across all; one per machine is built whole on each machine
    from trainer.cache import split_for

    assert [split_for([True] * 4, ["a", "a", "b", "b"], p) for p in range(4)] == [(0, 4), (1, 4), (2, 4), (3, 4)]
    assert [split_for([True, True, False, False], ["a", "a", "b", "b"], p) for p in range(4)] == [(0, 2), (1, 2), (0, 2), (1, 2)]


def test_disk_cache_build_is_split_between_processes(tiny_qwen, tmp_path):
    cfg, adapter, samples = _with_encoders(tiny_qwen, tmp_path, 5)
    shares = []
    for rank in (0, 1):
        cache = EmbeddingCache(adapter, samples, cfg, tmp_path / "cache", batch_size=2)
        cache.build(True, True, False, rank=rank, world=2)
        shares.append(dict(cache.encoded))
    assert shares == [{"text": 3, "latents": 3}, {"text": 2, "latents": 2}]
    whole = EmbeddingCache(adapter, samples, cfg, tmp_path / "cache")
    whole.build(True, True, False)
    assert whole.encoded == {"text": 0, "latents": 0} and whole.reused == {"text": 5, "latents": 5}


@pytest.mark.parametrize("variant", ["qwen-image", "flux", "chroma", "z-image", "kandinsky5", "flux2-klein", "ernie-image", "krea2", "ideogram4",
                                     "hidream-i1"])
def test_batched_caption_encoding_equals_one_at_a_time(variant, tiny_models, tmp_path):
    """The cache encodes captions cache_batch_size at a time; each stored entry (padding cut) must equal the entry
    of that caption encoded alone, shape included."""
    from trainer.models import variants

    captions = ["a cat", "a photo of a very long and detailed scene with many words in it, at dusk", "", "two dogs"]
    data = write_dataset(tmp_path / "d", n=4, captions=captions)
    cls, name = variants()[variant]
    cfg = load_config(None, base_overrides(tiny_models(variant), data, tmp_path / "out", precompute_text_embeddings=True))
    adapter = cls.from_model(cfg)
    samples = build_dataset(cfg, adapter)
    adapter.load_encoders()
    batched = EmbeddingCache(adapter, samples, cfg, None, batch_size=4)
    batched.build(True, False, False)
    assert batched.encoded["text"] == 4
    for i in range(4):
        alone = adapter.split_text(adapter.encode_text({"captions": [samples[i].caption]}), 1)[0]
        entry = batched.text[batched.text_keys[i][0]]
        assert entry.keys() == alone.keys()
        for k in alone:
            assert entry[k].shape == alone[k].shape, (k, entry[k].shape, alone[k].shape)
            torch.testing.assert_close(entry[k].float(), alone[k].float(), rtol=1e-4, atol=1e-5)

    # check_sequences tokenizes only captions that could be over the limit (ModelAdapter.long_captions): a caption of
    # b UTF-8 bytes must never count more than b + 8 tokens over the empty caption
    tricky = [" ", "猫が椅子に座っている", "🐈🐈‍⬛ emoji", "a  b\t\tc\n\nd", "ÀÉÎõü " * 20, "x" * 300, "<|im_start|> </s> [INST]", "\n\n"]
    empty = adapter.count_tokens([""])[0]
    for caption, n in zip(tricky, adapter.count_tokens(tricky)):
        assert n <= empty + len(caption.encode()) + 8, (caption, n, empty)
    counts = adapter.count_tokens([s.caption for s in samples])
    for limit in (empty + 2, max(counts) - 1, max(counts)):  # the shortcut finds exactly what counting every caption finds
        assert [(s.caption, n) for s, n in adapter.long_captions(samples, limit)] == [
            (s.caption, n) for s, n in zip(samples, counts) if n > limit]
