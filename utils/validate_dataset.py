"""Check a training dataset before spending GPU time on it.

    python utils/validate_dataset.py --path ./my_dataset [--img_size 1024] [--caption_type txt]
    python utils/validate_dataset.py --path ./targets --control_dir ./sources      # edit / Kontext pairs
    python utils/validate_dataset.py --metadata ./edits/metadata.csv                 # edit triples

Every image is fully decoded and paired with its caption. Exit 0 when the dataset is usable; otherwise exit 1 and
print one line per problem file (all problems at once, not just the first).
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

from image_datasets import scan_dataset
from trainer.config import DataConfig


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--path", help="folder of images with same-stem caption files")
    p.add_argument("--control_dir", help="folder of control images with the same stems (edit / Kontext datasets)")
    p.add_argument("--metadata", help="metadata.csv / .jsonl with image, prompt, control_image[, _2, _3] columns")
    p.add_argument("--img_size", type=int, default=1024, help="training resolution, to report the crop sizes")
    p.add_argument("--caption_type", default="txt", help="caption file extension")
    args = p.parse_args(argv)
    if bool(args.path) == bool(args.metadata):
        p.error("give exactly one of --path and --metadata")
    for flag, value, is_ok in (("--path", args.path, Path.is_dir), ("--control_dir", args.control_dir, Path.is_dir), ("--metadata", args.metadata, Path.is_file)):
        if value and not is_ok(Path(value)):
            print(f"error: {flag}: '{value}' does not exist", file=sys.stderr)
            return 1
    d = DataConfig(img_dir=args.path or "", img_size=args.img_size, caption_type=args.caption_type,
                   control_dir=args.control_dir, metadata_file=args.metadata)
    scan = scan_dataset(d)
    for w in scan.warnings:
        print(f"warning: {w}")
    for prob in scan.problems:
        print(f"error: {prob}")
    sizes = Counter(s.size for s in scan.samples)
    print(
        f"{len(scan.samples)} usable sample(s), {len(scan.problems)} problem(s); training sizes at img_size={args.img_size}: "
        + ", ".join(f"{w}x{h} ({n})" for (w, h), n in sizes.most_common())
    )
    return 1 if scan.problems or not scan.samples else 0


if __name__ == "__main__":
    sys.exit(main())
