"""FLUX.1-dev: which distilled-guidance value to train a LoRA at (config key `guidance_scale`).

The transformer takes the guidance value as an input. A LoRA trained at guidance g learns its correction for that
input; inference then runs at the pipeline's default 3.5. This trains the tiny FLUX model's LoRA on one image at
g = 1.0 and g = 3.5 (same seed, steps and data) and measures the flow-matching loss of each LoRA on that image over
fixed noise and sigmas, with the guidance input at 1.0 and at 3.5.

    python bench/flux_guidance.py [--steps 80]
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

import torch


def eval_loss(model: Path, lora_dir: Path | None, data_cfg, guidance: float) -> float:
    from image_datasets import CaptionDataset, collate, scan_dataset
    from trainer import flow_matching as fm
    from trainer.config import load_config
    from trainer.methods.lora import LoRAMethod
    from trainer.models.flux import FluxAdapter

    cfg = load_config(None, [f"pretrained_model_name_or_path={model}", "mixed_precision=no", f"guidance_scale={guidance}",
                             "rank=8"], check_paths=False)
    adapter = FluxAdapter.from_model(cfg)
    adapter.load()
    if lora_dir is not None:
        method = LoRAMethod(cfg, adapter)
        method.attach(adapter.transformer)
        method.load(adapter.transformer, lora_dir)
    samples = scan_dataset(data_cfg).samples
    batch = collate([CaptionDataset(samples)[(0, 0)]])
    g = torch.Generator().manual_seed(123)
    losses = []
    with torch.no_grad():
        x0, cond = adapter.encode_batch(batch)
        for sigma in torch.linspace(0.05, 0.95, 16):
            noise = torch.randn(x0.shape, generator=g)
            s = sigma.view(1)
            pred = adapter.predict(adapter.transformer, fm.add_noise(x0, noise, s), s, cond)
            losses.append(fm.flow_matching_loss(pred, fm.velocity_target(x0, noise), s).item())
    return sum(losses) / len(losses)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=80)
    args = p.parse_args(argv)
    logging.disable(logging.WARNING)
    from trainer.config import DataConfig, load_config
    from trainer.loop import train
    from trainer.models.flux import FluxAdapter
    from utils.make_demo_dataset import make_dataset
    from utils.make_tiny_models import make_tiny_model

    root = Path(tempfile.mkdtemp())
    model = make_tiny_model("flux", root / "flux")
    data = make_dataset(root / "data", count=1, size=64)
    data_cfg = DataConfig(img_dir=str(data), img_size=64)
    rows = {"base (no LoRA)": {g: eval_loss(model, None, data_cfg, g) for g in (1.0, 3.5)}}
    for train_g in (1.0, 3.5):
        out = root / f"g{train_g}"
        train(load_config(None, [f"pretrained_model_name_or_path={model}", f"data_config.img_dir={data}", "data_config.img_size=64",
                                 f"output_dir={out}", "mixed_precision=no", "report_to=none", f"max_train_steps={args.steps}",
                                 "checkpointing_steps=0", "learning_rate=3e-3", "rank=8", f"guidance_scale={train_g}", "seed=0"]),
              FluxAdapter)
        rows[f"LoRA trained at {train_g}"] = {g: eval_loss(model, out, data_cfg, g) for g in (1.0, 3.5)}
    print(f"tiny FLUX.1-dev-shaped model, one 64 px image, {args.steps} steps, rank 8; mean loss over 16 fixed sigmas")
    print("| weights | loss at guidance 1.0 | loss at guidance 3.5 (inference default) |")
    print("| --- | --- | --- |")
    for name, r in rows.items():
        print(f"| {name} | {r[1.0]:.4f} | {r[3.5]:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
