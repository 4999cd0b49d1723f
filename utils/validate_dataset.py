"""Check a training dataset before spending GPU time on it.

    python utils/validate_dataset.py --path ./my_dataset [--img_size 1024] [--caption_type txt]

Every image is fully decoded and paired with its caption. Exit 0 when the dataset is usable; otherwise exit 1 and
print one line per problem file (all problems at once, not just the first).
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from image_datasets import scan_caption_folder  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--path", required=True, help="folder of images with same-stem caption files")
    p.add_argument("--img_size", type=int, default=1024, help="training resolution, to report the crop sizes")
    p.add_argument("--caption_type", default="txt", help="caption file extension")
    args = p.parse_args(argv)
    if not Path(args.path).is_dir():
        print(f"error: --path: folder '{args.path}' does not exist", file=sys.stderr)
        return 1
    scan = scan_caption_folder(args.path, args.img_size, args.caption_type)
    for w in scan.warnings:
        print(f"warning: {w}")
    for prob in scan.problems:
        print(f"error: {prob}")
    sizes = Counter(s.size for s in scan.samples)
    print(
        f"{len(scan.samples)} usable image(s), {len(scan.problems)} problem(s); training sizes at img_size={args.img_size}: "
        + ", ".join(f"{w}x{h} ({n})" for (w, h), n in sizes.most_common())
    )
    return 1 if scan.problems or not scan.samples else 0


if __name__ == "__main__":
    sys.exit(main())
