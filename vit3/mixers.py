"""Token mixers with one interface, `forward(x, h, w, rope=None)` on x [B, h*w, C].

`ttt` is the ViT³ layer; `attention` (softmax, the DeiT / DiT baseline) and
`linear_attention` are the baselines the paper compares against, so a baseline
is the same model with another mixer name.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import autocast_off
from .ttt import TTT

MIXERS = ("ttt", "attention", "linear_attention")


class Attention(nn.Module):
    """Multi-head softmax attention, parameter names as timm's (`qkv`, `proj`).

    impl="sdpa" uses F.scaled_dot_product_attention (flash / memory-efficient
    kernels, O(N) memory); impl="math" materialises the N x N attention matrix
    as the original DeiT does, which is what the paper's speed comparison used.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, impl: str = "sdpa"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        if impl not in ("sdpa", "math"):
            raise ValueError(f"attention impl must be 'sdpa' or 'math', got {impl!r}")
        self.num_heads = num_heads
        self.impl = impl
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, h: int, w: int, rope=None) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        if rope is not None:  # rope acts on [B, h, w, C]
            q = rope(q.transpose(1, 2).reshape(b, h, w, c)).view(b, n, self.num_heads, -1).transpose(1, 2)
            k = rope(k.transpose(1, 2).reshape(b, h, w, c)).view(b, n, self.num_heads, -1).transpose(1, 2)
        if self.impl == "sdpa":
            x = F.scaled_dot_product_attention(q, k, v)  # [B, heads, N, d]
        else:
            attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # [B, heads, N, N]
            x = attn.softmax(dim=-1) @ v
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class LinearAttention(nn.Module):
    """Non-causal linear attention with the elu + 1 feature map (Katharopoulos et al. 2020).

    out_i = phi(q_i) (sum_j phi(k_j)^T v_j) / (phi(q_i) . sum_j phi(k_j)); O(N d^2).
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, h: int, w: int, rope=None) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k = F.elu(q) + 1.0, F.elu(k) + 1.0  # positive features, [B, heads, N, d]
        if rope is not None:  # rotate after the feature map so the normaliser stays positive
            q_rot = rope(q.transpose(1, 2).reshape(b, h, w, c)).view(b, n, self.num_heads, -1).transpose(1, 2)
            k_rot = rope(k.transpose(1, 2).reshape(b, h, w, c)).view(b, n, self.num_heads, -1).transpose(1, 2)
        else:
            q_rot, k_rot = q, k
        # reductions over tokens in float32: sums of N positive terms overflow / lose bits in half precision
        with autocast_off(x.device):
            kv = k_rot.float().transpose(-2, -1) @ v.float() / n  # [B, heads, d, d]
            z = q.float() @ k.float().mean(dim=2, keepdim=True).transpose(-2, -1)  # [B, heads, N, 1]
            x = (q_rot.float() @ kv) / (z + 1e-6)
        return self.proj(x.to(v.dtype).transpose(1, 2).reshape(b, n, c))


def build_mixer(name: str, dim: int, num_heads: int, qkv_bias: bool = True, **kwargs) -> nn.Module:
    """Mixer by name; kwargs go to the mixer (TTT design options, attention impl)."""
    if name == "ttt":
        return TTT(dim, num_heads, qkv_bias=qkv_bias, **kwargs)
    if name == "attention":
        return Attention(dim, num_heads, qkv_bias=qkv_bias, **kwargs)
    if name == "linear_attention":
        return LinearAttention(dim, num_heads, qkv_bias=qkv_bias, **kwargs)
    raise ValueError(f"unknown mixer {name!r}; choose one of {MIXERS}")
