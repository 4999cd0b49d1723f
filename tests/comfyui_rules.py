"""ComfyUI's LoRA key rules, restated as a test oracle.

ComfyUI (v0.26.1: comfy/lora.py `model_lora_keys_unet` and `load_lora`, comfy/utils.py `flux_to_diffusers` and
`z_image_to_diffusers`) loads a LoRA tensor only when its key is `<name>.<part>` with <name> in the key map it builds
for the loaded model and <part> one of the LoRA parts it reads; any other key is reported as "lora key not loaded".
`mapped_names` rebuilds, per family, the names ComfyUI maps for a diffusers transformer (ComfyUI's Qwen-Image,
Kandinsky 5 and ERNIE-Image models use the diffusers module names; FLUX.1, Z-Image and Krea 2 go through fixed diffusers -> ComfyUI
tables; Ideogram 4's model stacks q / k / v;
Qwen-Image 2.1's model fuses its MLP input projections, v0.37's comfy/lora.py maps LoRAs onto the halves).
"""

from __future__ import annotations

PARTS = ("lora_up.weight", "lora_down.weight", "lora_A.weight", "lora_B.weight", "alpha", "lora_mid.weight", "dora_scale",
         "lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_t2",  # comfy/weight_adapter/lokr.py
         "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",  # comfy/weight_adapter/loha.py
         "reshape_weight")  # comfy/lora.py load_lora: the shape a LoRA's layer is padded to first (FLUX Control's img_in)


def _direct(transformer) -> set[str]:
    """Families whose ComfyUI model keeps the diffusers module names: diffusion_model.<m>, <m>, transformer.<m>."""
    names = set()
    for key in transformer.state_dict():
        if key.endswith(".weight"):
            m = key[: -len(".weight")]
            names |= {f"diffusion_model.{m}", m, f"transformer.{m}", f"lycoris_{m.replace('.', '_')}"}
    return names


def _double_attention(block: str) -> list[str]:
    return [f"{block}.attn.{p}" for p in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out")]


def _flux_table(modules: list[str]) -> set[str]:
    """The names flux_to_diffusers maps a diffusers module under (SimpleTuner, lycoris, OneTrainer, DiffSynth)."""
    names = set()
    for m in modules:
        names |= {f"transformer.{m}", f"lycoris_{m.replace('.', '_')}", f"lora_transformer_{m.replace('.', '_')}", m}
    return names


def _flux(transformer) -> set[str]:
    c = transformer.config
    modules = []
    for i in range(c.num_layers):
        modules += _double_attention(f"transformer_blocks.{i}")
        b = f"transformer_blocks.{i}"
        modules += [f"{b}.{p}" for p in ("norm1.linear", "norm1_context.linear", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                                         "ff_context.net.2")]
    for i in range(c.num_single_layers):
        b = f"single_transformer_blocks.{i}"
        modules += [f"{b}.attn.to_q", f"{b}.attn.to_k", f"{b}.attn.to_v", f"{b}.proj_mlp", f"{b}.norm.linear", f"{b}.proj_out"]
    modules += ["proj_out", "x_embedder", "context_embedder", "norm_out.linear", "time_text_embed.timestep_embedder.linear_1",
                "time_text_embed.timestep_embedder.linear_2", "time_text_embed.text_embedder.linear_1",
                "time_text_embed.text_embedder.linear_2", "time_text_embed.guidance_embedder.linear_1",
                "time_text_embed.guidance_embedder.linear_2"]
    return _flux_table(modules)


def _flux2(transformer) -> set[str]:
    """FLUX.2 goes through the same table (flux_to_diffusers) with its own block layouts."""
    c = transformer.config
    modules = []
    for i in range(c.num_layers):
        modules += _double_attention(f"transformer_blocks.{i}")
        modules += [f"transformer_blocks.{i}.{p}" for p in ("ff.linear_in", "ff.linear_out", "ff_context.linear_in", "ff_context.linear_out")]
    for i in range(c.num_single_layers):
        modules += [f"single_transformer_blocks.{i}.attn.to_qkv_mlp_proj", f"single_transformer_blocks.{i}.attn.to_out"]
    return _flux_table(modules + ["proj_out", "x_embedder", "context_embedder"])


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


def _krea2(transformer) -> set[str]:
    """ComfyUI's Krea 2 branch (comfy/lora.py on comfy.utils.krea2_to_diffusers): the diffusers names of its table (every
    block's attention + gate + SwiGLU, the 2 + 2 text-fusion blocks', and the input / time / text / final projections) as
    transformer.<name>, <name> and lycoris_<name>."""
    c = transformer.config
    blocks = [f"transformer_blocks.{i}" for i in range(c.num_layers)]
    blocks += [f"text_fusion.layerwise_blocks.{i}" for i in range(c.num_layerwise_text_blocks)]
    blocks += [f"text_fusion.refiner_blocks.{i}" for i in range(c.num_refiner_text_blocks)]
    modules = [f"{b}.{p}" for b in blocks for p in ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_gate", "attn.to_out.0", "ff.gate",
                                                    "ff.up", "ff.down")]
    modules += ["img_in", "time_embed.linear_1", "time_embed.linear_2", "time_mod_proj", "txt_in.linear_1", "txt_in.linear_2",
                "text_fusion.projector", "final_layer.linear"]
    names = set()
    for m in modules:
        names |= {f"transformer.{m}", m, f"lycoris_{m.replace('.', '_')}"}
    return names


def _ideogram4(transformer) -> set[str]:
    """ComfyUI's Ideogram 4 model (comfy/ldm/ideogram4/model.py) keeps the diffusers names but stacks to_q / to_k / to_v into
    attention.qkv and names to_out.0 attention.o; the generic rule of model_lora_keys_unet maps diffusion_model.<its name>."""
    own = set()
    for key in transformer.state_dict():
        if key.endswith(".weight"):
            m = key[: -len(".weight")]
            for part in ("to_q", "to_k", "to_v"):
                m = m.replace(f"attention.{part}", "attention.qkv")
            own.add(m.replace("attention.to_out.0", "attention.o"))
    return {f"diffusion_model.{m}" for m in own}


def _qwen_image21(transformer) -> set[str]:
    """ComfyUI (v0.37+, comfy/lora.py, the QwenImage branch; its Qwen-Image 2.1 model is a QwenImage) keeps the
    diffusers names but fuses img_mlp.gate_layer / proj into img_mlp.gate_up at load. Generic rule: diffusion_model.<its
    own names>. QwenImage rule: <name>, transformer.<name>, lycoris_<name>, where gate_up is addressed by its halves."""
    own = {k[: -len(".weight")].replace("img_mlp.gate_layer", "img_mlp.gate_up").replace("img_mlp.proj", "img_mlp.gate_up")
           for k in transformer.state_dict() if k.endswith(".weight")}
    names = {f"diffusion_model.{m}" for m in own}
    for m in own:
        for lora in ((m.replace(".gate_up", ".gate_layer"), m.replace(".gate_up", ".proj")) if m.endswith(".img_mlp.gate_up") else (m,)):
            names |= {lora, f"transformer.{lora}", f"lycoris_{lora.replace('.', '_')}"}
    return names


def _wan(transformer) -> set[str]:
    """ComfyUI's WanModel (comfy/ldm/wan/model.py) keeps the original Wan checkpoint's names, and its LoRA key map for Wan
    is the generic one: diffusion_model.<name> and lora_unet_<name with _> for each of its weights."""
    c = transformer.config
    names = ["patch_embedding", "text_embedding.0", "text_embedding.2", "time_embedding.0", "time_embedding.2", "time_projection.1",
             "head.head"]
    for i in range(c.num_layers):
        b = f"blocks.{i}"
        names += [f"{b}.{a}.{p}" for a in ("self_attn", "cross_attn") for p in ("q", "k", "v", "o", "norm_q", "norm_k")]
        names += [f"{b}.norm3", f"{b}.ffn.0", f"{b}.ffn.2"]
    out = set()
    for n in names:
        out |= {f"diffusion_model.{n}", f"lora_unet_{n.replace('.', '_')}"}
    return out


RULES = {"qwen-image": _direct, "qwen-image-edit": _direct, "qwen-image-edit-plus": _direct, "flux": _flux,
         "flux-kontext": _flux, "flux-control": _flux, "z-image": _z_image, "z-image-omni": _z_image, "chroma": _flux,
         "kandinsky5": _direct, "flux2": _flux2, "flux2-klein": _flux2,  # ComfyUI's Chroma is a Flux model
         "qwen-image-2.1": _qwen_image21, "ernie-image": _direct, "krea2": _krea2, "ideogram4": _ideogram4,
         "hidream-i1": _direct, "qwen-image-layered": _direct, "wan": _wan}  # ComfyUI's Qwen-Image model, with its layer options  # comfy/ldm/ernie/model.py keeps the diffusers names


def not_loaded(keys, variant: str, transformer) -> list[str]:
    """The keys ComfyUI would report as "lora key not loaded" for this variant's model."""
    names = RULES[variant](transformer)
    bad = []
    for key in keys:
        if not any(key.endswith("." + part) and key[: -len(part) - 1] in names for part in PARTS):
            bad.append(key)
    return bad


def comfyui_weight(parts: dict, weight):
    """The weight ComfyUI patches a layer to at strength 1 from one module's LoRA parts (`parts`: part name ->
    tensor), restating comfy/weight_adapter/{lora,lokr,loha}.py `calculate_weight` and base.py `weight_decompose`
    (the output-axis form: the frozen weight's own row norms)."""
    import torch

    alpha = parts.get("alpha")
    if "reshape_weight" in parts:  # comfy/weight_adapter/lora.py: pad_tensor_to_shape (zeros, the weight top-left)
        shape = [int(n) for n in parts["reshape_weight"].tolist()]
        padded = torch.zeros(shape, dtype=weight.dtype)
        padded[: weight.shape[0], : weight.shape[1]] = weight
        weight = padded
    if "lora_A.weight" in parts or "lora_down.weight" in parts:
        down, up = parts.get("lora_A.weight", parts.get("lora_down.weight")), parts.get("lora_B.weight", parts.get("lora_up.weight"))
        diff, dim = up.float() @ down.float(), down.shape[0]
    elif "hada_w1_a" in parts:
        diff = (parts["hada_w1_a"] @ parts["hada_w1_b"]) * (parts["hada_w2_a"] @ parts["hada_w2_b"])
        dim = parts["hada_w1_b"].shape[0]
    else:
        dim = None
        w1 = parts.get("lokr_w1")
        if w1 is None:
            dim = parts["lokr_w1_b"].shape[0]
            w1 = parts["lokr_w1_a"] @ parts["lokr_w1_b"]
        w2 = parts.get("lokr_w2")
        if w2 is None:
            dim = parts["lokr_w2_b"].shape[0]
            w2 = parts["lokr_w2_a"] @ parts["lokr_w2_b"]
        diff = torch.kron(w1, w2).reshape(weight.shape)
    scale = float(alpha) / dim if alpha is not None and dim is not None else 1.0
    weight = weight.float()
    if "dora_scale" not in parts:
        return weight + scale * diff
    dora = parts["dora_scale"].float()
    calc = weight + scale * diff
    assert dora.shape[0] == weight.shape[0], "dora_scale on the output axis"
    norm = weight.reshape(weight.shape[0], -1).norm(dim=1, keepdim=True) + torch.finfo(weight.dtype).eps
    return calc * (dora / norm)
