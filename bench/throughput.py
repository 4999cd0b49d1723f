"""Training-loop overhead: time per optimizer step vs the transformer's own forward + backward on the same batch.

    python bench/throughput.py [--layers 6] [--steps 12]
    python bench/throughput.py --defaults [--steps 30]     # train_lora.yaml as shipped vs encoding every step

A bench-size Qwen-Image transformer (the real block structure, 6 blocks, width 512) is trained by the real loop
(`trainer.loop.train`, embeddings and latents precomputed) at 256 and 512 px with batch 1 and 4. In the same process
the bare transformer forward + backward is then timed on a batch of the same shape. overhead = step / (fwd + bwd).

--defaults trains train_configs/train_lora.yaml as shipped (embeddings cached by default) and with
precompute_text_embeddings / precompute_image_embeddings false (encoding every step, the old default), 256 px, batch
1, and prints the median step time and the launch-to-last-step wall time of each.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def bench_model(root: Path, layers: int) -> Path:
    """The tiny pipeline with its transformer swapped for a real-structure, width-512 one."""
    from diffusers import QwenImageTransformer2DModel

    from utils.make_tiny_models import make_tiny_model

    path = make_tiny_model("qwen-image", root / "bench-qwen")
    torch.manual_seed(0)
    QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=layers, attention_head_dim=64, num_attention_heads=8,
        joint_attention_dim=32, axes_dims_rope=(16, 24, 24),
    ).save_pretrained(path / "transformer")
    return path


def run(model: Path, data: Path, out: Path, res: int, batch: int, steps: int, config: str | None = None,
        extra: tuple[str, ...] = ("precompute_text_embeddings=true", "precompute_image_embeddings=true")) -> tuple[float, float]:
    from trainer.config import load_config
    from trainer.loop import train
    from trainer.models.qwen_image import QwenImageAdapter

    stamps: list[float] = []
    keep = {}

    class Timed(QwenImageAdapter):
        def predict(self, transformer, noisy, sigmas, cond):
            stamps.append(time.perf_counter())
            keep.update(adapter=self, transformer=transformer, noisy=noisy, sigmas=sigmas, cond=cond)
            return super().predict(transformer, noisy, sigmas, cond)

    cfg = load_config(config, [
        f"pretrained_model_name_or_path={model}", f"data_config.img_dir={data}", f"data_config.img_size={res}",
        f"data_config.train_batch_size={batch}", f"output_dir={out}", "mixed_precision=no", "report_to=none",
        f"max_train_steps={steps}", "checkpointing_steps=0", f"logging_steps={steps}", "rank=16", "resume_from_checkpoint=null",
        *extra,
    ])
    start = time.perf_counter()
    train(cfg, Timed)
    step = statistics.median(b - a for a, b in zip(stamps[1:], stamps[2:]))
    if config is not None:
        return step, time.perf_counter() - start

    adapter = keep["adapter"]
    t, params = keep["transformer"], [p for p in keep["transformer"].parameters() if p.requires_grad]
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        pred = QwenImageAdapter.predict(adapter, t, keep["noisy"], keep["sigmas"], keep["cond"])
        pred.float().pow(2).mean().backward()
        times.append(time.perf_counter() - start)
        for p in params:
            p.grad = None
    return step, statistics.median(times[1:])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--resolutions", default="256,512")
    p.add_argument("--batches", default="1,4")
    p.add_argument("--defaults", action="store_true", help="train_lora.yaml as shipped vs precompute_*: false")
    args = p.parse_args(argv)
    logging.disable(logging.WARNING)
    from utils.make_demo_dataset import make_dataset

    root = Path(tempfile.mkdtemp())
    model = bench_model(root, args.layers)
    if args.defaults:
        data = make_dataset(root / "data", count=8, size=256)
        yaml = str(Path(__file__).resolve().parent.parent / "train_configs" / "train_lora.yaml")
        print(f"train_lora.yaml, bench-size Qwen-Image transformer ({args.layers} blocks), 256 px, batch 1, {args.steps} steps, "
              f"{'cuda' if torch.cuda.is_available() else f'cpu ({torch.get_num_threads()} threads)'}")
        print(f"{'run':<48} {'step ms':>8} {'wall s':>7}")
        for name, extra in (("as shipped (cached by default)", ()),
                            ("precompute_*: false (encode every step)", ("precompute_text_embeddings=false", "precompute_image_embeddings=false"))):
            step, wall = run(model, data, root / "out", 256, 1, args.steps, config=yaml, extra=extra)
            print(f"{name:<48} {step * 1000:>8.1f} {wall:>7.1f}", flush=True)
            shutil.rmtree(root / "out", ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)
        return 0
    print(f"bench-size Qwen-Image transformer: {args.layers} blocks, width 512, LoRA rank 16, fp32 on "
          f"{'cuda' if torch.cuda.is_available() else f'cpu ({torch.get_num_threads()} threads)'}")
    print(f"{'px':>5} {'batch':>5} {'steps/s':>8} {'step ms':>8} {'fwd+bwd ms':>11} {'overhead':>9}")
    for res in [int(r) for r in args.resolutions.split(",")]:
        data = make_dataset(root / f"data{res}", count=8, size=res)
        for p_ in list(data.glob("shape_0[04].*")):  # keep one aspect ratio: every batch has the same shape
            p_.unlink()
        for batch in [int(b) for b in args.batches.split(",")]:
            out = root / f"out-{res}-{batch}"
            step, fb = run(model, data, out, res, batch, args.steps)
            print(f"{res:>5} {batch:>5} {1 / step:>8.2f} {step * 1000:>8.1f} {fb * 1000:>11.1f} {step / fb:>9.3f}", flush=True)
            shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
