"""Full fine-tuning: the transformer's own weights (all of them, or those named by `trainable_modules`).

Output: a diffusers transformer folder (`save_pretrained`, sharded safetensors) that the family's pipeline loads with
`transformer=<TransformerClass>.from_pretrained(folder)` and `inference.py --transformer` reads; with `ema_decay` a
second folder with the moving average. Trained weights are fp32 master weights (the forward runs in
`mixed_precision` under autocast) or bf16 (`full_weights: bf16`) updated with stochastic rounding; frozen ones stay in
the model's dtype. A checkpoint holds the weights exactly as trained, so a resumed run continues bit for bit.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from trainer.constants import TRANSFORMER_DIR, TRANSFORMER_EMA_DIR
from trainer.methods import TrainingMethod

SNAPSHOT = 256  # elements per tensor remembered for the no-op guard (a full copy would double the model in RAM)


class FullMethod(TrainingMethod):
    name = "full"
    exports_every_checkpoint = False
    resume_keys = ("trainable_modules", "full_weights", "ema_decay")

    def __init__(self, cfg, adapter):
        super().__init__(cfg, adapter)
        self.ema = None  # diffusers EMAModel over the trained parameters, when ema_decay > 0
        self.names: list[str] = []  # names of the trained parameters, in optimizer order

    def check_setup(self) -> None:
        """trainable_modules must name something: checked against the weight names in the model folder's files."""
        from trainer.config import ConfigError

        patterns = self.cfg.trainable_modules
        names = stored_weight_names(self.cfg.pretrained_model_name_or_path)
        if patterns is not None and names and not any(s in n for n in names for s in patterns):
            raise ConfigError(f"config key 'trainable_modules': no transformer weight name contains any of {list(patterns)} "
                              f"(names look like '{sorted(names)[0]}')")

    def attach(self, transformer: torch.nn.Module, placement=None) -> list[torch.nn.Parameter]:
        from trainer.config import ConfigError

        patterns = self.cfg.trainable_modules
        transformer.requires_grad_(False)
        chosen = [(n, p) for n, p in transformer.named_parameters() if patterns is None or any(s in n for s in patterns)]
        if not chosen:
            raise ConfigError(f"config key 'trainable_modules': no transformer parameter name contains any of {patterns}")
        dtype = torch.float32 if self.cfg.full_weights == "fp32" else torch.bfloat16
        for _n, p in chosen:
            p.data = p.data.to(dtype)
            p.requires_grad_(True)
        self.names = [n for n, _p in chosen]
        return [p for _n, p in chosen]

    def prepared(self, params: list[torch.nn.Parameter]) -> None:
        """The EMA starts from the parameters as they will be trained (sharded ones under FSDP)."""
        if self.cfg.ema_decay:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(params, decay=self.cfg.ema_decay, foreach=not self.sharded)  # no foreach kernels for DTensors

    def after_update(self, params: list[torch.nn.Parameter]) -> None:
        if self.ema is not None:
            self.ema.step(params)

    # --- the no-op guard --------------------------------------------------------------------------------------
    def watch(self, params: list[torch.nn.Parameter]) -> None:
        self.initial = [_head(p) for p in params]

    def check_trained(self, params: list[torch.nn.Parameter], steps: int) -> list[str]:
        from trainer.distributed import all_ranks_agree

        same = torch.tensor([torch.equal(_head(p), p0) for p, p0 in zip(params, self.initial)])
        moved = len(params) - int(all_ranks_agree(same).sum())  # unchanged = unchanged in every rank's shard
        if not moved:
            raise ValueError(f"after {steps} step(s) no trained weight has changed: check that the loss is finite and learning_rate > 0 "
                             "(full_weights: bf16 with a tiny learning rate still moves: its rounding is stochastic)")
        if moved < len(params):
            return [f"{len(params) - moved} of {len(params)} trained tensors have not changed after {steps} step(s) "
                    "(they get no gradient in this model, or their updates are below their precision)"]
        return []

    # --- files ------------------------------------------------------------------------------------------------
    def save(self, transformer: torch.nn.Module, directory: Path, final: bool = True, state_dict: dict | None = None) -> None:
        """The whole transformer (trained weights at their training precision) as a diffusers folder; with EMA also
        the averaged weights. A sharded run keeps its intermediate checkpoints as shards only and consolidates the
        folders at its last one (gathered from every rank to the main process)."""
        if self.sharded and not final:
            return
        directory = Path(directory)
        for folder, averaged in ((TRANSFORMER_DIR, False), (TRANSFORMER_EMA_DIR, True)):
            if averaged and self.ema is None:
                continue
            with self.averaged(transformer) if averaged else contextlib.nullcontext():
                if state_dict is not None:  # consolidated by the engine (DeepSpeed; no EMA there)
                    if self.is_main:
                        save_transformer(transformer, directory / folder, state_dict)
                elif self.sharded:
                    from trainer.distributed import consolidated_state_dict

                    state = consolidated_state_dict(transformer)
                    if self.is_main:
                        save_transformer(transformer, directory / folder, state)
                elif self.is_main:
                    save_transformer(transformer, directory / folder, None)
        if self.ema is not None and self.is_main:
            (directory / TRANSFORMER_EMA_DIR / "ema_state.json").write_text(json.dumps({"optimization_step": self.ema.optimization_step}))

    def sharded_state(self) -> dict | None:
        """The EMA's shadow weights (sharded like the parameters) and its step count."""
        if self.ema is None:
            return None
        self._ema_step = torch.tensor(self.ema.optimization_step, dtype=torch.int64)
        return {"shadow": dict(zip(self.names, self.ema.shadow_params)), "step": self._ema_step}

    def sharded_state_loaded(self) -> None:
        if self.ema is not None:
            self.ema.optimization_step = int(self._ema_step)

    def load(self, transformer: torch.nn.Module, directory: Path) -> None:
        """Restore the weights `save` wrote (each in the dtype it is trained in), and the EMA."""
        load_into(transformer, Path(directory) / TRANSFORMER_DIR)
        if self.ema is not None:
            ema_dir = Path(directory) / TRANSFORMER_EMA_DIR
            shadow = read_folder(ema_dir)
            for s, n in zip(self.ema.shadow_params, self.names):
                s.copy_(shadow[n].to(s.dtype))
            self.ema.optimization_step = json.loads((ema_dir / "ema_state.json").read_text())["optimization_step"]

    def checkpoint_files(self) -> tuple[str, ...]:
        return (self.engine_file,) if self.engine_file else (f"{TRANSFORMER_DIR}/config.json",)

    def published_files(self) -> tuple[str, ...]:
        return (TRANSFORMER_DIR, TRANSFORMER_EMA_DIR)

    @contextlib.contextmanager
    def averaged(self, transformer: torch.nn.Module):
        """The EMA weights in the model for a while (validation previews, the EMA export)."""
        if self.ema is None:
            yield
            return
        named = dict(transformer.named_parameters())
        params = [named[n] for n in self.names]
        self.ema.store(params)
        self.ema.copy_to(params)
        try:
            yield
        finally:
            self.ema.restore(params)

    def sampling(self, transformer: torch.nn.Module):
        return self.averaged(transformer)


def _head(p: torch.Tensor) -> torch.Tensor:
    local = p.to_local() if hasattr(p, "to_local") else p  # an FSDP2 shard: its own elements are enough
    return local.detach().flatten()[:SNAPSHOT].to("cpu", torch.float32, copy=True)


def stored_weight_names(model: str) -> set[str]:
    """Weight names in a local model folder's transformer files (headers only); empty for a hub id."""
    from safetensors import safe_open

    folder = Path(model) / TRANSFORMER_DIR
    names: set[str] = set()
    for f in folder.glob("*.safetensors") if folder.is_dir() else []:
        with safe_open(str(f), framework="pt") as h:
            names.update(h.keys())
    return names


def save_transformer(transformer: torch.nn.Module, folder: Path, state_dict: dict | None) -> None:
    """The diffusers folder `save_pretrained` writes (config.json, safetensors shards of at most 5 GB, their index);
    the weights keep their dtypes (fp32 trained, bf16 frozen). `state_dict`: the gathered weights of a sharded
    model, written the same way (save_pretrained itself would read the shards)."""
    if state_dict is None:
        transformer.save_pretrained(folder, safe_serialization=True, max_shard_size="5GB")
        return
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    transformer.save_config(folder)
    config = json.loads((folder / "config.json").read_text())
    plain = next(c for c in type(transformer).__mro__ if not c.__name__.startswith("FSDP"))  # fully_shard subclasses the model
    (folder / "config.json").write_text(json.dumps({**config, "_class_name": plain.__name__}, indent=2, sort_keys=True))
    split = split_torch_state_dict_into_shards(state_dict, filename_pattern="diffusion_pytorch_model{suffix}.safetensors", max_shard_size="5GB")
    for filename, names in split.filename_to_tensors.items():
        save_file({n: state_dict[n].contiguous() for n in names}, str(folder / filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def read_folder(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a diffusers model folder (one file or index-sharded)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    index = next(folder.glob("*.safetensors.index.json"), None)
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index else [p.name for p in folder.glob("*.safetensors")]
    out = {}
    for name in files:
        out.update(load_file(str(folder / name)))
    return out


def load_into(transformer: torch.nn.Module, folder: Path) -> None:
    state = read_folder(folder)
    missing, unexpected = transformer.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{folder} does not match this transformer (missing {missing[:3]}, unexpected {unexpected[:3]})")
