"""What the classification (train_vit.py) and diffusion (train_dit.py) trainers share, one concern a file:

    config.py      dataclasses + yaml + command-line overrides, `--help` from the fields' comments, value rules
    train_config.py  the base config both trainers extend (run, seed, data batch, optimizer, EMA, checkpoints, log)
    run.py         run folders, resume resolution, run info, logging, `start_run`
    lock.py        one writer per folder
    checkpoint.py  atomic checkpoints (weights, optimizer, RNG, position), load, prune
    state.py       the training state (step, epoch, position) and the Checkpointer that restores and saves it
    files.py       writes that stay inside their folder: temporary names, renames, no links followed; write probes
    data_order.py  the seeded, sharded, resumable sampler and the loaders on it
    signals.py     SIGTERM / SIGUSR1 -> save and stop
    loop.py        the functions both loops call: optimizer, EMA, update step, metrics
    script.py      the scripts' `__main__`: exit codes, no hang on the way out

Nothing here knows about ViT³ or DiT³.
"""
from ..errors import ConfigError, DataError, SamplingDiverged, TrainingDiverged, WriteError
from .checkpoint import (
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
    at_least,
    between,
    check_values,
    checked,
    config_diffs,
    config_to_dict,
    flat_config,
    launch,
    launch_keys,
    load_config,
    merge_config,
    one_of,
)
from .data_order import ResumableBatchSampler, ShardedEvalSampler, make_loader, seeded_rng
from .files import (
    atomic_dir,
    atomic_path,
    atomic_write_text,
    check_writable,
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
    scaled_lrs,
    split_batch,
    write_json,
)
from .run import MetricsFile, Run, discard, finish, on_main_process, resolve_run, start_run, write_run_info
from .script import run_script
from .signals import StopSignal, ignore_stop_signals
from .state import Checkpointer, TrainState
from .train_config import CheckpointConfig, DataConfig, EMAConfig, LogConfig, OptimConfig, TrainConfig

__all__ = [
    "Checkpointer",
    "TrainState",
    "WriteError",
    "TrainingDiverged",
    "SamplingDiverged",
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
    "DataConfig",
    "DataError",
    "EMAConfig",
    "LogConfig",
    "OptimConfig",
    "TrainConfig",
    "SEED_RULE",
    "at_least",
    "between",
    "check_values",
    "checked",
    "one_of",
    "config_diffs",
    "config_to_dict",
    "flat_config",
    "launch",
    "launch_keys",
    "load_config",
    "merge_config",
    "atomic_dir",
    "atomic_path",
    "atomic_write_text",
    "check_writable",
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
