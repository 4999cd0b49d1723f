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


def trained_model(model: Path, data: Path, out: Path, **extra):
    """(adapter, transformer, method): the family's transformer with the LoRA in `out` loaded the way resume loads it."""
    from trainer.config import load_config
    from trainer.methods import make_method
    from trainer.models import resolve

    cls, _ = resolve(str(model))
    cfg = load_config(None, base_overrides(model, data, out, **extra), check_paths=False)
    adapter = cls.from_model(cfg)
    adapter.load_transformer()
    method = make_method(cfg, adapter)
    method.attach(adapter.transformer)
    method.load(adapter.transformer, out)
    return adapter, adapter.transformer, method


def adapted_layers(transformer, adapter_name: str = "default") -> dict:
    """module path -> peft layer carrying `adapter_name`."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {n: m for n, m in transformer.named_modules()
            if isinstance(m, BaseTunerLayer) and any(adapter_name in getattr(m, a, {}) for a in m.adapter_layer_names)}


def merged_weights(transformer, adapter_name: str = "default") -> dict:
    """module path -> the weight peft's own merge gives each adapted layer (base + adapter), fp32."""
    import torch

    out = {}
    with torch.no_grad():
        for name, layer in adapted_layers(transformer, adapter_name).items():
            layer.merge(adapter_names=[adapter_name])
            out[name] = layer.get_base_layer().weight.detach().float().clone()
            layer.unmerge()
    return out


def comfyui_error(comfy: dict, adapter, transformer) -> float:
    """Largest |ComfyUI's patched weight - peft's merged weight| over every adapted layer whose ComfyUI name the file
    holds, relative to the largest change the adapter makes (ComfyUI's arithmetic: comfyui_rules.comfyui_weight)."""
    import torch
    from comfyui_rules import comfyui_weight

    error, change, checked = 0.0, 0.0, 0
    for name, merged in merged_weights(transformer).items():
        base = adapted_layers(transformer)[name].get_base_layer().weight.detach().float()
        comfy_name = adapter.comfyui_names(name)[2].removesuffix(".alpha")
        parts = {k[len(comfy_name) + 1:]: v for k, v in comfy.items() if k.startswith(comfy_name + ".")}
        if not parts:
            continue
        checked += 1
        change = max(change, (merged - base).abs().max().item())
        group = adapter.comfyui_group(name)
        if group:  # a layer ComfyUI stacks with others: its rows of the stacked layer's change
            _, k, count = group
            rows = base.shape[0]
            patched = base + comfyui_weight(parts, torch.zeros(rows * count, base.shape[1]))[k * rows : (k + 1) * rows]
        else:
            patched = comfyui_weight(parts, base)
        error = max(error, (patched - merged).abs().max().item())
    assert checked and change > 0, "no trained layer of the ComfyUI file was checked"
    return error / change


def run_each(cmds: list[list[str]], timeout: int = 300, workers: int = 2) -> list:
    """subprocess.run of every command (cwd ROOT, output captured), `workers` at a time: a launch spends most of its time
    importing on one core, so two at once take about half the wall time on the 2-CPU machine the suite runs on."""
    import subprocess
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda c: subprocess.run(c, cwd=ROOT, capture_output=True, text=True, timeout=timeout), cmds))
