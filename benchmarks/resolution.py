"""DiT³ against DiT and linear attention as the tokens per image grow, at equal wall clock: benchmarks/study.py at
each image size of the glyphs, one judge for all, then the crossover figure and the samples side by side.

    python benchmarks/resolution.py                       # 32 and 64 px (256, 1024 tokens), CPU, alone
    python benchmarks/resolution.py --quick --sizes 16 32 --data-root /tmp/glyphs   # seconds: the orchestration
    python benchmarks/resolution.py --sizes 32 --minutes 4 --seeds 0 1 --samples 100 \
        --lrs 7.5e-4 1.5e-3 3e-3 6e-3 1.2e-2                                   # what ran: 256 tokens,
    python benchmarks/resolution.py --sizes 64 --minutes 12 --seeds 0 1 --samples 100 \
        --lrs 1.5e-3 3e-3 6e-3 1.2e-2                                          # then 1024, into the same --out,
    python benchmarks/resolution.py --sizes 64 --minutes 24 --seeds 0 1 --samples 100 \
        --lrs 1.5e-3 3e-3 6e-3 1.2e-2 --sweep-budget 0.25                      # grown to 24 min (sweep kept)
    python benchmarks/resolution.py data.demo=glyphs --out results/resolution-colour   # the glyphs in colour

Into --out (default results/resolution; benchmarks/results/resolution holds the committed reports):
- classifier/: the glyphs' judge, configs/vit3_glyphs.yaml trained once at 32 px on the real train split, its val
  top-1 in its metrics.jsonl; it gives every size's FID features and class accuracy (samples resized to 32 px);
- px<size>/: the study at that size (study.py's folder: resumable, a rerun skips what is done; --minutes per
  size: each mixer trains those minutes at its own measured time per update, so a faster mixer trains longer);
- crossover.{png,json,md}: benchmarks/crossover.py over every size studied in --out (this command's and earlier
  ones', so sizes studied one at a time, each with its own --lrs, come together) and --digits (the 64-token
  digits study);
- samples.png: every mixer's seed-0 run at every size studied in --out, at the end of its minutes, the same
  classes and noise.
Options after the known ones (--lrs, --samples, --cfg-scale, key=value, ...) reach every size's study.py.
A killed run: rerun the same command.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import crossover  # noqa: E402
import study  # noqa: E402
from study_scripts import run_script  # noqa: E402

from vit3.errors import ConfigError  # noqa: E402

CONFIG = ROOT / "configs" / "study_glyphs.yaml"
GRID_CLASSES = list(range(10))
# the default --sizes' budgets, those of the study that ran (benchmarks/README.md); from the calibration: at 256
# tokens SiT's guided samples were 81% right after 2.1 min; at 1024 tokens DiT³'s 34% after 8.7 min, 90% some
# 22-27 min away
MINUTES = [4.0, 24.0]


def parse_args(argv=None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--config", default=str(CONFIG), help="the base train_dit.py config (a data.demo: glyphs one)")
    p.add_argument("--sizes", nargs="+", type=int, default=[32, 64],
                   help="image sizes in pixels (tokens at patch 2: (size / 2)^2)")
    p.add_argument("--minutes", nargs="+", type=float,
                   help=f"training minutes of each mixer at each size, one per --sizes (default {MINUTES}; quick: "
                        "1e-3 each)")
    p.add_argument("--out", default=str(ROOT / "results" / "resolution"), help="the study folder (checkpoints: big)")
    p.add_argument("--data-root", default="", help="the glyphs folders <root>/<demo><size> ('' = ~/.cache/vit3)")
    p.add_argument("--digits", default=str(ROOT / "benchmarks" / "results" / "study_digits"),
                   help="a digits study folder: the 64-token point of the crossover ('' for none)")
    p.add_argument("--quick", action="store_true", help="study.py --quick at every size, 1 minute of 1e-3")
    a, rest = p.parse_known_args(argv)
    if a.minutes is None:
        a.minutes = [1e-3] * len(a.sizes) if a.quick else MINUTES
    if len(a.minutes) != len(a.sizes):
        raise ConfigError(f"--minutes gives {len(a.minutes)} budgets for {len(a.sizes)} --sizes: one per size")
    for o in rest:
        if o in ("--config", "--out", "--minutes", "--feature-extractor"):
            raise ConfigError(f"{o} is set per size by resolution.py: give it to resolution.py itself, or run "
                              "benchmarks/study.py for one size")
    return a, rest


def size_argv(a, rest: list[str], size: int, minutes: float, judge: Path | None) -> list[str]:
    """study.py's arguments for the study at `size`: the key=value overrides first, so that none is read as one
    more value of an option given last (--mixers DiT3 DiT threads=1)."""
    overrides = [o for o in rest if not o.startswith("-") and "=" in o]
    options = [o for o in rest if o not in overrides]
    if a.data_root:  # the demo's folder at this size under --data-root, as train_dit.py names it in the cache
        demo = study.demo(study.Study(config=str(Path(a.config).resolve()), overrides=tuple(overrides)))
        overrides = [f"data.path={Path(a.data_root).resolve() / f'{demo}{size}'}", *overrides]
    return (["--config", a.config, f"model.image_size={size}", *overrides,
             "--out", str(Path(a.out) / f"px{size}"), "--minutes", str(minutes),
             *(["--feature-extractor", str(judge)] if judge else []), *(["--quick"] if a.quick else []), *options])


def train_judge(a, rest: list[str]) -> Path:
    """The glyphs' judge, trained once into <out>/classifier by study.py's own code (a 32 px study's)."""
    first, out, launcher, _ = study.parse_args(size_argv(a, rest, 32, 1.0, None))
    return Path(study.train_classifier(first, Path(a.out), launcher))


def sample_grids(a, sizes: list[int], launcher: list[str]) -> Path:
    """samples.png: a row per mixer, a column per size: each seed-0 run's last checkpoint, guided as its study's
    guided evaluation, classes 0-9 twice, the same noise everywhere. A grid is named by its checkpoint, so a study
    grown to more minutes draws its new last one (not the grid drawn before it grew)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    out = Path(a.out)
    cells, specs = {}, {}
    for size in sizes:
        spec = json.loads((out / f"px{size}" / "results.json").read_text())
        for r in (r for r in spec["runs"] if r["seed"] == spec["spec"]["seeds"][0]):
            run = out / f"px{size}" / r["run"]
            updates = max(map(int, r["evals"]))  # the run's last budget: its end
            png = out / "grids" / f"px{size}-{r['mixer']}-step{updates}.png"
            if not png.is_file():
                s = spec["spec"]
                cmd = [*launcher, str(ROOT / "sample.py"), "--ckpt", str(run / "checkpoints" / f"step-{updates:08d}"),
                       "--classes", *map(str, GRID_CLASSES), "--per-class", "2", "--cfg-scale", str(s["cfg_scale"]),
                       "--steps", str(s["steps"]), "--sampler", s["sampler"], "--out", str(png)]
                run_script(cmd, out / "logs" / "grids.log", f"the sample grid of {run.name} at {size} px")
            cells[size, r["mixer"]] = (png, updates)
        specs[size] = spec
    mixers = list(dict.fromkeys(m for _, m in cells))
    fig, axes = plt.subplots(len(mixers), len(sizes), figsize=(6.5 * len(sizes), 0.6 + 1.8 * len(mixers)),
                             squeeze=False)
    for i, m in enumerate(mixers):
        for j, size in enumerate(sizes):
            ax = axes[i, j]
            ax.axis("off")
            if (size, m) in cells:
                png, updates = cells[size, m]
                ax.imshow(Image.open(png))
                ax.set_title(f"{m}, {size} px ({crossover.tokens(specs[size], {'model': {'image_size': size}})} tokens)"
                             f", {updates} updates", fontsize=9)
    fig.suptitle("the same classes and noise for every mixer,\nat the end of equal training minutes", fontsize=10)
    fig.tight_layout()
    path = out / "samples.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def studied_sizes(out: Path) -> list[int]:
    """The image sizes with a finished study in `out` (px<size>/results.json), smallest first."""
    return sorted(int(p.parent.name[2:]) for p in out.glob("px*/results.json") if p.parent.name[2:].isdigit())


def main(argv=None):
    a, rest = parse_args(argv)
    for size, minutes in zip(a.sizes, a.minutes):  # every size's arguments checked before the first work
        given, out, _, _ = study.parse_args(size_argv(a, rest, size, minutes, None))
        if not study.demo(given).startswith("glyphs"):
            raise ConfigError(f"--config {a.config} trains on data.demo={study.demo(given)!r}: the resolution study "
                              "draws the glyphs at each size (data.demo: glyphs, glyphs_mono or glyphs_plain), as "
                              "configs/study_glyphs.yaml")
        study.check_runs(study.resolve(given), given, out)
    judge = train_judge(a, rest)
    for size, minutes in zip(a.sizes, a.minutes):
        print(f"resolution: {size} px, {(size // 2) ** 2} tokens, {minutes:g} minutes each", flush=True)
        study.main(size_argv(a, rest, size, minutes, judge))
    sizes = studied_sizes(Path(a.out))
    folders = ([Path(a.digits)] if a.digits else []) + [Path(a.out) / f"px{s}" for s in sizes]
    crossover.write(folders, Path(a.out) / "crossover")
    _, _, launcher, _ = study.parse_args(size_argv(a, rest, a.sizes[0], a.minutes[0], judge))
    grids = sample_grids(a, sizes, launcher)
    print(f"resolution: done; {Path(a.out) / 'crossover.md'}, {Path(a.out) / 'crossover.png'}, {grids}", flush=True)


if __name__ == "__main__":
    from vit3.engine.script import run_script as script_main

    script_main(main)
