"""The plain functions both training loops call: batch split, optimizer / schedule / EMA, the update
step, train-metric logging without per-step host syncs. The loops themselves stay in the
trainers, where they can be read top to bottom.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import ConfigError
from .config import config_to_dict, launch_keys
from .files import atomic_write_text
from .run import MetricsFile, Run, write_run_info
from .train_config import EMAConfig, OptimConfig

logger = logging.getLogger("vit3.train")


def split_batch(global_batch: int, world: int, accum: int) -> int:
    """Per-process micro-batch of a global batch over `world` processes x `accum` accumulation steps."""
    if global_batch % (world * accum):
        raise ConfigError(f"data.batch_size={global_batch} (global) is not divisible by processes x "
                          f"optim.grad_accum_steps = {world} x {accum}; pick a multiple of {world * accum}")
    return global_batch // (world * accum)


# ----------------------------------------------------------------------------------------
# Optimizer, schedule, EMA
# ----------------------------------------------------------------------------------------
def scaled_lrs(cfg: OptimConfig, global_batch: int) -> tuple[float, float, float]:
    """(lr, warmup_lr, min_lr) linearly scaled by global batch / lr_batch, as the official code."""
    s = global_batch / cfg.lr_batch if cfg.lr_batch else 1.0
    return cfg.lr * s, cfg.warmup_lr * s, cfg.min_lr * s


def create_optimizer_and_scheduler(model: nn.Module, cfg: OptimConfig, global_batch: int, updates_per_epoch: int,
                                    schedule_updates: int):
    """timm AdamW (no decay on 1-D params, biases, model.no_weight_decay()) and a per-update schedule over
    `schedule_updates` updates (warm-up included, cfg.cooldown_epochs after), or None for a constant lr.

    The scheduler is a timm scheduler: call `scheduler.step_update(num_updates)` after each update.
    """
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    lr, warmup_lr, min_lr = scaled_lrs(cfg, global_batch)
    # torch's fused Adam(W): one kernel for all tensors instead of about ten ops per tensor, which on a
    # small model (and on CPU, where foreach falls back to a loop) is most of the optimizer's time
    fused = {"fused": True} if cfg.opt.lower() in ("adam", "adamw") else {}
    optimizer = create_optimizer_v2(model, opt=cfg.opt, lr=lr, weight_decay=cfg.weight_decay,
                                    betas=tuple(cfg.betas), eps=cfg.eps, filter_bias_and_bn=True, **fused)
    if cfg.sched == "constant" and cfg.warmup_epochs == 0:
        return optimizer, None
    # timm counts in epochs of updates_per_epoch updates; a schedule that ends inside an epoch is a fraction of one
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=cfg.sched, num_epochs=schedule_updates / updates_per_epoch, warmup_epochs=cfg.warmup_epochs,
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


def build_optimization(raw_model: nn.Module, cfg, updates_per_epoch: int, schedule_updates: int, accelerator,
                       trained: nn.Module | None = None):
    """(model to train, EMA or None, optimizer, scheduler or None) from cfg.optim / ema / compile, the schedule
    over `schedule_updates` updates: the EMA is taken before `accelerator.prepare` wraps the model (DDP, autocast).
    trained: a module holding raw_model and more trained parts (REPA's projector), which the optimizer updates
    and the accelerator wraps in its place; the EMA stays raw_model's alone."""
    trained = raw_model if trained is None else trained
    ema = create_ema(raw_model, cfg.ema, cfg.data.batch_size)
    optimizer, scheduler = create_optimizer_and_scheduler(trained, cfg.optim, cfg.data.batch_size,
                                                          updates_per_epoch, schedule_updates)
    model = torch.compile(trained) if cfg.compile else trained
    model, optimizer = accelerator.prepare(model, optimizer)
    return model, ema, optimizer, scheduler


def optimizer_step(accelerator, model, optimizer, loss: torch.Tensor, clip_grad: float, meters: "RunningMeans"):
    """Backward, and on the micro-batch that ends an update: clip (0 = only measure), step, zero."""
    accelerator.backward(loss)
    if accelerator.sync_gradients:
        max_norm = clip_grad if clip_grad > 0 else math.inf
        meters.add("grad_norm", accelerator.clip_grad_norm_(model.parameters(), max_norm))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def after_update(step: int, scheduler, ema, raw_model: nn.Module):
    """The per-update schedule and the EMA, after optimizer update number `step`."""
    if scheduler is not None:
        scheduler.step_update(num_updates=step)
    if ema is not None:
        ema.update(raw_model)


def count_over_processes(count: torch.Tensor, accelerator) -> int:
    return int(accelerator.reduce(count.to(accelerator.device), "sum").item()) if accelerator.num_processes > 1 \
        else int(count)


# ----------------------------------------------------------------------------------------
# Start: run info
# ----------------------------------------------------------------------------------------
def log_start(run: Run, cfg, extra: dict, lines: list[str]) -> MetricsFile:
    """run.json / config.yaml of the config dataclass `cfg`, the opening log lines, and the metrics file."""
    extra = {**extra, "resumed_from": str(run.resume_from or "")}
    info = write_run_info(run.dir, config_to_dict(cfg), run.accelerator, cfg.seed, extra=extra,
                          resumed_from=run.resume_from, launch_keys=launch_keys(cfg))
    acc = run.accelerator
    run.log.info(f"run folder {run.dir} | git {info['git']} | {acc.num_processes} process(es) on {acc.device} | "
                 f"mixed precision {acc.mixed_precision}")
    for line in lines:
        run.log.info(line)
    return MetricsFile(run.dir / "metrics.jsonl", acc.is_main_process)


# ----------------------------------------------------------------------------------------
# Train metrics
# ----------------------------------------------------------------------------------------
class RunningMeans:
    """Sums of per-step scalars kept as device tensors: no host sync until `reduce()`.

    reduce() averages over the logged steps and all processes (one all-reduce, one .item()); this
    process's own means are kept in `last_local`.
    """

    def __init__(self, device):
        self.device = device
        self.last_local: dict[str, float] = {}
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
        local = torch.stack([v.reshape(()) for v in vec]).to(self.device)
        total = accelerator.reduce(local, "sum") if accelerator.num_processes > 1 else local
        local, vals = torch.stack([local, total]).tolist()  # one host sync for both
        self.last_local = dict(zip(names, local))
        out = {n: vals[i] / accelerator.num_processes for i, n in enumerate(names)}
        out.update({n: vals[len(names) + i] for i, n in enumerate(extra)})
        return out


class TrainLog:
    """Train metrics between two log lines: loss and grad norm (device sums), images and updates per
    second of training time (sampling, evaluation and checkpoints excluded with `paused()`)."""

    def __init__(self, accelerator, metrics_file: MetricsFile, every: int):
        self.accelerator, self.file, self.every = accelerator, metrics_file, every
        self.meters = RunningMeans(accelerator.device)
        self.images = self.updates = 0
        self.t0 = time.time()

    def add(self, loss: torch.Tensor, images: int, update: bool):
        """One micro-batch; `update`: it ended an optimizer update."""
        self.meters.add("loss", loss.detach())
        self.images += images
        self.updates += int(update)

    def due(self, step: int, last: int = 0) -> bool:
        return step % self.every == 0 or step == last

    @contextlib.contextmanager
    def paused(self):
        t = time.time()
        try:
            yield
        finally:
            self.t0 += time.time() - t

    def write(self, step: int, optimizer, bar=None, **extra) -> dict:
        """All-reduce, log a line, write trackers and metrics.jsonl, start the next interval."""
        elapsed = max(time.time() - self.t0, 1e-9)
        m = self.meters.reduce(self.accelerator, extra_sums={"images_per_s": self.images / elapsed})
        m.update(lr=optimizer.param_groups[0]["lr"], steps_per_s=self.updates / elapsed, **extra)
        self.accelerator.log({f"train/{k}": v for k, v in m.items()}, step=step)
        self.file.write(step, {f"train/{k}": v for k, v in m.items()})
        logger.info(f"(step {step:07d}) " + " ".join(
            f"{k} {m[k]:{f}}" for k, f in (("epoch", ".2f"), ("loss", ".4f"), ("loss_repa", ".4f"), ("lr", ".3e"),
                                           ("grad_norm", ".3f"), ("steps_per_s", ".2f"), ("images_per_s", ".1f"))
            if k in m))
        if bar is not None:
            bar.set_postfix(loss=f"{m['loss']:.4f}", lr=f"{m['lr']:.2e}")
        self.meters.reset()
        self.images = self.updates = 0
        self.t0 = time.time()
        return m


def write_json(path: Path, record: dict, accelerator):
    """A result file of the main process."""
    if accelerator.is_main_process:
        atomic_write_text(path, json.dumps(record, indent=2))
