"""ViT³ and H-ViT³ image classifiers: the size registry and the timm registration.

Paper: `ViT³: Unlocking Test-Time Training in Vision` - https://arxiv.org/abs/2512.01643
Official code: https://github.com/LeapLabTHU/ViTTT

The models are in vit.py (ViT³: DeiT with a test-time-training token mixer, and the block
both models share) and hvit.py (H-ViT³: the four-stage hierarchical version).

Positions are never baked in: RoPE tables and the CPE follow the feature map of the
actual input, so one model takes any input size (h != w included; ViT³ needs sides
divisible by 16). `img_size` only sets the default input of `complexity()` and the
timm data config.

Parameter names and shapes are those of the official release, so its checkpoints load
with `load_official_checkpoint` (which drops the stored RoPE tables, `*.rope.rotations`).
`mixer="attention"` gives the DeiT-style softmax-attention baseline of the same
architecture, and `mixer_kwargs` reaches the mixer (TTT design options, attention impl).

The models are registered with timm: after `import vit3`, `timm.create_model("vit3_small")`,
with timm's conventions: `device=` / `dtype=`, `features_only=True` (H-ViT³: the four stage
maps at strides 4/8/16/32; ViT³: chosen blocks as maps) and `forward_intermediates()`,
`reset_classifier(n, global_pool='')`, `group_matcher()` for layer-wise lr decay, FX
tracing, and the official weights as pretrained tags (`vit3_small.official_in1k`):
`timm.create_model(name, pretrained=True)` downloads the release file into the torch hub
cache once, `pretrained_cfg_overlay=dict(file=PATH)` loads one downloaded by hand.
"""
from contextlib import nullcontext

import timm
import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import to_2tuple
from timm.models import (
    build_model_with_cfg,
    generate_default_cfgs,
    register_model,
    register_notrace_module,
)

from .hvit import HViT3
from .layers import RoPE2d
from .mixers import Attention, LinearAttention
from .ttt import TTT
from .vit import ViT3
from .weights import checkpoint_filter_fn, create_pretrained, official_file_globals

__all__ = ["ViT3", "HViT3", "MODEL_NAMES", "create_model"]

MODEL_NAMES = ("vit3_tiny", "vit3_small", "vit3_base", "hvit3_tiny", "hvit3_small", "hvit3_base")

# where the official weights are published (README of the official code)
OFFICIAL_WEIGHTS = {
    "vit3_tiny": "https://cloud.tsinghua.edu.cn/f/e12d1bd1c20c4e06a2da/?dl=1",
    "vit3_small": "https://cloud.tsinghua.edu.cn/f/4ab59ca54b474dff9b70/?dl=1",
    "vit3_base": "https://cloud.tsinghua.edu.cn/f/c9e9bb09f85d449ab8cf/?dl=1",
    "hvit3_tiny": "https://cloud.tsinghua.edu.cn/f/f0c7c73ceabe49b7b161/?dl=1",
    "hvit3_small": "https://cloud.tsinghua.edu.cn/f/3eeab8621a7f43929a87/?dl=1",
    "hvit3_base": "https://cloud.tsinghua.edu.cn/f/1d0d7fb840254275b29d/?dl=1",
}


#################################################################################
#                                timm registry                                  #
#################################################################################

# FX tracing (timm's FX feature extraction): the token mixers and RoPE take the map size as Python ints, check
# shapes and cache tables, so the trace keeps them whole, as calls
for _leaf in (TTT, Attention, LinearAttention, RoPE2d):
    register_notrace_module(_leaf)


def _cfg(url: str, first_conv: str, pool_size: tuple[int, int]) -> dict:
    # the official evaluation: resize to 256/224 of the size, center crop, bicubic, ImageNet mean/std
    return {"url": url, "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": pool_size,
            "crop_pct": 0.875, "interpolation": "bicubic", "fixed_input_size": False, "mean": IMAGENET_DEFAULT_MEAN,
            "std": IMAGENET_DEFAULT_STD, "first_conv": first_conv, "classifier": "head", "license": "mit",
            "origin_url": "https://github.com/LeapLabTHU/ViTTT", "paper_ids": "arXiv:2512.01643"}


# the official ImageNet-1k weights (weights.create_pretrained downloads them)
default_cfgs = generate_default_cfgs({
    **{f"{name}.official_in1k": _cfg(OFFICIAL_WEIGHTS[name], "patch_embed.proj", (14, 14))
       for name in MODEL_NAMES[:3]},
    **{f"{name}.official_in1k": _cfg(OFFICIAL_WEIGHTS[name], "patch_embed.conv.0.conv", (7, 7))
       for name in MODEL_NAMES[3:]},
})


def _build(variant: str, model_cls: type, pretrained: bool, kwargs: dict) -> nn.Module:
    device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)
    # parameters are made on `device` (meta too), not moved there
    with torch.device(device) if device is not None else nullcontext(), official_file_globals():
        model = build_model_with_cfg(model_cls, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                     feature_cfg=dict(out_indices=4 if model_cls is HViT3 else 3, feature_cls="getter"),
                                     **kwargs)
    return model.to(dtype=dtype) if dtype is not None else model


def _create(variant: str, model_cls: type, pretrained: bool, model_args: dict, **kwargs) -> nn.Module:
    kwargs = dict(model_args, **kwargs)
    if pretrained:  # a url in the cfg becomes a file in the torch hub cache
        model = create_pretrained(lambda kw: _build(variant, model_cls, True, kw), variant, kwargs)
    else:
        model = _build(variant, model_cls, False, kwargs)
    # timm's data config (resolve_data_config) then uses the size the model was built for
    img_size = to_2tuple(kwargs.get("img_size", 224))
    stride = kwargs["patch_size"] if model_cls is ViT3 else 32  # H-ViT³ rounds each halving up
    model.pretrained_cfg.update(input_size=(kwargs.get("in_chans", 3), *img_size),
                                pool_size=tuple(-(-side // stride) for side in img_size))
    return model


@register_model
def vit3_tiny(pretrained: bool = False, **kwargs) -> ViT3:
    """ViT³-T: 6.15M params, 1.22 GMACs at 224."""
    return _create("vit3_tiny", ViT3, pretrained, dict(patch_size=16, embed_dim=192, depth=12, num_heads=6), **kwargs)


@register_model
def vit3_small(pretrained: bool = False, **kwargs) -> ViT3:
    """ViT³-S: 23.80M params, 4.81 GMACs at 224."""
    return _create("vit3_small", ViT3, pretrained, dict(patch_size=16, embed_dim=384, depth=12, num_heads=6), **kwargs)


@register_model
def vit3_base(pretrained: bool = False, **kwargs) -> ViT3:
    """ViT³-B: 90.06M params, 17.94 GMACs at 224."""
    return _create("vit3_base", ViT3, pretrained, dict(patch_size=16, embed_dim=768, depth=12, num_heads=12), **kwargs)


@register_model
def hvit3_tiny(pretrained: bool = False, **kwargs) -> HViT3:
    """H-ViT³-T: 28.70M params, 4.91 GMACs at 224."""
    args = dict(embed_dims=(64, 128, 320, 512), depths=(1, 3, 9, 4), num_heads=(2, 4, 10, 16))
    return _create("hvit3_tiny", HViT3, pretrained, args, **kwargs)


@register_model
def hvit3_small(pretrained: bool = False, **kwargs) -> HViT3:
    """H-ViT³-S: 54.36M params, 8.74 GMACs at 224."""
    args = dict(embed_dims=(64, 128, 320, 512), depths=(2, 6, 18, 8), num_heads=(2, 4, 10, 16))
    return _create("hvit3_small", HViT3, pretrained, args, **kwargs)


@register_model
def hvit3_base(pretrained: bool = False, **kwargs) -> HViT3:
    """H-ViT³-B: 94.37M params, 16.69 GMACs at 224."""
    args = dict(embed_dims=(96, 192, 448, 640), depths=(2, 6, 18, 8), num_heads=(3, 6, 14, 20))
    return _create("hvit3_base", HViT3, pretrained, args, **kwargs)


def create_model(name: str, pretrained: bool = False, **kwargs) -> nn.Module:
    """One of MODEL_NAMES through timm.create_model (kwargs: num_classes, img_size, mixer, ...)."""
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; choose one of {MODEL_NAMES}")
    return timm.create_model(name, pretrained=pretrained, **kwargs)
