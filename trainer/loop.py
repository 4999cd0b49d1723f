"""The one training loop. Every family plugs in through a ModelAdapter; nothing here knows about packing."""

from __future__ import annotations

import json
import logging
import math
import signal
import time
import warnings
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, set_seed
from diffusers.optimization import get_scheduler
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from image_datasets import CaptionDataset, SizeGroupedBatchSampler, collate, scan_dataset
from trainer import flow_matching as fm
from trainer.cache import EmbeddingCache
from trainer.checkpoint import (
    COMFY_FILE,
    LORA_FILE,
    TrainState,
    atomic_copy,
    latest_checkpoint,
    load_training_state,
    restore,
    save_checkpoint,
)
from trainer.config import ConfigError, TrainConfig
from trainer.models.base import ModelAdapter
from trainer.optim import make_optimizer
from trainer.report import plot_losses, read_log, write_summary
from trainer.validation import Validator

logger = logging.getLogger("trainer")
# We step the schedule on skipped (non-finite) updates on purpose, to keep it aligned with global_step.
warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before `optimizer.step\(\)`")

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Keys whose change makes a resumed run a different experiment.
RESUME_KEYS = (
    "pretrained_model_name_or_path",
    "rank",
    "lora_alpha",
    "lora_target_modules",
    "data_config.img_size",
    "data_config.train_batch_size",
    "gradient_accumulation_steps",
    "seed",
)


class TrainingError(RuntimeError):
    """A problem found while training that the user must act on; printed as one line."""


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


def probe_output_dir(output_dir: Path) -> None:
    """Fail at start-up, not after hours, when checkpoints cannot be written."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / ".write-probe"
        probe.write_bytes(b"\0" * 1024 * 1024)
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"config key 'output_dir': cannot write to '{output_dir}' ({e.strerror or e})") from None


def build_dataset(cfg: TrainConfig) -> list:
    d = cfg.data_config
    scan = scan_dataset(d)
    for w in scan.warnings:
        logger.warning(w)
    if scan.problems:
        listing = "\n  ".join(scan.problems)
        if not d.skip_bad_files or not scan.samples:
            raise ConfigError(
                f"data_config: {len(scan.problems)} unusable file(s) in '{d.metadata_file or d.img_dir}' "
                f"(fix them, or set data_config.skip_bad_files=true to skip them):\n  {listing}"
            )
        logger.warning("skipping %d unusable file(s):\n  %s", len(scan.problems), listing)
    return scan.samples


def dataset_fingerprint(samples: list) -> str:
    import hashlib

    h = hashlib.sha256()
    for s in samples:
        st = s.image.stat()
        h.update(f"{s.image.name}\0{st.st_size}\0{s.caption}\0{s.size}\n".encode())
    return h.hexdigest()[:16]


def check_resume_compatible(cfg: TrainConfig, ckpt: Path, fingerprint: str, saved_fingerprint: str | None) -> None:
    saved = OmegaConf.load(ckpt / "config.yaml")
    now = OmegaConf.structured(cfg)
    changed = [
        f"{k}: {OmegaConf.select(saved, k)!r} -> {OmegaConf.select(now, k)!r}"
        for k in RESUME_KEYS
        if OmegaConf.select(saved, k) != OmegaConf.select(now, k)
    ]
    if saved_fingerprint is not None and saved_fingerprint != fingerprint:
        changed.append("dataset content (images or captions) changed")
    if changed and cfg.resume_allow_config_change:
        logger.warning("resuming %s although the setup changed (resume_allow_config_change): %s", ckpt, "; ".join(changed))
    elif changed:
        raise ConfigError(
            f"resume_from_checkpoint: {ckpt} was trained with a different setup ({'; '.join(changed)}); "
            "resume with the same config, start a new output_dir, or set resume_allow_config_change=true"
        )


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


def _flat_config(cfg: TrainConfig) -> dict:
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


def train(cfg: TrainConfig, adapter_cls: type[ModelAdapter]) -> Path:
    """Run training to cfg.max_train_steps; returns the path of the final LoRA file."""
    out = Path(cfg.output_dir)
    adapter_cls.check_setup(cfg)
    probe_output_dir(out)
    samples = build_dataset(cfg)  # before any model loads: a bad dataset costs seconds, not a model load
    adapter_cls.check_samples(cfg, samples)
    fingerprint = dataset_fingerprint(samples)

    resume_from = None
    if cfg.resume_from_checkpoint == "latest":
        resume_from = latest_checkpoint(out)
    elif cfg.resume_from_checkpoint:
        resume_from = Path(cfg.resume_from_checkpoint)
    payload = load_training_state(resume_from) if resume_from else None
    if resume_from:
        check_resume_compatible(cfg, resume_from, fingerprint, payload["train_state"]["extra"].get("dataset"))

    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        mixed_precision=cfg.mixed_precision,
        log_with=make_trackers(cfg) or None,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / cfg.logging_dir)),
        # The last block's text-stream projections feed nothing (only image tokens leave the model), so their LoRA
        # gets no gradient; DDP must be told or it waits for them forever.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    if cfg.blocks_to_swap and accelerator.distributed_type.name in ("FSDP", "DEEPSPEED"):
        raise ConfigError(f"config key 'blocks_to_swap' does not work with {accelerator.distributed_type.name} (it shards the weights itself); use DDP or set blocks_to_swap: 0")
    if cfg.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    set_seed(cfg.seed)
    device = accelerator.device
    # Batches are known as soon as the process count is: a dataset too small for them fails before any model loads.
    sampler = SizeGroupedBatchSampler(
        [s.group for s in samples], cfg.data_config.train_batch_size, cfg.seed, accelerator.process_index, accelerator.num_processes
    )
    if len(sampler) == 0:
        raise ConfigError(
            f"data_config: no full batch of {cfg.data_config.train_batch_size} x {accelerator.num_processes} process(es) can be formed from "
            f"{len(samples)} sample(s) of equal size; lower train_batch_size or use data_config.bucketing"
        )

    adapter = adapter_cls(cfg, device, DTYPES[cfg.mixed_precision])
    logger.info("loading %s from %s in %s", adapter.family, cfg.pretrained_model_name_or_path, adapter.weight_dtype)
    adapter.load_encoders()
    long_captions = [
        (s.image.name, n) for s, n in zip(samples, adapter.count_tokens([s.caption for s in samples])) if n > cfg.max_sequence_length
    ]
    for name, n in long_captions[:20]:
        logger.warning("caption of %s has %d tokens; only the first %d are used (max_sequence_length)", name, n, cfg.max_sequence_length)

    validator = Validator(adapter, cfg)
    validator.prepare()  # prompt embeddings now, while the text encoders are loaded

    cache = None
    if cfg.precompute_text_embeddings or cfg.precompute_image_embeddings:
        cache = EmbeddingCache(adapter, samples, cfg, Path(cfg.cache_dir or out / "cache") if cfg.save_cache_on_disk else None)
        with accelerator.main_process_first():  # with a disk cache the other ranks then only read it
            cache.build(cfg.precompute_text_embeddings, cfg.precompute_image_embeddings, cfg.data_config.caption_dropout_rate > 0)
        # Freed before the transformer loads: on a 24 GB card the encoders and the transformer never coexist.
        if cfg.precompute_text_embeddings:
            adapter.free_text_encoders()
        if cfg.precompute_image_embeddings and not cfg.validation_prompts:  # sampling still decodes with it
            adapter.free_vae()

    adapter.load_transformer()
    if cfg.blocks_to_swap and device.type == "cpu":
        logger.warning("blocks_to_swap=%d on the CPU: weights are in host RAM anyway, swapping only adds copies", cfg.blocks_to_swap)
    adapter.configure_attention()
    params = adapter.add_lora()
    transformer = adapter.transformer
    if cfg.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    if cfg.torch_compile:
        transformer.compile_repeated_blocks()  # diffusers' regional compile: each block type compiled once
    n_params = sum(p.numel() for p in params)
    optimizer = make_optimizer(cfg, params)
    # Stepped by us once per optimizer step (not prepared), so warm-up and length mean optimizer steps.
    lr_scheduler = get_scheduler(
        cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps, num_training_steps=cfg.max_train_steps
    )
    transformer, optimizer = accelerator.prepare(transformer, optimizer)

    def encode(batch: dict) -> tuple[torch.Tensor, dict]:
        if cache is None:
            return adapter.encode_batch(batch)
        latents, extra = cache.batch_latents(batch) if cfg.precompute_image_embeddings else adapter.encode_latents(batch)
        text = cache.batch_text(batch) if cfg.precompute_text_embeddings else adapter.encode_text(batch)
        return latents, {**text, **extra}

    d = cfg.data_config
    need_pixels = not cfg.precompute_image_embeddings or (not cfg.precompute_text_embeddings and adapter.text_needs_pixels)
    dataset = CaptionDataset(samples, d.caption_dropout_rate, d.random_ratio, cfg.seed, load_pixels=need_pixels)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, collate_fn=collate, num_workers=d.num_workers, pin_memory=device.type == "cuda"
    )

    state = TrainState()
    if payload is not None:
        adapter.load_lora_into(accelerator.unwrap_model(transformer), resume_from)
        state = restore(payload, optimizer, lr_scheduler)
        logger.info("resumed from %s at step %d (epoch %d, batch %d)", resume_from, state.global_step, state.epoch, state.batch_in_epoch)
    elif cfg.resume_from_checkpoint == "latest":
        logger.info("resume_from_checkpoint=latest: no checkpoint in %s yet, starting fresh", out)
    state.extra["dataset"] = fingerprint
    config_yaml = OmegaConf.to_yaml(OmegaConf.structured(cfg))

    def write_lora(directory: Path) -> None:
        adapter.save_lora(accelerator.unwrap_model(transformer), directory)

    def checkpoint() -> Path:
        return save_checkpoint(out, state, write_lora, optimizer, lr_scheduler, config_yaml, cfg.checkpoints_total_limit)

    if accelerator.is_main_process:
        accelerator.init_trackers(cfg.tracker_project_name, config=_flat_config(cfg))
        logger.info(
            "%d images, %d batches/epoch, batch %d x accumulation %d x %d process(es), %s trainable LoRA parameters",
            len(samples), len(sampler), d.train_batch_size, cfg.gradient_accumulation_steps, accelerator.num_processes, f"{n_params:,}",
        )

    def loss_of(x0: torch.Tensor, cond: dict, keys: list[tuple[int, int]]) -> torch.Tensor:
        # One generator per (epoch, sample): noise and sigma do not depend on batch size, process count or resume point.
        gens = [sample_generator(cfg.seed, epoch, index, device) for epoch, index in keys]
        noise = torch.stack([torch.randn(x0.shape[1:], generator=g, device=device) for g in gens])
        seq_len = adapter.image_seq_len(x0)
        sigmas = torch.cat([
            fm.sample_sigmas(1, cfg.timestep_sampling, adapter.scheduler_config, seq_len, g, cfg.logit_mean, cfg.logit_std)
            for g in gens
        ])
        pred = adapter.predict(transformer, fm.add_noise(x0, noise, sigmas), sigmas, cond)
        return fm.flow_matching_loss(pred, fm.velocity_target(x0, noise), sigmas, cfg.loss_weighting)

    log_path = out / "train_log.jsonl"
    pending: list[tuple[int, torch.Tensor, float, torch.Tensor]] = []  # step, loss, lr, grad norm
    flush_clock, last_loss = [time.time()], [float("nan")]
    step_losses: list[torch.Tensor] = []
    step_paths: list[str] = []
    progress = tqdm(
        total=cfg.max_train_steps, initial=state.global_step, desc="steps", disable=not accelerator.is_main_process, dynamic_ncols=True
    )

    def flush_logs() -> None:
        if not pending:
            return
        # One device sync (and, with several processes, one all-reduce) per flush instead of per step.
        values = torch.stack([torch.stack([loss, norm.float()]) for _, loss, _, norm in pending]).float()
        if accelerator.num_processes > 1:
            values = accelerator.reduce(values, reduction="mean")
        values = values.cpu().tolist()
        now = time.time()
        rate = len(pending) / max(now - flush_clock[0], 1e-9)
        flush_clock[0] = now
        if accelerator.is_main_process:
            with open(log_path, "a") as f:
                for (step, _, lr, _), (loss, norm) in zip(pending, values):
                    f.write(json.dumps({"step": step, "loss": loss, "lr": lr, "grad_norm": norm}) + "\n")
                    accelerator.log({"train/loss": loss, "train/lr": lr, "train/grad_norm": norm}, step=step)
            accelerator.log({"train/steps_per_second": rate}, step=pending[-1][0])
            progress.set_postfix(loss=f"{values[-1][0]:.4f}", lr=f"{pending[-1][2]:.2e}")
        last_loss[0] = values[-1][0]
        pending.clear()

    t_start = time.time() - state.elapsed_seconds
    with StopRequest() as stop:
        while state.global_step < cfg.max_train_steps and stop.signum is None:
            sampler.set_epoch(state.epoch, state.batch_in_epoch)
            for batch in loader:
                latents, cond = encode(batch)
                with accelerator.accumulate(transformer):
                    loss = loss_of(latents, cond, list(zip(batch["epochs"], batch["indices"])))
                    accelerator.backward(loss)
                    step_losses.append(loss.detach())
                    step_paths.extend(batch["paths"])
                    if accelerator.sync_gradients:
                        if accelerator.scaler is not None:  # fp16: norms and clipping act on unscaled gradients
                            accelerator.unscale_gradients()
                        norm = grad_norm(params)
                        finite = bool(torch.isfinite(norm + loss.detach().float() * 0))  # one host sync per step
                        if finite:
                            if cfg.max_grad_norm > 0:
                                torch.nn.utils.clip_grads_with_norm_(params, cfg.max_grad_norm, norm)
                            optimizer.step()
                        lr_scheduler.step()  # a skipped update still uses up its step of the schedule
                        optimizer.zero_grad(set_to_none=True)
                state.batch_in_epoch += 1
                if not accelerator.sync_gradients:
                    continue
                state.global_step += 1
                if finite:
                    state.nonfinite_steps = 0
                    pending.append((state.global_step, torch.stack(step_losses).mean(), lr_scheduler.get_last_lr()[0], norm))
                else:
                    state.nonfinite_steps += 1
                    logger.warning(
                        "step %d: non-finite loss or gradients, update skipped (%d in a row); batch: %s",
                        state.global_step, state.nonfinite_steps, ", ".join(Path(p).name for p in step_paths),
                    )
                    if state.nonfinite_steps >= cfg.max_nonfinite_steps:
                        raise TrainingError(
                            f"{state.nonfinite_steps} non-finite steps in a row at step {state.global_step}; "
                            "lower learning_rate, use mixed_precision=bf16 instead of fp16, or check the listed images"
                        )
                step_losses.clear()
                step_paths.clear()
                progress.update(1)
                if state.global_step % cfg.logging_steps == 0:
                    flush_logs()
                state.elapsed_seconds = time.time() - t_start
                at_end = state.global_step >= cfg.max_train_steps
                periodic = cfg.checkpointing_steps and state.global_step % cfg.checkpointing_steps == 0
                if (periodic or at_end or stop.signum is not None) and accelerator.is_main_process:
                    path = checkpoint()
                    logger.info("saved %s", path)
                sample_now = cfg.validation_steps and state.global_step % cfg.validation_steps == 0
                if (sample_now or at_end) and cfg.validation_prompts:
                    if accelerator.is_main_process:
                        validator.render(accelerator.unwrap_model(transformer), state.global_step, out, accelerator)
                    accelerator.wait_for_everyone()
                if at_end or stop.signum is not None:
                    break
            else:
                state.epoch += 1
                state.batch_in_epoch = 0
    flush_logs()
    progress.close()
    accelerator.wait_for_everyone()
    final = out / LORA_FILE
    ckpt = out / f"checkpoint-{state.global_step}"
    if accelerator.is_main_process:
        atomic_copy(ckpt / LORA_FILE, final)
        if (ckpt / COMFY_FILE).is_file():
            atomic_copy(ckpt / COMFY_FILE, out / COMFY_FILE)
    accelerator.end_training()
    if stop.signum is not None:
        raise Interrupted(
            f"stopped by {signal.Signals(stop.signum).name} at step {state.global_step}; checkpoint saved in {ckpt}. "
            f"Resume with the same command plus resume_from_checkpoint=latest"
        )
    if accelerator.is_main_process:
        elapsed = time.time() - t_start
        write_summary(out, cfg, state.global_step, state.epoch, elapsed, last_loss[0], final)
        plot_losses(read_log(log_path), out / "loss_curve.png")
        logger.info("done: %d steps in %.1f s; LoRA written to %s", state.global_step, elapsed, final)
    return final


class Interrupted(RuntimeError):
    pass


def sample_generator(seed: int, epoch: int, index: int, device: torch.device) -> torch.Generator:
    import hashlib

    digest = hashlib.sha256(f"{seed}-noise-{epoch}-{index}".encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def grad_norm(params: list[torch.nn.Parameter]) -> torch.Tensor:
    """Total L2 norm of the gradients, one fused reduction, left on the device."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
