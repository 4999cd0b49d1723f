"""ComfyUI's LoRA key rules, restated as a test oracle.

ComfyUI (v0.26.1: comfy/lora.py `model_lora_keys_unet` and `load_lora`, comfy/utils.py `flux_to_diffusers` and
`z_image_to_diffusers`) loads a LoRA tensor only when its key is `<name>.<part>` with <name> in the key map it builds
for the loaded model and <part> one of the LoRA parts it reads; any other key is reported as "lora key not loaded".
`mapped_names` rebuilds, per family, the names ComfyUI maps for a diffusers transformer (ComfyUI's Qwen-Image and
Kandinsky 5 models use the diffusers module names; FLUX.1 and Z-Image go through fixed diffusers -> ComfyUI tables).
"""

from __future__ import annotations

PARTS = ("lora_up.weight", "lora_down.weight", "lora_A.weight", "lora_B.weight", "alpha", "lora_mid.weight", "dora_scale")


def _direct(transformer) -> set[str]:
    """Families whose ComfyUI model keeps the diffusers module names: diffusion_model.<m>, <m>, transformer.<m>."""
    names = set()
    for key in transformer.state_dict():
        if key.endswith(".weight"):
            m = key[: -len(".weight")]
            names |= {f"diffusion_model.{m}", m, f"transformer.{m}", f"lycoris_{m.replace('.', '_')}"}
    return names


def _flux(transformer) -> set[str]:
    c = transformer.config
    modules = []
    for i in range(c.num_layers):
        b = f"transformer_blocks.{i}"
        modules += [f"{b}.attn.{p}" for p in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out")]
        modules += [f"{b}.{p}" for p in ("norm1.linear", "norm1_context.linear", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                                         "ff_context.net.2")]
    for i in range(c.num_single_layers):
        b = f"single_transformer_blocks.{i}"
        modules += [f"{b}.attn.to_q", f"{b}.attn.to_k", f"{b}.attn.to_v", f"{b}.proj_mlp", f"{b}.norm.linear", f"{b}.proj_out"]
    modules += ["proj_out", "x_embedder", "context_embedder", "norm_out.linear", "time_text_embed.timestep_embedder.linear_1",
                "time_text_embed.timestep_embedder.linear_2", "time_text_embed.text_embedder.linear_1",
                "time_text_embed.text_embedder.linear_2", "time_text_embed.guidance_embedder.linear_1",
                "time_text_embed.guidance_embedder.linear_2"]
    names = set()
    for m in modules:
        names |= {f"transformer.{m}", f"lycoris_{m.replace('.', '_')}", f"lora_transformer_{m.replace('.', '_')}", m}
    return names


def _flux2(transformer) -> set[str]:
    """FLUX.2 goes through the same table (flux_to_diffusers) with its own block layouts."""
    c = transformer.config
    modules = []
    for i in range(c.num_layers):
        b = f"transformer_blocks.{i}"
        modules += [f"{b}.attn.{p}" for p in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out")]
        modules += [f"{b}.{p}" for p in ("ff.linear_in", "ff.linear_out", "ff_context.linear_in", "ff_context.linear_out")]
    for i in range(c.num_single_layers):
        modules += [f"single_transformer_blocks.{i}.attn.to_qkv_mlp_proj", f"single_transformer_blocks.{i}.attn.to_out"]
    names = set()
    for m in modules + ["proj_out", "x_embedder", "context_embedder"]:
        names |= {f"transformer.{m}", f"lycoris_{m.replace('.', '_')}", f"lora_transformer_{m.replace('.', '_')}", m}
    return names


def _z_image(transformer) -> set[str]:
    c = transformer.config
    modules = []
    for group, count, adaln in (("layers", c.n_layers, True), ("context_refiner", c.n_refiner_layers, False),
                                ("noise_refiner", c.n_refiner_layers, True)):
        for i in range(count):
            b = f"{group}.{i}"
            modules += [f"{b}.attention.{p}" for p in ("to_q", "to_k", "to_v", "to_out.0")]
            modules += [f"{b}.feed_forward.{p}" for p in ("w1", "w2", "w3")]
            if adaln:
                modules.append(f"{b}.adaLN_modulation.0")
    modules += ["all_final_layer.2-1.linear", "all_final_layer.2-1.adaLN_modulation.1", "all_x_embedder.2-1", "cap_embedder.1",
                "t_embedder.mlp.0", "t_embedder.mlp.2"]
    names = set()
    for m in modules:
        names |= {f"diffusion_model.{m}", f"transformer.{m}", f"lycoris_{m.replace('.', '_')}", m}
    return names


RULES = {"qwen-image": _direct, "qwen-image-edit": _direct, "qwen-image-edit-plus": _direct, "flux": _flux,
         "flux-kontext": _flux, "z-image": _z_image, "chroma": _flux,
         "kandinsky5": _direct, "flux2": _flux2, "flux2-klein": _flux2}  # ComfyUI's Chroma is a Flux model


def not_loaded(keys, variant: str, transformer) -> list[str]:
    """The keys ComfyUI would report as "lora key not loaded" for this variant's model."""
    names = RULES[variant](transformer)
    bad = []
    for key in keys:
        if not any(key.endswith("." + part) and key[: -len(part) - 1] in names for part in PARTS):
            bad.append(key)
    return bad
