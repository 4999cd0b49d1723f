"""Z-Image, Z-Image-Omni, Chroma, Kandinsky 5, FLUX.2, Qwen-Image 2.1, ERNIE-Image, Krea 2, Ideogram 4, HiDream-I1 and FLUX.1-Krea: LoRA loading in their pipelines, inference, quantized and block-swapped training,
the planner, and the assistant LoRA used to train on Z-Image-Turbo."""

import logging
import subprocess

import numpy as np
import pytest
import torch
from diffusers import (ChromaPipeline, ErnieImagePipeline, Flux2KleinPipeline, Flux2Pipeline, HiDreamImagePipeline, Ideogram4Pipeline,
                       Kandinsky5T2IPipeline,
                       Krea2Pipeline, QwenImage21Pipeline, WanPipeline, ZImageOmniPipeline, ZImagePipeline)
from helpers import ACCELERATE, PY, ROOT, base_overrides, read_losses, run_each, write_dataset
from PIL import Image
from safetensors.torch import load_file

from trainer.config import load_config
from trainer.loop import train
from trainer.methods.lora import LoRAMethod
from trainer.pipelines import output_images
from trainer.models.chroma import ChromaAdapter
from trainer.models.ernie_image import ErnieImageAdapter
from trainer.models.flux2 import Flux2Adapter
from trainer.models.hidream import HiDreamAdapter
from trainer.models.ideogram4 import Ideogram4Adapter
from trainer.models.kandinsky5 import Kandinsky5Adapter
from trainer.models.krea2 import Krea2Adapter
from trainer.models.qwen_image21 import QwenImage21Adapter
from trainer.models.wan import WanAdapter
from trainer.models.z_image import ZImageAdapter
from trainer.models.z_image_omni import ZImageOmniAdapter


# variant -> (adapter, pipeline class, pipeline call arguments for a render without CFG, released transformer
#             parameters, released blocks, a render size the pipeline keeps)
FAMILIES = {
    "z-image": (ZImageAdapter, ZImagePipeline, {"guidance_scale": 0.0}, 6_154_908_736, 34, (48, 32)),  # 30 + 2 + 2 refiners
    "z-image-omni": (ZImageOmniAdapter, ZImageOmniPipeline, {"guidance_scale": 0.0}, 6_513_266_880, 36, (48, 32)),  # + 2 SigLIP refiners
    "chroma": (ChromaAdapter, ChromaPipeline, {"guidance_scale": 1.0}, 8_899_983_424, 57, (48, 32)),  # 19 double + 38 single
    # Kandinsky5T2IPipeline renders only its 7 training resolutions
    "kandinsky5": (Kandinsky5Adapter, Kandinsky5T2IPipeline, {"guidance_scale": 1.0}, 6_022_080_576, 52, (1024, 1024)),
    "flux2-klein": (Flux2Adapter, Flux2KleinPipeline, {"guidance_scale": 1.0}, 3_875_544_576, 25, (48, 32)),  # Klein 4B: 5 + 20
    "flux2": (Flux2Adapter, Flux2Pipeline, {"guidance_scale": 4.0}, 32_223_281_152, 56, (48, 32)),  # dev: 8 double + 48 single
    "qwen-image-2.1": (QwenImage21Adapter, QwenImage21Pipeline, {"true_cfg_scale": 1.0}, 7_115_124_736, 32, (64, 32)),  # sides /32
    "ernie-image": (ErnieImageAdapter, ErnieImagePipeline, {"guidance_scale": 1.0}, 8_033_490_048, 36, (48, 32)),
    "krea2": (Krea2Adapter, Krea2Pipeline, {"guidance_scale": 0.0}, 12_820_073_036, 28, (48, 32)),  # its w = 0: no CFG
    # w = 1: the conditional transformer alone (the unconditional one still runs, weighted 0)
    "ideogram4": (Ideogram4Adapter, Ideogram4Pipeline, {"guidance_scale": 1.0, "guidance_schedule": None}, 9_279_288_448, 34, (48, 32)),
    "hidream-i1": (HiDreamAdapter, HiDreamImagePipeline, {"guidance_scale": 1.0}, 17_105_733_184, 48, (48, 32)),  # 16 double + 32 single
    "wan": (WanAdapter, WanPipeline, {"guidance_scale": 1.0, "num_frames": 1}, 4_999_787_712, 30, (48, 32)),  # Wan 2.2 TI2V-5B
}
CONFIGS = {"z-image": "train_z_image_lora.yaml", "z-image-omni": "train_z_image_omni_lora.yaml", "chroma": "train_chroma_lora.yaml", "kandinsky5": "train_kandinsky5_lora.yaml",
           "flux2-klein": "train_flux2_klein_base_4b.yaml", "flux2": "train_flux2_dev.yaml",
           "qwen-image-2.1": "train_qwen_image_21_lora.yaml", "ernie-image": "train_ernie_image_lora.yaml",
           "krea2": "train_krea2_lora.yaml", "ideogram4": "train_ideogram4_lora.yaml", "hidream-i1": "train_hidream_lora.yaml",
           "wan": "train_wan_lora.yaml"}


@pytest.fixture(scope="module")
def zimage(tiny_models):
    return tiny_models("z-image")


@pytest.fixture(scope="module")
def trained(tiny_models, tmp_path_factory):
    """variant -> output folder of a 4-step run with ComfyUI files and a validation sample."""
    runs = {}

    def get(variant):
        if variant not in runs:
            tmp = tmp_path_factory.mktemp(variant)
            data = write_dataset(tmp / "d", n=2)
            cls, _pipe, call, *_ = FAMILIES[variant]
            train(load_config(None, base_overrides(
                tiny_models(variant), data, tmp / "out", max_train_steps=4, learning_rate=2e-2, lora_format="comfyui",
                validation_prompts="[a red cat]", validation_num_inference_steps=2,
                validation_guidance_scale=call.get("guidance_scale", call.get("true_cfg_scale")), **{"data_config.img_size": 32})), cls)
            runs[variant] = tmp / "out"
        return runs[variant]

    return get


def render(pipe, call, adapter, size=(32, 32)):
    with adapter.render_size(pipe, *size):  # HiDream-I1 would scale the request to 1024 x 1024's area
        return output_images(pipe(prompt="a photo", width=size[0], height=size[1], num_inference_steps=2, output_type="np",
                                  generator=torch.Generator().manual_seed(0), **call))[0]


@pytest.mark.parametrize("variant", list(FAMILIES))
def test_lora_loads_in_the_pipeline_changes_it_and_scale_zero_is_the_base(variant, trained, tiny_models, caplog):
    cls, pipeline, call, *_, size = FAMILIES[variant]
    model = tiny_models(variant)
    adapter = cls.from_model(load_config(None, [f"pretrained_model_name_or_path={model}"], check_paths=False))
    pipe = pipeline.from_pretrained(model, **adapter.pipeline_components(str(model)))
    size = (32, 32) if size[0] < 1000 else size
    base = render(pipe, call, adapter, size)
    with caplog.at_level(logging.WARNING):
        pipe.load_lora_weights(trained(variant), adapter_name="lora")
    assert not [r for r in caplog.records if "unexpected keys" in r.getMessage().lower() or "missing keys" in r.getMessage().lower()]
    assert np.abs(render(pipe, call, adapter, size) - base).max() > 1e-4
    pipe.set_adapters(["lora"], adapter_weights=[0.0])
    assert np.allclose(render(pipe, call, adapter, size), base, atol=1e-6)
    assert (trained(variant) / "samples" / "step-4.png").is_file()


@pytest.mark.parametrize("variant", list(FAMILIES))
def test_inference_script_renders_with_the_lora(variant, trained, tiny_models, tmp_path):
    out = tmp_path / "z.png"
    w, h = FAMILIES[variant][-1]
    cmd = [PY, "inference.py", "--model_name", str(tiny_models(variant)), "--lora_weights", str(trained(variant)), "--prompt", "a cat",
           "--width", str(w), "--height", str(h), "--num_inference_steps", "2", "--true_cfg_scale", "1", "--output_image", str(out)]
    if variant == "z-image-omni":  # with a reference (its VAE and SigLIP2 views; the released pipeline's VAE cast would refuse float32)
        cmd += ["--image", str(write_dataset(tmp_path / "ref", n=1, size=(96, 64)) / "img0.png")]
    takes_negative = FAMILIES[variant][0].takes_negative_prompt
    r, *refused = run_each([cmd] + ([] if takes_negative else [cmd[:-1] + [str(tmp_path / "n.png"), "--negative_prompt", "blurry"]]))
    assert r.returncode == 0, r.stderr[-2000:]
    assert Image.open(out).size == (w, h)
    for r in refused:  # a pipeline without a negative prompt: one line, before the model loads
        assert r.returncode == 2 and "--negative_prompt: " in r.stderr and "take no negative prompt" in r.stderr, r.stderr[-2000:]


@pytest.mark.parametrize("variant", list(FAMILIES))
@pytest.mark.parametrize("mode", ["qfloat8", "nf4"])
def test_quantized_and_block_swapped_training_match(variant, mode, tiny_models, tmp_path):
    data = write_dataset(tmp_path / "d", n=2)
    runs = {}
    for swap in (0, 2):
        out = tmp_path / f"{mode}-{swap}"
        train(load_config(None, base_overrides(tiny_models(variant), data, out, quantize=mode, blocks_to_swap=swap, max_train_steps=3,
                                               gradient_checkpointing=True)), FAMILIES[variant][0])
        runs[swap] = read_losses(out)
    assert runs[0] == pytest.approx(runs[2], abs=1e-6) and all(np.isfinite(runs[0]))


@pytest.mark.parametrize("variant", list(FAMILIES))
def test_planner_counts_the_released_transformer(variant, capsys):
    from utils.estimate_memory import main as estimate_main
    from utils.estimate_memory import plan

    *_, params, blocks, _size = FAMILIES[variant]
    config = f"train_configs/{CONFIGS[variant]}"
    _rows, info = plan(load_config(ROOT / config, check_paths=False), 1024)
    assert info["transformer_params"] == params and info["blocks"] == blocks
    for card in (24, 16, 12):  # the CLI in-process (its subprocess form is tested in test_lowvram.py)
        capsys.readouterr()
        assert estimate_main(["--config", str(ROOT / config), "--vram_gb", str(card), "quantize=nf4", "quantize_text_encoder=nf4"]) == 0
        stdout = capsys.readouterr().out
        assert f"fits a {card} GB card" in stdout, stdout
        assert stdout.strip().endswith("yes") or "\nhint: " in stdout, stdout


def test_krea_yaml_trains_at_its_guidance_through_the_flux_entry(tiny_models, tmp_path):
    """FLUX.1-Krea-dev is the FLUX.1-dev architecture; its YAML trains at Krea's inference guidance, 4.5."""
    from trainer.models.flux import FluxAdapter

    data = write_dataset(tmp_path / "d", n=2)
    flux = tiny_models("flux")
    r = subprocess.run([*ACCELERATE, "train_flux_lora.py", "--config", "train_configs/train_flux_krea.yaml",
                        f"pretrained_model_name_or_path={flux}", f"data_config.img_dir={data}", "data_config.img_size=64",
                        f"output_dir={tmp_path / 'o'}", "max_train_steps=2", "report_to=none", "data_config.num_workers=0"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    cfg = load_config(ROOT / "train_configs/train_flux_krea.yaml", [f"pretrained_model_name_or_path={flux}"], check_paths=False)
    adapter = FluxAdapter.from_model(cfg)
    adapter.load()
    seen = {}
    adapter.transformer.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    cond = adapter.encode_prompts(["a photo"])
    with torch.no_grad():
        adapter.predict(adapter.transformer, torch.randn(1, 4, 8, 8), torch.tensor([0.5]), cond)
    assert seen["guidance"].tolist() == [4.5]


def test_assistant_lora_trains_with_it_previews_and_saves_without_it(zimage, tmp_path):
    """Turbo training: a frozen assistant LoRA is active in the training forward, off in sampling, not saved."""
    assistant = tmp_path / "assistant"
    pipe = ZImagePipeline.from_pretrained(zimage)
    torch.manual_seed(3)
    layers = {}
    for name, m in pipe.transformer.named_modules():
        if name.endswith(("attention.to_q", "attention.to_v")):
            layers[f"{name}.lora_A.weight"] = torch.randn(4, m.in_features) * 0.3
            layers[f"{name}.lora_B.weight"] = torch.randn(m.out_features, 4) * 0.3
    ZImagePipeline.save_lora_weights(assistant, transformer_lora_layers=layers)
    data = write_dataset(tmp_path / "d", n=2)
    plain, helped = tmp_path / "plain", tmp_path / "helped"
    train(load_config(None, base_overrides(zimage, data, plain, max_train_steps=3)), ZImageAdapter)
    train(load_config(None, base_overrides(zimage, data, helped, max_train_steps=3, assistant_lora=str(assistant))), ZImageAdapter)
    assert read_losses(plain)[0] != pytest.approx(read_losses(helped)[0], abs=1e-6), "the assistant takes part in training"
    saved = load_file(helped / "pytorch_lora_weights.safetensors")
    assert saved.keys() == load_file(plain / "pytorch_lora_weights.safetensors").keys(), "only the trained LoRA is saved"

    cfg = load_config(None, base_overrides(zimage, data, helped, assistant_lora=str(assistant)))
    adapter = ZImageAdapter.from_model(cfg)
    adapter.load()
    method = LoRAMethod(cfg, adapter)
    params = method.attach(adapter.transformer)
    method.load(adapter.transformer, helped)
    assert all(".default." in n for n, p in adapter.transformer.named_parameters() if p.requires_grad) and params
    g = torch.Generator().manual_seed(0)
    noisy = torch.randn(1, 16, 4, 4, generator=g)
    cond = adapter.encode_prompts(["a cat"])
    with torch.no_grad():
        with method.sampling(adapter.transformer):
            previewed = adapter.predict(adapter.transformer, noisy, torch.tensor([0.5]), cond)
        trained_with = adapter.predict(adapter.transformer, noisy, torch.tensor([0.5]), cond)
        ref = ZImagePipeline.from_pretrained(zimage)
        ref.load_lora_weights(helped)
        as_used = adapter.predict(ref.transformer, noisy, torch.tensor([0.5]), cond)
    assert (previewed - as_used).abs().max() < 1e-5, "previews show the LoRA without the assistant"
    assert (trained_with - as_used).abs().max() > 1e-4


def test_hidream_routed_experts_train_and_its_setup_checks(tiny_models, tmp_path):
    """HiDream-I1's MoE layers run their training path when gradients are on (in eval mode diffusers runs them under
    no_grad, so a LoRA on the routed experts would never change): the opt-in expert LoRA trains and its prediction path
    equals the pipeline's; a folder without Llama (text_encoder_4) and sides past the padded sequence are refused before
    anything loads; previews keep the asked size."""
    from trainer.config import ConfigError

    model = tiny_models("hidream-i1")
    data = write_dataset(tmp_path / "d", n=2)
    cfg = load_config(None, base_overrides(model, data, tmp_path / "out", max_train_steps=2, learning_rate=5e-2,
                                           lora_target_modules="[experts.*.w1,experts.*.w2,experts.*.w3]"))
    train(cfg, HiDreamAdapter)
    weights = load_file(tmp_path / "out" / "pytorch_lora_weights.safetensors")
    ups = [v for k, v in weights.items() if ".experts." in k and "lora_B" in k]
    assert ups and all(".shared_experts." not in k for k in weights) and max(float(v.abs().max()) for v in ups) > 0
    adapter = HiDreamAdapter.from_model(cfg)
    adapter.load()
    cond = adapter.encode_prompts(["a red cat", ""])
    noisy, sigmas = torch.randn(2, 4, 8, 12), torch.tensor([0.7, 0.2])
    with torch.no_grad():
        inference_path = adapter.predict(adapter.transformer, noisy, sigmas, cond)
    training_path = adapter.predict(adapter.transformer, noisy, sigmas, cond)
    torch.testing.assert_close(training_path, inference_path, rtol=1e-5, atol=1e-6)
    with adapter.render_size(pipe := adapter.sampling_pipeline(adapter.transformer), 48, 32):
        assert pipe(**adapter.sampling_kwargs(cond, cond, (48, 32), []) | {"guidance_scale": 1.0}, width=48, height=32,
                    num_inference_steps=1, output_type="np").images[0].shape[:2] == (32, 48)
    import shutil

    partial = tmp_path / "no-llama"
    shutil.copytree(model, partial, ignore=shutil.ignore_patterns("text_encoder_4"))
    with pytest.raises(ConfigError, match="text_encoder_4"):
        HiDreamAdapter.check_setup(load_config(None, base_overrides(partial, data, tmp_path / "o2")))
    with pytest.raises(ConfigError, match="data_config.img_size"):  # the tiny transformer pads to 8 x 8 tokens: 128 px
        HiDreamAdapter.check_setup(load_config(None, base_overrides(model, data, tmp_path / "o3", **{"data_config.img_size": 144})))


def test_wan_a14b_two_experts_are_refused_before_the_model_loads(tiny_models, tmp_path):
    """Wan 2.2 A14B (transformer + transformer_2 split at boundary_ratio) is not trained yet: one line, before loading."""
    import json
    import shutil

    from trainer.config import ConfigError

    model = tmp_path / "a14b"
    shutil.copytree(tiny_models("wan"), model)
    index = json.loads((model / "model_index.json").read_text())
    (model / "model_index.json").write_text(json.dumps({**index, "boundary_ratio": 0.875}))
    with pytest.raises(ConfigError, match="Wan 2.2 A14B model .* not supported yet"):
        WanAdapter.check_setup(load_config(None, base_overrides(model, write_dataset(tmp_path / "d", n=1), tmp_path / "o")))
