"""Ideogram 4 (Ideogram, 9.3B single-stream DiT trained from scratch): prompts as 13 hidden-state layers of
Qwen3-VL-8B per token, latents of a FLUX.2-type VAE, and asymmetric classifier-free guidance by a second,
unconditional transformer.

What the trainer feeds the transformer, and where it follows `Ideogram4Pipeline`:
- prompt: the tokenizer's chat template (one user turn, generation prompt), no cut: the hidden states of the text
  encoder's layers 0, 3, ..., 33, 35 (`QWEN3_VL_ACTIVATION_LAYERS`) side by side, 13 x 4096 = 53,248 features per token,
  computed by the pipeline's own `encode_prompt`. The transformer takes one packed sequence [padding][text][image]:
  text tokens left-padded, with positions 0..n-1, image tokens at (0, h, w) + 65536, padding in its own attention
  segment. The pipeline pads every prompt to `max_sequence_length` (2048) tokens; training pads a batch to its longest
  caption only: padding is its own attention segment and carries no position the others see, so the image tokens'
  output does not depend on it (the equivalence test compares the pipeline's 2048-token call with the trainer's
  unpadded one). The cache keeps each caption's own tokens.
- latents: the VAE's mode, 2x2-patchified with the pipeline's channel order (row offset, column offset, then the
  32 VAE channels: the inverse of its decode) and normalised with the VAE's batch-norm statistics (its
  batch_norm_eps); B x 128 x H/16 x W/16, tokens row-major.
- timestep: the transformer's time runs the other way (t = 1 - sigma: 0 is noise, 1 is the image) and it predicts
  x0 - noise, the negated velocity (the pipeline steps with -v): `predict` returns noise - x0 as every family does.
- sigmas: the pipeline samples a logit-normal schedule, sigma = sigmoid(N(mu, 1.5)) with mu = 0.5 log(pixels / 512^2);
  training draws sigmoid(N(logit_mean + mu, logit_std)) with the same mu (`training_mu`; the shipped YAML sets
  logit_std 1.5 to match), and `timestep_sampling: schedule` steps along the pipeline's own sigmas.
- ComfyUI: its Ideogram 4 model stacks to_q / to_k / to_v into attention.qkv (and calls to_out.0 attention.o); the ComfyUI
  file holds one LoRA per stacked layer (downs stacked, ups block-diagonal: exact), so LoKr / LoHa / DoRA on q / k / v have
  no ComfyUI form (`ModelAdapter.check_setup` refuses them before loading with lora_format: comfyui).
- guidance: v = w v_cond + (1 - w) v_uncond, v_uncond from `unconditional_transformer` on the image tokens alone with
  zero text features; w is the usual scale (1 = the conditional model alone). inference.py and previews use one w
  for every step (default 7, the pipeline's main-step value; its default schedule ends with 3 polish steps at 3).
  There is no negative prompt.

The unconditional transformer is not trained: `Ideogram4LoraLoaderMixin` loads LoRAs into `transformer` only, so an
adapter on the unconditional model could not be loaded by the user's pipeline; and it is the unconditional model of
the asymmetric guidance, which a LoRA steers the conditional model away from. It is loaded only for validation
previews (the pipeline runs it every step), placed as the transformer is (quantize / blocks_to_swap).

The prompt enhancer (`prompt_enhancer_head`, an optional component) is never loaded: a LoRA is sampled with its own
captions. Released sizes from ideogram-oss/ideogram4 docs/model_architecture.md (4608 wide, 34 layers, 18 heads, 12288
SwiGLU, adaLN 512, 2048 text tokens: the transformer class defaults) and Qwen3-VL-8B-Instruct's config.
"""

from __future__ import annotations

import math
from typing import TypedDict

import torch

from . import register
from .base import Cond, InferenceRequest, LearningCase, ModelAdapter, PlannerSpec, Variant
from .flux2 import FLUX2_VAE_PARAMS
from .krea2 import QWEN3_VL_4B
from .qwen_image import pad_and_stack

PATCH = 2  # Ideogram4Pipeline.patch_size
BASE_PIXELS = 512 * 512  # _resolution_aware_mu's base resolution
SCHEDULE_STD = 1.5  # Ideogram4Pipeline's default std of its logit-normal schedule
TYPICAL_PROMPT_TOKENS = 256  # the planner's prompt length: captions are not padded to 2048 in training
QWEN3_VL_8B = {  # Qwen3-VL-8B-Instruct's config.json (text + vision), for the planner's parameter count: Qwen3-VL-4B's but for these
    "text_config": {**QWEN3_VL_4B["text_config"], "hidden_size": 4096, "intermediate_size": 12288},
    "vision_config": {**QWEN3_VL_4B["vision_config"], "depth": 27, "hidden_size": 1152, "intermediate_size": 4304, "out_hidden_size": 4096,
                      "deepstack_visual_indexes": [8, 16, 24]},
    "tie_word_embeddings": False,
}


class Ideogram4Cond(TypedDict):
    prompt_embeds: torch.Tensor  # B x L x 53248: each caption's tokens (13 layers side by side), zero-padded after
    prompt_embeds_mask: torch.Tensor  # B x L, 1 for those tokens


def chat_prompts(tokenizer, captions: list[str]) -> list[str]:
    """Each caption in the chat template, as Ideogram4Pipeline.encode_prompt builds it."""
    return [tokenizer.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": c}]}], add_generation_prompt=True,
                                          tokenize=False) for c in captions]


def packed_inputs(cond: Cond, grid_h: int, grid_w: int, device) -> dict:
    """The transformer's text half of the packed sequence for a batch: features B x (n + h w) x D laid out as the
    pipeline's encode_prompt lays them out with max_sequence_length n (each caption left-padded to the batch's longest),
    with its position ids, segment ids and indicator."""
    from diffusers import Ideogram4Pipeline

    emb, mask = cond["prompt_embeds"], cond["prompt_embeds_mask"]
    b, n = mask.shape
    lengths = [int(x) for x in mask.sum(1).tolist()]
    features = emb.new_zeros(b, n + grid_h * grid_w, emb.shape[-1])
    for i, length in enumerate(lengths):
        features[i, n - length : n] = emb[i, :length]
    position_ids, segment_ids, indicator = Ideogram4Pipeline._prepare_ids(lengths, grid_h, grid_w, n, device)
    return {"encoder_hidden_states": features, "position_ids": position_ids, "segment_ids": segment_ids, "indicator": indicator}


def schedule_mu(image_tokens: int) -> float:
    """_resolution_aware_mu at mu = 0: half the log of the image's pixels over 512^2 (16 x 16 pixels per token)."""
    return 0.5 * math.log(image_tokens * (8 * PATCH) ** 2 / BASE_PIXELS)


@register
class Ideogram4Adapter(ModelAdapter):
    family = "ideogram4"
    entry = "train_ideogram4_lora.py"
    # The tiny case trains at 64 px, where the resolution-aware mu is -2.1: sigmas drawn that way (as the pipeline's schedule at
    # 64 px) almost never reach the high noise its first sampling step starts from, and 800 steps still do not separate the
    # captions; trained as at 512 px (mu 0, the schedule's std 1.5) it learns in 600 on one CPU (choice +0.46; 400: +0.13) but
    # only to +0.26 on another (AVX-512: other float rounding), so the case trains 800 (+0.72 there)
    variants = (Variant("ideogram4", "Ideogram4Pipeline", hub_hints=("ideogram",),
                        learning=LearningCase(0, 800, 5e-3, config=(("timestep_sampling", "logit_normal"), ("logit_std", SCHEDULE_STD)))),)
    default_true_cfg_scale = 7.0  # the pipeline's main-step guidance
    transformer_class = "Ideogram4Transformer2DModel"
    # attention and SwiGLU of every block
    default_target_modules = ("to_q", "to_k", "to_v", "to_out.0", "w1", "w2", "w3")
    encoder_folders = ("text_encoder", "tokenizer", "vae")
    text_token_keys = ("prompt_embeds", "prompt_embeds_mask")
    placed_components = ("transformer", "unconditional_transformer")
    takes_negative_prompt = False  # its guidance runs the unconditional transformer, without text

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.unconditional: torch.nn.Module | None = None
        self.preview: Cond | None = None

    # ComfyUI's own Ideogram 4 model (comfy/ldm/ideogram4/model.py) keeps these names except attention.qkv (q, k, v stacked)
    # and attention.o; its generic rule maps diffusion_model.<its name> for every model
    comfyui_fused = {"attention.qkv": ("attention.to_q", "attention.to_k", "attention.to_v")}

    def comfyui_names(self, module: str) -> tuple[str, str, str]:
        group = self.comfyui_group(module)
        name = group[0] if group else module
        return super().comfyui_names(name.replace("attention.to_out.0", "attention.o"))

    # --- loading -------------------------------------------------------------------------------------------
    def load_encoders(self) -> None:
        import transformers
        from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Ideogram4Pipeline

        name = self.cfg.pretrained_model_name_or_path
        self.vae, _ = self.place(AutoencoderKLFlux2.from_pretrained(name, subfolder="vae", dtype=self.weight_dtype), "none")
        tokenizer = transformers.AutoTokenizer.from_pretrained(name, subfolder="tokenizer")
        self.text_pipe = Ideogram4Pipeline(scheduler=None, vae=None, text_encoder=self.load_text_encoder(), tokenizer=tokenizer,
                                           transformer=None, unconditional_transformer=None)
        self.scheduler_config = dict(FlowMatchEulerDiscreteScheduler.load_config(name, subfolder="scheduler"))

    def unconditional_transformer(self) -> torch.nn.Module:
        """The frozen unconditional transformer (loaded at the first preview), placed as the trained one is."""
        if self.unconditional is None:
            self.unconditional, _ = self.load_placed("unconditional_transformer")
        return self.unconditional

    # --- conditioning --------------------------------------------------------------------------------------
    def count_tokens(self, captions: list[str]) -> list[int]:
        tokenizer = self.text_pipe.tokenizer
        return [len(ids) for ids in tokenizer(chat_prompts(tokenizer, list(captions)), add_special_tokens=False).input_ids]

    def check_sequences(self, samples: list) -> list[str]:
        """Captions are trained whole; the pipeline refuses prompts over its max_sequence_length (2048 by default)."""
        import inspect

        from diffusers import Ideogram4Pipeline

        limit = inspect.signature(Ideogram4Pipeline.__call__).parameters["max_sequence_length"].default
        return [f"caption of {s.image.name} has {n} tokens: trained whole, but Ideogram4Pipeline refuses prompts over {limit} tokens "
                f"unless its max_sequence_length is raised" for s, n in self.long_captions(samples, limit)]

    @torch.no_grad()
    def encode_prompts(self, captions: list[str]) -> Ideogram4Cond:
        lengths = self.count_tokens(captions)
        n = max(lengths)
        embeds, *_ = self.text_pipe.encode_prompt(list(captions), grid_h=0, grid_w=0, max_sequence_length=n, device=self.device)
        own = [e[n - length :].unsqueeze(0) for e, length in zip(embeds, lengths)]  # left-padded: each caption's last tokens
        padded, mask = pad_and_stack(own, [None] * len(own))
        return {"prompt_embeds": padded.to(self.weight_dtype), "prompt_embeds_mask": mask}

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """The inverse of the pipeline's decode: VAE mode, 2x2 patches into (row, column, channel) order, batch-norm
        statistics removed."""
        z = self.vae.encode(pixels.to(self.device, self.vae.dtype)).latent_dist.mode()
        b, c, h, w = z.shape
        z = z.view(b, c, h // PATCH, PATCH, w // PATCH, PATCH).permute(0, 3, 5, 1, 2, 4).reshape(b, c * PATCH * PATCH, h // PATCH, w // PATCH)
        mean = self.vae.bn.running_mean.view(1, -1, 1, 1).to(z)
        std = torch.sqrt(self.vae.bn.running_var.view(1, -1, 1, 1) + self.vae.config.batch_norm_eps).to(z)
        return ((z - mean) / std).float()

    def image_seq_len(self, latents: torch.Tensor) -> int:
        return latents.shape[-2] * latents.shape[-1]  # already patchified: one token per latent position

    def training_mu(self, image_seq_len: int) -> float | None:
        return schedule_mu(image_seq_len)

    def sigma_path(self, image_seq_len: int) -> torch.Tensor:
        """The pipeline's own logit-normal sigmas at its default step count and std, then 0."""
        import inspect

        from diffusers import Ideogram4Pipeline
        from diffusers.pipelines.ideogram4.pipeline_ideogram4 import _logit_normal_sigmas

        steps = inspect.signature(Ideogram4Pipeline.__call__).parameters["num_inference_steps"].default
        sigmas = _logit_normal_sigmas(steps, schedule_mu(image_seq_len), std=SCHEDULE_STD)
        return torch.cat([sigmas, sigmas.new_zeros(1)]).float()

    def predict(self, transformer: torch.nn.Module, noisy: torch.Tensor, sigmas: torch.Tensor, cond: Cond) -> torch.Tensor:
        b, c, h, w = noisy.shape
        dt = self.weight_dtype
        inputs = packed_inputs(cond, h, w, noisy.device)
        n = cond["prompt_embeds_mask"].shape[1]
        tokens = noisy.flatten(2).transpose(1, 2)
        out = transformer(
            hidden_states=torch.cat([tokens.new_zeros(b, n, c), tokens], 1).to(dt),
            timestep=(1.0 - sigmas.float()).to(dt),  # the pipeline's 1 - t / 1000
            **{**inputs, "encoder_hidden_states": inputs["encoder_hidden_states"].to(dt)},
            return_dict=False,
        )[0]
        return -out[:, n:].float().transpose(1, 2).reshape(b, c, h, w)  # it predicts x0 - noise

    # --- sampling and inference ----------------------------------------------------------------------------
    def no_text_components(self) -> dict:
        return {"text_encoder": None, "tokenizer": None, "unconditional_transformer": self.unconditional_transformer()}

    def sampling_pipeline(self, transformer: torch.nn.Module):
        """The pipeline's own __call__; its encode_prompt (which has no embeddings argument) hands back the cached
        embeddings of the prompt being rendered."""
        pipe = super().sampling_pipeline(transformer)
        pipe.encode_prompt = self.cached_prompt
        return pipe

    def cached_prompt(self, prompt, grid_h: int, grid_w: int, max_sequence_length: int, device):
        inputs = packed_inputs(self.preview, grid_h, grid_w, device)
        return inputs["encoder_hidden_states"].float(), inputs["position_ids"], inputs["segment_ids"], inputs["indicator"]

    def sampling_kwargs(self, cond: Cond, negative: Cond, size: tuple[int, int], images: list) -> dict:
        self.preview = cond
        return {"prompt": [""] * cond["prompt_embeds"].shape[0], "guidance_scale": self.cfg.validation_guidance_scale, "guidance_schedule": None,
                "max_sequence_length": cond["prompt_embeds_mask"].shape[1]}

    def inference_kwargs(self, request: InferenceRequest) -> dict:
        kwargs = {"guidance_scale": request.true_cfg_scale, "guidance_schedule": None}
        if request.max_sequence_length is not None:
            kwargs["max_sequence_length"] = request.max_sequence_length
        return kwargs

    # --- planner, benches, tiny models ---------------------------------------------------------------------
    def planner_spec(self) -> PlannerSpec:
        from diffusers import Ideogram4Transformer2DModel
        from transformers import Qwen3VLConfig, Qwen3VLModel

        with torch.device("meta"):
            encoder_params = sum(p.numel() for p in Qwen3VLModel(Qwen3VLConfig(**QWEN3_VL_8B)).parameters())
            unconditional = sum(p.numel() for p in Ideogram4Transformer2DModel().parameters())
        return PlannerSpec(encoders=[("text encoder Qwen3-VL-8B", encoder_params, True)], vae_params=FLUX2_VAE_PARAMS,
                           text_tokens=TYPICAL_PROMPT_TOKENS, token_width=4608, preview_params=unconditional)

    def random_conditioning(self, transformer, batch: int, device, dtype) -> Cond:
        g = torch.Generator(device=device).manual_seed(0)
        emb = torch.randn(batch, TYPICAL_PROMPT_TOKENS, transformer.config.llm_features_dim, generator=g, device=device).to(dtype)
        return {"prompt_embeds": emb, "prompt_embeds_mask": torch.ones(batch, TYPICAL_PROMPT_TOKENS, dtype=torch.long, device=device)}

    def make_tiny_model(self, out, realistic: bool = False) -> None:
        """The released text path (Qwen3-VL chat template, 13 taps of a 36-layer Qwen3-VL), the FLUX.2-type VAE with
        batch-norm statistics in the pipeline's channel order, and two transformers (conditional and unconditional)."""
        from diffusers import FlowMatchEulerDiscreteScheduler, Ideogram4Pipeline
        from diffusers.pipelines.ideogram4.pipeline_ideogram4 import QWEN3_VL_ACTIVATION_LAYERS

        from .qwen_image21 import build_qwen3_vl, build_qwen3_vl_tokenizer

        torch.manual_seed(0)
        tokenizer = build_qwen3_vl_tokenizer()
        hidden = 32
        Ideogram4Pipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False),
            vae=build_ideogram4_vae(), text_encoder=build_qwen3_vl(tokenizer, hidden=hidden, layers=36, model_class="Qwen3VLModel"),
            tokenizer=tokenizer, transformer=build_ideogram4_transformer(hidden * len(QWEN3_VL_ACTIVATION_LAYERS), seed=0),
            unconditional_transformer=build_ideogram4_transformer(hidden * len(QWEN3_VL_ACTIVATION_LAYERS), seed=1),
        ).save_pretrained(out)


def build_ideogram4_vae():
    """The FLUX.2-type VAE whose batch-norm statistics are those of its own latents in Ideogram4Pipeline's patch order
    (row offset, column offset, channel): normalised latents have about unit variance."""
    from .flux2 import build_flux2_vae

    vae = build_flux2_vae()
    c = vae.config.latent_channels
    with torch.no_grad():  # build_flux2_vae's statistics are in FLUX.2's order (channel, row offset, column offset)
        for stat in (vae.bn.running_mean, vae.bn.running_var):
            stat.copy_(stat.view(c, PATCH, PATCH).permute(1, 2, 0).reshape(-1))
    return vae


def build_ideogram4_transformer(llm_features_dim: int, seed: int):
    """The released block layout at tiny width (head dim 32 with the released MRoPE proportions)."""
    from diffusers import Ideogram4Transformer2DModel

    torch.manual_seed(seed)
    return Ideogram4Transformer2DModel(in_channels=32, num_layers=3, attention_head_dim=32, num_attention_heads=2, intermediate_size=128,
                                       adaln_dim=32, llm_features_dim=llm_features_dim, mrope_section=(6, 5, 5))
