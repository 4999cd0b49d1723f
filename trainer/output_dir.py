"""An output_dir belongs to one run.

    <output_dir>/
        trainer_run.json         the run that owns the folder: run id, when / where it started, model, method
        .trainer.lock            held (flock) by the run's main process for as long as it runs
        checkpoint-N/owner.json  the run id that wrote the checkpoint and the files it wrote there

A fresh run refuses a folder that holds an earlier run's results (checkpoints, published weights) or files this
trainer did not write, and names the choices: resume it (`resume_from_checkpoint=latest`), pick another folder, or
`overwrite_output_dir=true` (the earlier run's results are deleted; other files are left alone). A resume continues
the run that owns the folder. Rotation (`checkpoints_total_limit`), `latest` and overwriting act only on what a
run wrote, file by file: a file someone put into a checkpoint folder survives, and so does the folder.

The lock is an advisory `flock` on `.trainer.lock`: the kernel drops it when the process ends in any way (kill -9
included), so a lock is never stale; its text (pid, host, run id, start time) only serves the message that a second
run gets. Both outcomes are decided by the main process and broadcast, so every process of a launch stops alike.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from trainer.config import ConfigError
from trainer.constants import COMFY_FILE, CONFIG_FILE, LOG_FILE, LORA_FILE, STATE_FILE, TRANSFORMER_DIR, TRANSFORMER_EMA_DIR

logger = logging.getLogger("trainer")

MARKER = "trainer_run.json"
LOCK_FILE = ".trainer.lock"
OWNER_FILE = "owner.json"
SUMMARY_FILE = "training_summary.json"
CURVE_FILE = "loss_curve.png"
_CKPT = re.compile(r"^checkpoint-(\d+)$")
_OURS = re.compile(r"^(\.tmp-checkpoint-\d+|\.write-probe-\d+|\.tmp-.*)$")
PUBLISHED = (LORA_FILE, COMFY_FILE, TRANSFORMER_DIR, TRANSFORMER_EMA_DIR)  # what finish() copies out of the last checkpoint
# what a checkpoint of an earlier version (no owner.json) holds: deleted by name when such a run is overwritten
LEGACY_CHECKPOINT = (STATE_FILE, CONFIG_FILE, LORA_FILE, COMFY_FILE, TRANSFORMER_DIR, TRANSFORMER_EMA_DIR, "sharded", "deepspeed")

_held: dict[str, tuple[int, int]] = {}  # resolved output_dir -> (open lock file descriptor, holder token) of this process


def _forget_locks_in_child() -> None:
    """A forked child (a DataLoader worker) closes its copies of the lock descriptors: a flock belongs to the open file
    description, so the parent keeps its lock, and a killed run's folder is free as soon as the run itself is gone (a
    worker still exiting kept it locked, and the resume right after a kill -9 was refused)."""
    for fd, _holder in _held.values():
        try:
            os.close(fd)
        except OSError:
            pass
    _held.clear()


os.register_at_fork(after_in_child=_forget_locks_in_child)


class OutputDirError(ConfigError):
    """The output folder cannot be used by this run; the message says why and what to do (one line)."""


# --- ownership of checkpoints ---------------------------------------------------------------------------------


def write_owner(checkpoint: Path, run_id: str) -> None:
    """Record the run and every file it wrote into `checkpoint` (called on the temporary folder, before the rename)."""
    files = sorted(str(p.relative_to(checkpoint)) for p in checkpoint.rglob("*") if p.is_file() or p.is_symlink())
    (checkpoint / OWNER_FILE).write_text(json.dumps({"run_id": run_id, "files": files}, indent=1))


def owner(checkpoint: Path) -> dict | None:
    """{run_id, files} of a checkpoint folder, or None when it has no (readable) owner record."""
    try:
        data = json.loads((checkpoint / OWNER_FILE).read_text())
    except (OSError, ValueError):
        return None
    if isinstance(data, dict) and isinstance(data.get("run_id"), str) and isinstance(data.get("files"), list):
        return data
    return None


def owner_id(checkpoint: Path) -> str | None:
    data = owner(checkpoint)
    return data["run_id"] if data else None


def remove_written(folder: Path, files: list[str] | tuple[str, ...]) -> list[str]:
    """Delete these files / folders (relative to `folder`), then every folder left empty, the folder itself
    included; returns what is left (files nobody listed)."""
    for name in files:
        path = folder / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            try:
                path.unlink()
            except FileNotFoundError:
                pass
    if not folder.is_dir():
        return []
    for root, dirs, _files in os.walk(folder, topdown=False):
        for d in dirs:
            try:
                os.rmdir(os.path.join(root, d))
            except OSError:
                pass
    left = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if not p.is_dir())
    if not left:
        try:
            os.rmdir(folder)
        except OSError:
            pass
    return left


def remove_checkpoint(checkpoint: Path) -> None:
    """Delete what the run that wrote `checkpoint` wrote there (by its owner record; by name for a checkpoint of an
    earlier version); a file someone else put there is kept, with its folder, and named in a warning."""
    data = owner(checkpoint)
    files = [*data["files"], OWNER_FILE] if data else list(LEGACY_CHECKPOINT)
    left = remove_written(checkpoint, files)
    if left:
        logger.warning("kept %s: it holds files the run did not write (%s)", checkpoint, ", ".join(left[:3]))


# --- the run marker and the lock ------------------------------------------------------------------------------


def read_marker(out: Path) -> dict | None:
    try:
        data = json.loads((out / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("run_id"), str) else None


def write_marker(out: Path, run_id: str, cfg, resumed: bool) -> None:
    old = read_marker(out) or {}
    data = old if old.get("run_id") == run_id else {
        "run_id": run_id, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "host": socket.gethostname(), "pid": os.getpid(),
        "model": cfg.pretrained_model_name_or_path, "training_method": cfg.training_method}
    if resumed:
        data["resumed"] = [*data.get("resumed", []), time.strftime("%Y-%m-%d %H:%M:%S")][-20:]
    tmp = out / f".tmp-{MARKER}"
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, out / MARKER)


def acquire_lock(out: Path, run_id: str, holder: int = 0) -> None:
    """Take the folder's lock for this process (until `release_lock(out, holder)` or the process's end)."""
    import fcntl

    key = str(out.resolve())
    if key in _held:
        raise OutputDirError(f"output_dir '{out}' is already in use by a run in this process")
    fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        os.close(fd)
        if e.errno in (11, 13):  # EAGAIN / EACCES: another process holds it
            try:
                h = json.loads(holder)
                who = f"pid {h['pid']} on {h['host']}, run {h['run_id']} started {h['started']}"
            except (ValueError, KeyError, TypeError):
                who = "another process"
            raise OutputDirError(f"output_dir '{out}' is in use by another training run ({who}); wait for it to end, or "
                                 "choose another output_dir") from None
        logger.warning("output_dir %s: this file system cannot lock files (%s); nothing stops a second run from using "
                       "the folder at the same time", out, e.strerror)
        return
    text = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "run_id": run_id,
                       "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, text, 0)
    _held[key] = (fd, holder)


def release_lock(out: Path, holder: int = 0) -> None:
    key = str(Path(out).resolve())
    if key in _held and _held[key][1] == holder:
        fd = _held.pop(key)[0]
        os.ftruncate(fd, 0)
        os.close(fd)  # closing drops the flock


# --- what is in the folder -------------------------------------------------------------------------------------


@dataclass
class Contents:
    results: list[str]  # an earlier run's checkpoints and published weights
    trainer_files: list[str]  # the rest of what the trainer writes (log, curve, samples, cache, logs, marker)
    foreign: list[str]  # everything else


def survey(out: Path, logging_dir: str, cache_dir: Path | None) -> Contents:
    results, trainer_files, foreign = [], [], []
    if not out.is_dir():
        return Contents([], [], [])
    ours = {MARKER, LOCK_FILE, LOG_FILE, CURVE_FILE, SUMMARY_FILE, "samples", Path(logging_dir).parts[0] if logging_dir else "logs"}
    if cache_dir is None or cache_dir.resolve().parent == out.resolve():
        ours.add((cache_dir or out / "cache").name)
    for p in sorted(out.iterdir()):
        if _CKPT.match(p.name) and p.is_dir() or p.name in PUBLISHED:
            results.append(p.name)
        elif p.name in ours or _OURS.match(p.name):
            trainer_files.append(p.name)
        else:
            foreign.append(p.name)
    return Contents(results, trainer_files, foreign)


def _listing(names: list[str], n: int = 4) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def folder_run_id(out: Path) -> str | None:
    """The run that owns `out`: its marker's, else (marker deleted) the newest checkpoint's owner; None for a new
    folder or one of an earlier version."""
    marker = read_marker(out)
    if marker:
        return marker["run_id"]
    return next((r for _s, c in reversed(checkpoints(out)) if (r := owner_id(c))), None)


def claim(out: Path, cfg, continuing: bool, cache_dir: Path | None) -> str:
    """Decide whether this run may use `out` and take its lock (on behalf of `cfg`: release_lock(out, id(cfg)));
    returns the run id (the owner's when `continuing` its run, a new one otherwise). `continuing`: the run resumes
    from a checkpoint inside `out`."""
    marker = read_marker(out)
    run_id = (folder_run_id(out) if continuing else None) or uuid.uuid4().hex[:12]
    acquire_lock(out, run_id, id(cfg))
    try:
        if not continuing:
            contents = survey(out, cfg.logging_dir, cache_dir)
            if contents.results and not cfg.overwrite_output_dir:
                who = f"run {marker['run_id']} (started {marker.get('started', '?')})" if marker else "an earlier run"
                raise OutputDirError(
                    f"output_dir '{out}' holds the results of {who}: {_listing(contents.results)}. Resume it with "
                    "resume_from_checkpoint=latest, choose another output_dir, or set overwrite_output_dir=true to delete "
                    "those results and start over (the embedding cache is kept)")
            if contents.foreign and not cfg.overwrite_output_dir:
                raise OutputDirError(
                    f"output_dir '{out}' holds files this trainer did not write: {_listing(contents.foreign)}. Choose a new "
                    "or empty folder, or set overwrite_output_dir=true to train there anyway (those files are left alone)")
            if contents.results or contents.trainer_files:
                clear_earlier_run(out)
        else:  # a run of an earlier version (no owner records): adopt its checkpoints
            for _step, ckpt in checkpoints(out):
                if owner(ckpt) is None:
                    write_owner(ckpt, run_id)
        write_marker(out, run_id, cfg, resumed=continuing)
    except BaseException:
        release_lock(out, id(cfg))
        raise
    return run_id


def clear_earlier_run(out: Path) -> None:
    """Delete what an earlier run left that a new run would mix up with its own: checkpoints (file by file), the
    published weights, log, loss curve, summary and previews. The cache (content-keyed) and tracker logs stay."""
    removed = []
    for p in sorted(out.iterdir()):
        if _CKPT.match(p.name) and p.is_dir():
            remove_checkpoint(p)
        elif p.name.startswith(".tmp-checkpoint-") and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        elif p.name in (*PUBLISHED, LOG_FILE, CURVE_FILE, SUMMARY_FILE):
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        elif p.name == "samples" and p.is_dir():
            for f in p.glob("step-*.png"):
                f.unlink()
            remove_written(p, [])
        else:
            continue
        removed.append(p.name)
    if removed:
        logger.info("output_dir %s: removed the earlier run's %s", out, _listing(removed, 6))


def checkpoints(out: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every checkpoint-N folder in `out`, oldest first, whatever it holds (temporary folders of a
    checkpoint being written are not named checkpoint-N)."""
    found = []
    if out.is_dir():
        for p in out.iterdir():
            m = _CKPT.match(p.name)
            if m and p.is_dir():
                found.append((int(m.group(1)), p))
    return sorted(found)
