"""Checkpoints: written to a temporary folder, fsynced, then renamed into place, so `latest` never finds half of one.

checkpoint-N/
    <the training method's files>      e.g. pytorch_lora_weights.safetensors (trainer/methods/)
    training_state.pt                  optimizer, LR schedule, step, data position, every RNG (torch.load weights_only)
    config.yaml                        the configuration the run used
    owner.json                         the run that wrote it and the files it wrote (trainer/output_dir.py)
"""

from __future__ import annotations

import errno
import logging
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from trainer.constants import CONFIG_FILE, STATE_FILE
from trainer.output_dir import checkpoints, owner_id, remove_checkpoint, write_owner

logger = logging.getLogger("trainer")


@dataclass
class TrainState:
    """Where the run is: everything besides weights and optimizer needed to continue exactly."""

    global_step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of `epoch` already consumed by this process
    nonfinite_steps: int = 0  # updates skipped because the loss or gradients were not finite
    elapsed_seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def fsync_tree(path: Path) -> None:
    for root, _dirs, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(root))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems do not support fsync on directories
    finally:
        os.close(fd)


def complete_checkpoints(output_dir: str | Path, required: tuple[str, ...] = (), run_id: str | None = None) -> list[tuple[int, Path]]:
    """(step, path) of every finished checkpoint (holding the state file and `required`), oldest first; with
    `run_id`, only those that run wrote (trainer/output_dir.py). Half-written temporary folders are ignored."""
    return [(step, p) for step, p in checkpoints(Path(output_dir))
            if all((p / f).is_file() for f in (STATE_FILE, *required)) and (run_id is None or owner_id(p) == run_id)]


def latest_checkpoint(output_dir: str | Path, required: tuple[str, ...] = (), run_id: str | None = None) -> Path | None:
    ckpts = complete_checkpoints(output_dir, required, run_id)
    return ckpts[-1][1] if ckpts else None


def rng_state() -> dict:
    """Global RNGs (python, numpy, torch, CUDA). Noise and caption dropout are seeded per sample and need none of it,
    but user code and library internals may draw from these."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    output_dir: str | Path,
    state: TrainState,
    write_weights: Callable[[Path], None],
    optimizer: torch.optim.Optimizer | None,
    lr_scheduler: Any,
    config_yaml: str,
    total_limit: int | None = None,
    is_main: bool = True,
    barrier: Callable[[], None] = lambda: None,
    run_id: str = "",
) -> Path:
    """Write checkpoint-<step> atomically, then delete the oldest complete ones beyond total_limit.

    Every process of a run calls this: `write_weights` runs on each (a sharded run writes its shards from every
    rank; other writers act on the main process only), everything else on the main process. `optimizer=None`: its
    state is in the weights' own (sharded) files. The checkpoint records `run_id` and the files it holds (owner.json):
    rotation deletes only that run's checkpoints, and in them only the files it wrote."""
    out = Path(output_dir)
    final = out / f"checkpoint-{state.global_step}"
    tmp = out / f".tmp-checkpoint-{state.global_step}"
    if is_main:
        warn_if_low_on_space(out)
        shutil.rmtree(tmp, ignore_errors=True)
    try:
        if is_main:
            tmp.mkdir(parents=True)
        barrier()
        write_weights(tmp)
        if is_main:
            torch.save(
                {
                    "train_state": asdict(state),
                    **({"optimizer": optimizer.state_dict()} if optimizer is not None else {}),
                    "lr_scheduler": lr_scheduler.state_dict(),
                    "rng": rng_state(),
                },
                tmp / STATE_FILE,
            )
            (tmp / CONFIG_FILE).write_text(config_yaml)
        barrier()
        if is_main:
            write_owner(tmp, run_id)
            fsync_tree(tmp)
    except Exception as e:  # torch, safetensors and plain writes each raise their own type on a full disk
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        if not is_disk_full(e):
            raise
        raise CheckpointWriteError(disk_full_message(out, final.name)) from None
    if is_main:
        if final.exists():  # this run's own, from before a resume at an earlier step
            remove_checkpoint(final)
            if final.exists():  # someone's files were in it: kept under another name
                kept = out / f"{final.name}.kept-{int(time.time())}"
                final.rename(kept)
                logger.warning("moved %s to %s: it holds files the run did not write", final, kept)
        os.replace(tmp, final)
        _fsync_dir(out)
        if total_limit is not None:
            ckpts = complete_checkpoints(out, run_id=run_id)  # a checkpoint is renamed into place whole
            for _step, path in ckpts[: max(0, len(ckpts) - total_limit)]:
                remove_checkpoint(path)
    barrier()
    return final


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full); the message says where and how to go on."""


def is_disk_full(e: BaseException) -> bool:
    # torch.save reports a full disk as a RuntimeError from its zip writer ("enforce fail at inline_container.cc",
    # "file write failed"), safetensors as SafetensorError ("No space left on device (os error 28)"), plain writes
    # as OSError ENOSPC / EDQUOT
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    text = str(e)
    return any(s in text for s in ("No space left", "os error 28", "inline_container", "file write failed", "Disk quota"))


def disk_full_message(out: Path, what: str) -> str:
    free = shutil.disk_usage(out).free
    latest = latest_checkpoint(out)
    kept = f"the latest complete checkpoint, {latest.name}, is intact" if latest else "no earlier checkpoint exists"
    return (f"disk full while writing {what} in {out} ({free / 2**20:.1f} MiB free); {kept}. Free some space (or lower "
            f"checkpoints_total_limit), then resume with the same command plus resume_from_checkpoint=latest")


def checkpoint_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def warn_if_low_on_space(out: Path) -> None:
    """Warn ahead of a save when the disk cannot take another checkpoint as large as the last one."""
    latest = latest_checkpoint(out)
    if latest is None:
        return
    need, free = checkpoint_bytes(latest), shutil.disk_usage(out).free
    if free < 2 * need:
        logger.warning("only %.1f MiB free in %s and the last checkpoint took %.1f MiB: the disk may fill up soon "
                       "(lower checkpoints_total_limit or free space)", free / 2**20, out, need / 2**20)


def load_training_state(ckpt: str | Path) -> dict:
    """Our own file; still loaded with weights_only=True so a swapped-in pickle cannot run code."""
    return torch.load(Path(ckpt) / STATE_FILE, map_location="cpu", weights_only=True)


def restore(payload: dict, optimizer: torch.optim.Optimizer | None, lr_scheduler: Any) -> TrainState:
    """Optimizer (unless it was restored from sharded files), LR schedule, RNGs; returns where the run was."""
    if optimizer is not None:
        optimizer.load_state_dict(payload["optimizer"])
    lr_scheduler.load_state_dict(payload["lr_scheduler"])
    set_rng_state(payload["rng"])
    return TrainState(**payload["train_state"])


def atomic_copy(src: Path, dst: Path) -> None:
    """Copy a file or a folder into place: written beside it under a temporary name, fsynced, then renamed."""
    tmp = dst.with_name(f".tmp-{dst.name}")
    try:
        if src.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(src, tmp)
            fsync_tree(tmp)
        else:
            shutil.copyfile(src, tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        if is_disk_full(e):
            raise CheckpointWriteError(disk_full_message(dst.parent, dst.name)) from None
        raise
    if dst.is_dir():  # a folder cannot be replaced by rename: the old one goes first
        shutil.rmtree(dst)
    os.replace(tmp, dst)
