"""How benchmarks/study.py runs a script: its output into a log, its time on disk while it runs (a study killed
with -9 loses at most CLOCK_S seconds of it), and its death with the study."""
from __future__ import annotations

import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLOCK_S = 10.0  # a running training run's time is written this often (study_report.RunClock)


def die_with_the_study():
    """Run in a child before its exec: Linux sends it SIGTERM when the study dies, kill -9 included, so a run does
    not train on unrecorded, holding its lock against the rerun; train_dit.py saves a checkpoint on SIGTERM."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def run_script(cmd: list[str], log: Path, what: str, echo: str = "", clock=None) -> float:
    """Run cmd with its output into `log` (appended); echo its lines holding `echo`; call clock(seconds so far)
    every CLOCK_S seconds while it runs and once at its end. -> seconds taken."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    stop = threading.Event()

    def tick():
        while not stop.wait(CLOCK_S):
            clock(time.time() - t0)

    ticker = threading.Thread(target=tick, daemon=True)
    try:
        with open(log, "a") as f:
            f.write(f"$ {shlex.join(cmd)}\n")
            f.flush()
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    preexec_fn=die_with_the_study)
            if clock:
                ticker.start()
            for line in proc.stdout:
                f.write(line)
                if echo and echo in line:
                    print("    " + line.rstrip().split("] ", 1)[-1], flush=True)
            rc = proc.wait()
    finally:
        stop.set()
        if ticker.is_alive():
            ticker.join()
        if clock:  # also a failed or interrupted invocation: its time was spent
            clock(time.time() - t0)
    if rc != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
        raise SystemExit(f"study: {what} failed (exit {rc}); the end of its log {log}:\n{tail}")
    return time.time() - t0
