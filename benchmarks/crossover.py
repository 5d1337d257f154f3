"""The crossover figure: DiT³ against DiT and linear attention as the tokens per image grow, at equal wall clock.

    python benchmarks/crossover.py benchmarks/results/study_digits benchmarks/results/resolution/px32 \\
        benchmarks/results/resolution/px64 --out benchmarks/results/resolution/crossover

Each argument is a study folder of benchmarks/study.py (its results.json): one point on the token axis, its
tokens per image (image size / patch)^2. Per study and mixer, every seed's unguided FID is a curve over training
minutes on this machine (its checkpoints' updates x the mixer's measured time per update), read between
checkpoints linearly in log FID. From those curves:
- FID at equal wall clock: each curve read at the study's common minutes, the last minute every mixer reached
  (an equal-minutes study: its budget; an equal-updates one: the fastest mixer's end); mean ± std over seeds;
- minutes to a fixed FID: the first minute the mean curve reaches the study's target, the worst of the mixers'
  final FIDs (so every mixer reaches it), as a ratio to DiT³'s (above 1: DiT³ gets there sooner);
- the time per update against DiT³'s, from the same measurement.
Written: <out>.png (the three panels), <out>.json (every number), <out>.md (the table).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from study_report import FID, mixer_updates, portable  # noqa: E402

from vit3.engine.files import atomic_write_text  # noqa: E402

BASE = "DiT3"  # the ratios are against this mixer


def tokens(res: dict, config: dict) -> int:
    patch = int(res["spec"]["size"].rsplit("/", 1)[1])
    return (int(config["model"]["image_size"]) // patch) ** 2


def curves(res: dict) -> dict:
    """mixer -> seed -> [(minutes, unguided FID)] sorted by minutes."""
    out: dict = {}
    for r in res["runs"]:
        ms = res["update_ms"][r["mixer"]]
        pts = sorted((int(s) * ms / 60e3, e["cfg1"][FID]) for s, e in r["evals"].items())
        out.setdefault(r["mixer"], {})[r["seed"]] = pts
    return out


def at(points: list[tuple[float, float]], minutes: float) -> float:
    """The FID of a curve at `minutes`, linear in log FID between its points (the last point's past its end)."""
    if minutes <= points[0][0]:
        return points[0][1]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if minutes <= x1:
            w = (minutes - x0) / (x1 - x0)
            return math.exp((1 - w) * math.log(y0) + w * math.log(y1))
    return points[-1][1]


def minutes_to(points: list[tuple[float, float]], target: float) -> float | None:
    """The first minute a curve reaches FID <= target (linear in log FID between points); None if it never does."""
    if points[0][1] <= target:
        return points[0][0]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if y1 <= target:
            w = (math.log(y0) - math.log(target)) / (math.log(y0) - math.log(y1))
            return x0 + w * (x1 - x0)
    return None


def mean_curve(by_seed: dict) -> list[tuple[float, float]]:
    """The mean over seeds of the curves, at the minutes of the first seed's points (the seeds share them)."""
    xs = [x for x, _ in next(iter(by_seed.values()))]
    return [(x, statistics.fmean(at(p, x) for p in by_seed.values())) for x in xs]


def point(res: dict, config: dict) -> dict:
    """One study's numbers on the crossover figure."""
    c = curves(res)
    updates = mixer_updates(res)
    end = {m: int(updates[m]) * res["update_ms"][m] / 60e3 for m in c}
    common = res["spec"].get("minutes") or min(end.values())
    mean = {m: mean_curve(by) for m, by in c.items()}
    target = max(p[-1][1] for p in mean.values())
    need = {m: minutes_to(p, target) for m, p in mean.items()}
    out = {"tokens": tokens(res, config), "image_size": int(config["model"]["image_size"]), "minutes": common,
           "target_fid": target, "seeds": sorted({s for by in c.values() for s in by}), "mixers": {}}
    for m, by in c.items():
        fids = [at(p, common) for p in by.values()]
        out["mixers"][m] = {
            "fid": statistics.fmean(fids), "fid_std": statistics.stdev(fids) if len(fids) > 1 else 0.0,
            "fid_values": fids, "ms_per_update": res["update_ms"][m], "minutes_to_target": need[m],
            "minutes_ratio": need[m] / need[BASE] if need.get(BASE) and need[m] else None,
            "speed_ratio": res["update_ms"][m] / res["update_ms"][BASE] if BASE in res["update_ms"] else None}
    return out


def load(folder: Path) -> tuple[dict, dict]:
    """(results.json, the study's base config with its overrides) of a study folder."""
    import train_dit
    from vit3.engine import config_to_dict

    res = json.loads((folder / "results.json").read_text())
    config = res["spec"]["config"]
    config = config if Path(config).is_absolute() else str(ROOT / config)
    cfg = config_to_dict(train_dit.parse_config(["--config", config, *[
        o for o in res["spec"]["overrides"] if o.startswith("model.")]])[0])
    return res, cfg


def markdown(points: list[dict]) -> str:
    mixers = list(dict.fromkeys(m for p in points for m in p["mixers"]))
    lines = ["| tokens | px | minutes | " + " | ".join(f"FID {m}" for m in mixers) + " | target FID | "
             + " | ".join(f"min. to target {m} (x {BASE})" for m in mixers) + " | "
             + " | ".join(f"ms / update {m}" for m in mixers) + " |",
             "|---:|---:|---:|" + "---:|" * (3 * len(mixers) + 1)]
    for p in points:
        mx = p["mixers"]
        # one seed has no spread to show: "± 0" would claim one
        fid = [(f"{mx[m]['fid']:.3g} ± {mx[m]['fid_std']:.2g}" if len(mx[m]["fid_values"]) > 1 else
                f"{mx[m]['fid']:.3g} (1 seed)") if m in mx else "-" for m in mixers]
        need = [("never" if mx[m]["minutes_to_target"] is None else
                 f"{mx[m]['minutes_to_target']:.2f} ({mx[m]['minutes_ratio']:.2f})" if mx[m]["minutes_ratio"]
                 else f"{mx[m]['minutes_to_target']:.2f}") if m in mx else "-" for m in mixers]
        ms = [f"{mx[m]['ms_per_update']:.0f}" if m in mx else "-" for m in mixers]
        lines.append(f"| {p['tokens']} | {p['image_size']} | {p['minutes']:.3g} | " + " | ".join(fid)
                     + f" | {p['target_fid']:.3g} | " + " | ".join(need) + " | " + " | ".join(ms) + " |")
    return "\n".join(lines) + "\n"


def plot(points: list[dict], path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    mixers = list(dict.fromkeys(m for p in points for m in p["mixers"]))
    for i, m in enumerate(mixers):
        ps = [p for p in points if m in p["mixers"]]
        x = [p["tokens"] for p in ps]
        mean = [p["mixers"][m]["fid"] for p in ps]
        std = [p["mixers"][m]["fid_std"] for p in ps]
        axes[0].errorbar(x, mean, yerr=std, marker="o", capsize=4, color=f"C{i}", label=m)
        ratio = [(p["tokens"], p["mixers"][m]["minutes_ratio"]) for p in ps if p["mixers"][m]["minutes_ratio"]]
        if ratio:
            axes[1].plot(*zip(*ratio), marker="o", color=f"C{i}", label=m)
        speed = [(p["tokens"], p["mixers"][m]["speed_ratio"]) for p in ps if p["mixers"][m]["speed_ratio"]]
        if speed:
            axes[2].plot(*zip(*speed), marker="o", color=f"C{i}", label=m)
    axes[0].set(ylabel="unguided FID at equal training minutes (lower is better)", yscale="log")
    axes[1].set(ylabel=f"minutes to the target FID, x {BASE}'s (above 1: {BASE} sooner)")
    axes[2].set(ylabel=f"time per training update, x {BASE}'s (above 1: {BASE} faster)")
    for ax in axes[1:]:  # the ratios' parity
        ax.axhline(1, color="grey", lw=0.8, ls=":")
    for ax in axes:
        ax.set(xscale="log", xlabel="tokens per image")
        ax.set_xticks([p["tokens"] for p in points], [str(p["tokens"]) for p in points])
        ax.minorticks_off()  # the token counts are the ticks; log-scale minor labels would overprint them
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("DiT³ against attention as the tokens grow: equal wall clock on this machine, mean ± std over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(folders: list[Path], out: Path) -> list[dict]:
    points = sorted(({**point(*load(f)), "study": str(f.resolve())} for f in folders), key=lambda p: p["tokens"])
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out.with_suffix(".json"), json.dumps(portable(points), indent=2))
    atomic_write_text(out.with_suffix(".md"), markdown(points))
    plot(points, out.with_suffix(".png"))
    return points


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("studies", nargs="+", help="study folders of benchmarks/study.py, one per token count")
    p.add_argument("--out", required=True, help="the figure's path without suffix: <out>.png, .json, .md")
    a = p.parse_args(argv)
    write([Path(s) for s in a.studies], Path(a.out))
    print(Path(a.out).with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
