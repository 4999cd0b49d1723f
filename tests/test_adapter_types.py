"""Adapter types beyond plain LoRA (LoKr, LoHa, DoRA, rsLoRA, LoRA+, per-module ranks): each trains, resumes exactly,
keeps its per-layer shapes and scales in the file, and renders through inference.py. (Their ComfyUI files and the
pipelines' loaders are checked family by family in test_comfyui.py.)"""

import json

import pytest
from helpers import PY, ROOT, base_overrides, run_each, write_dataset
from safetensors import safe_open
from safetensors.torch import load_file

from trainer.config import ConfigError, load_config
from trainer.loop import train
from trainer.models import resolve

LR = 1e-3
KINDS = {
    # LoKr with a fixed factor, so that w2 is rank-decomposed (alpha applies) on every layer
    "lokr": {"lora_type": "lokr", "lokr_factor": 4, "rank": 2},
    "loha": {"lora_type": "loha", "rank_pattern": "{'transformer_blocks\\.1\\..*': 2}"},
    "lora+": {"use_dora": "true", "use_rslora": "true", "loraplus_lr_ratio": 16, "lora_alpha": 8,
              "rank_pattern": "{'transformer_blocks\\.0\\.attn\\.to_q': 2}", "alpha_pattern": "{'to_k': 2}"},
}


def run(model, data, out, steps, **extra):
    cls, _ = resolve(str(model))
    settings = {"max_train_steps": steps, "checkpointing_steps": 1, "learning_rate": LR, "lora_format": "comfyui", **extra}
    train(load_config(None, base_overrides(model, data, out, **settings)), cls)
    return out


@pytest.mark.parametrize("kind", list(KINDS))
def test_adapter_type_resumes_exactly(kind, tiny_qwen, tmp_path):
    """Two steps in one go equal one step, a stop, and a resume for one more: every tensor bit for bit."""
    data = write_dataset(tmp_path / "d", n=2)
    whole = load_file(run(tiny_qwen, data, tmp_path / "a", 2, **KINDS[kind]) / "pytorch_lora_weights.safetensors")
    run(tiny_qwen, data, tmp_path / "b", 1, **KINDS[kind])
    resumed = load_file(run(tiny_qwen, data, tmp_path / "b", 2, resume_from_checkpoint="latest", **KINDS[kind]) / "pytorch_lora_weights.safetensors")
    assert whole.keys() == resumed.keys()
    assert all((whole[k] == resumed[k]).all() for k in whole)
    first = load_file(tmp_path / "b" / "checkpoint-1" / "pytorch_lora_weights.safetensors")
    assert any(not (first[k] == whole[k]).all() for k in whole), "the second step changed nothing"
    parts = {k.rsplit(".", 2 if k.endswith(".weight") else 1)[-2 if k.endswith(".weight") else -1] for k in whole}
    expected = {"lokr": {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}, "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"},
                "lora+": {"lora_A", "lora_B", "lora_magnitude_vector"}}[kind]
    assert parts == expected


def test_patterns_rslora_and_loraplus_reach_the_file(tiny_qwen, tmp_path):
    """rank_pattern gives its layers their rank; the ComfyUI alphas carry rsLoRA's and alpha_pattern's scales; LoRA+
    moves the output side ~16x faster (two Adam steps move an entry by at most ~2 x lr without it)."""
    out = run(tiny_qwen, write_dataset(tmp_path / "d", n=2), tmp_path / "o", 2, **KINDS["lora+"])
    sd = load_file(out / "pytorch_lora_weights.safetensors")
    comfy = load_file(out / "pytorch_lora_weights_comfyui.safetensors")
    assert sd["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"].shape[0] == 2
    assert sd["transformer.transformer_blocks.1.attn.to_q.lora_A.weight"].shape[0] == 4
    alpha = {k.removeprefix("diffusion_model.").removesuffix(".alpha"): float(v) for k, v in comfy.items() if k.endswith(".alpha")}
    assert alpha["transformer_blocks.0.attn.to_q"] == pytest.approx(8 / 2**0.5 * 2)  # rsLoRA: alpha / sqrt(r), times ComfyUI's r
    assert alpha["transformer_blocks.1.attn.to_q"] == pytest.approx(8 / 4**0.5 * 4)
    assert alpha["transformer_blocks.1.attn.to_k"] == pytest.approx(2 / 4**0.5 * 4)  # alpha_pattern
    up = max(v.abs().max().item() for k, v in sd.items() if ".lora_B." in k)
    assert up > 8 * LR, f"lora_B moved by at most {up:.2g} in two steps: LoRA+ is not applied"
    with safe_open(str(out / "pytorch_lora_weights.safetensors"), framework="pt") as f:
        config = json.loads(f.metadata()["trainer.adapter_config"])
    assert config["use_dora"] and config["use_rslora"] and config["rank_pattern"]


def test_inference_renders_a_lycoris_file(tiny_qwen, tmp_path):
    """inference.py renders with a LoHa file (which no diffusers loader reads), and the LoRA changes the image;
    merge_lora.py merges it exactly."""
    import numpy as np
    from PIL import Image

    out = run(tiny_qwen, write_dataset(tmp_path / "d", n=2), tmp_path / "o", 1, lora_type="loha", learning_rate=0.05)
    merged = tmp_path / "merged"
    renders = [[PY, str(ROOT / "inference.py"), "--model_name", str(tiny_qwen), "--lora_weights", str(out), "--lora_scale", scale,
                "--prompt", "a red square", "--width", "64", "--height", "64", "--num_inference_steps", "2", "--output_image",
                str(tmp_path / f"s{scale}.png"), "--device", "cpu"] for scale in ("1.0", "0.0")]
    merge = [PY, str(ROOT / "utils/merge_lora.py"), "--model_name", str(tiny_qwen), "--lora_weights", str(out), "--out", str(merged),
             "--dtype", "fp32"]
    results = run_each([*renders, merge])
    for result in results:
        assert result.returncode == 0, result.stderr[-2000:]
    images = [np.asarray(Image.open(tmp_path / f"s{scale}.png"), dtype=np.float32) for scale in ("1.0", "0.0")]
    assert np.abs(images[0] - images[1]).max() > 0
    # merge_lora.py folds it into the weights: each adapted layer becomes peft's own merge of the trained LoHa
    from diffusers import QwenImageTransformer2DModel
    from helpers import merged_weights, trained_model

    weights = dict(QwenImageTransformer2DModel.from_pretrained(merged / "transformer").named_parameters())
    _, transformer, _ = trained_model(tiny_qwen, tmp_path / "d", out, lora_type="loha")
    expected = merged_weights(transformer)
    assert max((weights[f"{name}.weight"] - w).abs().max().item() for name, w in expected.items()) < 1e-5


@pytest.mark.parametrize("overrides, message", [
    (["lora_type=lokr", "use_dora=true"], "config key 'use_dora' applies to lora_type: lora"),
    (["lora_type=loha", "loraplus_lr_ratio=16"], "config key 'loraplus_lr_ratio' applies to lora_type: lora"),
    (["lokr_factor=8"], "config key 'lokr_factor' applies to lora_type: lokr"),
    (["lora_type=lokra"], "config key 'lora_type' is 'lokra', expected one of: lora, lokr, loha"),
    (["rank_pattern={'(': 2}"], "config key 'rank_pattern': '(' is not a regular expression"),
    (["training_method=full", "use_dora=true"], "config key 'use_dora' is a LoRA-training option"),
    (["use_dora=true", "quantize=qfloat8"], "config key 'use_dora' normalises by the frozen weights every step"),
    (["lora_type=loha", "quantize=nf4"], "config key 'lora_type: loha': peft's LyCORIS layers do not run on bitsandbytes layers"),
])
def test_adapter_keys_that_disagree_are_one_line(overrides, message):
    with pytest.raises(ConfigError, match="^" + message.replace("(", r"\(").replace(")", r"\)").replace("'", "'")):
        load_config(None, overrides, check_paths=False)


@pytest.mark.parametrize("extra", [{"lora_type": "lokr", "quantize": "qfloat8", "blocks_to_swap": 1},
                                   {"use_dora": "true", "quantize": "nf4"}, {"lora_type": "loha", "quantize": "int8_w8a8"}])
def test_adapter_types_train_on_a_quantized_base(extra, tiny_qwen, tmp_path):
    """LyCORIS types on quanto / W8A8 layers (and block-swapped), DoRA on nf4 (QDoRA): they train and save."""
    out = run(tiny_qwen, write_dataset(tmp_path / "d", n=2), tmp_path / "o", 2, **extra)
    sd = load_file(out / "pytorch_lora_weights.safetensors")
    assert sd and all(v.isfinite().all() for v in sd.values())


def test_a_checkpoint_of_an_earlier_version_resumes(tiny_qwen, tmp_path):
    """A checkpoint whose config.yaml predates the adapter-type keys resumes: an absent key held its default."""
    import yaml

    data = write_dataset(tmp_path / "d", n=2)
    out = run(tiny_qwen, data, tmp_path / "o", 1)
    saved = out / "checkpoint-1" / "config.yaml"
    config = yaml.safe_load(saved.read_text())
    for key in ("lora_type", "use_dora", "use_rslora", "rank_pattern", "alpha_pattern", "lokr_factor", "loraplus_lr_ratio", "dop_class_word"):
        config.pop(key)
    config["data_config"].pop("datasets")
    saved.write_text(yaml.safe_dump(config))
    run(tiny_qwen, data, out, 2, resume_from_checkpoint="latest")
    assert (out / "checkpoint-2" / "pytorch_lora_weights.safetensors").is_file()


def test_planner_counts_each_adapter_type():
    """estimate_memory counts the adapter peft builds, per type, on the released Qwen-Image (meta device)."""
    from helpers import ROOT

    from trainer.lora_format import meta_transformer
    from trainer.models.qwen_image import QwenImageAdapter
    from utils.estimate_memory import lora_params

    cfg = load_config(ROOT / "train_configs/train_lora.yaml", check_paths=False)
    adapter = QwenImageAdapter(cfg, QwenImageAdapter.variants[0])
    model = meta_transformer(adapter)

    def count(*overrides):
        return lora_params(model, load_config(ROOT / "train_configs/train_lora.yaml", list(overrides), check_paths=False), adapter)

    lora = count()
    assert count("lora_type=loha") == 2 * lora  # two rank-r pairs per layer
    assert count("lora_type=lokr", "lokr_factor=16") < lora / 10
    assert lora < count("use_dora=true") < lora * 1.05  # + one magnitude per output channel


def test_init_lora_starts_from_a_lora_of_any_format_with_its_strength(tiny_qwen, tmp_path):
    """init_lora: a LoRA trained here (rank 4, alpha 8), its ComfyUI file and a DiffSynth-Studio-style copy (peft
    "default." names, alpha folded into the weights) each start a run at lora_alpha 4 with every layer's delta as the
    file's; a run from it trains; a rank or layer it cannot take is one line before training."""
    import torch
    from safetensors.torch import save_file

    from trainer.lora_format import PREFIX, lora_layers
    from trainer.methods.lora import TRAINED, LoRAMethod
    from trainer.models.qwen_image import QwenImageAdapter

    data = write_dataset(tmp_path / "d", n=2)
    out = run(tiny_qwen, data, tmp_path / "a", 2, lora_alpha=8, learning_rate=0.05)
    sd = load_file(out / "pytorch_lora_weights.safetensors")
    diffsynth = {k.removeprefix(PREFIX).replace(".weight", ".default.weight"): v * (2 if ".lora_B." in k else 1) for k, v in sd.items()}
    save_file(diffsynth, str(tmp_path / "diffsynth.safetensors"))
    layers = lora_layers(sd)

    def started(path, **extra):
        cfg = load_config(None, base_overrides(tiny_qwen, data, tmp_path / "o", init_lora=str(path), **{"lora_alpha": 4, **extra}))
        adapter = QwenImageAdapter.from_model(cfg)
        adapter.load_transformer()
        LoRAMethod(cfg, adapter).attach(adapter.transformer)
        return dict(adapter.transformer.named_parameters())

    for path in (out, out / "pytorch_lora_weights_comfyui.safetensors", tmp_path / "diffsynth.safetensors"):
        own = started(path)
        for m in layers:
            expected = sd[f"{PREFIX}{m}.lora_B.weight"] @ sd[f"{PREFIX}{m}.lora_A.weight"] * (8 / 4)
            got = own[f"{m}.lora_B.{TRAINED}.weight"] @ own[f"{m}.lora_A.{TRAINED}.weight"] * (4 / 4)
            assert torch.allclose(got, expected, atol=1e-6), (path.name, m)
    trained = run(tiny_qwen, data, tmp_path / "b", 1, init_lora=str(tmp_path / "diffsynth.safetensors"), lora_alpha=4, learning_rate=0.05)
    assert (trained / "pytorch_lora_weights.safetensors").is_file()
    with pytest.raises(ConfigError, match="'init_lora': its rank is 4, this run's rank 8"):
        started(out, rank=8)
    with pytest.raises(ConfigError, match="'init_lora': .* of its layers are not trained by this run"):
        started(out, lora_target_modules="[to_q]")
    with pytest.raises(ConfigError, match="'init_lora' starts a plain LoRA"):
        load_config(None, base_overrides(tiny_qwen, data, tmp_path / "o", init_lora=str(out), lora_type="lokr"))
