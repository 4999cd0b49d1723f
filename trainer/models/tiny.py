"""Shared pieces for building tiny random-weight test models: locally trained tokenizers (no downloads).

Each family file builds its own tiny pipeline from these (`ModelAdapter.make_tiny_model`).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# Enough text for a byte-level BPE to learn a few hundred merges; any English-ish text works.
CORPUS = """
a photo of a cat sitting on a red chair in the sun
a small dog running on the beach at sunset with waves
portrait of a woman with long hair, soft light, studio
a blue car parked in front of a white house with a garden
an oil painting of mountains and a lake under a cloudy sky
close-up of a flower with water drops, macro photography
a city street at night with neon signs and rain reflections
describe the image by detailing the color, shape, size, texture, quantity, text,
spatial relationships of the objects and background. system user assistant
the quick brown fox jumps over the lazy dog 0123456789 , . : ; ! ? ' " ( ) [ ] - _ / \\
""".strip().splitlines()


def train_byte_level_bpe(vocab_size: int, special_tokens: list[str], end_of_word_suffix: str | None = None):
    """Train a byte-level BPE locally and return (vocab dict, merges list). `end_of_word_suffix`: CLIP's "</w>"
    convention (word-final pieces carry it; without it in the vocab, CLIP's tokenizer maps every word end to its
    unknown token, which is its end-of-text token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if end_of_word_suffix:
        return _bpe_with_suffix(vocab_size, special_tokens, end_of_word_suffix)
    suffix = {}
    tok = Tokenizer(models.BPE(**suffix))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
        **suffix,
    )
    tok.train_from_iterator(CORPUS * 20, trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return model["vocab"], merges


def _bpe_with_suffix(vocab_size: int, special_tokens: list[str], suffix: str):
    """Byte-level BPE with CLIP's word-end suffix, trained here: `tokenizers`' trainer with end_of_word_suffix numbers
    its tokens (and so breaks ties between equally frequent pairs) in hash order, which differs per process, so every
    build was another tokenizer, and every tiny CLIP model another model. Ties go to the lexically smallest pair here.
    Every byte, word-final or not, is in the vocabulary (no text maps to the unknown token)."""
    from collections import Counter

    from tokenizers import pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    words: Counter = Counter()
    for line in CORPUS * 20:
        for word, _ in byte_level.pre_tokenize_str(line):
            words[tuple(word[:-1]) + (word[-1] + suffix,)] += 1
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for token in [*special_tokens, *alphabet, *(c + suffix for c in alphabet)]:
        vocab.setdefault(token, len(vocab))
    merges: list[tuple[str, str]] = []
    while len(vocab) < vocab_size:
        pairs: Counter = Counter()
        for word, n in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += n
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        vocab.setdefault(best[0] + best[1], len(vocab))
        merged: Counter = Counter()
        for word, n in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += n
        words = merged
    return vocab, merges


def pin_prefix_length(tokenizer, prefix: str, specials: list[str], n_tokens: int) -> None:
    """Make `prefix` (a prompt template's system part) tokenize to exactly n_tokens, as it does with the released
    tokenizer, by adding its pieces as tokens. Pipelines drop a fixed number of leading hidden states (the template);
    with the released count the tiny model sees the same sequence layout as the real one."""
    from tokenizers import AddedToken

    parts, rest = [], prefix
    while rest:  # split off special tokens; the text between them is cut into pieces
        hit = min(((rest.find(s), s) for s in specials if s in rest), default=(len(rest), ""))
        if hit[0]:
            parts.append(("text", rest[: hit[0]]))
        if hit[1]:
            parts.append(("special", hit[1]))
        rest = rest[hit[0] + len(hit[1]) :]
    n_special = sum(kind == "special" for kind, _ in parts)
    texts = [t for kind, t in parts if kind == "text"]
    budget = n_tokens - n_special
    if budget < len(texts) or budget > sum(len(t) for t in texts):
        raise ValueError(f"cannot split the template into {n_tokens} tokens")
    # the longest text gets the pieces the others do not need (each other text is one token)
    longest = max(range(len(texts)), key=lambda i: len(texts[i]))
    k = budget - (len(texts) - 1)
    long = texts[longest]
    cuts = [round(i * len(long) / k) for i in range(k + 1)]
    pieces = [t for i, t in enumerate(texts) if i != longest] + [long[a:b] for a, b in zip(cuts, cuts[1:])]
    tokenizer.add_tokens([AddedToken(p, normalized=False, special=False) for p in dict.fromkeys(pieces)])
    got = len(tokenizer(prefix).input_ids)
    if got != n_tokens:
        raise ValueError(f"template prefix tokenizes to {got} tokens, expected {n_tokens}")


def calibration_pixels(size: int = 64, channels: int = 3) -> "torch.Tensor":
    """Synthetic pictures in [-1, 1] (B x channels x size x size): flat shapes on dark, grey and light backgrounds,
    gradients. A tiny VAE's latent normalization constants are set from its latents of these, as the released
    constants are statistics of the released VAE's latents of real images: normalized latents then have about unit
    variance, as in the real models, instead of the ~0.1 a random encoder gives (which drowns images in the noise)."""
    import numpy as np
    import torch
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(0)
    images = []
    for i in range(12):
        bg = tuple(int(v) for v in rng.integers(0, 256, 3)) if i % 3 else ((20, 20, 20), (128, 128, 128), (240, 240, 240))[i // 3 % 3]
        img = Image.new("RGB", (size, size), bg)
        d = ImageDraw.Draw(img)
        for _ in range(2):
            x0, y0 = (int(v) for v in rng.integers(0, size * 2 // 3, 2))
            x1, y1 = x0 + int(rng.integers(size // 6, size // 2)), y0 + int(rng.integers(size // 6, size // 2))
            colour = tuple(int(v) for v in rng.integers(0, 256, 3))
            (d.rectangle if rng.random() < 0.5 else d.ellipse)((x0, y0, x1, y1), fill=colour)
        images.append(np.asarray(img, dtype=np.float32))
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    images.append(np.stack([np.tile(ramp, (size, 1)), np.tile(ramp[:, None], (1, size)), np.full((size, size), 128.0)], -1))
    x = torch.from_numpy(np.stack(images)).float().permute(0, 3, 1, 2) / 127.5 - 1.0
    if channels == 4:  # RGBA VAEs: opaque pictures
        x = torch.cat([x, torch.ones_like(x[:, :1])], 1)
    return x


def latent_statistics(vae, channels: int = 3, frames: bool = False, patch: int = 1) -> tuple:
    """Per-channel mean and standard deviation of a VAE's latents (the distribution's mode) of calibration_pixels;
    `frames`: the VAE takes a frame axis; `patch`: latents are patchified p x p into channels first (FLUX.2)."""
    import torch

    x = calibration_pixels(channels=channels)
    with torch.no_grad():
        z = vae.encode(x[:, :, None] if frames else x).latent_dist.mode()
    if frames:
        z = z[:, :, 0]
    if patch > 1:
        b, c, h, w = z.shape
        z = z.view(b, c, h // patch, patch, w // patch, patch).permute(0, 1, 3, 5, 2, 4).reshape(b, c * patch * patch, h // patch, w // patch)
    return z.mean((0, 2, 3)), z.std((0, 2, 3))


def near_deterministic(layer, latent_channels: int) -> None:
    """Make a tiny VAE's posterior near-deterministic, as the released VAEs are (their predicted log-variances are very
    small): `layer` is the last one before the (mean, log-variance) split; its log-variance outputs get a bias of
    about -20 (std ~5e-5). Pipelines that encode with the posterior's sample (FluxControlPipeline's control image,
    QwenImageControlNetPipeline's, FluxFillPipeline's masked image) then get the mean to within noise, not a random
    draw that a random-weight VAE makes as large as the latents themselves."""
    import torch

    with torch.no_grad():
        layer.bias[latent_channels:] -= 20.0
