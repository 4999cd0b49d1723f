"""Chroma: a FLUX.1-schnell derivative with T5 only (no CLIP, no pooled projection), no guidance input, and an
attention mask over the prompt's padding.

What the trainer feeds the transformer, and where it follows `ChromaPipeline`:
- prompt: T5 with its attention mask (unlike FLUX), padded to `t5_max_sequence_length` (512, the pipeline's
  default); the transformer's mask keeps the real tokens and the first padding token, then every image token.
- latents: 2x2-packed as FLUX, position ids as FLUX; timestep = sigma (the pipeline passes t / 1000).
- real classifier-free guidance at inference (guidance_scale 5.0 by default, negative prompt ""), so dropped
  captions are "".
"""

from __future__ import annotations

from typing import TypedDict

import torch

from . import register
from .base import Cond, InferenceRequest, LearningCase, ModelAdapter, PlannerSpec, Variant
from .flux import FLUX_VAE_PARAMS, T5_XXL_PARAMS, FluxAdapter, build_flux_vae, build_t5, latent_ids
from .qwen_image import pack_latents, unpack_latents

DEFAULT_CFG = 5.0  # ChromaPipeline's guidance_scale


class ChromaCond(TypedDict):
    prompt_embeds: torch.Tensor  # B x T x 4096 T5 hidden states, padded to t5_max_sequence_length
    prompt_attention_mask: torch.Tensor  # B x T: 1 for real tokens and the first padding token
    text_ids: torch.Tensor  # T x 3 zeros (shared by the batch)


@register
class ChromaAdapter(FluxAdapter):
    family = "chroma"
    entry = "train_chroma_lora.py"
    variants = (Variant("chroma", "ChromaPipeline", hub_hints=("chroma",), learning=LearningCase(0, 300, 1e-2)),)
    transformer_class = "ChromaTransformer2DModel"
    encoder_folders = ("text_encoder", "tokenizer", "vae")

    def load_encoders(self) -> None:
        from diffusers import AutoencoderKL, ChromaPipeline, FlowMatchEulerDiscreteScheduler
        from transformers import AutoTokenizer, T5EncoderModel

        name, dt = self.cfg.pretrained_model_name_or_path, self.weight_dtype
        self.vae, _ = self.place(AutoencoderKL.from_pretrained(name, subfolder="vae", dtype=dt), "none")
        t5, _ = self.place(T5EncoderModel.from_pretrained(name, subfolder="text_encoder", dtype=dt), self.cfg.quantize_text_encoder)
        self.text_pipe = ChromaPipeline(scheduler=None, vae=None, transformer=None, text_encoder=t5,
                                        tokenizer=AutoTokenizer.from_pretrained(name, subfolder="tokenizer"))
        self.scheduler_config = dict(FlowMatchEulerDiscreteScheduler.load_config(name, subfolder="scheduler"))

    load_transformer = ModelAdapter.load_transformer  # FLUX.1's reads a guidance embedding, which Chroma has none of


    def no_text_components(self) -> dict:
        return {"text_encoder": None, "tokenizer": None}

    def count_tokens(self, captions: list[str]) -> list[int]:
        return [len(ids) for ids in self.text_pipe.tokenizer(captions).input_ids]

    @torch.no_grad()
    def encode_prompts(self, captions: list[str]) -> ChromaCond:
        embeds, mask = self.text_pipe._get_t5_prompt_embeds(
            list(captions), max_sequence_length=self.cfg.t5_max_sequence_length, device=self.device
        )
        text_ids = torch.zeros(embeds.shape[1], 3, device=self.device, dtype=self.text_pipe.text_encoder.dtype)
        return {"prompt_embeds": embeds.to(self.weight_dtype), "prompt_attention_mask": mask, "text_ids": text_ids}

    def predict(self, transformer: torch.nn.Module, noisy: torch.Tensor, sigmas: torch.Tensor, cond: Cond) -> torch.Tensor:
        b, _c, h, w = noisy.shape
        dev, dt = noisy.device, self.weight_dtype
        hidden = pack_latents(noisy.to(dt))
        # the pipeline's _prepare_attention_mask: the prompt mask, then every image token
        mask = torch.cat([cond["prompt_attention_mask"], torch.ones(b, hidden.shape[1], device=dev, dtype=torch.bool)], dim=1)
        out = transformer(
            hidden_states=hidden,
            timestep=sigmas.to(dt),  # the pipeline passes t/1000 = sigma
            encoder_hidden_states=cond["prompt_embeds"],
            txt_ids=cond["text_ids"],
            img_ids=latent_ids(h, w, 0, dev, dt),
            attention_mask=mask,
            return_dict=False,
        )[0]
        return unpack_latents(out, h, w)

    # --- sampling and inference ----------------------------------------------------------------------------
    def sampling_kwargs(self, cond: Cond, negative: Cond, size: tuple[int, int], images: list) -> dict:
        return {"prompt_embeds": cond["prompt_embeds"], "prompt_attention_mask": cond["prompt_attention_mask"],
                "negative_prompt_embeds": negative["prompt_embeds"], "negative_prompt_attention_mask": negative["prompt_attention_mask"],
                "guidance_scale": self.cfg.validation_guidance_scale}

    def inference_kwargs(self, request: InferenceRequest) -> dict:
        return self.cfg_inference_kwargs(request)

    # --- planner, benches, tiny models ---------------------------------------------------------------------
    def released_transformer_config(self) -> dict:
        return {}  # the class defaults are Chroma1's architecture

    def planner_spec(self) -> PlannerSpec:
        return PlannerSpec(encoders=[("text encoder T5-XXL", T5_XXL_PARAMS, True)], vae_params=FLUX_VAE_PARAMS,
                           text_tokens=self.cfg.t5_max_sequence_length)

    def random_conditioning(self, transformer, batch: int, device, dtype) -> Cond:
        g = torch.Generator(device=device).manual_seed(0)
        emb = torch.randn(batch, 512, transformer.config.joint_attention_dim, generator=g, device=device).to(dtype)
        return {"prompt_embeds": emb, "prompt_attention_mask": torch.ones(batch, 512, device=device, dtype=dtype),
                "text_ids": torch.zeros(512, 3, device=device, dtype=dtype)}

    def make_tiny_model(self, out, realistic: bool = False) -> None:
        """T5 padded to 512 tokens and an 8x VAE: the released sequence lengths."""
        from diffusers import ChromaPipeline, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler

        torch.manual_seed(0)
        t5, t5_tok = build_t5()
        ChromaPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15,
                                                      shift=3.0, use_dynamic_shifting=True),
            vae=build_flux_vae(), text_encoder=t5, tokenizer=t5_tok,
            transformer=ChromaTransformer2DModel(
                patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
                joint_attention_dim=32, axes_dims_rope=(4, 4, 8), approximator_num_channels=8, approximator_hidden_dim=32,
                approximator_layers=1,
            ),
        ).save_pretrained(out)
