"""ControlNet training: a ControlNet beside the frozen transformer, trained whole (fp32 master weights, or bf16 with
stochastic rounding: `full_weights: bf16`).

The ControlNet starts from the transformer's first blocks (`controlnet_layers` double-stream, `controlnet_single_layers`
single-stream; weights copied, the control input and the output projections zero: at step 0 the model is the base
model), the way diffusers' `from_transformer` and the released FLUX ControlNets start, or from an existing ControlNet
folder (`controlnet_model_name_or_path`). The base transformer stays frozen and may be quantized / block-swapped.

The training loop sees one module (`ControlNetPair`: the transformer and the ControlNet), so accelerate prepares it
once (DDP syncs the ControlNet's gradients) and the family's `predict` calls it like its transformer; the pair runs
the family's ControlNet call (`ModelAdapter.controlnet_forward`), as the family's ControlNet pipeline does. Output: a
diffusers ControlNet folder (`controlnet/`) that `<ControlNetClass>.from_pretrained` and the pipeline load.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from trainer.constants import CONTROLNET_DIR
from trainer.methods.full import FullMethod, load_into, save_transformer


CONTROLNET_LORA_FILE = "controlnet_lora.safetensors"  # controlnet_lora: the LoRA alone (peft names), beside the merged controlnet/
# controlnet_lora's default targets beside the family's attention layers: the ControlNet's output projections (FLUX.1 /
# Qwen-Image: controlnet_blocks, Z-Image: after_proj), its control input (controlnet_x_embedder, before_proj)
CONTROLNET_LORA_TARGETS = ("controlnet_blocks.*", "controlnet_single_blocks.*", "controlnet_x_embedder", "before_proj", "after_proj")


class ControlNetPair(torch.nn.Module):
    """The frozen transformer and the trained ControlNet as one module; called with the transformer's arguments plus
    `controlnet_cond`."""

    def __init__(self, transformer: torch.nn.Module, controlnet: torch.nn.Module, adapter):
        super().__init__()
        self.transformer = transformer
        self.controlnet = controlnet
        self._forward = adapter.controlnet_forward  # not a module: keeps the adapter out of state_dict / DDP

    @property
    def config(self):
        return self.transformer.config

    def forward(self, **kwargs):
        return self._forward(self.controlnet, self.transformer, kwargs)


class ControlNetMethod(FullMethod):
    name = "controlnet"
    exports_every_checkpoint = True
    resume_keys = ("controlnet_model_name_or_path", "controlnet_layers", "controlnet_single_layers", "controlnet_modes", "full_weights")

    def check_setup(self) -> None:
        """No sharding; a Union ControlNet's modes: every dataset names one, within the ControlNet's (before any model loads)."""
        import inspect

        import diffusers

        from trainer.config import ConfigError

        if self.sharded:
            raise ConfigError("training_method: controlnet runs on one or several processes with plain data parallelism; "
                              "FSDP / DeepSpeed are not supported for it yet (use an accelerate config without them)")
        cfg = self.cfg
        cls = getattr(diffusers, self.adapter.controlnet_class)
        if cfg.controlnet_modes and "num_mode" not in inspect.signature(cls.__init__).parameters:
            raise ConfigError(f"config key 'controlnet_modes': a {cls.__name__} has no control modes (FLUX.1's FluxControlNetModel has)")
        modes = union_modes(cfg)
        for i, part in enumerate(cfg.data_config.parts()):
            key = f"data_config.datasets[{i}].control_mode" if cfg.data_config.datasets else "data_config.control_mode"
            if modes and (part.control_mode is None or part.control_mode >= modes):
                raise ConfigError(f"config key '{key}' is {part.control_mode}: the ControlNet is a Union of {modes} control modes; give each "
                                  f"dataset its control images' mode, 0 to {modes - 1}")
            if not modes and part.control_mode is not None:
                raise ConfigError(f"config key '{key}' applies to a Union ControlNet: set controlnet_modes for a new one (or continue one "
                                  "whose config has num_mode)")
        for i, entry in enumerate(cfg.validation_prompts):
            if isinstance(entry, dict) and entry.get("control_mode") is not None and entry["control_mode"] >= max(modes, 1):
                raise ConfigError(f"config key 'validation_prompts[{i}].control_mode' is {entry['control_mode']}, but the ControlNet has "
                                  + (f"{modes} modes" if modes else "no control modes"))

    def attach(self, transformer: torch.nn.Module, placement=None) -> list[torch.nn.Parameter]:
        import diffusers

        transformer.requires_grad_(False)
        cfg, adapter = self.cfg, self.adapter
        if cfg.controlnet_model_name_or_path:
            controlnet = getattr(diffusers, adapter.controlnet_class).from_pretrained(cfg.controlnet_model_name_or_path, torch_dtype=torch.float32)
        elif cfg.quantize != "none":  # the quantized blocks cannot be copied: the model folder's own weights, on the CPU
            source = getattr(diffusers, adapter.transformer_class).from_pretrained(
                cfg.pretrained_model_name_or_path, subfolder="transformer", torch_dtype=adapter.weight_dtype)
            controlnet = adapter.make_controlnet(adapter.prepare_transformer(source))
            del source
        else:
            with placement.host_weights() if placement is not None else contextlib.nullcontext():
                controlnet = adapter.make_controlnet(transformer)
        if cfg.controlnet_lora:  # frozen in the weight dtype; the LoRA on it trains in fp32
            dtype = adapter.weight_dtype
        else:
            dtype = torch.float32 if cfg.full_weights == "fp32" else torch.bfloat16
        controlnet = controlnet.to(adapter.device, dtype).train()
        # some diffusers ControlNets (Z-Image's) read this flag in training but define it only when it is enabled
        controlnet.gradient_checkpointing = getattr(controlnet, "gradient_checkpointing", False)
        if cfg.gradient_checkpointing:
            controlnet.enable_gradient_checkpointing()
        self.controlnet = controlnet
        if cfg.controlnet_lora:
            return self.attach_lora(controlnet)
        controlnet.requires_grad_(True)
        self.names = [n for n, _p in controlnet.named_parameters()]
        return list(controlnet.parameters())

    def attach_lora(self, controlnet: torch.nn.Module) -> list[torch.nn.Parameter]:
        """controlnet_lora: a plain LoRA on the frozen ControlNet (peft), its parameters in fp32."""
        import dataclasses

        from peft import inject_adapter_in_model

        from trainer.config import ConfigError
        from trainer.methods.lora import TRAINED, LoRAMethod

        controlnet.requires_grad_(False)
        targets = self.cfg.lora_target_modules or (*self.adapter.default_target_modules, *CONTROLNET_LORA_TARGETS)
        config = LoRAMethod(dataclasses.replace(self.cfg, lora_target_modules=list(targets)), self.adapter).lora_config()
        try:
            inject_adapter_in_model(config, controlnet, adapter_name=TRAINED)
        except ValueError as e:
            raise ConfigError(f"config key 'lora_target_modules': {e}") from None
        named = [(n, p) for n, p in controlnet.named_parameters() if f".{TRAINED}." in n]
        for _n, p in named:
            p.data = p.data.float()
            p.requires_grad_(True)
        self.names = [n for n, _p in named]
        return [p for _n, p in named]

    def merged_state(self, controlnet: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The ControlNet's weights with its LoRA merged in (base + delta per adapted layer; the model is not changed),
        under the plain ControlNet's names."""
        from peft.tuners.lora import LoraLayer

        from trainer.methods.lora import TRAINED

        sd = {k.replace(".base_layer.", "."): v for k, v in controlnet.state_dict().items() if ".lora_" not in k}
        for name, module in controlnet.named_modules():
            if isinstance(module, LoraLayer) and TRAINED in module.lora_A:
                base = module.get_base_layer().weight
                sd[f"{name}.weight"] = (base.float() + module.get_delta_weight(TRAINED).float()).to(base.dtype)
        return sd

    def lora_state(self, controlnet: torch.nn.Module) -> dict[str, torch.Tensor]:
        names = set(self.names)
        return {n: p.detach() for n, p in controlnet.named_parameters() if n in names}

    def trained_model(self, transformer: torch.nn.Module) -> torch.nn.Module:
        return ControlNetPair(transformer, self.controlnet, self.adapter)

    # --- files ------------------------------------------------------------------------------------------------
    def save(self, model: torch.nn.Module, directory: Path, final: bool = True, state_dict: dict | None = None) -> None:
        if not self.is_main:
            return
        if not self.cfg.controlnet_lora:
            save_transformer(model.controlnet, Path(directory) / CONTROLNET_DIR, None)
            return
        from safetensors.torch import save_file

        save_transformer(model.controlnet, Path(directory) / CONTROLNET_DIR, self.merged_state(model.controlnet))
        tmp = Path(directory) / f"{CONTROLNET_LORA_FILE}.partial"
        save_file({k: v.contiguous() for k, v in self.lora_state(model.controlnet).items()}, str(tmp))
        tmp.replace(Path(directory) / CONTROLNET_LORA_FILE)

    def load(self, model: torch.nn.Module, directory: Path) -> None:
        if not self.cfg.controlnet_lora:
            load_into(model.controlnet, Path(directory) / CONTROLNET_DIR)
            return
        from safetensors.torch import load_file

        saved, own = load_file(str(Path(directory) / CONTROLNET_LORA_FILE)), dict(model.controlnet.named_parameters())
        if set(saved) != set(self.names):
            raise ValueError(f"{directory / CONTROLNET_LORA_FILE} holds another LoRA than this run's (its layers differ)")
        with torch.no_grad():
            for name, value in saved.items():
                own[name].copy_(value)

    def checkpoint_files(self) -> tuple[str, ...]:
        return (f"{CONTROLNET_DIR}/config.json",) + ((CONTROLNET_LORA_FILE,) if self.cfg.controlnet_lora else ())

    def published_files(self) -> tuple[str, ...]:
        return (CONTROLNET_DIR,) + ((CONTROLNET_LORA_FILE,) if self.cfg.controlnet_lora else ())

    def sampling(self, model: torch.nn.Module):
        return self.adapter.controlnet_previews(model.controlnet)


def union_modes(cfg) -> int:
    """Control modes of the ControlNet a run trains: controlnet_modes for a new one, else the continued ControlNet's
    num_mode (0: not a Union ControlNet)."""
    if cfg.controlnet_modes or not cfg.controlnet_model_name_or_path:
        return cfg.controlnet_modes
    from trainer.config import ConfigError

    try:
        return num_modes(cfg.controlnet_model_name_or_path)
    except Exception as e:
        raise ConfigError(f"config key 'controlnet_model_name_or_path': cannot read its config.json ({type(e).__name__}: {e})") from None


def num_modes(controlnet: str) -> int:
    """The control modes a saved ControlNet (folder or hub id) was made with: its config's num_mode (0: not a Union)."""
    from trainer.models import read_model_index

    return int(read_model_index(controlnet, "config.json").get("num_mode") or 0)
