"""Fast TTT inner loop for the paper's design: closed-form gradients, custom backward.

Inner models: simplified SwiGLU per head, f(x) = (x W1) * silu(x W2), and a 3x3
depthwise conv; dot loss L = -scale * mean_n <f(k_n), v_n>; one full-batch step,
each gradient divided by (its norm + 1).

With e = dL/df(k) = -scale / N * v, the inner gradients are

  g1 = K^T (e * silu(K W2))                 [B, H, d, d]
  g2 = K^T (e * (K W1) * silu'(K W2))
  g3[o] = sum_p e[p] k[p + o]               [B, 3, 3, c], o one of the 9 offsets

and the trained models are applied to the queries. The forward keeps only its
inputs and the d x d / 3 x 3 weight tensors; every N-sized intermediate is
recomputed in the backward, which is derived by hand below (the outer loop
differentiates through the inner step, so second derivatives of silu appear).
Memory is therefore that of the inputs, linear in N.

The conv branch works in channels-last maps [B, h, w, c] (what the qkv
projection produces, no permute) as 9 shifted multiply-adds, which is cheaper
than a grouped convolution with one group per sample and channel.
"""
import torch
import torch.nn.functional as F

OFFSETS = [(i, j) for i in range(3) for j in range(3)]


def _silu_grads(z: torch.Tensor):
    """silu(z), silu'(z), silu''(z)."""
    s = torch.sigmoid(z)
    d1 = s * (1 + z * (1 - s))
    d2 = s * (1 - s) * (2 + z * (1 - 2 * s))
    return z * s, d1, d2


def _norm_backward(g: torch.Tensor, n: torch.Tensor, du: torch.Tensor, dims) -> torch.Tensor:
    """Gradient through u = g / (n + 1), n = ||g|| over dims, given du."""
    dot = (g * du).sum(dim=dims, keepdim=True)
    return du / (n + 1) - g * dot / ((n + 1) ** 2 * n.clamp_min(torch.finfo(g.dtype).tiny))


def _shift(x: torch.Tensor, i: int, j: int, h: int, w: int) -> torch.Tensor:
    """Window of a padded map [B, h+2, w+2, c] at offset (i, j): [B, h, w, c]."""
    return x[:, i:i + h, j:j + w]


def _dwconv(xp: torch.Tensor, wt: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Per-sample 3x3 depthwise cross-correlation. xp: [B, h+2, w+2, c] padded, wt: [B, 3, 3, c]."""
    out = None
    for i, j in OFFSETS:
        term = _shift(xp, i, j, h, w) * wt[:, i, j, None, None]
        out = term if out is None else out.add_(term)
    return out


def _correlate(xp: torch.Tensor, y: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """sum_p y[p] x[p + o] for the 9 offsets o. xp: [B, h+2, w+2, c], y: [B, h, w, c] -> [B, 3, 3, c]."""
    return torch.stack([(_shift(xp, i, j, h, w) * y).sum(dim=(1, 2)) for i, j in OFFSETS], 1).unflatten(1, (3, 3))


def _scatter_shifts(wt: torch.Tensor, y: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Adjoint of _dwconv in its input: sum_o wt[o] y[p - o], cropped to the map. -> [B, h, w, c]."""
    b, _, _, c = y.shape
    out = y.new_zeros(b, h + 2, w + 2, c)
    for i, j in OFFSETS:
        _shift(out, i, j, h, w).add_(y * wt[:, i, j, None, None])
    return out[:, 1:h + 1, 1:w + 1]


def _pad(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """[B, N, c] tokens -> zero-padded map [B, h+2, w+2, c]."""
    return F.pad(x.unflatten(1, (h, w)), (0, 0, 1, 1, 1, 1))


class _TTTFast(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q1, k1, v1, q2, k2, v2, w1, w2, w3, h, w, scale, lr):
        b, n, heads, d = q1.shape
        coef = -scale / n
        # ---- branch 1: SwiGLU per head, tensors [B, H, N, d] ----
        q, k, v = (t.transpose(1, 2) for t in (q1, k1, v1))
        z1, z2 = k @ w1, k @ w2
        a, ds, _ = _silu_grads(z2)
        e = v * coef
        kt = k.transpose(-2, -1)
        g1 = kt @ (e * a)  # [B, H, d, d]
        g2 = kt @ (e * z1 * ds)
        del z1, z2, a, ds, e
        n1, n2 = g1.norm(dim=-2, keepdim=True), g2.norm(dim=-2, keepdim=True)
        w1n = w1 - lr * g1 / (n1 + 1)
        w2n = w2 - lr * g2 / (n2 + 1)
        y1, y2 = q @ w1n, q @ w2n
        out1 = y1 * F.silu(y2)  # [B, H, N, d]
        del y1, y2

        # ---- branch 2: 3x3 depthwise conv on channels-last maps [B, h, w, c] ----
        kp, qp = _pad(k2, h, w), _pad(q2, h, w)
        e2 = v2.unflatten(1, (h, w)) * coef
        g3 = _correlate(kp, e2, h, w)  # [B, 3, 3, c]
        n3 = g3.norm(dim=(1, 2), keepdim=True)
        w3n = w3.squeeze(1).permute(1, 2, 0) - lr * g3 / (n3 + 1)  # [c, 1, 3, 3] -> [B, 3, 3, c]
        out2 = _dwconv(qp, w3n, h, w)  # [B, h, w, c]

        ctx.save_for_backward(q1, k1, v1, q2, k2, v2, w1, w2, g1, g2, n1, n2, w1n, w2n, g3, n3, w3n)
        ctx.hw, ctx.scale, ctx.lr = (h, w), scale, lr
        return torch.cat([out1.transpose(1, 2).reshape(b, n, heads * d), out2.flatten(1, 2)], dim=-1)

    @staticmethod
    def backward(ctx, dout):
        q1, k1, v1, q2, k2, v2, w1, w2, g1, g2, n1, n2, w1n, w2n, g3, n3, w3n = ctx.saved_tensors
        (h, w), lr = ctx.hw, ctx.lr
        b, n, heads, d = q1.shape
        coef = -ctx.scale / n
        do1 = dout[..., :heads * d].unflatten(-1, (heads, d)).transpose(1, 2)  # [B, H, N, d]
        do2 = dout[..., heads * d:].unflatten(1, (h, w))  # [B, h, w, c]

        # ---- branch 1: through the application to q ----
        q, k, v = (t.transpose(1, 2) for t in (q1, k1, v1))
        y1, y2 = q @ w1n, q @ w2n
        sy2, dsy2, _ = _silu_grads(y2)
        dy1, dy2 = do1 * sy2, do1 * y1 * dsy2
        del y1, y2, sy2, dsy2
        dq = dy1 @ w1n.transpose(-2, -1) + dy2 @ w2n.transpose(-2, -1)
        qt = q.transpose(-2, -1)
        dw1n, dw2n = qt @ dy1, qt @ dy2  # [B, H, d, d]
        del dy1, dy2
        # through w' = w - lr * g / (||g|| + 1)
        dg1 = -lr * _norm_backward(g1, n1, dw1n, dims=-2)
        dg2 = -lr * _norm_backward(g2, n2, dw2n, dims=-2)
        # through g1 = K^T (e * a) and g2 = K^T (e * z1 * ds), a = silu(z2), ds = silu'(z2)
        z1, z2 = k @ w1, k @ w2
        a, ds, dds = _silu_grads(z2)
        e = v * coef
        p1, p2 = k @ dg1, k @ dg2  # d(e * a) and d(e * z1 * ds)
        de = p1 * a + p2 * z1 * ds
        dz1 = p2 * e * ds
        dz2 = p1 * e * ds + p2 * e * z1 * dds
        dk = (e * a) @ dg1.transpose(-2, -1) + (e * z1 * ds) @ dg2.transpose(-2, -1)
        del a, ds, dds, p1, p2, z1, z2
        dk = dk + dz1 @ w1.transpose(-2, -1) + dz2 @ w2.transpose(-2, -1)
        kt = k.transpose(-2, -1)
        dw1 = (dw1n + kt @ dz1).sum(0, keepdim=True)
        dw2 = (dw2n + kt @ dz2).sum(0, keepdim=True)
        dv = de * coef

        # ---- branch 2 ----
        kp, qp = _pad(k2, h, w), _pad(q2, h, w)
        dq2 = _scatter_shifts(w3n, do2, h, w)
        dw3n = _correlate(qp, do2, h, w)  # [B, 3, 3, c]
        dg3 = -lr * _norm_backward(g3, n3, dw3n, dims=(1, 2))
        e2 = v2.unflatten(1, (h, w)) * coef
        dv2 = _dwconv(kp, dg3, h, w) * coef  # de2[p] = sum_o dg3[o] k[p + o]
        dk2 = _scatter_shifts(dg3, e2, h, w)
        dw3 = dw3n.sum(0).permute(2, 0, 1).unsqueeze(1)  # [c, 1, 3, 3]

        tok = lambda t: t.transpose(1, 2)  # [B, H, N, d] -> [B, N, H, d]
        return (tok(dq), tok(dk), tok(dv), dq2.flatten(1, 2), dk2.flatten(1, 2), dv2.flatten(1, 2),
                dw1, dw2, dw3, None, None, None, None)


def ttt_fast(q1, k1, v1, q2, k2, v2, w1, w2, w3, *, h, w, scale, lr):
    """The paper's TTT inner step; same arguments and result as reference.ttt_reference.

    q1/k1/v1: [B, N, H, d], q2/k2/v2: [B, N, c], w1/w2: [1, H, d, d], w3: [c, 1, 3, 3].
    Returns [B, N, H*d + c].
    """
    return _TTTFast.apply(q1, k1, v1, q2, k2, v2, w1, w2, w3, h, w, scale, lr)
