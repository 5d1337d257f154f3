"""The glyphs demo: the digits 0-9 drawn in colour with the TrueType fonts matplotlib ships, at any size.

The digits demo (`vit3.digits`) is 8x8 at heart: upscaled, it carries no detail above 8x8, so it cannot show
what a model does with many tokens. Glyphs are drawn at the resolution asked for (any multiple of 8: 32, 64,
128, ...), each with its own font (21 faces: DejaVu Sans / Serif / Mono and STIX in regular, bold, italic and
bold italic, and five Computer Modern faces), size, rotation, position, stroke, and a foreground colour on
a background colour of clearly different luminance. Serifs, stroke ends and the counters of 6, 8 and 9 are
detail that 8x8 does not hold.

Glyph i is drawn from its own seed (seed, i) with parameters relative to the image size, so the data set is
the same drawings at every size and on every machine (given the same fonts: matplotlib's own files);
`train_per_class` and `val_per_class` glyphs of each digit make the fixed train / val split.

Three styles, one per `data.demo`:
- "colour" (`glyphs`): the full variety above;
- "mono" (`glyphs_mono`): the same glyphs white on black: the same fonts, sizes, angles, places and strokes
  without the two random colours, which a tiny model does not learn in minutes (benchmarks/README.md: 13% of
  its guided samples right after 1500 updates in colour, 43% white on black);
- "plain" (`glyphs_plain`): white on black with less variety: four bold faces (sans, serif, mono and STIX,
  whose serifs and stroke ends are still detail above 8x8), a narrower size, angle, place and stroke. A tiny
  model learns it in minutes at 256 tokens (SiT's guided samples 81% right after 2400 updates of batch 8),
  more slowly at 1024 (DiT³'s 34% after 1600; benchmarks/README.md).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .errors import ConfigError

FONTS = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf",
    "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf", "DejaVuSerif-BoldItalic.ttf",
    "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-Oblique.ttf", "DejaVuSansMono-BoldOblique.ttf",
    "STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf", "STIXGeneralBolIta.ttf",
    "cmr10.ttf", "cmb10.ttf", "cmti10.ttf", "cmss10.ttf", "cmtt10.ttf",
)
CANVAS = 256  # drawn on at least this many pixels (at least 2x) and reduced with a Lanczos filter: anti-aliased
MIN_CONTRAST = 0.35  # |luminance(foreground) - luminance(background)| in [0, 1]: the glyph stays legible
PLAIN_FONTS = ("DejaVuSans-Bold.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSansMono-Bold.ttf", "STIXGeneralBol.ttf")
# each style's ranges: size (a share of the image side), angle (degrees), offset (a share of the side), stroke
RANGES = {"colour": dict(fonts=FONTS, size=(0.5, 0.8), angle=25, offset=0.1, stroke=0.03),
          "plain": dict(fonts=PLAIN_FONTS, size=(0.65, 0.75), angle=8, offset=0.04, stroke=0.01)}
RANGES["mono"] = RANGES["colour"]
STYLES = {"glyphs": "colour", "glyphs_mono": "mono", "glyphs_plain": "plain"}  # data.demo -> style


def font_dir() -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def glyph_params(seed: int, index: int, style: str = "colour") -> dict:
    """The drawing of glyph `index` in `style` (STYLES): its digit (index mod 10), font, relative size, rotation,
    centre offset, relative stroke, and colours (white on black but in colour: the colours are drawn all the
    same, so a mono glyph is the colour glyph's shape); from its own seed, so any glyph is drawn alone and the
    same everywhere."""
    if style not in RANGES:
        raise ConfigError(f"unknown glyph style {style!r}: one of {', '.join(RANGES)}")
    r = RANGES[style]
    rng = np.random.default_rng([seed, index])
    while True:  # colours of clearly different luminance (Rec. 601 weights)
        fg, bg = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
        if abs(fg @ [0.299, 0.587, 0.114] - bg @ [0.299, 0.587, 0.114]) >= MIN_CONTRAST:
            break
    if style != "colour":
        fg, bg = np.ones(3), np.zeros(3)
    return {"digit": index % 10, "font": r["fonts"][rng.integers(len(r["fonts"]))],
            "size": rng.uniform(*r["size"]),  # the font's size as a share of the image side
            "angle": rng.uniform(-r["angle"], r["angle"]),  # degrees
            "offset": rng.uniform(-r["offset"], r["offset"], 2),  # the centre's shift, a share of the image side
            "stroke": rng.uniform(0, r["stroke"]),  # a share of the image side: from the font's own weight up
            "fg": tuple(int(c) for c in (fg * 255).round()), "bg": tuple(int(c) for c in (bg * 255).round())}


def draw_glyph(params: dict, img_size: int, fonts: Path | None = None):
    """One glyph as an RGB PIL image of img_size x img_size."""
    from PIL import Image, ImageDraw, ImageFont

    big = max(CANVAS, 2 * img_size)
    font = ImageFont.truetype(str((fonts or font_dir()) / params["font"]), max(1, round(params["size"] * big)))
    mask = Image.new("L", (big, big), 0)  # the glyph's coverage, drawn upright at the centre, then turned
    centre = (big / 2 + params["offset"][0] * big, big / 2 + params["offset"][1] * big)
    ImageDraw.Draw(mask).text(centre, str(params["digit"]), fill=255, font=font, anchor="mm",
                              stroke_width=round(params["stroke"] * big), stroke_fill=255)
    mask = mask.rotate(params["angle"], resample=Image.BICUBIC, center=centre)
    image = Image.composite(Image.new("RGB", (big, big), params["fg"]), Image.new("RGB", (big, big), params["bg"]),
                            mask)
    return image.resize((img_size, img_size), Image.LANCZOS)


def prepare_glyphs(root: str | os.PathLike, img_size: int = 64, train_per_class: int = 600,
                   val_per_class: int = 100, seed: int = 0, style: str = "colour") -> Path:
    """Write root/{train,val}/<digit>/<index>.png (RGB, img_size^2) once: glyphs 0 .. 10 * train_per_class - 1
    are the train split, the next 10 * val_per_class the val split; in `style` (STYLES)."""
    from .digits import write_demo_once

    if img_size < 8 or img_size % 8:
        raise ConfigError(f"the glyphs demo is drawn at sizes that are multiples of 8 (32, 64, 128), not {img_size}")
    if style not in RANGES:
        raise ConfigError(f"unknown glyph style {style!r}: one of {', '.join(RANGES)}")
    fonts = font_dir()
    missing = [f for f in FONTS if not (fonts / f).is_file()]
    if missing:
        raise ConfigError(f"the glyphs demo draws with matplotlib's fonts, and {fonts} lacks {', '.join(missing)}: "
                          "reinstall matplotlib (pip install --force-reinstall matplotlib)")
    n_train, n_val = 10 * train_per_class, 10 * val_per_class

    def fill(tmp: Path) -> str:
        for split, indices in (("train", range(n_train)), ("val", range(n_train, n_train + n_val))):
            for c in range(10):
                (tmp / split / str(c)).mkdir(parents=True, exist_ok=True)
            for i in indices:
                params = glyph_params(seed, i, style)
                draw_glyph(params, img_size, fonts).save(tmp / split / str(params["digit"]) / f"{i:05d}.png")
        return (f"glyphs {img_size}px, {n_train} train / {n_val} val, seed {seed}, style {style} "
                f"({len(RANGES[style]['fonts'])} fonts)\n")

    return write_demo_once(root, fill)
