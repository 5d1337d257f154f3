"""What the classification (train_vit.py) and diffusion (train_dit.py) trainers share, one concern a file:

    config.py      dataclasses + yaml + command-line overrides, `--help` from the fields' comments
    run.py         run folders, resume resolution, run info, logging, `start_run`
    checkpoint.py  atomic checkpoints (weights, optimizer, RNG, position), load, prune
    data_order.py  the seeded, sharded, resumable sampler and the loaders on it
    signals.py     SIGTERM / SIGUSR1 -> save and stop
    loop.py        the functions both loops call: optimizer, EMA, update step, metrics, resume

Nothing here knows about ViT³ or DiT³.
"""
from .checkpoint import (
    Checkpointer,
    TrainingDiverged,
    capture_rng_state,
    check_same_model,
    find_latest_checkpoint,
    load_checkpoint,
    module_weights_file,
    pretrained_weights_file,
    read_trainer_state,
    restore_rng_state,
    save_checkpoint,
    seed_process,
)
from .config import (
    CheckpointConfig,
    ConfigError,
    EMAConfig,
    LogConfig,
    OptimConfig,
    config_diffs,
    config_to_dict,
    flat_config,
    load_config,
    merge_config,
)
from .data_order import ResumableBatchSampler, ShardedEvalSampler, make_loader, seeded_rng
from .loop import (
    RunningMeans,
    TrainLog,
    after_update,
    build_optimization,
    count_over_processes,
    create_ema,
    create_optimizer_and_scheduler,
    log_start,
    optimizer_step,
    resume,
    scaled_lrs,
    split_batch,
    write_json,
)
from .run import MetricsFile, Run, discard, finish, resolve_run, start_run, write_run_info
from .signals import StopSignal, ignore_stop_signals

__all__ = [
    "Checkpointer",
    "TrainingDiverged",
    "capture_rng_state",
    "check_same_model",
    "find_latest_checkpoint",
    "load_checkpoint",
    "module_weights_file",
    "pretrained_weights_file",
    "read_trainer_state",
    "restore_rng_state",
    "save_checkpoint",
    "seed_process",
    "CheckpointConfig",
    "ConfigError",
    "EMAConfig",
    "LogConfig",
    "OptimConfig",
    "config_diffs",
    "config_to_dict",
    "flat_config",
    "load_config",
    "merge_config",
    "RunningMeans",
    "TrainLog",
    "after_update",
    "build_optimization",
    "count_over_processes",
    "create_ema",
    "create_optimizer_and_scheduler",
    "log_start",
    "optimizer_step",
    "resume",
    "scaled_lrs",
    "split_batch",
    "write_json",
    "ResumableBatchSampler",
    "ShardedEvalSampler",
    "make_loader",
    "seeded_rng",
    "MetricsFile",
    "Run",
    "discard",
    "finish",
    "resolve_run",
    "start_run",
    "write_run_info",
    "StopSignal",
    "ignore_stop_signals",
]
