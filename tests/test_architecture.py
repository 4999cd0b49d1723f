"""The family registry and the loop's pieces: a new family plugs in with new files only; one step runs alone."""

import json
import os
import subprocess
import textwrap

import numpy as np
import pytest
import torch
from diffusers import QwenImagePipeline
from helpers import PY, ROOT, base_overrides, write_dataset
from PIL import Image

from trainer.config import load_config
from trainer.loop import setup, train_step
from trainer.models import lookup, resolve, variants
from trainer.models.qwen_image import QwenImageAdapter, QwenImageEditAdapter

TWIN_FAMILY = '''
"""A throwaway family: Qwen-Image's adapter registered for another pipeline class (img2img shares its components)."""
from trainer.models import register
from trainer.models.base import Variant
from trainer.models.qwen_image import QwenImageAdapter


@register
class TwinAdapter(QwenImageAdapter):
    family = "twin"
    entry = "train_twin.py"
    variants = (Variant("twin", "QwenImageImg2ImgPipeline", (0, 1)),)  # inference takes an init image
'''

TWIN_ENTRY = '''
import sys

from trainer.cli import main

if __name__ == "__main__":
    sys.exit(main("twin_family:TwinAdapter", "Twin LoRA training"))
'''


def test_registry_maps_every_pipeline_to_its_adapter():
    assert lookup("QwenImagePipeline")[0] is QwenImageAdapter
    assert lookup("QwenImageEditPlusPipeline")[0] is QwenImageEditAdapter
    assert lookup("QwenImageEditPlusPipeline")[1].references == (1, 3)
    assert lookup("NoSuchPipeline") is None
    names = variants()
    assert {"qwen-image", "qwen-image-edit", "qwen-image-edit-plus", "flux", "flux-kontext"} <= set(names)
    for name, (cls, variant) in names.items():
        assert cls.entry and (ROOT / cls.entry).is_file(), name
        found = lookup(variant.pipeline)
        # a control trained on its base model's own folder (Qwen-Image in-context control) resolves to the base variant
        assert found[0] is cls and (found[1] == variant or variant.pipeline in variant.starts_from), name


def test_a_new_family_needs_only_new_files(tiny_qwen, tmp_path):
    """Family file + entry script (+ its model): trains under the entry, and inference.py finds it via the registry."""
    plugin = tmp_path / "plugin"
    plugin.mkdir()
    (plugin / "twin_family.py").write_text(textwrap.dedent(TWIN_FAMILY))
    (plugin / "train_twin.py").write_text(textwrap.dedent(TWIN_ENTRY))
    model = tmp_path / "twin-model"
    QwenImagePipeline.from_pretrained(tiny_qwen).save_pretrained(model)
    index = json.loads((model / "model_index.json").read_text())
    (model / "model_index.json").write_text(json.dumps({**index, "_class_name": "QwenImageImg2ImgPipeline"}))
    data = write_dataset(tmp_path / "data", n=2)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(plugin), "TRAINER_FAMILIES": "twin_family"}
    r = subprocess.run([PY, str(plugin / "train_twin.py"), "--config", str(ROOT / "train_configs/train_lora.yaml"),
                        *base_overrides(model, data, out, max_train_steps=2)], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "loading twin" in r.stderr and (out / "pytorch_lora_weights.safetensors").is_file()
    # the wrong entry for this model names the right one, through the registry
    r = subprocess.run([PY, "train.py", "--config", "train_configs/train_lora.yaml", *base_overrides(model, data, out)],
                       cwd=ROOT, capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "train_twin.py" in r.stderr
    image = tmp_path / "twin.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "init.png")
    r = subprocess.run([PY, "inference.py", "--model_name", str(model), "--lora_weights", str(out), "--prompt", "a photo",
                        "--image", str(tmp_path / "init.png"), "--width", "32", "--height", "32", "--num_inference_steps", "4",
                        "--output_image", str(image)], cwd=ROOT, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "twin: wrote" in r.stdout and Image.open(image).size == (32, 32)
    assert resolve(str(tiny_qwen))[0] is QwenImageAdapter


def test_one_training_step_runs_alone(tiny_qwen, tmp_path):
    data = write_dataset(tmp_path / "d", n=4)
    cfg = load_config(None, base_overrides(tiny_qwen, data, tmp_path / "out", gradient_accumulation_steps=2,
                                           **{"data_config.train_batch_size": 2}))
    run = setup(cfg, QwenImageAdapter)
    before = [p.detach().clone() for p in run.params]
    batches = iter(run.loader)
    assert train_step(run, next(batches)) is None, "first of two accumulated micro-batches: no update yet"
    assert all(torch.equal(a, b) for a, b in zip(before, run.params))
    update = train_step(run, next(batches))
    assert update is not None and update.finite and np.isfinite(update.loss.item())
    assert update.grad_norm.item() > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, run.params)), "the optimizer stepped"
    assert all(p.grad is None for p in run.params), "gradients are released after the update"


def test_nonfinite_update_is_skipped_by_the_step(tiny_qwen, tmp_path):
    data = write_dataset(tmp_path / "d", n=2)
    run = setup(load_config(None, base_overrides(tiny_qwen, data, tmp_path / "out")), QwenImageAdapter)
    before = [p.detach().clone() for p in run.params]
    predict = run.adapter.predict
    run.adapter.predict = lambda *a: predict(*a) * float("nan")
    update = train_step(run, next(iter(run.loader)))
    assert update is not None and not update.finite
    assert all(torch.equal(a, b) for a, b in zip(before, run.params))


@pytest.mark.parametrize("key", ["wandb_run_name", "wandb_entity"])
def test_wandb_keys_reach_the_tracker(key, tmp_path):
    from trainer.loop import tracker_kwargs

    cfg = load_config(None, [f"{key}=x", "wandb_tags=[a,b]"], check_paths=False)
    kw = tracker_kwargs(cfg)["wandb"]
    assert kw[{"wandb_run_name": "name", "wandb_entity": "entity"}[key]] == "x" and kw["tags"] == ["a", "b"]


def import_graph(packages=("trainer", "image_datasets")) -> dict[str, set[str]]:
    """module -> the project modules it imports (at the top or inside functions); a package's __init__ importing its
    own submodules is not an edge (it is how a package exposes its parts)."""
    import ast

    mods = {}
    for pkg in packages:
        for f in (ROOT / pkg).rglob("*.py"):
            name = ".".join(f.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            mods[name] = f
    graph = {}
    for name, f in mods.items():
        package = name if f.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]) if node.level else ""
                mod = ".".join(p for p in (base, node.module) if p)
                subs = {f"{mod}.{a.name}" for a in node.names} & set(mods)
                found |= subs or {mod}
        graph[name] = {d for d in found if d in mods and d != name and not (f.name == "__init__.py" and d.startswith(name + "."))}
    return graph


def test_imports_run_one_way():
    """No import circle among the trainer's and the data package's modules, and the data package never imports the
    trainer (the config reads the data package's constants, never the other way round)."""
    graph = import_graph()
    assert len(graph) > 30 and graph["trainer.loop"], "the import graph was not read"
    circles, state = [], {}

    def visit(m, path):
        state[m] = "open"
        for d in sorted(graph[m]):
            if state.get(d) == "open":
                circles.append(path[path.index(d):] + [d])
            elif d not in state:
                visit(d, path + [d])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not circles, "import circles: " + "; ".join(" -> ".join(c) for c in circles)
    upward = sorted(f"{m} -> {d}" for m, ds in graph.items() if m.startswith("image_datasets") for d in ds if d.startswith("trainer"))
    assert not upward, upward
