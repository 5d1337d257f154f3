"""Judging samples.

Digits demo: the samples of a model trained on scikit-learn's digits are scored by a classifier
that has never seen the model: an RBF support-vector machine fitted on the real training digits.
Real and generated images go through the same reduction (grey, average-pooled to the digits'
native 8x8, grey levels 0..16), so the classifier sees generated digits exactly as it saw real
ones. The fraction of guided samples it labels as the class they were asked for is the demo's
sample accuracy.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


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
    """SVC on the real digits of a `vit3.data.prepare_digits` folder (train split); val accuracy kept."""

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
