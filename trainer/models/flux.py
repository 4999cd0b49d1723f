"""FLUX.1 dev / schnell / Kontext: MMDiT on 2x2-packed latents with 3-axis position ids, CLIP pooled + T5 prompts.

What the trainer feeds the transformer, and where it follows the diffusers pipelines:
- prompt: the pipeline's `encode_prompt` (CLIP pooled output + T5 hidden states padded to `t5_max_sequence_length`,
  512 as the pipeline's default for dev, schnell and Kontext; BFL trained schnell with 256: set 256 here and
  `--max_sequence_length 256` in inference.py to follow BFL instead).
- guidance (dev, Kontext): `guidance_scale` (default 3.5, the pipelines' default) as the distilled-guidance input,
  which the transformer multiplies by 1000 as in the pipeline; schnell has no guidance embedding and gets none.
- Kontext reference: sized as the pipeline sizes it by default (`_auto_resize`: the preferred Kontext resolution
  nearest its aspect ratio, Lanczos, no crop), appended after the target tokens with position ids whose first axis
  is 1; the prediction is sliced back to the target tokens. timestep = sigma (the pipelines pass t / 1000).
- dropped captions are "" (no negative prompt is used by these guidance-distilled models).
- FLUX Control (`control_type: concat`, FluxControlPipeline; BFL's FLUX.1-Canny / Depth dev): the control image,
  sized and cropped with the target (the pipeline resizes it to the output size), is VAE-encoded and its packed
  latents are concatenated to the noisy latents on the channel axis (64 + 64 inputs). From FLUX.1-dev the input
  layer `x_embedder` is widened with zero weights for the control channels and trained (LoRA: it is among the
  targets), which is what diffusers' `load_lora_weights` rebuilds when it loads the LoRA into a FluxControlPipeline
  on FLUX.1-dev (it widens x_embedder with zeros and sets in_channels). The pipeline encodes the control with the
  VAE's sample (mean + std * noise); training uses its mean, as for every latent here: the released VAEs are
  near-deterministic (very small predicted log-variances), so the two agree to within noise.
"""

from __future__ import annotations

from typing import TypedDict

import torch
from diffusers import FluxPipeline

from . import register
from .base import Cond, InferenceRequest, ModelAdapter, LearningCase, PlannerSpec, Variant
from .qwen_image import pack_latents, unpack_latents

T5_XXL_PARAMS = 4_762_310_656
CLIP_L_PARAMS = 123_060_480
FLUX_VAE_PARAMS = 83_819_683
DEFAULT_GUIDANCE = 3.5  # the dev / Kontext pipelines' default guidance_scale
VAE_FACTOR = 8  # pixels per latent side of the FLUX VAE (FluxFillPipeline packs the mask's 8x8 pixels per latent)


class FluxCond(TypedDict, total=False):
    prompt_embeds: torch.Tensor  # B x T x 4096 T5 hidden states (padded to t5_max_sequence_length)
    pooled: torch.Tensor  # B x 768 CLIP pooled output
    text_ids: torch.Tensor  # T x 3 zeros (shared by the batch; not batch-first, the cache keeps it whole)
    control_latents: list[torch.Tensor]  # Kontext: one B x C x h x w latent per reference image


def latent_ids(h: int, w: int, index: int, device, dtype) -> torch.Tensor:
    """(h/2 * w/2) x 3 position ids; axis 0 tells images apart (0 = target, 1 = Kontext reference)."""
    ids = FluxPipeline._prepare_latent_image_ids(1, h // 2, w // 2, device, dtype)
    ids[:, 0] = index
    return ids


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """B x 1 x H x W pixel mask -> B x (H/16 * W/16) x 256 tokens: each latent pixel's 8x8 mask values as channels, then
    2x2-packed, as FluxFillPipeline.prepare_mask_latents lays them out."""
    b, _, hp, wp = mask.shape
    h, w = hp // VAE_FACTOR, wp // VAE_FACTOR
    m = mask[:, 0].reshape(b, h, VAE_FACTOR, w, VAE_FACTOR).permute(0, 2, 4, 1, 3).reshape(b, VAE_FACTOR**2, h, w)
    return pack_latents(m)


def flux_vae_latents(vae, pixels: torch.Tensor, device: torch.device, shift: bool = True,
                     layout: torch.memory_format = torch.channels_last) -> torch.Tensor:
    """The FLUX VAE's mode, shifted (shift=False: Kandinsky 5 does not shift) and scaled as the pipelines do. The
    pixels go in channels-last, as the pipelines' image processor hands them over (HWC numpy transposed): the
    convolutions then take the same kernels and give the same latents to the last bit. `layout`: where a pipeline
    copies them first (FluxControlPipeline's control image: contiguous)."""
    x = pixels.to(device, vae.dtype).contiguous(memory_format=layout)
    z = vae.encode(x).latent_dist.mode().float()
    return ((z - vae.config.shift_factor) if shift else z) * vae.config.scaling_factor


@register
class FluxAdapter(ModelAdapter):
    family = "flux"
    entry = "train_flux_lora.py"
    variants = (
        Variant("flux", "FluxPipeline", hub_hints=("flux",), learning=LearningCase(0, 300, 1e-2)),
        # the reference at its own size: training's control_size 64, the pipeline's _auto_resize off
        Variant("flux-kontext", "FluxKontextPipeline", (0, 1), hub_hints=("kontext",),
                learning=LearningCase(1, 500, 1e-2, reference_size=64)),
        # FLUX.1-Canny-dev / Depth-dev (in_channels 128), or FLUX.1-dev widened (the Canny / Depth LoRAs)
        Variant("flux-control", "FluxControlPipeline", (1, 1), hub_hints=("canny", "depth"),
                # in the suite from FLUX.1-dev widened (tests/test_control.py, both signs); this layout: bench/learning.py
                learning=LearningCase(1, 300, 1e-2, in_suite=False), control="concat", starts_from=("FluxPipeline",)),
        # FLUX.1-Fill-dev (in_channels 384), or FLUX.1-dev widened: inpainting (masked image + mask channels)
        Variant("flux-fill", "FluxFillPipeline", hub_hints=("fill",), learning=LearningCase(0, 300, 1e-2, inpaint=True, in_suite=False),
                control="fill", starts_from=("FluxPipeline",)),
        # training_method: controlnet: a FluxControlNetModel beside FLUX.1-dev (FluxControlNetPipeline); its tiny base's
        # output is at the velocity's scale (ModelAdapter.velocity_scaled)
        Variant("flux-controlnet", "FluxControlNetPipeline", (1, 1), learning=LearningCase(1, 300, 5e-3, method="controlnet"),
                control="controlnet", starts_from=("FluxPipeline",)),
    )
    controlnet_class = "FluxControlNetModel"
    default_guidance = DEFAULT_GUIDANCE
    transformer_class = "FluxTransformer2DModel"
    default_target_modules = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
    block_count_keys = ("num_layers", "num_single_layers")  # double-stream + single-stream blocks
    encoder_folders = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae")
    text_limits = {"t5_max_sequence_length": 512}  # FluxPipeline refuses more

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.guidance = False  # the transformer has a guidance embedding (dev, Kontext); set when it loads
        self.widened = False  # prepare_transformer widened x_embedder (FLUX Control from FLUX.1-dev)
        if self.variant.control:  # the variant's pipeline's default: Control 3.5, Fill 30, ControlNet 7
            import inspect

            self.default_guidance = float(inspect.signature(self.pipeline_class.__call__).parameters["guidance_scale"].default)
        # Control / Fill: the input layer learns to read the control channels
        self.default_target_modules = (*type(self).default_target_modules, *self.input_layers)

    def reference_sizes(self, width: int, height: int) -> tuple[tuple[int, int], ...]:
        """Kontext's preferred resolution nearest the aspect ratio (the pipeline's _auto_resize), or an area of
        control_size^2 when that is set."""
        from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS

        from image_datasets import target_size

        if self.variant.control:  # FLUX Control: the control image at the output's size
            return (target_size(width, height, self.cfg.data_config.img_size),)
        if self.cfg.data_config.control_size:
            return (target_size(width, height, self.cfg.data_config.control_size),)
        _, w, h = min((abs(width / height - w / h), w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS)
        return ((w // 16 * 16, h // 16 * 16),)

    def load_encoders(self) -> None:
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
        from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

        name, dt = self.cfg.pretrained_model_name_or_path, self.weight_dtype
        self.vae, _ = self.place(AutoencoderKL.from_pretrained(name, subfolder="vae", dtype=dt), "none")
        clip, _ = self.place(CLIPTextModel.from_pretrained(name, subfolder="text_encoder", dtype=dt), "none")  # 123M: not worth it
        t5, _ = self.place(T5EncoderModel.from_pretrained(name, subfolder="text_encoder_2", dtype=dt), self.cfg.quantize_text_encoder)
        self.text_pipe = FluxPipeline(
            scheduler=None, vae=None, transformer=None, text_encoder=clip, text_encoder_2=t5,
            tokenizer=AutoTokenizer.from_pretrained(name, subfolder="tokenizer"),
            tokenizer_2=AutoTokenizer.from_pretrained(name, subfolder="tokenizer_2"),
        )
        self.scheduler_config = dict(FlowMatchEulerDiscreteScheduler.load_config(name, subfolder="scheduler"))

    def load_transformer(self) -> None:
        super().load_transformer()
        self.guidance = bool(self.transformer.config.guidance_embeds)

    @property
    def input_layers(self) -> tuple[str, ...]:
        return ("x_embedder",) if self.variant.control in ("concat", "fill") else ()

    @property
    def widened_modules(self) -> tuple[str, ...]:
        return ("x_embedder",) if self.widened else ()

    def record_widening(self, transformer: torch.nn.Module) -> None:
        wide = transformer.x_embedder.in_features
        if wide != transformer.config["in_channels"]:  # diffusers set an attribute on the config, not its saved value
            transformer.register_to_config(in_channels=wide, out_channels=transformer.out_channels)

    def prepare_transformer(self, transformer: torch.nn.Module) -> torch.nn.Module:
        """FLUX Control / Fill on a FLUX.1-dev transformer: x_embedder widened for the control latents (Control: twice
        its inputs) or the masked image's latents and the packed mask (Fill: twice its inputs + 2x2 x 8x8 mask
        values), the new inputs' weights zero, in_channels / out_channels set, exactly as diffusers' LoRA loader
        widens it."""
        x = transformer.x_embedder
        if not self.input_layers or transformer.config.in_channels != transformer.out_channels:
            return transformer  # no control, or already a control model (FLUX.1-Canny-dev: 128 in, 64 out)
        extra = x.in_features + (4 * VAE_FACTOR**2 if self.variant.control == "fill" else 0)
        wide = torch.nn.Linear(x.in_features + extra, x.out_features, bias=x.bias is not None, device=x.weight.device, dtype=x.weight.dtype)
        with torch.no_grad():
            wide.weight.zero_()
            wide.weight[:, : x.in_features].copy_(x.weight)
            if x.bias is not None:
                wide.bias.copy_(x.bias)
        transformer.x_embedder = wide.requires_grad_(x.weight.requires_grad)
        transformer.register_to_config(in_channels=x.in_features + extra, out_channels=x.in_features)
        self.widened = True
        return transformer

    def no_text_components(self) -> dict:
        return {"text_encoder": None, "tokenizer": None, "text_encoder_2": None, "tokenizer_2": None}

    def count_tokens(self, captions: list[str]) -> list[int]:
        return [len(ids) for ids in self.text_pipe.tokenizer_2(captions).input_ids]

    def check_sequences(self, samples: list) -> list[str]:
        limit = self.cfg.t5_max_sequence_length
        return [f"caption of {s.image.name} has {n} T5 tokens; only the first {limit} are used (t5_max_sequence_length)"
                for s, n in self.long_captions(samples, limit)]

    @torch.no_grad()
    def encode_prompts(self, captions: list[str]) -> FluxCond:
        embeds, pooled, text_ids = self.text_pipe.encode_prompt(
            captions, prompt_2=None, device=self.device, max_sequence_length=self.cfg.t5_max_sequence_length
        )
        return {"prompt_embeds": embeds.to(self.weight_dtype), "pooled": pooled.to(self.weight_dtype), "text_ids": text_ids}

    def split_text(self, cond: Cond, n: int) -> list[Cond]:
        return [{k: v if k == "text_ids" else v[i : i + 1] for k, v in cond.items()} for i in range(n)]

    def merge_text(self, items: list[Cond]) -> Cond:
        return {k: items[0][k] if k == "text_ids" else torch.cat([it[k] for it in items]) for k in items[0]}

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return flux_vae_latents(self.vae, pixels, self.device)

    @torch.no_grad()
    def encode_latents(self, batch: dict) -> tuple[torch.Tensor, Cond]:
        if self.variant.control == "fill":
            # FluxFillPipeline: masked_image = image * (1 - mask) with the mask binarized at 0.5; the product keeps
            # the image's channels-last layout
            pixels = batch["pixel_values"]
            mask = (batch["masks"] >= 0.5).to(pixels.dtype)
            masked = flux_vae_latents(self.vae, pixels.to(self.device) * (1 - mask.to(self.device)), self.device)
            return self.encode_images(pixels), {"fill_latents": masked, "fill_mask": mask.to(self.device)}
        if not self.variant.control:
            return super().encode_latents(batch)
        # FluxControlPipeline's prepare_image copies the control with repeat_interleave: the VAE sees it contiguous
        controls = [flux_vae_latents(self.vae, c, self.device, layout=torch.contiguous_format) for c in batch["controls"]]
        return self.encode_images(batch["pixel_values"]), {"control_latents": controls}

    def predict(self, transformer: torch.nn.Module, noisy: torch.Tensor, sigmas: torch.Tensor, cond: Cond) -> torch.Tensor:
        """Kontext: reference latents appended on the sequence axis with ids[:, 0] = 1; loss on target tokens only.
        FLUX Control: the control latents beside the target's on the channel axis."""
        b, _c, h, w = noisy.shape
        dev, dt = noisy.device, self.weight_dtype
        target = pack_latents(noisy.to(dt))
        controls = cond.get("control_latents", [])
        extra = {}
        if self.variant.control == "fill":
            hidden = torch.cat([target, pack_latents(cond["fill_latents"].to(dt)), pack_mask(cond["fill_mask"].to(dt))], dim=2)
        elif self.variant.control == "controlnet":  # the ControlNet reads the control; the transformer sees the target only
            hidden, extra, controls = target, {"controlnet_cond": pack_latents(controls[0].to(dt))}, []
            if "control_mode" in cond:  # a Union ControlNet: the pipeline's B x 1 mode indices
                extra["controlnet_mode"] = cond["control_mode"].to(dev, torch.long).view(-1, 1)
        elif self.variant.control:
            hidden, controls = torch.cat([target, pack_latents(controls[0].to(dt))], dim=2), []
        else:
            hidden = torch.cat([target, *(pack_latents(c.to(dt)) for c in controls)], dim=1)
        ids = torch.cat([latent_ids(h, w, 0, dev, dt), *(latent_ids(c.shape[-2], c.shape[-1], 1, dev, dt) for c in controls)])
        guidance = torch.full((b,), self.training_guidance, device=dev, dtype=torch.float32) if self.guidance else None
        out = transformer(
            hidden_states=hidden,
            timestep=sigmas.to(dt),  # the pipeline passes t/1000 = sigma
            guidance=guidance,
            pooled_projections=cond["pooled"],
            encoder_hidden_states=cond["prompt_embeds"],
            txt_ids=cond["text_ids"],
            img_ids=ids,
            return_dict=False,
            **extra,
        )[0]
        return unpack_latents(out[:, : target.shape[1]], h, w)

    def make_controlnet(self, transformer: torch.nn.Module) -> torch.nn.Module:
        """diffusers' from_transformer; with controlnet_modes a Union ControlNet (InstantX / Shakker layout): its mode
        embedding (num_mode x inner_dim, std 0.02) gives the ControlNet one more text token, the mode's."""
        net = self.controlnet_from_transformer(transformer, num_layers=self.cfg.controlnet_layers,
                                               num_single_layers=self.cfg.controlnet_single_layers)
        if self.cfg.controlnet_modes:
            net.register_to_config(num_mode=self.cfg.controlnet_modes)
            net.union = True
            net.controlnet_mode_embedder = torch.nn.Embedding(self.cfg.controlnet_modes, net.inner_dim)
            torch.nn.init.normal_(net.controlnet_mode_embedder.weight, std=0.02)
        return net

    def controlnet_forward(self, controlnet: torch.nn.Module, transformer: torch.nn.Module, kwargs: dict):
        """As FluxControlNetPipeline: the ControlNet on the noisy tokens + control latents (guidance only when its
        config has the embedder), its block residuals added by the transformer (InstantX-style: not repeated)."""
        kwargs = dict(kwargs)
        cond, mode = kwargs.pop("controlnet_cond"), kwargs.pop("controlnet_mode", None)
        guidance = kwargs.get("guidance") if controlnet.config.guidance_embeds else None
        blocks, singles = controlnet(
            hidden_states=kwargs["hidden_states"], controlnet_cond=cond, controlnet_mode=mode, conditioning_scale=1.0, timestep=kwargs["timestep"],
            guidance=guidance, pooled_projections=kwargs["pooled_projections"], encoder_hidden_states=kwargs["encoder_hidden_states"],
            txt_ids=kwargs["txt_ids"], img_ids=kwargs["img_ids"], return_dict=False,
        )
        return transformer(**kwargs, controlnet_block_samples=blocks, controlnet_single_block_samples=singles,
                           controlnet_blocks_repeat=False)

    # --- sampling and inference ----------------------------------------------------------------------------
    def sampling_kwargs(self, cond: Cond, negative: Cond, size: tuple[int, int], images: list) -> dict:
        kwargs = {"prompt_embeds": cond["prompt_embeds"], "pooled_prompt_embeds": cond["pooled"], "guidance_scale": self.training_guidance}
        if self.variant.pipeline == "FluxKontextPipeline":
            # The output at the training size (Kontext otherwise scales width x height to 1 MP); the reference
            # arrives already at the size training gives it.
            kwargs.update(_auto_resize=False, max_area=size[0] * size[1])
            if images:
                kwargs["image"] = self.reference_views(images[0])[0]
        elif self.variant.control == "fill" and images:
            kwargs.update(image=images[0], mask_image=images[1])  # the pipeline sizes both to the output's size
        elif self.variant.control and images:
            kwargs["control_image"] = self.reference_views(images[0])[0]
        if self.variant.control == "controlnet":
            kwargs["controlnet_conditioning_scale"] = self.cfg.controlnet_conditioning_scale
            if "control_mode" in cond:  # a Union ControlNet
                kwargs["control_mode"] = int(cond["control_mode"].view(-1)[0])
        return kwargs

    def inference_kwargs(self, request: InferenceRequest) -> dict:
        kwargs = {"guidance_scale": self.default_guidance if request.guidance_scale is None else request.guidance_scale}
        if request.max_sequence_length is not None:
            kwargs["max_sequence_length"] = request.max_sequence_length
        if request.images:
            kwargs["control_image" if self.variant.control in ("concat", "controlnet") else "image"] = request.images[0]
        if self.variant.control == "controlnet":
            kwargs["controlnet_conditioning_scale"] = request.conditioning_scale
            if request.control_mode is not None:  # a Union ControlNet
                kwargs["control_mode"] = request.control_mode
        if self.variant.control == "fill":
            kwargs["mask_image"] = request.mask
        if self.variant.pipeline == "FluxKontextPipeline":
            kwargs["_auto_resize"] = request.auto_resize
            if request.width and request.height:
                # Kontext treats width/height as an aspect ratio scaled to max_area (1 MP); honour the asked size.
                kwargs["max_area"] = request.width * request.height
        return kwargs

    def comfyui_names(self, module: str) -> tuple[str, str, str]:
        name = "lora_transformer_" + module.replace(".", "_")
        return f"{name}.lora_down.weight", f"{name}.lora_up.weight", f"{name}.alpha"

    # --- planner, benches, tiny models ---------------------------------------------------------------------
    def released_transformer_config(self) -> dict:
        # The class defaults are FLUX.1's architecture; dev and Kontext add the guidance embedder, schnell does not.
        return {"guidance_embeds": "schnell" not in self.cfg.pretrained_model_name_or_path.lower()}

    def planner_spec(self) -> PlannerSpec:
        return PlannerSpec(
            encoders=[("text encoder T5-XXL", T5_XXL_PARAMS, True), ("text encoder CLIP-L", CLIP_L_PARAMS, False)],
            vae_params=FLUX_VAE_PARAMS, text_tokens=self.cfg.t5_max_sequence_length,
        )

    def random_conditioning(self, transformer, batch: int, device, dtype) -> Cond:
        g = torch.Generator(device=device).manual_seed(0)
        emb = torch.randn(batch, 512, transformer.config.joint_attention_dim, generator=g, device=device).to(dtype)
        pooled = torch.randn(batch, transformer.config.pooled_projection_dim, generator=g, device=device).to(dtype)
        return {"prompt_embeds": emb, "pooled": pooled, "text_ids": torch.zeros(512, 3, device=device, dtype=dtype)}

    def with_blocks(self, config: dict, n: int) -> dict:
        return {**config, "num_layers": 1, "num_single_layers": max(1, n - 1)}

    def make_tiny_model(self, out, realistic: bool = False) -> None:
        """CLIP (77 tokens) and T5 (padded to 512) already give the released text lengths; the VAE downsamples 8x
        as the released one does, so image token counts are the real ones."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        torch.manual_seed(0)
        clip, clip_tok = build_clip()
        t5, t5_tok = build_t5()
        # a ControlNet variant trains beside FLUX.1-dev: its tiny model is FLUX.1-dev's, its output at the velocity's scale
        vae = build_flux_vae()  # built before the transformer: the same weights
        transformer = build_flux_transformer(guidance_embeds=True, control=self.variant.control)
        if self.variant.control == "controlnet":
            transformer = self.velocity_scaled(transformer, transformer.proj_out, 4, guidance=True)
        (FluxPipeline if self.variant.control == "controlnet" else self.pipeline_class)(
            scheduler=FlowMatchEulerDiscreteScheduler(
                base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15, shift=3.0, use_dynamic_shifting=True,
            ),
            vae=vae, text_encoder=clip, tokenizer=clip_tok, text_encoder_2=t5, tokenizer_2=t5_tok,
            transformer=transformer,
        ).save_pretrained(out)


def build_clip(hidden: int = 32):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from .tiny import train_byte_level_bpe

    specials = ["<|startoftext|>", "<|endoftext|>"]
    vocab, merges = train_byte_level_bpe(600, specials, end_of_word_suffix="</w>")
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, projection_dim=hidden,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|startoftext|>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
    )
    return CLIPTextModel(config), tokenizer


def build_t5(hidden: int = 32):
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    from .tiny import CORPUS

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=300, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>", show_progress=False)
    tok.train_from_iterator(CORPUS * 20, trainer=trainer)
    vocab = [tuple(v) for v in json.loads(tok.to_str())["model"]["vocab"]]
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)
    config = T5Config(
        vocab_size=len(tokenizer), d_model=hidden, d_kv=8, d_ff=hidden * 2, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )
    return T5EncoderModel(config), tokenizer


def build_flux_transformer(guidance_embeds: bool, joint_attention_dim: int = 32, pooled_dim: int = 32, control: str = ""):
    """control="concat": FLUX.1-Canny-dev's layout (the control latents' channels beside the target's: 2 x 16 in, 16 out);
    "fill": FLUX.1-Fill-dev's (target, masked image, 2x2-packed 8x8 mask: 16 + 16 + 256 in, 16 out)."""
    from diffusers import FluxTransformer2DModel

    extra = {"concat": 16, "fill": 16 + 4 * VAE_FACTOR**2}.get(control, 0)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=16 + extra, out_channels=16 if control else None, num_layers=1, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=joint_attention_dim, pooled_projection_dim=pooled_dim,
        guidance_embeds=guidance_embeds, axes_dims_rope=(4, 4, 8),
    )


def build_flux_vae(latent_channels: int = 4):
    """The FLUX.1 VAE layout at tiny width; shift and scaling factors are its own latents' mean and 1 / std (as the
    released factors are the released VAE's), so normalized latents have about unit variance; near-deterministic as
    the released VAEs are (tiny.near_deterministic)."""
    from diffusers import AutoencoderKL

    from .tiny import latent_statistics, near_deterministic

    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(4, 8, 8, 8), layers_per_block=1, latent_channels=latent_channels, norm_num_groups=4, sample_size=32,
        use_quant_conv=False, use_post_quant_conv=False,
    )
    near_deterministic(vae.encoder.conv_out, latent_channels)
    mean, std = latent_statistics(vae)
    z_std = float(((std**2 + (mean - mean.mean()) ** 2).mean()) ** 0.5)  # over all channels together
    vae.register_to_config(shift_factor=round(float(mean.mean()), 4), scaling_factor=round(1.0 / z_std, 4))
    return vae
