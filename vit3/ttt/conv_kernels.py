"""Triton kernels of the TTT inner step's 3x3 depthwise-conv branch: the conv_* passes of kernels.py's
docstring, which describes the passes and the layouts. A program owns one sample, a block of CB channels
and a range of tokens (or one token tile).
"""
import triton
import triton.language as tl

from .kernels import RUNTIME, _split_range


@triton.jit
def _neighbour(tok, tmask, h, w, o: tl.constexpr, sign: tl.constexpr):
    """Token p + sign * o for offset o (row o // 3 - 1, column o % 3 - 1) and where it is on the map."""
    dy: tl.constexpr = sign * (o // 3 - 1)
    dx: tl.constexpr = sign * (o % 3 - 1)
    row, col = tok // w + dy, tok % w + dx
    return tok + dy * w + dx, tmask & (row >= 0) & (row < h) & (col >= 0) & (col < w)


@triton.jit
def _conv_tile(src, tok, tmask, stride, col, chan, cmask, kern, h, w, sign: tl.constexpr, CP: tl.constexpr):
    """sum_o kern[o] x[p + sign o] over the 9 offsets, kern [16, CP] per sample: [BN, CB] fp32."""
    acc = tl.zeros((tok.shape[0], chan.shape[0]), tl.float32)
    for o in tl.static_range(9):
        nb, ok = _neighbour(tok, tmask, h, w, o, sign)
        x = tl.load(src + nb[:, None] * stride + col + chan[None, :], mask=ok[:, None] & cmask[None, :], other=0.0)
        acc += tl.load(kern + o * CP + chan)[None, :] * x.to(tl.float32)
    return acc


@triton.jit
def _correlate(acc, y, src, tok, tmask, stride, col, chan, cmask, h, w):
    """acc[o] += sum_p y[p] x[p + o] for the 9 offsets: [16, CB]."""
    rows = tl.arange(0, 16)
    for o in tl.static_range(9):
        nb, ok = _neighbour(tok, tmask, h, w, o, 1)
        x = tl.load(src + nb[:, None] * stride + col + chan[None, :], mask=ok[:, None] & cmask[None, :], other=0.0)
        acc += tl.where(rows[:, None] == o, tl.sum(y * x.to(tl.float32), axis=0)[None, :], 0.0)
    return acc


@triton.jit(do_not_specialize=RUNTIME)
def conv_fwd_reduce(qkv, part, N, h, w, tiles, stride, C, c,
                    CP: tl.constexpr, CB: tl.constexpr, BN: tl.constexpr):
    """Partial sums over one token range of sum_p v[p] k[p + o]: part[b, split, o, channels]."""
    s, pid = tl.program_id(0), tl.program_id(1)
    b, chan = pid // (CP // CB), (pid % (CP // CB)) * CB + tl.arange(0, CB)
    cmask = chan < c
    base = qkv + b.to(tl.int64) * N * stride
    acc = tl.zeros((16, CB), tl.float32)
    start, end = _split_range(s, tiles, N, BN)
    for t0 in range(start, end, BN):
        tok = t0 + tl.arange(0, BN)
        tm = tok < end
        v = tl.load(base + tok[:, None] * stride + 3 * C + 2 * c + chan[None, :],
                    mask=tm[:, None] & cmask[None, :], other=0.0).to(tl.float32)
        acc = _correlate(acc, v, base, tok, tok < N, stride, 3 * C + c, chan, cmask, h, w)
    off = tl.arange(0, 16)[:, None] * CP + chan[None, :]
    tl.store(part + (b * tl.num_programs(0) + s) * 16 * CP + off, acc)


@triton.jit(do_not_specialize=RUNTIME)
def conv_fwd_apply(qkv, w3n, out, N, h, w, stride, out_stride, C, c,
                   CP: tl.constexpr, CB: tl.constexpr, BN: tl.constexpr):
    """out[b, tokens, C + channel] = sum_o w3'[o] q[p + o] for one token tile."""
    pid = tl.program_id(1)
    b, chan = pid // (CP // CB), (pid % (CP // CB)) * CB + tl.arange(0, CB)
    cmask = chan < c
    tok = tl.program_id(0) * BN + tl.arange(0, BN)
    tm = tok < N
    base = qkv + b.to(tl.int64) * N * stride
    o = _conv_tile(base, tok, tm, stride, 3 * C, chan, cmask, w3n + b * 16 * CP, h, w, 1, CP)
    tl.store(out + b.to(tl.int64) * N * out_stride + tok[:, None] * out_stride + C + chan[None, :],
             o.to(out.dtype.element_ty), mask=tm[:, None] & cmask[None, :])


@triton.jit(do_not_specialize=RUNTIME)
def conv_bwd_q(qkv, dout, w3n, out, dqkv, part, N, h, w, tiles, stride, out_stride, C, c,
               CP: tl.constexpr, CB: tl.constexpr, BN: tl.constexpr):
    """Back through out = conv(q, w3') over one token range: dq[p] = sum_o w3'[o] dout[p - o], the
    recomputed output, and partial sums of dw3'[o] = sum_p dout[p] q[p + o]."""
    s, pid = tl.program_id(0), tl.program_id(1)
    b, chan = pid // (CP // CB), (pid % (CP // CB)) * CB + tl.arange(0, CB)
    cmask = chan < c
    base = qkv + b.to(tl.int64) * N * stride
    obase = out + b.to(tl.int64) * N * out_stride
    gbase = dout + b.to(tl.int64) * N * out_stride
    kern = w3n + b * 16 * CP
    acc = tl.zeros((16, CB), tl.float32)
    start, end = _split_range(s, tiles, N, BN)
    for t0 in range(start, end, BN):
        tok = t0 + tl.arange(0, BN)
        tm = tok < end
        m2 = tm[:, None] & cmask[None, :]
        o = _conv_tile(base, tok, tm, stride, 3 * C, chan, cmask, kern, h, w, 1, CP)
        tl.store(obase + tok[:, None] * out_stride + C + chan[None, :], o.to(out.dtype.element_ty), mask=m2)
        do = tl.load(gbase + tok[:, None] * out_stride + C + chan[None, :], mask=m2, other=0.0).to(tl.float32)
        acc = _correlate(acc, do, base, tok, tok < N, stride, 3 * C, chan, cmask, h, w)
        dq = _conv_tile(gbase, tok, tm, out_stride, C, chan, cmask, kern, h, w, -1, CP)
        tl.store(dqkv + b.to(tl.int64) * N * stride + tok[:, None] * stride + 3 * C + chan[None, :],
                 dq.to(dqkv.dtype.element_ty), mask=m2)
    off = tl.arange(0, 16)[:, None] * CP + chan[None, :]
    tl.store(part + (b * tl.num_programs(0) + s) * 16 * CP + off, acc)


@triton.jit(do_not_specialize=RUNTIME)
def conv_bwd_k(qkv, dgc3, dqkv, N, h, w, stride, C, c, CP: tl.constexpr, CB: tl.constexpr, BN: tl.constexpr):
    """Back through g3[o] = coef sum_p v[p] k[p + o], given dgc3 = coef dg3 per sample, for one token
    tile: dk[p] = sum_o dgc3[o] v[p - o], dv[p] = sum_o dgc3[o] k[p + o]."""
    pid = tl.program_id(1)
    b, chan = pid // (CP // CB), (pid % (CP // CB)) * CB + tl.arange(0, CB)
    cmask = chan < c
    tok = tl.program_id(0) * BN + tl.arange(0, BN)
    tm = tok < N
    base = qkv + b.to(tl.int64) * N * stride
    dbase = dqkv + b.to(tl.int64) * N * stride
    kern = dgc3 + b * 16 * CP
    dk = _conv_tile(base, tok, tm, stride, 3 * C + 2 * c, chan, cmask, kern, h, w, -1, CP)
    dv = _conv_tile(base, tok, tm, stride, 3 * C + c, chan, cmask, kern, h, w, 1, CP)
    m2 = tm[:, None] & cmask[None, :]
    tl.store(dbase + tok[:, None] * stride + 3 * C + c + chan[None, :], dk.to(dqkv.dtype.element_ty), mask=m2)
    tl.store(dbase + tok[:, None] * stride + 3 * C + 2 * c + chan[None, :], dv.to(dqkv.dtype.element_ty), mask=m2)
