"""What the training loop needs from a model family.

The loop only sees normalized latents B x C x H x W and sigma in [0, 1]. Packing, position ids, image shapes,
timestep scaling and guidance vectors live in the adapter's `predict`.
"""

from __future__ import annotations

import contextlib
import json
import logging
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from trainer.config import TrainConfig

logger = logging.getLogger(__name__)


def model_index(name_or_path: str, file: str = "model_index.json") -> dict:
    """model_index.json (or another json file) of a local folder or a cached / downloadable hub id."""
    p = Path(name_or_path)
    if not p.is_dir():
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(name_or_path, file)).read_text())
    return json.loads((p / file).read_text())


def _release_memory() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


ENTRY_FOR_PIPELINE = {
    "QwenImagePipeline": "train.py (or train_4090.py)",
    "QwenImageEditPipeline": "train_qwen_edit_lora.py",
    "QwenImageEditPlusPipeline": "train_qwen_edit_lora.py",
    "FluxPipeline": "train_flux_lora.py",
    "FluxKontextPipeline": "train_flux_lora.py",
}


class ModelAdapter(ABC):
    family: str = ""
    entry: str = ""  # the train_*.py script for this family, for error messages
    pipeline_class: Any = None  # diffusers pipeline whose save_lora_weights / load_lora_weights we target
    pipeline_classes: tuple[str, ...] = ()  # model_index.json `_class_name`s this adapter trains
    default_target_modules: tuple[str, ...] = ()
    controls: str = "never"  # "never", "optional" or "required": whether samples carry control images
    block_count_keys: tuple[str, ...] = ("num_layers",)  # transformer config keys that together count its blocks

    @classmethod
    def check_setup(cls, cfg: TrainConfig) -> None:
        """Cheap checks before any data or model is read: right script for the model, dataset kind fits the family."""
        from trainer.config import ConfigError

        try:
            name = model_index(cfg.pretrained_model_name_or_path).get("_class_name", "?")
        except Exception as e:
            raise ConfigError(f"config key 'pretrained_model_name_or_path': cannot read model_index.json ({type(e).__name__}: {e})") from None
        if name not in cls.pipeline_classes:
            hint = ENTRY_FOR_PIPELINE.get(name)
            raise ConfigError(
                f"config key 'pretrained_model_name_or_path' is a {name} model, which {cls.entry} does not train"
                + (f"; use {hint}" if hint else "")
            )
        if cfg.blocks_to_swap:
            try:
                tcfg = model_index(cfg.pretrained_model_name_or_path, "transformer/config.json")
                n_blocks = sum(int(tcfg[k]) for k in cls.block_count_keys)
            except Exception as e:
                raise ConfigError(f"config key 'blocks_to_swap': cannot read the transformer's config.json to count its blocks ({type(e).__name__}: {e})") from None
            if cfg.blocks_to_swap >= n_blocks:
                raise ConfigError(f"config key 'blocks_to_swap' is {cfg.blocks_to_swap}, but this transformer has {n_blocks} blocks; use at most {n_blocks - 1}")
        d = cfg.data_config
        has_controls = d.control_dir is not None or d.metadata_file is not None
        if cls.controls == "required" and not has_controls:
            raise ConfigError(f"{cls.entry} needs control images: set data_config.control_dir or data_config.metadata_file")
        if cls.controls == "never" and has_controls:
            raise ConfigError(f"a {name} model takes no control images: remove data_config.control_dir / metadata_file")

    def __init__(self, cfg: TrainConfig, device: torch.device, weight_dtype: torch.dtype):
        self.cfg = cfg
        self.device = device
        self.weight_dtype = weight_dtype
        self.transformer: torch.nn.Module | None = None
        self.scheduler_config: dict = {}

    @classmethod
    def check_samples(cls, cfg: TrainConfig, samples: list) -> None:
        """Family-specific dataset checks after the scan, before any model loads (raise ConfigError)."""

    # --- loading -------------------------------------------------------------------------------------------
    @abstractmethod
    def load_encoders(self) -> None:
        """Load the frozen text encoder(s) and VAE in weight_dtype onto self.device; set scheduler_config."""

    @abstractmethod
    def load_transformer(self) -> None:
        """Load (and quantize) the transformer in weight_dtype onto self.device as self.transformer."""

    def load(self) -> None:
        self.load_encoders()
        self.load_transformer()

    def lora_config(self) -> LoraConfig:
        return LoraConfig(
            r=self.cfg.rank,
            lora_alpha=self.cfg.lora_alpha or self.cfg.rank,
            lora_dropout=self.cfg.lora_dropout,
            init_lora_weights="gaussian",
            target_modules=list(self.cfg.lora_target_modules or self.default_target_modules),
        )

    def add_lora(self) -> list[torch.nn.Parameter]:
        """Attach a fresh LoRA to the transformer; returns its (fp32) trainable parameters."""
        t = self.transformer
        t.requires_grad_(False)
        cfg = self.lora_config()
        swap = getattr(t, "block_swap", None)  # blocks_to_swap: peft must see the swapped blocks' real weights
        try:
            with swap.host_weights() if swap is not None else contextlib.nullcontext():
                t.add_adapter(cfg)
        except ValueError as e:
            raise ValueError(f"config key 'lora_target_modules': {e}") from None
        params = [p for p in t.parameters() if p.requires_grad]
        for p in params:
            p.data = p.data.float()  # train LoRA in fp32 even when the base runs in bf16
        return params

    # --- conditioning --------------------------------------------------------------------------------------
    @abstractmethod
    def encode_prompts(self, captions: list[str]) -> dict[str, torch.Tensor | None]:
        """Text conditioning for a batch (padded, with masks where the model takes them)."""

    @abstractmethod
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels B x 3 x H x W in [-1, 1] -> normalized latents B x C x h x w."""

    text_needs_pixels = False  # True when prompt encoding looks at the control images (Qwen-Image-Edit)

    def encode_text(self, batch: dict) -> dict:
        """Prompt conditioning of a collated batch."""
        return self.encode_prompts(batch["captions"])

    def encode_latents(self, batch: dict) -> tuple[torch.Tensor, dict]:
        """(target latents, {"control_latents": [...]}) of a collated batch."""
        return self.encode_images(batch["pixel_values"]), {"control_latents": [self.encode_images(c) for c in batch["controls"]]}

    def encode_batch(self, batch: dict) -> tuple[torch.Tensor, dict]:
        """Collated batch -> (target latents, conditioning for predict)."""
        latents, extra = self.encode_latents(batch)
        return latents, {**self.encode_text(batch), **extra}

    def split_text(self, cond: dict, n: int) -> list[dict]:
        """Batched prompt conditioning -> one dict per sample (what the embedding cache stores)."""
        return [{k: v[i : i + 1] if v.shape[0] == n else v for k, v in cond.items()} for i in range(n)]

    def merge_text(self, items: list[dict]) -> dict:
        """Inverse of split_text for a batch assembled from cached samples."""
        first = items[0]
        return {k: torch.cat([it[k] for it in items]) if v.ndim >= 2 and v.shape[0] == 1 else v for k, v in first.items()}

    def free_text_encoders(self) -> None:
        """Drop the text encoder(s) once every prompt embedding is cached."""
        self.text_pipe = None
        _release_memory()

    def free_vae(self) -> None:
        self.vae = None
        _release_memory()

    def configure_attention(self) -> None:
        """Apply cfg.attention_backend to the loaded transformer."""
        from trainer.config import ConfigError

        name = self.cfg.attention_backend
        if name == "auto":
            if torch.cuda.is_available():
                # cuDNN fused attention's backward fails on FLUX-sized sequences ("mha_graph.execute(...).is_good()"),
                # pytorch/pytorch#190321; flash / memory-efficient SDPA are as fast for bf16 training.
                torch.backends.cuda.enable_cudnn_sdp(False)
        elif name != "sdpa":
            try:
                self.transformer.set_attention_backend(name)
            except Exception as e:
                raise ConfigError(f"config key 'attention_backend': '{name}' cannot be used here ({str(e).splitlines()[0]})") from None

    # --- sampling (validation images during training) ------------------------------------------------------
    def sampling_pipeline(self, transformer: torch.nn.Module):
        """The family's diffusers pipeline around the training transformer; prompts come in as embeddings."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config)
        return self.pipeline_class(scheduler=scheduler, vae=self.vae, transformer=transformer, **self.no_text_components())

    def no_text_components(self) -> dict:
        return {"text_encoder": None, "tokenizer": None}

    @abstractmethod
    def sampling_kwargs(self, cond: dict, negative: dict, size: tuple[int, int]) -> dict:
        """Pipeline call arguments for one validation sample from precomputed prompt embeddings."""

    def place(self, model: torch.nn.Module, quantize: str, blocks_to_swap: int = 0) -> torch.nn.Module:
        """Move a frozen model to the device, quantizing its blocks on the way when asked (and keeping the last
        `blocks_to_swap` blocks' weights in host RAM)."""
        from trainer.quantize import quantize_model

        return quantize_model(model.requires_grad_(False).eval(), quantize, self.device, self.weight_dtype, blocks_to_swap)

    def count_tokens(self, captions: list[str]) -> list[int]:
        return [0 for _ in captions]

    @abstractmethod
    def image_seq_len(self, latents: torch.Tensor) -> int:
        """Number of image tokens the transformer sees for these latents (drives the resolution shift)."""

    @abstractmethod
    def predict(self, transformer: torch.nn.Module, noisy: torch.Tensor, sigmas: torch.Tensor, cond: dict) -> torch.Tensor:
        """Velocity prediction, same shape as `noisy`."""

    # --- saving --------------------------------------------------------------------------------------------
    def lora_state_dict(self, transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
        sd = get_peft_model_state_dict(transformer)
        return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in sd.items()}

    def save_lora(self, transformer: torch.nn.Module, directory: str | Path) -> None:
        """Diffusers-format LoRA file loadable with `<Pipeline>.load_lora_weights(directory)`."""
        self.pipeline_class.save_lora_weights(
            directory,
            transformer_lora_layers=self.lora_state_dict(transformer),
            transformer_lora_adapter_metadata=self.lora_config().to_dict(),
        )
        if self.cfg.lora_format == "comfyui":
            from trainer.lora_format import save_comfyui

            d = Path(directory)
            save_comfyui(d / "pytorch_lora_weights.safetensors", d / "pytorch_lora_weights_comfyui.safetensors",
                         self.family, self.cfg.rank)

    def load_lora_into(self, transformer: torch.nn.Module, directory: str | Path) -> None:
        """Restore the trainable LoRA weights written by `save_lora` (exact, fp32)."""
        from safetensors.torch import load_file

        sd = load_file(str(Path(directory) / "pytorch_lora_weights.safetensors"))
        prefix = "transformer."
        sd = {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in sd.items()}
        result = set_peft_model_state_dict(transformer, sd)
        missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
        if missing or getattr(result, "unexpected_keys", []):
            raise ValueError(f"checkpoint {directory} does not match this LoRA (missing {missing[:3]}, unexpected {result.unexpected_keys[:3]})")
