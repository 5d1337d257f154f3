"""Two studies of benchmarks/study.py side by side: each metric of each mixer at each budget, over the seeds
both studies ran (REPA against none, one recipe against another), as a markdown table and a plot.

    python benchmarks/compare_studies.py benchmarks/results/study_digits benchmarks/results/study_repa_digits \\
        --names "no REPA" "REPA" --plot compare.png > table.md

A study's results.json holds every evaluation of every run; the table takes, per mixer, the runs whose seeds
both studies have, so a one-seed study is compared with the same seed of a three-seed one.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from study_report import METRICS, PERCENT, TITLES


def values(res: dict, mixer: str, seeds: set, step: int, metric: str) -> list[float]:
    where, key = METRICS[metric]
    evals = [r["evals"][str(step)][where] for r in res["runs"]
             if r["mixer"] == mixer and r["seed"] in seeds and str(step) in r["evals"]]
    return [e[key] for e in evals if key in e]


def accuracy(res: dict) -> str:
    """The study's class accuracy: "svc" (the digits' SVC), or "acc" (a judge, e.g. on the glyphs)."""
    keys = {k for r in res["runs"] for e in r["evals"].values() for k in e["guided"]}
    return "acc" if "class_accuracy" in keys and "digits_accuracy" not in keys else "svc"


def cell(v: list[float], pct: bool) -> str:
    if not v:
        return "-"
    f = 100 if pct else 1
    mean = f * statistics.fmean(v)
    return f"{mean:.3g} ± {f * statistics.stdev(v):.2g}" if len(v) > 1 else f"{mean:.3g}"


def table(a: dict, b: dict, names: tuple[str, str]) -> list[str]:
    acc = accuracy(a)
    metrics = ("fid", f"{acc}_unguided", "fid_guided", f"{acc}_guided")
    lines = ["| mixer | updates | seeds | " + " | ".join(f"{TITLES[m]} ({n})" for m in metrics for n in names) + " |",
             "|---|---:|---|" + "---:|" * (2 * len(metrics))]
    for mixer in [m for m in a["spec"]["mixers"] if m in b["spec"]["mixers"]]:
        seeds = ({r["seed"] for r in a["runs"] if r["mixer"] == mixer}
                 & {r["seed"] for r in b["runs"] if r["mixer"] == mixer})
        steps = sorted({int(s) for r in a["runs"] if r["mixer"] == mixer for s in r["evals"]}
                       & {int(s) for r in b["runs"] if r["mixer"] == mixer for s in r["evals"]})
        for step in steps:
            cells = [cell(values(res, mixer, seeds, step, m), pct=m in PERCENT) for m in metrics
                     for res in (a, b)]
            lines.append(f"| {mixer} | {step} | {sorted(seeds)} | " + " | ".join(cells) + " |")
    return lines


def plot(a: dict, b: dict, names: tuple[str, str], path: Path):
    """Unguided FID and guided class accuracy against updates and against training minutes (each study's own
    measured time per update): a colour per mixer, solid for the first study, dashed for the second; a band of
    ± one std over the seeds both ran."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8.4))
    acc = f"{accuracy(a)}_guided"
    mixers = [m for m in a["spec"]["mixers"] if m in b["spec"]["mixers"]]
    for i, mixer in enumerate(mixers):
        seeds = ({r["seed"] for r in a["runs"] if r["mixer"] == mixer}
                 & {r["seed"] for r in b["runs"] if r["mixer"] == mixer})
        for res, name, style in ((a, names[0], "-"), (b, names[1], "--")):
            steps = sorted({int(s) for r in res["runs"] if r["mixer"] == mixer and r["seed"] in seeds
                            for s in r["evals"]})
            ms = res["update_ms"][mixer]
            for row, metric in ((0, "fid"), (1, acc)):
                pts = [(s, values(res, mixer, seeds, s, metric)) for s in steps]
                pts = [(s, v) for s, v in pts if v]
                if not pts:
                    continue
                f = 100 if metric in PERCENT else 1
                mean = [f * statistics.fmean(v) for _, v in pts]
                std = [f * statistics.stdev(v) if len(v) > 1 else 0.0 for _, v in pts]
                for col, x in enumerate(([s for s, _ in pts], [s * ms / 60e3 for s, _ in pts])):
                    ax = axes[row, col]
                    ax.plot(x, mean, style, marker="o", color=f"C{i}", label=f"{mixer}, {name}")
                    ax.fill_between(x, [m - d for m, d in zip(mean, std)], [m + d for m, d in zip(mean, std)],
                                    color=f"C{i}", alpha=0.15)
    for col, xl in enumerate(("training updates", "training minutes on this machine (time per update x updates)")):
        axes[0, col].set(xlabel=xl, ylabel="FID, unguided (lower is better)", yscale="log")
        axes[1, col].set(xlabel=xl, ylabel=f"{TITLES[acc]}, % of samples of the class asked")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{names[0]} (solid) against {names[1]} (dashed): mean, band = ± one std over the seeds both ran")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("studies", nargs=2, help="two study folders (or their results.json)")
    p.add_argument("--names", nargs=2, default=("A", "B"))
    p.add_argument("--plot", default="", help="also write the curves of both studies into this PNG")
    args = p.parse_args(argv)
    a, b = (json.loads((Path(s) / "results.json" if Path(s).is_dir() else Path(s)).read_text()) for s in args.studies)
    print("\n".join(table(a, b, tuple(args.names))))
    if args.plot:
        plot(a, b, tuple(args.names), Path(args.plot))


if __name__ == "__main__":
    main()
