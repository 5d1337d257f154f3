"""Whole-model speed and memory: ViT³ / H-ViT³ inference, a DiT³ training step and DiT³ sampling against attention.

    python benchmarks/bench_models.py                     # CPU, and CUDA (bf16) when present
    python benchmarks/bench_models.py --device cpu --sizes 224 512 --latents 32 --skip-train

Inference (eval mode, torch.inference_mode; batch 1 on CPU, on CUDA 256 at 224 px
and below and 16 above): ViT³-T and H-ViT³-T against the same architectures with
softmax attention (`mixer="attention"`, the DeiT-T-style baseline), attention both
as SDPA and materialised ("math", the N x N matrix), at each resolution.
Training (4 latent channels, DiT's hybrid diffusion loss, backward, AdamW step):
DiT3-S/2 against DiT-S/2 with SDPA, batch 8, on CPU; DiT3-B/2 against DiT-B/2,
batch 32, on CUDA; at each latent size.
Sampling (CUDA by default; --sample-latents): DiT3-XL/2 against DiT-XL/2 (SDPA),
DiT's sampler (250-step respaced ancestral DDPM, learned variance, classifier-free
guidance at scale 4 with the conditional and null-class passes batched together),
32 images at latent 32 (256 px). Every denoising step costs the same, so one step
of the guided batch is timed (median over rounds) and images/s is batch / (250 x
that time); the VAE decode, the same for both, is left out.

Times are medians over rounds that run one step of every variant of a point in turn
in one process (bench_common.interleaved_times_ms), so noise and allocator state fall on all
alike; slow points (seconds per step) get fewer warm-ups and rounds, down to one
warm-up and one timed round. Throughput is images per second (batch / step time).
On CPU the timing processes run with glibc malloc keeping freed memory for reuse,
as a caching allocator does (bench_common.CACHING_MALLOC; --system-malloc for glibc's
default, under which allocation costs both models the same seconds per step).
Peak memory: on CPU each variant runs in a fresh subprocess and "step" is the peak
resident size above what the process held just before the step (activations,
gradients, temporaries), "total" the peak above the process before the model was
built (adds weights and AdamW state); on CUDA the allocator's peaks. AdamW state
is created before the measured step (a zero-gradient step), so the training step
is a steady-state one. Materialised attention whose N x N matrices would not fit
in memory is skipped and reported as such.

Writes benchmarks/results/bench_models_<device>.{md,json,png} and checks the
targets (ratios within one run) of the "Linear cost where it counts" issue on CPU
and of the GPU issue on CUDA.
"""
import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import (
    RESULTS,
    empty_cache,
    error_line,
    interleaved_times_ms,
    malloc_note,
    malloc_record,
    ratio,
    rss_bytes,
    step_peak_bytes,
    worker_env,
)
from model_steps import (
    INFER_MODELS,
    INFER_VARIANTS,
    SAMPLE_BATCH,
    SAMPLE_CFG,
    SAMPLE_MODELS,
    SAMPLE_STEPS,
    TRAIN_BATCH,
    dit_variant,
    label,
    make_step,
    stage_layout,
    task_batch,
    too_big,
    train_variants,
    ttt_path,
)

#################################################################################
#                            Measurement                                        #
#################################################################################

def peak_memory(step, device: str, before_model: int) -> dict:
    """Peak memory (MB) of one step above what was held just before it ("peak_mb") and above what the
    process held before the model was built ("total_peak_mb")."""
    base, peak = step_peak_bytes(step, device)
    return {"peak_mb": max(peak - base, 0) / 2 ** 20, "total_peak_mb": max(peak - before_model, 0) / 2 ** 20}


def worker(kind: str, task: str, group: str, variants: list[str], size: int, device: str, min_time: float,
           batch: int = 1, depth: int | None = None) -> dict:
    """kind "memory": one variant's peaks; kind "time": every variant's median time, interleaved."""
    import dit3.models  # noqa: F401  (imports before the baseline, so they are not counted)
    import vit3  # noqa: F401

    if device == "cpu":
        torch.set_num_threads(2)
    before = rss_bytes() if device == "cpu" else torch.cuda.memory_allocated()
    built = {v: make_step(task, group, v, size, device, batch, depth) for v in variants}
    if kind == "memory":
        return peak_memory(built[variants[0]][0], device, before)
    res = interleaved_times_ms({v: s for v, (s, _) in built.items()}, device, min_time)
    for v, (_, model) in built.items():
        res[v]["ttt_path"] = ttt_path(model)
        res[v]["params_m"] = sum(p.numel() for p in model.parameters()) / 1e6
    return res


def run_worker(args, kind: str, task: str, group: str, variants: list[str], size: int, batch: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, task, group, ",".join(variants), str(size), "cpu",
           "--min-time", str(args.min_time), "--batch", str(batch), *(["--dit-depth", str(args.dit_depth)]
                                                                       if args.dit_depth else [])]
    try:  # malloc set up by bench_common.worker_env: caching for timing, returning for memory
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout,
                             env=worker_env(kind, args.system_malloc), check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.timeout:.0f} s"}
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or [f"failed ({out.returncode})"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_point(args, device: str, task: str, group: str, variants: list[str], size: int) -> dict:
    """{variant: {time_ms, images_per_s, peak_mb, total_peak_mb, ...} or {error}} for one model group and size."""
    batch = task_batch(args, task, size, device)
    points, ok = {}, []
    for v in variants:
        reason = too_big(task, group, v, size, device, batch)
        if reason:
            points[v] = {"error": reason}
        else:
            ok.append(v)
    if not ok:
        return points
    if device == "cpu" and not args.in_process:  # time: one process for all variants; memory: one per variant
        times = run_worker(args, "time", task, group, ok, size, batch)
        for v in ok:
            points[v] = dict(times.get(v, {"error": times.get("error", "failed")}))
            if "error" not in points[v]:
                points[v].update(run_worker(args, "memory", task, group, [v], size, batch))
    else:  # in this process (CUDA, or --in-process): peaks one variant at a time, then times interleaved
        for v in ok:
            try:
                before = rss_bytes() if device == "cpu" else torch.cuda.memory_allocated()
                step, model = make_step(task, group, v, size, device, batch, args.dit_depth)
                points[v] = peak_memory(step, device, before)
                del step, model
            except Exception as e:  # out of memory, or a path this machine refuses
                points[v] = {"error": error_line(e)}
            empty_cache(device)
        ok = [v for v in ok if "error" not in points[v]]
        built = {v: make_step(task, group, v, size, device, batch, args.dit_depth) for v in ok}
        try:
            times = interleaved_times_ms({v: s for v, (s, _) in built.items()}, device, args.min_time)
        except Exception as e:
            times = {v: {"error": error_line(e)} for v in ok}
        for v, r in times.items():
            points[v].update(r, ttt_path=ttt_path(built[v][1]),
                             params_m=sum(p.numel() for p in built[v][1].parameters()) / 1e6)
        del built
        empty_cache(device)
    steps = SAMPLE_STEPS if task == "sample" else 1  # a sample takes 250 timed steps
    for r in points.values():
        r["batch"] = batch
        if "time_ms" in r:
            r["images_per_s"] = batch / (steps * r["time_ms"] / 1e3)
    return points


#################################################################################
#                            Report                                             #
#################################################################################

def check_targets(res: dict, device: str) -> list[tuple[str, float, bool]]:
    """The targets as (label, measured ratio, met): on CPU the "Linear cost where it counts" issue's, on CUDA
    the GPU issue's (bf16; inference at 224 with 256 images a call, at 1248 with 16)."""
    def get(task, group, variant, size, key):
        return res.get(task, {}).get(f"{group}/{variant}/{size}", {}).get(key)

    def ips(v, s):
        return get("infer", "vit3_tiny", v, s, "images_per_s")

    def mem(v, s):
        return get("infer", "vit3_tiny", v, s, "peak_mb")

    def tips(v, s):
        return get("train", "dit", v, s, "images_per_s")

    def tmem(v, s):
        return get("train", "dit", v, s, "peak_mb")

    out = []
    if device == "cuda":
        r = ratio(ips("ttt", 1248), ips("attn_math", 1248))
        out.append(("ViT³-T / DeiT-T (materialised) inference throughput at 1248 (>= 4.6x)", r, r >= 4.6))
        r = ratio(mem("ttt", 1248), mem("attn_math", 1248))
        out.append(("ViT³-T / DeiT-T (materialised) inference peak memory at 1248 (<= 0.10)", r, r <= 0.10))
        r = ratio(ips("ttt", 1248), ips("attn_sdpa", 1248))
        out.append(("ViT³-T / DeiT-T (SDPA) inference throughput at 1248 (>= 3.0x)", r, r >= 3.0))
        r = ratio(mem("ttt", 1248), mem("attn_sdpa", 1248))
        out.append(("ViT³-T / DeiT-T (SDPA) inference peak memory at 1248 (<= 1.0)", r, r <= 1.0))
        r = ratio(ips("ttt", 224), ips("attn_sdpa", 224))
        out.append(("ViT³-T / DeiT-T (SDPA) inference throughput at 224 (>= 0.9x)", r, r >= 0.9))
        for latent, want in ((32, 0.9), (64, 1.3)):
            r = ratio(tips("dit3_b2", latent), tips("dit_b2_sdpa", latent))
            out.append((f"DiT3-B/2 / DiT-B/2 (SDPA) training throughput at latent {latent} (>= {want}x)", r,
                        r >= want))
        r = ratio(get("sample", "dit", "dit3_xl2", 32, "images_per_s"), get("sample", "dit", "dit_xl2_sdpa", 32,
                                                                            "images_per_s"))
        out.append(("DiT3-XL/2 / DiT-XL/2 (SDPA) 250-step guided DDPM sampling throughput at 256 px (>= 0.9x)", r,
                    r >= 0.9))
        return out
    r = ratio(ips("ttt", 1248), ips("attn_math", 1248))
    out.append(("ViT³-T / DeiT-T (materialised) throughput at 1248 (>= 10x)", r, r >= 10))
    r = ratio(mem("ttt", 1248), mem("attn_math", 1248))
    out.append(("ViT³-T / DeiT-T (materialised) peak memory at 1248 (<= 0.10)", r, r <= 0.10))
    r = ratio(ips("ttt", 1248), ips("attn_sdpa", 1248))
    out.append(("ViT³-T / DeiT-T (SDPA) throughput at 1248 (>= 3.5x)", r, r >= 3.5))
    r = ratio(ips("ttt", 224), ips("attn_sdpa", 224))
    out.append(("ViT³-T / DeiT-T (SDPA) throughput at 224 (>= 0.8x)", r, r >= 0.8))
    for latent, want in ((32, 0.9), (64, 1.0), (128, 2.0)):
        r = ratio(tips("dit3_s2", latent), tips("dit_s2_sdpa", latent))
        out.append((f"DiT3-S/2 / DiT-S/2 (SDPA) training throughput at latent {latent} (>= {want}x)", r, r >= want))
        if latent == 64:
            r = ratio(tmem("dit3_s2", 64), tmem("dit_s2_sdpa", 64))
            out.append(("DiT3-S/2 / DiT-S/2 (SDPA) training step peak memory at latent 64 (<= 1.0)", r, r <= 1.0))
    return out


def fmt(v, spec=".1f"):
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def markdown(res: dict, args, device: str, machine: str, targets) -> list[str]:
    how = "peak resident size, a fresh process per point."
    in_process = device == "cuda" or args.in_process
    if in_process:
        how = "CUDA allocator peaks." if device == "cuda" else "peak resident size, all points in one process."
    lines = [f"# Whole-model benchmark ({device})", "",
             (f"Machine: {machine}; torch {torch.__version__}; "
              f"{'bf16 autocast' if device == 'cuda' else 'float32, 2 threads'}."),
             "Command: `python benchmarks/bench_models.py " + " ".join(sys.argv[1:]) + "`",
             *([malloc_note(args.system_malloc)] if not in_process else []),
             *([f"DiT depth overridden to {args.dit_depth} (a check of the code path, not a measurement)."]
               if args.dit_depth else []), "",
             ("Throughput in images/s (median step time over interleaved rounds; `rounds` = timed steps). "
              "Peak memory in MB: *step* = above what the process held just before the step, *total* = also "
              "weights (and AdamW state); " + how), ""]
    paths = {f"{k.split('/')[0]}": r.get("ttt_path") for task in res for k, r in res[task].items()
             if r.get("ttt_path")}
    if paths:
        lines += [("TTT path that ran (`TTT.path`): "
                   + ", ".join(f"{k}: {v}" for k, v in sorted(paths.items()))), ""]
    if res["infer"]:
        batches = sorted({r["batch"] for r in res["infer"].values() if "batch" in r})
        lines += [f"## Inference (batch {'/'.join(map(str, batches)) or 1})", "",
                  ("| model | res | tokens (stage 1) | mixer | images/s | ms | rounds | peak MB step | "
                   "peak MB total | TTT speed-up | TTT memory ratio |"),
                  "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
        for group, gname in INFER_MODELS.items():
            for s in args.sizes:
                base = res["infer"].get(f"{group}/ttt/{s}", {})
                for v in INFER_VARIANTS:
                    r = res["infer"].get(f"{group}/{v}/{s}")
                    if r is None:
                        continue
                    tokens = stage_layout(group, s)[0][0]
                    if "error" in r:
                        lines.append(f"| {gname} | {s} | {tokens} | {label(v)} | {r['error']} "
                                     f"| | | | | | |")
                        continue
                    sp = "" if v == "ttt" else fmt(ratio(base.get("images_per_s"), r.get("images_per_s")), ".2f") + "x"
                    mr = "" if v == "ttt" else fmt(ratio(base.get("peak_mb"), r.get("peak_mb")), ".3f")
                    lines.append(f"| {gname} | {s} | {tokens} | {label(v)} | "
                                 f"{fmt(r.get('images_per_s'), '.2f')} | {fmt(r.get('time_ms'))} | "
                                 f"{r.get('rounds', '')} | {fmt(r.get('peak_mb'), '.0f')} | "
                                 f"{fmt(r.get('total_peak_mb'), '.0f')} | {sp} | {mr} |")
        lines.append("")
    if res["train"]:
        batches = sorted({r["batch"] for r in res["train"].values() if "batch" in r})
        lines += [f"## Training step (batch {'/'.join(map(str, batches))}, hybrid diffusion loss, backward, AdamW)",
                  "",
                  ("| latent | image | tokens | model | images/s | ms/step | rounds | peak MB step | peak MB total | "
                   "DiT3 speed-up | DiT3 memory ratio |"),
                  "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
        lines += dit_rows(res["train"], args.latents, train_variants(device), ".0f")
    if res["sample"]:
        batches = sorted({r["batch"] for r in res["sample"].values() if "batch" in r})
        lines += [(f"## Sampling (batch {'/'.join(map(str, batches))}, {SAMPLE_STEPS}-step DDPM, guidance "
                   f"{SAMPLE_CFG:g}; ms = one denoising step of the guided batch, images/s = batch / "
                   f"({SAMPLE_STEPS} x that))"), "",
                  ("| latent | image | tokens | model | images/s | ms/step | rounds | peak MB step | peak MB total | "
                   "DiT3 speed-up | DiT3 memory ratio |"),
                  "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
        latents = sorted({int(k.split("/")[2]) for k in res["sample"]})
        lines += dit_rows(res["sample"], latents, [dit_variant(m) for m in SAMPLE_MODELS], ".2f")
    lines += ["## Targets", "", "Memory ratios use the step peak.", "",
              "| target | measured | |", "|---|---:|---|"]
    lines += [f"| {label} | {fmt(v, '.3f' if 'memory' in label else '.2f')} | "
              f"{'n/a' if math.isnan(v) else 'met' if ok else 'MISSED'} |" for label, v, ok in targets]
    return lines


def dit_rows(points: dict, latents: list[int], variants: list[str], ms_spec: str) -> list[str]:
    """Table rows of a DiT task: per latent size DiT³ (variants[0]) then its baseline, with DiT³'s ratios."""
    lines = []
    for L in latents:
        base = points.get(f"dit/{variants[0]}/{L}", {})
        for v in variants:
            r = points.get(f"dit/{v}/{L}")
            if r is None:
                continue
            head = f"| {L} | {8 * L} | {(L // 2) ** 2} | {label(v)} |"
            if "error" in r:
                lines.append(f"{head} {r['error']} | | | | | | |")
                continue
            sp = "" if v == variants[0] else fmt(ratio(base.get("images_per_s"), r.get("images_per_s")), ".2f") + "x"
            mr = "" if v == variants[0] else fmt(ratio(base.get("peak_mb"), r.get("peak_mb")), ".3f")
            lines.append(f"{head} {fmt(r.get('images_per_s'), '.2f')} | {fmt(r.get('time_ms'), ms_spec)} | "
                         f"{r.get('rounds', '')} | {fmt(r.get('peak_mb'), '.0f')} | "
                         f"{fmt(r.get('total_peak_mb'), '.0f')} | {sp} | {mr} |")
    return lines + [""]


def plot(res: dict, args, device: str, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [t for t in ("infer", "train") if res[t]]
    if not panels:
        return
    fig, axes = plt.subplots(len(panels), 2, figsize=(11, 4.2 * len(panels)), squeeze=False)
    for row, task in zip(axes, panels):
        groups = INFER_MODELS if task == "infer" else {"dit": ""}
        variants = INFER_VARIANTS if task == "infer" else train_variants(device)
        xs_all = args.sizes if task == "infer" else args.latents
        for group, gname in groups.items():
            for v in variants:
                xs, ips, mem = [], [], []
                for s in xs_all:
                    r = res[task].get(f"{group}/{v}/{s}", {})
                    if "images_per_s" in r:
                        xs.append(s if task == "infer" else 8 * s)
                        ips.append(r["images_per_s"])
                        mem.append(r.get("peak_mb", float("nan")))
                if not xs:
                    continue
                style = {"marker": "s" if group == "hvit3_tiny" else "o",
                         "linestyle": "-" if v == "ttt" or v.startswith("dit3") else "--" if "sdpa" in v else ":"}
                name = f"{gname} {label(v)}".strip()
                row[0].plot(xs, ips, label=name, **style)
                row[1].plot(xs, mem, label=name, **style)
        batches = "/".join(map(str, sorted({r["batch"] for r in res[task].values() if "batch" in r})))
        what = f"inference, batch {batches}" if task == "infer" else f"training step, batch {batches}"
        for ax, ylabel in zip(row, ("images / s", "peak memory of the step (MB)")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("resolution (px)" if task == "infer" else "image size (px; latent = size / 8)")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{what} ({device})")
            ax.set_xticks([s if task == "infer" else 8 * s for s in xs_all])
            ax.set_xticklabels([str(s if task == "infer" else 8 * s) for s in xs_all])
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 512, 1024, 1248], help="inference resolutions")
    parser.add_argument("--latents", type=int, nargs="+", default=[32, 64, 128], help="DiT latent sizes")
    parser.add_argument("--sample-latents", type=int, nargs="*",
                        help="DiT latent sizes of the sampling points; default 32 on CUDA, none on CPU")
    parser.add_argument("--models", nargs="+", default=list(INFER_MODELS), choices=list(INFER_MODELS),
                        help="classifiers for inference")
    parser.add_argument("--infer-batch", type=int, help="images per inference call (default: infer_batch)")
    parser.add_argument("--train-batch", type=int, help=f"default {TRAIN_BATCH}")
    parser.add_argument("--sample-batch", type=int, help=f"default {SAMPLE_BATCH}")
    parser.add_argument("--dit-depth", type=int, help="override the DiT models' depth (a quick check of the code "
                                                      "path, not a measurement)")
    parser.add_argument("--min-time", type=float, default=2.0, help="seconds of timed runs per variant and point")
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--skip-infer", action="store_true")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per worker process before giving up")
    parser.add_argument("--system-malloc", action="store_true", help="CPU: time with glibc's default malloc")
    parser.add_argument("--in-process", action="store_true",
                        help="CPU: measure in this process as on CUDA (a quick check of the CUDA code path; "
                             "memory is then the process's peak resident size)")
    parser.add_argument("--results", default=str(RESULTS), help="folder for the .md, .json and .png")
    parser.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)  # a CPU worker's batch
    parser.add_argument("--worker", nargs=6, metavar=("KIND", "TASK", "GROUP", "VARIANTS", "SIZE", "DEVICE"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, task, group, variants, size, device = args.worker
        print(json.dumps(worker(kind, task, group, variants.split(","), int(size), device, args.min_time,
                                args.batch, args.dit_depth)))
        return

    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    if "cuda" in devices and not torch.cuda.is_available():
        if args.device == "cuda":
            sys.exit("--device cuda: no CUDA device")
        devices.remove("cuda")
    if "cpu" in devices:
        torch.set_num_threads(2)
    for device in devices:
        machine = torch.cuda.get_device_name() if device == "cuda" else f"{cpu_name()}, {os.cpu_count()} cores"
        res = {"infer": {}, "train": {}, "sample": {}}
        t_start = time.perf_counter()
        # the points the targets need first (ViT³-T, DiT), so that a run cut short has them
        infer = [] if args.skip_infer else [("infer", g, list(INFER_VARIANTS), s) for g in args.models
                                            for s in args.sizes]
        train = [] if args.skip_train else [("train", "dit", train_variants(device), L) for L in args.latents]
        sample_latents = args.sample_latents if args.sample_latents is not None else [32] if device == "cuda" else []
        sample = [("sample", "dit", [dit_variant(m) for m in SAMPLE_MODELS], L) for L in sample_latents]
        jobs = [j for j in infer if j[1] == "vit3_tiny"] + train + sample + [j for j in infer if j[1] != "vit3_tiny"]
        for task, group, variants, size in jobs:
            for v, r in measure_point(args, device, task, group, variants, size).items():
                res[task][f"{group}/{v}/{size}"] = r
                shown = {k: (round(x, 3) if isinstance(x, float) else x) for k, x in r.items()}
                print(f"[{time.perf_counter() - t_start:6.0f}s] {device} {task} {group} {v:11s} {size:5d} {shown}",
                      flush=True)
            write_outputs(res, args, device, machine, complete=False)  # a cut-off run keeps what it measured
        print("\n".join(write_outputs(res, args, device, machine, complete=True)))


def write_outputs(res: dict, args, device: str, machine: str, complete: bool) -> list[str]:
    """Markdown, JSON and plot of the results so far; returns the markdown lines."""
    targets = check_targets(res, device)
    lines = markdown(res, args, device, machine, targets)
    if not complete:
        lines.insert(1, "\n**Partial: the run is still going (or was cut off).**")
    Path(args.results).mkdir(parents=True, exist_ok=True)
    stem = Path(args.results) / f"bench_models_{device}"
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    stem.with_suffix(".json").write_text(json.dumps(
        {"machine": machine, "torch": torch.__version__, "device": device, "argv": sys.argv[1:],
         "dtype": "bf16 autocast" if device == "cuda" else "float32",
         "complete": complete, "results": res,
         "malloc": malloc_record(device, args.system_malloc),
         "targets": [{"target": lb, "ratio": v, "met": ok} for lb, v, ok in targets]}, indent=1))
    plot(res, args, device, stem.with_suffix(".png"))
    return lines


if __name__ == "__main__":
    main()
