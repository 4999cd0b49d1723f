"""Loading a family's diffusers pipeline (plus a LoRA) for the user tools: inference, merge, convert."""

from __future__ import annotations

from pathlib import Path

from trainer.config import TrainConfig
from trainer.constants import LORA_FILE


class ToolError(ValueError):
    """A user mistake in a tool's arguments; printed as one line."""


def adapter_for(model_name: str, lora: str | None = None, controlnet: bool = False, in_context: bool = False):
    """The family adapter (no weights) of a model folder or hub id, from its model_index.json; with the `lora` it
    will run, the variant that LoRA was trained for where it widens this model (a FLUX Control LoRA on FLUX.1-dev
    runs in a FluxControlPipeline); `controlnet`: the variant that runs the model with a ControlNet; `in_context`: the
    in-context control variant (for LoRAs without our metadata, e.g. DiffSynth-Studio's)."""
    from trainer.models import read_model_index, resolve

    p = Path(model_name)
    if p.exists() and not (p / "model_index.json").is_file():
        raise ToolError(f"'{model_name}' has no model_index.json; point it to a diffusers model folder")
    try:
        read_model_index(model_name)
    except Exception as e:
        raise ToolError(f"cannot find '{model_name}' locally or on the hub ({type(e).__name__}); "
                        f"download it with `hf download {model_name}` or pass a local folder") from None
    try:
        cls, variant = resolve(model_name)
    except ValueError as e:
        raise ToolError(str(e)) from None
    trained = cls.variant_named(lora_variant(lora) or "") if lora else None
    if trained is not None and variant.pipeline in trained.starts_from:
        variant = trained
    if controlnet:
        from trainer.config import ConfigError

        try:
            variant = cls.controlled(variant, "controlnet")
        except ConfigError:
            raise ToolError(f"{variant.pipeline} models have no ControlNet pipeline here (ControlNets: FLUX.1, Qwen-Image, Z-Image)") from None
    if in_context:
        from trainer.config import ConfigError

        try:
            variant = cls.controlled(variant, "in-context")
        except ConfigError:
            raise ToolError(f"{variant.pipeline} models have no in-context control (Qwen-Image has)") from None
    return cls(TrainConfig(pretrained_model_name_or_path=model_name), variant)


def lora_variant(path: str) -> str | None:
    """The variant our metadata says a LoRA file (or a folder holding one) was trained for; None when unknown."""
    from safetensors import safe_open

    from trainer.lora_format import VARIANT_KEY

    try:
        directory, weight_name = resolve_lora(path)
        with safe_open(str(Path(directory) / weight_name), framework="pt") as f:
            return (f.metadata() or {}).get(VARIANT_KEY)
    except Exception:  # missing / not a safetensors file: check_lora says so in its own words
        return None


def resolve_lora(path: str) -> tuple[str, str]:
    """(directory, weight_name) for load_lora_weights: a .safetensors file, or a folder holding LORA_FILE."""
    p = Path(path)
    if p.is_dir():
        if not (p / LORA_FILE).is_file():
            raise ToolError(f"folder '{path}' has no {LORA_FILE}")
        return str(p), LORA_FILE
    if p.is_file():
        return str(p.parent), p.name
    raise ToolError(f"'{path}' does not exist")


def output_images(output) -> list:
    """The images of a pipeline's output (Kandinsky's pipelines name the field `image`; a video pipeline's one-frame
    videos: each video's frame)."""
    if hasattr(output, "frames"):
        return [video[0] for video in output.frames]
    return output.images if hasattr(output, "images") else output.image


def check_lora(path: str, adapter) -> None:
    """ToolError unless every layer of the LoRA maps onto the model (names and sizes, from its config): a LoRA of
    another family can half-match by name and shape, and diffusers would apply that part silently."""
    from trainer.lora_format import check_lora_fits

    directory, weight_name = resolve_lora(path)
    try:
        check_lora_fits(Path(directory) / weight_name, adapter, adapter.cfg.pretrained_model_name_or_path)
    except ValueError as e:
        raise ToolError(str(e)) from None


def resolve_transformer(path: str) -> Path:
    """A full fine-tune's transformer folder: the folder itself, or a run's output_dir / checkpoint holding one."""
    from trainer.constants import TRANSFORMER_DIR

    p = Path(path)
    for candidate in (p, p / TRANSFORMER_DIR):
        if (candidate / "config.json").is_file():
            if not any(candidate.glob("*.safetensors")):
                pickled = sorted(f.name for f in candidate.iterdir() if f.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl"))
                raise ToolError(f"'{candidate}' holds no .safetensors weights" + (
                    f" ({', '.join(pickled[:2])} is a pickle, which is never loaded here: it could run code; save the model "
                    "with save_pretrained(safe_serialization=True))" if pickled else ""))
            return candidate
    raise ToolError(f"'{path}' is not a transformer folder (no config.json in it or in {TRANSFORMER_DIR}/)")


def check_class(folder: Path, expected: str, adapter) -> None:
    """ToolError unless the model folder's config.json names `expected` (the family's transformer / ControlNet class)."""
    import json

    try:
        found = json.loads((folder / "config.json").read_text()).get("_class_name")
    except (ValueError, AttributeError):
        raise ToolError(f"'{folder / 'config.json'}' is not a model config (not a JSON object)") from None
    if found != expected:
        raise ToolError(f"'{folder}' holds a {found}, but {adapter.variant.name} models use a {expected}")


def load_transformer(adapter, path: str, dtype):
    """A fully fine-tuned transformer of the family's class (refused when it is another model's)."""
    import diffusers

    folder = resolve_transformer(path)
    check_class(folder, adapter.transformer_class, adapter)
    try:
        return getattr(diffusers, adapter.transformer_class).from_pretrained(folder, torch_dtype=dtype, use_safetensors=True)
    except Exception as e:  # damaged weights, shapes of another model size
        raise ToolError(f"'{folder}' cannot be loaded as a {adapter.transformer_class} ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None


def load_lora(pipe, path: str, name: str = "lora", scale: float = 1.0) -> None:
    """A LoRA file into the pipeline's transformer as adapter `name` at `scale`: the pipeline's own
    load_lora_weights, or, for the LyCORIS types its loader does not read (LoHa everywhere, LoKr outside Z-Image /
    FLUX.2), peft's own layers built from the config our file carries."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    from trainer.lora_format import PREFIX, _own_lycoris, adapter_config

    directory, weight_name = resolve_lora(path)
    file = Path(directory) / weight_name
    try:
        pipe.load_lora_weights(directory, weight_name=weight_name, adapter_name=name)
    except ValueError:
        if _own_lycoris(file) is None:
            raise
        sd = {k.removeprefix(PREFIX): v for k, v in load_file(str(file)).items()}
        pipe.transformer.add_adapter(adapter_config(file), adapter_name=name)
        result = set_peft_model_state_dict(pipe.transformer, sd, adapter_name=name)
        missing = [k for k in getattr(result, "missing_keys", []) if f".{name}" in k]
        if missing or getattr(result, "unexpected_keys", []):
            raise ToolError(f"'{file}' does not match this model (missing {missing[:2]}, unexpected {result.unexpected_keys[:2]})") from None
    pipe.set_adapters([name], adapter_weights=[scale])


def controlnet_folder(adapter, path: str) -> Path:
    """A trained ControlNet's folder (the folder itself, or a run's output_dir / checkpoint holding controlnet/) of the
    family's ControlNet class, with safetensors weights; ToolError otherwise (nothing is loaded)."""
    from trainer.constants import CONTROLNET_DIR

    p = Path(path)
    folder = next((c for c in (p, p / CONTROLNET_DIR) if (c / "config.json").is_file()), None)
    if folder is None:
        raise ToolError(f"'{path}' is not a ControlNet folder (no config.json in it or in {CONTROLNET_DIR}/)")
    if not any(folder.glob("*.safetensors")):
        raise ToolError(f"'{folder}' holds no .safetensors weights (pickled weights are never loaded here)")
    check_class(folder, adapter.controlnet_class, adapter)
    return folder


def load_controlnet(adapter, path: str, dtype):
    import diffusers

    folder = controlnet_folder(adapter, path)
    try:
        return getattr(diffusers, adapter.controlnet_class).from_pretrained(folder, torch_dtype=dtype, use_safetensors=True)
    except Exception as e:  # damaged weights, another model size
        raise ToolError(f"'{folder}' cannot be loaded as a {adapter.controlnet_class} ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200]})") from None


def load_pipeline(adapter, dtype, device: str, lora: str | None = None, lora_scale: float = 1.0,
                  quantize: str = "none", offload: str = "none", transformer: str | None = None, controlnet: str | None = None):
    """The family's pipeline from its folder, optionally with a fully fine-tuned transformer, quantized block-wise
    (as in training) and with a LoRA; a ControlNet variant with the `controlnet` folder (None: a new ControlNet as
    training starts it, whose residuals are zero: the base model)."""
    import torch

    name = adapter.cfg.pretrained_model_name_or_path
    if lora:
        check_lora(lora, adapter)  # before the model loads
    extra = {"transformer": load_transformer(adapter, transformer, dtype)} if transformer else {}
    if adapter.variant.control == "controlnet":
        if controlnet:
            extra["controlnet"] = load_controlnet(adapter, controlnet, dtype)
        else:
            import diffusers

            if "transformer" not in extra:  # loaded once: the ControlNet's source and the pipeline's transformer
                extra["transformer"] = getattr(diffusers, adapter.transformer_class).from_pretrained(name, subfolder="transformer",
                                                                                                    torch_dtype=dtype)
            extra["controlnet"] = adapter.make_controlnet(extra["transformer"]).to(dtype)
    # the variant's pipeline class: the model folder's own, or the one its LoRA widens it into (FluxControlPipeline)
    pipe = adapter.pipeline_class.from_pretrained(name, dtype=dtype, **adapter.pipeline_components(name), **extra)
    if quantize != "none":
        from trainer.quantize import place_model

        # Block by block on the target device (the GPU never holds the unquantized transformer); with offloading the
        # quantized transformer then goes back to the CPU until it runs.
        for component in adapter.placed_components:  # Ideogram 4: its unconditional transformer as well
            place_model(getattr(pipe, component).requires_grad_(False), quantize, torch.device(device), dtype)
    if lora:
        load_lora(pipe, lora, "lora", lora_scale)  # the pipeline's loader widens what the LoRA widened
    else:
        adapter.prepare_transformer(pipe.transformer)  # the base as training starts from it (FLUX Control: zero control weights)
    if offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    else:
        pipe.to(device)
    return pipe
