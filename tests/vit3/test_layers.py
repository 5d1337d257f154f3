"""vit3.layers: 2-D RoPE against the complex-number formula, and relative."""
import torch

from tests.vit3.ttt.test_layer import rel
from vit3 import RoPE2d


def test_rope_is_relative_and_matches_complex_formula():
    torch.manual_seed(0)
    dim, h, w = 8, 4, 6
    rope = RoPE2d(dim)
    x = torch.randn(2, h, w, dim, dtype=torch.float64)
    k_max = dim // 4
    theta = 10000.0 ** (-torch.arange(k_max, dtype=torch.float64) / k_max)
    ii, jj = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    angles = torch.cat([ii[..., None] * theta, jj[..., None] * theta], -1)  # [h, w, C/2]
    expected = torch.view_as_real(torch.view_as_complex(x.reshape(2, h, w, dim // 2, 2)) * torch.polar(
        torch.ones_like(angles), angles)).reshape(2, h, w, dim)
    assert rel(rope(x), expected) < 1e-12
    # <rope(q)_p, rope(k)_p'> depends on p - p' only
    q, k = torch.randn(dim, dtype=torch.float64), torch.randn(dim, dtype=torch.float64)
    rq, rk = rope(q.expand(1, h, w, dim)), rope(k.expand(1, h, w, dim))
    assert torch.allclose((rq[0, 1, 2] * rk[0, 0, 1]).sum(), (rq[0, 3, 5] * rk[0, 2, 4]).sum())
