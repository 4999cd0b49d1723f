"""Z-Image-Omni LoRA training: text-to-image and editing with 0..10 reference images.

    accelerate launch train_z_image_omni_lora.py --config train_configs/train_z_image_omni_lora.yaml [key=value ...]
"""

import sys

from trainer.cli import main

if __name__ == "__main__":
    sys.exit(main("trainer.models.z_image_omni:ZImageOmniAdapter", "Z-Image-Omni LoRA training (text-to-image and editing)"))
