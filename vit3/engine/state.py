"""The training state and the Checkpointer that owns it: restored on resume (or seeded for a fresh run),
saved once per position, never saved diverged, and a failed save costs at most one more save interval.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from ..errors import TrainingDiverged, WriteError
from .checkpoint import load_checkpoint, save_checkpoint, seed_process

if TYPE_CHECKING:
    from .run import Run

logger = logging.getLogger("vit3.train")


@dataclasses.dataclass
class TrainState:
    """Where training stands: written into each checkpoint's trainer_state.json and read back on resume. A
    trainer that keeps more (the best accuracy so far) extends it with fields of its own."""

    global_step: int = 0  # optimizer updates done
    epoch: int = 0  # epochs done
    updates_in_epoch: int = 0  # updates done of the current epoch
    skipped_images: int = 0  # unreadable images replaced so far (data.bad_images=skip)

    def position(self) -> tuple[int, int, int]:
        """Two saves at one position hold the same state: the second is skipped. One step can have two
        positions (the update that ends an epoch, before and after the epoch is counted as done)."""
        return self.global_step, self.epoch, self.updates_in_epoch

    def advance(self) -> int:
        """Count one optimizer update; the new step."""
        self.global_step += 1
        self.updates_in_epoch += 1
        return self.global_step

    def end_epoch(self, skipped_images: int = 0):
        self.epoch, self.updates_in_epoch = self.epoch + 1, 0
        self.skipped_images += skipped_images


class Checkpointer:
    """Owns the training state (`state`, a TrainState): restores it with everything else on resume, or seeds a
    fresh run; saves it, skipping a second save of the same position, trying a failed save again at the next save
    point; refuses to save diverged weights.

    Non-finite losses are recorded on the device (`watch`, no host sync) and checked at each log
    and each save (`check`), on every process at once.
    """

    def __init__(self, run: Run, *, modules: dict[str, nn.Module], states: dict[str, Any], config: dict,
                 keep_last: int, state: TrainState | None = None):
        self.accelerator, self.root, self.resume_from = run.accelerator, Path(run.dir) / "checkpoints", run.resume_from
        self.modules, self.states, self.config, self.keep_last = modules, states, config, keep_last
        self.state = TrainState() if state is None else state
        self.last_good = run.resume_from
        self.saved_at = None  # the state's position at the last save (or at the restore)
        self.failed_at = None  # the step whose save failed, until a save succeeds
        self.first_bad = torch.full((), -1, dtype=torch.long, device=self.accelerator.device)

    def restore(self, seed: int, updates_per_epoch: int) -> bool:
        """Resume run.resume_from (weights, optimizer, schedule, RNG, state) and return True; or, for a fresh run,
        seed each process apart (noise, dropout, augmentation differ per process) and return False."""
        acc = self.accelerator
        if self.resume_from is None:
            seed_process(seed + 1 + acc.process_index)
            return False
        old = load_checkpoint(acc, self.resume_from, modules=self.modules, states=self.states, restore_rng=True)
        st = self.state
        for f in dataclasses.fields(st):
            setattr(st, f.name, old.get(f.name, getattr(st, f.name)))
        if st.updates_in_epoch > updates_per_epoch:  # written with other data (fewer images)
            logger.warning(f"checkpoint is {st.updates_in_epoch} updates into an epoch of {updates_per_epoch}: the "
                           "epoch is taken as finished")
            st.updates_in_epoch = updates_per_epoch
        self.saved_at = st.position()
        logger.info(f"resumed from {self.resume_from}: step {st.global_step} (epoch {st.epoch}, update "
                    f"{st.updates_in_epoch} of it)")
        return True

    def watch(self, loss: torch.Tensor, step: int):
        """Remember `step` if `loss` is not finite (the first such step)."""
        self.first_bad = torch.where((self.first_bad < 0) & ~torch.isfinite(loss.detach()), step, self.first_bad)

    def check(self):
        """TrainingDiverged on every process if any process saw a non-finite loss."""
        acc = self.accelerator
        bad = acc.gather(self.first_bad.reshape(1)) if acc.num_processes > 1 else self.first_bad.reshape(1)
        bad = [s for s in bad.tolist() if s >= 0]
        if bad:
            raise TrainingDiverged(f"the loss became NaN or inf at step {min(bad)}; training stopped. {self._advice()}")

    def _advice(self) -> str:
        return (f"Last good checkpoint: {self.last_good or 'none (no checkpoint was written before)'}. Resume from it "
                "(resume=<that folder>) with a lower optim.lr, optim.clip_grad > 0, or mixed_precision=bf16 "
                "instead of fp16")

    def save(self, last: bool = False) -> Path | None:
        """checkpoints/step-N of the state as it is; None if this position is saved already, or if the write failed
        and is put off to the next save point.

        A failed write (WriteError: disk full, quota, permissions changed since the start) has lost nothing yet: the
        state is still in memory. So it is logged in one line and training goes on; the next call tries again. A
        second failure in a row, or a failure of the `last` save (the run's end or a stop signal: no later point),
        raises WriteError: going on puts at most one more save interval at risk. save_checkpoint raises on every
        process alike, so all processes take the same decision.
        """
        step = self.state.global_step
        if self.saved_at == self.state.position():
            return None
        self.check()  # never write diverged weights
        finite = torch.stack([torch.isfinite(p).all() for m in self.modules.values() for p in m.parameters()]).all()
        if not bool(finite):
            raise TrainingDiverged(f"the weights hold NaN or inf at step {step}; not saved. {self._advice()}")
        try:
            path = save_checkpoint(self.accelerator, self.root, step, modules=self.modules, states=self.states,
                                   trainer_state=dataclasses.asdict(self.state), config=self.config,
                                   keep_last=self.keep_last)
        except WriteError as e:
            if last or self.failed_at is not None:
                also = f" (as at step {self.failed_at})" if self.failed_at is not None else ""
                raise WriteError(e.errno, f"{e.strerror}. Saving step {step} failed{also}: training stopped; the "
                                          f"newest checkpoint is {self.last_good or 'none'}: resume=latest once the "
                                          "folder can be written") from None
            self.failed_at = step
            logger.warning(f"saving step {step} failed: {e.strerror}. Training goes on from the state in memory and "
                           "the save is tried again at the next save point; if that fails too, the run stops "
                           "(exit code 5)")
            return None
        again = f" (the save of step {self.failed_at} had failed)" if self.failed_at is not None else ""
        self.saved_at, self.last_good, self.failed_at = self.state.position(), path, None
        logger.info(f"saved checkpoint {path}{again}")
        return path
