"""Z-Image-Omni (Base): Z-Image's transformer in its omni mode — text-to-image and editing with 0..N reference images,
each seen twice: as FLUX-VAE latents beside the target and as SigLIP2 patch features.

What the trainer feeds the transformer, and where it follows `ZImageOmniPipeline`:
- prompt: a list of segments per sample, each tokenized and padded to `max_sequence_length` on its own and passed
  through Qwen3 (hidden_states[-2], real tokens only). Without references: one segment, Z-Image's chat turn. With N
  references: N + 2 segments, the first N opening a `<|vision_start|>` slot per reference, then the caption's (closing
  the user turn and opening the assistant's image slot), then `<|vision_end|><|im_end|>`. The trainer carries the
  segments concatenated with their lengths (`prompt_segments`) and hands the transformer the list.
- references: the pipeline's sizing: a reference over 1 MP is resized (Lanczos) to the target's area (training:
  `img_size`^2), then centre-cropped to multiples of 16 for the VAE; SigLIP2 sees the resized, uncropped image through
  its own processor (NaFlex: a patch grid of the image's aspect, at most `max_num_patches`), and its last hidden
  state, as an h x w x C grid per reference, rides with the sample's text conditioning. The transformer takes
  x = [reference latents..., the noisy target] with image_noise_mask [0, ..., 0, 1] (references at t = 1, clean).
- time and output as Z-Image: t = 1 - sigma, the model predicts the negated velocity. Dropped captions are "" with the
  sample's references (the pipeline's negative prompt keeps the images).

The pipeline casts reference pixels to bfloat16 before its VAE whatever the VAE's dtype (a float32 VAE refuses them);
`OmniPipeline` casts them to the VAE's own dtype, the same call for the released bf16 weights, and is the class
previews, inference.py and the tests load.

Released checkpoint: Z-Image's transformer with `siglip_feat_dim: 1152` (SigLIP2-so400m's width; diffusers PR 12857,
which added the omni mode, names it) and SigLIP2's NaFlex processor (16-pixel patches, 256 at most). The omni
weights' own config was not public when this was written: the planner counts that config. The LoRA's default targets
are Z-Image's main and refiner blocks (what ComfyUI's Z-Image key map covers); the SigLIP refiner's layers are opt-in
(`lora_target_modules`, e.g. `siglip_refiner.*.attention.to_q`).
"""

from __future__ import annotations

from typing import TypedDict

import torch
from diffusers import ZImageOmniPipeline

from . import register
from .base import Cond, InferenceRequest, LearningCase, PlannerSpec, Variant
from .flux import build_flux_vae
from .qwen_image import pad_and_stack, to_pil
from .z_image import QWEN3_4B_PARAMS, FLUX_VAE_PARAMS, ZImageAdapter, build_qwen3, build_qwen3_tokenizer, pipeline_guidance

SIGLIP_FEAT_DIM = 1152  # SigLIP2-so400m's hidden size: the released omni transformer's siglip_feat_dim
SIGLIP2_SO400M = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16, patch_size=16,
                      num_patches=256)  # google/siglip2-so400m-patch16-naflex's vision tower
MAX_REFERENCE_AREA = 1024 * 1024  # the pipeline shrinks larger references to the target's area


class ZImageOmniCond(TypedDict, total=False):
    prompt_embeds: torch.Tensor  # B x L x 2560: every segment's real tokens, one after another, zero-padded
    prompt_embeds_mask: torch.Tensor  # B x L
    prompt_segments: torch.Tensor  # B x K token count of each segment (K = 1 without references, N + 2 with N)
    siglip: torch.Tensor  # B x S x C: every reference's SigLIP2 patch features (row-major grids, one after another), zero-padded
    siglip_mask: torch.Tensor  # B x S
    siglip_shapes: torch.Tensor  # B x N x 2: each reference's grid (h, w)
    control_latents: list[torch.Tensor]  # one B x 16 x h x w latent per reference


class OmniPipeline(ZImageOmniPipeline):
    """ZImageOmniPipeline with its references encoded in the VAE's own dtype (see the module docstring)."""

    def prepare_image_latents(self, images, batch_size, device, dtype):
        latents = [omni_reference_latents(self.vae, image.to(device))[0].unsqueeze(1).to(dtype) for image in images]
        return [latents.copy() for _ in range(batch_size)]


def omni_reference_latents(vae, pixels: torch.Tensor) -> torch.Tensor:
    """The pipeline's reference latents: the VAE's mode, shifted and scaled in the VAE's dtype (as it computes them)."""
    z = vae.encode(pixels.to(vae.device, vae.dtype).contiguous(memory_format=torch.channels_last)).latent_dist.mode()
    return (z - vae.config.shift_factor) * vae.config.scaling_factor


def omni_reference_views(img, sizes) -> list:
    """(VAE view, SigLIP2 view) of a reference: resized (Lanczos) when the pipeline would resize it, then the VAE's view
    centre-cropped to its multiples of 16; a size the pipeline would not pick (data_config.control_size) is a resize
    and centre crop for both."""
    from PIL import Image

    from image_datasets import resize_and_crop

    (vw, vh), (sw, sh) = sizes
    if (vw, vh) != (sw // 16 * 16, sh // 16 * 16):
        view = resize_and_crop(img, (vw, vh))
        return [view, view]
    if (sw, sh) != img.size:
        img = img.resize((sw, sh), Image.Resampling.LANCZOS)
    left, top = (sw - vw) // 2, (sh - vh) // 2
    return [img.crop((left, top, left + vw, top + vh)), img]


def segments(cond: Cond) -> list[list[torch.Tensor]]:
    """Per sample, its prompt segments (L_k x D each), as the transformer's cap_feats take them."""
    out = []
    for e, m, lengths in zip(cond["prompt_embeds"], cond["prompt_embeds_mask"], cond["prompt_segments"]):
        out.append(list(e[m.bool()].split([int(n) for n in lengths])))
    return out


def siglip_grids(cond: Cond, dtype: torch.dtype) -> list:
    """Per sample, its references' SigLIP2 grids (h x w x C) and a None for the target, or None without references."""
    if "siglip" not in cond:
        return [None] * cond["prompt_embeds"].shape[0]
    out = []
    for feats, mask, shapes in zip(cond["siglip"], cond["siglip_mask"], cond["siglip_shapes"]):
        flat = feats[mask.bool()].to(dtype)
        sizes = [(int(h), int(w)) for h, w in shapes]
        out.append([g.view(h, w, -1) for g, (h, w) in zip(flat.split([h * w for h, w in sizes]), sizes)] + [None])
    return out


def pad_rows(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """1 x n_i x ... tensors -> (B x max n x ... zero-padded, B x max n mask)."""
    return pad_and_stack(rows, [None] * len(rows))


@register
class ZImageOmniAdapter(ZImageAdapter):
    family = "z-image-omni"
    entry = "train_z_image_omni_lora.py"
    variants = (Variant("z-image-omni", "ZImageOmniPipeline", (0, 10), hub_hints=("z-image-omni",),
                        learning=LearningCase(1, 450, 1e-2)),)  # mirror the reference; 450 steps: error x0.34, choice +0.84 (300: x0.45)
    text_needs_pixels = True  # SigLIP2 features of the references ride with the prompt's conditioning
    reference_limits = (64, 8.0)  # Flux2ImageProcessor.check_image_input, which the pipeline runs on every reference
    default_target_modules = tuple(f"{group}.*.{p}" for group in ("layers", "noise_refiner", "context_refiner")
                                   for p in ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0",
                                             "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"))
    block_count_keys = ("n_layers", "n_refiner_layers", "n_refiner_layers", "n_refiner_layers")  # + the SigLIP refiner
    encoder_folders = ("text_encoder", "tokenizer", "vae", "siglip", "siglip_processor")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.pipeline_class = OmniPipeline
        self.siglip = self.siglip_processor = None

    # --- references ---------------------------------------------------------------------------------------
    def reference_sizes(self, width: int, height: int) -> tuple[tuple[int, int], ...]:
        from image_datasets import target_size

        side = self.cfg.data_config.control_size
        if side:
            size = target_size(width, height, side)
            return size, size
        if width * height > MAX_REFERENCE_AREA:  # resized to the target's area (the pipeline: height x width)
            scale = (self.cfg.data_config.img_size ** 2 / (width * height)) ** 0.5
            width, height = int(width * scale), int(height * scale)
        return (width // 16 * 16, height // 16 * 16), (width, height)  # the VAE's view: cropped to multiples of 16

    def reference_transform(self):
        return omni_reference_views

    # --- loading -------------------------------------------------------------------------------------------
    def load_encoders(self) -> None:
        import transformers
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler

        from trainer.models import read_model_index

        name = self.cfg.pretrained_model_name_or_path
        index = read_model_index(name)
        self.vae, _ = self.place(AutoencoderKL.from_pretrained(name, subfolder="vae", dtype=self.weight_dtype), "none")
        self.siglip, _ = self.place(transformers.Siglip2VisionModel.from_pretrained(name, subfolder="siglip", dtype=self.weight_dtype), "none")
        self.siglip_processor = getattr(transformers, index["siglip_processor"][1]).from_pretrained(name, subfolder="siglip_processor")
        tokenizer = transformers.AutoTokenizer.from_pretrained(name, subfolder="tokenizer")
        self.text_pipe = OmniPipeline(scheduler=None, vae=None, text_encoder=self.load_text_encoder(), tokenizer=tokenizer, transformer=None,
                                      siglip=self.siglip, siglip_processor=self.siglip_processor)
        self.scheduler_config = dict(FlowMatchEulerDiscreteScheduler.load_config(name, subfolder="scheduler"))

    def no_text_components(self) -> dict:
        # previews with references: the pipeline computes their SigLIP2 features itself
        return {"text_encoder": None, "tokenizer": None, "siglip": self.siglip, "siglip_processor": self.siglip_processor}

    # --- conditioning --------------------------------------------------------------------------------------
    def references_of(self, batch: dict, i: int) -> list:
        """Sample i's references as SigLIP2 sees them (PIL)."""
        views = batch.get("condition_images") or []
        return [to_pil(v) for v in views[i]] if views and views[i] else []

    @torch.no_grad()
    def encode_text(self, batch: dict) -> ZImageOmniCond:
        pipe, rows = self.text_pipe, []
        for i, caption in enumerate(batch["captions"]):
            refs = self.references_of(batch, i)
            segs = pipe._encode_prompt([caption], device=self.device, max_sequence_length=self.cfg.max_sequence_length,
                                       num_condition_images=len(refs))[0]
            row = {"embeds": torch.cat(segs).unsqueeze(0), "lengths": torch.tensor([[len(s) for s in segs]])}
            if refs:
                grids = pipe.prepare_siglip_embeds(refs, 1, self.device, torch.float32)[0]
                row["siglip"] = torch.cat([g.flatten(0, 1) for g in grids]).unsqueeze(0).to(self.weight_dtype)
                row["shapes"] = torch.tensor([[list(g.shape[:2]) for g in grids]])
            rows.append(row)
        embeds, mask = pad_rows([r["embeds"] for r in rows])
        cond = {"prompt_embeds": embeds.to(self.weight_dtype), "prompt_embeds_mask": mask,
                "prompt_segments": torch.cat([r["lengths"] for r in rows]).to(self.device)}
        if "siglip" in rows[0]:
            cond["siglip"], cond["siglip_mask"] = pad_rows([r["siglip"] for r in rows])
            cond["siglip_shapes"] = torch.cat([r["shapes"] for r in rows]).to(self.device)
        return cond

    def encode_prompts(self, captions: list[str]) -> ZImageOmniCond:
        return self.encode_text({"captions": captions})  # text-to-image: no references

    def encode_latents(self, batch: dict) -> tuple[torch.Tensor, Cond]:
        with torch.no_grad():
            refs = [omni_reference_latents(self.vae, c.to(self.device)).float() for c in batch["controls"]]
        return self.encode_images(batch["pixel_values"]), {"control_latents": refs}

    def split_text(self, cond: Cond, n: int) -> list[Cond]:
        items = super().split_text({k: v for k, v in cond.items() if not k.startswith("siglip")}, n)
        if "siglip" in cond:
            for i, item in enumerate(items):
                length = int(cond["siglip_mask"][i].sum())
                item.update(siglip=cond["siglip"][i : i + 1, :length], siglip_mask=cond["siglip_mask"][i : i + 1, :length],
                            siglip_shapes=cond["siglip_shapes"][i : i + 1])
        return items

    def merge_text(self, items: list[Cond]) -> Cond:
        out = super().merge_text([{k: v for k, v in it.items() if not k.startswith("siglip")} for it in items])
        if "siglip" in items[0]:
            out["siglip"], out["siglip_mask"] = pad_rows([it["siglip"] for it in items])
            out["siglip_shapes"] = torch.cat([it["siglip_shapes"] for it in items])
        return out

    def predict(self, transformer: torch.nn.Module, noisy: torch.Tensor, sigmas: torch.Tensor, cond: Cond) -> torch.Tensor:
        dt = self.weight_dtype
        refs = cond.get("control_latents") or []
        x = [[r[i].to(dt).unsqueeze(1) for r in refs] + [noisy[i].to(dt).unsqueeze(1)] for i in range(noisy.shape[0])]
        caps = [[s.to(dt) for s in segs] for segs in segments(cond)]
        out = transformer(x=x, t=1.0 - sigmas.float(), cap_feats=caps, siglip_feats=siglip_grids(cond, dt),
                          image_noise_mask=[[0] * len(refs) + [1] for _ in x], return_dict=False)[0]
        return -torch.stack([o.float() for o in out]).squeeze(2)  # the model predicts the negated velocity

    # --- sampling and inference ----------------------------------------------------------------------------
    def sampling_kwargs(self, cond: Cond, negative: Cond, size: tuple[int, int], images: list) -> dict:
        kwargs = {"prompt_embeds": segments(cond), "negative_prompt_embeds": segments(negative),
                  "guidance_scale": pipeline_guidance(self.cfg.validation_guidance_scale)}
        if images:
            kwargs["image"] = [im.convert("RGB") for im in images]  # the originals: the pipeline sizes them
        return kwargs

    def inference_kwargs(self, request: InferenceRequest) -> dict:
        kwargs = super().inference_kwargs(request)
        if request.images:
            kwargs["image"] = [im.convert("RGB") for im in request.images]
        return kwargs

    # --- planner, benches, tiny models ---------------------------------------------------------------------
    def released_transformer_config(self) -> dict:
        return {"siglip_feat_dim": SIGLIP_FEAT_DIM, "axes_lens": [1536, 512, 512]}

    def planner_spec(self) -> PlannerSpec:
        from transformers import Siglip2VisionConfig, Siglip2VisionModel

        with torch.device("meta"):
            siglip = sum(p.numel() for p in Siglip2VisionModel(Siglip2VisionConfig(**SIGLIP2_SO400M)).parameters())
        # one reference: its 256 SigLIP2 tokens beside the prompt, its latents one more image frame; SigLIP2 stays loaded
        # after caching (previews with references run it)
        return PlannerSpec(encoders=[("text encoder Qwen3-4B", QWEN3_4B_PARAMS, True), ("image encoder SigLIP2-so400m", siglip, False)],
                           vae_params=FLUX_VAE_PARAMS, text_tokens=128 + 256, token_width=3840, image_frames=2, preview_params=siglip)

    def random_conditioning(self, transformer, batch: int, device, dtype) -> Cond:
        return super().random_conditioning(transformer, batch, device, dtype) | {
            "prompt_segments": torch.full((batch, 1), 128, dtype=torch.long, device=device)}

    def make_tiny_model(self, out, realistic: bool = False) -> None:
        """The released prompt and reference layout: Qwen3's tokens with the vision slots, prompts padded to 512 tokens
        per segment, SigLIP2's NaFlex processor (16-pixel patches, 256 at most), an 8x VAE."""
        from diffusers import FlowMatchEulerDiscreteScheduler
        from transformers import Siglip2VisionConfig, Siglip2VisionModel

        from .z_image import build_z_image_transformer

        torch.manual_seed(0)
        tokenizer = build_qwen3_tokenizer()
        transformer = build_z_image_transformer(siglip_feat_dim=32)
        siglip = Siglip2VisionModel(Siglip2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                                        patch_size=16, num_patches=256))
        ZImageOmniPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False),
            vae=build_flux_vae(latent_channels=16), text_encoder=build_qwen3(tokenizer), tokenizer=tokenizer, transformer=transformer,
            siglip=siglip, siglip_processor=siglip_processor(),
        ).save_pretrained(out)


def siglip_processor():
    """SigLIP2's NaFlex image processor at its released settings (the PIL one: torchvision is not installed here)."""
    import transformers

    cls = getattr(transformers, "Siglip2ImageProcessorPil", None) or transformers.Siglip2ImageProcessor
    return cls(patch_size=16, max_num_patches=256)
