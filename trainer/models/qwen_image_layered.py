"""Qwen-Image-Layered (Qwen, 20B Qwen-Image MMDiT): an RGBA image in, its N RGBA layers out.

What the trainer feeds the transformer, and where it follows `QwenImageLayeredPipeline`:
- data: each sample is the composite image (the dataset's image) and its layers, back to front, as the sample's control
  images (`data_config.control_dir: [layer_1_dir, layer_2_dir, ...]` with the composite's file names, or a metadata
  file's control_image, control_image_2, ... columns); every layer is sized and cropped with its composite, alpha kept.
  A sample has 1 to 20 layers; a batch holds samples with the same count.
- latents: the RGBA Qwen-Image VAE's mode, normalised with its latents_mean / latents_std. The target is (N + 1) frames:
  the composite first ("the generated first image is combined image"), then the layers; each frame 2x2-packed and the
  frames laid one after the other on the sequence axis, as the pipeline packs them. The condition is the composite's
  latents again, appended after the target with its own img_shapes entry (N + 2 entries of (1, h/2, w/2)); the
  transformer's layer-aware rope (`use_layer3d_rope`) and `additional_t_cond` (0: RGB(A) input, as the pipeline passes)
  are inside it. The prediction is sliced back to the target's frames.
- prompt: the text-to-image template of Qwen-Image (no image in the prompt), cut to `max_sequence_length` (512, the
  pipeline's default). With an empty prompt the pipeline captions the image itself with Qwen2.5-VL, so it never samples
  an empty caption: train with captions (a caption dropout is warned about; missing captions are empty).
- time: sigma (the pipeline passes t / 1000); sigmas through the scheduler's exponential shift with the pipeline's
  mu = sqrt(composite tokens / 256) (not Qwen-Image's linear one).
- size: the pipeline sizes the output from the input image's aspect and `resolution` (the side of a square of the same
  area: 640, its default, or 1024, the only two it accepts; sides multiples of 32): previews, inference.py and the
  learning test ask for 640 or 1024 when the size asked for has that area, else for 640 with the pipeline module's
  `calculate_dimensions` sizing it at the asked area while the call runs (`render_size`). Its output is the N layers (the composite frame is dropped): inference.py
  writes each layer (`<name>-layer<k>.png`) and the layers side by side as `--output_image`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys

import torch

from . import register
from .base import Cond, InferenceRequest, LearningCase, Variant
from .qwen_image import QwenImageAdapter, build_qwen_transformer, build_qwen_vae, qwen_cfg_kwargs, sized_as

logger = logging.getLogger("trainer")

RESOLUTIONS = (640, 1024)  # the only `resolution` values the pipeline accepts (the released model's buckets)
MAX_LAYERS = 20  # layers per sample (the released model was trained with up to 20 layers)
DEFAULT_LAYERS = 4  # the pipeline's default `layers`
BASE_TOKENS = 256 * 256 / 16 / 16  # the pipeline's base_seqlen: mu = sqrt(tokens / 256)


def resolution(width: int | None, height: int | None) -> dict:
    """The pipeline's `resolution` for an output of about width x height (its aspect is the input image's); none: its
    default. It takes 640 or 1024 only: any other area is asked as 640, and `render_size` makes 640 mean that area."""
    if not width or not height:
        return {}
    side = round(math.sqrt(width * height))
    return {"resolution": side if side in RESOLUTIONS else RESOLUTIONS[0]}


def pack_frames(latents: torch.Tensor) -> torch.Tensor:
    """B x C x F x H x W -> B x (F * H/2 * W/2) x 4C, frame after frame (QwenImageLayeredPipeline._pack_latents)."""
    from diffusers import QwenImageLayeredPipeline

    b, c, f, h, w = latents.shape
    return QwenImageLayeredPipeline._pack_latents(latents.permute(0, 2, 1, 3, 4), b, c, h, w, f)


def unpack_frames(packed: torch.Tensor, f: int, h: int, w: int) -> torch.Tensor:
    """Inverse of pack_frames."""
    b, _n, d = packed.shape
    c = d // 4
    return packed.view(b, f, h // 2, w // 2, c, 2, 2).permute(0, 4, 1, 2, 5, 3, 6).reshape(b, c, f, h, w)


@register
class QwenImageLayeredAdapter(QwenImageAdapter):
    family = "qwen-image-layered"
    entry = "train_qwen_layered_lora.py"
    # two layers whose order the caption decides, over the same composite (trainer/learning.py, layered cases); 500 steps: choice
    # +0.66 (300: +0.36)
    variants = (Variant("qwen-image-layered", "QwenImageLayeredPipeline", (1, MAX_LAYERS), hub_hints=("qwen-image-layered",),
                        learning=LearningCase(2, 500, 1e-2, layered=True)),)
    pixel_channels = 4  # RGBA in and out
    encoder_folders = ("text_encoder", "tokenizer", "vae")  # the prompt does not see the image

    @classmethod
    def check_setup(cls, cfg) -> None:
        super().check_setup(cfg)
        sizes = {s for p in cfg.data_config.parts() for s in (p.resolutions or [p.img_size])} - set(RESOLUTIONS)
        if sizes:
            logger.warning("img_size / resolutions %s: QwenImageLayeredPipeline renders at 640^2 or 1024^2 areas only (inference.py "
                           "and previews render other sizes by changing its sizing while they run)", sorted(sizes))
        rates = [p.caption_dropout_rate for p in cfg.data_config.parts() if p.caption_dropout_rate]
        if rates:
            logger.warning("caption_dropout_rate %s: QwenImageLayeredPipeline never samples an empty caption (it captions the image "
                           "itself), so the dropped steps teach a case inference does not use", max(rates))

    @property
    def aligned_controls(self) -> bool:
        return True  # the layers are the target's frames: sized and cropped with the composite

    def pipeline_components(self, name_or_path: str) -> dict:
        from .qwen_processor import load_qwen_processor

        return {"processor": load_qwen_processor(name_or_path)}  # the pipeline's own captioner for empty prompts

    def no_text_components(self) -> dict:
        return {"text_encoder": None, "tokenizer": None, "processor": None}

    def sampling_pipeline(self, transformer: torch.nn.Module):
        """The pipeline for previews, prompts as embeddings. It casts the input image to its text encoder's dtype, which
        previews (the text encoder freed) give it without the encoder."""
        import types

        pipe = super().sampling_pipeline(transformer)
        pipe.text_encoder = types.SimpleNamespace(dtype=self.weight_dtype)
        return pipe

    # --- latents ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_latents(self, batch: dict) -> tuple[torch.Tensor, Cond]:
        """(B x C x (N + 1) x h x w: the composite, then its layers; {"control_latents": [the composite's latents]}: the
        condition, as the cache stores a reference)."""
        composite = self.encode_images(batch["pixel_values"])
        layers = [self.encode_images(c) for c in batch["controls"]]
        return torch.stack([composite, *layers], dim=2), {"control_latents": [composite]}

    def training_mu(self, image_seq_len: int) -> float | None:
        return math.sqrt(image_seq_len / BASE_TOKENS)  # image_seq_len: one frame's tokens (the composite's)

    def predict(self, transformer: torch.nn.Module, noisy: torch.Tensor, sigmas: torch.Tensor, cond: Cond) -> torch.Tensor:
        b, _c, f, h, w = noisy.shape
        dt = self.weight_dtype
        target = pack_frames(noisy.to(dt))
        image = cond["control_latents"][0]
        hidden = torch.cat([target, pack_frames(image[:, :, None].to(dt))], dim=1)
        shapes = [(1, h // 2, w // 2)] * f + [(1, image.shape[-2] // 2, image.shape[-1] // 2)]
        mask = cond["prompt_embeds_mask"]
        out = transformer(
            hidden_states=hidden,
            timestep=sigmas.to(dt),  # the pipeline passes t / 1000
            encoder_hidden_states=cond["prompt_embeds"],
            encoder_hidden_states_mask=None if bool(mask.all()) else mask,
            img_shapes=[shapes] * b,
            additional_t_cond=torch.zeros(b, dtype=torch.long, device=noisy.device),  # is_rgb = 0, as the pipeline passes
            return_dict=False,
        )[0]
        return unpack_frames(out[:, : target.shape[1]], f, h, w)

    # --- sampling and inference ----------------------------------------------------------------------------
    def preview_inputs(self, sample) -> list:
        return [sample.image, *sample.controls]  # the composite (the pipeline's input), then its layers (their count)

    def render_size(self, pipe, width: int | None, height: int | None):
        """Sizes other than 640^2 / 1024^2 areas: asked as resolution 640, which sizes the output at width x height while
        this runs (the edit pipelines' reference sizing is changed the same way)."""
        if not width or not height or round(math.sqrt(width * height)) in RESOLUTIONS:
            return contextlib.nullcontext()
        return sized_as(sys.modules[type(pipe).__module__], RESOLUTIONS[0] ** 2, width * height)

    def inference_images(self, images: list) -> tuple[list, list[str]]:
        return images[:1], ["--layers", str(max(1, len(images) - 1))]  # the composite; its layer count

    def size_kwargs(self, width: int | None, height: int | None) -> dict:
        return {}  # no width / height: a resolution, in sampling_kwargs / inference_kwargs

    def sampling_kwargs(self, cond: Cond, negative: Cond, size: tuple[int, int], images: list) -> dict:
        # `prompt`: any non-empty text; the pipeline captions the image itself whenever `prompt` is None or blank, even with
        # prompt_embeds given (which it then uses, not the text)
        return {"image": images[0].convert("RGBA"), "layers": len(images) - 1 if len(images) > 1 else DEFAULT_LAYERS, **resolution(*size),
                "prompt": "(prompt_embeds)",
                "prompt_embeds": cond["prompt_embeds"], "prompt_embeds_mask": cond["prompt_embeds_mask"],
                "negative_prompt_embeds": negative["prompt_embeds"], "negative_prompt_embeds_mask": negative["prompt_embeds_mask"],
                "true_cfg_scale": self.cfg.validation_guidance_scale}

    def inference_kwargs(self, request: InferenceRequest) -> dict:
        kwargs = {**qwen_cfg_kwargs(request, self.empty_prompt), "image": request.images[0].convert("RGBA") if request.images else None,
                  "layers": request.layers or DEFAULT_LAYERS, **resolution(request.width, request.height)}
        if request.max_sequence_length is not None:
            kwargs["max_sequence_length"] = request.max_sequence_length
        return kwargs

    def planner_spec(self):
        from dataclasses import replace

        # the pipeline's default 4 layers: 6 frames of tokens (the composite, 4 layers, the condition)
        return replace(super().planner_spec(), image_frames=DEFAULT_LAYERS + 2)

    def released_transformer_config(self) -> dict:
        return {"use_additional_t_cond": True, "use_layer3d_rope": True}

    # 8 latent channels, not the other tiny Qwen models' 4: the pipeline takes a 4-channel image (RGBA) for latents when
    # the VAE has 4 latent channels (the released one has 16)
    def tiny_vae(self):
        return build_qwen_vae(z_dim=8, channels=4)

    def tiny_transformer(self):
        return build_qwen_transformer(z_dim=8, use_additional_t_cond=True, use_layer3d_rope=True)
