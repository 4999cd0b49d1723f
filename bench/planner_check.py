"""utils/estimate_memory.py vs the measured H100 peaks (bench/results/h100_real_size.md).

The measurements are the training phase only (embeddings precomputed, 1024 px, batch 1, rank 16, adamw8bit,
gradient checkpointing) and report torch.cuda.max_memory_allocated, which leaves out the CUDA context and the
allocator's reserve; the planner's training-phase peak minus its slack term is compared with them.

    python bench/planner_check.py
"""

from __future__ import annotations

import logging
import sys

# (hub id, quantize) -> peak allocated GiB, measured on an H100 (bench/results/h100_real_size.md)
MEASURED = {
    ("Qwen/Qwen-Image", "none"): 40.73,
    ("Qwen/Qwen-Image", "qfloat8"): 21.85,
    ("Qwen/Qwen-Image", "qint4"): 13.23,
    ("Qwen/Qwen-Image", "nf4"): 12.63,
    ("black-forest-labs/FLUX.1-dev", "none"): 24.66,
    ("black-forest-labs/FLUX.1-dev", "qfloat8"): 13.76,
    ("black-forest-labs/FLUX.1-dev", "nf4"): 8.40,
}


def rows() -> list[tuple[str, str, float, float]]:
    """(model, quantize, predicted GiB, measured GiB) per measured configuration."""
    from trainer.config import load_config
    from utils.estimate_memory import GB, plan

    out = []
    for (model, quantize), measured in MEASURED.items():
        cfg = load_config(None, [f"pretrained_model_name_or_path={model}", f"quantize={quantize}", "optimizer=adamw8bit",
                                 "rank=16", "gradient_checkpointing=true", "data_config.img_size=1024",
                                 "precompute_text_embeddings=true", "precompute_image_embeddings=true"], check_paths=False)
        _, info = plan(cfg, 1024)
        out.append((model, quantize, (info["train_peak"] - info["slack"]) / GB, measured))
    return out


def main() -> int:
    import argparse

    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    logging.disable(logging.WARNING)
    print("| model | quantize | planner GiB | measured GiB (H100) | error GiB |")
    print("| --- | --- | --- | --- | --- |")
    for model, q, pred, meas in rows():
        print(f"| {model} | {q} | {pred:.2f} | {meas:.2f} | {pred - meas:+.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
