"""One command for a fresh GPU machine: the CUDA tests, the layer and whole-model benchmarks, and the targets.

    python benchmarks/gpu_check.py --copy-to "$OUT"     # on the H200: at most 8 minutes (PARTS)
    python benchmarks/gpu_check.py --dry-run            # CPU, tiny sizes: the same orchestration
    python benchmarks/gpu_check.py --parts bench_ttt    # one part again

Three parts, each a subprocess with a time limit (PARTS; time a part leaves unused goes to the next, so
the whole stays under the sum of the limits):
  tests         pytest -m 'gpu or triton' (the CUDA tests, the Triton path's tests compiled)
  bench_ttt     the TTT layer (Triton and fast paths) against SDPA at N = 1024, 4096 and 16384, bf16,
                batches of at least 64K tokens, with the inner step against its memory-traffic floor
  bench_models  ViT³-T against DeiT-T (SDPA, materialised) at 224 and 1248 px, the DiT3-B/2 training
                step at latent 32 and 64, DiT3-XL/2 guided sampling at 256 px, each against attention
A part that fails or reaches its limit is recorded and the next one runs; the benchmarks write their
results after every point, so a part cut off keeps what it measured. The results go to
benchmarks/results/*_cuda.{md,json,png} with a log per part (gpu_check_cuda_<part>.log), and, with
--copy-to, to that folder as well (the device machine sends back only $OUT). Printed last: how long each
part took, and the target table of the GPU issue (bench_ttt.targets, bench_models.check_targets on their
CUDA results), each target met or MISSED with its number, n/a where a point is missing; both are also
written to gpu_check_<device>.{md,json}.

--dry-run (--device cpu): the benchmarks' CUDA code path run on CPU in one process (--in-process) at tiny
sizes, results in a temporary folder; every target then reads n/a.
"""
import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_models  # noqa: E402
import bench_ttt  # noqa: E402

PY = [sys.executable]
PARTS = {  # name -> (seconds allowed on CUDA, command)
    # a test module that cannot be imported there (a missing package) must not stop the CUDA tests of the others
    # the CUDA tests and the Triton path's correctness tests compiled (each configuration compiles its
    # kernels once: most of this part's time on a fresh machine); the sm_90 build test is CPU-side
    "tests": (150, PY + ["-m", "pytest", "-m", "gpu or triton", "-k", "not hopper", "-q", "-p", "no:cacheprovider",
                         "--continue-on-collection-errors"]),
    "bench_ttt": (120, PY + ["benchmarks/bench_ttt.py", "--device", "cuda", "--tokens", "1024", "4096", "16384",
                             "--mixers", "ttt_triton", "ttt_fast", "attn_sdpa", "--min-time", "0.3"]),
    "bench_models": (200, PY + ["benchmarks/bench_models.py", "--device", "cuda", "--models", "vit3_tiny",
                                "--sizes", "224", "1248", "--latents", "32", "64", "--sample-latents", "32",
                                "--min-time", "0.5"]),
}
DRY_RUN = {  # the same parts on CPU: tiny sizes, every point in one process, DiT models one block deep
    "tests": (300, PARTS["tests"][1]),  # the Triton tests run interpreted here
    "bench_ttt": (120, PY + ["benchmarks/bench_ttt.py", "--device", "cpu", "--in-process", "--tokens", "64",
                             "--batch-tokens", "128", "--mixers", "ttt_triton", "ttt_fast", "attn_sdpa",
                             "--min-time", "0"]),
    "bench_models": (240, PY + ["benchmarks/bench_models.py", "--device", "cpu", "--in-process", "--models",
                                "vit3_tiny", "--sizes", "32", "--latents", "8", "--sample-latents", "8",
                                "--infer-batch", "2", "--train-batch", "2", "--sample-batch", "1", "--dit-depth", "1",
                                "--min-time", "0"]),
}


def run_part(cmd: list[str], limit_s: float, log: Path) -> dict:
    """Runs one part in a process group of its own, its output to `log`; stops the group at the limit."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=max(limit_s, 1))
            error = None if rc == 0 else f"exit code {rc}"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc, error = proc.wait(), f"stopped at its time limit ({limit_s:.0f} s)"
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    last = lines[-1] if lines and not lines[-1].startswith("|") else ""  # pytest's summary; not a table row
    return {"seconds": time.perf_counter() - t0, "limit_s": limit_s, "returncode": rc, "error": error,
            "last_line": last, "log": log.name}


def target_table(results: Path, device: str) -> tuple[list[tuple[str, str, float, bool]], list[str]]:
    """The GPU issue's targets from the benchmarks' JSON in `results`: ([(benchmark, label, value, met)], notes).
    A missing or unreadable file leaves its targets at n/a (value NaN) and says why in the notes."""
    rows, notes = [], []
    for name, targets in (("bench_ttt", bench_ttt.targets), ("bench_models", bench_models.check_targets)):
        path = results / f"{name}_{device}.json"
        try:
            data = json.loads(path.read_text())
            res = data["results"]
            if not data.get("complete", True):
                notes.append(f"{path.name}: partial (the part was cut off)")
        except (OSError, ValueError, KeyError) as e:
            res = {}
            notes.append(f"{path.name}: not read ({type(e).__name__})")
        rows += [(name, *t) for t in targets(res, "cuda")]
    return rows, notes


def status(value: float, ok: bool) -> str:
    return "n/a" if math.isnan(value) else "met" if ok else "MISSED"


def report(parts: dict, rows, notes: list[str], device: str) -> list[str]:
    lines = [f"# GPU check ({device})", "", "| part | limit s | took s | result | last line of its log |",
             "|---|---:|---:|---|---|"]
    for name, p in parts.items():
        lines.append(f"| {name} | {p['limit_s']:.0f} | {p['seconds']:.0f} | {p['error'] or 'ok'} | "
                     f"{p['last_line'][:100].replace('|', '/')} |")
    lines += ["", "## Targets (ratios within one run; bf16)", "", "| from | target | measured | |",
              "|---|---|---:|---|"]
    lines += [f"| {src} | {label} | {'n/a' if math.isnan(v) else f'{v:.2f}'} | {status(v, ok)} |"
              for src, label, v, ok in rows]
    met = sum(status(v, ok) == "met" for *_, v, ok in rows)
    lines += ["", f"{met} of {len(rows)} targets met."] + [f"- {n}" for n in notes]
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu = --dry-run")
    parser.add_argument("--dry-run", action="store_true", help="the orchestration on CPU at tiny sizes")
    parser.add_argument("--parts", nargs="+", choices=list(PARTS), default=list(PARTS))
    parser.add_argument("--results", help="results folder (default benchmarks/results; a temporary one for a dry run)")
    parser.add_argument("--copy-to", help="also copy the results and logs here after each part (e.g. $OUT)")
    args = parser.parse_args()
    device = "cpu" if args.dry_run or args.device == "cpu" else "cuda"
    plan = DRY_RUN if device == "cpu" else PARTS
    results = Path(args.results or (tempfile.mkdtemp(prefix="gpu_check_") if device == "cpu" else bench_ttt.RESULTS))
    results.mkdir(parents=True, exist_ok=True)
    import torch

    print(f"gpu_check ({device}): torch {torch.__version__}, "
          f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device'}; results in {results}; "
          f"time limits {', '.join(f'{p} {plan[p][0]} s' for p in args.parts)}", flush=True)
    start, budget, parts = time.perf_counter(), 0.0, {}
    for name in args.parts:
        limit, cmd = plan[name]
        budget += limit  # what earlier parts left unused goes to this one
        if name != "tests":
            cmd = cmd + ["--results", str(results)]
        parts[name] = run_part(cmd, budget - (time.perf_counter() - start), results / f"gpu_check_{device}_{name}.log")
        p = parts[name]
        print(f"[{time.perf_counter() - start:5.0f} s] {name}: {p['error'] or 'ok'} in {p['seconds']:.0f} s "
              f"(limit {p['limit_s']:.0f} s): {p['last_line'][:160]}", flush=True)
        if p["error"]:
            print("\n".join(f"    {line}" for line in
                            (results / p["log"]).read_text(errors="replace").splitlines()[-12:]), flush=True)
        if args.copy_to:
            shutil.copytree(results, args.copy_to, dirs_exist_ok=True)
    rows, notes = target_table(results, device)
    lines = report(parts, rows, notes, device)
    (results / f"gpu_check_{device}.md").write_text("\n".join(lines) + "\n")
    (results / f"gpu_check_{device}.json").write_text(json.dumps(
        {"device": device, "parts": parts, "notes": notes,
         "targets": [{"from": s, "target": lb, "ratio": v, "met": ok} for s, lb, v, ok in rows]}, indent=1))
    if args.copy_to:
        shutil.copytree(results, args.copy_to, dirs_exist_ok=True)
    print("\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
