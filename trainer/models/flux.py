"""FLUX.1 dev / schnell / Kontext: MMDiT on 2x2-packed latents with 3-axis position ids, CLIP pooled + T5 prompts."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, FluxKontextPipeline, FluxPipeline, FluxTransformer2DModel
from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

from .base import ModelAdapter, model_index
from .qwen_image import pack_latents, unpack_latents


def latent_ids(h: int, w: int, index: int, device, dtype) -> torch.Tensor:
    """(h/2 * w/2) x 3 position ids; axis 0 tells images apart (0 = target, 1 = Kontext reference)."""
    ids = FluxPipeline._prepare_latent_image_ids(1, h // 2, w // 2, device, dtype)
    ids[:, 0] = index
    return ids


class FluxAdapter(ModelAdapter):
    family = "flux"
    entry = "train_flux_lora.py"
    pipeline_classes = ("FluxPipeline", "FluxKontextPipeline")
    default_target_modules = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
    controls = "optional"  # Kontext reference images (data_config.control_dir / metadata_file)
    block_count_keys = ("num_layers", "num_single_layers")  # double-stream + single-stream blocks

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.kontext = model_index(self.cfg.pretrained_model_name_or_path)["_class_name"] == "FluxKontextPipeline"
        self.pipeline_class = FluxKontextPipeline if self.kontext else FluxPipeline

    @classmethod
    def check_setup(cls, cfg) -> None:
        super().check_setup(cfg)
        from trainer.config import ConfigError

        kontext = model_index(cfg.pretrained_model_name_or_path)["_class_name"] == "FluxKontextPipeline"
        d = cfg.data_config
        if not kontext and (d.control_dir or d.metadata_file):
            raise ConfigError("control images need a FLUX.1 Kontext model: remove data_config.control_dir / metadata_file")

    @classmethod
    def check_samples(cls, cfg, samples) -> None:
        from trainer.config import ConfigError

        over = [s for s in samples if len(s.controls) > 1]
        if over:
            raise ConfigError(f"data_config: FLUX Kontext takes one reference image per sample; {over[0].image.name} has {len(over[0].controls)}")

    def load_encoders(self) -> None:
        name, dt = self.cfg.pretrained_model_name_or_path, self.weight_dtype
        self.vae = self.place(AutoencoderKL.from_pretrained(name, subfolder="vae", dtype=dt), "none")
        clip = self.place(CLIPTextModel.from_pretrained(name, subfolder="text_encoder", dtype=dt), "none")  # 123M: not worth it
        t5 = self.place(T5EncoderModel.from_pretrained(name, subfolder="text_encoder_2", dtype=dt), self.cfg.quantize_text_encoder)
        self.text_pipe = FluxPipeline(
            scheduler=None, vae=None, transformer=None, text_encoder=clip, text_encoder_2=t5,
            tokenizer=AutoTokenizer.from_pretrained(name, subfolder="tokenizer"),
            tokenizer_2=AutoTokenizer.from_pretrained(name, subfolder="tokenizer_2"),
        )
        from diffusers import FlowMatchEulerDiscreteScheduler

        self.scheduler_config = dict(FlowMatchEulerDiscreteScheduler.load_config(name, subfolder="scheduler"))

    def load_transformer(self) -> None:
        t = FluxTransformer2DModel.from_pretrained(self.cfg.pretrained_model_name_or_path, subfolder="transformer", dtype=self.weight_dtype)
        self.transformer = self.place(t, self.cfg.quantize, self.cfg.blocks_to_swap)
        self.guidance = bool(self.transformer.config.guidance_embeds)

    def no_text_components(self) -> dict:
        return {"text_encoder": None, "tokenizer": None, "text_encoder_2": None, "tokenizer_2": None}

    def sampling_kwargs(self, cond: dict, negative: dict, size: tuple[int, int]) -> dict:
        kwargs = {"prompt_embeds": cond["prompt_embeds"], "pooled_prompt_embeds": cond["pooled"], "guidance_scale": self.cfg.guidance_scale}
        if self.kontext:  # Kontext scales width x height up to max_area (1 MP) unless told the real area
            kwargs.update(_auto_resize=False, max_area=size[0] * size[1])
        return kwargs

    def count_tokens(self, captions: list[str]) -> list[int]:
        return [len(ids) for ids in self.text_pipe.tokenizer_2(captions).input_ids]

    @torch.no_grad()
    def encode_prompts(self, captions: list[str]) -> dict:
        embeds, pooled, text_ids = self.text_pipe.encode_prompt(
            captions, prompt_2=None, device=self.device, max_sequence_length=self.cfg.t5_max_sequence_length
        )
        return {"prompt_embeds": embeds.to(self.weight_dtype), "pooled": pooled.to(self.weight_dtype), "text_ids": text_ids}

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        z = self.vae.encode(pixels.to(self.device, self.vae.dtype)).latent_dist.mode().float()
        return (z - self.vae.config.shift_factor) * self.vae.config.scaling_factor

    def image_seq_len(self, latents: torch.Tensor) -> int:
        return (latents.shape[-2] // 2) * (latents.shape[-1] // 2)

    def predict(self, transformer: torch.nn.Module, noisy: torch.Tensor, sigmas: torch.Tensor, cond: dict) -> torch.Tensor:
        """Kontext: reference latents appended on the sequence axis with ids[:, 0] = 1; loss on target tokens only."""
        b, _c, h, w = noisy.shape
        dev, dt = noisy.device, self.weight_dtype
        target = pack_latents(noisy.to(dt))
        controls = cond.get("control_latents", [])
        hidden = torch.cat([target, *(pack_latents(c.to(dt)) for c in controls)], dim=1)
        ids = torch.cat([latent_ids(h, w, 0, dev, dt), *(latent_ids(c.shape[-2], c.shape[-1], 1, dev, dt) for c in controls)])
        guidance = torch.full((b,), self.cfg.guidance_scale, device=dev, dtype=torch.float32) if self.guidance else None
        out = transformer(
            hidden_states=hidden,
            timestep=sigmas.to(dt),  # the pipeline passes t/1000 = sigma
            guidance=guidance,
            pooled_projections=cond["pooled"],
            encoder_hidden_states=cond["prompt_embeds"],
            txt_ids=cond["text_ids"],
            img_ids=ids,
            return_dict=False,
        )[0]
        return unpack_latents(out[:, : target.shape[1]], h, w)
