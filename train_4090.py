"""Qwen-Image LoRA on a 24 GB card: the train.py trainer with a low-VRAM preset.

Preset (any of it can be overridden in the YAML or on the command line): the transformer quantized to qfloat8
block by block, prompt embeddings and VAE latents precomputed (text encoder and VAE freed before training),
8-bit AdamW, gradient checkpointing.

    accelerate launch train_4090.py --config train_configs/train_lora_4090.yaml
"""

import sys

from trainer.cli import main

LOW_VRAM_PRESET = {
    "quantize": "qfloat8",
    "optimizer": "adamw8bit",
    "precompute_text_embeddings": True,
    "precompute_image_embeddings": True,
    "gradient_checkpointing": True,
    "mixed_precision": "bf16",
}

if __name__ == "__main__":
    sys.exit(main("trainer.models.qwen_image:QwenImageAdapter", "Qwen-Image LoRA training, low-VRAM preset", preset=LOW_VRAM_PRESET))
