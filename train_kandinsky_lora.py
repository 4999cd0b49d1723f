"""Kandinsky 5.0 Image (text-to-image) LoRA training.

    accelerate launch train_kandinsky_lora.py --config train_configs/train_kandinsky5_lora.yaml [key=value ...]
"""

import sys

from trainer.cli import main

if __name__ == "__main__":
    sys.exit(main("trainer.models.kandinsky5:Kandinsky5Adapter", "Kandinsky 5.0 Image LoRA training"))
