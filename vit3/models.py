"""ViT³ and H-ViT³ image classifiers.

Paper: `ViT³: Unlocking Test-Time Training in Vision` - https://arxiv.org/abs/2512.01643
Official code: https://github.com/LeapLabTHU/ViTTT

ViT³ is DeiT with the attention replaced by a test-time-training layer (vit3.ttt.TTT):
16x16 patches, one resolution throughout, no class token and no absolute position
embedding. Each block adds a 3x3 depthwise-conv position encoding (CPE) to its input,
then the pre-norm TTT and MLP residuals; the tokens are averaged for the head.

H-ViT³ is the hierarchical version: a stride-4 conv stem, four stages at strides
4/8/16/32 joined by MBConv-style patch merging, 2-D RoPE on the queries and keys of
the TTT layer's SwiGLU branch, a ConvFFN instead of the MLP, and BatchNorm before the
average pooling. Every stage uses the TTT mixer (there is no window attention).

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
from collections import OrderedDict
from contextlib import nullcontext

import timm
import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, Mlp, PatchEmbed, calculate_drop_path_rates, to_2tuple, trunc_normal_
from timm.models import (
    build_model_with_cfg,
    generate_default_cfgs,
    register_model,
    register_notrace_module,
)
from timm.models._features import feature_take_indices  # what timm's own models use; not re-exported
from torch.utils.checkpoint import checkpoint

from .layers import ConvFFN, RoPE2d, TokenDWConv
from .mixers import Attention, LinearAttention, build_mixer
from .ttt import TTT
from .weights import checkpoint_filter_fn, fetch_pretrained, official_file_globals

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
#                                   Helpers                                     #
#################################################################################

def _init_weights(module: nn.Module) -> None:
    """The official init: truncated-normal Linear weights (std 0.02), zero biases, unit norms.

    Convolutions keep PyTorch's default init, as in the official code. The TTT inner
    weights (w1, w2, w3) are initialised by the TTT layer itself.
    """
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.LayerNorm, nn.BatchNorm1d, nn.BatchNorm2d)):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class ConvNormAct(nn.Sequential):
    """Conv2d (same padding), optional BatchNorm, optional ReLU: children `conv`, `norm`, `act`."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int, stride: int = 1, groups: int = 1,
                 bias: bool = True, norm: bool = True, act: bool = True):
        layers = OrderedDict(conv=nn.Conv2d(in_chs, out_chs, kernel_size, stride, kernel_size // 2,
                                            groups=groups, bias=bias))
        if norm:
            layers["norm"] = nn.BatchNorm2d(out_chs)
        if act:
            layers["act"] = nn.ReLU()
        super().__init__(layers)


def _run_block(blk: nn.Module, x: torch.Tensor, h: int, w: int, grad_checkpointing: bool) -> torch.Tensor:
    if grad_checkpointing and torch.is_grad_enabled():
        return checkpoint(blk, x, h, w, use_reentrant=False)
    return blk(x, h, w)


def _run_blocks(blocks: nn.ModuleList, x: torch.Tensor, h: int, w: int, grad_checkpointing: bool) -> torch.Tensor:
    for blk in blocks:
        x = _run_block(blk, x, h, w, grad_checkpointing)
    return x


def _check_pool(global_pool: str) -> str:
    if global_pool not in ("avg", ""):
        raise ValueError(f"global_pool must be 'avg' or '' (no pooling), got {global_pool!r}")
    return global_pool


#################################################################################
#                                    Blocks                                     #
#################################################################################

class Block(nn.Module):
    """x + CPE(x), then x + mixer(norm1(x)) and x + FFN(norm2(x)), on tokens of an h x w map.

    ViT³ uses an MLP and no RoPE; H-ViT³ uses ConvFFN and rotates the queries and keys
    of the mixer (the TTT layer's SwiGLU branch) with a 2-D RoPE.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 mixer: str = "ttt", mixer_kwargs: dict | None = None, use_rope: bool = False,
                 conv_ffn: bool = False, drop: float = 0.0, drop_path: float = 0.0, norm_eps: float = 1e-6):
        super().__init__()
        self.cpe = TokenDWConv(dim)
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        # no state: its tables are computed for the h x w of each call
        self.rope = RoPE2d(dim) if use_rope else None
        self.attn = build_mixer(mixer, dim, num_heads, qkv_bias=qkv_bias, **(mixer_kwargs or {}))
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        hidden = int(dim * mlp_ratio)
        self.mlp = ConvFFN(dim, hidden, drop=drop) if conv_ffn else Mlp(dim, hidden, drop=drop)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        # x: [B, h*w, C] -> [B, h*w, C]
        x = x + self.cpe(x, h, w)
        x = x + self.drop_path(self.attn(self.norm1(x), h, w, self.rope))
        y = self.norm2(x)
        y = self.mlp(y, h, w) if isinstance(self.mlp, ConvFFN) else self.mlp(y)
        return x + self.drop_path(y)


class Stem(nn.Module):
    """Stride-4 conv stem of H-ViT³: 3x3 s2, 3x3, 3x3, 3x3 s2 (to 4C), 1x1 (to C), BatchNorm throughout."""

    def __init__(self, in_chans: int, dim: int):
        super().__init__()
        half = dim // 2
        self.conv = nn.Sequential(
            ConvNormAct(in_chans, half, 3, stride=2, bias=False),
            ConvNormAct(half, half, 3, bias=False),
            ConvNormAct(half, half, 3, bias=False),
            ConvNormAct(half, dim * 4, 3, stride=2, bias=False),
            ConvNormAct(dim * 4, dim, 1, bias=False, act=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)  # [B, 3, H, W] -> [B, C, H/4, W/4] (sides rounded up)


class PatchMerging(nn.Module):
    """MBConv-style downsampling: 1x1 expand to 4 C_out, 3x3 depthwise stride 2, 1x1 project + BN.

    As in the official model the first two convs have biases and ReLU but no norm.
    """

    def __init__(self, dim: int, dim_out: int, ratio: float = 4.0):
        super().__init__()
        hidden = int(dim_out * ratio)
        self.conv = nn.Sequential(
            ConvNormAct(dim, hidden, 1, norm=False),
            ConvNormAct(hidden, hidden, 3, stride=2, groups=hidden, norm=False),
            ConvNormAct(hidden, dim_out, 1, act=False),
        )

    def forward(self, x: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, int, int]:
        b, _, c = x.shape
        x = self.conv(x.reshape(b, h, w, c).permute(0, 3, 1, 2))  # [B, C_out, ceil(h/2), ceil(w/2)]
        h, w = x.shape[-2:]
        return x.flatten(2).transpose(1, 2), h, w


class Stage(nn.Module):
    """H-ViT³ stage: `depth` blocks at one resolution, then (except the last stage) patch merging."""

    def __init__(self, dim: int, dim_out: int | None, depth: int, num_heads: int, drop_path: list[float],
                 **block_kwargs):
        super().__init__()
        self.blocks = nn.ModuleList([
            Block(dim, num_heads, drop_path=drop_path[i], **block_kwargs) for i in range(depth)])
        self.downsample = PatchMerging(dim, dim_out) if dim_out else None
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, int, int]:
        x = _run_blocks(self.blocks, x, h, w, self.grad_checkpointing)  # [B, h*w, C]
        if self.downsample is not None:
            x, h, w = self.downsample(x, h, w)  # [B, h/2 * w/2, C_out]
        return x, h, w


#################################################################################
#                                    Models                                     #
#################################################################################

class _Classifier(nn.Module):
    """The timm classifier interface both models share: a Linear head (or none), forward = features + head."""

    in_chans: int  # image channels the model takes (timm reads it to adapt pretrained weights)
    num_classes: int
    num_features: int
    global_pool: str
    head: nn.Module

    def _make_head(self, num_classes: int, device=None, dtype=None) -> nn.Module:
        if num_classes == 0:
            return nn.Identity()
        return nn.Linear(self.num_features, num_classes, device=device, dtype=dtype)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """None beyond the 1-D parameters (norms, biases) that timm's optimizer factory exempts anyway:
        there is no position table or class token, and the official recipe decays the TTT inner weights."""
        return set()

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """New head for `num_classes` (0: none) on the model's device and in its dtype; global_pool 'avg',
        or '' for none (forward_head then keeps the spatial positions)."""
        if global_pool is not None:
            self.global_pool = _check_pool(global_pool)
        param = next(self.parameters())
        self.num_classes = num_classes
        self.head = self._make_head(num_classes, device=param.device, dtype=param.dtype)
        _init_weights(self.head)
        self.head.train(self.training)  # a new module is in training mode; an eval model stays in eval

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))  # [B, num_classes] or [B, num_features]


class ViT3(_Classifier):
    """ViT³: an isotropic vision transformer with a test-time-training token mixer.

    Args:
        img_size: default input size (any size whose sides divide by patch_size works).
        patch_size, in_chans, num_classes, embed_dim, depth, num_heads, mlp_ratio, qkv_bias: as in DeiT.
        global_pool: 'avg' (mean of the tokens) or '' (none: the head sees every token), timm's argument.
        mixer: token mixer for vit3.mixers.build_mixer ("ttt"; "attention" is the DeiT-style baseline).
        mixer_kwargs: passed to the mixer (TTT design options, attention impl).
        drop_rate: dropout in the MLPs (where the official model has it).
        drop_path_rate: stochastic depth, rising linearly to this value over the blocks.
    """

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int = 16, in_chans: int = 3,
                 num_classes: int = 1000, global_pool: str = "avg", embed_dim: int = 768, depth: int = 12,
                 num_heads: int = 12, mlp_ratio: float = 4.0, qkv_bias: bool = True, mixer: str = "ttt",
                 mixer_kwargs: dict | None = None, drop_rate: float = 0.0, drop_path_rate: float = 0.0):
        super().__init__()
        self.global_pool = _check_pool(global_pool)
        self.img_size = to_2tuple(img_size)
        self.in_chans, self.num_classes = in_chans, num_classes
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.grad_checkpointing = False

        # sizes are checked for divisibility only; the token grid follows the input
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, output_fmt="NHWC",
                                      strict_img_size=False)
        dpr = calculate_drop_path_rates(drop_path_rate, depth)
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, mixer=mixer, mixer_kwargs=mixer_kwargs,
                  drop=drop_rate, drop_path=dpr[i], norm_eps=1e-6)
            for i in range(depth)])
        self.feature_info = [dict(num_chs=embed_dim, reduction=patch_size, module=f"blocks.{i}") for i in range(depth)]
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = self._make_head(num_classes)
        self.apply(_init_weights)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        # timm's ViT grouping: the stem, one group per block (the final norm joins the last), then the head
        return dict(stem=r"^patch_embed", blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)  # [B, h, w, C]
        h, w = x.shape[1], x.shape[2]
        x = _run_blocks(self.blocks, x.flatten(1, 2), h, w, self.grad_checkpointing)  # [B, h*w, C]
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=1)  # [B, N, C] -> [B, C]
        return x if pre_logits else self.head(x)  # [B, num_classes], or [B, N, num_classes] unpooled

    def forward_intermediates(self, x: torch.Tensor, indices: int | list[int] | None = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False):
        """timm's feature API: the outputs of the blocks in `indices` (an int n: the last n; None: all), as
        [B, C, h, w] maps ("NLC": [B, h*w, C] tokens), passed through the final norm if `norm`.
        Returns the intermediates, or (forward_features' output, intermediates)."""
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        x = self.patch_embed(x)  # [B, h, w, C]
        h, w = x.shape[1], x.shape[2]
        x = x.flatten(1, 2)
        intermediates = []
        for i, blk in enumerate(self.blocks[:max_index + 1] if stop_early else self.blocks):
            x = _run_block(blk, x, h, w, self.grad_checkpointing)  # [B, h*w, C]
            if i in take_indices:
                y = self.norm(x) if norm else x
                intermediates.append(y if output_fmt == "NLC" else y.unflatten(1, (h, w)).permute(0, 3, 1, 2))
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the blocks after the last of `indices` (and the norm, the head): what features_only keeps."""
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices


class HViT3(_Classifier):
    """H-ViT³: a four-stage hierarchical vision transformer with a test-time-training token mixer.

    Args:
        img_size: default input size (any size works; stage maps are the stem's output halved
            with rounding up).
        in_chans, num_classes, mlp_ratio, qkv_bias, global_pool, mixer, mixer_kwargs: as in ViT3.
        embed_dims, depths, num_heads: per stage.
        drop_rate: dropout after the stem and in the ConvFFNs (where the official model has it).
        drop_path_rate: stochastic depth, rising linearly to this value over all blocks.
    """

    def __init__(self, img_size: int | tuple[int, int] = 224, in_chans: int = 3, num_classes: int = 1000,
                 global_pool: str = "avg", embed_dims: tuple[int, ...] = (64, 128, 320, 512),
                 depths: tuple[int, ...] = (1, 3, 9, 4), num_heads: tuple[int, ...] = (2, 4, 10, 16),
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, mixer: str = "ttt", mixer_kwargs: dict | None = None,
                 drop_rate: float = 0.0, drop_path_rate: float = 0.0):
        super().__init__()
        self.global_pool = _check_pool(global_pool)
        if not len(embed_dims) == len(depths) == len(num_heads):
            raise ValueError("embed_dims, depths and num_heads need one entry per stage")
        self.img_size = to_2tuple(img_size)
        self.in_chans, self.num_classes = in_chans, num_classes
        self.num_features = self.head_hidden_size = embed_dims[-1]

        self.patch_embed = Stem(in_chans, embed_dims[0])
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = calculate_drop_path_rates(drop_path_rate, sum(depths))
        self.layers = nn.ModuleList()
        for i, (dim, depth, heads) in enumerate(zip(embed_dims, depths, num_heads)):
            start = sum(depths[:i])
            self.layers.append(Stage(
                dim, embed_dims[i + 1] if i + 1 < len(embed_dims) else None, depth, heads,
                drop_path=dpr[start:start + depth], mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, mixer=mixer,
                mixer_kwargs=mixer_kwargs, use_rope=True, conv_ffn=True, drop=drop_rate,
                norm_eps=1e-5))  # the official H-ViT³ uses nn.LayerNorm's default eps
        # a stage's map is its last block's output (as tokens), before the patch merging that ends the stage
        self.feature_info = [dict(num_chs=dim, reduction=4 * 2 ** i, module=f"layers.{i}.blocks.{depth - 1}")
                             for i, (dim, depth) in enumerate(zip(embed_dims, depths))]
        self.norm = nn.BatchNorm1d(embed_dims[-1])
        self.head = self._make_head(num_classes)
        self.apply(_init_weights)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        # the stem, then each block (coarse: each stage); a stage's patch merging and the final norm join
        # the block before them, the head comes last (timm's Swin grouping, merging at the end of a stage)
        return dict(stem=r"^patch_embed", blocks=r"^layers\.(\d+)" if coarse else [
            (r"^layers\.(\d+)\.blocks\.(\d+)", None), (r"^layers\.(\d+)\.downsample", (99999,)), (r"^norm", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.layers:
            stage.grad_checkpointing = enable

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)  # [B, C0, H/4, W/4]
        h, w = x.shape[2], x.shape[3]
        x = self.pos_drop(x.flatten(2).transpose(1, 2))  # [B, h*w, C0]
        for stage in self.layers:
            x, h, w = stage(x, h, w)
        x = self.norm(x.transpose(1, 2))  # [B, C, h*w]; BatchNorm before pooling, as the official model
        return x.unflatten(2, (h, w))  # [B, C, h, w]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=(2, 3))  # [B, C, h, w] -> [B, C]
            return x if pre_logits else self.head(x)
        # unpooled: logits at every position, [B, num_classes, h, w]
        return x if pre_logits else self.head(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def forward_intermediates(self, x: torch.Tensor, indices: int | list[int] | None = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False):
        """timm's feature API: the maps of the stages in `indices` (an int n: the last n; None: all four),
        [B, C_i, H / 2^(i+2), W / 2^(i+2)] (sides rounded up), the last one through the final norm if
        `norm`. Returns the intermediates, or (forward_features' output, intermediates)."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        last = len(self.feature_info) - 1
        x = self.patch_embed(x)  # [B, C0, H/4, W/4]
        h, w = x.shape[2], x.shape[3]
        x = self.pos_drop(x.flatten(2).transpose(1, 2))  # [B, h*w, C0]
        intermediates = []
        for i, stage in enumerate(self.layers[:max_index + 1] if stop_early else self.layers):
            x = _run_blocks(stage.blocks, x, h, w, stage.grad_checkpointing)  # [B, h*w, C_i]
            if i in take_indices:
                y = x.transpose(1, 2)  # [B, C_i, h*w]
                intermediates.append((self.norm(y) if norm and i == last else y).unflatten(2, (h, w)))
            if stage.downsample is not None:
                x, h, w = stage.downsample(x, h, w)  # [B, h/2 * w/2, C_i+1]
        if intermediates_only:
            return intermediates
        return self.norm(x.transpose(1, 2)).unflatten(2, (h, w)), intermediates

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the stages after the last of `indices` (and the norm, the head): what features_only keeps."""
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        self.layers = self.layers[:max_index + 1]
        self.layers[-1].downsample = None  # its output would feed a dropped stage
        if prune_norm or max_index < len(self.feature_info) - 1:  # the norm is for the last stage's channels
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices


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


# the official ImageNet-1k weights (weights.fetch_pretrained downloads them)
default_cfgs = generate_default_cfgs({
    **{f"{name}.official_in1k": _cfg(OFFICIAL_WEIGHTS[name], "patch_embed.proj", (14, 14))
       for name in MODEL_NAMES[:3]},
    **{f"{name}.official_in1k": _cfg(OFFICIAL_WEIGHTS[name], "patch_embed.conv.0.conv", (7, 7))
       for name in MODEL_NAMES[3:]},
})


def _create(variant: str, model_cls: type, pretrained: bool, model_args: dict, **kwargs) -> nn.Module:
    if pretrained:  # a url in the cfg becomes a file in the torch hub cache
        kwargs = fetch_pretrained(variant, kwargs)
    kwargs = dict(model_args, **kwargs)
    device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)
    # parameters are made on `device` (meta too), not moved there
    with torch.device(device) if device is not None else nullcontext(), official_file_globals():
        model = build_model_with_cfg(model_cls, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                     feature_cfg=dict(out_indices=4 if model_cls is HViT3 else 3, feature_cls="getter"),
                                     **kwargs)
    # timm's data config (resolve_data_config) then uses the size the model was built for
    img_size = to_2tuple(kwargs.get("img_size", 224))
    stride = kwargs["patch_size"] if model_cls is ViT3 else 32  # H-ViT³ rounds each halving up
    model.pretrained_cfg.update(input_size=(kwargs.get("in_chans", 3), *img_size),
                                pool_size=tuple(-(-side // stride) for side in img_size))
    return model.to(dtype=dtype) if dtype is not None else model


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
