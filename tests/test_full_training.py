"""training_method: full: FlyMyAI's full-training YAML and entry, exact resume (fp32 and bf16 with stochastic
rounding), trainable_modules, EMA, the exported transformer in its pipeline and inference.py, extract_lora."""

import json
import statistics
import subprocess

import numpy as np
import pytest
import torch
from diffusers import QwenImagePipeline, QwenImageTransformer2DModel
from helpers import ACCELERATE, PY, ROOT, base_overrides, read_losses, write_dataset
from PIL import Image

from trainer.config import ConfigError, load_config
from trainer.loop import train
from trainer.methods.full import read_folder
from trainer.models.qwen_image import QwenImageAdapter
from trainer.optim import StochasticAdamW, copy_stochastic_

FLYMYAI = ROOT / "tests" / "fixtures" / "flymyai" / "train_full_qwen_image.yaml"


def full(model, data, out, **extra):
    return load_config(None, base_overrides(model, data, out, **{"training_method": "full", "learning_rate": 1e-3, **extra}))


def weights(folder):
    return read_folder(folder / "transformer")


def test_flymyai_full_yaml_trains_unchanged_through_its_entry(tiny_qwen, tmp_path):
    """FlyMyAI's train_full_qwen_image.yaml as published (use_8bit_adam, num_train_epochs, freeze_text_encoder,
    cosine_with_restarts, report_to: null, accumulation 4); paths, size and steps overridden."""
    cfg = load_config(FLYMYAI, [f"data_config.img_dir={tmp_path}", f"output_dir={tmp_path / 'o'}"], check_paths=False)
    assert cfg.optimizer == "adamw8bit" and cfg.num_train_epochs == 1 and cfg.report_to == "none"
    data = write_dataset(tmp_path / "img", n=8, size=(96, 64))
    out = tmp_path / "o"
    r = subprocess.run(ACCELERATE + ["train_full_qwen_image.py", "--config", str(FLYMYAI), f"pretrained_model_name_or_path={tiny_qwen}",
                                     f"data_config.img_dir={data}", f"output_dir={out}", "data_config.img_size=64",
                                     "data_config.num_workers=0", "max_train_steps=5"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(read_losses(out)) == 2, "8 images, accumulation 4, num_train_epochs 1: two optimizer steps, then the epoch ends"
    tuned = QwenImageTransformer2DModel.from_pretrained(out / "transformer")
    base = QwenImageTransformer2DModel.from_pretrained(tiny_qwen, subfolder="transformer")
    assert any((a - b).abs().max() > 0 for a, b in zip(tuned.state_dict().values(), base.state_dict().values()))
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["training_method"] == "full" and summary["lora"].endswith("transformer")


def test_full_training_lowers_the_loss_and_the_export_loads_in_the_pipeline(tiny_qwen, tmp_path):
    data = write_dataset(tmp_path / "one", n=1)
    out = tmp_path / "o"
    train(full(tiny_qwen, data, out, max_train_steps=40, learning_rate=5e-4), QwenImageAdapter)
    losses = read_losses(out)
    assert statistics.mean(losses[-8:]) < 0.85 * statistics.mean(losses[:8])

    pipe = QwenImagePipeline.from_pretrained(tiny_qwen)
    call = dict(prompt="a photo", height=32, width=32, num_inference_steps=2, output_type="np", true_cfg_scale=1.0)
    base = pipe(**call, generator=torch.Generator().manual_seed(0)).images[0]
    pipe.transformer = QwenImageTransformer2DModel.from_pretrained(out / "transformer")
    assert np.abs(pipe(**call, generator=torch.Generator().manual_seed(0)).images[0] - base).max() > 1e-4
    r = subprocess.run([PY, "inference.py", "--model_name", str(tiny_qwen), "--transformer", str(out), "--prompt", "a photo", "--width", "32",
                        "--height", "32", "--num_inference_steps", "2", "--output_image", str(tmp_path / "x.png")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert Image.open(tmp_path / "x.png").size == (32, 32)
    bad = subprocess.run([PY, "inference.py", "--model_name", str(tiny_qwen), "--transformer", str(tmp_path), "--prompt", "a"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--transformer" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.parametrize("full_weights", ["fp32", "bf16"])
def test_full_resume_is_bit_identical(full_weights, tiny_qwen, tmp_path, fresh_state):
    """4 steps straight vs 2 steps, stop, resume: the same weights to the bit (bf16: the rounding is seeded per step)."""
    data = write_dataset(tmp_path / "d", n=3)
    extra = dict(full_weights=full_weights, checkpointing_steps=2, ema_decay=0.9, mixed_precision="bf16" if full_weights == "bf16" else "no")
    straight, resumed = tmp_path / "a", tmp_path / "b"
    from accelerate.state import AcceleratorState

    for out, steps, resume in ((straight, 4, {}), (resumed, 2, {}), (resumed, 4, {"resume_from_checkpoint": "latest"})):
        AcceleratorState._reset_state(True)  # each run builds its accelerator afresh
        train(full(tiny_qwen, data, out, max_train_steps=steps, **resume, **extra), QwenImageAdapter)
    a, b = weights(straight), weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ema_a, ema_b = read_folder(straight / "transformer_ema"), read_folder(resumed / "transformer_ema")
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
    assert any(not torch.equal(ema_a[k], a[k]) for k in a), "the EMA is its own average"
    if full_weights == "bf16":
        trained = [k for k in a if "transformer_blocks.0.attn.to_q" in k]
        assert all(a[k].dtype == torch.bfloat16 for k in trained)


def test_trainable_modules_train_only_what_they_name(tiny_qwen, tmp_path):
    data = write_dataset(tmp_path / "d", n=2)
    out = tmp_path / "o"
    train(full(tiny_qwen, data, out, max_train_steps=2, trainable_modules="[transformer_blocks.0.attn, proj_out]"), QwenImageAdapter)
    tuned = weights(out)
    base = QwenImageTransformer2DModel.from_pretrained(tiny_qwen, subfolder="transformer").state_dict()
    changed = {k for k in tuned if not torch.equal(tuned[k].float(), base[k].float())}
    assert changed and all(k.startswith(("transformer_blocks.0.attn.", "proj_out")) for k in changed)
    with pytest.raises(ConfigError, match="trainable_modules"):
        train(full(tiny_qwen, data, tmp_path / "x", trainable_modules="[no_such_layer]"), QwenImageAdapter)


@pytest.mark.parametrize("override, needle", [
    ("quantize=nf4", "quantize"), ("blocks_to_swap=1", "blocks_to_swap"), ("optimizer=adafactor", "full_weights: bf16"),
    ("freeze_text_encoder=false", "freeze_text_encoder"), ("num_train_epochs=0", "num_train_epochs"),
    ("mixed_precision=no", "needs mixed_precision: bf16"),
])
def test_full_training_refuses_what_cannot_work(override, needle, tiny_qwen, tmp_path):
    extra = ["training_method=full", override] + (["full_weights=bf16"] if "adafactor" in override or "mixed" in override else [])
    with pytest.raises(ConfigError, match=needle):
        load_config(None, base_overrides(tiny_qwen, tmp_path, tmp_path / "o") + extra)
    with pytest.raises(ConfigError, match="training_method: full only"):
        load_config(None, base_overrides(tiny_qwen, tmp_path, tmp_path / "o") + ["ema_decay=0.9"])


def test_stochastic_rounding_is_unbiased_and_moves_bf16_weights():
    g = torch.Generator().manual_seed(0)
    source = torch.full((200_000,), 1.0 + 2**-10, dtype=torch.float32)  # a quarter of bf16's spacing above 1.0
    target = torch.empty_like(source, dtype=torch.bfloat16)
    copy_stochastic_(target, source, g)
    assert set(target.unique().tolist()) == {1.0, 1.0 + 2**-7 * 1}  # rounds to one of the two neighbours
    assert abs(target.float().mean().item() - source[0].item()) < 2e-5  # unbiased
    w = torch.nn.Parameter(torch.ones(10_000, dtype=torch.bfloat16))
    opt = StochasticAdamW([w], lr=1e-4, weight_decay=0.0)
    for _ in range(20):  # each step moves every weight by 1e-4: far below bf16's spacing (7.8e-3) at 1.0
        w.grad = torch.ones_like(w)
        opt.step()
    assert abs(w.float().mean().item() - (1 - 20 * 1e-4)) < 3e-4, "round-to-nearest would leave every weight at 1.0"


def test_extract_lora_reproduces_the_fine_tune(tiny_qwen, tmp_path):
    data = write_dataset(tmp_path / "d", n=2)
    out = tmp_path / "o"
    linear = "[attn.to_q.weight, attn.to_k.weight, attn.to_v.weight, attn.to_out.0.weight, img_mlp.net.2.weight, img_mod.1.bias]"
    train(full(tiny_qwen, data, out, max_train_steps=3, learning_rate=1e-2, trainable_modules=linear), QwenImageAdapter)
    lora = tmp_path / "lora"
    r = subprocess.run([PY, "utils/extract_lora.py", "--model_name", str(tiny_qwen), "--transformer", str(out), "--rank", "32",
                        "--out", str(lora), "--format", "comfyui"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "keeps 1.000" in r.stdout and (lora / "pytorch_lora_weights_comfyui.safetensors").is_file()
    assert "changed tensors are not Linear weights and are not in the LoRA" in r.stdout  # the biases
    cfg = load_config(None, [f"pretrained_model_name_or_path={tiny_qwen}", "mixed_precision=no"], check_paths=False)
    adapter = QwenImageAdapter.from_model(cfg)
    adapter.load_encoders()
    cond = adapter.encode_prompts(["a photo"])
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    tuned = QwenImageTransformer2DModel.from_pretrained(out / "transformer")
    pipe = QwenImagePipeline.from_pretrained(tiny_qwen)
    with torch.no_grad():
        base = adapter.predict(pipe.transformer, x, torch.tensor([0.5]), cond)
        target = adapter.predict(tuned, x, torch.tensor([0.5]), cond)
        pipe.load_lora_weights(lora)
        via_lora = adapter.predict(pipe.transformer, x, torch.tensor([0.5]), cond)
    # full rank carries every Linear weight change exactly; the bias changes (reported) are what it misses: the LoRA
    # gives the fine-tune with its weight changes only
    weights_only = QwenImageTransformer2DModel.from_pretrained(tiny_qwen, subfolder="transformer")
    tuned_sd = tuned.state_dict()
    weights_only.load_state_dict({k: (v if k.endswith("img_mod.1.bias") else tuned_sd[k]) for k, v in weights_only.state_dict().items()})
    with torch.no_grad():
        expected = adapter.predict(weights_only, x, torch.tensor([0.5]), cond)
    assert (target - base).abs().max() > 1e-2 and (expected - target).abs().max() > 1e-4  # weights and biases both moved it
    assert (via_lora - expected).abs().max() < 1e-4 * max(1.0, float(expected.abs().max()))
