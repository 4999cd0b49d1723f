"""Qwen-Image: MMDiT on 2x2-packed latents of a 3D (video-style) VAE, prompts from Qwen2.5-VL hidden states."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKLQwenImage, QwenImagePipeline, QwenImageTransformer2DModel
from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

from .base import ModelAdapter


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """B x C x H x W -> B x (H/2 * W/2) x 4C, the pipeline's 2x2 patch packing."""
    b, c, h, w = latents.shape
    return QwenImagePipeline._pack_latents(latents, b, c, h, w)


def unpack_latents(packed: torch.Tensor, h: int, w: int) -> torch.Tensor:
    b, _n, d = packed.shape
    c = d // 4
    x = packed.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, h, w)


class QwenImageAdapter(ModelAdapter):
    family = "qwen-image"
    entry = "train.py"
    pipeline_class = QwenImagePipeline
    pipeline_classes = ("QwenImagePipeline",)
    default_target_modules = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")

    def load_encoders(self) -> None:
        name, dt = self.cfg.pretrained_model_name_or_path, self.weight_dtype
        self.vae = self.place(AutoencoderKLQwenImage.from_pretrained(name, subfolder="vae", dtype=dt), "none")
        text_encoder = Qwen2_5_VLForConditionalGeneration.from_pretrained(name, subfolder="text_encoder", dtype=dt)
        text_encoder = self.place(text_encoder, self.cfg.quantize_text_encoder)
        tokenizer = AutoTokenizer.from_pretrained(name, subfolder="tokenizer")
        # The pipeline object is only used for its prompt template and encode_prompt (no transformer / VAE inside).
        self.text_pipe = self.pipeline_class(
            scheduler=None, vae=None, text_encoder=text_encoder, tokenizer=tokenizer, transformer=None, **self.extra_text_components()
        )
        from diffusers import FlowMatchEulerDiscreteScheduler

        self.scheduler_config = dict(FlowMatchEulerDiscreteScheduler.load_config(name, subfolder="scheduler"))
        z = self.vae.config.z_dim
        self.latents_mean = torch.tensor(self.vae.config.latents_mean).view(1, z, 1, 1, 1).to(self.device, torch.float32)
        self.latents_std = torch.tensor(self.vae.config.latents_std).view(1, z, 1, 1, 1).to(self.device, torch.float32)

    def load_transformer(self) -> None:
        t = QwenImageTransformer2DModel.from_pretrained(self.cfg.pretrained_model_name_or_path, subfolder="transformer", dtype=self.weight_dtype)
        self.transformer = self.place(t, self.cfg.quantize, self.cfg.blocks_to_swap)

    def extra_text_components(self) -> dict:
        return {}

    def count_tokens(self, captions: list[str]) -> list[int]:
        tok = self.text_pipe.tokenizer
        return [len(ids) for ids in tok(captions).input_ids]

    @torch.no_grad()
    def encode_prompts(self, captions: list[str]) -> dict[str, torch.Tensor | None]:
        embeds, mask = self.text_pipe.encode_prompt(
            captions, device=self.device, max_sequence_length=self.cfg.max_sequence_length
        )
        if mask is None:
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        return {"prompt_embeds": embeds.to(self.weight_dtype), "prompt_embeds_mask": mask}

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.to(self.device, self.vae.dtype).unsqueeze(2)  # B x 3 x 1 x H x W (one video frame)
        z = self.vae.encode(x).latent_dist.mode().float()
        return ((z - self.latents_mean) / self.latents_std).squeeze(2)

    def image_seq_len(self, latents: torch.Tensor) -> int:
        return (latents.shape[-2] // 2) * (latents.shape[-1] // 2)

    def split_text(self, cond: dict, n: int) -> list[dict]:
        """Per-sample embeddings without their padding (the cache stores only real tokens)."""
        out = []
        for i in range(n):
            length = int(cond["prompt_embeds_mask"][i].sum())
            out.append({"prompt_embeds": cond["prompt_embeds"][i : i + 1, :length],
                        "prompt_embeds_mask": cond["prompt_embeds_mask"][i : i + 1, :length]})
        return out

    def merge_text(self, items: list[dict]) -> dict:
        embeds, mask = pad_and_stack([it["prompt_embeds"] for it in items], [it["prompt_embeds_mask"] for it in items])
        return {"prompt_embeds": embeds, "prompt_embeds_mask": mask}

    def sampling_kwargs(self, cond: dict, negative: dict, size: tuple[int, int]) -> dict:
        return {
            "prompt_embeds": cond["prompt_embeds"], "prompt_embeds_mask": cond["prompt_embeds_mask"],
            "negative_prompt_embeds": negative["prompt_embeds"], "negative_prompt_embeds_mask": negative["prompt_embeds_mask"],
            "true_cfg_scale": self.cfg.validation_guidance_scale,
        }

    def predict(self, transformer: torch.nn.Module, noisy: torch.Tensor, sigmas: torch.Tensor, cond: dict) -> torch.Tensor:
        """Control latents (edit models) ride along on the sequence axis with their own img_shapes entries;
        the prediction is sliced back to the target tokens, as the edit pipelines do."""
        b, _c, h, w = noisy.shape
        target = pack_latents(noisy.to(self.weight_dtype))
        controls = cond.get("control_latents", [])
        hidden = torch.cat([target, *(pack_latents(c.to(self.weight_dtype)) for c in controls)], dim=1)
        shapes = [(1, h // 2, w // 2)] + [(1, c.shape[-2] // 2, c.shape[-1] // 2) for c in controls]
        mask = cond["prompt_embeds_mask"]
        out = transformer(
            hidden_states=hidden,
            timestep=sigmas.to(self.weight_dtype),  # the pipeline passes t/1000 = sigma
            encoder_hidden_states=cond["prompt_embeds"],
            encoder_hidden_states_mask=None if bool(mask.all()) else mask,
            img_shapes=[shapes] * b,
            return_dict=False,
        )[0]
        return unpack_latents(out[:, : target.shape[1]], h, w)


def pad_and_stack(embeds: list[torch.Tensor], masks: list[torch.Tensor | None]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample [1, L_i, D] prompt embeddings -> zero-padded [B, L, D] and the matching 0/1 mask."""
    longest = max(e.shape[1] for e in embeds)
    out = embeds[0].new_zeros(len(embeds), longest, embeds[0].shape[2])
    mask = torch.zeros(len(embeds), longest, dtype=torch.long, device=embeds[0].device)
    for i, (e, m) in enumerate(zip(embeds, masks)):
        n = e.shape[1] if m is None else int(m[0].sum())
        out[i, :n] = e[0, :n]
        mask[i, :n] = 1
    return out, mask


def to_pil(pixels: torch.Tensor):
    """3 x H x W in [-1, 1] -> PIL image."""
    from PIL import Image

    arr = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr)


class QwenImageEditAdapter(QwenImageAdapter):
    """Qwen-Image-Edit (one control image) and Edit-2509 "Plus" (1-3 control images), picked from model_index.json.

    Each control image is seen twice, as the pipelines do: by Qwen2.5-VL inside the prompt (Plus: at about 384x384,
    Edit: at the training size) and as VAE latents appended to the target tokens.
    """

    family = "qwen-image-edit"
    entry = "train_qwen_edit_lora.py"
    pipeline_classes = ("QwenImageEditPipeline", "QwenImageEditPlusPipeline")
    controls = "required"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        import diffusers

        from .base import model_index

        name = model_index(self.cfg.pretrained_model_name_or_path)["_class_name"]
        self.plus = name == "QwenImageEditPlusPipeline"
        self.pipeline_class = getattr(diffusers, name)

    @classmethod
    def check_samples(cls, cfg, samples) -> None:
        from trainer.config import ConfigError

        from .base import model_index

        plus = model_index(cfg.pretrained_model_name_or_path)["_class_name"] == "QwenImageEditPlusPipeline"
        limit = 3 if plus else 1
        over = [s.image.name for s in samples if len(s.controls) > limit]
        if over:
            raise ConfigError(
                f"data_config: {len(over)} sample(s) have more than {limit} control image(s) (e.g. {over[0]}); "
                + ("Qwen-Image-Edit takes one; use Qwen-Image-Edit-2509 for several" if not plus else "the limit is 3")
            )

    def no_text_components(self) -> dict:
        return {"text_encoder": None, "tokenizer": None, "processor": None}

    def extra_text_components(self) -> dict:
        from .qwen_processor import load_qwen_processor

        return {"processor": load_qwen_processor(self.cfg.pretrained_model_name_or_path)}

    def condition_images(self, controls: list[torch.Tensor], i: int) -> list:
        images = [to_pil(c[i]) for c in controls]
        if not self.plus:
            return images
        from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import CONDITION_IMAGE_SIZE, calculate_dimensions

        resized = []
        for img in images:
            w, h = calculate_dimensions(CONDITION_IMAGE_SIZE, img.width / img.height)
            resized.append(img.resize((w, h), resample=3))
        return resized

    @torch.no_grad()
    def encode_prompts(self, captions: list[str], controls: list[torch.Tensor] | None = None) -> dict:
        embeds, masks = [], []
        for i, caption in enumerate(captions):
            images = self.condition_images(controls, i)
            e, m = self.text_pipe.encode_prompt(
                [caption], image=images if self.plus else images[0], device=self.device,
                max_sequence_length=self.cfg.max_sequence_length,
            )
            embeds.append(e[:, : self.cfg.max_sequence_length])
            masks.append(None if m is None else m[:, : self.cfg.max_sequence_length])
        prompt_embeds, mask = pad_and_stack(embeds, masks)
        return {"prompt_embeds": prompt_embeds.to(self.weight_dtype), "prompt_embeds_mask": mask}

    text_needs_pixels = True

    def encode_text(self, batch: dict) -> dict:
        return self.encode_prompts(batch["captions"], batch["controls"])
