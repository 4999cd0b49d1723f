"""Buckets, multi-resolution, several processes, LoRA formats, merging, samples and run reports."""

import json
import os
import subprocess

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, QwenImagePipeline
from helpers import ACCELERATE, PY, ROOT, base_overrides, read_losses, write_dataset
from PIL import Image
from safetensors.torch import load_file

from image_datasets import SizeGroupedBatchSampler, scan_dataset
from image_datasets.caption_dataset import bucket_sizes, nearest_bucket
from trainer.config import load_config
from trainer.loop import train
from trainer.models.flux import FluxAdapter
from trainer.models.qwen_image import QwenImageAdapter


@pytest.mark.parametrize("res", [256, 512, 1024])
def test_buckets_are_multiples_of_16_with_bounded_aspect_and_area(res):
    buckets = bucket_sizes(res)
    assert len(buckets) > 10
    for w, h in buckets:
        assert w % 16 == 0 and h % 16 == 0 and 0.25 <= w / h <= 4
        assert 0.8 * res * res <= w * h <= res * res
    assert nearest_bucket(1920, 1080, buckets)[0] > nearest_bucket(1920, 1080, buckets)[1]
    assert nearest_bucket(1000, 1000, buckets) in [(w, h) for w, h in buckets if w == h]


def _mixed(folder):
    for i, size in enumerate([(64, 64), (66, 62), (120, 60), (118, 62), (60, 120), (64, 70)]):
        write_dataset(folder / f"s{i}", n=1, size=size, seed=i)
        (folder / f"s{i}" / "img0.png").rename(folder / f"img{i}.png")
        (folder / f"s{i}" / "img0.txt").rename(folder / f"img{i}.txt")
        (folder / f"s{i}").rmdir()
    return folder


def test_bucketing_batches_mixed_sizes_and_multires_repeats(tmp_path):
    data = _mixed(tmp_path / "mixed")
    cfg = load_config(None, base_overrides(ROOT, data, tmp_path, **{"data_config.train_batch_size": 2}), check_paths=False)
    plain = scan_dataset(cfg.data_config).samples
    cfg.data_config.bucketing = True
    bucketed = scan_dataset(cfg.data_config).samples
    assert len({s.size for s in bucketed}) < len({s.size for s in plain})
    sampler = SizeGroupedBatchSampler([s.group for s in bucketed], 2, seed=0)
    assert all(len({bucketed[i].size for i, _ in b}) == 1 for b in sampler)
    cfg.data_config.resolutions, cfg.data_config.repeats = [32, 64], 3
    multi = scan_dataset(cfg.data_config).samples
    assert len(multi) == 6 * 2 * 3
    assert all(s.size[0] * s.size[1] <= 64 * 64 for s in multi) and len({s.size for s in multi}) > len({s.size for s in bucketed})


def test_processes_get_disjoint_slices_of_the_same_global_batches():
    groups = [(64, 64)] * 8
    ranks = [SizeGroupedBatchSampler(groups, 2, seed=1, rank=r, world_size=2) for r in (0, 1)]
    single = SizeGroupedBatchSampler(groups, 4, seed=1)
    for a, b, s in zip(*ranks, single):
        assert not set(a) & set(b) and sorted(a + b) == sorted(s)


def test_two_processes_match_one_with_the_same_global_batch(tiny_qwen, tmp_path):
    data = write_dataset(tmp_path / "d", n=4)
    common = dict(max_train_steps=3, learning_rate=1e-2, precompute_text_embeddings=True, precompute_image_embeddings=True,
                  save_cache_on_disk=True)  # the disk cache is built by both processes, each its half
    one = tmp_path / "one"
    train(load_config(ROOT / "train_configs/train_lora.yaml",
                      base_overrides(tiny_qwen, data, one, **common, **{"data_config.train_batch_size": 2})), QwenImageAdapter)
    two = tmp_path / "two"
    cmd = [str(ACCELERATE[0]), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "train.py", "--config", "train_configs/train_lora.yaml"] + base_overrides(
        tiny_qwen, data, two, **common, **{"data_config.train_batch_size": 1, "blocks_to_swap": 1})  # DDP + swapped blocks
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "ACCELERATE_USE_CPU": "true"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "x 2 process(es)" in r.stderr
    assert "latents 2 encoded / 0 reused (in" in r.stderr and "by process 1 of 2" in r.stderr, r.stderr[-3000:]
    assert "blocks_to_swap: 1 of 2 blocks keep their weights in host RAM" in r.stderr
    assert read_losses(two) == pytest.approx(read_losses(one), abs=1e-5)
    a, b = load_file(one / "pytorch_lora_weights.safetensors"), load_file(two / "pytorch_lora_weights.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


@pytest.fixture(scope="module")
def qwen_run(tiny_qwen, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("qrun")
    data = write_dataset(tmp / "d", n=2)
    out = tmp / "out"
    train(load_config(None, base_overrides(
        tiny_qwen, data, out, max_train_steps=4, learning_rate=2e-2, lora_format="comfyui", report_to="tensorboard",
        validation_steps=2, validation_prompts="[a red cat,a blue dog]", validation_num_inference_steps=2,
        **{"data_config.img_size": 32})), QwenImageAdapter)
    return out


def _render(pipe, **kw):
    return pipe(prompt="a photo", height=32, width=32, num_inference_steps=2, output_type="np",
                generator=torch.Generator().manual_seed(0), **kw).images[0]


def test_comfyui_file_loads_in_diffusers_with_same_output(qwen_run, tiny_qwen, tmp_path):
    comfy = load_file(qwen_run / "pytorch_lora_weights_comfyui.safetensors")
    assert all(k.startswith("diffusion_model.") for k in comfy) and any(k.endswith(".alpha") for k in comfy)
    ref = QwenImagePipeline.from_pretrained(tiny_qwen)
    ref.load_lora_weights(qwen_run)
    expected = _render(ref, true_cfg_scale=1.0)
    pipe = QwenImagePipeline.from_pretrained(tiny_qwen)
    pipe.load_lora_weights(qwen_run, weight_name="pytorch_lora_weights_comfyui.safetensors")
    assert np.abs(_render(pipe, true_cfg_scale=1.0) - expected).max() < 1e-4
    assert np.abs(expected - _render(QwenImagePipeline.from_pretrained(tiny_qwen), true_cfg_scale=1.0)).max() > 1e-4
    back = tmp_path / "back"
    r = subprocess.run([PY, "utils/convert_lora.py", "--in", str(qwen_run / "pytorch_lora_weights_comfyui.safetensors"),
                        "--out", str(back), "--to", "diffusers", "--family", "qwen-image"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    pipe = QwenImagePipeline.from_pretrained(tiny_qwen)
    pipe.load_lora_weights(back)
    assert np.abs(_render(pipe, true_cfg_scale=1.0) - expected).max() < 1e-4


def test_flux_comfyui_conversion_round_trip(tiny_models, tmp_path):
    data = write_dataset(tmp_path / "d", n=2)
    out = tmp_path / "out"
    model = tiny_models("flux")
    train(load_config(None, base_overrides(model, data, out, max_train_steps=3, learning_rate=2e-2, lora_alpha=8,
                                           t5_max_sequence_length=32)), FluxAdapter)
    r = subprocess.run([PY, "utils/convert_lora.py", "--in", str(out), "--out", str(tmp_path / "c.safetensors"), "--to", "comfyui",
                        "--family", "flux"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    comfy = load_file(tmp_path / "c.safetensors")
    assert all(k.startswith("lora_transformer_") for k in comfy) and float(next(v for k, v in comfy.items() if k.endswith("alpha"))) == 8
    kw = dict(guidance_scale=3.5, max_sequence_length=32)
    ref = FluxPipeline.from_pretrained(model)
    ref.load_lora_weights(out)
    pipe = FluxPipeline.from_pretrained(model)
    pipe.load_lora_weights(tmp_path, weight_name="c.safetensors")
    assert np.abs(_render(pipe, **kw) - _render(ref, **kw)).max() < 1e-4


def test_merge_lora_bakes_the_lora_in(qwen_run, tiny_qwen, tmp_path):
    r = subprocess.run([PY, "utils/merge_lora.py", "--model_name", str(tiny_qwen), "--lora_weights", str(qwen_run),
                        "--out", str(tmp_path / "merged"), "--dtype", "fp32"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    ref = QwenImagePipeline.from_pretrained(tiny_qwen)
    ref.load_lora_weights(qwen_run)
    merged = QwenImagePipeline.from_pretrained(tmp_path / "merged")
    assert np.abs(_render(merged, true_cfg_scale=1.0) - _render(ref, true_cfg_scale=1.0)).max() < 1e-3


def test_samples_summary_curve_and_tensorboard(qwen_run):
    assert sorted(p.name for p in (qwen_run / "samples").iterdir()) == ["step-0.png", "step-2.png", "step-4.png"]  # step 0: the base
    grid = Image.open(qwen_run / "samples" / "step-4.png")
    assert grid.size[0] == 64 and grid.size[1] > 32  # two 32x32 samples side by side, their prompts written below
    summary = json.loads((qwen_run / "training_summary.json").read_text())
    assert summary["steps"] == 4 and summary["final_loss"] == pytest.approx(read_losses(qwen_run)[-1])
    assert summary["config"]["rank"] == 4 and summary["peak_memory"]["host_peak_rss_bytes"] > 0
    assert Image.open(qwen_run / "loss_curve.png").size == (800, 400)
    assert list((qwen_run / "logs").rglob("events.out.tfevents*"))
    entries = [json.loads(x) for x in (qwen_run / "train_log.jsonl").read_text().splitlines()]
    assert all(e["grad_norm"] > 0 for e in entries)


def test_attention_backend_and_tf32_keep_the_loss(tiny_qwen, tmp_path):
    data = write_dataset(tmp_path / "d", n=2)
    runs = {}
    for name, extra in {"auto": {}, "native": {"attention_backend": "native"}, "tf32off": {"allow_tf32": False}}.items():
        train(load_config(None, base_overrides(tiny_qwen, data, tmp_path / name, max_train_steps=3, **extra)), QwenImageAdapter)
        runs[name] = read_losses(tmp_path / name)
    assert runs["native"] == pytest.approx(runs["auto"], rel=1e-5) and runs["tf32off"] == pytest.approx(runs["auto"], rel=1e-5)


def test_torch_compile_keeps_the_loss(tiny_qwen, tmp_path):
    data = write_dataset(tmp_path / "d", n=2)
    for name, extra in {"eager": {}, "compiled": {"torch_compile": True}}.items():
        train(load_config(None, base_overrides(tiny_qwen, data, tmp_path / name, max_train_steps=3, **extra)), QwenImageAdapter)
    assert read_losses(tmp_path / "compiled") == pytest.approx(read_losses(tmp_path / "eager"), rel=1e-4)
