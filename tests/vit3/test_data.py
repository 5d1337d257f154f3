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
