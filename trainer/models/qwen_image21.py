"""Qwen-Image 2.1: a 7B single-stream block-causal DiT over one interleaved text / image sequence; Qwen3-VL reads the
prompt and the condition images together; a 64-channel RGBA VAE at 16x, latents consumed unpatched.

What the trainer feeds the transformer, and where it follows `QwenImage21Pipeline`:
- prompt: the pipeline's own `encode_prompt` (its raw template, not the chat template; condition images in the
  vision slots before the caption; the last decoder layer's states *before* Qwen3-VL's final norm, which the pipeline
  gets with a forward hook; the system prefix dropped; no cut). Also `image_pad_mask`: which positions are image slots.
- condition images: sized as the pipeline sizes them, from the original file: `output_resolution`^2 area (1024^2 by
  default; `data_config.control_size` sets it), aspect kept, sides multiples of 32, Lanczos, RGBA. Qwen3-VL sees the
  same image composited over white (the pipeline's `_get_qwen_prompt_embeds`); the VAE reads all four channels. Each
  vision slot stands for 2x2 latent tokens, so 16x16 pixel tiles line up with 32x32 vision patches.
- latents: B x 64 x H/16 x W/16, normalised by the VAE's per-channel mean / std, flattened (no 2x2 packing);
  condition latents come first and the target last on the sequence axis, `img_shapes` lists them in that order, and
  the target's slots are appended after the prompt; the prediction is the last H/16 * W/16 tokens.
- time: timestep = sigma (the pipeline passes t / 1000). Text and condition tokens are modulated at t = 0
  (`causal_condition`, inside the transformer).
- attention: block-causal (`q >= kv`, or the same image block). On CUDA the flex-attention processor runs it in one
  compiled kernel; elsewhere the exact multi-pass SDPA processor diffusers ships (`attention_backend`: auto / flex / sdpa).
- batches: the transformer reads one sequence layout for the whole batch and RoPE positions count padding, so only
  samples whose prompts have the same length share a transformer call (as Kandinsky 5 does); the others run one by one.
- sigmas: `timestep_sampling: schedule` (the YAML default) draws them uniformly along the path the pipeline samples at
  that resolution: its shipped `sample_sigmas` (or linspace(1, 1/40, 40)) through the scheduler's own resolution shift
  (mu 0.5 at 256 tokens to 0.9 at 8192, exponential) and terminal stretch.
- dropped captions and the default negative prompt: " " (the pipeline turns "" into " "). Sampled without
  guidance by default (true_cfg_scale 1.0, the pipeline's default).
- pixels are RGBA: transparent PNGs train their alpha (the model generates transparency natively); other images get
  an opaque alpha channel, exactly as the pipeline converts its condition images.
"""

from __future__ import annotations

from typing import TypedDict

import torch
from diffusers import QwenImage21Pipeline

from . import register
from .base import Cond, InferenceRequest, ModelAdapter, LearningCase, PlannerSpec, Variant
from .qwen_image import calculate_dimensions, calibrate_qwen_vae, qwen_cfg_kwargs, qwen_latent_statistics, qwen_vae_latents, to_pil
from trainer.config import ConfigError

OUTPUT_RESOLUTION = 1024  # QwenImage21Pipeline's output_resolution default: condition images at this side's area
# Qwen3-VL's processor enlarges images under 256x256 pixels, which breaks the 2x2 slot <-> latent mapping; 288 is the
# smallest output_resolution whose reference sizes (sides rounded to 32, aspect 1:8 to 8:1) all stay above that.
MIN_CONDITION_SIDE = 288
DEFAULT_STEPS = 40  # the pipeline's num_inference_steps default (when the model ships no sample_sigmas)
ROPE_POSITIONS = 8192  # QwenImage21Rope's positive table
QWEN3_VL_8B = {  # Qwen3-VL-8B's config.json (text + vision), for the planner's parameter count
    "text_config": {"hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36, "num_attention_heads": 32,
                    "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936},
    "vision_config": {"depth": 27, "hidden_size": 1152, "intermediate_size": 4304, "num_heads": 16, "out_hidden_size": 4096,
                      "deepstack_visual_indexes": [8, 16, 24]},
    "tie_word_embeddings": False,
}


class QwenImage21Cond(TypedDict, total=False):
    prompt_embeds: torch.Tensor  # B x L x D Qwen3-VL states (system prefix dropped), zero-padded across the batch
    prompt_embeds_mask: torch.Tensor  # B x L, 1 for each sample's own tokens
    image_pad_mask: torch.Tensor  # B x L bool, True at condition-image slots
    control_latents: list[torch.Tensor]  # one B x C x h x w normalised latent per condition image


def flatten(latents: torch.Tensor) -> torch.Tensor:
    """B x C x H x W -> B x (H*W) x C: the pipeline's `_pack_latents` (2.1 takes latents unpatched)."""
    b, c, h, w = latents.shape
    return latents.reshape(b, c, h * w).transpose(1, 2)


@register
class QwenImage21Adapter(ModelAdapter):
    family = "qwen-image-2.1"
    entry = "train_qwen_image_21_lora.py"
    variants = (Variant("qwen-image-2.1", "QwenImage21Pipeline", (0, 10), hub_hints=("qwen-image-2.1",),
                        learning=LearningCase(1, 300, 5e-3, reference_size=MIN_CONDITION_SIDE)),)
    transformer_class = "QwenImage21Transformer2DModel"
    default_target_modules = ("to_q", "to_k", "to_v", "to_out.0")
    encoder_folders = ("text_encoder", "processor", "vae")
    text_needs_pixels = True
    size_multiple = 32  # the pipeline floors sides to 2 x its 16x VAE factor (one vision slot = 2x2 latent tokens)
    pixel_channels = 4  # RGBA
    empty_prompt = " "
    default_true_cfg_scale = 1.0
    text_token_keys = ("prompt_embeds", "prompt_embeds_mask", "image_pad_mask")
    # ComfyUI's Qwen-Image 2.1 fuses img_mlp.gate_layer / proj into gate_up at load and maps LoRAs onto the halves only
    # under the transformer. (or no) prefix; the other layers map under it too.
    comfyui_prefix = "transformer."

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.latents_mean: torch.Tensor | None = None
        self.latents_std: torch.Tensor | None = None
        self.sample_sigmas: list[float] | None = None  # the pipeline config's shipped schedule, if any
        self.processor = None  # Qwen3-VL's processor: the sampling pipeline needs its template even without the encoder

    @property
    def output_resolution(self) -> int:
        return self.cfg.data_config.control_size or OUTPUT_RESOLUTION

    @classmethod
    def check_setup(cls, cfg) -> None:
        super().check_setup(cfg)
        d = cfg.data_config
        side = d.control_size
        from trainer.validation import validation_entries

        refs = (any(p.control_dir is not None or p.metadata_file is not None for p in d.parts())
                or any(paths for _p, paths in validation_entries(cfg)))
        if side and side < MIN_CONDITION_SIDE and refs:
            raise ConfigError(f"config key 'data_config.control_size' is {side}; Qwen-Image 2.1 needs at least {MIN_CONDITION_SIDE} "
                              "(its vision encoder enlarges smaller images, and then they no longer line up with their latents)")

    # --- references ---------------------------------------------------------------------------------------
    def reference_sizes(self, width: int, height: int) -> tuple[tuple[int, int], ...]:
        side = self.output_resolution
        return (calculate_dimensions(side * side, width / height),)

    # --- loading -------------------------------------------------------------------------------------------
    def load_encoders(self) -> None:
        from diffusers import AutoencoderKLQwenImage21, FlowMatchEulerDiscreteScheduler
        from transformers import Qwen3VLForConditionalGeneration

        from trainer.models import read_model_index

        name, dt = self.cfg.pretrained_model_name_or_path, self.weight_dtype
        self.vae, _ = self.place(AutoencoderKLQwenImage21.from_pretrained(name, subfolder="vae", dtype=dt), "none")
        encoder, _ = self.place(Qwen3VLForConditionalGeneration.from_pretrained(name, subfolder="text_encoder", dtype=dt),
                                self.cfg.quantize_text_encoder)
        self.processor = self.pipeline_components(name)["processor"]
        self.text_pipe = self.pipeline_class(scheduler=None, vae=None, transformer=None, text_encoder=encoder, processor=self.processor)
        self.scheduler_config = dict(FlowMatchEulerDiscreteScheduler.load_config(name, subfolder="scheduler"))
        self.sample_sigmas = read_model_index(name).get("sample_sigmas")
        self.latents_mean, self.latents_std = qwen_latent_statistics(self.vae, self.device)


    def pipeline_components(self, name_or_path: str) -> dict:
        from .qwen_processor import load_qwen_processor

        return {"processor": load_qwen_processor(name_or_path, qwen3=True)}

    def configure_attention(self) -> None:
        """auto: flex attention compiled on CUDA, the exact multi-pass SDPA processor elsewhere; flex / sdpa force one."""
        from diffusers.models.transformers import transformer_qwenimage21 as q21

        name = self.cfg.attention_backend
        if name not in ("auto", "flex", "sdpa"):
            return super().configure_attention()  # a dispatch backend: used by the processors' unmasked calls
        flex = name == "flex" or (name == "auto" and self.device.type == "cuda")
        if flex and self.device.type != "cuda":
            raise ConfigError("config key 'attention_backend' is flex, but PyTorch's flex attention has no backward pass on "
                              f"{self.device.type}; use sdpa (or auto, which picks flex on CUDA)")
        if flex:
            import torch.nn.attention.flex_attention as fa

            if not hasattr(fa.flex_attention, "_torchdynamo_orig_callable"):  # how the processor tells it is compiled
                fa.flex_attention = torch.compile(fa.flex_attention, dynamic=False)
        self.transformer.set_attn_processor(q21.QwenImage21FlexAttnProcessor() if flex else q21.QwenImage21AttnProcessor())
        if name == "auto":
            super().configure_attention()

    # --- conditioning --------------------------------------------------------------------------------------
    def count_tokens(self, captions: list[str]) -> list[int]:
        tok = self.processor.tokenizer
        return [len(ids) for ids in tok([self.text_pipe.prompt_template_t2i.format(c) for c in captions]).input_ids]

    @torch.no_grad()
    def encode_text(self, batch: dict) -> QwenImage21Cond:
        """One sample at a time, with its condition images (RGBA; the pipeline flattens them over white for Qwen3-VL)."""
        items = []
        for i, caption in enumerate(batch["captions"]):
            images = [to_pil(c[i]) for c in batch["controls"]] or None
            embeds, mask, pads = self.text_pipe.encode_prompt([caption], image=images, device=self.device)
            items.append({"prompt_embeds": embeds.to(self.weight_dtype), "image_pad_mask": pads,
                          "prompt_embeds_mask": torch.ones(pads.shape, dtype=torch.long, device=pads.device)})
        return self.merge_text(items)

    def encode_prompts(self, captions: list[str]) -> QwenImage21Cond:
        return self.encode_text({"captions": captions, "controls": []})

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """RGBA pixels (an opaque alpha is added to RGB) -> the VAE's mode, normalised by its per-channel statistics."""
        x = pixels.to(self.device, self.vae.dtype)
        if x.shape[1] == 3:
            x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        return qwen_vae_latents(self.vae, x, self.device, self.latents_mean, self.latents_std)

    def image_seq_len(self, latents: torch.Tensor) -> int:
        return latents.shape[-2] * latents.shape[-1]

    def check_sequences(self, samples: list) -> list[str]:
        """Prompts are not cut (as in the pipeline); a sequence past the transformer's RoPE table cannot run at all:
        text tokens plus, per image block, its longer side in latent tokens."""
        ip = self.processor.image_processor
        lo = getattr(ip, "min_pixels", None) or ip.size["shortest_edge"]
        hi = getattr(ip, "max_pixels", None) or ip.size["longest_edge"]
        lines = []
        counts = self.caption_token_counts(samples)
        for s, n in zip(samples, counts):
            used = n + sum(max(w, h) // 16 for w, h in (*s.control_sizes, s.size))
            if used >= ROPE_POSITIONS:
                lines.append(f"{s.image}: its sequence needs {used} of the transformer's {ROPE_POSITIONS} positions; shorten its caption")
            odd = [(w, h) for w, h in s.control_sizes if not lo <= w * h <= hi]
            if odd:
                lines.append(f"{s.image}: a reference at {odd[0][0]}x{odd[0][1]} is outside Qwen3-VL's {lo:,}..{hi:,} pixels, where its "
                             "vision slots would not line up with the latents; change data_config.control_size")
        if lines:
            listing = "\n  ".join(lines[:20]) + (f"\n  ... and {len(lines) - 20} more" if len(lines) > 20 else "")
            raise ConfigError(f"data_config: {len(lines)} sample(s) the model cannot take:\n  {listing}")
        return []

    def forward(self, transformer: torch.nn.Module, noisy: torch.Tensor, sigmas: torch.Tensor, cond: Cond) -> torch.Tensor:
        """The transformer on one sequence layout (samples with equal prompts lengths): its whole joint output,
        B x (prompt + condition + target tokens) x C, exactly as the pipeline calls it."""
        b, _c, h, w = noisy.shape
        dt = self.weight_dtype
        controls = cond.get("control_latents", [])
        hidden = torch.cat([*(flatten(c.to(dt)) for c in controls), flatten(noisy.to(dt))], dim=1)
        shapes = [(1, c.shape[-2], c.shape[-1]) for c in controls] + [(1, h, w)]
        mask = cond["prompt_embeds_mask"]
        pads = cond["image_pad_mask"].bool()
        img_mask = torch.cat([pads, pads.new_ones(b, h * w // 4)], dim=1)  # the target's slots follow the prompt
        return transformer(
            hidden_states=hidden,
            timestep=sigmas.to(dt),  # the pipeline passes t / 1000 = sigma
            encoder_hidden_states=cond["prompt_embeds"],
            encoder_hidden_states_mask=None if bool(mask.all()) else mask,  # the pipeline passes None when unpadded
            img_shapes=[shapes] * b,
            img_mask=img_mask,
            return_dict=False,
        )[0]

    def predict(self, transformer: torch.nn.Module, noisy: torch.Tensor, sigmas: torch.Tensor, cond: Cond) -> torch.Tensor:
        b, c, h, w = noisy.shape
        lengths = cond["prompt_embeds_mask"].sum(1).tolist()
        groups: dict[int, list[int]] = {}
        for i, n in enumerate(lengths):
            groups.setdefault(int(n), []).append(i)
        out = torch.empty(noisy.shape, dtype=torch.float32, device=noisy.device)
        for n, idx in groups.items():  # one layout per call: only prompts of equal length share it
            part = {"prompt_embeds": cond["prompt_embeds"][idx, :n], "prompt_embeds_mask": cond["prompt_embeds_mask"][idx, :n],
                    "image_pad_mask": cond["image_pad_mask"][idx, :n],
                    "control_latents": [x[idx] for x in cond.get("control_latents", [])]}
            joint = self.forward(transformer, noisy[idx], sigmas[idx], part)
            out[idx] = joint[:, -h * w :].transpose(1, 2).reshape(len(idx), c, h, w).float()
        return out

    # --- sampling and inference ----------------------------------------------------------------------------
    def sampling_grid(self) -> list[float]:
        return self.sample_sigmas or super().sampling_grid()

    def sampling_pipeline(self, transformer: torch.nn.Module):
        from diffusers import FlowMatchEulerDiscreteScheduler

        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config)
        return EmbeddedPromptPipeline(scheduler=scheduler, vae=self.vae, transformer=transformer, text_encoder=None,
                                      processor=self.processor, sample_sigmas=self.sample_sigmas)

    def sampling_kwargs(self, cond: Cond, negative: Cond, size: tuple[int, int], images: list) -> dict:
        def embeds(c, prefix=""):
            mask = c["prompt_embeds_mask"]
            return {f"{prefix}prompt_embeds": c["prompt_embeds"], f"{prefix}prompt_embeds_mask": None if bool(mask.all()) else mask}

        kwargs = {**embeds(cond), "image_pad_masks": [cond["image_pad_mask"]], "output_resolution": self.output_resolution,
                  "true_cfg_scale": self.cfg.validation_guidance_scale}
        if self.cfg.validation_guidance_scale > 1:
            kwargs.update(embeds(negative, "negative_"))
            kwargs["image_pad_masks"].append(negative["image_pad_mask"])
        if images:
            kwargs["image"] = list(images)  # the originals: the pipeline sizes them itself
        return kwargs

    def inference_kwargs(self, request: InferenceRequest) -> dict:
        kwargs = qwen_cfg_kwargs(request, self.empty_prompt)
        if request.images:
            kwargs["image"] = request.images
        if request.reference_size:  # condition images at the area training sized them (data_config.control_size)
            kwargs["output_resolution"] = request.reference_size
        return kwargs

    # --- planner, benches, tiny models ---------------------------------------------------------------------
    def planner_spec(self) -> PlannerSpec:
        from diffusers import AutoencoderKLQwenImage21
        from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

        with torch.device("meta"):
            vae_params = sum(p.numel() for p in AutoencoderKLQwenImage21().parameters())
            encoder_params = sum(p.numel() for p in Qwen3VLForConditionalGeneration(Qwen3VLConfig(**QWEN3_VL_8B)).parameters())
        return PlannerSpec(encoders=[("text encoder Qwen3-VL-8B", encoder_params, True)], vae_params=vae_params, text_tokens=256)

    def random_conditioning(self, transformer, batch: int, device, dtype) -> Cond:
        g = torch.Generator(device=device).manual_seed(0)
        emb = torch.randn(batch, 256, transformer.config.context_in_dim, generator=g, device=device).to(dtype)
        return {"prompt_embeds": emb, "prompt_embeds_mask": torch.ones(batch, 256, dtype=torch.long, device=device),
                "image_pad_mask": torch.zeros(batch, 256, dtype=torch.bool, device=device)}

    def make_tiny_model(self, out, realistic: bool = False) -> None:
        """Qwen3-VL with the released processor geometry (16-pixel patches merged 2x2, pixel budget 256^2..4096^2:
        realistic either way, since the pipeline sizes condition images itself), the pipeline's raw templates, a 16x
        RGBA VAE, the released scheduler config."""
        from diffusers import FlowMatchEulerDiscreteScheduler, QwenImage21Pipeline, QwenImage21Transformer2DModel

        from .qwen_image import save_qwen_processor

        torch.manual_seed(0)
        tokenizer = build_qwen3_vl_tokenizer()
        pipe = QwenImage21Pipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9,
                                                      shift=1.0, shift_terminal=0.02, use_dynamic_shifting=True,
                                                      time_shift_type="exponential"),
            vae=build_qwen21_vae(), text_encoder=build_qwen3_vl(tokenizer), processor=qwen3_vl_processor(tokenizer),
            transformer=QwenImage21Transformer2DModel(in_channels=16, out_channels=16, num_layers=3, attention_head_dim=16,
                                                      num_attention_heads=2, context_in_dim=32, axes_dims_rope=(4, 6, 6)),
        )
        pipe.save_pretrained(out)
        save_qwen_processor(tokenizer, out, qwen3=True)


class EmbeddedPromptPipeline(QwenImage21Pipeline):
    """QwenImage21Pipeline that also takes `image_pad_masks` with precomputed prompt embeddings (validation previews
    encode their prompts once, before the text encoder is freed).

    The pipeline's own __call__ cannot take them: with condition images its encode_prompt needs the mask, which
    __call__ does not pass on. The masks go to encode_prompt in the order __call__ encodes: prompt, then negative."""

    _pad_masks: list | None = None

    def __call__(self, *args, image_pad_masks=None, **kwargs):
        self._pad_masks = list(image_pad_masks or [])
        try:
            return super().__call__(*args, **kwargs)
        finally:
            self._pad_masks = None

    def encode_prompt(self, prompt, image=None, device=None, num_images_per_prompt=1, prompt_embeds=None, prompt_embeds_mask=None,
                      image_pad_mask=None):
        if prompt_embeds is not None and image_pad_mask is None and self._pad_masks:
            image_pad_mask = self._pad_masks.pop(0)
        return super().encode_prompt(prompt, image=image, device=device, num_images_per_prompt=num_images_per_prompt,
                                     prompt_embeds=prompt_embeds, prompt_embeds_mask=prompt_embeds_mask, image_pad_mask=image_pad_mask)


# --- tiny models ------------------------------------------------------------------------------------------

# The Qwen3-VL chat template's rendering of plain text messages (the pipeline derives its system-prefix drop from it).
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_qwen3_vl_tokenizer():
    from .qwen_image import build_qwen_tokenizer

    tokenizer = build_qwen_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_qwen3_vl(tokenizer, hidden: int = 32, layers: int = 2, model_class: str = "Qwen3VLForConditionalGeneration"):
    """Qwen3-VL with the released vision geometry (16-pixel patches, 2x2 merge, 2 frames per patch) at tiny width."""
    import transformers
    from transformers import Qwen3VLConfig

    from .qwen_image import QWEN_SPECIAL_TOKENS

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    config = Qwen3VLConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": hidden, "intermediate_size": hidden * 2, "num_hidden_layers": layers,
                     "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 32768,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [2, 3, 3],
                                         "mrope_interleaved": True}},
        vision_config={"depth": 2, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2, "out_hidden_size": hidden,
                       "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2, "num_position_embeddings": 64,
                       "deepstack_visual_indexes": [0]},
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    return getattr(transformers, model_class)(config)


def build_qwen21_vae(z_dim: int = 16):
    """16x spatial (four downsamplings) RGBA VAE like the released one, at tiny width, with non-trivial statistics."""
    from diffusers import AutoencoderKLQwenImage21

    vae = AutoencoderKLQwenImage21(base_dim=8, decoder_base_dim=8, z_dim=z_dim, dim_mult=[1, 1, 1, 1, 1], num_res_blocks=1,
                                   temperal_downsample=[False, True, True, True])
    return calibrate_qwen_vae(vae, channels=4)


def qwen3_vl_processor(tokenizer):
    """The image + text processor over the released Qwen3-VL image geometry (the pipeline needs one to construct)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from .qwen_image import QWEN3_VL_IMAGES
    from .qwen_processor import QwenVLImageTextProcessor

    return QwenVLImageTextProcessor(Qwen2VLImageProcessorPil(**QWEN3_VL_IMAGES), tokenizer, mm_token_type_ids=True)
