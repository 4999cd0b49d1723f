"""Build tiny random-weight diffusers pipelines with the real model classes, entirely offline.

The tests and `make demo` use these folders exactly as a user would use a downloaded model: they are
loaded with the ordinary `from_pretrained` code paths. Nothing is mocked; the models are just small.

    python utils/make_tiny_models.py --family qwen-image --out demo/tiny-qwen-image
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import logging  # noqa: E402

import torch  # noqa: E402

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


# Enough text for a byte-level BPE to learn a few hundred merges; any English-ish text works.
_CORPUS = """
a photo of a cat sitting on a red chair in the sun
a small dog running on the beach at sunset with waves
portrait of a woman with long hair, soft light, studio
a blue car parked in front of a white house with a garden
an oil painting of mountains and a lake under a cloudy sky
close-up of a flower with water drops, macro photography
a city street at night with neon signs and rain reflections
describe the image by detailing the color, shape, size, texture, quantity, text,
spatial relationships of the objects and background. system user assistant
the quick brown fox jumps over the lazy dog 0123456789 , . : ; ! ? ' " ( ) [ ] - _ / \\
""".strip().splitlines()

QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]


def _train_byte_level_bpe(vocab_size: int, special_tokens: list[str]):
    """Train a byte-level BPE locally and return (vocab dict, merges list)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 20, trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return model["vocab"], merges


def build_qwen_tokenizer():
    from transformers import Qwen2Tokenizer

    vocab, merges = _train_byte_level_bpe(400, QWEN_SPECIAL_TOKENS)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, model_max_length=32768)
    tokenizer.add_special_tokens({"additional_special_tokens": QWEN_SPECIAL_TOKENS[1:]})
    return tokenizer


def build_qwen_text_encoder(tokenizer, hidden_size: int = 32):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    config = Qwen2_5_VLConfig(
        text_config={
            "hidden_size": hidden_size,
            "intermediate_size": hidden_size * 2,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": 2048,
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
            "rope_scaling": {"mrope_section": [2, 2, 4], "rope_type": "default", "type": "default"},
            "rope_theta": 1000000.0,
        },
        vision_config={
            "depth": 2,
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_heads": 2,
            "out_hidden_size": hidden_size,
            "fullatt_block_indexes": [1],
        },
        hidden_size=hidden_size,
        vocab_size=len(tokenizer),
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    return Qwen2_5_VLForConditionalGeneration(config)


def build_qwen_vae(z_dim: int = 4):
    from diffusers import AutoencoderKLQwenImage

    g = torch.Generator().manual_seed(1)
    return AutoencoderKLQwenImage(
        base_dim=z_dim * 6,
        z_dim=z_dim,
        dim_mult=[1, 2, 4],
        num_res_blocks=1,
        temperal_downsample=[False, True],
        # Non-trivial statistics so that latent normalisation bugs show up in tests.
        latents_mean=(torch.randn(z_dim, generator=g) * 0.1).tolist(),
        latents_std=(1.0 + torch.rand(z_dim, generator=g)).tolist(),
    )


def build_qwen_transformer(z_dim: int = 4, joint_attention_dim: int = 32, num_layers: int = 2):
    from diffusers import QwenImageTransformer2DModel

    return QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=z_dim * 4,
        out_channels=z_dim,
        num_layers=num_layers,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=joint_attention_dim,
        guidance_embeds=False,
        axes_dims_rope=(8, 4, 4),
    )


def make_qwen_image(out: Path) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    torch.manual_seed(0)
    tokenizer = build_qwen_tokenizer()
    pipe = QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(
            base_image_seq_len=256,
            base_shift=0.5,
            max_image_seq_len=8192,
            max_shift=0.9,
            shift=1.0,
            shift_terminal=0.02,
            use_dynamic_shifting=True,
            time_shift_type="exponential",
        ),
        vae=build_qwen_vae(),
        text_encoder=build_qwen_text_encoder(tokenizer),
        tokenizer=tokenizer,
        transformer=build_qwen_transformer(),
    )
    pipe.save_pretrained(out)


def save_qwen_processor(tokenizer, out: Path) -> None:
    """Write a Qwen2VLProcessor folder (image processor + tokenizer) and name it in model_index.json.

    Built from its parts because transformers can only instantiate Qwen2VLProcessor when torchvision is
    installed; the saved files are the same, and load with Qwen2VLProcessor.from_pretrained where it is.
    """
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    # Small pixel budget: the tiny vision tower only needs a few patches per image.
    image_processor = Qwen2VLImageProcessorPil(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16)
    folder = out / "processor"
    image_processor.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "processor_config.json").write_text(json.dumps({"processor_class": "Qwen2VLProcessor"}, indent=2))
    index = json.loads((out / "model_index.json").read_text())
    index["processor"] = ["transformers", "Qwen2VLProcessor"]
    (out / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True))


def _make_qwen_edit(out: Path, pipeline_name: str) -> None:
    import diffusers
    from diffusers import FlowMatchEulerDiscreteScheduler

    torch.manual_seed(0)
    tokenizer = build_qwen_tokenizer()
    pipe = getattr(diffusers, pipeline_name)(
        scheduler=FlowMatchEulerDiscreteScheduler(
            base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9, shift=1.0,
            shift_terminal=0.02, use_dynamic_shifting=True, time_shift_type="exponential",
        ),
        vae=build_qwen_vae(),
        text_encoder=build_qwen_text_encoder(tokenizer),
        tokenizer=tokenizer,
        processor=None,
        transformer=build_qwen_transformer(),
    )
    pipe.save_pretrained(out)
    save_qwen_processor(tokenizer, out)


def make_qwen_image_edit(out: Path) -> None:
    _make_qwen_edit(out, "QwenImageEditPipeline")


def make_qwen_image_edit_plus(out: Path) -> None:
    _make_qwen_edit(out, "QwenImageEditPlusPipeline")


def build_clip(hidden: int = 32):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    specials = ["<|startoftext|>", "<|endoftext|>"]
    vocab, merges = _train_byte_level_bpe(300, specials)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, projection_dim=hidden,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|startoftext|>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
    )
    return CLIPTextModel(config), tokenizer


def build_t5(hidden: int = 32):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=300, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>", show_progress=False)
    tok.train_from_iterator(_CORPUS * 20, trainer=trainer)
    vocab = [tuple(v) for v in json.loads(tok.to_str())["model"]["vocab"]]
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)
    config = T5Config(
        vocab_size=len(tokenizer), d_model=hidden, d_kv=8, d_ff=hidden * 2, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )
    return T5EncoderModel(config), tokenizer


def build_flux_transformer(guidance_embeds: bool, joint_attention_dim: int = 32, pooled_dim: int = 32):
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1, in_channels=16, out_channels=None, num_layers=1, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=joint_attention_dim, pooled_projection_dim=pooled_dim,
        guidance_embeds=guidance_embeds, axes_dims_rope=(4, 4, 8),
    )


def build_flux_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=32,
        use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035,
    )


def _make_flux(out: Path, pipeline_name: str) -> None:
    import diffusers
    from diffusers import FlowMatchEulerDiscreteScheduler

    torch.manual_seed(0)
    clip, clip_tok = build_clip()
    t5, t5_tok = build_t5()
    pipe = getattr(diffusers, pipeline_name)(
        scheduler=FlowMatchEulerDiscreteScheduler(
            base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15, shift=3.0,
            use_dynamic_shifting=True,
        ),
        vae=build_flux_vae(),
        text_encoder=clip,
        tokenizer=clip_tok,
        text_encoder_2=t5,
        tokenizer_2=t5_tok,
        transformer=build_flux_transformer(guidance_embeds=True),
    )
    pipe.save_pretrained(out)


def make_flux(out: Path) -> None:
    _make_flux(out, "FluxPipeline")


def make_flux_kontext(out: Path) -> None:
    _make_flux(out, "FluxKontextPipeline")


BUILDERS = {
    "qwen-image": make_qwen_image,
    "qwen-image-edit": make_qwen_image_edit,
    "qwen-image-edit-plus": make_qwen_image_edit_plus,
    "flux": make_flux,
    "flux-kontext": make_flux_kontext,
}


def make_tiny_model(family: str, out: str | Path) -> Path:
    out = Path(out)
    if (out / "model_index.json").exists():
        return out
    tmp = out.with_name(out.name + ".partial")
    BUILDERS[family](tmp)
    tmp.rename(out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", choices=sorted(BUILDERS), required=True)
    p.add_argument("--out", required=True, help="folder to write the diffusers pipeline to")
    args = p.parse_args(argv)
    path = make_tiny_model(args.family, args.out)
    print(f"tiny {args.family} pipeline at {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
