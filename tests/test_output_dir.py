"""A run never loses or mislabels a result: the output folder belongs to one run (marker, lock, ownership of
checkpoints), resume says what it does, and loading a checkpoint never runs code."""

import json
import os
import pickle
import shutil
import signal
import subprocess
import time

import pytest
import torch
from helpers import PY, ROOT, base_overrides, write_dataset
from safetensors.torch import load_file

from trainer import output_dir
from trainer.config import ConfigError, load_config
from trainer.loop import train
from trainer.models.qwen_image import QwenImageAdapter
from trainer.safe_load import DEEPSPEED_ALLOWED, UnsafeCheckpoint, check_pickles, dcp_load, dcp_reader


class Payload:
    """Unpickling this creates a file: the proof that a loader ran code."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (shutil.copyfile, (__file__, self.target))


def _train(model, data, out, **extra):
    return train(load_config(None, base_overrides(model, data, out, **extra)), QwenImageAdapter)


def _lora(path):
    return load_file(str(path))


def test_fresh_run_refuses_an_earlier_runs_folder_and_overwrite_replaces_it(tiny_qwen, dataset, tmp_path):
    out = tmp_path / "out"
    _train(tiny_qwen, dataset, out, max_train_steps=2, checkpointing_steps=1, seed=1)
    first = output_dir.read_marker(out)["run_id"]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert output_dir.owner_id(out / "checkpoint-2") == first
    # a fresh run (another seed) in the same folder: refused, naming the choices, and nothing was touched
    with pytest.raises(ConfigError, match="holds the results of run .*resume_from_checkpoint=latest.*overwrite_output_dir=true"):
        _train(tiny_qwen, dataset, out, max_train_steps=1, checkpoints_total_limit=1, seed=2)
    assert (out / "checkpoint-1").is_dir() and output_dir.read_marker(out)["run_id"] == first
    # overwrite: the earlier run's results go, the new run's LoRA is published (not the earlier one's)
    (out / "cache" / "keep.txt").write_text("cache stays")
    final = _train(tiny_qwen, dataset, out, max_train_steps=1, checkpoints_total_limit=1, seed=2, overwrite_output_dir=True)
    second = output_dir.read_marker(out)["run_id"]
    assert second != first
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
    assert output_dir.owner_id(out / "checkpoint-1") == second
    published, own = _lora(final), _lora(out / "checkpoint-1" / "pytorch_lora_weights.safetensors")
    assert all(torch.equal(published[k], own[k]) for k in own)
    assert [json.loads(x)["step"] for x in (out / "train_log.jsonl").read_text().splitlines()] == [1]
    assert (out / "cache" / "keep.txt").read_text() == "cache stays"
    # resume=latest continues this run, not the earlier one, and keeps its id
    _train(tiny_qwen, dataset, out, max_train_steps=2, checkpoints_total_limit=1, seed=2, resume_from_checkpoint="latest")
    assert output_dir.read_marker(out)["run_id"] == second and output_dir.read_marker(out)["resumed"]


def test_rotation_and_overwrite_touch_only_what_the_run_wrote(tiny_qwen, dataset, tmp_path, caplog):
    out = tmp_path / "out"
    _train(tiny_qwen, dataset, out, max_train_steps=1, checkpointing_steps=1)
    (out / "checkpoint-1" / "my_notes.txt").write_text("mine")
    _train(tiny_qwen, dataset, out, max_train_steps=3, checkpointing_steps=1, checkpoints_total_limit=1, resume_from_checkpoint="latest")
    # checkpoint-1 and -2 were rotated: checkpoint-1 keeps the user's file (and only it), -2 is gone whole
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-3"]
    assert [p.name for p in (out / "checkpoint-1").iterdir()] == ["my_notes.txt"]
    assert any("files the run did not write" in r.getMessage() for r in caplog.records)
    # a user's file beside the run, and foreign files in a fresh folder
    (out / "README_mine.md").write_text("notes")
    with pytest.raises(ConfigError, match="holds the results"):
        _train(tiny_qwen, dataset, out, max_train_steps=1)
    other = tmp_path / "other"
    other.mkdir()
    (other / "thesis.pdf").write_text("not ours")
    with pytest.raises(ConfigError, match="files this trainer did not write: thesis.pdf.*overwrite_output_dir=true"):
        _train(tiny_qwen, dataset, other, max_train_steps=1)
    _train(tiny_qwen, dataset, out, max_train_steps=1, overwrite_output_dir=True)
    # the new run's checkpoint-1 could not take the folder holding the user's file: that one was renamed, whole
    kept = list(out.glob("checkpoint-1.kept-*"))
    assert (out / "README_mine.md").read_text() == "notes" and len(kept) == 1 and (kept[0] / "my_notes.txt").read_text() == "mine"
    assert (out / "checkpoint-1" / "pytorch_lora_weights.safetensors").is_file()


def test_output_dir_is_never_the_dataset_or_the_model(tiny_qwen, dataset, tmp_path):
    for out, what in [(dataset, "inside the dataset folder data_config.img_dir"), (dataset / "runs" / "a", "inside the dataset"),
                      (tiny_qwen, "the base model's folder")]:
        with pytest.raises(ConfigError, match=f"config key 'output_dir'.*{what}"):
            load_config(None, base_overrides(tiny_qwen, dataset, out))
    refs = write_dataset(tmp_path / "refs")
    with pytest.raises(ConfigError, match=r"data_config.control_dir\[0\]"):
        load_config(None, base_overrides(tiny_qwen, dataset, refs / "out", **{"data_config.control_dir": str(refs)}))


_HOLD = "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); fcntl.flock(fd, fcntl.LOCK_EX); " \
        "os.write(fd, sys.argv[2].encode()); print('held', flush=True); time.sleep(600)"


def test_one_run_per_folder_and_a_dead_runs_lock_is_free(tiny_qwen, dataset, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    holder = json.dumps({"pid": 4242, "host": "gpu-box", "run_id": "abc123", "started": "today"})
    proc = subprocess.Popen([PY, "-c", _HOLD, str(out / output_dir.LOCK_FILE), holder], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError, match="in use by another training run .pid 4242 on gpu-box, run abc123"):
            _train(tiny_qwen, dataset, out, max_train_steps=1)
        # the same from the command line: one line, no traceback
        r = subprocess.run([PY, "train.py", "--config", "train_configs/train_lora.yaml",
                            *base_overrides(tiny_qwen, dataset, out, max_train_steps=1)], cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 2 and "in use by another training run" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    finally:
        proc.send_signal(signal.SIGKILL)  # dies holding the lock: the kernel frees it
        proc.wait()
    _train(tiny_qwen, dataset, out, max_train_steps=1)
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    # the lock is released after a run, also after one that failed
    with pytest.raises(ConfigError):
        _train(tiny_qwen, dataset, out, max_train_steps=1)
    _train(tiny_qwen, dataset, out, max_train_steps=1, overwrite_output_dir=True)


def test_resume_says_what_it_does(tiny_qwen, dataset, tmp_path, caplog):
    out = tmp_path / "out"
    _train(tiny_qwen, dataset, out, max_train_steps=2, checkpointing_steps=1)
    (out / "pytorch_lora_weights.safetensors").unlink()  # the published copy lost: resuming at the end publishes it again
    with caplog.at_level("INFO", logger="trainer"):
        final = _train(tiny_qwen, dataset, out, max_train_steps=2, checkpointing_steps=1, resume_from_checkpoint="latest")
    assert any("nothing to train" in r.getMessage() and "checkpoint-2 is at step 2" in r.getMessage() for r in caplog.records)
    assert final.is_file() and not any("done:" in r.getMessage() for r in caplog.records)
    # from a checkpoint of one folder into a new one: a new run there, which owns its checkpoints
    new = tmp_path / "new"
    _train(tiny_qwen, dataset, new, max_train_steps=3, checkpointing_steps=1, resume_from_checkpoint=str(out / "checkpoint-1"))
    assert output_dir.read_marker(new)["run_id"] != output_dir.read_marker(out)["run_id"]
    assert sorted(p.name for p in new.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    # checkpoints that cannot be resumed: one line each, before the model loads
    broken = tmp_path / "broken"
    shutil.copytree(out / "checkpoint-1", broken)
    (broken / "pytorch_lora_weights.safetensors").unlink()
    with pytest.raises(ConfigError, match="is incomplete .missing pytorch_lora_weights.safetensors"):
        _train(tiny_qwen, dataset, tmp_path / "o2", resume_from_checkpoint=str(broken))
    with pytest.raises(ConfigError, match="training_method: lora, this run is full"):
        _train(tiny_qwen, dataset, tmp_path / "o3", resume_from_checkpoint=str(out / "checkpoint-1"), training_method="full")
    shutil.copytree(out / "checkpoint-1", tmp_path / "evil")
    (tmp_path / "evil" / "training_state.pt").write_bytes(pickle.dumps(Payload(tmp_path / "ran")))
    with pytest.raises(ConfigError, match="training_state.pt cannot be loaded as a training state"):
        _train(tiny_qwen, dataset, tmp_path / "o4", resume_from_checkpoint=str(tmp_path / "evil"))
    assert not (tmp_path / "ran").exists()


def test_a_folder_of_an_earlier_version_is_adopted_on_resume(tiny_qwen, dataset, tmp_path):
    out = tmp_path / "out"
    _train(tiny_qwen, dataset, out, max_train_steps=2, checkpointing_steps=1)
    for p in [out / output_dir.MARKER, *out.glob("checkpoint-*/owner.json")]:
        p.unlink()  # as an earlier version left it
    _train(tiny_qwen, dataset, out, max_train_steps=3, checkpointing_steps=1, checkpoints_total_limit=2, resume_from_checkpoint="latest")
    rid = output_dir.read_marker(out)["run_id"]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    assert {output_dir.owner_id(p) for p in out.glob("checkpoint-*")} == {rid}


def test_sharded_checkpoint_pieces_load_through_an_allow_list(tmp_path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    msd, osd = get_state_dict(model, opt)
    folder = tmp_path / "sharded"
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(folder))
    fresh = torch.nn.Linear(4, 4)
    fopt = torch.optim.AdamW(fresh.parameters(), lr=0.5)
    fresh(torch.randn(2, 4)).sum().backward()
    fopt.step()
    state = dict(zip(("model", "optim"), get_state_dict(fresh, fopt)))
    dcp_load(state, folder, allow_partial_load=True)
    assert torch.equal(state["model"]["weight"], model.weight) and state["optim"]["param_groups"][0]["lr"] == 1e-3
    ran = tmp_path / "ran"
    # a crafted .metadata
    good = (folder / ".metadata").read_bytes()
    (folder / ".metadata").write_bytes(pickle.dumps(Payload(ran)))
    with pytest.raises(UnsafeCheckpoint, match=r"\.metadata holds a pickled shutil.copyfile"):
        dcp_reader(folder).read_metadata()
    (folder / ".metadata").write_bytes(good[: len(good) // 2])
    with pytest.raises(UnsafeCheckpoint, match="damaged"):
        dcp_reader(folder).read_metadata()
    # a crafted non-tensor item (DCP's own planner torch.loads those with weights_only=False)
    evil = tmp_path / "evil"
    dcp.save({"extra": {"note": Payload(ran)}}, checkpoint_id=str(evil))
    assert not ran.exists()
    with pytest.raises(UnsafeCheckpoint, match="extra.note"):
        dcp_load({"extra": {"note": None}}, evil)
    assert not ran.exists()
    # DeepSpeed's pickles: read through the list, building nothing
    ds = tmp_path / "deepspeed" / "state"
    ds.mkdir(parents=True)
    from collections import OrderedDict

    torch.save({"module": {"w": torch.ones(2)}, "param_shapes": [OrderedDict(w=torch.Size([2]))], "ds_version": "0.18"},
               ds / "mp_rank_00_model_states.pt")
    assert check_pickles(ds.parent, DEEPSPEED_ALLOWED) == 1
    torch.save({"optimizer_state_dict": {"loss_scaler": Payload(ran)}}, ds / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with pytest.raises(UnsafeCheckpoint, match="zero_pp_rank_0_mp_rank_00_optim_states.pt .*shutil.copyfile"):
        check_pickles(ds.parent, DEEPSPEED_ALLOWED)
    (ds / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(pickle.dumps([Payload(ran)]))
    with pytest.raises(UnsafeCheckpoint):
        check_pickles(ds.parent, DEEPSPEED_ALLOWED)
    assert not ran.exists()
