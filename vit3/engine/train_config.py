"""The config every trainer starts from: `TrainConfig` holds the keys both trainers read (run folder,
seed, precision, data batch, optimizer, EMA, checkpoints, logging); train_vit.py and train_dit.py
extend it and its sections. Each key's accepted values sit beside it (`checked`), so a rule on a key
here holds in both trainers.
"""
from __future__ import annotations

import dataclasses

from .config import SEED_RULE, at_least, between, checked, launch, one_of


def timm_optimizer():
    from timm.optim import list_optimizers

    names = set(list_optimizers())
    return (lambda v: v in names), "a timm optimizer name (timm.optim.list_optimizers(): adamw, sgd, lamb, ...)"


def _is_timm_scheduler(name: str) -> bool:
    """Whether timm builds a scheduler of this name (it raises ValueError for others); "constant" is ours."""
    import torch
    from timm.scheduler import create_scheduler_v2

    if name == "constant":
        return True
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    try:
        return create_scheduler_v2(optimizer, sched=name, num_epochs=2, updates_per_epoch=1)[0] is not None
    except ValueError:
        return False


def trackers():
    from accelerate.utils import LoggerType

    known = {t.value for t in LoggerType} | {"none"}
    return ((lambda v: all(t.strip() in known for t in v.split(",") if t.strip())),
            f"a comma-separated list of Accelerate trackers ({', '.join(sorted(known))})")


POSITIVE = (lambda v: v > 0, "a positive number")
SCHEDULER = (_is_timm_scheduler,
             "a timm scheduler name (cosine, step, multistep, plateau, poly, tanh, ...) or constant")
BETAS = (lambda v: all(0 <= b < 1 for b in v), "two numbers in [0, 1)")


# ----------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------
@dataclasses.dataclass
class DataConfig:
    """What the engine's loaders read; each trainer's data section extends it."""

    batch_size: int = checked(1024, at_least(1))  # global: per process = batch_size / (processes * grad_accum_steps)
    num_workers: int = checked(8, at_least(0))  # loader worker processes per training process
    pin_memory: bool = True
    # an unreadable image: "error" names the file, "skip" replaces it (by the next one) and counts it
    bad_images: str = checked("error", one_of("error", "skip"))


@dataclasses.dataclass
class OptimConfig:
    """AdamW + warm-up + cosine, stepped every optimizer update (official ViT³ recipe)."""

    opt: str = checked("adamw", timm_optimizer())  # any timm optimizer name
    lr: float = checked(5e-4, POSITIVE)  # base lr for a global batch of `lr_batch` images
    warmup_lr: float = checked(5e-7, at_least(0.0))
    min_lr: float = checked(5e-6, at_least(0.0))
    # lr, warmup_lr, min_lr are scaled by global_batch / lr_batch; 0 = no scaling
    lr_batch: int = checked(512, at_least(0, "an integer >= 0 (0 = no scaling)"))
    betas: tuple[float, float] = checked((0.9, 0.999), BETAS)
    eps: float = checked(1e-8, POSITIVE)
    weight_decay: float = checked(0.05, at_least(0.0))  # not applied to 1-D params, biases and model.no_weight_decay()
    sched: str = checked("cosine", SCHEDULER)  # any timm scheduler name, or "constant"
    epochs: int = checked(300, at_least(1))  # train_vit.py: the schedule's length (train_dit.py: max_steps)
    warmup_epochs: int = checked(20, at_least(0))
    cooldown_epochs: int = checked(0, at_least(0))
    clip_grad: float = checked(5.0, at_least(0.0, ">= 0 (0 = no clipping)"))  # max global grad norm; 0 = no clipping
    grad_accum_steps: int = checked(1, at_least(1))  # micro-batches per optimizer update


@dataclasses.dataclass
class EMAConfig:
    enabled: bool = True  # keep an EMA of the weights (evaluated, sampled, exported)
    decay: float = checked(0.9996, between(0.0, 1.0))
    # decay is per `decay_batch` images: the per-update decay is decay ** (global_batch / decay_batch),
    # as the official main_ema.py does (0.9996 per 4096 -> 0.9999 per update at batch 1024); 0 = as given
    decay_batch: int = checked(4096, at_least(0, "an integer >= 0 (0 = the decay as given)"))


@dataclasses.dataclass
class CheckpointConfig:
    # also save every N optimizer updates (0 = only at epoch ends and on stop)
    every_steps: int = checked(0, at_least(0, "an integer >= 0 (0 = not by steps)"))
    # save every N epochs (0 = never at epoch ends)
    every_epochs: int = checked(1, at_least(0, "an integer >= 0 (0 = not at epoch ends)"))
    # checkpoints kept; older ones are deleted (0 = keep all)
    keep_last: int = checked(3, at_least(0, "an integer >= 0 (0 = keep every checkpoint)"))
    # with several processes, updates between the all-reduce that agrees on a SIGTERM / SIGUSR1
    # (one process alone checks every update, for free)
    stop_check_every: int = checked(10, at_least(1))


@dataclasses.dataclass
class LogConfig:
    every: int = checked(50, at_least(1))  # optimizer updates between logged (all-reduced) train metrics
    # Accelerate trackers, comma separated ("tensorboard,wandb"); "none"
    log_with: str = checked("tensorboard", trackers())
    progress: bool = True  # tqdm bar on the main process


# ----------------------------------------------------------------------------------------
# The base every trainer extends
# ----------------------------------------------------------------------------------------
@dataclasses.dataclass
class TrainConfig:
    """Keys both trainers read; a trainer's own keys follow these in its subclass. A trainer whose
    sections differ (its data keys, other defaults) declares that section again with its own class."""

    name: str = ""  # experiment name, run folder output_dir/NNN-name; "" = the config file's stem
    seed: int = checked(0, SEED_RULE)
    output_dir: str = "results"
    run_name: str = launch("")  # fixed run folder output_dir/run_name instead of a numbered one
    # "no" | "fp16" (with a grad scaler) | "bf16", via Accelerate (the TTT inner step runs in float32 regardless)
    mixed_precision: str = checked("bf16", one_of("no", "fp16", "bf16"))
    resume: str = launch("")  # "latest" | "auto" (latest if any, else fresh) | a checkpoint or run folder
    compile: bool = False  # torch.compile the model
    # torch intra-op threads per process (torch.set_num_threads); 0 = torch's default
    threads: int = checked(0, at_least(0, "an integer >= 0 (0 = torch's default)"))
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    ema: EMAConfig = dataclasses.field(default_factory=EMAConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    log: LogConfig = dataclasses.field(default_factory=LogConfig)
