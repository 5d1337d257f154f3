"""Sampling cost by resolution: time per image and peak memory of a 50-step guided sampler, DiT³ against DiT
(softmax attention, SDPA) and DiT3-LA (linear attention), at 256 to 16384 tokens.

    python benchmarks/bench_sampling.py                       # CPU, alone: the table, JSON and plot in results/
    python benchmarks/bench_sampling.py --tokens 256 1024 --model-kwargs '{hidden_size: 384, depth: 12, num_heads: 6}'

The models are the quality study's (configs/study_digits.yaml: hidden 96, depth 4, 2 heads, patch 2, pixel
space, 10 classes), untrained: sampling cost does not depend on the weights. Tokens T = (image / 2)^2: 256
tokens are 32-pixel images, 16384 are 256-pixel ones. One sampler step is what `sample.py` runs per grid
point: the guided network call (conditional and null-class halves in one batch of 2 x batch, guidance 4)
and the flow Euler update; every step costs the same, so a 50-step image costs 50 steps / batch, timed as
the median over interleaved rounds of the three mixers (bench_common.interleaved_times_ms). Peak memory is
measured per point in a fresh process with glibc returning freed memory (bench_common.RETURNING_MALLOC):
the resident size at the peak of a step, over the resident size before it (the model and inputs held).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from bench_common import RESULTS, interleaved_times_ms, step_peak_bytes, worker_env

MIXERS = {"DiT3": "DiT3-S/2", "DiT": "DiT-S/2", "DiT3-LA": "DiT3-LA-S/2"}  # name in the table -> model
STUDY_KWARGS = {"hidden_size": 96, "depth": 4, "num_heads": 2}
STEPS, CFG_SCALE = 50, 4.0


def make_step(model_name: str, tokens: int, batch: int, model_kwargs: dict):
    """One flow Euler step of `batch` guided samples at `tokens` tokens, as dit3.sampling.sample runs it."""
    from dit3.flow import create_flow
    from dit3.models import DiT3_models
    from dit3.sampling import flow_model_fn

    side = round(tokens ** 0.5) * 2  # patch 2
    torch.manual_seed(0)
    model = DiT3_models[model_name](input_size=side, in_channels=3, num_classes=10, **model_kwargs).eval()
    flow, fn = create_flow(), flow_model_fn(model, torch.arange(batch) % 10, CFG_SCALE)
    x = torch.randn(batch, 3, side, side)
    t = torch.full((batch,), 0.5)

    def step():
        with torch.no_grad():  # as dit3.sampling.sample
            x + flow.velocity(fn(x, t), x, t) / STEPS
    return step


def memory_worker(model_name: str, tokens: int, batch: int, model_kwargs: dict) -> dict:
    step = make_step(model_name, tokens, batch, model_kwargs)
    base, peak = step_peak_bytes(step, "cpu")
    return {"held_mib": base / 2**20, "peak_mib": peak / 2**20, "step_mib": (peak - base) / 2**20}


def measure_memory(model_name: str, tokens: int, batch: int, model_kwargs: dict) -> dict:
    """memory_worker in a fresh process (its peak resident size is this step's alone)."""
    code = ("import json; from bench_sampling import memory_worker; "
            f"print(json.dumps(memory_worker({model_name!r}, {tokens}, {batch}, {model_kwargs!r})))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=worker_env("memory", False), cwd=Path(__file__).resolve().parent)
    if p.returncode:
        return {"error": (p.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def run(tokens_list: list[int], batch: int, model_kwargs: dict, rounds: int | None) -> dict:
    points = {}
    for tokens in tokens_list:
        steps = {name: make_step(model, tokens, batch, model_kwargs) for name, model in MIXERS.items()}
        times = interleaved_times_ms(steps, "cpu", rounds=rounds)
        for name, model in MIXERS.items():
            ms = times[name]["time_ms"]
            points[f"{name}/{tokens}"] = {"mixer": name, "model": model, "tokens": tokens, "image_px": 2 * round(
                tokens ** 0.5), "batch": batch, "step_ms": ms, "rounds": times[name]["rounds"],
                "s_per_image": STEPS * ms / batch / 1e3, **measure_memory(model, tokens, batch, model_kwargs)}
            p = points[f"{name}/{tokens}"]
            print(f"{tokens:6d} tokens  {name:8s} {p['s_per_image']:9.3f} s/image  "
                  f"peak {p.get('step_mib', float('nan')):9.1f} MiB over {p.get('held_mib', float('nan')):.0f}",
                  flush=True)
    return points


def markdown(res: dict) -> list[str]:
    tokens = sorted({p["tokens"] for p in res["points"].values()})
    lines = [f"# Sampling cost by resolution ({res['device']}, {res['threads']} threads)", "",
             f"Models: {res['model_kwargs']}, patch 2, pixel space, untrained; {STEPS}-step flow Euler sampler with "
             f"guidance {CFG_SCALE:g} (2 x {res['batch']} images a network call). Command: `{res['command']}`.", "",
             "| tokens (image) | " + " | ".join(f"{m} s/image" for m in MIXERS) + " | DiT / DiT3 | "
             + " | ".join(f"{m} peak MiB" for m in MIXERS) + " |",
             "|---|" + "---:|" * (2 * len(MIXERS) + 1)]
    for t in tokens:
        row = {m: res["points"][f"{m}/{t}"] for m in MIXERS}
        times = " | ".join(f"{row[m]['s_per_image']:.3g}" for m in MIXERS)
        mem = " | ".join(f"{row[m]['step_mib']:.0f}" if "step_mib" in row[m] else row[m].get("error", "?")
                         for m in MIXERS)
        lines.append(f"| {t} ({row['DiT']['image_px']} px) | {times} | "
                     f"{row['DiT']['s_per_image'] / row['DiT3']['s_per_image']:.2f}x | {mem} |")
    lines += ["", "Peak MiB: the resident memory a step adds over the model and inputs it holds (a fresh process, "
              "glibc returning freed memory)."]
    return lines


def plot(res: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for m in MIXERS:
        pts = sorted((p for p in res["points"].values() if p["mixer"] == m), key=lambda p: p["tokens"])
        axes[0].plot([p["tokens"] for p in pts], [p["s_per_image"] for p in pts], "o-", label=m)
        axes[1].plot([p["tokens"] for p in pts], [p.get("step_mib", float("nan")) for p in pts], "o-", label=m)
    for ax, ylabel in zip(axes, (f"seconds per image ({STEPS} guided steps)", "peak memory of a step (MiB)")):
        ax.set(xscale="log", yscale="log", xlabel="tokens per image", ylabel=ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"Sampling cost by resolution ({res['device']}, batch {res['batch']}, untrained study-size models)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[256, 1024, 4096, 16384])
    parser.add_argument("--batch", type=int, default=2, help="images per sampler step (guidance doubles it)")
    parser.add_argument("--model-kwargs", default=json.dumps(STUDY_KWARGS), help="yaml: the models' size")
    parser.add_argument("--rounds", type=int, help="timed rounds (default: bench_common's rule)")
    parser.add_argument("--out", default=str(RESULTS / "bench_sampling_cpu"), help="writes OUT.{json,md,png}")
    args = parser.parse_args(argv)
    bad = [t for t in args.tokens if t < 1 or round(t ** 0.5) ** 2 != t]
    if bad:
        parser.error(f"--tokens {bad}: each must be a square (the image is a square of patches)")
    model_kwargs = yaml.safe_load(args.model_kwargs)
    res = {"device": "cpu", "threads": torch.get_num_threads(), "batch": args.batch, "model_kwargs": model_kwargs,
           # what was measured, not where it was written (the results hold no path of this machine)
           "steps": STEPS, "cfg_scale": CFG_SCALE, "command": (
               f"python benchmarks/bench_sampling.py --tokens {' '.join(map(str, args.tokens))} --batch {args.batch}"
               f" --model-kwargs '{args.model_kwargs}'" + (f" --rounds {args.rounds}" if args.rounds else "")),
           "points": run(args.tokens, args.batch, model_kwargs, args.rounds)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    out.with_suffix(".md").write_text("\n".join(markdown(res)) + "\n")
    plot(res, out.with_suffix(".png"))
    print("\n".join(markdown(res)))
    return res


if __name__ == "__main__":
    main()
