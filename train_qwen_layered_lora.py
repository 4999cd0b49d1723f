"""Qwen-Image-Layered LoRA training.

    accelerate launch train_qwen_layered_lora.py --config train_configs/train_qwen_layered_lora.yaml [key=value ...]
"""

import sys

from trainer.cli import main

if __name__ == "__main__":
    sys.exit(main("trainer.models.qwen_image_layered:QwenImageLayeredAdapter", "Qwen-Image-Layered LoRA training"))
