"""Two studies of benchmarks/study.py side by side: each metric of each mixer at each budget, over the seeds
both studies ran (REPA against none, one recipe against another), as a markdown table.

    python benchmarks/compare_studies.py benchmarks/results/study_digits benchmarks/results/study_repa_digits \\
        --names "no REPA" "REPA" > table.md

A study's results.json holds every evaluation of every run; the table takes, per mixer, the runs whose seeds
both studies have, so a one-seed study is compared with the same seed of a three-seed one.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from study_report import METRICS, TITLES


def values(res: dict, mixer: str, seeds: set, step: int, metric: str) -> list[float]:
    where, key = METRICS[metric]
    evals = [r["evals"][str(step)][where] for r in res["runs"]
             if r["mixer"] == mixer and r["seed"] in seeds and str(step) in r["evals"]]
    return [e[key] for e in evals if key in e]


def cell(v: list[float], pct: bool) -> str:
    if not v:
        return "-"
    f = 100 if pct else 1
    mean = f * statistics.fmean(v)
    return f"{mean:.3g} ± {f * statistics.stdev(v):.2g}" if len(v) > 1 else f"{mean:.3g}"


def table(a: dict, b: dict, names: tuple[str, str]) -> list[str]:
    metrics = ("fid", "svc_unguided", "fid_guided", "svc_guided")
    lines = ["| mixer | updates | seeds | " + " | ".join(f"{TITLES[m]} ({n})" for m in metrics for n in names) + " |",
             "|---|---:|---|" + "---:|" * (2 * len(metrics))]
    for mixer in [m for m in a["spec"]["mixers"] if m in b["spec"]["mixers"]]:
        seeds = ({r["seed"] for r in a["runs"] if r["mixer"] == mixer}
                 & {r["seed"] for r in b["runs"] if r["mixer"] == mixer})
        steps = sorted({int(s) for r in a["runs"] if r["mixer"] == mixer for s in r["evals"]}
                       & {int(s) for r in b["runs"] if r["mixer"] == mixer for s in r["evals"]})
        for step in steps:
            cells = [cell(values(res, mixer, seeds, step, m), pct=m.startswith("svc")) for m in metrics
                     for res in (a, b)]
            lines.append(f"| {mixer} | {step} | {sorted(seeds)} | " + " | ".join(cells) + " |")
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("studies", nargs=2, help="two study folders (or their results.json)")
    p.add_argument("--names", nargs=2, default=("A", "B"))
    args = p.parse_args(argv)
    a, b = (json.loads((Path(s) / "results.json" if Path(s).is_dir() else Path(s)).read_text()) for s in args.studies)
    print("\n".join(table(a, b, tuple(args.names))))


if __name__ == "__main__":
    main()
