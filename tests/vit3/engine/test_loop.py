"""engine.loop: optimizer groups and schedule, EMA decay, metrics averaged over processes."""
import math

import pytest
import torch

from tests.vit3.engine.fakes import OneProcess, tiny_model
from vit3 import engine as T


def test_optimizer_groups_and_schedule():
    model = tiny_model()
    cfg = T.OptimConfig(epochs=10, warmup_epochs=2)
    opt, sched = T.create_optimizer_and_scheduler(model, cfg, global_batch=1024, updates_per_epoch=5,
                                                  schedule_updates=50)
    decay = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decay == {id(model[0].weight), id(model[2].weight)}  # not LayerNorm, not biases
    assert opt.defaults["betas"] == (0.9, 0.999)
    lr, wlr, mlr = 1e-3, 1e-6, 1e-5  # 5e-4, 5e-7, 5e-6 x 1024 / 512
    assert opt.param_groups[0]["lr"] == pytest.approx(wlr)
    sched.step_update(5)  # half-way through the 10-update warm-up
    assert opt.param_groups[0]["lr"] == pytest.approx(wlr + (lr - wlr) * 5 / 10)
    sched.step_update(30)  # cosine over all 50 updates (warm-up included, as the official code)
    assert opt.param_groups[0]["lr"] == pytest.approx(mlr + 0.5 * (lr - mlr) * (1 + math.cos(math.pi * 30 / 50)))


def test_ema_decay_scales_with_batch():
    ema = T.create_ema(tiny_model(), T.EMAConfig(decay=0.9996, decay_batch=4096), global_batch=1024)
    assert ema.decay == pytest.approx(0.9996 ** 0.25)
    assert not any(p.requires_grad for p in ema.parameters())
    assert T.create_ema(tiny_model(), T.EMAConfig(enabled=False), 1024) is None


def test_running_means_one_process():
    m = T.RunningMeans("cpu")
    for v in (1.0, 2.0, 3.0):
        m.add("loss", torch.tensor(v))
    assert m.reduce(OneProcess(), extra_sums={"images_per_s": 10.0}) == {"loss": 2.0, "images_per_s": 10.0}
