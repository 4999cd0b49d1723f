"""Full fine-tuning memory: the planner's per-GPU components vs the tensors a real training step holds.

A bench-size Qwen-Image transformer (the released block structure, 4 blocks, width 512) is fully fine-tuned for one
step through the trainer's own pieces (FullMethod.attach, make_optimizer, EMA), and the bytes actually held by the
weights, the gradients, the optimizer state and the EMA are compared with `utils.estimate_memory.full_components`.
Under FSDP2 (`--fsdp`, run with two CPU processes) each rank's local shards are counted against the planner's 1/N.

    python bench/full_memory.py                                                          # one process, every option
    ACCELERATE_USE_CPU=true accelerate launch --config_file accelerate_configs/fsdp.yaml bench/full_memory.py --fsdp
"""

from __future__ import annotations

import argparse
import sys

import torch

OPTIONS = [  # (full_weights, optimizer, ema_decay)
    ("fp32", "adamw", 0.0), ("fp32", "adamw8bit", 0.0), ("fp32", "adafactor", 0.0), ("bf16", "adamw", 0.0), ("fp32", "adamw", 0.999),
]


def bench_model():
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(0)
    return QwenImageTransformer2DModel(num_layers=4, attention_head_dim=64, num_attention_heads=8, joint_attention_dim=256,
                                       axes_dims_rope=(16, 24, 24)).to(torch.bfloat16)


def held_bytes(tensors) -> int:
    from trainer.distributed import local

    return sum(local(t).numel() * local(t).element_size() for t in tensors if t is not None)


def optimizer_bytes(optimizer) -> int:
    from trainer.distributed import local

    return sum(local(v).numel() * local(v).element_size() for state in optimizer.state.values() for v in state.values()
               if isinstance(v, torch.Tensor) and v.dim() > 0)


def measure(full_weights: str, optimizer_name: str, ema_decay: float, accelerator=None) -> dict:
    from trainer.config import TrainConfig
    from trainer.methods.full import FullMethod
    from trainer.optim import make_optimizer

    cfg = TrainConfig(training_method="full", full_weights=full_weights, optimizer=optimizer_name, ema_decay=ema_decay,
                      mixed_precision="bf16" if full_weights == "bf16" else "no", learning_rate=1e-4)
    model = bench_model()
    method = FullMethod(cfg, adapter=None)
    params = method.attach(model)
    opt = make_optimizer(cfg, params)
    if accelerator is not None:
        from trainer.distributed import wrap_family_blocks

        method.sharded = True
        wrap_family_blocks(accelerator, model)
        model, opt = accelerator.prepare(model, opt)
        params = [p for p in model.parameters() if p.requires_grad]
    method.prepared(params)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, 64, 64, generator=g)
    text = torch.randn(1, 16, 256, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=full_weights == "bf16"):
        out = model(hidden_states=hidden.to(params[0].dtype if full_weights == "bf16" else torch.float32), timestep=torch.tensor([0.5]),
                    encoder_hidden_states=text.to(params[0].dtype if full_weights == "bf16" else torch.float32),
                    encoder_hidden_states_mask=torch.ones(1, 16), img_shapes=[[(1, 8, 8)]], return_dict=False)[0]
    out.float().square().mean().backward()
    opt.step()
    method.after_update(params)
    inner = getattr(opt, "optimizer", opt)
    return {"weights": held_bytes(model.parameters()), "grads": held_bytes(p.grad for p in params), "optimizer": optimizer_bytes(inner),
            "ema": held_bytes(method.ema.shadow_params) if method.ema is not None else 0, "cfg": cfg, "model": bench_model()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fsdp", action="store_true", help="count each rank's shards (launch with the FSDP config, 2 processes)")
    args = p.parse_args(argv)
    from utils.estimate_memory import full_components

    accelerator = None
    if args.fsdp:
        from accelerate import Accelerator

        from trainer.distributed import use_fsdp_on_cpu

        accelerator = Accelerator()
        use_fsdp_on_cpu(accelerator)
    n = accelerator.num_processes if accelerator else 1
    rows = []
    for full_weights, opt, ema in OPTIONS if not args.fsdp else OPTIONS[:1] + OPTIONS[-1:]:
        m = measure(full_weights, opt, ema, accelerator)
        planned = full_components(m["model"], m["cfg"], frozen_bytes=2.0)
        for name, plan in zip(("weights", "grads", "optimizer", "ema"), planned[:4]):
            if plan or m[name]:
                rows.append((f"{full_weights}, {opt}{', EMA' if ema else ''}", name, plan / n / 2**20, m[name] / 2**20))
    if accelerator is None or accelerator.is_main_process:
        where = f"per rank of {n} (FSDP2 shards)" if args.fsdp else "one process"
        print(f"bench-size Qwen-Image transformer, 4 blocks, width 512, {where}")
        print("| setup | part | planned MiB | held MiB | held / planned |")
        print("| --- | --- | --- | --- | --- |")
        for setup, part, plan, held in rows:
            print(f"| {setup} | {part} | {plan:.2f} | {held:.2f} | {held / plan if plan else float('nan'):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
