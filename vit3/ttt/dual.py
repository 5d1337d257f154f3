"""The SwiGLU branch of the TTT inner step in dual form, for images of few tokens.

The primal form (fast.py) builds each sample's trained inner weights W' = W - lr g / (||g|| + 1),
a d x 2d matrix per sample and head, and applies them to the queries: its cost and its memory
traffic grow with d^2 per sample, however few the tokens. With g = K^T P it never needs W'
itself (the kernel trick, as the dual form of TTT-Linear, https://arxiv.org/abs/2407.04620):

  Q W'       = Q W - lr (Q K^T) P diag(1 / (||g|| + 1))
  ||g_j||^2  = P_j^T (K K^T) P_j                           (per output column j)

so one sample's inner step is two N x N Gram matrices, S = Q K^T and G = K K^T, and products
with them; W enters only through Q W and K W, which are shared by all samples and run as one
GEMM per head over the whole batch. Its per-sample products cost about 6 N^2 d
multiply-accumulates where the primal form's cost 4 N d^2, and no elementwise pass touches a
d x 2d tensor; measured, it is the faster form up to about N = d (fast.use_dual picks;
benchmarks/bench_small.py).

Everything is laid out head-major, [H, B, rows, d], with the queries' rows stacked on the keys'
([Q; K]: 2N rows), so that [Q; K] W, [Q; K] K^T = [S; G] and [S; G] P are one batched product
each. Notation as fast.py: P = coef [v silu(z2) | v z1 silu'(z2)] = dL/dW's token factor
([N, 2d]), Z = [z1 | z2] = K W, coef = -scale / N.

Backward, with R = diag(lr / (||g|| + 1)) and dY the gradient of Y = Q W - S P R:
  dR gives dm_j = r_j t_j / (2 n_j (n_j + 1)), t_j = sum_i dY_ij (S P)_ij, m = n^2
  dP = -S^T dY R + 2 (G P) diag(dm)
  [dS; 2 dG] = [-dY R; 2 P diag(dm)] P^T,  dQ += dS K,  dK += dS^T Q + 2 dG K = [dS; 2 dG]^T [Q; K]
  dZ from dP through P's silu terms, then dQ, dK += [dY; dZ] W^T and dW = [Q; K]^T [dY; dZ]
(G and dG are symmetric.) The forward keeps its products for the backward, about 3.5x the qkv
projection (more than the primal form keeps, but only images of at most d tokens take this
form), so the backward repeats no product.
"""
import torch
import torch.nn.functional as F

from ..layers import rotate_pairs


def _rows(x: torch.Tensor, dtype: torch.dtype, rope) -> torch.Tensor:
    """A [B, H, N, d] view as [H, B, N, d] in the compute dtype, rotated if rope (cos, sin: [H, 1, N, d/2])."""
    x = x.transpose(0, 1).to(dtype)
    return x if rope is None else rotate_pairs(x, *rope)


def _load(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dtype: torch.dtype, rope):
    """[Q; K]: [H, B, 2N, d] (rotated) and V: [H, B, N, d], contiguous, in the compute dtype."""
    b, heads, n, d = q.shape
    qk = torch.empty(heads, b, 2 * n, d, dtype=dtype, device=q.device)
    qk[:, :, :n] = _rows(q, dtype, rope)
    qk[:, :, n:] = _rows(k, dtype, rope)
    return qk, _rows(v, dtype, None).contiguous()


def _gram_products(qk: torch.Tensor, p: torch.Tensor):
    """[S; G] = [Q; K] K^T: [H*B, 2N, N] and [S P; G P]: [H, B, 2N, 2d] for [Q; K] [H, B, 2N, d], P [H, B, N, 2d]."""
    heads, b, rows, d = qk.shape
    n = rows // 2
    flat = qk.view(heads * b, rows, d)
    sg = torch.bmm(flat, flat[:, n:].transpose(1, 2))
    return sg, torch.bmm(sg, p.view(heads * b, n, -1)).view(heads, b, rows, -1)


def _column_norms(p: torch.Tensor, gp: torch.Tensor) -> torch.Tensor:
    """||g_j|| = sqrt(P_j^T G P_j): [H, B, 1, 2d] (clamped at 0 against rounding)."""
    return (p * gp).sum(2, keepdim=True).clamp_min_(0).sqrt_()


def swiglu_forward(q, k, v, w12, rope, coef: float, lr: float, out1: torch.Tensor):
    """Writes out1 = (Q W1') * silu(Q W2') ([B, H, N, d] view) for q, k, v: [B, H, N, d] views,
    w12 = [W1 | W2]: [1, H, d, 2d] in the compute dtype, rope: None or (cos, sin) [H, N, d/2].

    Returns what the backward reads: [Q; K], V, [Q W; K W], [S; G], [S P; G P] and the norms (all
    N-sized, about 3.5x qkv), so that the backward repeats no product."""
    b, heads, n, d = q.shape
    rope = None if rope is None else tuple(t.unsqueeze(1) for t in rope)
    qk, v = _load(q, k, v, w12.dtype, rope)
    zz = torch.bmm(qk.view(heads, 2 * b * n, d), w12[0]).view(heads, b, 2 * n, 2 * d)  # [Q W; K W]
    z1, z2 = zz[:, :, n:, :d], zz[:, :, n:, d:]
    p = torch.empty(heads, b, n, 2 * d, dtype=w12.dtype, device=q.device)
    torch.mul(F.silu(z2), v, out=p[..., :d])
    p[..., d:] = torch.ops.aten.silu_backward(v, z2).mul_(z1)  # v z1 silu'(z2)
    p.mul_(coef)
    sg, spgp = _gram_products(qk, p)
    norms = _column_norms(p, spgp[:, :, n:])
    y = torch.addcdiv(zz[:, :, :n], spgp[:, :, :n], norms + 1, value=-lr)  # Q W' = Q W - lr S P / (||g|| + 1)
    torch.mul(y[..., :d], F.silu(y[..., d:], inplace=True), out=out1.transpose(0, 1))
    return qk, v, zz, sg, spgp, norms


def swiglu_backward(dq, dk, dv, dout1, w12, saved, rope, coef: float, lr: float, out1: torch.Tensor):
    """Gradients of the SwiGLU branch from the forward's `saved`: writes dq, dk, dv ([B, H, N, d] views)
    and the recomputed out1; returns dW12: [1, H, d, 2d]."""
    qk, v, zz, sg, spgp, norms = saved
    heads, b, n, d = v.shape
    hb = heads * b
    rope = None if rope is None else tuple(t.unsqueeze(1) for t in rope)
    do = _rows(dout1, w12.dtype, None)  # [H, B, N, d]
    w = w12[0]  # [H, d, 2d]

    # ---- Y again, the silu terms of Z = K W, and P ----
    z1, z2 = zz[:, :, n:, :d], zz[:, :, n:, d:]
    s = torch.sigmoid(z2)
    a = z2 * s  # silu(z2)
    ds = (z2 - a).add_(1).mul_(s)  # silu'(z2) = s (1 + z2 (1 - s))
    dds = torch.mul(s, -2).add_(1).mul_(z2).add_(2).mul_(s).mul_(s.neg_().add_(1))  # s (1-s) (2 + z2 (1-2s))
    vds = v * ds
    p = torch.empty(heads, b, n, 2 * d, dtype=w.dtype, device=w.device)
    torch.mul(a, v, out=p[..., :d])
    torch.mul(vds, z1, out=p[..., d:])
    p.mul_(coef)
    sp, gp = spgp[:, :, :n], spgp[:, :, n:]
    r = lr / (norms + 1)  # [H, B, 1, 2d]
    y = torch.addcmul(zz[:, :, :n], sp, r, value=-1)  # [y1 | y2]
    y1, y2 = y[..., :d], y[..., d:]
    sy = F.silu(y2)
    torch.mul(y1, sy, out=out1.transpose(0, 1))

    # ---- dY, then through the column scaling R: dm, dP and [dS; 2 dG] ----
    dyz = torch.empty(heads, b, 2 * n, 2 * d, dtype=w.dtype, device=w.device)  # [dY; dZ]
    dy = dyz[:, :, :n]
    torch.mul(do, sy, out=dy[..., :d])  # dy1 = do silu(y2)
    dy[..., d:] = torch.ops.aten.silu_backward(do * y1, y2)  # dy2 = do y1 silu'(y2)
    t = (dy * sp).sum(2, keepdim=True)  # [H, B, 1, 2d]
    dm2 = r * t / (norms.clamp_min(torch.finfo(w.dtype).tiny) * (norms + 1))  # 2 dm
    u = torch.empty(heads, b, 2 * n, 2 * d, dtype=w.dtype, device=w.device)  # [-dY R; 2 P diag(dm)]
    torch.mul(dy, r.neg(), out=u[:, :, :n])
    torch.mul(p, dm2, out=u[:, :, n:])
    u = u.view(hb, 2 * n, 2 * d)
    dp = torch.baddbmm((gp * dm2).view(hb, n, 2 * d), sg[:, :n].transpose(1, 2), u[:, :n])  # [HB, N, 2d]
    dsg = torch.bmm(u, p.view(hb, n, 2 * d).transpose(1, 2))  # [dS; 2 dG]: [HB, 2N, N]
    flat = qk.view(hb, 2 * n, d)
    dq_gram = torch.bmm(dsg[:, :n], flat[:, n:]).view(heads, b, n, d)  # dS K
    dk_gram = torch.bmm(dsg.transpose(1, 2), flat).view(heads, b, n, d)  # dS^T Q + 2 dG K

    # ---- through P = coef [v a | v z1 ds] to dv and dZ ----
    dp1, dp2 = dp.view(heads, b, n, 2 * d).mul_(coef).split(d, dim=-1)
    dv_rows = torch.addcmul(dp1 * a, dp2, ds.mul_(z1))  # dv = P1' a + P2' z1 ds
    torch.mul(dp2, vds, out=dyz[:, :, n:, :d])  # dz1 = P2' v ds
    dyz[:, :, n:, d:] = torch.addcmul(dp1 * vds, dp2, dds.mul_(z1).mul_(v))  # dz2 = P1' v ds + P2' v z1 dds

    # ---- the shared weights: dQ, dK += [dY; dZ] W^T, dW = [Q; K]^T [dY; dZ] ----
    dyz_flat = dyz.view(heads, 2 * b * n, 2 * d)
    dqk = torch.bmm(dyz_flat, w.transpose(1, 2)).view(heads, b, 2 * n, d)  # (bmm into a strided out= loops)
    dw = torch.bmm(qk.view(heads, 2 * b * n, d).transpose(1, 2), dyz_flat).unsqueeze(0)  # [1, H, d, 2d]
    for dst, rows in ((dq, dqk[:, :, :n].add_(dq_gram)), (dk, dqk[:, :, n:].add_(dk_gram))):
        dst.transpose(0, 1).copy_(rows if rope is None else rotate_pairs(rows, *rope, inverse=True))
    dv.transpose(0, 1).copy_(dv_rows)
    return dw
