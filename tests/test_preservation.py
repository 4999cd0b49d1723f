"""Differential output preservation (dop_class_word): the class-word captions' prediction is pulled toward the base
model's. The term is exactly zero while the LoRA does nothing, positive once it has trained, reaches the gradient,
and is logged; a caption without the trigger word adds nothing."""

import json

import torch
from helpers import base_overrides, write_dataset

import trainer.flow_matching as fm
from trainer.config import load_config
from trainer.loop import class_captions, preservation_loss, setup, train, train_step
from trainer.models import resolve

DOP = {"data_config.trigger_word": "sks", "dop_class_word": "person", "learning_rate": 0.05}


def term(run, batch):
    latents, cond = run.encode(batch)
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(0))
    sigmas = torch.full((latents.shape[0],), 0.6)
    return preservation_loss(run, fm.add_noise(latents, noise, sigmas), sigmas, cond, batch)


def test_dop_term_is_zero_untrained_then_positive(tiny_qwen, tmp_path):
    data = write_dataset(tmp_path / "d", n=2, captions=["a photo of sks smiling", "sks, outdoors"])
    cfg = load_config(None, base_overrides(tiny_qwen, data, tmp_path / "o", **DOP, **{"data_config.train_batch_size": 2}))
    run = setup(cfg, resolve(str(tiny_qwen))[0])
    batch = next(iter(run.loader))
    captions, has = class_captions(run, batch)
    assert sorted(captions) == ["a photo of person smiling", "person, outdoors"] and has.tolist() == [1.0, 1.0]
    assert term(run, batch).item() == 0.0, "an untrained LoRA predicts as the base model"
    for _ in range(3):
        update = train_step(run, batch)
        assert update.finite and update.extras["dop_loss"].item() >= 0
    after = term(run, batch)
    assert after.item() > 0
    after.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in run.params), "the term reaches the LoRA's gradient"


def test_captions_without_the_trigger_add_nothing_and_the_term_is_logged(tiny_qwen, tmp_path):
    data = write_dataset(tmp_path / "d", n=2, captions=["a photo of sksx", "no trigger here"])
    cfg = load_config(None, base_overrides(tiny_qwen, data, tmp_path / "o", max_train_steps=2, **DOP, **{
        "data_config.train_batch_size": 2, "data_config.caption_template": "'{caption}'"}))  # a template without the trigger
    assert cfg.precompute_text_embeddings is False
    run = setup(cfg, resolve(str(tiny_qwen))[0])
    batch = next(iter(run.loader))
    assert class_captions(run, batch)[1].tolist() == [0.0, 0.0]  # "sksx" is another word
    assert term(run, batch).item() == 0.0
    data2 = write_dataset(tmp_path / "d2", n=2, captions=["sks", "sks dog"])
    train(load_config(None, base_overrides(tiny_qwen, data2, tmp_path / "o2", max_train_steps=2, **DOP)), resolve(str(tiny_qwen))[0])
    lines = [json.loads(line) for line in (tmp_path / "o2" / "train_log.jsonl").read_text().splitlines()]
    assert lines[0]["dop_loss"] == 0.0 and lines[1]["dop_loss"] > 0
