"""FLUX.2: dev (32B, Mistral-Small-3.1 prompts, guidance-distilled) and Klein 4B / 9B (Qwen3 prompts), with 0..10
ordered reference images.

What the trainer feeds the transformer, and where it follows `Flux2Pipeline` / `Flux2KleinPipeline`:
- prompt: the pipeline's `encode_prompt`: its chat template (dev: BFL's system message; Klein: Qwen3, thinking off),
  padded to `max_sequence_length` (512, the pipelines' default), hidden states of three layers side by side
  (dev 10/20/30, Klein 9/18/27); text position ids over all 512 tokens.
- latents: VAE latents patchified 2x2 into channels and normalised by the VAE's batch-norm statistics, then packed;
  4-axis position ids (T, H, W, L), T = 0 for the target.
- references: as the pipeline prepares them: an image over 1 MP is first resized to 1 MP (Lanczos), then both
  sides are floored to multiples of 16 by a centre crop (no resize); each becomes its own latent with T = 10, 20,
  30, ... and rides after the target tokens; the prediction is sliced back to the target tokens.
- timestep = sigma (the pipeline passes t / 1000). dev: the guidance input is `guidance_scale` (the pipeline's
  default 4.0); Klein has no guidance input and runs real CFG at inference (base models; the distilled Klein runs
  4 steps without CFG). Dropped captions are "" (the pipelines' negative prompt).
- sigmas: the pipelines shift their schedule with an empirical mu of the token count and the step count; training
  draws logit-normal sigmas shifted with that mu at 50 steps (the base models' default).

Train on the undistilled checkpoints (FLUX.2-klein-base-4B / 9B, FLUX.2-dev); a step-distilled Klein drifts away
from its distillation when trained directly (a warning says so).
"""

from __future__ import annotations

import math
from typing import TypedDict

import torch

from . import register
from .base import Cond, InferenceRequest, ModelAdapter, LearningCase, PlannerSpec, Variant

MAX_REFERENCE_AREA = 1024 * 1024  # the pipelines shrink larger reference images to this area
TRAINING_MU_STEPS = 50  # compute_empirical_mu's step count used for training sigmas
DEFAULT_GUIDANCE = 4.0  # Flux2Pipeline's guidance_scale (dev: distilled guidance input)
KLEIN_CONFIGS = {  # transformer/config.json of the released Klein models (4B and 9B; -base and distilled share it)
    "4b": {"num_layers": 5, "num_single_layers": 20, "num_attention_heads": 24, "joint_attention_dim": 7680, "guidance_embeds": False},
    "9b": {"num_layers": 8, "num_single_layers": 24, "num_attention_heads": 32, "joint_attention_dim": 12288, "guidance_embeds": False},
}
ENCODER_PARAMS = {"mistral-small-3.1": 24_011_361_280, "qwen3-4b": 4_022_468_096, "qwen3-8b": 8_190_735_360}
FLUX2_VAE_PARAMS = 84_046_115


class Flux2Cond(TypedDict, total=False):
    prompt_embeds: torch.Tensor  # B x 512 x 3D hidden states of three text-encoder layers, side by side
    text_ids: torch.Tensor  # B x 512 x 4 position ids (T, H, W, L) of the text tokens
    control_latents: list[torch.Tensor]  # one B x 4C x h x w (patchified, normalised) latent per reference


def flux2_reference_size(width: int, height: int) -> tuple[int, int]:
    """The size the pipelines give a reference image: over 1 MP scaled to 1 MP (sides truncated), then each side
    floored to a multiple of 16."""
    if width * height > MAX_REFERENCE_AREA:
        scale = math.sqrt(MAX_REFERENCE_AREA / (width * height))
        width, height = int(width * scale), int(height * scale)
    return width // 16 * 16, height // 16 * 16


def flux2_reference_views(img, sizes) -> list:
    """Flux2ImageProcessor's path for a reference: 1 MP cap (Lanczos), then a centre crop to the /16 size. A size
    the pipeline would not pick (data_config.control_size, bucketing) gets an aspect-keeping resize + centre crop."""
    from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor

    from image_datasets import resize_and_crop

    (w, h), = sizes
    if (w, h) != flux2_reference_size(*img.size):
        return [resize_and_crop(img, (w, h))]
    img = Flux2ImageProcessor._resize_if_exceeds_area(img, MAX_REFERENCE_AREA)
    left, top = (img.width - w) // 2, (img.height - h) // 2
    return [img.crop((left, top, left + w, top + h))]


@torch.no_grad()
def flux2_vae_latents(vae, pixels: torch.Tensor, device, eps: float) -> torch.Tensor:
    """The FLUX.2 pipelines' _encode_vae_image: VAE mode, 2x2 patchified into channels, the VAE's batch-norm
    statistics removed (std = sqrt(running_var + eps))."""
    from diffusers import Flux2Pipeline

    x = pixels.to(device, vae.dtype).contiguous(memory_format=torch.channels_last)  # as the pipelines feed the VAE
    z = Flux2Pipeline._patchify_latents(vae.encode(x).latent_dist.mode())
    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(z)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + eps).to(z)
    return ((z - mean) / std).float()


def compute_mu(image_seq_len: int, num_steps: int = TRAINING_MU_STEPS) -> float:
    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

    return compute_empirical_mu(image_seq_len, num_steps)


@register
class Flux2Adapter(ModelAdapter):
    family = "flux2"
    entry = "train_flux2_lora.py"
    variants = (
        Variant("flux2", "Flux2Pipeline", (0, 10), hub_hints=("flux.2-dev", "flux2-dev"), learning=LearningCase(1, 300, 1e-2)),
        Variant("flux2-klein", "Flux2KleinPipeline", (0, 10), hub_hints=("klein",), learning=LearningCase(2, 500, 1e-2)),
    )
    default_guidance = DEFAULT_GUIDANCE
    transformer_class = "Flux2Transformer2DModel"
    default_target_modules = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                              "to_qkv_mlp_proj", "single_transformer_blocks.*.attn.to_out")
    block_count_keys = ("num_layers", "num_single_layers")
    encoder_folders = ("text_encoder", "tokenizer", "vae")
    text_limits = {"max_sequence_length": 512}
    reference_limits = (64, 8.0)  # Flux2ImageProcessor.check_image_input refuses smaller or more extreme references

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.guidance = False  # dev's guidance input; set when the transformer loads

    @property
    def klein(self) -> bool:
        return self.variant.pipeline == "Flux2KleinPipeline"

    # --- references ---------------------------------------------------------------------------------------
    def reference_sizes(self, width: int, height: int) -> tuple[tuple[int, int], ...]:
        from image_datasets import target_size

        side = self.cfg.data_config.control_size
        return (target_size(width, height, side) if side else flux2_reference_size(width, height),)

    def reference_transform(self):
        return flux2_reference_views

    # --- loading -------------------------------------------------------------------------------------------
    def load_encoders(self) -> None:
        import diffusers
        from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler

        from trainer.models import read_model_index

        name = self.cfg.pretrained_model_name_or_path
        index = read_model_index(name)
        self.vae, _ = self.place(AutoencoderKLFlux2.from_pretrained(name, subfolder="vae", dtype=self.weight_dtype), "none")
        self.text_pipe = getattr(diffusers, self.variant.pipeline)(scheduler=None, vae=None, transformer=None,
                                                                   text_encoder=self.load_text_encoder(), tokenizer=load_tokenizer(name, index))
        self.scheduler_config = dict(FlowMatchEulerDiscreteScheduler.load_config(name, subfolder="scheduler"))
        if self.klein and index.get("is_distilled"):
            self.warn_distilled("FLUX.2 Klein", "-base")

    def load_transformer(self) -> None:
        super().load_transformer()
        self.guidance = bool(self.transformer.config.guidance_embeds)

    def pipeline_components(self, name_or_path: str) -> dict:
        from trainer.models import read_model_index

        return {"tokenizer": load_tokenizer(name_or_path, read_model_index(name_or_path))}

    # --- conditioning --------------------------------------------------------------------------------------
    def count_tokens(self, captions: list[str]) -> list[int]:
        tok = self.text_pipe.tokenizer
        tok = getattr(tok, "tokenizer", tok)
        return [len(ids) for ids in tok(captions).input_ids]

    @torch.no_grad()
    def encode_prompts(self, captions: list[str]) -> Flux2Cond:
        embeds, text_ids = self.text_pipe.encode_prompt(list(captions), device=self.device, max_sequence_length=self.cfg.max_sequence_length)
        return {"prompt_embeds": embeds.to(self.weight_dtype), "text_ids": text_ids}

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return flux2_vae_latents(self.vae, pixels, self.device, self.vae.config.batch_norm_eps)

    def image_seq_len(self, latents: torch.Tensor) -> int:
        return latents.shape[-2] * latents.shape[-1]  # already patchified: one token per latent position

    def training_mu(self, image_seq_len: int) -> float | None:
        return compute_mu(image_seq_len)

    def predict(self, transformer: torch.nn.Module, noisy: torch.Tensor, sigmas: torch.Tensor, cond: Cond) -> torch.Tensor:
        from diffusers import Flux2Pipeline

        b, c, h, w = noisy.shape
        dev, dt = noisy.device, self.weight_dtype
        target = Flux2Pipeline._pack_latents(noisy.to(dt))
        ids = Flux2Pipeline._prepare_latent_ids(noisy).to(dev)
        controls = cond.get("control_latents", [])
        if controls:
            refs = torch.cat([Flux2Pipeline._pack_latents(r.to(dt)) for r in controls], dim=1)
            ref_ids = Flux2Pipeline._prepare_image_ids([r[:1] for r in controls]).to(dev).expand(b, -1, -1)
            hidden, ids = torch.cat([target, refs], dim=1), torch.cat([ids, ref_ids], dim=1)
        else:
            hidden = target
        guidance = torch.full((b,), self.training_guidance, device=dev, dtype=torch.float32) if self.guidance else None
        out = transformer(
            hidden_states=hidden,
            timestep=sigmas.to(dt),  # the pipeline passes t/1000 = sigma
            guidance=guidance,
            encoder_hidden_states=cond["prompt_embeds"],
            txt_ids=cond["text_ids"],
            img_ids=ids,
            return_dict=False,
        )[0]
        return out[:, : target.shape[1]].permute(0, 2, 1).reshape(b, c, h, w)

    # --- sampling and inference ----------------------------------------------------------------------------
    def sampling_kwargs(self, cond: Cond, negative: Cond, size: tuple[int, int], images: list) -> dict:
        kwargs = {"prompt_embeds": cond["prompt_embeds"], "guidance_scale": self.cfg.validation_guidance_scale if self.klein else self.training_guidance}
        if self.klein:
            kwargs["negative_prompt_embeds"] = negative["prompt_embeds"]
        if images:
            kwargs["image"] = list(images)  # the originals: the pipeline sizes them as it does at inference
        return kwargs

    def inference_kwargs(self, request: InferenceRequest) -> dict:
        if self.klein:  # real CFG (base models); a distilled Klein ignores it
            kwargs = {"guidance_scale": request.true_cfg_scale}
            if request.negative_prompt is not None:
                kwargs["negative_prompt"] = request.negative_prompt
        else:
            kwargs = {"guidance_scale": DEFAULT_GUIDANCE if request.guidance_scale is None else request.guidance_scale}
        if request.max_sequence_length is not None:
            kwargs["max_sequence_length"] = request.max_sequence_length
        if request.images:
            kwargs["image"] = request.images
        return kwargs

    def comfyui_names(self, module: str) -> tuple[str, str, str]:
        # ComfyUI maps FLUX.2 through the same diffusers -> native table as FLUX.1 (OneTrainer-style names)
        name = "lora_transformer_" + module.replace(".", "_")
        return f"{name}.lora_down.weight", f"{name}.lora_up.weight", f"{name}.alpha"

    # --- planner, benches, tiny models ---------------------------------------------------------------------
    def released_transformer_config(self) -> dict:
        if not self.klein:
            return {}  # the class defaults are FLUX.2-dev
        return KLEIN_CONFIGS["9b" if "9b" in self.cfg.pretrained_model_name_or_path.lower() else "4b"]

    def planner_spec(self) -> PlannerSpec:
        cfg = self.released_transformer_config()
        if not self.klein:
            encoder = ("text encoder Mistral-Small-3.1-24B", ENCODER_PARAMS["mistral-small-3.1"], True)
        elif cfg["joint_attention_dim"] == 12288:
            encoder = ("text encoder Qwen3-8B", ENCODER_PARAMS["qwen3-8b"], True)
        else:
            encoder = ("text encoder Qwen3-4B", ENCODER_PARAMS["qwen3-4b"], True)
        return PlannerSpec(encoders=[encoder], vae_params=FLUX2_VAE_PARAMS, text_tokens=512)

    def random_conditioning(self, transformer, batch: int, device, dtype) -> Cond:
        g = torch.Generator(device=device).manual_seed(0)
        emb = torch.randn(batch, 512, transformer.config.joint_attention_dim, generator=g, device=device).to(dtype)
        from diffusers import Flux2Pipeline

        return {"prompt_embeds": emb, "text_ids": Flux2Pipeline._prepare_text_ids(emb).to(device)}

    def with_blocks(self, config: dict, n: int) -> dict:
        return {**config, "num_layers": 1, "num_single_layers": max(1, n - 1)}

    def make_tiny_model(self, out, realistic: bool = False) -> None:
        """Prompts padded to the released 512 tokens, the text layers the pipelines read, a 16x (8x VAE, 2x2 patch)
        latent grid, the batch-norm-normalised FLUX.2 VAE."""
        import diffusers
        from diffusers import FlowMatchEulerDiscreteScheduler

        torch.manual_seed(0)
        if self.klein:
            from .z_image import build_qwen3, build_qwen3_tokenizer

            tokenizer = build_qwen3_tokenizer()
            encoder, joint = build_qwen3(tokenizer, layers=28), 3 * 32
        else:
            tokenizer = build_mistral_tokenizer()
            encoder, joint = build_mistral3(tokenizer), 3 * 32
        kwargs = {"is_distilled": False} if self.klein else {}
        getattr(diffusers, self.variant.pipeline)(
            scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                      max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096),
            vae=build_flux2_vae(), text_encoder=encoder, tokenizer=tokenizer,
            transformer=build_flux2_transformer(joint, guidance_embeds=not self.klein), **kwargs,
        ).save_pretrained(out)


def load_tokenizer(name_or_path: str, index: dict):
    """The tokenizer / processor the model names (Klein: a Qwen tokenizer; dev: Mistral's processor, whose chat
    template the pipeline uses)."""
    import transformers

    cls = getattr(transformers, index["tokenizer"][1], None) or transformers.AutoTokenizer
    try:
        return cls.from_pretrained(name_or_path, subfolder="tokenizer")
    except (ImportError, ValueError, TypeError, OSError):  # e.g. a processor class needing torchvision
        return transformers.AutoTokenizer.from_pretrained(name_or_path, subfolder="tokenizer")


MISTRAL_CHAT_TEMPLATE = (
    "{%- for message in messages %}{%- for part in message['content'] %}"
    "{%- if message['role'] == 'system' %}{{ '[SYSTEM_PROMPT]' + part['text'] + '[/SYSTEM_PROMPT]' }}"
    "{%- elif message['role'] == 'user' %}{{ '[INST]' + part['text'] + '[/INST]' }}"
    "{%- else %}{{ part['text'] }}{%- endif %}{%- endfor %}{%- endfor %}"
)


def build_mistral_tokenizer():
    """A byte-level BPE tokenizer with a Mistral-3.1-style chat template (system prompt, then [INST] ... [/INST])."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from .tiny import train_byte_level_bpe

    specials = ["<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[IMG]"]
    vocab, merges = train_byte_level_bpe(400, specials)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                                        additional_special_tokens=specials[4:], model_max_length=32768)
    tokenizer.chat_template = MISTRAL_CHAT_TEMPLATE
    return tokenizer


def build_mistral3(tokenizer, hidden: int = 32, layers: int = 31):
    """Mistral-3 (text + a minimal vision tower), by default with the 31 layers whose states 10 / 20 / 30 FLUX.2 reads."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig, PixtralVisionConfig

    config = Mistral3Config(
        text_config=MistralConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                                  num_attention_heads=2, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
                                  pad_token_id=tokenizer.pad_token_id),
        vision_config=PixtralVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                          image_size=64, patch_size=16, head_dim=8),
        image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"),
    )
    return Mistral3ForConditionalGeneration(config)


def build_flux2_vae():
    from diffusers import AutoencoderKLFlux2

    from .tiny import latent_statistics

    vae = AutoencoderKLFlux2(block_out_channels=(8, 8, 8, 8), layers_per_block=1, latent_channels=8, norm_num_groups=4)
    # Batch-norm statistics of its own patchified latents, as the released VAE's are: normalized latents have about
    # unit variance, and a missing normalisation changes them several-fold.
    mean, std = latent_statistics(vae, patch=2)
    with torch.no_grad():
        vae.bn.running_mean.copy_(mean)
        vae.bn.running_var.copy_(std**2 - vae.config.batch_norm_eps)
    return vae


def build_flux2_transformer(joint_attention_dim: int, guidance_embeds: bool):
    from diffusers import Flux2Transformer2DModel

    return Flux2Transformer2DModel(
        patch_size=1, in_channels=32, num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=joint_attention_dim, timestep_guidance_channels=32, mlp_ratio=2.0, axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=guidance_embeds,
    )
