"""Several datasets in one run (data_config.datasets): each entry's own data and settings, weights that set each
dataset's share of an epoch, loss weights (prior preservation), batches of one size, exact resume."""

from collections import Counter

import pytest
from helpers import base_overrides, write_dataset
from safetensors.torch import load_file

from image_datasets import SizeGroupedBatchSampler
from trainer.config import ConfigError, load_config
from trainer.data import scan_for_training
from trainer.loop import TrainingError, train
from trainer.models import resolve


def two_datasets(tmp_path):
    a = write_dataset(tmp_path / "a", n=4, captions=[f"red thing {i}" for i in range(4)])
    b = write_dataset(tmp_path / "b", n=2, size=(96, 64), seed=1, captions=["a dog", "a cat"])
    return a, b


def entries(a, b, **extra):
    more = "".join(f", {k}: {v}" for k, v in extra.items())
    return f"data_config.datasets=[{{img_dir: {a}, trigger_word: sks}}, {{img_dir: {b}, caption_template: 'a photo, {{caption}}', repeats: 2{more}}}]"


def test_entries_inherit_and_scan_with_their_own_settings(tiny_qwen, tmp_path):
    a, b = two_datasets(tmp_path)
    overrides = [o for o in base_overrides(tiny_qwen, a, tmp_path / "o") if not o.startswith("data_config.img_dir")]
    cfg = load_config(None, overrides + [entries(a, b, loss_weight=0.5)])
    parts = cfg.data_config.parts()
    assert [p.img_dir for p in parts] == [str(a), str(b)] and all(p.img_size == 64 for p in parts)
    cls, variant = resolve(str(tiny_qwen))
    scan = scan_for_training(cfg, cls(cfg, variant))
    assert not scan.problems
    by = Counter((s.dataset, s.loss_weight, s.size) for s in scan.samples)
    assert by == {(0, 1.0, (64, 64)): 4, (1, 0.5, (64, 48)): 4}  # dataset 1: two images, repeats 2
    captions = {s.caption for s in scan.samples}
    assert "sks, red thing 0" in captions and "a photo, a dog" in captions


def test_weights_set_each_datasets_share_of_an_epoch():
    groups = [(64, 64)] * 12 + [(96, 64)] * 4
    sampler = SizeGroupedBatchSampler(groups, 2, seed=0, shares=[1, 3], datasets=[0] * 12 + [1] * 4)
    used = Counter()
    for epoch in range(8):
        batches = sampler.epoch_batches(epoch)
        assert len(batches) == len(sampler), "every epoch has the same length"
        for batch in batches:
            assert len({groups[i] for i in batch}) == 1, "a batch mixes sizes"
            used.update("b" if i >= 12 else "a" for i in batch)
    assert used["b"] / (used["a"] + used["b"]) == pytest.approx(0.75, abs=0.02)
    assert sampler.epoch_batches(3) == SizeGroupedBatchSampler(groups, 2, 0, shares=[1, 3], datasets=[0] * 12 + [1] * 4).epoch_batches(3)


def test_weighted_datasets_resume_exactly(tiny_qwen, tmp_path):
    a, b = two_datasets(tmp_path)
    cls = resolve(str(tiny_qwen))[0]
    weighted = entries(a, b, weight=3).replace("trigger_word: sks}", "trigger_word: sks, weight: 1}")

    def run(out, steps, **extra):
        overrides = base_overrides(tiny_qwen, a, out, max_train_steps=steps, checkpointing_steps=2, **{"data_config.train_batch_size": 2}, **extra)
        train(load_config(None, [o for o in overrides if not o.startswith("data_config.img_dir")] + [weighted]), cls)
        return load_file(out / "pytorch_lora_weights.safetensors")

    whole = run(tmp_path / "whole", 4)
    run(tmp_path / "part", 2)
    resumed = run(tmp_path / "part", 4, resume_from_checkpoint="latest")
    assert all((whole[k] == resumed[k]).all() for k in whole)


def test_loss_weight_reaches_the_gradient(tiny_qwen, tmp_path):
    """Every dataset at loss_weight 0: no gradient anywhere, and the no-op guard stops the run."""
    a, b = two_datasets(tmp_path)
    overrides = [o for o in base_overrides(tiny_qwen, a, tmp_path / "o", max_train_steps=2) if not o.startswith("data_config.img_dir")]
    cfg = load_config(None, overrides + [entries(a, b, loss_weight=0).replace("trigger_word: sks}", "trigger_word: sks, loss_weight: 0}")])
    with pytest.raises(TrainingError, match="would do nothing"):
        train(cfg, resolve(str(tiny_qwen))[0])


@pytest.mark.parametrize("overrides, message", [
    (["data_config.img_dir=x", "data_config.datasets=[{img_dir: y}]"], "config key 'data_config.img_dir' is set beside data_config.datasets"),
    (["data_config.datasets=[{img_dir: y, weight: 1}, {img_dir: z}]"], "config key 'data_config.datasets[*].weight' is set on some entries only"),
    (["data_config.datasets=[{img_dir: y}, {img_dir: z, repeats: 0}]"], "config key 'data_config.datasets[1].repeats' must be >= 1"),
    (["data_config.datasets=[{imgdir: y}]"], "unknown config key 'data_config.datasets[].imgdir'; did you mean 'data_config.datasets[].img_dir'?"),
    (["data_config.datasets=[{img_dir: y, weight: -1}]"], "config key 'data_config.datasets[0].weight' must be > 0"),
])
def test_dataset_entries_that_cannot_work_are_one_line(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides, check_paths=False)
    assert str(e.value).startswith(message)


def test_shipped_character_yaml_and_its_dataset_check(tiny_qwen, tmp_path):
    """train_lora_character.yaml loads as written, and validate_dataset --config checks both of its datasets."""
    import subprocess

    from helpers import PY, ROOT

    yaml = ROOT / "train_configs" / "train_lora_character.yaml"
    cfg = load_config(yaml, check_paths=False)
    assert [p.trigger_word for p in cfg.data_config.parts()] == ["sks", ""] and cfg.data_config.loss_weights() == [1.0, 0.5]
    assert cfg.dop_class_word == "person" and cfg.precompute_text_embeddings is False and cfg.rank_pattern
    a, b = two_datasets(tmp_path)
    r = subprocess.run([PY, str(ROOT / "utils/validate_dataset.py"), "--config", str(yaml), f"pretrained_model_name_or_path={tiny_qwen}",
                        f"output_dir={tmp_path / 'o'}", "data_config.img_size=64",
                        f"data_config.datasets=[{{img_dir: {a}, trigger_word: sks, weight: 3}}, {{img_dir: {b}, weight: 1, loss_weight: 0.5}}]"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "6 usable sample(s)" in r.stdout and "caption of img0.png: 'sks, red thing 0'" in r.stdout
