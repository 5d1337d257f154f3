"""Speed and memory of one token mixer layer: TTT (Triton, fast, reference) against attention.

    python benchmarks/bench_ttt.py                  # CPU, and CUDA (bf16) when present
    python benchmarks/bench_ttt.py --device cpu --tokens 256 1024

For each mixer (TTT Triton (CUDA only), TTT fast, TTT reference, SDPA attention,
materialised "math" attention, linear attention) and token count N (C = 384,
6 heads) it times forward+backward and inference, measures peak memory, and
reports the layer's analytic FLOPs and the fraction of this machine's plain
matmul throughput it reaches. Batch: 1 on CPU; on CUDA max(1, 65536 // N), so
every call holds at least 64K tokens and fills the GPU (--batch-tokens). A
mixer that cannot be built or run here (the Triton path on CPU without
TRITON_INTERPRET=1) is reported with its error and the others go on.
On CUDA (and with --in-process) it also times the inner step alone and sets it
against its memory-traffic floor (`inner_bytes`, over the copy bandwidth
measured in the same run; see `inner_step_times`). Times are medians over rounds that run one step of every
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
import subprocess
import sys
from pathlib import Path

import torch
from bench_common import (
    RESULTS,
    copy_gbps,
    empty_cache,
    error_line,
    interleaved_times_ms,
    malloc_note,
    malloc_record,
    matmul_tflops,
    ratio,
    step_peak_bytes,
    worker_env,
)

MIXERS = {  # name -> (build_mixer name, kwargs)
    "ttt_triton": ("ttt", {"impl": "triton"}),
    "ttt_fast": ("ttt", {"impl": "fast"}),
    "ttt_reference": ("ttt", {"impl": "reference"}),
    "attn_sdpa": ("attention", {"impl": "sdpa"}),
    "attn_math": ("attention", {"impl": "math"}),
    "linear_attn": ("linear_attention", {}),
}
GPU_ONLY = ("ttt_triton",)  # left out of the CPU run's default mixers


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


def inner_bytes(n: int, c: int, heads: int, batch: int, mode: str, elem: int) -> int:
    """Bytes the TTT inner step must move through device memory: the floor of any implementation of it.

    The paper's design reads q, k, v, each C + d wide (C for the per-head SwiGLU branch, d = C / heads for the
    conv branch), and writes its output, C + d wide (the output projection's input). Per token, in values:
      forward (inference): one pass over k and v (read; they train the inner weights), then one over q (read)
        writing the output: 4 (C + d);
      backward: one pass over q and the output's gradient (read) writing dq and the output (recomputed for the
        projection's weight gradient, as the fast path does), then one over k and v (read) writing dk and dv:
        8 (C + d);
      forward+backward: 12 (C + d).
    The inner weights (heads x d x 2d and a 3x3 filter per conv channel, a few KB) are left out.
    elem: bytes per value (2 for bf16 activations under autocast).
    """
    per_token = {"infer": 4, "train": 12}[mode] * (c + c // heads)
    return batch * n * per_token * elem


def batch_for(n: int, batch_tokens: int) -> int:
    """Images per call: enough for at least batch_tokens tokens (1 when batch_tokens <= N)."""
    return max(1, batch_tokens // n)


def make_step(mixer: str, n: int, mode: str, device: str, c: int, heads: int, batch: int = 1):
    """A closure running one forward (+ backward for mode="train") of one mixer layer on [batch, N, C]."""
    from vit3.mixers import build_mixer

    torch.manual_seed(0)
    name, kwargs = MIXERS[mixer]
    layer = build_mixer(name, c, heads, **kwargs).to(device)
    side = math.isqrt(n)
    x = torch.randn(batch, n, c, device=device, requires_grad=(mode == "train"))
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


def make_gemm_step(n: int, mode: str, device: str, c: int, heads: int, batch: int = 1):
    """A closure running only the TTT layer's qkv and output projections, as its step runs them (same shapes,
    autocast and loss on the output; the qkv gradient a fixed random tensor): layer time minus this time is
    the inner step's."""
    from vit3.mixers import build_mixer

    torch.manual_seed(0)
    layer = build_mixer("ttt", c, heads).to(device)
    train = mode == "train"
    act = torch.bfloat16 if device == "cuda" else torch.float32
    x = torch.randn(batch, n, c, device=device, requires_grad=train)
    z = torch.randn(batch, n, layer.proj.in_features, device=device, dtype=act, requires_grad=train)
    dqkv = torch.randn(batch, n, layer.qkv.out_features, device=device, dtype=act)
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=(device == "cuda"))

    def step():
        with torch.set_grad_enabled(train), amp:
            qkv, y = layer.qkv(x), layer.proj(z)
        if train:
            torch.autograd.backward([qkv, y.float().square().mean()], [dqkv, None])
    return step


def make_inner_triton_step(n: int, mode: str, device: str, c: int, heads: int, batch: int = 1):
    """A closure running the Triton inner step alone, the kernels between the qkv and output projections:
    the custom op `vit3::ttt_inner_fwd` and, for mode="train", `vit3::ttt_inner_bwd` from a fixed random
    gradient of the projection input; None where the Triton path cannot be imported."""
    try:
        from vit3.ttt import triton_ops  # noqa: F401  (registers torch.ops.vit3.ttt_inner_*)
    except ImportError:
        return None
    from vit3.mixers import build_mixer

    torch.manual_seed(0)
    layer = build_mixer("ttt", c, heads).to(device)
    act = torch.bfloat16 if device == "cuda" else torch.float32
    side = math.isqrt(n)
    qkv = torch.randn(batch, n, layer.qkv.out_features, device=device, dtype=act)
    dout = torch.randn(batch, n, layer.proj.in_features, device=device, dtype=act)
    w1, w2, w3 = (t.detach() for t in (layer.w1, layer.w2, layer.w3))
    args = (heads, side, n // side, layer.scale, layer.inner_lr, 0, 0)

    def step():
        out, *inner = torch.ops.vit3.ttt_inner_fwd(qkv, w1, w2, w3, None, *args)
        if mode == "train":
            torch.ops.vit3.ttt_inner_bwd(qkv, dout, w3, None, *inner, *args)
    return step


def peak_memory_mb(step, device: str) -> float:
    """Peak memory of one step above what was held before it."""
    base, peak = step_peak_bytes(step, device)
    return max(peak - base, 0) / 2 ** 20


def worker(kind: str, mixers: list[str], n: int, mode: str, device: str, c: int, heads: int, min_time: float,
           batch: int = 1) -> dict:
    """kind "memory": one mixer's peak; kind "time": every mixer's median time, interleaved."""
    steps = {m: make_step(m, n, mode, device, c, heads, batch) for m in mixers}
    if kind == "memory":
        return {"peak_mb": peak_memory_mb(steps[mixers[0]], device)}
    times = interleaved_times_ms(steps, device, min_time, max_rounds=20)
    return {m: {"time_ms": t["time_ms"]} for m, t in times.items()}


def heap_keeps(n: int, heads: int) -> bool:
    """Whether materialised attention's N x N blocks (scores, probabilities, their gradient) stay under a
    quarter of this machine's memory, so that a heap keeping them cannot fragment past it."""
    return 3 * heads * n * n * 4 < os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 4


def run_worker(args, kind: str, mixers: list[str], n: int, mode: str, batch: int,
               system_malloc: bool = False) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, ",".join(mixers), str(n), mode, "cpu",
           "--dim", str(args.dim), "--heads", str(args.heads), "--min-time", str(args.min_time), "--batch", str(batch)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout,
                         env=worker_env(kind, args.system_malloc or system_malloc))
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_in_process(args, mixers: list[str], n: int, mode: str, device: str, batch: int, gbps: float) -> dict:
    """{mixer: result} of one point with every mixer in this process (CUDA; CPU with --in-process): peak memory
    one mixer at a time, then all of them timed in interleaved rounds, with the inner step's parts."""
    points = {}
    for m in mixers:
        try:
            points[m] = {"peak_mb": peak_memory_mb(make_step(m, n, mode, device, args.dim, args.heads, batch),
                                                   device)}
        except Exception as e:  # out of memory, or a path this machine refuses (Triton on CPU without its interpreter)
            points[m] = {"error": error_line(e)}
        empty_cache(device)
    ok = [m for m in mixers if "error" not in points[m]]
    steps = {m: make_step(m, n, mode, device, args.dim, args.heads, batch) for m in ok}
    if any(m.startswith("ttt") for m in ok):
        steps["_gemms"] = make_gemm_step(n, mode, device, args.dim, args.heads, batch)
        if "ttt_triton" in ok:
            try:
                inner = make_inner_triton_step(n, mode, device, args.dim, args.heads, batch)
                if inner is not None:
                    inner()
                    steps["_inner_triton"] = inner
            except Exception as e:
                points["ttt_triton"]["inner_error"] = error_line(e)
    try:
        times = {k: t["time_ms"] for k, t in interleaved_times_ms(steps, device, args.min_time, max_rounds=20).items()}
    except Exception as e:
        times = {}
        for m in ok:
            points[m]["error"] = error_line(e)
    for m in ok:
        if m in times:
            points[m]["time_ms"] = times[m]
    del steps
    empty_cache(device)
    inner_step_times(points, times, n, mode, args.dim, args.heads, batch, 2 if device == "cuda" else 4, gbps)
    return points


def inner_step_times(points: dict, times: dict, n: int, mode: str, c: int, heads: int, batch: int, elem: int,
                     gbps: float):
    """Adds the inner step's time and its floor to each timed TTT mixer's result.

    Inner step: the Triton inner ops timed alone for ttt_triton, else the layer's time minus
    that of its qkv and output projections ("_gemms", make_gemm_step). Floor: inner_bytes over the copy
    bandwidth measured in this run; "inner_floor_fraction" = floor / inner time (1.0 = at the floor).
    """
    floor_ms = 1e3 * inner_bytes(n, c, heads, batch, mode, elem) / (gbps * 1e9)
    for m, r in points.items():
        if not m.startswith("ttt") or "time_ms" not in r or "_gemms" not in times:
            continue
        if m == "ttt_triton" and "_inner_triton" in times:
            inner, how = times["_inner_triton"], "Triton inner ops alone"
        else:
            inner, how = r["time_ms"] - times["_gemms"], "layer - qkv/proj GEMMs"
        r.update(gemms_ms=times["_gemms"], inner_ms=inner, inner_method=how, inner_floor_ms=floor_ms,
                 inner_floor_fraction=floor_ms / inner if inner > 0 else float("nan"))


def measure_workers(args, mixers: list[str], n: int, mode: str, batch: int) -> dict:
    """{mixer: result} of one CPU point: time in one process for all mixers but materialised attention, which
    gets one of its own, with glibc's default malloc where its N x N blocks are large (a heap that keeps them,
    18 GB at 16384, fragments past the machine's memory); memory in a fresh process per mixer."""
    points = {}
    groups = [[m for m in mixers if m != "attn_math"], [m for m in mixers if m == "attn_math"]]
    for group in filter(None, groups):
        times = run_worker(args, "time", group, n, mode, batch,
                           system_malloc=group == ["attn_math"] and not heap_keeps(n, args.heads))
        points.update({m: {**times.get(m, {"error": times.get("error", "failed")}),
                           **run_worker(args, "memory", [m], n, mode, batch)} for m in group})
    return points


def targets(res: dict, device: str) -> list[tuple[str, float, bool]]:
    """The targets as (label, measured ratio, met): on CPU the TTT-core issue's (TTT fast), on CUDA the GPU
    issue's (TTT Triton; bf16, batches of at least 64K tokens). Forward+backward unless said."""
    def get(mixer, n, mode, key):
        return res.get(f"{mixer}/{n}/{mode}", {}).get(key)

    out = []
    if device == "cuda":
        for n, want in ((1024, 1.0), (4096, 3.0), (16384, 10.0)):
            r = ratio(get("attn_sdpa", n, "train", "time_ms"), get("ttt_triton", n, "train", "time_ms"))
            out.append((f"speed-up of TTT Triton over SDPA, N={n} (>= {want}x)", r, r >= want))
        for mode in ("train", "infer"):
            for n in sorted({1024, 4096, 16384} | {int(k.split("/")[1]) for k in res if k.endswith(f"/{mode}")}):
                r = ratio(get("ttt_triton", n, mode, "peak_mb"), get("attn_sdpa", n, mode, "peak_mb"))
                what = "fwd+bwd" if mode == "train" else "inference"
                out.append((f"{what} peak memory TTT Triton / SDPA, N={n} (<= 1.0)", r, r <= 1.0))
        r = ratio(get("attn_sdpa", 4096, "infer", "time_ms"), get("ttt_triton", 4096, "infer", "time_ms"))
        out.append(("inference speed-up of TTT Triton over SDPA, N=4096 (>= 3.0x)", r, r >= 3.0))
        for mode, what in (("train", "fwd+bwd"), ("infer", "inference")):
            r = get("ttt_triton", 16384, mode, "inner_floor_fraction") or float("nan")
            out.append((f"{what} inner step of TTT Triton, fraction of its floor, N=16384 (>= 0.5)", r, r >= 0.5))
        return out
    for n, want in ((4096, 4.0), (16384, 12.0)):
        r = ratio(get("attn_sdpa", n, "train", "time_ms"), get("ttt_fast", n, "train", "time_ms"))
        out.append((f"speed-up of TTT fast over SDPA, N={n} (>= {want}x)", r, r >= want))
    for n in sorted({int(k.split("/")[1]) for k in res}):
        r = ratio(get("ttt_reference", n, "train", "time_ms"), get("ttt_fast", n, "train", "time_ms"))
        want = 1.25 if n == 16384 else 1.0
        out.append((f"speed-up of TTT fast over reference, N={n} (>= {want}x)", r, r >= want))
    n = 16384
    r = ratio(get("ttt_fast", n, "train", "peak_mb"), get("ttt_reference", n, "train", "peak_mb"))
    out.append((f"peak memory TTT fast / reference, N={n} (<= 0.5)", r, r <= 0.5))
    r = ratio(get("ttt_fast", n, "train", "peak_mb"), get("attn_sdpa", n, "train", "peak_mb"))
    out.append((f"peak memory TTT fast / SDPA, N={n} (<= 1.0)", r, r <= 1.0))
    r = ratio(get("attn_sdpa", 4096, "infer", "time_ms"), get("ttt_fast", 4096, "infer", "time_ms"))
    out.append(("inference speed-up of TTT fast over SDPA, N=4096 (>= 2.5x)", r, r >= 2.5))
    return out


def target_row(label: str, value: float, ok: bool) -> str:
    """One markdown row of the targets table: n/a where a number is missing (a point not run or failed)."""
    if math.isnan(value):
        return f"| {label} | n/a | n/a |"
    return f"| {label} | {value:.2f} | {'met' if ok else 'MISSED'} |"


def check_targets(res: dict, device: str) -> list[str]:
    """The targets (`targets`) as markdown rows."""
    return [target_row(*t) for t in targets(res, device)]


def markdown(res: dict, args, device: str, mixers: list[str], batch_tokens: int, machine: str,
             peak_tflops: float, gbps: float) -> list[str]:
    big = [str(n) for n in args.tokens if not heap_keeps(n, args.heads)]
    math_note = " attn_math: a process of its own" + (f", glibc's default malloc at N = {', '.join(big)}."
                                                      if big else ".")
    batch = "batch 1" if batch_tokens <= 1 else f"batch max(1, {batch_tokens} // N)"
    in_process = device == "cuda" or args.in_process
    lines = [f"# TTT layer benchmark ({device})", "",
             f"Machine: {machine}; torch {torch.__version__}; "
             f"{'bf16 autocast' if device == 'cuda' else 'float32'}; C={args.dim}, {args.heads} heads, "
             f"{batch}; plain {('bf16' if device == 'cuda' else 'fp32')} matmul: {peak_tflops:.3f} TFLOP/s.",
             "Command: `python benchmarks/bench_ttt.py " + " ".join(sys.argv[1:]) + "`",
             *([malloc_note(args.system_malloc) + math_note] if not in_process else []), "",
             "FLOPs are analytic (matmuls and convolutions, 2 per multiply-add; training = 3 x forward); "
             "'of matmul' is achieved FLOP/s over the plain matmul's.", "",
             "| mixer | N | fwd+bwd ms | fwd+bwd peak MB | inference ms | inference peak MB | GFLOPs (fwd) "
             "| of matmul (fwd+bwd) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for n in args.tokens:
        for mixer in mixers:
            t, i = res.get(f"{mixer}/{n}/train"), res.get(f"{mixer}/{n}/infer")
            if t is None or i is None:
                continue
            if "error" in t or "error" in i:
                errors = dict.fromkeys(r["error"] for r in (t, i) if "error" in r)  # once when both say the same
                lines.append(f"| {mixer} | {n} | {' / '.join(errors)} | | | | | |")
                continue
            lines.append(f"| {mixer} | {n} | {t['time_ms']:.1f} | {t['peak_mb']:.0f} | {i['time_ms']:.1f} | "
                         f"{i['peak_mb']:.0f} | {i['gflops']:.2f} | {100 * t['matmul_fraction']:.0f}% |")
    inner = [(k, r) for k, r in res.items() if "inner_ms" in r]
    if inner:
        lines += ["", "## Inner step against its memory-traffic floor", "",
                  f"Copy bandwidth (device-to-device copy, bytes read + written): {gbps:.0f} GB/s. Floor = the "
                  "bytes the inner step must move (q, k, v read and its output written once per pass: 4 (C + d) "
                  "values a token forward, 12 (C + d) forward+backward; `inner_bytes`) over that bandwidth. "
                  "Inner time: ttt_triton's inner ops (`vit3::ttt_inner_fwd` / `_bwd`) alone, else the layer minus "
                  "its qkv and "
                  "output-projection GEMMs timed alone.", "",
                  "| mixer | N | batch | mode | layer ms | qkv/proj GEMMs ms | inner ms | inner time from | "
                  "floor MB | floor ms | of floor |",
                  "|---|---:|---:|---|---:|---:|---:|---|---:|---:|---:|"]
        for k, r in inner:
            mixer, n, mode = k.split("/")
            lines.append(f"| {mixer} | {n} | {r['batch']} | {mode} | {r['time_ms']:.3f} | {r['gemms_ms']:.3f} | "
                         f"{r['inner_ms']:.3f} | {r['inner_method']} | {r['inner_bytes'] / 2 ** 20:.0f} | "
                         f"{r['inner_floor_ms']:.4f} | {100 * r['inner_floor_fraction']:.0f}% |")
        errors = [f"{k}: {r['inner_error']}" for k, r in res.items() if "inner_error" in r]
        if errors:
            lines += ["", "The Triton inner ops failed (the layer minus its GEMMs used instead): " + "; ".join(errors)]
    lines += ["", "## Targets", "", "| target | measured | |", "|---|---:|---|"] + check_targets(res, device)
    return lines


def write_outputs(res: dict, args, device: str, mixers: list[str], batch_tokens: int, machine: str,
                  peak_tflops: float, gbps: float, complete: bool) -> list[str]:
    """Markdown and JSON of the results so far (a run cut off keeps what it measured); returns the markdown."""
    lines = markdown(res, args, device, mixers, batch_tokens, machine, peak_tflops, gbps)
    if not complete:
        lines.insert(1, "\n**Partial: the run is still going (or was cut off).**")
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"bench_ttt_{device}.md").write_text("\n".join(lines) + "\n")
    (out / f"bench_ttt_{device}.json").write_text(json.dumps(
        {"machine": machine, "torch": torch.__version__, "dim": args.dim, "heads": args.heads,
         "batch_tokens": batch_tokens, "malloc": malloc_record(device, args.system_malloc),
         "matmul_tflops": peak_tflops, "copy_gbps": gbps, "complete": complete, "results": res,
         "targets": [{"target": lb, "ratio": v, "met": ok} for lb, v, ok in targets(res, device)]}, indent=1))
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    parser.add_argument("--tokens", type=int, nargs="+", default=[256, 1024, 4096, 16384])
    parser.add_argument("--mixers", nargs="+", choices=list(MIXERS),
                        help=f"default: all ({', '.join(GPU_ONLY)} on CUDA only)")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--batch-tokens", type=int, help="batch = max(1, this // N); default 65536 on CUDA, 1 on CPU")
    parser.add_argument("--min-time", type=float, default=1.0, help="seconds of timed runs per mixer and point")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per point before giving up")
    parser.add_argument("--system-malloc", action="store_true", help="CPU: time with glibc's default malloc")
    parser.add_argument("--in-process", action="store_true",
                        help="CPU: measure in this process as on CUDA (a quick check of the CUDA code path; "
                             "memory is then the process's peak resident size)")
    parser.add_argument("--results", default=str(RESULTS), help="folder for the .md and .json")
    parser.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)  # a CPU worker's batch
    parser.add_argument("--worker", nargs=5, metavar=("KIND", "MIXERS", "N", "MODE", "DEVICE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, mixers, n, mode, device = args.worker
        print(json.dumps(worker(kind, mixers.split(","), int(n), mode, device, args.dim, args.heads, args.min_time,
                                args.batch)))
        return

    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    if "cuda" in devices and not torch.cuda.is_available():
        if args.device == "cuda":
            sys.exit("--device cuda: no CUDA device")
        devices.remove("cuda")
    for device in devices:
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        peak_tflops, gbps = matmul_tflops(device, dtype), copy_gbps(device)
        machine = (torch.cuda.get_device_name() if device == "cuda"
                   else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
        mixers = args.mixers or [m for m in MIXERS if device == "cuda" or m not in GPU_ONLY]
        batch_tokens = args.batch_tokens or (65536 if device == "cuda" else 1)
        print(f"{device}: plain matmul {peak_tflops:.3f} TFLOP/s, copy {gbps:.0f} GB/s", flush=True)
        res = {}
        for n in args.tokens:
            batch = batch_for(n, batch_tokens)
            for mode in ("train", "infer"):
                if device == "cuda" or args.in_process:
                    points = measure_in_process(args, mixers, n, mode, device, batch, gbps)
                else:
                    points = measure_workers(args, mixers, n, mode, batch)
                for mixer, r in points.items():
                    flops = batch * layer_flops(mixer, n, args.dim, args.heads) * (3 if mode == "train" else 1)
                    if "time_ms" in r:
                        r["tflops"] = flops / (r["time_ms"] / 1e3) / 1e12
                        r["matmul_fraction"] = r["tflops"] / peak_tflops
                    if "inner_ms" in r:
                        r["inner_bytes"] = inner_bytes(n, args.dim, args.heads, batch, mode,
                                                       2 if device == "cuda" else 4)
                    r["gflops"], r["batch"] = flops / 1e9, batch
                    res[f"{mixer}/{n}/{mode}"] = r
                    print(f"{device} {mixer:14s} N={n:6d} {mode:5s} {r}", flush=True)
            write_outputs(res, args, device, mixers, batch_tokens, machine, peak_tflops, gbps, complete=False)
        print("\n".join(write_outputs(res, args, device, mixers, batch_tokens, machine, peak_tflops, gbps,
                                       complete=True)))


if __name__ == "__main__":
    main()
