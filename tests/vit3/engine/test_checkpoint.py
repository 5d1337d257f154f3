"""Unit tests of the shared trainer engine (vit3/engine/): configs, sampler, RNG,
checkpoints, optimizer / schedule, signals."""
import dataclasses
import errno
import json
import math
import os
import random
import shutil
import signal
import types

import numpy as np
import pytest
import torch
import torch.nn as nn
import yaml

from tests.trainer_helpers import make_unwritable, weights_digest
from vit3 import engine as T
from vit3.engine import ConfigError


# ---------------------------------------------------------------------------------------------
# configs
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Inner:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    steps: int = 10


@dataclasses.dataclass
class Cfg:
    name: str = ""
    flag: bool = False
    inner: Inner = dataclasses.field(default_factory=Inner)
    kwargs: dict = dataclasses.field(default_factory=dict)


def test_config_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"name": "a", "inner": {"lr": "5e-4", "betas": [0.8, 0.9]}}))
    cfg, p = T.load_config(Cfg, ["--config", str(path), "inner.steps=7", "name=007", "kwargs.depth=4",
                                 "kwargs={depth: 2, dim: 8}", "kwargs.dim=16", "--flag"])
    assert p == str(path)
    assert cfg.inner.lr == 5e-4  # yaml 1.1 reads 5e-4 as a string; coerced
    assert cfg.inner.betas == (0.8, 0.9) and cfg.inner.steps == 7
    assert cfg.name == "007"  # string fields keep the raw text
    assert cfg.kwargs == {"depth": 2, "dim": 16} and cfg.flag is True
    # the resolved config round-trips through yaml
    again, _ = T.load_config(Cfg, [])
    again = T.merge_config(again, yaml.safe_load(yaml.safe_dump(T.config_to_dict(cfg))), "x")
    assert again == cfg


@pytest.mark.parametrize("argv, words", [
    (["inner.lrr=1"], ["unknown config key 'inner.lrr'", "Did you mean 'lr'", "lr, betas, steps"]),
    (["bogus=1"], ["unknown config key 'bogus'", "name, flag, inner, kwargs"]),
    (["inner.steps=abc"], ["'inner.steps'", "integer"]),
    (["inner.betas=[1, 2, 3]"], ["'inner.betas'", "2 items"]),
    (["inner=3"], ["config section", "inner.lr"]),
    (["stray"], ["cannot read argument 'stray'"]),
])
def test_config_errors_name_the_key(argv, words):
    with pytest.raises(ConfigError) as e:
        T.load_config(Cfg, argv)
    for w in words:
        assert w in str(e.value)


def test_config_option_styles():
    """--key value, --key=value, key=value, dashes as underscores, lists up to the next option, bare bools."""
    @dataclasses.dataclass
    class Opts:
        cfg_scale: float = 4.0
        classes: list[int] | None = None
        interval: tuple[float, float] | None = None
        ema: bool = True
        out: str = ""
        inner: Inner = dataclasses.field(default_factory=Inner)

    cfg, _ = T.load_config(Opts, ["--cfg-scale", "2", "--classes", "1", "3", "7", "--interval", "0.1", "0.9",
                                  "--out=x y", "--inner.steps", "3", "--no-ema"], flags={"--no-ema": "ema=false"})
    assert (cfg.cfg_scale, cfg.classes, cfg.interval, cfg.ema, cfg.out, cfg.inner.steps) == (
        2.0, [1, 3, 7], (0.1, 0.9), False, "x y", 3)
    cfg, _ = T.load_config(Opts, ["--ema", "--classes", "5", "inner.lr=0.5"])
    assert cfg.ema is True and cfg.classes == [5] and cfg.inner.lr == 0.5
    with pytest.raises(ConfigError, match=r"unknown config key 'cfg_scal'.*Did you mean 'cfg_scale'"):
        T.load_config(Opts, ["--cfg-scal", "2"])
    with pytest.raises(ConfigError, match=r"--out needs a value"):
        T.load_config(Opts, ["--out"])


def test_config_yaml_syntax_error_names_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("inner:\n\tlr: 1.0\n")
    with pytest.raises(ConfigError, match=r"c.yaml is not valid yaml.*spaces, not tabs"):
        T.load_config(Cfg, ["--config", str(path)])


@pytest.mark.parametrize("text", ["", "# only a comment\n"])
def test_an_empty_config_file_is_refused_by_name(tmp_path, text):
    """An empty yaml would silently run every default (ImageNet, downloads)."""
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"config file {path} is empty"):
        T.load_config(Cfg, ["--config", str(path)])


def test_inf_and_nan_are_never_accepted():
    rules = {"inner.lr": T.at_least(0.0)}
    T.check_values(Cfg(), rules)
    for bad in (math.inf, math.nan):
        with pytest.raises(ConfigError, match=r"inner.lr=(inf|nan) is not accepted: it must be a finite number, >= 0"):
            T.check_values(Cfg(inner=Inner(lr=bad)), rules)


def test_config_unknown_key_in_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("inner:\n  lr: 1.0\n  warmup: 3\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'inner.warmup' \(from .*c.yaml\)"
                                          r".*Valid keys in 'inner'"):
        T.load_config(Cfg, ["--config", str(path)])


# ---------------------------------------------------------------------------------------------
# data order
# ---------------------------------------------------------------------------------------------
def _epoch(n, b, world, accum, epoch, seed=3, start=0):
    out = []
    for r in range(world):
        s = T.ResumableBatchSampler(n, b, world, r, seed=seed, accum_steps=accum)
        s.set_epoch(epoch, start)
        out.append(list(s))
    return out


def test_sampler_shards_cover_and_resume():
    n = 50
    per_rank = _epoch(n, 4, world=2, accum=2, epoch=0)
    idx = [i for rank in per_rank for batch in rank for i, _ in batch]
    assert len(idx) == len(set(idx)) == (n // 16) * 16  # disjoint, whole updates only
    # the images of update u are the same however the global batch of 16 is split
    split_a = _epoch(n, 4, world=2, accum=2, epoch=0)
    split_b = _epoch(n, 16, world=1, accum=1, epoch=0)
    for u in range(n // 16):
        a = {i for r in split_a for batch in r[2 * u:2 * u + 2] for i, _ in batch}
        b = {i for i, _ in split_b[0][u]}
        assert a == b
    # skipping consumed batches continues with exactly the rest, seeds included
    full = _epoch(n, 4, 2, 2, epoch=1)
    rest = _epoch(n, 4, 2, 2, epoch=1, start=2)
    assert [r[2:] for r in full] == rest
    assert _epoch(n, 4, 2, 2, epoch=2) != full  # a new order each epoch


def test_seeded_rng_is_deterministic_and_restores_global_state():
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    before = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    with T.seeded_rng(123):
        a = (random.random(), np.random.rand(), torch.rand(1).item())
    with T.seeded_rng(123):
        b = (random.random(), np.random.rand(), torch.rand(1).item())
    assert a == b
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == before


def test_rng_state_roundtrip_weights_only(tmp_path):
    T.seed_process(5)
    state = T.capture_rng_state()
    torch.save(state, tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    T.restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[:2] == expected[:2] and torch.equal(got[2], expected[2])


# ---------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------
class _OneProcess:
    """What save/load_checkpoint need from an Accelerator, for one process."""
    is_main_process, process_index, num_processes = True, 0, 1

    def wait_for_everyone(self):
        pass


def _tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))


def test_checkpoint_roundtrip_atomic_and_pruned(tmp_path):
    acc = _OneProcess()
    model = _tiny()
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

    other, other_opt = _tiny(), None
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


def test_config_diffs_leave_out_the_launch_keys():
    """A key declared with `launch` (where to resume, when to stop, ...) may change on resume without a warning; the
    engine learns which keys those are from the config, not from a list of names."""
    @dataclasses.dataclass
    class Section:
        lr: float = 1.0
        stop: int = T.launch(0)

    @dataclasses.dataclass
    class Cfg(T.TrainConfig):
        inner: Section = dataclasses.field(default_factory=Section)
        eval_only: bool = T.launch(False)

    keys = T.launch_keys(Cfg())
    assert set(keys) == {"run_name", "resume", "inner.stop", "eval_only"}
    old = T.config_to_dict(Cfg())
    new = T.config_to_dict(Cfg(resume="latest", eval_only=True, inner=Section(lr=2.0, stop=5)))
    assert T.config_diffs(old, new, keys) == ["inner.lr: 1.0 -> 2.0"]


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



def test_resolve_run_numbering_and_latest(tmp_path):
    out = tmp_path / "results"
    run0, ck = T.resolve_run(str(out), "exp")
    run1, _ = T.resolve_run(str(out), "exp")
    assert (run0.name, run1.name, ck) == ("000-exp", "001-exp", None)
    with pytest.raises(ConfigError, match="resume=latest found no usable checkpoint"):
        T.resolve_run(str(out), "exp", resume="latest")
    assert T.resolve_run(str(out), "exp", resume="auto")[0].name == "002-exp"  # auto: fresh if none
    T.save_checkpoint(_OneProcess(), run0 / "checkpoints", 5, modules={}, states={}, trainer_state={}, config={})
    run, ck = T.resolve_run(str(out), "exp", resume="latest")
    assert run == run0 and ck.name == "step-00000005"
    run, ck = T.resolve_run(str(out), "exp", resume=str(ck), new_run=True)  # evaluation: a new folder
    assert run.name == "003-exp-eval" and ck.name == "step-00000005"


# ---------------------------------------------------------------------------------------------
# optimizer, schedule, EMA
# ---------------------------------------------------------------------------------------------
def test_optimizer_groups_and_schedule():
    model = _tiny()
    cfg = T.OptimConfig(epochs=10, warmup_epochs=2)
    opt, sched = T.create_optimizer_and_scheduler(model, cfg, global_batch=1024, updates_per_epoch=5,
                                                  schedule_updates=50)
    decay = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decay == {id(model[0].weight), id(model[2].weight)}  # not LayerNorm, not biases
    assert opt.defaults["betas"] == (0.9, 0.999)
    lr, wlr, mlr = 1e-3, 1e-6, 1e-5  # 5e-4, 5e-7, 5e-6 x 1024 / 512
    assert opt.param_groups[0]["lr"] == pytest.approx(wlr)
    sched.step_update(5)  # half-way through the 10-update warm-up
    assert opt.param_groups[0]["lr"] == pytest.approx(wlr + (lr - wlr) * 5 / 10)
    sched.step_update(30)  # cosine over all 50 updates (warm-up included, as the official code)
    assert opt.param_groups[0]["lr"] == pytest.approx(mlr + 0.5 * (lr - mlr) * (1 + math.cos(math.pi * 30 / 50)))


def test_ema_decay_scales_with_batch():
    ema = T.create_ema(_tiny(), T.EMAConfig(decay=0.9996, decay_batch=4096), global_batch=1024)
    assert ema.decay == pytest.approx(0.9996 ** 0.25)
    assert not any(p.requires_grad for p in ema.parameters())
    assert T.create_ema(_tiny(), T.EMAConfig(enabled=False), 1024) is None


# ---------------------------------------------------------------------------------------------
# signals and metrics
# ---------------------------------------------------------------------------------------------
def test_stop_signal_sets_flag_and_restores_handler():
    before = signal.getsignal(signal.SIGUSR1)
    acc = _OneProcess()
    with T.StopSignal() as stop:
        assert not stop.should_stop(acc)
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.should_stop(acc) and stop.received == signal.SIGUSR1
    assert signal.getsignal(signal.SIGUSR1) == before


def test_running_means_one_process():
    m = T.RunningMeans("cpu")
    for v in (1.0, 2.0, 3.0):
        m.add("loss", torch.tensor(v))
    assert m.reduce(_OneProcess(), extra_sums={"images_per_s": 10.0}) == {"loss": 2.0, "images_per_s": 10.0}


def test_write_run_info(tmp_path):
    class Acc(_OneProcess):
        num_processes, distributed_type, mixed_precision, device = 1, "NO", "no", torch.device("cpu")

    info = T.write_run_info(tmp_path, {"a": 1}, Acc(), seed=3)
    saved = json.loads((tmp_path / "run.json").read_text())
    assert saved["seed"] == 3 and saved["environment"]["world_size"] == 1
    assert {"torch", "timm", "accelerate"} <= set(saved["environment"]) and info["git"]
    assert yaml.safe_load((tmp_path / "config.yaml").read_text()) == {"a": 1}


# ---------------------------------------------------------------------------------------------
# nothing lost: crashes during a save, damaged checkpoints, rollbacks, full disks, two writers
# ---------------------------------------------------------------------------------------------
def _save(root, step, model=None, keep_last=3, **state):
    return T.save_checkpoint(_OneProcess(), root, step, modules={"model": model or _tiny()}, states={},
                             trainer_state={"global_step": step, **state}, config={}, keep_last=keep_last)


@pytest.mark.parametrize("crash_at", [1, 2])
def test_a_crash_between_the_renames_of_a_resaved_step_keeps_a_checkpoint(tmp_path, monkeypatch, crash_at):
    """The second save of a step (an update that ends an epoch) swaps folders with two renames; a crash after
    either leaves a complete checkpoint of that step, found by the next resume (keep_last=1: the only one)."""
    root = tmp_path / "checkpoints"
    _save(root, 7, keep_last=1, where="mid-epoch")
    real, calls = os.replace, []

    def crashing(src, dst):
        calls.append((src, dst))
        if len(calls) == crash_at:
            raise KeyboardInterrupt("killed")  # what a kill between the renames leaves on disk
        return real(src, dst)

    monkeypatch.setattr(T.checkpoint.os, "replace", crashing)
    with pytest.raises(KeyboardInterrupt):
        _save(root, 7, keep_last=1, where="epoch end")
    monkeypatch.setattr(T.checkpoint.os, "replace", real)
    latest = T.find_latest_checkpoint(root)
    assert latest is not None and latest.name == "step-00000007" and T.verify_checkpoint(latest) is None
    # before the second rename the first copy was put aside: it comes back; nothing is half-written
    assert T.read_trainer_state(latest)["where"] == "mid-epoch"


def test_damaged_checkpoints_are_skipped_with_a_warning(tmp_path):
    root = tmp_path / "run" / "checkpoints"
    for step in (1, 2, 3):
        _save(root, step)
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
    _save(root, 1)
    (root / "step-00000001" / "manifest.json").unlink()
    assert T.verify_checkpoint(root / "step-00000001") == "no manifest.json"


def test_resume_auto_says_when_no_checkpoint_can_be_used(tmp_path):
    root = tmp_path / "run" / "checkpoints"
    _save(root, 1)
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
        _save(run0 / "checkpoints", step)
    with pytest.warns(UserWarning, match=r"rolls back run .*000-exp \(its newest is step-00000030\).*kept"):
        run, ckpt = T.resolve_run(str(out), "exp", resume=str(run0 / "checkpoints" / "step-00000010"))
    assert run.name == "001-exp" and ckpt.name == "step-00000010"
    assert sorted(p.name for p in (run0 / "checkpoints").iterdir()) == [
        "step-00000010", "step-00000020", "step-00000030"]
    with pytest.raises(ConfigError, match=r"older than step-00000030.*resume=latest.*another run_name"):
        T.resolve_run(str(out), "exp", run_name="000-exp", resume=str(run0 / "checkpoints" / "step-00000010"))
    run, _ = T.resolve_run(str(out), "exp", resume=str(run0 / "checkpoints" / "step-00000030"))
    assert run == run0  # the newest continues in place


class _CPU(_OneProcess):
    device = torch.device("cpu")


def _run(tmp_path, resume_from=None):
    """What a Checkpointer reads of a Run."""
    return types.SimpleNamespace(accelerator=_CPU(), dir=tmp_path, resume_from=resume_from)


def test_diverged_weights_are_never_saved(tmp_path):
    """Checkpointer.save refuses non-finite weights, and a non-finite loss seen on the device since the last
    check, naming the step and the last good checkpoint."""
    model = _tiny()
    ckpt = T.Checkpointer(_run(tmp_path), modules={"model": model}, states={}, config={}, keep_last=3)
    ckpt.state.advance()
    good = ckpt.save()
    with torch.no_grad():
        model[0].weight[0, 0] = float("inf")
    ckpt.state.advance()
    with pytest.raises(T.TrainingDiverged, match=rf"weights hold NaN or inf at step 2.*Last good checkpoint: {good}"):
        ckpt.save()
    ckpt.watch(torch.tensor(float("nan")), 3)
    with pytest.raises(T.TrainingDiverged, match="loss became NaN or inf at step 3"):
        ckpt.check()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000001"]


@pytest.mark.parametrize("error, free", [(OSError(errno.ENOSPC, "No space left on device"), None),
                                         (OSError(errno.EDQUOT, "Disk quota exceeded"), None),
                                         (RuntimeError("safetensors: IoError"), 0)])
def test_a_full_disk_during_a_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch, error, free):
    """A full disk is known by the error's errno (torch files are written through Python files, which carry it);
    safetensors' own error, which has none, counts as one when the disk has no room left for the weights."""
    root = tmp_path / "checkpoints"
    _save(root, 1)

    def full(*args, **kwargs):
        raise error

    monkeypatch.setattr(T.checkpoint.torch, "save", full)
    if free is not None:
        full_disk = shutil._ntuple_diskusage(1 << 40, 1 << 40, free)
        monkeypatch.setattr(T.checkpoint.shutil, "disk_usage", lambda p: full_disk)
    with pytest.raises(T.WriteError, match=r"cannot write a checkpoint into .*checkpoints: the disk is full"
                                                     r".*needs about .* GiB are free.*previous checkpoints are intact"):
        _save(root, 2)
    assert sorted(p.name for p in root.iterdir()) == ["step-00000001"]  # no .tmp folder left
    assert T.verify_checkpoint(root / "step-00000001") is None


def test_a_failed_save_with_room_on_the_disk_is_a_crash_not_a_full_disk(tmp_path, monkeypatch):
    """An error without an errno while the disk has room (a bug, a foreign object) keeps its own traceback."""
    root = tmp_path / "checkpoints"

    def broken(*args, **kwargs):
        raise RuntimeError("unexpected pos 64")

    monkeypatch.setattr(T.checkpoint.torch, "save", broken)
    with pytest.raises(RuntimeError, match="unexpected pos 64"):
        _save(root, 1)


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
        _save(tmp_path / "checkpoints", 1)
    assert e.value.errno == errno.ENOSPC


def test_one_writer_per_folder(tmp_path):
    import subprocess
    import sys

    folder = tmp_path / "run"
    folder.mkdir()
    lock = folder / ".lock"
    lock.write_text(json.dumps({"host": __import__("socket").gethostname(), "pid": os.getppid(), "since": "x"}))
    with pytest.raises(ConfigError, match=rf"run folder .*run is in use by process {os.getppid()} on .*delete"):
        T.acquire_lock(folder, "run folder")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.write_text(json.dumps({"host": __import__("socket").gethostname(), "pid": int(dead.stdout)}))
    with pytest.warns(UserWarning, match=r"taking over the lock of process .* which is gone"):
        assert T.acquire_lock(folder, "run folder") == lock
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert T.acquire_lock(folder, "run folder") == lock  # again: this process holds it
    T.release_lock(lock)
    assert not lock.exists()
    # a holder on another host cannot be asked: its lock is stale once untouched for STALE_S (a node failure)
    lock.write_text(json.dumps({"host": "elsewhere", "pid": 1}))
    with pytest.raises(ConfigError, match="in use by process 1 on elsewhere"):
        T.acquire_lock(folder, "run folder")
    old = lock.stat().st_mtime - T.lock.STALE_S - 1
    os.utime(lock, (old, old))
    with pytest.warns(UserWarning, match="taking over the lock of process 1 on elsewhere"):
        T.acquire_lock(folder, "run folder")
    T.release_lock(lock)


@pytest.mark.parametrize("raised, code", [
    (None, 0), ("preempted", 4), (ConfigError("bad key"), 2), (T.DataError("no images"), 2),
    (T.TrainingDiverged("nan"), 3), (T.WriteError(28, "full"), 5), (KeyError("bug"), 1), (SystemExit(0), 0),
])
def test_exit_codes(raised, code, capsys):
    def main():
        if isinstance(raised, BaseException):
            raise raised
        return {"preempted": raised == "preempted"}

    with pytest.raises(SystemExit) as e:
        T.run_script(main)
    assert e.value.code == code
    err = capsys.readouterr().err
    assert ("Traceback" in err) == (code == 1)


# ---------------------------------------------------------------------------------------------
# nothing outside the folder: planted links, temporary names, file modes, permissions
# ---------------------------------------------------------------------------------------------
def _plant(link, victim):
    """A link at `link` to the file `victim` (outside the folder), which must stay as it is."""
    victim.write_text("victim")
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(victim)


def test_no_write_follows_a_planted_link(tmp_path):
    """The predictable temporary names of earlier versions, and the final names, hold links to a file outside
    the run folder: rewrites replace the links, appends refuse them in one line naming the link."""
    class Acc(_OneProcess):
        distributed_type, mixed_precision, device = "NO", "no", torch.device("cpu")

    run, victim = tmp_path / "run", tmp_path / "victim.txt"
    for name in (".config.yaml.tmp", ".run.json.tmp", "eval.json"):
        _plant(run / name, victim)
    T.write_run_info(run, {"a": 1}, Acc(), seed=0)
    T.write_json(run / "eval.json", {"top1": 1.0}, Acc())
    assert victim.read_text() == "victim" and json.loads((run / "eval.json").read_text()) == {"top1": 1.0}
    assert not (run / "eval.json").is_symlink()
    assert sorted(p.name for p in run.iterdir() if not p.is_symlink()) == ["config.yaml", "eval.json", "run.json"]

    _plant(run / "metrics.jsonl", victim)
    with pytest.raises(ConfigError, match=rf"{run / 'metrics.jsonl'} is a symbolic link \(to {victim}\): a run "
                                          r"writes only inside its folder.*remove the link"):
        T.MetricsFile(run / "metrics.jsonl", True).write(1, {"loss": 1.0})
    _plant(run / "log.txt", victim)
    with pytest.raises(ConfigError, match=rf"{run / 'log.txt'} is a symbolic link"):
        T.run.setup_logging(run, True)
    T.run.close_logging()
    (run / "run.json").unlink()
    (run / "run.json").symlink_to(victim)
    with pytest.raises(ConfigError, match=r"run.json is a symbolic link"):  # it would be read into the new one
        T.write_run_info(run, {"a": 1}, Acc(), seed=0)
    assert victim.read_text() == "victim"

    # the checkpoint's temporary folder and its swap folder
    root = run / "checkpoints"
    (tmp_path / "elsewhere").mkdir()
    (root / ".tmp-step-00000001").parent.mkdir()
    (root / ".tmp-step-00000001").symlink_to(tmp_path / "elsewhere")
    _save(root, 1)
    (root / ".trash-step-00000001").symlink_to(tmp_path / "elsewhere")
    _save(root, 1)
    assert list((tmp_path / "elsewhere").iterdir()) == [] and T.verify_checkpoint(root / "step-00000001") is None


def test_temporary_names_are_fresh_and_files_follow_the_umask(tmp_path):
    """Checkpoint files (safetensors writes 0600) and atomically written files get the mode a plain open
    gives: a teammate can read them where the umask lets them."""
    mode = 0o666 & ~T.files.UMASK
    ckpt = _save(tmp_path / "checkpoints", 1)
    assert {p.name: p.stat().st_mode & 0o777 for p in ckpt.iterdir()} == {p.name: mode for p in ckpt.iterdir()}
    names = []
    for _ in range(2):
        with T.atomic_path(tmp_path / "a.png", suffix=".png") as tmp:
            names.append(tmp.name)
            assert tmp.is_file() and tmp.name.startswith(".a.png.") and tmp.name.endswith(".tmp.png")
            tmp.write_bytes(b"x")
    assert names[0] != names[1] and (tmp_path / "a.png").stat().st_mode & 0o777 == mode
    with pytest.raises(RuntimeError), T.atomic_path(tmp_path / "b") as tmp:
        raise RuntimeError("the writer failed")
    assert not (tmp_path / "b").exists() and not tmp.exists()  # nothing partial, no temporary file
    with T.atomic_dir(tmp_path / "d") as tmp:
        (tmp / "f").write_text("1")
    assert (tmp_path / "d" / "f").read_text() == "1"
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o777 & ~T.files.UMASK
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "checkpoints", "d"]


def test_an_unwritable_folder_is_a_permission_error_not_a_full_disk(tmp_path, monkeypatch):
    """As a normal user (simulated under root: see make_unwritable): a checkpoint, and a new run folder,
    stop with exit code 5 and say the folder cannot be written, not that space is short."""
    root = tmp_path / "run" / "checkpoints"
    _save(root, 1)

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    with monkeypatch.context() as m:
        m.setattr(T.checkpoint.torch, "save", denied)
        with pytest.raises(T.WriteError, match=r"into .*checkpoints: permission denied.*intact: make .* writable") as e:
            _save(root, 2)
    assert "free" not in str(e.value) and sorted(p.name for p in root.iterdir()) == ["step-00000001"]
    out = make_unwritable(tmp_path / "ro", monkeypatch)
    with pytest.raises(T.WriteError, match=rf"cannot write a run folder in {out}: permission denied.*output_dir"):
        T.resolve_run(str(out), "exp")
