"""Data order that can be resumed mid-epoch, the same whatever the workers and processes.

A seeded, sharded batch sampler whose items carry a per-sample seed, so augmentation does not depend
on workers, world size or where a run was stopped (`ResumableBatchSampler`, `seeded_rng`), and the
DataLoaders both trainers build on it.
"""
from __future__ import annotations

import math
import random
from contextlib import contextmanager

import numpy as np
import torch
from torch.utils.data import DataLoader

from .signals import ignore_stop_signals


class ResumableBatchSampler:
    """Seeded, sharded, resumable batch sampler for training.

    Each epoch draws a permutation and one seed per position from (seed, epoch). Update u of the
    epoch consumes the contiguous block perm[u*G:(u+1)*G] of G = batch_size * num_replicas *
    accum_steps images; process r takes micro-batch m as perm[(m*R + r)*b:(m*R + r + 1)*b].
    Items are (dataset index, sample seed) so augmentation is seeded per sample (`seeded_rng`)
    and does not depend on loader workers. `set_epoch(e, start_batch)` skips consumed batches
    without loading them; incomplete trailing updates are dropped. So an epoch, and a resumed one
    (start_batch a multiple of accum_steps), holds whole updates: Accelerate's count of accumulated
    micro-batches stays in phase from epoch to epoch, with nothing to reset.
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


def make_loader(dataset, batch_sampler, data_cfg, seed: int) -> DataLoader:
    """A DataLoader over `batch_sampler` with data_cfg's workers; workers ignore stop signals (the main
    process saves first) and the loader has its own generator, so creating an iterator does not draw
    from the global RNG (resume exactness)."""
    workers = data_cfg.num_workers
    return DataLoader(dataset, batch_sampler=batch_sampler, num_workers=workers,
                      pin_memory=data_cfg.pin_memory and torch.cuda.is_available(), persistent_workers=workers > 0,
                      worker_init_fn=ignore_stop_signals if workers > 0 else None,
                      generator=torch.Generator().manual_seed(seed))


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
