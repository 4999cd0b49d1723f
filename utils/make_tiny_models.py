"""Build tiny random-weight diffusers pipelines with the real model classes, entirely offline.

The tests and `make demo` use these folders exactly as a user would use a downloaded model: they are
loaded with the ordinary `from_pretrained` code paths. Nothing is mocked; the models are just small.
Each family builds its own (`ModelAdapter.make_tiny_model` in trainer/models/<family>.py).

    python utils/make_tiny_models.py --family qwen-image --out demo/tiny-qwen-image
    python utils/make_tiny_models.py --family qwen-image-edit --out /tmp/edit --realistic   # released pixel budgets
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def make_tiny_model(family: str, out: str | Path, realistic: bool = False) -> Path:
    """Build (once) the tiny pipeline of a variant name into `out`; an existing complete folder is reused."""
    from trainer.config import TrainConfig
    from trainer.models import variants

    out = Path(out)
    if (out / "model_index.json").exists():
        return out
    cls, variant = variants()[family]
    tmp = out.with_name(out.name + ".partial")
    cls(TrainConfig(), variant).make_tiny_model(tmp, realistic=realistic)
    tmp.rename(out)
    return out


def main(argv: list[str] | None = None) -> int:
    from trainer.models import variants

    names = sorted(variants())
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", choices=names + ["all"], required=True, help="a variant name, or all (one subfolder each)")
    p.add_argument("--out", required=True, help="folder to write the diffusers pipeline to")
    p.add_argument("--realistic", action="store_true",
                   help="processors / tokenizers with the released pixel budgets and templates (real sequence lengths)")
    args = p.parse_args(argv)
    targets = {n: Path(args.out) / n for n in names} if args.family == "all" else {args.family: Path(args.out)}
    for family, out in targets.items():
        print(f"tiny {family} pipeline at {make_tiny_model(family, out, args.realistic)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
