"""Qwen-Image LoRA training.

    accelerate launch train.py --config train_configs/train_lora.yaml [key=value ...]
    python train.py --config train_configs/train_lora.yaml max_train_steps=20
"""

import sys

from trainer.cli import main

if __name__ == "__main__":
    sys.exit(main("trainer.models.qwen_image:QwenImageAdapter", "Qwen-Image LoRA training"))
