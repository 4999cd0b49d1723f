"""A run never loses or mislabels a result: the output folder belongs to one run (marker, lock, ownership of
checkpoints), resume says what it does, and loading a checkpoint never runs code."""

import json
import os
import pickle
import shutil
import signal
import subprocess

import pytest
import torch
from helpers import PY, ROOT, base_overrides, run_each, write_dataset
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


def test_a_forked_child_does_not_keep_the_folder_locked(tmp_path):
    """DataLoader workers are forked: they must not hold the run's lock after the run is killed (a resume right after a
    kill -9 was refused while the workers were still exiting)."""
    import fcntl
    import os

    out = tmp_path / "out"
    out.mkdir()
    output_dir.acquire_lock(out, "run-1")
    fd = output_dir._held[str(out.resolve())][0]
    r, w = os.pipe()
    child = os.fork()
    if child == 0:  # a worker: no lock descriptor of its own, and the folder's lock is still the parent's
        os.close(r)
        try:
            os.fstat(fd)
            inherited = True
        except OSError:
            inherited = False
        probe = os.open(out / output_dir.LOCK_FILE, os.O_RDWR)
        try:
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
            taken = True
        except OSError:
            taken = False
        os.write(w, b"%d%d" % (inherited, taken))
        os._exit(0)
    os.close(w)
    os.waitpid(child, 0)
    assert os.read(r, 2) == b"00"  # the descriptor was closed in the child; the lock stayed with the parent
    os.close(r)
    output_dir.release_lock(out)
    probe = os.open(out / output_dir.LOCK_FILE, os.O_RDWR)
    fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free once the parent lets go, though the child lived after the fork
    os.close(probe)


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


# --- caches heal themselves ------------------------------------------------------------------------------------


def test_damaged_cache_entries_are_encoded_again_before_the_model_loads(tiny_qwen, dataset, tmp_path, caplog, monkeypatch):
    from trainer import cache as cache_mod

    out = tmp_path / "out"
    _train(tiny_qwen, dataset, out, max_train_steps=1)
    entries = sorted((out / "cache").rglob("*.safetensors"))
    latents = [p for p in entries if "latents" in p.parts]
    texts = [p for p in entries if "text" in p.parts]
    assert len(latents) == 4 and all(cache_mod.entry_intact(p) for p in entries)
    latents[0].write_bytes(latents[0].read_bytes()[:-10])  # truncated
    latents[1].write_bytes(b"")  # empty
    texts[0].write_bytes(texts[0].read_bytes()[:20])  # cut inside the header
    with caplog.at_level("INFO", logger="trainer"):
        _train(tiny_qwen, dataset, out, max_train_steps=1, overwrite_output_dir=True)
    msgs = [r.getMessage() for r in caplog.records]
    assert any("3 damaged entries (empty or truncated files) deleted; encoding them again" in m for m in msgs), msgs
    assert any("text 1 encoded / 3 reused, latents 2 encoded / 2 reused" in m for m in msgs), msgs
    assert all(cache_mod.entry_intact(p) for p in (out / "cache").rglob("*.safetensors"))
    # a cache folder that cannot be written: one line naming it, before the model loads
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="config key 'cache_dir': cannot write to"):
        _train(tiny_qwen, dataset, tmp_path / "o2", cache_dir=str(blocker / "cache"))

    def disk_full(*_a, **_k):
        from safetensors import SafetensorError

        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: \"No space left on device\" })")

    monkeypatch.setattr(cache_mod, "save_file", disk_full)
    with pytest.raises(ConfigError, match="config key 'cache_dir': cannot write embedding cache entries in .* .the disk is full"):
        _train(tiny_qwen, dataset, tmp_path / "o3")


# --- sources say what they skipped -----------------------------------------------------------------------------


def _shard(path, captions: dict, ext="txt"):
    import io
    import tarfile

    from PIL import Image

    def add(tf, name, data):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))

    with tarfile.open(path, "w") as tf:
        for key, caption in captions.items():
            buf = io.BytesIO()
            Image.new("RGB", (64, 64), (len(key) * 20, 40, 90)).save(buf, "PNG")
            add(tf, f"{key}.png", buf.getvalue())
            add(tf, f"{key}.{ext}", caption.encode())
    return path


def test_damaged_shards_and_long_captions_are_reported(tmp_path):
    import tarfile

    from image_datasets.sources import scan_webdataset

    long = "a very long caption " * 4000  # 80 KB: read whole, not taken for a missing caption
    good = _shard(tmp_path / "good.tar", {"a": long, "b": "two", "c": "three", "d": "four"})
    r = scan_webdataset(str(good), 64)
    assert len(r.samples) == 4 and not r.problems and not r.warnings and r.samples[0].caption == " ".join(long.split())
    odd = _shard(tmp_path / "odd.tar", {"a": "x" * 70000, "b": "short"}, ext="cap")
    r = scan_webdataset(str(odd), 64, caption_ext="cap")
    assert len(r.samples) == 1 and "caption member of 70,000 bytes is larger than a caption can be" in r.problems[0]
    with tarfile.open(good) as tf:
        members = {m.name: m for m in tf}
    data = good.read_bytes()
    cases = {
        "header": (members["c.png"].offset + 100, 2, "unreadable tar header at byte"),
        "data": (members["c.png"].offset_data + 50, 2, "c.png: member cut short"),
        "boundary": (members["c.png"].offset, 2, "ends without tar's end-of-archive blocks"),
    }
    for name, (cut, n, message) in cases.items():
        shard = tmp_path / f"{name}.tar"
        shard.write_bytes(data[:cut])
        r = scan_webdataset(str(shard), 64)
        said = r.problems + r.warnings
        assert len(r.samples) == n and any(message in line for line in said), (name, said)
    # the same shard truncated after a scan that the index recorded: listed again, and the cut reported
    from image_datasets import scan_index

    index = scan_index.ScanIndex(tmp_path / "index.sqlite")
    scan_index.use(index)
    try:
        shard = tmp_path / "later.tar"
        shard.write_bytes(data)
        assert len(scan_webdataset(str(shard), 64).samples) == 4
        index.commit()
        shard.write_bytes(data[: members["c.png"].offset + 100])
        r = scan_webdataset(str(shard), 64)
        assert len(r.samples) == 2 and any("unreadable tar header" in p for p in r.problems)
    finally:
        scan_index.use(None)


# --- no traceback for anything a user can type or point at ----------------------------------------------------


@pytest.mark.parametrize("yaml_text, key, expected", [
    ("lora_target_modules: {to_q: 1}", "lora_target_modules", "a list"),
    ("validation_prompts: {a: b}", "validation_prompts", "a list"),
    ("data_config:\n  resolutions: {a: 1}", "data_config.resolutions", "a list"),
    ("data_config: [1, 2]", "data_config", "a mapping"),
    ("seed: {a: 1}", "seed", "a single value"),
    ("wandb_tags: {x: y}", "wandb_tags", "a list"),
])
def test_a_mapping_where_a_list_belongs_is_one_line(tmp_path, yaml_text, key, expected):
    path = tmp_path / "c.yaml"
    path.write_text(f"pretrained_model_name_or_path: a/b\n{yaml_text}\n")
    with pytest.raises(ConfigError, match=f"bad value for config key '{key}': expected {expected}"):
        load_config(str(path), check_paths=False)


def test_inference_refuses_what_it_cannot_render_in_one_line(tiny_qwen, tmp_path, capsys):
    import inference

    not_image = tmp_path / "photo.png"
    not_image.write_text("this is text")
    pickled = tmp_path / "tuned"
    pickled.mkdir()
    (tmp_path / "looks.png").mkdir()
    (pickled / "config.json").write_text(json.dumps({"_class_name": "QwenImageTransformer2DModel"}))
    (pickled / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps(Payload(tmp_path / "ran")))
    cases = [
        (["--num_inference_steps", "0"], "--num_inference_steps must be between 1 and 1000"),
        (["--num_inference_steps", "-3"], "--num_inference_steps must be between"),
        (["--width", "0"], "--width must be at least 16"),
        (["--height", "-64"], "--height must be at least 16"),
        (["--width", "100000"], "--width must be at most 8192"),
        (["--seed", "-1"], "--seed must be between 0 and"),
        (["--seed", str(2**70)], "--seed must be between 0 and"),
        (["--lora_scale", "nan"], "--lora_scale must be a finite number"),
        (["--true_cfg_scale", "inf"], "--true_cfg_scale must be a finite number"),
        (["--output_image", str(tmp_path)], "is a folder"),
        (["--output_image", str(pickled.parent / "looks.png")], "is a folder"),
        (["--output_image", str(not_image / "x.png")], "a parent of"),
        (["--transformer", str(pickled)], "holds no .safetensors weights (diffusion_pytorch_model.bin is a pickle"),
    ]
    for extra, message in cases:
        output = [] if "--output_image" in extra else ["--output_image", str(tmp_path / "o.png")]
        with pytest.raises(SystemExit) as e:
            inference.main(["--model_name", str(tiny_qwen), "--prompt", "x", *output, *extra])
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and "Traceback" not in err, (extra, err)
    r = subprocess.run([PY, "utils/extract_lora.py", "--model_name", str(tiny_qwen), "--transformer", str(pickled),
                        "--out", str(tmp_path / "x")], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "is a pickle" in r.stderr and "Traceback" not in r.stderr, r.stderr[-1500:]
    assert not (tmp_path / "ran").exists()


def test_inference_refuses_an_input_that_is_not_an_image(tiny_models, tmp_path, capsys):
    import inference

    bad = tmp_path / "ref.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    with pytest.raises(SystemExit) as e:
        inference.main(["--model_name", str(tiny_models("qwen-image-edit")), "--prompt", "x", "--image", str(bad),
                        "--output_image", str(tmp_path / "o.png")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--image:" in err and "is not an image PIL can read" in err


def test_odd_folders_scan_without_a_traceback(tmp_path, monkeypatch):
    from image_datasets import scan_caption_folder

    data = write_dataset(tmp_path / "data", n=3)
    os.rename(bytes(data / "img0.png"), bytes(data) + b"/img\xff.png")  # a name that is not UTF-8
    os.rename(bytes(data / "img0.txt"), bytes(data) + b"/img\xff.txt")
    os.symlink(data, data / "loop")  # a link back up the tree
    deep = tmp_path / "huge"
    for i in range(30):
        deep = deep / f"level{i}"
    deep.mkdir(parents=True)
    (deep / "buried.png").write_bytes(b"")
    os.symlink(tmp_path / "huge", data / "huge")  # a link to a deep tree: not walked unless recursive
    r = scan_caption_folder(data, 64)
    assert len(r.samples) == 3 and not r.problems
    r = scan_caption_folder(data, 64, recursive=True)
    assert len(r.samples) == 3 and any("a loop" in w for w in r.warnings), r.warnings
    assert any("buried.png" in p for p in r.problems)  # walked when asked to, and the empty file named
    out = subprocess.run([PY, "utils/validate_dataset.py", "--path", str(data), "--img_size", "64"], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr[-1500:]
    # an unreadable subfolder (root reads every folder, so the refusal is simulated at os.scandir)
    (data / "private").mkdir()
    real = os.scandir

    def scandir(path):
        if str(path).endswith("private"):
            raise PermissionError(13, "Permission denied")
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    r = scan_caption_folder(data, 64, recursive=True)
    assert len(r.samples) == 3 and any("private: unreadable folder (Permission denied); skipped" in w for w in r.warnings)


def test_ctrl_c_while_caching_is_one_line_and_keeps_the_cache(tiny_qwen, dataset, tmp_path):
    from trainer.loop import Interrupted

    class CtrlCWhileCaching(QwenImageAdapter):
        calls = 0

        def encode_latents(self, batch):
            CtrlCWhileCaching.calls += 1
            if CtrlCWhileCaching.calls == 2:
                raise KeyboardInterrupt
            return super().encode_latents(batch)

    out = tmp_path / "out"
    cfg = load_config(None, base_overrides(tiny_qwen, dataset, out, cache_batch_size=1))
    with pytest.raises(Interrupted, match="interrupted before training started; nothing was trained"):
        train(cfg, CtrlCWhileCaching)
    assert len(list((out / "cache" / "latents").rglob("*.safetensors"))) == 1
    _train(tiny_qwen, dataset, out, cache_batch_size=1)  # the lock was released; the folder holds no results yet


def test_merge_lora_never_writes_over_the_model_or_a_folder(tiny_qwen, dataset, tmp_path):
    out = tmp_path / "run"
    _train(tiny_qwen, dataset, out, max_train_steps=1)
    cmd = [PY, "utils/merge_lora.py", "--model_name", str(tiny_qwen), "--lora_weights", str(out)]
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "mine.txt").write_text("keep")
    cases = [(tiny_qwen, "the base model's folder"), (tiny_qwen / "merged", "the base model's folder"),
             (out, "holds the LoRA being merged"), (taken, "already exists and is not an empty folder")]
    for (target, message), r in zip(cases, run_each([[*cmd, "--out", str(target)] for target, _ in cases])):
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, (target, r.stderr[-1500:])
    assert (taken / "mine.txt").read_text() == "keep" and (tiny_qwen / "transformer").is_dir()
