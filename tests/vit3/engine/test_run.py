"""engine.run, lock, signals, script: run folders and their numbering, run info, one writer per folder,
the stop signal, exit codes."""
import json
import os
import signal

import pytest
import torch
import yaml

from tests.trainer_helpers import make_unwritable
from tests.vit3.engine.fakes import OneProcess
from vit3 import engine as T
from vit3.engine import ConfigError


def test_resolve_run_numbering_and_latest(tmp_path):
    out = tmp_path / "results"
    run0, ck = T.resolve_run(str(out), "exp")
    run1, _ = T.resolve_run(str(out), "exp")
    assert (run0.name, run1.name, ck) == ("000-exp", "001-exp", None)
    with pytest.raises(ConfigError, match="resume=latest found no usable checkpoint"):
        T.resolve_run(str(out), "exp", resume="latest")
    assert T.resolve_run(str(out), "exp", resume="auto")[0].name == "002-exp"  # auto: fresh if none
    T.save_checkpoint(OneProcess(), run0 / "checkpoints", 5, modules={}, states={}, trainer_state={}, config={})
    run, ck = T.resolve_run(str(out), "exp", resume="latest")
    assert run == run0 and ck.name == "step-00000005"
    run, ck = T.resolve_run(str(out), "exp", resume=str(ck), new_run=True)  # evaluation: a new folder
    assert run.name == "003-exp-eval" and ck.name == "step-00000005"


def test_stop_signal_sets_flag_and_restores_handler():
    before = signal.getsignal(signal.SIGUSR1)
    acc = OneProcess()
    with T.StopSignal() as stop:
        assert not stop.should_stop(acc)
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.should_stop(acc) and stop.received == signal.SIGUSR1
    assert signal.getsignal(signal.SIGUSR1) == before


def test_write_run_info(tmp_path):
    class Acc(OneProcess):
        num_processes, distributed_type, mixed_precision, device = 1, "NO", "no", torch.device("cpu")

    info = T.write_run_info(tmp_path, {"a": 1}, Acc(), seed=3)
    saved = json.loads((tmp_path / "run.json").read_text())
    assert saved["seed"] == 3 and saved["environment"]["world_size"] == 1
    assert {"torch", "timm", "accelerate"} <= set(saved["environment"]) and info["git"]
    assert yaml.safe_load((tmp_path / "config.yaml").read_text()) == {"a": 1}


@pytest.mark.subprocess
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
    (T.TrainingDiverged("nan"), 3), (T.SamplingDiverged("black"), 3), (T.WriteError(28, "full"), 5),
    (KeyError("bug"), 1), (SystemExit(0), 0),
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


def test_a_planted_config_yaml_link_is_refused_naming_the_link(tmp_path):
    """config.yaml is kept as the run's record (never rewritten once there): a link planted there is refused, as
    at run.json, instead of standing as the run's config."""
    class Acc(OneProcess):
        num_processes, distributed_type, mixed_precision, device = 1, "NO", "no", torch.device("cpu")

    victim = tmp_path / "victim.yaml"
    victim.write_text("model: planted\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").symlink_to(victim)
    with pytest.raises(ConfigError, match=rf"{run / 'config.yaml'} is a symbolic link \(to {victim}\).*remove the "
                                          "link"):
        T.write_run_info(run, {"a": 1}, Acc(), seed=0)
    assert victim.read_text() == "model: planted\n" and not (run / "run.json").exists()


def test_a_lock_that_is_a_link_is_named_as_one(tmp_path):
    """Not as a lock that "keeps changing": the link, where it points, and the fix, in one line."""
    victim = tmp_path / "victim.yaml"
    victim.write_text("model: planted\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").symlink_to(victim)
    with pytest.raises(ConfigError, match=rf"{run / '.lock'} is a symbolic link \(to {victim}\).*remove the link"):
        T.acquire_lock(run, "run folder")
    (run / ".lock").unlink()
    (run / ".lock").symlink_to(tmp_path / "nowhere")  # dangling: O_EXCL still refuses to create through it
    with pytest.raises(ConfigError, match=r"\.lock is a symbolic link \(to .*nowhere\)"):
        T.acquire_lock(run, "run folder")
    assert victim.read_text() == "model: planted\n" and not (tmp_path / "nowhere").exists()


def test_a_folder_the_run_cannot_write_stops_it_at_the_start(tmp_path, monkeypatch):
    """resolve_run probes the run folder and every folder the run will write (see check_writable's test for how
    the refusal is made under root); a run folder made for this run is removed again, its lock released."""
    out = tmp_path / "out"
    elsewhere = make_unwritable(tmp_path / "latents", monkeypatch)
    with pytest.raises(T.WriteError, match=rf"cannot write {elsewhere}: Permission denied.*data\.latents"):
        T.resolve_run(str(out), "exp", writes={"checkpoints": "output_dir", str(elsewhere): "data.latents"})
    assert list(out.iterdir()) == []
    run, _ = T.resolve_run(str(out), "exp", writes={"checkpoints": "output_dir"})
    T.release_lock(run / ".lock")
    make_unwritable(run / "checkpoints", monkeypatch)
    with pytest.raises(T.WriteError, match=rf"cannot write {run / 'checkpoints'}: Permission denied"):
        T.resolve_run(str(out), "exp", run_name=run.name, writes={"checkpoints": "output_dir"})
    assert run.is_dir() and not (run / ".lock").exists()  # kept: it holds checkpoints/
