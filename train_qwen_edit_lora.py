"""Qwen-Image-Edit and Qwen-Image-Edit-2509 ("Plus", several control images) LoRA training.

    accelerate launch train_qwen_edit_lora.py --config train_configs/train_lora_qwen_edit.yaml [key=value ...]
"""

import sys

from trainer.cli import main

if __name__ == "__main__":
    sys.exit(main("trainer.models.qwen_image:QwenImageEditAdapter", "Qwen-Image-Edit / Edit-2509 LoRA training"))
