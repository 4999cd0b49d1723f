"""Sharded training with FSDP2 (PyTorch's `fully_shard`, driven by accelerate) and its checkpoints.

Launch: `accelerate launch --config_file accelerate_configs/fsdp.yaml ...` (on GPUs), or with `ACCELERATE_USE_CPU=true`
in front on CPUs (gloo). The blocks that get their own shard group are the family's transformer blocks
(`_repeated_blocks` / `_no_split_modules` of its diffusers class), never class names typed into a YAML.

accelerate 1.15 selects FSDP only for accelerator devices (its AcceleratorState switches MULTI_GPU / MULTI_XPU / ...
to FSDP, never MULTI_CPU), so on CPU processes the trainer sets the distributed type itself when the launch asked
for FSDP; everything after that is accelerate's own FSDP2 path (`fsdp2_prepare_model`: `fully_shard` per block, then
the root), exactly as on GPUs. That is how the CPU tests run real sharding.

Checkpoints of a sharded run: `sharded/` is a torch.distributed.checkpoint (DCP) folder written by every rank at
once, holding the trained parameters, the optimizer state and the EMA as shards (fast, no gathering); resume reads
it back into the same sharding, every pickled piece through an allow-list (trainer/safe_load.py). The training method's usual files (the LoRA file; a full fine-tune's transformer
folder, consolidated at the end of the run) are gathered and written by rank 0 only.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from accelerate.utils import DistributedType

logger = logging.getLogger("trainer")

SHARDED_DIR = "sharded"  # the DCP folder inside a checkpoint of an FSDP run
DEEPSPEED_DIR = "deepspeed"  # the DeepSpeed engine's own checkpoint (ZeRO partitions) inside a checkpoint of a DeepSpeed run
ENGINE_FILES = {"FSDP": f"{SHARDED_DIR}/.metadata", "DEEPSPEED": f"{DEEPSPEED_DIR}/state/mp_rank_00_model_states.pt"}


def fsdp_requested() -> bool:
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def use_fsdp_on_cpu(accelerator) -> None:
    """Turn accelerate's plain multi-CPU mode into its FSDP2 mode when the launch asked for FSDP (see the module doc)."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    state = accelerator.state
    if not (fsdp_requested() and state.distributed_type == DistributedType.MULTI_CPU):
        return
    plugin = getattr(state, "fsdp_plugin", None) or FullyShardedDataParallelPlugin()  # the FSDP_* settings accelerate launch exported
    if plugin.fsdp_version != 2:
        from trainer.config import ConfigError

        raise ConfigError("the accelerate config asks for FSDP version 1; this trainer uses FSDP2 (fsdp_version: 2)")
    from accelerate.state import PartialState

    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = plugin
    # every later AcceleratorState() copies the process-level state over its own, as accelerate itself does here
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    logger.info("FSDP2 on %d CPU processes (gloo)", accelerator.num_processes)


def is_sharded(accelerator) -> bool:
    """The engine (FSDP2 or DeepSpeed ZeRO) holds the training state in per-rank pieces."""
    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def engine_name(accelerator) -> str:
    return accelerator.distributed_type.name


def wrap_family_blocks(accelerator, transformer: torch.nn.Module) -> list[str]:
    """One FSDP shard group per transformer block of the family (plus the root for the rest)."""
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    from trainer.quantize import repeated_blocks

    names = sorted({type(b).__name__ for b in repeated_blocks(transformer)})
    plugin = accelerator.state.fsdp_plugin
    plugin.auto_wrap_policy = transformer_auto_wrap_policy
    plugin.transformer_cls_names_to_wrap = names
    return names


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's part of a sharded tensor (FSDP2 DTensor, DeepSpeed ZeRO-3 partition; else the tensor itself)."""
    if hasattr(t, "to_local"):
        return t.to_local()
    return t.ds_tensor if hasattr(t, "ds_tensor") else t


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every rank (collective for a sharded one: every rank must call it, in the same order)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def all_ranks_agree(flags: torch.Tensor) -> torch.Tensor:
    """Elementwise AND of a bool vector across processes (each rank judges only its own shards)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return flags
    out = flags.to(torch.int32)
    dist.all_reduce(out, op=dist.ReduceOp.MIN)
    return out.bool()


def _state(model: torch.nn.Module, optimizer, ema: dict | None) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))
    return {"model": model_sd, "optim": optim_sd, **({"ema": ema} if ema else {})}


def save_sharded(directory: Path, model: torch.nn.Module, optimizer, ema: dict | None = None) -> None:
    """Every rank writes its shards of the trained parameters, optimizer state and EMA (collective)."""
    import torch.distributed.checkpoint as dcp

    dcp.save(_state(model, optimizer, ema), checkpoint_id=str(Path(directory) / SHARDED_DIR))


def load_sharded(directory: Path, model: torch.nn.Module, optimizer, ema: dict | None = None) -> None:
    """Read `save_sharded`'s folder back into the same sharding (collective); `ema` tensors are filled in place."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    from trainer.safe_load import dcp_load, dcp_reader

    state = _state(model, optimizer, ema)
    folder = str(Path(directory) / SHARDED_DIR)
    stored = dcp_reader(folder).read_metadata().state_dict_metadata
    missing = [k for k in state["model"] if f"model.{k}" not in stored]
    if missing:
        raise ValueError(f"{directory} does not hold these trained weights: {missing[:3]} ({len(missing)} in all)")
    # The template has optimizer state for every trained tensor (torch initialises it with a zero-gradient step); the
    # checkpoint has none for tensors that never got a gradient (e.g. LoRA layers whose output nothing reads).
    dcp_load(state, folder, allow_partial_load=True)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))  # frozen weights come from the base model


def consolidated_state_dict(model: torch.nn.Module) -> dict:
    """The whole model's state dict, gathered to rank 0's CPU (collective; other ranks get an empty dict)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().clone() for k, v in state.items()}  # own storage each (safetensors refuses the gathered views)


def save_engine_state(accelerator, directory: Path, prepared_model, optimizer, extra: dict | None) -> None:
    """The engine's per-rank training state (collective): FSDP2 via DCP, DeepSpeed via its own checkpoint (ZeRO
    partitions of the optimizer, the trained weights; frozen ones are left out)."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        prepared_model.save_checkpoint(str(Path(directory) / DEEPSPEED_DIR), tag="state", save_latest=False, exclude_frozen_parameters=True)
    else:
        save_sharded(directory, accelerator.unwrap_model(prepared_model), optimizer, extra)


def verify_engine_files(directory: Path) -> None:
    """Read an engine checkpoint's pickles through the allow-list (trainer/safe_load.py) before anything loads them:
    a file that would build or call anything but data refuses the resume with one line naming it."""
    from trainer.safe_load import DEEPSPEED_ALLOWED, check_pickles, dcp_reader

    if (Path(directory) / SHARDED_DIR / ".metadata").is_file():
        dcp_reader(Path(directory) / SHARDED_DIR).read_metadata()
    if (Path(directory) / DEEPSPEED_DIR).is_dir():
        check_pickles(Path(directory) / DEEPSPEED_DIR, DEEPSPEED_ALLOWED)


def load_engine_state(accelerator, directory: Path, prepared_model, optimizer, extra: dict | None) -> None:
    verify_engine_files(directory)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        prepared_model.load_checkpoint(str(Path(directory) / DEEPSPEED_DIR), tag="state", load_module_strict=False,
                                       load_optimizer_states=True, load_lr_scheduler_states=False)
    else:
        load_sharded(directory, accelerator.unwrap_model(prepared_model), optimizer, extra)


def gathered_state_dict(accelerator, prepared_model) -> dict | None:
    """DeepSpeed: the whole model's state dict, consolidated by accelerate (ZeRO-3 gathers; collective). None
    otherwise (FSDP2 methods gather their own tensors; single-process and DDP models are whole)."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return None
    return accelerator.get_state_dict(prepared_model)
