"""Command-line front end shared by every train_*.py entry."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from trainer.config import ConfigError, describe_keys, load_config


def printable_names() -> None:
    """File names that are not UTF-8 (bytes carried as surrogates) print with backslash escapes instead of
    crashing print() on stdout (stderr already does this)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(errors="backslashreplace")
        except (AttributeError, ValueError):  # a replaced stream (pytest's capture, a pipe wrapper)
            pass


def setup_logging() -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", level=logging.INFO)
    # Library chatter (per-weight loading bars, deprecation notes) drowns the training log.
    for name in ("diffusers", "transformers", "accelerate", "torch.distributed", "bitsandbytes"):
        logging.getLogger(name).setLevel(logging.ERROR if name == "bitsandbytes" else logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from diffusers.utils import logging as dlog
        from transformers.utils import logging as tlog

        dlog.set_verbosity_error()
        dlog.disable_progress_bar()
        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
    except ImportError:
        pass


def parse_args(description: str, argv: list[str] | None, preset: dict | None = None) -> argparse.Namespace:
    epilog = "config keys (set in the YAML, or override as key=value):\n" + "\n".join(describe_keys(preset=preset))
    p = argparse.ArgumentParser(description=description, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML file in train_configs/")
    p.add_argument("overrides", nargs="*", help="OmegaConf dot-list overrides, e.g. max_train_steps=20 data_config.img_dir=./data")
    return p.parse_args(argv)


def load_adapter(spec: str):
    """'package.module:Class' -> the class; imported only after the config validated (diffusers is slow to import)."""
    import importlib

    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def main(adapter: str, description: str, argv: list[str] | None = None, preset: dict | None = None) -> int:
    """Parse, validate, train. `preset` holds an entry's own defaults (below the YAML and the command line)."""
    args = parse_args(description, argv, preset)
    printable_names()
    setup_logging()
    log = logging.getLogger("trainer")
    try:
        cfg = load_config(args.config, args.overrides, preset=preset)
        # Must be set before CUDA initialises: fewer fragmentation OOMs when shapes vary (buckets, captions).
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
        from trainer.loop import Interrupted, TrainingError, train  # heavy imports after the config is known good

        train(cfg, load_adapter(adapter))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        log.error("%s", e)
        return 130
    except TrainingError as e:
        log.error("%s", e)
        return 1
    return 0
