"""How impl="auto" chooses the TTT layer's path, and the switch that overrides it.

The Triton kernels are proven under Triton's interpreter and built for sm_90 on a CPU, but a user's
first GPU run is the first time they run compiled on that GPU, driver and Triton. So "auto" checks
them before using them: the first call of each case (device, dtype, head width, RoPE or not) runs
the Triton path and the fast path on one small random input, forward and backward, and compares the
output and every input gradient. If Triton raises or differs beyond the dtype's tolerance, one
warning names the case and the error and the fast path runs that case for the rest of the process.
The check costs one small forward and backward on each path; the kernels compiled for it are the
ones the layer then runs (the token count is not a compile-time constant).

VIT3_TTT_IMPL=fast|triton|reference (read when vit3 is imported, as timm reads TIMM_FUSED_ATTN)
replaces auto's choice for the paper's design, unchecked: a forced path that fails raises. Another value,
or triton where it cannot run, is a ConfigError at the first call (and before a script makes its run folder). Layers
built with an explicit impl keep it, and other designs take the reference path whatever it says.
"""
import importlib.util
import os
import warnings

import torch

from ..errors import ConfigError
from ..layers import RoPE2d, autocast_off

ENV_VAR = "VIT3_TTT_IMPL"
FORCEABLE = ("fast", "triton", "reference")

# Triton ships with PyTorch's Linux wheels; the Triton path is imported on first use only, so that
# CPU runs never load it (and TRITON_INTERPRET can still be set before it is)
HAS_TRITON = importlib.util.find_spec("triton") is not None

# devices on which auto takes Triton (once it passes the check); the tests add "cpu", where the
# interpreter runs the kernels
TRITON_DEVICES = ("cuda",)

# relative RMS error against the float32 fast path allowed per input dtype: a few times what rounding
# gives (TF32 dots in float32 where torch allows them; bf16 measures below 0.01 in
# test_bf16_triton_close_to_fp32), far below the O(1) of a wrong or unwritten tile
TOLERANCE = {torch.float32: 5e-3, torch.float16: 1e-2, torch.bfloat16: 3e-2}

# (device, dtype, head width, RoPE) -> None if the Triton path passed its check, else why it did not
VERDICTS: dict[tuple, str | None] = {}


# read once, checked where it is used (forced_impl): a bad value is then one line from the scripts, not a traceback
# from `import vit3` at the top of each
FORCED_IMPL = os.environ.get(ENV_VAR) or None


def forced_impl(device_type: str) -> str | None:
    """The path VIT3_TTT_IMPL forces for calls on `device_type` tensors, None when it is unset.

    ConfigError, one line, for a value that names no path, or for "triton" where it cannot run (Triton not
    installed; tensors not on CUDA, outside Triton's interpreter). The scripts ask before making a run folder.
    """
    if FORCED_IMPL is None:
        return None
    if FORCED_IMPL not in FORCEABLE:
        raise ConfigError(f"{ENV_VAR}={FORCED_IMPL!r}: choose one of {', '.join(FORCEABLE)}, or unset it to let "
                          "impl='auto' choose")
    if FORCED_IMPL == "triton" and (reason := _triton_unavailable(device_type)):
        raise ConfigError(f"{ENV_VAR}='triton' cannot run here ({reason}): choose fast or reference, or unset it to "
                          "let impl='auto' choose")
    return FORCED_IMPL


def _triton_unavailable(device_type: str) -> str | None:
    if not HAS_TRITON:
        return "Triton is not installed"
    if device_type == "cuda":
        return None
    from .triton_ops import INTERPRETED

    return None if INTERPRETED else f"{device_type} tensors, which need Triton's interpreter (TRITON_INTERPRET=1)"


@torch.compiler.assume_constant_result
def auto_takes_triton(device: torch.device, dtype: torch.dtype, head_dim: int, rope: bool) -> bool:
    """Whether impl="auto" runs this case on the Triton path: a device in TRITON_DEVICES, Triton installed,
    a dtype and head width the kernels take, and the first-use check passed (run on the first call only).

    torch.compile's tracer calls this eagerly and keeps the answer as a constant, so the check runs (on
    real tensors) at most once, in the trace, and adds no graph break.
    """
    if device.type not in TRITON_DEVICES or not HAS_TRITON:
        return False
    from .triton_ops import covers

    if not covers(head_dim, dtype):
        return False
    case = (device, dtype, head_dim, rope)
    if case not in VERDICTS:
        # with gradients wherever the layer is called (no_grad, inference_mode, inside another graph: the
        # check's tensors are its own), and without autocast (the check sets its dtypes)
        with torch.inference_mode(False), torch.enable_grad(), autocast_off(device):
            VERDICTS[case] = _check(*case)
        if VERDICTS[case] is not None:
            warnings.warn(
                f"vit3: the Triton TTT path failed its first-use check on {device}, {dtype}, head width "
                f"{head_dim}, {'with' if rope else 'without'} RoPE: {VERDICTS[case]}. That case runs on the fast "
                f"path for the rest of the process ({ENV_VAR}=triton forces Triton and raises its errors; "
                f"{ENV_VAR}=fast skips the check).", RuntimeWarning, stacklevel=2)
    return VERDICTS[case] is None


def _check(device: torch.device, dtype: torch.dtype, head_dim: int, rope: bool) -> str | None:
    """None if the Triton path agrees with the fast path on a small random layer of this case, forward and
    backward; else what went wrong."""
    from .fast import ttt_fast
    from .triton_ops import ttt_triton

    heads, b, h, w = 2, 2, 8, 12  # 96 tokens: two tiles or more (a partial one), h != w
    dim = heads * head_dim
    # a generator of its own: the caller's random streams (and so its reproducibility) stay untouched
    gen = torch.Generator(device).manual_seed(0)

    def randn(*shape, std=1.0):
        return torch.randn(*shape, generator=gen, device=device) * std

    qkv = randn(b, h * w, 3 * dim + 3 * head_dim).to(dtype)
    # inner weights large enough that the step matters and silu is non-linear; float32 as under autocast
    params = [randn(1, heads, head_dim, head_dim, std=0.3), randn(1, heads, head_dim, head_dim, std=0.3),
              randn(head_dim, 1, 3, 3, std=0.3), randn(dim, dim + head_dim, std=dim ** -0.5), randn(dim, std=0.1)]
    dy = randn(b, h * w, dim).to(dtype)
    rope_m = RoPE2d(dim) if rope else None
    tables = rope_m.rotations(h, w, device, torch.float32) if rope else None
    theta = rope_m.frequencies(device) if rope else None
    step = dict(heads=heads, h=h, w=w, scale=9 ** -0.5, lr=1.0)
    expected = _output_and_grads(lambda *t: ttt_fast(*t, rope_tables=tables, **step), [qkv.float(), *params],
                                 dy.float())
    try:
        got = _output_and_grads(lambda *t: ttt_triton(*t, rope_theta=theta, **step), [qkv, *params], dy)
    except Exception as e:  # whatever the compiler, driver or kernels raise
        return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"
    names = ("output", "qkv gradient", "w1 gradient", "w2 gradient", "w3 gradient", "proj.weight gradient",
             "proj.bias gradient")
    for name, a, e in zip(names, got, expected):
        err = ((a.float() - e).norm() / e.norm()).item()
        if not err <= TOLERANCE[dtype]:  # NaN fails too
            return f"its {name} differs from the fast path's by {err:.3g} (relative RMS; tolerance {TOLERANCE[dtype]})"
    return None


def _output_and_grads(fn, inputs: list[torch.Tensor], dy: torch.Tensor) -> list[torch.Tensor]:
    inputs = [t.detach().requires_grad_() for t in inputs]
    y = fn(*inputs)
    return [y.detach(), *torch.autograd.grad(y, inputs, dy)]
