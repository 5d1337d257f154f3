"""The quality study (benchmarks/study.py): its quick mode end to end, its resume and its report's math."""
import dataclasses
import json
import math
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


def test_rerun_skips_what_is_done_and_resumes_a_killed_run(quick, capsys):
    out, argv = quick
    state = json.loads((out / "state.json").read_text())
    evals = sorted((out / "evals").rglob("metrics.json"))
    mtimes = [p.stat().st_mtime_ns for p in evals]
    # a run killed between its two checkpoints: only its last one is gone
    lr = json.loads((out / "study.json").read_text())["lrs"][0]
    run = out / "runs" / study.run_name("DiT", lr, 0)
    shutil.rmtree(run / "checkpoints" / "step-00000004")
    study.main(argv)
    log = capsys.readouterr().out
    assert log.count("4 updates done before") == 2 and "training to 4 updates" in log
    assert "training to step 4 from step 2" in (out / "logs" / f"{run.name}.log").read_text().split("$ ")[-1]
    assert [p.stat().st_mtime_ns for p in evals] == mtimes  # no evaluation redone
    after = json.loads((out / "state.json").read_text())["seconds"]
    assert {k: v for k, v in after.items() if k.startswith("train/") and run.name not in k} == \
        {k: v for k, v in state["seconds"].items() if k.startswith("train/") and run.name not in k}


def test_rerun_with_other_settings_is_refused(quick):
    out, argv = quick
    with pytest.raises(SystemExit, match=r"cfg_scale 4.0 -> 3.0"):
        study.main([*argv, "--cfg-scale", "3"])


def test_a_study_grows_by_new_seeds_only(tmp_path, capsys):
    """More seeds after the old ones extend a study; any other change (fewer or other seeds included) is refused."""
    s = study.Study(seeds=(0, 1))
    study.check_spec(s, tmp_path)
    study.check_spec(dataclasses.replace(s, seeds=(0, 1, 2)), tmp_path)
    assert "adding seeds [2]" in capsys.readouterr().out
    assert json.loads((tmp_path / "study.json").read_text())["seeds"] == [0, 1, 2]
    for other in (dict(seeds=(0, 1)), dict(seeds=(0, 2, 1)), dict(seeds=(0, 1, 2, 3), samples=7)):
        with pytest.raises(SystemExit, match="other settings"):
            study.check_spec(dataclasses.replace(s, **other), tmp_path)


def test_bad_arguments_say_what_to_do(tmp_path, capsys):
    with pytest.raises(SystemExit):
        study.parse_args(["--budgets", "0", "1"])
    assert "fractions of the updates" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        study.parse_args(["optim.lr"])
    assert "is not key=value" in capsys.readouterr().err
    cfg = tmp_path / "nodigits.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"name": "DiT3-S/2", "image_size": 16}, "data": {"path": "x"}}))
    with pytest.raises(SystemExit, match="--fid-ref is needed"):
        study.resolve(study.parse_args(["--config", str(cfg)])[0])


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
