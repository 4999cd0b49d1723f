"""Memory of the training step on this machine's CPU: quantized weights, optimizer state, encoders freed by the cache.

    python bench/memory.py            # prints a table and the ratios (a few minutes on 2 CPUs)

Each configuration runs in a fresh process. "bench-size" = the real Qwen-Image width (3072, 24 heads) with 2 of its
60 blocks, so per-block byte counts are the real ones. Tracked bytes come from the tensors themselves (quantized
storage counted as stored); peak RSS is the process's high-water mark. On CUDA it also reports
torch.cuda.max_memory_allocated (see bench/real_size.py for the full-size GPU figures).
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MB = 1024**2


def one(kind: str, value: str) -> dict:
    import torch

    from bench.real_size import build
    from trainer.config import TrainConfig
    from trainer.methods.lora import LoRAMethod
    from trainer.optim import make_optimizer, optimizer_state_bytes
    from trainer.quantize import place_model, repeated_blocks, weight_bytes

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "weights":
        model, _ = build("qwen-image", tiny=True, device=torch.device("cpu"))
        place_model(model, value, device, torch.bfloat16)
        return {"tracked": sum(weight_bytes(b) for b in repeated_blocks(model))}
    if kind == "optimizer":
        cfg = TrainConfig(optimizer=value, rank=16)
        model, adapter = build("qwen-image", tiny=True, device=device, cfg=cfg)
        params = LoRAMethod(cfg, adapter).attach(model)
        opt = make_optimizer(cfg, params)
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        opt.step()
        return {"tracked": optimizer_state_bytes(opt), "lora_params": sum(p.numel() for p in params)}
    if kind == "cache":
        import tempfile

        from trainer.loop import train
        from utils.make_demo_dataset import make_dataset
        from utils.make_tiny_models import make_tiny_model

        tmp = Path(tempfile.mkdtemp())
        model = make_tiny_model("qwen-image", tmp / "m")
        data = make_dataset(tmp / "d", count=4, size=64)
        from trainer.config import load_config
        from trainer.models.qwen_image import QwenImageAdapter

        resident = {}

        class Probe(QwenImageAdapter):
            def configure_attention(self):  # called once the encoders are (or are not) freed and the transformer is loaded
                mods = [self.transformer] + [m for m in (self.vae, getattr(self.text_pipe, "text_encoder", None)) if m is not None]
                resident["tracked"] = sum(weight_bytes(m) for m in mods)
                return super().configure_attention()

        on = value == "on"
        cfg = load_config(None, [f"pretrained_model_name_or_path={model}", f"data_config.img_dir={data}", "data_config.img_size=64",
                                 f"output_dir={tmp / 'o'}", "mixed_precision=no", "report_to=none", "max_train_steps=2",
                                 f"precompute_text_embeddings={on}", f"precompute_image_embeddings={on}"])
        train(cfg, Probe)
        return resident
    raise ValueError(kind)


def measure(kind: str, value: str) -> dict:
    r = subprocess.run([sys.executable, __file__, "--one", kind, value], capture_output=True, text=True, cwd=ROOT)
    if r.returncode:
        raise RuntimeError(r.stderr[-2000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "--one":
        import logging

        logging.disable(logging.WARNING)
        out = one(sys.argv[2], sys.argv[3])
        out["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        import torch

        if torch.cuda.is_available():
            out["cuda_peak"] = torch.cuda.max_memory_allocated()
        print(json.dumps(out))
        return 0
    import argparse

    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()

    rows = []
    for kind, values in (("weights", ["none", "qfloat8", "qint8", "nf4", "qint4"]), ("optimizer", ["adamw", "adamw8bit"]),
                         ("cache", ["off", "on"])):
        base = None
        for v in values:
            m = measure(kind, v)
            base = base or m["tracked"]
            rows.append((kind, v, m["tracked"], m["tracked"] / base, m["peak_rss"], m.get("cuda_peak")))
    labels = {"weights": "transformer block weights (2 real-width blocks)", "optimizer": "LoRA optimizer state (rank 16)",
              "cache": "frozen models resident while training (tiny pipeline)"}
    print(f"{'what':52} {'setting':>9} {'tracked MiB':>12} {'ratio':>7} {'peak RSS MiB':>13}")
    for kind, v, tracked, ratio, rss, cuda in rows:
        extra = f"  cuda peak {cuda / MB:.1f} MiB" if cuda else ""
        print(f"{labels[kind]:52} {v:>9} {tracked / MB:>12.2f} {ratio:>7.3f} {rss / MB:>13.0f}{extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
