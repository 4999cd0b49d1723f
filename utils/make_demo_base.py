"""Build the demo's base model: a tiny Qwen-Image pipeline that actually draws coloured shapes.

A random tiny model renders noise, so a LoRA trained on it cannot be seen to learn anything. This makes a base that
can be looked at, in two honest steps, deterministically (seeded) and on the CPU in about a minute:

1. its VAE is trained as an autoencoder on generated shape pictures (pixel MSE + a small KL term), so that latents
   decode to pictures; its latent normalization (latents_mean / latents_std) is then set from its own latents, as
   the released model's are;
2. its transformer is fully fine-tuned with this project's own trainer (`training_method: full`) on the base
   concepts (red / green / blue circles and squares on white), and the result is saved as the model's transformer.

The demo's LoRA then teaches it something it never saw (utils/make_demo_dataset.py --concept: a trigger word for a
new shape in a new colour). A finished folder is reused: a second `make demo` skips this step.

    python utils/make_demo_base.py --out demo/base-qwen-image
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SIZE = 64
DONE = "demo_base.json"  # written last: a folder without it is rebuilt


def train_vae(vae, steps: int, seed: int = 0, batch: int = 8, lr: float = 2e-3, log_every: int = 100):
    """Autoencoder training of a (video-style, frame axis) VAE on freshly drawn shape pictures."""
    import numpy as np
    import torch

    from utils.make_demo_dataset import random_picture

    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for step in range(1, steps + 1):
        pics = np.stack([np.asarray(random_picture(rng, SIZE), dtype=np.float32) for _ in range(batch)])
        x = (torch.from_numpy(pics).permute(0, 3, 1, 2) / 127.5 - 1.0)[:, :, None]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        rec_loss = (recon - x).pow(2).mean()
        kl = posterior.kl().mean() / x[0].numel()
        loss = rec_loss + 1e-3 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps:
            print(f"  vae step {step}/{steps}: reconstruction mse {rec_loss.item():.4f}", flush=True)
    vae.eval().requires_grad_(False)
    return float(rec_loss)


def build(out: Path, vae_steps: int, transformer_steps: int) -> Path:
    import torch

    from trainer.config import load_config
    from trainer.constants import TRANSFORMER_DIR
    from trainer.loop import train
    from trainer.models import variants
    from trainer.models.tiny import latent_statistics
    from utils.make_demo_dataset import make_base_dataset
    from utils.make_tiny_models import make_tiny_model

    if (out / DONE).is_file():
        print(f"demo base model: {out} (already built; delete it to rebuild)")
        return out
    work = out.with_name(out.name + ".build")
    shutil.rmtree(work, ignore_errors=True)
    start = time.time()
    model = make_tiny_model("qwen-image", work / "model")

    from diffusers import AutoencoderKLQwenImage

    print(f"1/2 training the VAE as an autoencoder on shape pictures ({vae_steps} steps)", flush=True)
    vae = AutoencoderKLQwenImage.from_pretrained(model / "vae")
    mse = train_vae(vae, vae_steps)
    mean, std = latent_statistics(vae, frames=True)
    vae.register_to_config(latents_mean=[round(v, 5) for v in mean.tolist()], latents_std=[round(v, 5) for v in std.tolist()])
    vae.save_pretrained(model / "vae")

    print(f"2/2 fine-tuning the transformer on the base concepts with the trainer ({transformer_steps} steps)", flush=True)
    data = make_base_dataset(work / "base_concepts")
    run = work / "full"
    overrides = {
        "pretrained_model_name_or_path": model, "data_config.img_dir": data, "data_config.img_size": SIZE,
        "data_config.train_batch_size": 4, "data_config.caption_dropout_rate": 0.1, "output_dir": run,
        "training_method": "full", "learning_rate": 2e-3, "lr_scheduler": "cosine", "max_train_steps": transformer_steps,
        "mixed_precision": "no", "report_to": "none", "checkpointing_steps": 0, "logging_steps": 50, "seed": 0,
        "max_sequence_length": 64,
    }
    cls = variants()["qwen-image"][0]
    train(load_config(None, [f"{k}={v}" for k, v in overrides.items()]), cls)
    shutil.rmtree(model / "transformer")
    shutil.copytree(run / TRANSFORMER_DIR, model / "transformer")
    summary = {"vae_steps": vae_steps, "vae_reconstruction_mse": round(mse, 5), "transformer_steps": transformer_steps,
               "base_concepts": sorted(p.read_text().strip() for p in data.glob("*.txt")), "seconds": round(time.time() - start, 1),
               "torch": torch.__version__}
    (model / DONE).write_text(json.dumps(summary, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    model.rename(out)
    shutil.rmtree(work, ignore_errors=True)
    print(f"demo base model: {out} ({summary['seconds']} s)")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for the diffusers pipeline")
    p.add_argument("--vae_steps", type=int, default=600, help="autoencoder training steps of the tiny VAE")
    p.add_argument("--transformer_steps", type=int, default=400, help="full fine-tuning steps on the base concepts")
    args = p.parse_args(argv)
    build(Path(args.out), args.vae_steps, args.transformer_steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
