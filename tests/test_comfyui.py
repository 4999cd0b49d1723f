"""Every family's ComfyUI-format LoRA file maps completely under ComfyUI's own key rules (tests/comfyui_rules.py)."""

import pytest
from helpers import base_overrides, write_dataset
from safetensors.torch import load_file

from comfyui_rules import not_loaded
from trainer.config import load_config
from trainer.loop import train
from trainer.models import resolve


@pytest.mark.parametrize("variant", ["qwen-image", "qwen-image-edit", "qwen-image-edit-plus", "flux", "flux-kontext", "z-image", "chroma", "kandinsky5",
                                     "flux2", "flux2-klein", "qwen-image-2.1"])
def test_comfyui_file_maps_completely(variant, tiny_models, tmp_path):
    model = tiny_models(variant)
    cls, v = resolve(str(model))
    data = write_dataset(tmp_path / "t", n=1)
    extra = {}
    if v.references[0]:
        extra["data_config.control_dir"] = str(write_dataset(tmp_path / "c", n=1, seed=2))
    if variant == "qwen-image-2.1":  # its MLP input projections are fused in ComfyUI: LoRAs on them map onto halves
        extra["lora_target_modules"] = "[to_q,to_k,to_v,to_out.0,img_mlp.proj,img_mlp.gate_layer,img_mlp.out]"
    out = tmp_path / "out"
    train(load_config(None, base_overrides(model, data, out, max_train_steps=1, lora_format="comfyui", **extra)), cls)
    comfy = load_file(out / "pytorch_lora_weights_comfyui.safetensors")
    diffusers_file = load_file(out / "pytorch_lora_weights.safetensors")
    assert len(comfy) == len(diffusers_file) * 3 // 2, "an up, a down and an alpha per adapted layer"
    adapter = cls.from_model(load_config(None, base_overrides(model, data, out), check_paths=False))
    adapter.load_transformer()
    assert not_loaded(comfy, variant, adapter.transformer) == []
