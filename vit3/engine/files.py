"""Writes that stay inside their folder and never leave a partial file under a final name.

A run folder or a sample folder may hold a symbolic link, planted there or brought along by a copy. No
write here goes through one: a file is written under a fresh, unpredictable name that `tempfile` creates
with O_EXCL beside its final name, then renamed over it (a rename replaces a link, it does not write to
its target); logs are appended with O_NOFOLLOW, and a link there is refused in one line. Files get the
mode the umask gives, as `open` and `torch.save` do: tempfile and safetensors make 0600, which keeps a
teammate on a shared cluster from sampling a checkpoint.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import ConfigError, WriteError


def _read_umask() -> int:
    mask = os.umask(0)  # the only portable way to read it: set it back at once
    os.umask(mask)
    return mask


# read once, at import: setting the umask to 0 for an instant later could race a thread creating files
UMASK = _read_umask()
PERMISSION_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS)


def follow_umask(path: str | os.PathLike):
    """Give a file, or a folder and everything under it, the mode a plain open / mkdir would (links skipped)."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        for root, dirs, files in os.walk(path):
            for name, mode in [(d, 0o777) for d in dirs] + [(f, 0o666) for f in files]:
                if not os.path.islink(os.path.join(root, name)):
                    os.chmod(os.path.join(root, name), mode & ~UMASK)
        os.chmod(path, 0o777 & ~UMASK)
    elif not path.is_symlink():
        os.chmod(path, 0o666 & ~UMASK)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "", fsync: bool = False):
    """`with atomic_path(final) as tmp:` write the file `tmp`; when the block ends it becomes `final` in one
    rename, with the umask's mode; if the block fails it is removed and `final` is as it was. `suffix` ends
    the temporary name, for writers that pick the format from it (".png")."""
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~UMASK)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str):
    """`path` holds `text` or what it held before, never a part (written, fsynced, renamed)."""
    with atomic_path(path, fsync=True) as tmp:
        tmp.write_text(text)


def temp_dir(final: str | os.PathLike) -> Path:
    """A new empty folder beside `final` (unpredictable name, the umask's mode), to fill and rename."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    os.chmod(tmp, 0o777 & ~UMASK)
    return tmp


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike):
    """`with atomic_dir(final) as tmp:` fill the folder `tmp`; when the block ends it replaces `final` (a
    folder, file or link) with two renames, its files with the umask's mode; if the block fails it is removed."""
    final = Path(final)
    tmp = temp_dir(final)
    try:
        yield tmp
        follow_umask(tmp)
        old = None
        if final.is_dir() and not final.is_symlink():
            old = temp_dir(final)  # an empty folder: rename replaces it
            os.replace(final, old)
        elif os.path.lexists(final):
            final.unlink()
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_path(path: str | os.PathLike):
    """Remove a folder, a file or a link (the link itself, never what it points to); nothing if absent."""
    path = Path(path)
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.is_dir():
        shutil.rmtree(path, ignore_errors=True)


def link_error(path: str | os.PathLike, what: str = "a run") -> ConfigError:
    target = os.readlink(path) if os.path.islink(path) else "?"
    return ConfigError(f"{path} is a symbolic link (to {target}): {what} writes only inside its folder and does not "
                       "follow links there; remove the link, or choose another folder")


def refuse_link(path: str | os.PathLike, what: str = "a run"):
    """ConfigError naming `path` if it is a symbolic link (read or appended to, it would reach another file)."""
    if os.path.islink(path):
        raise link_error(path, what)


def open_append(path: str | os.PathLike, what: str = "a run"):
    """A text file opened for appending, created if missing; a link at `path` is refused, not followed."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise link_error(path, what) from None
        raise
    return os.fdopen(fd, "a", encoding="utf-8")


def is_permission_error(e: OSError) -> bool:
    return e.errno in PERMISSION_ERRNOS


def check_writable(folders: dict):
    """WriteError, in one line, naming the first folder of `folders` ({folder: the setting that chooses it}) this
    process cannot write: each must take a new file, or, if it does not exist yet, its nearest existing parent
    must (where it will be made).

    The probe really writes (a fresh temporary file, removed at once): os.access answers yes to root for any
    folder, and no mode bit shows a read-only mount, an ACL or a full inode table."""
    for folder, setting in folders.items():
        folder = there = Path(folder)
        while not os.path.lexists(there) and there != there.parent:
            there = there.parent
        if not there.is_dir():
            raise WriteError(errno.ENOTDIR, f"cannot write {folder}: {there} is not a folder; remove it or choose "
                                            f"another {setting}")
        try:
            fd, name = tempfile.mkstemp(prefix=".write-check.", dir=there)
            os.close(fd)
            os.unlink(name)
        except OSError as e:
            made_in = "" if there == folder else f" (it will be made in {there})"
            raise WriteError(e.errno, f"cannot write {folder}{made_in}: {e.strerror or e}; make {there} writable "
                                      f"for this user or choose another {setting}") from None
