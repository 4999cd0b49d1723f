"""Krea 2 LoRA training.

    accelerate launch train_krea2_lora.py --config train_configs/train_krea2_lora.yaml [key=value ...]
"""

import sys

from trainer.cli import main

if __name__ == "__main__":
    sys.exit(main("trainer.models.krea2:Krea2Adapter", "Krea 2 LoRA training"))
