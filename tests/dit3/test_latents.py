"""dit3.latents: ADM's center crop."""
import numpy as np
from PIL import Image

from dit3.latents import center_crop_arr


def test_center_crop_matches_adm():
    """ADM's crop of a 300x200 image to 64: box-halve while the short side is >= 128 (once, to 150x100),
    resize bicubically so the short side is 64 (96x64), keep the centre 64x64."""
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (200, 300, 3), dtype=np.uint8))
    out = center_crop_arr(img, 64)
    half = img.resize((150, 100), resample=Image.BOX)  # 200 >= 128: halve once; 100 < 128: stop
    resized = half.resize((96, 64), resample=Image.BICUBIC)
    expect = np.array(resized)[:, 16:80]
    assert out.size == (64, 64) and np.array_equal(np.array(out), expect)
    same = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    assert np.array_equal(np.array(center_crop_arr(same, 64)), np.array(same))
