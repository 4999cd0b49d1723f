"""Caption handling: trigger word, template, tag shuffling, a caption column of its own; each reaches the trained text."""

import random

import pytest
from helpers import base_overrides, write_dataset

from image_datasets import CaptionDataset, scan_dataset
from image_datasets.captions import CaptionRule
from trainer.config import ConfigError, DataConfig, load_config
from trainer.loop import train
from trainer.models import resolve


def test_trigger_word_and_template():
    assert CaptionRule("sks").finish("a dog on grass") == "sks, a dog on grass"
    assert CaptionRule("sks").finish("photo of sks dog") == "photo of sks dog"  # already named: left as it is
    assert CaptionRule("sks").finish("a [trigger] dog") == "a sks dog"
    assert CaptionRule("sks").finish("sksx dog") == "sks, sksx dog"  # sksx is another word
    assert CaptionRule("sks").finish("") == "sks"
    assert CaptionRule("sks", "a photo of {trigger}, {caption}").finish("red  hat") == "a photo of sks, red hat"
    assert CaptionRule("", "{trigger} {caption}").finish("red hat") == "red hat"
    assert CaptionRule().finish("  plain   caption ") == "plain caption"


def test_tag_shuffling_keeps_the_leading_tags_and_changes_per_epoch():
    rule = CaptionRule(shuffle=True, keep_tags=1)
    caption = "sks, red, green, blue, black, white, tall"
    orders = {rule.shuffled(caption, random.Random(seed)) for seed in range(20)}
    assert len(orders) > 5 and all(o.startswith("sks, ") for o in orders)
    assert all(sorted(o.split(", ")) == sorted(caption.split(", ")) for o in orders)
    assert CaptionRule().shuffled(caption, random.Random(0)) == caption


def test_dataset_trains_the_finished_and_shuffled_captions(tmp_path):
    folder = write_dataset(tmp_path / "d", n=2, captions=["red, round, small, shiny, old", "blue, square, big, dull, new"])
    d = DataConfig(img_dir=str(folder), img_size=64, trigger_word="sks", shuffle_tags=True, keep_tags=1)
    samples = scan_dataset(d).samples
    assert samples[0].caption == "sks, red, round, small, shiny, old"
    dataset = CaptionDataset(samples, load_pixels=False, captions=CaptionRule.of(d))
    epochs = [dataset[(0, e)]["caption"] for e in range(8)]
    assert len(set(epochs)) > 1 and all(c.startswith("sks, ") for c in epochs)
    assert dataset[(0, 3)]["caption"] == epochs[3], "an epoch's caption is a pure function of (seed, epoch, index)"


def test_metadata_caption_column(tmp_path):
    folder = write_dataset(tmp_path / "d", n=2)
    (tmp_path / "m.jsonl").write_text("\n".join(f'{{"image": "d/img{i}.png", "text": "caption {i}", "prompt": "wrong"}}' for i in range(2)))
    d = DataConfig(metadata_file=str(tmp_path / "m.jsonl"), img_size=64, caption_column="text")
    assert [s.caption for s in scan_dataset(d).samples] == ["caption 0", "caption 1"]
    assert folder.is_dir()


@pytest.mark.parametrize("overrides, message", [
    (["data_config.caption_template=no caption"], "config key 'data_config.caption_template': 'no caption' has no {caption}"),
    (["data_config.caption_template='{caption} {tigger}'"], "config key 'data_config.caption_template': '{caption} {tigger}' has the field {tigger}"),
    (["data_config.keep_tags=2"], "config key 'data_config.keep_tags' is 2; it counts tags kept in place by shuffle_tags: true"),
    (["data_config.shuffle_tags=true", "precompute_text_embeddings=true"], "config key 'precompute_text_embeddings: true' caches one embedding per caption"),
])
def test_caption_keys_that_cannot_work_are_one_line(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides, check_paths=False)
    assert str(e.value).startswith(message)


def test_shuffled_tags_train_with_the_text_encoder_loaded(tiny_qwen, tmp_path):
    """shuffle_tags leaves prompt embeddings uncached (each epoch is another caption) and the run trains."""
    data = write_dataset(tmp_path / "d", n=2, captions=["red, round, small", "blue, square, big"])
    cfg = load_config(None, base_overrides(tiny_qwen, data, tmp_path / "o", max_train_steps=2, **{
        "data_config.shuffle_tags": "true", "data_config.trigger_word": "sks"}))
    assert cfg.precompute_text_embeddings is False
    train(cfg, resolve(str(tiny_qwen))[0])
    assert (tmp_path / "o" / "pytorch_lora_weights.safetensors").is_file()
