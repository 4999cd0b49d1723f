"""Check a training dataset before spending GPU time on it.

    python utils/validate_dataset.py --config train_configs/my_run.yaml           # exactly the check training runs
    python utils/validate_dataset.py --path ./my_dataset [--img_size 1024] [--caption_type txt] [--recursive]
    python utils/validate_dataset.py --path ./targets --control_dir ./sources      # edit / Kontext pairs
    python utils/validate_dataset.py --path ./targets --control_dir ./ref1 --control_dir ./ref2   # two references
    python utils/validate_dataset.py --metadata ./edits/metadata.csv                 # metadata rows (ours or DiffSynth's)
    python utils/validate_dataset.py --webdataset 'shards/*.tar'                     # WebDataset tar shards
    python utils/validate_dataset.py --hf_dataset ./my_saved_dataset [--hf_split train]  # a Hugging Face dataset
    python utils/validate_dataset.py --path ./photos --mask_dir ./masks --trigger_word sks   # loss masks, final captions

Every image is fully decoded and paired with its caption; every metadata row is checked (file:line). With --config,
references are sized and counted as the config's model takes them, by the same code that runs before training loads
any model (with data_config.datasets: every dataset). It prints the loss masks' coverage and the trained captions of
the first samples. Exit 0 when the dataset is usable; otherwise exit 1 and print one line per problem (all at once).
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="a training YAML: check its data_config for its model, as training does")
    p.add_argument("--path", "--img_dir", dest="path", help="folder of images with same-stem caption files (data_config.img_dir)")
    p.add_argument("--control_dir", action="append", default=None,
                   help="folder of control images with the same stems (edit / Kontext datasets); repeat it (or give a "
                        "comma-separated list) for reference 1, 2, 3, ... in order")
    p.add_argument("--metadata", "--metadata_file", dest="metadata",
                   help="metadata.csv / .jsonl with image, prompt[, control_image, control_image_2, ... or DiffSynth's edit_image] columns")
    p.add_argument("--webdataset", nargs="+", help="WebDataset tar shards: paths or globs (a glob the shell expanded gives every shard)")
    p.add_argument("--hf_dataset", help="a Hugging Face dataset: save_to_disk folder, parquet / arrow file(s), imagefolder or hub id")
    p.add_argument("--hf_split", default="train", help="with --hf_dataset: the split")
    p.add_argument("--img_size", type=int, default=1024, help="training resolution, to report the crop sizes")
    p.add_argument("--caption_type", default="txt", help="caption file extension")
    p.add_argument("--recursive", action="store_true", help="also use images in subfolders")
    p.add_argument("--mask_dir", default=None, help="as data_config.mask_dir: loss masks with the images' stems")
    p.add_argument("--alpha_mask", action="store_true", help="as data_config.alpha_mask: the images' alpha channels are their masks")
    p.add_argument("--trigger_word", default="", help="as data_config.trigger_word: shown in the printed captions")
    p.add_argument("--caption_template", default=None, help="as data_config.caption_template")
    p.add_argument("overrides", nargs="*", help="with --config: key=value overrides, as for training")
    args = p.parse_args(argv)
    if sum(bool(x) for x in (args.config, args.path, args.metadata, args.webdataset, args.hf_dataset)) != 1:
        p.error("give exactly one of --config, --path, --metadata, --webdataset and --hf_dataset")
    if args.overrides and not args.config:
        p.error(f"'{args.overrides[0]}': key=value overrides apply to --config only"
                + ("; several --webdataset shards are given after the flag, before any other option" if args.webdataset else ""))
    if args.control_dir:
        args.control_dir = [f for item in args.control_dir for f in item.split(",") if f]

    from image_datasets import scan_dataset
    from trainer.cli import printable_names
    from trainer.config import ConfigError, DataConfig, load_config

    printable_names()

    if args.config:
        try:
            cfg = load_config(args.config, args.overrides)
            from trainer.data import scan_for_training
            from trainer.models import resolve

            cls, _ = resolve(cfg.pretrained_model_name_or_path)
            cls.check_setup(cfg)  # the checks training runs before its dataset scan
            scan = scan_for_training(cfg, cls.from_model(cfg))  # the variant cfg.control_type trains, too
        except (ConfigError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        img_size = cfg.data_config.img_size
        data = cfg.data_config
    else:
        checks = [("--path", args.path, Path.is_dir), ("--metadata", args.metadata, Path.is_file), ("--mask_dir", args.mask_dir, Path.is_dir),
                  *[("--control_dir", c, Path.is_dir) for c in args.control_dir or []]]
        for flag, value, is_ok in checks:
            if value and not is_ok(Path(value)):
                print(f"error: {flag}: '{value}' does not exist", file=sys.stderr)
                return 1
        from image_datasets.captions import template_problem

        problem = template_problem(args.caption_template) if args.caption_template is not None else None
        if problem:
            print(f"error: --caption_template: {problem}", file=sys.stderr)
            return 2
        controls = args.control_dir[0] if args.control_dir and len(args.control_dir) == 1 else args.control_dir
        d = DataConfig(img_dir=args.path or "", img_size=args.img_size, caption_type=args.caption_type,
                       control_dir=controls, metadata_file=args.metadata, recursive=args.recursive,
                       webdataset=args.webdataset[0] if args.webdataset and len(args.webdataset) == 1 else args.webdataset,
                       hf_dataset=args.hf_dataset, hf_split=args.hf_split, trigger_word=args.trigger_word,
                       mask_dir=args.mask_dir, alpha_mask=args.alpha_mask,
                       caption_template=args.caption_template)
        scan = scan_dataset(d)
        img_size, data = args.img_size, d
    for w in scan.warnings:
        print(f"warning: {w}")
    for prob in scan.problems:
        print(f"error: {prob}")
    if scan.masks:
        print(f"loss masks: {scan.masks[0]} sample(s), {scan.masks[1]:.0%} of their pixels trained on average")
    show_captions(scan.samples, data)
    sizes = Counter(s.size for s in scan.samples)
    refs = Counter(len(s.controls) for s in scan.samples)
    print(
        f"{len(scan.samples)} usable sample(s), {len(scan.problems)} problem(s); training sizes at img_size={img_size}: "
        + ", ".join(f"{w}x{h} ({n})" for (w, h), n in sizes.most_common())
        + ("; control images per sample: " + ", ".join(f"{k} ({n})" for k, n in sorted(refs.items())) if any(refs) else "")
    )
    return 1 if scan.problems or not scan.samples else 0


def show_captions(samples, d, n: int = 3) -> None:
    """The captions a few samples train with (trigger word and template applied; a shuffled epoch when tags shuffle)."""
    import random

    from image_datasets.captions import CaptionRule

    rules = [CaptionRule.of(part) for part in d.parts()]
    seen = set()
    for s in samples:
        if str(s.image) in seen:
            continue
        seen.add(str(s.image))
        rule = rules[s.dataset]
        caption = rule.shuffled(s.caption, random.Random(len(seen)))
        print(f"caption of {Path(str(s.image)).name}: {caption!r}" + (" (tags shuffle every epoch)" if rule.shuffle else ""))
        if len(seen) == n:
            break


if __name__ == "__main__":
    sys.exit(main())
