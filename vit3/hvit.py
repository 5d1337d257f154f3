"""H-ViT³: the hierarchical ViT³.

Paper: `ViT³: Unlocking Test-Time Training in Vision` - https://arxiv.org/abs/2512.01643
Official code: https://github.com/LeapLabTHU/ViTTT

A stride-4 conv stem, four stages at strides 4/8/16/32 joined by MBConv-style patch
merging, 2-D RoPE on the queries and keys of the TTT layer's SwiGLU branch, a ConvFFN
instead of the MLP, and BatchNorm before the average pooling. Every stage uses the TTT
mixer (there is no window attention). Blocks, init and the classifier interface are
ViT³'s (vit.py).
"""
from collections import OrderedDict

import torch
import torch.nn as nn
from timm.layers import calculate_drop_path_rates, to_2tuple
from timm.models._features import feature_take_indices  # what timm's own models use; not re-exported

from .vit import Block, _check_pool, _Classifier, _init_weights, _run_blocks

__all__ = ["HViT3"]


#################################################################################
#                                    Blocks                                     #
#################################################################################

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
#                                    Model                                      #
#################################################################################

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
