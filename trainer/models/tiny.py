"""Shared pieces for building tiny random-weight test models: locally trained tokenizers (no downloads).

Each family file builds its own tiny pipeline from these (`ModelAdapter.make_tiny_model`).
"""

from __future__ import annotations

import json

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


def train_byte_level_bpe(vocab_size: int, special_tokens: list[str]):
    """Train a byte-level BPE locally and return (vocab dict, merges list)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 20, trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return model["vocab"], merges


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
