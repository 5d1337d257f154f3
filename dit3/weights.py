"""Loading DiT³ weights: one loader for every file a DiT³ comes in.

    checkpoints/step-N/ema/, model/   train_dit.py checkpoints: diffusers folders (config.json +
                                      safetensors), read with `DiT3.from_pretrained`
    DiTTT-B-2.pt, DiT-XL-2-256x256.pt the official DiT³ / DiT release files (`load_official_checkpoint`)

`load_dit3` builds the model from any of them; `load_dit3_weights` loads into a model already built
(a run's `weights=`). Every file is read with weights_only; a file that is not a checkpoint gets an
error naming it.
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from os import PathLike
from pathlib import Path

import torch

from vit3.errors import ConfigError, load_error_text

from .models import DiT3, DiT3_models


def _read_official(path: Path) -> Mapping:
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle / zip errors of a damaged or foreign file
        raise ConfigError(f"cannot read {path} ({load_error_text(e)}): the file is damaged or not a checkpoint "
                          "(expected a train_dit.py checkpoint folder or an official DiT³ / DiT .pt)") from None


def load_official_checkpoint(model: DiT3, checkpoint: str | PathLike | Mapping, *, ema: bool) -> DiT3:
    """Load official DiT³ (or DiT) weights into `model`, strictly; returns the model.

    checkpoint: a file as the official train.py saves it ({'model', 'ema', 'opt', 'args'}; `ema`, required
    as in `vit3.load_official_checkpoint`, picks 'ema' or 'model'), or such a dict, or a bare state dict
    (DiT's released files are bare EMA weights, loaded whatever `ema` says).
    Files load with weights_only=True, the argparse.Namespace under 'args' allow-listed for it.
    A `pos_embed` stored for another latent size is replaced by the model's own (it is a fixed table).
    """
    if not isinstance(checkpoint, Mapping):
        checkpoint = _read_official(Path(checkpoint))
    if "model" in checkpoint or "ema" in checkpoint:  # train.py's dict
        key = "ema" if ema else "model"
        if key not in checkpoint:
            raise KeyError(f"the checkpoint has no {key!r} entry (keys: {sorted(checkpoint)})")
        checkpoint = checkpoint[key]
    state_dict = dict(checkpoint)
    if "pos_embed" in state_dict and state_dict["pos_embed"].shape != model.pos_embed.shape:
        state_dict["pos_embed"] = model.pos_embed
    model.load_state_dict(state_dict, strict=True)
    return model


def _weights_error(path: Path, e: Exception) -> ConfigError:
    return ConfigError(f"cannot read the weights {path} ({load_error_text(e)}). The file is damaged; use "
                       "another checkpoint")


def load_dit3(path: str | PathLike, *, ema: bool = True, model_name: str | None = None,
              image_size: int | None = None, num_classes: int | None = None, in_channels: int = 4,
              downsample: int = 8) -> tuple[DiT3, dict]:
    """(model on the CPU, its training config) from a train_dit.py checkpoint folder or an official file.

    ema: the EMA weights (else the trained ones). For official files the config is {"vae": ...} and the
    model comes from their `args` (model, image size, classes); DiT's bare EMA weights say nothing, so
    model_name and image_size are needed; in_channels and downsample are the VAE's (SD's: 4, 8).
    """
    from safetensors import SafetensorError

    path = Path(path).expanduser()
    if path.is_file():
        ckpt = _read_official(path)
        args = ckpt.get("args") if isinstance(ckpt, Mapping) else None
        name = (model_name or getattr(args, "model", None) or "").replace("DiTTT-", "DiT3-")
        image_size = image_size or getattr(args, "image_size", None)
        if name not in DiT3_models or not image_size:
            raise ConfigError(f"{path} does not say its model and image size (found model {name or None!r}, image "
                              f"size {image_size}): pass --model (e.g. DiT3-B/2) and --image-size (e.g. 256) to "
                              "sample.py, model_name and image_size to load_dit3")
        model = DiT3_models[name](input_size=image_size // downsample, in_channels=in_channels,
                                  num_classes=num_classes or getattr(args, "num_classes", 1000))
        try:
            load_official_checkpoint(model, ckpt, ema=ema)
        except (RuntimeError, KeyError) as e:
            raise ConfigError(f"{path} does not fit {name} at {image_size}px: {e}") from None
        vae = f"stabilityai/sd-vae-ft-{getattr(args, 'vae', 'ema')}"
        return model, {"vae": {"name": vae, "scale": 0.18215}}

    state_file = path / "trainer_state.json"
    if not state_file.is_file():
        raise ConfigError(f"{path} is not a checkpoint (no trainer_state.json): pass a checkpoints/step-N folder "
                          "written by train_dit.py or an official .pt file")
    state = json.loads(state_file.read_text())
    name = "ema" if ema else "model"
    folder = path / name  # save_pretrained's folder
    if not (folder / "config.json").is_file():
        hint = " (trained without EMA: use the model weights)" if ema else ""
        raise ConfigError(f"checkpoint {path} has no {name} weights ({name}/config.json){hint}")
    try:
        model = DiT3.from_pretrained(folder, low_cpu_mem_usage=False)
    except (SafetensorError, OSError, EnvironmentError, RuntimeError) as e:
        raise _weights_error(folder, e) from None
    return model, state["config"]


def load_dit3_weights(model: DiT3, path: str | PathLike, *, ema: bool = False):
    """Weights into an existing `model`, strictly: from a checkpoint folder or official file (as
    `load_dit3` reads them) or a bare .safetensors file."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ConfigError(f"weights {path} do not exist")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state_dict = load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise _weights_error(path, e) from None
    elif path.is_file():
        try:
            load_official_checkpoint(model, path, ema=ema)
        except (RuntimeError, KeyError) as e:
            raise ConfigError(f"weights {path} do not fit model.name / model.kwargs of this run: {e}") from None
        return model
    else:
        state_dict = load_dit3(path, ema=ema)[0].state_dict()
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        raise ConfigError(f"weights {path} do not fit model.name / model.kwargs of this run: {e}") from None
    return model
