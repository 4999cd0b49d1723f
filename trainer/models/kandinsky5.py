"""Kandinsky 5.0 Image (T2I Lite): a 3D DiT (an image is one frame) with cross-attention to Qwen2.5-VL prompt
states and a CLIP pooled vector added to the time embedding; FLUX-VAE latents.

What the trainer feeds the transformer, and where it follows `Kandinsky5T2IPipeline`:
- prompt: the pipeline's template and `encode_prompt` (prompt cleaning, Qwen2.5-VL last hidden states after the
  template's 40 system tokens, cut to `max_sequence_length`, 512 by default; CLIP-L pooled output over 77 tokens).
  The transformer takes no text mask, so a batch padded to its longest prompt would feed the shorter prompts'
  padding to the model: each sample is encoded alone, as at inference, and samples whose prompts differ in length
  go through the transformer one by one (equal lengths share one call).
- latents: B x 1 x H x W x C (channels last, one frame), VAE latents times the scaling factor (the pipeline decodes
  with `latents / scaling_factor`, no shift); RoPE positions and scale factors (1, 1, 1) as the diffusers pipeline
  passes them (Kandinsky's own T2I code and SimpleTuner use (1, 2, 2); the LoRA runs in the diffusers pipeline).
- time: the scheduler's t = 1000 * sigma, unscaled (this pipeline does not divide by 1000); the output is the
  velocity itself.
- classifier-free guidance at inference (guidance_scale 3.5 by default, negative prompt ""): dropped captions are "".
"""

from __future__ import annotations

import inspect
from typing import TypedDict

import torch

from . import register
from .base import Cond, InferenceRequest, ModelAdapter, LearningCase, PlannerSpec, Variant
from .flux import CLIP_L_PARAMS, FLUX_VAE_PARAMS, build_clip, build_flux_vae, flux_vae_latents
from .qwen_image import QWEN25_VL_PARAMS, build_qwen_text_encoder, build_qwen_tokenizer, pad_and_stack, save_qwen_processor


class KandinskyCond(TypedDict):
    prompt_embeds: torch.Tensor  # B x L x 3584 Qwen2.5-VL states (template dropped), zero-padded across the batch
    prompt_embeds_mask: torch.Tensor  # B x L, 1 for each sample's own tokens
    pooled: torch.Tensor  # B x 768 CLIP-L pooled output


@register
class Kandinsky5Adapter(ModelAdapter):
    family = "kandinsky5"
    entry = "train_kandinsky_lora.py"
    variants = (Variant("kandinsky5", "Kandinsky5T2IPipeline", hub_hints=("kandinsky-5", "kandinsky5"),
                        learning=LearningCase(0, 800, 1e-2)),)
    transformer_class = "Kandinsky5Transformer3DModel"
    default_target_modules = ("to_query", "to_key", "to_value", "self_attention.out_layer", "cross_attention.out_layer")
    block_count_keys = ("num_text_blocks", "num_visual_blocks")
    encoder_folders = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "vae")
    text_limits = {"max_sequence_length": 1024}  # the pipeline's own bound
    text_token_keys = ("prompt_embeds", "prompt_embeds_mask")

    def load_encoders(self) -> None:
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, Kandinsky5T2IPipeline
        from transformers import AutoTokenizer, CLIPTextModel, Qwen2_5_VLForConditionalGeneration

        from .qwen_processor import load_qwen_processor

        name, dt = self.cfg.pretrained_model_name_or_path, self.weight_dtype
        self.vae, _ = self.place(AutoencoderKL.from_pretrained(name, subfolder="vae", dtype=dt), "none")
        qwen, _ = self.place(Qwen2_5_VLForConditionalGeneration.from_pretrained(name, subfolder="text_encoder", dtype=dt),
                             self.cfg.quantize_text_encoder)
        clip, _ = self.place(CLIPTextModel.from_pretrained(name, subfolder="text_encoder_2", dtype=dt), "none")
        self.text_pipe = Kandinsky5T2IPipeline(
            transformer=None, vae=None, scheduler=None, text_encoder=qwen, tokenizer=load_qwen_processor(name, "tokenizer"),
            text_encoder_2=clip, tokenizer_2=AutoTokenizer.from_pretrained(name, subfolder="tokenizer_2"),
        )
        self.scheduler_config = dict(FlowMatchEulerDiscreteScheduler.load_config(name, subfolder="scheduler"))


    def pipeline_components(self, name_or_path: str) -> dict:
        from .qwen_processor import load_qwen_processor

        return {"tokenizer": load_qwen_processor(name_or_path, "tokenizer")}

    def no_text_components(self) -> dict:
        return {"text_encoder": None, "tokenizer": None, "text_encoder_2": None, "tokenizer_2": None}

    def count_tokens(self, captions: list[str]) -> list[int]:
        tok = self.text_pipe.tokenizer.tokenizer
        return [len(ids) for ids in tok(captions).input_ids]

    @torch.no_grad()
    def encode_prompts(self, captions: list[str]) -> KandinskyCond:
        embeds, pooled = [], []
        for caption in captions:  # one at a time: the pipeline's batch padding would reach the transformer
            e, p, _cu = self.text_pipe.encode_prompt([caption], max_sequence_length=self.cfg.max_sequence_length,
                                                     device=self.device, dtype=self.weight_dtype)
            embeds.append(e)
            pooled.append(p)
        padded, mask = pad_and_stack(embeds, [None] * len(embeds))
        return {"prompt_embeds": padded, "prompt_embeds_mask": mask, "pooled": torch.cat(pooled)}

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return flux_vae_latents(self.vae, pixels, self.device, shift=False)

    def predict(self, transformer: torch.nn.Module, noisy: torch.Tensor, sigmas: torch.Tensor, cond: Cond) -> torch.Tensor:
        dt = self.weight_dtype
        _b, _c, h, w = noisy.shape
        frames = noisy.to(dt).permute(0, 2, 3, 1).unsqueeze(1)  # B x 1 x H x W x C
        lengths = cond["prompt_embeds_mask"].sum(1).tolist()
        visual_pos = [torch.arange(1, device=noisy.device), torch.arange(h // 2, device=noisy.device),
                      torch.arange(w // 2, device=noisy.device)]
        groups: dict[int, list[int]] = {}
        for i, n in enumerate(lengths):
            groups.setdefault(int(n), []).append(i)
        out = torch.empty(frames.shape, dtype=torch.float32, device=noisy.device)
        for n, idx in groups.items():  # no text mask: only prompts of equal length share a call
            pred = transformer(
                hidden_states=frames[idx],
                encoder_hidden_states=cond["prompt_embeds"][idx, :n].to(dt),
                pooled_projections=cond["pooled"][idx].to(dt),
                timestep=(sigmas[idx] * 1000).to(dt),  # the scheduler's t, unscaled
                visual_rope_pos=visual_pos,
                text_rope_pos=torch.arange(n, device=noisy.device),
                scale_factor=[1.0, 1.0, 1.0],
                sparse_params=None,
                return_dict=True,
            ).sample
            out[idx] = pred.float()
        return out.squeeze(1).permute(0, 3, 1, 2)

    # --- sampling and inference ----------------------------------------------------------------------------
    def sampling_kwargs(self, cond: Cond, negative: Cond, size: tuple[int, int], images: list) -> dict:
        def cu(c):
            return torch.tensor([0, int(c["prompt_embeds_mask"].sum())], dtype=torch.int32, device=c["prompt_embeds"].device)

        return {"prompt_embeds_qwen": cond["prompt_embeds"], "prompt_embeds_clip": cond["pooled"], "prompt_cu_seqlens": cu(cond),
                "negative_prompt_embeds_qwen": negative["prompt_embeds"], "negative_prompt_embeds_clip": negative["pooled"],
                "negative_prompt_cu_seqlens": cu(negative), "guidance_scale": self.cfg.validation_guidance_scale}

    def inference_kwargs(self, request: InferenceRequest) -> dict:
        return self.cfg_inference_kwargs(request)

    # --- planner, benches, tiny models ---------------------------------------------------------------------
    def released_transformer_config(self) -> dict:
        # Kandinsky 5.0 Image Lite (kandinsky-5's get_default_t2i_conf): 16 FLUX-VAE channels, width 2560, 50 blocks
        return {"in_visual_dim": 16, "out_visual_dim": 16, "in_text_dim": 3584, "in_text_dim2": 768, "time_dim": 512,
                "patch_size": (1, 2, 2), "model_dim": 2560, "ff_dim": 10240, "num_text_blocks": 2, "num_visual_blocks": 50,
                "axes_dims": (32, 48, 48)}

    def planner_spec(self) -> PlannerSpec:
        return PlannerSpec(encoders=[("text encoder Qwen2.5-VL-7B", QWEN25_VL_PARAMS, True), ("text encoder CLIP-L", CLIP_L_PARAMS, False)],
                           vae_params=FLUX_VAE_PARAMS, text_tokens=128, token_width=2560)

    def random_conditioning(self, transformer, batch: int, device, dtype) -> Cond:
        g = torch.Generator(device=device).manual_seed(0)
        c = transformer.config
        return {"prompt_embeds": torch.randn(batch, 128, c.in_text_dim, generator=g, device=device).to(dtype),
                "prompt_embeds_mask": torch.ones(batch, 128, dtype=torch.long, device=device),
                "pooled": torch.randn(batch, c.in_text_dim2, generator=g, device=device).to(dtype)}

    def with_blocks(self, config: dict, n: int) -> dict:
        return {**config, "num_text_blocks": 1, "num_visual_blocks": max(1, n - 1)}

    def make_tiny_model(self, out, realistic: bool = False) -> None:
        """The pipeline's template with its 40-token system prefix, CLIP at 77 tokens, an 8x VAE."""
        from diffusers import FlowMatchEulerDiscreteScheduler, Kandinsky5T2IPipeline, Kandinsky5Transformer3DModel

        torch.manual_seed(0)
        probe = Kandinsky5T2IPipeline(**{k: None for k in inspect.signature(Kandinsky5T2IPipeline.__init__).parameters if k != "self"})
        tokenizer = build_qwen_tokenizer(probe.prompt_template, probe.prompt_template_encode_start_idx)
        clip, clip_tok = build_clip()
        transformer = Kandinsky5Transformer3DModel(
            in_visual_dim=16, out_visual_dim=16, in_text_dim=32, in_text_dim2=32, time_dim=32, patch_size=(1, 2, 2),
            model_dim=64, ff_dim=128, num_text_blocks=1, num_visual_blocks=2, axes_dims=(8, 12, 12),
        )
        # The class zero-initialises its output and modulation layers (as for training from scratch): with them at zero
        # no gradient would reach a LoRA. A released model has none at zero; neither does the tiny one.
        with torch.no_grad():
            for p in transformer.parameters():
                if not p.any():
                    p.normal_(0.0, 0.05)
        pipe = Kandinsky5T2IPipeline(
            transformer=transformer,
            vae=build_flux_vae(latent_channels=16),
            text_encoder=build_qwen_text_encoder(tokenizer), tokenizer=None, text_encoder_2=clip, tokenizer_2=clip_tok,
            scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        )
        pipe.save_pretrained(out)
        save_qwen_processor(tokenizer, out, realistic, subfolder="tokenizer")
