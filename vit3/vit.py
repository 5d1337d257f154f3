"""ViT³: DeiT with the attention replaced by a test-time-training layer (vit3.ttt.TTT).

Paper: `ViT³: Unlocking Test-Time Training in Vision` - https://arxiv.org/abs/2512.01643
Official code: https://github.com/LeapLabTHU/ViTTT

16x16 patches, one resolution throughout, no class token and no absolute position
embedding. Each block adds a 3x3 depthwise-conv position encoding (CPE) to its input,
then the pre-norm TTT and MLP residuals; the tokens are averaged for the head. The block,
the init and the timm classifier interface here are shared with H-ViT³ (hvit.py); the
timm registration and the size registry are in models.py.
"""
import torch
import torch.nn as nn
from timm.layers import DropPath, Mlp, PatchEmbed, calculate_drop_path_rates, to_2tuple, trunc_normal_
from timm.models._features import feature_take_indices  # what timm's own models use; not re-exported
from torch.utils.checkpoint import checkpoint

from .layers import ConvFFN, RoPE2d, TokenDWConv
from .mixers import build_mixer

__all__ = ["Block", "ViT3"]


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
