"""Did training teach the model what it was shown? Measured through the family's own diffusers pipeline.

A falling loss proves little about sampling: a target of the wrong sign, latents normalized differently from how the
pipeline un-normalizes them, training sigmas on another schedule, a caption paired with the wrong image or a LoRA
scaled differently at load time all train "fine" and sample wrong. This module makes "it learns" a measurement:

    examples = write_shapes_case(folder, references=1)       # targets (+ references) with measurable captions
    ... train on folder with the trainer ...
    report = measure_learning(model, examples, lora=out)       # the pipeline's own __call__, base and trained
    report.failures()                                          # [] when the trained model produces its targets

The pipeline is the user's: `from_pretrained` + `load_lora_weights` (or a fully fine-tuned transformer folder),
called with the trained caption (and reference images) through the family's own inference arguments. What it
decodes is caught at its VAE's `decode` (the latents after the pipeline's own un-normalization) and compared with
the VAE's encoding of each training target, in raw VAE space, so a normalization mismatch shows as an error. Tiny
random VAEs cannot reconstruct pixels, but their encoders keep the layout of an image, which is what the shapes
differ in (a bright bar on the left or on the right of a dark picture).

Distances are in units of the distance between the two targets (`sep`): `error` = mse(sample, own target) / sep,
`choice` = (mse(sample, other target) - mse(sample, own target)) / sep, +1 at the own target, -1 at the other one.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

SIZE = 64  # pixels of every training image (and of every sample the pipeline renders here)
BACKGROUND = (20, 20, 20)
TEXT_TOKENS = 64  # prompt length in training and sampling (the pipelines pad FLUX-type prompts to 512 by default)

# Two pictures whose VAE latents differ in layout (left vs right), each with a caption of its own.
SHAPES = {
    "left": ("a white bar on the left", (230, 230, 230), "bar", (4, 4, 28, 60)),
    "right": ("a red disc on the right", (230, 40, 40), "disc", (34, 14, 60, 50)),
}
EDIT_CAPTION = "mirror the picture"
FILL_CAPTION = "fill in the picture"
# a layered case's captions: the first layer's own caption decides the order (two captions of the same words in another
# order, "the bar behind the disc" / "the disc behind the bar", separate too little for a tiny text encoder: choice +0.25)
LAYER_CAPTIONS = {("left", "right"): SHAPES["left"][0], ("right", "left"): SHAPES["right"][0]}
PICK_CAPTION = "show the first picture"


@dataclass(frozen=True)
class Example:
    """One training sample of a learning case: the caption, its target picture and its reference pictures."""

    caption: str
    target: str  # "left" / "right"
    references: tuple[str, ...] = ()
    masked: bool = False  # inpainting: the target given with its right half masked (fill_mask), to be filled in
    layers: tuple[str, ...] = ()  # layer decomposition: the composite's layers in order (the references, read as the layers)

    @property
    def other(self) -> str:
        return "right" if self.target == "left" else "left"

    @property
    def frames(self) -> tuple[str, ...]:
        """The pictures the pipeline renders for this example, in order (a layer decomposition: its layers)."""
        return self.layers or (self.target,)

    @property
    def other_frames(self) -> tuple[str, ...]:
        return tuple(reversed(self.layers)) if self.layers else (self.other,)


def draw(name: str, size: int = SIZE) -> Image.Image:
    _, colour, shape, box = SHAPES[name]
    img = Image.new("RGB", (size, size), BACKGROUND)
    d = ImageDraw.Draw(img)
    box = tuple(v * size // SIZE for v in box)
    (d.rectangle if shape == "bar" else d.ellipse)(box, fill=colour)
    return img


def composite(size: int = SIZE) -> Image.Image:
    """A layered case's input: both pictures' shapes on one background."""
    img = draw("left", size)
    _, colour, _, box = SHAPES["right"]
    ImageDraw.Draw(img).ellipse(tuple(v * size // SIZE for v in box), fill=colour)
    return img


def fill_mask(size: int = SIZE) -> Image.Image:
    """The inpainting case's mask: the right half (white = repainted). The bar lies in the left half, the disc in the
    right: what is visible of a picture (a bar, or nothing) decides whether a disc is to be filled in."""
    img = Image.new("L", (size, size), 0)
    ImageDraw.Draw(img).rectangle((size // 2, 0, size - 1, size - 1), fill=255)
    return img


def case_examples(references: int, inpaint: bool = False, layered: bool = False) -> list[Example]:
    """The samples of a learning case with this many references per sample.

    0: text-to-image: each picture has its own caption (the caption decides).
    1: edit: the instruction mirrors the reference (the reference decides: left in, right out, and back).
    2: several ordered references: the instruction picks the first of (left, right) or (right, left) (the order of
       the references decides).
    inpaint: one caption, each picture with its right half masked (the visible left half decides).
    layered: one composite (both shapes), decomposed into its 2 layers (the two pictures) in the order its caption names.
    """
    if layered:
        return [Example(caption, order[0], layers=order) for order, caption in LAYER_CAPTIONS.items()]
    if inpaint:
        return [Example(FILL_CAPTION, n, masked=True) for n in SHAPES]
    if references == 0:
        return [Example(SHAPES[n][0], n) for n in SHAPES]
    if references == 1:
        return [Example(EDIT_CAPTION, "right", ("left",)), Example(EDIT_CAPTION, "left", ("right",))]
    if references == 2:
        return [Example(PICK_CAPTION, "left", ("left", "right")), Example(PICK_CAPTION, "right", ("right", "left"))]
    raise ValueError(f"no learning case with {references} references")


def write_case(folder: Path, references: int, inpaint: bool = False, layered: bool = False) -> tuple[list[Example], dict]:
    """Write a case's dataset (targets + captions in folder/targets, reference k in folder/ref<k>, inpainting masks in
    folder/masks; a layered case: the composite in folder/targets, layer k in folder/ref<k>) and return its examples
    and the data_config overrides that train on it."""
    examples = case_examples(references, inpaint, layered)
    targets = folder / "targets"
    refs = [folder / f"ref{k + 1}" for k in range(references)]
    for d in (targets, *refs):
        d.mkdir(parents=True, exist_ok=True)
    for i, ex in enumerate(examples):
        (composite() if ex.layers else draw(ex.target)).save(targets / f"sample{i}.png")
        (targets / f"sample{i}.txt").write_text(ex.caption)
        for k, name in enumerate(ex.layers or ex.references):
            draw(name).save(refs[k] / f"sample{i}.png")
    overrides = {"data_config.img_dir": str(targets)}
    if inpaint:
        (folder / "masks").mkdir(exist_ok=True)
        for i in range(len(examples)):
            fill_mask().save(folder / "masks" / f"sample{i}.png")
        overrides["data_config.mask_dir"] = str(folder / "masks")
    if refs:
        overrides["data_config.control_dir"] = str(refs[0]) if len(refs) == 1 else "[" + ",".join(map(str, refs)) + "]"
    return examples, overrides


@dataclass
class Scores:
    """One pipeline (base or trained) on every example of a case."""

    error: list[float]  # mse(sample, own target) / sep per example
    choice: list[float]  # (mse(sample, other) - mse(sample, own)) / sep per example

    @property
    def mean_error(self) -> float:
        return float(np.mean(self.error))

    @property
    def mean_choice(self) -> float:
        return float(np.mean(self.choice))


@dataclass
class Report:
    """The base pipeline and the trained one on the same examples, seeds and steps."""

    base: Scores
    trained: Scores
    examples: list[Example] = field(default_factory=list)
    # Pass marks: the trained samples are at most this fraction of the base's distance from their targets ...
    max_error_ratio: float = 0.5
    # ... and nearer their own target than the other one, by this many separations on average over the base's.
    min_choice_gain: float = 0.3

    @property
    def error_ratio(self) -> float:
        return self.trained.mean_error / max(self.base.mean_error, 1e-12)

    def failures(self) -> list[str]:
        """[] when the trained model produces its own targets; else what is wrong, one line each."""
        out = []
        if not self.error_ratio <= self.max_error_ratio:
            out.append(f"samples did not move toward their training targets: error {self.trained.mean_error:.3f} vs base "
                       f"{self.base.mean_error:.3f} (ratio {self.error_ratio:.2f}, at most {self.max_error_ratio} needed)")
        gain = self.trained.mean_choice - self.base.mean_choice
        if not gain >= self.min_choice_gain:
            out.append(f"samples do not follow their caption / references: choice {self.trained.mean_choice:+.2f} vs base "
                       f"{self.base.mean_choice:+.2f} (gain {gain:+.2f}, at least {self.min_choice_gain} needed)")
        wrong = [f"'{e.caption}' {'+'.join(e.references) or '-'} -> {e.target}"
                 for e, c in zip(self.examples, self.trained.choice) if not c > 0]
        if wrong:
            out.append(f"{len(wrong)} sample(s) nearer the other target: " + "; ".join(wrong))
        return out

    def summary(self) -> str:
        return (f"error {self.base.mean_error:.3f} -> {self.trained.mean_error:.3f} (x{self.error_ratio:.2f}), "
                f"choice {self.base.mean_choice:+.2f} -> {self.trained.mean_choice:+.2f} "
                f"(min {min(self.trained.choice):+.2f})")


@contextlib.contextmanager
def decoded_latents(vae):
    """Record every latent tensor the pipeline hands to vae.decode (after its own un-normalization)."""
    seen: list[torch.Tensor] = []
    original = vae.decode

    def spy(z, *args, **kwargs):
        seen.append(z.detach().float().cpu().clone())
        return original(z, *args, **kwargs)

    vae.decode = spy
    try:
        yield seen
    finally:
        del vae.decode  # the instance attribute goes; the class's method shows again


@torch.no_grad()
def raw_latent(vae, image: Image.Image, like: torch.Tensor, channels: int = 3) -> torch.Tensor:
    """The VAE's own encoding (the distribution's mode) of an image, shaped like the latents the pipeline decodes
    (video VAEs take a frame axis)."""
    arr = np.asarray(image.convert("RGBA" if channels == 4 else "RGB"), dtype=np.float32)
    x = torch.from_numpy(arr).permute(2, 0, 1)[None] / 127.5 - 1.0
    if like.ndim == 5:
        x = x[:, :, None]
    x = x.to(vae.device, vae.dtype)
    return vae.encode(x).latent_dist.mode().float().cpu()


def sample_latents(pipe, adapter, example: Example, steps: int, seed: int, size: int = SIZE,
                   max_sequence_length: int | None = None, reference_size: int | None = None) -> torch.Tensor:
    """What the pipeline's own __call__ decodes for an example's caption (and references), at the training size;
    `reference_size`: the references at that size, as training sized them (the family's `reference_area`)."""
    from trainer.models.base import InferenceRequest

    if size not in {w for w, _ in getattr(pipe, "resolutions", [(size, size)])}:
        # Kandinsky 5 renders a fixed list of sizes (1024x1024 and up) and snaps any other request to them; the
        # tiny model learns at SIZE, so that size joins the list (the pipeline's own attribute, nothing else changes).
        pipe.resolutions = [*pipe.resolutions, (size, size)]
    images = [draw(example.target)] if example.masked else [composite()] if example.layers else [draw(n) for n in example.references]
    request = InferenceRequest(prompt=example.caption, images=images, width=size, height=size, layers=len(example.layers) or None,
                               true_cfg_scale=1.0, auto_resize=False, max_sequence_length=max_sequence_length,
                               reference_size=reference_size, mask=fill_mask(size) if example.masked else None)
    kwargs = adapter.inference_kwargs(request)
    sizing = adapter.reference_area(pipe, reference_size) if reference_size else contextlib.nullcontext()
    with sizing, adapter.render_size(pipe, size, size), decoded_latents(pipe.vae) as seen:
        pipe(prompt=example.caption, **adapter.size_kwargs(size, size), num_inference_steps=steps,
             generator=torch.Generator("cpu").manual_seed(seed), **kwargs)
    return seen[-1]


def score(pipe, adapter, examples: list[Example], steps: int, seed: int, max_sequence_length: int | None = None,
          reference_size: int | None = None) -> Scores:
    samples = [sample_latents(pipe, adapter, ex, steps, seed, max_sequence_length=max_sequence_length, reference_size=reference_size)
               for ex in examples]
    one = samples[0][:1]  # a layered sample is one decoded frame per layer
    targets = {n: raw_latent(pipe.vae, draw(n), one, adapter.pixel_channels) for n in SHAPES}

    def stacked(names):
        return torch.cat([targets[n] for n in names])

    def mse(a, b):
        return float((a - b).pow(2).mean())

    sep = mse(stacked(examples[0].frames), stacked(examples[0].other_frames))
    error = [mse(s, stacked(ex.frames)) / sep for s, ex in zip(samples, examples)]
    choice = [(mse(s, stacked(ex.other_frames)) - mse(s, stacked(ex.frames))) / sep for s, ex in zip(samples, examples)]
    return Scores(error, choice)


_BASE_SCORES: dict[tuple, Scores] = {}  # the base pipeline's scores per (model folder, examples, sampling), in this process


def measure_learning(model: str | Path, examples: list[Example], lora: str | Path | None = None,
                     transformer: str | Path | None = None, controlnet: str | Path | None = None, steps: int = 10, seed: int = 0,
                     quantize: str = "none",
                     max_sequence_length: int | None = TEXT_TOKENS, reference_size: int | None = None) -> Report:
    """Sample every example with the base pipeline and with the trained one (a LoRA, or a fully fine-tuned
    transformer folder), loaded as a user loads them, and compare both with the training targets.
    `max_sequence_length`: the prompt length the training used, when it was not the pipeline's default."""
    from trainer.pipelines import adapter_for, load_pipeline

    adapter = adapter_for(str(model), str(lora) if lora else None, controlnet=controlnet is not None)
    key = (str(Path(model).resolve()), tuple(examples), steps, seed, quantize, max_sequence_length, reference_size, controlnet is not None)
    before = _BASE_SCORES.get(key)
    if before is None:  # the same base, examples and seeds score the same: a case and its negative control share it
        base = load_pipeline(adapter, torch.float32, "cpu", quantize=quantize)
        before = _BASE_SCORES[key] = score(base, adapter, examples, steps, seed, max_sequence_length, reference_size)
        del base
    trained = load_pipeline(adapter, torch.float32, "cpu", lora=str(lora) if lora else None, quantize=quantize,
                            transformer=str(transformer) if transformer else None, controlnet=str(controlnet) if controlnet else None)
    after = score(trained, adapter, examples, steps, seed, max_sequence_length, reference_size)
    return Report(before, after, examples)


def tiny_controlnet(model: str | Path) -> dict:
    """The controlnet_layers / controlnet_single_layers of a ControlNet of one block of each kind the model's transformer has."""
    from trainer.models import read_model_index

    single = "num_single_layers" in read_model_index(str(model), "transformer/config.json")
    return {"controlnet_layers": 1, "controlnet_single_layers": int(single)}


def train_case(model: str | Path, folder: Path, case, method: str = "lora", **extra) -> tuple[list[Example], Path]:
    """Train a family's tiny model on its learning case (a trainer.models.base.LearningCase) with the trainer's own
    loop, in this process. Returns the examples and the run's output_dir. LoRAs adapt every Linear layer (a tiny
    model fits its pictures in a few hundred steps then; the family's default attention-only targets need many more)."""
    from trainer.config import load_config
    from trainer.loop import train
    from trainer.models import resolve

    examples, data = write_case(folder / "data", case.references, case.inpaint, case.layered)
    out = folder / "out"
    overrides = {
        "pretrained_model_name_or_path": str(model), **data, "data_config.img_size": SIZE, "data_config.train_batch_size": 2,
        "data_config.control_size": case.reference_size or "null", "output_dir": str(out), "mixed_precision": "no",
        "report_to": "none", "seed": 0, "max_train_steps": case.steps, "learning_rate": case.learning_rate,
        "lr_scheduler": "cosine", "checkpointing_steps": 0, "logging_steps": 50, "training_method": method,
        "t5_max_sequence_length": TEXT_TOKENS, "max_sequence_length": TEXT_TOKENS, "overwrite_output_dir": True,
    }
    if method == "lora":
        overrides.update(rank=16, lora_target_modules="[" + ",".join(linear_layers(model)) + "]")
    if method == "controlnet":
        overrides.update(tiny_controlnet(model))
    overrides.update(dict(case.config), **extra)
    train(load_config(None, [f"{k}={v}" for k, v in overrides.items()]), resolve(str(model))[0])
    return examples, out


def run(model: str | Path, folder: Path, case, method: str | None = None, quantize: str = "none",
        wrong_sign: bool = False, **extra) -> tuple[Report, float]:
    """train_case, then measure_learning on what it saved (the LoRA, or the exported transformer for full
    fine-tuning); `wrong_sign`: the negative control; `extra`: further config overrides (e.g. lora_type=lokr).
    Returns the report and the training's seconds."""
    import time

    method = method or case.method
    start = time.time()
    with wrong_target_sign() if wrong_sign else contextlib.nullcontext():
        examples, out = train_case(model, folder, case, method, quantize=quantize, **extra)
    seconds = time.time() - start
    trained = {"full": {"transformer": out}, "controlnet": {"controlnet": out}}.get(method, {"lora": out})
    return measure_learning(model, examples, quantize=quantize, reference_size=case.reference_size, **trained), seconds


@contextlib.contextmanager
def wrong_target_sign():
    """The negative control: train toward x0 - noise instead of noise - x0 (the bug a model that predicts negated
    velocity invites). A learning check that still passes under it could not fail."""
    from trainer import flow_matching as fm

    right = fm.velocity_target
    fm.velocity_target = lambda x0, noise: x0 - noise
    try:
        yield
    finally:
        fm.velocity_target = right


def linear_layers(model: str | Path) -> list[str]:
    """The path of every Linear layer of a model folder's transformer (built on the meta device): LoRA targets that
    give a tiny model the capacity to fit its pictures quickly (the family's defaults adapt attention only)."""
    import json

    import diffusers

    config = json.loads((Path(model) / "transformer" / "config.json").read_text())
    with torch.device("meta"):
        net = getattr(diffusers, config["_class_name"]).from_config(config)
    return [name for name, module in net.named_modules() if isinstance(module, torch.nn.Linear)]
