"""The training log (train_log.jsonl, trackers, progress bar) and the end-of-run artefacts: training_summary.json
and a loss-curve PNG (drawn with PIL, no plotting dependency)."""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from trainer.config import TrainConfig, to_dict

logger = logging.getLogger("trainer")


class TrainLog:
    """Loss, learning rate and gradient norm of every optimizer step.

    Values stay on the device until a flush, which reads them back in one host sync (and, with several processes,
    one all-reduce), appends one JSON line per step to train_log.jsonl (main process) and sends them to the
    trackers. Every process must call `flush` at the same steps. After a resume the file keeps each step exactly
    once: lines beyond the resumed step (written after the checkpoint) and damaged lines are dropped at start.
    """

    def __init__(self, path: Path, accelerator, total_steps: int, start_step: int = 0, elapsed_before: float = 0.0):
        from tqdm.auto import tqdm

        self.path, self.accelerator = path, accelerator
        self.pending: list[tuple] = []  # step, loss, lr, grad norm, extra terms
        self.last_loss = float("nan")
        self.started = time.time() - elapsed_before
        self.clock = time.time()
        if accelerator.is_main_process:
            keep_steps_up_to(path, start_step)
        self.progress = tqdm(total=total_steps, initial=start_step, desc="steps", disable=not accelerator.is_main_process,
                             dynamic_ncols=True)

    def add(self, step: int, loss: torch.Tensor, lr: float, grad_norm: torch.Tensor, extras: dict | None = None) -> None:
        """`extras`: further terms of the step (e.g. dop_loss), logged under their names."""
        self.pending.append((step, loss, lr, grad_norm, extras or {}))
        self.progress.update(1)

    def skip(self) -> None:
        """A step whose update was skipped (non-finite): counted, not logged."""
        self.progress.update(1)

    def elapsed(self) -> float:
        return time.time() - self.started

    def flush(self) -> None:
        if not self.pending:
            return
        acc = self.accelerator
        names = sorted(self.pending[-1][4])
        values = torch.stack([torch.stack([loss.float(), norm.float(), *[extras[n].float() for n in names]])
                              for _, loss, _, norm, extras in self.pending]).float()
        if acc.num_processes > 1:
            values = acc.reduce(values, reduction="mean")
        values = values.cpu().tolist()
        now = time.time()
        rate = len(self.pending) / max(now - self.clock, 1e-9)
        self.clock = now
        if acc.is_main_process:
            with open(self.path, "a") as f:
                for (step, _, lr, _, _), (loss, norm, *more) in zip(self.pending, values):
                    f.write(json.dumps({"step": step, "loss": loss, "lr": lr, "grad_norm": norm, **dict(zip(names, more))}) + "\n")
                    acc.log({"train/loss": loss, "train/lr": lr, "train/grad_norm": norm, **{f"train/{n}": v for n, v in zip(names, more)}},
                            step=step)
                f.flush()
            acc.log({"train/steps_per_second": rate}, step=self.pending[-1][0])
            self.progress.set_postfix(loss=f"{values[-1][0]:.4f}", lr=f"{self.pending[-1][2]:.2e}")
        self.last_loss = values[-1][0]
        self.pending.clear()

    def close(self) -> None:
        self.flush()
        self.progress.close()


def keep_steps_up_to(path: Path, last_step: int) -> None:
    """Rewrite the log (atomically) with its valid lines of steps <= last_step, each step once."""
    if not path.is_file():
        return
    kept: dict[int, str] = {}
    for entry in read_log(path):
        if entry["step"] <= last_step:
            kept[entry["step"]] = json.dumps(entry)
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text("".join(kept[s] + "\n" for s in sorted(kept)))
    os.replace(tmp, path)


def peak_memory() -> dict:
    out = {"host_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if torch.cuda.is_available():
        out["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
        out["cuda_max_reserved_bytes"] = torch.cuda.max_memory_reserved()
    return out


def read_log(path: Path) -> list[dict]:
    """Entries of a train_log.jsonl; a damaged line (e.g. cut by a kill mid-write) is skipped with a warning."""
    if not path.is_file():
        return []
    entries, bad = [], 0
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            if isinstance(entry, dict) and isinstance(entry.get("step"), int) and isinstance(entry.get("loss"), (int, float)):
                entries.append(entry)
                continue
        except json.JSONDecodeError:
            pass
        bad += 1
    if bad:
        logger.warning("%s: skipped %d damaged line(s)", path, bad)
    return entries


def write_summary(out: Path, cfg: TrainConfig, steps: int, epochs: int, seconds: float, final_loss: float, lora: Path) -> Path:
    summary = {
        "steps": steps,
        "epochs_completed": epochs,
        "seconds": round(seconds, 2),
        "steps_per_second": round(steps / seconds, 4) if seconds > 0 else None,
        "final_loss": final_loss,
        "lora": str(lora),  # the published weights (a LoRA file, or the transformer folder of a full fine-tune)
        "training_method": cfg.training_method,
        "peak_memory": peak_memory(),
        "config": to_dict(cfg),
    }
    path = out / "training_summary.json"
    path.write_text(json.dumps(summary, indent=2, default=str))
    return path


def plot_losses(entries: list[dict], path: Path, size: tuple[int, int] = (800, 400)) -> Path | None:
    """Loss per step (thin) and its running mean over ~5% of the run (thick)."""
    pts = [(e["step"], e["loss"]) for e in entries if math.isfinite(e.get("loss", float("nan")))]
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
