"""engine.TrainState and the Checkpointer that owns it: counting, one save per position, restore and seeding,
no diverged weights saved, a failed save tried again."""
import dataclasses
import errno
import logging

import pytest
import torch
import torch.nn as nn

from tests.trainer_helpers import make_unwritable
from tests.vit3.engine.fakes import fake_run, tiny_model
from vit3 import engine as T


@dataclasses.dataclass
class _BestState(T.TrainState):
    best: float = 0.0


def test_train_state_counts_updates_and_epochs():
    st = T.TrainState()
    assert [st.advance(), st.advance()] == [1, 2] and st.position() == (2, 0, 2)
    st.end_epoch(skipped_images=3)
    assert st.position() == (2, 1, 0) and st.skipped_images == 3


def test_checkpointer_saves_each_position_once(tmp_path):
    """A second save of the same position is skipped; the update that ends an epoch is saved again once the
    epoch is counted (same step, new position), and the later copy is the one kept."""
    ckpt = T.Checkpointer(fake_run(tmp_path), modules={"model": tiny_model()}, states={}, config={}, keep_last=0)
    ckpt.state.advance()
    first = ckpt.save()
    assert first is not None and ckpt.save() is None
    ckpt.state.end_epoch()
    assert ckpt.save() == first
    assert T.read_trainer_state(first)["epoch"] == 1 and ckpt.save() is None


def test_checkpointer_restores_state_weights_optimizer_and_rng(tmp_path):
    """restore() of a checkpoint brings back the trainer's own state fields, weights, optimizer and RNG, and
    counts the restored position as saved; a fresh run's restore() seeds each process with seed + 1 + rank."""
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    ckpt = T.Checkpointer(fake_run(tmp_path), modules={"model": model}, states={"optimizer": opt}, config={},
                          keep_last=3, state=_BestState())
    ckpt.state.advance(), ckpt.state.advance()
    ckpt.state.best = 0.5
    path = ckpt.save()
    after_save = torch.rand(3)  # the RNG continues from the state the checkpoint holds

    other = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    other_opt = torch.optim.AdamW(other.parameters())
    resumed = T.Checkpointer(fake_run(tmp_path / "b", resume_from=path), modules={"model": other},
                             states={"optimizer": other_opt}, config={}, keep_last=3, state=_BestState())
    assert resumed.restore(seed=7, updates_per_epoch=10)
    assert (resumed.state.global_step, resumed.state.updates_in_epoch, resumed.state.best) == (2, 2, 0.5)
    assert torch.equal(torch.rand(3), after_save)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))
    assert other_opt.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]
    assert resumed.save() is None  # the checkpoint it came from holds this position

    short = T.Checkpointer(fake_run(tmp_path / "c", resume_from=path), modules={"model": other}, states={}, config={},
                           keep_last=3)
    short.restore(seed=7, updates_per_epoch=1)  # fewer updates per epoch now: the epoch counts as finished
    assert short.state.updates_in_epoch == 1

    fresh = T.Checkpointer(fake_run(tmp_path / "d"), modules={"model": other}, states={}, config={}, keep_last=3)
    assert not fresh.restore(seed=7, updates_per_epoch=10)
    drawn = torch.rand(3)
    torch.manual_seed(7 + 1)
    assert torch.equal(drawn, torch.rand(3)) and fresh.state.position() == (0, 0, 0)


def test_diverged_weights_are_never_saved(tmp_path):
    """Checkpointer.save refuses non-finite weights, and a non-finite loss seen on the device since the last
    check, naming the step and the last good checkpoint."""
    model = tiny_model()
    ckpt = T.Checkpointer(fake_run(tmp_path), modules={"model": model}, states={}, config={}, keep_last=3)
    ckpt.state.advance()
    good = ckpt.save()
    with torch.no_grad():
        model[0].weight[0, 0] = float("inf")
    ckpt.state.advance()
    with pytest.raises(T.TrainingDiverged, match=rf"weights hold NaN or inf at step 2.*Last good checkpoint: {good}"):
        ckpt.save()
    ckpt.watch(torch.tensor(float("nan")), 3)
    with pytest.raises(T.TrainingDiverged, match="loss became NaN or inf at step 3"):
        ckpt.check()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000001"]


def test_a_failed_save_is_tried_again_and_stops_the_run_only_if_it_fails_again(tmp_path, monkeypatch, caplog):
    """A save that fails (permissions changed, disk full) loses nothing yet: one line in the log, the state stays in
    memory, and the next save point writes it; a second failure in a row, or one at the run's last save, raises
    WriteError (exit code 5). The permission change is made with make_unwritable (we run as root, which a chmod
    would not stop): creating the save's folder under checkpoints/ then fails as it does for a normal user."""
    ckpt = T.Checkpointer(fake_run(tmp_path), modules={"model": tiny_model()}, states={}, config={}, keep_last=0)
    ckpt.state.advance()
    first = ckpt.save()
    ckpt.state.advance()
    with monkeypatch.context() as m, caplog.at_level(logging.WARNING, "vit3.train"):
        make_unwritable(tmp_path / "checkpoints", m)
        assert ckpt.save() is None
    [line] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "saving step 2 failed: cannot write a checkpoint into" in line and "permission denied" in line
    assert "tried again at the next save point" in line and "\n" not in line
    ckpt.state.advance()
    assert ckpt.save().name == "step-00000003" and ckpt.failed_at is None  # the next save point writes the state

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(T.checkpoint, "_save_torch", full)
    ckpt.state.advance()
    assert ckpt.save() is None
    ckpt.state.advance()
    with pytest.raises(T.WriteError, match=r"the disk is full.*GiB are free.*Saving step 5 failed \(as at step 4\): "
                                           r"training stopped; the newest checkpoint is .*step-00000003: "
                                           "resume=latest") as e:
        ckpt.save()
    assert "\n" not in str(e.value)
    fresh = T.Checkpointer(fake_run(tmp_path / "b"), modules={"model": tiny_model()}, states={}, config={},
                           keep_last=0)
    fresh.state.advance()
    with pytest.raises(T.WriteError, match="Saving step 1 failed: training stopped; the newest checkpoint is none"):
        fresh.save(last=True)  # the run's end: no later point to try again
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [first.name, "step-00000003"]
