"""Training conditions the model exactly as inference does: the trainer's encode + predict vs the diffusers pipeline.

For each family / variant, the pipeline's own `__call__` runs with a hook on its transformer; its first transformer
call (inputs and output) is captured. The trainer then encodes the same prompt and reference images the way it
does in training (dataset scan, reference sizing, dataset item, collate, `encode_batch`) and calls `predict` on the
same noisy latent and sigma with the same transformer. Every transformer input (prompt embeddings and mask,
image + reference latents, position ids / img_shapes, timestep, guidance, pooled projections) and the prediction
must agree (max abs diff < 1e-4, float32). The tiny models are built with the released pixel budgets and templates
(`make_tiny_models --realistic`), so sequence lengths are the real ones: a 1 MP reference gives Qwen2.5-VL ~1,300
vision tokens and the transformer ~4,000 reference tokens.

    python bench/equivalence.py            # prints the table for README / bench/results/equivalence.md

tests/test_equivalence.py runs the same cases and asserts the bound.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

# target (width, height) and reference sizes: all different, none square, none at the training size
TARGET = (512, 384)
REFERENCES = [(800, 600), (600, 904), (720, 720)]
PROMPT = "make the sky purple and add a small red boat on the water"


@dataclass(frozen=True)
class Case:
    name: str  # row label
    variant: str  # make_tiny_models family
    references: int = 0
    guidance: bool = True  # FLUX: the transformer has a guidance embedding (dev / Kontext); False = schnell
    zero_cond_t: bool = False  # Qwen-Image-Edit-2511: reference tokens modulated at t = 0 (transformer config)
    expand_timesteps: bool = False  # Wan 2.2 TI2V-5B: a timestep per latent token (the pipeline's config)
    layout: str = "packed"  # how the pipeline passes latents: packed tokens (hidden_states=...), "concat" (packed, the control's
    # channels after the target's), "fill" (packed, then the masked image's and the mask's), "frames" (a list), "omni" (per sample a list: the references' frames, then the target's), or "grid"
    # (B x C x H x W patchified latents, timestep 1000 sigma: ERNIE-Image), "grid-x0" (B x C x H x W latents, timesteps 1000
    # sigma, output x0 - noise: HiDream-I1), "layered" (packed frames: the composite then `references` layers, then the
    # composite as the condition: Qwen-Image-Layered; its layers are the target's size), or "left-padded" (Ideogram 4: one sequence of
    # left-padded text then image tokens, time 1 - sigma, output x0 - noise; inputs compared without the padding rows)
    control_mode: int | None = None  # a Union ControlNet (3 modes) run in this mode
    controlnet_2x: bool = False  # Z-Image: a ControlNet of the 2.x layout (control refiner blocks, control_in_dim 33)
    masked_text: bool = False  # Krea 2: prompt rows compared where encoder_attention_mask is on (the padding rows are masked
    # out of every attention; the pipeline holds pad-token states there, the trainer zeros)


CASES = [
    Case("Qwen-Image", "qwen-image"),
    Case("Qwen-Image-Edit", "qwen-image-edit", 1),
    Case("Qwen-Image-Edit-2509, 1 ref", "qwen-image-edit-plus", 1),
    Case("Qwen-Image-Edit-2509, 2 refs", "qwen-image-edit-plus", 2),
    Case("Qwen-Image-Edit-2509, 3 refs", "qwen-image-edit-plus", 3),
    Case("Qwen-Image-Edit-2511, 2 refs", "qwen-image-edit-plus", 2, zero_cond_t=True),
    Case("FLUX.1-dev", "flux"),
    Case("FLUX.1-schnell", "flux", guidance=False),
    Case("FLUX.1-Kontext-dev, 1 ref", "flux-kontext", 1),
    Case("FLUX.1 Control (Canny / Depth dev)", "flux-control", 1, layout="concat"),
    Case("FLUX.1 Fill (inpainting)", "flux-fill", layout="fill"),
    Case("FLUX.1-dev + ControlNet", "flux-controlnet", 1),
    Case("FLUX.1-dev + Union ControlNet, mode 2", "flux-controlnet", 1, control_mode=2),
    Case("Qwen-Image + ControlNet", "qwen-image-controlnet", 1),
    Case("Qwen-Image in-context control", "qwen-image-in-context", 1),
    Case("Z-Image", "z-image", layout="frames"),
    Case("Z-Image + ControlNet", "z-image-controlnet", 1, layout="frames"),
    Case("Z-Image + ControlNet, 2.x layout", "z-image-controlnet", 1, layout="frames", controlnet_2x=True),
    Case("Z-Image-Omni", "z-image-omni", layout="omni"),
    Case("Z-Image-Omni, 2 refs", "z-image-omni", 2, layout="omni"),
    Case("Chroma", "chroma"),
    Case("Kandinsky 5.0 Image", "kandinsky5", layout="frames-last"),
    Case("Wan 2.1 T2V, one frame", "wan", layout="video"),
    Case("Wan 2.2 TI2V-5B layout (timestep per token), one frame", "wan", layout="video", expand_timesteps=True),
    Case("FLUX.2 Klein", "flux2-klein", layout="patchified"),
    Case("FLUX.2 Klein, 1 ref", "flux2-klein", 1, layout="patchified"),
    Case("FLUX.2 Klein, 2 refs", "flux2-klein", 2, layout="patchified"),
    Case("FLUX.2 Klein, 3 refs", "flux2-klein", 3, layout="patchified"),
    Case("FLUX.2 dev, 1 ref", "flux2", 1, layout="patchified"),
    Case("Qwen-Image 2.1", "qwen-image-2.1", layout="joint"),
    Case("Qwen-Image 2.1, 1 ref", "qwen-image-2.1", 1, layout="joint"),
    Case("Qwen-Image 2.1, 2 refs", "qwen-image-2.1", 2, layout="joint"),
    Case("ERNIE-Image", "ernie-image", layout="grid"),
    Case("Krea 2", "krea2", masked_text=True),
    Case("Ideogram 4", "ideogram4", layout="left-padded"),
    Case("HiDream-I1", "hidream-i1", layout="grid-x0"),
    Case("Qwen-Image-Layered, 2 layers", "qwen-image-layered", 2, layout="layered"),
]


class _Captured(Exception):
    pass


def capture_first_call(transformer: torch.nn.Module, fn) -> tuple[dict, torch.Tensor]:
    """(inputs, output) of the transformer's first forward call inside fn(); fn is stopped right after it. Inputs
    are the keyword arguments plus the positional ones as "arg0", "arg1", ..."""
    seen: dict = {}

    def pre(_module, args, kwargs):
        seen["inputs"] = {**{f"arg{i}": a for i, a in enumerate(args)}, **kwargs}

    def post(_module, _args, _kwargs, out):
        seen["output"] = out[0] if isinstance(out, tuple) else out.sample
        raise _Captured

    hooks = [transformer.register_forward_pre_hook(pre, with_kwargs=True), transformer.register_forward_hook(post, with_kwargs=True)]
    try:
        fn()
    except _Captured:
        pass
    finally:
        for h in hooks:
            h.remove()
    return seen["inputs"], seen["output"]


def latents_and_sigma(case: Case, inputs: dict) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The pipeline call's noisy target latent (B x C x H x W), its sigma and its number of target tokens."""
    if case.layout == "frames":  # Z-Image: a list of C x 1 x H x W frames, time = 1 - sigma
        return torch.stack(inputs["arg0"]).squeeze(2).float(), 1.0 - inputs["arg1"].float(), 0
    if case.layout == "omni":  # Z-Image-Omni: per sample a list of frames, the references' then the noisy target's
        return torch.stack([frames[-1] for frames in inputs["x"]]).squeeze(2).float(), 1.0 - inputs["t"].float(), 0
    if case.layout == "frames-last":  # Kandinsky 5: B x 1 x H x W x C, time = 1000 sigma
        return inputs["hidden_states"].squeeze(1).permute(0, 3, 1, 2).float(), inputs["timestep"].float() / 1000, 0
    if case.layout == "video":  # Wan: B x C x F x H x W (one frame), timestep = 1000 sigma (2.2 TI2V: one per token, all equal)
        t = inputs["timestep"].float()
        return inputs["hidden_states"].squeeze(2).float(), (t[:, 0] if t.ndim == 2 else t) / 1000, 0
    if case.layout in ("grid", "grid-x0"):  # ERNIE-Image: B x 128 x H x W, timestep = 1000 sigma; HiDream-I1: B x 16 x H x W
        return inputs["hidden_states"].float(), inputs.get("timestep", inputs.get("timesteps")).float() / 1000, 0
    if case.layout in ("joint", "left-padded"):  # Qwen-Image 2.1: condition latents, then the target's (unpatched, 16 px per
        # token); Ideogram 4: text, then the target's, time 1 - sigma
        h, w = TARGET[1] // 16, TARGET[0] // 16
        tokens = inputs["hidden_states"][:, -h * w :]
        time = inputs["timestep"].float()
        return tokens.permute(0, 2, 1).reshape(tokens.shape[0], -1, h, w).float(), 1.0 - time if case.layout == "left-padded" else time, h * w
    if case.layout == "layered":  # the target's frames (composite + layers), each h x w tokens, then the condition's
        from trainer.models.qwen_image_layered import unpack_frames

        frames, n = case.references + 1, (TARGET[1] // 16) * (TARGET[0] // 16)
        latents = unpack_frames(inputs["hidden_states"][:, : frames * n], frames, TARGET[1] // 8, TARGET[0] // 8)
        return latents.float(), inputs["timestep"].float(), frames * n
    if case.layout == "patchified":  # FLUX.2: one token per 2x2-patchified latent position (16 px)
        h, w = TARGET[1] // 16, TARGET[0] // 16
        tokens = inputs["hidden_states"][:, : h * w]
        return tokens.permute(0, 2, 1).reshape(tokens.shape[0], -1, h, w).float(), inputs["timestep"].float(), h * w
    n_target = (TARGET[0] // 16) * (TARGET[1] // 16)
    hidden = inputs["hidden_states"]
    if case.layout == "concat":  # FLUX Control: the target's channels, then the control's
        hidden = hidden[..., : hidden.shape[-1] // 2]
    if case.layout == "fill":  # FLUX Fill: the target's, the masked image's, then the packed mask's 256
        hidden = hidden[..., : (hidden.shape[-1] - 256) // 2]
    return unpack(hidden[:, :n_target], TARGET), inputs["timestep"].float(), n_target


def pipeline_prediction(case: Case, output, n_target: int) -> torch.Tensor:
    """What the pipeline takes as the velocity for the target from the transformer's output."""
    if case.layout in ("frames", "omni"):
        return -torch.stack([o.float() for o in output]).squeeze(2)
    if case.layout == "frames-last":
        return output.squeeze(1).permute(0, 3, 1, 2).float()
    if case.layout == "video":
        return output.squeeze(2).float()
    if case.layout in ("grid", "grid-x0"):
        return -output.float() if case.layout == "grid-x0" else output.float()  # HiDream-I1 predicts x0 - noise
    if case.layout in ("joint", "left-padded"):  # the pipeline keeps the last target-many tokens of the sequence
        tokens = output[:, -n_target:]
        v = tokens.permute(0, 2, 1).reshape(tokens.shape[0], -1, TARGET[1] // 16, TARGET[0] // 16).float()
        return -v if case.layout == "left-padded" else v  # Ideogram 4 predicts x0 - noise (the pipeline steps with -v)
    if case.layout == "layered":
        from trainer.models.qwen_image_layered import unpack_frames

        return unpack_frames(output[:, :n_target], case.references + 1, TARGET[1] // 8, TARGET[0] // 8).float()
    if case.layout == "patchified":
        tokens = output[:, :n_target]
        return tokens.permute(0, 2, 1).reshape(tokens.shape[0], -1, TARGET[1] // 16, TARGET[0] // 16).float()
    return unpack(output[:, :n_target], TARGET)


@contextlib.contextmanager
def latent_means(on: bool):
    """FluxControlPipeline / FluxFillPipeline / QwenImageControlNetPipeline encode the control / masked image with the VAE's sample (mean + std * noise); training uses the
    mean, as for every latent. For the comparison the pipeline's draw is its mean, so that every input compares
    exactly; the noise the pipeline would add is the VAE's std, very small on the released (and the tiny) VAEs."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    if not on:
        yield
        return
    sample = DiagonalGaussianDistribution.sample
    DiagonalGaussianDistribution.sample = lambda self, generator=None: self.mode()
    try:
        yield
    finally:
        DiagonalGaussianDistribution.sample = sample


def max_diff(a, b) -> float:
    """Largest absolute difference between two transformer inputs (inf when their structure differs)."""
    if a is None or b is None:
        return 0.0 if a is None and b is None else float("inf")
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.shape != b.shape:
            return float("inf")
        return (a.float() - b.float()).abs().max().item() if a.numel() else 0.0
    if isinstance(a, dict) and isinstance(b, dict):  # Z-Image's ControlNet hints: {layer: tensor}
        return max_diff(list(a.values()), list(b.values())) if a.keys() == b.keys() else float("inf")
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return float("inf")
        return max((max_diff(x, y) for x, y in zip(a, b)), default=0.0)
    return 0.0 if a == b else float("inf")


# Not conditioning: attention options, output format, ControlNet residuals (None here), and Qwen-Image 2.1's prefix
# KV cache, which the pipeline fills on its first call (an inference speed-up; the output is compared all the same).
IGNORED_INPUTS = ("attention_kwargs", "joint_attention_kwargs", "return_dict", "controlnet_block_samples",
                  "controlnet_single_block_samples", "controlnet_blocks_repeat", "kv_cache", "kv_cache_mode")


def write_inputs(folder: Path, n_refs: int) -> tuple[Path, list[Path]]:
    """A target image and its reference images on disk (random pixels, fixed seed)."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / "target.png"
    Image.fromarray((rng.random((TARGET[1], TARGET[0], 3)) * 255).astype("uint8")).save(target)
    refs = []
    for k, (w, h) in enumerate(REFERENCES[:n_refs]):
        refs.append(folder / f"ref{k}.png")
        Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8")).save(refs[-1])
    # an inpainting mask (FLUX Fill) at twice the target's size: white blocks, edges not on the 16-pixel grid
    mask = np.zeros((2 * TARGET[1], 2 * TARGET[0]), dtype="uint8")
    mask[100:500, 300:900] = 255
    mask[37:90, 11:250] = 255
    Image.fromarray(mask).save(folder / "mask.png")
    return target, refs


def schnell_copy(flux_model: Path, out: Path) -> Path:
    """The tiny FLUX pipeline with a transformer without guidance embedding (FLUX.1-schnell's architecture)."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    if not (out / "model_index.json").exists():
        pipe = FluxPipeline.from_pretrained(flux_model)
        torch.manual_seed(0)
        pipe.transformer = FluxTransformer2DModel.from_config({**pipe.transformer.config, "guidance_embeds": False})
        pipe.save_pretrained(out)
    return out


def expand_timesteps_copy(model: Path, out: Path) -> Path:
    """The tiny Wan pipeline in Wan 2.2 TI2V-5B's layout: its pipeline option expand_timesteps (model_index.json), its
    VAE (16x, 2x2 pixel patches) and a transformer for its latent channels."""
    from diffusers import WanPipeline

    from trainer.models.wan import build_wan22_vae, build_wan_transformer

    if not (out / "model_index.json").exists():
        pipe = WanPipeline.from_pretrained(model)
        torch.manual_seed(0)
        pipe.vae, pipe.transformer = build_wan22_vae(8), build_wan_transformer(z_dim=8)
        pipe.save_pretrained(out)
        index = json.loads((out / "model_index.json").read_text())
        (out / "model_index.json").write_text(json.dumps({**index, "expand_timesteps": True}))
    return out


def zero_cond_copy(plus_model: Path, out: Path) -> Path:
    """The tiny Edit-2509 pipeline with Qwen-Image-Edit-2511's transformer option (zero_cond_t=True)."""
    from diffusers import QwenImageEditPlusPipeline

    from trainer.models.qwen_image import build_qwen_transformer

    if not (out / "model_index.json").exists():
        pipe = QwenImageEditPlusPipeline.from_pretrained(plus_model, processor=None)
        torch.manual_seed(0)
        pipe.transformer = build_qwen_transformer(zero_cond_t=True)
        pipe.save_pretrained(out)
        shutil.copytree(plus_model / "processor", out / "processor", dirs_exist_ok=True)
        index = json.loads((out / "model_index.json").read_text())
        (out / "model_index.json").write_text(json.dumps({**index, "processor": ["transformers", "Qwen2VLProcessor"]}))
    return out


def trainer_batch(adapter, target: Path, refs: list[Path], captions: list[str], work: Path) -> dict:
    """A collated training batch of len(captions) samples (same target and references), built as training does."""
    from image_datasets import CaptionDataset, collate, scan_dataset
    from trainer.config import DataConfig

    captions = [" ".join(c.split()) for c in captions]  # as the dataset reads them
    meta = work / "metadata.jsonl"
    cols = ["control_image"] + [f"control_image_{k + 1}" for k in range(1, len(refs))]
    mask = {"mask": str(work / "mask.png")} if adapter.masks_are_inputs else {}  # FLUX Fill: write_inputs' mask
    meta.write_text("\n".join(json.dumps({"image": str(target), "prompt": c, **{col: str(r) for col, r in zip(cols, refs)}, **mask})
                              for c in captions))
    # FLUX Control / Fill: the control image / mask takes the training size: the one whose area gives exactly TARGET (512x384)
    d = DataConfig(metadata_file=str(meta), img_size=444 if adapter.aligned_controls else max(TARGET)) if refs or mask else None
    if d is None:
        folder = work / "t2i"
        folder.mkdir(exist_ok=True)
        for i, c in enumerate(captions):
            (folder / f"s{i}.png").write_bytes(target.read_bytes())
            (folder / f"s{i}.txt").write_text(c)
        d = DataConfig(img_dir=str(folder), img_size=max(TARGET))
    scan = scan_dataset(d, reference_sizes=adapter.reference_sizes, rule=adapter.reference_rule(), multiple=adapter.size_multiple)
    assert not scan.problems, scan.problems
    samples = sorted(scan.samples, key=lambda s: (s.image.name, captions.index(s.caption)))
    ds = CaptionDataset(samples, reference_transform=adapter.reference_transform(), keep_alpha=adapter.pixel_channels == 4,
                        aligned_controls=adapter.aligned_controls)
    return collate([ds[(i, 0)] for i in range(len(samples))])


def pipeline_call_kwargs(case: Case, refs: list[Path], work: Path) -> dict:
    """`work`: the folder write_inputs wrote the target (and the inpainting mask) to."""
    w, h = TARGET
    kwargs = dict(prompt=PROMPT, width=w, height=h, num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    images = [Image.open(r).convert("RGB") for r in refs]
    if case.variant.startswith("qwen"):
        kwargs["true_cfg_scale"] = 1.0
        if case.variant == "qwen-image-2.1" and images:
            kwargs["image"] = images
        if case.variant == "qwen-image-layered":  # the composite in; asked as resolution 640, sized 512x384 by render_size
            del kwargs["width"], kwargs["height"]
            kwargs.update(image=Image.open(work / "target.png").convert("RGBA"), layers=case.references, resolution=640)
    elif case.variant in ("z-image", "z-image-omni", "krea2"):
        kwargs["guidance_scale"] = 0.0  # no CFG (the Z-Image pipelines / Krea2Pipeline run CFG for any scale > 0)
        if images:
            kwargs["image"] = images
    elif case.variant in ("chroma", "kandinsky5", "flux2-klein", "ernie-image", "hidream-i1"):
        kwargs["guidance_scale"] = 1.0  # no CFG: one transformer call per step
    elif case.variant == "wan":
        kwargs.update(guidance_scale=1.0, num_frames=1)  # no CFG; an image is a one-frame video
    elif case.variant == "ideogram4":
        kwargs.update(guidance_scale=1.0, guidance_schedule=None)  # the conditional transformer's call is the first
    # FLUX.1 / FLUX.2 dev: the distilled guidance left at the pipeline's default, which training uses by default
    if case.variant == "qwen-image-edit":
        kwargs["image"] = images[0]
    elif case.variant == "qwen-image-edit-plus":
        kwargs["image"] = images
    elif case.variant == "qwen-image-in-context":
        kwargs["context_image"] = images[0]  # 800x600, resized by the pipeline to the output's 512x384
    elif case.variant == "flux-kontext":
        kwargs.update(image=images[0], max_area=w * h)  # _auto_resize on: the pipeline's default reference sizing
    elif case.variant in ("flux-control", "flux-controlnet", "z-image-controlnet", "qwen-image-controlnet"):
        kwargs["control_image"] = images[0]  # 800x600: the target's aspect, resized by the pipeline to 512x384
        if case.control_mode is not None:
            kwargs["control_mode"] = case.control_mode
        if case.variant == "z-image-controlnet":
            kwargs.update(guidance_scale=0.0, controlnet_conditioning_scale=1.0)  # its default 0.75; training runs at 1
    elif case.variant == "flux-fill":
        kwargs.update(image=Image.open(work / "target.png").convert("RGB"), mask_image=Image.open(work / "mask.png"))
    elif case.variant.startswith("flux2") and images:
        kwargs["image"] = images
    return kwargs


def compare(case: Case, model: Path, work: Path) -> dict:
    """Run one case; returns {input name: max abs diff, ..., "prediction": ..., "text_tokens": n, "image_tokens": n}."""
    from diffusers import DiffusionPipeline

    from trainer.config import load_config
    from trainer.learning import tiny_controlnet
    from trainer.models import resolve

    cls, variant = resolve(str(model))
    controlnet = case.variant.endswith("-controlnet")
    more = ["training_method=controlnet", *(f"{k}={v}" for k, v in tiny_controlnet(model).items())] if controlnet else []
    if case.control_mode is not None:
        more += ["controlnet_modes=3"]
    if case.variant.endswith("-in-context"):
        more = ["control_type=in-context"]
    preset = [f"{k}={v}" for k, v in cls.config_preset.items()]  # as the family's entry script starts from (HiDream-I1: 128 tokens)
    cfg = load_config(None, [f"pretrained_model_name_or_path={model}", "mixed_precision=no", *preset, *more], check_paths=False)
    adapter = cls.from_model(cfg)
    adapter.load()
    pipe = DiffusionPipeline.from_pretrained(model, **adapter.pipeline_components(str(model)))
    if type(pipe) is not adapter.pipeline_class and issubclass(adapter.pipeline_class, type(pipe)):  # the family's fix of it (Z-Image-Omni)
        pipe = adapter.pipeline_class(**pipe.components)
    model_call = pipe.transformer
    if controlnet:  # a ControlNet whose zero-initialised layers are random, so that its residuals count
        from trainer.methods.controlnet import ControlNetPair

        torch.manual_seed(1)
        net = z_image_controlnet_2x(pipe.transformer) if case.controlnet_2x else adapter.make_controlnet(pipe.transformer)
        for p in net.parameters():
            if not p.any():
                torch.nn.init.normal_(p, std=0.2)
        pipe = adapter.pipeline_class(**pipe.components, controlnet=net)
        model_call = ControlNetPair(pipe.transformer, net, adapter)
    target, refs = write_inputs(work, case.references)
    if case.layout == "layered":  # layers are the composite's size
        rng = np.random.default_rng(1)
        for r in refs:
            Image.fromarray((rng.random((TARGET[1], TARGET[0], 4)) * 255).astype("uint8"), "RGBA").save(r)
    with torch.no_grad(), latent_means(case.variant in ("flux-control", "flux-fill", "flux-controlnet", "qwen-image-controlnet")):
        with adapter.render_size(pipe, *TARGET):  # as inference.py calls it (HiDream-I1 would scale the request to 1 MP)
            ref_inputs, ref_out = capture_first_call(pipe.transformer, lambda: pipe(**pipeline_call_kwargs(case, refs, work)))
        batch = trainer_batch(adapter, target, refs, [PROMPT], work)
        _, cond = adapter.encode_batch(batch)
        if case.control_mode is not None:  # the training step adds the batch's modes (the samples' datasets') to it
            cond["control_mode"] = torch.tensor([case.control_mode])
        noisy, sigma, n_target = latents_and_sigma(case, ref_inputs)
        ours_inputs, ours_out = capture_first_call(pipe.transformer, lambda: adapter.predict(model_call, noisy, sigma, cond))
        pred = adapter.predict(model_call, noisy, sigma, cond)
    ignored = [k for k in IGNORED_INPUTS if not (controlnet and k.startswith("controlnet_"))]  # its residuals are compared
    if case.masked_text:
        for inputs in (ref_inputs, ours_inputs):
            keep = inputs["encoder_attention_mask"].reshape(*inputs["encoder_attention_mask"].shape, 1, 1)
            inputs["encoder_hidden_states"] = inputs["encoder_hidden_states"] * keep
    if case.layout == "left-padded":  # the pipeline pads prompts to 2048 tokens, the trainer to the batch's longest
        ref_out, ours_out = without_padding(ref_inputs, ref_out), without_padding(ours_inputs, ours_out)
    result = {k: max_diff(v, ours_inputs.get(k)) for k, v in ref_inputs.items() if k not in ignored}
    result["prediction"] = max_diff(pipeline_prediction(case, ref_out, n_target), pred)
    result["transformer output"] = max_diff(ref_out, ours_out)
    if case.layout == "frames":
        result["text_tokens"] = int(ref_inputs["arg2"][0].shape[0])
        result["image_tokens"] = int(ref_inputs["arg0"][0].shape[-2] * ref_inputs["arg0"][0].shape[-1] // 4)
    elif case.layout == "omni":  # every prompt segment; every image's latent tokens (references and target)
        result["text_tokens"] = int(sum(seg.shape[0] for seg in ref_inputs["cap_feats"][0]))
        result["image_tokens"] = int(sum(f[0, 0].numel() // 4 for f in ref_inputs["x"][0]))
    elif case.layout == "frames-last":
        result["text_tokens"] = int(ref_inputs["encoder_hidden_states"].shape[1])
        result["image_tokens"] = int(ref_inputs["hidden_states"].shape[2] * ref_inputs["hidden_states"].shape[3] // 4)
    elif case.layout == "video":  # (an expanded timestep is one per token: compared whole, its sigma is its first)
        result["text_tokens"] = int(ref_inputs["encoder_hidden_states"].shape[1])
        result["image_tokens"] = int(ref_inputs["hidden_states"][0, 0].numel() // 4)
    elif case.layout == "grid":
        result["text_tokens"] = int(ref_inputs["text_bth"].shape[1])
        result["image_tokens"] = int(ref_inputs["hidden_states"].shape[2] * ref_inputs["hidden_states"].shape[3])
    elif case.layout == "grid-x0":  # T5's and the last Llama layer's tokens, then each block's own Llama layer
        result["text_tokens"] = int(ref_inputs["encoder_hidden_states_t5"].shape[1] + 2 * ref_inputs["encoder_hidden_states_llama3"].shape[2])
        padded = ref_inputs["hidden_states"].shape[2] != ref_inputs["hidden_states"].shape[3]
        result["image_tokens"] = int(pipe.transformer.max_seq if padded else ref_inputs["hidden_states"][0, 0].numel() // 4)
    elif case.layout == "left-padded":
        result["text_tokens"] = int((ref_inputs["indicator"] == 3).sum())
        result["image_tokens"] = int((ref_inputs["indicator"] == 2).sum())
    elif case.layout == "joint":  # the prompt's vision slots stand for the condition latents: count text only
        result["text_tokens"] = int((~ref_inputs["img_mask"][0, : ref_inputs["encoder_hidden_states"].shape[1]]).sum())
        result["image_tokens"] = int(ref_inputs["hidden_states"].shape[1])
    else:
        result["text_tokens"] = int(ref_inputs["encoder_hidden_states"].shape[1])
        result["image_tokens"] = int(ref_inputs["hidden_states"].shape[1])
    return result


def z_image_controlnet_2x(transformer: torch.nn.Module) -> torch.nn.Module:
    """A Z-Image ControlNet of the 2.x layout (VideoX-Fun's Union 2.0): control refiner blocks in front of the control
    blocks, control_in_dim = the latent channels + 17, which the pipeline (and training) fill with zeros."""
    from diffusers import ZImageControlNetModel

    c = transformer.config
    return ZImageControlNetModel(control_layers_places=[0], control_refiner_layers_places=[0], control_in_dim=c.in_channels + 17,
                                 add_control_noise_refiner="control_noise_refiner", all_patch_size=tuple(c.all_patch_size),
                                 all_f_patch_size=tuple(c.all_f_patch_size), dim=c.dim, n_refiner_layers=c.n_refiner_layers,
                                 n_heads=c.n_heads, n_kv_heads=c.n_kv_heads, norm_eps=c.norm_eps, qk_norm=c.qk_norm)


def without_padding(inputs: dict, output: torch.Tensor) -> torch.Tensor:
    """Ideogram 4's packed sequence (batch of 1) without its padding rows (segment id -1): the inputs in place, and the
    output returned. Padding is its own attention segment; the real tokens never see it."""
    keep = inputs["segment_ids"][0] != -1
    for k in ("hidden_states", "encoder_hidden_states", "position_ids", "segment_ids", "indicator"):
        inputs[k] = inputs[k][:, keep]
    return output[:, keep]


def unpack(packed: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    from trainer.models.qwen_image import unpack_latents

    w, h = size
    return unpack_latents(packed, h // 8, w // 8)


def batch_independence(model: Path, work: Path, references: int) -> float:
    """Sample 0's prediction in a batch of 2 when sample 1's caption changes from short to very long."""
    from trainer.config import load_config
    from trainer.models import resolve

    cls, variant = resolve(str(model))
    preset = [f"{k}={v}" for k, v in cls.config_preset.items()]
    adapter = cls(load_config(None, [f"pretrained_model_name_or_path={model}", "mixed_precision=no", *preset], check_paths=False), variant)
    adapter.load()
    target, refs = write_inputs(work, references)
    sigma = torch.tensor([0.7, 0.3])
    preds = []
    for other in ("a cat", "a very long caption " + "about a red boat on a purple lake at dusk, " * 12):
        batch = trainer_batch(adapter, target, refs, [PROMPT, other], work)
        with torch.no_grad():
            latents, cond = adapter.encode_batch(batch)
            noisy = torch.randn(latents.shape, generator=torch.Generator().manual_seed(1))
            preds.append(adapter.predict(adapter.transformer, noisy, sigma, cond)[0])
    return (preds[0] - preds[1]).abs().max().item()


def main() -> int:
    import argparse

    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    logging.disable(logging.WARNING)
    from utils.make_tiny_models import make_tiny_model

    root = Path(tempfile.mkdtemp())
    print(f"target {TARGET[0]}x{TARGET[1]}, references {', '.join(f'{w}x{h}' for w, h in REFERENCES)}; tiny models with the "
          "released processor budgets / templates; float32")
    print("| case | text tokens | image + reference tokens | max abs diff, inputs | max abs diff, prediction |")
    print("| --- | --- | --- | --- | --- |")
    for case in CASES:
        model = make_tiny_model(case.variant, root / case.variant, realistic=True)
        if not case.guidance:
            model = schnell_copy(model, root / "flux-schnell")
        if case.zero_cond_t:
            model = zero_cond_copy(model, root / "qwen-image-edit-2511")
        if case.expand_timesteps:
            model = expand_timesteps_copy(model, root / f"{case.variant}-expand")
        r = compare(case, model, root / case.name.replace(" ", "_").replace(",", ""))
        inputs = max(v for k, v in r.items() if k not in ("prediction", "transformer output", "text_tokens", "image_tokens"))
        print(f"| {case.name} | {r['text_tokens']} | {r['image_tokens']} | {inputs:.2e} | {r['prediction']:.2e} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
