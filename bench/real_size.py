"""Real-size GPU memory and speed of the training step, without downloading a model.

Builds the released Qwen-Image (20B) or FLUX.1-dev (12B) transformer architecture with random weights directly on
the GPU, quantizes it block by block with the trainer's own code, attaches the LoRA, and times full training steps
(flow-matching loss, backward, clip, optimizer) at the given resolution with random latents and prompt embeddings.
The text encoders and VAE are not loaded: this is the training phase after their embeddings were precomputed.

    python bench/real_size.py --family qwen-image --quantize none,qfloat8,qint4,nf4 --resolution 1024
    python bench/real_size.py --family flux --quantize none,nf4 --tiny      # CPU smoke run on a 2-block model
    python bench/real_size.py --quantize qfloat8 --blocks_to_swap 0,20,40   # blocks_to_swap: VRAM vs speed

MFU = model FLOPs per step / time per step / the GPU's dense bf16 peak (--peak_tflops, default from the GPU's name:
H100 / H200 989, A100 312, L40S 362, RTX 4090 165). Model FLOPs per step = 2 x one forward's FLOPs (the forward and
the activation gradients; LoRA's own weight gradients are negligible), counted once per family with
torch.utils.flop_counter on the bf16 model before it is quantized; the recompute of gradient checkpointing is not
model FLOPs (the usual convention), so checkpointing lowers MFU. The 8-bit modes are also measured against the bf16
peak, so a W8A8 run can exceed what bf16 could reach.

    python bench/real_size.py --family qwen-image --quantize none,int8_w8a8,fp8_w8a8 --checkpointing on,off

With --blocks_to_swap the table also gives the swapped weights in flight: the most bytes of swapped-block copies
alive at any moment of the step (tracked per storage, so it is measured on the CPU as well), and the bytes copied
host -> device per step.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # as the trainer sets it

import torch  # noqa: E402

from trainer import flow_matching as fm  # noqa: E402
from trainer.config import TrainConfig  # noqa: E402
from trainer.methods.lora import LoRAMethod  # noqa: E402
from trainer.models import variants  # noqa: E402
from trainer.optim import make_optimizer  # noqa: E402
from trainer.quantize import place_model, weight_bytes  # noqa: E402

GB = 1024**3
PEAK_TFLOPS = {"H100": 989, "H200": 989, "GH200": 989, "A100": 312, "L40S": 362, "4090": 165, "A6000": 155}
QWEN_SCHEDULER = dict(use_dynamic_shifting=True, base_image_seq_len=256, max_image_seq_len=8192, base_shift=0.5, max_shift=0.9)


def build(family: str, tiny: bool, device: torch.device, layers: int | None = None, cfg: TrainConfig | None = None):
    """(transformer with the released architecture (or only `layers` / 2 blocks of it) in bf16 on `device`, adapter)."""
    import diffusers

    cls, variant = variants()[family]
    adapter = cls(cfg or TrainConfig(), variant, device, torch.bfloat16)
    config = adapter.released_transformer_config()
    if tiny or layers:
        config = adapter.with_blocks(config, layers or 2)
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = getattr(diffusers, adapter.transformer_class).from_config(config)
    finally:
        torch.set_default_dtype(torch.float32)
    return model.requires_grad_(False), adapter


class SwapTracker:
    """Peak bytes of swapped-block weight copies alive at once, and bytes copied in, over a training step."""

    def __init__(self, swap):
        import weakref

        self.live, self.peak, self.copied = [], 0, 0
        to_device, onload = swap._to_device, swap.onload

        def tracked_copy(master):
            from trainer.offload import plain_tensors

            out = to_device(master)
            for t in plain_tensors(out):
                self.live.append((weakref.ref(t.untyped_storage()), t.numel() * t.element_size()))
                self.copied += self.live[-1][1]
            return out

        def tracked_onload(block):
            onload(block)
            self.live = [(r, n) for r, n in self.live if r() is not None]
            self.peak = max(self.peak, sum(n for _, n in self.live))

        swap._to_device, swap.onload = tracked_copy, tracked_onload


def forward_flops(adapter, model, cond, x0, sig) -> int:
    """FLOPs of one forward of `model` at these shapes (matmuls and attention), counted by torch.utils.flop_counter."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        adapter.predict(model, fm.add_noise(x0, torch.randn_like(x0), sig), sig, cond)
    return counter.get_total_flops()


def peak_flops(args, device: torch.device) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((t * 1e12 for key, t in PEAK_TFLOPS.items() if key in name), None)


FLOPS: dict[tuple, int] = {}  # (family, resolution, batch) -> forward FLOPs


def run(family: str, mode: str, args, device: torch.device, swap: int = 0, checkpointing: bool = True) -> dict:
    torch.manual_seed(0)  # same random weights for every setting, so the losses are comparable
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    cfg = TrainConfig(quantize=mode, optimizer=args.optimizer, rank=args.rank, gradient_checkpointing=checkpointing)
    model, adapter = build(family, args.tiny, device, args.layers, cfg)
    n_params = sum(p.numel() for p in model.parameters())
    adapter.transformer = model
    adapter.guidance = bool(getattr(model.config, "guidance_embeds", False))
    adapter.configure_attention()
    cond = adapter.random_conditioning(model, args.batch, device, torch.bfloat16)
    lat = args.resolution // 8
    g = torch.Generator(device=device).manual_seed(0)
    x0 = torch.randn(args.batch, 16, lat, lat, generator=g, device=device)
    key = (family, args.resolution, args.batch)
    if key not in FLOPS and not swap:
        FLOPS[key] = forward_flops(adapter, model, cond, x0, torch.full((args.batch,), 0.5, device=device))
    placement = place_model(model, mode, device, torch.bfloat16, swap)
    tracker = SwapTracker(placement.swap) if swap else None
    build_s = time.time() - t0
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    weights = weight_bytes(model)

    adapter.placement = placement
    params = LoRAMethod(cfg, adapter).attach(model, placement)
    if cfg.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    optimizer = make_optimizer(cfg, params)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, copied = [], 0
    for _ in range(args.steps):
        t = time.perf_counter()
        noise = torch.randn(x0.shape, generator=g, device=device)
        sig = fm.sample_sigmas(args.batch, "shift", QWEN_SCHEDULER, adapter.image_seq_len(x0), g)
        pred = adapter.predict(model, fm.add_noise(x0, noise, sig), sig, cond)
        loss = fm.flow_matching_loss(pred, fm.velocity_target(x0, noise), sig)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        if tracker is not None:
            copied, tracker.copied = tracker.copied, 0
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
    s_per_step = statistics.median(times[1:] if len(times) > 1 else times)
    peak_rate = peak_flops(args, device)
    result = {
        "mode": mode,
        "swap": swap,
        "checkpointing": checkpointing,
        "tflop_per_step": 2 * FLOPS[key] / 1e12 if key in FLOPS else float("nan"),
        "mfu": 2 * FLOPS[key] / s_per_step / peak_rate if key in FLOPS and peak_rate else float("nan"),
        "in_flight_gib": tracker.peak / GB if tracker else 0,
        "copied_gib": copied / GB,
        "params": n_params,
        "weights_gib": weights / GB,
        "peak_gib": peak / GB,
        "reserved_gib": torch.cuda.max_memory_reserved() / GB if device.type == "cuda" else 0,
        "s_per_step": s_per_step,
        "build_s": build_s,
        "loss": float(loss.detach()),
    }
    del model, adapter, params, optimizer, cond, x0, pred, loss, tracker
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", choices=sorted(variants()), default="qwen-image")
    p.add_argument("--quantize", default="none,qfloat8,qint4,nf4")
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--optimizer", default="adamw8bit")
    p.add_argument("--checkpointing", default="on", help="gradient checkpointing: on, off or on,off (both measured)")
    p.add_argument("--no_checkpointing", action="store_true", help="same as --checkpointing off")
    p.add_argument("--peak_tflops", type=float, default=None, help="the GPU's dense bf16 TFLOP/s for MFU (default: from its name)")
    p.add_argument("--tiny", action="store_true", help="2-block model, for a CPU smoke run of this script")
    p.add_argument("--layers", type=int, default=None, help="real width but only this many blocks (CPU measurements)")
    p.add_argument("--blocks_to_swap", default="0", help="comma-separated blocks_to_swap values to measure")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    size = f"({args.layers} blocks) " if args.layers else "(tiny) " if args.tiny else ""
    policies = ["off"] if args.no_checkpointing else args.checkpointing.split(",")
    print(f"{args.family} {size}on {name}: {args.resolution}px, batch {args.batch}, rank {args.rank}, {args.optimizer}")
    print(f"{'quantize':>9} {'ckpt':>4} {'swap':>5} {'params':>15} {'weights GiB':>12} {'in flight GiB':>14} {'copied GiB':>11} "
          f"{'peak GiB':>9} {'reserved GiB':>13} {'s/step':>7} {'TFLOP/step':>10} {'MFU':>6} {'loss':>7}")
    for mode in args.quantize.split(","):
        for ckpt in policies:
            for swap in (int(n) for n in args.blocks_to_swap.split(",")):
                try:
                    r = run(args.family, mode, args, device, swap, ckpt == "on")
                    print(f"{r['mode']:>9} {ckpt:>4} {swap:>5} {r['params']:>15,} {r['weights_gib']:>12.2f} {r['in_flight_gib']:>14.2f} "
                          f"{r['copied_gib']:>11.2f} {r['peak_gib']:>9.2f} {r['reserved_gib']:>13.2f} {r['s_per_step']:>7.2f} "
                          f"{r['tflop_per_step']:>10.1f} {r['mfu']:>6.1%} {r['loss']:>7.3f}", flush=True)
                except Exception as e:  # keep measuring the other settings
                    print(f"{mode:>9} {ckpt:>4} {swap:>5} failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
