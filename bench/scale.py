"""How the data path scales with the number of images N (tiny Qwen-Image model, so the model costs stay small).

    python bench/scale.py                       # N = 1k, 4k, 16k
    python bench/scale.py --sizes 1000,4000,16000,64000 --processes 1,2

For each N (96-160 px PNGs with captions, made once and hard-linked into one folder per N) it prints:
- validate s: `utils/validate_dataset.py`'s full check (decodes every image), in-process;
- cold s / cold ms/img: a one-step training run with the disk caches on and an empty cache folder (scan, decode,
  hash, cache build, first step), and per image;
- 2-proc cold s: the same under `accelerate launch` with 2 CPU processes (each builds half of the cache), timed like
  the 1-process run from each process's start (the slower one), so the launcher's own start-up is not counted;
- warm s: the same one-step run again (scan index and cache warm): launch-to-first-step of a restart;
- warm RSS MiB: that run's peak resident memory;
- cache files / MiB: what the cache folder holds.
The last rows give the growth per image between the smallest and largest N (the model's fixed costs cancel).
Every run is a separate process (`--child`), so timings and RSS are its own. `--threads 1` gives every process one
torch thread: on a 2-core machine that is the fair way to see how the split build scales with processes (with the
default threads one process already uses both cores for the VAE).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

START = time.perf_counter()
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def make_images(folder: Path, n: int, seed: int = 0) -> None:
    """n PNGs of 96-160 px sides (random noise) with one-line captions; existing ones are kept."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        w, h = (int(v) for v in rng.integers(96, 161, size=2))
        path = folder / f"img{i:07d}.png"
        if path.is_file():
            continue
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path, compress_level=1)
        (folder / f"img{i:07d}.txt").write_text(f"a photo of thing number {i}, {w} by {h} pixels")


def linked_subset(pool: Path, folder: Path, n: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        for ext in (".png", ".txt"):
            src, dst = pool / f"img{i:07d}{ext}", folder / f"img{i:07d}{ext}"
            if not dst.exists():
                os.link(src, dst)
    return folder


def overrides(model: Path, data: Path, out: Path, cache: Path) -> list[str]:
    return [f"pretrained_model_name_or_path={model}", f"data_config.img_dir={data}", "data_config.img_size=64",
            f"output_dir={out}", f"cache_dir={cache}", "mixed_precision=no", "report_to=none", "max_train_steps=1",
            "checkpointing_steps=0", "rank=4", "precompute_text_embeddings=true", "precompute_image_embeddings=true",
            "save_cache_on_disk=true", "data_config.num_workers=0"]


def child(args) -> int:
    """One training run (1 step); prints its wall time from process start and its peak RSS as JSON."""
    import logging

    from trainer.cli import setup_logging
    from trainer.config import load_config
    from trainer.loop import train
    from trainer.models.qwen_image import QwenImageAdapter

    setup_logging()
    logging.getLogger("trainer").setLevel(logging.WARNING)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    train(load_config(None, overrides(Path(args.model), Path(args.data), Path(args.out), Path(args.cache))), QwenImageAdapter)
    print(json.dumps({"seconds": time.perf_counter() - START, "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
    return 0


def run_child(model: Path, data: Path, out: Path, cache: Path, processes: int = 1, threads: int = 0) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    script = [str(Path(__file__).resolve()), "--child", "--model", str(model), "--data", str(data), "--out", str(out), "--cache", str(cache),
              "--threads", str(threads)]
    if processes == 1:
        cmd = [sys.executable, *script]
    else:
        env["ACCELERATE_USE_CPU"] = "true"
        cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *script]
    t = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-3000:])
    results = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    return {"seconds": max(x["seconds"] for x in results), "rss_mib": max(x["rss_mib"] for x in results), "wall": time.perf_counter() - t}


def validate_seconds(data: Path) -> float:
    from image_datasets import scan_caption_folder

    t = time.perf_counter()
    result = scan_caption_folder(data, 64, decode=True)
    assert not result.problems, result.problems[:3]
    return time.perf_counter() - t


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1000,4000,16000")
    p.add_argument("--processes", default="1,2", help="process counts for the cold cache build (1 is always measured)")
    p.add_argument("--work", default=None, help="folder for images, caches and runs (default: a temporary folder)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per process (0 = torch's default)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    for name in ("model", "data", "out", "cache"):
        p.add_argument(f"--{name}", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args)

    from utils.make_tiny_models import make_tiny_model

    sizes = [int(n) for n in args.sizes.split(",")]
    procs = [int(n) for n in args.processes.split(",") if int(n) > 1]
    work = Path(args.work or tempfile.mkdtemp(prefix="scale-"))
    model = make_tiny_model("qwen-image", work / "model")
    t = time.perf_counter()
    make_images(work / "pool", max(sizes))
    print(f"made {max(sizes)} images in {time.perf_counter() - t:.0f} s under {work}", flush=True)
    header = (f"{'N':>7} {'validate s':>10} {'cold s':>7} {'cold ms/img':>11} "
              + "".join(f"{f'{k}-proc cold s':>14}" for k in procs)
              + f" {'warm s':>7} {'warm RSS MiB':>12} {'cache files':>11} {'cache MiB':>9}")
    print(header, flush=True)
    rows = []
    for n in sizes:
        data = linked_subset(work / "pool", work / f"data-{n}", n)
        row = {"n": n, "validate": validate_seconds(data)}
        cache = work / f"cache-{n}"
        shutil.rmtree(cache, ignore_errors=True)
        row["cold"] = run_child(model, data, work / "out", cache, threads=args.threads)["seconds"]
        for k in procs:
            shutil.rmtree(work / f"cache-{n}-{k}", ignore_errors=True)
            row[f"cold{k}"] = run_child(model, data, work / "out", work / f"cache-{n}-{k}", k, args.threads)["seconds"]
        warm = run_child(model, data, work / "out", cache, threads=args.threads)
        row["warm"], row["rss"] = warm["seconds"], warm["rss_mib"]
        files = [f for f in cache.rglob("*") if f.is_file()]
        row["files"], row["bytes"] = len(files), sum(f.stat().st_size for f in files)
        rows.append(row)
        print(f"{n:>7} {row['validate']:>10.1f} {row['cold']:>7.1f} {row['cold'] / n * 1e3:>11.2f} "
              + "".join(f"{row[f'cold{k}']:>14.1f}" for k in procs)
              + f" {row['warm']:>7.1f} {row['rss']:>12.1f} {row['files']:>11} {row['bytes'] / 2**20:>9.1f}", flush=True)
    if len(rows) > 1:
        a, b = rows[0], rows[-1]
        dn = b["n"] - a["n"]
        print(f"\nper image, N = {a['n']} -> {b['n']}:")
        print(f"  validate          {(b['validate'] - a['validate']) / dn * 1e3:8.3f} ms")
        print(f"  cold run          {(b['cold'] - a['cold']) / dn * 1e3:8.3f} ms (scan, decode, hash, cache build)")
        for k in procs:
            print(f"  cold run, {k} proc  {(b[f'cold{k}'] - a[f'cold{k}']) / dn * 1e3:8.3f} ms")
        print(f"  warm start        {(b['warm'] - a['warm']) / dn * 1e3:8.3f} ms (launch to first step)")
        print(f"  warm peak RSS     {(b['rss'] - a['rss']) * 1024 / dn:8.3f} KB")
        print(f"  cache on disk     {(b['bytes'] - a['bytes']) / dn / 1024:8.3f} KB")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
