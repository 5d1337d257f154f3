"""The glyphs demo data (vit3.glyphs): deterministic drawings, the same at every size, legible colours, detail
above 8x8 that the digits demo lacks, and the folder written once with its fixed split."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.datasets import ImageFolder
from torchvision.transforms.functional import to_tensor

from vit3 import glyphs
from vit3.digits import prepare_demo_folder, prepare_digits
from vit3.errors import ConfigError


def _tensor(image) -> torch.Tensor:
    return to_tensor(image).unsqueeze(0)  # [1, 3, H, W] in [0, 1]


def test_each_glyph_has_its_own_seed_and_every_font_and_digit_appear():
    a, b = glyphs.glyph_params(0, 17), glyphs.glyph_params(0, 17)
    assert a["font"] == b["font"] and a["fg"] == b["fg"] and a["angle"] == b["angle"] and a["digit"] == 7
    assert glyphs.glyph_params(1, 17)["fg"] != a["fg"]  # another seed, another drawing
    drawn = [glyphs.glyph_params(0, i) for i in range(400)]
    assert {p["font"] for p in drawn} == set(glyphs.FONTS) and len(glyphs.FONTS) == 21
    assert {p["digit"] for p in drawn} == set(range(10))
    luminance = np.array([0.299, 0.587, 0.114]) / 255
    assert min(abs(np.dot(p["fg"], luminance) - np.dot(p["bg"], luminance)) for p in drawn) >= 0.34


def test_a_glyph_is_the_same_drawing_at_every_size():
    """Glyph i at 64 px, reduced to 32, is glyph i at 32 px (to the filters' differences), not any other."""
    for i in (3, 11, 28):
        big = F.interpolate(_tensor(glyphs.draw_glyph(glyphs.glyph_params(0, i), 64)), size=32, mode="area")
        same = (big - _tensor(glyphs.draw_glyph(glyphs.glyph_params(0, i), 32))).abs().mean()
        other = (big - _tensor(glyphs.draw_glyph(glyphs.glyph_params(0, i + 1), 32))).abs().mean()
        assert same < 0.02 and other > 5 * same, (i, same, other)


def test_glyphs_carry_detail_above_8x8_that_the_digits_do_not(tmp_path):
    """The share of an image's variance that an 8x8 version loses (pooled to 8x8 and enlarged again): a
    64-pixel glyph loses a large share, an upscaled digit of the digits demo little."""

    def lost_above_8x8(x: torch.Tensor) -> float:  # x [B, 3, 64, 64]
        coarse = F.interpolate(F.adaptive_avg_pool2d(x, 8), size=64, mode="bicubic", align_corners=False)
        return float(((x - coarse) ** 2).mean() / x.var(dim=(2, 3), keepdim=True).mean())

    glyph = torch.cat([_tensor(glyphs.draw_glyph(glyphs.glyph_params(0, i), 64)) for i in range(20)])
    root = prepare_digits(tmp_path / "digits64", 64)
    digits = torch.cat([_tensor(ImageFolder(str(root / "val")).loader(p))
                        for p, _ in ImageFolder(str(root / "val")).samples[:20]])
    assert lost_above_8x8(glyph) > 0.15 and lost_above_8x8(glyph) > 2 * lost_above_8x8(digits)


def test_prepare_glyphs_writes_the_split_once(tmp_path, monkeypatch):
    root = glyphs.prepare_glyphs(tmp_path / "g32", 32, train_per_class=3, val_per_class=1)
    train, val = ImageFolder(str(root / "train")), ImageFolder(str(root / "val"))
    assert train.classes == [str(c) for c in range(10)] and len(train) == 30 and len(val) == 10
    assert train.loader(train.samples[0][0]).size == (32, 32)
    assert "30 train / 10 val" in (root / ".complete").read_text()
    names = {p.name for p in (root / "val").rglob("*.png")}
    assert names == {f"{i:05d}.png" for i in range(30, 40)}  # val glyphs follow the train ones
    monkeypatch.setattr(glyphs, "draw_glyph", lambda *a: pytest.fail("a finished folder was drawn again"))
    assert glyphs.prepare_glyphs(root, 32, train_per_class=3, val_per_class=1) == root
    with pytest.raises(ConfigError, match="multiples of 8 .* not 36"):
        glyphs.prepare_glyphs(tmp_path / "g36", 36)


def test_data_demo_glyphs_goes_to_the_glyphs(tmp_path, monkeypatch):
    """Both trainers' data.demo: 'glyphs' is accepted and written by prepare_glyphs at the model's size; an
    unknown demo names the two."""
    calls = []
    monkeypatch.setattr(glyphs, "prepare_glyphs", lambda root, size, style: calls.append((root, size, style)) or root)
    assert prepare_demo_folder("glyphs", tmp_path / "g", 64) == tmp_path / "g"
    assert prepare_demo_folder("glyphs_mono", tmp_path / "m", 32) == tmp_path / "m"
    assert prepare_demo_folder("glyphs_plain", tmp_path / "p", 64) == tmp_path / "p"
    assert calls == [(tmp_path / "g", 64, "colour"), (tmp_path / "m", 32, "mono"), (tmp_path / "p", 64, "plain")]
    with pytest.raises(ConfigError, match="the built-in demo datasets are digits, glyphs, glyphs_mono, glyphs_plain"):
        prepare_demo_folder("mnist", "", 16)


def test_mono_glyphs_are_the_colour_glyphs_white_on_black():
    """glyphs_mono draws each glyph's own shape: the colour glyph is its background plus the mono glyph's
    coverage times (foreground - background), up to PIL's 8-bit Lanczos passes, whose rounding and clipping
    at the edges differ by a few levels; the coverage read back from the colour glyph is the mono glyph's, and
    not another drawing's of the same digit."""
    for i in (3, 58, 104):
        params, mono = glyphs.glyph_params(0, i), glyphs.glyph_params(0, i, "mono")
        assert (mono["fg"], mono["bg"]) == ((255, 255, 255), (0, 0, 0))
        assert {k: v for k, v in mono.items() if k not in ("fg", "bg", "offset")} == {
            k: v for k, v in params.items() if k not in ("fg", "bg", "offset")}
        assert np.array_equal(mono["offset"], params["offset"])
        coverage = np.asarray(glyphs.draw_glyph(mono, 32), dtype=np.float64)[..., 0] / 255  # [32, 32]
        colour = np.asarray(glyphs.draw_glyph(params, 32), dtype=np.float64)  # [32, 32, 3]
        fg, bg = np.array(params["fg"], dtype=np.float64), np.array(params["bg"], dtype=np.float64)
        assert coverage.max() > 0.9 and coverage.min() < 0.1  # a white glyph on black
        assert np.abs(colour - (bg + coverage[..., None] * (fg - bg))).mean() < 1.5  # 8-bit levels
        k = np.argmax(np.abs(fg - bg))  # the channel where the colours differ most
        read_back = (colour[..., k] - bg[k]) / (fg[k] - bg[k])
        assert np.corrcoef(read_back.ravel(), coverage.ravel())[0, 1] > 0.995
        other = np.asarray(glyphs.draw_glyph(glyphs.glyph_params(0, i + 10, "mono"), 32), dtype=np.float64)
        assert np.corrcoef(read_back.ravel(), other[..., 0].ravel())[0, 1] < 0.9  # the same digit, drawn otherwise


def test_plain_glyphs_vary_less_and_keep_their_detail(tmp_path):
    """glyphs_plain: white on black, only the four bold faces, every parameter inside its narrower range; a
    glyph lies nearer its digit's mean drawing than a mono glyph does (what makes it quick to learn), and a
    64-pixel plain glyph still loses a large share of its variance at 8x8."""
    plain = [glyphs.glyph_params(0, i, "plain") for i in range(400)]
    assert {p["font"] for p in plain} == set(glyphs.PLAIN_FONTS) and {p["digit"] for p in plain} == set(range(10))
    assert all((p["fg"], p["bg"]) == ((255, 255, 255), (0, 0, 0)) for p in plain)
    assert all(0.65 <= p["size"] <= 0.75 and abs(p["angle"]) <= 8 and np.abs(p["offset"]).max() <= 0.04
               and 0 <= p["stroke"] <= 0.01 for p in plain)

    def spread(style: str) -> float:  # the mean distance of a glyph to its digit's mean drawing, at 32 px
        x = torch.cat([_tensor(glyphs.draw_glyph(glyphs.glyph_params(0, i, style), 32)) for i in range(200)])
        x = x.view(20, 10, -1)  # [drawing, digit, pixels]: glyph i is digit i mod 10
        return float((x - x.mean(0)).norm(dim=-1).mean())

    assert spread("plain") < 0.8 * spread("mono")  # 8.4 against 11.5
    x = torch.cat([_tensor(glyphs.draw_glyph(p, 64)) for p in plain[:20]])
    coarse = F.interpolate(F.adaptive_avg_pool2d(x, 8), size=64, mode="bicubic", align_corners=False)
    assert float(((x - coarse) ** 2).mean() / x.var(dim=(2, 3), keepdim=True).mean()) > 0.15
    with pytest.raises(ConfigError, match="unknown glyph style 'grey': one of colour, plain, mono"):
        glyphs.glyph_params(0, 1, "grey")
    with pytest.raises(ConfigError, match="unknown glyph style"):
        glyphs.prepare_glyphs(tmp_path / "g", 32, style="grey")
