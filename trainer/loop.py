"""The one training loop. Every family plugs in through a ModelAdapter, every training method through a
TrainingMethod; nothing here knows about packing, LoRA or a family.

    train(cfg, adapter_cls)
        setup         checks and dataset scan (before any model loads), accelerator, resume point, encoders and
                      the embedding cache, transformer + training method, optimizer, data loader
        run           epochs of `train_step` (one micro-batch) and `after_update` (logs, checkpoints, samples)
        finish        final checkpoint published to output_dir, summary, loss curve
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import signal
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, DistributedType, ProjectConfiguration, set_seed
from diffusers.optimization import get_scheduler
from omegaconf import OmegaConf

from image_datasets import CaptionDataset, SizeGroupedBatchSampler, collate
from image_datasets.captions import CaptionRule, names, replace_word
from trainer import flow_matching as fm
from trainer import output_dir
from trainer.checkpoint import (
    CheckpointWriteError,
    TrainState,
    atomic_copy,
    latest_checkpoint,
    load_training_state,
    restore,
    save_checkpoint,
)
from trainer.cache import gc_paused
from trainer.output_dir import release_lock
from trainer.config import ConfigError, TrainConfig, caching_note, inside
from trainer.constants import CONFIG_FILE, CONTROLNET_DIR, LOG_FILE, STATE_FILE, torch_dtype
from trainer.data import scan_for_training
from trainer.distributed import (
    ENGINE_FILES,
    engine_name,
    gathered_state_dict,
    is_sharded,
    load_engine_state,
    save_engine_state,
    use_fsdp_on_cpu,
    verify_engine_files,
    wrap_family_blocks,
)
from trainer.methods import TrainingMethod, make_method
from trainer.models.base import ModelAdapter
from trainer.optim import make_optimizer
from trainer.report import TrainLog, plot_losses, read_log, write_summary
from trainer.validation import Validator

logger = logging.getLogger("trainer")
# We step the schedule on skipped (non-finite) updates on purpose, to keep it aligned with global_step.
warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before `optimizer.step\(\)`")

# Keys whose change makes a resumed run a different experiment (the training method adds its own).
RESUME_KEYS = (
    "pretrained_model_name_or_path",
    "data_config.img_size",
    "data_config.train_batch_size",
    "data_config.datasets",  # their weights decide which samples each epoch draws
    "control_type",
    "gradient_accumulation_steps",
    "seed",
)


class TrainingError(RuntimeError):
    """A problem found while training that the user must act on; printed as one line."""


class Interrupted(RuntimeError):
    pass


class NothingToTrain(Exception):
    """The checkpoint resumed from has reached max_train_steps / num_train_epochs already: its weights are published
    and the run ends at once (exit status 0, so a re-queued job that finished does not count as failed)."""

    def __init__(self, message: str, final: Path):
        super().__init__(message)
        self.final = final


@dataclass
class Run:
    """Everything one training run holds; built by `setup`, advanced by `train_step` / `after_update`."""

    cfg: TrainConfig
    out: Path
    accelerator: Accelerator
    adapter: ModelAdapter
    method: TrainingMethod
    transformer: torch.nn.Module  # as prepared by accelerate (DDP-wrapped with several processes)
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    sampler: SizeGroupedBatchSampler
    loader: torch.utils.data.DataLoader
    encode: Callable[[dict], tuple[torch.Tensor, dict]]  # collated batch -> (latents, conditioning), cached or live
    validator: Validator
    state: TrainState
    log: TrainLog
    config_yaml: str
    run_id: str  # the run that owns output_dir (trainer/output_dir.py)
    step_losses: list[torch.Tensor] = field(default_factory=list)  # micro-batch losses of the update in progress
    step_extras: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # further terms to log (e.g. dop_loss), per micro-batch
    step_paths: list[str] = field(default_factory=list)
    checked: bool = False  # the training method's no-op guard ran
    lr_applied: float = 0.0  # the largest learning rate an update has used so far (a warm-up starts at 0)
    saved_step: int = -1  # global_step of the last checkpoint this run wrote


@dataclass
class Update:
    """What one optimizer step produced (tensors stay on the device until the log flushes)."""

    loss: torch.Tensor
    grad_norm: torch.Tensor
    finite: bool
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # further loss terms, logged beside the loss


def train(cfg: TrainConfig, adapter_cls: type[ModelAdapter]) -> Path:
    """Run training to cfg.max_train_steps; returns the path of the final weights file."""
    try:
        try:
            run = setup(cfg, adapter_cls)  # freezes the samples out of the cyclic collector (gc.freeze) for the run
        except NothingToTrain as e:
            logger.info("%s", e)
            return e.final
        except KeyboardInterrupt:  # Ctrl-C while scanning, caching or loading: nothing trained yet
            raise Interrupted("interrupted before training started; nothing was trained (embedding cache entries written so far "
                              "are kept and reused). Run the same command again to start") from None
        if cfg.validation_at_start and run.state.global_step == 0:
            render_samples(run)  # samples/step-0.png: the base model, to compare the later samples with
        with StopRequest() as stop:
            while run.state.global_step < cfg.max_train_steps and stop.signum is None and not epochs_done(run):
                run.sampler.set_epoch(run.state.epoch, run.state.batch_in_epoch)
                for batch in run.loader:
                    update = train_step(run, batch)
                    run.state.batch_in_epoch += 1
                    if update is not None and after_update(run, update, stop):
                        break
                else:
                    run.state.epoch += 1
                    run.state.batch_in_epoch = 0
            if stop.signum is not None and 0 < run.state.global_step != run.saved_step:
                save_now(run, final=True)  # the stop came between updates (e.g. while an epoch's loader wound down)
        return finish(run, stop)
    except KeyboardInterrupt:  # the second Ctrl-C: stop at once
        latest = latest_checkpoint(Path(cfg.output_dir), run_id=run.run_id)
        raise Interrupted(f"aborted at step {run.state.global_step} without saving; "
                          + (f"the latest checkpoint is {latest.name}: resume with resume_from_checkpoint=latest" if latest
                             else "no checkpoint of this run exists yet")) from None
    finally:
        gc.unfreeze()
        release_lock(Path(cfg.output_dir), id(cfg))


def epochs_done(run: Run) -> bool:
    """num_train_epochs (FlyMyAI's key) reached; max_train_steps may end the run earlier."""
    return run.cfg.num_train_epochs is not None and run.state.epoch >= run.cfg.num_train_epochs


# --- setup ------------------------------------------------------------------------------------------------


def setup(cfg: TrainConfig, adapter_cls: type[ModelAdapter]) -> Run:
    out = Path(cfg.output_dir)
    adapter_cls.check_setup(cfg)
    probe_output_dir(out)
    if cfg.save_cache_on_disk:
        probe_output_dir(cache_folder(cfg, out), "cache_dir")
    accelerator = make_accelerator(cfg, out)
    adapter = adapter_cls.from_model(cfg, accelerator.device, torch_dtype(cfg.mixed_precision))
    method = make_method(cfg, adapter)
    method.is_main, method.sharded = accelerator.is_main_process, is_sharded(accelerator)
    method.engine_file = ENGINE_FILES.get(engine_name(accelerator))
    method.check_setup()
    run_id = claim_output_dir(cfg, out, method, accelerator)
    samples = build_dataset(cfg, adapter, accelerator, out)  # before any model loads: a bad dataset costs seconds, not a model load
    # The samples live for the whole run: kept out of the collector's generations (made while it was paused), the
    # collections that follow (those that free the encoders, too) do not walk a million of them.
    gc.freeze()
    fingerprint = dataset_fingerprint(samples)
    resume_from, payload = find_resume_point(cfg, out, method, fingerprint, run_id)
    if payload is not None and nothing_left(cfg, payload["train_state"]):
        step = payload["train_state"]["global_step"]
        final = publish(resume_from, out, method.published_files(), accelerator.is_main_process)
        raise NothingToTrain(f"nothing to train: {resume_from} is at step {step} (epoch {payload['train_state']['epoch']}) and the run "
                             f"ends at max_train_steps={cfg.max_train_steps}" + (f" / num_train_epochs={cfg.num_train_epochs}" if cfg.num_train_epochs else "")
                             + f"; its weights are in {final}. Raise max_train_steps to train further", final)
    if resume_from is not None:  # an engine's checkpoint resumes with that engine only
        written_by = next((name for name, f in ENGINE_FILES.items() if (resume_from / f).is_file()), "plain")
        running = engine_name(accelerator) if method.sharded else "plain"
        if written_by != running:
            raise ConfigError(f"resume_from_checkpoint: {resume_from} was written by a {written_by} run, this one is {running}; "
                              "resume it with the accelerate config it was trained with")
    sampler = make_sampler(cfg, samples, accelerator)
    gc.freeze()  # and the sampler's lists

    logger.info("loading %s from %s in %s", adapter.variant.name, cfg.pretrained_model_name_or_path, adapter.weight_dtype)
    validator, encode, cached = prepare_conditioning(cfg, adapter, samples, accelerator, out)
    transformer, params = load_trainable(cfg, adapter, method)
    if engine_name(accelerator) == "FSDP":
        logger.info("FSDP2: one shard group per %s", ", ".join(wrap_family_blocks(accelerator, transformer)))
    optimizer = make_optimizer(cfg, method.param_groups(params))
    # Stepped by us once per optimizer step (not prepared), so warm-up and length mean optimizer steps.
    lr_scheduler = get_scheduler(scheduler_name(cfg), optimizer, num_warmup_steps=cfg.lr_warmup_steps, num_training_steps=cfg.max_train_steps)
    transformer, optimizer = accelerator.prepare(transformer, optimizer)
    if accelerator.distributed_type == DistributedType.FSDP:  # fully_shard replaced the parameters with sharded ones
        params = [p for p in accelerator.unwrap_model(transformer).parameters() if p.requires_grad]
    method.prepared(params)
    loader = make_loader(cfg, adapter, samples, sampler, accelerator.device, cached)

    state = TrainState()
    if payload is not None:
        model = accelerator.unwrap_model(transformer)
        if method.sharded:
            load_engine_state(accelerator, resume_from, transformer, optimizer.optimizer, method.sharded_state())
            method.sharded_state_loaded()
        else:
            method.load(model, resume_from)
        state = restore(payload, None if method.sharded else optimizer, lr_scheduler)
        logger.info("resumed from %s at step %d (epoch %d, batch %d)", resume_from, state.global_step, state.epoch, state.batch_in_epoch)
    elif cfg.resume_from_checkpoint == "latest":
        logger.info("resume_from_checkpoint=latest: no checkpoint in %s yet, starting fresh", out)
    method.watch(params)  # the weights as this run starts them (fresh or resumed), for the no-op guard
    state.extra["dataset"] = fingerprint
    total = planned_steps(cfg, sampler)
    if total < cfg.max_train_steps and accelerator.is_main_process:
        logger.info("num_train_epochs=%d ends the run at step %d (%d update(s) per epoch), before max_train_steps=%d",
                    cfg.num_train_epochs, total, len(sampler) // cfg.gradient_accumulation_steps, cfg.max_train_steps)
    log = TrainLog(out / LOG_FILE, accelerator, total, state.global_step, state.elapsed_seconds)
    if accelerator.is_main_process:
        project = (cfg.wandb_project_name or cfg.tracker_project_name) if cfg.report_to in ("wandb", "all") else cfg.tracker_project_name
        accelerator.init_trackers(project, config=flat_config(cfg), init_kwargs=tracker_kwargs(cfg))
        logger.info(
            "%d images, %d batches/epoch, batch %d x accumulation %d x %d process(es), %s trainable %s parameters",
            len(samples), len(sampler), cfg.data_config.train_batch_size, cfg.gradient_accumulation_steps,
            accelerator.num_processes, f"{sum(p.numel() for p in params):,}", method.name,
        )
    return Run(cfg, out, accelerator, adapter, method, transformer, params, optimizer, lr_scheduler, sampler, loader, encode,
               validator, state, log, OmegaConf.to_yaml(OmegaConf.structured(cfg)), run_id)


def scheduler_name(cfg: TrainConfig) -> str:
    """diffusers' schedule for cfg.lr_scheduler. Its `constant` ignores warm-up; with lr_warmup_steps the user asked
    for one, so it becomes `constant_with_warmup` (said once in the log)."""
    if cfg.lr_scheduler == "constant" and cfg.lr_warmup_steps > 0:
        logger.info("lr_scheduler: constant with lr_warmup_steps=%d: the learning rate rises linearly over those steps, then stays "
                    "constant (constant_with_warmup)", cfg.lr_warmup_steps)
        return "constant_with_warmup"
    return cfg.lr_scheduler


def planned_steps(cfg: TrainConfig, sampler) -> int:
    """Optimizer steps this run will take: max_train_steps, or fewer when num_train_epochs ends it first."""
    if cfg.num_train_epochs is None:
        return cfg.max_train_steps
    return min(cfg.max_train_steps, cfg.num_train_epochs * (len(sampler) // cfg.gradient_accumulation_steps))


def claim_output_dir(cfg: TrainConfig, out: Path, method: TrainingMethod, accelerator: Accelerator) -> str:
    """The main process decides whether this run may use output_dir and takes its lock (trainer/output_dir.py);
    every process gets the verdict, so all of them stop alike. Returns the run id."""
    verdict: list = [None]
    if accelerator.is_main_process:
        try:
            verdict[0] = ("ok", output_dir.claim(out, cfg, resumes_inside(cfg, out, method), cache_folder(cfg, out)))
        except ConfigError as e:
            verdict[0] = ("error", str(e))
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(verdict)
    kind, value = verdict[0]
    if kind == "error":
        raise output_dir.OutputDirError(value)
    return value


def resumes_inside(cfg: TrainConfig, out: Path, method: TrainingMethod) -> bool:
    """The run continues from a checkpoint in output_dir (rather than starting there, fresh or from elsewhere)."""
    if cfg.resume_from_checkpoint == "latest":
        return latest_checkpoint(out, method.checkpoint_files(), output_dir.folder_run_id(out)) is not None
    return bool(cfg.resume_from_checkpoint) and inside(cfg.resume_from_checkpoint, out)


def cache_folder(cfg: TrainConfig, out: Path) -> Path:
    """Where the embedding cache and the scan index live: cache_dir, or <output_dir>/cache."""
    return Path(cfg.cache_dir) if cfg.cache_dir else out / "cache"


def nothing_left(cfg: TrainConfig, train_state: dict) -> bool:
    return train_state["global_step"] >= cfg.max_train_steps or (
        cfg.num_train_epochs is not None and train_state["epoch"] >= cfg.num_train_epochs)


def publish(ckpt: Path, out: Path, files: tuple[str, ...], is_main: bool) -> Path:
    """Copy the checkpoint's weights (those of `files` it has) into output_dir; returns the first file's path there,
    after making sure it exists (a run never reports weights it did not write)."""
    if is_main:
        for name in files:
            if (ckpt / name).exists() and Path(ckpt).resolve() != out.resolve():
                try:
                    atomic_copy(ckpt / name, out / name)
                except CheckpointWriteError as e:
                    raise TrainingError(f"{e} (the weights are in {ckpt})") from None
        if not (out / files[0]).exists():
            raise TrainingError(f"{ckpt} holds no {files[0]}, so none was published in {out}; the checkpoint is incomplete")
    return out / files[0]


def probe_output_dir(output_dir: Path, key: str = "output_dir") -> None:
    """Fail at start-up, not after hours, when checkpoints (or cache entries) cannot be written."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / f".write-probe-{os.getpid()}"  # one per process: they all probe at once
        probe.write_bytes(b"\0" * 1024 * 1024)
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"config key '{key}': cannot write to '{output_dir}' ({e.strerror or e})") from None


def make_accelerator(cfg: TrainConfig, out: Path) -> Accelerator:
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true" and not torch.cuda.is_available() \
            and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        without_deepspeed_shared_memory()
    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        mixed_precision=cfg.mixed_precision,
        log_with=make_trackers(cfg) or None,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / cfg.logging_dir)),
        # The last block's text-stream projections feed nothing (only image tokens leave the model), so their LoRA
        # gets no gradient; DDP must be told or it waits for them forever.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    engine = accelerator.distributed_type.name
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise ConfigError(
            f"accelerate launched {launched} processes, but they did not join one training ({engine} with {accelerator.num_processes} "
            f"process(es) each): they would train {launched} separate copies into one output_dir. "
            + (f"{engine} needs CUDA GPUs here; on the CPU use ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes N"
               if torch.cuda.device_count() == 0 else "check the accelerate config (distributed_type, use_cpu)")
        )
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true" and accelerator.distributed_type.name == "MULTI_CPU":
        raise ConfigError("the accelerate config asks for DeepSpeed, but these are CPU processes (ACCELERATE_USE_CPU), where accelerate runs "
                          "plain data parallelism instead; use accelerate_configs/fsdp.yaml for sharding on CPUs, or DeepSpeed on CUDA GPUs")
    use_fsdp_on_cpu(accelerator)
    engine = accelerator.distributed_type.name
    if engine == "DEEPSPEED" and cfg.quantize != "none":
        raise ConfigError(f"config key 'quantize' ({cfg.quantize}) is not supported with DeepSpeed here; use plain data parallelism "
                          "(accelerate_configs/multi_gpu_ddp.yaml) for a quantized base, or quantize: none")
    if engine == "DEEPSPEED" and cfg.ema_decay:
        raise ConfigError("config key 'ema_decay' is not supported with DeepSpeed (ZeRO partitions the weights it averages); "
                          "use FSDP (accelerate_configs/fsdp.yaml) or one process")
    if engine == "FSDP" and cfg.quantize != "none":
        raise ConfigError(f"config key 'quantize' is {cfg.quantize}, but FSDP shards the weights itself and cannot shard quantized ones; "
                          "use quantize: none (FSDP spreads the bf16 weights over the GPUs instead)")
    if engine == "FSDP" and cfg.optimizer == "adamw8bit":
        key = next((k for k in ("use_8bit_adam", "adam8bit") if getattr(cfg, k)), "optimizer")
        fix = f"{key}=false optimizer=adamw" if key != "optimizer" else "optimizer=adamw"
        raise ConfigError(f"config key '{key}' selects adamw8bit, whose bitsandbytes kernels cannot update FSDP's sharded tensors; with FSDP "
                          f"add {fix} (its state is sharded too: 1/N of 8 bytes per trained weight on each of N GPUs; "
                          "utils/estimate_memory.py counts it), or keep adamw8bit with data parallelism (accelerate_configs/multi_gpu_ddp.yaml)")
    if engine == "FSDP" and accelerator.mixed_precision != "no":
        accelerator.state.fsdp_plugin.set_mixed_precision(accelerator.mixed_precision)
    if cfg.blocks_to_swap and engine in ("FSDP", "DEEPSPEED"):
        raise ConfigError(f"config key 'blocks_to_swap' does not work with {engine} (it shards the weights itself); use DDP or set blocks_to_swap: 0")
    if engine == "DEEPSPEED":
        # DeepSpeed sizes its engine from the micro-batch; without a prepared DataLoader it must be told (else
        # accelerator.prepare fails after the model has loaded). Accumulation is the trainer's.
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = cfg.data_config.train_batch_size
        if ds.get("gradient_accumulation_steps") not in (None, "auto", cfg.gradient_accumulation_steps):
            logger.warning("DeepSpeed config gradient_accumulation_steps=%s replaced by the trainer's %d",
                           ds["gradient_accumulation_steps"], cfg.gradient_accumulation_steps)
        ds["gradient_accumulation_steps"] = cfg.gradient_accumulation_steps
    if cfg.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    set_seed(cfg.seed)
    return accelerator


def without_deepspeed_shared_memory() -> None:
    """One DeepSpeed process without CUDA has no peer to share memory with, yet DeepSpeed's communication backend
    compiles its shared-memory allreduce (a C++ extension: ~25 s on 2 CPUs, on the first run on a machine) when it
    starts; marked unavailable, it uses plain torch.distributed (gloo) as it would on any platform without the op."""
    import deepspeed.ops
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False


def build_dataset(cfg: TrainConfig, adapter: ModelAdapter, accelerator: Accelerator | None = None, out: Path | None = None) -> list:
    """Scan and check the dataset (references sized by the family) and refuse it when it is unusable.

    The main process scans first and records every file it checked (size, mtime, oriented size, sha256) in the scan
    index beside the cache; the other processes then scan against that index (a stat per file), as does every later
    run for the files that did not change. Every process reaches the same verdict and raises its own error."""
    from image_datasets import scan_index

    index_path = cache_folder(cfg, Path(out or cfg.output_dir)) / scan_index.FILE_NAME
    error = None
    context = accelerator.main_process_first() if accelerator is not None else contextlib.nullcontext()
    with context, gc_paused():
        index = scan_index.ScanIndex(index_path, writable=accelerator is None or accelerator.is_main_process)
        scan_index.use(index)
        try:
            samples = _checked_samples(cfg, adapter)
        except ConfigError as e:  # raised after the barrier, so the other processes are not left waiting
            error = e
        finally:
            index.commit()
        if index.hits or index.misses:
            logger.info("dataset scan: %d file(s) known from %s, %d checked", index.hits, index_path, index.misses)
    if error is not None:
        raise error
    return samples


def _checked_samples(cfg: TrainConfig, adapter: ModelAdapter) -> list:
    d = cfg.data_config
    scan = scan_for_training(cfg, adapter)
    for w in scan.warnings:
        logger.warning(w)
    if scan.problems:
        listing = "\n  ".join(scan.problems)
        if not d.skip_bad_files or not scan.samples:
            raise ConfigError(
                f"data_config: {len(scan.problems)} unusable file(s) or row(s) in "
                f"{', '.join(repr(p.metadata_file or p.img_dir or p.webdataset or p.hf_dataset) for p in d.parts())} "
                f"(fix them, or set data_config.skip_bad_files=true to skip those samples):\n  {listing}"
            )
        logger.warning("skipping %d unusable file(s) or row(s):\n  %s", len(scan.problems), listing)
    check_validation_references(cfg, adapter)
    return scan.samples


def check_validation_references(cfg: TrainConfig, adapter: ModelAdapter) -> None:
    """Validation previews render at every validation_steps: a reference the pipeline refuses, or one too many,
    must stop the run now, not after the first hours of training."""
    from image_datasets.images import oriented_size
    from trainer.validation import validation_entries

    rule = adapter.reference_rule()
    for i, (_prompt, paths) in enumerate(validation_entries(cfg)):
        if paths and not rule.low <= len(paths) <= rule.high:
            raise ConfigError(f"config key 'validation_prompts[{i}]': {len(paths)} reference image(s); a {rule.model} model takes "
                              f"{rule.low} to {rule.high}")
        for p in paths:
            problem = rule.size_problem(p, *oriented_size(Path(p)))
            if problem:
                raise ConfigError(f"config key 'validation_prompts[{i}]': {problem}")


def dataset_fingerprint(samples: list) -> str:
    import hashlib

    h = hashlib.sha256()
    for s in samples:
        st = s.image.stat()
        h.update(f"{s.image.name}\0{st.st_size}\0{s.caption}\0{s.size}\n".encode())
    return h.hexdigest()[:16]


def find_resume_point(cfg: TrainConfig, out: Path, method: TrainingMethod, fingerprint: str,
                      run_id: str | None = None) -> tuple[Path | None, dict | None]:
    """(checkpoint folder, its training state) to resume from, after checking it is a complete checkpoint of this
    training method and the same experiment. `latest` = the newest complete checkpoint of the run owning output_dir."""
    resume_from = None
    if cfg.resume_from_checkpoint == "latest":
        resume_from = latest_checkpoint(out, method.checkpoint_files(), run_id)
    elif cfg.resume_from_checkpoint:
        resume_from = Path(cfg.resume_from_checkpoint)
    if resume_from is None:
        return None, None
    check_checkpoint(resume_from, cfg, method)
    verify_engine_files(resume_from)  # before any model loads
    try:
        payload = load_training_state(resume_from)
        payload["train_state"]["global_step"], payload["train_state"]["epoch"], payload["train_state"]["extra"]  # noqa: B018
    except Exception as e:  # a damaged, foreign or unsafe file (weights_only refuses code)
        raise ConfigError(f"resume_from_checkpoint: {resume_from / STATE_FILE} cannot be loaded as a training state "
                          f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else 'damaged'}); resume from another checkpoint") from None
    check_resume_compatible(cfg, resume_from, RESUME_KEYS + method.resume_keys, fingerprint, payload["train_state"]["extra"].get("dataset"))
    return resume_from, payload


def check_checkpoint(ckpt: Path, cfg: TrainConfig, method: TrainingMethod) -> None:
    """A checkpoint folder of this training method with every file resuming reads; else one line saying what is wrong."""
    if not ckpt.is_dir():
        raise ConfigError(f"resume_from_checkpoint: '{ckpt}' is not a checkpoint folder (use 'latest', or a checkpoint-N folder)")
    try:
        saved = OmegaConf.load(ckpt / CONFIG_FILE)
        saved_method = OmegaConf.select(saved, "training_method", default="lora")
    except Exception:
        saved_method = None
    if saved_method is not None and saved_method != cfg.training_method:
        raise ConfigError(f"resume_from_checkpoint: {ckpt} was trained with training_method: {saved_method}, this run is "
                          f"{cfg.training_method}; resume it with the same training method")
    missing = [f for f in (STATE_FILE, CONFIG_FILE, *method.checkpoint_files()) if not (ckpt / f).is_file()]
    if missing:
        raise ConfigError(f"resume_from_checkpoint: {ckpt} is incomplete (missing {', '.join(missing)}); resume from another "
                          "checkpoint (resume_from_checkpoint=latest picks the newest complete one)")


def check_resume_compatible(cfg: TrainConfig, ckpt: Path, keys: tuple[str, ...], fingerprint: str, saved_fingerprint: str | None) -> None:
    saved = OmegaConf.load(ckpt / CONFIG_FILE)
    now = OmegaConf.structured(cfg)
    defaults = OmegaConf.structured(TrainConfig)  # a key the saving version did not have yet held its default
    before = {k: OmegaConf.select(saved, k, default=OmegaConf.select(defaults, k)) for k in keys}
    changed = [f"{k}: {before[k]!r} -> {OmegaConf.select(now, k)!r}" for k in keys if before[k] != OmegaConf.select(now, k)]
    if saved_fingerprint is not None and saved_fingerprint != fingerprint:
        changed.append("dataset content (images or captions) changed")
    if changed and cfg.resume_allow_config_change:
        logger.warning("resuming %s although the setup changed (resume_allow_config_change): %s", ckpt, "; ".join(changed))
    elif changed:
        raise ConfigError(
            f"resume_from_checkpoint: {ckpt} was trained with a different setup ({'; '.join(changed)}); "
            "resume with the same config, start a new output_dir, or set resume_allow_config_change=true"
        )


def make_sampler(cfg: TrainConfig, samples: list, accelerator: Accelerator) -> SizeGroupedBatchSampler:
    # Batches are known as soon as the process count is: a dataset too small for them fails before any model loads.
    sampler = SizeGroupedBatchSampler(
        [s.group for s in samples], cfg.data_config.train_batch_size, cfg.seed, accelerator.process_index, accelerator.num_processes,
        shares=cfg.data_config.sampling_weights(), datasets=[s.dataset for s in samples],
    )
    if cfg.num_train_epochs is not None and len(sampler) < cfg.gradient_accumulation_steps:
        raise ConfigError(
            f"config key 'num_train_epochs': an epoch is {len(sampler)} batch(es) per process, fewer than gradient_accumulation_steps="
            f"{cfg.gradient_accumulation_steps}, so no optimizer step would be taken; add images or lower gradient_accumulation_steps")
    if len(sampler) == 0:
        raise ConfigError(
            f"data_config: no full batch of {cfg.data_config.train_batch_size} x {accelerator.num_processes} process(es) can be formed from "
            f"{len(samples)} sample(s) of equal size; lower train_batch_size or use data_config.bucketing"
        )
    return sampler


def prepare_conditioning(cfg: TrainConfig, adapter: ModelAdapter, samples: list, accelerator: Accelerator, out: Path):
    """Load the encoders, encode validation prompts and (when asked) every sample into the embedding cache, then
    free what is no longer needed before the transformer loads. Returns (validator, encode function, the disk cache's
    per-sample reader for the data loader or None)."""
    from trainer.cache import EmbeddingCache, build_split

    adapter.load_encoders()
    problems = adapter.check_sequences(samples)  # raises when a sample's conditioning cannot run at all
    for line in problems[:20]:
        logger.warning(line)
    if len(problems) > 20:
        logger.warning("... and %d more sample(s) with the same problem", len(problems) - 20)
    validator = Validator(adapter, cfg, samples)
    validator.prepare()  # prompt embeddings now, while the text encoders are loaded
    if accelerator.is_main_process:
        logger.info(caching_note(cfg))
    if not (cfg.precompute_text_embeddings or cfg.precompute_image_embeddings):
        return validator, adapter.encode_batch, None
    directory = cache_folder(cfg, out) if cfg.save_cache_on_disk else None
    cache = EmbeddingCache(adapter, samples, cfg, directory, batch_size=cfg.cache_batch_size)
    # A disk cache is built by all processes together (each its share), then read by all; a RAM cache by each.
    rank, world = build_split(accelerator, directory) if directory is not None else (0, 1)
    dropout = any(p.caption_dropout_rate > 0 for p in cfg.data_config.parts())
    cache.build(cfg.precompute_text_embeddings, cfg.precompute_image_embeddings, dropout, rank, world)
    accelerator.wait_for_everyone()
    # Freed before the transformer loads: on a 24 GB card the encoders and the transformer never coexist.
    if cfg.precompute_text_embeddings:
        adapter.free_text_encoders()
    if cfg.precompute_image_embeddings and not validator.items:  # sampling still decodes with it
        adapter.free_vae()

    def encode(batch: dict) -> tuple[torch.Tensor, dict]:
        latents, extra = cache.batch_latents(batch) if cfg.precompute_image_embeddings else adapter.encode_latents(batch)
        text = cache.batch_text(batch) if cfg.precompute_text_embeddings else adapter.encode_text(batch)
        return latents, {**text, **extra}

    return validator, encode, cache.reader(cfg.precompute_text_embeddings, cfg.precompute_image_embeddings)


def load_trainable(cfg: TrainConfig, adapter: ModelAdapter, method: TrainingMethod) -> tuple[torch.nn.Module, list]:
    """The placed transformer with the training method attached; returns (transformer, trainable parameters)."""
    adapter.load_transformer()
    if cfg.blocks_to_swap and adapter.device.type == "cpu":
        logger.warning("blocks_to_swap=%d on the CPU: weights are in host RAM anyway, swapping only adds copies", cfg.blocks_to_swap)
    adapter.configure_attention()
    transformer = adapter.transformer
    params = method.attach(transformer, adapter.placement)
    if cfg.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    if cfg.torch_compile:
        transformer.compile_repeated_blocks()  # diffusers' regional compile: each block type compiled once
    return method.trained_model(transformer), params


def make_loader(cfg: TrainConfig, adapter: ModelAdapter, samples: list, sampler, device: torch.device, cached=None) -> torch.utils.data.DataLoader:
    d = cfg.data_config
    need_pixels = not cfg.precompute_image_embeddings or (not cfg.precompute_text_embeddings and adapter.text_needs_pixels)
    parts = d.parts()
    dataset = CaptionDataset(samples, [p.caption_dropout_rate for p in parts], d.random_ratio, cfg.seed, load_pixels=need_pixels,
                             empty_caption=adapter.empty_prompt, reference_transform=adapter.reference_transform(),
                             keep_alpha=adapter.pixel_channels == 4, cached=cached,
                             captions=[CaptionRule.of(p) if p.shuffle_tags else None for p in parts], aligned_controls=adapter.aligned_controls,
                             random_masks=adapter.masks_are_inputs)
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=d.num_workers,
                                       pin_memory=device.type == "cuda")


def make_trackers(cfg: TrainConfig) -> list[str]:
    import importlib.util

    wanted = ["tensorboard", "wandb"] if cfg.report_to == "all" else [] if cfg.report_to == "none" else [cfg.report_to]
    found = []
    for name in wanted:
        if importlib.util.find_spec(name) is None:
            logger.warning("report_to=%s but %s is not installed (pip install %s); not logging to it", name, name, name)
        else:
            found.append(name)
    return found


def tracker_kwargs(cfg: TrainConfig) -> dict:
    """wandb's run name, entity and tags (FlyMyAI's keys; the project is the tracker's project name), passed by
    accelerate to wandb.init."""
    wandb = {k: v for k, v in {"name": cfg.wandb_run_name, "entity": cfg.wandb_entity, "tags": list(cfg.wandb_tags) or None}.items()
             if v is not None}
    return {"wandb": wandb} if wandb else {}


def flat_config(cfg: TrainConfig) -> dict:
    flat = OmegaConf.to_container(OmegaConf.structured(cfg))
    out = {}

    def walk(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)

    walk(flat)
    return out


# --- run ----------------------------------------------------------------------------------------------------


def train_step(run: Run, batch: dict) -> Update | None:
    """One micro-batch: encode, loss, backward; on the last micro-batch of an optimizer step also the gradient
    norm, clipping and the update (skipped when anything is non-finite). Returns the Update at an optimizer step,
    None while accumulating."""
    cfg, acc = run.cfg, run.accelerator
    latents, cond = run.encode(batch)
    if batch.get("control_modes") is not None:  # a Union ControlNet's mode per sample (not cached: it is the dataset's)
        cond = {**cond, "control_mode": batch["control_modes"].to(latents.device)}
    with acc.accumulate(run.transformer):
        loss = flow_matching_loss(run, latents, cond, batch)
        acc.backward(loss)
        run.step_losses.append(loss.detach())
        run.step_paths.extend(batch["paths"])
        if not acc.sync_gradients:
            return None
        if acc.scaler is not None:  # fp16: norms and clipping act on unscaled gradients
            acc.unscale_gradients()
        norm = grad_norm(run.params)
        finite = bool(torch.isfinite(norm + loss.detach().float() * 0))  # the one host sync per step
        run.method.note_gradients(run.params)
        if finite:
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grads_with_norm_(run.params, cfg.max_grad_norm, norm)
            run.lr_applied = max(run.lr_applied, run.optimizer.param_groups[0]["lr"])
            run.optimizer.step()
            run.method.after_update(run.params)
        run.lr_scheduler.step()  # a skipped update still uses up its step of the schedule
        run.optimizer.zero_grad(set_to_none=True)
    return Update(torch.stack(run.step_losses).mean(), norm, finite, {k: torch.stack(v).mean() for k, v in run.step_extras.items()})


def flow_matching_loss(run: Run, x0: torch.Tensor, cond: dict, batch: dict) -> torch.Tensor:
    """Noise and sigma drawn per (epoch, sample): independent of batch size, process count and resume point; each
    sample's loss mask and weight applied."""
    device = run.accelerator.device
    keys = list(zip(batch["epochs"], batch["indices"]))
    gens = [sample_generator(run.cfg.seed, epoch, index, device) for epoch, index in keys]
    noise = torch.stack([torch.randn(x0.shape[1:], generator=g, device=device) for g in gens])
    seq_len = run.adapter.image_seq_len(x0)
    mu = run.adapter.training_mu(seq_len)
    path = run.adapter.sigma_path(seq_len) if run.cfg.timestep_sampling == "schedule" else None
    sigmas = torch.cat([
        fm.sample_sigmas(1, run.cfg.timestep_sampling, run.adapter.scheduler_config, seq_len, g, run.cfg.logit_mean, run.cfg.logit_std,
                         mu, path)
        for g in gens
    ])
    noisy = fm.add_noise(x0, noise, sigmas)
    pred = run.adapter.predict(run.transformer, noisy, sigmas, cond)
    mask = None if run.adapter.masks_are_inputs else batch.get("masks")  # FLUX Fill: the masks are its inputs
    mask = fm.latent_mask(mask, x0, run.cfg.data_config.mask_floor) if mask is not None else None
    weights = batch.get("loss_weights")
    weights = weights.to(device) if weights is not None and bool((weights != 1).any()) else None
    loss = fm.flow_matching_loss(pred, fm.velocity_target(x0, noise), sigmas, run.cfg.loss_weighting, mask, weights)
    if run.cfg.dop_class_word is not None:
        term = preservation_loss(run, noisy, sigmas, cond, batch)
        run.step_extras.setdefault("dop_loss", []).append(term.detach())
        loss = loss + run.cfg.dop_weight * term
    return loss


def class_captions(run: Run, batch: dict) -> tuple[list[str], torch.Tensor]:
    """DOP: each caption with its dataset's trigger word replaced by dop_class_word, and which samples have one
    (a caption without the trigger, or dropped, has nothing to preserve)."""
    parts = run.cfg.data_config.parts()
    samples = run.loader.dataset.samples
    out, has = [], []
    for index, caption in zip(batch["indices"], batch["captions"]):
        trigger = parts[samples[index].dataset].trigger_word
        found = names(caption, trigger)
        out.append(replace_word(caption, trigger, run.cfg.dop_class_word) if found else caption)
        has.append(found)
    return out, torch.tensor(has, dtype=torch.float32)


def preservation_loss(run: Run, noisy: torch.Tensor, sigmas: torch.Tensor, cond: dict, batch: dict) -> torch.Tensor:
    """Differential output preservation: on the class-word captions the trained model's prediction is pulled toward
    the base model's (trained part off, no gradient), on the same noisy latents and sigmas. Zero while the LoRA does
    nothing; mean over the samples whose caption names the trigger."""
    captions, has = class_captions(run, batch)
    if not bool(has.any()):
        return noisy.new_zeros((), dtype=torch.float32)
    cond = {**cond, **run.adapter.encode_text({**batch, "captions": captions})}
    pred = run.adapter.predict(run.transformer, noisy, sigmas, cond)
    with torch.no_grad(), run.method.without_training(run.accelerator.unwrap_model(run.transformer)):
        base = run.adapter.predict(run.transformer, noisy, sigmas, cond)
    per_sample = (pred.float() - base.float()).pow(2).flatten(1).mean(1)
    return (per_sample * has.to(per_sample.device)).sum() / has.sum().to(per_sample.device)


def after_update(run: Run, update: Update, stop: "StopRequest") -> bool:
    """Count the step, log it (or the skipped update), checkpoint and render samples when due. True = stop now."""
    cfg, state = run.cfg, run.state
    state.global_step += 1
    if update.finite:
        state.nonfinite_steps = 0
        run.log.add(state.global_step, update.loss, run.lr_scheduler.get_last_lr()[0], update.grad_norm, update.extras)
    else:
        state.nonfinite_steps += 1
        run.log.skip()
        logger.warning(
            "step %d: non-finite loss or gradients, update skipped (%d in a row); batch: %s",
            state.global_step, state.nonfinite_steps, ", ".join(Path(p).name for p in run.step_paths),
        )
        if state.nonfinite_steps >= cfg.max_nonfinite_steps:
            raise TrainingError(
                f"{state.nonfinite_steps} non-finite steps in a row at step {state.global_step}; "
                "lower learning_rate, use mixed_precision=bf16 instead of fp16, or check the listed images"
            )
    run.step_losses.clear()
    run.step_paths.clear()
    run.step_extras.clear()
    last_epoch = cfg.num_train_epochs is not None and state.epoch == cfg.num_train_epochs - 1
    at_end = state.global_step >= cfg.max_train_steps or (
        last_epoch and len(run.sampler) - state.batch_in_epoch < cfg.gradient_accumulation_steps)  # no update left in it
    periodic = cfg.checkpointing_steps and state.global_step % cfg.checkpointing_steps == 0
    if periodic or at_end or stop.signum is not None:
        if not run.checked and run.lr_applied == 0:  # a warm-up from 0 has not moved any weight yet: nothing to judge
            logger.info("step %d: the learning rate has been 0 so far (lr_warmup_steps=%d); the check that the %s changes waits "
                        "for the next checkpoint", state.global_step, cfg.lr_warmup_steps, run.method.name)
        elif not run.checked:  # the no-op guard, once per run: before the first checkpoint is written
            run.checked = True
            try:
                for line in run.method.check_trained(run.params, state.global_step):
                    logger.warning(line)
            except ValueError as e:
                raise TrainingError(str(e)) from None
        save_now(run, final=at_end or stop.signum is not None)
    elif state.global_step % cfg.logging_steps == 0:
        run.log.flush()
    sample_now = cfg.validation_steps and state.global_step % cfg.validation_steps == 0
    if sample_now or at_end:
        render_samples(run)
    return at_end or stop.signum is not None


def render_samples(run: Run) -> None:
    """The validation samples at the current step (every process takes part when the model is sharded)."""
    if not run.validator.items:
        return
    if run.accelerator.is_main_process or run.method.sharded:  # a sharded model renders only with every rank taking part
        model = run.accelerator.unwrap_model(run.transformer)
        with run.method.sampling(model):
            run.validator.render(model, run.state.global_step, run.out, run.accelerator, save=run.accelerator.is_main_process)
    run.accelerator.wait_for_everyone()


def save_now(run: Run, final: bool) -> None:
    run.log.flush()  # every step up to a checkpoint is in the log before the checkpoint exists
    run.state.elapsed_seconds = run.log.elapsed()
    saved = checkpoint(run, final=final)
    run.saved_step = run.state.global_step
    if run.accelerator.is_main_process:
        logger.info("saved %s", saved)


def checkpoint(run: Run, final: bool) -> Path:
    """Every process calls this. A sharded run writes its shards (weights, optimizer, EMA) from every rank; the
    training method's files are gathered and written by the main process (a full fine-tune's consolidated
    transformer only at the end of a sharded run)."""
    acc = run.accelerator
    model = acc.unwrap_model(run.transformer)

    def write_weights(directory: Path) -> None:
        needed = final or run.method.exports_every_checkpoint
        run.method.save(model, directory, final=final, state_dict=gathered_state_dict(acc, run.transformer) if needed else None)
        if run.method.sharded:
            save_engine_state(acc, directory, run.transformer, run.optimizer.optimizer, run.method.sharded_state())

    try:
        return save_checkpoint(run.out, run.state, write_weights, None if run.method.sharded else run.optimizer, run.lr_scheduler,
                               run.config_yaml, run.cfg.checkpoints_total_limit, acc.is_main_process, acc.wait_for_everyone,
                               run.run_id)
    except CheckpointWriteError as e:
        raise TrainingError(str(e)) from None


# --- finish -------------------------------------------------------------------------------------------------


def finish(run: Run, stop: "StopRequest") -> Path:
    """Publish the last checkpoint's weights in output_dir, close the trackers, write the summary."""
    state, out, acc = run.state, run.out, run.accelerator
    run.log.close()
    acc.wait_for_everyone()
    ckpt = out / f"checkpoint-{state.global_step}"
    if run.saved_step != state.global_step and not (ckpt / STATE_FILE).is_file():  # e.g. stopped before the first update
        acc.end_training()
        raise (Interrupted if stop.signum is not None else TrainingError)(
            f"stopped at step {state.global_step} before any checkpoint of this run was written; nothing was published in {out}")
    final = publish(ckpt, out, run.method.published_files(), acc.is_main_process)
    acc.end_training()
    if stop.signum is not None:
        raise Interrupted(
            f"stopped by {signal.Signals(stop.signum).name} at step {state.global_step}; checkpoint saved in {ckpt}. "
            f"Resume with the same command plus resume_from_checkpoint=latest"
        )
    if acc.is_main_process:
        elapsed = run.log.elapsed()
        write_summary(out, run.cfg, state.global_step, state.epoch, elapsed, run.log.last_loss, final)
        plot_losses(read_log(out / LOG_FILE), out / "loss_curve.png")
        logger.info("done: %d steps in %.1f s; %s written to %s", state.global_step, elapsed, run.method.name, final)
        logger.info("try it: %s", inference_command(run, final))
    return final


def inference_command(run: Run, final: Path) -> str:
    """The exact inference.py command for what this run wrote, with its first validation prompt (or training
    caption), its references and its training size."""
    import shlex

    cfg = run.cfg
    entries = run.validator.entries() or [(s.caption, run.adapter.preview_inputs(s), s.control_mode) for s in run.validator.samples[:1]]
    prompt, refs, mode = entries[0] if entries else ("...", [], None)
    size = run.validator.samples[0].size if run.validator.samples else (cfg.data_config.img_size,) * 2
    weights = {"full": ["--transformer", str(run.out)], "controlnet": ["--controlnet", str(run.out / CONTROLNET_DIR)]}.get(
        cfg.training_method, ["--lora_weights", str(final)])
    refs, extra = run.adapter.inference_images(refs)  # Qwen-Image-Layered: the composite, and --layers
    # a control image (FLUX Control, ControlNets, in-context); FLUX Fill's image to inpaint is an --image
    flag = "--control_image" if run.adapter.aligned_controls and not run.adapter.masks_are_inputs else "--image"
    images = [a for r in refs for a in (() if isinstance(r, tuple) and r[2] else  # an alpha mask: inference.py reads mask files
                                        ("--mask", str(r[1])) if isinstance(r, tuple) else  # FLUX Fill: (mask, path, alpha)
                                        (flag, str(r) if isinstance(r, (str, Path)) else "<reference image>"))]
    if run.adapter.masks_are_inputs and "--mask" not in images:
        images += ["--mask", "<your mask>"]
    extra = [*extra, *([] if mode is None else ["--control_mode", str(mode)])]
    cmd = ["python", "inference.py", "--model_name", cfg.pretrained_model_name_or_path, *weights, "--prompt", prompt, *images, *extra,
           "--width", str(size[0]), "--height", str(size[1]), "--output_image", str(run.out / "sample.png")]
    return " ".join(shlex.quote(c) if c not in ("<reference image>", "<your mask>") else c for c in cmd)


class StopRequest:
    """SIGINT / SIGTERM: finish the step in flight, save a checkpoint, then exit."""

    def __init__(self):
        self.signum: int | None = None
        self._old = {}

    def __enter__(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, _frame):
        if self.signum is not None:  # second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signum = signum
        logger.warning("received %s: finishing this step and saving a checkpoint (press Ctrl-C again to abort)", signal.Signals(signum).name)

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        return False


def sample_generator(seed: int, epoch: int, index: int, device: torch.device) -> torch.Generator:
    import hashlib

    digest = hashlib.sha256(f"{seed}-noise-{epoch}-{index}".encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def grad_norm(params: list[torch.nn.Parameter]) -> torch.Tensor:
    """Total L2 norm of the gradients, one fused reduction, left on the device (of all shards, when sharded)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    if hasattr(grads[0], "full_tensor"):  # FSDP2: per-shard norms reduced across ranks
        return torch.nn.utils.get_total_norm(grads).full_tensor()
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
