"""The ViT³ test-time-training layer (https://arxiv.org/abs/2512.01643).

Keys and values of one image are a small training set: an inner model is trained
on them with one full-batch gradient step of a dot-product loss (inner lr 1.0,
each gradient divided by its norm + 1), and the trained inner model is applied
to the queries. The paper's final design runs two inner models side by side:

  branch 1: simplified SwiGLU per head, f(x) = (x W1) * silu(x W2), on q1, k1, v1 (C wide)
  branch 2: 3x3 depthwise conv on q2, k2, v2 laid out as d x h x w maps (d = C / heads)

and projects concat(f'(q1), conv'(q2)) back to C. Cost is linear in N.

The other options reproduce the paper's design-space ablations. Three
implementations sit behind `impl`: "reference" (reference.py, autograd inner
gradient, every option), "fast" (fast.py, closed-form gradient and a custom
backward, the paper's design, CPU and any device) and "triton" (kernels.py, conv_kernels.py and
triton_ops.py, the same maths as fused GPU kernels); "auto" takes Triton for CUDA
tensors where Triton imports and passes its first-use check (dispatch.py; the
VIT3_TTT_IMPL environment variable overrides the choice), the fast path
elsewhere, and the reference for designs the other two do not cover.
"""
import torch
import torch.nn as nn
from timm.layers import trunc_normal_

from ..layers import RoPE2d, autocast_off
from . import dispatch
from .dispatch import HAS_TRITON
from .fast import ttt_fast
from .reference import HEAD_MODELS, ttt_reference

INNER_MODELS = ("linear", "mlp", "silu_linear", "swiglu", "dwconv3x3", "swiglu+dwconv")
INNER_LOSSES = ("dot", "mse", "l1")
IMPLS = ("auto", "fast", "reference", "triton")


def _upcast(t: torch.Tensor) -> torch.Tensor:
    """Half precision to float32; float32 and float64 unchanged."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


class TTT(nn.Module):
    """ViT³ test-time-training token mixer: forward(x [B, h*w, C], h, w, rope=None) -> [B, h*w, C].

    Parameter names and shapes of the default design equal the official release
    (`qkv`, `w1`, `w2`, `w3`, `proj`), so its checkpoints load unchanged.

    Args:
        dim, num_heads, qkv_bias: as in attention.
        inner_model: one of INNER_MODELS; "swiglu+dwconv" is the paper's final design.
        inner_mlp_ratio: hidden width / head width of the "mlp" inner model.
        inner_loss: "dot" (the paper's), "mse" or "l1".
        inner_lr, inner_steps: step size and number of passes over the keys and values.
        inner_batch: tokens per inner mini-batch, updated sequentially; None = full batch.
        grad_norm: divide each inner gradient by (its norm + 1).
        impl: "auto", "fast", "reference" or "triton" (see the module docstring; "auto" follows VIT3_TTT_IMPL).
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, *,
                 inner_model: str = "swiglu+dwconv", inner_mlp_ratio: float = 4.0, inner_loss: str = "dot",
                 inner_lr: float = 1.0, inner_steps: int = 1, inner_batch: int | None = None,
                 grad_norm: bool = True, impl: str = "auto"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        if inner_model not in INNER_MODELS:
            raise ValueError(f"unknown inner_model {inner_model!r}; choose one of {INNER_MODELS}")
        if inner_loss not in INNER_LOSSES:
            raise ValueError(f"unknown inner_loss {inner_loss!r}; choose one of {INNER_LOSSES}")
        if inner_steps < 1 or (inner_batch is not None and inner_batch < 1):
            raise ValueError(f"inner_steps and inner_batch must be positive, got {inner_steps}, {inner_batch}")
        self.dim, self.num_heads = dim, num_heads
        self.inner_model, self.inner_loss = inner_model, inner_loss
        self.inner_lr, self.inner_steps, self.inner_batch = inner_lr, inner_steps, inner_batch
        self.grad_norm, self.impl = grad_norm, impl  # checked by the setter below
        d = dim // num_heads
        self.head_kind = inner_model.split("+")[0] if inner_model.split("+")[0] in HEAD_MODELS else None
        use_conv = "dwconv" in inner_model
        # branch widths: the head branch is C wide; the conv branch is d wide next to it, C wide alone
        self.conv_dim = (d if self.head_kind else dim) if use_conv else 0
        head_dim_total = dim if self.head_kind else 0

        self.qkv = nn.Linear(dim, 3 * (head_dim_total + self.conv_dim), bias=qkv_bias)
        if self.head_kind in ("linear", "silu_linear"):
            self.w1 = nn.Parameter(torch.zeros(1, num_heads, d, d))
        elif self.head_kind == "swiglu":
            self.w1 = nn.Parameter(torch.zeros(1, num_heads, d, d))
            self.w2 = nn.Parameter(torch.zeros(1, num_heads, d, d))
        elif self.head_kind == "mlp":
            hidden = int(d * inner_mlp_ratio)
            self.w1 = nn.Parameter(torch.zeros(1, num_heads, d, hidden))
            self.w2 = nn.Parameter(torch.zeros(1, num_heads, hidden, d))
        if use_conv:
            self.w3 = nn.Parameter(torch.zeros(self.conv_dim, 1, 3, 3))
        for p in self.inner_params():
            trunc_normal_(p, std=0.02)
        self.proj = nn.Linear(head_dim_total + self.conv_dim, dim)
        # 9 = 1 channel x 3 x 3, the conv branch's "head width"; the official code uses it for both branches
        self.scale = 9 ** -0.5

    def head_params(self) -> list[nn.Parameter]:
        return [getattr(self, n) for n in ("w1", "w2") if hasattr(self, n)]

    def inner_params(self) -> list[nn.Parameter]:
        return self.head_params() + ([self.w3] if self.conv_dim else [])

    def paper_design(self) -> bool:
        """Whether the layer is the paper's design, which the closed-form paths (fast, triton) cover."""
        return (self.inner_model == "swiglu+dwconv" and self.inner_loss == "dot" and self.inner_steps == 1
                and self.inner_batch is None and self.grad_norm)

    @property
    def impl(self) -> str:
        return self._impl

    @impl.setter
    def impl(self, impl: str):
        # checked when set, at construction or later, so a bad value fails there and not at the first forward
        if impl not in IMPLS:
            raise ValueError(f"unknown impl {impl!r}; choose one of {IMPLS}")
        if impl in ("fast", "triton") and not self.paper_design():
            raise ValueError(f"impl={impl!r} covers the paper's design only (swiglu+dwconv, dot loss, one "
                             "full-batch step, grad_norm=True); use impl='reference' or 'auto' for other options")
        self._impl = impl

    def closed_form(self) -> bool:
        """Whether the layer runs the paper's design with the closed-form inner gradient (fast or triton)."""
        return self.impl != "reference" and self.paper_design()

    def path(self, device: torch.device, dtype: torch.dtype = torch.float32, rope: bool = False) -> str:
        """The implementation a call on tensors of this device and dtype (with RoPE or not) takes: "triton",
        "fast" or "reference". For impl="auto" on a GPU, the first call of a case checks the Triton path."""
        if not self.closed_form():
            return "reference"
        if self.impl != "auto":
            return self.impl
        if dispatch.FORCED_IMPL:
            return dispatch.forced_impl(device.type)
        return "triton" if dispatch.auto_takes_triton(device, dtype, self.dim // self.num_heads, rope) else "fast"

    def forward(self, x: torch.Tensor, h: int, w: int, rope: RoPE2d | None = None) -> torch.Tensor:
        b, n, c = x.shape
        if n != h * w:
            raise ValueError(f"TTT got {n} tokens for an h x w = {h} x {w} map")
        qkv = self.qkv(x)  # [B, N, 3C + 3c]; read by nothing but the inner step below
        path = self.path(qkv.device, qkv.dtype, rope is not None)
        if path == "reference":
            return self.proj(self.inner(qkv, h, w, rope))  # [B, N, C]
        # the inner step and the output projection are one autograd function
        return (self._triton if path == "triton" else self._fast)(qkv, h, w, rope)

    def _triton(self, qkv: torch.Tensor, h: int, w: int, rope: RoPE2d | None) -> torch.Tensor:
        if not HAS_TRITON:
            raise RuntimeError("impl='triton' needs Triton (pip install triton), or use impl='fast'")
        from .triton_ops import ttt_triton

        with autocast_off(qkv.device):  # as in _fast
            theta = None if rope is None else rope.frequencies(qkv.device)
            return ttt_triton(qkv, self.w1, self.w2, self.w3, self.proj.weight, self.proj.bias,
                              heads=self.num_heads, h=h, w=w, scale=self.scale, lr=self.inner_lr, rope_theta=theta)

    def _fast(self, qkv: torch.Tensor, h: int, w: int, rope: RoPE2d | None) -> torch.Tensor:
        # autocast off: the inner math picks float32 itself and the projection runs in qkv's (autocast) dtype
        with autocast_off(qkv.device):
            tables = None
            if rope is not None:
                tables = rope.rotations(h, w, qkv.device, torch.promote_types(qkv.dtype, torch.float32))
            return ttt_fast(qkv, self.w1, self.w2, self.w3, self.proj.weight, self.proj.bias, heads=self.num_heads,
                            h=h, w=w, scale=self.scale, lr=self.inner_lr, rope_tables=tables, inplace_grad=True)

    def inner(self, qkv: torch.Tensor, h: int, w: int, rope: RoPE2d | None = None) -> torch.Tensor:
        """Reference path: inner training on the keys and values, then the trained models on the queries:
        [B, N, C + c], the output projection's input."""
        # the inner gradient, its norm and the token reductions run in float32 under autocast
        with autocast_off(qkv.device):
            b, n, _ = qkv.shape
            c, heads = self.dim, self.num_heads
            cd, hd = self.conv_dim, (c if self.head_kind else 0)
            q1, k1, v1, q2, k2, v2 = _upcast(qkv).split([hd, hd, hd, cd, cd, cd], dim=-1)
            if self.head_kind and rope is not None:  # rope acts on [B, h, w, C]
                q1 = rope(q1.reshape(b, h, w, c)).view(b, n, c)
                k1 = rope(k1.reshape(b, h, w, c)).view(b, n, c)
            if self.head_kind:  # per head: [B, N, heads, d] views
                q1, k1, v1 = (t.unflatten(-1, (heads, c // heads)) for t in (q1, k1, v1))
            else:
                q1 = k1 = v1 = None
            if not cd:
                q2 = k2 = v2 = None
            return ttt_reference(q1, k1, v1, q2, k2, v2, [_upcast(p) for p in self.head_params()],
                                 _upcast(self.w3) if cd else None, h=h, w=w, head_kind=self.head_kind,
                                 loss=self.inner_loss, scale=self.scale, lr=self.inner_lr, steps=self.inner_steps,
                                 batch=self.inner_batch, grad_norm=self.grad_norm)

    def inner_macs(self, tokens: int) -> int:
        """Multiply-accumulates of the inner step for one image of `tokens` tokens.

        Exact for the paper's design (what the fast path computes): per head K [W1|W2], K^T [.],
        Q [W1'|W2'] (6 N d^2), and for the conv branch the 3x3 gradient correlation and the
        trained conv (2 x 9 c N). Other designs: (2 steps + 1) x the inner model's forward, an estimate.
        """
        d = self.dim // self.num_heads
        if self.inner_model == "swiglu+dwconv":
            forward = 2 * tokens * d * self.dim + 9 * self.conv_dim * tokens
            if self.closed_form():
                return 6 * tokens * d * self.dim + 18 * self.conv_dim * tokens
        else:
            per_token = {"linear": d, "silu_linear": d, "swiglu": 2 * d, None: 0}.get(
                self.head_kind, 2 * self.w1.shape[-1])  # mlp: d -> r d -> d
            forward = tokens * per_token * (self.dim if self.head_kind else 0) + 9 * self.conv_dim * tokens
        return (2 * self.inner_steps + 1) * forward

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, inner_model={self.inner_model}, "
                f"inner_loss={self.inner_loss}, inner_lr={self.inner_lr}, impl={self.impl}")
