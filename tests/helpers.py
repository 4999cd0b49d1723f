"""Shared test helpers (datasets, config overrides, log readers)."""

import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
ACCELERATE = [str(Path(PY).parent / "accelerate"), "launch", "--num_processes", "1", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no"]


def write_dataset(folder: Path, n: int = 4, size=(64, 64), seed: int = 0, captions=None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        arr = (rng.random((size[1], size[0], 3)) * 255).astype("uint8")
        Image.fromarray(arr).save(folder / f"img{i}.png")
        text = captions[i] if captions else f"a photo of thing number {i}"
        (folder / f"img{i}.txt").write_text(text)
    return folder



def base_overrides(model: Path, data: Path, out: Path, **extra) -> list[str]:
    cfg = {
        "pretrained_model_name_or_path": str(model),
        "data_config.img_dir": str(data),
        "data_config.img_size": 64,
        "output_dir": str(out),
        "mixed_precision": "no",
        "report_to": "none",
        "logging_steps": 1,
        "rank": 4,
        "max_train_steps": 4,
        "checkpointing_steps": 0,
        "learning_rate": 1e-3,
        "seed": 0,
        "data_config.control_size": 64,  # references at 64x64 area instead of the pipelines' ~1 MP: fast tests
        "validation_samples": 0,  # the shipped YAMLs render samples from the dataset; tests that want them say so
        "lr_warmup_steps": 0,  # the shipped YAMLs warm up over 10 steps; a 4-step test trains at its learning rate
    }
    cfg.update(extra)
    return [f"{k}={v}" for k, v in cfg.items()]


def read_losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]
