"""vit3.data: the timm transforms."""
import numpy as np
from PIL import Image


def test_randaugment_posterize_zero_bits_does_not_crash():
    """RandAugment inc1 at magnitude 10 asks to keep 0 bits: Pillow >= 11 raises, we give the old
    Pillow result (black), as the official runs had."""
    from timm.data import auto_augment

    from vit3.data import DataConfig, _posterize_any_bits, build_transform

    img = Image.fromarray(np.full((8, 8, 3), 200, dtype=np.uint8))
    assert np.asarray(_posterize_any_bits(img, 0)).max() == 0
    assert np.asarray(_posterize_any_bits(img, 2)).max() == 192
    tf = build_transform(DataConfig(), 16, is_training=True)
    ops = [op for t in tf.transforms for op in getattr(t, "ops", [])]
    assert any(op.name == "PosterizeIncreasing" for op in ops)
    assert not any(op.aug_fn is auto_augment.posterize for op in ops)


def test_in_memory_data_is_estimated_and_refused_when_it_does_not_fit(tmp_path, monkeypatch, caplog):
    """InMemoryFolder says what the decoded images will take before holding them, and refuses (DataError, one line
    with the size, the memory available and the fix) when that exceeds the available memory."""
    import logging

    import pytest
    import torch
    from torchvision import transforms

    import vit3.data
    from tests.trainer_helpers import write_images
    from vit3.data import ClassificationFolder, InMemoryFolder
    from vit3.engine import DataError

    write_images(tmp_path, ["a", "b"], 3, size=16)
    folder = ClassificationFolder(tmp_path, transforms.ToTensor())  # 6 images of [3, 16, 16] float32: 18432 bytes
    monkeypatch.setattr(vit3.data, "available_memory", lambda: 18431)
    with pytest.raises(DataError) as error:
        InMemoryFolder(folder, hflip=False)
    message = str(error.value)
    assert "6 images of [3, 16, 16] float32 take 0.018 MiB per process" in message and "\n" not in message
    assert "more than the 0.018 MiB of memory available: set data.in_memory=false" in message
    monkeypatch.setattr(vit3.data, "available_memory", lambda: 18432)
    with caplog.at_level(logging.INFO):
        memory = InMemoryFolder(folder, hflip=False, log=logging.getLogger("test"))
    assert "data.in_memory: 6 images of [3, 16, 16] float32" in caplog.text
    assert all(torch.equal(memory[i][0], folder[i][0]) and memory[i][1:] == folder[i][1:] for i in range(6))
    assert vit3.data.available_memory() > 0  # this machine's, read from /proc/meminfo or sysconf
