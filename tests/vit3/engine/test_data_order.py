"""engine.data_order: the resumable sampler's shards and order, and the seeded RNG context."""
import random

import numpy as np
import torch

from vit3 import engine as T


def _epoch(n, b, world, accum, epoch, seed=3, start=0):
    out = []
    for r in range(world):
        s = T.ResumableBatchSampler(n, b, world, r, seed=seed, accum_steps=accum)
        s.set_epoch(epoch, start)
        out.append(list(s))
    return out


def test_sampler_shards_cover_and_resume():
    n = 50
    per_rank = _epoch(n, 4, world=2, accum=2, epoch=0)
    idx = [i for rank in per_rank for batch in rank for i, _ in batch]
    assert len(idx) == len(set(idx)) == (n // 16) * 16  # disjoint, whole updates only
    # the images of update u are the same however the global batch of 16 is split
    split_a = _epoch(n, 4, world=2, accum=2, epoch=0)
    split_b = _epoch(n, 16, world=1, accum=1, epoch=0)
    for u in range(n // 16):
        a = {i for r in split_a for batch in r[2 * u:2 * u + 2] for i, _ in batch}
        b = {i for i, _ in split_b[0][u]}
        assert a == b
    # skipping consumed batches continues with exactly the rest, seeds included
    full = _epoch(n, 4, 2, 2, epoch=1)
    rest = _epoch(n, 4, 2, 2, epoch=1, start=2)
    assert [r[2:] for r in full] == rest
    assert _epoch(n, 4, 2, 2, epoch=2) != full  # a new order each epoch


def test_seeded_rng_is_deterministic_and_restores_global_state():
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    before = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    with T.seeded_rng(123):
        a = (random.random(), np.random.rand(), torch.rand(1).item())
    with T.seeded_rng(123):
        b = (random.random(), np.random.rand(), torch.rand(1).item())
    assert a == b
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == before
