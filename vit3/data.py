"""Classification data: ImageFolder train/val with timm's transforms, Mixup/CutMix, demo digits.

The recipe is the DeiT / official ViT³ one: RandomResizedCrop + flip + RandAugment
rand-m9-mstd0.5-inc1 + random erasing 0.25 (bicubic) for training; resize to size / 0.875 and
centre crop for evaluation; Mixup 0.8 / CutMix 1.0 with label smoothing 0.1. timm turns colour
jitter off whenever RandAugment is on (so did timm 0.4.12 in the official code); the 0.4 is
kept for the record and takes effect only with auto_augment="".

`data.demo: digits` writes scikit-learn's bundled digits once as an ImageFolder (`vit3.digits`)
and points data.path at it, so the demo runs through exactly the same code as ImageNet.
"""
from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from .digits import DEMOS, prepare_demo_folder
from .engine import ConfigError, DataError, at_least, between, checked, one_of, seeded_rng
from .engine import DataConfig as LoaderConfig

SHARE = between(0.0, 1.0)


@dataclasses.dataclass
class DataConfig(LoaderConfig):
    """train_vit.py's data section: the engine's (batch_size, num_workers, pin_memory, bad_images) and these."""

    path: str = "data/imagenet"  # holds train/ and val/ (one sub-folder per class)
    # "digits" or "glyphs" (vit3.glyphs): build the demo dataset under `path` (empty path: ~/.cache/vit3)
    demo: str = checked("", one_of("", *DEMOS))
    # per process; 0 = the per-process training batch
    eval_batch_size: int = checked(0, at_least(0, "an integer >= 0 (0 = the training micro-batch)"))
    # training transforms (timm.data.create_transform)
    interpolation: str = "bicubic"
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = checked(0.5, SHARE)
    color_jitter: float = 0.4
    auto_augment: str = "rand-m9-mstd0.5-inc1"  # "" = none
    reprob: float = checked(0.25, SHARE)
    remode: str = "pixel"
    recount: int = 1
    # evaluation transform: resize to img_size / crop_pct, centre crop img_size
    crop_pct: float = 0.875
    # Mixup / CutMix (timm Mixup); both 0 = off, then label_smoothing applies to hard labels
    mixup: float = checked(0.8, at_least(0.0))
    cutmix: float = checked(1.0, at_least(0.0))
    mixup_prob: float = checked(1.0, SHARE)
    mixup_switch_prob: float = 0.5
    mixup_mode: str = "batch"
    label_smoothing: float = checked(0.1, SHARE)


# ----------------------------------------------------------------------------------------
# Transforms and mixup
# ----------------------------------------------------------------------------------------
def _posterize_any_bits(img, bits_to_keep, **__):
    """timm's posterize with Pillow < 11 semantics: keeping 0 bits gives a black image.

    RandAugment "inc1" maps magnitude 10 (m9 + N(0, 0.5) noise clipped at 10, ~2% of draws) to
    0 bits; the official runs (old Pillow) got a black image, Pillow >= 11 raises ValueError.
    """
    from PIL import Image, ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def _patch_posterize(transform):
    from timm.data import auto_augment

    for t in getattr(transform, "transforms", []):
        for op in getattr(t, "ops", []):
            if getattr(op, "aug_fn", None) is auto_augment.posterize:
                op.aug_fn = _posterize_any_bits
    return transform


def build_transform(cfg: DataConfig, img_size: int, is_training: bool):
    from timm.data import create_transform

    if is_training:
        return _patch_posterize(create_transform(
            input_size=img_size, is_training=True, scale=tuple(cfg.scale), ratio=tuple(cfg.ratio),
            hflip=cfg.hflip, color_jitter=cfg.color_jitter or None, auto_augment=cfg.auto_augment or None,
            interpolation=cfg.interpolation, re_prob=cfg.reprob, re_mode=cfg.remode, re_count=cfg.recount))
    return create_transform(input_size=img_size, is_training=False, interpolation=cfg.interpolation,
                            crop_pct=cfg.crop_pct)


def build_mixup(cfg: DataConfig, num_classes: int):
    """timm Mixup/CutMix with label smoothing, or None when both alphas are 0."""
    if cfg.mixup <= 0 and cfg.cutmix <= 0:
        return None
    from timm.data import Mixup

    return Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                 switch_prob=cfg.mixup_switch_prob, mode=cfg.mixup_mode,
                 label_smoothing=cfg.label_smoothing, num_classes=num_classes)


# ----------------------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------------------
def load_rgb(path: str) -> Image.Image:
    """An image file as 8-bit RGB. 16-bit greyscale files (PNG: modes I;16 / I) are scaled to 8 bits
    (value / 257): PIL's convert("RGB") clips them, which turns nearly every pixel white."""
    with open(path, "rb") as f:
        img = Image.open(f)
        img.load()
    if img.mode.startswith("I"):
        values = np.asarray(img, dtype=np.int64)
        if values.min() < 0 or values.max() > 65535:
            raise ValueError(f"a {img.mode} image with values {values.min()} .. {values.max()}: only 8- and 16-bit "
                             "images are read; convert it")
        img = Image.fromarray(np.round(values / 257).astype(np.uint8))  # [H, W] uint8: mode L
    return img.convert("RGB")


class ClassificationFolder(ImageFolder):
    """ImageFolder whose items are (image, label, skipped) and whose index may be (index, seed).

    A seed (from `engine.ResumableBatchSampler`) seeds the random transform of that one sample.
    An unreadable file raises a DataError naming it (bad_images="error"), or is replaced by the
    next readable image and flagged with skipped=1 so the trainer can count it ("skip").
    """

    def __init__(self, root, transform, bad_images: str = "error"):
        if bad_images not in ("error", "skip"):
            raise ConfigError(f"data.bad_images must be 'error' or 'skip', got {bad_images!r}")
        super().__init__(root, transform=transform, loader=load_rgb)
        self.bad_images = bad_images
        self._warned: set[str] = set()

    @staticmethod
    def make_dataset(directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
        """torchvision's list of (file, class) in its order (classes sorted, then each class folder's sorted
        walk, directory links followed), except that a folder reached a second time through a link (a loop,
        which torchvision follows until the path is too long, multiplying the data) is a DataError naming
        it, and that a class folder without images is allowed, with a warning: it keeps its class index, so
        train and val can hold the same class folders."""
        ends = extensions if isinstance(extensions, str) else tuple(extensions or ())
        valid = is_valid_file or (lambda p: p.lower().endswith(ends))
        seen: dict[tuple[int, int], str] = {}
        instances, empty = [], []
        for name in sorted(class_to_idx):
            walked = []
            for root, dirs, files in os.walk(os.path.join(directory, name), followlinks=True):
                dirs.sort()  # the same link is named whatever order the file system lists
                st = os.stat(root)
                if (st.st_dev, st.st_ino) in seen:
                    raise DataError(f"data folder {directory}: {root} is {seen[st.st_dev, st.st_ino]} again, through "
                                    "a directory link (a loop, or a second link to one folder), so its images "
                                    "would be read more than once; remove the link")
                seen[st.st_dev, st.st_ino] = root
                walked.append((root, files))
            found = [(os.path.join(root, f), class_to_idx[name]) for root, files in sorted(walked)
                     for f in sorted(files) if valid(os.path.join(root, f))]
            instances += found
            empty += [] if found else [name]
        if empty:
            warnings.warn(f"data folder {directory}: class folders without images: {', '.join(empty[:10])}"
                          f"{' ...' if len(empty) > 10 else ''} (their classes keep their index)", stacklevel=2)
        return instances

    def __getitem__(self, item):
        index, seed = item if isinstance(item, (tuple, list)) else (item, None)
        skipped = 0
        for attempt in range(min(len(self.samples), 100)):
            path, target = self.samples[(index + attempt) % len(self.samples)]
            try:
                img = self.loader(path)
                break
            except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... on bad files
                if self.bad_images == "error":
                    raise DataError(f"cannot read image {path}: {type(e).__name__}: {e}. Delete or replace "
                                    "the file, or set data.bad_images=skip to skip unreadable images and "
                                    "count them") from None
                if path not in self._warned:
                    self._warned.add(path)
                    warnings.warn(f"skipping unreadable image {path} ({type(e).__name__}: {e})")
                skipped = 1
        else:
            raise DataError(f"no readable image among 100 files from {self.samples[index][0]}; check {self.root}")
        with seeded_rng(seed):
            img = self.transform(img)
        return img, target, skipped


class InMemoryFolder(torch.utils.data.Dataset):
    """A small ClassificationFolder decoded once into one tensor; items as the folder's.

    `folder` must have a deterministic transform (e.g. centre crop, ToTensor, Normalize): every image
    goes through it once, at construction. Random horizontal flips, the one augmentation kept, are
    drawn per item from its sample seed exactly as RandomHorizontalFlip draws them under
    `seeded_rng(seed)` (torch.rand(1) < 0.5 from a generator seeded with it), so an item equals the
    folder's own item with a flipping transform, and exact resume holds. For data sets that fit in
    memory (the digits demo: 1437 images, 4 MB); a step then reads no file and decodes no image.
    """

    def __init__(self, folder: ClassificationFolder, hflip: bool, log=None):
        """log: a logger for the one line saying how much memory the images take (checked before any is decoded
        but the first: DataError if that, times the processes on this machine, exceeds the available memory)."""
        first, target, skipped = folder[0]
        size = len(folder) * first.numel() * first.element_size()
        copies = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # each process on this machine holds its own
        available = available_memory()
        what = (f"data.in_memory: {len(folder)} images of {list(first.shape)} {str(first.dtype).split('.')[-1]} "
                f"take {_mib(size)} per process x {copies} process(es) on this machine")
        if available is not None and size * copies > available:
            raise DataError(f"{what}, more than the {_mib(available)} of memory available: set "
                            "data.in_memory=false (images are then read from disk each step) or lower the image size")
        if log is not None:
            log.info(what + (f" ({_mib(available)} available)" if available is not None else ""))
        self.images = first.new_empty((len(folder), *first.shape))  # [N, C, H, W], filled in place: no second copy
        self.targets, self.skipped = [target], [skipped]  # a skipped file stays counted at every read, as on disk
        self.images[0] = first
        for i in range(1, len(folder)):
            self.images[i], target, skipped = folder[i]
            self.targets.append(target)
            self.skipped.append(skipped)
        self.classes, self.root, self.hflip = folder.classes, folder.root, hflip

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, item):
        index, seed = item if isinstance(item, (tuple, list)) else (item, None)
        x = self.images[index]
        if self.hflip and seed is not None and torch.rand(1, generator=torch.Generator().manual_seed(seed)) < 0.5:
            x = x.flip(-1)
        return x, self.targets[index], self.skipped[index]


def _mib(n: int) -> str:
    return f"{n / 2**20:,.3f} MiB"


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation: MemAvailable of /proc/meminfo (Linux), else the free
    physical pages (os.sysconf), else None (unknown: nothing is refused)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # "MemAvailable:   12345 kB"
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not a name this system knows, or no sysconf (Windows)
        return None


def _has_images(folder: Path) -> bool:
    """True at the first image file found (no full walk of a 1.28M-image tree)."""
    return any(f.lower().endswith(IMG_EXTENSIONS) for _, _, files in os.walk(folder) for f in files)


def _open_split(root: Path, split: str, transform, bad_images: str) -> ClassificationFolder:
    folder = root / split
    if not folder.is_dir():
        raise DataError(f"data folder {folder} does not exist. data.path must hold train/ and val/, each "
                        "with one sub-folder of images per class (ImageNet layout); set data.path=..., "
                        "or data.demo=digits for the built-in demo")
    return open_image_folder(folder, transform, bad_images)


def open_image_folder(folder: Path, transform, bad_images: str = "error") -> ClassificationFolder:
    """A ClassificationFolder of `folder` (one sub-folder per class); DataError if missing or empty."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DataError(f"data folder {folder} does not exist: set data.path to a folder with one sub-folder "
                        "of images per class (e.g. imagenet/train)")
    if not _has_images(folder):
        raise DataError(f"data folder {folder} holds no images ({', '.join(IMG_EXTENSIONS)}): put one "
                        "sub-folder of images per class in it")
    try:
        return ClassificationFolder(folder, transform, bad_images)
    except FileNotFoundError as e:
        raise DataError(f"cannot use {folder} as an image folder: {e}. It needs one sub-folder of "
                        "images per class") from None


def build_datasets(cfg: DataConfig, img_size: int):
    """(train, val) ClassificationFolders; DataError on missing/empty folders or class mismatch."""
    root = Path(cfg.path).expanduser()
    train = _open_split(root, "train", build_transform(cfg, img_size, True), cfg.bad_images)
    val = _open_split(root, "val", build_transform(cfg, img_size, False), cfg.bad_images)
    if train.classes != val.classes:
        only_train = sorted(set(train.classes) - set(val.classes))
        only_val = sorted(set(val.classes) - set(train.classes))
        raise DataError(f"train and val classes differ under {root}: only in train {only_train[:10]}, "
                        f"only in val {only_val[:10]} ({len(train.classes)} vs {len(val.classes)} classes). "
                        "Both splits need the same class sub-folders (an empty folder is fine)")
    return train, val


# ----------------------------------------------------------------------------------------
# Demo data
# ----------------------------------------------------------------------------------------
def prepare_demo(cfg: DataConfig, img_size: int) -> DataConfig:
    """If cfg.demo names a demo dataset, write it (if needed) and return cfg with its path: data.path if set,
    else the cache folder."""
    if not cfg.demo:
        return cfg
    root = prepare_demo_folder(cfg.demo, "" if cfg.path == DataConfig.path else cfg.path, img_size)
    return dataclasses.replace(cfg, path=str(root))

