"""vit3.mixers: the attention baselines (SDPA against materialised, linear attention against its formula) and the
one interface every mixer shares."""
import pytest
import torch
import torch.nn.functional as F

from vit3 import RoPE2d
from vit3.mixers import Attention, LinearAttention, build_mixer


def test_attention_impls_agree_and_linear_attention_formula():
    torch.manual_seed(0)
    attn = Attention(16, 2)
    x = torch.randn(2, 12, 16)
    sdpa = attn(x, 3, 4)
    attn.impl = "math"
    assert torch.allclose(sdpa, attn(x, 3, 4), atol=1e-5)

    lin = LinearAttention(16, 2)
    q, k, v = lin.qkv(x).view(2, 12, 3, 2, 8).permute(2, 0, 3, 1, 4)
    q, k = F.elu(q) + 1, F.elu(k) + 1
    weights = q @ k.transpose(-2, -1)  # unnormalised attention, [B, H, N, N]
    expected = (weights / weights.sum(-1, keepdim=True)) @ v
    assert torch.allclose(lin(x, 3, 4), lin.proj(expected.transpose(1, 2).reshape(2, 12, 16)), atol=1e-5)


@pytest.mark.parametrize("name", ["ttt", "attention", "linear_attention"])
def test_mixers_share_the_interface(name):
    mixer = build_mixer(name, 16, 2)
    x = torch.randn(2, 12, 16)
    assert mixer(x, 3, 4, RoPE2d(16)).shape == (2, 12, 16)
