"""FLUX Control (`control_type: concat`) and FLUX Fill (`control_type: fill`): LoRAs trained from FLUX.1-dev (its
input layer widened) load in diffusers' FluxControlPipeline / FluxFillPipeline and in ComfyUI with exactly the
trained weights, control images are cut where their image is cut, random inpainting masks are drawn per epoch, wrong
setups are one line before any model loads, inference.py renders with them, and they learn to follow the control
image / the visible part of the image through the pipeline (the equivalence cases are in tests/test_equivalence.py)."""

import json
import logging
import shlex
import subprocess

import numpy as np
import pytest
import torch
from helpers import PY, ROOT, base_overrides, read_losses, run_each, write_dataset
from PIL import Image
from safetensors.torch import load_file

from trainer.config import ConfigError, DataConfig, load_config
from trainer.loop import train
from trainer.models.flux import FluxAdapter
from trainer.models.qwen_image import QwenImageAdapter
from trainer.models.z_image import ZImageAdapter


COMMANDS: dict[str, list[str]] = {}  # fixture -> the "try it" command its run logged


class TryIt(logging.Handler):
    """Keeps the run's closing "try it: python inference.py ..." line."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.command: list[str] = []

    def emit(self, record):
        if record.getMessage().startswith("try it: "):
            self.command = shlex.split(record.getMessage()[len("try it: "):])


def train_and_keep_command(cfg, adapter_class=FluxAdapter) -> list[str]:
    handler, log = TryIt(), logging.getLogger("trainer")
    log.addHandler(handler)
    level = log.level
    log.setLevel(logging.INFO)
    try:
        train(cfg, adapter_class)
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    return handler.command


@pytest.fixture(scope="module")
def control_run(tiny_models, tmp_path_factory):
    """(model, data, out, extra): a control LoRA trained 2 steps from the tiny FLUX.1-dev, its ComfyUI file too."""
    root = tmp_path_factory.mktemp("control")
    model = tiny_models("flux")
    data = write_dataset(root / "t", n=2)
    extra = {"control_type": "concat", "data_config.control_dir": str(write_dataset(root / "c", n=2, seed=2)), "lora_format": "comfyui"}
    out = root / "out"
    command = train_and_keep_command(load_config(None, base_overrides(model, data, out, max_train_steps=2, validation_samples=1,
                                                                      validation_steps=2, **extra)))
    COMMANDS["control"] = command
    return model, data, out, extra


@pytest.fixture(scope="module")
def fill_run(tiny_models, tmp_path_factory):
    """(model, data, out, extra): a Fill LoRA trained 2 steps from the tiny FLUX.1-dev on random masks."""
    root = tmp_path_factory.mktemp("fill")
    model = tiny_models("flux")
    data = write_dataset(root / "t", n=2)
    extra = {"control_type": "fill", "lora_format": "comfyui"}
    out = root / "out"
    train(load_config(None, base_overrides(model, data, out, max_train_steps=2, validation_samples=1, validation_steps=2,
                                           **extra)), FluxAdapter)
    return model, data, out, extra


def test_widened_fill_lora_loads_in_flux_fill_pipeline_and_comfyui(fill_run):
    from diffusers import FluxFillPipeline
    from helpers import merged_weights, trained_model

    from trainer.pipelines import adapter_for, load_pipeline

    model, data, out, extra = fill_run
    assert {p.name for p in (out / "samples").glob("step-*.png")} == {"step-0.png", "step-2.png"}  # previews inpaint a random mask
    assert load_file(out / "pytorch_lora_weights.safetensors")["transformer.x_embedder.lora_A.weight"].shape[1] == 16 + 16 + 256
    pipe = load_pipeline(adapter_for(str(model), str(out)), torch.float32, "cpu", str(out))
    assert isinstance(pipe, FluxFillPipeline) and pipe.transformer.config.in_channels == 288
    _, transformer, _ = trained_model(model, data, out, **extra)
    loaded, trained = merged_weights(pipe.transformer, "lora"), merged_weights(transformer)
    assert loaded.keys() == trained.keys() and max((loaded[k] - trained[k]).abs().max().item() for k in loaded) < 1e-5
    assert load_file(out / "pytorch_lora_weights_comfyui.safetensors")["lora_transformer_x_embedder.reshape_weight"].tolist() == [32, 288]


@pytest.mark.parametrize("control", ["concat", "fill"])
def test_control_and_fill_loras_train_on_an_nf4_base(control, tiny_models, tmp_path):
    """x_embedder is widened before the blocks are quantized (it stays a plain layer, the LoRA on it trains)."""

    data = write_dataset(tmp_path / "t", n=2)
    extra = {"data_config.control_dir": str(write_dataset(tmp_path / "c", n=2, seed=2))} if control == "concat" else {}
    out = tmp_path / "out"
    train(load_config(None, base_overrides(tiny_models("flux"), data, out, max_train_steps=2, quantize="nf4", control_type=control,
                                           **extra)), FluxAdapter)
    assert len(read_losses(out)) == 2
    assert load_file(out / "pytorch_lora_weights.safetensors")["transformer.x_embedder.lora_A.weight"].shape[1] > 16


def test_random_inpainting_masks_change_each_epoch_and_repeat_on_resume():
    import random

    from image_datasets.caption_dataset import random_mask

    masks = [random_mask((64, 48), random.Random(f"0-{epoch}-3-mask")) for epoch in range(8)]
    assert torch.equal(masks[0], random_mask((64, 48), random.Random("0-0-3-mask")))
    assert len({m.sum().item() for m in masks}) > 4
    for m in masks:
        assert m.shape == (1, 48, 64) and set(m.unique().tolist()) == {0.0, 1.0}
        assert (64 // 8) * (48 // 8) <= m.sum() <= 3 * 32 * 24  # 1 to 3 rectangles, sides 1/8 to 1/2


def test_widened_lora_loads_in_flux_control_pipeline_and_comfyui(control_run):
    from comfyui_rules import comfyui_weight, not_loaded
    from diffusers import FluxControlPipeline
    from helpers import comfyui_error, merged_weights, trained_model

    from trainer.pipelines import adapter_for, load_pipeline

    model, data, out, extra = control_run
    assert {p.name for p in (out / "samples").glob("step-*.png")} == {"step-0.png", "step-2.png"}  # previews with the control image
    sd = load_file(out / "pytorch_lora_weights.safetensors")
    assert sd["transformer.x_embedder.lora_A.weight"].shape[1] == 32  # 16 latent + 16 control channels (packed)
    adapter = adapter_for(str(model), str(out))
    assert adapter.variant.name == "flux-control" and adapter_for(str(model)).variant.name == "flux"
    pipe = load_pipeline(adapter, torch.float32, "cpu", str(out))  # diffusers' load_lora_weights widens x_embedder itself
    assert isinstance(pipe, FluxControlPipeline) and pipe.transformer.config.in_channels == 32
    _, transformer, _ = trained_model(model, data, out, **extra)
    loaded, trained = merged_weights(pipe.transformer, "lora"), merged_weights(transformer)
    assert loaded.keys() == trained.keys() and "x_embedder" in loaded
    assert max((loaded[k] - trained[k]).abs().max().item() for k in loaded) < 1e-5
    base_x = transformer.x_embedder.get_base_layer().weight.detach()
    assert (base_x[:, 16:] == 0).all() and trained["x_embedder"][:, 16:].abs().max() > 0  # the control inputs are learnt

    comfy = load_file(out / "pytorch_lora_weights_comfyui.safetensors")
    assert comfy["lora_transformer_x_embedder.reshape_weight"].tolist() == [32, 32]
    assert not_loaded(comfy, "flux-control", adapter_for(str(model)).pipeline_class.from_pretrained(model).transformer) == []
    assert comfyui_error(comfy, adapter, transformer) < 1e-4
    # ComfyUI patches the released (narrow) img_in: padded with zeros to reshape_weight, then the LoRA
    parts = {k.split(".", 1)[1]: v for k, v in comfy.items() if k.startswith("lora_transformer_x_embedder.")}
    assert (comfyui_weight(parts, base_x[:, :16]) - trained["x_embedder"]).abs().max() < 1e-5
    converted = out.parent / "converted.safetensors"  # utils/convert_lora.py writes the same file, reshape included
    r = subprocess.run([PY, "utils/convert_lora.py", "--in", str(out / "pytorch_lora_weights.safetensors"), "--out", str(converted),
                        "--to", "comfyui"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    again = load_file(converted)
    assert again.keys() == comfy.keys() and all(torch.equal(again[k], comfy[k]) for k in comfy)


def test_scale_zero_renders_the_base_model_and_scale_one_does_not(control_run):
    """(FluxControlPipeline draws the control's VAE sample from the generator first, so its base is the widened
    FLUX.1-dev in the same pipeline, not FluxPipeline.)"""
    from trainer.pipelines import adapter_for, load_pipeline, output_images

    model, _, out, _ = control_run
    control = Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype("uint8"))
    kwargs = dict(prompt="a red square", width=64, height=64, num_inference_steps=2, max_sequence_length=64)

    def render(pipe, **more):
        return np.asarray(output_images(pipe(**kwargs, **more, generator=torch.Generator().manual_seed(0)))[0], dtype=np.float32)

    adapter = adapter_for(str(model), str(out))
    # FLUX.1-dev in a FluxControlPipeline, x_embedder widened with zeros (the control is read by nothing): the base
    base = render(load_pipeline(adapter, torch.float32, "cpu"), control_image=control)
    off = render(load_pipeline(adapter, torch.float32, "cpu", str(out), lora_scale=0.0), control_image=control)
    on = render(load_pipeline(adapter, torch.float32, "cpu", str(out)), control_image=control)
    assert np.abs(off - base).max() <= 1  # uint8 rounding of the same float image
    assert np.abs(on - base).max() > 1
    # merge_lora.py bakes it into a FLUX.1-Canny-dev-like folder (FluxControlPipeline, in_channels 32) that renders the same
    from utils.merge_lora import main as merge

    merged = out.parent / "merged"
    assert merge(["--model_name", str(model), "--lora_weights", str(out), "--out", str(merged), "--dtype", "fp32"]) == 0
    assert json.loads((merged / "transformer" / "config.json").read_text())["in_channels"] == 32
    assert np.abs(render(load_pipeline(adapter_for(str(merged)), torch.float32, "cpu"), control_image=control) - on).max() <= 1


def test_control_images_are_cut_where_their_image_is_cut(tmp_path):
    """A control image identical to its image stays identical through random crops (the crop moves between epochs)."""
    from image_datasets import CaptionDataset, scan_dataset

    cfg = load_config(None, ["pretrained_model_name_or_path=unused", "control_type=concat"], check_paths=False)
    adapter = FluxAdapter(cfg, FluxAdapter.variant_named("flux-control"))
    imgs, controls = tmp_path / "i", tmp_path / "c"
    for d in (imgs, controls):
        d.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        pixels = Image.fromarray((rng.random((80, 120, 3)) * 255).astype("uint8"))  # 3:2, trained at 64x48 (4:3): cropped
        pixels.save(imgs / f"s{i}.png")
        pixels.save(controls / f"s{i}.png")
        (imgs / f"s{i}.txt").write_text("x")
    scan = scan_dataset(DataConfig(img_dir=str(imgs), control_dir=str(controls), img_size=64, random_ratio=True),
                        reference_sizes=adapter.reference_sizes, rule=adapter.reference_rule())
    assert not scan.problems and {s.control_sizes for s in scan.samples} == {((64, 48),)}
    ds = CaptionDataset(scan.samples, random_crop=True, reference_transform=adapter.reference_transform(), aligned_controls=True)
    crops = set()
    for epoch in range(6):
        item = ds[(0, epoch)]
        assert torch.equal(item["controls"][0], item["pixel_values"])
        crops.add(item["pixel_values"].sum().item())
    assert len(crops) > 1, "the random crop never moved"


def test_wrong_control_setups_are_one_line_before_the_model_loads(tiny_models, tmp_path):
    from image_datasets import scan_dataset

    flux, qwen = tiny_models("flux"), tiny_models("qwen-image")
    data = write_dataset(tmp_path / "t", n=1, size=(64, 64))
    with pytest.raises(ConfigError, match="'control_type: concat': a QwenImagePipeline model cannot train it"):
        QwenImageAdapter.check_setup(load_config(None, base_overrides(qwen, data, tmp_path / "o", control_type="concat")))
    with pytest.raises(ConfigError, match="needs control images"):
        FluxAdapter.check_setup(load_config(None, base_overrides(flux, data, tmp_path / "o", control_type="concat")))
    with pytest.raises(ConfigError, match="'control_type' is 'canny', expected one of: concat"):
        load_config(None, base_overrides(flux, data, tmp_path / "o", control_type="canny"))
    with pytest.raises(ConfigError, match="full fine-tuning of a control model is not supported yet"):
        load_config(None, base_overrides(flux, data, tmp_path / "o", control_type="fill", training_method="full"))
    with pytest.raises(ConfigError, match="'control_type: in-context': a FluxPipeline model cannot train it"):
        FluxAdapter.check_setup(load_config(None, base_overrides(flux, data, tmp_path / "o", control_type="in-context")))
    with pytest.raises(ConfigError, match="needs control images for a QwenImagePipeline model"):
        QwenImageAdapter.check_setup(load_config(None, base_overrides(qwen, data, tmp_path / "o", control_type="in-context")))
    with pytest.raises(ConfigError, match="'control_type: in-context' trains a LoRA; full fine-tuning"):
        load_config(None, base_overrides(qwen, data, tmp_path / "o", control_type="in-context", training_method="full"))
    with pytest.raises(ConfigError, match="lora_type: lora without use_dora"):
        load_config(None, base_overrides(flux, data, tmp_path / "o", control_type="concat", lora_type="lokr"))
    wide = write_dataset(tmp_path / "c", n=1, size=(96, 64))
    cfg = load_config(None, base_overrides(flux, data, tmp_path / "o", control_type="concat", **{"data_config.control_dir": str(wide)}))
    scan = scan_dataset(cfg.data_config, rule=FluxAdapter.from_model(cfg).reference_rule())
    assert len(scan.problems) == 1 and "control image is 96x64, but its image" in scan.problems[0] and "aspect ratio" in scan.problems[0]
    for name, expected in (("train_flux_control.yaml", ("concat", "lora")), ("train_flux_fill.yaml", ("fill", "lora")),
                           ("train_flux_controlnet.yaml", (None, "controlnet")),
                           ("train_qwen_image_in_context.yaml", ("in-context", "lora"))):  # the shipped YAMLs, paths left as shipped
        cfg = load_config(ROOT / "train_configs" / name, [], check_paths=False)
        assert (cfg.control_type, cfg.training_method) == expected, name
    out = tmp_path / "o2"
    r = subprocess.run([PY, "train_flux_lora.py", "--config", str(ROOT / "train_configs/train_flux_control.yaml"),
                        *base_overrides(flux, data, out, **{"data_config.control_dir": str(data), "lora_target_modules": "[to_q]"})],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0 and "leaves out x_embedder" in r.stderr.strip().splitlines()[-1], r.stderr[-2000:]


def test_inference_inpaints_with_a_mask(fill_run, tmp_path):
    model, _, out, _ = fill_run
    image, mask = tmp_path / "photo.png", tmp_path / "mask.png"
    Image.new("RGB", (64, 48), "blue").save(image)
    Image.new("L", (128, 96), 255).save(mask)
    args = [PY, "inference.py", "--model_name", str(model), "--lora_weights", str(out), "--prompt", "x", "--num_inference_steps", "1",
            "--image", str(image), "--width", "64", "--height", "48"]
    missing, r = run_each([args + ["--output_image", str(tmp_path / "no.png")], args + ["--mask", str(mask), "--output_image",
                                                                                        str(tmp_path / "o.png")]])
    assert missing.returncode == 2 and "--mask: flux-fill models inpaint --image where the mask is white" in missing.stderr
    assert r.returncode == 0, r.stderr[-2000:]
    assert Image.open(tmp_path / "o.png").size == (64, 48)


def test_inference_renders_with_a_control_image(control_run, tmp_path):
    model, _, out, _ = control_run
    command = COMMANDS["control"]  # the run's own "try it" line: the LoRA, --control_image, the training size
    assert command[:2] == ["python", "inference.py"] and "--control_image" in command and "--lora_weights" in command
    control = tmp_path / "edges.png"
    Image.new("RGB", (64, 48), "white").save(control)
    args = [PY, "inference.py", "--model_name", str(model), "--lora_weights", str(out), "--prompt", "x", "--num_inference_steps", "1"]
    tried, missing, r = run_each([[PY, *command[1:], "--num_inference_steps", "1"], args + ["--output_image", str(tmp_path / "no.png")],
                                  args + ["--control_image", str(control), "--width", "64", "--height", "48", "--output_image",
                                          str(tmp_path / "o.png")]], workers=3)
    assert tried.returncode == 0, tried.stderr[-2000:]
    assert missing.returncode == 2 and "--control_image: flux-control models follow a control image" in missing.stderr
    assert r.returncode == 0, r.stderr[-2000:]
    assert Image.open(tmp_path / "o.png").size == (64, 48)


@pytest.mark.parametrize("sign", ["right", "wrong"])
@pytest.mark.parametrize("control, variant", [("concat", "flux-control"), ("fill", "flux-fill")])
def test_lora_from_flux_dev_learns_through_the_control_pipelines(control, variant, sign, tiny_models, tmp_path):
    """Trained from FLUX.1-dev with control_type: concat / fill, sampled by FluxControlPipeline / FluxFillPipeline with
    the LoRA. Control: the mirror case (the control image decides: a bar on the left in, a disc on the right out, and
    back); Fill: one caption, the right half masked (the visible left half decides whether a disc is filled in)."""
    from trainer import learning
    from trainer.models import variants

    case = variants()[variant][1].learning
    report, _ = learning.run(tiny_models("flux"), tmp_path, case, wrong_sign=sign == "wrong", control_type=control)
    assert bool(report.failures()) == (sign == "wrong"), report.summary()


# --- ControlNets (training_method: controlnet) -----------------------------------------------------------------------
CONTROLNET = {"training_method": "controlnet", "controlnet_layers": 1, "controlnet_single_layers": 1}


@pytest.fixture(scope="module")
def controlnet_run(tiny_models, tmp_path_factory):
    """(model, data, out, extra): a FLUX Union ControlNet (3 modes) trained 2 steps beside the tiny FLUX.1-dev on two
    datasets of modes 0 and 2, with previews."""
    root = tmp_path_factory.mktemp("controlnet")
    model = tiny_models("flux")
    data = write_dataset(root / "t", n=2)
    canny, depth = write_dataset(root / "c", n=2, seed=2), write_dataset(root / "d", n=2, seed=3)
    extra = {**CONTROLNET, "controlnet_modes": 3, "data_config.img_dir": "''", "data_config.datasets": f"[{{img_dir: {data}, control_dir: {canny}, control_mode: 0}}, "
                                                                         f"{{img_dir: {data}, control_dir: {depth}, control_mode: 2}}]"}
    out = root / "out"
    command = train_and_keep_command(load_config(None, base_overrides(model, data, out, max_train_steps=2, validation_samples=1,
                                                                      validation_steps=2, **extra)))
    COMMANDS["controlnet"] = command
    return model, data, out, extra


def test_controlnet_folder_loads_in_flux_controlnet_pipeline_and_scale_zero_is_the_base(controlnet_run):
    from diffusers import FluxControlNetModel, FluxControlNetPipeline

    from trainer.methods.full import read_folder
    from trainer.pipelines import adapter_for, load_pipeline, output_images

    model, data, out, extra = controlnet_run
    assert {p.name for p in (out / "samples").glob("step-*.png")} == {"step-0.png", "step-2.png"}  # previews through the pipeline
    published, saved = read_folder(out / "controlnet"), read_folder(out / "checkpoint-2" / "controlnet")
    assert published.keys() == saved.keys() and all(torch.equal(published[k], saved[k]) for k in saved)
    net = FluxControlNetModel.from_pretrained(out / "controlnet")
    assert net.config.num_layers == 1 and net.config.num_single_layers == 1 and net.config.num_mode == 3 and net.union
    from utils.estimate_memory import build_transformer_on_meta, controlnet_params  # the planner counts what was trained

    planned = FluxAdapter.from_model(load_config(None, base_overrides(model, data, out, **extra)))
    assert controlnet_params(build_transformer_on_meta(planned)[0], planned) == (sum(p.numel() for p in net.parameters()), 2)
    assert max(net.controlnet_blocks[0].weight.abs().max().item(), net.controlnet_x_embedder.weight.abs().max().item()) > 0  # trained
    adapter = adapter_for(str(model), controlnet=True)
    control = Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype("uint8"))
    kwargs = dict(prompt="a red square", width=64, height=64, num_inference_steps=2, max_sequence_length=64, control_image=control,
                  control_mode=0)  # a Union ControlNet needs its mode (a plain one, the base's, ignores it)

    def render(pipe, scale):
        image = output_images(pipe(**kwargs, controlnet_conditioning_scale=scale, generator=torch.Generator().manual_seed(0)))[0]
        return np.asarray(image, dtype=np.float32)

    trained = load_pipeline(adapter, torch.float32, "cpu", controlnet=str(out))
    assert isinstance(trained, FluxControlNetPipeline)
    base = render(load_pipeline(adapter, torch.float32, "cpu"), 1.0)  # a ControlNet as training starts it: zero residuals
    assert np.abs(render(trained, 0.0) - base).max() <= 1
    assert np.abs(render(trained, 1.0) - base).max() > 1
    kwargs["control_mode"] = 2  # the mode is read: another mode, another picture
    other = render(trained, 1.0)
    kwargs["control_mode"] = 0
    assert np.abs(render(trained, 1.0) - other).max() > 0


@pytest.mark.parametrize("weights", ["fp32", "bf16", "lora"])
def test_controlnet_resumes_exactly_and_starts_from_a_quantized_base(weights, tiny_models, tmp_path, fresh_state):
    """(blocks_to_swap: the ControlNet's blocks are copied while the swapped weights are in host RAM.) full_weights: bf16
    keeps the ControlNet in bf16 (stochastic rounding, its generator resumed too) and saves a bf16 folder; controlnet_lora
    trains a LoRA on the frozen ControlNet and saves it merged (the layers it adapts changed, every other weight as the
    ControlNet started) beside the LoRA file, which resumes it."""
    from diffusers import FluxTransformer2DModel

    from trainer.methods.controlnet import CONTROLNET_LORA_FILE
    from trainer.methods.full import read_folder

    model = tiny_models("flux")
    data = write_dataset(tmp_path / "t", n=2)
    own = {"lora": {"controlnet_lora": True, "rank": 4, "learning_rate": 0.05}, "bf16": {"full_weights": "bf16", "mixed_precision": "bf16"}}
    extra = {**CONTROLNET, "data_config.control_dir": str(write_dataset(tmp_path / "c", n=2, seed=2)), "checkpointing_steps": 1,
             "blocks_to_swap": 1, **own.get(weights, {})}
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(load_config(None, base_overrides(model, data, straight, max_train_steps=2, **extra)), FluxAdapter)
    train(load_config(None, base_overrides(model, data, split, max_train_steps=1, **extra)), FluxAdapter)
    train(load_config(None, base_overrides(model, data, split, max_train_steps=2, resume_from_checkpoint="latest", **extra)), FluxAdapter)
    a, b = read_folder(straight / "controlnet"), read_folder(split / "controlnet")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert {v.dtype for v in a.values()} == {torch.bfloat16 if weights == "bf16" else torch.float32}
    if weights == "lora":
        start = FluxAdapter.from_model(load_config(None, base_overrides(model, data, tmp_path / "o", **extra))).make_controlnet(
            FluxTransformer2DModel.from_pretrained(model, subfolder="transformer")).state_dict()
        assert a.keys() == start.keys()  # the plain ControlNet's names: loads as any ControlNet
        changed = {k for k in a if not torch.equal(a[k], start[k])}
        assert "controlnet_blocks.0.weight" in changed and "transformer_blocks.0.attn.to_q.weight" in changed
        assert not any(k.endswith(".bias") or "norm" in k or "x_embedder.weight" == k for k in changed)  # frozen: only LoRA'd weights move
        assert (straight / CONTROLNET_LORA_FILE).is_file() and (straight / "checkpoint-2" / CONTROLNET_LORA_FILE).is_file()
        from peft.tuners.lora import LoraLayer

        from trainer.methods.controlnet import ControlNetMethod

        cfg = load_config(None, base_overrides(model, data, tmp_path / "o", **extra))  # peft's own merge of the saved LoRA
        adapter = FluxAdapter.from_model(cfg)
        net = adapter.make_controlnet(FluxTransformer2DModel.from_pretrained(model, subfolder="transformer"))
        method = ControlNetMethod(cfg, adapter)
        method.attach_lora(net)
        own, saved = dict(net.named_parameters()), load_file(str(straight / CONTROLNET_LORA_FILE))
        with torch.no_grad():
            for k, v in saved.items():
                own[k].copy_(v)
        for module in net.modules():
            if isinstance(module, LoraLayer):
                module.merge()
        merged = {k.replace(".base_layer.", "."): v for k, v in net.state_dict().items() if ".lora_" not in k}
        assert all(torch.allclose(merged[k], a[k], atol=1e-6) for k in a)
    if weights != "fp32":
        return
    # quantize: the ControlNet's blocks are copied from the model folder's (unquantized) weights
    from trainer.methods.controlnet import ControlNetMethod

    cfg = load_config(None, base_overrides(model, data, tmp_path / "q", quantize="qfloat8", **{**extra, "blocks_to_swap": 0}))
    adapter = FluxAdapter.from_model(cfg)
    adapter.load_transformer()
    method = ControlNetMethod(cfg, adapter)
    method.attach(adapter.transformer, adapter.placement)
    plain = FluxTransformer2DModel.from_pretrained(model, subfolder="transformer")
    block = method.controlnet.transformer_blocks[0].attn.to_q.weight
    assert torch.equal(block, plain.transformer_blocks[0].attn.to_q.weight.float())


def test_controlnet_setups_that_cannot_work_are_one_line(tiny_models, tmp_path):
    from trainer.models.chroma import ChromaAdapter

    flux, chroma = tiny_models("flux"), tiny_models("chroma")
    data = write_dataset(tmp_path / "t", n=1)
    ctrl = {"data_config.control_dir": str(data)}
    with pytest.raises(ConfigError, match="'training_method: controlnet': a ChromaPipeline model cannot train it"):
        ChromaAdapter.check_setup(load_config(None, base_overrides(chroma, data, tmp_path / "o", **CONTROLNET, **ctrl)))
    with pytest.raises(ConfigError, match="needs control images"):
        FluxAdapter.check_setup(load_config(None, base_overrides(flux, data, tmp_path / "o", **CONTROLNET)))
    with pytest.raises(ConfigError, match="'use_dora' does not apply to training_method: controlnet"):
        load_config(None, base_overrides(flux, data, tmp_path / "o", use_dora="true", **CONTROLNET))
    with pytest.raises(ConfigError, match="two ways of training control"):
        load_config(None, base_overrides(flux, data, tmp_path / "o", control_type="concat", **CONTROLNET))
    with pytest.raises(ConfigError, match="'full_weights: bf16' needs mixed_precision: bf16"):
        load_config(None, base_overrides(flux, data, tmp_path / "o", full_weights="bf16", **CONTROLNET))
    with pytest.raises(ConfigError, match="'lora_type' does not apply to training_method: controlnet"):
        load_config(None, base_overrides(flux, data, tmp_path / "o", controlnet_lora="true", lora_type="lokr", **CONTROLNET))
    with pytest.raises(ConfigError, match="with controlnet_lora the ControlNet is frozen"):
        load_config(None, base_overrides(flux, data, tmp_path / "o", controlnet_lora="true", full_weights="bf16", mixed_precision="bf16",
                                         **CONTROLNET))
    with pytest.raises(ConfigError, match="'controlnet_lora' applies to training_method: controlnet only"):
        load_config(None, base_overrides(flux, data, tmp_path / "o", controlnet_lora="true"))
    from trainer.methods.controlnet import ControlNetMethod

    def method(adapter_class, model, **extra):  # the checks a run makes before any model loads
        cfg = load_config(None, base_overrides(model, data, tmp_path / "o", **{**CONTROLNET, **ctrl, **extra}))
        return ControlNetMethod(cfg, adapter_class.from_model(cfg))

    with pytest.raises(ConfigError, match="'controlnet_modes': a QwenImageControlNetModel has no control modes"):
        method(QwenImageAdapter, tiny_models("qwen-image"), controlnet_modes=3).check_setup()
    with pytest.raises(ConfigError, match="'data_config.control_mode' is None: the ControlNet is a Union of 3 control modes"):
        method(FluxAdapter, flux, controlnet_modes=3).check_setup()
    with pytest.raises(ConfigError, match="'data_config.control_mode' is 3: the ControlNet is a Union of 3"):
        method(FluxAdapter, flux, controlnet_modes=3, **{"data_config.control_mode": 3}).check_setup()
    with pytest.raises(ConfigError, match="'data_config.control_mode' applies to a Union ControlNet: set controlnet_modes"):
        method(FluxAdapter, flux, **{"data_config.control_mode": 1}).check_setup()
    with pytest.raises(ConfigError, match="'data_config.control_mode' applies to a Union ControlNet \\(training_method: controlnet\\) only"):
        load_config(None, base_overrides(flux, data, tmp_path / "o", **{"data_config.control_mode": 1}))
    with pytest.raises(ConfigError, match="'controlnet_layers' applies to training_method: controlnet only"):
        load_config(None, base_overrides(flux, data, tmp_path / "o", controlnet_layers=2))
    saved = tmp_path / "saved-controlnet-pipeline"  # a FluxControlNetPipeline folder given to LoRA training
    saved.mkdir()
    (saved / "model_index.json").write_text('{"_class_name": "FluxControlNetPipeline"}')
    with pytest.raises(ConfigError, match="is a FluxControlNetPipeline folder: train its ControlNet with training_method: controlnet"):
        FluxAdapter.check_setup(load_config(None, base_overrides(saved, data, tmp_path / "o", **ctrl), check_paths=False))
    with pytest.raises(ConfigError, match="not a ControlNet folder"):
        load_config(None, base_overrides(flux, data, tmp_path / "o", controlnet_model_name_or_path=str(data), **CONTROLNET))


def test_inference_renders_with_a_controlnet(controlnet_run, tmp_path):
    model, data, out, _ = controlnet_run
    command = COMMANDS["controlnet"]  # the run's own "try it" line, with the previewed sample's mode
    assert command[:2] == ["python", "inference.py"] and "--controlnet" in command and "--control_image" in command
    assert command[command.index("--control_mode") + 1] in ("0", "2")
    args = [PY, "inference.py", "--model_name", str(model), "--controlnet", str(out), "--prompt", "x", "--num_inference_steps", "1"]
    r, wrong, modeless = run_each([[PY, *command[1:], "--num_inference_steps", "1", "--width", "64", "--height", "48", "--output_image",
                                    str(tmp_path / "o.png")], args + ["--controlnet", str(data), "--output_image", str(tmp_path / "no.png")],
                                   args + ["--control_image", str(data / "img0.png"), "--output_image", str(tmp_path / "no.png")]], workers=3)
    assert r.returncode == 0, r.stderr[-2000:]
    assert Image.open(tmp_path / "o.png").size == (64, 48)
    assert wrong.returncode == 2 and "--controlnet:" in wrong.stderr and "not a ControlNet folder" in wrong.stderr
    assert modeless.returncode == 2 and "--control_mode: this ControlNet is a Union of 3 control modes" in modeless.stderr


# family -> (its adapter, its ControlNet class and pipeline, the names of the saved weights, the pipeline's no-CFG call)
CONTROLNET_FAMILIES = {
    "z-image": (ZImageAdapter, "ZImageControlNetModel", "ZImageControlNetPipeline", ("control_",), {"guidance_scale": 0.0}),
    "qwen-image": (QwenImageAdapter, "QwenImageControlNetModel", "QwenImageControlNetPipeline",
                   ("transformer_blocks.", "controlnet_", "img_in", "txt_in", "txt_norm", "time_text_embed"), {"true_cfg_scale": 1.0}),
}


@pytest.mark.parametrize("family", list(CONTROLNET_FAMILIES))
def test_controlnet_of_another_family_trains_and_loads_in_its_pipeline(family, tiny_models, tmp_path):
    """A ControlNet of 2 blocks trains with previews, saves only its own weights (Z-Image's runs the transformer's
    embedders and refiners, which its pipeline lends it), is planned as trained, loads in the family's ControlNet
    pipeline (scale 0 = the base model, scale 1 is not), and trains beside a qfloat8 base with a swapped block."""
    import diffusers

    from trainer.methods.full import read_folder
    from trainer.models.base import InferenceRequest
    from trainer.pipelines import adapter_for, load_pipeline, output_images
    from utils.estimate_memory import build_transformer_on_meta, controlnet_params

    cls, net_class, pipe_class, prefixes, no_cfg = CONTROLNET_FAMILIES[family]
    model, data = tiny_models(family), write_dataset(tmp_path / "t", n=2)
    extra = {"training_method": "controlnet", "controlnet_layers": 2, "data_config.control_dir": str(write_dataset(tmp_path / "c", n=2, seed=2))}
    out = tmp_path / "out"
    cfg = load_config(None, base_overrides(model, data, out, max_train_steps=2, learning_rate=2e-2, validation_samples=1, validation_steps=2, **extra))
    train(cfg, cls)
    assert {p.name for p in (out / "samples").glob("step-*.png")} == {"step-0.png", "step-2.png"}
    saved = read_folder(out / "controlnet")
    assert saved and all(k.startswith(prefixes) for k in saved), sorted(saved)[:5]
    net = getattr(diffusers, net_class).from_pretrained(out / "controlnet")
    assert sum(p.numel() for p in net.parameters()) == sum(t.numel() for t in saved.values())
    planned = cls.from_model(cfg)
    assert controlnet_params(build_transformer_on_meta(planned)[0], planned) == (sum(t.numel() for t in saved.values()), 2)

    adapter = adapter_for(str(model), controlnet=True)
    control = Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype("uint8"))

    def render(pipe, scale):  # the arguments inference.py gives the pipeline (its ControlNet variant's)
        kwargs = adapter.inference_kwargs(InferenceRequest(prompt="a red square", images=[control], true_cfg_scale=1.0, conditioning_scale=scale))
        assert kwargs["control_image"] is control and kwargs["controlnet_conditioning_scale"] == scale and kwargs.items() >= no_cfg.items()
        image = pipe(prompt="a red square", width=64, height=64, num_inference_steps=2, generator=torch.Generator().manual_seed(0), **kwargs)
        return np.asarray(output_images(image)[0], dtype=np.float32)

    trained = load_pipeline(adapter, torch.float32, "cpu", controlnet=str(out))
    assert type(trained).__name__ == pipe_class
    base = render(load_pipeline(adapter, torch.float32, "cpu"), 1.0)  # a ControlNet as training starts it: zero outputs
    assert np.abs(render(trained, 0.0) - base).max() <= 1
    assert np.abs(render(trained, 1.0) - base).max() > 1
    lean = tmp_path / "lean"  # a qfloat8 base with a swapped block and checkpointing: the ControlNet copies the folder's weights
    train(load_config(None, base_overrides(model, data, lean, max_train_steps=2, quantize="qfloat8", blocks_to_swap=1,
                                           gradient_checkpointing=True, **extra)), cls)
    assert read_folder(lean / "controlnet").keys() == saved.keys() and np.isfinite(read_losses(lean)).all()
    if family == "z-image":
        assert net.config.control_layers_places == [0, 1]
        for key, value, message in (("controlnet_single_layers", 1, "one kind of block"), ("controlnet_layers", 3, "has 2 layers")):
            with pytest.raises(ConfigError, match=message):
                cls.check_setup(load_config(None, base_overrides(model, data, tmp_path / "o", **{**extra, key: value})))
        # a released-style 2.x ControlNet (control refiner blocks, control_in_dim 33) continues: its extra channels zero
        from bench.equivalence import z_image_controlnet_2x

        start = tmp_path / "2x"
        z_image_controlnet_2x(diffusers.ZImageTransformer2DModel.from_pretrained(model, subfolder="transformer")).save_pretrained(start)
        cont = tmp_path / "cont"
        train(load_config(None, base_overrides(model, data, cont, max_train_steps=1, controlnet_model_name_or_path=str(start), **extra)), cls)
        again = diffusers.ZImageControlNetModel.from_pretrained(cont / "controlnet")
        assert again.config.control_in_dim == 33 and again.config.control_refiner_layers_places == [0]
        before, after = read_folder(start), read_folder(cont / "controlnet")
        assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)


def test_qwen_image_in_context_lora_trains_on_a_swapped_quantized_base_and_renders_with_its_control(tiny_models, tmp_path):
    """control_type: in-context (DiffSynth's In-Context-Control-Union): a LoRA on Qwen-Image trained (qfloat8, a swapped
    block, previews with the control image) says what it is in its file; QwenImageInContextPipeline loads it with no
    unexpected keys and renders another picture for another control image; inference.py renders with --control_image
    (the run's own "try it" line), asks for one when missing, and `--in_context` runs a LoRA without our metadata
    (DiffSynth-Studio's). Its equivalence and learning cases: tests/test_equivalence.py, tests/test_learning.py."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from trainer.lora_format import VARIANT_KEY
    from trainer.models.qwen_image import QwenImageInContextPipeline
    from trainer.pipelines import adapter_for, load_pipeline, output_images

    model = tiny_models("qwen-image")
    data, controls = write_dataset(tmp_path / "t", n=2), write_dataset(tmp_path / "c", n=2, seed=2)
    out = tmp_path / "out"
    command = train_and_keep_command(load_config(None, base_overrides(
        model, data, out, max_train_steps=2, validation_samples=1, validation_steps=2, control_type="in-context", quantize="qfloat8",
        blocks_to_swap=1, learning_rate=0.05, **{"data_config.control_dir": str(controls)})), QwenImageAdapter)
    assert (out / "samples").is_dir() and any((out / "samples").iterdir())
    lora = out / "pytorch_lora_weights.safetensors"
    with safe_open(str(lora), framework="pt") as f:
        assert f.metadata()[VARIANT_KEY] == "qwen-image-in-context"
    adapter = adapter_for(str(model), str(lora))
    pipe = load_pipeline(adapter, torch.float32, "cpu", str(lora))  # load_lora refuses unexpected keys
    assert type(pipe) is QwenImageInContextPipeline
    renders = [output_images(pipe(prompt="x", context_image=Image.new("RGB", (64, 64), colour), width=64, height=64, num_inference_steps=2,
                                  true_cfg_scale=1.0, output_type="np", generator=torch.Generator().manual_seed(0)))[0]
               for colour in ("white", "black")]
    assert np.abs(renders[0] - renders[1]).max() > 1e-3  # the control image is read
    foreign = tmp_path / "diffsynth.safetensors"  # the same weights without our metadata, as another trainer's file
    save_file(load_file(str(lora)), str(foreign))
    control = tmp_path / "edges.png"
    Image.new("RGB", (64, 48), "white").save(control)
    assert "--control_image" in command
    args = [PY, "inference.py", "--model_name", str(model), "--prompt", "x", "--num_inference_steps", "1", "--width", "64", "--height", "48"]
    tried, missing, other = run_each([[PY, *command[1:], "--num_inference_steps", "1"],
                                      args + ["--lora_weights", str(lora), "--output_image", str(tmp_path / "no.png")],
                                      args + ["--lora_weights", str(foreign), "--in_context", "--control_image", str(control),
                                              "--output_image", str(tmp_path / "o.png")]], workers=3)
    assert tried.returncode == 0, tried.stderr[-2000:]
    assert missing.returncode == 2 and "--control_image: qwen-image-in-context models follow a control image" in missing.stderr
    assert other.returncode == 0, other.stderr[-2000:]
    assert Image.open(tmp_path / "o.png").size == (64, 48)
