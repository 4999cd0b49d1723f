"""Chroma LoRA training (T5-only FLUX.1-schnell derivative with a prompt attention mask).

    accelerate launch train_chroma_lora.py --config train_configs/train_chroma_lora.yaml [key=value ...]
"""

import sys

from trainer.cli import main

if __name__ == "__main__":
    sys.exit(main("trainer.models.chroma:ChromaAdapter", "Chroma LoRA training"))
