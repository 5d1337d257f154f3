"""SIGTERM / SIGUSR1 (a cluster's preemption or time limit) and Ctrl-C turned into "save and stop"."""
from __future__ import annotations

import signal
import threading

import torch


class StopSignal:
    """Context manager: SIGTERM / SIGUSR1 / SIGINT (Ctrl-C) set a flag that the training loop polls to save
    and stop; a second Ctrl-C stops at once (KeyboardInterrupt), without a checkpoint.

    With several processes the flag is agreed on with an all-reduce (`should_stop`), so every rank
    stops at the same update even if only one got the signal. `fired` says a signal stopped the run.
    """

    SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None), signal.SIGINT)
                    if s)

    def __init__(self):
        self.received: int | None = None
        self.fired = False
        self._previous = {}

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous = {}

    def should_stop(self, accelerator) -> bool:
        local = self.received is not None
        if accelerator.num_processes == 1:
            return local
        flag = torch.tensor([1.0 if local else 0.0], device=accelerator.device)
        return bool(accelerator.reduce(flag, "sum").item() > 0)

    def reason(self, accelerator, step: int, check_every: int) -> str | None:
        """The signal's name if the run must stop after update `step`, else None. With several
        processes the all-reduce runs every `check_every` updates only."""
        if accelerator.num_processes > 1 and step % check_every:
            return None
        if not self.should_stop(accelerator):
            return None
        self.fired = True
        return signal.Signals(self.received).name if self.received else "a signal on another process"


def ignore_stop_signals(worker_id: int = 0):
    """DataLoader worker_init_fn: workers ignore SIGTERM / SIGUSR1 / SIGINT (a cluster's scancel and a
    terminal's Ctrl-C signal every process), so the main process can finish its checkpoint before
    shutting them down. A failing main process kills them (`run_script`), which they cannot ignore."""
    for s in StopSignal.SIGNALS:
        signal.signal(s, signal.SIG_IGN)
