"""The digits demo: scikit-learn's handwritten digits as an ImageFolder, and the judge of its samples.

Data: `prepare_digits` writes the bundled 8x8 digits (1797 images, 10 classes) once as an
ImageFolder of RGB PNGs upscaled to `img_size`, split 80/20 stratified with a fixed seed, so the
demos of train_vit.py and train_dit.py run through exactly the same code as ImageNet.

Judge: the samples of a model trained on these digits are scored by a classifier that has never
seen the model: an RBF support-vector machine fitted on the real training digits. Real and
generated images go through the same reduction (grey, average-pooled to the digits' native 8x8,
grey levels 0..16), so the classifier sees generated digits exactly as it saw real ones. The
fraction of guided samples it labels as the class they were asked for is the demo's sample
accuracy.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .engine.files import temp_dir
from .errors import ConfigError


# ----------------------------------------------------------------------------------------
# Data: scikit-learn digits as an ImageFolder
# ----------------------------------------------------------------------------------------
def default_demo_path(name: str, img_size: int) -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "vit3" / f"{name}{img_size}"


# digits: scikit-learn's 8x8 digits; glyphs: digits drawn with fonts in colour (vit3.glyphs); glyphs_mono: the same
# glyphs white on black; glyphs_plain: white on black with less variety (four bold faces, narrower ranges)
DEMOS = ("digits", "glyphs", "glyphs_mono", "glyphs_plain")


def prepare_demo_folder(demo: str, root: str | os.PathLike, img_size: int) -> Path:
    """The folder (train/, val/) of the built-in demo data set `demo` at `img_size`, written once: at `root`, or
    ("") in the cache, ~/.cache/vit3/<demo><img_size>. Both trainers' `data.demo` come here."""
    if demo not in DEMOS:
        raise ConfigError(f"unknown data.demo {demo!r}: the built-in demo datasets are {', '.join(DEMOS)} "
                          "('' for none)")
    root = root or default_demo_path(demo, img_size)
    if demo.startswith("glyphs"):
        from .glyphs import STYLES, prepare_glyphs

        return prepare_glyphs(root, img_size, style=STYLES[demo])
    return prepare_digits(root, img_size)


def write_demo_once(root: str | os.PathLike, fill) -> Path:
    """root, written once by fill(tmp) -> the text of root/.complete, into a new temporary folder renamed to
    root: an interrupted write is never mistaken for a finished one, and of two processes the first wins."""
    root = Path(root).expanduser()
    if (root / ".complete").is_file():
        return root
    tmp = temp_dir(root)  # a new, unpredictable name: a link planted beside root is never written through
    try:
        (tmp / ".complete").write_text(fill(tmp))
        root.parent.mkdir(parents=True, exist_ok=True)
        if root.exists() and not (root / ".complete").is_file():
            shutil.rmtree(root)  # an old partial copy
        os.replace(tmp, root)
    except OSError:
        if not (root / ".complete").is_file():  # else another process finished first
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def prepare_digits(root: str | os.PathLike, img_size: int = 32, val_fraction: float = 0.2, seed: int = 0) -> Path:
    """Write the 1797 digits as root/{train,val}/<digit>/<index>.png (RGB, img_size^2) once.

    Grey levels 0..16 map to 0..255, upscaled with bicubic interpolation; the split is stratified
    and seeded, so every machine gets the same 1437 / 360 images. Written to a temporary folder
    and renamed, so an interrupted write is never mistaken for a finished one.
    """
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    def fill(tmp: Path) -> str:
        digits = load_digits()
        idx = np.arange(len(digits.target))
        train_idx, val_idx = train_test_split(idx, test_size=val_fraction, stratify=digits.target,
                                              random_state=seed)
        for split, ids in (("train", train_idx), ("val", val_idx)):
            for c in range(10):
                (tmp / split / str(c)).mkdir(parents=True, exist_ok=True)
            for i in ids:
                grey = (digits.images[i] * (255.0 / 16.0)).round().astype(np.uint8)  # [8, 8]
                img = Image.fromarray(grey, mode="L").resize((img_size, img_size), Image.BICUBIC).convert("RGB")
                img.save(tmp / split / str(digits.target[i]) / f"{i:04d}.png")
        return f"sklearn digits, {len(train_idx)} train / {len(val_idx)} val, seed {seed}\n"

    return write_demo_once(root, fill)


# ----------------------------------------------------------------------------------------
# Judge: an SVC on the real digits
# ----------------------------------------------------------------------------------------
def digits_features(images: torch.Tensor) -> np.ndarray:
    """[B, C, H, W] images in [-1, 1] (H, W multiples of 8) -> [B, 64] 8x8 grey levels in 0..16."""
    grey = images.float().mean(dim=1, keepdim=True)  # [B, 1, H, W]
    pooled = F.adaptive_avg_pool2d(grey, 8)  # [B, 1, 8, 8]
    return ((pooled.clamp(-1, 1) + 1) * 8).flatten(1).cpu().numpy()


def _load_split(folder: Path) -> tuple[torch.Tensor, np.ndarray]:
    from torchvision.datasets import ImageFolder
    from torchvision.transforms.functional import to_tensor

    ds = ImageFolder(str(folder))
    images = torch.stack([to_tensor(ds.loader(p)) * 2 - 1 for p, _ in ds.samples])  # [N, 3, H, W]
    labels = np.array([int(ds.classes[y]) for _, y in ds.samples])
    return images, labels


class DigitsClassifier:
    """SVC on the real digits of a `prepare_digits` folder (train split); val accuracy kept."""

    def __init__(self, root: str | Path):
        from sklearn.svm import SVC

        root = Path(root)
        x_train, y_train = _load_split(root / "train")
        x_val, y_val = _load_split(root / "val")
        self.svc = SVC(C=10.0, gamma=0.001).fit(digits_features(x_train), y_train)
        self.val_accuracy = float((self.svc.predict(digits_features(x_val)) == y_val).mean())

    def predict(self, images: torch.Tensor) -> np.ndarray:
        return self.svc.predict(digits_features(images))

    def accuracy(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        """Fraction of `images` [B, C, H, W] in [-1, 1] classified as `labels` [B]."""
        return float((self.predict(images) == labels.cpu().numpy()).mean())
