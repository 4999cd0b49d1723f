"""FLUX.2 LoRA training: Klein 4B / 9B (train on the -base checkpoints) and dev, text-to-image and with 1..10
ordered reference images (picked from the model's model_index.json).

    accelerate launch train_flux2_lora.py --config train_configs/train_flux2_klein_base_4b.yaml [key=value ...]
"""

import sys

from trainer.cli import main

if __name__ == "__main__":
    sys.exit(main("trainer.models.flux2:Flux2Adapter", "FLUX.2 (Klein / dev) LoRA training"))
