"""HiDream-I1 LoRA training.

    accelerate launch train_hidream_lora.py --config train_configs/train_hidream_lora.yaml [key=value ...]
"""

import sys

from trainer.cli import main
from trainer.models.hidream import HiDreamAdapter

if __name__ == "__main__":
    # max_sequence_length 128 unless the YAML says otherwise: HiDream-I1 pads prompts to it, as its pipeline does
    sys.exit(main("trainer.models.hidream:HiDreamAdapter", "HiDream-I1 LoRA training", preset=HiDreamAdapter.config_preset))
