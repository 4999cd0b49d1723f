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

            self.ema = EMAModel(params, decay=self.cfg.ema_decay, foreach=True)

    def after_update(self, params: list[torch.nn.Parameter]) -> None:
        if self.ema is not None:
            self.ema.step(params)

    # --- the no-op guard --------------------------------------------------------------------------------------
    def watch(self, params: list[torch.nn.Parameter]) -> None:
        self.initial = [_head(p) for p in params]

    def check_trained(self, params: list[torch.nn.Parameter], steps: int) -> list[str]:
        moved = sum(not torch.equal(_head(p), p0) for p, p0 in zip(params, self.initial))
        if not moved:
            raise ValueError(f"after {steps} step(s) no trained weight has changed: check that the loss is finite and learning_rate > 0 "
                             "(full_weights: bf16 with a tiny learning rate still moves: its rounding is stochastic)")
        if moved < len(params):
            return [f"{len(params) - moved} of {len(params)} trained tensors have not changed after {steps} step(s) "
                    "(they get no gradient in this model, or their updates are below their precision)"]
        return []

    # --- files ------------------------------------------------------------------------------------------------
    def save(self, transformer: torch.nn.Module, directory: Path, state_dict: dict | None = None) -> None:
        """The whole transformer (trained weights at their training precision) as a diffusers folder; with EMA also
        the averaged weights. `state_dict`: the full (gathered) state when the model is sharded."""
        save_transformer(transformer, Path(directory) / TRANSFORMER_DIR, state_dict)
        if self.ema is not None:
            with self.averaged(transformer):
                save_transformer(transformer, Path(directory) / TRANSFORMER_EMA_DIR, None)
            state = {"optimization_step": self.ema.optimization_step}
            (Path(directory) / TRANSFORMER_EMA_DIR / "ema_state.json").write_text(json.dumps(state))

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
        return (f"{TRANSFORMER_DIR}/config.json",)

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
    """`save_pretrained` in sharded safetensors; the weights keep their dtypes (fp32 trained, bf16 frozen)."""
    kwargs = {"state_dict": state_dict} if state_dict is not None else {}
    transformer.save_pretrained(folder, safe_serialization=True, max_shard_size="5GB", **kwargs)


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
