"""What the classification (train_vit.py) and diffusion (train_dit.py) trainers share, one concern a file:

    config.py      dataclasses + yaml + command-line overrides, `--help` from the fields' comments
    run.py         run folders, resume resolution, run info, logging, `start_run`
    lock.py        one writer per folder
    checkpoint.py  atomic checkpoints (weights, optimizer, RNG, position), load, prune
    files.py       writes that stay inside their folder: temporary names, renames, no links followed
    data_order.py  the seeded, sharded, resumable sampler and the loaders on it
    signals.py     SIGTERM / SIGUSR1 -> save and stop
    loop.py        the functions both loops call: optimizer, EMA, update step, metrics, resume
    script.py      the scripts' `__main__`: exit codes, no hang on the way out

Nothing here knows about ViT³ or DiT³.
"""
from .checkpoint import (
    Checkpointer,
    TrainingDiverged,
    WriteError,
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
    verify_checkpoint,
)
from .config import (
    SEED_RULE,
    TRAINER_RULES,
    CheckpointConfig,
    ConfigError,
    DataError,
    EMAConfig,
    LogConfig,
    OptimConfig,
    at_least,
    between,
    check_values,
    config_diffs,
    config_to_dict,
    flat_config,
    load_config,
    merge_config,
    one_of,
)
from .data_order import ResumableBatchSampler, ShardedEvalSampler, make_loader, seeded_rng
from .files import (
    atomic_dir,
    atomic_path,
    atomic_write_text,
    follow_umask,
    is_permission_error,
    open_append,
    refuse_link,
    remove_path,
    temp_dir,
)
from .lock import acquire_lock, release_lock
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
from .run import MetricsFile, Run, discard, finish, on_main_process, resolve_run, start_run, write_run_info
from .script import run_script
from .signals import StopSignal, ignore_stop_signals

__all__ = [
    "Checkpointer",
    "WriteError",
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
    "verify_checkpoint",
    "CheckpointConfig",
    "ConfigError",
    "DataError",
    "EMAConfig",
    "LogConfig",
    "OptimConfig",
    "SEED_RULE",
    "TRAINER_RULES",
    "at_least",
    "between",
    "check_values",
    "one_of",
    "config_diffs",
    "config_to_dict",
    "flat_config",
    "load_config",
    "merge_config",
    "atomic_dir",
    "atomic_path",
    "atomic_write_text",
    "follow_umask",
    "is_permission_error",
    "open_append",
    "refuse_link",
    "remove_path",
    "temp_dir",
    "ResumableBatchSampler",
    "ShardedEvalSampler",
    "make_loader",
    "seeded_rng",
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
    "MetricsFile",
    "Run",
    "acquire_lock",
    "discard",
    "finish",
    "on_main_process",
    "release_lock",
    "resolve_run",
    "run_script",
    "start_run",
    "write_run_info",
    "StopSignal",
    "ignore_stop_signals",
]
