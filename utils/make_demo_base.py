"""The demo's base model: a tiny Qwen-Image pipeline that actually draws coloured shapes.

A random tiny model renders noise, so a LoRA trained on it cannot be seen to learn anything. This base can be looked
at. It is made in two honest steps, deterministically (seeded), on the CPU:

1. its VAE (the Qwen-Image VAE class at width 8, 16 latent channels) is trained as an autoencoder on generated shape
   pictures (pixel MSE + a small KL term); its latent normalization (latents_mean / latents_std) is then set from its
   own latents, as the released model's are;
2. its transformer is fully fine-tuned with this project's own trainer (`training_method: full`) on the base
   concepts (red / green / blue circles and squares on white, utils/make_demo_dataset.py), with its own text encoder.

The demo's LoRA then teaches it something it never saw (a purple star, trigger word zkz). Step 1 takes minutes on 2
CPUs, more than the demo's budget, so the built folder ships in the repository (demo_assets/base-qwen-image, ~2 MB)
and `make demo` copies it; `--train` rebuilds it from nothing with the same seeds (about 6 minutes on 2 CPUs):

    python utils/make_demo_base.py --out demo/base-qwen-image             # copy the shipped base (what make demo does)
    python utils/make_demo_base.py --train --out demo_assets/base-qwen-image   # rebuild it
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
SHIPPED = Path(__file__).resolve().parent.parent / "demo_assets" / "base-qwen-image"
VAE = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True])
# Wider than the test models' transformer (2 blocks of 32): a token here carries 16 channels x 2 x 2 = 64 numbers.
TRANSFORMER = dict(patch_size=2, in_channels=VAE["z_dim"] * 4, out_channels=VAE["z_dim"], num_layers=4, attention_head_dim=32,
                   num_attention_heads=4, joint_attention_dim=32, guidance_embeds=False, axes_dims_rope=(8, 12, 12))


def train_vae(vae, steps: int, seed: int = 0, batch: int = 8, lr: float = 3e-3, log_every: int = 100, size: int = 32):
    """Autoencoder training of a (video-style, frame axis) VAE on freshly drawn shape pictures. It trains at `size`
    (32 px: 4x cheaper than 64; the convolutions carry over to 64 px pictures of the same kind) and decodes the
    posterior's mean (the trainer encodes images to the mean, too), with a small KL term."""
    import numpy as np
    import torch

    from utils.make_demo_dataset import random_picture

    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.05)
    for step in range(1, steps + 1):
        pics = np.stack([np.asarray(random_picture(rng, size), dtype=np.float32) for _ in range(batch)])
        x = (torch.from_numpy(pics).permute(0, 3, 1, 2) / 127.5 - 1.0)[:, :, None]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.mode()).sample
        rec_loss = (recon - x).pow(2).mean()
        kl = posterior.kl().mean() / x[0].numel()
        loss = rec_loss + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps:
            print(f"  vae step {step}/{steps}: reconstruction mse {rec_loss.item():.4f}", flush=True)
    vae.eval().requires_grad_(False)
    return float(rec_loss)


def build(out: Path, vae_steps: int, transformer_steps: int, reuse_vae: bool = False) -> Path:
    """Make the base from nothing into `out` (see the module doc); `reuse_vae`: keep the VAE of the base already in
    `out` and redo step 2 only."""
    import torch
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel

    from trainer.config import load_config
    from trainer.constants import TRANSFORMER_DIR
    from trainer.loop import train
    from trainer.models import variants
    from trainer.models.qwen_image import calibrate_qwen_vae
    from utils.make_demo_dataset import make_base_dataset
    from utils.make_tiny_models import make_tiny_model

    work = out.with_name(out.name + ".build")
    shutil.rmtree(work, ignore_errors=True)
    start = time.time()
    model = make_tiny_model("qwen-image", work / "model")

    shutil.rmtree(model / "vae")
    if reuse_vae:
        previous = json.loads((out / DONE).read_text())
        vae_steps, mse = previous["vae_steps"], previous["vae_reconstruction_mse"]
        shutil.copytree(out / "vae", model / "vae")
        print(f"1/2 VAE kept from {out} ({vae_steps} steps)", flush=True)
    else:
        print(f"1/2 training the VAE as an autoencoder on shape pictures ({vae_steps} steps)", flush=True)
        torch.manual_seed(0)
        vae = AutoencoderKLQwenImage(**VAE)
        mse = train_vae(vae, vae_steps)
        calibrate_qwen_vae(vae).save_pretrained(model / "vae")
    torch.manual_seed(0)
    shutil.rmtree(model / "transformer")
    QwenImageTransformer2DModel(**TRANSFORMER).save_pretrained(model / "transformer")

    print(f"2/2 fine-tuning the transformer on the base concepts with the trainer ({transformer_steps} steps)", flush=True)
    data = make_base_dataset(work / "base_concepts")
    run = work / "full"
    overrides = {
        "pretrained_model_name_or_path": model, "data_config.img_dir": data, "data_config.img_size": SIZE,
        "data_config.train_batch_size": 4, "data_config.caption_dropout_rate": 0.1, "output_dir": run,
        "training_method": "full", "learning_rate": 2e-3, "lr_scheduler": "cosine", "max_train_steps": transformer_steps,
        "mixed_precision": "no", "report_to": "none", "checkpointing_steps": 0, "logging_steps": 50, "seed": 0,
        "max_sequence_length": 64, "overwrite_output_dir": True,  # a rebuild replaces the earlier one
    }
    cls = variants()["qwen-image"][0]
    train(load_config(None, [f"{k}={v}" for k, v in overrides.items()]), cls)
    shutil.rmtree(model / "transformer")
    # stored in float16 (half the repository's bytes); pipelines load it in whatever dtype they are asked for
    QwenImageTransformer2DModel.from_pretrained(run / TRANSFORMER_DIR).to(torch.float16).save_pretrained(model / "transformer")
    summary = {"vae": VAE, "transformer": TRANSFORMER, "vae_steps": vae_steps, "vae_reconstruction_mse": round(mse, 5), "transformer_steps": transformer_steps,
               "base_concepts": sorted({p.read_text().strip() for p in data.glob("*.txt")}), "seconds": round(time.time() - start, 1),
               "torch": torch.__version__}
    (model / DONE).write_text(json.dumps(summary, indent=1) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    model.rename(out)
    shutil.rmtree(work, ignore_errors=True)
    print(f"demo base model built: {out} ({summary['seconds']} s)")
    return out


def install(out: Path) -> Path:
    """Copy the shipped base into `out` (kept when already there)."""
    if (out / DONE).is_file():
        print(f"demo base model: {out} (already there; delete it to copy it again)")
        return out
    if not (SHIPPED / DONE).is_file():
        raise SystemExit(f"error: the shipped demo base {SHIPPED} is missing; build one with --train")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(SHIPPED, tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    print(f"demo base model: {out} (copied from {SHIPPED.relative_to(SHIPPED.parent.parent)})")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for the diffusers pipeline")
    p.add_argument("--train", action="store_true", help="build it from nothing (minutes) instead of copying the shipped one")
    p.add_argument("--vae_steps", type=int, default=3000, help="--train: autoencoder training steps of the VAE (32 px, batch 8)")
    p.add_argument("--transformer_steps", type=int, default=3000, help="--train: full fine-tuning steps on the base concepts")
    p.add_argument("--reuse_vae", action="store_true", help="--train: keep the VAE of the base already in --out, redo the transformer")
    args = p.parse_args(argv)
    if args.train:
        build(Path(args.out), args.vae_steps, args.transformer_steps, args.reuse_vae)
    else:
        install(Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
