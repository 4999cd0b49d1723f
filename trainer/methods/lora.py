"""LoRA and its relatives (peft) on the transformer's Linear layers: LoRA (with DoRA, rsLoRA, LoRA+ and per-module
ranks), and LyCORIS's LoKr and LoHa. Saved in diffusers format (LoKr / LoHa: peft's LyCORIS key names, which are
LyCORIS's own) and, on request, in ComfyUI naming."""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import torch
from peft import LoHaConfig, LoKrConfig, LoraConfig, PeftConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from trainer.constants import COMFY_FILE, LORA_FILE
from trainer.methods import TrainingMethod


logger = logging.getLogger(__name__)

TRAINED = "default"  # peft adapter name of the LoRA being trained
ASSISTANT = "assistant"  # peft adapter name of cfg.assistant_lora
# the zero-initialised side of each type (peft's init): while all of it is unchanged the adapter does nothing
OUTPUT_SIDE = (".lora_B.", ".lokr_w1.", ".lokr_w1_a.", ".hada_w2_b.")


class LoRAMethod(TrainingMethod):
    name = "lora"
    resume_keys = ("rank", "lora_alpha", "lora_target_modules", "assistant_lora", "init_lora", "lora_type", "use_dora", "use_rslora",
                   "rank_pattern", "alpha_pattern", "lokr_factor", "loraplus_lr_ratio")  # LoRA+ changes the optimizer's groups

    def lora_config(self) -> PeftConfig:
        cfg = self.cfg
        alpha = cfg.lora_alpha or cfg.rank
        common = dict(r=cfg.rank, target_modules=target_regex(cfg.lora_target_modules or self.adapter.default_target_modules),
                      rank_pattern=dict(cfg.rank_pattern), alpha_pattern=dict(cfg.alpha_pattern))
        if cfg.lora_type == "lokr":
            # LyCORIS's initialisation: the first factor zero, so the adapter starts as the identity
            return LoKrConfig(alpha=alpha, decompose_factor=cfg.lokr_factor, module_dropout=cfg.lora_dropout, **common)
        if cfg.lora_type == "loha":
            return LoHaConfig(alpha=alpha, module_dropout=cfg.lora_dropout, **common)
        return LoraConfig(lora_alpha=alpha, lora_dropout=cfg.lora_dropout, init_lora_weights="gaussian", use_dora=cfg.use_dora,
                          use_rslora=cfg.use_rslora, **common)

    def param_groups(self, params: list[torch.nn.Parameter]) -> list[dict]:
        """LoRA+: the output side (lora_B) in its own group at loraplus_lr_ratio x the learning rate."""
        if not self.cfg.loraplus_lr_ratio:
            return [{"params": params}]
        names = {id(p): n for n, p in self.adapter.transformer.named_parameters()}
        fast = [p for p in params if ".lora_B." in names.get(id(p), "")]
        slow = [p for p in params if ".lora_B." not in names.get(id(p), "")]
        return [{"params": slow}, {"params": fast, "lr": self.cfg.learning_rate * self.cfg.loraplus_lr_ratio}]

    def attach(self, transformer: torch.nn.Module, placement=None) -> list[torch.nn.Parameter]:
        """A fresh LoRA on the frozen transformer; returns its (fp32) trainable parameters."""
        from trainer.config import ConfigError

        transformer.requires_grad_(False)
        names = self.cfg.lora_target_modules or self.adapter.default_target_modules
        missing = [m for m in self.adapter.widened_modules if not targets(names, m)]
        if missing:
            raise ConfigError(f"config key 'lora_target_modules' leaves out {missing[0]}, the input layer control_type: "
                              f"{self.cfg.control_type or self.adapter.variant.control} widened: only a LoRA on it reads the control; add {missing[0]}")
        # blocks_to_swap: peft must see the swapped blocks' real weights while it wraps their layers
        with placement.host_weights() if placement is not None else contextlib.nullcontext():
            if self.cfg.assistant_lora:
                self.load_assistant(transformer)
            try:
                transformer.add_adapter(self.lora_config(), adapter_name=TRAINED)
            except ValueError as e:
                raise ConfigError(f"config key 'lora_target_modules': {e}") from None
        if self.cfg.assistant_lora:
            activate(transformer, [ASSISTANT, TRAINED])
        if self.cfg.init_lora:
            with placement.host_weights() if placement is not None else contextlib.nullcontext():
                self.load_init(transformer)
        transformer.requires_grad_(False)
        for name, p in transformer.named_parameters():
            p.requires_grad_(f".{TRAINED}." in name or name.endswith(f".{TRAINED}"))  # LyCORIS parameters end in the adapter name
        params = [p for p in transformer.parameters() if p.requires_grad]
        for p in params:
            p.data = p.data.float()  # train LoRA in fp32 even when the base runs in bf16
        return params

    def watch(self, params: list[torch.nn.Parameter]) -> None:
        from trainer.distributed import local

        self.initial = [local(p).detach().to("cpu", copy=True) for p in params]  # LoRA weights are small; host RAM (own shard)
        self.no_gradient: set[int] | None = None

    def note_gradients(self, params: list[torch.nn.Parameter]) -> None:
        if self.no_gradient is None:  # once: a sync per tensor is fine at the first update
            from trainer.distributed import all_ranks_agree, local

            none = torch.tensor([p.grad is None or not bool(local(p.grad).any()) for p in params])
            self.no_gradient = set(all_ranks_agree(none).nonzero().flatten().tolist())  # no gradient on any rank

    def check_trained(self, params: list[torch.nn.Parameter], steps: int) -> list[str]:
        """The no-op guard. A LoRA whose weights never move (all lora_B still zero) renders exactly like the base
        model: a zero-initialised output layer, a frozen or offloaded copy being trained, a wrong target module, an
        optimizer that never sees the weights. Tensors whose first gradient is absent or all zero are structural
        (e.g. the last Qwen-Image block's text projections, whose output nothing reads) and only warned about, as long
        as the LoRA's output side moves somewhere."""
        from trainer.distributed import all_ranks_agree, local

        names = {id(p): n for n, p in self.adapter.transformer.named_parameters()} if self.adapter.transformer is not None else {}
        same = torch.tensor([torch.equal(local(p).detach().cpu(), p0) for p, p0 in zip(params, self.initial)])
        unchanged = all_ranks_agree(same).nonzero().flatten().tolist()  # unchanged on every rank's shard
        silent = self.no_gradient or set()
        up = [i for i in range(len(params)) if any(part in names.get(id(params[i]), "") + "." for part in OUTPUT_SIDE)]
        if len(unchanged) == len(params) or (up and set(up) <= set(unchanged)):
            side = {"lokr": "lokr_w1", "loha": "hada_w2_b"}.get(self.cfg.lora_type, "lora_B")
            what = "no LoRA weight has changed" if len(unchanged) == len(params) else f"every {side} (the adapter's output side) is unchanged"
            raise ValueError(
                f"after {steps} step(s) {what}: the LoRA would do nothing. Check that the loss is finite and learning_rate > 0, "
                "and that lora_target_modules names layers whose output reaches the prediction"
            )
        stuck = [i for i in unchanged if i not in silent]
        if stuck:
            raise ValueError(
                f"after {steps} step(s) {len(stuck)} LoRA tensor(s) that received gradients are still exactly at their initial "
                f"values (e.g. {names.get(id(params[stuck[0]]), stuck[0])}): the optimizer does not update them"
            )
        unused = sorted({module_of(names.get(id(params[i]), str(i))) for i in unchanged})
        return [f"{len(unused)} LoRA layer(s) receive no gradient in this model and stay at their initial values "
                f"(e.g. {unused[0]}); they do no harm, or leave them out of lora_target_modules"] if unused else []

    def read_key_file(self, key: str) -> tuple[Path, dict, dict | str | None]:
        """(path, diffusers-format state dict, metadata) of the LoRA file or folder config key `key` names, read by the
        family's own loader (any format it reads); ConfigError naming the key otherwise."""
        from trainer.config import ConfigError

        path = Path(getattr(self.cfg, key))
        path = path / LORA_FILE if path.is_dir() else path
        try:
            sd, metadata = self.adapter.pipeline_class.lora_state_dict(str(path), return_lora_metadata=True)
        except Exception as e:  # the loaders raise many types for foreign files
            raise ConfigError(f"config key '{key}': cannot read '{path}' ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
        return path, sd, metadata

    def load_assistant(self, transformer: torch.nn.Module) -> None:
        """cfg.assistant_lora as a frozen second adapter (any format the family's loader reads)."""
        from trainer.config import ConfigError
        from trainer.lora_format import lora_layers, mismatches

        path, sd, metadata = self.read_key_file("assistant_lora")
        bad = mismatches(lora_layers(sd), transformer)
        if bad:
            raise ConfigError(f"config key 'assistant_lora': {len(bad)} layer(s) of '{path.name}' do not fit this model (e.g. {bad[0]})")
        transformer.load_lora_adapter(sd, prefix="transformer", adapter_name=ASSISTANT, metadata=metadata)

    def load_init(self, transformer: torch.nn.Module) -> None:
        """cfg.init_lora into the fresh trained adapter: each layer's A as saved, its B scaled so that the layer's
        delta (B A x the file's alpha / rank, or 1 where its format folds alpha into the weights) is the file's under
        this run's lora_alpha / rank."""
        from trainer.config import ConfigError
        from trainer.lora_format import PREFIX, lora_layers

        path, sd, metadata = self.read_key_file("init_lora")
        layers = lora_layers(sd)
        own = dict(transformer.named_parameters())
        trained = {n.removesuffix(f".lora_A.{TRAINED}.weight") for n in own if n.endswith(f".lora_A.{TRAINED}.weight")}
        if not layers or any(not k.endswith((".lora_A.weight", ".lora_B.weight")) for k in sd):
            raise ConfigError(f"config key 'init_lora': '{path.name}' is not a plain LoRA (LoKr / LoHa / DoRA files cannot start one)")
        outside = sorted(set(layers) - trained)
        if outside:
            raise ConfigError(f"config key 'init_lora': {len(outside)} of its layers are not trained by this run (e.g. {outside[0]}); "
                              "add them to lora_target_modules")
        ranks = {r for r, _i, _o in layers.values()}
        if ranks != {self.cfg.rank} or self.cfg.rank_pattern:
            raise ConfigError(f"config key 'init_lora': its rank is {'/'.join(map(str, sorted(ranks)))}, this run's rank {self.cfg.rank}"
                              + (" (rank_pattern cannot be combined with it)" if self.cfg.rank_pattern else "; set rank to it"))
        r = next(iter(ranks))
        meta = json.loads(metadata) if isinstance(metadata, str) else (metadata or {})
        meta = {k.removeprefix(PREFIX): v for k, v in meta.items()}  # diffusers names the component: transformer.lora_alpha
        alpha = float(meta.get("lora_alpha", r))
        theirs = alpha / (r**0.5 if meta.get("use_rslora") else r)
        ours = (self.cfg.lora_alpha or self.cfg.rank) / (r**0.5 if self.cfg.use_rslora else r)
        with torch.no_grad():
            for module in layers:
                for side, factor in (("lora_A", 1.0), ("lora_B", theirs / ours)):
                    value = sd.get(f"{PREFIX}{module}.{side}.weight", sd.get(f"{module}.{side}.weight"))
                    own[f"{module}.{side}.{TRAINED}.weight"].copy_(value.to(torch.float32) * factor)
        logger.info("init_lora: %d of the %d trained layers start from %s", len(layers), len(trained), path)

    @contextlib.contextmanager
    def sampling(self, transformer: torch.nn.Module):
        """Previews without the assistant LoRA: the model as it will be used."""
        if not self.cfg.assistant_lora:
            yield
            return
        activate(transformer, [TRAINED])
        try:
            yield
        finally:
            activate(transformer, [ASSISTANT, TRAINED])

    @contextlib.contextmanager
    def without_training(self, transformer: torch.nn.Module):
        """The trained adapter off (an assistant LoRA stays on: it is part of the model being trained against)."""
        on = [ASSISTANT, TRAINED] if self.cfg.assistant_lora else [TRAINED]
        activate(transformer, [ASSISTANT] if self.cfg.assistant_lora else [])
        try:
            yield
        finally:
            activate(transformer, on)

    def state_dict(self, transformer: torch.nn.Module, whole: dict | None = None) -> dict[str, torch.Tensor]:
        """The trained LoRA tensors, whole (gathered from every rank when sharded: all ranks must call this);
        `whole`: the model's consolidated state dict, when the engine made one."""
        from trainer.distributed import full

        sd = get_peft_model_state_dict(transformer, state_dict=whole, adapter_name=TRAINED)
        return {k: full(v.detach()).to("cpu", torch.float32).contiguous() for k, v in sd.items()}

    def save(self, transformer: torch.nn.Module, directory: Path, final: bool = True, state_dict: dict | None = None) -> None:
        """Diffusers-format file loadable with `<Pipeline>.load_lora_weights(directory)` (LoKr: where diffusers reads
        it; LoHa: `trainer.pipelines.load_lora`), the adapter's peft config in its metadata."""
        from trainer.lora_format import CONFIG_KEY, VARIANT_KEY, add_metadata, dora_ratios, peft_metadata, save_comfyui

        layers = self.state_dict(transformer, state_dict)
        ratios = dora_ratios(transformer, TRAINED, state_dict) if self.cfg.use_dora and self.cfg.lora_format == "comfyui" else None
        if not self.is_main:
            return
        config = peft_metadata(self.lora_config())
        self.adapter.pipeline_class.save_lora_weights(directory, transformer_lora_layers=layers, transformer_lora_adapter_metadata=config)
        d = Path(directory)
        # tools can then say what a file is for, and rebuild any adapter type from the file alone
        add_metadata(d / LORA_FILE, {VARIANT_KEY: self.adapter.variant.name, CONFIG_KEY: json.dumps(config)})
        if self.cfg.lora_format == "comfyui":
            save_comfyui(d / LORA_FILE, d / COMFY_FILE, self.adapter, dora=ratios)

    def load(self, transformer: torch.nn.Module, directory: Path) -> None:
        """Restore the trainable LoRA weights written by `save` (exact, fp32)."""
        from safetensors.torch import load_file

        sd = load_file(str(Path(directory) / LORA_FILE))
        prefix = "transformer."
        sd = {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in sd.items()}
        result = set_peft_model_state_dict(transformer, sd, adapter_name=TRAINED)
        missing = [k for k in getattr(result, "missing_keys", []) if f".{TRAINED}" in k]
        if missing or getattr(result, "unexpected_keys", []):
            raise ValueError(f"checkpoint {directory} does not match this LoRA (missing {missing[:3]}, unexpected {result.unexpected_keys[:3]})")

    def checkpoint_files(self) -> tuple[str, ...]:
        return (LORA_FILE, self.engine_file) if self.engine_file else (LORA_FILE,)

    def published_files(self) -> tuple[str, ...]:
        return (LORA_FILE, COMFY_FILE)



def activate(transformer: torch.nn.Module, names: list[str]) -> None:
    """Make exactly these peft adapters active in every LoRA layer. (peft's own set_adapter also marks the active
    adapters trainable, which would give the frozen assistant gradients.)"""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in transformer.modules():
        if isinstance(module, BaseTunerLayer):
            module._active_adapter = [n for n in names if any(n in getattr(module, a, {}) for a in module.adapter_layer_names)]


def module_of(parameter_name: str) -> str:
    """The adapted module's path of an adapter parameter's name (...to_q.lora_A.default.weight -> ...to_q)."""
    import re

    return re.split(r"\.(lora_|lokr_|hada_)", parameter_name, maxsplit=1)[0]


def target_regex(names) -> str:
    """peft target_modules as one regex: each name matches a module path ending in it (peft's rule for a list of
    names), and `*` stands for one path component, e.g. `single_transformer_blocks.*.attn.to_out`, which picks a
    Linear that a plain `attn.to_out` would confuse with another block type's container of the same name; a name
    `re:<regex>` is a regex over the whole module path (peft matches the whole path: re.fullmatch)."""
    import re

    parts = [re.escape(n).replace(r"\*", r"[^.]+") for n in names if not n.startswith("re:")]
    full = [n[3:] for n in names if n.startswith("re:")]
    return "|".join(([r"(.*\.)?(" + "|".join(parts) + ")"] if parts else []) + [f"(?:{r})" for r in full])


def targets(names, module_name: str) -> bool:
    """Whether `module_name` is a LoRA target for these names (the same rule as target_regex)."""
    import re

    return re.fullmatch(target_regex(names), module_name) is not None
