"""What the benchmark scripts (bench_ttt.py, bench_models.py, bench_small.py) share: the one timer
(interleaved rounds), peak memory of a step, this machine's matmul and copy rates, the CPU worker
processes' malloc, and small helpers for results entries.
"""
import os
import resource
import statistics
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def sync(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


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


def copy_gbps(device: str) -> float:
    """Device-memory bandwidth, measured as the floor needs it: a large device-to-device copy (1 GiB on CUDA,
    several times the L2; random data), bytes read plus bytes written over the median time of 10 copies."""
    src = torch.randn((1 << 28) if device == "cuda" else (1 << 23), device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() * src.element_size() / (median_ms(lambda: dst.copy_(src), device) / 1e3) / 1e9


def median_ms(fn, device: str, reps: int = 10) -> float:
    """Median time of fn() over `reps` calls after one warm-up: CUDA events on CUDA, the host clock on CPU."""
    fn()
    times = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


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


def interleaved_times_ms(steps: dict, device: str, min_time: float = 0.0, rounds: int | None = None,
                         max_rounds: int = 30) -> dict:
    """{name: {"time_ms": median, "rounds": n}} of each step, timed in rounds (one step of each per round) in one
    process, so that machine noise and allocator state fall on all of them alike and the ratios stay stable. The
    benchmarks' one timer (bench_ttt.py, bench_models.py and bench_small.py use it): torch.utils.benchmark.Timer and
    triton.testing.do_bench time one callable at a time, so they cannot interleave.

    Warm-up: one step each (kernel choice, allocator steady state), a second one when a round is short.
    Rounds: `rounds` if given; else at least 5 (2 when a round takes over 30 s, 1 when over 60 s), more while
    the time spent is under min_time per step, at most max_rounds.
    """
    def timed(step):
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        return time.perf_counter() - t0

    round_s = sum(timed(step) for step in steps.values())
    if round_s < 10:
        round_s = sum(timed(step) for step in steps.values())
    least = rounds if rounds is not None else 5 if round_s < 30 else 2 if round_s < 60 else 1
    most = rounds if rounds is not None else max_rounds
    times = {k: [] for k in steps}
    start = time.perf_counter()
    n = 0
    while n < least or (time.perf_counter() - start < min_time * len(steps) and n < most):
        for k, step in steps.items():
            times[k].append(timed(step))
        n += 1
    return {k: {"time_ms": 1e3 * statistics.median(v), "rounds": len(v)} for k, v in times.items()}


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


def ratio(a, b):
    return a / b if a and b else float("nan")


def error_line(e: BaseException) -> str:
    """An exception as one short line, for a results entry."""
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"[:200]


def empty_cache(device: str):
    if device == "cuda":
        torch.cuda.empty_cache()
