"""Triton TTT path: launches of kernels.py and conv_kernels.py, the custom ops torch.compile sees, and autograd.

Layering as in flash-linear-attention: Triton kernels (kernels.py, conv_kernels.py) -> two custom ops,
`vit3::ttt_inner_fwd` and `vit3::ttt_inner_bwd` (torch.library.triton_op, so that
torch.compile traces into the launches without a graph break) -> one autograd
Function that adds the output projection (cuBLAS) -> `ttt_triton`, which TTT calls.

What the path saves for the backward: qkv and the d x d / 3 x 3 inner gradients,
their norms and the stepped weights; nothing else N-sized (the projection's input
is recomputed by the backward's first pass, which needs the same reads anyway).

On CPU tensors the kernels run under Triton's interpreter (TRITON_INTERPRET=1 set
before vit3 is imported), which is how the test suite proves them without a GPU.
"""
import torch
import torch.nn.functional as F
from torch.library import triton_op, wrap_triton
from triton.runtime.interpreter import InterpretedFunction

from . import conv_kernels as KC
from . import kernels as K

INTERPRETED = isinstance(K.head_fwd_reduce, InterpretedFunction)


def _kernel(kernel):
    """A kernel launcher torch.compile can trace (wrap_triton); the interpreter's own function on CPU."""
    return kernel if INTERPRETED else wrap_triton(kernel)


def _pow2(x: int) -> int:
    return 1 << (x - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class Plan:
    """Tile sizes, warps and the split of the token axis for one call.

    d: head width, c: conv-branch width. DP / CP: d / c padded to a power of two (>= 16, the
    smallest dot); RB: key-channel rows per program; BN: tokens per tile. The sizes are the largest
    that ptxas fits in Hopper's registers without spilling and whose shared memory (the inner weights
    as dot operands, pipelined loads) fits 227 KB (benchmarks/triton_resources.py prints them; a test
    keeps them there): head width 72 (DP 128) runs as 4 programs of 32 rows on tiles of 16 tokens;
    float32 inputs take tiles of 16 tokens, and up to head width 64 only (see covers). The token axis
    is split so that at least two programs run per SM at batch 1 (each writes its own fp32 partial
    sums, added in a fixed order afterwards)."""

    def __init__(self, b: int, n: int, heads: int, d: int, c: int, device: torch.device, dtype: torch.dtype,
                 block_n: int = 0, splits: int = 0):
        self.dp = max(16, _pow2(d))
        self.rb = min(self.dp, 64 if self.dp <= 64 else 32)
        self.nrb = self.dp // self.rb
        if dtype == torch.float32:  # fp32 dot operands: twice the registers and shared memory
            self.bn, self.warps, self.stages = 16, 8, 1
        else:
            self.bn = {16: 64, 32: 64, 64: 32}.get(self.dp, 16)
            self.warps = 4 if self.dp <= 32 else 8
            self.stages = 2 if self.dp <= 64 else 1  # software-pipelined loads, within Hopper's shared memory
        self.bn = block_n or self.bn
        self.cp = max(16, _pow2(c))
        self.cb = min(self.cp, 32)
        self.bnc = block_n or 32
        self.conv_warps = 8
        sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
        self.splits, self.tiles = self._split(n, self.bn, b * heads * self.nrb, 2 * sms, splits)
        self.splits_c, self.tiles_c = self._split(n, self.bnc, b * (self.cp // self.cb), 2 * sms, splits)

    @staticmethod
    def _split(n: int, bn: int, programs: int, target: int, splits: int) -> tuple[int, int]:
        """(splits, tiles per split) for n tokens in tiles of bn."""
        total = _cdiv(n, bn)
        s = min(total, max(1, splits or _cdiv(target, programs)))
        tiles = _cdiv(total, s)
        return _cdiv(total, tiles), tiles


def _rows_of_channels(d: int, dp: int, rope: bool, device: torch.device) -> torch.Tensor:
    """Tile row of each head channel: channel 2i + e sits at i + e DP/2 with RoPE (real parts first)."""
    ch = torch.arange(d, device=device)
    return ch // 2 + (ch % 2) * (dp // 2) if rope else ch


def covers(head_dim: int, dtype: torch.dtype) -> bool:
    """Whether the kernels take this head width and input dtype: half precision at every width, float32
    up to 64 (wider, four float32 d x d weight tiles alone overflow Hopper's shared memory)."""
    return dtype in (torch.bfloat16, torch.float16) or (dtype == torch.float32 and head_dim <= 64)


def _precision(dtype: torch.dtype) -> str:
    """fp32 inputs follow torch's matmul precision setting (TF32 only where the user allowed it)."""
    return "ieee" if dtype != torch.float32 or torch.get_float32_matmul_precision() == "highest" else "tf32"


def _shapes(qkv: torch.Tensor, w3: torch.Tensor, heads: int, h: int, w: int):
    b, n, width = qkv.shape
    c = w3.shape[0]
    dim = (width - 3 * c) // 3
    if n != h * w:
        raise ValueError(f"TTT got {n} tokens for an h x w = {h} x {w} map")
    return b, n, dim, dim // heads, c


@triton_op("vit3::ttt_inner_fwd", mutates_args={})
def ttt_inner_fwd(qkv: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor,
                  theta: torch.Tensor | None, heads: int, h: int, w: int, scale: float, lr: float,
                  block_n: int, splits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                     torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The inner step: (out [B, N, C + c] in qkv's dtype, the output projection's input; then for the
    backward, in tile layout, float32: w12, g12, n12, w12', g3, n3, w3')."""
    b, n, dim, d, c = _shapes(qkv, w3, heads, h, w)
    p = Plan(b, n, heads, d, c, qkv.device, qkv.dtype, block_n, splits)
    rope = theta is not None
    coef = -scale / n  # dL/df(k) = coef * v for L = -scale * mean_n <f(k_n), v_n>
    f32 = dict(dtype=torch.float32, device=qkv.device)
    common = dict(d=d, DP=p.dp, RB=p.rb, BN=p.bn, ROPE=rope, PREC=_precision(qkv.dtype), num_warps=p.warps,
                  num_stages=p.stages)
    conv = dict(CP=p.cp, CB=p.cb, BN=p.bnc, num_warps=p.conv_warps)
    rope_t = theta if rope else qkv  # never read without RoPE

    w1, w2, w3 = (t.contiguous() for t in (w1, w2, w3))
    w12, g12, w12n = (torch.empty(b * heads if i else heads, p.dp, 2 * p.dp, **f32) for i in range(3))
    n12 = torch.empty(b * heads, 2 * p.dp, **f32)
    bk = min(2 * p.dp, 64)

    part = torch.empty(b * heads, p.splits, p.dp, 2 * p.dp, **f32)
    _kernel(K.head_fwd_reduce)[(p.nrb * p.splits, b * heads)](
        qkv, w1, w2, rope_t, part, n, h, w, p.tiles, qkv.stride(1), dim, heads, dim // 4, **common)
    part3 = torch.empty(b, p.splits_c, 16, p.cp, **f32)
    _kernel(KC.conv_fwd_reduce)[(p.splits_c, b * (p.cp // p.cb))](
        qkv, part3, n, h, w, p.tiles_c, qkv.stride(1), dim, c, **conv)

    _kernel(K.finalize_fwd)[(b * heads, 2 * p.dp // bk)](
        part, w1, w2, w12, g12, n12, w12n, p.splits, heads, coef, lr, d=d, M=p.dp, K=2 * p.dp, BK=bk,
        HEAD=True, ROPE=rope)
    g3, w3n = (torch.empty(b, 16, p.cp, **f32) for _ in range(2))
    n3 = torch.empty(b, p.cp, **f32)
    _kernel(K.finalize_fwd)[(b, p.cp // p.cb)](  # conv: no second weight, no tile copy (HEAD=False)
        part3, w3, w3, w3n, g3, n3, w3n, p.splits_c, 1, coef, lr, d=c, M=16, K=p.cp, BK=p.cb, HEAD=False,
        ROPE=False)

    out = torch.empty(b, n, dim + c, dtype=qkv.dtype, device=qkv.device)
    _kernel(K.head_fwd_apply)[(_cdiv(n, p.bn), b * heads)](
        qkv, w12n, rope_t, out, n, h, w, qkv.stride(1), out.stride(1), dim, heads, dim // 4, **common)
    _kernel(KC.conv_fwd_apply)[(_cdiv(n, p.bnc), b * (p.cp // p.cb))](
        qkv, w3n, out, n, h, w, qkv.stride(1), out.stride(1), dim, c, **conv)
    return out, w12, g12, n12, w12n, g3, n3, w3n


@triton_op("vit3::ttt_inner_bwd", mutates_args={})
def ttt_inner_bwd(qkv: torch.Tensor, dout: torch.Tensor, w3: torch.Tensor, theta: torch.Tensor | None,
                  w12: torch.Tensor, g12: torch.Tensor, n12: torch.Tensor, w12n: torch.Tensor,
                  g3: torch.Tensor, n3: torch.Tensor, w3n: torch.Tensor, heads: int, h: int, w: int,
                  scale: float, lr: float, block_n: int, splits: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of the inner step given dout = dL/d(projection input): (dqkv in qkv's layout and dtype,
    the recomputed projection input, dw1, dw2, dw3 in the parameters' shapes, float32)."""
    b, n, dim, d, c = _shapes(qkv, w3, heads, h, w)
    p = Plan(b, n, heads, d, c, qkv.device, qkv.dtype, block_n, splits)
    rope = theta is not None
    rows = _rows_of_channels(d, p.dp, rope, qkv.device)
    coef = -scale / n
    f32 = dict(dtype=torch.float32, device=qkv.device)
    common = dict(d=d, DP=p.dp, RB=p.rb, BN=p.bn, ROPE=rope, PREC=_precision(qkv.dtype), num_warps=p.warps,
                  num_stages=p.stages)
    conv = dict(CP=p.cp, CB=p.cb, BN=p.bnc, num_warps=p.conv_warps)
    rope_t = theta if rope else qkv
    out = torch.empty(b, n, dim + c, dtype=qkv.dtype, device=qkv.device)
    dqkv = torch.empty_like(qkv)

    # pass over q and dout: dq, the projection input, partial dW' (and the conv branch's)
    part = torch.empty(b * heads, p.splits, p.dp, 2 * p.dp, **f32)
    _kernel(K.head_bwd_q)[(p.nrb * p.splits, b * heads)](
        qkv, dout, w12n, rope_t, out, dqkv, part, n, h, w, p.tiles, qkv.stride(1), out.stride(1), dim, heads,
        dim // 4, **common)
    part3 = torch.empty(b, p.splits_c, 16, p.cp, **f32)
    _kernel(KC.conv_bwd_q)[(p.splits_c, b * (p.cp // p.cb))](
        qkv, dout, w3n, out, dqkv, part3, n, h, w, p.tiles_c, qkv.stride(1), out.stride(1), dim, c,
        **conv)

    # back through the normalised step
    dw12n, dgc12 = (torch.empty(b * heads, p.dp, 2 * p.dp, **f32) for _ in range(2))
    bk = min(2 * p.dp, 64)
    _kernel(K.finalize_bwd)[(b * heads, 2 * p.dp // bk)](
        part, g12, n12, dw12n, dgc12, p.splits, -lr * coef, M=p.dp, K=2 * p.dp, BK=bk)
    dw3n, dgc3 = (torch.empty(b, 16, p.cp, **f32) for _ in range(2))
    _kernel(K.finalize_bwd)[(b, p.cp // p.cb)](
        part3, g3, n3, dw3n, dgc3, p.splits_c, -lr * coef, M=16, K=p.cp, BK=p.cb)

    # pass over k and v: dk, dv, partial direct dW
    partk = torch.empty(b * heads, p.splits, p.dp, 2 * p.dp, **f32)
    _kernel(K.head_bwd_k)[(p.nrb * p.splits, b * heads)](
        qkv, w12, dgc12, rope_t, dqkv, partk, n, h, w, p.tiles, qkv.stride(1),
        dim, heads, dim // 4, **common)
    _kernel(KC.conv_bwd_k)[(_cdiv(n, p.bnc), b * (p.cp // p.cb))](
        qkv, dgc3, dqkv, n, h, w, qkv.stride(1), dim, c, **conv)

    # weight gradients: the inner weights are shared by all samples (sum over them and the splits)
    dw12 = dw12n.view(b, heads, p.dp, 2 * p.dp).sum(0) + partk.view(b, heads, p.splits, p.dp, 2 * p.dp).sum((0, 2))
    dw12 = dw12[:, rows]  # [H, d, 2 DP], channel order
    dw3 = dw3n.sum(0)[:9, :c].t().reshape(c, 1, 3, 3)
    return dqkv, out, dw12[None, :, :, :d].contiguous(), dw12[None, :, :, p.dp:p.dp + d].contiguous(), dw3


def _project(out: torch.Tensor, pw: torch.Tensor, pb: torch.Tensor | None) -> torch.Tensor:
    """The layer's output projection in the inner step's output dtype (as autocast would run it)."""
    return F.linear(out, pw.to(out.dtype), None if pb is None else pb.to(out.dtype))


class _TTTTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, w1, w2, w3, pw, pb, theta, heads, h, w, scale, lr, block_n, splits):
        out, *inner = torch.ops.vit3.ttt_inner_fwd(qkv, w1, w2, w3, theta, heads, h, w, scale, lr, block_n, splits)
        ctx.save_for_backward(qkv, w1, w2, w3, pw, theta, *inner)
        ctx.args = (heads, h, w, scale, lr, block_n, splits, pb is not None)
        return _project(out, pw, pb)

    @staticmethod
    def backward(ctx, dy):
        qkv, w1, w2, w3, pw, theta, *inner = ctx.saved_tensors
        heads, h, w, scale, lr, block_n, splits, has_bias = ctx.args
        dy = dy.contiguous()  # [B, N, C]
        dout = dy @ pw.to(dy.dtype)  # [B, N, C + c]
        dqkv, out, dw1, dw2, dw3 = torch.ops.vit3.ttt_inner_bwd(
            qkv, dout, w3, theta, *inner, heads, h, w, scale, lr, block_n, splits)
        dpw = dy.flatten(0, 1).t() @ out.flatten(0, 1)  # [C, C + c]
        dpb = dy.sum(dim=(0, 1), dtype=torch.float32).to(pw.dtype) if has_bias else None
        return (dqkv, dw1.to(w1.dtype), dw2.to(w2.dtype), dw3.to(w3.dtype), dpw.to(pw.dtype), dpb,
                None, None, None, None, None, None, None, None)


def check_device(device: torch.device):
    """Raise a clear error where the Triton path cannot run."""
    if device.type != "cuda" and not INTERPRETED:
        raise RuntimeError(f"impl='triton' needs CUDA tensors (got {device.type}); on CPU it runs only under "
                           "Triton's interpreter: set TRITON_INTERPRET=1 before importing vit3, or use "
                           "impl='fast'")


def ttt_triton(qkv, w1, w2, w3, proj_weight, proj_bias=None, *, heads, h, w, scale, lr, rope_theta=None,
               block_n: int = 0, splits: int = 0):
    """The paper's TTT inner step and the layer's output projection, as Triton kernels (ttt_fast's maths).

    qkv: [B, N, 3C + 3c] (q1 k1 v1 q2 k2 v2), bf16, fp16 or fp32; w1/w2: [1, H, d, d]; w3: [c, 1, 3, 3];
    proj_weight: [C_out, C + c]; rope_theta: None or RoPE2d's frequencies [C/4] (float32): q1 and k1
    are rotated in the kernels. block_n / splits: tokens per tile and token-axis splits (0 = chosen
    here; the tests set them to force several tiles and splits on tiny inputs).
    Returns [B, N, C_out] in qkv's dtype.
    """
    check_device(qkv.device)
    d = w1.shape[-1]
    # the float32 width limit is one of GPU shared memory: the interpreter takes every width (the tests
    # prove the kernels at head width 72 there, in float32)
    if not covers(d if qkv.is_cuda else 0, qkv.dtype):
        raise TypeError(f"impl='triton' takes bfloat16 or float16 inputs, and float32 up to head width 64; got "
                        f"{qkv.dtype} at head width {d}: use bf16 autocast or impl='fast'")
    qkv = qkv.contiguous()
    args = (heads, h, w, float(scale), float(lr), block_n, splits)
    if rope_theta is not None:
        rope_theta = rope_theta.to(device=qkv.device, dtype=torch.float32).contiguous()
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                            for t in (qkv, w1, w2, w3, proj_weight, proj_bias))):
        return _project(torch.ops.vit3.ttt_inner_fwd(qkv, w1, w2, w3, rope_theta, *args)[0], proj_weight, proj_bias)
    return _TTTTriton.apply(qkv, w1, w2, w3, proj_weight, proj_bias, rope_theta, *args)
