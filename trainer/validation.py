"""Validation samples during training: fixed prompts and seeds rendered with the LoRA as it trains.

Prompt embeddings are computed once while the text encoders are loaded, so sampling never needs them again (they may
have been freed to make room for the transformer). The VAE is kept for decoding.
"""

from __future__ import annotations

import contextlib
import logging
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from image_datasets import load_image, to_tensor
from trainer.config import TrainConfig
from trainer.pipelines import output_images
from trainer.models.base import ModelAdapter

logger = logging.getLogger("trainer")


class Validator:
    def __init__(self, adapter: ModelAdapter, cfg: TrainConfig, samples: list | None = None):
        self.adapter, self.cfg = adapter, cfg
        self.samples = samples or []
        self.items: list[dict] = []

    def entries(self) -> list[tuple[str, list, int | None]]:
        """(prompt, reference images, Union ControlNet mode or None) to render: validation_prompts (their control_mode,
        else the first dataset's), else the first validation_samples distinct training samples' captions, references
        and modes."""
        entries = validation_entries(self.cfg)
        if entries or not self.cfg.validation_samples:
            default = self.cfg.data_config.parts()[0].control_mode
            modes = [e.get("control_mode", default) if isinstance(e, dict) else default for e in self.cfg.validation_prompts]
            return [(prompt, paths, mode) for (prompt, paths), mode in zip(entries, modes)]
        seen, out = set(), []
        for s in self.samples:
            if s.image not in seen and len(out) < self.cfg.validation_samples:
                seen.add(s.image)
                out.append((s.caption, self.adapter.preview_inputs(s), s.control_mode))  # FLUX Fill: without a mask, a random one below
        return out

    def prepare(self) -> None:
        """Encode the validation prompts (and the family's blank negative) while the text encoders are still
        loaded. Reference images are sized as the training references are (the family's reference_sizes)."""
        from image_datasets import target_size

        from image_datasets.caption_dataset import random_mask
        from image_datasets.masks import load_mask

        cfg = self.cfg
        for prompt, paths, mode in self.entries():
            images = [load_mask(p[1], p[2]) if isinstance(p, tuple) else
                      load_image(Path(p) if isinstance(p, str) else p, keep_alpha=self.adapter.pixel_channels == 4) for p in paths]
            if self.adapter.masks_are_inputs and len(images) == 1:  # an image without its inpainting mask: a random one
                drawn = random_mask(images[0].size, random.Random(cfg.validation_seed))
                images.append(Image.fromarray((drawn[0].numpy() * 255).astype(np.uint8)))
            controls, views = [], [[]]
            for img in [] if self.adapter.masks_are_inputs else images:  # FLUX Fill's image and mask: the pipeline's own inputs
                sized = self.adapter.reference_views(img)
                controls.append(to_tensor(sized[0]).unsqueeze(0))
                views[0] += [to_tensor(v) for v in sized[1:]]
            batch = {"controls": controls, "condition_images": views, "pixel_values": None}
            cond = self.adapter.encode_text({**batch, "captions": [prompt]})
            if mode is not None:  # a Union ControlNet's mode rides with the prompt's conditioning
                cond["control_mode"] = torch.tensor([mode])
            neg = self.adapter.encode_text({**batch, "captions": [self.adapter.empty_prompt]})
            size = target_size(*images[0].size, cfg.data_config.img_size) if images else (cfg.data_config.img_size,) * 2
            self.items.append({"cond": _cpu(cond), "neg": _cpu(neg), "images": images, "size": size, "prompt": prompt})

    @torch.no_grad()
    def render(self, transformer: torch.nn.Module, step: int, out: Path, accelerator, save: bool = True) -> Path | None:
        """The validation prompts with the model as it is; `save=False`: render only (a sharded model renders with
        every process taking part, the main one saves)."""
        if not self.items:
            return None
        pipe = self.adapter.sampling_pipeline(transformer)
        allowed = getattr(pipe, "resolutions", None)  # Kandinsky 5 renders a fixed list of sizes and resizes other requests
        if allowed and not getattr(self, "_size_said", False):
            self._size_said = True
            for it in self.items:
                if tuple(it["size"]) not in allowed:
                    logger.info("validation samples: %s renders only %s; %dx%d previews come out at the nearest of those",
                                self.adapter.variant.name, ", ".join(f"{w}x{h}" for w, h in allowed), *it["size"])
                    break
        was_training = transformer.training
        transformer.eval()
        # The trained layers are fp32 beside bf16 / fp16 frozen weights: their output (and so the latents the scheduler
        # steps) would be fp32 while the VAE is not; under autocast every layer runs in the weights' precision, as in
        # training's forward.
        dtype = self.adapter.weight_dtype
        autocast = (torch.autocast(self.adapter.device.type, dtype=dtype) if dtype in (torch.bfloat16, torch.float16)
                    else contextlib.nullcontext())
        images = []
        for it in self.items:
            kwargs = self.adapter.sampling_kwargs({k: _to(v, self.adapter.device) for k, v in it["cond"].items()},
                                                  {k: _to(v, self.adapter.device) for k, v in it["neg"].items()}, it["size"],
                                                  it["images"])
            with autocast, self.adapter.render_size(pipe, *it["size"]):
                result = pipe(**kwargs, **self.adapter.size_kwargs(*it["size"]),
                              num_inference_steps=self.cfg.validation_num_inference_steps,
                              generator=torch.Generator("cpu").manual_seed(self.cfg.validation_seed))
            images.append(self.adapter.preview_image(output_images(result)[0]))
        transformer.train(was_training)
        if not save:
            return None
        grid = _grid(images, [it["prompt"] for it in self.items])
        path = out / "samples" / f"step-{step}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        grid.save(path)
        try:
            tb = accelerator.get_tracker("tensorboard", unwrap=True)
            tb.add_image("samples", np.asarray(grid), step, dataformats="HWC")
        except Exception:  # no tensorboard tracker configured
            pass
        logger.info("validation samples: %s", path)
        return path


def validation_entries(cfg: TrainConfig) -> list[tuple[str, list[str]]]:
    """(prompt, reference image paths) per validation prompt: an entry's own images, else validation_images (FLUX Fill:
    the image to inpaint, then its mask)."""
    out = []
    for i, entry in enumerate(cfg.validation_prompts):
        if isinstance(entry, dict):
            out.append((entry["prompt"], list(entry.get("images", []))))
        elif cfg.validation_images:
            out.append((entry, [cfg.validation_images[i if len(cfg.validation_images) > 1 else 0]]))
        else:
            out.append((entry, []))
    return out


def _cpu(d: dict) -> dict:
    return {k: v.detach().to("cpu") if isinstance(v, torch.Tensor) else v for k, v in d.items()}


def _to(v, device):
    return v.to(device) if isinstance(v, torch.Tensor) else v


def _grid(images: list[Image.Image], prompts: list[str] | None = None) -> Image.Image:
    """The samples side by side, each with its prompt written under it (wrapped to the tile's width)."""
    from PIL import ImageDraw, ImageFont

    font = ImageFont.load_default()
    captions = [_wrap(p, max(8, im.width // 6)) for im, p in zip(images, prompts or [""] * len(images))]
    line_h = 11
    text_h = max((len(c) for c in captions), default=0) * line_h + (4 if prompts else 0)
    h = max(im.height for im in images)
    grid = Image.new("RGB", (sum(im.width for im in images), h + text_h), "white")
    draw = ImageDraw.Draw(grid)
    x = 0
    for im, lines in zip(images, captions):
        grid.paste(im.convert("RGB"), (x, 0))
        for k, line in enumerate(lines):
            draw.text((x + 2, h + 2 + k * line_h), line, fill="black", font=font)
        x += im.width
    return grid


def _wrap(text: str, width: int, max_lines: int = 6) -> list[str]:
    import textwrap

    lines = textwrap.wrap(text, width) or [""]
    return lines[:max_lines - 1] + [lines[max_lines - 1][: width - 3] + "..."] if len(lines) > max_lines else lines
