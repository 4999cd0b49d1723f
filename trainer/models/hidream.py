"""HiDream-I1 (HiDream.ai, 17B sparse MMDiT: 16 double-stream + 32 single-stream blocks whose image feed-forward is a
mixture of 4 routed experts, 2 active per token, beside a shared expert). Four text encoders: two Long-CLIPs (L / G,
pooled), T5-XXL and the hidden states of every layer of Llama-3.1-8B-Instruct; latents of the FLUX.1 VAE.

What the trainer feeds the transformer, and where it follows `HiDreamImagePipeline`:
- prompt: each encoder's tokens padded to `max_sequence_length` (the pipeline's default and the released training's
  length is 128; the transformer has no text mask, so the padding is conditioning: training pads as the pipeline
  does, and `max_sequence_length` other than 128 is trained and sampled as given, with a warning). CLIP-L and CLIP-G
  give the pooled projections (2 x their width, 2048), T5 its last hidden state (B x 128 x 4096), Llama every layer's
  hidden state (hidden_states[1:], 32 x B x 128 x 4096); the transformer reads the layers its `llama_layers` names
  (the released 0-31, then 31 again for the last 16 single blocks). The cache keeps all of them (about 34 MB per
  caption in bf16: 32 layers x 128 tokens x 4096).
- latents: the FLUX.1 VAE's mode, (z - shift) x scale, B x 16 x H/8 x W/8, not packed: the transformer patchifies
  them itself. A square image is h/2 x w/2 tokens; a non-square one is padded to the transformer's `max_seq` (4096,
  the 128 x 128 latent of 1024 x 1024) with a key mask, as the released model was trained and as the pipeline calls it:
  training calls the transformer exactly as the pipeline does, so a non-square image costs 4096 tokens at any size,
  and sides above 1024 px (more than 4096 tokens) are refused before anything loads.
- time: the transformer takes the scheduler's timestep (1000 sigma) and predicts x0 - noise (the pipeline steps with
  its negation); `predict` returns noise - x0 as every family does.
- mixture of experts: in eval mode diffusers' MoE layer runs `moe_infer` under torch.no_grad, so no gradient would
  reach the routed experts or through them; with gradients on, `predict` runs those layers in their training path
  (the same weighted sum of the same experts, in another order: equal to float rounding, tested). The router
  (`gate`, a bare weight, not a Linear) is not a LoRA target; its load-balancing loss is computed by diffusers' layer
  but not applied (`AddAuxiliaryLoss` is commented out there, as in HiDream's released code): a LoRA that leaves
  the router frozen has nothing for it to balance. Default LoRA targets: attention (both streams), the shared
  experts and the text feed-forward; the routed experts are opt-in (`experts.*.w1`, ...).
- sigmas: HiDream-I1-Full's scheduler is UniPC with flow sigmas and a static shift 3.0 (HiDream's own inference code:
  FlowUniPCMultistepScheduler, shift 3); training draws them through that shift; `timestep_sampling: schedule` follows
  the folder's scheduler class. Dev / Fast are step-distilled (a warning says so; train on Full).
- guidance: real CFG with "" as the negative prompt (the pipeline's default scale 5.0).
- size: the pipeline scales every request to the area of 1024 x 1024 (its default_sample_size x VAE factor), aspect kept;
  previews, inference.py and the learning test render at the size asked for (`render_size` sets that attribute for the
  call), non-square only up to the 4096 tokens the transformer pads to.

HiDream-ai's repositories leave out text_encoder_4 / tokenizer_4 (Llama-3.1-8B-Instruct, a gated model): train from a
folder that has them (`HiDreamImagePipeline.from_pretrained(..., text_encoder_4=..., tokenizer_4=...).save_pretrained`,
or a hub copy that includes them); a folder without them is refused before anything loads. Released sizes: the
transformer config of HiDream-I1 (diffusers' conversion script: 2560 wide, 16 + 32 blocks, 20 heads of 128, experts 4
/ 2, caption channels [4096, 4096], text_emb_dim 2048).
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import TypedDict

import torch

from . import register
from .base import Cond, InferenceRequest, ModelAdapter, LearningCase, PlannerSpec, Variant
from .flux import FLUX_VAE_PARAMS, T5_XXL_PARAMS, flux_vae_latents

logger = logging.getLogger("trainer")

PIPELINE_TOKENS = 128  # HiDreamImagePipeline's default max_sequence_length (and the released training's)
RELEASED_TRANSFORMER = {
    "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 16, "num_single_layers": 32, "attention_head_dim": 128,
    "num_attention_heads": 20, "caption_channels": [4096, 4096], "text_emb_dim": 2048, "num_routed_experts": 4,
    "num_activated_experts": 2, "axes_dims_rope": [64, 32, 32], "max_resolution": [128, 128],
    "llama_layers": list(range(32)) + [31] * 16,
}
# Llama-3.1-8B-Instruct's config.json and HiDream's Long-CLIP-L / G text towers (248 positions), for the planner
LLAMA31_8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
              "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False}
LONG_CLIP = {"L": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12, "projection_dim": 768},
             "G": {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20, "projection_dim": 1280}}


class HiDreamCond(TypedDict):
    t5: torch.Tensor  # B x max_sequence_length x 4096, T5's last hidden state of the padded caption
    llama: torch.Tensor  # B x layers x max_sequence_length x 4096, Llama's hidden states after each layer
    pooled: torch.Tensor  # B x 2048, CLIP-L's and CLIP-G's pooled projections side by side


def moe_layers(transformer: torch.nn.Module) -> list[torch.nn.Module]:
    from diffusers.models.transformers.transformer_hidream_image import MOEFeedForwardSwiGLU

    found = transformer.__dict__.get("_moe_layers")
    if found is None:
        found = [m for m in transformer.modules() if isinstance(m, MOEFeedForwardSwiGLU)]
        transformer.__dict__["_moe_layers"] = found
    return found


def spatial_output(out: torch.Tensor, transformer: torch.nn.Module, h: int, w: int) -> torch.Tensor:
    """The transformer's output as B x C x H x W. In training mode (the whole model's `training`, as in full
    fine-tuning with modules set to train) diffusers returns B x C x tokens x p*p instead; the first h/p x w/p tokens
    are the image's (the rest: padding of a non-square one)."""
    if not transformer.training or transformer.config.force_inference_output:
        return out
    p = transformer.config.patch_size
    b, c = out.shape[:2]
    gh, gw = h // p, w // p
    return out[:, :, : gh * gw].reshape(b, c, gh, gw, p, p).permute(0, 1, 2, 4, 3, 5).reshape(b, c, h, w)


@register
class HiDreamAdapter(ModelAdapter):
    family = "hidream"
    entry = "train_hidream_lora.py"
    variants = (Variant("hidream-i1", "HiDreamImagePipeline", hub_hints=("hidream-i1",), learning=LearningCase(0, 150, 1e-2)),)  # 150 steps: choice +0.78 (300: +0.91)
    default_true_cfg_scale = 5.0  # the pipeline's default guidance_scale
    transformer_class = "HiDreamImageTransformer2DModel"
    # attention of both streams, the shared expert of every MoE layer and the text stream's feed-forward (the dense paths
    # every token takes); the routed experts are opt-in: experts.*.w1 / w2 / w3
    default_target_modules = ("to_q", "to_k", "to_v", "to_out", "to_q_t", "to_k_t", "to_v_t", "to_out_t",
                              "shared_experts.w1", "shared_experts.w2", "shared_experts.w3", "ff_t.w1", "ff_t.w2", "ff_t.w3")
    block_count_keys = ("num_layers", "num_single_layers")
    encoder_folders = ("text_encoder", "text_encoder_2", "text_encoder_3", "text_encoder_4", "tokenizer", "tokenizer_2", "tokenizer_3",
                       "tokenizer_4", "vae")
    config_preset = {"max_sequence_length": PIPELINE_TOKENS}  # the pipeline's padding length, not the shared 512
    max_seq: int | None = None  # the loaded transformer's padded image sequence (non-square images)

    @classmethod
    def check_setup(cls, cfg) -> None:
        from pathlib import Path

        from trainer.config import ConfigError
        from trainer.models import read_model_index

        super().check_setup(cfg)
        folder = Path(cfg.pretrained_model_name_or_path).expanduser()
        if folder.is_dir() and not all((folder / f).is_dir() for f in ("text_encoder_4", "tokenizer_4")):
            raise ConfigError("config key 'pretrained_model_name_or_path': this HiDream-I1 folder has no text_encoder_4 / tokenizer_4 "
                              "(HiDream-ai's repositories leave out Llama-3.1-8B-Instruct); save a complete folder with "
                              "HiDreamImagePipeline.from_pretrained(<folder>, text_encoder_4=LlamaForCausalLM.from_pretrained(<llama>), "
                              "tokenizer_4=AutoTokenizer.from_pretrained(<llama>)).save_pretrained(<new folder>)")
        try:
            max_res = read_model_index(cfg.pretrained_model_name_or_path, "transformer/config.json").get("max_resolution", [128, 128])
        except Exception:
            max_res = RELEASED_TRANSFORMER["max_resolution"]
        largest = int(math.sqrt(max_res[0] * max_res[1])) * 8  # pixels of the side whose square fills max_seq
        d = cfg.data_config
        for part_key, part in (("data_config", d), *((f"data_config.datasets[{i}]", p) for i, p in enumerate(d.datasets or []))):
            for key, sizes in (("img_size", [part.img_size] if part.img_size else []), ("resolutions", part.resolutions or [])):
                if any(s > largest for s in sizes):
                    raise ConfigError(f"config key '{part_key}.{key}' asks for {max(sizes)} px; HiDream-I1 pads non-square images to "
                                      f"{max_res[0] * max_res[1] // 4} tokens ({largest} x {largest}), so sides above {largest} are not trained")
        if cfg.max_sequence_length != PIPELINE_TOKENS:
            logger.warning("max_sequence_length %d: HiDream-I1 pads every prompt to it and its transformer sees the padding; the "
                           "pipeline's default and the released model's length is %d (sample with max_sequence_length=%d)",
                           cfg.max_sequence_length, PIPELINE_TOKENS, cfg.max_sequence_length)

    def load_encoders(self) -> None:
        import transformers
        from diffusers import AutoencoderKL, HiDreamImagePipeline

        name, dt = self.cfg.pretrained_model_name_or_path, self.weight_dtype
        self.vae, _ = self.place(AutoencoderKL.from_pretrained(name, subfolder="vae", dtype=dt), "none")
        clip_l, _ = self.place(transformers.CLIPTextModelWithProjection.from_pretrained(name, subfolder="text_encoder", dtype=dt), "none")
        clip_g, _ = self.place(transformers.CLIPTextModelWithProjection.from_pretrained(name, subfolder="text_encoder_2", dtype=dt), "none")
        quantize = self.cfg.quantize_text_encoder
        t5, _ = self.place(transformers.T5EncoderModel.from_pretrained(name, subfolder="text_encoder_3", dtype=dt), quantize)
        llama, _ = self.place(transformers.LlamaForCausalLM.from_pretrained(name, subfolder="text_encoder_4", dtype=dt), quantize)
        tok = {f"tokenizer{s}": transformers.AutoTokenizer.from_pretrained(name, subfolder=f"tokenizer{s}") for s in ("", "_2", "_3", "_4")}
        self.text_pipe = HiDreamImagePipeline(scheduler=None, vae=None, transformer=None, text_encoder=clip_l, text_encoder_2=clip_g,
                                              text_encoder_3=t5, text_encoder_4=llama, **tok)
        from diffusers import FlowMatchEulerDiscreteScheduler  # any scheduler class reads the folder's config, _class_name included

        self.pipeline_scheduler = dict(FlowMatchEulerDiscreteScheduler.load_config(name, subfolder="scheduler"))
        if self.pipeline_scheduler.get("_class_name") != "UniPCMultistepScheduler":
            self.warn_distilled("HiDream-I1 (Dev / Fast)", "HiDream-I1-Full")
        c = self.pipeline_scheduler  # training sigmas: the same static shift (UniPC names it flow_shift)
        self.scheduler_config = {**c, "shift": c.get("flow_shift", c.get("shift", 1.0))}

    def scheduler_class(self):
        """The model folder's scheduler class (Full: UniPCMultistepScheduler; Dev / Fast: flow-match Euler / LCM), as its
        config names it (read once, in load_encoders)."""
        import diffusers

        return getattr(diffusers, self.pipeline_scheduler["_class_name"])

    def load_transformer(self) -> None:
        super().load_transformer()
        self.max_seq = self.transformer.max_seq

    # --- conditioning --------------------------------------------------------------------------------------
    def count_tokens(self, captions: list[str]) -> list[int]:
        """The most tokens any of the four tokenizers makes of each caption (each cuts at max_sequence_length)."""
        p = self.text_pipe
        counts = [[len(ids) for ids in tok(list(captions)).input_ids] for tok in (p.tokenizer, p.tokenizer_2, p.tokenizer_3, p.tokenizer_4)]
        return [max(c) for c in zip(*counts)]

    @torch.no_grad()
    def encode_prompts(self, captions: list[str]) -> HiDreamCond:
        t5, _, llama, _, pooled, _ = self.text_pipe.encode_prompt(
            prompt=list(captions), device=self.device, dtype=self.weight_dtype, do_classifier_free_guidance=False,
            max_sequence_length=self.cfg.max_sequence_length)
        dt = self.weight_dtype
        return {"t5": t5.to(dt), "llama": llama.transpose(0, 1).to(dt).contiguous(), "pooled": pooled.to(dt)}

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return flux_vae_latents(self.vae, pixels, self.device)

    def image_seq_len(self, latents: torch.Tensor) -> int:
        h, w = latents.shape[-2] // 2, latents.shape[-1] // 2
        if h == w:
            return h * w
        return max(h * w, self.max_seq or RELEASED_TRANSFORMER["max_resolution"][0] * RELEASED_TRANSFORMER["max_resolution"][1] // 4)

    def predict(self, transformer: torch.nn.Module, noisy: torch.Tensor, sigmas: torch.Tensor, cond: Cond) -> torch.Tensor:
        dt = self.weight_dtype
        grad = torch.is_grad_enabled()
        for layer in moe_layers(transformer):  # see the module docstring: routed experts only take gradients in training mode
            if layer.training != grad:
                layer.train(grad)
        out = transformer(
            hidden_states=noisy.to(dt),
            timesteps=(sigmas.float() * 1000).to(dt),  # the scheduler's timestep
            encoder_hidden_states_t5=cond["t5"].to(dt),
            encoder_hidden_states_llama3=cond["llama"].transpose(0, 1).to(dt),
            pooled_embeds=cond["pooled"].to(dt),
            return_dict=False,
        )[0]
        return -spatial_output(out, transformer, *noisy.shape[-2:]).float()

    # --- sigmas ------------------------------------------------------------------------------------------------
    def training_mu(self, image_seq_len: int) -> float | None:
        c = self.scheduler_config
        if not c.get("use_dynamic_shifting"):
            return None
        from trainer.flow_matching import calculate_shift

        return calculate_shift(self.max_seq or 4096)  # the pipeline's mu: its transformer's max_seq, at every size

    def sigma_path(self, image_seq_len: int) -> torch.Tensor:
        cache = self.__dict__.setdefault("_sigma_paths", {})
        if image_seq_len not in cache:
            import inspect

            scheduler = self.scheduler_class().from_config(self.pipeline_scheduler)
            n = inspect.signature(self.pipeline_class.__call__).parameters["num_inference_steps"].default
            kwargs = {"mu": self.training_mu(image_seq_len)} if self.pipeline_scheduler.get("use_dynamic_shifting") else {}
            scheduler.set_timesteps(n, **kwargs)
            cache[image_seq_len] = scheduler.sigmas.float().cpu()
        return cache[image_seq_len]

    # --- sampling and inference ----------------------------------------------------------------------------
    def sampling_pipeline(self, transformer: torch.nn.Module):
        return self.pipeline_class(scheduler=self.scheduler_class().from_config(self.pipeline_scheduler), vae=self.vae,
                                   transformer=transformer, **self.no_text_components())

    def no_text_components(self) -> dict:
        return {f"{kind}{s}": None for kind in ("text_encoder", "tokenizer") for s in ("", "_2", "_3", "_4")}

    def render_size(self, pipe, width: int | None, height: int | None):
        """The pipeline renders at the size asked for instead of scaling it to 1024 x 1024's area (non-square: up to the
        tokens its transformer pads to)."""
        if not width or not height:
            return contextlib.nullcontext()
        tokens = (width // 16) * (height // 16)
        if width != height and tokens > pipe.transformer.max_seq:
            return contextlib.nullcontext()  # more than the padded sequence holds: the pipeline's own scaling
        return _sample_size(pipe, math.sqrt(width * height) / pipe.vae_scale_factor * (1 + 1e-9))

    def sampling_kwargs(self, cond: Cond, negative: Cond, size: tuple[int, int], images: list) -> dict:
        return {"prompt_embeds_t5": cond["t5"], "prompt_embeds_llama3": cond["llama"].transpose(0, 1), "pooled_prompt_embeds": cond["pooled"],
                "negative_prompt_embeds_t5": negative["t5"], "negative_prompt_embeds_llama3": negative["llama"].transpose(0, 1),
                "negative_pooled_prompt_embeds": negative["pooled"], "guidance_scale": self.cfg.validation_guidance_scale,
                "max_sequence_length": self.cfg.max_sequence_length}

    def inference_kwargs(self, request: InferenceRequest) -> dict:
        return self.cfg_inference_kwargs(request)

    # --- planner, benches, tiny models ---------------------------------------------------------------------
    def released_transformer_config(self) -> dict:
        return dict(RELEASED_TRANSFORMER)

    def with_blocks(self, config: dict, n: int) -> dict:
        single = max(1, n - 1)
        return {**config, "num_layers": 1, "num_single_layers": single, "llama_layers": [0] * (1 + single)}

    def planner_spec(self) -> PlannerSpec:
        return PlannerSpec(encoders=[("text encoder Llama-3.1-8B", llama31_params(), True), ("text encoder T5-XXL", T5_XXL_PARAMS, True),
                                     ("text encoders Long-CLIP-L / G", long_clip_params(), False)],
                           vae_params=FLUX_VAE_PARAMS, text_tokens=3 * self.cfg.max_sequence_length)

    def random_conditioning(self, transformer, batch: int, device, dtype) -> Cond:
        g = torch.Generator(device=device).manual_seed(0)
        c = transformer.config
        n, layers = self.cfg.max_sequence_length, max(c.llama_layers) + 1
        return {"t5": torch.randn(batch, n, c.caption_channels[0], generator=g, device=device).to(dtype),
                "llama": torch.randn(batch, layers, n, c.caption_channels[1], generator=g, device=device).to(dtype),
                "pooled": torch.randn(batch, c.text_emb_dim, generator=g, device=device).to(dtype)}

    def make_tiny_model(self, out, realistic: bool = False) -> None:
        """The released text path at tiny width (Long-CLIP-style CLIPs with 248 positions, T5, a 3-layer Llama whose every
        layer's state is read), the FLUX.1 VAE layout (8x), HiDream-I1-Full's scheduler (UniPC, flow sigmas, shift 3),
        a transformer with the released MoE (4 routed experts, 2 active, a shared one)."""
        from diffusers import HiDreamImagePipeline, UniPCMultistepScheduler

        from .flux import build_flux_vae

        torch.manual_seed(0)
        clip_l, tok_l = build_long_clip(16)
        clip_g, tok_g = build_long_clip(16)
        t5, tok_t5 = build_t5_tiny()
        llama, tok_llama = build_llama()
        HiDreamImagePipeline(
            scheduler=UniPCMultistepScheduler(num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True,
                                              flow_shift=3.0),
            vae=build_flux_vae(), text_encoder=clip_l, tokenizer=tok_l, text_encoder_2=clip_g, tokenizer_2=tok_g, text_encoder_3=t5,
            tokenizer_3=tok_t5, text_encoder_4=llama, tokenizer_4=tok_llama, transformer=build_hidream_transformer(realistic),
        ).save_pretrained(out)


@contextlib.contextmanager
def _sample_size(pipe, size: float):
    saved = pipe.default_sample_size
    pipe.default_sample_size = size  # the area __call__ scales every request to: the request's own (a hair above: floors keep it)
    try:
        yield
    finally:
        pipe.default_sample_size = saved


def llama31_params() -> int:
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        return sum(p.numel() for p in LlamaForCausalLM(LlamaConfig(**LLAMA31_8B)).parameters())


def long_clip_params() -> int:
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    with torch.device("meta"):
        return sum(sum(p.numel() for p in CLIPTextModelWithProjection(CLIPTextConfig(**c, vocab_size=49408, max_position_embeddings=248))
                       .parameters()) for c in LONG_CLIP.values())


def build_long_clip(hidden: int):
    """A CLIP text tower with projection and 248 positions (HiDream pads CLIP prompts to 128 tokens, past CLIP's 77)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    from .tiny import train_byte_level_bpe

    vocab, merges = train_byte_level_bpe(600, ["<|startoftext|>", "<|endoftext|>"], end_of_word_suffix="</w>")
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=248)
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=248, projection_dim=hidden,
                            bos_token_id=tokenizer.convert_tokens_to_ids("<|startoftext|>"), eos_token_id=eos, pad_token_id=eos)
    return CLIPTextModelWithProjection(config), tokenizer


def build_t5_tiny():
    from .flux import build_t5

    return build_t5(32)


def build_llama(hidden: int = 32, layers: int = 3):
    """A Llama-3-style byte-level BPE tokenizer (BOS prepended, EOS as padding as the pipeline sets it) and LlamaForCausalLM."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from .tiny import train_byte_level_bpe

    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
    vocab, merges = train_byte_level_bpe(400, specials)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    bos = vocab["<|begin_of_text|>"]
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B",
                                                       special_tokens=[("<|begin_of_text|>", bos)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
                                        model_max_length=131072)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                         num_attention_heads=2, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, bos_token_id=bos,
                         eos_token_id=vocab["<|end_of_text|>"])
    return LlamaForCausalLM(config), tokenizer


def build_hidream_transformer(realistic: bool = False):
    """2 double + 2 single blocks with the released MoE; the Llama layers read as the released pattern reads them
    (one per block, the last repeated). Non-square images pad to max_seq tokens: the released 4096 (`realistic`), else
    64 (128 x 128 px), so the suite's small non-square images stay cheap."""
    from diffusers import HiDreamImageTransformer2DModel

    return HiDreamImageTransformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
        caption_channels=[32, 32], text_emb_dim=32, num_routed_experts=4, num_activated_experts=2, axes_dims_rope=(8, 4, 4),
        max_resolution=(128, 128) if realistic else (16, 16), llama_layers=[0, 1, 2, 2],
    )
