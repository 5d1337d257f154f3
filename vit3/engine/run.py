"""Run folders: where a run writes, what it resumes, what it records, and how it starts and ends.

A run lives in `output_dir/NNN-name` (numbered, as DiT) or `output_dir/run_name`, holding the
resolved config, run.json (git hash, seed, command, environment), log.txt, metrics.jsonl, the
trackers' logs and checkpoints/step-N. `start_run` is the start-up both trainers share.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import yaml

from ..errors import ConfigError, WriteError
from ..ttt.dispatch import forced_impl
from .checkpoint import (
    CKPT_RE,
    check_same_model,
    find_latest_checkpoint,
    read_trainer_state,
    verify_checkpoint,
)
from .config import config_diffs
from .files import atomic_write_text, check_writable, is_permission_error, open_append, refuse_link
from .lock import LOCK, acquire_lock, release_lock
from .signals import StopSignal

logger = logging.getLogger("vit3.train")


# ----------------------------------------------------------------------------------------
# Which folder, which checkpoint
# ----------------------------------------------------------------------------------------
def _numbered_runs(output_dir: Path, name: str) -> list[tuple[int, Path]]:
    runs = []
    if output_dir.is_dir():
        for p in output_dir.iterdir():
            m = re.match(r"^(\d+)-(.*)$", p.name)
            if m and p.is_dir() and (not name or m.group(2) == name):
                runs.append((int(m.group(1)), p))
    return sorted(runs)


def _step_folders(ckpt_root: Path) -> list[Path]:
    return sorted(p for p in ckpt_root.iterdir() if CKPT_RE.match(p.name)) if ckpt_root.is_dir() else []


def _find_resume(out: Path, name: str, run_name: str, resume: str) -> tuple[Path | None, Path | None]:
    """(run folder to continue or None for a new one, checkpoint or None) for a resume setting.

    An explicit checkpoint older than the newest usable one of its run is a rollback: the newer
    checkpoints are kept and the run continues as a branch in a new folder (run_name if given, else
    the next number), so that neither pruning nor re-saving a step can touch the newer line.
    """
    if resume in ("latest", "auto"):
        candidates = [out / run_name] if run_name else [p for _, p in reversed(_numbered_runs(out, name))]
        for run in candidates:
            ckpt = find_latest_checkpoint(run / "checkpoints")
            if ckpt is not None:
                return run, ckpt
        unusable = [p for run in candidates for p in _step_folders(run / "checkpoints")]
        where = out / run_name if run_name else out / f"NNN-{name}"
        if resume == "latest":
            raise ConfigError(f"resume=latest found no usable checkpoint under {where}/checkpoints"
                              + (f" ({len(unusable)} damaged: see the warnings)" if unusable else "")
                              + "; start without resume, use resume=auto, or pass resume=PATH")
        if unusable:
            warnings.warn(f"resume=auto: none of the {len(unusable)} checkpoints under {where} can be used (see the "
                          "warnings above); starting a fresh run", stacklevel=2)
        return None, None
    if not resume:
        return None, None
    ckpt = Path(resume)
    if (ckpt / "checkpoints").is_dir():  # a run folder: its newest checkpoint
        latest = find_latest_checkpoint(ckpt / "checkpoints")
        if latest is None:
            raise ConfigError(f"resume={resume}: run folder has no usable checkpoint")
        ckpt = latest
    if not (ckpt / "trainer_state.json").is_file():
        raise ConfigError(f"resume={resume} is not a checkpoint folder (no trainer_state.json); "
                          "pass a checkpoints/step-N folder, a run folder, or resume=latest")
    reason = verify_checkpoint(ckpt)
    if reason:
        raise ConfigError(f"checkpoint {ckpt} is damaged ({reason}); resume an older one, or resume=latest to "
                          "take the newest usable one")
    if ckpt.parent.name != "checkpoints":
        return None, ckpt
    run = ckpt.parent.parent
    newer = find_latest_checkpoint(ckpt.parent, warn=False)
    if newer is None or newer.name <= ckpt.name:  # step-%08d: names sort as steps
        return run, ckpt  # continue in the run it came from
    if run_name == run.name:
        raise ConfigError(f"resume={resume} is older than {newer.name} of run {run}: continuing it there would prune "
                          f"and overwrite the newer checkpoints. Continue the newest with resume=latest, or branch "
                          f"off with resume={resume} and another run_name (or none: a new numbered run)")
    warnings.warn(f"resume={resume} rolls back run {run} (its newest is {newer.name}): the newer checkpoints are "
                  "kept and this run continues as a branch in a new folder", stacklevel=2)
    return None, ckpt


def _new_run_dir(out: Path, name: str, run_name: str) -> Path:
    if run_name:
        run = out / run_name
        if find_latest_checkpoint(run / "checkpoints") is not None:
            raise ConfigError(f"run folder {run} already holds checkpoints; pass resume=latest to continue "
                              "it or choose another run_name")
        run.mkdir(parents=True, exist_ok=True)
        return run
    out.mkdir(parents=True, exist_ok=True)
    runs = _numbered_runs(out, "")
    idx = runs[-1][0] + 1 if runs else 0
    while True:  # mkdir is the lock: two launches never share a number
        run = out / f"{idx:03d}-{name}"
        try:
            run.mkdir()
            return run
        except FileExistsError:
            idx += 1


def _resolve_run_local(output_dir: str, name: str, run_name: str, resume: str, new_run: bool, writes: dict):
    out = Path(output_dir)
    run, ckpt = _find_resume(out, name, run_name, resume)
    try:
        if run is None or new_run:
            run = _new_run_dir(out, name + ("-eval" if new_run else ""), "" if new_run else run_name)
        acquire_lock(run, "run folder")
    except OSError as e:
        if not is_permission_error(e):
            raise
        raise WriteError(e.errno, f"cannot write a run folder in {out}: permission denied ({e.strerror}); choose an "
                                  "output_dir this user can write, or change its permissions") from None
    try:  # now, not at the first save: a folder that cannot be written would throw away the training before it
        check_writable({run: "output_dir", **{run / folder: setting for folder, setting in writes.items()}})
    except WriteError:
        release_lock(run / LOCK)
        remove_unused_run(run)
        raise
    return run, ckpt


def resolve_run(output_dir: str, name: str, run_name: str = "", resume: str = "", new_run: bool = False,
                writes: dict | None = None) -> tuple[Path, Path | None]:
    """Pick (run folder, checkpoint to resume or None) on the main process, check that it and the folders the run
    will write can be written, and share it.

    Fresh runs get `output_dir/NNN-name` (or `output_dir/run_name`); resume=latest|auto continues
    the newest run of that name that has a checkpoint (auto starts fresh if none); a checkpoint
    path continues in its own run folder. new_run=True (evaluation) finds the checkpoint the same
    way but writes to a new `NNN-name-eval` folder, leaving the training run untouched. `writes`: {folder (in the
    run folder, or an absolute path): the setting that chooses it}; one that cannot be written is a WriteError
    (`files.check_writable`), and a run folder made for this run is removed again.
    """
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    # the same process group the Accelerator will use; PartialState() alone ignores ACCELERATE_USE_CPU
    # (only AcceleratorState reads it) and would silently run each CPU process on its own
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    forced_impl(state.device.type)  # a bad VIT3_TTT_IMPL: one line, and no run folder made for it
    return on_main_process(state, lambda: _resolve_run_local(output_dir, name, run_name, resume, new_run,
                                                             writes or {}))


def on_main_process(state, fn):
    """fn() run by the main process alone, its result shared with every process (accelerate's PartialState or
    Accelerator as `state`). A ConfigError or WriteError it raises is raised on every process, so that all of
    them stop with its message, and none waits in a collective for a process that has gone."""
    from accelerate.utils import broadcast_object_list

    result = [None]
    if state.is_main_process:
        try:
            result = [fn()]
        except (ConfigError, WriteError) as e:
            result = [e]
    if state.num_processes > 1:
        broadcast_object_list(result)
    if isinstance(result[0], (ConfigError, WriteError)):
        raise result[0]
    return result[0]


# ----------------------------------------------------------------------------------------
# Start and end
# ----------------------------------------------------------------------------------------
@dataclasses.dataclass
class Run:
    """What `start_run` hands the trainer."""

    dir: Path
    resume_from: Path | None  # the checkpoint to continue from (cfg.resume resolved)
    accelerator: object  # accelerate.Accelerator
    log: logging.Logger
    stop: StopSignal


@contextlib.contextmanager
def start_run(cfg, name: str, arch_keys: tuple[str, ...], new_run: bool = False, writes: dict | None = None):
    """`with start_run(...) as run:` the start-up both trainers share.

    Sets the thread count (cfg.threads), picks the run folder and the checkpoint to resume, checks that every
    folder the run will write can be written (the run folder, checkpoints/, the trackers' folder and the trainer's
    `writes`, as `resolve_run` takes them), refuses a checkpoint of another model (cfg.model against arch_keys)
    before anything is built, creates the Accelerator (precision, accumulation, trackers), the log and the
    SIGTERM / SIGUSR1 handler. Bad input (ConfigError, DataError: both ValueErrors) leaves no empty run folder
    behind.
    """
    from accelerate import Accelerator

    threads_before = torch.get_num_threads()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    run_dir = None
    try:
        log_with = [t.strip() for t in cfg.log.log_with.split(",") if t.strip() not in ("", "none")]
        # the trackers write into run_dir/name (Accelerate's project_dir / the project name of init_trackers)
        writes = {"checkpoints": "output_dir", **({name: "output_dir"} if log_with else {}), **(writes or {})}
        run_dir, resume_ckpt = resolve_run(cfg.output_dir, name, cfg.run_name, cfg.resume, new_run=new_run,
                                           writes=writes)
        if resume_ckpt:
            state = read_trainer_state(resume_ckpt)
            check_same_model(state, dataclasses.asdict(cfg.model), arch_keys, resume_ckpt)
            if not new_run:
                check_same_batch(state, cfg.data.batch_size, resume_ckpt)
        accelerator = Accelerator(mixed_precision=cfg.mixed_precision,
                                  gradient_accumulation_steps=cfg.optim.grad_accum_steps,
                                  log_with=log_with or None, project_dir=str(run_dir),
                                  step_scheduler_with_optimizer=False)
        log = setup_logging(run_dir, accelerator.is_main_process)
        try:
            with StopSignal() as stop:
                yield Run(run_dir, resume_ckpt, accelerator, log, stop)
        except ValueError:
            close_logging()
            remove_unused_run(run_dir, accelerator)
            raise
    finally:
        close_logging()
        if run_dir is not None:
            release_lock(run_dir / LOCK)
        torch.set_num_threads(threads_before)


def check_same_batch(ckpt_state: dict, batch_size: int, ckpt: Path):
    """ConfigError if a resume changes data.batch_size: the checkpoint's data position, lr scaling and schedule
    count updates of its batch, so the run could not continue as it would have."""
    old = (ckpt_state.get("config") or {}).get("data", {}).get("batch_size", batch_size)
    if old != batch_size:
        raise ConfigError(f"data.batch_size={batch_size} but checkpoint {ckpt} was trained with data.batch_size={old}: "
                          "its data position, learning-rate scaling and schedule count updates of that batch, so the "
                          f"run cannot continue exactly. Resume with data.batch_size={old}, or start a new run from "
                          f"its weights (weights={ckpt}, without resume)")


def finish(run: Run, message: str):
    """Log the last line and shut down the trackers on every process."""
    run.log.info(message)
    run.accelerator.wait_for_everyone()
    run.accelerator.end_training()


def discard(run: Run):
    """A run that did no training (latent extraction): its folder goes if it holds only start-up files."""
    close_logging()
    remove_unused_run(run.dir, run.accelerator)


def remove_unused_run(run_dir: Path, accelerator=None):
    """Delete a run folder that holds nothing but start-up files (log, config, run.json): a run that
    failed on bad input before training leaves no clutter. Anything else in it keeps it."""
    if accelerator is not None and not accelerator.is_main_process:
        return
    run_dir = Path(run_dir)
    if run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= {"log.txt", "config.yaml", "run.json", LOCK}:
        shutil.rmtree(run_dir, ignore_errors=True)


# ----------------------------------------------------------------------------------------
# What a run records
# ----------------------------------------------------------------------------------------
def git_hash() -> str:
    """HEAD of the repository holding this package, with '+dirty' if it has local changes."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head or "unknown") + ("+dirty" if dirty else "")


def environment_info(accelerator) -> dict:
    import accelerate
    import timm

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "accelerate": accelerate.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "hostname": platform.node(),
        "world_size": accelerator.num_processes,
        "distributed_type": str(accelerator.distributed_type),
        "mixed_precision": accelerator.mixed_precision,
        "device": str(accelerator.device),
        "cuda": torch.version.cuda,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "torch_threads": torch.get_num_threads(),
    }


def write_run_info(run_dir: Path, config: dict, accelerator, seed: int, extra: dict | None = None,
                   resumed_from: Path | None = None, launch_keys=()) -> dict:
    """Main process: config.yaml (resolved) and run.json (git hash, seed, command, environment).

    A resumed run keeps the config.yaml and run.json of its start and appends this launch under "resumes",
    with "changed": each setting that differs from the checkpoint's, as 'key: old -> new' (also logged), but
    the `launch_keys` (where to resume, when to stop).
    """
    changed = []
    if resumed_from is not None:
        changed = config_diffs(read_trainer_state(resumed_from).get("config") or {}, config, launch_keys)
    info = {
        "git": git_hash(),
        "seed": seed,
        "command": " ".join([sys.executable] + sys.argv),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "environment": environment_info(accelerator),
        **(extra or {}),
        **({"changed": changed} if resumed_from is not None else {}),
    }
    if accelerator.is_main_process:
        run_dir = Path(run_dir)
        for line in changed:
            logger.warning(f"resumed with a changed setting: {line}")
        record = info
        # both are kept, not rewritten, so a link at either would stand as the run's record: refused, as log.txt
        # (kept, appended to) is; the files a run rewrites (eval.json, ...) replace a link by a rename instead
        refuse_link(run_dir / "run.json")
        refuse_link(run_dir / "config.yaml")
        if (run_dir / "run.json").is_file():
            record = json.loads((run_dir / "run.json").read_text())
            record.setdefault("resumes", []).append(info)
        if not os.path.lexists(run_dir / "config.yaml"):  # the first config stays; changes are in run.json
            atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(config, sort_keys=False))
        atomic_write_text(run_dir / "run.json", json.dumps(record, indent=2))
    return info


def setup_logging(run_dir: Path, is_main: bool) -> logging.Logger:
    """'vit3.train' logger: main process writes to stdout and run_dir/log.txt, others stay quiet."""
    close_logging()
    logger.setLevel(logging.INFO)
    logger.propagate = False
    if is_main:
        fmt = logging.Formatter("[%(asctime)s] %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
        for h in (logging.StreamHandler(sys.stdout), _LogFile(run_dir / "log.txt")):
            h.setFormatter(fmt)
            logger.addHandler(h)
    else:
        logger.addHandler(logging.NullHandler())
    return logger


class _LogFile(logging.FileHandler):
    """FileHandler that appends without following a link (one planted at log.txt is refused in one line)."""

    def _open(self):
        return open_append(self.baseFilename)


def close_logging():
    for h in list(logger.handlers):
        h.close()
        logger.removeHandler(h)


class MetricsFile:
    """Append-only metrics.jsonl in the run folder (main process), beside the trackers."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def write(self, step: int, metrics: dict):
        if self.enabled:
            with open_append(self.path) as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")
