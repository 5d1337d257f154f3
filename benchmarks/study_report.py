"""The study's report (benchmarks/study.py): every figure as JSON, mean ± std tables, FID plots.

    python benchmarks/study_report.py results/study-study_digits   # rebuild the report of a study folder

results.json holds the spec, each mixer's time per update and chosen lr, the sweep, every evaluation
of every run, per mixer and budget the mean, std (over seeds, n - 1) and values of each metric, and the
seconds each script took (a training run's from its own folder: every invocation of it, a killed one too).
results.md holds the tables; fid.png the curves (a line per mixer, a band of ± one std over seeds).
Its paths name no folder of the machine it ran on (`portable`): each run's relative to the study folder,
the others relative to the repository's root, or to the home (~/...) for the files outside the repository
there (the digits cache).
"""
from __future__ import annotations

import dataclasses
import json
import os
import statistics
import sys
from pathlib import Path

from vit3.engine.files import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
FID = "frechet_inception_distance"
CLOCK = "wall_clock.json"  # in each run folder: {"segments": [seconds of each train_dit.py invocation]}
# name in the report -> (guidance: "cfg1" unguided, "guided"; key in sample.py's metrics.json)
METRICS = {
    "fid": ("cfg1", FID),
    "precision": ("cfg1", "precision"),
    "recall": ("cfg1", "recall"),
    "fid_guided": ("guided", FID),
    "svc_guided": ("guided", "digits_accuracy"),  # the digits: the demo's SVC
    "svc_unguided": ("cfg1", "digits_accuracy"),
    "acc_guided": ("guided", "class_accuracy"),  # a judge: a classifier trained by train_vit.py
    "acc_unguided": ("cfg1", "class_accuracy"),
}
TITLES = {"fid": "FID", "precision": "precision", "recall": "recall", "fid_guided": "FID guided",
          "svc_guided": "SVC guided", "svc_unguided": "SVC unguided", "acc_guided": "judge guided",
          "acc_unguided": "judge unguided"}
PERCENT = ("precision", "recall", "svc_guided", "svc_unguided", "acc_guided", "acc_unguided")


def accuracy(summary: dict) -> tuple[str, str]:
    """The study's class accuracy in the summary: ("svc", "SVC") on the digits, ("acc", "judge") with a judge."""
    found = {k for steps in summary.values() for by in steps.values() for k in by}
    return ("svc", "SVC") if "svc_guided" in found or "acc_guided" not in found else ("acc", "judge")


def choose_lr(sweep: dict) -> float:
    """lr -> {"cfg1": metrics, ...} of the seed-0 runs' last checkpoint: the lr of the lowest unguided FID."""
    return min(sweep, key=lambda lr: sweep[lr]["cfg1"][FID])


class RunClock:
    """The wall clock of a training run, in its own folder (CLOCK): one segment per train_dit.py invocation, the
    running one rewritten (atomically) as it goes (benchmarks/study.py: every CLOCK_S seconds and at its end), so a
    study killed with -9 loses only the time since the last write, and the rerun that resumes the run adds its own."""

    def __init__(self, run: Path):
        self.path = run / CLOCK
        self.before = json.loads(self.path.read_text())["segments"] if self.path.is_file() else []

    def __call__(self, seconds: float):
        if self.path.parent.is_dir():  # train_dit.py makes the run folder
            atomic_write_text(self.path, json.dumps({"segments": [*self.before, round(seconds, 3)]}))


def training_seconds(out: Path) -> dict:
    """"train/<run>" -> the seconds of every invocation of the run, summed, from each run folder's CLOCK."""
    return {f"train/{p.parent.name}": sum(json.loads(p.read_text())["segments"])
            for p in sorted((out / "runs").glob(f"*/{CLOCK}"))}


def portable(value, root: Path = ROOT, home: Path = Path.home()):
    """`value` (a results tree) with each absolute path in its strings (a word of them: "classifier /x/y" and
    "repa.encoder=/x/y" too) relative to the repository's `root`, or written ~/... if it is outside `root` and
    inside `home`."""
    def one(word: str) -> str:
        key, eq, value = word.partition("=")
        if eq and os.path.isabs(value):  # an override: key=/a/path
            return f"{key}={one(value)}"
        if not os.path.isabs(word) or len(word) < 2:
            return word
        if Path(word).is_relative_to(home) and not Path(word).is_relative_to(root):
            return f"~/{Path(word).relative_to(home).as_posix()}"
        return Path(os.path.relpath(word, root)).as_posix()

    if isinstance(value, dict):
        return {k: portable(v, root, home) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [portable(v, root, home) for v in value]
    return " ".join(one(w) for w in value.split(" ")) if isinstance(value, str) else value


def summarize(runs: list[dict]) -> dict:
    """mixer -> step -> metric -> {"mean", "std", "n", "values"} over the seeds."""
    out: dict = {}
    for r in runs:
        for step, evals in r["evals"].items():
            for name, (where, key) in METRICS.items():
                v = evals[where].get(key)
                if v is not None:
                    out.setdefault(r["mixer"], {}).setdefault(int(step), {}).setdefault(name, []).append(v)
    return {m: {s: {k: {"mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0,
                        "n": len(v), "values": v} for k, v in by.items()} for s, by in steps.items()}
            for m, steps in out.items()}


def _cell(x: dict | None, pct: bool = False) -> str:
    if x is None:
        return "-"
    f = 100 if pct else 1
    digits = 1 if pct else (2 if x["mean"] < 10 else 1)
    return f"{f * x['mean']:.{digits}f} ± {f * x['std']:.{digits}f}" if x["n"] > 1 else f"{f * x['mean']:.{digits}f}"


def mixer_updates(res: dict) -> dict:
    """mixer -> its updates: each mixer's own at equal wall clock (spec minutes > 0), else the spec's."""
    return res.get("updates") or {m: res["spec"]["updates"] for m in res["summary"]}


def seeds_done(res: dict) -> list[int]:
    """The seeds whose runs are in the report (a study reports at every finished seed)."""
    return sorted({r["seed"] for r in res["runs"]})


def markdown(res: dict) -> str:
    spec, summary, updates = res["spec"], res["summary"], mixer_updates(res)
    done = seeds_done(res)
    acc, judge = accuracy(summary)
    titles = {k: v for k, v in TITLES.items() if not k.startswith(("svc", "acc")) or k.startswith(acc)}
    budget = (f"{spec['minutes']:g} training minutes each (equal wall clock: each mixer's updates at its measured "
              f"time per update)" if spec.get("minutes") else f"{spec['updates']} updates")
    lines = [f"{', '.join(spec['mixers'])} at {spec['size']}: {budget}, seeds {spec['seeds']}, "
             f"each evaluated with {spec['samples']} samples of {spec['steps']} sampler steps (the same noise for "
             f"every run), unguided and at guidance {spec['cfg_scale']:g}. Mean ± std over {len(done)} seed(s).", ""]
    if done != spec["seeds"]:
        lines += [f"**Partial**: seeds {done} of {spec['seeds']} finished so far; the study's command, run again, "
                  "goes on with the rest.", ""]
    if res.get("judge"):
        top1 = res["judge"].get("val_top1")
        lines += [f"Judge (FID features{', class accuracy' if acc == 'acc' else ''}): {res['judge']['path']}"
                  + (f", {top1:.1f}% top-1 on the real val images." if top1 is not None else "."), ""]
    lines += ["At the end:", "",
              "| mixer | lr (swept) | ms / update | updates | " + " | ".join(titles.values()) + " |",
              "|---|---:|---:|---:|" + "---:|" * len(titles)]
    for m, steps in summary.items():
        row = steps[int(updates[m])]
        cells = [_cell(row.get(k), pct=k in PERCENT) for k in titles]
        lines.append(f"| {m} | {res['chosen_lr'][m]:g} | {res['update_ms'].get(m, float('nan')):.1f} | {updates[m]} | "
                     + " | ".join(cells) + " |")
    if spec.get("minutes"):
        fractions = spec["budgets"]
        lines += ["", f"Unguided FID ({judge} guided, %) by training minutes (each mixer's checkpoint at that share of "
                  "its updates):", "", "| mixer | " + " | ".join(f"{b * spec['minutes']:.3g} min" for b in fractions)
                  + " |", "|---|" + "---:|" * len(fractions)]
        for m, steps in summary.items():
            cells = [steps.get(max(1, round(b * int(updates[m])))) for b in fractions]
            lines.append(f"| {m} | " + " | ".join(
                f"{_cell(c.get('fid'))} ({_cell(c.get(f'{acc}_guided'), pct=True)})" if c else "-" for c in cells)
                + " |")
    budgets = sorted({int(s) for m in summary.values() for s in m})
    lines += ["", f"Unguided FID ({judge} unguided, %) by updates:", "",
              "| mixer | " + " | ".join(str(b) for b in budgets) + " |", "|---|" + "---:|" * len(budgets)]
    for m, steps in summary.items():
        lines.append(f"| {m} | " + " | ".join(
            f"{_cell(steps[b].get('fid'))} ({_cell(steps[b].get(f'{acc}_unguided'), pct=True)})" if b in steps else "-"
            for b in budgets) + " |")
    if res["sweep"]:
        lrs = sorted({float(lr) for s in res["sweep"].values() for lr in s})
        lines += ["", f"The lr sweep (seed {spec['seeds'][0]}, at {spec['sweep_budget']:g} of the budget): unguided "
                  f"FID ({judge} guided, %):", "",
                  "| mixer | " + " | ".join(f"{lr:g}" for lr in lrs) + " |", "|---|" + "---:|" * len(lrs)]
        key = METRICS[f"{acc}_guided"][1]
        for m, by_lr in res["sweep"].items():
            by_lr = {float(k): v for k, v in by_lr.items()}
            lines.append(f"| {m} | " + " | ".join(
                f"{by_lr[lr]['cfg1'][FID]:.2f} ({100 * by_lr[lr]['guided'].get(key, float('nan')):.1f})"
                if lr in by_lr else "-" for lr in lrs) + " |")
    secs = res["seconds"]  # each script's wall clock, summed over reruns (a killed evaluation is not counted)
    train_s = sum(v for k, v in secs.items() if k.startswith("train/"))
    eval_s = sum(v for k, v in secs.items() if k.startswith("eval/"))
    work = train_s + eval_s + secs.get("classifier", 0)
    lines += ["", f"Wall clock of the scripts: {work / 60:.1f} min (training {train_s / 60:.1f}, evaluation "
              f"{eval_s / 60:.1f}, classifier {secs.get('classifier', 0) / 60:.1f}; "
              f"{sum(k.startswith('train/') for k in secs)} training runs recorded)."]
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path):
    """FID (top) and class accuracy, guided and unguided (bottom), against training updates (left) and training
    minutes on this machine (right): a line per mixer, a band of ± one std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8.4))
    colors = {m: f"C{i}" for i, m in enumerate(res["summary"])}
    acc, _ = accuracy(res["summary"])
    for m, steps in res["summary"].items():
        ms = res["update_ms"].get(m)
        for col, x_of in enumerate((lambda s: s, lambda s: s * ms / 60e3 if ms else float("nan"))):
            for row, key, style in ((0, "fid", "-"), (1, f"{acc}_guided", "-"), (1, f"{acc}_unguided", "--")):
                pts = [(x_of(s), steps[s][key]) for s in sorted(steps) if key in steps[s]]
                if not pts:
                    continue
                f = 100 if key in PERCENT else 1
                x, mean = [p[0] for p in pts], [f * p[1]["mean"] for p in pts]
                std = [f * p[1]["std"] for p in pts]
                label = m if not key.endswith("_unguided") else f"{m} (unguided)"
                axes[row, col].plot(x, mean, style, marker="o", color=colors[m], label=label)
                axes[row, col].fill_between(x, [a - b for a, b in zip(mean, std)], [a + b for a, b in zip(mean, std)],
                                            color=colors[m], alpha=0.2)
    for col, xl in enumerate(("training updates", "training minutes on this machine (time per update x updates)")):
        axes[0, col].set(xlabel=xl, ylabel="FID, unguided (lower is better)", yscale="log")  # FID falls 10x in a run
        axes[1, col].set(xlabel=xl, ylabel="class accuracy of samples, % (solid: guided, dashed: unguided)")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    budget = f"{res['spec']['minutes']:g} min each" if res["spec"].get("minutes") else "equal updates"
    fig.suptitle(f"{res['spec']['size']}, {budget}, {len(seeds_done(res))} seed(s): mean, band = ± one std "
                 "over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(study, out: Path, runs: list[dict], sweep: dict, chosen: dict, state: dict,
                 updates: dict | None = None, judge: dict | None = None) -> str:
    """results.json, results.md and fid.png of the study in `out`; judge: {"path", "val_top1"} of the classifier
    that gave the FID features (and the class accuracy on the glyphs), if one did."""
    guided = f"cfg{study.cfg_scale:g}"
    runs = [{**r, "run": os.path.relpath(r["run"], out),  # the folder moves with its report
             "evals": {int(s): {"cfg1": e["cfg1"], "guided": e[guided]} for s, e in r["evals"].items()}}
            for r in runs]
    sweep = {m: {lr: {"cfg1": e["cfg1"], "guided": e[guided]} for lr, e in by.items()} for m, by in sweep.items()}
    res = {"spec": dataclasses.asdict(study), "update_ms": state.get("update_ms", {}), "updates": updates,
           "chosen_lr": chosen, "judge": judge,
           "sweep": sweep, "runs": runs, "summary": summarize(runs),
           "seconds": {**state.get("seconds", {}), **training_seconds(out)}}
    res = portable(res)
    atomic_write_text(out / "results.json", json.dumps(res, indent=2))
    atomic_write_text(out / "results.md", markdown(res))
    plot(res, out / "fid.png")
    return f"{out / 'results.md'}, {out / 'results.json'}, {out / 'fid.png'}"


def main(argv=None):
    out = Path((argv or sys.argv[1:])[0])
    res = json.loads((out / "results.json").read_text())
    res["summary"] = {m: {int(s): v for s, v in steps.items()} for m, steps in res["summary"].items()}
    atomic_write_text(out / "results.md", markdown(res))
    plot(res, out / "fid.png")
    print(out / "results.md")


if __name__ == "__main__":
    main()
