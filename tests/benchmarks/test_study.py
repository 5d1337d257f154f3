"""The quality study (benchmarks/study.py): its quick mode end to end, its resume and its report's math."""
import dataclasses
import errno
import json
import math
import os
import shutil
import statistics
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import study  # noqa: E402
import study_report  # noqa: E402
import study_scripts  # noqa: E402

from vit3.engine.files import atomic_write_text  # noqa: E402
from vit3.engine.script import run_script  # noqa: E402
from vit3.errors import ConfigError  # noqa: E402


def absolute_paths(tree) -> list[str]:
    """The words of the strings in a JSON tree that are absolute paths."""
    if isinstance(tree, dict):
        return [p for v in tree.values() for p in absolute_paths(v)]
    if isinstance(tree, list):
        return [p for v in tree for p in absolute_paths(v)]
    return [w for w in tree.split(" ") if len(w) > 1 and os.path.isabs(w)] if isinstance(tree, str) else []


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One quick study: 3 mixers x 1 seed x 4 updates, evaluated at 2 and 4 updates, unguided and guided."""
    tmp = tmp_path_factory.mktemp("study")
    out = tmp / "study"
    argv = ["--quick", "--out", str(out), f"data.path={tmp / 'digits16'}", "threads=1"]
    study.main(argv)
    return out, argv


def test_quick_study_trains_evaluates_and_reports_every_mixer(quick):
    out, _ = quick
    res = json.loads((out / "results.json").read_text())
    assert [r["mixer"] for r in res["runs"]] == list(study.MIXERS)
    assert set(res["update_ms"]) == set(study.MIXERS) and all(v > 0 for v in res["update_ms"].values())
    for r in res["runs"]:
        assert (out / r["run"] / "checkpoints" / "step-00000004").is_dir()  # paths relative to the study
        assert (out / r["run"] / "checkpoints" / "step-00000002").is_dir()  # the 50% budget
        assert set(r["evals"]) == {"2", "4"}
        for evals in r["evals"].values():
            for where in ("cfg1", "guided"):
                m = evals[where]
                assert m["num_samples"] == 10 and 0 <= m["digits_accuracy"] <= 1
                assert math.isfinite(m[study.FID]) and 0 <= m["precision"] <= 1 and 0 <= m["recall"] <= 1
    for step in (2, 4):  # two sample sets per checkpoint, drawn at guidance 1 and at --cfg-scale (4)
        scales = [json.loads((out / "evals" / Path(r["run"]).name / f"step-{step:08d}-cfg{g}" / "info.json")
                             .read_text())["cfg_scale"] for r in res["runs"] for g in (1, 4)]
        assert scales == [1.0, 4.0] * 3
    # the table and the plot come from the same numbers
    final = res["summary"]["DiT3"]["4"]["fid"]
    assert final["values"] == [res["runs"][0]["evals"]["4"]["cfg1"][study.FID]]
    md = (out / "results.md").read_text()
    assert all(f"| {m} |" in md for m in study.MIXERS)
    assert (out / "fid.png").read_bytes()[:4] == b"\x89PNG"
    spec = json.loads((out / "study.json").read_text())
    assert spec["updates"] == 4 and spec["budgets"] == [0.5, 1.0] and spec["samples"] == 10
    # the report names no path of this machine (issue #32): the study's own relative to it, the config to the repo
    assert absolute_paths(res) == [] and res["spec"]["config"] == "configs/study_digits.yaml"
    assert all(f"train/{Path(r['run']).name}" in res["seconds"] for r in res["runs"])


def test_committed_results_name_no_path_of_this_machine():
    results = ROOT / "benchmarks" / "results"
    paths = sorted(results.glob("study_*/*.json")) + sorted(results.glob("resolution/**/*.json"))
    assert len(paths) >= 6  # the digits study, its two ablations, the REPA study; the resolution study, crossover
    for path in paths:
        assert absolute_paths(json.loads(path.read_text())) == [], path
        assert "=/" not in path.read_text(), path  # nor as an override's value


def test_portable_paths_in_overrides():
    home, root = Path("/home/u"), Path("/home/u/repo")
    assert study_report.portable({"o": ["repa.encoder=/home/u/repo/runs/enc", "data.path=/home/u/d", "x=/opt/e"]},
                                 root, home) == {"o": ["repa.encoder=runs/enc", "data.path=~/d", "x=../../../opt/e"]}


def test_a_killed_study_resumes_its_run_and_reports_every_runs_training_time(quick, capsys):
    """kill -9 of the study while it trains a run, simulated: the run's last checkpoint is missing, its folder's
    clock holds what the study wrote until it died (KILLED seconds, more than any run takes here), and the
    study's state.json holds no training time (a killed study never got to record one there)."""
    out, argv = quick
    killed = 1000.0
    before = json.loads((out / "results.json").read_text())["seconds"]
    evals = sorted((out / "evals").rglob("metrics.json"))
    mtimes = [p.stat().st_mtime_ns for p in evals]
    # a run killed between its two checkpoints: only its last one is gone
    lr = json.loads((out / "study.json").read_text())["lrs"][0]
    run = out / "runs" / study.run_name("DiT", lr, 0)
    shutil.rmtree(run / "checkpoints" / "step-00000004")
    atomic_write_text(run / study_report.CLOCK, json.dumps({"segments": [killed]}))
    state = json.loads((out / "state.json").read_text())
    state["seconds"] = {k: v for k, v in state["seconds"].items() if not k.startswith("train/")}
    atomic_write_text(out / "state.json", json.dumps(state))
    study.main(argv)
    log = capsys.readouterr().out
    assert log.count("4 updates done before") == 2 and "training to 4 updates" in log
    assert "training to step 4 from step 2" in (out / "logs" / f"{run.name}.log").read_text().split("$ ")[-1]
    assert [p.stat().st_mtime_ns for p in evals] == mtimes  # no evaluation redone
    res = json.loads((out / "results.json").read_text())
    train = {k: v for k, v in res["seconds"].items() if k.startswith("train/")}
    assert sorted(train) == sorted(f"train/{Path(r['run']).name}" for r in res["runs"])  # every run's time
    assert killed < train[f"train/{run.name}"] < killed + 600  # the killed invocation and the resumed one
    assert {k: v for k, v in train.items() if run.name not in k} == \
        {k: v for k, v in before.items() if k.startswith("train/") and run.name not in k}
    assert f"{len(res['runs'])} training runs recorded" in (out / "results.md").read_text()


def test_a_training_runs_time_is_on_disk_while_it_runs(tmp_path, monkeypatch):
    """The clock is rewritten every CLOCK_S seconds while the script runs (so a kill -9 of the study loses at most
    that much), after the segments of earlier invocations; the script itself reads it mid-run here."""
    monkeypatch.setattr(study_scripts, "CLOCK_S", 0.05)
    run = tmp_path / "runs" / "DiT3-lr0.001-s0"
    run.mkdir(parents=True)
    clock = run / study_report.CLOCK
    clock.write_text(json.dumps({"segments": [5.0]}))  # an earlier, killed invocation
    code = f"import time; time.sleep(1.0); print(open({str(clock)!r}).read())"
    seconds = study_scripts.run_script([sys.executable, "-c", code], tmp_path / "log.txt", "a test",
                               clock=study_report.RunClock(run))
    seen = json.loads((tmp_path / "log.txt").read_text().splitlines()[-1])["segments"]
    assert seen[0] == 5.0 and 0.5 < seen[1] < seconds
    assert json.loads(clock.read_text())["segments"] == [5.0, pytest.approx(seconds, abs=0.05)]
    assert study_report.training_seconds(tmp_path) == {f"train/{run.name}": pytest.approx(5 + seconds, abs=0.05)}


def test_rerun_with_other_settings_is_refused(quick):
    out, argv = quick
    with pytest.raises(ConfigError, match=r"cfg_scale 4.0 -> 3.0"):
        study.main([*argv, "--cfg-scale", "3"])


def test_a_study_grows_by_new_seeds_and_lrs_only(tmp_path, capsys):
    """More seeds after the old ones, or more lrs (the sweep extended past its edge), extend a study; any other
    change (fewer or other seeds or lrs included) is refused."""
    s = study.Study(seeds=(0, 1), lrs=(1e-3, 2e-3))
    study.check_spec(s, tmp_path)
    study.check_spec(dataclasses.replace(s, seeds=(0, 1, 2)), tmp_path)
    assert "adding seeds [2]" in capsys.readouterr().out
    assert json.loads((tmp_path / "study.json").read_text())["seeds"] == [0, 1, 2]
    s = dataclasses.replace(s, seeds=(0, 1, 2), lrs=(1e-3, 2e-3, 4e-3))
    study.check_spec(s, tmp_path)
    assert "adding lrs [0.004]" in capsys.readouterr().out
    for other in (dict(seeds=(0, 1)), dict(seeds=(0, 2, 1)), dict(seeds=(0, 1, 2, 3), samples=7),
                  dict(lrs=(1e-3, 4e-3)), dict(lrs=(1e-3, 2e-3, 8e-3))):
        with pytest.raises(ConfigError, match="other settings"):
            study.check_spec(dataclasses.replace(s, **other), tmp_path)


def test_bad_arguments_say_what_to_do(tmp_path):
    with pytest.raises(ConfigError, match="fractions of the updates"):
        study.parse_args(["--budgets", "0", "1"])
    with pytest.raises(ConfigError, match="is not key=value"):
        study.parse_args(["optim.lr"])
    with pytest.raises(ConfigError, match="invalid choice: 'Mamba'"):  # argparse's own, in one line
        study.parse_args(["--mixers", "Mamba"])
    cfg = tmp_path / "nodigits.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"name": "DiT3-S/2", "image_size": 16}, "data": {"path": "x"}}))
    with pytest.raises(ConfigError, match="--fid-ref is needed"):
        study.resolve(study.parse_args(["--config", str(cfg)])[0])


class Started(Exception):
    """The study's first work began."""


@pytest.mark.parametrize("bad, message", [
    (["--seeds", "-1"], "--seeds -1: each seed must be an integer from 0"),
    (["--seeds", "0", "1", "0"], "--seeds names 0 twice"),
    (["--updates", "-5"], "--updates -5"),
    (["--lrs", "0"], "finite numbers > 0"),
    (["--samples", "2"], "--samples 2: the samples per evaluation"),
    (["--size", "S/3"], "unknown model.name 'DiT3-S/3'"),  # train_dit.py's own messages from here
    (["optim.lrr=1"], "unknown config key 'optim.lrr'.*Did you mean 'lr'"),
    (["optim.lr=-1"], "optim.lr=-1.0 is not accepted"),
    (["--sampler", "ddim"], "--sampler ddim does not sample.*objective=flow"),  # sample.py's from here
    (["--steps", "1"], "steps=1: a flow sampler's grid needs at least 2 points"),
    (["--fid-ref", "/nonexistent/val"], "--fid-ref /nonexistent/val does not exist"),
])
def test_a_refused_command_records_nothing_and_the_corrected_one_is_accepted(bad, message, tmp_path, monkeypatch):
    """Every argument, and every run's and evaluation's arguments (read by train_dit.py's and sample.py's own
    parsers, in this process), is checked before the study's first work (timing the mixers) and before its spec
    is recorded, so the corrected command is not refused as another study."""
    def started(*args, **kwargs):
        raise Started

    monkeypatch.setattr(study, "time_updates", started)
    out = tmp_path / "study"
    digits = f"data.path={tmp_path / 'digits16'}"
    with pytest.raises(ConfigError, match=message):
        study.main(["--quick", *bad, "--out", str(out), digits])
    assert not out.exists()
    with pytest.raises(Started):
        study.main(["--quick", "--out", str(out), digits])
    assert json.loads((out / "study.json").read_text())["seeds"] == [0]


def test_out_on_a_file_is_refused_and_an_unwritable_out_is_a_write_error(tmp_path, capsys, monkeypatch):
    """As the scripts: one line, exit code 2 (bad input) or 5 (cannot write). The tests run as root, whom chmod
    does not stop, so the unwritable folders are a path under a regular file (mkdir: ENOTDIR) and a folder
    whose writes fail with EACCES (the file writer monkeypatched), what a read-only folder gives a user."""
    file = tmp_path / "file"
    file.write_text("not a folder")
    digits = f"data.path={tmp_path / 'digits16'}"

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    for out, code, patch in ((file, 2, False), (file / "study", 5, False), (tmp_path / "ro", 5, True)):
        with monkeypatch.context() as m:
            if patch:
                m.setattr(study, "atomic_write_text", denied)
            with pytest.raises(SystemExit) as e:
                run_script(lambda: study.main(["--quick", "--out", str(out), digits]))
        err = capsys.readouterr().err
        assert e.value.code == code and len(err.strip().splitlines()) == 1 and str(out) in err, err
    assert file.read_text() == "not a folder"


def test_quick_sets_defaults_and_the_options_given_win():
    s = study.parse_args(["--quick"])[0]
    assert (s.seeds, s.updates, s.budgets, s.samples, s.steps, s.lrs) == ((0,), 4, (0.5, 1.0), 10, 2, ())
    s = study.parse_args(["--quick", "--seeds", "0", "1", "--updates", "6", "--lrs", "1e-3", "2e-3"])[0]
    assert (s.seeds, s.updates, s.lrs, s.samples) == ((0, 1), 6, (1e-3, 2e-3), 10)


def test_defaults_come_from_the_config(tmp_path):
    s = study.resolve(study.parse_args([f"data.path={tmp_path / 'digits16'}"])[0])
    cfg = yaml.safe_load((ROOT / "configs" / "study_digits.yaml").read_text())
    assert s.size == "S/2" and s.updates == cfg["max_steps"]
    assert s.lrs == (cfg["optim"]["lr"] / 2, cfg["optim"]["lr"], cfg["optim"]["lr"] * 2)
    assert Path(s.fid_ref).name == "val" and (Path(s.fid_ref).parent / "train").is_dir()
    assert study.budget_steps(s) == [round(b * s.updates) for b in s.budgets]
    tokens = (cfg["model"]["image_size"] // int(s.size.split("/")[1])) ** 2
    assert tokens >= 64  # the floor: fewer tokens say nothing about token mixing


def test_summary_is_mean_and_sample_std_over_seeds():
    runs = [{"mixer": "DiT3", "evals": {10: {"cfg1": {study.FID: f, "precision": 0.5, "recall": 0.4,
                                                      "digits_accuracy": a},
                                             "guided": {study.FID: 2 * f, "digits_accuracy": 1.0}}}}
            for f, a in ((3.0, 0.2), (5.0, 0.4), (10.0, 0.9))]
    s = study_report.summarize(runs)["DiT3"][10]
    assert s["fid"]["mean"] == pytest.approx(6.0) and s["fid"]["n"] == 3
    assert s["fid"]["std"] == pytest.approx(np.std([3.0, 5.0, 10.0], ddof=1))
    assert s["fid_guided"]["mean"] == pytest.approx(12.0)
    assert s["svc_unguided"]["std"] == pytest.approx(statistics.stdev([0.2, 0.4, 0.9]))
    assert study_report.choose_lr({1e-3: {"cfg1": {study.FID: 4.0}}, 2e-3: {"cfg1": {study.FID: 3.0}},
                                   4e-3: {"cfg1": {study.FID: 9.0}}}) == 2e-3


def test_update_step_follows_the_config_objective():
    """The timed update is the config's: DDPM's trains on a fixed batch; flow matching's first loss is
    E[(x1 - x0)^2] = 2 for standard-normal data and noise, since DiT's zero-initialised last layer
    predicts a velocity of 0 (SiT's linear path, velocity target x1 - x0)."""
    from bench_small import update_step

    cfg = yaml.safe_load((ROOT / "configs" / "study_digits.yaml").read_text())
    cfg["model"]["kwargs"] = {"hidden_size": 32, "depth": 1, "num_heads": 2}
    cfg["data"]["batch_size"] = 8  # 8 x 3 x 16 x 16 values: the mean of (x1 - x0)^2 is 2 +- 0.04
    step = update_step({**cfg, "objective": "ddpm"}, "DiT3-S/2")
    losses = [step().item() for _ in range(6)]
    assert losses[-1] < losses[0], losses
    step = update_step({**cfg, "objective": "flow"}, "DiT3-S/2")
    assert step().item() == pytest.approx(2.0, abs=0.15)


def test_a_sweep_run_stopped_early_is_the_prefix_of_the_longer_run():
    """The study continues the chosen lr's sweep run from the sweep budget to the end. With the study's
    schedule (warm-up, then constant) the lr of every update is the same whichever max_steps sizes the
    schedule; data order, RNG and EMA resume bit for bit (tests/scripts/test_train_dit.py's resume test)."""
    import torch

    from vit3 import engine

    o = yaml.safe_load((ROOT / "configs" / "study_digits.yaml").read_text())["optim"]
    cfg = engine.OptimConfig(lr=o["lr"], lr_batch=0, sched=o["sched"], warmup_epochs=o["warmup_epochs"],
                             warmup_lr=o["warmup_lr"])
    lrs = []
    for total in (500, 1000):
        opt, sched = engine.create_optimizer_and_scheduler(torch.nn.Linear(2, 2), cfg, 64, 22, total)
        lrs.append([])
        for k in range(500):
            sched.step_update(k)
            lrs[-1].append(opt.param_groups[0]["lr"])
    assert lrs[0] == lrs[1] and lrs[0][0] == o["warmup_lr"] and lrs[0][-1] == o["lr"]


@pytest.mark.subprocess
def test_a_run_dies_with_its_study(tmp_path):
    """kill -9 of the study ends the script it runs (SIGTERM, on which train_dit.py saves and stops), instead of
    leaving it to train on unrecorded and hold its run folder's lock against the rerun."""
    import signal
    import subprocess
    import time

    pid_file = tmp_path / "child.pid"
    child = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(120)"
    parent = (f"import sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); import study_scripts; "
              f"from pathlib import Path; study_scripts.run_script([sys.executable, '-c', {child!r}], "
              f"Path({str(tmp_path / 'log.txt')!r}), 'sleep')")
    study_proc = subprocess.Popen([sys.executable, "-c", parent])
    for _ in range(300):
        if pid_file.is_file() and pid_file.read_text():
            break
        time.sleep(0.1)
    pid = int(pid_file.read_text())
    os.kill(study_proc.pid, signal.SIGKILL)
    study_proc.wait()
    for _ in range(100):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.kill(pid, signal.SIGKILL)
        pytest.fail("the run outlived its study by 10 s")


def test_equal_minutes_give_each_mixer_the_updates_of_its_own_speed():
    """--minutes M: each mixer trains M x 60 s / its measured ms per update, to the nearest multiple of the
    budgets' quantum (at least one), its checkpoints at the budgets' shares of its own updates; without it every
    mixer has study.updates. A run whose budgets would put a checkpoint at nearly every update is refused."""
    s = study.Study(mixers=("DiT3", "DiT"), updates=10, minutes=2.0, budgets=(0.25, 0.5, 1.0))
    assert study.mixer_updates(s, {"DiT3": 200.0, "DiT": 100.0}) == {"DiT3": 600, "DiT": 1200}
    # 4607.1 updates fit (the resolution study's DiT3-LA at 52.1 ms in 4 min): 4608, a checkpoint every 1152
    assert study.mixer_updates(dataclasses.replace(s, minutes=4.0), {"DiT3": 52.095, "DiT": 100.0})["DiT3"] == 4608
    assert study.checkpoint_every(s, 4608) == 1152
    assert study.budget_quantum(dataclasses.replace(s, budgets=(1 / 3, 2 / 3, 1.0))) == 3
    assert study.mixer_updates(dataclasses.replace(s, minutes=0.0), {"DiT3": 200.0, "DiT": 100.0}) == \
        {"DiT3": 10, "DiT": 10}
    assert study.mixer_updates(dataclasses.replace(s, minutes=1e-6), {"DiT3": 200.0, "DiT": 100.0}) == \
        {"DiT3": 4, "DiT": 4}
    assert study.budget_steps(s, 600) == [150, 300, 600] and study.budget_steps(s) == [2, 5, 10]
    args = study.train_args(s, Path("/o"), "DiT", 1e-3, 0, 1200, 1200)
    assert "checkpoint.every_steps=300" in args and "max_steps=1200" in args
    with pytest.raises(ConfigError, match="--updates 4607 with --budgets 0.25 0.5 1: the budgets' checkpoints fall "
                                          "every 1 updates, 4607 checkpoints a run; give --updates a multiple of 4"):
        study.train_args(s, Path("/o"), "DiT", 1e-3, 0, 4607, 4607)
    for bad in ("-1", "nan"):
        with pytest.raises(ConfigError, match=f"--minutes {bad}: the training minutes of each mixer"):
            study.parse_args(["--quick", "--minutes", bad])


@pytest.mark.slow
def test_an_equal_minutes_study_reports_by_minutes(tmp_path, monkeypatch, capsys):
    """A quick study at equal wall clock (the time per update fixed here, as if measured): each mixer's runs end
    at its own updates, the report lists them and a table by minutes; a rerun after --retime keeps the runs."""
    ms = {"DiT3": 1500.0, "DiT": 1000.0}  # 0.1 min: 4 and 6 updates
    monkeypatch.setattr(study, "time_updates", lambda s, out, again=False: study.State(out).set("update_ms", ms) or ms)
    out = tmp_path / "study"
    argv = ["--quick", "--mixers", "DiT3", "DiT", "--minutes", "0.1", "--out", str(out),
            f"data.path={tmp_path / 'digits16'}", "threads=1"]
    study.main(argv)
    res = json.loads((out / "results.json").read_text())
    assert res["updates"] == {"DiT3": 4, "DiT": 6} and res["spec"]["minutes"] == 0.1
    assert {r["mixer"]: sorted(map(int, r["evals"])) for r in res["runs"]} == {"DiT3": [2, 4], "DiT": [3, 6]}
    md = (out / "results.md").read_text()
    assert "0.1 training minutes each" in md and "| 0.05 min | 0.1 min |" in md
    ms.update(DiT3=3000.0)  # measured again: the runs keep the lengths they started with
    study.main([*argv, "--retime"])
    assert json.loads((out / "results.json").read_text())["updates"] == {"DiT3": 4, "DiT": 6}
    assert capsys.readouterr().out.count("updates done before") >= 2


def test_every_finished_seed_is_reported_before_the_next_one_trains(tmp_path, monkeypatch):
    """A study killed while its second seed trains has the first seed's report on disk, marked partial; the same
    command then finishes it, and the report is whole."""
    ms = {"DiT3": 1500.0}
    monkeypatch.setattr(study, "time_updates", lambda s, out, again=False: study.State(out).set("update_ms", ms) or ms)
    out = tmp_path / "study"
    argv = ["--quick", "--mixers", "DiT3", "--seeds", "0", "1", "--minutes", "0.1", "--out", str(out),
            f"data.path={tmp_path / 'digits16'}", "threads=1"]
    train = study.train

    def killed_at_seed_1(*args, **kwargs):
        if args[5] == 1:
            raise KeyboardInterrupt
        return train(*args, **kwargs)

    monkeypatch.setattr(study, "train", killed_at_seed_1)
    with pytest.raises(KeyboardInterrupt):
        study.main(argv)
    res = json.loads((out / "results.json").read_text())
    assert [r["seed"] for r in res["runs"]] == [0]
    assert "**Partial**: seeds [0] of [0, 1] finished so far" in (out / "results.md").read_text()
    monkeypatch.setattr(study, "train", train)
    study.main(argv)
    res = json.loads((out / "results.json").read_text())
    assert [r["seed"] for r in res["runs"]] == [0, 1] and res["summary"]["DiT3"]["4"]["fid"]["n"] == 2
    assert "Partial" not in (out / "results.md").read_text()


def test_a_study_grows_to_a_whole_multiple_of_its_minutes(tmp_path, monkeypatch, capsys):
    """A finished equal-minutes study given k x its minutes (and the sweep's budget / k) trains every seed's run on
    from its last checkpoint to k x its updates; the sweep's runs and the evaluations done are kept. Another
    growth is refused, naming what to give."""
    ms = {"DiT3": 1500.0}  # 0.1 min: 4 updates
    monkeypatch.setattr(study, "time_updates", lambda s, out, again=False: study.State(out).set("update_ms", ms) or ms)
    out = tmp_path / "study"
    argv = ["--quick", "--mixers", "DiT3", "--lrs", "1e-3", "2e-3", "--budgets", "0.25", "0.5", "1",
            "--out", str(out), f"data.path={tmp_path / 'digits16'}", "threads=1"]
    study.main([*argv, "--minutes", "0.1", "--sweep-budget", "0.5"])
    run = out / "runs" / json.loads((out / "results.json").read_text())["runs"][0]["run"].split("/")[-1]
    kept = {p: p.stat().st_mtime_ns for p in (out / "evals").rglob("metrics.json")}
    for bad, message in ((["--minutes", "0.15", "--sweep-budget", "0.5"], r"whole factor \(--minutes 0.2, 0.3"),
                         (["--minutes", "0.2", "--sweep-budget", "0.5"], "give --sweep-budget 0.25")):
        with pytest.raises(ConfigError, match=message):
            study.main([*argv, *bad])
    capsys.readouterr()
    study.main([*argv, "--minutes", "0.2", "--sweep-budget", "0.25"])
    log = capsys.readouterr().out
    assert "growing" in log and log.count("updates done before") == 2  # the two sweep runs, at 2 updates
    assert "training to 8 updates" in log
    res = json.loads((out / "results.json").read_text())
    assert res["updates"] == {"DiT3": 8} and sorted(map(int, res["runs"][0]["evals"])) == [2, 4, 8]
    assert "resumed from" in (out / "logs" / f"{run.name}.log").read_text()  # from step 4, not trained anew
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())  # no evaluation done again
    assert (run / "checkpoints" / "step-00000008").is_dir()
    study.main([*argv, "--minutes", "0.2", "--sweep-budget", "0.25"])  # grown once: the rerun does nothing new
    assert json.loads((out / "results.json").read_text())["updates"] == {"DiT3": 8}


def test_the_timed_update_includes_repa_when_the_config_has_it(vit_file):
    """A study with repa.* overrides times the update its runs make: the projector is trained by the step and
    the encoder stays frozen."""
    import torch
    from bench_small import update_step

    cfg = yaml.safe_load((ROOT / "configs" / "study_digits.yaml").read_text())
    cfg["model"]["kwargs"] = {"hidden_size": 32, "depth": 2, "num_heads": 2}
    cfg["data"]["batch_size"] = 4
    cfg["repa"] = {"encoder": "test_vit", "encoder_file": str(vit_file), "depth": 1,
                   "coeff": 0.5, "projector_dim": 16}
    seen = {}
    import dit3.repa

    real = dit3.repa.Alignment.build
    dit3.repa.Alignment.build = classmethod(lambda cls, *a: seen.setdefault("a", real(*a)))
    try:
        step = update_step(cfg, "DiT-S/2")
    finally:
        dit3.repa.Alignment.build = real
    a = seen["a"]
    projector = [p.detach().clone() for p in a.aligned.projector.parameters()]
    encoder = [p.detach().clone() for p in a.encoder.parameters()]
    assert math.isfinite(step().item())
    assert any(not torch.equal(p, q) for p, q in zip(projector, a.aligned.projector.parameters()))
    assert all(torch.equal(p, q) for p, q in zip(encoder, a.encoder.parameters()))


def test_compare_studies_takes_the_seeds_both_ran():
    """compare_studies.py: per mixer and budget, the mean ± sample std of each metric over the seeds both studies
    ran (a one-seed study against the same seed of a three-seed one), against statistics' own."""
    import compare_studies

    def run(mixer, seed, fid, svc):
        e = {study.FID: fid, "digits_accuracy": svc}
        return {"mixer": mixer, "seed": seed, "evals": {"4": {"cfg1": e, "guided": e}}}

    a = {"spec": {"mixers": ["DiT3", "DiT"]}, "runs": [run("DiT3", s, 1.0 + s, 0.5) for s in (0, 1, 2)]
         + [run("DiT", 0, 9.0, 0.25)]}
    b = {"spec": {"mixers": ["DiT3"]}, "runs": [run("DiT3", 0, 0.5, 0.75), run("DiT3", 2, 0.7, 0.75)]}
    lines = compare_studies.table(a, b, ("base", "repa"))
    assert len(lines) == 3  # DiT3 only (b has no DiT), one budget
    row = lines[2].split(" | ")
    assert row[:3] == ["| DiT3", "4", "[0, 2]"]
    assert row[3] == f"{statistics.fmean([1.0, 3.0]):.3g} ± {statistics.stdev([1.0, 3.0]):.2g}"
    assert row[4] == f"{0.6:.3g} ± {statistics.stdev([0.5, 0.7]):.2g}" and row[6].startswith("75")


def test_compare_studies_takes_a_judges_accuracy_where_the_study_has_one():
    """On the glyphs the class accuracy is the judge's (class_accuracy), not the digits' SVC's."""
    import compare_studies

    e = {study.FID: 2.0, "class_accuracy": 0.5}
    res = {"spec": {"mixers": ["DiT3"]}, "runs": [{"mixer": "DiT3", "seed": 0,
                                                   "evals": {"4": {"cfg1": e, "guided": e}}}]}
    lines = compare_studies.table(res, res, ("a", "b"))
    assert "judge unguided (a)" in lines[0] and "SVC" not in lines[0]
    assert lines[2].split(" | ")[5:7] == ["50", "50"]  # the judge's 0.5, in %


def test_compare_studies_plot_draws_both_studies(tmp_path):
    """compare_studies.py --plot: a line per mixer and study, at the updates and minutes of each study's own time
    per update."""
    import compare_studies
    import matplotlib.pyplot as plt

    def res(ms, fids):
        runs = [{"mixer": "DiT3", "seed": s, "evals": {str(k): {"cfg1": {study.FID: f}, "guided": {
            study.FID: f, "digits_accuracy": 0.5}} for k, f in fids.items()}} for s in (0, 1)]
        return {"spec": {"mixers": ["DiT3"]}, "update_ms": {"DiT3": ms}, "runs": runs}

    drawn = {}
    real = plt.Figure.savefig
    plt.Figure.savefig = lambda fig, path, **kw: drawn.setdefault("lines", [
        (ax.get_xlabel(), line.get_label(), list(line.get_xdata()), list(line.get_ydata()))
        for ax in fig.axes if ax.get_ylabel().startswith("FID") for line in ax.get_lines()])
    try:
        compare_studies.plot(res(120.0, {500: 8.0, 1000: 2.0}), res(180.0, {500: 6.0, 1000: 1.0}), ("a", "b"),
                             tmp_path / "c.png")
    finally:
        plt.Figure.savefig = real
    fid = {(xl.split()[1], label): (x, y) for xl, label, x, y in drawn["lines"]}
    assert fid["updates", "DiT3, a"] == ([500, 1000], [8.0, 2.0])
    assert fid["minutes", "DiT3, b"] == (pytest.approx([1.5, 3.0]), [6.0, 1.0])  # 500 x 180 ms = 1.5 min


def test_crossover_reads_each_curve_at_equal_minutes():
    """crossover.py against hand-worked numbers: FID read linearly in log FID at the common minutes, the minutes
    to the worst final FID, and the ratios to DiT³."""
    import crossover

    def run(mixer, seed, fids):
        return {"mixer": mixer, "seed": seed, "evals": {str(k): {"cfg1": {study.FID: f}} for k, f in fids.items()}}

    res = {"spec": {"size": "S/2", "minutes": 0.0, "updates": 1000}, "updates": None,
           "update_ms": {"DiT3": 120.0, "DiT": 60.0},  # 1000 updates: DiT3 2 min, DiT 1 min
           "runs": [run("DiT3", 0, {500: 10.0, 1000: 1.0}), run("DiT3", 1, {500: 10.0, 1000: 1.0}),
                    run("DiT", 0, {500: 20.0, 1000: 4.0}), run("DiT", 1, {500: 20.0, 1000: 4.0})],
           "summary": {"DiT3": {}, "DiT": {}}}
    p = crossover.point(res, {"model": {"image_size": 32}})
    assert p["tokens"] == 256 and p["minutes"] == 1.0 and p["target_fid"] == 4.0
    assert p["mixers"]["DiT3"]["fid"] == pytest.approx(10.0) and p["mixers"]["DiT"]["fid"] == pytest.approx(4.0)
    need = 1 + math.log(10 / 4) / math.log(10)  # DiT3 falls from 10 at 1 min to 1 at 2 min
    assert p["mixers"]["DiT3"]["minutes_to_target"] == pytest.approx(need)
    assert p["mixers"]["DiT"]["minutes_ratio"] == pytest.approx(1.0 / need)
    assert p["mixers"]["DiT"]["speed_ratio"] == 0.5
    assert crossover.at([(1.0, 10.0), (3.0, 1000.0)], 2.0) == pytest.approx(100.0)
    assert crossover.minutes_to([(1.0, 10.0), (2.0, 5.0)], 1.0) is None
    # an equal-minutes study is read at its own minutes
    res["spec"]["minutes"] = 0.5
    assert crossover.point(res, {"model": {"image_size": 64}})["mixers"]["DiT"]["fid"] == pytest.approx(20.0)
    # the table gives a spread over seeds, and says where there is one seed, not "± 0"
    res["spec"]["minutes"], res["runs"][0]["evals"]["500"]["cfg1"][study.FID] = 0.0, 30.0
    row = crossover.markdown([crossover.point(res, {"model": {"image_size": 32}})]).splitlines()[2].split(" | ")
    assert row[3] == f"{statistics.fmean([10.0, 30.0]):.3g} ± {statistics.stdev([10.0, 30.0]):.2g}"
    res["runs"] = [r for r in res["runs"] if r["seed"] == 0]
    row = crossover.markdown([crossover.point(res, {"model": {"image_size": 32}})]).splitlines()[2].split(" | ")
    assert row[3:5] == ["30 (1 seed)", "4 (1 seed)"]
