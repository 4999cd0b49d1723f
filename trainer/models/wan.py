"""Wan 2.1 / 2.2 text-to-video models (`WanPipeline`) trained on images: each image is a one-frame video.

What the trainer feeds the transformer, and where it follows `WanPipeline`:
- prompt: UMT5's last hidden states of the caption's own tokens (the pipeline's `encode_prompt`, its text cleaning
  included), zero-padded to `max_sequence_length` (512, the pipeline's default) as the pipeline pads them: the
  transformer's cross-attention has no mask, so the zero rows take part and their number is part of the conditioning.
  The cache keeps each caption's own tokens; predict pads them back.
- latents: the VAE's mode of the image as one frame (B x 3 x 1 x H x W), normalised with the VAE config's
  latents_mean / latents_std as the pipeline un-normalises them; carried B x C x h x w, one frame added for the call.
- timestep = 1000 sigma, one per sample, or (Wan 2.2 TI2V-5B, `expand_timesteps` in the pipeline's config) one per
  latent token, all equal for text-to-video, as the pipeline passes them; the output is the flow (noise - x0).
- sigmas: the pipeline's scheduler (UniPC with flow sigmas) shifts them by its `flow_shift`; training samples its
  sigmas with the same static shift.
- guidance: real CFG with "" as the negative prompt (the pipeline's default scale 5.0).

Not yet: video files (this family trains on images), the A14B models' two experts (`transformer_2`,
`boundary_ratio`: refused before the model loads), image-to-video (`WanImageToVideoPipeline`).

Measured: equivalence with WanPipeline at 512 text tokens / 768 image tokens, every input and the prediction 0, also
in the TI2V-5B layout (16x VAE, per-token timesteps: 192 tokens); learning 1000 steps lr 5e-3: error x0.05, choice +0.74
(300 steps lr 1e-2 gave +0.25: the 512 zero-padded prompt rows dilute a tiny model's cross-attention); the TI2V layout
learns too (x0.36, +0.72). ComfyUI: its WanModel keeps the original Wan names (blocks.N.self_attn.q, ffn.0, head.head
...) under its generic key map, so the ComfyUI file is written in them (COMFYUI_NAMES, diffusers' own renaming).
"""

from __future__ import annotations

import logging
from typing import TypedDict

import torch

from . import register
from .base import Cond, ConfigError, InferenceRequest, LearningCase, ModelAdapter, PlannerSpec, Variant
from .qwen_image import qwen_latent_statistics, qwen_vae_latents

UMT5_XXL_PARAMS = 5_680_910_336  # UMT5EncoderModel of google/umt5-xxl (Wan's text_encoder)
PIPELINE_TOKENS = 512  # WanPipeline's default max_sequence_length: every prompt is zero-padded to it
logger = logging.getLogger(__name__)


# diffusers module names -> the original Wan checkpoint's, which ComfyUI's WanModel keeps (its LoRA key map for Wan is
# the generic one: diffusion_model.<name> / lora_unet_<name with _>); as diffusers' convert_wan_to_diffusers renames them
COMFYUI_NAMES = (("attn1.to_out.0", "self_attn.o"), ("attn1.to_q", "self_attn.q"), ("attn1.to_k", "self_attn.k"), ("attn1.to_v", "self_attn.v"),
                 ("attn2.to_out.0", "cross_attn.o"), ("attn2.to_q", "cross_attn.q"), ("attn2.to_k", "cross_attn.k"), ("attn2.to_v", "cross_attn.v"),
                 ("ffn.net.0.proj", "ffn.0"), ("ffn.net.2", "ffn.2"),
                 ("condition_embedder.time_embedder.linear_1", "time_embedding.0"), ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
                 ("condition_embedder.time_proj", "time_projection.1"), ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
                 ("condition_embedder.text_embedder.linear_2", "text_embedding.2"), ("proj_out", "head.head"))


def comfyui_module(module: str) -> str:
    """A diffusers WanTransformer3DModel module path in the original Wan naming (ComfyUI's)."""
    for ours, theirs in COMFYUI_NAMES:
        if module == ours or module.endswith("." + ours):
            return module[: len(module) - len(ours)] + theirs
    return module


class WanCond(TypedDict):
    prompt_embeds: torch.Tensor  # B x L x D UMT5 states of each caption's own tokens, zero-padded to the batch's longest
    prompt_embeds_mask: torch.Tensor  # B x L, 1 for the caption's own tokens


@register
class WanAdapter(ModelAdapter):
    family = "wan"
    entry = "train_wan_lora.py"
    variants = (Variant("wan", "WanPipeline", hub_hints=("wan2.1-t2v", "wan2.2-ti2v", "wan2.2-t2v", "wan"),
                        learning=LearningCase(0, 1000, 5e-3)),)
    transformer_class = "WanTransformer3DModel"
    # self- and cross-attention of every block (ComfyUI's Wan key map names them self_attn / cross_attn q, k, v, o)
    default_target_modules = ("to_q", "to_k", "to_v", "to_out.0")
    encoder_folders = ("text_encoder", "tokenizer", "vae")
    text_token_keys = ("prompt_embeds", "prompt_embeds_mask")
    empty_prompt = ""
    default_true_cfg_scale = 5.0  # WanPipeline's guidance_scale

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.latents_mean: torch.Tensor | None = None
        self.latents_std: torch.Tensor | None = None
        self.expand_timesteps = False  # Wan 2.2 TI2V-5B: a timestep per latent token (the pipeline's config)
        # Wan 2.2's VAE compresses 16x (2.1's 8x); sides are multiples of that times the 2x2 patch. From a local folder's
        # VAE config; a hub id without local files by its name (no download for this)
        import json
        from pathlib import Path

        name = str(self.cfg.pretrained_model_name_or_path)
        config = Path(name) / "vae" / "config.json"
        factor = json.loads(config.read_text()).get("scale_factor_spatial") if config.is_file() else (16 if "ti2v" in name.lower() else 8)
        self.size_multiple = int(factor or 8) * 2

    @classmethod
    def check_setup(cls, cfg) -> None:
        from trainer.models import read_model_index

        super().check_setup(cfg)
        index = read_model_index(cfg.pretrained_model_name_or_path)
        if index.get("boundary_ratio") is not None or (index.get("transformer_2") or [None])[0]:
            raise ConfigError("config key 'pretrained_model_name_or_path' is a Wan 2.2 A14B model (two experts, transformer and "
                              "transformer_2, split at boundary_ratio); training one expert of it is not supported yet: use a "
                              "one-transformer Wan (2.1 T2V, 2.2 TI2V-5B)")
        if cfg.max_sequence_length != PIPELINE_TOKENS:
            logger.warning("max_sequence_length %d: Wan pads every prompt to it and its cross-attention sees the padding; the "
                           "pipeline's default is %d (sample with max_sequence_length=%d, inference.py --max_sequence_length %d)",
                           cfg.max_sequence_length, PIPELINE_TOKENS, cfg.max_sequence_length, cfg.max_sequence_length)

    # --- loading -------------------------------------------------------------------------------------------
    def load_encoders(self) -> None:
        from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline
        from transformers import AutoTokenizer

        from trainer.models import read_model_index

        name, dt = self.cfg.pretrained_model_name_or_path, self.weight_dtype
        self.vae, _ = self.place(AutoencoderKLWan.from_pretrained(name, subfolder="vae", dtype=dt), "none")
        tokenizer = AutoTokenizer.from_pretrained(name, subfolder="tokenizer")
        self.text_pipe = WanPipeline(tokenizer=tokenizer, text_encoder=self.load_text_encoder(), vae=None, scheduler=None, transformer=None)
        self.pipeline_scheduler = dict(UniPCMultistepScheduler.load_config(name, subfolder="scheduler"))
        # training sigmas: the same static shift the pipeline's scheduler samples with
        self.scheduler_config = {"num_train_timesteps": int(self.pipeline_scheduler.get("num_train_timesteps", 1000)),
                                 "shift": float(self.pipeline_scheduler.get("flow_shift") or 1.0), "use_dynamic_shifting": False}
        self.expand_timesteps = bool(read_model_index(name).get("expand_timesteps", False))
        self.latents_mean, self.latents_std = qwen_latent_statistics(self.vae, self.device)

    # --- conditioning --------------------------------------------------------------------------------------
    def count_tokens(self, captions: list[str]) -> list[int]:
        return [len(ids) for ids in self.text_pipe.tokenizer(list(captions), add_special_tokens=True).input_ids]

    @torch.no_grad()
    def encode_prompts(self, captions: list[str]) -> WanCond:
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean

        n = self.cfg.max_sequence_length
        embeds, _ = self.text_pipe.encode_prompt(list(captions), do_classifier_free_guidance=False, max_sequence_length=n,
                                                 device=self.device)
        tok = self.text_pipe.tokenizer([prompt_clean(c) for c in captions], padding="max_length", max_length=n, truncation=True,
                                       add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        mask = tok.attention_mask.to(embeds.device)
        return {"prompt_embeds": (embeds * mask[..., None]).to(self.weight_dtype), "prompt_embeds_mask": mask}

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return qwen_vae_latents(self.vae, pixels, self.device, self.latents_mean, self.latents_std)

    def padded_prompt(self, cond: Cond) -> torch.Tensor:
        """The prompt as the pipeline passes it: each caption's own tokens, zeros up to max_sequence_length."""
        e, m = cond["prompt_embeds"], cond["prompt_embeds_mask"]
        out = e.new_zeros(e.shape[0], self.cfg.max_sequence_length, e.shape[2])
        for i in range(e.shape[0]):
            k = int(m[i].sum())
            out[i, :k] = e[i, :k]
        return out

    def predict(self, transformer: torch.nn.Module, noisy: torch.Tensor, sigmas: torch.Tensor, cond: Cond) -> torch.Tensor:
        dt = self.weight_dtype
        b, _c, h, w = noisy.shape
        timestep = (sigmas.float() * 1000).to(dt)
        if self.expand_timesteps:  # one per latent token (frames x h/2 x w/2), as the TI2V-5B pipeline passes it
            p = transformer.config.patch_size
            timestep = timestep[:, None].expand(b, (h // p[1]) * (w // p[2]))
        out = transformer(hidden_states=noisy.to(dt).unsqueeze(2), timestep=timestep, encoder_hidden_states=self.padded_prompt(cond).to(dt),
                          return_dict=False)[0]
        return out.squeeze(2).float()

    # --- sampling and inference ----------------------------------------------------------------------------
    def sampling_pipeline(self, transformer: torch.nn.Module):
        from diffusers import UniPCMultistepScheduler

        return self.pipeline_class(scheduler=UniPCMultistepScheduler.from_config(self.pipeline_scheduler), vae=self.vae,
                                   transformer=transformer, expand_timesteps=self.expand_timesteps, **self.no_text_components())

    def sampling_kwargs(self, cond: Cond, negative: Cond, size: tuple[int, int], images: list) -> dict:
        scale = self.cfg.validation_guidance_scale
        return {"prompt_embeds": self.padded_prompt(cond), "negative_prompt_embeds": self.padded_prompt(negative) if scale > 1 else None,
                "guidance_scale": scale, "num_frames": 1, "output_type": "pil"}

    def inference_kwargs(self, request: InferenceRequest) -> dict:
        kwargs = {"guidance_scale": request.true_cfg_scale, "num_frames": 1, "output_type": "pil"}
        if request.negative_prompt is not None:
            kwargs["negative_prompt"] = request.negative_prompt
        if request.max_sequence_length is not None:
            kwargs["max_sequence_length"] = request.max_sequence_length
        return kwargs

    def comfyui_names(self, module: str) -> tuple[str, str, str]:
        name = self.comfyui_prefix + comfyui_module(module)
        return f"{name}.lora_A.weight", f"{name}.lora_B.weight", f"{name}.alpha"

    # --- planner, benches, tiny models ---------------------------------------------------------------------
    def image_seq_len(self, latents: torch.Tensor) -> int:
        return (latents.shape[-2] // 2) * (latents.shape[-1] // 2)

    def planner_spec(self) -> PlannerSpec:
        from diffusers import AutoencoderKLWan

        with torch.device("meta"):
            vae_params = sum(p.numel() for p in AutoencoderKLWan().parameters())
        return PlannerSpec(encoders=[("text encoder UMT5-XXL", UMT5_XXL_PARAMS, True)], vae_params=vae_params, text_tokens=512,
                           token_pixels=self.size_multiple)

    def released_transformer_config(self) -> dict:
        """The released transformer named by the model id (the planner without the model's files): Wan 2.1 T2V 1.3B /
        14B, else Wan 2.2 TI2V-5B."""
        name = str(self.cfg.pretrained_model_name_or_path).lower()
        if "1.3b" in name:
            return {"num_attention_heads": 12, "ffn_dim": 8960, "num_layers": 30}
        if "14b" in name:
            return {}  # WanTransformer3DModel's defaults are Wan 2.1 T2V 14B's
        return {"num_attention_heads": 24, "ffn_dim": 14336, "num_layers": 30, "in_channels": 48, "out_channels": 48}

    def random_conditioning(self, transformer, batch: int, device, dtype) -> Cond:
        g = torch.Generator(device=device).manual_seed(0)
        emb = torch.randn(batch, 128, transformer.config.text_dim, generator=g, device=device).to(dtype)
        return {"prompt_embeds": emb, "prompt_embeds_mask": torch.ones(batch, 128, dtype=torch.long, device=device)}

    def make_tiny_model(self, out, realistic: bool = False) -> None:
        """Wan 2.1's layout at tiny width: UMT5, the Wan VAE (8x spatial, its latent statistics its own), UniPC with
        flow sigmas (flow_shift 3, the released 480p scheduler)."""
        from diffusers import UniPCMultistepScheduler, WanPipeline

        from .flux import build_t5
        from .qwen_image import calibrate_qwen_vae

        torch.manual_seed(0)
        _t5, tokenizer = build_t5()
        WanPipeline(
            tokenizer=tokenizer, text_encoder=build_umt5(tokenizer), vae=calibrate_qwen_vae(build_wan_vae()),
            scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
                                              num_train_timesteps=1000),
            transformer=build_wan_transformer(),
        ).save_pretrained(out)


def build_umt5(tokenizer, hidden: int = 32):
    from transformers import UMT5Config, UMT5EncoderModel

    config = UMT5Config(vocab_size=len(tokenizer), d_model=hidden, d_kv=8, d_ff=hidden * 2, num_layers=2, num_heads=4,
                        relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return UMT5EncoderModel(config)


def build_wan_vae(z_dim: int = 4):
    from diffusers import AutoencoderKLWan

    from .tiny import near_deterministic

    vae = AutoencoderKLWan(base_dim=z_dim * 4, z_dim=z_dim, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                           temperal_downsample=[False, True, True], latents_mean=[0.0] * z_dim, latents_std=[1.0] * z_dim)
    near_deterministic(vae.quant_conv, z_dim)
    return vae


def build_wan22_vae(z_dim: int = 8):
    """Wan 2.2's VAE layout at tiny width: residual, 2x2 pixel patches in (12 channels), 16x spatial compression."""
    from diffusers import AutoencoderKLWan

    from .qwen_image import calibrate_qwen_vae
    from .tiny import near_deterministic

    vae = AutoencoderKLWan(base_dim=16, decoder_base_dim=16, z_dim=z_dim, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                           temperal_downsample=[False, True, True], is_residual=True, in_channels=12, out_channels=12, patch_size=2,
                           scale_factor_spatial=16, latents_mean=[0.0] * z_dim, latents_std=[1.0] * z_dim)
    near_deterministic(vae.quant_conv, z_dim)
    return calibrate_qwen_vae(vae)


def build_wan_transformer(z_dim: int = 4, text_dim: int = 32):
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=z_dim, out_channels=z_dim,
                                 text_dim=text_dim, freq_dim=32, ffn_dim=64, num_layers=3, rope_max_seq_len=1024)
