"""What the trainer and its tools need from a model family.

A family file (trainer/models/<family>.py) holds one `ModelAdapter` subclass, registered with
`trainer.models.register`, and everything else about the family: which pipelines it trains (its `variants`), how to
load, encode prompts and images, `predict` (packing, position ids, timestep scaling, guidance, reference tokens),
sampling arguments, ComfyUI key naming, planner and bench dimensions, and how to build its tiny test model.

The loop only sees normalized latents B x C x H x W and sigma in [0, 1], and a conditioning dict (`Cond`) that it
passes back to `predict` untouched. The adapter knows nothing about LoRA or full fine-tuning (trainer/methods/).

Conditioning (`Cond`): every tensor value is batch-first (dim 0 = sample), so the embedding cache can split a batch
into samples and stack samples back into a batch. `control_latents` is a list with one B x C x h x w tensor per
reference image. Each family documents its keys in a TypedDict next to its adapter.
"""

from __future__ import annotations

import contextlib
import gc
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch

from trainer.config import ConfigError, TrainConfig

logger = logging.getLogger(__name__)

Cond = dict[str, Any]


@dataclass(frozen=True)
class LearningCase:
    """How a variant's tiny model shows that training teaches it, seen through its own pipeline (trainer/learning.py):
    the shapes case with this many references per sample, trained for `steps` at `learning_rate`."""

    references: int = 0  # 0: text-to-image; 1: an edit (mirror the reference); 2: pick the first of two references
    steps: int = 300
    learning_rate: float = 1e-2
    reference_size: int | None = None  # data_config.control_size (None: references sized as the pipeline sizes them)
    in_suite: bool = True  # False: too slow for the test suite on 2 CPUs; bench/learning.py runs it (and the suite a short one)
    inpaint: bool = False  # inpainting (FLUX Fill): one caption, the right half masked; the visible left half decides
    method: str = "lora"  # the training_method it trains with (a ControlNet variant: controlnet)
    layered: bool = False  # layer decomposition (Qwen-Image-Layered): `references` layers of one composite, ordered by the caption
    config: tuple[tuple[str, Any], ...] = ()  # further config keys of its training run, (key, value) pairs


@dataclass(frozen=True)
class Variant:
    """One pipeline a family trains (e.g. Qwen-Image-Edit-2509 inside the Qwen-Image family)."""

    name: str  # user-facing name, e.g. "qwen-image-edit-plus" (make_tiny_models --family, convert_lora --family)
    pipeline: str  # model_index.json `_class_name`
    references: tuple[int, int] = (0, 0)  # (min, max) reference / control images per sample
    hub_hints: tuple[str, ...] = ()  # lower-case substrings of hub ids of this variant (planner without a model folder)
    learning: LearningCase | None = None  # its learning test (a family is not done without one)
    # the control this variant trains: config `control_type` ("concat": the control image's latents beside the noisy
    # latents on the channel axis, FLUX Control; "fill": FLUX Fill inpainting) or "controlnet" (training_method:
    # controlnet); "" = none. Its control images are pixel-aligned with the target: cropped and sized with it.
    control: str = ""
    # pipelines whose models this variant trains from: FLUX Control / Fill widen FLUX.1-dev's input layer (the
    # pipeline's LoRA loader widens it again); a ControlNet is trained beside FLUX.1-dev's transformer
    starts_from: tuple[str, ...] = ()


@dataclass
class InferenceRequest:
    """What `inference.py` was asked for, in family-neutral terms; the family turns it into pipeline arguments."""

    prompt: str
    images: list = field(default_factory=list)  # PIL reference images, in order
    width: int | None = None
    height: int | None = None
    guidance_scale: float | None = None  # distilled guidance (None = the family's default)
    true_cfg_scale: float = 4.0  # classifier-free guidance for models that run it
    negative_prompt: str | None = None
    max_sequence_length: int | None = None
    auto_resize: bool = True  # let the pipeline snap reference images to the sizes the model was trained on
    reference_size: int | None = None  # references at about this side's area, as data_config.control_size had them (None: the pipeline's own)
    conditioning_scale: float = 1.0  # the ControlNet's strength (controlnet_conditioning_scale)
    control_mode: int | None = None  # a Union ControlNet's control mode index
    layers: int | None = None  # layers to decompose the image into (Qwen-Image-Layered; None: the pipeline's default)
    mask: Any = None  # PIL inpainting mask (white = repainted) for inpainting models (FLUX Fill), with images[0] the image


@dataclass
class PlannerSpec:
    """Sizes the memory planner needs that are not in the transformer's config."""

    encoders: list[tuple[str, int, bool]]  # (label, parameters, quantized by quantize_text_encoder)
    vae_params: int
    text_tokens: int  # prompt tokens the transformer sees in a typical step
    token_width: int = 0  # width of the transformer's token stream (0: heads x head dim from its config)
    image_frames: int = 1  # image-sized blocks of tokens per sample (Qwen-Image-Layered: the composite, its layers and the condition)
    token_pixels: int = 16  # pixels per side of one image token (VAE factor x patch; Wan 2.2's 16x VAE: 32)
    preview_params: int = 0  # a second frozen model the pipeline runs for validation previews (Ideogram 4's unconditional transformer)


@contextlib.contextmanager
def without_default_keys(model: torch.nn.Module):
    """The model's config without `_use_default_values` for a while: from_config drops the keys listed there (those
    a model was built without, e.g. num_layers of a transformer made from the released defaults), so a ControlNet's
    `from_transformer(num_layers=...)` would silently get the transformer's block count instead."""
    from diffusers.configuration_utils import FrozenDict

    saved = model._internal_dict
    model._internal_dict = FrozenDict({k: v for k, v in saved.items() if k != "_use_default_values"})
    try:
        yield
    finally:
        model._internal_dict = saved


def control_of(cfg: TrainConfig) -> str | None:
    """The control a config trains: "controlnet" for training_method: controlnet, else control_type (None: none)."""
    return "controlnet" if cfg.training_method == "controlnet" else cfg.control_type


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class ModelAdapter(ABC):
    # --- what the family is: read by the registry, the tools and the training methods -----------------------
    family: str = ""  # e.g. "qwen-image"
    entry: str = ""  # the train_*.py script for this family, for error messages
    variants: tuple[Variant, ...] = ()
    transformer_class: str = ""  # diffusers class name of the denoiser
    default_target_modules: tuple[str, ...] = ()  # Linear layers a LoRA adapts by default
    block_count_keys: tuple[str, ...] = ("num_layers",)  # transformer config keys that together count its blocks
    encoder_folders: tuple[str, ...] = ("text_encoder", "tokenizer", "vae")  # model subfolders the cached embeddings depend on
    text_needs_pixels = False  # True when prompt encoding looks at the reference images (Qwen-Image-Edit)
    text_limits: dict[str, int] = {}  # config key -> the most its pipeline accepts (checked before anything loads)
    size_multiple = 16  # image sides the pipeline renders are multiples of this (VAE factor x patch size)
    reference_limits: tuple[int, float] = (0, 0.0)  # (shortest side, most extreme aspect) the pipeline accepts in a reference
    pixel_channels = 3  # 4: the VAE reads RGBA (images keep their alpha; opaque ones get alpha 1)
    default_true_cfg_scale = 4.0  # inference.py's classifier-free guidance when --true_cfg_scale is not given
    default_guidance: float | None = None  # the pipeline's default distilled guidance (models with a guidance input)
    takes_negative_prompt = True  # False: the pipeline takes no negative prompt (inference.py refuses --negative_prompt before loading)
    placed_components: tuple[str, ...] = ("transformer",)  # pipeline components inference.py quantizes as training placed them
    config_preset: dict = {}  # the family's own defaults for shared config keys (its entry's preset: below the YAML and the command line)

    def __init__(self, cfg: TrainConfig, variant: Variant, device: torch.device | str = "cpu",
                 weight_dtype: torch.dtype = torch.float32):
        """Pure: reads nothing from disk. `from_model` picks the variant from the model folder."""
        import diffusers

        self.cfg = cfg
        self.variant = variant
        self.device = torch.device(device)
        self.weight_dtype = weight_dtype
        self.pipeline_class = getattr(diffusers, variant.pipeline)
        self.transformer: torch.nn.Module | None = None
        self.placement = None  # trainer.quantize.Placement of the transformer, set by load_transformer
        self.vae: torch.nn.Module | None = None
        self.text_pipe = None  # the family's pipeline holding only its text encoder(s), for encode_prompt
        self.scheduler_config: dict = {}

    @classmethod
    def from_model(cls, cfg: TrainConfig, device: torch.device | str = "cpu", weight_dtype: torch.dtype = torch.float32):
        """The adapter for cfg.pretrained_model_name_or_path (its variant read from model_index.json, then
        cfg.control_type / training_method: controlnet)."""
        return cls(cfg, cls.variant_of(cfg.pretrained_model_name_or_path, control_of(cfg)), device, weight_dtype)

    @classmethod
    def variant_of(cls, name_or_path: str, control_type: str | None = None) -> Variant:
        from trainer.models import read_model_index

        name = read_model_index(name_or_path).get("_class_name", "?")
        for v in cls.variants:
            if v.pipeline == name:
                return cls.controlled(v, control_type)
        raise ConfigError(f"config key 'pretrained_model_name_or_path' is a {name} model, which {cls.entry} does not train")

    @classmethod
    def controlled(cls, variant: Variant, control: str | None) -> Variant:
        """The variant that trains `control` (see control_of) on a model of `variant` (None: the model's own)."""
        if control is None or control == variant.control:
            return variant
        for v in cls.variants:
            if v.control == control and variant.pipeline in v.starts_from:
                return v
        able = [f"{v.control} on {' / '.join(v.starts_from + ((v.pipeline,) if v.control != 'controlnet' else ()))} models"
                for v in cls.variants if v.control]
        key = "training_method: controlnet" if control == "controlnet" else f"control_type: {control}"
        raise ConfigError(f"config key '{key}': a {variant.pipeline} model cannot train it"
                          + (f" ({cls.entry} trains {'; '.join(able)})" if able else " (no ControlNet or control training for this family yet)"))

    @classmethod
    def variant_named(cls, name: str) -> Variant | None:
        return next((v for v in cls.variants if v.name == name), None)

    @classmethod
    def variant_from_hub_id(cls, name: str) -> Variant | None:
        """The variant a hub id most likely is (longest matching hint), for tools run without the model's files."""
        lowered = name.lower()
        hits = [(len(h), v) for v in cls.variants for h in v.hub_hints if h in lowered]
        return max(hits, key=lambda t: t[0])[1] if hits else None

    # --- checks before any data or model is read ------------------------------------------------------------
    @classmethod
    def check_setup(cls, cfg: TrainConfig) -> None:
        """Right script for the model, dataset kind fits the variant, blocks_to_swap fits the transformer."""
        from trainer.models import lookup, read_model_index

        try:
            name = read_model_index(cfg.pretrained_model_name_or_path).get("_class_name", "?")
        except Exception as e:
            raise ConfigError(f"config key 'pretrained_model_name_or_path': cannot read model_index.json ({type(e).__name__}: {e})") from None
        variant = next((v for v in cls.variants if v.pipeline == name), None)
        if variant is None:
            found = lookup(name)
            raise ConfigError(
                f"config key 'pretrained_model_name_or_path' is a {name} model, which {cls.entry} does not train"
                + (f"; use {found[0].entry}" if found else "")
            )
        variant = cls.controlled(variant, control_of(cfg))
        if variant.control == "controlnet" and cfg.training_method != "controlnet":  # a saved ControlNet pipeline's folder
            raise ConfigError(f"config key 'pretrained_model_name_or_path' is a {name} folder: train its ControlNet with training_method: "
                              f"controlnet on the base model (controlnet_model_name_or_path: its controlnet/ folder), or a LoRA on the base model")
        name = variant.pipeline
        if variant.control == "fill" and cfg.precompute_image_embeddings:  # a FLUX.1-Fill-dev folder (control_type: null)
            logger.info("%s: images are encoded every step (the masked image changes with each epoch's random mask)", name)
            cfg.precompute_image_embeddings = False
        if cfg.blocks_to_swap:
            try:
                tcfg = read_model_index(cfg.pretrained_model_name_or_path, "transformer/config.json")
                n_blocks = sum(int(tcfg[k]) for k in cls.block_count_keys)
            except Exception as e:
                raise ConfigError(f"config key 'blocks_to_swap': cannot read the transformer's config.json to count its blocks ({type(e).__name__}: {e})") from None
            if cfg.blocks_to_swap >= n_blocks:
                raise ConfigError(f"config key 'blocks_to_swap' is {cfg.blocks_to_swap}, but this transformer has {n_blocks} blocks; use at most {n_blocks - 1}")
        for key, most in cls.text_limits.items():
            if getattr(cfg, key) > most:
                raise ConfigError(f"config key '{key}' is {getattr(cfg, key)}; the {name} pipeline takes at most {most}")
        parts = cfg.data_config.parts()
        low, high = variant.references
        for i, d in enumerate(parts):
            key = f"data_config.datasets[{i}]" if cfg.data_config.datasets else "data_config"
            has_refs = d.control_dir is not None or d.metadata_file is not None
            if low and not has_refs:
                raise ConfigError(f"{cls.entry} needs control images for a {name} model: set {key}.control_dir or {key}.metadata_file")
            if not high and d.control_dir is not None:  # a metadata file's rows are counted by the scan, row by row
                raise ConfigError(f"a {name} model takes no control images: remove {key}.control_dir")
        stacked = {p.rsplit(".", 1)[-1] for parts in cls.comfyui_fused.values() for p in parts}
        targets = cfg.lora_target_modules or cls.default_target_modules
        if cfg.lora_format == "comfyui" and (cfg.lora_type != "lora" or cfg.use_dora) and any(t.rsplit(".", 1)[-1] in stacked for t in targets):
            raise ConfigError(f"config key 'lora_format': ComfyUI stacks {name}'s {' / '.join(sorted(stacked))} into one layer, so only a plain "
                              "LoRA on them has a ComfyUI form; leave them out of lora_target_modules, or use lora_format: diffusers")

    def reference_rule(self):
        """How many reference images each sample must have (checked by the dataset scan, file by file)."""
        from image_datasets import ReferenceRule

        low, high = self.variant.references
        more = [v for v in type(self).variants if v.references[1] > high]
        hint = f" (a {more[0].pipeline} model takes up to {more[0].references[1]})" if more else ""
        return ReferenceRule(low, high, self.variant.pipeline, hint, *self.reference_limits, aligned=self.aligned_controls)

    @property
    def masks_are_inputs(self) -> bool:
        """The dataset's masks are the model's inpainting masks (FLUX Fill), not loss masks; samples without one get a
        random mask each epoch."""
        return self.variant.control == "fill"

    @property
    def aligned_controls(self) -> bool:
        """Control images are pixel-aligned with the target (sized and cropped with it), as the control variants' pipelines take them."""
        return bool(self.variant.control)

    # --- references: sizes the pipeline gives reference images ---------------------------------------------
    def reference_sizes(self, width: int, height: int) -> tuple[tuple[int, int], ...]:
        """(width, height) of each view of a reference image of this size: the VAE view first, then any view the
        text encoder sees. The default is the target's own sizing (img_size area, aspect kept, sides multiples of 16)."""
        from image_datasets import target_size

        return (target_size(width, height, self.cfg.data_config.control_size or self.cfg.data_config.img_size),)

    def reference_transform(self):
        """(original image, view sizes) -> the views: how the pipeline makes its reference images. A picklable
        callable (DataLoader workers run it); the default resizes the original once per view (Lanczos, no crop)."""
        from image_datasets import resize_views

        return resize_views

    def reference_views(self, img) -> list:
        """The VAE view (and the text encoder's view, when the family has one) of a reference image."""
        return self.reference_transform()(img, self.reference_sizes(*img.size))

    # --- loading -------------------------------------------------------------------------------------------
    @abstractmethod
    def load_encoders(self) -> None:
        """Load the frozen text encoder(s) and VAE in weight_dtype onto self.device; set scheduler_config."""

    def load_transformer(self) -> None:
        """Load `transformer_class` from the model folder, make the variant's changes (`prepare_transformer`) and place
        it (quantize / swap) as self.transformer, its Placement as self.placement."""
        self.transformer, self.placement = self.load_placed("transformer", self.prepare_transformer)

    def load_placed(self, subfolder: str, prepare=lambda t: t):
        """(`transformer_class` from the model folder's `subfolder`, changed by `prepare`, placed as the transformer is:
        quantize / blocks_to_swap; its Placement)."""
        import diffusers

        t = getattr(diffusers, self.transformer_class).from_pretrained(self.cfg.pretrained_model_name_or_path, subfolder=subfolder,
                                                                       dtype=self.weight_dtype)
        return self.place(prepare(t), self.cfg.quantize, self.cfg.blocks_to_swap)

    def load_text_encoder(self) -> torch.nn.Module:
        """The text encoder of the class model_index.json names, in weight_dtype, placed (quantize_text_encoder)."""
        import transformers

        from trainer.models import read_model_index

        name = self.cfg.pretrained_model_name_or_path
        encoder_class = getattr(transformers, read_model_index(name)["text_encoder"][1])
        encoder, _ = self.place(encoder_class.from_pretrained(name, subfolder="text_encoder", dtype=self.weight_dtype), self.cfg.quantize_text_encoder)
        return encoder

    def warn_distilled(self, model: str, base: str) -> None:
        """The model folder holds a step-distilled checkpoint: say that a LoRA trained on it drifts from the distillation."""
        logging.getLogger("trainer").warning("%s is a step-distilled %s: a LoRA trained on it directly drifts from the distillation; train on the %s "
                       "checkpoint and use the LoRA on either", self.cfg.pretrained_model_name_or_path, model, base)

    def load(self) -> None:
        self.load_encoders()
        self.load_transformer()

    def place(self, model: torch.nn.Module, quantize: str, blocks_to_swap: int = 0):
        """Move a frozen model to the device, quantizing its blocks on the way when asked (and keeping the last
        `blocks_to_swap` blocks' weights in host RAM). Returns (model, Placement)."""
        from trainer.quantize import place_model

        placement = place_model(model.requires_grad_(False).eval(), quantize, self.device, self.weight_dtype, blocks_to_swap)
        return model, placement

    def free_text_encoders(self) -> None:
        """Drop the text encoder(s) once every prompt embedding is cached."""
        self.text_pipe = None
        release_memory()

    def free_vae(self) -> None:
        self.vae = None
        release_memory()

    def configure_attention(self) -> None:
        """Apply cfg.attention_backend to the loaded transformer."""
        name = self.cfg.attention_backend
        if name == "auto":
            if torch.cuda.is_available():
                # cuDNN fused attention's backward fails on FLUX-sized sequences ("mha_graph.execute(...).is_good()"),
                # pytorch/pytorch#190321; flash / memory-efficient SDPA are as fast for bf16 training.
                torch.backends.cuda.enable_cudnn_sdp(False)
        elif name != "sdpa":
            try:
                self.transformer.set_attention_backend(name)
            except Exception as e:
                raise ConfigError(f"config key 'attention_backend': '{name}' cannot be used here ({str(e).splitlines()[0]})") from None

    # --- conditioning --------------------------------------------------------------------------------------
    @abstractmethod
    def encode_prompts(self, captions: list[str]) -> Cond:
        """Text conditioning for a batch (padded, with masks where the model takes them)."""

    @abstractmethod
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels B x 3 x H x W in [-1, 1] -> normalized latents B x C x h x w."""

    def encode_text(self, batch: dict) -> Cond:
        """Prompt conditioning of a collated batch."""
        return self.encode_prompts(batch["captions"])

    def encode_latents(self, batch: dict) -> tuple[torch.Tensor, Cond]:
        """(target latents, {"control_latents": [...]}) of a collated batch."""
        return self.encode_images(batch["pixel_values"]), {"control_latents": [self.encode_images(c) for c in batch["controls"]]}

    def encode_batch(self, batch: dict) -> tuple[torch.Tensor, Cond]:
        """Collated batch -> (target latents, conditioning for predict)."""
        latents, extra = self.encode_latents(batch)
        return latents, {**self.encode_text(batch), **extra}

    # Cond keys padded along the token axis (dim 1) to the batch's longest prompt; "prompt_embeds_mask" counts each
    # sample's own tokens. The cache stores them unpadded.
    text_token_keys: tuple[str, ...] = ()

    def split_text(self, cond: Cond, n: int) -> list[Cond]:
        """Batched prompt conditioning -> one dict per sample (what the embedding cache stores), token-axis keys
        without their padding."""
        out = []
        for i in range(n):
            item = {k: v[i : i + 1] for k, v in cond.items()}
            if self.text_token_keys:
                length = int(cond["prompt_embeds_mask"][i].sum())
                item.update({k: cond[k][i : i + 1, :length] for k in self.text_token_keys})
            out.append(item)
        return out

    def merge_text(self, items: list[Cond]) -> Cond:
        """Inverse of split_text for a batch assembled from cached samples: token-axis keys zero-padded (mask 0)."""
        out = {}
        for k in items[0]:
            if k not in self.text_token_keys:
                out[k] = torch.cat([it[k] for it in items])
                continue
            first = items[0][k]
            padded = first.new_zeros((len(items), max(it[k].shape[1] for it in items), *first.shape[2:]))
            for i, it in enumerate(items):
                padded[i, : it[k].shape[1]] = it[k][0]
            out[k] = padded
        return out

    empty_prompt = ""  # the caption of a dropped-caption sample and the default negative prompt

    def count_tokens(self, captions: list[str]) -> list[int]:
        return [0 for _ in captions]

    def caption_token_counts(self, samples: list, chunk: int = 512) -> list[int]:
        """count_tokens of every sample's caption, `chunk` captions per tokenizer call (one call over a million
        captions would hold all their encodings at once)."""
        counts: list[int] = []
        for start in range(0, len(samples), chunk):
            counts += self.count_tokens([s.caption for s in samples[start:start + chunk]])
        return counts

    def long_captions(self, samples: list, limit: int) -> list[tuple]:
        """(sample, token count) of every caption over `limit` tokens. Only captions that could be are tokenized: each
        token of a byte-level BPE or SentencePiece tokenizer covers at least one byte, so a caption of b UTF-8 bytes
        counts at most b tokens more than the empty caption (the family's template and special tokens), plus a few
        for a dummy prefix and template pieces that merge with it (8 allowed; tests/test_data_scale.py checks it)."""
        base = self.count_tokens([""])[0] + 8
        maybe = [s for s in samples if len(s.caption.encode()) + base > limit]
        return [(s, n) for s, n in zip(maybe, self.caption_token_counts(maybe)) if n > limit]

    def check_sequences(self, samples: list) -> list[str]:
        """With the text encoders loaded, before the transformer: one warning line per sample whose conditioning
        the model will not see whole (default: captions over max_sequence_length tokens, which are cut); raises
        ConfigError naming the files when a sample's conditioning cannot run at all."""
        limit = self.cfg.max_sequence_length
        return [f"caption of {s.image.name} has {n} tokens; only the first {limit} are used (max_sequence_length)"
                for s, n in self.long_captions(samples, limit)]

    def image_seq_len(self, latents: torch.Tensor) -> int:
        """Number of image tokens the transformer sees for these latents (drives the resolution shift); default: 2x2
        latent patches per token."""
        return (latents.shape[-2] // 2) * (latents.shape[-1] // 2)

    def sampling_grid(self) -> list[float]:
        """The sigmas the pipeline hands its scheduler before shifting: linspace(1, 1/N, N), N its default step count."""
        import inspect

        import numpy as np

        n = inspect.signature(self.pipeline_class.__call__).parameters["num_inference_steps"].default
        return np.linspace(1.0, 1.0 / n, n).tolist()

    def sigma_path(self, image_seq_len: int) -> torch.Tensor:
        """The sigmas the pipeline steps through at this token count, descending to 0: its grid through the
        scheduler's own shift (and terminal stretch). `timestep_sampling: schedule` draws training sigmas along it."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        from trainer.flow_matching import calculate_shift

        cache = self.__dict__.setdefault("_sigma_paths", {})
        if image_seq_len not in cache:
            scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config)
            c = scheduler.config
            mu = self.training_mu(image_seq_len)
            if mu is None and c.use_dynamic_shifting:
                mu = calculate_shift(image_seq_len, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                                     c.get("base_shift", 0.5), c.get("max_shift", 1.15))
            scheduler.set_timesteps(sigmas=self.sampling_grid(), mu=mu)
            cache[image_seq_len] = scheduler.sigmas.float().cpu()
        return cache[image_seq_len]

    @property
    def training_guidance(self) -> float | None:
        """The distilled guidance value of training and validation samples: guidance_scale, else the pipeline's
        default (what inference.py and the pipeline use when not told otherwise)."""
        return self.default_guidance if self.cfg.guidance_scale is None else self.cfg.guidance_scale

    def training_mu(self, image_seq_len: int) -> float | None:
        """The time-shift mu for training sigmas at this token count, when the pipeline computes it its own way
        (None: the scheduler config's resolution-dependent shift)."""
        return None

    @abstractmethod
    def predict(self, transformer: torch.nn.Module, noisy: torch.Tensor, sigmas: torch.Tensor, cond: Cond) -> torch.Tensor:
        """Velocity prediction, same shape as `noisy`."""

    # --- sampling (validation images during training) ------------------------------------------------------
    def sampling_pipeline(self, transformer: torch.nn.Module):
        """The family's diffusers pipeline around the training transformer; prompts come in as embeddings."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config)
        if hasattr(transformer, "controlnet"):  # training_method: controlnet (trainer.methods.controlnet.ControlNetPair)
            return self.pipeline_class(scheduler=scheduler, vae=self.vae, transformer=transformer.transformer,
                                       controlnet=transformer.controlnet, **self.no_text_components())
        return self.pipeline_class(scheduler=scheduler, vae=self.vae, transformer=transformer, **self.no_text_components())

    def no_text_components(self) -> dict:
        return {"text_encoder": None, "tokenizer": None}

    @abstractmethod
    def sampling_kwargs(self, cond: Cond, negative: Cond, size: tuple[int, int], images: list) -> dict:
        """Pipeline call arguments for one validation sample from precomputed prompt embeddings and the
        reference images (PIL, possibly none)."""

    # --- inference.py -----------------------------------------------------------------------------------------
    def pipeline_components(self, name_or_path: str) -> dict:
        """Extra components from_pretrained needs on this machine (e.g. a processor), by name."""
        return {}

    @abstractmethod
    def inference_kwargs(self, request: InferenceRequest) -> dict:
        """Pipeline call arguments for inference.py (guidance style, references)."""

    def size_kwargs(self, width: int | None, height: int | None) -> dict:
        """The pipeline call's arguments for an output of width x height (Qwen-Image-Layered takes a resolution and
        keeps its input image's aspect)."""
        return {"width": width, "height": height}

    def preview_inputs(self, sample) -> list:
        """The images a validation preview of a training sample gives the pipeline: its references (FLUX Fill: the
        image and its inpainting mask, ("mask", path, alpha))."""
        if self.masks_are_inputs:
            return [sample.image] + ([("mask", sample.mask, sample.mask_alpha)] if sample.mask is not None else [])
        return list(sample.controls)

    def inference_images(self, images: list) -> tuple[list, list[str]]:
        """(the preview inputs inference.py takes as --image, further inference.py arguments) for the run's "try it" line."""
        return images, []

    @staticmethod
    def preview_image(output):
        """One prompt's output of the pipeline as one picture (Qwen-Image-Layered returns its layers: side by side,
        over white)."""
        if not isinstance(output, list):
            return output
        from PIL import Image

        strip = Image.new("RGBA", (sum(im.width for im in output), max(im.height for im in output)), (255, 255, 255, 255))
        x = 0
        for im in output:
            strip.alpha_composite(im.convert("RGBA"), (x, 0))
            x += im.width
        return strip

    def render_size(self, pipe, width: int | None, height: int | None):
        """A context in which the pipeline's __call__ renders at width x height as asked, for pipelines that scale
        every request to an area of their own (HiDream-I1). Default: nothing to change."""
        return contextlib.nullcontext()

    def reference_area(self, pipe, side: int):
        """A context in which the pipeline sizes its reference images at about side x side pixels, as
        `data_config.control_size: side` sized them in training, for pipelines that have no argument for it. Default:
        nothing to change (the pipeline keeps references at their own size, or `inference_kwargs` passes
        `InferenceRequest.reference_size` as its argument)."""
        import contextlib

        return contextlib.nullcontext()

    @staticmethod
    def cfg_inference_kwargs(request: InferenceRequest, scale_key: str = "guidance_scale") -> dict:
        """Pipelines that run real classifier-free guidance under `scale_key` with their own default negative prompt."""
        kwargs = {scale_key: request.true_cfg_scale}
        if request.negative_prompt is not None:
            kwargs["negative_prompt"] = request.negative_prompt
        if request.max_sequence_length is not None:
            kwargs["max_sequence_length"] = request.max_sequence_length
        return kwargs

    # --- ComfyUI LoRA naming ---------------------------------------------------------------------------------
    comfyui_prefix = "diffusion_model."  # what ComfyUI's key map puts before a diffusers module name for this family

    # ComfyUI layer -> the diffusers layers whose weights its one weight stacks along the output axis, in order (name
    # suffixes): Ideogram 4's attention.qkv. A LoRA on them is written as one LoRA on the stacked layer.
    comfyui_fused: dict[str, tuple[str, ...]] = {}

    def comfyui_names(self, module: str) -> tuple[str, str, str]:
        """(down, up, alpha) ComfyUI keys of the LoRA on transformer module `module` (diffusers naming)."""
        name = self.comfyui_prefix + module
        return f"{name}.lora_A.weight", f"{name}.lora_B.weight", f"{name}.alpha"

    def comfyui_group(self, module: str) -> tuple[str, int, int] | None:
        """(the stacked layer's name in diffusers naming, this layer's place in it, how many it stacks) when ComfyUI
        stacks this layer's weight with others (`comfyui_fused`), else None."""
        for fused, parts in self.comfyui_fused.items():
            for i, part in enumerate(parts):
                if module.endswith("." + part):
                    return module[: -len(part)] + fused, i, len(parts)
        return None

    # --- planner, benches, tiny models ------------------------------------------------------------------------
    @property
    def input_layers(self) -> tuple[str, ...]:
        """Layers whose inputs the variant extends (FLUX Control / Fill: x_embedder): their ComfyUI LoRA form says the
        shape ComfyUI pads the model's layer to (a no-op on a model already that wide)."""
        return ()

    @property
    def widened_modules(self) -> tuple[str, ...]:
        """Layers `prepare_transformer` widened: a LoRA must adapt them (only it reads the new inputs)."""
        return ()

    # --- ControlNets (training_method: controlnet) ------------------------------------------------------------
    controlnet_class: str = ""  # diffusers class of the family's ControlNet ("" = none trained here)

    def make_controlnet(self, transformer: torch.nn.Module) -> torch.nn.Module:
        """A new ControlNet started from `transformer` (unquantized): its first blocks copied, control input and
        outputs zero, so it starts as no change."""
        raise NotImplementedError(f"{self.family} has no ControlNet training")

    def controlnet_from_transformer(self, transformer: torch.nn.Module, **layers) -> torch.nn.Module:
        """diffusers' `<controlnet_class>.from_transformer` with the transformer's own heads (its defaults are the
        released model's, not a tiny or changed one's) and block counts taken from `layers`."""
        import diffusers

        c = transformer.config
        with without_default_keys(transformer):
            return getattr(diffusers, self.controlnet_class).from_transformer(
                transformer, attention_head_dim=c.attention_head_dim, num_attention_heads=c.num_attention_heads, **layers)

    def controlnet_forward(self, controlnet: torch.nn.Module, transformer: torch.nn.Module, kwargs: dict):
        """The transformer call the family's ControlNet pipeline makes, with the ControlNet's residuals: `kwargs` are
        the transformer's keyword arguments from `predict`, plus `controlnet_cond` (the packed control latents)."""
        raise NotImplementedError(f"{self.family} has no ControlNet training")

    def controlnet_previews(self, controlnet: torch.nn.Module):
        """A context around validation previews of a ControlNet run (Z-Image: its pipeline lends the ControlNet the
        transformer's modules for good; they are taken back after). Default: nothing to do."""
        return contextlib.nullcontext()

    def record_widening(self, transformer: torch.nn.Module) -> None:
        """Make the transformer's config say what a LoRA loader widened (diffusers widens FLUX's x_embedder on load
        but its saved config keeps the old width), before a merged model is saved. Default: nothing widens."""

    def prepare_transformer(self, transformer: torch.nn.Module) -> torch.nn.Module:
        """Architecture changes the variant makes to the model's transformer before training (FLUX Control widens
        the input layer of a FLUX.1-dev transformer); the pipeline's LoRA loader makes the same change. Default: none."""
        return transformer

    def released_transformer_config(self) -> dict:
        """Constructor arguments of the released transformer of this variant ({} = the class defaults)."""
        return {}

    def with_blocks(self, config: dict, n: int) -> dict:
        """The same transformer config with only n blocks (bench / CPU measurements at real width)."""
        return {**config, self.block_count_keys[0]: n}

    @abstractmethod
    def planner_spec(self) -> PlannerSpec:
        """Encoder / VAE sizes, text length and token width of the released model."""

    @abstractmethod
    def random_conditioning(self, transformer: torch.nn.Module, batch: int, device: torch.device, dtype: torch.dtype) -> Cond:
        """Random prompt conditioning at the released text length (real-size benches)."""

    @abstractmethod
    def make_tiny_model(self, out, realistic: bool = False) -> None:
        """Save a tiny random-weight pipeline of this variant to `out` with save_pretrained. realistic=True gives
        its processors / tokenizers the released pixel budgets and templates (real sequence lengths)."""

    @torch.no_grad()
    def velocity_scaled(self, transformer: torch.nn.Module, layer: torch.nn.Linear, channels: int, side: int = 8, **state) -> torch.nn.Module:
        """A tiny random transformer whose output layer is scaled so its predictions have the spread of the velocity
        they stand for (std sqrt(2): unit-variance latents and noise), as a trained model's have; a random one's are
        ~3x smaller. Tiny bases for ControlNets: a ControlNet steers the frozen base's hidden states only, through its
        final norm, so it cannot reach targets beyond the base's output scale (a LoRA rescales the output layer itself).
        `state`: adapter attributes predict reads that loading would set (FLUX: guidance)."""
        plain = type(self)(self.cfg, type(self).variants[0])
        for key, value in state.items():
            setattr(plain, key, value)
        noisy = torch.randn(2, channels, side, side, generator=torch.Generator().manual_seed(0))
        out = plain.predict(transformer, noisy, torch.full((2,), 0.5), plain.random_conditioning(transformer, 2, "cpu", torch.float32))
        factor = 2**0.5 / out.float().std()
        layer.weight.mul_(factor)
        if layer.bias is not None:
            layer.bias.mul_(factor)
        return transformer
