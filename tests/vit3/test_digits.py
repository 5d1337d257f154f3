"""vit3.digits: the demo data, written once, stratified; the judge of the demo's samples."""
import pytest
import torch
from PIL import Image

from vit3.digits import prepare_digits


def test_digits_classifier_is_accurate_on_real_digits_and_not_on_noise(tmp_path):
    from vit3.digits import DigitsClassifier, _load_split

    root = prepare_digits(tmp_path / "digits16", 16)
    clf = DigitsClassifier(root)
    assert clf.val_accuracy >= 0.95
    x, y = _load_split(root / "val")
    assert clf.accuracy(x, torch.as_tensor(y)) == pytest.approx(clf.val_accuracy)
    noise = torch.rand(200, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert clf.accuracy(noise, torch.arange(10).repeat(20)) < 0.3


def test_prepare_digits(tmp_path):
    root = prepare_digits(tmp_path / "digits", 16)
    counts = {s: sum(1 for _ in (root / s).rglob("*.png")) for s in ("train", "val")}
    assert counts == {"train": 1437, "val": 360}
    per_class = [len(list((root / "val" / str(c)).glob("*.png"))) for c in range(10)]
    assert min(per_class) >= 35  # stratified
    img = Image.open(next((root / "train" / "0").glob("*.png")))
    assert img.size == (16, 16) and img.mode == "RGB"
    names = sorted(p.name for p in (root / "val" / "3").glob("*.png"))
    assert prepare_digits(tmp_path / "digits", 16) == root  # written once
    assert sorted(p.name for p in (root / "val" / "3").glob("*.png")) == names
