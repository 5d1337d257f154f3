"""Speed and memory of one token mixer layer: TTT (fast, reference) against attention.

    python benchmarks/bench_ttt.py                  # CPU, and CUDA (bf16) when present
    python benchmarks/bench_ttt.py --device cpu --tokens 256 1024

For each mixer (TTT fast, TTT reference, SDPA attention, materialised "math"
attention, linear attention) and token count N (C = 384, 6 heads, batch 1) it
times forward+backward and inference, measures peak memory, and reports the
layer's analytic FLOPs and the fraction of this machine's plain matmul
throughput it reaches. Times are medians over rounds that run one step of every
mixer in turn in one process, so noise and allocator state fall on all alike
(on CPU materialised attention runs in a process of its own, with glibc's default
malloc where its N x N blocks are large).
Peak memory: on CPU each point runs in a fresh subprocess and it is the peak
resident size above what the process held before the step; on CUDA it is the
allocator's peak above what was allocated before the step.
On CPU the timing processes run with glibc malloc keeping freed memory for reuse
(see CACHING_MALLOC; --system-malloc times with glibc's default instead).
Writes benchmarks/results/bench_ttt_<device>.{md,json} and checks the targets
of the TTT-core issue (ratios in one run).
"""
import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
MIXERS = {  # name -> (build_mixer name, kwargs)
    "ttt_fast": ("ttt", {"impl": "fast"}),
    "ttt_reference": ("ttt", {"impl": "reference"}),
    "attn_sdpa": ("attention", {"impl": "sdpa"}),
    "attn_math": ("attention", {"impl": "math"}),
    "linear_attn": ("linear_attention", {}),
}


def layer_flops(mixer: str, n: int, c: int, heads: int) -> float:
    """Forward FLOPs (2 per multiply-add) of the layer's matmuls and convolutions; elementwise ops excluded."""
    d = c // heads
    if mixer.startswith("ttt"):
        # qkv and proj; per head z1, z2, g1, g2 and the two applications (6 N d^2 MACs each head);
        # conv branch: the 3x3 gradient correlation and the application (2 x 9 N d MACs)
        return 2 * n * (c * (3 * c + 3 * d) + (c + d) * c + 6 * c * d + 18 * d)
    if mixer.startswith("attn"):
        return 2 * n * (4 * c * c) + 4 * n * n * c
    return 2 * n * (4 * c * c) + 4 * n * c * d


def matmul_tflops(device: str, dtype: torch.dtype) -> float:
    size = 2048 if device == "cpu" else 8192
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    times = []
    for _ in range(5):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * size ** 3 / min(times) / 1e12


def sync(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def make_step(mixer: str, n: int, mode: str, device: str, c: int, heads: int):
    """A closure running one forward (+ backward for mode="train") of one mixer layer on [1, N, C]."""
    from vit3.mixers import build_mixer

    torch.manual_seed(0)
    name, kwargs = MIXERS[mixer]
    layer = build_mixer(name, c, heads, **kwargs).to(device)
    side = math.isqrt(n)
    x = torch.randn(1, n, c, device=device, requires_grad=(mode == "train"))
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=(device == "cuda"))

    def step():
        if mode == "train":
            with amp:
                y = layer(x, side, n // side)
            y.float().square().mean().backward()
        else:
            with torch.no_grad(), amp:
                layer(x, side, n // side)
    return step


def step_peak_bytes(step, device: str) -> tuple[int, int]:
    """(held just before, peak during) one step, in bytes: on CUDA the allocator's counts (after a
    warm-up step), on CPU the resident size and the process's peak resident size."""
    if device == "cuda":
        step()  # warm-up (kernel selection)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return base, torch.cuda.max_memory_allocated()
    base = rss_bytes()
    step()
    return base, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_memory_mb(step, device: str) -> float:
    """Peak memory of one step above what was held before it."""
    base, peak = step_peak_bytes(step, device)
    return max(peak - base, 0) / 2 ** 20


def interleaved_times_ms(steps: dict, device: str, min_time: float) -> dict:
    """Median step time of each mixer, timed in rounds (one step of each per round) in one process, so
    that machine noise and allocator state fall on all of them alike and the ratios stay stable."""
    for step in steps.values():
        step()
        step()  # warm-up: kernel choice, allocator steady state
    times = {k: [] for k in steps}
    start = time.perf_counter()
    while len(times[next(iter(steps))]) < 5 or (time.perf_counter() - start < min_time * len(steps)
                                               and len(times[next(iter(steps))]) < 20):
        for k, step in steps.items():
            sync(device)
            t0 = time.perf_counter()
            step()
            sync(device)
            times[k].append(time.perf_counter() - t0)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def worker(kind: str, mixers: list[str], n: int, mode: str, device: str, c: int, heads: int, min_time: float) -> dict:
    """kind "memory": one mixer's peak; kind "time": every mixer's median time, interleaved."""
    steps = {m: make_step(m, n, mode, device, c, heads) for m in mixers}
    if kind == "memory":
        return {"peak_mb": peak_memory_mb(steps[mixers[0]], device)}
    return {m: {"time_ms": t} for m, t in interleaved_times_ms(steps, device, min_time).items()}


# Timing: glibc malloc serves every block from its heap and keeps what is freed (no mmap, no trim), so a
# step reuses the memory of the previous one, as PyTorch's CUDA caching allocator does on a GPU (and
# jemalloc / tcmalloc on CPU). With glibc's default every large tensor is mmap-ed, faulted in page by
# page and unmapped on free, each step again: measured, about 30 s of a 66 s DiT3-S/2 training step at
# latent 128, and as much for DiT-S/2, a cost of the allocator, not of the models.
CACHING_MALLOC = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}
# Memory: a fixed mmap threshold makes glibc return every large block on free, so the peak resident size
# follows the live tensors instead of the allocator's retained heap.
RETURNING_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def worker_env(kind: str, system_malloc: bool) -> dict:
    """Environment of a CPU worker process of kind "time" or "memory"."""
    env = dict(os.environ)
    if kind == "memory":
        env.update(RETURNING_MALLOC)
    elif not system_malloc:
        env.update(CACHING_MALLOC)
    return env


def malloc_note(system_malloc: bool) -> str:
    return ("CPU times with glibc's default malloc (--system-malloc)." if system_malloc else
            "CPU times with glibc malloc keeping freed memory for reuse (" +
            " ".join(f"{k}={v}" for k, v in CACHING_MALLOC.items()) + "), as a caching allocator does.")


def malloc_record(device: str, system_malloc: bool):
    """The timing processes' malloc, for the results JSON: None on CUDA."""
    return None if device != "cpu" else "system" if system_malloc else CACHING_MALLOC


def heap_keeps(n: int, heads: int) -> bool:
    """Whether materialised attention's N x N blocks (scores, probabilities, their gradient) stay under a
    quarter of this machine's memory, so that a heap keeping them cannot fragment past it."""
    return 3 * heads * n * n * 4 < os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 4


def run_worker(args, kind: str, mixers: list[str], n: int, mode: str, system_malloc: bool = False) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, ",".join(mixers), str(n), mode, "cpu",
           "--dim", str(args.dim), "--heads", str(args.heads), "--min-time", str(args.min_time)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout,
                         env=worker_env(kind, args.system_malloc or system_malloc))
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def ratio(a, b):
    return a / b if a and b else float("nan")


def check_targets(res: dict, device: str) -> list[str]:
    """The TTT-core issue's targets (forward+backward unless said), as measured ratios."""
    def get(mixer, n, mode, key):
        return res.get(f"{mixer}/{n}/{mode}", {}).get(key)

    lines = []

    def target(label, value, ok):
        lines.append(f"| {label} | {value:.2f} | {'met' if ok else 'MISSED'} |")

    for n, want in ((4096, 4.0), (16384, 12.0)):
        r = ratio(get("attn_sdpa", n, "train", "time_ms"), get("ttt_fast", n, "train", "time_ms"))
        target(f"speed-up of TTT fast over SDPA, N={n} (>= {want}x)", r, r >= want)
    for n in sorted({int(k.split("/")[1]) for k in res}):
        r = ratio(get("ttt_reference", n, "train", "time_ms"), get("ttt_fast", n, "train", "time_ms"))
        want = 1.25 if n == 16384 else 1.0
        target(f"speed-up of TTT fast over reference, N={n} (>= {want}x)", r, r >= want)
    n = 16384
    r = ratio(get("ttt_fast", n, "train", "peak_mb"), get("ttt_reference", n, "train", "peak_mb"))
    target(f"peak memory TTT fast / reference, N={n} (<= 0.5)", r, r <= 0.5)
    r = ratio(get("ttt_fast", n, "train", "peak_mb"), get("attn_sdpa", n, "train", "peak_mb"))
    target(f"peak memory TTT fast / SDPA, N={n} (<= 1.0)", r, r <= 1.0)
    r = ratio(get("attn_sdpa", 4096, "infer", "time_ms"), get("ttt_fast", 4096, "infer", "time_ms"))
    target("inference speed-up of TTT fast over SDPA, N=4096 (>= 2.5x)", r, r >= 2.5)
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    parser.add_argument("--tokens", type=int, nargs="+", default=[256, 1024, 4096, 16384])
    parser.add_argument("--mixers", nargs="+", default=list(MIXERS), choices=list(MIXERS))
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--min-time", type=float, default=1.0, help="seconds of timed runs per mixer and point")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per point before giving up")
    parser.add_argument("--system-malloc", action="store_true", help="CPU: time with glibc's default malloc")
    parser.add_argument("--worker", nargs=5, metavar=("KIND", "MIXERS", "N", "MODE", "DEVICE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, mixers, n, mode, device = args.worker
        print(json.dumps(worker(kind, mixers.split(","), int(n), mode, device, args.dim, args.heads, args.min_time)))
        return

    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    devices = [d for d in devices if d == "cpu" or torch.cuda.is_available()]
    RESULTS.mkdir(parents=True, exist_ok=True)
    for device in devices:
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        peak_tflops = matmul_tflops(device, dtype)
        machine = (torch.cuda.get_device_name() if device == "cuda"
                   else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
        res = {}
        for n in args.tokens:
            for mode in ("train", "infer"):
                points = {}
                if device == "cpu":  # memory: a fresh process per point; time: one process for all mixers but
                    # materialised attention, in one of its own, with glibc's default malloc where its N x N
                    # blocks are large: a heap that keeps them (18 GB at 16384) fragments past the machine's memory
                    groups = [[m for m in args.mixers if m != "attn_math"],
                              [m for m in args.mixers if m == "attn_math"]]
                    for group in filter(None, groups):
                        times = run_worker(args, "time", group, n, mode,
                                           system_malloc=group == ["attn_math"] and not heap_keeps(n, args.heads))
                        points.update({m: {**times.get(m, {"error": times.get("error", "failed")}),
                                           **run_worker(args, "memory", [m], n, mode)} for m in group})
                else:
                    for m in args.mixers:
                        try:
                            points[m] = {"peak_mb": peak_memory_mb(make_step(m, n, mode, device, args.dim,
                                                                             args.heads), device)}
                        except torch.OutOfMemoryError:
                            points[m] = {"error": "out of memory"}
                        torch.cuda.empty_cache()
                    ok = [m for m in args.mixers if "error" not in points[m]]
                    steps = {m: make_step(m, n, mode, device, args.dim, args.heads) for m in ok}
                    for m, t in interleaved_times_ms(steps, device, args.min_time).items():
                        points[m]["time_ms"] = t
                    del steps
                    torch.cuda.empty_cache()
                for mixer, r in points.items():
                    flops = layer_flops(mixer, n, args.dim, args.heads) * (3 if mode == "train" else 1)
                    if "time_ms" in r:
                        r["tflops"] = flops / (r["time_ms"] / 1e3) / 1e12
                        r["matmul_fraction"] = r["tflops"] / peak_tflops
                    r["gflops"] = flops / 1e9
                    res[f"{mixer}/{n}/{mode}"] = r
                    print(f"{device} {mixer:14s} N={n:6d} {mode:5s} {r}", flush=True)

        big = [str(n) for n in args.tokens if not heap_keeps(n, args.heads)]
        math_note = " attn_math: a process of its own" + (f", glibc's default malloc at N = {', '.join(big)}."
                                                          if big else ".")
        lines = [f"# TTT layer benchmark ({device})", "",
                 f"Machine: {machine}; torch {torch.__version__}; "
                 f"{'bf16 autocast' if device == 'cuda' else 'float32'}; C={args.dim}, {args.heads} heads, "
                 f"batch 1; plain {('bf16' if device == 'cuda' else 'fp32')} matmul: {peak_tflops:.3f} TFLOP/s.",
                 "Command: `python benchmarks/bench_ttt.py " + " ".join(sys.argv[1:]) + "`",
                 *([malloc_note(args.system_malloc) + math_note] if device == "cpu" else []), "",
                 "FLOPs are analytic (matmuls and convolutions, 2 per multiply-add; training = 3 x forward); "
                 "'of matmul' is achieved FLOP/s over the plain matmul's.", "",
                 "| mixer | N | fwd+bwd ms | fwd+bwd peak MB | inference ms | inference peak MB | GFLOPs (fwd) "
                 "| of matmul (fwd+bwd) |",
                 "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for n in args.tokens:
            for mixer in args.mixers:
                t, i = res[f"{mixer}/{n}/train"], res[f"{mixer}/{n}/infer"]
                if "error" in t or "error" in i:
                    lines.append(f"| {mixer} | {n} | {t.get('error', '')} {i.get('error', '')} | | | | | |")
                    continue
                lines.append(f"| {mixer} | {n} | {t['time_ms']:.1f} | {t['peak_mb']:.0f} | {i['time_ms']:.1f} | "
                             f"{i['peak_mb']:.0f} | {i['gflops']:.2f} | {100 * t['matmul_fraction']:.0f}% |")
        lines += ["", "## Targets", "", "| target | measured | |", "|---|---:|---|"] + check_targets(res, device)
        (RESULTS / f"bench_ttt_{device}.md").write_text("\n".join(lines) + "\n")
        (RESULTS / f"bench_ttt_{device}.json").write_text(json.dumps(
            {"machine": machine, "torch": torch.__version__, "dim": args.dim, "heads": args.heads,
             "malloc": malloc_record(device, args.system_malloc),
             "matmul_tflops": peak_tflops, "results": res}, indent=1))
        print("\n".join(lines))


if __name__ == "__main__":
    main()
