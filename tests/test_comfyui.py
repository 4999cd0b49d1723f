"""Every family's ComfyUI-format LoRA file maps completely under ComfyUI's own key rules (tests/comfyui_rules.py)."""

import json

import pytest
from helpers import base_overrides, write_dataset
from safetensors.torch import load_file

from comfyui_rules import not_loaded
from trainer.config import load_config
from trainer.loop import train
from trainer.models import resolve


VARIANTS = ["qwen-image", "qwen-image-edit", "qwen-image-edit-plus", "flux", "flux-kontext", "z-image", "chroma", "kandinsky5", "flux2",
            "flux2-klein", "qwen-image-2.1", "ernie-image", "krea2", "ideogram4", "hidream-i1",
            "qwen-image-layered", "wan"]
TYPE_KEYS = {"lokr": {"lora_type": "lokr"}, "loha": {"lora_type": "loha"}, "dora": {"use_dora": "true"}, "lora": {}}
DIFFUSERS_READS = {("z-image", "lokr"), ("flux2", "lokr"), ("flux2-klein", "lokr")} | {(v, "dora") for v in VARIANTS} | {(v, "lora") for v in VARIANTS}


@pytest.mark.parametrize("kind", list(TYPE_KEYS))
@pytest.mark.parametrize("variant", VARIANTS)
def test_comfyui_file_maps_completely(variant, kind, tiny_models, tmp_path):
    """The ComfyUI file of each family (and adapter type) maps completely under ComfyUI's key rules, ComfyUI's
    arithmetic on it gives peft's merged weights, and the diffusers file loads in the family's pipeline (its own
    load_lora_weights where diffusers reads the type) with exactly the trained weights."""
    from diffusers import DiffusionPipeline
    from helpers import comfyui_error, merged_weights, trained_model

    from trainer.pipelines import adapter_for, load_lora

    model = tiny_models(variant)
    cls, v = resolve(str(model))
    data = write_dataset(tmp_path / "t", n=1)
    extra = dict(TYPE_KEYS[kind])
    if v.references[0]:
        extra["data_config.control_dir"] = str(write_dataset(tmp_path / "c", n=1, seed=2))
    if variant == "qwen-image-2.1":  # its MLP input projections are fused in ComfyUI: LoRAs on them map onto halves
        extra["lora_target_modules"] = "[to_q,to_k,to_v,to_out.0,img_mlp.proj,img_mlp.gate_layer,img_mlp.out]"
    if variant == "ideogram4" and kind != "lora":  # ComfyUI stacks its q / k / v: only a plain LoRA on them has a ComfyUI form
        from trainer.config import ConfigError

        with pytest.raises(ConfigError, match="lora_format"):
            cls.check_setup(load_config(None, base_overrides(model, data, tmp_path / "refused", lora_format="comfyui", **extra)))
        extra["lora_target_modules"] = "[to_out.0,w1,w2,w3]"
    out = tmp_path / "out"
    train(load_config(None, base_overrides(model, data, out, max_train_steps=1, lora_format="comfyui", **extra)), cls)
    comfy = load_file(out / "pytorch_lora_weights_comfyui.safetensors")
    diffusers_file = load_file(out / "pytorch_lora_weights.safetensors")
    per_module = {"lora": 3, "dora": 4, "loha": 5}.get(kind)
    modules = {k.removeprefix("transformer.").rsplit(".", 2 if k.endswith(".weight") else 1)[0] for k in diffusers_file}
    def pipeline():
        return DiffusionPipeline.from_pretrained(model, **adapter_for(str(model)).pipeline_components(str(model)))

    pipe = pipeline()
    assert not_loaded(comfy, variant, pipe.transformer) == []
    adapter, transformer, _ = trained_model(model, data, tmp_path / "out", **extra)
    if per_module:  # (layers ComfyUI stacks into one count once)
        assert len(comfy) == len({adapter.comfyui_names(m)[2] for m in modules}) * per_module, "every part of every adapted layer, and its alpha"
    assert comfyui_error(comfy, adapter, transformer) < 1e-4

    if (variant, kind) in DIFFUSERS_READS:
        pipe.load_lora_weights(out, adapter_name="lora")
    else:
        with pytest.raises(ValueError):  # if diffusers learns to read it, move the pair into DIFFUSERS_READS
            pipeline().load_lora_weights(out, adapter_name="lora")
        load_lora(pipe, str(out), "lora")
    loaded, trained = merged_weights(pipe.transformer, "lora"), merged_weights(transformer)
    assert loaded.keys() == trained.keys() and len(loaded) == len(modules)
    assert max((loaded[k] - trained[k]).abs().max().item() for k in loaded) < 1e-5


# The inputs each ComfyUI node of the shipped workflows takes (required ones; from ComfyUI's node definitions).
COMFY_NODE_INPUTS = {
    "UNETLoader": {"unet_name", "weight_dtype"}, "CLIPLoader": {"clip_name", "type"}, "DualCLIPLoader": {"clip_name1", "clip_name2", "type"},
    "VAELoader": {"vae_name"}, "LoraLoaderModelOnly": {"model", "lora_name", "strength_model"}, "ModelSamplingAuraFlow": {"model", "shift"},
    "CLIPTextEncode": {"text", "clip"}, "ConditioningZeroOut": {"conditioning"}, "FluxGuidance": {"conditioning", "guidance"},
    "EmptySD3LatentImage": {"width", "height", "batch_size"}, "LoadImage": {"image"},
    "ImageScaleToTotalPixels": {"image", "upscale_method", "megapixels", "resolution_steps"}, "VAEEncode": {"pixels", "vae"},
    "TextEncodeQwenImageEdit": {"clip", "prompt", "vae", "image"}, "FluxKontextImageScale": {"image"},
    "ReferenceLatent": {"conditioning", "latent"}, "InstructPixToPixConditioning": {"positive", "negative", "vae", "pixels"},
    "InpaintModelConditioning": {"positive", "negative", "vae", "pixels", "mask", "noise_mask"},
    "KSampler": {"model", "seed", "steps", "cfg", "sampler_name", "scheduler", "positive", "negative", "latent_image", "denoise"},
    "VAEDecode": {"samples", "vae"}, "SaveImage": {"images", "filename_prefix"},
}
# nodes with several outputs (ComfyUI's RETURN_TYPES): LoadImage (IMAGE, MASK); the conditioning nodes (positive, negative, latent)
COMFY_NODE_OUTPUTS = {"LoadImage": 2, "InstructPixToPixConditioning": 3, "InpaintModelConditioning": 3}
CLIP_TYPES = {"CLIPLoader": {"qwen_image", "lumina2", "chroma", "flux2"}, "DualCLIPLoader": {"flux"}}


def test_comfyui_workflows_load_the_trained_lora_into_the_sampled_model():
    import subprocess

    from helpers import PY, ROOT

    from trainer.constants import COMFY_FILE
    from trainer.models import variants
    from utils.comfyui_workflows import WORKFLOWS

    r = subprocess.run([PY, "utils/comfyui_workflows.py", "--check"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert set(WORKFLOWS) <= set(variants())
    for name in WORKFLOWS:
        nodes = json.loads((ROOT / "comfyui" / f"{name}.json").read_text())
        for node_id, node in nodes.items():
            kind, inputs = node["class_type"], node["inputs"]
            assert set(inputs) == COMFY_NODE_INPUTS[kind], (name, kind)
            for value in inputs.values():
                if isinstance(value, list):  # a link: [node id, output index] of an existing node
                    outputs = COMFY_NODE_OUTPUTS.get(nodes[value[0]]["class_type"], 1) if value[0] in nodes else 0
                    assert value[0] in nodes and 0 <= value[1] < outputs and value[0] != node_id, (name, node_id, value)
            if kind in CLIP_TYPES:
                assert inputs["type"] in CLIP_TYPES[kind], (name, inputs["type"])
        loras = [n for n in nodes.values() if n["class_type"] == "LoraLoaderModelOnly"]
        assert len(loras) == 1 and loras[0]["inputs"]["lora_name"] == COMFY_FILE and loras[0]["inputs"]["strength_model"] == 1.0
        # the sampler's model comes from the base model through the LoRA
        sampler = next(n for n in nodes.values() if n["class_type"] == "KSampler")
        chain, node = [], sampler
        while "model" in node["inputs"]:
            node = nodes[node["inputs"]["model"][0]]
            chain.append(node["class_type"])
        assert "LoraLoaderModelOnly" in chain and chain[-1] == "UNETLoader", (name, chain)
