"""What each LoRA-toolkit option costs per optimizer step (issue 27): adapter types, masked loss, prior preservation,
DOP, tag shuffling, on the bench-size Qwen-Image transformer of bench/throughput.py.

    python bench/toolkit.py [--steps 12] [--resolution 256] [--layers 6]

Each row trains with the real loop (`trainer.loop.train`) twice, for --steps and for 2 steps; the step time is the
difference over the extra steps (setup, caching and saving cancel out). fp32, LoRA rank 16, batch 1.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def rows(root: Path, data: Path) -> list[tuple[str, list[str]]]:
    masks = root / "masks"
    masks.mkdir(exist_ok=True)
    for img in sorted(data.glob("*.png")):
        w, h = Image.open(img).size
        arr = np.zeros((h, w), dtype=np.uint8)
        arr[:, : w // 2] = 255
        Image.fromarray(arr).save(masks / img.name)
    reg = root / "reg"
    shutil.copytree(data, reg, dirs_exist_ok=True)
    return [
        ("LoRA (baseline)", []),
        ("DoRA", ["use_dora=true"]),
        ("rsLoRA + LoRA+ (ratio 16)", ["use_rslora=true", "loraplus_lr_ratio=16"]),
        ("LoKr (factor 16)", ["lora_type=lokr", "lokr_factor=16"]),
        ("LoHa", ["lora_type=loha"]),
        ("masked loss (mask_dir)", [f"data_config.mask_dir={masks}"]),
        ("prior preservation (2 datasets, loss_weight 0.5)",
         [f"data_config.datasets=[{{img_dir: {data}, weight: 1}}, {{img_dir: {reg}, weight: 1, loss_weight: 0.5}}]", "data_config.img_dir=''"]),
        ("trigger word + shuffle_tags (prompts encoded every step)", ["data_config.trigger_word=sks", "data_config.shuffle_tags=true"]),
        ("DOP (dop_class_word; prompts encoded every step)", ["data_config.trigger_word=sks", "dop_class_word=person"]),
    ]


def timed(model: Path, data: Path, out: Path, res: int, steps: int, extra: list[str]) -> float:
    from trainer.config import load_config
    from trainer.loop import train
    from trainer.models.qwen_image import QwenImageAdapter

    overrides = [f"pretrained_model_name_or_path={model}", f"data_config.img_dir={data}", f"data_config.img_size={res}",
                 f"output_dir={out}", "mixed_precision=no", "report_to=none", f"max_train_steps={steps}", "checkpointing_steps=0",
                 f"logging_steps={steps}", "rank=16", "validation_samples=0", "lr_warmup_steps=0", *extra]
    start = time.perf_counter()
    train(load_config(None, overrides), QwenImageAdapter)
    shutil.rmtree(out, ignore_errors=True)
    return time.perf_counter() - start


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--resolution", type=int, default=256)
    args = p.parse_args(argv)
    logging.disable(logging.WARNING)
    from bench.throughput import bench_model
    from utils.make_demo_dataset import make_dataset

    root = Path(tempfile.mkdtemp())
    model = bench_model(root, args.layers)
    data = make_dataset(root / "data", count=8, size=args.resolution)
    for f in list(data.glob("shape_0[04].*")):  # one aspect ratio, as in bench/throughput.py
        f.unlink()
    device = "cuda" if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"
    print(f"bench-size Qwen-Image transformer ({args.layers} blocks, width 512), {args.resolution} px, batch 1, LoRA rank 16, fp32, {device}")
    print(f"{'option':<58} {'s/step':>7} {'x LoRA':>7}")
    base = None
    for name, extra in rows(root, data):
        step = (timed(model, data, root / "out", args.resolution, args.steps, extra)
                - timed(model, data, root / "out", args.resolution, 2, extra)) / (args.steps - 2)
        base = base or step
        print(f"{name:<58} {step:>7.3f} {step / base:>7.2f}", flush=True)
    shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
