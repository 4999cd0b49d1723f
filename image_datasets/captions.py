"""What a caption becomes before the text encoder sees it: a trigger word, a template, comma-tag shuffling.

`finish` runs once per sample at scan time (its result is the caption that is cached, shown and trained);
`shuffle_tags` runs per (epoch, sample) in the dataset, so its captions cannot be precomputed.
"""

from __future__ import annotations

import random
import re
import string
from dataclasses import dataclass

TRIGGER = "[trigger]"  # written in a caption, replaced by the trigger word (ai-toolkit's convention)


@dataclass(frozen=True)
class CaptionRule:
    trigger_word: str = ""
    template: str | None = None  # e.g. "{trigger} {caption}"; None = "{trigger}, {caption}" with a trigger word not in the caption
    shuffle: bool = False
    keep_tags: int = 0  # leading comma-separated tags that stay in place when shuffling

    @classmethod
    def of(cls, d) -> "CaptionRule":
        """The rule a data config (trainer.config.DataConfig) asks for."""
        return cls(d.trigger_word, d.caption_template, d.shuffle_tags, d.keep_tags)

    def finish(self, caption: str) -> str:
        """The trained caption: [trigger] replaced, then the template (or the trigger word put in front when the
        caption does not name it); separators left dangling by an empty part are dropped."""
        caption = caption.replace(TRIGGER, self.trigger_word)
        template = self.template
        if template is None:
            template = "{trigger}, {caption}" if self.trigger_word and not names(caption, self.trigger_word) else "{caption}"
        text = " ".join(template.format(trigger=self.trigger_word, caption=caption).split())
        if template != "{caption}" and not (caption.strip() and self.trigger_word):  # an empty part leaves its separator
            text = text.strip(" ,")
        return text

    def shuffled(self, caption: str, rng: random.Random) -> str:
        if not self.shuffle:
            return caption
        tags = [t.strip() for t in caption.split(",")]
        tags = [t for t in tags if t]
        head, tail = tags[: self.keep_tags], tags[self.keep_tags :]
        rng.shuffle(tail)
        return ", ".join(head + tail)


def _word(word: str) -> str:
    return rf"(?<!\w){re.escape(word)}(?!\w)"


def names(caption: str, word: str) -> bool:
    """Whether `caption` holds `word` as a word of its own (not inside another: sks is not in sksx)."""
    return bool(word) and re.search(_word(word), caption) is not None


def replace_word(caption: str, word: str, by: str) -> str:
    """`caption` with every occurrence of the word `word` (as in `names`) replaced by `by`."""
    return re.sub(_word(word), lambda _m: by, caption)


def template_problem(template: str) -> str | None:
    """Why a caption template cannot be used (None when it can): it must hold {caption} and no other field."""
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as e:
        return f"'{template}' is not a template ({e}); write fields as {{caption}} / {{trigger}} and literal braces as {{{{ }}}}"
    unknown = sorted(fields - {"caption", "trigger"})
    if unknown:
        return f"'{template}' has the field {{{unknown[0]}}}; a template knows {{caption}} and {{trigger}}"
    if "caption" not in fields:
        return f"'{template}' has no {{caption}}: every image would train on the same text"
    return None
