"""Triton kernels of the TTT inner step, the paper's design (what fast.py computes), for the GPU: the
SwiGLU branch's (head_*) and the finalize kernels both branches use; the 3x3 depthwise-conv branch's
(conv_*) are in conv_kernels.py.

The inner step moves far more bytes than it has arithmetic to hide them behind
(about 80 FLOP per byte), so the kernels are organised around memory passes,
each reading q, k, v (or the output gradient) once:

  forward   head_fwd_reduce / conv_fwd_reduce  one pass over k and v: partial inner
                                               gradients per token range (fp32)
            finalize_fwd                       sum the partials in a fixed order (no
                                               atomics: deterministic), norms, W'
            head_fwd_apply / conv_fwd_apply    one pass over q, writing the output
                                               projection's input
  backward  head_bwd_q / conv_bwd_q            a pass over q and dout: dq, the recomputed
                                               projection input, partial dW'
            finalize_bwd                       back through w' = w - lr g / (||g|| + 1)
            head_bwd_k / conv_bwd_k            a pass over k and v: dk, dv, partial dW

Layouts. A program owns one (sample, head) and a range of tokens. Per head the
d x d inner weights live in a padded "tile" layout [DP, 2 DP] (W1 | W2, DP the
next power of two >= d, padding zero): rows are key channels, columns value
channels. With RoPE the rows are permuted, the even channels (real parts of the
rotated pairs) first and the odd ones at DP / 2, so that a rotation pairs tile
position j with j ^ DP/2 and a tile of rotated keys is two loads and a
multiply-add. The row (key-channel) axis can be split into blocks of RB: every
token reduction (K^T E) and every output indexed by key channels (dq, dk) is
separable along it, so head width 72 (DP 128) runs as four programs of 32 rows
that need no communication. The conv branch's 3x3 kernels live as [16, CP]
(9 offsets padded, channels padded; conv_kernels.py).

N, h, w and the per-program tile count are runtime arguments, never
specialised on: one compiled kernel serves every resolution.
"""
import triton
import triton.language as tl

RUNTIME = ["N", "h", "w", "tiles"]  # never specialised on: no recompilation per resolution


@triton.jit
def _channels(pos, d: tl.constexpr, DP: tl.constexpr, ROPE: tl.constexpr):
    """Tile positions -> head channels, and which positions are real (the rest is padding)."""
    if ROPE:
        half: tl.constexpr = DP // 2
        return 2 * (pos % half) + pos // half, (pos % half) < d // 2
    return pos, pos < d


@triton.jit
def _rope_cos_sin(tok, pos, hd, theta, w, quarter, d: tl.constexpr, DP: tl.constexpr):
    """cos and signed sin [BN, P] of RoPE2d for tokens tok and tile positions pos of head hd.

    Pair p of the whole C/2 rotates with the token's row for p < C/4, with its column after,
    at frequency theta[p mod C/4]. The sign is the forward rotation's: -sin on real parts."""
    half: tl.constexpr = DP // 2
    i = pos % half
    p = hd * (d // 2) + i
    by_row = p < quarter
    th = tl.load(theta + tl.where(by_row, p, p - quarter), mask=i < d // 2, other=0.0)
    coord = tl.where(by_row[None, :], (tok // w)[:, None], (tok % w)[:, None]).to(tl.float32)
    angle = coord * th[None, :]
    sign = tl.where(pos < half, -1.0, 1.0)
    return tl.cos(angle), tl.sin(angle) * sign[None, :]


@triton.jit
def _load_rot(base, tok, tmask, stride, col0, pos, hd, theta, w, quarter,
              d: tl.constexpr, DP: tl.constexpr, ROPE: tl.constexpr):
    """Tokens tok of one head's q or k (columns col0 + channel) at tile positions pos, rotated by
    RoPE when ROPE: [BN, P] float32, zero at padding and past N."""
    chan, valid = _channels(pos, d, DP, ROPE)
    mask = tmask[:, None] & valid[None, :]
    ptrs = base + tok[:, None] * stride + col0 + chan[None, :]
    x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    if ROPE:  # the partner of channel 2i is 2i + 1 and back: chan ^ 1
        partner = tl.load(base + tok[:, None] * stride + col0 + (chan ^ 1)[None, :], mask=mask, other=0.0)
        cos, sin = _rope_cos_sin(tok, pos, hd, theta, w, quarter, d, DP)
        x = x * cos + partner.to(tl.float32) * sin
    return x


@triton.jit
def _store_rot(base, tok, tmask, stride, col0, pos, x, x_partner, hd, theta, w, quarter,
               d: tl.constexpr, DP: tl.constexpr, ROPE: tl.constexpr):
    """Store a gradient x [BN, P] taken in rotated coordinates at tile positions pos back through
    the rotation (R^T; x_partner holds positions pos ^ DP/2) into channels col0 + channel."""
    chan, valid = _channels(pos, d, DP, ROPE)
    if ROPE:
        cos, sin = _rope_cos_sin(tok, pos, hd, theta, w, quarter, d, DP)
        x = x * cos - x_partner * sin
    tl.store(base + tok[:, None] * stride + col0 + chan[None, :], x.to(base.dtype.element_ty),
             mask=tmask[:, None] & valid[None, :])


@triton.jit
def _dot(a, b, acc, DOT: tl.constexpr, PREC: tl.constexpr):
    """a @ b (+ acc) with a and b in the dot dtype (the input dtype under half precision), fp32 sums."""
    return tl.dot(a.to(DOT), b.to(DOT), acc, input_precision=PREC, out_dtype=tl.float32)


@triton.jit
def _dot_nt(a, b, acc, DOT: tl.constexpr, PREC: tl.constexpr):
    """a @ b^T (+ acc)."""
    return _dot(a, tl.trans(b), acc, DOT, PREC)


@triton.jit
def _dot_tn(a, b, acc, DOT: tl.constexpr, PREC: tl.constexpr):
    """a^T @ b (+ acc): a token reduction."""
    return _dot(tl.trans(a), b, acc, DOT, PREC)


@triton.jit
def _tile(ptr, rows, DP: tl.constexpr, cols):
    """rows x cols of one head's [DP, 2 DP] tile-layout matrix."""
    return tl.load(ptr + rows[:, None] * (2 * DP) + cols[None, :])


@triton.jit
def _weights(wa, wb, m, rows, cols, d: tl.constexpr, M: tl.constexpr, HEAD: tl.constexpr, ROPE: tl.constexpr):
    """The outer weights of matrix m in its tile layout, float32, read from the parameters: for the
    SwiGLU branch W1 | W2 [H, d, d] of head m at the tile rows of their channels; for the conv
    branch w3 [c, 9] as offsets x channels."""
    if HEAD:
        first = cols < M  # W1's columns, then W2's
        col = tl.where(first, cols, cols - M)
        chan, valid = _channels(rows, d, M, ROPE)
        src = m * d * d + chan[:, None] * d + col[None, :]
        mask = valid[:, None] & (col < d)[None, :]
        w1 = tl.load(wa + src, mask=mask & first[None, :], other=0.0)
        w2 = tl.load(wb + src, mask=mask & ~first[None, :], other=0.0)
        return tl.where(first[None, :], w1.to(tl.float32), w2.to(tl.float32))
    return tl.load(wa + cols[None, :] * 9 + rows[:, None], mask=(rows < 9)[:, None] & (cols < d)[None, :],
                   other=0.0).to(tl.float32)


@triton.jit
def _head_program(H, NRB: tl.constexpr):
    """This program's (row block r, token split s, sample b, head hd, b * H + hd): grid axis 0 runs
    over splits x row blocks (row blocks fastest, so that they share their tiles in L2), axis 1 over
    samples x heads."""
    bh = tl.program_id(1)
    return tl.program_id(0) % NRB, tl.program_id(0) // NRB, bh // H, bh % H, bh


@triton.jit
def _store_partials(part, bh, s, rows, cols, acc1, acc2, NRB: tl.constexpr, DP: tl.constexpr):
    """A program's two [RB, DP] partial sums into part[b * H + hd, s, rows, :DP | DP:]."""
    base = part + ((bh * (tl.num_programs(0) // NRB) + s) * DP) * (2 * DP) + rows[:, None] * (2 * DP)
    tl.store(base + cols[None, :], acc1)
    tl.store(base + DP + cols[None, :], acc2)


@triton.jit
def _split_range(s, tiles, N, BN: tl.constexpr):
    """Tokens [start, end) of split s: `tiles` token tiles each."""
    start = s * tiles * BN
    return start, tl.minimum(start + tiles * BN, N)


# ---------------------------------------------------------------- SwiGLU branch, per head


@triton.jit(do_not_specialize=RUNTIME)
def head_fwd_reduce(qkv, wa, wb, theta, part, N, h, w, tiles, stride, C, H, quarter,
                    d: tl.constexpr, DP: tl.constexpr, RB: tl.constexpr, BN: tl.constexpr,
                    ROPE: tl.constexpr, PREC: tl.constexpr):
    """Partial sums over one token range of [K^T (v silu(z2)) | K^T (v z1 silu'(z2))], z = K [W1 | W2]:
    part[b, head, split, rows of block r, :] (the inner gradients before the factor -scale / N)."""
    NRB: tl.constexpr = DP // RB
    DOT: tl.constexpr = qkv.dtype.element_ty  # dot operands in the input dtype (fp32 sums)
    r, s, b, hd, bh = _head_program(H, NRB)
    base = qkv + b.to(tl.int64) * N * stride
    pos = tl.arange(0, DP)
    rpos = r * RB + tl.arange(0, RB)
    cols = tl.arange(0, DP)
    w1 = _weights(wa, wb, hd, pos, cols, d, DP, True, ROPE)  # [DP, DP], from the parameters
    w2 = _weights(wa, wb, hd, pos, DP + cols, d, DP, True, ROPE)
    acc1 = tl.zeros((RB, DP), tl.float32)
    acc2 = tl.zeros((RB, DP), tl.float32)
    start, end = _split_range(s, tiles, N, BN)
    for t0 in range(start, end, BN):
        tok = t0 + tl.arange(0, BN)
        tm = tok < end
        k = _load_rot(base, tok, tm, stride, C + hd * d, pos, hd, theta, w, quarter, d, DP, ROPE)  # [BN, DP]
        v = tl.load(base + tok[:, None] * stride + 2 * C + hd * d + cols[None, :],
                    mask=tm[:, None] & (cols < d)[None, :], other=0.0).to(tl.float32)
        z1 = _dot(k, w1, None, DOT, PREC)
        z2 = _dot(k, w2, None, DOT, PREC)
        sg = tl.sigmoid(z2)
        e1 = v * z2 * sg  # v silu(z2)
        e2 = v * z1 * sg * (1.0 + z2 * (1.0 - sg))  # v z1 silu'(z2)
        if NRB == 1:
            kr = k
        else:
            kr = _load_rot(base, tok, tm, stride, C + hd * d, rpos, hd, theta, w, quarter, d, DP, ROPE)
        acc1 = _dot_tn(kr, e1, acc1, DOT, PREC)
        acc2 = _dot_tn(kr, e2, acc2, DOT, PREC)
    _store_partials(part, bh, s, rpos, cols, acc1, acc2, NRB, DP)


@triton.jit(do_not_specialize=RUNTIME)
def head_fwd_apply(qkv, w12n, theta, out, N, h, w, stride, out_stride, C, H, quarter,
                   d: tl.constexpr, DP: tl.constexpr, RB: tl.constexpr, BN: tl.constexpr,
                   ROPE: tl.constexpr, PREC: tl.constexpr):
    """out[b, tokens, head columns] = (q W1') * silu(q W2') for one token tile, W' per sample."""
    NRB: tl.constexpr = DP // RB
    DOT: tl.constexpr = qkv.dtype.element_ty  # dot operands in the input dtype (fp32 sums)
    bh = tl.program_id(1)
    b, hd = bh // H, bh % H
    base = qkv + b.to(tl.int64) * N * stride
    tok = tl.program_id(0) * BN + tl.arange(0, BN)
    tm = tok < N
    pos = tl.arange(0, DP)
    q = _load_rot(base, tok, tm, stride, hd * d, pos, hd, theta, w, quarter, d, DP, ROPE)  # [BN, DP]
    wb = w12n + bh * DP * 2 * DP
    obase = out + b.to(tl.int64) * N * out_stride + hd * d
    for r in tl.static_range(NRB):  # value-channel blocks, independent
        cols = r * RB + tl.arange(0, RB)
        y1 = _dot(q, _tile(wb, pos, DP, cols), None, DOT, PREC)
        y2 = _dot(q, _tile(wb, pos, DP, DP + cols), None, DOT, PREC)
        o = y1 * y2 * tl.sigmoid(y2)
        tl.store(obase + tok[:, None] * out_stride + cols[None, :], o.to(out.dtype.element_ty),
                 mask=tm[:, None] & (cols < d)[None, :])


@triton.jit(do_not_specialize=RUNTIME)
def head_bwd_q(qkv, dout, w12n, theta, out, dqkv, part, N, h, w, tiles, stride, out_stride, C, H, quarter,
               d: tl.constexpr, DP: tl.constexpr, RB: tl.constexpr, BN: tl.constexpr,
               ROPE: tl.constexpr, PREC: tl.constexpr):
    """Back through out = (q W1') * silu(q W2') over one token range: dq (rows of block r), the
    recomputed output (value columns of block r) and partial sums of dW' = q^T dy."""
    NRB: tl.constexpr = DP // RB
    DOT: tl.constexpr = qkv.dtype.element_ty  # dot operands in the input dtype (fp32 sums)
    r, s, b, hd, bh = _head_program(H, NRB)
    base = qkv + b.to(tl.int64) * N * stride
    dbase = dqkv + b.to(tl.int64) * N * stride
    obase = out + b.to(tl.int64) * N * out_stride + hd * d
    gbase = dout + b.to(tl.int64) * N * out_stride + hd * d
    pos = tl.arange(0, DP)
    rpos = r * RB + tl.arange(0, RB)
    ppos = rpos ^ (DP // 2)  # RoPE partners of the block's rows
    cols = tl.arange(0, DP)
    wb = w12n + bh * DP * 2 * DP
    w1, w2 = _tile(wb, pos, DP, cols), _tile(wb, pos, DP, DP + cols)
    w1r, w2r = _tile(wb, rpos, DP, cols), _tile(wb, rpos, DP, DP + cols)  # [RB, DP]
    mine = (cols < d) & (cols // RB == r)  # value columns this program stores
    acc1 = tl.zeros((RB, DP), tl.float32)
    acc2 = tl.zeros((RB, DP), tl.float32)
    start, end = _split_range(s, tiles, N, BN)
    for t0 in range(start, end, BN):
        tok = t0 + tl.arange(0, BN)
        tm = tok < end
        q = _load_rot(base, tok, tm, stride, hd * d, pos, hd, theta, w, quarter, d, DP, ROPE)
        do = tl.load(gbase + tok[:, None] * out_stride + cols[None, :],
                     mask=tm[:, None] & (cols < d)[None, :], other=0.0).to(tl.float32)
        y1 = _dot(q, w1, None, DOT, PREC)
        y2 = _dot(q, w2, None, DOT, PREC)
        sg = tl.sigmoid(y2)
        a = y2 * sg
        tl.store(obase + tok[:, None] * out_stride + cols[None, :], (y1 * a).to(out.dtype.element_ty),
                 mask=tm[:, None] & mine[None, :])
        dy1 = do * a
        dy2 = do * y1 * sg * (1.0 + y2 * (1.0 - sg))
        if NRB == 1:
            qr = q
        else:
            qr = _load_rot(base, tok, tm, stride, hd * d, rpos, hd, theta, w, quarter, d, DP, ROPE)
        acc1 = _dot_tn(qr, dy1, acc1, DOT, PREC)
        acc2 = _dot_tn(qr, dy2, acc2, DOT, PREC)
        dq = _dot_nt(dy2, w2r, _dot_nt(dy1, w1r, None, DOT, PREC), DOT, PREC)  # [BN, RB]
        dq_partner = dq
        if ROPE:
            dq_partner = _dot_nt(dy2, _tile(wb, ppos, DP, DP + cols),
                                 _dot_nt(dy1, _tile(wb, ppos, DP, cols), None, DOT, PREC), DOT, PREC)
        _store_rot(dbase, tok, tm, stride, hd * d, rpos, dq, dq_partner, hd, theta, w, quarter, d, DP, ROPE)
    _store_partials(part, bh, s, rpos, cols, acc1, acc2, NRB, DP)


@triton.jit(do_not_specialize=RUNTIME)
def head_bwd_k(qkv, w12, dgc, theta, dqkv, part, N, h, w, tiles, stride, C, H, quarter,
               d: tl.constexpr, DP: tl.constexpr, RB: tl.constexpr, BN: tl.constexpr,
               ROPE: tl.constexpr, PREC: tl.constexpr):
    """Back through the inner gradients g1 = c K^T (v a), g2 = c K^T (v z1 a'), z = K [W1 | W2],
    a = silu(z2), given dgc = c dg per sample: dk (rows of block r), dv (value columns of block r)
    and partial sums of the direct dW = K^T dz over one token range."""
    NRB: tl.constexpr = DP // RB
    DOT: tl.constexpr = qkv.dtype.element_ty  # dot operands in the input dtype (fp32 sums)
    r, s, b, hd, bh = _head_program(H, NRB)
    base = qkv + b.to(tl.int64) * N * stride
    dbase = dqkv + b.to(tl.int64) * N * stride
    pos = tl.arange(0, DP)
    rpos = r * RB + tl.arange(0, RB)
    ppos = rpos ^ (DP // 2)
    cols = tl.arange(0, DP)
    wb = w12 + hd * DP * 2 * DP
    gb = dgc + bh * DP * 2 * DP
    w1, w2 = _tile(wb, pos, DP, cols), _tile(wb, pos, DP, DP + cols)
    g1, g2 = _tile(gb, pos, DP, cols), _tile(gb, pos, DP, DP + cols)
    mine = (cols < d) & (cols // RB == r)
    acc1 = tl.zeros((RB, DP), tl.float32)
    acc2 = tl.zeros((RB, DP), tl.float32)
    start, end = _split_range(s, tiles, N, BN)
    for t0 in range(start, end, BN):
        tok = t0 + tl.arange(0, BN)
        tm = tok < end
        k = _load_rot(base, tok, tm, stride, C + hd * d, pos, hd, theta, w, quarter, d, DP, ROPE)
        vptr = tok[:, None] * stride + 2 * C + hd * d + cols[None, :]
        v = tl.load(base + vptr, mask=tm[:, None] & (cols < d)[None, :], other=0.0).to(tl.float32)
        z1 = _dot(k, w1, None, DOT, PREC)
        z2 = _dot(k, w2, None, DOT, PREC)
        sg = tl.sigmoid(z2)
        a = z2 * sg
        ds = sg * (1.0 + z2 * (1.0 - sg))  # silu'
        dds = sg * (1.0 - sg) * (2.0 + z2 * (1.0 - 2.0 * sg))  # silu''
        p1 = _dot(k, g1, None, DOT, PREC)  # d(v a)
        p2 = _dot(k, g2, None, DOT, PREC)  # d(v z1 a')
        tl.store(dbase + vptr, (p1 * a + p2 * z1 * ds).to(dqkv.dtype.element_ty), mask=tm[:, None] & mine[None, :])
        vds = v * ds
        dz1 = p2 * vds
        dz2 = p1 * vds + p2 * v * z1 * dds
        e1 = v * a
        e2 = vds * z1
        if NRB == 1:
            kr = k
        else:
            kr = _load_rot(base, tok, tm, stride, C + hd * d, rpos, hd, theta, w, quarter, d, DP, ROPE)
        acc1 = _dot_tn(kr, dz1, acc1, DOT, PREC)
        acc2 = _dot_tn(kr, dz2, acc2, DOT, PREC)
        # dk = e1 dgc1^T + e2 dgc2^T + dz1 W1^T + dz2 W2^T, rows of block r (and their RoPE partners)
        dk = _dot_nt(e1, _tile(gb, rpos, DP, cols), None, DOT, PREC)
        dk = _dot_nt(e2, _tile(gb, rpos, DP, DP + cols), dk, DOT, PREC)
        dk = _dot_nt(dz1, _tile(wb, rpos, DP, cols), dk, DOT, PREC)
        dk = _dot_nt(dz2, _tile(wb, rpos, DP, DP + cols), dk, DOT, PREC)
        dk_partner = dk
        if ROPE:
            dk_partner = _dot_nt(e1, _tile(gb, ppos, DP, cols), None, DOT, PREC)
            dk_partner = _dot_nt(e2, _tile(gb, ppos, DP, DP + cols), dk_partner, DOT, PREC)
            dk_partner = _dot_nt(dz1, _tile(wb, ppos, DP, cols), dk_partner, DOT, PREC)
            dk_partner = _dot_nt(dz2, _tile(wb, ppos, DP, DP + cols), dk_partner, DOT, PREC)
        _store_rot(dbase, tok, tm, stride, C + hd * d, rpos, dk, dk_partner, hd, theta, w, quarter, d, DP, ROPE)
    _store_partials(part, bh, s, rpos, cols, acc1, acc2, NRB, DP)


# ---------------------------------------------------------------- finalize, both branches


@triton.jit(do_not_specialize=["S"])
def finalize_fwd(part, wa, wb, wt, g, n, wn, S, wmod, coef, lr, d: tl.constexpr, M: tl.constexpr,
                 K: tl.constexpr, BK: tl.constexpr, HEAD: tl.constexpr, ROPE: tl.constexpr):
    """Per matrix m (a sample and head, or a sample's conv kernels) and column block: the inner
    gradient g = coef * sum of the S partials [M, K] (summed in order), its column norms n over the
    M rows, and the stepped weights w' = w - lr g / (n + 1), w the parameters of matrix m % wmod;
    the SwiGLU branch's w also goes to wt, in tile layout, for the backward."""
    m = tl.program_id(0)
    cols = tl.program_id(1) * BK + tl.arange(0, BK)
    rows = tl.arange(0, M)
    off = rows[:, None] * K + cols[None, :]
    acc = tl.zeros((M, BK), tl.float32)
    for s in range(S):
        acc += tl.load(part + (m * S + s) * M * K + off)
    acc = acc * coef
    norm = tl.sqrt(tl.sum(acc * acc, axis=0))
    w = _weights(wa, wb, m % wmod, rows, cols, d, M, HEAD, ROPE)
    tl.store(g + m * M * K + off, acc)
    tl.store(n + m * K + cols, norm)
    tl.store(wn + m * M * K + off, w - lr * acc / (norm + 1.0)[None, :])
    if HEAD:
        if m < wmod:  # the first sample's programs, one per head
            tl.store(wt + m * M * K + off, w)


@triton.jit(do_not_specialize=["S"])
def finalize_bwd(part, g, n, dwn, dgc, S, factor, M: tl.constexpr, K: tl.constexpr, BK: tl.constexpr):
    """Back through w' = w - lr g / (n + 1): dwn = dL/dw' (the S partials summed in order) and
    dgc = factor * dL/dg, with factor = -lr * coef folding in the inner gradient's own factor."""
    m = tl.program_id(0)
    cols = tl.program_id(1) * BK + tl.arange(0, BK)
    off = tl.arange(0, M)[:, None] * K + cols[None, :]
    acc = tl.zeros((M, BK), tl.float32)
    for s in range(S):
        acc += tl.load(part + (m * S + s) * M * K + off)
    tl.store(dwn + m * M * K + off, acc)
    gm = tl.load(g + m * M * K + off)
    norm = tl.load(n + m * K + cols)
    n1 = norm + 1.0
    dot = tl.sum(gm * acc, axis=0)
    # d/dg of g / (n + 1): du / (n + 1) - g (g . du) / ((n + 1)^2 n); g = 0 where n = 0
    grad = acc / n1[None, :] - gm * (dot / (n1 * n1 * tl.maximum(norm, 1e-30)))[None, :]
    tl.store(dgc + m * M * K + off, factor * grad)
