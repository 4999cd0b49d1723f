"""FSDP2 through accelerate on CPU processes (gloo): real sharding, LoRA and full training equal to one process at the
same global batch, exact resume from sharded checkpoints, the consolidated export; two "machines" on localhost."""

import json
import os
import socket
import subprocess

import pytest
import torch
from helpers import ACCELERATE, ROOT, base_overrides, read_losses, write_dataset
from safetensors.torch import load_file

from trainer.config import load_config
from trainer.loop import train
from trainer.methods.full import read_folder
from trainer.models.qwen_image import QwenImageAdapter

CPU = {**os.environ, "ACCELERATE_USE_CPU": "true"}
FSDP = [ACCELERATE[0], "launch", "--config_file", "accelerate_configs/fsdp.yaml", "--num_processes", "2"]
YAML = ROOT / "train_configs/train_lora.yaml"
TRAIN = ["train.py", "--config", str(YAML)]  # the launched runs and the in-process references read the same file

PROBE = """
import json, sys
from trainer.config import load_config
from trainer.loop import setup
from trainer.models.qwen_image import QwenImageAdapter
run = setup(load_config(None, sys.argv[2:]), QwenImageAdapter)
model = run.accelerator.unwrap_model(run.transformer)
shapes = {n: [p.to_local().numel(), p.numel(), type(p).__name__] for n, p in model.named_parameters() if n.startswith("transformer_blocks.")}
json.dump({"type": run.accelerator.distributed_type.name, "params": shapes}, open(f"{sys.argv[1]}/rank{run.accelerator.process_index}.json", "w"))
"""


def launch(cmd, env=CPU, timeout=300):
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("dist") / "d", n=4)


@pytest.fixture(scope="module")
def one_process(tiny_qwen, data, tmp_path_factory):
    """The reference: one process at batch 2 (= 2 processes at batch 1), 4 steps."""
    out = tmp_path_factory.mktemp("one") / "o"
    train(load_config(YAML, base_overrides(tiny_qwen, data, out, max_train_steps=4, learning_rate=1e-2,
                                           **{"data_config.train_batch_size": 2})), QwenImageAdapter)
    return out


def test_fsdp2_shards_every_block_across_cpu_processes(tiny_qwen, data, tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    launch(FSDP + [str(probe), str(tmp_path)] + base_overrides(tiny_qwen, data, tmp_path / "o", max_train_steps=1))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["type"] == "FSDP" for r in ranks)
    for name, (local0, whole, kind) in ranks[0]["params"].items():
        local1 = ranks[1]["params"][name][0]
        assert kind == "DTensor" and local0 + local1 == whole, name  # each rank holds its part, together the whole
        if whole >= 4:
            assert 0 < local0 < whole and 0 < local1 < whole, f"{name} is not sharded ({local0}, {local1} of {whole})"


def test_fsdp2_lora_equals_one_process_and_resumes_exactly(tiny_qwen, data, one_process, tmp_path):
    common = dict(learning_rate=1e-2, checkpointing_steps=2, **{"data_config.train_batch_size": 1})
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    r = launch(FSDP + TRAIN + base_overrides(tiny_qwen, data, straight, max_train_steps=4, **common))
    assert "FSDP2 on 2 CPU processes" in r.stderr and "one shard group per QwenImageTransformerBlock" in r.stderr
    assert (straight / "checkpoint-2" / "sharded" / ".metadata").is_file()
    launch(FSDP + TRAIN + base_overrides(tiny_qwen, data, resumed, max_train_steps=2, **common))
    launch(FSDP + TRAIN + base_overrides(tiny_qwen, data, resumed, max_train_steps=4, resume_from_checkpoint="latest", **common))
    a, b = load_file(straight / "pytorch_lora_weights.safetensors"), load_file(resumed / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "resume from the sharded checkpoint is exact"
    ref = load_file(one_process / "pytorch_lora_weights.safetensors")
    assert max((a[k] - ref[k]).abs().max().item() for k in a) < 1e-5, "2 sharded processes at batch 1 = 1 process at batch 2"
    assert read_losses(straight) == pytest.approx(read_losses(one_process), abs=1e-5)
    mixed = subprocess.run(ACCELERATE + TRAIN + base_overrides(tiny_qwen, data, resumed, max_train_steps=6, **common,
                                                                        resume_from_checkpoint="latest"),
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert mixed.returncode != 0 and "was written by a FSDP run, this one is plain" in mixed.stderr and "loading" not in mixed.stderr


FULL_YAML = ROOT / "train_configs/train_full_qwen_image.yaml"  # the shipped full fine-tuning YAML, as its header runs it


def test_fsdp2_full_training_consolidates_what_one_process_trains(tiny_qwen, data, tmp_path):
    common = dict(max_train_steps=3, learning_rate=1e-3, checkpointing_steps=0, optimizer="adamw", lr_warmup_steps=0,
                  **{"data_config.num_workers": 0})
    sharded = tmp_path / "sharded"
    launch(FSDP + ["train_full_qwen_image.py", "--config", str(FULL_YAML)]
           + base_overrides(tiny_qwen, data, sharded, **common, **{"data_config.train_batch_size": 1}))
    one = tmp_path / "one"
    train(load_config(FULL_YAML, base_overrides(tiny_qwen, data, one, **common, **{"data_config.train_batch_size": 2})), QwenImageAdapter)
    a, b = read_folder(sharded / "transformer"), read_folder(one / "transformer")
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    assert json.loads((sharded / "transformer" / "config.json").read_text())["_class_name"] == "QwenImageTransformer2DModel"


@pytest.mark.parametrize("entry, extra, message", [
    (TRAIN, {"quantize": "nf4"}, "cannot shard quantized ones"),
    # bitsandbytes' 8-bit AdamW cannot step DTensors: the shipped full YAML (adamw8bit) and FlyMyAI's alias are refused
    (["train_full_qwen_image.py", "--config", str(FULL_YAML)], {}, "config key 'optimizer' selects adamw8bit.*add optimizer=adamw"),
    (TRAIN, {"use_8bit_adam": "true"}, "config key 'use_8bit_adam' selects adamw8bit.*add use_8bit_adam=false optimizer=adamw"),
])
def test_fsdp2_refuses_what_it_cannot_shard_before_the_model_loads(tiny_qwen, data, tmp_path, entry, extra, message):
    import re

    r = subprocess.run(FSDP + entry + base_overrides(tiny_qwen, data, tmp_path / "o", **extra), cwd=ROOT,
                       capture_output=True, text=True, timeout=300, env=CPU)
    assert r.returncode != 0 and re.search(message, r.stderr) and "Loading" not in r.stderr, r.stderr[-2000:]


def test_two_machines_on_localhost_train_one_model(tiny_qwen, data, one_process, tmp_path):
    """Two `accelerate launch` invocations, machine_rank 0 and 1, one process each, rendezvous on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "o"
    procs = []
    for rank in (0, 1):
        cmd = [ACCELERATE[0], "launch", "--multi_gpu", "--num_machines", "2", "--machine_rank", str(rank), "--num_processes", "2",
               "--main_process_ip", "127.0.0.1", "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no",
               *TRAIN] + base_overrides(tiny_qwen, data, out, max_train_steps=4, learning_rate=1e-2, **{"data_config.train_batch_size": 1})
        procs.append(subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=CPU))
    results = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), results[0][1][-2000:] + results[1][1][-2000:]
    assert "x 2 process(es)" in results[0][1]
    a, ref = load_file(out / "pytorch_lora_weights.safetensors"), load_file(one_process / "pytorch_lora_weights.safetensors")
    assert max((a[k] - ref[k]).abs().max().item() for k in a) < 1e-5
    assert len(read_losses(out)) == 4, "one log, written by the global main process"


def test_deepspeed_on_cpu_processes_is_refused_not_silently_data_parallel(tiny_qwen, data, tmp_path):
    """accelerate turns a DeepSpeed launch on CPU processes into plain data parallelism; the trainer says so and stops.
    (DeepSpeed itself is tested on a GPU: tests/test_cuda.py.)"""
    cmd = [ACCELERATE[0], "launch", "--config_file", "accelerate_configs/deepspeed_zero2.yaml", *TRAIN] + base_overrides(tiny_qwen, data, tmp_path / "o")
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=CPU)
    assert r.returncode != 0 and "asks for DeepSpeed, but these are CPU processes" in r.stderr
