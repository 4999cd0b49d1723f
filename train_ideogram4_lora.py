"""Ideogram 4 LoRA training.

    accelerate launch train_ideogram4_lora.py --config train_configs/train_ideogram4_lora.yaml [key=value ...]
"""

import sys

from trainer.cli import main

if __name__ == "__main__":
    sys.exit(main("trainer.models.ideogram4:Ideogram4Adapter", "Ideogram 4 LoRA training"))
