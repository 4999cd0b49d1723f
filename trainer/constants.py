"""File names and small tables shared by the trainer, its tools and its tests (no heavy imports here)."""

LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers-format LoRA (pipe.load_lora_weights reads it)
COMFY_FILE = "pytorch_lora_weights_comfyui.safetensors"  # the same LoRA in ComfyUI naming (lora_format: comfyui)
TRANSFORMER_DIR = "transformer"  # full training: the trained transformer (diffusers save_pretrained folder)
CONTROLNET_DIR = "controlnet"  # training_method: controlnet: the trained ControlNet (diffusers save_pretrained folder)
TRANSFORMER_EMA_DIR = "transformer_ema"  # full training with ema_decay: the averaged weights
STATE_FILE = "training_state.pt"  # optimizer, LR schedule, step, data position, RNG states
CONFIG_FILE = "config.yaml"  # the exact config of a run, in every checkpoint
LOG_FILE = "train_log.jsonl"  # one line per optimizer step

# mixed_precision / --dtype names -> torch dtype attribute names
DTYPE_NAMES = {"no": "float32", "fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def torch_dtype(name: str):
    """'bf16' / 'fp16' / 'fp32' / 'no' -> the torch dtype."""
    import torch

    return getattr(torch, DTYPE_NAMES[name])
