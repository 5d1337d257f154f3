"""What the script tests (tests/scripts/: the trainers, sample.py) and some package tests share: loading a
top-level script as a module, tiny image folders (random classes, or noise for the FID tests), in-process
runs that leave a fresh Accelerate state behind (conftest's `fresh_accelerate` fixture gives each test one),
checkpoint weights, the two subprocess scenarios (SIGTERM to the process group, two gloo processes through
`accelerate launch`), and a weights digest.
"""
import hashlib
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from accelerate.state import AcceleratorState, GradientState
from PIL import Image
from safetensors.torch import load_file

from vit3 import engine

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str):
    """A top-level script (train_vit.py, train_dit.py) as a module, imported once."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / f"{name}.py")
        sys.modules[name] = importlib.util.module_from_spec(spec)  # registered first: dataclasses look it up
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


def write_images(folder: Path, classes, n: int, seed: int = 0, size: int = 16):
    """n random size x size RGB PNGs per class, in folder/<class>/."""
    rng = np.random.default_rng(seed)
    for c in classes:
        (folder / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / c / f"{i}.png")


def reset_accelerate():
    """Accelerate keeps process-wide singletons; each in-process run starts from scratch."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def run_main(main, argv: list[str]):
    """One in-process run of a trainer's main(argv); what it returns."""
    result = main(argv)
    reset_accelerate()
    return result


def checkpoint_weights(run_dir: Path, step: int, name: str = "model") -> dict:
    """The weights of module `name` in checkpoint step-N (a safetensors file or a save_pretrained folder)."""
    return load_file(str(engine.module_weights_file(Path(run_dir) / "checkpoints" / f"step-{step:08d}", name)))


def assert_same_weights(run_a: Path, run_b: Path, step: int) -> None:
    """The model and the EMA of checkpoint step-N are the same, bit for bit, in two runs."""
    for name in ("model", "ema"):
        wa, wb = checkpoint_weights(run_a, step, name), checkpoint_weights(run_b, step, name)
        assert all(torch.equal(wa[k], wb[k]) for k in wa), name


def weights_digest(module: torch.nn.Module) -> str:
    """sha256 of a module's state dict (names, dtypes, shapes, bytes): equal digests, equal weights."""
    h = hashlib.sha256()
    for k, v in module.state_dict().items():
        v = v.detach().cpu().contiguous()
        h.update(f"{k}|{v.dtype}|{tuple(v.shape)}".encode())
        h.update(v.view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.hexdigest()


def subprocess_env() -> dict:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def run_script(script: str, argv: list[str]) -> subprocess.CompletedProcess:
    """ROOT/script in a subprocess, output captured."""
    return subprocess.run([sys.executable, str(ROOT / script), *argv], cwd=ROOT, env=subprocess_env(),
                          capture_output=True, text=True, timeout=120)


def sigterm_at(script: str, argv: list[str], marker: str, sig: int = signal.SIGTERM) -> tuple[int, str]:
    """Run ROOT/script in its own process group and send SIGTERM (or `sig`) to the whole group (as a cluster's
    scancel, or a terminal's Ctrl-C, does: loader workers included) once a log line contains marker;
    (exit code, whole log)."""
    proc = subprocess.Popen([sys.executable, str(ROOT / script), *argv], cwd=ROOT, env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines, deadline = [], time.time() + 120
    for line in proc.stdout:
        lines.append(line)
        if marker in line:
            os.killpg(proc.pid, sig)
            break
        assert time.time() < deadline, "".join(lines)
    rest, _ = proc.communicate(timeout=120)
    return proc.returncode, "".join(lines) + rest


def latest_checkpoint_step(checkpoints: Path, log: str) -> int:
    ckpt = engine.find_latest_checkpoint(checkpoints)
    assert ckpt is not None, log
    return engine.read_trainer_state(ckpt)["global_step"]


def launch_two_processes(script: str, argv: list[str]) -> subprocess.CompletedProcess:
    """ROOT/script under `accelerate launch` with two CPU (gloo) processes, through tests/rank_debug.py (each
    rank writes RUN/debug/rank<r>.json); fails the test if it fails."""
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(port), str(ROOT / "tests" / "rank_debug.py"), script, *argv]
    p = subprocess.run(cmd, cwd=ROOT, env={**subprocess_env(), "ACCELERATE_USE_CPU": "1"}, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def two_process_ranks(run: Path) -> list[dict]:
    """The two ranks' records (rank_debug.py) of a two-process run, once the run has recorded world size 2 and
    both ranks ended with the same model and EMA weights."""
    assert json.loads((run / "run.json").read_text())["environment"]["world_size"] == 2
    ranks = [json.loads((run / "debug" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["model_digest"] == ranks[1]["model_digest"] and ranks[0]["ema_digest"] == ranks[1]["ema_digest"]
    return ranks


def make_unwritable(folder: Path, monkeypatch) -> Path:
    """`folder`, made read-only (0o555). root ignores permissions, so when the tests run as root the kernel's
    answer to a normal user is reproduced instead: creating a file or a folder under `folder` (os.open for
    writing, which tempfile uses, and os.mkdir, which Path.mkdir uses) raises PermissionError (EACCES)."""
    import errno

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o555)
    if os.geteuid() != 0:
        return folder
    real_open, real_mkdir, top = os.open, os.mkdir, os.path.abspath(folder)

    def refused(path) -> bool:
        return os.path.abspath(path) == top or os.path.abspath(path).startswith(top + os.sep)

    def open_(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and refused(path):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, flags, *args, **kwargs)

    def mkdir_(path, *args, **kwargs):
        if refused(path) and not os.path.isdir(path):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(os, "mkdir", mkdir_)
    return folder


def noise_images(folder, n, seed, shift=0):
    """n 32x32 RGB PNGs of Gaussian noise around grey level 120 + shift, in folder (for FID tests)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        img = np.clip(rng.normal(120 + shift, 60, (32, 32, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"{i:03d}.png")
    return folder
