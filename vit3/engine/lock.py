"""One writer per folder: a run folder or a sample.py output folder is locked while a process writes it."""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import warnings
from pathlib import Path

from ..errors import ConfigError
from .files import link_error

LOCK = ".lock"
HEARTBEAT_S, STALE_S = 30, 300  # a holder touches its lock every 30 s; one untouched for 5 minutes is stale
_heartbeats: dict[Path, threading.Event] = {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _stale(holder: dict, path: Path, host: str) -> bool:
    """A lock whose process is gone: dead on this host, or (any host) not touched for STALE_S seconds, as
    after a node failure; a requeued job then takes its run folder back."""
    if holder.get("host") == host and isinstance(holder.get("pid"), int) and not _alive(holder["pid"]):
        return True
    try:
        return time.time() - path.stat().st_mtime > STALE_S
    except FileNotFoundError:
        return True


def _beat(path: Path, stop: threading.Event):
    while not stop.wait(HEARTBEAT_S):
        try:
            os.utime(path)
        except OSError:
            return


def acquire_lock(folder: Path, what: str) -> Path:
    """folder/.lock, holding this process's host and pid, created atomically (O_EXCL) and touched every
    HEARTBEAT_S seconds while held. A stale lock (its process gone, see `_stale`) is taken over with a
    warning; a live one stops this process with an error naming the holder, a link there with one naming the
    link. Taking it again is a no-op."""
    path = Path(folder) / LOCK
    me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if path.is_symlink():  # O_EXCL did not follow it, reading it would: what it points to is no lock
                raise link_error(path, "a lock") from None
            try:
                holder = json.loads(path.read_text())
            except (OSError, ValueError):  # being written this instant, or damaged
                time.sleep(0.2)
                holder = {}
            if (holder.get("host"), holder.get("pid")) == (me["host"], me["pid"]):  # this process already
                return path
            if holder and _stale(holder, path, me["host"]):
                warnings.warn(f"{path}: taking over the lock of process {holder.get('pid')} on {holder.get('host')}, "
                              "which is gone (it crashed or was killed)", stacklevel=2)
                path.unlink(missing_ok=True)
                continue
            if not holder:
                continue
            raise ConfigError(f"the {what} {folder} is in use by process {holder.get('pid')} on "
                              f"{holder.get('host')} (since {holder.get('since')}): two processes writing it would mix "
                              f"their outputs. Wait for it to end, choose another folder, or delete {path} if that "
                              "process is gone")
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        _heartbeats[path] = threading.Event()
        threading.Thread(target=_beat, args=(path, _heartbeats[path]), daemon=True).start()
        return path
    raise ConfigError(f"cannot take the lock {path}: it keeps changing; is another process starting on {folder}?")


def release_lock(path: Path):
    """Remove a lock this process holds."""
    if Path(path) in _heartbeats:
        _heartbeats.pop(Path(path)).set()
    try:
        if json.loads(Path(path).read_text()).get("pid") == os.getpid():
            Path(path).unlink()
    except (OSError, ValueError):
        pass
