"""Checkpoints: the whole training state, written atomically, loaded with weights_only.

A checkpoint is the folder `checkpoints/step-N`:

    model.safetensors, ema.safetensors    weights (a timm classifier), or
    model/, ema/                          diffusers `save_pretrained` folders (config.json +
                                          safetensors; DiT³, loadable with `from_pretrained`)
    optimizer.pt, scheduler.pt, scaler.pt state dicts (tensors and plain types only)
    rng-<rank>.pt                         every RNG of each process
    trainer_state.json, config.yaml       step, epoch, data position; the resolved config
    manifest.json                         every file's size: damage is detected, not guessed

It is written as `.tmp-step-N`, fsynced and renamed, so a crash never leaves a partial folder that
looks complete; the newest `keep_last` are kept. A step saved twice (an update that ends an epoch)
moves the first copy aside as `.trash-step-N` for the instant of the swap; a crash in that instant
leaves it there, and `find_latest_checkpoint` puts it back. So at every instant one complete
checkpoint of each saved step's line exists. A checkpoint that fails its manifest (a disk fault, a
copy cut short) is skipped with a warning when the newest is looked for.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import yaml

from ..errors import ConfigError, WriteError, load_error_text
from .files import follow_umask, is_permission_error, remove_path

logger = logging.getLogger("vit3.train")
CKPT_RE = re.compile(r"^step-(\d+)$")


# ----------------------------------------------------------------------------------------
# RNG state of one process
# ----------------------------------------------------------------------------------------
def seed_process(seed: int):
    """Seed python, numpy, torch (CPU and CUDA) for this process."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng_state() -> dict:
    """Every global RNG of this process, as tensors / plain types (loadable with weights_only)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict):
    random.setstate(_to_tuple(state["python"]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_tuple(x):
    return tuple(_to_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


# ----------------------------------------------------------------------------------------
# Durable writes
# ----------------------------------------------------------------------------------------
def _fsync_dir(path: Path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(path: Path):
    for p in sorted(Path(path).rglob("*")):
        if p.is_file():
            with open(p, "rb+") as f:
                os.fsync(f.fileno())
        else:
            _fsync_dir(p)
    _fsync_dir(path)


def _is_pretrained(module: nn.Module) -> bool:
    """A diffusers model: saved with save_pretrained, as a folder."""
    from diffusers import ModelMixin

    return isinstance(module, ModelMixin)


def pretrained_weights_file(folder: Path) -> Path:
    """The safetensors file diffusers' save_pretrained writes into a model folder."""
    from diffusers.utils import SAFETENSORS_WEIGHTS_NAME

    return Path(folder) / SAFETENSORS_WEIGHTS_NAME


# ----------------------------------------------------------------------------------------
# Save
# ----------------------------------------------------------------------------------------
def _write_error(e: OSError, tmp: Path, root: Path) -> WriteError:
    """Remove the partial folder; the error names the folder, the space it took and the space left."""
    written = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file()) if tmp.exists() else 0
    shutil.rmtree(tmp, ignore_errors=True)
    if is_permission_error(e):  # not a matter of space
        return WriteError(e.errno, f"cannot write a checkpoint into {root}: permission denied ({e.strerror or e}). "
                                   f"The previous checkpoints are intact: make {root} writable for this user (or "
                                   "choose another output_dir)")
    free = shutil.disk_usage(root).free if root.exists() else 0
    previous = [p for p in sorted(root.glob("step-*")) if p.is_dir()]
    need = max((sum(f.stat().st_size for f in previous[-1].rglob("*") if f.is_file()) if previous else 0), written)
    what = "the disk is full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else f"{e.strerror or e}"
    return WriteError(
        e.errno, f"cannot write a checkpoint into {root}: {what}. A checkpoint needs about {need / 2**30:.2f} GiB "
        f"({written / 2**30:.2f} GiB were written before the failure, then removed); {free / 2**30:.2f} GiB are free. "
        f"The previous checkpoints are intact: free space (or lower checkpoint.keep_last)")


def _as_write_error(e: Exception, folder: Path, weights_bytes: int) -> OSError | None:
    """The OSError behind a failed write, or None for any other failure (a bug: its traceback is kept).

    An OSError carries its errno (ENOSPC: disk full, EDQUOT: quota); the torch files are written through Python
    file objects so that theirs does. safetensors reports a failed write as its own error type, without an
    errno: that failure counts as a full disk when the disk has less space left than the weights need."""
    if isinstance(e, OSError):
        return e
    if shutil.disk_usage(folder).free < weights_bytes:
        return OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} ({type(e).__name__})")
    return None


def _weights_bytes(modules: dict[str, nn.Module]) -> int:
    return sum(t.nbytes for m in modules.values() for t in m.state_dict().values())


def _save_torch(obj, path: Path):
    """torch.save through a Python file: a failed write raises OSError with its errno, where torch's own file
    writer raises a RuntimeError ("unexpected pos") that does not say why."""
    with open(path, "wb") as f:
        torch.save(obj, f)


def _write_files(tmp: Path, accelerator, modules, states, trainer_state: dict, config: dict, step: int):
    from safetensors.torch import save_model

    _save_torch(capture_rng_state(), tmp / f"rng-{accelerator.process_index}.pt")
    if not accelerator.is_main_process:
        return
    for name, module in modules.items():
        if _is_pretrained(module):
            module.save_pretrained(tmp / name, safe_serialization=True)
        else:
            save_model(module, str(tmp / f"{name}.safetensors"), metadata={"format": "pt"})
    for name, obj in states.items():
        if obj is not None:
            _save_torch(obj.state_dict(), tmp / f"{name}.pt")
    (tmp / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    state = {**trainer_state, "step": step, "world_size": accelerator.num_processes, "config": config}
    (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))


def _write_manifest(folder: Path):
    """manifest.json: the size of every other file (rng files of all processes included)."""
    sizes = {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))
             if p.is_file() and p.name != "manifest.json"}
    (folder / "manifest.json").write_text(json.dumps({"sizes": sizes}, indent=1))


def _failed_anywhere(accelerator, failed: OSError | None) -> OSError | None:
    """This process's failure, or one standing for another process's: every process leaves a step of the save
    together, failed or not, so none waits in a collective for one that has gone."""
    if accelerator.num_processes > 1:
        flag = torch.tensor([1.0 if failed else 0.0], device=accelerator.device)
        if accelerator.reduce(flag, "sum").item() > 0 and failed is None:
            failed = OSError(errno.EIO, "another process failed to write its part")
    return failed


def _raise_write_error(accelerator, failed: OSError, tmp: Path, root: Path):
    accelerator.wait_for_everyone()
    raise _write_error(failed, tmp, root) if accelerator.is_main_process else WriteError(
        failed.errno, f"cannot write a checkpoint into {root}: {failed}")


def _finish_save(tmp: Path, final: Path, ckpt_root: Path, step: int, keep_last: int):
    """Main process: the manifest, then `tmp` becomes `final` (see the module docstring) and older ones go."""
    _write_manifest(tmp)
    follow_umask(tmp)  # safetensors writes 0600: a teammate could not sample the checkpoint
    _fsync_tree(tmp)
    trash = ckpt_root / f".trash-step-{step:08d}"
    if final.exists():  # same step saved twice (step and epoch-end): the later one wins
        remove_path(trash)
        os.replace(final, trash)
    os.replace(tmp, final)
    _fsync_dir(ckpt_root)
    shutil.rmtree(trash, ignore_errors=True)
    prune_checkpoints(ckpt_root, keep_last, step)


def save_checkpoint(accelerator, ckpt_root: Path, step: int, *, modules: dict[str, nn.Module],
                    states: dict[str, Any], trainer_state: dict, config: dict, keep_last: int = 3) -> Path:
    """Write checkpoints/step-N atomically (see the module docstring); every process must call it.
    A write error (disk full, permissions, ...) of any process removes the partial folder and raises WriteError
    on every process."""
    ckpt_root = Path(ckpt_root)
    final = ckpt_root / f"step-{step:08d}"
    tmp = ckpt_root / f".tmp-step-{step:08d}"
    failed = None
    if accelerator.is_main_process:
        try:
            remove_path(tmp)  # a link planted at this name goes, so mkdir makes a folder inside the run
            tmp.mkdir(parents=True)
        except OSError as e:
            failed = e
    accelerator.wait_for_everyone()

    if failed is None:
        try:
            _write_files(tmp, accelerator, modules, states, trainer_state, config, step)
        except Exception as e:
            failed = _as_write_error(e, tmp, _weights_bytes(modules))
            if failed is None:
                raise
    if (failed := _failed_anywhere(accelerator, failed)) is not None:
        _raise_write_error(accelerator, failed, tmp, ckpt_root)
    if accelerator.is_main_process:
        try:
            _finish_save(tmp, final, ckpt_root, step, keep_last)
        except OSError as e:
            failed = e
    if (failed := _failed_anywhere(accelerator, failed)) is not None:
        _raise_write_error(accelerator, failed, tmp, ckpt_root)
    accelerator.wait_for_everyone()
    return final


def prune_checkpoints(ckpt_root: Path, keep_last: int, newest: int):
    """Keep the `keep_last` newest checkpoints up to step `newest` (0: keep all). Folders of later steps are
    not this line's (damaged ones a resume skipped): they are left alone."""
    ckpts = sorted((s, p) for p in Path(ckpt_root).iterdir()
                   if (m := CKPT_RE.match(p.name)) and (s := int(m.group(1))) <= newest)
    if keep_last > 0:
        for _, p in ckpts[:-keep_last]:
            shutil.rmtree(p, ignore_errors=True)
    for p in Path(ckpt_root).glob(".tmp-step-*"):  # left over by a crash during a save
        shutil.rmtree(p, ignore_errors=True)




# ----------------------------------------------------------------------------------------
# Find, check, load
# ----------------------------------------------------------------------------------------
def verify_checkpoint(ckpt: Path) -> str | None:
    """Why `ckpt` cannot be used (a missing, unreadable or truncated file), or None if it is whole."""
    ckpt = Path(ckpt)
    try:
        state = read_trainer_state(ckpt)
    except FileNotFoundError:
        return "no trainer_state.json"
    except (OSError, ValueError) as e:
        return f"trainer_state.json is unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    if not isinstance(state, dict) or "step" not in state:
        return "trainer_state.json holds no step"
    manifest = ckpt / "manifest.json"
    if not manifest.is_file():
        return "no manifest.json"
    try:
        sizes = json.loads(manifest.read_text())["sizes"]
    except (OSError, ValueError, KeyError) as e:
        return f"manifest.json is unreadable ({type(e).__name__})"
    for name, size in sizes.items():
        f = ckpt / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size} bytes, the manifest says {size}"
        if not os.access(f, os.R_OK):
            return f"{name} cannot be read (permissions)"
    return None


def _recover(root: Path):
    """Put back a `.trash-step-N` whose replacement never arrived (a crash between the two renames)."""
    for trash in root.glob(".trash-step-*"):
        final = root / trash.name.removeprefix(".trash-")
        if not final.exists():
            try:
                os.replace(trash, final)
            except OSError:  # another process got there first
                pass


def find_latest_checkpoint(ckpt_root: str | os.PathLike, warn: bool = True) -> Path | None:
    """Newest usable checkpoint (`step-N` folder that passes `verify_checkpoint`) under ckpt_root; the
    damaged ones on the way are skipped, each with a warning naming it and the reason."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return None
    _recover(root)
    found = sorted(((int(m.group(1)), p) for p in root.iterdir() if (m := CKPT_RE.match(p.name)) and p.is_dir()),
                   reverse=True)
    for _, p in found:
        reason = verify_checkpoint(p)
        if reason is None:
            return p
        if warn:
            warnings.warn(f"skipping checkpoint {p}: {reason}", stacklevel=2)
    return None


def read_trainer_state(ckpt: Path) -> dict:
    with open(Path(ckpt) / "trainer_state.json") as f:
        return json.load(f)


def check_same_model(ckpt_state: dict, model_config: dict, keys: tuple[str, ...], ckpt: Path | str = "",
                     section: str = "model"):
    """ConfigError if the checkpoint was written for another model than `model_config` describes in the `keys`
    that fix its architecture (each trainer names its own).
    num_classes 0 (= as in the data) takes the checkpoint's, so only explicit differences count."""
    old = (ckpt_state.get("config") or {}).get(section, {})
    now = dict(model_config)
    if now.get("num_classes") == 0:
        now["num_classes"] = old.get("num_classes")
    diffs = [k for k in keys if old.get(k) != now.get(k)]
    if diffs:
        detail = "; ".join(f"{section}.{k}: checkpoint {old.get(k)!r} vs this run {now.get(k)!r}" for k in diffs)
        raise ConfigError(
            f"checkpoint {ckpt} is of another model ({detail}). Resume it with the config it was "
            f"trained with (its config.yaml), or start a new run without resume")


def module_weights_file(ckpt: Path, name: str) -> Path | None:
    """The weights of module `name` in a checkpoint: its save_pretrained folder (a diffusers model: DiT³) or
    `name.safetensors` (a timm classifier)."""
    for path in (pretrained_weights_file(Path(ckpt) / name), Path(ckpt) / f"{name}.safetensors"):
        if path.is_file():
            return path
    return None


def load_checkpoint(accelerator, ckpt: Path, *, modules: dict[str, nn.Module], states: dict[str, Any],
                    restore_rng: bool = True, optional: tuple[str, ...] = ("scaler",)) -> dict:
    """Load what save_checkpoint wrote into `modules` and `states`; returns trainer_state.

    Weights load strictly into the live modules (the optimizer holds their parameters); other files
    with weights_only=True; the `optional` states may be missing (they then start fresh). Each
    process restores its own RNG (rng-<rank>.pt); if the world size changed, rank r takes
    rng-(r mod old size) and the run continues, but not bit-for-bit.
    """
    from safetensors.torch import load_model

    ckpt = Path(ckpt)
    trainer_state = read_trainer_state(ckpt)
    for name, module in modules.items():
        path = module_weights_file(ckpt, name)
        if path is None:
            raise ConfigError(f"checkpoint {ckpt} has no weights for {name} ({name}/ or {name}.safetensors)")
        try:
            load_model(module, str(path), strict=True, device=str(next(module.parameters()).device))
        except RuntimeError as e:
            raise ConfigError(f"checkpoint {ckpt} does not fit this model ({name}): {e}") from None
        except Exception as e:  # a damaged safetensors file
            raise ConfigError(f"cannot read {path} ({type(e).__name__}: {e}): the checkpoint is damaged; resume "
                              "an older one") from None
    for name, obj in states.items():
        path = ckpt / f"{name}.pt"
        if obj is None:
            continue
        if not path.is_file():
            if name in optional:  # e.g. a bf16 checkpoint resumed in fp16: a fresh grad scaler
                logger.warning(f"checkpoint {ckpt} has no {path.name}; {name} starts fresh")
                continue
            raise ConfigError(f"checkpoint {ckpt} has no {path.name}")
        obj.load_state_dict(_read_state(path))
    if restore_rng:
        old_world = trainer_state.get("world_size", 1)
        rank = accelerator.process_index % old_world
        if old_world != accelerator.num_processes:
            logger.warning(f"checkpoint was written by {old_world} processes, resuming with "
                           f"{accelerator.num_processes}: training continues but not bit-for-bit")
        restore_rng_state(_read_state(ckpt / f"rng-{rank}.pt"))
    return trainer_state


def _read_state(path: Path):
    """A state file of a checkpoint, weights_only; ConfigError naming it if it cannot be read."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged file: zip, pickle or EOF errors
        raise ConfigError(f"cannot read {path} ({load_error_text(e)}): the checkpoint is damaged; resume "
                          "an older one") from None

