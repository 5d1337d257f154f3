"""The resolution study (benchmarks/resolution.py): its quick mode end to end on tiny glyph folders (one judge,
a study per size at equal minutes, the crossover figure, the sample grids), its rerun, its bad input."""
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import resolution  # noqa: E402

from vit3.errors import ConfigError  # noqa: E402
from vit3.glyphs import prepare_glyphs  # noqa: E402


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resolution")
    for size in (16, 32):  # 2 train and 1 val glyph per class: the judge's (32 px) and each study's data
        prepare_glyphs(tmp / "data" / f"glyphs_plain{size}", size, train_per_class=2, val_per_class=1, style="plain")
    argv = ["--quick", "--sizes", "16", "32", "--data-root", str(tmp / "data"), "--out", str(tmp / "out"),
            "--digits", "", "--mixers", "DiT3", "DiT", "threads=1", "data.batch_size=8"]
    resolution.main(argv)
    return tmp / "out", argv


def test_one_judge_a_study_per_size_the_crossover_and_the_grids(quick):
    out, _ = quick
    assert (out / "classifier" / "config.yaml").is_file()  # the judge, trained once at 32 px
    for size, tokens in ((16, 64), (32, 256)):
        res = json.loads((out / f"px{size}" / "results.json").read_text())
        # each mixer the updates that fit 60 ms at its own speed, to a multiple of 2 (quick budgets: 0.5 1)
        assert res["spec"]["minutes"] == 1e-3
        assert res["updates"] == {m: 2 * max(1, round(60 / ms / 2)) for m, ms in res["update_ms"].items()}
        assert res["judge"]["path"].endswith("classifier") and {r["mixer"] for r in res["runs"]} == {"DiT3", "DiT"}
        for r in res["runs"]:
            for evals in r["evals"].values():
                for where in ("cfg1", "guided"):  # the judge labels every sample: class accuracy
                    assert 0 <= evals[where]["class_accuracy"] <= 1
                    assert (ROOT / evals[where]["class_judge"]).resolve() == (out / "classifier").resolve()
        for r in res["runs"]:  # each run trained at its study's size (quick: the config's lr, 1.5e-3)
            assert (out / f"px{size}" / r["run"] / "config.yaml").read_text().count(f"image_size: {size}") == 1
        assert {r["run"] for r in res["runs"]} == {"runs/DiT3-lr0.0015-s0", "runs/DiT-lr0.0015-s0"}
        for mixer in ("DiT3", "DiT"):
            assert (out / "grids" / f"px{size}-{mixer}-step{res['updates'][mixer]}.png").is_file()
    points = json.loads((out / "crossover.json").read_text())
    assert [p["tokens"] for p in points] == [64, 256]
    assert all(p["mixers"]["DiT3"]["minutes_ratio"] == 1.0 for p in points if p["mixers"]["DiT3"]["minutes_ratio"])
    assert (out / "crossover.png").is_file() and (out / "samples.png").is_file()
    assert "| 256 | 32 |" in (out / "crossover.md").read_text()


def test_crossover_names_each_points_own_study_whatever_the_order(quick, tmp_path):
    import crossover

    out, _ = quick
    points = crossover.write([out / "px32", out / "px16"], tmp_path / "x")  # sorted by tokens on the way
    assert [(p["tokens"], Path(p["study"]).name) for p in points] == [(64, "px16"), (256, "px32")]


def test_a_rerun_trains_nothing_again(quick, capsys):
    out, argv = quick
    before = {p: p.stat().st_mtime_ns for p in out.glob("px*/runs/*/checkpoints/*/*")}
    resolution.main(argv)
    assert "done before" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in out.glob("px*/runs/*/checkpoints/*/*")} == before


def test_a_size_studied_alone_joins_the_earlier_sizes_in_the_report(quick, tmp_path):
    """Sizes studied one command at a time (each with its own --lrs) come together: the crossover and the grids
    cover every size with a finished study in --out, not only the sizes of the last command."""
    from PIL import Image

    out, argv = quick
    assert argv[1:4] == ["--sizes", "16", "32"]
    one = [argv[0], "--sizes", "32", *argv[4:]]  # the fixture's command at 32 px only
    (out / "crossover.json").unlink()
    (out / "samples.png").unlink()
    resolution.main(one)
    assert [p["tokens"] for p in json.loads((out / "crossover.json").read_text())] == [64, 256]
    width = Image.open(out / "samples.png").size[0]
    assert width == round(6.5 * 2 * 110)  # a column per size: 16 and 32 px
    assert resolution.studied_sizes(out) == [16, 32] and resolution.studied_sizes(tmp_path) == []


def test_a_grown_study_draws_its_new_last_checkpoint(quick, tmp_path):
    """A size's study grown to twice its minutes trains on, and samples.png draws each run's new end (a grid drawn
    before the study grew is not taken for it). Grown in place (the study names its judge by path), then put back
    as the fixture made it."""
    import shutil

    out, argv = quick
    shutil.copytree(out, tmp_path / "kept")
    try:
        before = json.loads((out / "px32" / "results.json").read_text())["updates"]
        resolution.main([argv[0], "--sizes", "32", "--minutes", "2e-3", *argv[4:]])
        res = json.loads((out / "px32" / "results.json").read_text())
        assert res["updates"] == {m: 2 * n for m, n in before.items()}
        for m, n in res["updates"].items():
            assert (out / "grids" / f"px32-{m}-step{n}.png").is_file()
            assert (out / "grids" / f"px32-{m}-step{n // 2}.png").is_file()  # the grid of before, kept
    finally:
        shutil.rmtree(out)
        shutil.move(tmp_path / "kept", out)


def test_bad_input_is_one_line_before_any_work(tmp_path):
    base = ["--out", str(tmp_path / "out"), "--digits", ""]
    with pytest.raises(ConfigError, match="--minutes gives 1 budgets for 2 --sizes"):
        resolution.main([*base, "--sizes", "32", "64", "--minutes", "5"])
    with pytest.raises(ConfigError, match="--feature-extractor is set per size by resolution.py"):
        resolution.main([*base, "--feature-extractor", str(tmp_path)])
    with pytest.raises(ConfigError, match="draws the glyphs at each size"):
        resolution.main([*base, "--config", str(ROOT / "configs" / "study_digits.yaml"), "--sizes", "16",
                         "--minutes", "1"])
    with pytest.raises(ConfigError, match="multiples of 8"):
        resolution.main([*base, "--sizes", "36", "--minutes", "1", "--data-root", str(tmp_path)])
    assert not (tmp_path / "out").exists()


def test_each_size_reads_its_own_folder_of_the_demo_asked_for(tmp_path):
    """--data-root: the study at each size trains on <root>/<demo><size> (glyphs, glyphs_mono or glyphs_plain),
    and key=value overrides come before the options, so that none is read as a value of an option given last."""
    a, rest = resolution.parse_args(["--data-root", str(tmp_path), "--mixers", "DiT3", "DiT", "data.demo=glyphs"])
    argv = resolution.size_argv(a, rest, 64, 2.0, tmp_path / "judge")
    assert f"data.path={tmp_path.resolve() / 'glyphs64'}" in argv and "model.image_size=64" in argv
    assert argv.index("data.demo=glyphs") < argv.index("--mixers") and argv[-2:] == ["DiT3", "DiT"]
    assert argv[argv.index("--feature-extractor") + 1] == str(tmp_path / "judge")
    a, rest = resolution.parse_args(["--data-root", str(tmp_path)])  # the config's: the plain glyphs
    assert f"data.path={tmp_path.resolve() / 'glyphs_plain32'}" in resolution.size_argv(a, rest, 32, 2.0, None)
