"""Fast TTT inner loop for the paper's design: closed-form gradients, custom backward.

Inner models: simplified SwiGLU per head, f(x) = (x W1) * silu(x W2), and a 3x3
depthwise conv; dot loss L = -scale * mean_n <f(k_n), v_n>; one full-batch step,
each gradient divided by (its norm + 1).

With e = dL/df(k) = -scale / N * v, the inner gradients are

  g1 = K^T (e * silu(K W2))                 [B, H, d, d]
  g2 = K^T (e * (K W1) * silu'(K W2))
  g3[o] = sum_p e[p] k[p + o]               [B, c, 3, 3], o one of the 9 offsets

and the trained models are applied to the queries; the layer's output
projection follows in the same function. The forward keeps only its inputs and
the d x d / 3 x 3 inner gradients; every N-sized intermediate, the projection's
input included, is recomputed in the backward, which is derived by hand below
(the outer loop differentiates through the inner step, so second derivatives of
silu appear). Activation memory is therefore the qkv projection alone, linear
in N, less than attention keeps (q, k, v, its output and the projection input).
For images of at most about d tokens the SwiGLU branch runs in dual form instead
(dual.py: N x N Gram matrices in place of the d x 2d weights per sample;
`use_dual` picks), which keeps its N-sized products for the backward (about
3.5x qkv more; small images only).

The function takes the qkv projection whole ([B, N, 3C + 3c], any float dtype)
and returns its gradient whole: nothing is split, concatenated or upcast
outside, so under autocast the saved tensor is the bf16 projection itself. The
output projection runs in that dtype too, as autocast would run it. The inner
math runs in float32 (float64 for float64 inputs), a block of heads and tokens
at a time, with RoPE applied (and inverted in the backward) per block. The conv
branch's per-sample kernels make one depthwise convolution over B*c channels in
channels-last memory (the tokens' own layout, and oneDNN's faster depthwise
kernels), and every gradient of it is that convolution again or its weight
gradient.
"""
import torch
import torch.nn.functional as F

from ..layers import autocast_off, rotate_pairs
from .dual import swiglu_backward as swiglu_dual_backward
from .dual import swiglu_forward as swiglu_dual_forward


def _norm_backward(g: torch.Tensor, n: torch.Tensor, du: torch.Tensor, dims) -> torch.Tensor:
    """Gradient through u = g / (n + 1), n = ||g|| over dims, given du."""
    dot = (g * du).sum(dim=dims, keepdim=True)
    return du / (n + 1) - g * dot / ((n + 1) ** 2 * n.clamp_min(torch.finfo(g.dtype).tiny))


def _conv(x: torch.Tensor, wt: torch.Tensor) -> torch.Tensor:
    """Per-sample 3x3 depthwise conv: x [1, B*c, h, w], wt [B*c, 1, 3, 3] (one group per sample and channel)."""
    return F.conv2d(x, wt, padding=1, groups=x.shape[1])


def _conv_weight_grad(x: torch.Tensor, gy: torch.Tensor) -> torch.Tensor:
    """sum_p gy[p] x[p + o] for the 9 offsets o, i.e. the conv's weight gradient: -> [B*c, 1, 3, 3]."""
    return torch.nn.grad.conv2d_weight(x, (x.shape[1], 1, 3, 3), gy, padding=1, groups=x.shape[1])


def _conv_input_grad(wt: torch.Tensor, gy: torch.Tensor) -> torch.Tensor:
    """sum_o wt[o] gy[p - o], i.e. the conv's input gradient, as a conv with the flipped kernel (the forward
    kernel is the fast one in channels-last memory): -> [1, B*c, h, w]."""
    return _conv(gy, wt.flip(-2, -1))


def _to_maps(x: torch.Tensor, h: int, w: int, dtype: torch.dtype) -> torch.Tensor:
    """Tokens [B, N, c] -> one depthwise-conv input [1, B*c, h, w] in channels-last memory, i.e. a copy laid out
    [h, w, B, c], in the compute dtype."""
    b, _, c = x.shape
    return _contiguous(x.unflatten(1, (h, w)).permute(1, 2, 0, 3), dtype).view(1, h, w, b * c).permute(0, 3, 1, 2)


def _conv_maps(qkv: torch.Tensor, dim: int, c: int, h: int, w: int, dtype: torch.dtype):
    """q2, k2, v2 of a qkv tensor [B, N, 3C + 3c] as depthwise-conv inputs [1, B*c, h, w], channels-last; one
    copy for all three."""
    b = qkv.shape[0]
    maps = _contiguous(qkv[..., 3 * dim:].unflatten(1, (h, w)).unflatten(-1, (3, c)).permute(3, 1, 2, 0, 4), dtype)
    return [m.view(1, h, w, b * c).permute(0, 3, 1, 2) for m in maps.unbind(0)]  # maps: [3, h, w, B, c]


def _to_tokens(x: torch.Tensor, b: int) -> torch.Tensor:
    """[1, B*c, h, w] -> tokens [B, N, c] (a view of a channels-last x, a copy otherwise)."""
    return x.permute(0, 2, 3, 1).reshape(-1, b, x.shape[1] // b).transpose(0, 1)


# elements of one [B, heads, tokens, d] block: cache-resident on CPU (no fresh pages), large on GPUs
# (fewer, larger kernels)
BLOCK_ELEMENTS = {"cpu": 1 << 18, "other": 1 << 24}


# the SwiGLU branch runs in dual form (dual.py) for N <= DUAL_FORM["max_tokens_per_width"] * d: below about d
# tokens its N x N Gram matrices cost less than the primal form's d x 2d weights per sample (measured in
# benchmarks/bench_small.py)
DUAL_FORM = {"max_tokens_per_width": 1.0}


def use_dual(n: int, d: int) -> bool:
    """Whether the SwiGLU branch of N tokens and head width d runs in dual form."""
    return n <= DUAL_FORM["max_tokens_per_width"] * d


def _chunks(b: int, heads: int, n: int, d: int, device: torch.device) -> list[tuple[slice, slice]]:
    """(head group, token range) blocks processed one at a time, so that every N-sized temporary stays
    small. Per-head sums over tokens (inner gradients, weight gradients) accumulate across blocks."""
    if torch.compiler.is_compiling():  # the compiler fuses the elementwise work; sizes may be symbolic
        return [(slice(0, heads), slice(0, n))]
    budget = BLOCK_ELEMENTS["cpu" if device.type == "cpu" else "other"]
    hstep = max(1, min(heads, budget // (b * n * d)))
    tstep = n if hstep > 1 or b * n * d <= budget else max(1, budget // (b * d))
    return [(slice(h0, min(h0 + hstep, heads)), slice(t0, min(t0 + tstep, n)))
            for h0 in range(0, heads, hstep) for t0 in range(0, n, tstep)]


def _silu_grad(g: torch.Tensor, z: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """g * silu'(z) written to out (which may be z itself): one fused elementwise pass in place of the
    five that s (1 + z (1 - s)) g takes, s = sigmoid(z)."""
    return torch.ops.aten.silu_backward.grad_input(g, z, grad_input=out)


def _swiglu_inner_grads(k, v, w12, coef):
    """Inner gradients of the SwiGLU branch.

    k, v: [B, h, N, d]; w12 = [W1 | W2]: [1, h, d, 2d] -> [g1 | g2]: [B, h, d, 2d].
    """
    d = k.shape[-1]
    z = k @ w12  # [z1 | z2], one GEMM for both weights
    z1, z2 = z[..., :d], z[..., d:]
    a = F.silu(z2)
    _silu_grad(v, z2, out=z2).mul_(z1)  # v z1 silu'(z2)
    torch.mul(a, v, out=z1)  # z = [v silu(z2) | v z1 silu'(z2)]
    return (k.transpose(-2, -1) @ z).mul_(coef)  # [g1 | g2]


def _step(w, g, n, lr):
    """One inner step with the normalised gradient: w - lr g / (||g|| + 1)."""
    return torch.addcdiv(w, g, n + 1, value=-lr)


def _conv_step(w3, g3, n3, lr, b):
    """The conv kernel after its step, per sample: w3 [c, 1, 3, 3], g3 / n3 [B*c, 1, 3, 3 / 1] -> [B*c, 1, 3, 3]."""
    return _step(w3, g3.unflatten(0, (b, -1)), n3.unflatten(0, (b, -1)), lr).flatten(0, 1)


def _contiguous(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A contiguous copy of x in dtype (always a copy, even when x is contiguous already)."""
    return torch.empty(x.shape, dtype=dtype, device=x.device).copy_(x)


def _load(x: torch.Tensor, hs: slice, ts: slice, dtype: torch.dtype, rope=None) -> torch.Tensor:
    """A block of q, k, v or dout ([B, H, N, d] views) as a contiguous [B, h, n, d] tensor in the compute
    dtype, rotated if rope is given. Contiguous matters: elementwise results follow their inputs'
    layout, and mixing the qkv layout with the GEMM outputs' makes every later op a strided one."""
    x = _contiguous(x[:, hs, ts], dtype)
    return x if rope is None else rotate_pairs(x, rope[0][hs, ts], rope[1][hs, ts])


def _store(dst: torch.Tensor, hs: slice, ts: slice, x: torch.Tensor, rope=None):
    """Write a block's gradient [B, h, n, d] into dst ([B, H, N, d] view), through R^T if rope is given."""
    dst[:, hs, ts] = x if rope is None else rotate_pairs(x, rope[0][hs, ts], rope[1][hs, ts], inverse=True)


def _head_views(qkv: torch.Tensor, dim: int, heads: int):
    """q1, k1, v1 of a qkv tensor [B, N, 3C + 3c] as [B, H, N, d] views."""
    return [qkv[..., i * dim:(i + 1) * dim].unflatten(-1, (heads, dim // heads)).transpose(1, 2) for i in range(3)]


def _head_tables(cos: torch.Tensor, sin: torch.Tensor, n: int, heads: int, d: int):
    """RoPE tables [h, w, C/2] -> per head [H, N, d/2]."""
    return tuple(t.reshape(n, heads, d // 2).transpose(0, 1) for t in (cos, sin))


def _swiglu_forward(q, k, v, w12, rope, coef, lr, out1):
    """Primal form of the SwiGLU branch: writes out1 = (Q W1') * silu(Q W2') ([B, H, N, d] view) for q, k, v
    [B, H, N, d] views and w12 = [W1 | W2] [1, H, d, 2d]; returns the inner gradients [g1 | g2] [B, H, d, 2d]
    and their column norms [B, H, 1, 2d], which the backward keeps."""
    b, heads, n, d = q.shape
    g12 = q.new_zeros(b, heads, d, 2 * d, dtype=w12.dtype)
    chunks = _chunks(b, heads, n, d, q.device)
    for hs, ts in chunks:  # add_ on the view: `g12[:, hs] +=` would copy the result back once more
        g12[:, hs].add_(_swiglu_inner_grads(_load(k, hs, ts, w12.dtype, rope), _load(v, hs, ts, w12.dtype),
                                            w12[:, hs], coef))
    n12 = g12.square().sum(-2, keepdim=True).sqrt_()  # per output column of W1 and W2 (a norm op is 10x slower)
    w12n = _step(w12, g12, n12, lr)  # [B, H, d, 2d]
    for hs, ts in chunks:
        y = _load(q, hs, ts, w12.dtype, rope) @ w12n[:, hs]  # [B, h, n, 2d]
        torch.mul(y[..., :d], F.silu(y[..., d:], inplace=True), out=out1[:, hs, ts])
    return g12, n12


def _forward(qkv, w1, w2, w3, pw, pb, cos, sin, heads, h, w, scale, lr):
    """The layer's output [B, N, C_out] and what the backward reads: the conv branch's inner gradients and
    norms, then the SwiGLU branch's (its form's) tensors."""
    b, n, width = qkv.shape
    c = w3.shape[0]
    dim = (width - 3 * c) // 3
    d = dim // heads
    cdt = torch.promote_types(qkv.dtype, torch.float32)  # compute dtype
    coef = -scale / n  # dL/df(k) = coef * v
    rope = None if cos is None else _head_tables(cos, sin, n, heads, d)
    out = qkv.new_empty(b, n, dim + c)  # the output projection's input
    out1 = out[..., :dim].unflatten(-1, (heads, d)).transpose(1, 2)  # [B, H, N, d] view
    q, k, v = _head_views(qkv, dim, heads)

    # ---- branch 1: SwiGLU per head ----
    w12 = torch.cat([w1, w2], dim=-1).to(cdt)  # [1, H, d, 2d]
    forward = swiglu_dual_forward if use_dual(n, d) else _swiglu_forward
    saved = forward(q, k, v, w12, rope, coef, lr, out1)  # what the backward of that form reads

    # ---- branch 2: 3x3 depthwise conv, one group per sample and channel ----
    q2, k2, v2 = _conv_maps(qkv, dim, c, h, w, cdt)
    g3 = _conv_weight_grad(k2, v2).mul_(coef)  # [B*c, 1, 3, 3]
    n3 = g3.norm(dim=(-2, -1), keepdim=True)  # per 3x3 kernel
    out[..., dim:] = _to_tokens(_conv(q2, _conv_step(w3.to(cdt), g3, n3, lr, b)), b)

    projected = F.linear(out, pw.to(out.dtype), None if pb is None else pb.to(out.dtype))  # [B, N, C_out]
    return projected, (g3, n3, *saved)


def _apply_backward(q, dq, dout1, w12n, rope, out1):
    """Primal backward, pass 1, through the application out = (Q W1') * silu(Q W2'): writes dq and the
    recomputed out1 ([B, H, N, d] views); returns dW' = [dW1' | dW2'] [B, H, d, 2d] (a sum over all tokens)."""
    b, heads, n, d = q.shape
    dw12n = torch.zeros_like(w12n)
    for hs, ts in _chunks(b, heads, n, d, q.device):
        qc, doc = _load(q, hs, ts, w12n.dtype, rope), _load(dout1, hs, ts, w12n.dtype)
        dy12 = qc @ w12n[:, hs]  # [y1 | y2], turned into [dy1 | dy2] in place
        y1, y2 = dy12[..., :d], dy12[..., d:]
        sy = F.silu(y2)
        torch.mul(y1, sy, out=out1[:, hs, ts])
        _silu_grad(y1.mul_(doc), y2, out=y2)  # dy2 = do y1 silu'(y2)
        torch.mul(sy, doc, out=y1)  # dy1 = do silu(y2)
        dw12n[:, hs].add_(qc.transpose(-2, -1) @ dy12)
        _store(dq, hs, ts, dy12 @ w12n[:, hs].transpose(-2, -1), rope)  # dy1 W1'^T + dy2 W2'^T; q is read
        del qc, doc, sy, dy12
    return dw12n


def _train_backward(k, v, dk, dv, w12, g12, n12, dw12n, rope, coef, lr):
    """Primal backward, pass 2, through w' = w - lr g / (||g|| + 1) and g1 = coef K^T (v a),
    g2 = coef K^T (v z1 ds) (a, ds, dds = silu, silu', silu'' of z2): writes dk and dv; returns dW12
    [1, H, d, 2d]."""
    b, heads, n, d = k.shape
    # coef folded in: P = K (coef dg); the norms are per column
    dgc = (-lr * coef) * _norm_backward(g12, n12, dw12n, dims=-2)
    w1e, w2e = (t.expand(b, -1, -1, -1) for t in (w12[..., :d], w12[..., d:]))
    mats = torch.cat([dgc[..., :d], dgc[..., d:], w1e, w2e], dim=-1).transpose(-2, -1)  # [B, H, 4d, d]
    dw12 = dw12n.sum(0, keepdim=True)  # [1, H, d, 2d]
    for hs, ts in _chunks(b, heads, n, d, k.device):
        kc, vc = _load(k, hs, ts, w12.dtype, rope), _load(v, hs, ts, w12.dtype)
        z = kc @ w12[:, hs]
        z1, z2 = z[..., :d], z[..., d:]
        s = torch.sigmoid(z2)
        a = z2 * s
        ds = (z2 - a).add_(1).mul_(s)
        dds = torch.mul(s, -2).add_(1).mul_(z2).add_(2).mul_(s).mul_(s.neg_().add_(1))  # s (1-s) (2 + z2 (1-2s))
        p = kc @ dgc[:, hs]  # [P1 | P2]
        p1, p2 = p[..., :d], p[..., d:]
        vds = vc * ds
        zds = ds.mul_(z1)  # z1 ds
        _store(dv, hs, ts, torch.addcmul(p1 * a, p2, zds))  # dv = P1 a + P2 z1 ds; v is read
        dz1 = p2 * vds  # P2 v ds
        dz2 = (p1 * vds).addcmul_(p2, dds.mul_(z1).mul_(vc))  # P1 v ds + P2 v z1 dds
        # u = [v a | v z1 ds | dz1 | dz2], so that dk = u @ [dg1^T; dg2^T; W1^T; W2^T] is one GEMM
        u = torch.cat([a.mul_(vc), vds.mul_(z1), dz1, dz2], dim=-1)
        del z, s, a, ds, dds, p, vds, zds, dz1, dz2
        dw12[:, hs].add_((kc.transpose(-2, -1) @ u[..., 2 * d:]).sum(0, keepdim=True))
        _store(dk, hs, ts, u @ mats[:, hs], rope)  # k is read
        del kc, vc, u
    return dw12


class _TTTFast(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, w1, w2, w3, pw, pb, cos, sin, heads, h, w, scale, lr, inplace_grad):
        y, inner = _forward(qkv, w1, w2, w3, pw, pb, cos, sin, heads, h, w, scale, lr)
        ctx.save_for_backward(qkv, w1, w2, w3, pw, cos, sin, *inner)
        ctx.dual = use_dual(qkv.shape[1], w1.shape[-1])  # the form _forward took: N tokens, head width d
        ctx.args = (heads, h, w, scale, lr, inplace_grad, pb is not None)
        return y

    @staticmethod
    def backward(ctx, dy):
        # the engine runs this under the caller's autocast; the forward ran without it (TTT._fast), and so
        # must the backward: its products are float32 by design, and out= buffers cannot take autocast's casts
        with autocast_off(dy.device):
            return _TTTFast._backward(ctx, dy)

    @staticmethod
    def _backward(ctx, dy):
        qkv, w1, w2, w3, pw, cos, sin, g3, n3, *saved = ctx.saved_tensors
        heads, h, w, scale, lr, inplace_grad, has_bias = ctx.args
        b, n, width = qkv.shape
        c = w3.shape[0]
        dim = (width - 3 * c) // 3
        d = dim // heads
        cdt = torch.promote_types(qkv.dtype, torch.float32)
        coef = -scale / n
        rope = None if cos is None else _head_tables(cos, sin, n, heads, d)
        w12 = torch.cat([w1, w2], dim=-1).to(cdt)
        w3n = _conv_step(w3.to(cdt), g3, n3, lr, b)
        dy = dy.contiguous()  # [B, N, C]
        dout = dy @ pw.to(qkv.dtype)  # d(projection input), [B, N, C + c]: one GEMM, sliced by branch and block
        out = torch.empty(b, n, dim + c, dtype=qkv.dtype, device=qkv.device)  # projection input, recomputed
        out1 = out[..., :dim].unflatten(-1, (heads, d)).transpose(1, 2)
        # the gradient of a block of qkv (head group and tokens, or the conv branch's columns) is written once
        # that block has been read for the last time, so with inplace_grad it overwrites qkv: no second
        # N x (3C + 3c) buffer. qkv's version counter moves, so a second backward through this graph fails
        # loudly instead of reading gradients as inputs.
        dqkv = qkv if inplace_grad else torch.empty_like(qkv)

        # ---- branch 2 (its columns of qkv are read into map copies, so its gradient can go first) ----
        q2, k2, v2 = _conv_maps(qkv, dim, c, h, w, cdt)
        do2 = _to_maps(dout[..., dim:], h, w, cdt)
        out[..., dim:] = _to_tokens(_conv(q2, w3n), b)
        dw3n = _conv_weight_grad(q2, do2)  # [B*c, 1, 3, 3]
        dgc3 = (-lr * coef) * _norm_backward(g3, n3, dw3n, dims=(-2, -1))
        dqkv[..., 3 * dim:3 * dim + c] = _to_tokens(_conv_input_grad(w3n, do2), b)
        dqkv[..., 3 * dim + c:3 * dim + 2 * c] = _to_tokens(_conv_input_grad(dgc3, v2), b)
        dqkv[..., 3 * dim + 2 * c:] = _to_tokens(_conv(k2, dgc3), b)  # coef sum_o dg3[o] k[p + o]
        dw3 = dw3n.view(b, c, 1, 3, 3).sum(0)  # [c, 1, 3, 3]
        del q2, k2, v2, do2

        # ---- branch 1 ----
        q, k, v = _head_views(qkv, dim, heads)
        dq, dk, dv = _head_views(dqkv, dim, heads)
        dout1 = dout[..., :dim].unflatten(-1, (heads, d)).transpose(1, 2)  # [B, H, N, d] view
        if ctx.dual:
            dw12 = swiglu_dual_backward(dq, dk, dv, dout1, w12, saved, rope, coef, lr, out1)
            dpw = dy.flatten(0, 1).t() @ out.flatten(0, 1)  # [C, C + c]
        else:
            g12, n12 = saved
            dw12n = _apply_backward(q, dq, dout1, _step(w12, g12, n12, lr), rope, out1)
            dpw = dy.flatten(0, 1).t() @ out.flatten(0, 1)
            del out, out1, dout, dout1
            dw12 = _train_backward(k, v, dk, dv, w12, g12, n12, dw12n, rope, coef, lr)
        dpb = dy.sum(dim=(0, 1), dtype=cdt) if has_bias else None
        return (dqkv, dw12[..., :d].to(w1.dtype), dw12[..., d:].to(w2.dtype), dw3.to(w3.dtype), dpw.to(pw.dtype),
                None if dpb is None else dpb.to(pw.dtype), None, None, None, None, None, None, None, None)


def ttt_fast(qkv, w1, w2, w3, proj_weight, proj_bias=None, *, heads, h, w, scale, lr, rope_tables=None,
             inplace_grad=False):
    """The paper's TTT inner step on a whole qkv projection, and the layer's output projection.

    qkv: [B, N, 3C + 3c] laid out as q1 k1 v1 (C each) q2 k2 v2 (c each), tokens in
    raster order of an h x w map; w1/w2: [1, H, d, d]; w3: [c, 1, 3, 3];
    proj_weight: [C_out, C + c], proj_bias: [C_out] or None;
    rope_tables: None or (cos, sin), each [h, w, C/2], rotating q1 and k1.
    inplace_grad: the backward writes qkv's gradient into qkv's own memory; only for a qkv that
    nothing else reads afterwards (the TTT layer's own projection output).
    Returns proj(concat(SwiGLU outputs, conv outputs)): [B, N, C_out] in qkv's dtype.
    """
    cos, sin = rope_tables if rope_tables is not None else (None, None)
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                            for t in (qkv, w1, w2, w3, proj_weight, proj_bias))):
        # nothing to differentiate (inference): skip the autograd Function's bookkeeping, a tenth of a
        # small layer's time
        return _forward(qkv, w1, w2, w3, proj_weight, proj_bias, cos, sin, heads, h, w, scale, lr)[0]
    inplace_grad = inplace_grad and qkv.is_contiguous()
    return _TTTFast.apply(qkv, w1, w2, w3, proj_weight, proj_bias, cos, sin, heads, h, w, scale, lr, inplace_grad)
