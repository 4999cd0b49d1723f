"""FLUX.1 LoRA training: dev, schnell and Kontext (picked from the model's model_index.json).

    accelerate launch train_flux_lora.py --config train_configs/train_flux_config.yaml [key=value ...]
    accelerate launch train_flux_lora.py --config train_configs/train_flux_kontext.yaml
"""

import sys

from trainer.cli import main

if __name__ == "__main__":
    sys.exit(main("trainer.models.flux:FluxAdapter", "FLUX.1 dev / schnell / Kontext LoRA training"))
