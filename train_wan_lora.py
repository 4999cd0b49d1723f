"""Wan 2.1 / 2.2 (one-transformer) LoRA training on images (one-frame videos).

    accelerate launch train_wan_lora.py --config train_configs/train_wan_lora.yaml [key=value ...]
"""

import sys

from trainer.cli import main

if __name__ == "__main__":
    sys.exit(main("trainer.models.wan:WanAdapter", "Wan LoRA training"))
