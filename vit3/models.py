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

The models are registered with timm: after `import vit3`, `timm.create_model("vit3_small")`.
"""
from collections import OrderedDict
from collections.abc import Mapping
from os import PathLike
from typing import NamedTuple
from unittest.mock import patch

import timm
import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, Mlp, PatchEmbed, calculate_drop_path_rates, to_2tuple, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch.utils.checkpoint import checkpoint
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from .layers import ConvFFN, RoPE2d, TokenDWConv
from .mixers import build_mixer
from .ttt import TTT

__all__ = ["ViT3", "HViT3", "MODEL_NAMES", "create_model", "load_official_checkpoint", "complexity", "Complexity"]

MODEL_NAMES = ("vit3_tiny", "vit3_small", "vit3_base", "hvit3_tiny", "hvit3_small", "hvit3_base")

# where the official weights are published (README of the official code); nothing here downloads them
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


def _run_blocks(blocks: nn.ModuleList, x: torch.Tensor, h: int, w: int, grad_checkpointing: bool) -> torch.Tensor:
    for blk in blocks:
        if grad_checkpointing and torch.is_grad_enabled():
            x = checkpoint(blk, x, h, w, use_reentrant=False)
        else:
            x = blk(x, h, w)
    return x


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

    num_classes: int
    num_features: int
    head: nn.Module

    def _make_head(self, num_classes: int) -> nn.Module:
        return nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """New head for `num_classes` (0: the model returns pooled features). Pooling is always 'avg'."""
        if global_pool not in (None, "avg"):
            raise ValueError(f"only global_pool='avg' is supported, got {global_pool!r}")
        self.num_classes = num_classes
        self.head = self._make_head(num_classes)
        _init_weights(self.head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))  # [B, num_classes] or [B, num_features]


class ViT3(_Classifier):
    """ViT³: an isotropic vision transformer with a test-time-training token mixer.

    Args:
        img_size: default input size (any size whose sides divide by patch_size works).
        patch_size, in_chans, num_classes, embed_dim, depth, num_heads, mlp_ratio, qkv_bias: as in DeiT.
        global_pool: only 'avg' (mean of the tokens), timm's argument name.
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
        if global_pool != "avg":
            raise ValueError(f"only global_pool='avg' is supported, got {global_pool!r}")
        self.img_size = to_2tuple(img_size)
        self.num_classes = num_classes
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
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = self._make_head(num_classes)
        self.apply(_init_weights)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)  # [B, h, w, C]
        _, h, w, _ = x.shape
        x = _run_blocks(self.blocks, x.flatten(1, 2), h, w, self.grad_checkpointing)  # [B, h*w, C]
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean(dim=1)  # [B, N, C] -> [B, C]
        return x if pre_logits else self.head(x)


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
        if global_pool != "avg":
            raise ValueError(f"only global_pool='avg' is supported, got {global_pool!r}")
        if not len(embed_dims) == len(depths) == len(num_heads):
            raise ValueError("embed_dims, depths and num_heads need one entry per stage")
        self.img_size = to_2tuple(img_size)
        self.num_classes = num_classes
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
        self.norm = nn.BatchNorm1d(embed_dims[-1])
        self.head = self._make_head(num_classes)
        self.apply(_init_weights)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.layers:
            stage.grad_checkpointing = enable

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)  # [B, C0, H/4, W/4]
        _, _, h, w = x.shape
        x = self.pos_drop(x.flatten(2).transpose(1, 2))  # [B, h*w, C0]
        for stage in self.layers:
            x, h, w = stage(x, h, w)
        x = self.norm(x.transpose(1, 2))  # [B, C, h*w]; BatchNorm before pooling, as the official model
        return x.unflatten(2, (h, w))  # [B, C, h, w]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean(dim=(2, 3))  # [B, C, h, w] -> [B, C]
        return x if pre_logits else self.head(x)


#################################################################################
#                         Official checkpoints, complexity                      #
#################################################################################

class _ConfigAsDict:
    """Stands in for yacs' CfgNode, which the official trainer pickles into its checkpoints
    under 'config': with it the file loads with weights_only=True (no code runs) and without
    yacs installed, the config coming back as nested OrderedDicts."""

    def __new__(cls, *args):
        return OrderedDict()


def load_official_checkpoint(model: nn.Module, checkpoint: str | PathLike | Mapping, *, ema: bool = False) -> nn.Module:
    """Load official ViT³ / H-ViT³ weights into `model`, strictly; returns the model.

    checkpoint: a file as saved by the official trainers ({'model': state_dict, 'optimizer': ...,
    'config': ...}; H-ViT³'s main_ema.py adds the EMA weights as 'state_dict_ema'), or such a
    dict, or a bare state dict. Files load with weights_only=True. `ema=True` takes
    'state_dict_ema'. The stored RoPE tables (`*.rope.rotations`) are dropped: ours are
    computed for each input. The head must match (num_classes=1000): load first, then
    `reset_classifier` to fine-tune.
    """
    if not isinstance(checkpoint, Mapping):
        with torch.serialization.safe_globals([(_ConfigAsDict, "yacs.config.CfgNode")]):
            checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=True)
    key = "state_dict_ema" if ema else "model"
    if ema and key not in checkpoint:
        raise KeyError(f"ema=True but the checkpoint has no {key!r} entry (keys: {sorted(checkpoint)})")
    state_dict = checkpoint.get(key, checkpoint)
    state_dict = {k: v for k, v in state_dict.items() if not k.endswith("rope.rotations")}
    model.load_state_dict(state_dict, strict=True)
    return model


class Complexity(NamedTuple):
    params: int
    macs: int  # multiply-accumulates, what the paper (like most vision papers) calls FLOPs

    def __str__(self) -> str:
        return f"{self.params / 1e6:.2f}M params, {self.macs / 1e9:.2f} GMACs"


def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    # torch's counter knows the CUDA attention kernels but not the CPU one
    return sdpa_flop_count(query_shape, key_shape, value_shape)


@torch.no_grad()
def complexity(model: nn.Module, img_size: int | tuple[int, int] | None = None, in_chans: int = 3) -> Complexity:
    """Parameters and multiply-accumulates for one image (default size: the model's img_size).

    Counted like the paper's FLOPs: torch's FlopCounterMode (every matmul, linear,
    convolution and attention kernel of a forward) halved, except the TTT inner step,
    which is hidden from the counter and counted analytically (TTT.inner_macs): its
    kernels (batched GEMMs, grouped-convolution weight gradients) are counted differently
    by different torch versions. Norms, activations and other elementwise work are not
    counted. On the official models the counter gives 1.219 G for ViT³-T at 224 (it sees
    the conv that applies the trained inner conv, not the elementwise inner gradient);
    this count is 0.06% higher.
    """
    h, w = to_2tuple(img_size or model.img_size)
    param = next(model.parameters())
    x = torch.zeros(1, in_chans, h, w, device=param.device, dtype=param.dtype)
    inner_macs = []

    def counted_forward(module: TTT, x: torch.Tensor, h: int, w: int, rope=None) -> torch.Tensor:
        qkv = module.qkv(x)
        inner_macs.append(qkv.shape[0] * module.inner_macs(qkv.shape[1]))
        return module.proj(qkv.new_zeros(*qkv.shape[:2], module.proj.in_features))

    counter = FlopCounterMode(display=False, custom_mapping={
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops})
    was_training = model.training
    model.eval()  # BatchNorm statistics untouched, no stochastic depth
    try:
        with patch.object(TTT, "forward", counted_forward), counter:
            model(x)
    finally:
        model.train(was_training)
    return Complexity(sum(p.numel() for p in model.parameters()), counter.get_total_flops() // 2 + sum(inner_macs))


#################################################################################
#                                timm registry                                  #
#################################################################################

def _cfg(**kwargs) -> dict:
    # the official evaluation: resize to 256/224 of the size, center crop, bicubic, ImageNet mean/std
    return {"num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None, "crop_pct": 0.875,
            "interpolation": "bicubic", "fixed_input_size": False, "mean": IMAGENET_DEFAULT_MEAN,
            "std": IMAGENET_DEFAULT_STD, "classifier": "head", "license": "mit", **kwargs}


default_cfgs = generate_default_cfgs({
    **{name: _cfg(first_conv="patch_embed.proj") for name in MODEL_NAMES[:3]},
    **{name: _cfg(first_conv="patch_embed.conv.0.conv") for name in MODEL_NAMES[3:]},
})


def _create(variant: str, model_cls: type, pretrained: bool, model_args: dict, **kwargs) -> nn.Module:
    if pretrained:
        raise RuntimeError(
            f"vit3 downloads no weights. Build {variant} with pretrained=False, download the official "
            f"checkpoint ({OFFICIAL_WEIGHTS[variant]}) and load it with "
            f"vit3.load_official_checkpoint(model, path).")
    model = build_model_with_cfg(model_cls, variant, pretrained=False, **dict(model_args, **kwargs))
    # timm's data config (resolve_data_config) then uses the size the model was built for
    model.pretrained_cfg["input_size"] = (kwargs.get("in_chans", 3), *model.img_size)
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
