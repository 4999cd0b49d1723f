"""Qwen-Image, Qwen-Image-Edit, Qwen-Image-Edit-2509 / 2511 ("Plus"): MMDiT on 2x2-packed latents of a 3D
(video-style) VAE, prompts from Qwen2.5-VL hidden states.

What the trainer feeds the transformer, and where it follows the diffusers pipelines:
- prompt: the pipeline's own template and `encode_prompt` (template prefix dropped). Qwen-Image cuts the result to
  `max_sequence_length` tokens as its pipeline does (default 512); the edit pipelines cut nothing, so neither do we
  (their sequence starts with ~1,300 vision tokens per 1 MP image).
- reference images (edit): sized as the pipelines size them, from the original file: the VAE view at a 1024x1024
  area (aspect kept, sides multiples of 32, Lanczos, no crop); the Qwen2.5-VL view is the same image for Edit and a
  384x384-area resize of the original for Edit-2509 / 2511. `data_config.control_size` trades this for speed.
- reference latents ride on the sequence axis after the target tokens with their own `img_shapes` entries; the
  prediction is sliced back to the target tokens; timestep = sigma (the pipelines pass t / 1000). Edit-2511's
  `zero_cond_t` (reference tokens modulated at t = 0) is inside the transformer and driven by `img_shapes`.
- dropped captions and the default negative prompt are " " (the pipelines' reference usage for true CFG).

ControlNet (`training_method: controlnet`, QwenImageControlNetPipeline): a QwenImageControlNetModel started from the
transformer's first `controlnet_layers` blocks (diffusers' `from_transformer`: weights copied, the control embedder and
the per-block output projections zero, so step 0 is the base model). It reads the packed noisy latents plus the
control image's packed latents (the Qwen VAE's, normalised as the target's), the timestep, the prompt and img_shapes;
its block samples go into the transformer's blocks, spread evenly over them. The control image is sized and cropped with
the target; the pipeline resizes it to the output's size.

In-context control (`control_type: in-context`, DiffSynth-Studio's Qwen-Image-In-Context-Control-Union): a LoRA on
Qwen-Image itself. The control image (pixel-aligned with the target, sized and cropped with it) is encoded by the VAE
like the target and its packed tokens ride after the target's with their own img_shapes entry, RoPE frame index 1,
the same timestep, the prompt text-only (Qwen-Image's template): DiffSynth's `model_fn_qwen_image(context_latents=...)`,
whose pipeline resizes the control image to the output's size. No diffusers pipeline has it:
`QwenImageInContextPipeline` (below) is QwenImagePipeline with a `context_image` argument.
"""

from __future__ import annotations

import contextlib

import inspect
import logging
from typing import TypedDict

import torch
from diffusers import QwenImagePipeline

from . import register
from trainer.config import ConfigError

from .base import Cond, InferenceRequest, ModelAdapter, LearningCase, PlannerSpec, Variant

logger = logging.getLogger(__name__)

VAE_AREA = 1024 * 1024  # the edit pipelines' VAE (and Edit's VL) image area
PLUS_CONDITION_AREA = 384 * 384  # Edit-2509's Qwen2.5-VL image area
PLUS_IMAGE_PROMPT = "Picture {}: <|vision_start|><|image_pad|><|vision_end|>"  # Edit-2509's per-image prompt prefix
ROPE_POSITIONS = 4096  # QwenEmbedRope's table: text positions start after the largest image side (in patches / 2)
QWEN25_VL_PARAMS = 8_292_166_656


class QwenCond(TypedDict, total=False):
    prompt_embeds: torch.Tensor  # B x L x D last hidden states of Qwen2.5-VL (template prefix dropped), zero-padded
    prompt_embeds_mask: torch.Tensor  # B x L, 1 for real tokens
    control_latents: list[torch.Tensor]  # edit: one B x C x h x w normalized latent per reference image


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """B x C x H x W -> B x (H/2 * W/2) x 4C, the pipeline's 2x2 patch packing."""
    b, c, h, w = latents.shape
    return QwenImagePipeline._pack_latents(latents, b, c, h, w)


def unpack_latents(packed: torch.Tensor, h: int, w: int) -> torch.Tensor:
    b, _n, d = packed.shape
    c = d // 4
    x = packed.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, h, w)


def pad_and_stack(embeds: list[torch.Tensor], masks: list[torch.Tensor | None]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample [1, L_i, ...] prompt embeddings -> zero-padded [B, L, ...] and the matching 0/1 mask."""
    longest = max(e.shape[1] for e in embeds)
    out = embeds[0].new_zeros(len(embeds), longest, *embeds[0].shape[2:])
    mask = torch.zeros(len(embeds), longest, dtype=torch.long, device=embeds[0].device)
    for i, (e, m) in enumerate(zip(embeds, masks)):
        n = e.shape[1] if m is None else int(m[0].sum())
        out[i, :n] = e[0, :n]
        mask[i, :n] = 1
    return out, mask


def qwen_latent_statistics(vae, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE config's latents_mean / latents_std, 1 x C x 1 x 1 x 1 (float32)."""
    z = vae.config.z_dim
    mean = torch.tensor(vae.config.latents_mean).view(1, z, 1, 1, 1).to(device, torch.float32)
    return mean, torch.tensor(vae.config.latents_std).view(1, z, 1, 1, 1).to(device, torch.float32)


@torch.no_grad()
def qwen_vae_latents(vae, pixels: torch.Tensor, device, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Pixels -> the Qwen-Image VAE's normalised latents: one video frame, the posterior's mode, (z - mean) / std (the
    pipelines decode with z * std + mean)."""
    x = pixels.to(device, vae.dtype).unsqueeze(2)  # B x 3 x 1 x H x W (one video frame)
    z = vae.encode(x).latent_dist.mode().float()
    return ((z - mean) / std).squeeze(2)


def to_pil(pixels: torch.Tensor):
    """3 x H x W in [-1, 1] -> PIL image (exact for tensors made from 8-bit images)."""
    from PIL import Image

    arr = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr)


def qwen_cfg_kwargs(request: InferenceRequest, empty_prompt: str) -> dict:
    """Qwen's reference usage: true CFG with a blank negative prompt when none is given."""
    negative = request.negative_prompt
    if negative is None and request.true_cfg_scale > 1:
        negative = empty_prompt
    return {"negative_prompt": negative, "true_cfg_scale": request.true_cfg_scale}


@contextlib.contextmanager
def sized_as(module, area: int, instead: int):
    """While this runs, a Qwen pipeline module's `calculate_dimensions` sizes a request of `area` pixels at `instead`
    pixels (the edit pipelines' reference area, Qwen-Image-Layered's 640^2 resolution); other areas as they are."""
    original = module.calculate_dimensions

    def sized(target_area, ratio):
        return original(instead if target_area == area else target_area, ratio)

    module.calculate_dimensions = sized
    try:
        yield
    finally:
        module.calculate_dimensions = original


def calculate_dimensions(area: int, ratio: float) -> tuple[int, int]:
    """The edit pipelines' reference sizing: about `area` pixels, this aspect ratio, sides multiples of 32."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import calculate_dimensions as pipeline_dims

    return pipeline_dims(area, ratio)


class QwenImageInContextPipeline(QwenImagePipeline):
    """QwenImagePipeline with in-context control (DiffSynth-Studio's `context_image`): the control image is resized to
    the output's size, encoded by the VAE (normalised as the latents), packed, and appended to the image tokens of every
    transformer call (both halves of true CFG) with its own img_shapes entry; each prediction is cut back to the
    target's tokens. Everything else is QwenImagePipeline's own `__call__`; without `context_image` it is that call."""

    def __call__(self, *args, context_image=None, **kwargs):
        if context_image is None:
            return super().__call__(*args, **kwargs)
        multiple = self.vae_scale_factor * 2  # prepare_latents floors the output's sides to this
        height = (kwargs.get("height") or self.default_sample_size * self.vae_scale_factor) // multiple * multiple
        width = (kwargs.get("width") or self.default_sample_size * self.vae_scale_factor) // multiple * multiple
        device = self._execution_device
        pixels = self.image_processor.preprocess(context_image, height, width)
        latents = qwen_vae_latents(self.vae, pixels, device, *qwen_latent_statistics(self.vae, device))
        tokens, shape = pack_latents(latents), (1, latents.shape[-2] // 2, latents.shape[-1] // 2)
        targets = []

        def before(_module, args, kw):
            hidden = kw["hidden_states"]
            targets.append(hidden.shape[1])
            kw["hidden_states"] = torch.cat([hidden, tokens.to(hidden.device, hidden.dtype).expand(hidden.shape[0], -1, -1)], dim=1)
            kw["img_shapes"] = [[*(s if isinstance(s, list) else [s]), shape] for s in kw["img_shapes"]]
            return args, kw

        def after(_module, _args, _kw, output):
            n = targets.pop()
            if isinstance(output, tuple):
                return (output[0][:, :n], *output[1:])
            output.sample = output.sample[:, :n]
            return output

        # the tokens go in before any other hook sees the call's inputs, and come out after every other hook saw its output
        handles = [self.transformer.register_forward_pre_hook(before, with_kwargs=True, prepend=True),
                   self.transformer.register_forward_hook(after, with_kwargs=True)]
        try:
            return super().__call__(*args, **kwargs)
        finally:
            for h in handles:
                h.remove()


@register
class QwenImageAdapter(ModelAdapter):
    family = "qwen-image"
    entry = "train.py"
    variants = (Variant("qwen-image", "QwenImagePipeline", hub_hints=("qwen-image",), learning=LearningCase(0, 300, 1e-2)),
                # training_method: controlnet: a QwenImageControlNetModel beside Qwen-Image (QwenImageControlNetPipeline); its
                # tiny base's output is at the velocity's scale (ModelAdapter.velocity_scaled)
                Variant("qwen-image-controlnet", "QwenImageControlNetPipeline", (1, 1),
                        learning=LearningCase(1, 300, 5e-3, method="controlnet"),
                        control="controlnet", starts_from=("QwenImagePipeline",)),
                # control_type: in-context: a LoRA on Qwen-Image reading the control image's tokens (DiffSynth's
                # In-Context-Control-Union), sampled by QwenImageInContextPipeline
                Variant("qwen-image-in-context", "QwenImagePipeline", (1, 1),
                        learning=LearningCase(1, 300, 1e-2, config=(("control_type", "in-context"),)),
                        control="in-context", starts_from=("QwenImagePipeline",)))
    transformer_class = "QwenImageTransformer2DModel"
    controlnet_class = "QwenImageControlNetModel"
    default_target_modules = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
    encoder_folders = ("text_encoder", "tokenizer", "vae", "processor")
    text_limits = {"max_sequence_length": 1024}  # QwenImagePipeline refuses more
    empty_prompt = " "
    text_token_keys = ("prompt_embeds", "prompt_embeds_mask")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.latents_mean: torch.Tensor | None = None  # 1 x C x 1 x 1 x 1, from the VAE config
        self.latents_std: torch.Tensor | None = None
        if self.variant.control == "in-context":
            self.pipeline_class = QwenImageInContextPipeline

    # --- loading -------------------------------------------------------------------------------------------
    def load_encoders(self) -> None:
        from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler
        from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

        name, dt = self.cfg.pretrained_model_name_or_path, self.weight_dtype
        self.vae, _ = self.place(AutoencoderKLQwenImage.from_pretrained(name, subfolder="vae", dtype=dt), "none")
        text_encoder, _ = self.place(
            Qwen2_5_VLForConditionalGeneration.from_pretrained(name, subfolder="text_encoder", dtype=dt), self.cfg.quantize_text_encoder
        )
        tokenizer = AutoTokenizer.from_pretrained(name, subfolder="tokenizer")
        # The pipeline object is only used for its prompt template and encode_prompt (no transformer / VAE inside).
        text_class = QwenImagePipeline if self.variant.control else self.pipeline_class  # the same encode_prompt
        self.text_pipe = text_class(
            scheduler=None, vae=None, text_encoder=text_encoder, tokenizer=tokenizer, transformer=None, **self.pipeline_components(name)
        )
        self.scheduler_config = dict(FlowMatchEulerDiscreteScheduler.load_config(name, subfolder="scheduler"))
        self.latents_mean, self.latents_std = qwen_latent_statistics(self.vae, self.device)


    # --- conditioning --------------------------------------------------------------------------------------
    def count_tokens(self, captions: list[str]) -> list[int]:
        tok = self.text_pipe.tokenizer
        return [len(ids) for ids in tok(captions).input_ids]

    @torch.no_grad()
    def encode_prompts(self, captions: list[str]) -> QwenCond:
        embeds, mask = self.text_pipe.encode_prompt(captions, device=self.device, max_sequence_length=self.cfg.max_sequence_length)
        if mask is None:
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        return {"prompt_embeds": embeds.to(self.weight_dtype), "prompt_embeds_mask": mask}

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return qwen_vae_latents(self.vae, pixels, self.device, self.latents_mean, self.latents_std)

    def encode_latents(self, batch: dict) -> tuple[torch.Tensor, Cond]:
        if self.variant.control != "controlnet":
            return super().encode_latents(batch)
        # QwenImageControlNetPipeline's prepare_image copies the control with repeat_interleave: the VAE sees it contiguous
        controls = [self.encode_images(c.contiguous()) for c in batch["controls"]]
        return self.encode_images(batch["pixel_values"]), {"control_latents": controls}

    def predict(self, transformer: torch.nn.Module, noisy: torch.Tensor, sigmas: torch.Tensor, cond: Cond) -> torch.Tensor:
        """Control latents (edit models) ride along on the sequence axis with their own img_shapes entries;
        the prediction is sliced back to the target tokens, as the edit pipelines do."""
        b, _c, h, w = noisy.shape
        target = pack_latents(noisy.to(self.weight_dtype))
        controls = cond.get("control_latents", [])
        extra = {}
        if self.variant.control == "controlnet":  # the ControlNet reads the control; the transformer sees the target only
            extra, controls = {"controlnet_cond": pack_latents(controls[0].to(self.weight_dtype))}, []
        hidden = torch.cat([target, *(pack_latents(c.to(self.weight_dtype)) for c in controls)], dim=1)
        shapes = [(1, h // 2, w // 2)] + [(1, c.shape[-2] // 2, c.shape[-1] // 2) for c in controls]
        mask = cond["prompt_embeds_mask"]
        out = transformer(
            hidden_states=hidden,
            timestep=sigmas.to(self.weight_dtype),  # the pipeline passes t/1000 = sigma
            encoder_hidden_states=cond["prompt_embeds"],
            encoder_hidden_states_mask=None if bool(mask.all()) else mask,  # the pipelines pass None when unpadded
            img_shapes=[shapes[0]] * b if extra else [shapes] * b,  # the ControlNet pipeline's form of the same shapes
            return_dict=False,
            **extra,
        )[0]
        return unpack_latents(out[:, : target.shape[1]], h, w)

    # --- ControlNet (training_method: controlnet) ----------------------------------------------------------
    def make_controlnet(self, transformer: torch.nn.Module) -> torch.nn.Module:
        return self.controlnet_from_transformer(transformer, num_layers=min(self.cfg.controlnet_layers, transformer.config.num_layers))

    def controlnet_forward(self, controlnet: torch.nn.Module, transformer: torch.nn.Module, kwargs: dict):
        """As QwenImageControlNetPipeline: the ControlNet on the noisy tokens + control tokens, its block samples added by
        the transformer."""
        kwargs = dict(kwargs)
        cond = kwargs.pop("controlnet_cond")
        samples = controlnet(hidden_states=kwargs["hidden_states"], controlnet_cond=cond, conditioning_scale=1.0, timestep=kwargs["timestep"],
                             encoder_hidden_states=kwargs["encoder_hidden_states"], encoder_hidden_states_mask=kwargs["encoder_hidden_states_mask"],
                             img_shapes=kwargs["img_shapes"], return_dict=False)
        return transformer(**kwargs, controlnet_block_samples=samples)

    # --- sampling and inference ----------------------------------------------------------------------------
    def sampling_kwargs(self, cond: Cond, negative: Cond, size: tuple[int, int], images: list) -> dict:
        kwargs = {
            "prompt_embeds": cond["prompt_embeds"], "prompt_embeds_mask": cond["prompt_embeds_mask"],
            "negative_prompt_embeds": negative["prompt_embeds"], "negative_prompt_embeds_mask": negative["prompt_embeds_mask"],
            "true_cfg_scale": self.cfg.validation_guidance_scale,
        }
        if self.variant.control == "controlnet":  # the pipeline resizes the control image to the output's size
            kwargs.update(control_image=images[0] if images else None, controlnet_conditioning_scale=self.cfg.controlnet_conditioning_scale)
        elif self.variant.control == "in-context":
            kwargs["context_image"] = images[0] if images else None
        elif images:
            kwargs["image"] = images if self.variant.references[1] > 1 else images[0]
        return kwargs

    def inference_kwargs(self, request: InferenceRequest) -> dict:
        kwargs = qwen_cfg_kwargs(request, self.empty_prompt)
        if request.max_sequence_length is not None:
            kwargs["max_sequence_length"] = request.max_sequence_length
        if self.variant.control == "controlnet":
            kwargs.update(control_image=request.images[0] if request.images else None, controlnet_conditioning_scale=request.conditioning_scale)
        elif self.variant.control == "in-context":
            kwargs["context_image"] = request.images[0] if request.images else None
        elif request.images:
            kwargs["image"] = request.images if self.variant.references[1] > 1 else request.images[0]
        return kwargs

    # --- planner, benches, tiny models ---------------------------------------------------------------------
    def planner_spec(self) -> PlannerSpec:
        from diffusers import AutoencoderKLQwenImage

        with torch.device("meta"):
            vae_params = sum(p.numel() for p in AutoencoderKLQwenImage().parameters())
        return PlannerSpec(encoders=[("text encoder Qwen2.5-VL-7B", QWEN25_VL_PARAMS, True)], vae_params=vae_params, text_tokens=256,
                           image_frames=2 if self.variant.control == "in-context" else 1)  # in-context: the control's tokens too

    def random_conditioning(self, transformer, batch: int, device, dtype) -> Cond:
        g = torch.Generator(device=device).manual_seed(0)
        emb = torch.randn(batch, 256, transformer.config.joint_attention_dim, generator=g, device=device).to(dtype)
        return {"prompt_embeds": emb, "prompt_embeds_mask": torch.ones(batch, 256, dtype=torch.long, device=device)}

    def tiny_vae(self):
        return build_qwen_vae()  # Qwen-Image-Layered: RGBA

    def tiny_transformer(self):
        return build_qwen_transformer()  # Qwen-Image-Layered: layer-aware

    def make_tiny_model(self, out, realistic: bool = False) -> None:
        from diffusers import FlowMatchEulerDiscreteScheduler

        torch.manual_seed(0)
        cls = QwenImagePipeline if self.variant.control else self.pipeline_class  # ControlNets and in-context control train on Qwen-Image
        probe = cls(**{k: None for k in inspect.signature(cls.__init__).parameters if k != "self"})
        tokenizer = build_qwen_tokenizer(probe.prompt_template_encode, probe.prompt_template_encode_start_idx)
        components = dict(
            scheduler=FlowMatchEulerDiscreteScheduler(
                base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9, shift=1.0,
                shift_terminal=0.02, use_dynamic_shifting=True, time_shift_type="exponential",
            ),
            vae=self.tiny_vae(),
            text_encoder=build_qwen_text_encoder(tokenizer),
            tokenizer=tokenizer,
            transformer=self.tiny_transformer(),
        )
        if self.variant.control == "controlnet":
            components["transformer"] = self.velocity_scaled(components["transformer"], components["transformer"].proj_out, 4)
        has_processor = "processor" in inspect.signature(cls.__init__).parameters
        if has_processor:
            components["processor"] = None
        cls(**components).save_pretrained(out)
        if has_processor:
            save_qwen_processor(tokenizer, out, realistic)


@register
class QwenImageEditAdapter(QwenImageAdapter):
    """Qwen-Image-Edit (one reference image) and Edit-2509 / 2511 "Plus" (1-3 reference images).

    Each reference is seen twice, as the pipelines do: by Qwen2.5-VL inside the prompt and as VAE latents appended
    to the target tokens.
    """

    family = "qwen-image-edit"
    entry = "train_qwen_edit_lora.py"
    variants = (
        # The pipelines give every reference a 1024x1024-area VAE view (4,096 tokens beside the target's 16): the
        # learning runs take minutes on 2 CPUs, so bench/learning.py runs them.
        Variant("qwen-image-edit", "QwenImageEditPipeline", (1, 1), hub_hints=("qwen-image-edit",),
                learning=LearningCase(1, 300, 1e-2, reference_size=64)),
        Variant("qwen-image-edit-plus", "QwenImageEditPlusPipeline", (1, 3),
                hub_hints=("qwen-image-edit-2509", "qwen-image-edit-2511", "qwen-image-edit-plus"),
                learning=LearningCase(2, 300, 1e-2, reference_size=64)),
    )
    text_needs_pixels = True

    @property
    def plus(self) -> bool:
        return self.variant.references[1] > 1

    @contextlib.contextmanager
    def reference_area(self, pipe, side: int):
        """The edit pipelines size references with their module's `calculate_dimensions(1024 * 1024, ratio)` (Edit;
        Plus through its module constant VAE_IMAGE_SIZE): while this runs, that area is side x side (the Qwen2.5-VL
        view of Plus, 384 x 384, is left as it is, as training leaves it)."""
        import sys

        module = sys.modules[type(pipe).__module__]
        saved = getattr(module, "VAE_IMAGE_SIZE", None)
        if saved is not None:
            module.VAE_IMAGE_SIZE = side * side
        try:
            with sized_as(module, VAE_AREA, side * side):
                yield
        finally:
            if saved is not None:
                module.VAE_IMAGE_SIZE = saved

    def reference_sizes(self, width: int, height: int) -> tuple[tuple[int, int], ...]:
        """VAE view at 1024x1024 area (control_size^2 when set); Plus adds its 384x384-area Qwen2.5-VL view."""
        side = self.cfg.data_config.control_size
        vae = calculate_dimensions(side * side if side else VAE_AREA, width / height)
        return (vae, calculate_dimensions(PLUS_CONDITION_AREA, width / height)) if self.plus else (vae,)

    def pipeline_components(self, name_or_path: str) -> dict:
        from .qwen_processor import load_qwen_processor

        return {"processor": load_qwen_processor(name_or_path)}

    def no_text_components(self) -> dict:
        return {"text_encoder": None, "tokenizer": None, "processor": None}

    def condition_images(self, batch: dict, i: int) -> list:
        """Sample i's references as Qwen2.5-VL sees them: the extra view when the dataset made one (Plus), else the
        VAE view (Edit feeds its resized VAE image to the text encoder)."""
        views = batch.get("condition_images") or []
        if views and views[i]:
            return [to_pil(v) for v in views[i]]
        return [to_pil(c[i]) for c in batch["controls"]]

    @torch.no_grad()
    def encode_text(self, batch: dict) -> QwenCond:
        embeds, masks = [], []
        for i, caption in enumerate(batch["captions"]):
            images = self.condition_images(batch, i)
            e, m = self.text_pipe.encode_prompt([caption], image=images if self.plus else images[0], device=self.device)
            embeds.append(e)  # no cut: the edit pipelines keep the whole vision + text sequence
            masks.append(m)
        prompt_embeds, mask = pad_and_stack(embeds, masks)
        return {"prompt_embeds": prompt_embeds.to(self.weight_dtype), "prompt_embeds_mask": mask}

    def encode_prompts(self, captions: list[str]) -> QwenCond:
        raise TypeError("Qwen-Image-Edit prompts need their reference images: use encode_text(batch)")

    def check_sequences(self, samples: list) -> list[str]:
        """Edit prompts are not cut (as in the pipelines); a sequence longer than the transformer's RoPE table
        cannot run at all, so such samples are refused before the transformer loads. Counted exactly: the
        pipeline's template and per-image prompt, each image's vision tokens at the size the text encoder sees it,
        the caption."""
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        pipe = self.text_pipe
        ip = pipe.processor.image_processor
        factor = ip.patch_size * ip.merge_size
        lo = getattr(ip, "min_pixels", None) or ip.size["shortest_edge"]
        hi = getattr(ip, "max_pixels", None) or ip.size["longest_edge"]
        lines = []
        for s in samples:
            views = s.condition_sizes or s.control_sizes
            images = "".join(PLUS_IMAGE_PROMPT.format(k + 1) for k in range(len(views))) if self.plus else ""
            ids = pipe.processor.tokenizer(pipe.prompt_template_encode.format(images + s.caption)).input_ids
            vision = [(rh // factor) * (rw // factor) for rh, rw in (smart_resize(h, w, factor=factor, min_pixels=lo, max_pixels=hi)
                                                                     for w, h in views)]
            total = len(ids) - pipe.prompt_template_encode_start_idx + sum(n - 1 for n in vision)  # each <|image_pad|> expands
            longest = max(max(w, h) for w, h in (s.size, *s.control_sizes)) // 32  # QwenEmbedRope: max side in patches / 2
            if total > ROPE_POSITIONS - longest:
                lines.append(f"{s.image}: its prompt sequence is {total} tokens ({sum(vision)} of them vision tokens), over the "
                             f"{ROPE_POSITIONS - longest} text positions the transformer has at this size")
        if lines:
            listing = "\n  ".join(lines[:20]) + (f"\n  ... and {len(lines) - 20} more" if len(lines) > 20 else "")
            raise ConfigError(f"data_config: {len(lines)} sample(s) have prompts the model cannot take; shorten their captions:\n  {listing}")
        return []


# --- tiny models ------------------------------------------------------------------------------------------

QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>",
    "<|video_pad|>",
]
# The released Qwen2.5-VL processor's pixel budget (preprocessor_config.json): a 1024x1024 image -> 1,369 tokens.
RELEASED_VL_PIXELS = dict(min_pixels=3136, max_pixels=12845056)
# The released Qwen3-VL processor: 16-pixel patches merged 2x2 (one token per 32x32 pixels), 256^2 to 4096^2 pixels.
QWEN3_VL_IMAGES = dict(patch_size=16, temporal_patch_size=2, merge_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                       min_pixels=65536, max_pixels=16777216)


def build_qwen_tokenizer(template: str | None = None, drop: int = 0):
    """A byte-level BPE Qwen2 tokenizer. With a pipeline's prompt template, the template's system prefix tokenizes to
    exactly the `drop` tokens the pipeline drops (as with the released tokenizer)."""
    from transformers import Qwen2Tokenizer

    from .tiny import pin_prefix_length, train_byte_level_bpe

    vocab, merges = train_byte_level_bpe(400, QWEN_SPECIAL_TOKENS)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, model_max_length=32768)
    tokenizer.add_special_tokens({"additional_special_tokens": QWEN_SPECIAL_TOKENS[1:]})
    if template is not None:
        prefix = template[: template.index("{}")].split("<|vision_start|>")[0]
        pin_prefix_length(tokenizer, prefix, QWEN_SPECIAL_TOKENS, drop)
    return tokenizer


def build_qwen_text_encoder(tokenizer, hidden_size: int = 32):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    config = Qwen2_5_VLConfig(
        text_config={
            "hidden_size": hidden_size, "intermediate_size": hidden_size * 2, "num_hidden_layers": 2, "num_attention_heads": 2,
            "num_key_value_heads": 2, "vocab_size": len(tokenizer), "max_position_embeddings": 32768,
            "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|endoftext|>"],
            "rope_scaling": {"mrope_section": [2, 2, 4], "rope_type": "default", "type": "default"}, "rope_theta": 1000000.0,
        },
        vision_config={"depth": 2, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": hidden_size,
                       "fullatt_block_indexes": [1]},
        hidden_size=hidden_size, vocab_size=len(tokenizer), bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"], image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    return Qwen2_5_VLForConditionalGeneration(config)


def build_qwen_vae(z_dim: int = 4, channels: int = 3):
    """channels 4: the RGBA VAE of Qwen-Image-Layered."""
    from diffusers import AutoencoderKLQwenImage

    # 8x spatial downsampling like the released VAE, so image token counts are the real ones
    from .tiny import near_deterministic

    vae = AutoencoderKLQwenImage(base_dim=z_dim * 4, z_dim=z_dim, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                                 temperal_downsample=[False, True, True], input_channels=channels)
    near_deterministic(vae.quant_conv, z_dim)  # as the released VAE
    return calibrate_qwen_vae(vae, channels=channels)


def calibrate_qwen_vae(vae, channels: int = 3):
    """Set a (tiny) Qwen-style VAE's latents_mean / latents_std to its own latents' statistics, as the released ones
    are: normalized latents then have about unit variance, and a normalisation bug changes them several-fold."""
    from .tiny import latent_statistics

    mean, std = latent_statistics(vae, channels=channels, frames=True)
    vae.register_to_config(latents_mean=[round(v, 5) for v in mean.tolist()], latents_std=[round(v, 5) for v in std.tolist()])
    return vae


def build_qwen_transformer(z_dim: int = 4, joint_attention_dim: int = 32, num_layers: int = 2, **extra):
    from diffusers import QwenImageTransformer2DModel

    return QwenImageTransformer2DModel(
        patch_size=2, in_channels=z_dim * 4, out_channels=z_dim, num_layers=num_layers, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=joint_attention_dim, guidance_embeds=False, axes_dims_rope=(8, 4, 4), **extra,
    )


def save_qwen_processor(tokenizer, out, realistic: bool = False, subfolder: str = "processor", qwen3: bool = False) -> None:
    """Write a Qwen2VLProcessor (qwen3: Qwen3VLProcessor) folder (image processor + tokenizer) and name it in
    model_index.json.

    Built from its parts because transformers can only instantiate these processors when torchvision is
    installed; the saved files are the same, and load with their from_pretrained where it is.
    """
    import json
    from pathlib import Path

    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    out = Path(out)
    if qwen3:  # always the released geometry: Qwen-Image 2.1 needs 4 latent tokens per vision token
        image_processor = Qwen2VLImageProcessorPil(**QWEN3_VL_IMAGES)
    else:  # toy budget (16 tokens per image) for fast tests; realistic = the released budget
        image_processor = Qwen2VLImageProcessorPil(**(RELEASED_VL_PIXELS if realistic else dict(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16)))
    name = "Qwen3VLProcessor" if qwen3 else "Qwen2VLProcessor"
    folder = out / subfolder
    image_processor.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "processor_config.json").write_text(json.dumps({"processor_class": name}, indent=2))
    index = json.loads((out / "model_index.json").read_text())
    index[subfolder] = ["transformers", name]
    (out / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
