"""Qwen-Image full fine-tuning (FlyMyAI's entry name): the train.py trainer with training_method=full.

Output: output_dir/transformer/, a diffusers transformer folder (load it with
`QwenImageTransformer2DModel.from_pretrained(...)` or `inference.py --transformer output_dir`). Every family can be
fully fine-tuned the same way: `training_method=full` with its own entry.

    accelerate launch train_full_qwen_image.py --config train_configs/train_full_qwen_image.yaml
    accelerate launch --config_file accelerate_configs/fsdp.yaml train_full_qwen_image.py --config ...   # sharded
"""

import sys

from trainer.cli import main

FULL_PRESET = {"training_method": "full", "gradient_checkpointing": True}

if __name__ == "__main__":
    sys.exit(main("trainer.models.qwen_image:QwenImageAdapter", "Qwen-Image full fine-tuning", preset=FULL_PRESET))
