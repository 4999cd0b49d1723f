"""Typed training configuration.

Every YAML key is a field below with a default and a one-line doc (`python train.py --help` prints them).
`load_config` merges the YAML and command-line dot-list overrides onto the schema with OmegaConf, so an unknown
or mistyped key and a value of the wrong type fail with one line naming the full key, before any model loads.
Key names follow FlyMyAI's trainer so its YAML files load unchanged.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from image_datasets.images import IMAGE_EXTENSIONS  # noqa: F401  (re-exported: inference.py checks output names with it)


class ConfigError(ValueError):
    """A user mistake in the configuration; the message is one line naming the key."""


def doc(default: Any, help: str):
    """A dataclass field with a default and its one-line documentation."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


MIXED_PRECISIONS = ("no", "fp16", "bf16")
TIMESTEP_SAMPLINGS = ("shift", "uniform", "logit_normal", "schedule")
LOSS_WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")
LR_SCHEDULERS = (
    "constant",
    "constant_with_warmup",
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
)
TRACKERS = ("none", "tensorboard", "wandb", "all")
OPTIMIZERS = ("adamw", "adamw8bit", "adafactor", "prodigy")
TRAINING_METHODS = ("lora", "full", "controlnet")
LORA_TYPES = ("lora", "lokr", "loha")
CONTROL_TYPES = ("concat", "fill", "in-context")
WIDENING_CONTROLS = ("concat", "fill")  # control types that widen the transformer's input layer (FLUX Control / Fill)
FULL_WEIGHTS = ("fp32", "bf16")
QUANTIZE_CHOICES = ("none", "qfloat8", "qint8", "qint4", "nf4", "int8", "int8_w8a8", "fp8_w8a8")


def normalize_mode(value: str) -> str:
    """FlyMyAI wrote `quantize: true`; a bool-typed YAML value reaches a str key as 'True' / 'False'."""
    return {"True": "qfloat8", "true": "qfloat8", "False": "none", "false": "none"}.get(value, value)


@dataclass
class DatasetEntry:
    """One of data_config.datasets: its data and the settings that differ from data_config's (null = data_config's)."""

    img_dir: Optional[str] = doc(None, "folder of images + captions (as data_config.img_dir)")
    control_dir: Optional[Any] = doc(None, "edit / Kontext: its control folder(s) (as data_config.control_dir)")
    metadata_file: Optional[str] = doc(None, "its metadata.csv / .jsonl (as data_config.metadata_file)")
    webdataset: Optional[Any] = doc(None, "its WebDataset shards (as data_config.webdataset)")
    hf_dataset: Optional[str] = doc(None, "its Hugging Face dataset (as data_config.hf_dataset)")
    hf_split: Optional[str] = doc(None, "as data_config.hf_split")
    image_column: Optional[str] = doc(None, "as data_config.image_column")
    caption_column: Optional[str] = doc(None, "as data_config.caption_column")
    caption_type: Optional[str] = doc(None, "as data_config.caption_type")
    recursive: Optional[bool] = doc(None, "as data_config.recursive")
    mask_dir: Optional[str] = doc(None, "as data_config.mask_dir")
    alpha_mask: Optional[bool] = doc(None, "as data_config.alpha_mask")
    trigger_word: Optional[str] = doc(None, "as data_config.trigger_word")
    caption_template: Optional[str] = doc(None, "as data_config.caption_template")
    shuffle_tags: Optional[bool] = doc(None, "as data_config.shuffle_tags")
    keep_tags: Optional[int] = doc(None, "as data_config.keep_tags")
    caption_dropout_rate: Optional[float] = doc(None, "as data_config.caption_dropout_rate")
    img_size: Optional[int] = doc(None, "as data_config.img_size")
    resolutions: Optional[list[int]] = doc(None, "as data_config.resolutions")
    bucketing: Optional[bool] = doc(None, "as data_config.bucketing")
    repeats: Optional[int] = doc(None, "as data_config.repeats: its entries appear this many times per epoch")
    weight: Optional[float] = doc(None, "its share of every epoch's samples, relative to the other entries' weights (null on every entry = each dataset's own size, times repeats)")
    loss_weight: Optional[float] = doc(None, "its samples' multiplier in the loss (e.g. 0.5 for prior-preservation / regularization images; default 1)")
    control_mode: Optional[int] = doc(None, "as data_config.control_mode: its control images' mode in a Union ControlNet")


SOURCE_KEYS = ("img_dir", "control_dir", "metadata_file", "webdataset", "hf_dataset", "mask_dir")  # what each dataset names itself


@dataclass
class DataConfig:
    img_dir: str = doc("", "folder of training images, each with a same-stem caption file (e.g. cat.png + cat.txt)")
    img_size: int = doc(1024, "training resolution: images are resized to about img_size x img_size pixels, aspect kept, sides multiples of 16")
    train_batch_size: int = doc(1, "images per step per GPU; images of the same cropped size are batched together")
    num_workers: int = doc(0, "dataloader worker processes (0 = load in the main process)")
    caption_dropout_rate: float = doc(0.0, "probability of training a sample with an empty caption (helps classifier-free guidance)")
    random_ratio: bool = doc(False, "random crop position instead of a center crop (FlyMyAI's multi-crop option)")
    caption_type: str = doc("txt", "caption file extension next to each image (txt, caption, ...)")
    skip_bad_files: bool = doc(False, "skip and list unreadable images / missing captions instead of refusing to start")
    bucketing: bool = doc(False, "snap every image to the nearest of a fixed set of aspect-ratio buckets (about img_size**2 pixels, 1:4 to 4:1) so mixed sizes batch together")
    resolutions: Optional[list[int]] = doc(None, "multi-resolution training, e.g. [512, 768, 1024]: every image is used once per resolution (overrides img_size for sizing)")
    repeats: int = doc(1, "how many times each image appears per epoch")
    recursive: bool = doc(False, "also use images in subfolders of img_dir (captions beside them; control images under the same relative path in control_dir)")
    control_dir: Optional[Any] = doc(None, "edit / Kontext: folder of control (reference) images with the same stems as img_dir's images, or a list of folders: reference 1, 2, 3, ... in order (a sample may lack the later ones where the model allows fewer)")
    metadata_file: Optional[str] = doc(None, "metadata.csv or .jsonl with columns image, prompt[, control_image, control_image_2, ... or DiffSynth-Studio's edit_image / kontext_images: a path or a list] (replaces img_dir); paths relative to the file")
    webdataset: Optional[Any] = doc(None, "WebDataset tar shards (replaces img_dir): a path, a glob (shards/*.tar) or a list; per sample key.jpg/png/... + key.txt (or key.json with prompt / caption / text) [+ key.control_image.png, key.control_image_2.png, ...]; plain tar, read in place")
    hf_dataset: Optional[str] = doc(None, "a Hugging Face datasets dataset (replaces img_dir): a save_to_disk folder, parquet / arrow file(s) or a folder of them, an imagefolder, or a hub id (network or local HF cache); columns image_column, caption_column [, control_image, control_image_2, ...]")
    hf_split: str = doc("train", "hf_dataset: the split to train on")
    image_column: str = doc("image", "hf_dataset: the column holding the target images")
    caption_column: Optional[str] = doc(None, "hf_dataset / metadata_file: the caption column; null = the first of prompt, text, caption (metadata_file: prompt)")
    mask_dir: Optional[str] = doc(None, "masked loss: folder of masks with the images' stems (same relative paths); white = trained, black = ignored, grey between; any size of the image's aspect ratio. With control_type: fill they are the inpainting masks instead (white = repainted)")
    alpha_mask: bool = doc(False, "masked loss: use each image's alpha channel as its mask (transparent = ignored); control_type: fill: as the inpainting mask")
    mask_floor: float = doc(0.0, "masked loss: the least loss weight a pixel keeps (0 = masked-out pixels do not train at all)")
    trigger_word: str = doc("", "a word every caption trains with: put in front of captions that lack it ('<trigger>, <caption>'), and written for [trigger] in captions")
    caption_template: Optional[str] = doc(None, "the trained caption made from each caption, e.g. 'a photo of {trigger}, {caption}' ({caption}, {trigger}); null = the trigger_word rule above")
    shuffle_tags: bool = doc(False, "shuffle comma-separated caption tags every epoch (tag-style captions); captions then change each epoch, so they are encoded every step")
    keep_tags: int = doc(0, "shuffle_tags: this many leading tags stay in place (e.g. 1 keeps the trigger word first)")
    datasets: list[DatasetEntry] = doc([], "several datasets in one run: a list of entries, each with its own data (img_dir / metadata_file / webdataset / hf_dataset, control_dir, mask_dir) and, where they differ, its own captions, sizes, repeats, weight and loss_weight; the keys above are the entries' defaults (see README 'Several datasets')")
    control_mode: Optional[int] = doc(None, "Union ControlNet (controlnet_modes, or a continued ControlNet with num_mode): the mode index of the control images, one mode per dataset (data_config.datasets entries each set their own; InstantX's FLUX.1 Union: 0 canny, 1 tile, 2 depth, 3 blur, 4 pose, 5 gray, 6 low quality)")
    control_size: Optional[int] = doc(None, "edit / Kontext: size control images to about control_size x control_size pixels; null = as the family's pipeline does at inference (Qwen-Image-Edit: 1024x1024 area; Kontext: its preferred resolutions); smaller is faster but differs from inference")

    def parts(self) -> list["DataConfig"]:
        """The datasets of the run, each a whole DataConfig: this one, or one per data_config.datasets entry (its
        unset keys taken from this one)."""
        if not self.datasets:
            return [self]
        out = []
        for entry in self.datasets:
            given = {k: v for k, v in dataclasses.asdict(entry).items() if v is not None and k not in ("weight", "loss_weight")}
            out.append(dataclasses.replace(self, datasets=[], **given))
        return out

    def loss_weights(self) -> list[float]:
        """Each part's loss multiplier."""
        return [1.0 if not self.datasets or e.loss_weight is None else e.loss_weight for e in self.datasets or [None]]

    def sampling_weights(self) -> list[float] | None:
        """Each part's share of an epoch as given (None: every part its own size)."""
        return [e.weight for e in self.datasets] if self.datasets and self.datasets[0].weight is not None else None


@dataclass
class TrainConfig:
    pretrained_model_name_or_path: str = doc("Qwen/Qwen-Image", "diffusers model folder or Hugging Face hub id of the base model")
    data_config: DataConfig = field(default_factory=DataConfig, metadata={"help": "dataset options (see data_config.*)"})
    output_dir: str = doc("./output", "where checkpoints, the final LoRA and logs are written; a folder belongs to one run (a fresh run refuses a folder holding an earlier run's results or other files)")
    overwrite_output_dir: bool = doc(False, "start a fresh run in an output_dir that holds an earlier run's results (they are deleted; the embedding cache and files the trainer did not write are kept)")
    seed: int = doc(42, "random seed for data order, caption dropout, noise and timesteps")

    max_train_steps: int = doc(1000, "number of optimizer steps to train")
    num_train_epochs: Optional[int] = doc(None, "also stop after this many passes over the dataset (whichever of the two comes first); null = max_train_steps alone")
    learning_rate: float = doc(1e-4, "peak learning rate")
    lr_scheduler: str = doc("constant", f"learning-rate schedule: {', '.join(LR_SCHEDULERS)}")
    lr_warmup_steps: int = doc(0, "linear warm-up steps at the start of the schedule")
    adam_beta1: float = doc(0.9, "AdamW beta1")
    adam_beta2: float = doc(0.999, "AdamW beta2")
    adam_weight_decay: float = doc(0.01, "AdamW weight decay")
    adam_epsilon: float = doc(1e-8, "AdamW epsilon")
    max_grad_norm: float = doc(1.0, "clip the gradient norm to this value (0 disables clipping)")
    gradient_accumulation_steps: int = doc(1, "micro-batches accumulated per optimizer step")
    train_batch_size: Optional[int] = doc(None, "FlyMyAI alias of data_config.train_batch_size (must agree if both are set)")

    mixed_precision: str = doc("bf16", f"dtype the frozen models are loaded and run in: {', '.join(MIXED_PRECISIONS)} (no = fp32)")
    gradient_checkpointing: bool = doc(False, "recompute transformer activations in the backward pass (less memory, ~30% slower)")
    blocks_to_swap: int = doc(0, "keep the frozen weights of the last N transformer blocks in CPU RAM and copy each block to the GPU only while it runs (saves ~N blocks of VRAM, costs two host-to-GPU copies of them per step); 0 = off")
    allow_tf32: bool = doc(True, "allow TF32 matmuls on Ampere+ GPUs")
    torch_compile: bool = doc(False, "compile the transformer's repeated blocks with torch.compile (regional: one compile serves every block)")
    attention_backend: str = doc("auto", "auto = PyTorch SDPA without its cuDNN kernel (its backward fails on FLUX shapes, pytorch#190321); sdpa = every SDPA kernel; or a diffusers backend name (flash, _flash_3, sage, ...) when that package is installed")

    optimizer: str = doc("adamw", "adamw, adamw8bit (bitsandbytes, ~4x less optimizer memory), adafactor, prodigy (learning_rate ~1.0)")
    adam8bit: bool = doc(False, "FlyMyAI alias: true selects optimizer=adamw8bit")
    quantize: str = doc("none", "quantize the frozen transformer: none, qfloat8, qint8, qint4 (optimum-quanto), nf4, int8 (bitsandbytes), int8_w8a8 / fp8_w8a8 (8-bit matmuls); true = qfloat8")
    quantize_text_encoder: str = doc("none", "quantize the text encoder the same way (useful when embeddings are not precomputed)")
    precompute_text_embeddings: Optional[bool] = doc(None, "encode every caption once before training, then free the text encoder; null (default) = yes unless data_config.shuffle_tags (exact: a dropped caption uses the cached empty prompt); false = encode every step")
    precompute_image_embeddings: Optional[bool] = doc(None, "encode every image once to VAE latents before training, then free the VAE; null (default) = yes unless data_config.random_ratio (random crops differ each epoch) or FLUX Fill (the masked image changes with each epoch's mask); false = encode every step")
    save_cache_on_disk: Optional[bool] = doc(None, "keep the precomputed embeddings as files in cache_dir, read per batch (RAM does not grow with the dataset) and reused by later runs and resumes (keyed by file content, caption, model, size); null (default) = yes whenever embeddings are precomputed; false = in RAM")
    cache_dir: Optional[str] = doc(None, "where the embedding cache and the dataset scan index live; default <output_dir>/cache")
    cache_batch_size: int = doc(4, "images per VAE call while building the embedding cache (samples of equal sizes are batched)")

    control_type: Optional[str] = doc(None, f"train a control / inpainting model: {', '.join(CONTROL_TYPES)}; concat = FLUX Control (FluxControlPipeline: the control image's latents beside the noisy latents on the channel axis; control images in data_config.control_dir, same stems and aspect as the images); fill = FLUX Fill inpainting (FluxFillPipeline: the masked image's latents and the mask beside them; masks from data_config.mask_dir / alpha_mask / a mask column, else random rectangles). From FLUX.1-dev the input layer is widened and trained, as BFL's Canny / Depth LoRAs. in-context = Qwen-Image in-context control (DiffSynth's In-Context-Control-Union: the control image's tokens after the image's, a LoRA on Qwen-Image; control images in data_config.control_dir). null = as the model folder's pipeline (FLUX.1-Canny-dev: concat, FLUX.1-Fill-dev: fill)")
    training_method: str = doc("lora", f"what is trained: {', '.join(TRAINING_METHODS)}; lora = adapters on the frozen transformer (a LoRA file), full = the transformer's own weights (a diffusers transformer folder), controlnet = a ControlNet beside the frozen transformer (a diffusers ControlNet folder; FLUX.1, Qwen-Image, Z-Image; control images in data_config.control_dir)")
    controlnet_model_name_or_path: Optional[str] = doc(None, "controlnet: continue training this ControlNet (a diffusers folder or hub id of the family's ControlNet class); null = a new one started from the transformer's first blocks (their weights copied, the control input and outputs zero)")
    controlnet_layers: int = doc(4, "controlnet (new): double-stream blocks of the ControlNet (each a copy of the transformer's block; FLUX.1 has 19, Qwen-Image 60); Z-Image: control blocks placed evenly over its layers (at most 30)")
    controlnet_single_layers: int = doc(0, "controlnet (new): single-stream blocks of the ControlNet (FLUX.1 has 38; InstantX's Union uses 10)")
    controlnet_lora: bool = doc(False, "controlnet: train a plain LoRA (rank, lora_alpha, lora_target_modules, use_rslora, rank_pattern) on the ControlNet instead of all of its weights, which stay frozen in the weight dtype (e.g. continuing a released ControlNet on your data with little memory); controlnet/ is saved with the LoRA merged in, controlnet_lora.safetensors beside it. Default targets: the family's attention layers and the ControlNet's output / control-input projections")
    controlnet_modes: int = doc(0, "controlnet (new): a Union ControlNet with this many control modes (FLUX.1's FluxControlNetModel num_mode: a mode embedding read as one more text token); each dataset names its data_config.control_mode; 0 = a plain ControlNet")
    controlnet_conditioning_scale: float = doc(1.0, "controlnet: the ControlNet's strength in validation previews (training runs at 1.0, as the released ControlNets)")
    trainable_modules: Optional[list[str]] = doc(None, "full: train only the parameters whose names contain one of these (e.g. [transformer_blocks.0., proj_out]); null = every transformer weight")
    full_weights: str = doc("fp32", "full / controlnet: dtype the trained weights (the ControlNet's) are kept in: fp32 (master weights; the forward runs in mixed_precision) or bf16 (half the memory; optimizer=adamw rounds each update stochastically so small updates are not lost)")
    ema_decay: float = doc(0.0, "full: keep an exponential moving average of the trained weights (e.g. 0.9999), saved as transformer_ema/ and used for validation previews; 0 = off")
    freeze_text_encoder: bool = doc(True, "FlyMyAI key; the text encoders are always frozen (false is refused)")
    use_8bit_adam: bool = doc(False, "FlyMyAI alias (full training): true selects optimizer=adamw8bit")

    rank: int = doc(16, "LoRA rank")
    lora_alpha: Optional[float] = doc(None, "LoRA alpha (scale = alpha / rank); defaults to rank")
    lora_dropout: float = doc(0.0, "dropout on the LoRA branch")
    lora_target_modules: Optional[list[str]] = doc(None, "module names to adapt (a name matches a module path ending in it; `*` stands for one path component; `re:<regex>` is a full-path regex, e.g. 're:transformer_blocks\\.(1[0-9])\\.attn\\.to_q' for blocks 10-19 only); default: the family's attention projections")
    lora_type: str = doc("lora", f"adapter type: {', '.join(LORA_TYPES)}; lokr (Kronecker product) and loha (Hadamard product) are LyCORIS's, written with LyCORIS / ComfyUI key names")
    use_dora: bool = doc(False, "lora: DoRA (weight-decomposed LoRA: a trained magnitude per output channel beside the LoRA)")
    use_rslora: bool = doc(False, "lora: rank-stabilized scaling alpha / sqrt(rank) instead of alpha / rank")
    loraplus_lr_ratio: Optional[float] = doc(None, "lora: LoRA+: the output side (lora_B) learns this many times faster than learning_rate (e.g. 16); null = off")
    rank_pattern: dict[str, int] = doc({}, "per-module ranks: {regex: rank}, the regex matched against the end of the module path (e.g. {'transformer_blocks\\.0\\..*': 4}); other modules use rank")
    alpha_pattern: dict[str, float] = doc({}, "per-module alphas, like rank_pattern; other modules use lora_alpha")
    dop_class_word: Optional[str] = doc(None, "differential output preservation (ai-toolkit's DOP): each step also predicts the batch's captions with the trigger word replaced by this class word (e.g. person), with the LoRA on and (no gradient) off, and pulls the first toward the second: the LoRA learns the trigger, not the class. Needs data_config.trigger_word; ~2x the step cost; prompts are then encoded every step")
    dop_weight: float = doc(1.0, "DOP: the preservation term's multiplier in the loss")
    lokr_factor: int = doc(-1, "lokr: the Kronecker factor size of each layer's first matrix (-1 = as square as the layer allows; e.g. 16 makes the first factor 16x16)")
    init_lora: Optional[str] = doc(None, "start the trained LoRA from this LoRA (file or folder; any format the family's loader reads: ours, ComfyUI, kohya, DiffSynth-Studio's), e.g. to continue a released LoRA on your data; plain LoRA only. Its layers must be among lora_target_modules' and its ranks equal rank (targets it lacks start fresh); its strength is kept whatever lora_alpha is")
    assistant_lora: Optional[str] = doc(None, "a LoRA (file or folder) active while training but off for validation previews and left out of the saved LoRA, e.g. a de-distillation adapter that keeps a step-distilled model (Z-Image-Turbo) from losing its distillation")

    timestep_sampling: str = doc("shift", f"how sigma is drawn: {', '.join(TIMESTEP_SAMPLINGS)}; shift = logit-normal through the scheduler's resolution-dependent shift used at inference; schedule = uniform along the sigmas the pipeline steps through at this resolution")
    logit_mean: float = doc(0.0, "mean of the normal behind logit_normal (and shift) sampling")
    logit_std: float = doc(1.0, "std of the normal behind logit_normal (and shift) sampling")
    loss_weighting: str = doc("none", f"per-sample loss weighting: {', '.join(LOSS_WEIGHTINGS)}")
    max_sequence_length: int = doc(512, "maximum prompt tokens given to the text encoder (longer captions are truncated with a warning)")
    t5_max_sequence_length: int = doc(512, "FLUX: T5 prompt tokens (prompts are padded to this length, as in the pipeline)")
    guidance_scale: Optional[float] = doc(None, "FLUX.1 dev / Kontext, FLUX.2 dev: the distilled guidance value fed to the transformer during training; default: its pipeline's default (3.5 FLUX.1, 4.0 FLUX.2), what inference uses (ignored by models without a guidance embedding)")

    lora_format: str = doc("diffusers", "diffusers, or comfyui to also write pytorch_lora_weights_comfyui.safetensors (ComfyUI key names + alpha) next to every LoRA file")
    validation_prompts: list[Any] = doc([], "prompts rendered with the current LoRA into output_dir/samples/step-N.png (and TensorBoard); edit models: entries {prompt: ..., images: [ref1, ref2, ...]}")
    validation_images: list[str] = doc([], "edit / Kontext: input image per validation prompt (one image is shared by all prompts); entries with their own images override it")
    validation_samples: int = doc(0, "when validation_prompts is empty: render the captions (with their reference images) of this many training samples instead, beside their training targets' captions (the shipped YAMLs use 2); 0 = no samples")
    validation_at_start: bool = doc(True, "also render the validation prompts before the first step (samples/step-0.png: the base model, for comparison)")
    validation_steps: int = doc(0, "render the validation prompts every N steps (0 = only at the end)")
    validation_num_inference_steps: int = doc(20, "denoising steps for validation samples")
    validation_guidance_scale: float = doc(4.0, "classifier-free guidance scale of validation samples, 1 = none, for the families that run real CFG (Qwen, Z-Image, Chroma, Kandinsky 5, FLUX.2 Klein); FLUX.1 / FLUX.2 dev use guidance_scale")
    validation_seed: int = doc(0, "seed of the validation samples (fixed, so samples are comparable across steps)")
    checkpointing_steps: int = doc(500, "save a checkpoint every N optimizer steps (0 disables intermediate checkpoints)")
    checkpoints_total_limit: Optional[int] = doc(None, "keep at most this many checkpoints (oldest deleted first)")
    resume_from_checkpoint: Optional[str] = doc(None, "'latest', a checkpoint folder, or null to start fresh")
    resume_allow_config_change: bool = doc(False, "resume even though the model, LoRA shape, resolution, batch size, seed or dataset changed (warns instead of stopping)")

    max_nonfinite_steps: int = doc(10, "stop with an error after this many optimizer steps in a row with a non-finite loss or gradient (each is skipped)")
    logging_steps: int = doc(10, "read the loss back from the device and log it every N steps (per-step values are kept)")
    report_to: Optional[str] = doc("tensorboard", f"experiment tracker: {', '.join(TRACKERS)} (null = none)")
    logging_dir: str = doc("logs", "tracker folder, relative to output_dir")
    tracker_project_name: str = doc("lora", "project / run group name given to the tracker")
    wandb_project_name: Optional[str] = doc(None, "wandb project (defaults to tracker_project_name)")
    wandb_run_name: Optional[str] = doc(None, "wandb run name")
    wandb_entity: Optional[str] = doc(None, "wandb user or team")
    wandb_tags: list[str] = doc([], "wandb tags")


def walk_fields(schema: type | None = None, prefix: str = ""):
    """(dotted key, dataclass field) of every config key, nested sections and dataset entries (data_config.datasets[].x)
    included."""
    for f in dataclasses.fields(schema or TrainConfig):
        if f.name == "data_config":
            yield from walk_fields(DataConfig, f"{prefix}{f.name}.")
            continue
        yield f"{prefix}{f.name}", f
        if f.name == "datasets":
            yield from walk_fields(DatasetEntry, f"{prefix}{f.name}[].")


def all_keys(schema: type | None = None, prefix: str = "") -> list[str]:
    """Every config key, dotted (data_config.img_dir)."""
    return [key for key, _ in walk_fields(schema, prefix)]


def _nearest_key(key: str) -> str:
    """ "; did you mean 'x'?" for a mistyped key (also one put at the wrong level), or "" when nothing is close."""
    import difflib

    keys = all_keys()
    leaf = key.rsplit(".", 1)[-1]
    found = ([k for k in keys if k.rsplit(".", 1)[-1] == leaf]  # the right key at the wrong level (img_dir, data_config.rank)
             or difflib.get_close_matches(key, keys, n=1, cutoff=0.75)  # a typo
             or [k for k in keys if difflib.get_close_matches(leaf, [k.rsplit(".", 1)[-1]], n=1, cutoff=0.8)][:1]
             or [k for k in keys if leaf.endswith("_" + k.rsplit(".", 1)[-1])][:1])  # lora_rank -> rank
    return f"; did you mean '{found[0]}'?" if found else ""


def _one_line(exc: OmegaConfBaseException) -> str:
    key = getattr(exc, "full_key", None)
    if getattr(exc, "object_type", None) is DatasetEntry and key and not str(key).startswith("data_config"):
        key = f"data_config.datasets[].{key}"  # OmegaConf names a list element's key without its place
    msg = str(exc).splitlines()[0]
    if type(exc).__name__ == "ConfigKeyError" or "not in" in msg:
        return f"unknown config key '{key}'{_nearest_key(str(key))} (see `python train.py --help` for the valid keys)"
    return f"bad value for config key '{key}': {msg}"


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"config key '{name}' is '{value}', expected one of: {', '.join(choices)}")


def validate(cfg: TrainConfig, check_paths: bool = True) -> TrainConfig:
    """Cross-field checks; raises ConfigError with one line naming the key."""
    d = cfg.data_config
    if cfg.train_batch_size is not None:
        if cfg.train_batch_size != d.train_batch_size and d.train_batch_size != 1:
            raise ConfigError(
                f"train_batch_size={cfg.train_batch_size} disagrees with data_config.train_batch_size={d.train_batch_size}; set one of them"
            )
        d.train_batch_size = cfg.train_batch_size
    if cfg.mixed_precision in ("False", "false"):  # YAML 1.1 reads an unquoted `no` as a boolean
        cfg.mixed_precision = "no"
    _check_choice("mixed_precision", cfg.mixed_precision, MIXED_PRECISIONS)
    _check_choice("timestep_sampling", cfg.timestep_sampling, TIMESTEP_SAMPLINGS)
    _check_choice("loss_weighting", cfg.loss_weighting, LOSS_WEIGHTINGS)
    _check_choice("lr_scheduler", cfg.lr_scheduler, LR_SCHEDULERS)
    if cfg.report_to is None or cfg.report_to.lower() in ("null", "none", "false"):
        cfg.report_to = "none"
    _check_choice("report_to", cfg.report_to, TRACKERS)
    _check_choice("lora_format", cfg.lora_format, ("diffusers", "comfyui"))
    cfg.quantize = normalize_mode(cfg.quantize)
    cfg.quantize_text_encoder = normalize_mode(cfg.quantize_text_encoder)
    _check_choice("quantize", cfg.quantize, QUANTIZE_CHOICES)
    _check_choice("quantize_text_encoder", cfg.quantize_text_encoder, QUANTIZE_CHOICES)
    for alias in ("adam8bit", "use_8bit_adam"):
        if getattr(cfg, alias):
            if cfg.optimizer not in ("adamw", "adamw8bit"):
                raise ConfigError(f"config keys '{alias}: true' and 'optimizer: {cfg.optimizer}' disagree; use one of them")
            cfg.optimizer = "adamw8bit"
    _check_choice("optimizer", cfg.optimizer, OPTIMIZERS)
    _check_choice("training_method", cfg.training_method, TRAINING_METHODS)
    if cfg.control_type is not None:
        _check_choice("control_type", cfg.control_type, CONTROL_TYPES)
    _check_choice("full_weights", cfg.full_weights, FULL_WEIGHTS)
    if not cfg.freeze_text_encoder:
        raise ConfigError("config key 'freeze_text_encoder' is false, but this trainer never trains the text encoder; remove the key or set it to true")
    controlnet_keys = {"controlnet_model_name_or_path": None, "controlnet_layers": 4, "controlnet_single_layers": 0,
                       "controlnet_conditioning_scale": 1.0, "controlnet_modes": 0, "controlnet_lora": False}
    if cfg.control_type is not None and cfg.training_method == "full":
        raise ConfigError(f"config key 'control_type: {cfg.control_type}' trains a LoRA"
                          + (" (with the widened input layer)" if cfg.control_type in WIDENING_CONTROLS else "")
                          + "; full fine-tuning of a control model is not supported yet: use training_method: lora")
    if cfg.training_method == "controlnet":
        if cfg.control_type is not None:
            raise ConfigError(f"config keys 'control_type: {cfg.control_type}' and 'training_method: controlnet' are two ways of "
                              "training control; use one")
        lora_keys = ("use_rslora", "rank_pattern", "alpha_pattern") if cfg.controlnet_lora else ()
        for key, default in (*ADAPTER_KEYS.items(), ("assistant_lora", None), ("init_lora", None), ("trainable_modules", None), ("ema_decay", 0.0)):
            if key not in lora_keys and getattr(cfg, key) != default:
                raise ConfigError(f"config key '{key}' does not apply to training_method: controlnet (the ControlNet is trained whole, "
                                  "or with controlnet_lora a plain LoRA on it); remove it")
        if cfg.controlnet_lora:
            check_adapter_keys(cfg)
            if cfg.full_weights != "fp32":
                raise ConfigError("config key 'full_weights' sets the precision of a wholly trained ControlNet; with controlnet_lora "
                                  "the ControlNet is frozen (weight dtype) and the LoRA trains in fp32: remove it")
        if cfg.controlnet_modes < 0:
            raise ConfigError(f"config key 'controlnet_modes' must be >= 0, got {cfg.controlnet_modes}")
        if cfg.controlnet_layers < 0 or cfg.controlnet_single_layers < 0 or cfg.controlnet_layers + cfg.controlnet_single_layers < 1:
            raise ConfigError(f"config keys 'controlnet_layers' / 'controlnet_single_layers' ({cfg.controlnet_layers} / "
                              f"{cfg.controlnet_single_layers}) must be >= 0 with at least one block")
        name = cfg.controlnet_model_name_or_path
        if check_paths and name is not None and (Path(name).exists() or name.startswith((".", "/", "~"))) and not (Path(name).expanduser() / "config.json").is_file():
            raise ConfigError(f"config key 'controlnet_model_name_or_path': '{name}' is not a ControlNet folder (no config.json in it)")
    else:
        for key, default in controlnet_keys.items():
            if getattr(cfg, key) != default:
                raise ConfigError(f"config key '{key}' applies to training_method: controlnet only")
        for i, part in enumerate(cfg.data_config.parts()):
            if part.control_mode is not None:
                key = f"data_config.datasets[{i}]" if cfg.data_config.datasets else "data_config"
                raise ConfigError(f"config key '{key}.control_mode' applies to a Union ControlNet (training_method: controlnet) only")
    if cfg.training_method == "full":
        if cfg.quantize != "none":
            raise ConfigError(f"config key 'quantize' is {cfg.quantize}, but full training updates the transformer's own weights, which "
                              "cannot be quantized; use quantize: none (and full_weights: bf16 / adamw8bit to save memory)")
        if cfg.blocks_to_swap:
            raise ConfigError("config key 'blocks_to_swap' keeps frozen block weights in host RAM; with training_method: full every block is "
                              "trained, so set blocks_to_swap: 0")
        for key in ("assistant_lora", "init_lora"):
            if getattr(cfg, key) is not None:
                raise ConfigError(f"config key '{key}' is a LoRA-training option; remove it for training_method: full")
        for key, default in ADAPTER_KEYS.items():
            if getattr(cfg, key) != default:
                raise ConfigError(f"config key '{key}' is a LoRA-training option; remove it for training_method: full")
    if cfg.training_method in ("full", "controlnet"):
        if cfg.full_weights == "bf16" and cfg.mixed_precision != "bf16":
            raise ConfigError(f"config key 'full_weights: bf16' needs mixed_precision: bf16 (got {cfg.mixed_precision})")
        if cfg.full_weights == "bf16" and cfg.optimizer != "adamw":
            raise ConfigError(f"config key 'full_weights: bf16' rounds updates stochastically inside optimizer=adamw only; got optimizer={cfg.optimizer} "
                              "(use full_weights: fp32, or optimizer: adamw)")
    elif cfg.training_method == "lora":
        check_adapter_keys(cfg)
        for key, default in (("trainable_modules", None), ("ema_decay", 0.0)):
            if getattr(cfg, key) != default:
                raise ConfigError(f"config key '{key}' applies to training_method: full only")
    if not 0.0 <= cfg.ema_decay < 1.0:
        raise ConfigError(f"config key 'ema_decay' must be in [0, 1), got {cfg.ema_decay}")
    if cfg.trainable_modules is not None and not cfg.trainable_modules:
        raise ConfigError("config key 'trainable_modules' is an empty list; remove it to train every transformer weight")
    if cfg.num_train_epochs is not None and cfg.num_train_epochs < 1:
        raise ConfigError(f"config key 'num_train_epochs' must be >= 1 or null, got {cfg.num_train_epochs}")
    check_data(cfg, check_paths)
    if d.control_size is not None and (d.control_size <= 0 or d.control_size % 16):
        raise ConfigError(f"config key 'data_config.control_size' must be a positive multiple of 16 or null, got {d.control_size}")
    if not 0.0 <= d.mask_floor < 1.0:
        raise ConfigError(f"config key 'data_config.mask_floor' must be in [0, 1), got {d.mask_floor}")
    shuffled = any(part.shuffle_tags for part in d.parts())
    if shuffled and cfg.precompute_text_embeddings:
        raise ConfigError("config key 'precompute_text_embeddings: true' caches one embedding per caption, but data_config.shuffle_tags "
                          "makes a new caption every epoch; remove precompute_text_embeddings (shuffled captions are encoded every step)")
    if cfg.dop_class_word is not None:
        if not cfg.dop_class_word.strip():
            raise ConfigError("config key 'dop_class_word' is empty; name the class the trigger word belongs to (e.g. person), or remove it")
        if not any(part.trigger_word for part in d.parts()):
            raise ConfigError("config key 'dop_class_word' replaces the trigger word in each caption; set data_config.trigger_word")
        if cfg.precompute_text_embeddings:
            raise ConfigError("config key 'precompute_text_embeddings: true' caches the training captions only; dop_class_word also "
                              "encodes each caption with the class word every step: remove precompute_text_embeddings")
        if cfg.dop_weight <= 0:
            raise ConfigError(f"config key 'dop_weight' must be > 0, got {cfg.dop_weight}")
    if cfg.precompute_text_embeddings is None:
        cfg.precompute_text_embeddings = not shuffled and cfg.dop_class_word is None
    if cfg.precompute_image_embeddings is None:
        cfg.precompute_image_embeddings = not d.random_ratio and cfg.control_type != "fill"
    if cfg.precompute_image_embeddings and cfg.control_type == "fill":
        raise ConfigError("config key 'precompute_image_embeddings' cannot be used with control_type: fill (the masked image is "
                          "encoded each step: random masks change every epoch); remove it")
    if cfg.save_cache_on_disk is None:
        cfg.save_cache_on_disk = cfg.precompute_text_embeddings or cfg.precompute_image_embeddings
    if cfg.precompute_image_embeddings and d.random_ratio:
        raise ConfigError("config key 'precompute_image_embeddings' cannot be used with data_config.random_ratio (random crops change every epoch)")
    if cfg.blocks_to_swap and cfg.torch_compile:
        raise ConfigError("config key 'blocks_to_swap' cannot be combined with torch_compile (swapping changes the blocks' weights every call)")
    if cfg.blocks_to_swap and cfg.quantize == "int8":
        raise ConfigError("config key 'blocks_to_swap' does not work with quantize=int8 (bitsandbytes LLM.int8 keeps per-module state); use nf4, qint8 or qfloat8")
    if cfg.save_cache_on_disk and not (cfg.precompute_text_embeddings or cfg.precompute_image_embeddings):
        raise ConfigError("config key 'save_cache_on_disk' needs precompute_text_embeddings and/or precompute_image_embeddings")
    positive = {
        "learning_rate": cfg.learning_rate,
        "max_train_steps": cfg.max_train_steps,
        "rank": cfg.rank,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "data_config.train_batch_size": d.train_batch_size,
        "data_config.img_size": d.img_size,
        "max_sequence_length": cfg.max_sequence_length,
        "t5_max_sequence_length": cfg.t5_max_sequence_length,
        "logging_steps": cfg.logging_steps,
        "max_nonfinite_steps": cfg.max_nonfinite_steps,
    }
    for name, value in positive.items():
        if not value > 0:
            raise ConfigError(f"config key '{name}' must be > 0, got {value}")
    non_negative = {
        "lr_warmup_steps": cfg.lr_warmup_steps,
        "max_grad_norm": cfg.max_grad_norm,
        "checkpointing_steps": cfg.checkpointing_steps,
        "data_config.num_workers": d.num_workers,
        "adam_weight_decay": cfg.adam_weight_decay,
        "lora_dropout": cfg.lora_dropout,
        "blocks_to_swap": cfg.blocks_to_swap,
    }
    for name, value in non_negative.items():
        if value < 0:
            raise ConfigError(f"config key '{name}' must be >= 0, got {value}")
    if cfg.lora_alpha is not None and cfg.lora_alpha <= 0:
        raise ConfigError(f"config key 'lora_alpha' must be > 0, got {cfg.lora_alpha}")
    if cfg.cache_batch_size < 1:
        raise ConfigError(f"config key 'cache_batch_size' must be >= 1, got {cfg.cache_batch_size}")
    if cfg.checkpoints_total_limit is not None and cfg.checkpoints_total_limit < 1:
        raise ConfigError(f"config key 'checkpoints_total_limit' must be >= 1 or null, got {cfg.checkpoints_total_limit}")
    if cfg.logit_std <= 0:
        raise ConfigError(f"config key 'logit_std' must be > 0, got {cfg.logit_std}")
    if cfg.lora_target_modules is not None and not cfg.lora_target_modules:
        raise ConfigError("config key 'lora_target_modules' is an empty list; remove it to use the family's default")
    if cfg.validation_samples < 0:
        raise ConfigError(f"config key 'validation_samples' must be >= 0, got {cfg.validation_samples}")
    if cfg.validation_steps < 0 or cfg.validation_num_inference_steps < 1:
        raise ConfigError("config keys 'validation_steps' must be >= 0 and 'validation_num_inference_steps' >= 1")
    if cfg.validation_images and len(cfg.validation_images) not in (1, len(cfg.validation_prompts)):
        raise ConfigError("config key 'validation_images' needs one image, or one per validation prompt")
    for i, entry in enumerate(cfg.validation_prompts):
        if isinstance(entry, dict):
            extra = set(entry) - {"prompt", "images", "control_mode"}
            if extra or not isinstance(entry.get("prompt"), str):
                raise ConfigError(f"config key 'validation_prompts[{i}]': an entry is a prompt, or {{prompt: ..., images: [...]"
                                  "[, control_mode: N]}" + (f" (unknown key '{sorted(extra)[0]}')" if extra else ""))
            if not isinstance(entry.get("control_mode", 0), int) or entry.get("control_mode", 0) < 0:
                raise ConfigError(f"config key 'validation_prompts[{i}].control_mode' must be a mode index >= 0")
            images = entry.get("images", [])
            if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
                raise ConfigError(f"config key 'validation_prompts[{i}].images' must be a list of image paths")
            for img in images if check_paths else []:
                if not Path(img).is_file():
                    raise ConfigError(f"config key 'validation_prompts[{i}].images': file '{img}' does not exist")
        elif not isinstance(entry, str):
            raise ConfigError(f"config key 'validation_prompts[{i}]' must be a prompt or {{prompt: ..., images: [...]}}")
    for key in ("assistant_lora", "init_lora"):
        if check_paths and getattr(cfg, key) is not None and not Path(getattr(cfg, key)).exists():
            raise ConfigError(f"config key '{key}': '{getattr(cfg, key)}' does not exist")
    if cfg.init_lora is not None and (cfg.lora_type != "lora" or cfg.use_dora):
        raise ConfigError("config key 'init_lora' starts a plain LoRA from a file; use lora_type: lora without use_dora")
    if check_paths:
        for img in cfg.validation_images:
            if not Path(img).is_file():
                raise ConfigError(f"config key 'validation_images': file '{img}' does not exist")
        check_model_path(cfg.pretrained_model_name_or_path)
        check_output_dir_place(cfg)
        if cfg.resume_from_checkpoint not in (None, "latest") and not Path(cfg.resume_from_checkpoint).is_dir():
            raise ConfigError(
                f"config key 'resume_from_checkpoint': '{cfg.resume_from_checkpoint}' is not a checkpoint folder (use 'latest' or a path)"
            )
    return cfg


def check_data(cfg: TrainConfig, check_paths: bool = True) -> None:
    """The data sources and their settings: data_config itself, or each of data_config.datasets (each entry's unset
    keys taken from data_config)."""
    d = cfg.data_config
    if not d.datasets:
        check_part(d, "data_config", check_paths)
        return
    given = [k for k in SOURCE_KEYS if getattr(d, k) not in (None, "")]
    if given:
        raise ConfigError(f"config key 'data_config.{given[0]}' is set beside data_config.datasets; with several datasets each entry names "
                          "its own data (move it into an entry)")
    weights = [e.weight for e in d.datasets]
    for i, (entry, part) in enumerate(zip(d.datasets, d.parts())):
        key = f"data_config.datasets[{i}]"
        if entry.weight is not None and not entry.weight > 0:
            raise ConfigError(f"config key '{key}.weight' must be > 0 or null, got {entry.weight}")
        if entry.loss_weight is not None and entry.loss_weight < 0:
            raise ConfigError(f"config key '{key}.loss_weight' must be >= 0, got {entry.loss_weight}")
        check_part(part, key, check_paths)
    if weights.count(None) not in (0, len(weights)):
        raise ConfigError("config key 'data_config.datasets[*].weight' is set on some entries only; give every entry a weight, or none")


def check_part(d: DataConfig, key: str, check_paths: bool) -> None:
    """One dataset's keys (named under `key`)."""
    if d.control_mode is not None and d.control_mode < 0:
        raise ConfigError(f"config key '{key}.control_mode' must be a mode index >= 0, got {d.control_mode}")
    if d.mask_dir and d.alpha_mask:
        raise ConfigError(f"config keys '{key}.mask_dir' and '{key}.alpha_mask' both give masks; use one")
    if check_paths and d.mask_dir and not Path(d.mask_dir).is_dir():
        raise ConfigError(f"config key '{key}.mask_dir': folder '{d.mask_dir}' does not exist")
    if d.mask_dir and (d.webdataset or d.hf_dataset or d.metadata_file):
        raise ConfigError(f"config key '{key}.mask_dir' pairs a folder of masks with img_dir's images; a metadata file names masks "
                          "in a 'mask' column, a shard in key.mask.png members, a Hugging Face dataset in a 'mask' column")
    if d.caption_template is not None:
        from image_datasets.captions import template_problem

        problem = template_problem(d.caption_template)
        if problem:
            raise ConfigError(f"config key '{key}.caption_template': {problem}")
    if d.keep_tags < 0 or d.keep_tags and not d.shuffle_tags:
        raise ConfigError(f"config key '{key}.keep_tags' is {d.keep_tags}; it counts tags kept in place by shuffle_tags: true (>= 0)")
    if not 0.0 <= d.caption_dropout_rate <= 1.0:
        raise ConfigError(f"config key '{key}.caption_dropout_rate' must be in [0, 1], got {d.caption_dropout_rate}")
    if d.img_size % 16:
        raise ConfigError(f"config key '{key}.img_size' must be a multiple of 16, got {d.img_size}")
    for r in d.resolutions or []:
        if r <= 0 or r % 16:
            raise ConfigError(f"config key '{key}.resolutions' must hold positive multiples of 16, got {r}")
    if d.resolutions is not None and not d.resolutions:
        raise ConfigError(f"config key '{key}.resolutions' is an empty list; remove it to train at img_size")
    if d.repeats < 1:
        raise ConfigError(f"config key '{key}.repeats' must be >= 1, got {d.repeats}")
    if d.control_dir is not None and d.metadata_file is not None:
        raise ConfigError(f"config keys '{key}.control_dir' and '{key}.metadata_file' are exclusive; use one")
    sources = [k for k in ("metadata_file", "webdataset", "hf_dataset") if getattr(d, k)]  # each replaces img_dir
    if len(sources) > 1:
        raise ConfigError(f"config keys {' and '.join(f'{key}.{k}' for k in sources)} are exclusive; the data comes from one of them")
    if d.control_dir is not None and (d.webdataset or d.hf_dataset):
        raise ConfigError(f"config key '{key}.control_dir' pairs folders of files; WebDataset shards and hf_dataset rows carry their "
                          "references themselves (key.control_image.png / a control_image column)")
    if d.webdataset is not None:
        from image_datasets.sources import shard_paths

        if not (isinstance(d.webdataset, str) or isinstance(d.webdataset, list) and all(isinstance(x, str) for x in d.webdataset)):
            raise ConfigError(f"config key '{key}.webdataset' must be a path, a glob or a list of them")
        shards = shard_paths(d.webdataset) if check_paths else []
        missing = [p for p in shards if not Path(p).is_file()]
        if check_paths and (not shards or missing):
            raise ConfigError(f"config key '{key}.webdataset': no tar shard at '{missing[0] if missing else d.webdataset}'")
    if check_paths and d.hf_dataset is not None and not Path(d.hf_dataset).expanduser().exists():
        if d.hf_dataset.startswith((".", "/", "~")) or d.hf_dataset.count("/") != 1:
            raise ConfigError(f"config key '{key}.hf_dataset': '{d.hf_dataset}' does not exist (and is not a hub id like owner/name)")
    if check_paths and d.metadata_file is not None:
        if not Path(d.metadata_file).is_file():
            raise ConfigError(f"config key '{key}.metadata_file': file '{d.metadata_file}' does not exist")
        if Path(d.metadata_file).suffix.lower() not in (".csv", ".jsonl"):
            raise ConfigError(f"config key '{key}.metadata_file': '{d.metadata_file}' must be a .csv or .jsonl file")
    if d.control_dir is not None:
        folders = [d.control_dir] if isinstance(d.control_dir, str) else d.control_dir
        if not isinstance(folders, list) or not folders or not all(isinstance(f, str) and f for f in folders):
            raise ConfigError(f"config key '{key}.control_dir' must be a folder or a list of folders")
        d.control_dir = folders[0] if len(folders) == 1 else list(folders)
        for f in folders if check_paths else []:
            if not Path(f).is_dir():
                raise ConfigError(f"config key '{key}.control_dir': folder '{f}' does not exist")
    if check_paths and not (d.metadata_file or d.webdataset or d.hf_dataset):
        if not d.img_dir:
            raise ConfigError(f"config key '{key}.img_dir' is not set: point it to your folder of images + captions")
        if not Path(d.img_dir).is_dir():
            raise ConfigError(f"config key '{key}.img_dir': folder '{d.img_dir}' does not exist")


ADAPTER_KEYS = {"lora_type": "lora", "use_dora": False, "use_rslora": False, "loraplus_lr_ratio": None, "rank_pattern": {},
                "alpha_pattern": {}, "lokr_factor": -1, "dop_class_word": None}


def check_adapter_keys(cfg: TrainConfig) -> None:
    """The adapter-type keys agree with each other (training_method: lora)."""
    import re

    _check_choice("lora_type", cfg.lora_type, LORA_TYPES)
    if cfg.lora_type != "lora":
        for key in ("use_dora", "use_rslora", "loraplus_lr_ratio"):
            if getattr(cfg, key) != ADAPTER_KEYS[key]:
                raise ConfigError(f"config key '{key}' applies to lora_type: lora (got lora_type: {cfg.lora_type})")
    if cfg.lokr_factor != -1 and cfg.lora_type != "lokr":
        raise ConfigError(f"config key 'lokr_factor' applies to lora_type: lokr (got lora_type: {cfg.lora_type})")
    if cfg.lokr_factor == 0 or cfg.lokr_factor < -1:
        raise ConfigError(f"config key 'lokr_factor' must be -1 or a positive factor size, got {cfg.lokr_factor}")
    if cfg.loraplus_lr_ratio is not None and cfg.loraplus_lr_ratio <= 0:
        raise ConfigError(f"config key 'loraplus_lr_ratio' must be > 0 or null, got {cfg.loraplus_lr_ratio}")
    if cfg.use_dora and cfg.quantize not in ("none", "nf4"):
        raise ConfigError(f"config key 'use_dora' normalises by the frozen weights every step; peft's DoRA reads them dequantized from "
                          f"plain and nf4 layers (QDoRA), not from quantize: {cfg.quantize}")
    if cfg.control_type in WIDENING_CONTROLS and (cfg.lora_type != "lora" or cfg.use_dora):
        raise ConfigError(f"config key 'control_type: {cfg.control_type}' trains a widened input layer, which diffusers' and ComfyUI's "
                          "loaders widen for plain LoRA only; use lora_type: lora without use_dora")
    if cfg.lora_type != "lora" and cfg.quantize in ("nf4", "int8"):
        raise ConfigError(f"config key 'lora_type: {cfg.lora_type}': peft's LyCORIS layers do not run on bitsandbytes layers "
                          f"(quantize: {cfg.quantize}); use quantize: qfloat8 / qint8 / int8_w8a8, or lora_type: lora")
    for key in ("rank_pattern", "alpha_pattern"):
        for pattern, value in getattr(cfg, key).items():
            try:
                re.compile(pattern)
            except re.error as e:
                raise ConfigError(f"config key '{key}': '{pattern}' is not a regular expression ({e})") from None
            if not value > 0:
                raise ConfigError(f"config key '{key}': '{pattern}' must map to a value > 0, got {value}")


def inside(path, folder) -> bool:
    """`path` is `folder` or below it (links resolved)."""
    path, folder = Path(path).expanduser().resolve(), Path(folder).expanduser().resolve()
    return path == folder or folder in path.parents


def check_output_dir_place(cfg: TrainConfig) -> None:
    """output_dir is never the dataset (its files would become training data, and rotation could reach them) nor
    the base model's folder (a full fine-tune would replace its transformer/)."""
    out = cfg.output_dir
    folders = {}
    for i, d in enumerate(cfg.data_config.parts()):
        key = f"data_config.datasets[{i}]" if cfg.data_config.datasets else "data_config"
        # the folders the scan lists (a metadata file or a dataset table names its files itself)
        folders[f"{key}.img_dir"] = d.img_dir if not (d.metadata_file or d.webdataset or d.hf_dataset) else None
        controls = [d.control_dir] if isinstance(d.control_dir, str) else list(d.control_dir or [])
        folders.update({f"{key}.control_dir[{j}]": c for j, c in enumerate(controls)})
        folders[f"{key}.mask_dir"] = d.mask_dir
    for key, folder in folders.items():
        if folder and inside(out, folder):
            raise ConfigError(f"config key 'output_dir': '{out}' is inside the dataset folder {key} ('{folder}'); the trainer's files "
                              "(samples, loss curve, cache) would be read as training data. Choose a folder outside the dataset")
    model = Path(cfg.pretrained_model_name_or_path).expanduser()
    if model.is_dir() and Path(out).expanduser().resolve() == model.resolve():
        raise ConfigError(f"config key 'output_dir': '{out}' is the base model's folder, whose transformer/ a run would replace; "
                          "choose another folder")


def check_model_path(name: str, key: str = "pretrained_model_name_or_path") -> None:
    """A local folder must hold model_index.json; a hub id must be in the local cache when offline."""
    p = Path(name).expanduser()
    if p.exists():
        if not (p / "model_index.json").is_file():
            raise ConfigError(f"config key '{key}': '{name}' has no model_index.json; point it to a diffusers model folder")
        return
    looks_like_hub_id = name.count("/") == 1 and not name.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise ConfigError(f"config key '{key}': folder '{name}' does not exist")
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        from huggingface_hub import snapshot_download

        try:
            snapshot_download(name, local_files_only=True, allow_patterns=["model_index.json"])
        except Exception:
            raise ConfigError(
                f"config key '{key}': '{name}' is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
                f"run `hf download {name}` on a connected machine, or point the key to a local folder"
            ) from None


def caching_note(cfg: TrainConfig) -> str:
    """One log line: which conditioning is precomputed (and where), which is encoded every step, and why."""
    where = f"files in {cfg.cache_dir or Path(cfg.output_dir) / 'cache'}, read per batch" if cfg.save_cache_on_disk else "RAM"
    text = ("prompt embeddings precomputed" if cfg.precompute_text_embeddings
            else "prompts encoded every step (precompute_text_embeddings: false; the text encoder stays loaded)")
    if cfg.precompute_image_embeddings:
        latents = "VAE latents precomputed"
    elif cfg.data_config.random_ratio:
        latents = "images encoded every step (data_config.random_ratio: random crops differ each epoch, so latents cannot be cached exactly)"
    else:
        latents = "images encoded every step (precompute_image_embeddings: false; the VAE stays loaded)"
    cached = cfg.precompute_text_embeddings or cfg.precompute_image_embeddings
    return f"conditioning: {text}; {latents}" + (f" (cache in {where})" if cached else "")


def load_config(
    path: str | os.PathLike | None,
    overrides: list[str] | None = None,
    check_paths: bool = True,
    preset: dict | None = None,
) -> TrainConfig:
    """Schema defaults < entry preset < YAML file < dot-list overrides -> validated TrainConfig.

    Raises ConfigError (one line) on user mistakes.
    """
    schema = OmegaConf.structured(TrainConfig)
    try:
        layers = [schema] + ([OmegaConf.create(preset)] if preset else [])
        if path is not None:
            if not Path(path).is_file():
                raise ConfigError(f"config file '{path}' does not exist")
            try:
                loaded = OmegaConf.load(path)
            except Exception as e:
                raise ConfigError(f"config file '{path}' is not valid YAML: {_yaml_error(e)}") from None
            if loaded is None or not OmegaConf.is_dict(loaded) or not len(loaded):
                raise ConfigError(f"config file '{path}' is empty or not a mapping of keys to values; "
                                  "start from a file in train_configs/")
            layers.append(loaded)
        if overrides:
            bad = [o for o in overrides if "=" not in o]
            if bad:
                raise ConfigError(f"command-line override '{bad[0]}' must look like key=value (e.g. max_train_steps=20)")
            layers.append(OmegaConf.from_dotlist(overrides))
        try:
            merged = OmegaConf.merge(*layers)
        except (TypeError, OmegaConfBaseException):  # a mapping where a list belongs, or the other way round
            found = next((m for layer in layers[1:] if (m := _shape_mismatch(schema, layer))), None)
            if found is None:
                raise
            raise ConfigError(f"bad value for config key '{found[0]}': expected {found[1]}") from None
        cfg: TrainConfig = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise ConfigError(_one_line(e)) from None
    if path is not None:
        _require_model_and_data(path, layers[-1] if overrides else OmegaConf.create(), loaded)
    return validate(cfg, check_paths=check_paths)


def _shape_mismatch(schema, layer, prefix: str = "") -> tuple[str, str] | None:
    """(key, what it expects) of the first value whose shape disagrees with the schema's: a mapping where a list or
    a single value belongs, a list where a mapping belongs. None when the shapes agree."""
    from omegaconf import DictConfig, ListConfig

    if not isinstance(layer, DictConfig) or not isinstance(schema, DictConfig):
        return None
    for k in layer:
        want, got = schema._get_node(k), layer._get_node(k)
        if want is None:
            continue
        key = f"{prefix}{k}"
        expected = "a list" if isinstance(want, ListConfig) else "a mapping of keys to values" if isinstance(want, DictConfig) else "a single value"
        if isinstance(got, DictConfig) and not isinstance(want, DictConfig) or isinstance(got, ListConfig) and not isinstance(want, ListConfig):
            return key, expected
        if isinstance(got, DictConfig) and not got._is_none():
            inner = _shape_mismatch(want, got, key + ".")
            if inner:
                return inner
    return None


def _yaml_error(e: Exception) -> str:
    """A YAML parse error as one line that keeps where it is (line, column) and what is wrong."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


def _require_model_and_data(path, overrides, loaded) -> None:
    """A run needs a model and data named by the user: schema defaults alone would start a 1000-step run on
    Qwen/Qwen-Image with no dataset (an empty or unrelated YAML must not do that)."""
    def named(key: str) -> bool:
        return any(OmegaConf.select(layer, key) is not None for layer in (loaded, overrides))

    if not named("pretrained_model_name_or_path"):
        raise ConfigError(f"config file '{path}' does not set pretrained_model_name_or_path; a config must name the base model")
    if not any(named(f"data_config.{k}") for k in ("img_dir", "metadata_file", "webdataset", "hf_dataset", "datasets")):
        raise ConfigError(f"config file '{path}' sets none of data_config.img_dir, metadata_file, webdataset, hf_dataset, datasets; "
                          "a config must name the data")


def to_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)


REQUIRED_IN_YAML = ("pretrained_model_name_or_path",)  # a config file must set these (_require_model_and_data)


def describe_keys(schema: type = TrainConfig, prefix: str = "", preset: dict | None = None) -> list[str]:
    """`key (type, default): doc` lines for --help and the README; `preset`: an entry's own defaults, shown instead
    of the schema's (what that entry really starts from)."""
    lines = []
    for key, f in walk_fields(schema, prefix):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        type_name = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        if key in REQUIRED_IN_YAML:
            shown = "required: set it in the YAML"
        elif preset and key in preset:
            shown = f"default {preset[key]!r} (this entry's preset)"
        else:
            shown = f"default {default!r}"
        lines.append(f"  {key} ({type_name}, {shown}): {f.metadata.get('help', '')}")
    return lines
