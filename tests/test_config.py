import subprocess
import time

import pytest
from helpers import PY, ROOT

from trainer.config import ConfigError, TrainConfig, describe_keys, load_config

FLYMYAI_TRAIN_LORA = """\
pretrained_model_name_or_path: {model}
data_config:
  train_batch_size: 1
  num_workers: 4
  img_size: 1024
  caption_dropout_rate: 0.1
  img_dir: {data}
  random_ratio: false
  caption_type: txt
report_to: wandb
wandb_project_name: qwen-lora-training
wandb_run_name: lora-run
wandb_entity: null
wandb_tags: ["lora", "qwen"]
train_batch_size: 1
output_dir: ./test_lora_saves
max_train_steps: 3000
learning_rate: 3e-4
lr_scheduler: constant
lr_warmup_steps: 10
adam_beta1: 0.9
adam_beta2: 0.999
adam_weight_decay: 0.01
adam_epsilon: 1e-8
max_grad_norm: 1.0
logging_dir: logs
mixed_precision: "bf16"
checkpointing_steps: 250
checkpoints_total_limit: 10
tracker_project_name: lora_test
resume_from_checkpoint: latest
gradient_accumulation_steps: 1
rank: 16
"""


@pytest.fixture
def yaml_file(tmp_path, tiny_qwen, dataset):
    p = tmp_path / "cfg.yaml"
    p.write_text(FLYMYAI_TRAIN_LORA.format(model=tiny_qwen, data=dataset))
    return p


def test_flymyai_yaml_loads_unchanged(yaml_file):
    cfg = load_config(yaml_file)
    assert isinstance(cfg, TrainConfig)
    assert cfg.learning_rate == pytest.approx(3e-4)  # "3e-4" is a string to YAML 1.1; the schema converts it
    assert cfg.adam_epsilon == pytest.approx(1e-8)
    assert cfg.data_config.caption_dropout_rate == 0.1 and cfg.resume_from_checkpoint == "latest"


@pytest.mark.parametrize(
    "override, needle",
    [
        ("rnak=4", "unknown config key 'rnak'"),
        ("data_config.img_dri=x", "unknown config key 'data_config.img_dri'"),
        ("rank=sixteen", "config key 'rank'"),
        ("learning_rate=-0.001", "'learning_rate' must be > 0"),
        ("data_config.img_size=500", "'data_config.img_size' must be a multiple of 16"),
        ("data_config.img_dir=/does/not/exist", "'data_config.img_dir'"),
        ("pretrained_model_name_or_path=/no/such/model", "'pretrained_model_name_or_path'"),
        ("mixed_precision=fp8", "'mixed_precision'"),
        ("data_config.caption_dropout_rate=1.5", "'data_config.caption_dropout_rate'"),
        ("train_batch_size=4", "disagrees"),
    ],
)
def test_bad_keys_name_the_key(yaml_file, override, needle):
    if override == "train_batch_size=4":
        override = ["train_batch_size=4", "data_config.train_batch_size=2"]
    with pytest.raises(ConfigError) as e:
        load_config(yaml_file, override if isinstance(override, list) else [override])
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_offline_hub_id_not_cached_says_what_to_do(yaml_file, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_cache"))
    with pytest.raises(ConfigError) as e:
        load_config(yaml_file, ["pretrained_model_name_or_path=Someone/NotCached"])
    assert "hf download Someone/NotCached" in str(e.value)


def test_every_key_documented():
    lines = describe_keys()
    assert any(line.strip().startswith("data_config.img_dir") for line in lines)
    assert all(line.split(": ", 1)[1].strip() for line in lines), "a key without a doc line"


def test_cli_rejects_unknown_key_fast_before_model_load(yaml_file):
    t = time.time()
    r = subprocess.run([PY, "train.py", "--config", str(yaml_file), "max_train_step=5"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip() == ("error: unknown config key 'max_train_step'; did you mean 'max_train_steps'? "
                                "(see `python train.py --help` for the valid keys)")
    assert "loading" not in r.stdout + r.stderr
    assert time.time() - t < 20


def test_cli_help_lists_keys():
    r = subprocess.run([PY, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0
    for key in ("data_config.caption_dropout_rate", "timestep_sampling", "lora_target_modules", "resume_from_checkpoint"):
        assert key in r.stdout
