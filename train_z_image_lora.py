"""Z-Image (Base) and Z-Image-Turbo LoRA training.

    accelerate launch train_z_image_lora.py --config train_configs/train_z_image_lora.yaml [key=value ...]
    accelerate launch train_z_image_lora.py --config train_configs/train_z_image_turbo_lora.yaml   # Turbo + assistant LoRA
"""

import sys

from trainer.cli import main

if __name__ == "__main__":
    sys.exit(main("trainer.models.z_image:ZImageAdapter", "Z-Image / Z-Image-Turbo LoRA training"))
