"""Qwen-Image 2.1 LoRA training: text-to-image and image-conditioned (0..10 reference images per sample).

    accelerate launch train_qwen_image_21_lora.py --config train_configs/train_qwen_image_21_lora.yaml [key=value ...]
"""

import sys

from trainer.cli import main

if __name__ == "__main__":
    sys.exit(main("trainer.models.qwen_image21:QwenImage21Adapter", "Qwen-Image 2.1 LoRA training"))
