"""Loading classifier weights: one loader for every file a ViT³ / H-ViT³ comes in.

`load_weights` takes our train_vit.py checkpoints (model or EMA), a run's timm/ folder, a
.safetensors file, and the official release files, through timm's checkpoint loading
(`timm.models.load_checkpoint`, weights_only) with `checkpoint_filter_fn`; a file that is not a
checkpoint gets an error naming it. `load_official_checkpoint` maps an official file (or its
dict) onto our names, which are the official ones. `create_pretrained` downloads a release file
into the torch hub cache for `timm.create_model(name, pretrained=True)`, checked before it enters.
"""
from __future__ import annotations

import hashlib
import http.client
import os
import re
import uuid
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping
from os import PathLike
from pathlib import Path, PurePosixPath
from urllib.error import HTTPError
from urllib.parse import urlparse
from urllib.request import Request, urlopen

import torch
import torch.nn as nn
from timm.models import resolve_pretrained_cfg
from timm.models._builder import _resolve_pretrained_source  # timm's choice of weight source; not re-exported
from tqdm import tqdm

from .errors import ConfigError, load_error_text


class _ConfigAsDict:
    """Stands in for yacs' CfgNode, which the official trainer pickles into its checkpoints
    under 'config': with it the file loads with weights_only=True (no code runs) and without
    yacs installed, the config coming back as nested OrderedDicts."""

    def __new__(cls, *args):
        return OrderedDict()


def load_official_checkpoint(model: nn.Module, checkpoint: str | PathLike | Mapping, *, ema: bool) -> nn.Module:
    """Load official ViT³ / H-ViT³ weights into `model`, strictly; returns the model.

    checkpoint: a file as saved by the official trainers ({'model': state_dict, 'optimizer': ...,
    'config': ...}; H-ViT³'s main_ema.py adds the EMA weights as 'state_dict_ema'), or such a
    dict, or a bare state dict. Files load with weights_only=True. `ema=True` takes
    'state_dict_ema', `ema=False` 'model' (or the bare state dict); the keyword is required, as in
    `dit3.load_official_checkpoint`, since which weights a file gives differs between the releases.
    The stored RoPE tables (`*.rope.rotations`) are dropped: ours are computed for each input. The head
    must match (num_classes=1000): load first, then `reset_classifier` to fine-tune.
    """
    if not isinstance(checkpoint, Mapping):
        with official_file_globals():
            checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=True)
    key = "state_dict_ema" if ema else "model"
    if ema and key not in checkpoint:
        raise KeyError(f"ema=True but the checkpoint has no {key!r} entry (keys: {sorted(checkpoint)})")
    model.load_state_dict(checkpoint_filter_fn(checkpoint.get(key, checkpoint), model), strict=True)
    return model


def official_file_globals():
    """The context in which an official file loads with weights_only=True (its pickled yacs config)."""
    return torch.serialization.safe_globals([(_ConfigAsDict, "yacs.config.CfgNode")])


def checkpoint_filter_fn(state_dict: Mapping, model: nn.Module | None = None) -> dict:
    """Official weights as our state dict: the stored RoPE tables (`*.rope.rotations`) are dropped.

    timm's loader calls it (`pretrained_filter_fn`) after taking the weights out of the file, the EMA
    ones ('state_dict_ema') where there are any, as timm does.
    """
    return {k: v for k, v in state_dict.items() if not k.endswith("rope.rotations")}


def cached_file_name(url: str, model_tag: str) -> str:
    """The cache's name for the weights of `model_tag` ("vit3_small.official_in1k") at `url`.

    The release links (https://HOST/f/<id>/?dl=1) name no file, so the name is made from the tag and
    the link's id, "vit3_small.official_in1k-<id>.pth"; another url gives the first 12 hex digits of
    its sha256 instead of the id (and keeps its suffix, e.g. .safetensors). One name per url and tag.
    """
    path = urlparse(url).path
    release = re.fullmatch(r".*/f/(\w+)/?", path)
    key = release.group(1) if release else hashlib.sha256(url.encode()).hexdigest()[:12]
    return f"{model_tag}-{key}{PurePosixPath(path).suffix or '.pth'}"


# a transfer that sends nothing for this long is given up (and its partial file removed), not waited on forever
STALL_TIMEOUT_S = 60
# torch.hub's naming of release files, "resnet18-f37072fd.pth": the first hex digits of the file's sha256
_HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,64})\.\w+$")


def _read_weights_file(file: Path, suffix: str) -> Mapping:
    """A weights file's top level (a .safetensors file's names as keys, by `suffix`), read with weights_only."""
    from safetensors import safe_open

    if suffix == ".safetensors":
        with safe_open(str(file), "pt") as f:
            return dict.fromkeys(f.keys())
    with official_file_globals():
        return torch.load(file, map_location="cpu", weights_only=True)


def weights_file_problem(file: Path, suffix: str | None = None) -> str | None:
    """Why `file` cannot be read as weights (a .safetensors file by `suffix`, default its own, else a torch file
    holding a dict), or None when it can; the file is read whole."""
    try:
        data = _read_weights_file(file, suffix or file.suffix)
    except Exception as e:  # pickle, zip, EOF, decode or safetensors errors: whatever the bytes give
        return load_error_text(e)
    return None if isinstance(data, Mapping) else f"it holds a {type(data).__name__}, not a state dict"


def _offline_way(dst: Path) -> str:
    return f"download the file elsewhere and pass pretrained_cfg_overlay=dict(file=PATH) to timm.create_model, " \
           f"or copy it to {dst}"


def download_cached(url: str, file_name: str, cache_dir: str | PathLike | None = None) -> Path:
    """The file at `url`, downloaded once (with a progress bar) into the torch hub cache as `file_name`.

    The cache is timm's and torch.hub's, <torch.hub.get_dir()>/checkpoints ($TORCH_HOME/hub/checkpoints),
    or `cache_dir`; a file already there is returned without a request. A download enters the cache only
    whole (its Content-Length), matching the sha256 prefix its url's file name gives (torch.hub's
    "name-<hash>.pth") and readable as weights: an HTML page sent with status 200 (a login or an expired
    link) never does. Offline, on an HTTP error, a transfer that ends early or stalls for STALL_TIMEOUT_S,
    or a file that fails those checks, RuntimeError names the url, what came back and the way to load the
    file without a network.
    """
    folder = Path(cache_dir) if cache_dir else Path(torch.hub.get_dir()) / "checkpoints"
    dst = folder / file_name
    if dst.is_file():
        return dst
    folder.mkdir(parents=True, exist_ok=True)
    # written under a temporary name in the same folder and renamed once checked, so that a dropped
    # connection, a killed process or a wrong body never leaves a file under the final name. Not
    # torch.hub.download_url_to_file: it accepts a body shorter than its Content-Length (urllib ends such a
    # read as if the file were complete) and opens the url without a timeout, so a stalled server hangs it
    tmp = folder / f"{file_name}.{uuid.uuid4().hex}.partial"
    sha256 = hashlib.sha256()
    try:
        try:
            with (urlopen(Request(url, headers={"User-Agent": "vit3"}), timeout=STALL_TIMEOUT_S) as response,
                  open(tmp, "wb") as f):
                content_type = response.headers.get("Content-Type") or "no Content-Type"
                length = response.headers.get("Content-Length")
                size = int(length) if length else None
                with tqdm(total=size, unit="B", unit_scale=True, unit_divisor=1024, desc=file_name) as bar:
                    while chunk := response.read(1 << 20):
                        f.write(chunk)
                        sha256.update(chunk)
                        bar.update(len(chunk))
                if size is not None and f.tell() != size:
                    raise ConnectionError(f"the transfer ended after {f.tell()} of {size} bytes")
        except (OSError, http.client.HTTPException) as e:  # urllib's URLError and HTTPError, timeouts, resets
            reason = (f"HTTP {e.code} {e.reason}" if isinstance(e, HTTPError)
                      else getattr(e, "reason", None) or f"{type(e).__name__}: {e}")
            raise RuntimeError(f"cannot download {url} ({reason}). Without a network, {_offline_way(dst)}") from e
        _check_download(url, tmp, dst, content_type, sha256.hexdigest())
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return dst


def _check_download(url: str, tmp: Path, dst: Path, content_type: str, digest: str):
    """RuntimeError unless the body downloaded from `url` into `tmp` is the weights file meant for `dst`."""
    promised = _HASH_IN_NAME.search(PurePosixPath(urlparse(url).path).name)
    if promised and not digest.startswith(promised.group(1)):
        raise RuntimeError(f"{url} sent a file whose sha256 is {digest}, but its name gives {promised.group(1)}: the "
                           f"transfer was damaged or the link serves another file; nothing was cached. Try again, or "
                           f"{_offline_way(dst)}")
    problem = weights_file_problem(tmp, dst.suffix)
    if problem is not None:
        with open(tmp, "rb") as f:
            head = f.read(64)
        what = ("an HTML page" if "html" in content_type.lower() or head.lstrip()[:1] == b"<"
                else f"{tmp.stat().st_size} bytes of {content_type}")
        raise RuntimeError(f"{url} sent {what}, not a weights file ({problem}; it begins {head!r}); nothing was "
                           f"cached. The link may need a login or have moved: {_offline_way(dst)}")


def create_pretrained(build: Callable[[dict], nn.Module], variant: str, kwargs: dict) -> nn.Module:
    """build(kwargs), timm's build_model_with_cfg with pretrained weights, the `url` that timm would fetch
    downloaded (once, into the torch hub cache) and given as the cfg's `file` instead: timm's loader then
    reads it as any file= overlay, taking the EMA weights where there are any and adapting head and
    in_chans. timm's own url loading names the cached file after the url's path, which the release links
    (.../f/<id>/?dl=1) lack, and takes a checkpoint dict for the weights themselves.

    A cached file that cannot be read (damaged or cut since it was downloaded) is named in a warning,
    deleted and downloaded again, once; if the new one cannot be read either, RuntimeError says to delete it.
    """
    cfg = resolve_pretrained_cfg(variant, kwargs.get("pretrained_cfg"), kwargs.get("pretrained_cfg_overlay"))
    source, url = _resolve_pretrained_source(cfg.to_dict())
    if source != "url":  # a file, a state dict, a local-dir, the hf hub, or nothing: timm's loader handles those
        return build(kwargs)
    name = cached_file_name(url, f"{variant}.{cfg.tag}" if cfg.tag else variant)
    for attempt in range(2):
        file = download_cached(url, name, kwargs.get("cache_dir"))
        overlay = dict(kwargs.get("pretrained_cfg_overlay") or {}, file=str(file))
        try:
            return build(dict(kwargs, pretrained_cfg_overlay=overlay))
        except Exception:
            problem = weights_file_problem(file)
            if problem is None:  # the file reads: the error is the model's (a head or a shape that does not fit)
                raise
        if attempt:
            raise RuntimeError(f"the cached weights {file}, downloaded again from {url}, cannot be read ({problem}): "
                               f"delete {file}; then, without a network, {_offline_way(file)}") from None
        warnings.warn(f"the cached weights {file} cannot be read ({problem}): deleting it and downloading it again "
                      f"from {url}")
        file.unlink()


def _top_keys(file: Path) -> list[str]:
    """The top-level entries of a weights file (read with weights_only); ConfigError if it is none."""
    try:
        data = _read_weights_file(file, file.suffix)
    except Exception as e:  # pickle, zip, EOF, decode or safetensors errors: whatever the bytes give
        raise ConfigError(f"cannot read {file} ({load_error_text(e)}): expected classifier weights, a .safetensors "
                          "file or a torch checkpoint (train_vit.py, timm or the official release)") from None
    if not isinstance(data, Mapping):
        raise ConfigError(f"{file} holds a {type(data).__name__}, not a state dict or checkpoint dict")
    return list(data)


def load_weights(model: nn.Module, path: str | PathLike, *, ema: bool = False) -> bool:
    """Load weights into `model` strictly; returns False (loading nothing) when `ema` asks for EMA
    weights that the source does not have.

    path: a train_vit.py checkpoint folder (model.safetensors, ema.safetensors), a run's timm/ folder,
    a .safetensors file, or a torch file: the official release ('model', and 'state_dict_ema' from
    H-ViT³'s main_ema.py) or timm's train.py ('state_dict', 'state_dict_ema').
    """
    from timm.models import load_checkpoint

    path = Path(path).expanduser()
    if not path.exists():
        raise ConfigError(f"weights {path} do not exist")
    if path.is_dir():
        file = path / ("ema.safetensors" if ema else "model.safetensors")
        if not file.is_file():
            if ema:
                return False
            raise ConfigError(f"{path} holds no model.safetensors: pass a checkpoint folder (checkpoints/step-N), a "
                              "run's timm/ folder, a .safetensors file or an official .pth")
    else:
        file = path
    keys = _top_keys(file)
    if ema and not {"state_dict_ema", "model_ema"} & set(keys) and file.name != "ema.safetensors":
        return False
    try:
        with official_file_globals():
            load_checkpoint(model, str(file), use_ema=ema, strict=True, filter_fn=checkpoint_filter_fn,
                            weights_only=True)
    except RuntimeError as e:  # missing / unexpected names, other shapes
        raise ConfigError(f"weights {file} do not fit this model (model.name / model.kwargs): {e}") from None
    return True
