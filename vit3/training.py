"""What the classification (train_vit.py) and diffusion (train_dit.py) trainers share.

* Configs: nested dataclasses filled from yaml and `key=value` CLI overrides, strict about
  unknown keys (`load_config`).
* Run folders: `results/000-name` (numbered, as DiT) or a fixed `run_name`, holding the
  resolved config, git hash, seed and environment (`resolve_run`, `write_run_info`).
* Optimiser, schedule and EMA from timm (`create_optimizer_and_scheduler`, `create_ema`).
* Data order that can be resumed mid-epoch: a seeded, sharded batch sampler whose items
  carry a per-sample seed, so augmentation does not depend on workers, world size or where a
  run was stopped (`ResumableBatchSampler`, `seeded_rng`).
* Checkpoints: full state (weights in safetensors, optimizer, scheduler, scaler, per-process
  RNG, trainer position) written atomically, the last K kept (`save_checkpoint`,
  `load_checkpoint`, `find_latest_checkpoint`).
* SIGTERM / SIGUSR1 turned into "save and stop" (`StopSignal`), metric averaging across
  processes without per-step host syncs (`RunningMeans`), a weights digest to compare ranks.

Nothing here knows about ViT³ or DiT³.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import logging
import math
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import types
import typing
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import yaml

logger = logging.getLogger("vit3.train")


class ConfigError(ValueError):
    """A config, CLI override or checkpoint that does not fit; the message names the fix."""


# ----------------------------------------------------------------------------------------
# Config sections shared by both trainers
# ----------------------------------------------------------------------------------------
@dataclasses.dataclass
class OptimConfig:
    """AdamW + warm-up + cosine, stepped every optimizer update (official ViT³ recipe)."""

    opt: str = "adamw"
    lr: float = 5e-4  # base lr for a global batch of `lr_batch` images
    warmup_lr: float = 5e-7
    min_lr: float = 5e-6
    lr_batch: int = 512  # lr, warmup_lr, min_lr are scaled by global_batch / lr_batch; 0 = no scaling
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.05  # not applied to 1-D params, biases and model.no_weight_decay()
    sched: str = "cosine"  # any timm scheduler name, or "constant"
    epochs: int = 300
    warmup_epochs: int = 20
    cooldown_epochs: int = 0
    clip_grad: float = 5.0  # max global grad norm; 0 = no clipping
    grad_accum_steps: int = 1


@dataclasses.dataclass
class EMAConfig:
    enabled: bool = True
    decay: float = 0.9996
    # decay is per `decay_batch` images: the per-update decay is decay ** (global_batch / decay_batch),
    # as the official main_ema.py does (0.9996 per 4096 -> 0.9999 per update at batch 1024); 0 = as given
    decay_batch: int = 4096


@dataclasses.dataclass
class CheckpointConfig:
    every_steps: int = 0  # also save every N optimizer updates (0 = only at epoch ends and on stop)
    every_epochs: int = 1
    keep_last: int = 3
    # with several processes, updates between the all-reduce that agrees on a SIGTERM / SIGUSR1
    # (one process alone checks every update, for free)
    stop_check_every: int = 10


@dataclasses.dataclass
class LogConfig:
    every: int = 50  # optimizer updates between logged (all-reduced) train metrics
    log_with: str = "tensorboard"  # Accelerate trackers, comma separated ("tensorboard,wandb"); "none"
    progress: bool = True  # tqdm bar on the main process
    debug_ranks: bool = False  # each rank writes debug/rank<r>.json (weights digest, local metrics)


# ----------------------------------------------------------------------------------------
# Config loading: dataclasses + yaml + key=value overrides
# ----------------------------------------------------------------------------------------
def config_to_dict(cfg) -> dict:
    """Plain nested dict of a config dataclass (tuples as lists), ready for yaml/json."""

    def plain(v):
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return plain(dataclasses.asdict(cfg))


def _valid_keys(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _unknown_key(key: str, where: str, cls, source: str) -> ConfigError:
    valid = _valid_keys(cls)
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], valid, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return ConfigError(
        f"unknown config key '{key}' (from {source}).{hint} Valid keys{where}: {', '.join(valid)}"
    )


def _coerce(value, tp, key: str, source: str):
    """Check / convert one yaml or CLI value to the field's annotated type."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union or origin is types.UnionType:
        if value is None and type(None) in args:
            return None
        tp = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(tp), typing.get_args(tp)

    def bad(expected):
        return ConfigError(f"config key '{key}' (from {source}) must be {expected}, got {value!r}")

    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise bad("true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad("an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # yaml 1.1 reads "5e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise bad("a number")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad("a string")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise bad("a list")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise bad(f"a list of {len(args)} items")
            return tuple(_coerce(v, a, key, source) for v, a in zip(value, args))
        inner = args[0] if args else typing.Any
        items = [v if inner is typing.Any else _coerce(v, inner, key, source) for v in value]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise bad("a mapping")
        return dict(value)
    return value


def _merge(cfg, data: dict, source: str, prefix: str = ""):
    """Return a copy of dataclass `cfg` with the (nested) mapping `data` applied."""
    if not isinstance(data, dict):
        section = prefix.rstrip(".") or "<top>"
        raise ConfigError(f"config section '{section}' (from {source}) must be a mapping, got {data!r}")
    cls = type(cfg)
    hints = typing.get_type_hints(cls)
    updates = {}
    for key, value in data.items():
        full = prefix + str(key)
        if key not in hints or key not in _valid_keys(cls):
            where = f" in '{prefix.rstrip('.')}'" if prefix else ""
            raise _unknown_key(full, where, cls, source)
        current = getattr(cfg, key)
        if dataclasses.is_dataclass(current):
            updates[key] = _merge(current, value, source, full + ".")
        else:
            updates[key] = _coerce(value, hints[key], full, source)
    return dataclasses.replace(cfg, **updates)


def _override(cfg, dotted: str, raw: str, source: str = "command line"):
    """Apply one `a.b.c=value` override; the value is parsed as yaml unless the field is a string."""
    parts = dotted.split(".")
    obj, prefix = cfg, ""
    for i, part in enumerate(parts):
        cls = type(obj)
        if part not in _valid_keys(cls):
            where = f" in '{prefix.rstrip('.')}'" if prefix else ""
            raise _unknown_key(dotted, where, cls, source)
        hint = typing.get_type_hints(cls)[part]
        value = getattr(obj, part)
        rest = parts[i + 1:]
        if dataclasses.is_dataclass(value):
            if not rest:
                raise ConfigError(f"'{dotted}' is a config section; set one of its keys: "
                                  + ", ".join(f"{dotted}.{k}" for k in _valid_keys(type(value))))
            obj, prefix = value, prefix + part + "."
            continue
        parsed = raw if hint is str else yaml.safe_load(raw)
        if rest:  # a key inside a free-form mapping field, e.g. model.kwargs.depth=4
            if not isinstance(value, dict):
                raise _unknown_key(dotted, f" in '{prefix + part}'", cls, source)
            new = dict(value)
            node = new
            for p in rest[:-1]:
                node = node.setdefault(p, {})
            node[rest[-1]] = parsed
            parsed = new
        return _set_path(cfg, parts[: i + 1], _coerce(parsed, hint, dotted, source))
    raise ConfigError(f"empty config key in override '{dotted}={raw}'")


def _set_path(cfg, parts, value):
    if len(parts) == 1:
        return dataclasses.replace(cfg, **{parts[0]: value})
    return dataclasses.replace(cfg, **{parts[0]: _set_path(getattr(cfg, parts[0]), parts[1:], value)})


def config_help(cls, prefix: str = "", obj=None) -> str:
    obj = obj if obj is not None else cls()
    lines = []
    for f in dataclasses.fields(cls):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            lines.append(config_help(type(v), prefix + f.name + ".", v))
        else:
            lines.append(f"  {prefix}{f.name}={v!r}")
    return "\n".join(lines)


def load_config(cls, argv: list[str] | None = None, flags: dict[str, str] | None = None):
    """Build a `cls` config from `--config FILE` and `key=value` overrides (later wins).

    `flags` maps bare `--flags` to overrides, e.g. {"--eval-only": "eval_only=true"}; any other
    `--some-key=value` is read as `some_key=value`. Returns (config, path of the yaml or None).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    flags = flags or {}
    path, overrides = None, []
    i = 0
    while i < len(argv):
        tok = argv[i]
        if tok in ("-h", "--help"):
            print(f"usage: --config FILE [key=value ...] [{' '.join(flags)}]\nkeys and defaults:\n"
                  + config_help(cls))
            raise SystemExit(0)
        if tok == "--config" or tok == "--cfg":
            if i + 1 >= len(argv):
                raise ConfigError("--config needs a yaml file")
            path, i = argv[i + 1], i + 2
            continue
        if tok.startswith("--config="):
            path, i = tok.split("=", 1)[1], i + 1
            continue
        if tok in flags:
            overrides.append(flags[tok])
        elif tok.startswith("--") and "=" in tok:
            key, val = tok[2:].split("=", 1)
            overrides.append(f"{key.replace('-', '_')}={val}")
        elif tok.startswith("--"):
            overrides.append(f"{tok[2:].replace('-', '_')}=true")
        elif "=" in tok:
            overrides.append(tok)
        else:
            raise ConfigError(f"cannot read argument {tok!r}: use --config FILE and key=value overrides")
        i += 1

    cfg = cls()
    if path is not None:
        if not Path(path).is_file():
            raise ConfigError(f"config file {path} does not exist")
        with open(path) as f:
            data = yaml.safe_load(f) or {}
        cfg = _merge(cfg, data, source=str(path))
    for ov in overrides:
        key, raw = ov.split("=", 1)
        cfg = _override(cfg, key.strip(), raw)
    return cfg, path


# ----------------------------------------------------------------------------------------
# Run folder and environment
# ----------------------------------------------------------------------------------------
CKPT_RE = re.compile(r"^step-(\d+)$")


def find_latest_checkpoint(ckpt_root: str | os.PathLike) -> Path | None:
    """Newest complete checkpoint (`step-N` folder with trainer_state.json) under ckpt_root."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return None
    found = []
    for p in root.iterdir():
        m = CKPT_RE.match(p.name)
        if m and (p / "trainer_state.json").is_file():
            found.append((int(m.group(1)), p))
    return max(found)[1] if found else None


def _numbered_runs(output_dir: Path, name: str) -> list[tuple[int, Path]]:
    runs = []
    if output_dir.is_dir():
        for p in output_dir.iterdir():
            m = re.match(r"^(\d+)-(.*)$", p.name)
            if m and p.is_dir() and (not name or m.group(2) == name):
                runs.append((int(m.group(1)), p))
    return sorted(runs)


def _resolve_run_local(output_dir: str, name: str, run_name: str, resume: str,
                       new_run: bool) -> tuple[str, str | None]:
    run, ckpt = _find_resume(Path(output_dir), name, run_name, resume)
    if run is None or new_run:
        return _new_run_dir(Path(output_dir), name + ("-eval" if new_run else ""), "" if new_run else run_name), ckpt
    return run, ckpt


def _find_resume(out: Path, name: str, run_name: str, resume: str) -> tuple[str | None, str | None]:
    """(run folder to continue or None, checkpoint or None) for a resume setting."""
    if resume in ("latest", "auto"):
        candidates = [out / run_name] if run_name else [p for _, p in reversed(_numbered_runs(out, name))]
        for run in candidates:
            ckpt = find_latest_checkpoint(run / "checkpoints")
            if ckpt is not None:
                return str(run), str(ckpt)
        if resume == "latest":
            where = out / run_name if run_name else out / f"NNN-{name}"
            raise ConfigError(f"resume=latest found no checkpoint under {where}/checkpoints; "
                              "start without resume, use resume=auto, or pass resume=PATH")
    elif resume:
        ckpt = Path(resume)
        if (ckpt / "checkpoints").is_dir():  # a run folder: its newest checkpoint
            latest = find_latest_checkpoint(ckpt / "checkpoints")
            if latest is None:
                raise ConfigError(f"resume={resume}: run folder has no complete checkpoint")
            ckpt = latest
        if not (ckpt / "trainer_state.json").is_file():
            raise ConfigError(f"resume={resume} is not a checkpoint folder (no trainer_state.json); "
                              "pass a checkpoints/step-N folder, a run folder, or resume=latest")
        if ckpt.parent.name == "checkpoints":  # continue in the run it came from
            return str(ckpt.parent.parent), str(ckpt)
        return None, str(ckpt)
    return None, None


def _new_run_dir(out: Path, name: str, run_name: str) -> str:
    if run_name:
        run = out / run_name
        if find_latest_checkpoint(run / "checkpoints") is not None:
            raise ConfigError(f"run folder {run} already holds checkpoints; pass resume=latest to continue "
                              "it or choose another run_name")
        run.mkdir(parents=True, exist_ok=True)
        return str(run)
    out.mkdir(parents=True, exist_ok=True)
    runs = _numbered_runs(out, "")
    idx = runs[-1][0] + 1 if runs else 0
    while True:  # mkdir is the lock: two launches never share a number
        run = out / f"{idx:03d}-{name}"
        try:
            run.mkdir()
            return str(run)
        except FileExistsError:
            idx += 1


def resolve_run(output_dir: str, name: str, run_name: str = "", resume: str = "",
                new_run: bool = False) -> tuple[Path, Path | None]:
    """Pick (run folder, checkpoint to resume or None) on the main process and share it.

    Fresh runs get `output_dir/NNN-name` (or `output_dir/run_name`); resume=latest|auto continues
    the newest run of that name that has a checkpoint (auto starts fresh if none); a checkpoint
    path continues in its own run folder. new_run=True (evaluation) finds the checkpoint the same
    way but writes to a new `NNN-name-eval` folder, leaving the training run untouched.
    """
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list, parse_flag_from_env

    # the same process group the Accelerator will use; PartialState() alone ignores ACCELERATE_USE_CPU
    # (only AcceleratorState reads it) and would silently run each CPU process on its own
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    result = [None]
    if state.is_main_process:
        try:
            result = [_resolve_run_local(output_dir, name, run_name, resume, new_run)]
        except ConfigError as e:
            result = [e]
    if state.num_processes > 1:
        broadcast_object_list(result)
    if isinstance(result[0], Exception):
        raise result[0]
    run, ckpt = result[0]
    return Path(run), (Path(ckpt) if ckpt else None)


def run_training(cfg, name: str, train_fn, arch_keys: tuple[str, ...], new_run: bool = False):
    """The start-up both trainers share, around `train_fn(cfg, name, run_dir, resume_ckpt, accelerator, log, stop)`.

    Sets the thread count (cfg.threads), picks the run folder and the checkpoint to resume, refuses a
    checkpoint of another model (cfg.model against arch_keys) before anything is built, creates the
    Accelerator (precision, accumulation, trackers), the log and the SIGTERM / SIGUSR1 handler. Bad
    input (ConfigError, DataError: both ValueErrors) leaves no empty run folder behind.
    """
    from accelerate import Accelerator

    threads_before = torch.get_num_threads()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    try:
        run_dir, resume_ckpt = resolve_run(cfg.output_dir, name, cfg.run_name, cfg.resume, new_run=new_run)
        if resume_ckpt:
            ckpt_state = read_trainer_state(resume_ckpt)
            model_now = model_section_for_check(dataclasses.asdict(cfg.model), ckpt_state)
            check_same_model(ckpt_state, model_now, arch_keys, resume_ckpt)
        log_with = [t.strip() for t in cfg.log.log_with.split(",") if t.strip() not in ("", "none")]
        accelerator = Accelerator(mixed_precision=cfg.mixed_precision,
                                  gradient_accumulation_steps=cfg.optim.grad_accum_steps,
                                  log_with=log_with or None, project_dir=str(run_dir),
                                  step_scheduler_with_optimizer=False)
        log = setup_logging(run_dir, accelerator.is_main_process)
        try:
            with StopSignal() as stop:
                return train_fn(cfg, name, run_dir, resume_ckpt, accelerator, log, stop)
        except ValueError:
            close_logging()
            remove_unused_run(run_dir, accelerator)
            raise
    finally:
        close_logging()
        torch.set_num_threads(threads_before)


def remove_unused_run(run_dir: Path, accelerator=None):
    """Delete a run folder that holds nothing but start-up files (log, config, run.json): a run that
    failed on bad input before training leaves no clutter. Anything else in it keeps it."""
    if accelerator is not None and not accelerator.is_main_process:
        return
    run_dir = Path(run_dir)
    if run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= {"log.txt", "config.yaml", "run.json"}:
        shutil.rmtree(run_dir, ignore_errors=True)


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

    info = {
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
    return info


def write_run_info(run_dir: Path, config: dict, accelerator, seed: int, extra: dict | None = None) -> dict:
    """Main process: config.yaml (resolved) and run.json (git hash, seed, command, environment).

    A resumed run keeps the run.json of its start and appends this launch under "resumes".
    """
    info = {
        "git": git_hash(),
        "seed": seed,
        "command": " ".join([sys.executable] + sys.argv),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "environment": environment_info(accelerator),
        **(extra or {}),
    }
    if accelerator.is_main_process:
        run_dir = Path(run_dir)
        record = info
        if (run_dir / "run.json").is_file():
            record = json.loads((run_dir / "run.json").read_text())
            record.setdefault("resumes", []).append(info)
        _atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(config, sort_keys=False))
        _atomic_write_text(run_dir / "run.json", json.dumps(record, indent=2))
    return info


def setup_logging(run_dir: Path, is_main: bool) -> logging.Logger:
    """'vit3.train' logger: main process writes to stdout and run_dir/log.txt, others stay quiet."""
    close_logging()
    logger.setLevel(logging.INFO)
    logger.propagate = False
    if is_main:
        fmt = logging.Formatter("[%(asctime)s] %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
        for h in (logging.StreamHandler(sys.stdout), logging.FileHandler(run_dir / "log.txt")):
            h.setFormatter(fmt)
            logger.addHandler(h)
    else:
        logger.addHandler(logging.NullHandler())
    return logger


def close_logging():
    for h in list(logger.handlers):
        h.close()
        logger.removeHandler(h)


def flat_config(d: dict, prefix: str = "") -> dict:
    """Flat {"a/b": scalar} of a nested config for tracker hparams (lists as strings)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat_config(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


class MetricsFile:
    """Append-only metrics.jsonl in the run folder (main process), beside the trackers."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def write(self, step: int, metrics: dict):
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")


# ----------------------------------------------------------------------------------------
# Optimizer, schedule, EMA
# ----------------------------------------------------------------------------------------
def scaled_lrs(cfg: OptimConfig, global_batch: int) -> tuple[float, float, float]:
    """(lr, warmup_lr, min_lr) linearly scaled by global batch / lr_batch, as the official code."""
    s = global_batch / cfg.lr_batch if cfg.lr_batch else 1.0
    return cfg.lr * s, cfg.warmup_lr * s, cfg.min_lr * s


def create_optimizer_and_scheduler(model: nn.Module, cfg: OptimConfig, global_batch: int, updates_per_epoch: int):
    """timm AdamW (no decay on 1-D params, biases, model.no_weight_decay()) and a per-update schedule.

    The scheduler is a timm scheduler: call `scheduler.step_update(num_updates)` after each update.
    """
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    lr, warmup_lr, min_lr = scaled_lrs(cfg, global_batch)
    optimizer = create_optimizer_v2(model, opt=cfg.opt, lr=lr, weight_decay=cfg.weight_decay,
                                    betas=tuple(cfg.betas), eps=cfg.eps, filter_bias_and_bn=True)
    if cfg.sched == "constant" and cfg.warmup_epochs == 0:
        return optimizer, None
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=cfg.sched, num_epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs,
        cooldown_epochs=cfg.cooldown_epochs, min_lr=min_lr, warmup_lr=warmup_lr,
        step_on_epochs=False, updates_per_epoch=updates_per_epoch)
    return optimizer, scheduler


def create_ema(model: nn.Module, cfg: EMAConfig, global_batch: int):
    """timm ModelEmaV3 of `model` (create it before accelerator.prepare: a deepcopy of a prepared
    model would share its autocast-wrapped forward with the original)."""
    if not cfg.enabled:
        return None
    from timm.utils import ModelEmaV3

    decay = cfg.decay ** (global_batch / cfg.decay_batch) if cfg.decay_batch else cfg.decay
    ema = ModelEmaV3(model, decay=decay)
    ema.requires_grad_(False)
    return ema


# ----------------------------------------------------------------------------------------
# Resumable, seeded data order
# ----------------------------------------------------------------------------------------
class ResumableBatchSampler:
    """Seeded, sharded, resumable batch sampler for training.

    Each epoch draws a permutation and one seed per position from (seed, epoch). Update u of the
    epoch consumes the contiguous block perm[u*G:(u+1)*G] of G = batch_size * num_replicas *
    accum_steps images; process r takes micro-batch m as perm[(m*R + r)*b:(m*R + r + 1)*b].
    Items are (dataset index, sample seed) so augmentation is seeded per sample (`seeded_rng`)
    and does not depend on loader workers. `set_epoch(e, start_batch)` skips consumed batches
    without loading them; incomplete trailing updates are dropped.
    """

    def __init__(self, num_samples: int, batch_size: int, num_replicas: int = 1, rank: int = 0,
                 seed: int = 0, accum_steps: int = 1, shuffle: bool = True):
        self.num_samples, self.batch_size = num_samples, batch_size
        self.num_replicas, self.rank, self.seed = num_replicas, rank, seed
        self.accum_steps, self.shuffle = accum_steps, shuffle
        self.global_batch = batch_size * num_replicas * accum_steps
        self.updates_per_epoch = num_samples // self.global_batch
        self.batches_per_epoch = self.updates_per_epoch * accum_steps
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0):
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self):
        return max(self.batches_per_epoch - self.start_batch, 0)

    def __iter__(self):
        g = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, self.epoch]).generate_state(1)[0]))
        perm = torch.randperm(self.num_samples, generator=g) if self.shuffle else torch.arange(self.num_samples)
        seeds = torch.randint(0, 2**31 - 1, (self.num_samples,), generator=g)
        b = self.batch_size
        for m in range(self.start_batch, self.batches_per_epoch):
            lo = (m * self.num_replicas + self.rank) * b
            yield list(zip(perm[lo:lo + b].tolist(), seeds[lo:lo + b].tolist()))


class ShardedEvalSampler:
    """Evaluation batches: process r takes indices r, r+R, ... (no padding, so sums are exact)."""

    def __init__(self, num_samples: int, batch_size: int, num_replicas: int = 1, rank: int = 0):
        self.indices = list(range(rank, num_samples, num_replicas))
        self.batch_size = batch_size

    def __len__(self):
        return math.ceil(len(self.indices) / self.batch_size)

    def __iter__(self):
        for i in range(0, len(self.indices), self.batch_size):
            yield self.indices[i:i + self.batch_size]


@contextmanager
def seeded_rng(seed: int | None):
    """Seed python, numpy and torch (CPU) RNGs for one sample's augmentation, then restore them.

    Restoring keeps the caller's RNG streams (dropout, mixup in the main process) untouched
    when the loader runs without workers. CUDA generators are not touched.
    """
    if seed is None:
        yield
        return
    py, npy, th = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.random.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(th)


# ----------------------------------------------------------------------------------------
# RNG state of one process
# ----------------------------------------------------------------------------------------
def seed_process(seed: int):
    """Seed python, numpy, torch (CPU and CUDA) for this process."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng_state() -> dict:
    """Every global RNG of this process, as tensors / plain types (loadable with weights_only)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict):
    random.setstate(_to_tuple(state["python"]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_tuple(x):
    return tuple(_to_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


# ----------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------
def _fsync_dir(path: Path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path):
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _atomic_write_text(path: Path, text: str):
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def weights_digest(module: nn.Module) -> str:
    """sha256 of a module's state dict (names, dtypes, shapes, bytes): equal digests, equal weights."""
    h = hashlib.sha256()
    for k, v in module.state_dict().items():
        v = v.detach().cpu().contiguous()
        h.update(f"{k}|{v.dtype}|{tuple(v.shape)}".encode())
        h.update(v.view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.hexdigest()


def save_checkpoint(accelerator, ckpt_root: Path, step: int, *, modules: dict[str, nn.Module],
                    states: dict[str, Any], trainer_state: dict, config: dict, keep_last: int = 3) -> Path:
    """Write checkpoints/step-N atomically; every process must call it.

    modules -> <name>.safetensors; states (objects with state_dict(), or None) -> <name>.pt;
    each process's RNG -> rng-<rank>.pt; trainer_state.json and config.yaml. The folder is
    written as .tmp-step-N, fsynced, then renamed, so a crash never leaves a partial
    checkpoint that looks complete. Older checkpoints beyond keep_last are deleted.
    """
    from safetensors.torch import save_model

    ckpt_root = Path(ckpt_root)
    final = ckpt_root / f"step-{step:08d}"
    tmp = ckpt_root / f".tmp-step-{step:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()

    rng_path = tmp / f"rng-{accelerator.process_index}.pt"
    torch.save(capture_rng_state(), rng_path)
    _fsync_file(rng_path)
    if accelerator.is_main_process:
        for name, module in modules.items():
            save_model(module, str(tmp / f"{name}.safetensors"), metadata={"format": "pt"})
            _fsync_file(tmp / f"{name}.safetensors")
        for name, obj in states.items():
            if obj is not None:
                torch.save(obj.state_dict(), tmp / f"{name}.pt")
                _fsync_file(tmp / f"{name}.pt")
        _atomic_write_text(tmp / "config.yaml", yaml.safe_dump(config, sort_keys=False))
        state = {**trainer_state, "step": step, "world_size": accelerator.num_processes, "config": config}
        _atomic_write_text(tmp / "trainer_state.json", json.dumps(state, indent=2))
    accelerator.wait_for_everyone()

    if accelerator.is_main_process:
        _fsync_dir(tmp)
        trash = ckpt_root / f".trash-step-{step:08d}"
        if final.exists():  # same step saved twice (step and epoch-end): the later one wins
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(final, trash)
        os.replace(tmp, final)
        _fsync_dir(ckpt_root)
        shutil.rmtree(trash, ignore_errors=True)
        prune_checkpoints(ckpt_root, keep_last)
    accelerator.wait_for_everyone()
    return final


def prune_checkpoints(ckpt_root: Path, keep_last: int):
    ckpts = sorted((int(m.group(1)), p) for p in Path(ckpt_root).iterdir() if (m := CKPT_RE.match(p.name)))
    if keep_last > 0:
        for _, p in ckpts[:-keep_last]:
            shutil.rmtree(p, ignore_errors=True)
    for p in Path(ckpt_root).glob(".tmp-step-*"):  # left over by a crash during a save
        shutil.rmtree(p, ignore_errors=True)


def read_trainer_state(ckpt: Path) -> dict:
    with open(Path(ckpt) / "trainer_state.json") as f:
        return json.load(f)


def model_section_for_check(model_config: dict, ckpt_state: dict) -> dict:
    """This run's model section as it will be resolved: num_classes 0 (= as in the data) is taken as
    the checkpoint's, so only explicit differences count."""
    d = dict(model_config)
    if d.get("num_classes") == 0:
        d["num_classes"] = ckpt_state.get("config", {}).get("model", {}).get("num_classes")
    return d


def check_same_model(ckpt_state: dict, model_config: dict, keys=("name", "num_classes", "img_size", "kwargs"),
                     ckpt: Path | str = "", section: str = "model"):
    """ConfigError if the checkpoint was written for another model than `model_config` describes."""
    old = (ckpt_state.get("config") or {}).get(section, {})
    diffs = [k for k in keys if old.get(k) != model_config.get(k)]
    if diffs:
        detail = "; ".join(f"{section}.{k}: checkpoint {old.get(k)!r} vs this run {model_config.get(k)!r}"
                           for k in diffs)
        raise ConfigError(
            f"checkpoint {ckpt} is of another model ({detail}). Resume it with the config it was "
            f"trained with (its config.yaml), or start a new run without resume")


def load_checkpoint(accelerator, ckpt: Path, *, modules: dict[str, nn.Module], states: dict[str, Any],
                    restore_rng: bool = True, optional: tuple[str, ...] = ("scaler",)) -> dict:
    """Load what save_checkpoint wrote into `modules` and `states`; returns trainer_state.

    Weights load strictly (a mismatch names the keys); other files with weights_only=True; the
    `optional` states may be missing (they then start fresh).
    Each process restores its own RNG (rng-<rank>.pt); if the world size changed, rank r takes
    rng-(r mod old size) and the run continues, but not bit-for-bit.
    """
    from safetensors.torch import load_model

    ckpt = Path(ckpt)
    trainer_state = read_trainer_state(ckpt)
    for name, module in modules.items():
        path = ckpt / f"{name}.safetensors"
        if not path.is_file():
            raise ConfigError(f"checkpoint {ckpt} has no {path.name}")
        try:
            load_model(module, str(path), strict=True, device=str(next(module.parameters()).device))
        except RuntimeError as e:
            raise ConfigError(f"checkpoint {ckpt} does not fit this model ({name}): {e}") from None
    for name, obj in states.items():
        path = ckpt / f"{name}.pt"
        if obj is None:
            continue
        if not path.is_file():
            if name in optional:  # e.g. a bf16 checkpoint resumed in fp16: a fresh grad scaler
                logger.warning(f"checkpoint {ckpt} has no {path.name}; {name} starts fresh")
                continue
            raise ConfigError(f"checkpoint {ckpt} has no {path.name}")
        obj.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    if restore_rng:
        old_world = trainer_state.get("world_size", 1)
        rank = accelerator.process_index % old_world
        if old_world != accelerator.num_processes:
            logger.warning(f"checkpoint was written by {old_world} processes, resuming with "
                           f"{accelerator.num_processes}: training continues but not bit-for-bit")
        restore_rng_state(torch.load(ckpt / f"rng-{rank}.pt", map_location="cpu", weights_only=True))
    return trainer_state


def load_weights(model: nn.Module, path: str | os.PathLike, key: str = "model", strict: bool = True):
    """Model weights from a .safetensors file, a checkpoint folder, or a torch file (weights_only)."""
    path = Path(path)
    if path.is_dir():
        path = path / f"{key}.safetensors"
    if not path.is_file():
        raise ConfigError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        sd = load_file(str(path))
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
        for k in (key, "model", "state_dict", "model_ema"):
            if isinstance(sd, dict) and k in sd and isinstance(sd[k], dict):
                sd = sd[k]
                break
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise ConfigError(f"weights {path} do not fit this model: {e}") from None
    if strict and (missing or unexpected):
        raise ConfigError(f"weights {path} do not fit this model: missing {list(missing)[:8]}, "
                          f"unexpected {list(unexpected)[:8]}")
    return missing, unexpected


# ----------------------------------------------------------------------------------------
# Stop signals and metrics
# ----------------------------------------------------------------------------------------
class StopSignal:
    """Context manager: SIGTERM / SIGUSR1 set a flag that the training loop polls to save and stop.

    With several processes the flag is agreed on with an all-reduce (`should_stop(accelerator)`),
    so every rank stops at the same update even if only one got the signal.
    """

    SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None)) if s)

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def _handle(self, signum, frame):
        self.received = signum

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous = {}

    def should_stop(self, accelerator) -> bool:
        local = self.received is not None
        if accelerator.num_processes == 1:
            return local
        flag = torch.tensor([1.0 if local else 0.0], device=accelerator.device)
        return bool(accelerator.reduce(flag, "sum").item() > 0)


def ignore_stop_signals(worker_id: int = 0):
    """DataLoader worker_init_fn: workers ignore SIGTERM / SIGUSR1 (a cluster's scancel signals
    every process), so the main process can finish its checkpoint before shutting them down."""
    for s in StopSignal.SIGNALS:
        signal.signal(s, signal.SIG_IGN)


class RunningMeans:
    """Sums of per-step scalars kept as device tensors: no host sync until `reduce()`.

    reduce() averages over the logged steps and all processes (one all-reduce, one .item()).
    """

    def __init__(self, device):
        self.device = device
        self.reset()

    def reset(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def add(self, name: str, value: torch.Tensor | float):
        v = value.detach().float() if torch.is_tensor(value) else torch.tensor(float(value))
        v = v.to(self.device)
        self.sums[name] = self.sums[name] + v if name in self.sums else v.clone()
        self.counts[name] = self.counts.get(name, 0) + 1

    def reduce(self, accelerator, extra_sums: dict[str, float] | None = None) -> dict[str, float]:
        """Mean of each tracked value over steps and processes; `extra_sums` are summed over processes."""
        names = list(self.sums)
        extra = dict(extra_sums or {})
        vec = [self.sums[n] / self.counts[n] for n in names]
        vec += [torch.tensor(float(v), device=self.device) for v in extra.values()]
        if not vec:
            return {}
        t = torch.stack([v.reshape(()) for v in vec]).to(self.device)
        if accelerator.num_processes > 1:
            t = accelerator.reduce(t, "sum")
        vals = t.tolist()
        out = {n: vals[i] / accelerator.num_processes for i, n in enumerate(names)}
        out.update({n: vals[len(names) + i] for i, n in enumerate(extra)})
        return out

    def local(self) -> dict[str, float]:
        return {n: (self.sums[n] / self.counts[n]).item() for n in self.sums}


def write_rank_debug(run_dir: Path, accelerator, info: dict):
    """debug/rank<r>.json, one per process: lets tests compare weights and local metrics across ranks."""
    d = Path(run_dir) / "debug"
    d.mkdir(parents=True, exist_ok=True)
    record = {"rank": accelerator.process_index, "world_size": accelerator.num_processes, **info}
    _atomic_write_text(d / f"rank{accelerator.process_index}.json", json.dumps(record, indent=2))
