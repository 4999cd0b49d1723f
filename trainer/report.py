"""End-of-run artefacts: training_summary.json and a loss-curve PNG (drawn with PIL, no plotting dependency)."""

from __future__ import annotations

import json
import resource
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from trainer.config import TrainConfig, to_dict


def peak_memory() -> dict:
    out = {"host_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if torch.cuda.is_available():
        out["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
        out["cuda_max_reserved_bytes"] = torch.cuda.max_memory_reserved()
    return out


def read_log(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_summary(out: Path, cfg: TrainConfig, steps: int, epochs: int, seconds: float, final_loss: float, lora: Path) -> Path:
    summary = {
        "steps": steps,
        "epochs_completed": epochs,
        "seconds": round(seconds, 2),
        "steps_per_second": round(steps / seconds, 4) if seconds > 0 else None,
        "final_loss": final_loss,
        "lora": str(lora),
        "peak_memory": peak_memory(),
        "config": to_dict(cfg),
    }
    path = out / "training_summary.json"
    path.write_text(json.dumps(summary, indent=2, default=str))
    return path


def plot_losses(entries: list[dict], path: Path, size: tuple[int, int] = (800, 400)) -> Path | None:
    """Loss per step (thin) and its running mean over ~5% of the run (thick)."""
    pts = [(e["step"], e["loss"]) for e in entries if e.get("loss") == e.get("loss")]
    if len(pts) < 2:
        return None
    w, h = size
    left, right, top, bottom = 60, 20, 20, 40
    steps = [p[0] for p in pts]
    losses = [p[1] for p in pts]
    lo, hi = min(losses), max(losses)
    hi = hi if hi > lo else lo + 1e-6
    s0, s1 = steps[0], steps[-1] if steps[-1] > steps[0] else steps[0] + 1

    def xy(step, loss):
        return (left + (step - s0) / (s1 - s0) * (w - left - right), top + (hi - loss) / (hi - lo) * (h - top - bottom))

    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    d.rectangle((left, top, w - right, h - bottom), outline=(180, 180, 180))
    d.line([xy(s, l) for s, l in pts], fill=(150, 180, 230), width=1)
    k = max(1, len(pts) // 20)
    smooth = [(steps[i], sum(losses[max(0, i - k + 1) : i + 1]) / len(losses[max(0, i - k + 1) : i + 1])) for i in range(len(pts))]
    d.line([xy(s, l) for s, l in smooth], fill=(20, 60, 160), width=3)
    d.text((5, top), f"{hi:.4f}", fill="black")
    d.text((5, h - bottom - 10), f"{lo:.4f}", fill="black")
    d.text((left, h - bottom + 8), f"step {s0}", fill="black")
    d.text((w - right - 80, h - bottom + 8), f"step {s1}", fill="black")
    d.text((w // 2 - 30, h - 18), "training loss", fill="black")
    img.save(path)
    return path
