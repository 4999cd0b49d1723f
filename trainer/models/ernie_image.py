"""ERNIE-Image (Baidu, 8B single-stream DiT; ERNIE-Image-Turbo is its 8-step distillation): prompts from the
second-to-last hidden states of a Ministral-3 3B (`Mistral3Model`), latents of the FLUX.2 VAE.

What the trainer feeds the transformer, and where it follows `ErnieImagePipeline`:
- prompt: the tokenizer with its special tokens (BOS first), no chat template, no padding and no length cut:
  hidden_states[-2] of every token of the caption (an empty caption is its BOS token). The transformer takes the
  batch zero-padded with each sample's length (`text_lens`); its image position ids start after the sample's own
  text length, so the length (not the padding) is conditioning. `max_sequence_length` does not apply: the pipeline
  feeds whole captions, and so does training.
- latents: VAE mode, 2x2 patchified into 128 channels and normalised with the VAE's batch-norm statistics, with the
  eps the pipeline decodes with (1e-5, "the trained value" in ErnieImagePipeline; the released VAE config says
  otherwise), B x 128 x H/16 x W/16, not packed: the transformer patch-embeds them itself.
- timestep = 1000 sigma (the scheduler's timesteps, passed as they are); the output is the velocity.
- sigmas: the pipeline's linspace(1, 0, N + 1)[:-1] through the scheduler's static shift (4.0 in the released
  config), which the training sigmas follow by default.
- guidance: real CFG with "" as the negative prompt (the pipeline's default scale 4.0); no distilled guidance input.
- the prompt enhancer (`pe`, a Ministral-3 3B that rewrites prompts) is not used in training, in previews or by
  inference.py (it is not even loaded): a LoRA trained on its own captions is sampled with those captions.

Released configs read from the model's repository (baidu/ERNIE-Image: model_index.json, transformer/config.json,
text_encoder/config.json, scheduler/scheduler_config.json). Train on ERNIE-Image; a step-distilled Turbo drifts from
its distillation when trained directly (as Z-Image-Turbo / FLUX.2 Klein).
"""

from __future__ import annotations

from typing import TypedDict

import torch

from . import register
from .base import Cond, InferenceRequest, ModelAdapter, LearningCase, PlannerSpec, Variant
from .flux2 import FLUX2_VAE_PARAMS, flux2_vae_latents
from .qwen_image import pad_and_stack
from .z_image import unpadded

BN_EPS = 1e-5  # ErnieImagePipeline's batch-norm eps when it decodes latents (not vae.config.batch_norm_eps)
MINISTRAL3_3B_PARAMS = 3_849_090_048  # Mistral3Model of the released text_encoder config (text 3,429,006,336 + Pixtral vision)
TYPICAL_PROMPT_TOKENS = 256  # the planner's prompt length: captions are not padded; ERNIE's prompts are long descriptions


class ErnieImageCond(TypedDict):
    prompt_embeds: torch.Tensor  # B x L x 3072 hidden_states[-2] of each caption's tokens, zero-padded
    prompt_embeds_mask: torch.Tensor  # B x L, 1 for the caption's own tokens (their count is text_lens)


@register
class ErnieImageAdapter(ModelAdapter):
    family = "ernie-image"
    entry = "train_ernie_image_lora.py"
    variants = (Variant("ernie-image", "ErnieImagePipeline", hub_hints=("ernie-image",), learning=LearningCase(0, 300, 5e-3)),)
    transformer_class = "ErnieImageTransformer2DModel"
    # attention and feed-forward of every block (ComfyUI's ErnieImageModel keeps these module names)
    default_target_modules = ("to_q", "to_k", "to_v", "to_out.0", "gate_proj", "up_proj", "linear_fc2")
    encoder_folders = ("text_encoder", "tokenizer", "vae")
    text_token_keys = ("prompt_embeds", "prompt_embeds_mask")

    def load_encoders(self) -> None:
        import transformers
        from diffusers import AutoencoderKLFlux2, ErnieImagePipeline, FlowMatchEulerDiscreteScheduler

        name = self.cfg.pretrained_model_name_or_path
        self.vae, _ = self.place(AutoencoderKLFlux2.from_pretrained(name, subfolder="vae", dtype=self.weight_dtype), "none")
        tokenizer = transformers.AutoTokenizer.from_pretrained(name, subfolder="tokenizer")
        self.text_pipe = ErnieImagePipeline(transformer=None, vae=None, text_encoder=self.load_text_encoder(), tokenizer=tokenizer,
                                            scheduler=None)
        self.scheduler_config = dict(FlowMatchEulerDiscreteScheduler.load_config(name, subfolder="scheduler"))


    def pipeline_components(self, name_or_path: str) -> dict:
        return {"pe": None, "pe_tokenizer": None}  # the prompt enhancer stays on disk (see the module docstring)

    # --- conditioning --------------------------------------------------------------------------------------
    def count_tokens(self, captions: list[str]) -> list[int]:
        return [len(ids) for ids in self.text_pipe.tokenizer(list(captions), add_special_tokens=True).input_ids]

    def check_sequences(self, samples: list) -> list[str]:
        return []  # whole captions, as the pipeline takes them (no max_sequence_length cut to warn about)

    @torch.no_grad()
    def encode_prompts(self, captions: list[str]) -> ErnieImageCond:
        embeds = self.text_pipe.encode_prompt(list(captions), self.device)
        padded, mask = pad_and_stack([e.unsqueeze(0) for e in embeds], [None] * len(embeds))
        return {"prompt_embeds": padded.to(self.weight_dtype), "prompt_embeds_mask": mask}

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return flux2_vae_latents(self.vae, pixels, self.device, BN_EPS)

    def image_seq_len(self, latents: torch.Tensor) -> int:
        return latents.shape[-2] * latents.shape[-1]  # already patchified: one token per latent position

    def predict(self, transformer: torch.nn.Module, noisy: torch.Tensor, sigmas: torch.Tensor, cond: Cond) -> torch.Tensor:
        dt = self.weight_dtype
        return transformer(
            hidden_states=noisy.to(dt),
            timestep=(sigmas.float() * 1000).to(dt),  # the scheduler's timestep
            text_bth=cond["prompt_embeds"].to(dt),
            text_lens=cond["prompt_embeds_mask"].sum(1).long(),
            return_dict=False,
        )[0].float()

    # --- sampling and inference ----------------------------------------------------------------------------
    def sampling_kwargs(self, cond: Cond, negative: Cond, size: tuple[int, int], images: list) -> dict:
        return {"prompt_embeds": unpadded(cond), "negative_prompt_embeds": unpadded(negative),
                "guidance_scale": self.cfg.validation_guidance_scale, "use_pe": False}

    def inference_kwargs(self, request: InferenceRequest) -> dict:
        kwargs = {"guidance_scale": request.true_cfg_scale, "use_pe": False}  # real CFG; the negative prompt defaults to ""
        if request.negative_prompt is not None:
            kwargs["negative_prompt"] = request.negative_prompt
        return kwargs

    # --- planner, benches, tiny models ---------------------------------------------------------------------
    def planner_spec(self) -> PlannerSpec:
        return PlannerSpec(encoders=[("text encoder Ministral-3-3B", MINISTRAL3_3B_PARAMS, True)], vae_params=FLUX2_VAE_PARAMS,
                           text_tokens=TYPICAL_PROMPT_TOKENS, token_width=4096)

    def released_transformer_config(self) -> dict:
        return {"hidden_size": 4096, "num_attention_heads": 32, "num_layers": 36, "ffn_hidden_size": 12288, "text_in_dim": 3072}

    def random_conditioning(self, transformer, batch: int, device, dtype) -> Cond:
        g = torch.Generator(device=device).manual_seed(0)
        emb = torch.randn(batch, TYPICAL_PROMPT_TOKENS, transformer.config.text_in_dim, generator=g, device=device).to(dtype)
        return {"prompt_embeds": emb, "prompt_embeds_mask": torch.ones(batch, TYPICAL_PROMPT_TOKENS, dtype=torch.long, device=device)}

    def make_tiny_model(self, out, realistic: bool = False) -> None:
        """The released text path (BOS + caption, hidden_states[-2] of a Mistral3Model), the FLUX.2 VAE with its
        batch-norm statistics, the released scheduler config (static shift 4)."""
        from diffusers import ErnieImagePipeline, FlowMatchEulerDiscreteScheduler

        from .flux2 import build_flux2_vae

        torch.manual_seed(0)
        tokenizer = build_ernie_tokenizer()
        ErnieImagePipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=4.0, use_dynamic_shifting=False),
            vae=build_flux2_vae(), text_encoder=build_ernie_text_encoder(tokenizer), tokenizer=tokenizer,
            transformer=build_ernie_transformer(),
        ).save_pretrained(out)


def build_ernie_tokenizer():
    """The Mistral-style tiny tokenizer, adding BOS as the released (Tekken) tokenizer does."""
    from tokenizers import processors

    from .flux2 import build_mistral_tokenizer

    tokenizer = build_mistral_tokenizer()
    bos = tokenizer.bos_token
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tokenizer.bos_token_id)])
    return tokenizer


def build_ernie_text_encoder(tokenizer, hidden: int = 32):
    """A Mistral3Model (text + a minimal vision tower), the released text_encoder class."""
    from transformers import Mistral3Model

    from .flux2 import build_mistral3

    return Mistral3Model(build_mistral3(tokenizer, hidden=hidden, layers=3).config)


def build_ernie_transformer(text_in_dim: int = 32):
    """The released block layout at tiny width; the output layer and the shared modulation, which the class
    initialises to zero, are random (a released model's are trained), so every path through them counts."""
    from diffusers import ErnieImageTransformer2DModel

    t = ErnieImageTransformer2DModel(hidden_size=64, num_attention_heads=2, num_layers=3, ffn_hidden_size=128, in_channels=32,
                                     out_channels=32, text_in_dim=text_in_dim, rope_axes_dim=(8, 12, 12))
    with torch.no_grad():
        for layer in (t.final_linear, t.adaLN_modulation[-1]):
            torch.nn.init.normal_(layer.weight, std=0.05)
            torch.nn.init.normal_(layer.bias, std=0.05)
    return t
