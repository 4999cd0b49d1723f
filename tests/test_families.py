"""FLUX (dev, Kontext) and Qwen-Image-Edit (Edit, Edit-2509) on tiny real-class pipelines."""

import json
import statistics
import subprocess

import numpy as np
import pytest
import torch
from diffusers import (
    ChromaPipeline,
    Flux2KleinPipeline,
    FluxKontextPipeline,
    FluxPipeline,
    Kandinsky5T2IPipeline,
    QwenImageEditPipeline,
    QwenImage21Pipeline,
    QwenImageEditPlusPipeline,
    ZImagePipeline,
)
from helpers import ACCELERATE, PY, ROOT, base_overrides, read_losses, run_each, write_dataset
from PIL import Image

from trainer.config import ConfigError, load_config
from trainer.loop import train
from trainer.models.flux import FluxAdapter
from trainer.models.qwen_image import QwenImageAdapter, QwenImageEditAdapter
from trainer.models.chroma import ChromaAdapter
from trainer.models.flux2 import Flux2Adapter
from trainer.models.kandinsky5 import Kandinsky5Adapter
from trainer.models.qwen_image21 import QwenImage21Adapter
from trainer.models.qwen_processor import load_qwen_processor
from trainer.models.z_image import ZImageAdapter

FAMILIES = {
    # family: (entry script, adapter, pipeline class, uses control images)
    "flux": ("train_flux_lora.py", FluxAdapter, FluxPipeline, False),
    "flux-kontext": ("train_flux_lora.py", FluxAdapter, FluxKontextPipeline, True),
    "qwen-image-edit": ("train_qwen_edit_lora.py", QwenImageEditAdapter, QwenImageEditPipeline, True),
    "qwen-image-edit-plus": ("train_qwen_edit_lora.py", QwenImageEditAdapter, QwenImageEditPlusPipeline, True),
    "z-image": ("train_z_image_lora.py", ZImageAdapter, ZImagePipeline, False),
    "chroma": ("train_chroma_lora.py", ChromaAdapter, ChromaPipeline, False),
    "kandinsky5": ("train_kandinsky_lora.py", Kandinsky5Adapter, Kandinsky5T2IPipeline, False),
    "flux2-klein": ("train_flux2_lora.py", Flux2Adapter, Flux2KleinPipeline, True),
    "qwen-image-2.1": ("train_qwen_image_21_lora.py", QwenImage21Adapter, QwenImage21Pipeline, False),  # refs: test_qwen_image_21
}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    targets = write_dataset(root / "target", n=4, size=(64, 64))
    controls = write_dataset(root / "control", n=4, size=(64, 96), seed=1)  # other size and aspect than the targets (>= 64: FLUX.2)
    for p in controls.glob("*.txt"):
        p.unlink()
    return targets, controls


def overrides(model, pairs, out, uses_controls, **extra):
    targets, controls = pairs
    extra.setdefault("t5_max_sequence_length", 32)
    if uses_controls:
        extra["data_config.control_dir"] = str(controls)
    return base_overrides(model, targets, out, **extra)


# families whose entry only needs to be shown to train under accelerate launch here (their other tests are elsewhere)
# (entry, uses control images)
LAUNCHED_ONLY = {"ernie-image": ("train_ernie_image_lora.py", False), "krea2": ("train_krea2_lora.py", False),
                 "ideogram4": ("train_ideogram4_lora.py", False), "hidream-i1": ("train_hidream_lora.py", False),
                 "z-image-omni": ("train_z_image_omni_lora.py", True), "wan": ("train_wan_lora.py", False)}


@pytest.fixture(scope="module")
def launched(tiny_models, pairs, tmp_path_factory):
    """Each family's entry script under `accelerate launch`, 3 steps at batch 2 (two launches at a time)."""
    entries = {family: (entry, uses_controls) for family, (entry, _adapter, _pipe, uses_controls) in FAMILIES.items()}
    entries.update(LAUNCHED_ONLY)
    runs, cmds = {}, []
    for family, (entry, uses_controls) in entries.items():
        runs[family] = tmp_path_factory.mktemp(family) / "out"
        cmds.append(ACCELERATE + [entry, "--config", "train_configs/train_flux_config.yaml"] + overrides(
            tiny_models(family), pairs, runs[family], uses_controls, max_train_steps=3, learning_rate=2e-2,
            **{"data_config.train_batch_size": 2},
        ))
    for family, r in zip(entries, run_each(cmds)):
        assert r.returncode == 0, f"{family}: {r.stderr[-3000:]}"
        assert len(read_losses(runs[family])) == 3, family
    return runs


@pytest.mark.parametrize("family", ["flux", "flux-kontext"])
def test_flux_lora_loads_and_changes_pipeline_output(family, launched, tiny_models, pairs, caplog):
    pipe = FAMILIES[family][2].from_pretrained(tiny_models(family))
    kwargs = dict(prompt="a photo", height=32, width=32, num_inference_steps=2, guidance_scale=3.5, output_type="np",
                  max_sequence_length=32)
    if family == "flux-kontext":
        kwargs.update(image=Image.open(next(pairs[1].glob("*.png"))), _auto_resize=False, max_area=32 * 32)

    def run():
        return pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images[0]

    base = run()
    pipe.load_lora_weights(launched[family], adapter_name="lora")
    assert not [r for r in caplog.records if "unexpected keys" in r.getMessage().lower()]
    assert np.abs(run() - base).max() > 1e-4
    pipe.set_adapters(["lora"], adapter_weights=[0.0])
    assert np.allclose(run(), base, atol=1e-6)


@pytest.mark.parametrize("family", ["qwen-image-edit", "qwen-image-edit-plus"])
def test_qwen_edit_lora_loads_in_its_pipeline(family, launched, tiny_models, pairs):
    """Loads with the Edit / Edit-Plus pipeline's own load_lora_weights and changes its transformer's prediction."""
    model = tiny_models(family)
    pipe = FAMILIES[family][2].from_pretrained(model, processor=load_qwen_processor(model))
    assert type(pipe).__name__ == FAMILIES[family][2].__name__
    cfg = load_config(None, overrides(model, pairs, launched[family], True), check_paths=False)
    adapter = QwenImageEditAdapter.from_model(cfg)
    adapter.load()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g)
    cond = adapter.encode_text({"captions": ["make it blue"], "controls": [torch.rand(1, 3, 64, 48) * 2 - 1]})
    cond["control_latents"] = [torch.randn(1, 4, 16, 12, generator=g)]
    with torch.no_grad():
        base = adapter.predict(pipe.transformer, x, torch.tensor([0.5]), cond)
        pipe.load_lora_weights(launched[family], adapter_name="lora")
        tuned = adapter.predict(pipe.transformer, x, torch.tensor([0.5]), cond)
    assert (tuned - base).abs().max() > 1e-5


@pytest.mark.parametrize("family", list(FAMILIES))
def test_overfit_one_sample(family, tiny_models, pairs, tmp_path):
    targets, controls = pairs
    one_t = write_dataset(tmp_path / "t", n=1)
    one_c = tmp_path / "c"
    one_c.mkdir()
    (one_c / "img0.png").write_bytes((controls / "img0.png").read_bytes())
    out = tmp_path / "out"
    uses = FAMILIES[family][3]
    lr = {"z-image": 1e-2, "flux2-klein": 1e-2, "qwen-image-2.1": 1e-2}.get(family, 3e-3)  # their tiny models move slower at the same rate
    # and these two also need more steps since their tiny VAEs give unit-variance latents (tests/test_learning.py)
    steps = {"flux2-klein": 200, "qwen-image-2.1": 200}.get(family, 60)
    ov = base_overrides(tiny_models(family), one_t, out, max_train_steps=steps, learning_rate=lr, rank=8, t5_max_sequence_length=32,
                        **({"data_config.control_dir": str(one_c)} if uses else {}))
    train(load_config(None, ov), FAMILIES[family][1])
    losses = read_losses(out)
    assert statistics.mean(losses[-10:]) < 0.85 * statistics.mean(losses[:10]), family


@pytest.mark.parametrize("family", ["flux-kontext", "qwen-image-edit", "qwen-image-edit-plus"])
def test_prediction_depends_on_control_image(family, tiny_models, pairs):
    model = tiny_models(family)
    adapter_cls = FAMILIES[family][1]
    cfg = load_config(None, overrides(model, pairs, ROOT, True), check_paths=False)
    adapter = adapter_cls.from_model(cfg)
    adapter.load()
    g = torch.Generator().manual_seed(0)
    target = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    ctrl_a = torch.rand(1, 3, 48, 32, generator=g) * 2 - 1
    ctrl_b = torch.rand(1, 3, 48, 32, generator=g) * 2 - 1
    noisy = torch.randn(1, 4, *adapter.encode_images(target).shape[-2:], generator=g)

    def pred(ctrl):
        latents, cond = adapter.encode_batch({"pixel_values": target, "controls": [ctrl], "captions": ["edit"]})
        with torch.no_grad():
            return adapter.predict(adapter.transformer, noisy, torch.tensor([0.6]), cond)

    a, b = pred(ctrl_a), pred(ctrl_b)
    assert a.shape == noisy.shape, "prediction is sliced back to the target tokens"
    assert (a - b).abs().max() > 1e-4
    assert torch.equal(a, pred(ctrl_a))


def test_missing_control_image_fails_fast_with_file_names(tiny_models, pairs, tmp_path):
    targets, controls = pairs
    partial = tmp_path / "ctrl"
    partial.mkdir()
    for p in sorted(controls.glob("*.png"))[:2]:
        (partial / p.name).write_bytes(p.read_bytes())
    cfg = load_config(None, base_overrides(tiny_models("qwen-image-edit"), targets, tmp_path / "o",
                                           **{"data_config.control_dir": str(partial)}))
    with pytest.raises(ConfigError) as e:
        train(cfg, QwenImageEditAdapter)
    assert "img2.png" in str(e.value) and "img3.png" in str(e.value) and "no control image" in str(e.value)


def test_metadata_layout_with_several_controls(tiny_models, pairs, tmp_path):
    targets, controls = pairs
    rows = [{"image": str(targets / f"img{i}.png"), "prompt": f"edit {i}", "control_image": str(controls / f"img{i}.png"),
             "control_image_2": str(controls / f"img{(i + 1) % 4}.png")} for i in range(4)]
    meta = tmp_path / "metadata.jsonl"
    meta.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "plus"
    ov = base_overrides(tiny_models("qwen-image-edit-plus"), targets, out, max_train_steps=2, **{"data_config.metadata_file": str(meta)})
    train(load_config(None, ov), QwenImageEditAdapter)
    assert len(read_losses(out)) == 2
    csv = tmp_path / "metadata.csv"
    csv.write_text("image,prompt,control_image,control_image_2\n" + "".join(
        f"{r['image']},{r['prompt']},{r['control_image']},{r['control_image_2']}\n" for r in rows))
    ov = base_overrides(tiny_models("qwen-image-edit"), targets, tmp_path / "edit", **{"data_config.metadata_file": str(csv)})
    with pytest.raises(ConfigError, match=r"metadata.csv:2: 2 control image\(s\), more than the 1 a QwenImageEditPipeline model takes"):
        train(load_config(None, ov), QwenImageEditAdapter)
    r = subprocess.run([PY, "utils/validate_dataset.py", "--metadata", str(csv)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout


def test_wrong_entry_script_for_model_is_named(tiny_models, dataset, tmp_path):
    with pytest.raises(ConfigError, match="train_flux_lora.py"):
        train(load_config(None, base_overrides(tiny_models("flux"), dataset, tmp_path / "o")), QwenImageAdapter)
    with pytest.raises(ConfigError, match="needs control images"):
        train(load_config(None, base_overrides(tiny_models("qwen-image-edit"), dataset, tmp_path / "o")), QwenImageEditAdapter)


def test_inference_with_input_image(launched, tiny_models, pairs, tmp_path):
    out = tmp_path / "kontext.png"
    cmd = [PY, "inference.py", "--model_name", str(tiny_models("flux-kontext")), "--lora_weights", str(launched["flux-kontext"]),
           "--image", str(next(pairs[1].glob("*.png"))), "--prompt", "make it red", "--width", "48", "--height", "32",
           "--num_inference_steps", "2", "--kontext_auto_resize", "false", "--output_image", str(out)]
    edit = [PY, "inference.py", "--model_name", str(tiny_models("qwen-image-edit")), "--prompt", "x"]
    r, no_image, two_images = run_each([cmd, edit, edit + ["--image", cmd[7]] * 2], timeout=120, workers=3)
    assert r.returncode == 0, r.stderr[-2000:]
    assert Image.open(out).size == (48, 32)
    assert no_image.returncode == 2 and "--image" in no_image.stderr, "an edit model needs its input image"
    assert two_images.returncode == 2 and "at most 1" in two_images.stderr


def test_edit_prompt_too_long_for_the_model_is_refused_before_the_transformer_loads(tiny_models, pairs, tmp_path, monkeypatch):
    targets, controls = pairs
    data = write_dataset(tmp_path / "t", n=2, captions=["short", "word " * 5000])
    loaded = []
    monkeypatch.setattr(QwenImageEditAdapter, "load_transformer", lambda self: loaded.append(1))
    cfg = load_config(None, base_overrides(tiny_models("qwen-image-edit"), data, tmp_path / "o", **{"data_config.control_dir": str(controls)}))
    with pytest.raises(ConfigError, match=r"1 sample\(s\) have prompts the model cannot take") as e:
        train(cfg, QwenImageEditAdapter)
    assert "img1.png" in str(e.value) and "img0.png" not in str(e.value) and not loaded


def test_text_length_over_the_pipeline_limit_is_refused(tiny_models, dataset, tmp_path):
    with pytest.raises(ConfigError, match="'t5_max_sequence_length' is 600; the FluxPipeline pipeline takes at most 512"):
        train(load_config(None, base_overrides(tiny_models("flux"), dataset, tmp_path / "o", t5_max_sequence_length=600)), FluxAdapter)
    with pytest.raises(ConfigError, match="'max_sequence_length' is 2000"):
        train(load_config(None, base_overrides(tiny_models("qwen-image"), dataset, tmp_path / "o", max_sequence_length=2000)), QwenImageAdapter)
