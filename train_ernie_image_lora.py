"""ERNIE-Image LoRA training.

    accelerate launch train_ernie_image_lora.py --config train_configs/train_ernie_image_lora.yaml [key=value ...]
"""

import sys

from trainer.cli import main

if __name__ == "__main__":
    sys.exit(main("trainer.models.ernie_image:ErnieImageAdapter", "ERNIE-Image LoRA training"))
