"""Training methods: what is trained on top of a family's transformer: LoRA (lora.py), its own weights (full.py) or
a ControlNet beside it (controlnet.py).

A method attaches its trainable parameters to the placed transformer, saves and loads them, and says which files
make a checkpoint complete and which it publishes in output_dir at the end. It knows nothing about a family beyond
the adapter's public attributes (its pipeline class, default target modules and ComfyUI key naming).
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from pathlib import Path

import torch

from trainer.config import TrainConfig


class TrainingMethod(ABC):
    name: str = ""
    exports_every_checkpoint = True  # False: a sharded run writes the method's files at its last checkpoint only
    # config keys whose change makes a resumed run a different experiment (beside the family-independent ones)
    resume_keys: tuple[str, ...] = ()

    def __init__(self, cfg: TrainConfig, adapter):
        self.cfg = cfg
        self.adapter = adapter
        self.is_main = True  # the process that writes files
        self.sharded = False  # FSDP2 / DeepSpeed: the engine keeps the training state in per-rank pieces
        self.engine_file: str | None = None  # the file that completes such an engine's part of a checkpoint

    def check_setup(self) -> None:
        """Refuse a configuration that cannot work, before any model loads (ConfigError)."""

    def trained_model(self, transformer: torch.nn.Module) -> torch.nn.Module:
        """The module the loop trains, prepares and hands to `predict` (default: the transformer itself; a ControlNet
        method pairs it with the ControlNet)."""
        return transformer

    def prepared(self, params: list[torch.nn.Parameter]) -> None:
        """The trainable parameters as accelerate prepared them (FSDP replaces them with sharded ones)."""

    @abstractmethod
    def attach(self, transformer: torch.nn.Module, placement) -> list[torch.nn.Parameter]:
        """Make the transformer trainable the method's way; returns the trainable parameters (fp32)."""

    @abstractmethod
    def save(self, transformer: torch.nn.Module, directory: Path, final: bool = True, state_dict: dict | None = None) -> None:
        """Write the trained weights into `directory` (a checkpoint's temporary folder). Every process calls it (a
        sharded model is gathered collectively); only the main process writes. `final`: the run's last checkpoint;
        `state_dict`: the whole model's weights when the engine consolidated them already (DeepSpeed)."""

    @abstractmethod
    def load(self, transformer: torch.nn.Module, directory: Path) -> None:
        """Restore the weights `save` wrote (exact), for resume."""

    @abstractmethod
    def checkpoint_files(self) -> tuple[str, ...]:
        """Files `save` always writes: a checkpoint without them is incomplete."""

    def published_files(self) -> tuple[str, ...]:
        """Files of the last checkpoint copied into output_dir when training ends (those that exist)."""
        return self.checkpoint_files()

    def param_groups(self, params: list[torch.nn.Parameter]) -> list[dict]:
        """The optimizer's parameter groups (one by default; e.g. LoRA+ gives the output side its own rate)."""
        return [{"params": params}]

    def watch(self, params: list[torch.nn.Parameter]) -> None:
        """Remember the trainable weights as they start (or resume), for `check_trained`."""

    def sharded_state(self) -> dict | None:
        """Extra tensors a sharded checkpoint holds beside parameters and optimizer (e.g. the EMA), filled in place
        on resume."""
        return None

    def sharded_state_loaded(self) -> None:
        """Called after `sharded_state`'s tensors were read back."""

    def after_update(self, params: list[torch.nn.Parameter]) -> None:
        """Called after every applied optimizer step (e.g. an EMA of the weights)."""

    def note_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Called once, at the first update, while the gradients are still there."""

    def check_trained(self, params: list[torch.nn.Parameter], steps: int) -> list[str]:
        """At the first checkpoint: warnings to log; raises ValueError when training demonstrably does nothing."""
        return []

    def without_training(self, transformer: torch.nn.Module):
        """Context in which the transformer predicts as the base model (what is trained switched off), for
        preservation terms such as DOP. Methods that cannot switch it off raise NotImplementedError."""
        raise NotImplementedError(f"{self.name} training cannot switch its changes off")

    def sampling(self, transformer: torch.nn.Module):
        """Context in which validation previews are rendered (the model as users will run it)."""
        return contextlib.nullcontext()


def make_method(cfg: TrainConfig, adapter) -> TrainingMethod:
    if cfg.training_method == "controlnet":
        from trainer.methods.controlnet import ControlNetMethod

        return ControlNetMethod(cfg, adapter)
    if cfg.training_method == "full":
        from trainer.methods.full import FullMethod

        return FullMethod(cfg, adapter)
    from trainer.methods.lora import LoRAMethod

    return LoRAMethod(cfg, adapter)
