"""LoRA (peft) on the transformer's Linear layers; saved in diffusers format (and ComfyUI naming on request)."""

from __future__ import annotations

import contextlib

from pathlib import Path

import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from trainer.constants import COMFY_FILE, LORA_FILE
from trainer.methods import TrainingMethod


class LoRAMethod(TrainingMethod):
    name = "lora"
    resume_keys = ("rank", "lora_alpha", "lora_target_modules")

    def lora_config(self) -> LoraConfig:
        cfg = self.cfg
        return LoraConfig(
            r=cfg.rank,
            lora_alpha=cfg.lora_alpha or cfg.rank,
            lora_dropout=cfg.lora_dropout,
            init_lora_weights="gaussian",
            target_modules=list(cfg.lora_target_modules or self.adapter.default_target_modules),
        )

    def attach(self, transformer: torch.nn.Module, placement=None) -> list[torch.nn.Parameter]:
        """A fresh LoRA on the frozen transformer; returns its (fp32) trainable parameters."""
        from trainer.config import ConfigError

        transformer.requires_grad_(False)
        # blocks_to_swap: peft must see the swapped blocks' real weights while it wraps their layers
        with placement.host_weights() if placement is not None else contextlib.nullcontext():
            try:
                transformer.add_adapter(self.lora_config())
            except ValueError as e:
                raise ConfigError(f"config key 'lora_target_modules': {e}") from None
        params = [p for p in transformer.parameters() if p.requires_grad]
        for p in params:
            p.data = p.data.float()  # train LoRA in fp32 even when the base runs in bf16
        return params

    def state_dict(self, transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
        sd = get_peft_model_state_dict(transformer)
        return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in sd.items()}

    def save(self, transformer: torch.nn.Module, directory: Path) -> None:
        """Diffusers-format LoRA file loadable with `<Pipeline>.load_lora_weights(directory)`."""
        self.adapter.pipeline_class.save_lora_weights(
            directory,
            transformer_lora_layers=self.state_dict(transformer),
            transformer_lora_adapter_metadata=self.lora_config().to_dict(),
        )
        from trainer.lora_format import VARIANT_KEY, add_metadata, save_comfyui

        d = Path(directory)
        add_metadata(d / LORA_FILE, {VARIANT_KEY: self.adapter.variant.name})  # tools can then say what a file is for
        if self.cfg.lora_format == "comfyui":
            save_comfyui(d / LORA_FILE, d / COMFY_FILE, self.adapter, self.cfg.rank)

    def load(self, transformer: torch.nn.Module, directory: Path) -> None:
        """Restore the trainable LoRA weights written by `save` (exact, fp32)."""
        from safetensors.torch import load_file

        sd = load_file(str(Path(directory) / LORA_FILE))
        prefix = "transformer."
        sd = {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in sd.items()}
        result = set_peft_model_state_dict(transformer, sd)
        missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
        if missing or getattr(result, "unexpected_keys", []):
            raise ValueError(f"checkpoint {directory} does not match this LoRA (missing {missing[:3]}, unexpected {result.unexpected_keys[:3]})")

    def checkpoint_files(self) -> tuple[str, ...]:
        return (LORA_FILE,)

    def published_files(self) -> tuple[str, ...]:
        return (LORA_FILE, COMFY_FILE)

