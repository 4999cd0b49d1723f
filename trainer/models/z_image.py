"""Z-Image (Base) and Z-Image-Turbo: a single-stream DiT over 2x2 patches of FLUX-VAE latents, prompts from the
second-to-last hidden states of Qwen3.

What the trainer feeds the transformer, and where it follows `ZImagePipeline`:
- prompt: the tokenizer's chat template (user turn, generation prompt, thinking on), padded to
  `max_sequence_length` (512, the pipeline's default), hidden_states[-2]; each sample keeps only its real tokens
  (the transformer takes a list of variable-length captions; the trainer carries them padded with a mask).
- latents: one frame per sample (C x 1 x H x W), a list, as the pipeline passes them.
- time runs the other way: the transformer gets 1 - sigma (the pipeline's (1000 - t) / 1000), and its output is the
  negated velocity (the pipeline negates it before the scheduler step), so predict returns -output.
- dropped captions are "" (the pipeline's default negative prompt).

ControlNet (`training_method: controlnet`, ZImageControlNetPipeline): a ZImageControlNetModel of `controlnet_layers`
control blocks placed evenly over the transformer's layers (6 over 30: 0, 5, ..., 25, the layout of VideoX-Fun's first
released Z-Image ControlNet), each started from the transformer's layer at its place, the control latents embedded by a
copy of its patch embedder, `before_proj` / `after_proj` zero (step 0 is the base model). The ControlNet runs the
transformer's own time / caption / patch embedders and refiners (the pipeline shares them with `from_transformer`);
training shares them only for its call, so the trained and saved ControlNet holds its own blocks alone, as the released
ones do. The control image is sized and cropped with the target; the pipeline resizes it to the output's size.

Turbo is step-distilled (8 steps, no CFG): a LoRA trained on it directly drifts away from the distillation. The
recommended path is to train on Z-Image (Base) and use the LoRA on either; for Turbo itself, set `assistant_lora` to
a de-distillation LoRA (e.g. ostris' zimage_turbo_training_adapter): it is active while training, off for the
validation previews, and not part of the saved LoRA.
"""

from __future__ import annotations

import contextlib
from typing import TypedDict

import torch

from . import register
from .base import Cond, ConfigError, InferenceRequest, ModelAdapter, LearningCase, PlannerSpec, Variant
from .flux import flux_vae_latents
from .qwen_image import pad_and_stack

QWEN3_4B_PARAMS = 4_022_468_096  # Qwen3-4B without its LM head
# what ZImageControlNetModel.from_transformer lends a ControlNet of the transformer's own
ZIMAGE_CONTROLNET_SHARED = ("t_embedder", "all_x_embedder", "cap_embedder", "rope_embedder", "noise_refiner", "context_refiner", "x_pad_token",
                            "cap_pad_token")
FLUX_VAE_PARAMS = 83_819_683


class ZImageCond(TypedDict):
    prompt_embeds: torch.Tensor  # B x L x 2560 Qwen3 hidden_states[-2] of the real tokens, zero-padded
    prompt_embeds_mask: torch.Tensor  # B x L, 1 for real tokens


def unpadded(cond: Cond) -> list[torch.Tensor]:
    """Each sample's prompt embeddings without the batch padding (L_i x D), as pipelines taking a list want them."""
    return [e[m.bool()] for e, m in zip(cond["prompt_embeds"], cond["prompt_embeds_mask"])]


def pipeline_guidance(scale: float) -> float:
    """ZImagePipeline's guidance_scale w for the usual classifier-free guidance scale s (what --true_cfg_scale and
    validation_guidance_scale mean for every family: 1 = no CFG). Its step is pos + w (pos - neg), so w = s - 1
    (0 = no CFG; the pipeline's own default w = 5 is s = 6). Passing s unchanged (as this trainer once did) runs
    2 pos - neg at "no CFG", which overshoots what the model was trained to produce (found by tests/test_learning.py)."""
    return max(scale - 1.0, 0.0)


@register
class ZImageAdapter(ModelAdapter):
    family = "z-image"
    default_true_cfg_scale = 6.0  # the pipeline's own default (its guidance_scale 5.0; see pipeline_guidance)
    entry = "train_z_image_lora.py"
    variants = (Variant("z-image", "ZImagePipeline", hub_hints=("z-image",), learning=LearningCase(0, 300, 5e-3)),
                # training_method: controlnet: a ZImageControlNetModel beside Z-Image (ZImageControlNetPipeline); its tiny base's
                # output is at the velocity's scale (ModelAdapter.velocity_scaled)
                Variant("z-image-controlnet", "ZImageControlNetPipeline", (1, 1),
                        learning=LearningCase(1, 300, 5e-3, method="controlnet"),
                        control="controlnet", starts_from=("ZImagePipeline",)))
    transformer_class = "ZImageTransformer2DModel"
    controlnet_class = "ZImageControlNetModel"
    # every Linear ComfyUI maps for Z-Image (comfy.utils.z_image_to_diffusers): attention and feed-forward
    default_target_modules = ("to_q", "to_k", "to_v", "to_out.0", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
    block_count_keys = ("n_layers", "n_refiner_layers", "n_refiner_layers")  # main layers + noise and context refiners
    encoder_folders = ("text_encoder", "tokenizer", "vae")
    text_token_keys = ("prompt_embeds", "prompt_embeds_mask")

    def load_encoders(self) -> None:
        import transformers
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline

        name = self.cfg.pretrained_model_name_or_path
        self.vae, _ = self.place(AutoencoderKL.from_pretrained(name, subfolder="vae", dtype=self.weight_dtype), "none")
        tokenizer = transformers.AutoTokenizer.from_pretrained(name, subfolder="tokenizer")
        self.text_pipe = ZImagePipeline(scheduler=None, vae=None, text_encoder=self.load_text_encoder(), tokenizer=tokenizer, transformer=None)
        self.scheduler_config = dict(FlowMatchEulerDiscreteScheduler.load_config(name, subfolder="scheduler"))


    def count_tokens(self, captions: list[str]) -> list[int]:
        tok = self.text_pipe.tokenizer
        texts = [tok.apply_chat_template([{"role": "user", "content": c}], tokenize=False, add_generation_prompt=True,
                                         enable_thinking=True) for c in captions]
        return [len(ids) for ids in tok(texts).input_ids]

    @torch.no_grad()
    def encode_prompts(self, captions: list[str]) -> ZImageCond:
        embeds = self.text_pipe._encode_prompt(list(captions), device=self.device, max_sequence_length=self.cfg.max_sequence_length)
        padded, mask = pad_and_stack([e.unsqueeze(0) for e in embeds], [None] * len(embeds))
        return {"prompt_embeds": padded.to(self.weight_dtype), "prompt_embeds_mask": mask}

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return flux_vae_latents(self.vae, pixels, self.device)

    def encode_latents(self, batch: dict) -> tuple[torch.Tensor, Cond]:
        if self.variant.control != "controlnet":
            return super().encode_latents(batch)
        # ZImageControlNetPipeline's prepare_image copies the control with repeat_interleave: the VAE sees it contiguous
        with torch.no_grad():
            controls = [flux_vae_latents(self.vae, c, self.device, layout=torch.contiguous_format) for c in batch["controls"]]
        return self.encode_images(batch["pixel_values"]), {"control_latents": controls}

    def predict(self, transformer: torch.nn.Module, noisy: torch.Tensor, sigmas: torch.Tensor, cond: Cond) -> torch.Tensor:
        dt = self.weight_dtype
        frames = list(noisy.to(dt).unsqueeze(2).unbind(0))  # each C x 1 x H x W
        captions = [e[m.bool()] for e, m in zip(cond["prompt_embeds"].to(dt), cond["prompt_embeds_mask"])]
        if self.variant.control == "controlnet":  # the ControlNet pair takes keywords; the control as B x C x 1 x h x w
            out = transformer(x=frames, t=1.0 - sigmas.float(), cap_feats=captions, controlnet_cond=cond["control_latents"][0].to(dt).unsqueeze(2))[0]
        else:
            out = transformer(frames, 1.0 - sigmas.float(), captions, return_dict=False)[0]
        return -torch.stack([o.float() for o in out]).squeeze(2)  # the model predicts the negated velocity

    # --- ControlNet (training_method: controlnet) ----------------------------------------------------------
    @classmethod
    def check_setup(cls, cfg) -> None:
        super().check_setup(cfg)
        if cfg.training_method != "controlnet" or cfg.controlnet_model_name_or_path:
            return
        if cfg.controlnet_single_layers:
            raise ConfigError(f"config key 'controlnet_single_layers' is {cfg.controlnet_single_layers}, but a Z-Image ControlNet has one "
                              "kind of block: set controlnet_layers (its control blocks) and leave controlnet_single_layers out")
        from trainer.models import read_model_index

        layers = read_model_index(cfg.pretrained_model_name_or_path, "transformer/config.json").get("n_layers", 30)
        if cfg.controlnet_layers > layers:
            raise ConfigError(f"config key 'controlnet_layers' is {cfg.controlnet_layers}, but the transformer has {layers} layers to place "
                              "control blocks at")

    def make_controlnet(self, transformer: torch.nn.Module) -> torch.nn.Module:
        from diffusers import ZImageControlNetModel

        c = transformer.config
        k = min(self.cfg.controlnet_layers, c.n_layers)  # training refuses more (check_setup); inference's stand-in takes what fits
        places = [i * c.n_layers // k for i in range(k)]
        net = ZImageControlNetModel(control_layers_places=places, control_in_dim=c.in_channels, all_patch_size=tuple(c.all_patch_size),
                                    all_f_patch_size=tuple(c.all_f_patch_size), dim=c.dim, n_refiner_layers=c.n_refiner_layers,
                                    n_heads=c.n_heads, n_kv_heads=c.n_kv_heads, norm_eps=c.norm_eps, qk_norm=c.qk_norm)
        for block, place in zip(net.control_layers, places):  # the layer's weights; before_proj / after_proj stay zero
            missing, unexpected = block.load_state_dict(transformer.layers[place].state_dict(), strict=False)
            assert not unexpected and all("_proj" in m for m in missing), (missing, unexpected)
        net.control_all_x_embedder.load_state_dict(transformer.all_x_embedder.state_dict())
        return net

    @contextlib.contextmanager
    def sharing(self, controlnet: torch.nn.Module, transformer: torch.nn.Module):
        """The transformer's embedders and refiners lent to the ControlNet for a call (see the module docstring)."""
        type(controlnet).from_transformer(controlnet, transformer)
        with self.controlnet_previews(controlnet):
            yield controlnet

    def controlnet_forward(self, controlnet: torch.nn.Module, transformer: torch.nn.Module, kwargs: dict):
        """As ZImageControlNetPipeline: the ControlNet's hints for the transformer's layers, then the transformer with them."""
        x, t, caps, control = kwargs["x"], kwargs["t"], kwargs["cap_feats"], kwargs["controlnet_cond"]
        extra = controlnet.config.control_in_dim - control.shape[1]
        if extra > 0:  # a 2.x ControlNet (control_in_dim 33 for 16 latent channels): zeros after the control latents, as the pipeline pads
            control = torch.cat([control, control.new_zeros(control.shape[0], extra, *control.shape[2:])], dim=1)
        with self.sharing(controlnet, transformer):
            hints = controlnet(x, t, caps, control, conditioning_scale=1.0)
        return transformer(x, t, caps, controlnet_block_samples=hints, return_dict=False)

    @contextlib.contextmanager
    def controlnet_previews(self, controlnet: torch.nn.Module):
        """ZImageControlNetPipeline shares the transformer's modules with the ControlNet for good; afterwards it holds
        its own blocks alone again (what is trained and saved)."""
        try:
            yield
        finally:
            for name in ZIMAGE_CONTROLNET_SHARED:
                setattr(controlnet, name, None)

    # --- sampling and inference ----------------------------------------------------------------------------
    def sampling_kwargs(self, cond: Cond, negative: Cond, size: tuple[int, int], images: list) -> dict:
        kwargs = {"prompt_embeds": unpadded(cond), "negative_prompt_embeds": unpadded(negative),
                  "guidance_scale": pipeline_guidance(self.cfg.validation_guidance_scale)}
        if self.variant.control == "controlnet":  # the pipeline resizes the control image to the output's size
            kwargs.update(control_image=images[0] if images else None, controlnet_conditioning_scale=self.cfg.controlnet_conditioning_scale)
        return kwargs

    def inference_kwargs(self, request: InferenceRequest) -> dict:
        # its negative prompt defaults to ""
        kwargs = {**self.cfg_inference_kwargs(request), "guidance_scale": pipeline_guidance(request.true_cfg_scale)}
        if self.variant.control == "controlnet":
            kwargs.update(control_image=request.images[0] if request.images else None, controlnet_conditioning_scale=request.conditioning_scale)
        return kwargs

    # --- planner, benches, tiny models ---------------------------------------------------------------------
    def planner_spec(self) -> PlannerSpec:
        return PlannerSpec(encoders=[("text encoder Qwen3-4B", QWEN3_4B_PARAMS, True)], vae_params=FLUX_VAE_PARAMS, text_tokens=128,
                           token_width=3840)

    def random_conditioning(self, transformer, batch: int, device, dtype) -> Cond:
        g = torch.Generator(device=device).manual_seed(0)
        emb = torch.randn(batch, 128, transformer.config.cap_feat_dim, generator=g, device=device).to(dtype)
        return {"prompt_embeds": emb, "prompt_embeds_mask": torch.ones(batch, 128, dtype=torch.long, device=device)}

    def with_blocks(self, config: dict, n: int) -> dict:
        return {**config, "n_layers": n, "n_refiner_layers": 1}

    def make_tiny_model(self, out, realistic: bool = False) -> None:
        """The released prompt layout: Qwen3's chat template, prompts padded to 512 tokens; an 8x VAE."""
        from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline

        from .flux import build_flux_vae

        torch.manual_seed(0)
        tokenizer = build_qwen3_tokenizer()
        vae, text_encoder = build_flux_vae(latent_channels=16), build_qwen3(tokenizer)  # built in this order: the same weights
        transformer = build_z_image_transformer()
        if self.variant.control == "controlnet":
            transformer = self.velocity_scaled(transformer, transformer.all_final_layer["2-1"].linear, 16)
        ZImagePipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False),
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer,
        ).save_pretrained(out)


QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}"
)


def build_qwen3_tokenizer():
    """A byte-level BPE Qwen2/3 tokenizer with Qwen3's chat template (the part the pipeline uses)."""
    from .qwen_image import build_qwen_tokenizer

    tokenizer = build_qwen_tokenizer()
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    tokenizer.pad_token = "<|endoftext|>"
    return tokenizer


def build_qwen3(tokenizer, hidden: int = 32, layers: int = 2):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers, num_attention_heads=2,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
    )
    return Qwen3ForCausalLM(config)  # the released text_encoder class


def build_z_image_transformer(cap_feat_dim: int = 32, siglip_feat_dim: int | None = None):
    from diffusers import ZImageTransformer2DModel

    return ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=64, n_layers=2, n_refiner_layers=1, n_heads=2,
        n_kv_heads=2, cap_feat_dim=cap_feat_dim, axes_dims=[8, 12, 12], axes_lens=[1024, 512, 512], siglip_feat_dim=siglip_feat_dim,
    )
