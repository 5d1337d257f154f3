"""engine.checkpoint: RNG state, atomic and pruned checkpoints, and nothing lost: crashes during a save,
damaged checkpoints, rollbacks, full disks."""
import errno
import os
import random
import shutil

import numpy as np
import pytest
import torch
import torch.nn as nn

from tests.trainer_helpers import weights_digest
from tests.vit3.engine.fakes import OneProcess, save_step, tiny_model
from vit3 import engine as T
from vit3.engine import ConfigError


def test_rng_state_roundtrip_weights_only(tmp_path):
    T.seed_process(5)
    state = T.capture_rng_state()
    torch.save(state, tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    T.restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[:2] == expected[:2] and torch.equal(got[2], expected[2])


def test_checkpoint_roundtrip_atomic_and_pruned(tmp_path):
    acc = OneProcess()
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        T.save_checkpoint(acc, root, step, modules={"model": model}, states={"optimizer": opt, "scaler": None},
                          trainer_state={"epoch": 0, "global_step": step}, config={"model": {"name": "x"}}, keep_last=2)
    assert sorted(p.name for p in root.iterdir()) == ["step-00000002", "step-00000003"]
    (root / ".tmp-step-00000009").mkdir()  # an interrupted save is never "latest"
    (root / "step-00000010").mkdir()  # nor a folder without trainer_state.json
    assert T.find_latest_checkpoint(root).name == "step-00000003"
    files = sorted(p.name for p in (root / "step-00000003").iterdir())
    assert files == ["config.yaml", "manifest.json", "model.safetensors", "optimizer.pt", "rng-0.pt",
                     "trainer_state.json"]

    other, other_opt = tiny_model(), None
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    other_opt = torch.optim.AdamW(other.parameters(), lr=1e-3)
    state = T.load_checkpoint(acc, root / "step-00000003", modules={"model": other}, states={"optimizer": other_opt})
    assert state["global_step"] == 3 and state["config"] == {"model": {"name": "x"}}
    assert weights_digest(other) == weights_digest(model)
    assert other_opt.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]

    wrong = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 3))
    with pytest.raises(ConfigError, match="does not fit this model"):
        T.load_checkpoint(acc, root / "step-00000003", modules={"model": wrong}, states={})


def test_check_same_model_names_the_difference():
    """The trainer names the keys that fix its architecture; the engine assumes none (no classifier's img_size)."""
    keys = ("name", "num_classes", "img_size", "kwargs")
    state = {"config": {"model": {"name": "vit3_tiny", "num_classes": 10, "img_size": 32, "kwargs": {}}}}
    T.check_same_model(state, {"name": "vit3_tiny", "num_classes": 10, "img_size": 32, "kwargs": {}}, keys, ckpt="c")
    with pytest.raises(ConfigError, match=r"another model \(model.name: checkpoint 'vit3_tiny' "
                                          r"vs this run 'vit3_small'"):
        T.check_same_model(state, {"name": "vit3_small", "num_classes": 10, "img_size": 32, "kwargs": {}}, keys,
                           ckpt="c")
    T.check_same_model(state, {"name": "vit3_tiny", "num_classes": 10, "img_size": 64, "kwargs": {}}, ("name",))
    with pytest.raises(TypeError, match="keys"):
        T.check_same_model(state, {"name": "vit3_tiny"}, ckpt="c")


@pytest.mark.parametrize("crash_at", [1, 2])
def test_a_crash_between_the_renames_of_a_resaved_step_keeps_a_checkpoint(tmp_path, monkeypatch, crash_at):
    """The second save of a step (an update that ends an epoch) swaps folders with two renames; a crash after
    either leaves a complete checkpoint of that step, found by the next resume (keep_last=1: the only one)."""
    root = tmp_path / "checkpoints"
    save_step(root, 7, keep_last=1, where="mid-epoch")
    real, calls = os.replace, []

    def crashing(src, dst):
        calls.append((src, dst))
        if len(calls) == crash_at:
            raise KeyboardInterrupt("killed")  # what a kill between the renames leaves on disk
        return real(src, dst)

    monkeypatch.setattr(T.checkpoint.os, "replace", crashing)
    with pytest.raises(KeyboardInterrupt):
        save_step(root, 7, keep_last=1, where="epoch end")
    monkeypatch.setattr(T.checkpoint.os, "replace", real)
    latest = T.find_latest_checkpoint(root)
    assert latest is not None and latest.name == "step-00000007" and T.verify_checkpoint(latest) is None
    # before the second rename the first copy was put aside: it comes back; nothing is half-written
    assert T.read_trainer_state(latest)["where"] == "mid-epoch"


def test_damaged_checkpoints_are_skipped_with_a_warning(tmp_path):
    root = tmp_path / "run" / "checkpoints"
    for step in (1, 2, 3):
        save_step(root, step)
    (root / "step-00000003" / "trainer_state.json").write_text('{"step": 3, "glob')  # a copy cut short
    weights = root / "step-00000002" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])  # truncated: the manifest knows its size
    with pytest.warns(UserWarning) as seen:
        assert T.find_latest_checkpoint(root).name == "step-00000001"
    text = " ".join(str(w.message) for w in seen)
    assert "step-00000003: trainer_state.json is unreadable" in text
    assert "step-00000002: model.safetensors has" in text and "the manifest says" in text
    with pytest.warns(UserWarning):
        run, ckpt = T.resolve_run(str(tmp_path), "x", run_name="run", resume="latest")
    assert ckpt.name == "step-00000001"
    with pytest.raises(ConfigError, match=r"step-00000002 is damaged \(model.safetensors has"):
        T.resolve_run(str(tmp_path), "x", resume=str(root / "step-00000002"))


def test_a_checkpoint_without_its_manifest_is_not_used(tmp_path):
    """Every checkpoint has a manifest.json (it is written last): one without is cut short, not of an older kind."""
    root = tmp_path / "checkpoints"
    save_step(root, 1)
    (root / "step-00000001" / "manifest.json").unlink()
    assert T.verify_checkpoint(root / "step-00000001") == "no manifest.json"


def test_resume_auto_says_when_no_checkpoint_can_be_used(tmp_path):
    root = tmp_path / "run" / "checkpoints"
    save_step(root, 1)
    (root / "step-00000001" / "trainer_state.json").write_text("")
    with pytest.warns(UserWarning, match=r"resume=auto: none of the 1 checkpoints .* starting a fresh run"):
        run, ckpt = T.resolve_run(str(tmp_path), "x", run_name="run", resume="auto")
    assert run.name == "run" and ckpt is None  # a fresh start in the same folder
    with pytest.warns(UserWarning), pytest.raises(ConfigError, match=r"no usable checkpoint.*1 damaged"):
        T.resolve_run(str(tmp_path), "x", run_name="run", resume="latest")


def test_rolling_back_keeps_the_newer_line(tmp_path):
    """Resuming an older checkpoint of a run branches into a new folder; the newer checkpoints stay, and
    resuming it inside its own run by name is refused with the choices named."""
    out = tmp_path / "results"
    run0, _ = T.resolve_run(str(out), "exp")
    for step in (10, 20, 30):
        save_step(run0 / "checkpoints", step)
    with pytest.warns(UserWarning, match=r"rolls back run .*000-exp \(its newest is step-00000030\).*kept"):
        run, ckpt = T.resolve_run(str(out), "exp", resume=str(run0 / "checkpoints" / "step-00000010"))
    assert run.name == "001-exp" and ckpt.name == "step-00000010"
    assert sorted(p.name for p in (run0 / "checkpoints").iterdir()) == [
        "step-00000010", "step-00000020", "step-00000030"]
    with pytest.raises(ConfigError, match=r"older than step-00000030.*resume=latest.*another run_name"):
        T.resolve_run(str(out), "exp", run_name="000-exp", resume=str(run0 / "checkpoints" / "step-00000010"))
    run, _ = T.resolve_run(str(out), "exp", resume=str(run0 / "checkpoints" / "step-00000030"))
    assert run == run0  # the newest continues in place


@pytest.mark.parametrize("error, free", [(OSError(errno.ENOSPC, "No space left on device"), None),
                                         (OSError(errno.EDQUOT, "Disk quota exceeded"), None),
                                         (RuntimeError("safetensors: IoError"), 0)])
def test_a_full_disk_during_a_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch, error, free):
    """A full disk is known by the error's errno (torch files are written through Python files, which carry it);
    safetensors' own error, which has none, counts as one when the disk has no room left for the weights."""
    root = tmp_path / "checkpoints"
    save_step(root, 1)

    def full(*args, **kwargs):
        raise error

    monkeypatch.setattr(T.checkpoint.torch, "save", full)
    if free is not None:
        full_disk = shutil._ntuple_diskusage(1 << 40, 1 << 40, free)
        monkeypatch.setattr(T.checkpoint.shutil, "disk_usage", lambda p: full_disk)
    with pytest.raises(T.WriteError, match=r"cannot write a checkpoint into .*checkpoints: the disk is full"
                                                     r".*needs about .* GiB are free.*previous checkpoints are intact"):
        save_step(root, 2)
    assert sorted(p.name for p in root.iterdir()) == ["step-00000001"]  # no .tmp folder left
    assert T.verify_checkpoint(root / "step-00000001") is None


def test_a_failed_save_with_room_on_the_disk_is_a_crash_not_a_full_disk(tmp_path, monkeypatch):
    """An error without an errno while the disk has room (a bug, a foreign object) keeps its own traceback."""
    root = tmp_path / "checkpoints"

    def broken(*args, **kwargs):
        raise RuntimeError("unexpected pos 64")

    monkeypatch.setattr(T.checkpoint.torch, "save", broken)
    with pytest.raises(RuntimeError, match="unexpected pos 64"):
        save_step(root, 1)


def test_torch_files_are_written_through_python_files_that_carry_the_errno(tmp_path, monkeypatch):
    """torch.save given a path reports a full disk as RuntimeError("unexpected pos"); given a Python file, the
    file's OSError with its errno comes through."""
    import builtins

    real_open = builtins.open

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, b):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(T.checkpoint, "open", lambda p, mode="r", *a, **k: Full(real_open(p, mode, *a, **k))
                        if str(p).endswith(".pt") else real_open(p, mode, *a, **k), raising=False)
    with pytest.raises(T.WriteError, match="the disk is full") as e:
        save_step(tmp_path / "checkpoints", 1)
    assert e.value.errno == errno.ENOSPC
