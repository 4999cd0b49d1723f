"""Qwen-Image: MMDiT on 2x2-packed latents of a 3D (video-style) VAE, prompts from Qwen2.5-VL hidden states."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKLQwenImage, QwenImagePipeline, QwenImageTransformer2DModel
from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

from .base import ModelAdapter


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """B x C x H x W -> B x (H/2 * W/2) x 4C, the pipeline's 2x2 patch packing."""
    b, c, h, w = latents.shape
    return QwenImagePipeline._pack_latents(latents, b, c, h, w)


def unpack_latents(packed: torch.Tensor, h: int, w: int) -> torch.Tensor:
    b, _n, d = packed.shape
    c = d // 4
    x = packed.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, h, w)


class QwenImageAdapter(ModelAdapter):
    family = "qwen-image"
    entry = "train.py"
    pipeline_class = QwenImagePipeline
    pipeline_classes = ("QwenImagePipeline",)
    default_target_modules = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")

    def load(self) -> None:
        name, dt = self.cfg.pretrained_model_name_or_path, self.weight_dtype
        self.transformer = QwenImageTransformer2DModel.from_pretrained(name, subfolder="transformer", dtype=dt)
        self.vae = AutoencoderKLQwenImage.from_pretrained(name, subfolder="vae", dtype=dt)
        text_encoder = Qwen2_5_VLForConditionalGeneration.from_pretrained(name, subfolder="text_encoder", dtype=dt)
        tokenizer = AutoTokenizer.from_pretrained(name, subfolder="tokenizer")
        for m in (self.transformer, self.vae, text_encoder):
            m.requires_grad_(False).eval().to(self.device)
        # The pipeline object is only used for its prompt template and encode_prompt (no transformer / VAE inside).
        self.text_pipe = QwenImagePipeline(
            scheduler=None, vae=None, text_encoder=text_encoder, tokenizer=tokenizer, transformer=None
        )
        from diffusers import FlowMatchEulerDiscreteScheduler

        self.scheduler_config = dict(FlowMatchEulerDiscreteScheduler.load_config(name, subfolder="scheduler"))
        z = self.vae.config.z_dim
        self.latents_mean = torch.tensor(self.vae.config.latents_mean).view(1, z, 1, 1, 1).to(self.device, torch.float32)
        self.latents_std = torch.tensor(self.vae.config.latents_std).view(1, z, 1, 1, 1).to(self.device, torch.float32)

    def count_tokens(self, captions: list[str]) -> list[int]:
        tok = self.text_pipe.tokenizer
        return [len(ids) for ids in tok(captions).input_ids]

    @torch.no_grad()
    def encode_prompts(self, captions: list[str]) -> dict[str, torch.Tensor | None]:
        embeds, mask = self.text_pipe.encode_prompt(
            captions, device=self.device, max_sequence_length=self.cfg.max_sequence_length
        )
        if mask is None:
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        return {"prompt_embeds": embeds.to(self.weight_dtype), "prompt_embeds_mask": mask}

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.to(self.device, self.vae.dtype).unsqueeze(2)  # B x 3 x 1 x H x W (one video frame)
        z = self.vae.encode(x).latent_dist.mode().float()
        return ((z - self.latents_mean) / self.latents_std).squeeze(2)

    def image_seq_len(self, latents: torch.Tensor) -> int:
        return (latents.shape[-2] // 2) * (latents.shape[-1] // 2)

    def predict(self, transformer: torch.nn.Module, noisy: torch.Tensor, sigmas: torch.Tensor, cond: dict) -> torch.Tensor:
        b, _c, h, w = noisy.shape
        mask = cond["prompt_embeds_mask"]
        out = transformer(
            hidden_states=pack_latents(noisy.to(self.weight_dtype)),
            timestep=sigmas.to(self.weight_dtype),  # the pipeline passes t/1000 = sigma
            encoder_hidden_states=cond["prompt_embeds"],
            encoder_hidden_states_mask=None if bool(mask.all()) else mask,
            img_shapes=[[(1, h // 2, w // 2)]] * b,
            return_dict=False,
        )[0]
        return unpack_latents(out, h, w)
