"""Krea 2 (Krea, 12B single-stream MMDiT; Krea 2 Turbo is its 8-step TDM distillation): prompts as 12 hidden-state
layers of Qwen3-VL-4B per token, latents of the Qwen-Image VAE.

What the trainer feeds the transformer, and where it follows `Krea2Pipeline`:
- prompt: the pipeline's system template (34 tokens, dropped after encoding) + caption, padded to
  `max_sequence_length` - 5 and followed by the 5-token assistant suffix, so the transformer always sees
  `max_sequence_length` (512) tokens: [caption][padding][suffix]. The text encoder's hidden states of the layers in the
  model's `text_encoder_select_layers` (2, 5, ..., 35) are stacked per token: B x 512 x 12 x 2560. Captions longer than
  507 tokens are cut (a warning names them). The cache keeps each caption's own tokens (caption + suffix); `predict`
  puts them back at the pipeline's positions with zeros for the padding. The pipeline's padding rows hold the text
  encoder's states of pad tokens instead, but the transformer masks padded tokens out of every attention (its text
  fusion mixes layers within a token only, and text tokens carry no position), so they cannot reach the output: the
  equivalence test compares the unmasked rows and the prediction, which agree exactly.
- latents: the Qwen-Image VAE's mode, normalised with its latents_mean / latents_std, packed 2x2 into 64-channel tokens;
  position ids (0, h, w) for image tokens, zeros for text.
- timestep = sigma (the pipeline passes t / 1000); the output is the velocity.
- sigmas: the scheduler's exponential time shift with mu from the image token count (base 256 -> 0.5, 6400 -> 1.15);
  a distilled checkpoint (`is_distilled` in model_index.json) uses mu = 1.15 at every size, as its pipeline does.
- guidance: the pipeline computes cond + w (cond - uncond) (w = 4.5 by default, CFG on for any w > 0); trainer and
  inference.py speak the usual scale s = w + 1 (`--true_cfg_scale`, `validation_guidance_scale`: 1 = no CFG).
  Dropped captions and the default negative prompt are "".

Train on Krea 2 (the base / midtrain checkpoint); a LoRA trained on the step-distilled Turbo drifts from its
distillation (a warning says so). Released sizes read from krea-ai/krea-2 (its inference.py model config: 6144 wide,
28 blocks, 48 heads / 12 KV heads, Qwen3-VL-4B text with 12 taps) and Krea2Pipeline's documented scheduler config.
"""

from __future__ import annotations

from typing import TypedDict

import torch

from . import register
from .base import Cond, InferenceRequest, ModelAdapter, LearningCase, PlannerSpec, Variant
from .qwen_image import pack_latents, pad_and_stack, qwen_latent_statistics, qwen_vae_latents, unpack_latents
from .z_image import pipeline_guidance

SUFFIX_TOKENS = 5  # Krea2Pipeline.prompt_template_encode_num_suffix_tokens: "<|im_end|>\n<|im_start|>assistant\n"
DISTILLED_MU = 1.15  # Krea2Pipeline's fixed time shift for the distilled checkpoint
QWEN3_VL_4B = {  # Qwen3-VL-4B-Instruct's config.json (text + vision), for the planner's parameter count
    "text_config": {"hidden_size": 2560, "intermediate_size": 9728, "num_hidden_layers": 36, "num_attention_heads": 32,
                    "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936},
    "vision_config": {"depth": 24, "hidden_size": 1024, "intermediate_size": 4096, "num_heads": 16, "out_hidden_size": 2560,
                      "deepstack_visual_indexes": [5, 11, 17]},
    "tie_word_embeddings": True,
}


class Krea2Cond(TypedDict):
    prompt_embeds: torch.Tensor  # B x L x 12 x 2560: each caption's tokens then the template suffix's, zero-padded
    prompt_embeds_mask: torch.Tensor  # B x L, 1 for those tokens


@register
class Krea2Adapter(ModelAdapter):
    family = "krea2"
    entry = "train_krea2_lora.py"
    # 600 steps: the tiny model follows its captions only after ~550 (500: choice +0.00; 600: +0.88), 3x slower per step than
    # the other families (masked attention runs on the math kernel): the bench runs it, not the suite
    variants = (Variant("krea2", "Krea2Pipeline", hub_hints=("krea-2", "krea2"), learning=LearningCase(0, 600, 5e-3, in_suite=False)),)
    default_true_cfg_scale = 5.5  # the pipeline's own default (its guidance_scale 4.5; see pipeline_guidance)
    transformer_class = "Krea2Transformer2DModel"
    # attention (with its output gate) and SwiGLU of every block, the text-fusion blocks' included: all in ComfyUI's
    # Krea 2 LoRA table (comfy.utils.krea2_to_diffusers)
    default_target_modules = ("to_q", "to_k", "to_v", "to_gate", "to_out.0", "ff.gate", "ff.up", "ff.down")
    encoder_folders = ("text_encoder", "tokenizer", "vae")
    text_token_keys = ("prompt_embeds", "prompt_embeds_mask")
    comfyui_prefix = "transformer."  # ComfyUI maps diffusers-named Krea 2 LoRAs as transformer.<name> or <name>

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.latents_mean: torch.Tensor | None = None
        self.latents_std: torch.Tensor | None = None

    @property
    def distilled(self) -> bool:
        from trainer.models import read_model_index

        if "_distilled" not in self.__dict__:
            try:
                self._distilled = bool(read_model_index(self.cfg.pretrained_model_name_or_path).get("is_distilled", False))
            except Exception:  # a hub id that is not on this machine (planner, benches): the base model
                self._distilled = False
        return self._distilled

    # --- loading -------------------------------------------------------------------------------------------
    def load_encoders(self) -> None:
        import transformers
        from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, Krea2Pipeline

        from trainer.config import ConfigError
        from trainer.models import read_model_index

        name = self.cfg.pretrained_model_name_or_path
        index = read_model_index(name)
        self.vae, _ = self.place(AutoencoderKLQwenImage.from_pretrained(name, subfolder="vae", dtype=self.weight_dtype), "none")
        self.latents_mean, self.latents_std = qwen_latent_statistics(self.vae, self.device)
        tokenizer = transformers.AutoTokenizer.from_pretrained(name, subfolder="tokenizer")
        self.text_pipe = Krea2Pipeline(scheduler=None, vae=None, text_encoder=self.load_text_encoder(), tokenizer=tokenizer, transformer=None,
                                       **{k: index[k] for k in ("text_encoder_select_layers", "is_distilled") if k in index})
        suffix = len(tokenizer(self.text_pipe.prompt_template_encode_suffix).input_ids)
        if suffix != SUFFIX_TOKENS:
            raise ConfigError(f"config key 'pretrained_model_name_or_path': its tokenizer splits the Krea 2 prompt suffix into {suffix} "
                              f"tokens, not the {SUFFIX_TOKENS} Krea2Pipeline lays out")
        self.scheduler_config = dict(FlowMatchEulerDiscreteScheduler.load_config(name, subfolder="scheduler"))
        if self.distilled:
            self.warn_distilled("Krea 2 (Turbo)", "base")


    # --- conditioning --------------------------------------------------------------------------------------
    def count_tokens(self, captions: list[str]) -> list[int]:
        """Caption tokens + the suffix: what counts against max_sequence_length (the system template is dropped)."""
        return [len(ids) + SUFFIX_TOKENS for ids in self.text_pipe.tokenizer(list(captions)).input_ids]

    @torch.no_grad()
    def encode_prompts(self, captions: list[str]) -> Krea2Cond:
        embeds, mask = self.text_pipe.encode_prompt(list(captions), device=self.device, max_sequence_length=self.cfg.max_sequence_length)
        own = [e[m].unsqueeze(0) for e, m in zip(embeds, mask)]  # caption + suffix tokens, without the padding between
        padded, compact = pad_and_stack(own, [None] * len(own))
        return {"prompt_embeds": padded.to(self.weight_dtype), "prompt_embeds_mask": compact}

    def pipeline_layout(self, cond: Cond) -> tuple[torch.Tensor, torch.Tensor]:
        """(B x max_sequence_length x 12 x D embeddings, bool mask) laid out as the pipeline's: each caption's tokens,
        zeros, then the 5 suffix tokens at the end."""
        emb, mask = cond["prompt_embeds"], cond["prompt_embeds_mask"]
        length = self.cfg.max_sequence_length
        out = emb.new_zeros(emb.shape[0], length, *emb.shape[2:])
        full = torch.zeros(emb.shape[0], length, dtype=torch.bool, device=emb.device)
        for i, n in enumerate(mask.sum(1).tolist()):
            caption = n - SUFFIX_TOKENS
            out[i, :caption], out[i, length - SUFFIX_TOKENS:] = emb[i, :caption], emb[i, caption:n]
            full[i, :caption] = True
            full[i, length - SUFFIX_TOKENS:] = True
        return out, full

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return qwen_vae_latents(self.vae, pixels, self.device, self.latents_mean, self.latents_std)

    def training_mu(self, image_seq_len: int) -> float | None:
        """Krea2Pipeline's mu: fixed for the distilled checkpoint, else from the token count with its own defaults."""
        from trainer.flow_matching import calculate_shift

        if self.distilled:
            return DISTILLED_MU
        c = self.scheduler_config
        return calculate_shift(image_seq_len, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 6400),
                               c.get("base_shift", 0.5), c.get("max_shift", 1.15))

    def predict(self, transformer: torch.nn.Module, noisy: torch.Tensor, sigmas: torch.Tensor, cond: Cond) -> torch.Tensor:
        from diffusers import Krea2Pipeline

        b, _c, h, w = noisy.shape
        dt = self.weight_dtype
        emb, mask = self.pipeline_layout(cond)
        out = transformer(
            hidden_states=pack_latents(noisy.to(dt)),
            encoder_hidden_states=emb.to(dt),
            timestep=sigmas.to(dt),  # the pipeline passes t / 1000 = sigma
            position_ids=Krea2Pipeline.prepare_position_ids(emb.shape[1], h // 2, w // 2, noisy.device),
            encoder_attention_mask=mask,
            return_dict=False,
        )[0]
        return unpack_latents(out, h, w)

    # --- sampling and inference ----------------------------------------------------------------------------
    def sampling_kwargs(self, cond: Cond, negative: Cond, size: tuple[int, int], images: list) -> dict:
        (emb, mask), (neg, neg_mask) = self.pipeline_layout(cond), self.pipeline_layout(negative)
        return {"prompt_embeds": emb, "prompt_embeds_mask": mask, "negative_prompt_embeds": neg, "negative_prompt_embeds_mask": neg_mask,
                "guidance_scale": pipeline_guidance(self.cfg.validation_guidance_scale), "max_sequence_length": self.cfg.max_sequence_length}

    def inference_kwargs(self, request: InferenceRequest) -> dict:
        return {**self.cfg_inference_kwargs(request), "guidance_scale": pipeline_guidance(request.true_cfg_scale)}

    # --- planner, benches, tiny models ---------------------------------------------------------------------
    def planner_spec(self) -> PlannerSpec:
        from diffusers import AutoencoderKLQwenImage
        from transformers import Qwen3VLConfig, Qwen3VLModel

        with torch.device("meta"):
            vae_params = sum(p.numel() for p in AutoencoderKLQwenImage().parameters())
            encoder_params = sum(p.numel() for p in Qwen3VLModel(Qwen3VLConfig(**QWEN3_VL_4B)).parameters())
        return PlannerSpec(encoders=[("text encoder Qwen3-VL-4B", encoder_params, True)], vae_params=vae_params,
                           text_tokens=self.cfg.max_sequence_length, token_width=6144)

    def random_conditioning(self, transformer, batch: int, device, dtype) -> Cond:
        g = torch.Generator(device=device).manual_seed(0)
        c = transformer.config
        n = 128
        emb = torch.randn(batch, n, c.num_text_layers, c.text_hidden_dim, generator=g, device=device).to(dtype)
        return {"prompt_embeds": emb, "prompt_embeds_mask": torch.ones(batch, n, dtype=torch.long, device=device)}

    def make_tiny_model(self, out, realistic: bool = False) -> None:
        """The released prompt layout (34-token system template, 5-token suffix, 512 tokens, the 12 taps of a 36-layer
        Qwen3-VL), the Qwen-Image VAE with its latent statistics, the documented scheduler config."""
        from diffusers import FlowMatchEulerDiscreteScheduler, Krea2Pipeline

        from .qwen_image import build_qwen_tokenizer, build_qwen_vae
        from .qwen_image21 import build_qwen3_vl

        torch.manual_seed(0)
        probe = Krea2Pipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, transformer=None)
        tokenizer = build_qwen_tokenizer(probe.prompt_template_encode_prefix + "{}", probe.prompt_template_encode_start_idx)
        tokenizer.add_tokens(["assistant"])  # one token in the released vocabulary: the suffix is 5 tokens
        Krea2Pipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5,
                                                      max_shift=1.15, base_image_seq_len=256, max_image_seq_len=6400,
                                                      time_shift_type="exponential"),
            vae=build_qwen_vae(), text_encoder=build_qwen3_vl(tokenizer, layers=36, model_class="Qwen3VLModel"), tokenizer=tokenizer,
            transformer=build_krea2_transformer(),
        ).save_pretrained(out)


def build_krea2_transformer(text_dim: int = 32, in_channels: int = 16):
    """The released layout (12 text taps, 2 + 2 text-fusion blocks, grouped-query attention) at tiny width; the
    modulation tables the class starts at zero are random, as trained ones are."""
    from diffusers import Krea2Transformer2DModel

    t = Krea2Transformer2DModel(in_channels=in_channels, num_layers=3, attention_head_dim=32, num_attention_heads=2, num_key_value_heads=1,
                                intermediate_size=128, timestep_embed_dim=32, text_hidden_dim=text_dim, num_text_layers=12,
                                text_num_attention_heads=2, text_num_key_value_heads=2, text_intermediate_size=64,
                                axes_dims_rope=(8, 12, 12))
    with torch.no_grad():
        for p in t.parameters():
            if not p.any():
                p.normal_(std=0.05)
    return t
