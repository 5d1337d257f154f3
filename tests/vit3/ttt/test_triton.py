"""The Triton TTT path against the float64 reference path, its dispatch (impl="auto"'s first-use check,
VIT3_TTT_IMPL), and its Hopper build.

Without a GPU the kernels run under Triton's interpreter (conftest sets TRITON_INTERPRET=1 before
anything imports them) with fp32 IEEE dots; with one they run compiled. Buffers from torch.empty are
filled with NaN during these runs, so a tile that a kernel fails to write shows up as NaN.
"""
import json
import math
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from vit3.layers import RoPE2d
from vit3.ttt import TTT, dispatch
from vit3.ttt.layer import HAS_TRITON

pytestmark = [pytest.mark.triton, pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")]
ROOT = Path(__file__).resolve().parents[3]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def nan_empty(monkeypatch):
    """torch.empty / empty_like fill floating tensors with NaN; returns the number of calls so far."""
    calls = []
    real_empty, real_like = torch.empty, torch.empty_like

    def empty(*args, **kwargs):
        calls.append(1)
        t = real_empty(*args, **kwargs)
        return t.fill_(math.nan) if t.is_floating_point() else t

    def empty_like(*args, **kwargs):
        calls.append(1)
        t = real_like(*args, **kwargs)
        return t.fill_(math.nan) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(torch, "empty_like", empty_like)
    return calls


def reference_and_inputs(heads: int, d: int, h: int, w: int, rope: bool, seed: int = 0):
    """A float64 layer (reference path), its qkv input, and the output and gradients of
    proj(inner(qkv)) for a random output gradient, all from autograd."""
    torch.manual_seed(seed)
    dim = heads * d
    layer = TTT(dim, heads, impl="reference").double()
    with torch.no_grad():  # inner weights large enough that the step matters and silu is non-linear
        for p in layer.inner_params():
            p.normal_(0, 0.3)
    qkv = torch.randn(2, h * w, 3 * dim + 3 * d, dtype=torch.float64, requires_grad=True)
    rope_m = RoPE2d(dim) if rope else None
    y = layer.proj(layer.inner(qkv, h, w, rope_m))
    gy = torch.randn_like(y)
    params = [qkv, layer.w1, layer.w2, layer.w3, layer.proj.weight, layer.proj.bias]
    grads = torch.autograd.grad(y, params, gy)
    return layer, rope_m, params, y, gy, grads


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error ||a - b|| / ||b|| in float64."""
    return ((a.double().cpu() - b.double().cpu()).norm() / b.double().cpu().norm()).item()


# (heads, head width, h, w, RoPE, tokens per tile, splits): head widths 32 and 72 (padded to 128, two
# row blocks), maps with h != w and N not a multiple of the tile, several tiles and token splits
CASES = [(2, 32, 5, 7, False, 16, 2), (2, 32, 3, 13, True, 16, 3), (2, 72, 5, 7, True, 16, 2),
         (2, 72, 3, 13, False, 16, 2), (2, 32, 4, 4, True, 0, 0)]


@pytest.mark.parametrize("heads,d,h,w,rope,block_n,splits", CASES)
def test_triton_matches_float64_reference(nan_empty, heads, d, h, w, rope, block_n, splits):
    from vit3.ttt.triton_ops import covers, ttt_triton

    if DEVICE == "cuda" and not covers(d, torch.float32):
        pytest.skip("float32 at this head width takes the fast path on a GPU (bf16: test_bf16_triton_close_to_fp32)")
    layer, rope_m, params, y_ref, gy, grads_ref = reference_and_inputs(heads, d, h, w, rope)
    p32 = [p.detach().float().to(DEVICE).requires_grad_() for p in params]
    y = ttt_triton(*p32, heads=heads, h=h, w=w, scale=layer.scale, lr=layer.inner_lr,
                   rope_theta=rope_m.frequencies(torch.device(DEVICE)) if rope else None,
                   block_n=block_n, splits=splits)
    grads = torch.autograd.grad(y, p32, gy.float().to(DEVICE))
    assert nan_empty  # the NaN-filling allocator was in use
    assert rel(y, y_ref) <= 1e-4
    for name, g, g_ref in zip(["qkv", "w1", "w2", "w3", "proj.weight", "proj.bias"], grads, grads_ref):
        assert torch.isfinite(g).all(), name
        assert rel(g, g_ref) <= 1e-4, name


def test_layer_dispatch(monkeypatch):
    monkeypatch.setattr(dispatch, "VERDICTS", {})
    monkeypatch.setattr(dispatch, "FORCED_IMPL", None)
    monkeypatch.setattr(dispatch, "_check", lambda *case: None)  # every case passes its first-use check
    layer = TTT(64, 2)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert layer.path(cuda, torch.bfloat16) == "triton"  # auto: Triton for CUDA tensors
    assert layer.path(cpu) == "fast"
    assert layer.path(cuda, torch.float64) == "fast"  # the kernels take fp32 and half precision only
    assert layer.path(cuda, torch.float32) == "triton"
    assert TTT(144, 2).path(cuda, torch.float32) == "fast"  # fp32 stops at head width 64
    assert TTT(144, 2).path(cuda, torch.bfloat16) == "triton"
    assert TTT(64, 2, impl="triton").path(cpu) == "triton"  # forced: the interpreter, or the error below
    assert TTT(64, 2, inner_loss="mse").path(cuda) == "reference"  # not the paper's design
    with pytest.raises(ValueError, match="impl='triton' covers the paper's design only"):
        TTT(64, 2, inner_loss="mse", impl="triton").path(cuda)


def test_triton_needs_the_interpreter_on_cpu(monkeypatch):
    from vit3.ttt import triton_ops

    monkeypatch.setattr(triton_ops, "INTERPRETED", False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        TTT(64, 2, impl="triton")(torch.randn(1, 4, 64), 2, 2)


def test_triton_refuses_float64():
    with pytest.raises(TypeError, match="got torch.float64 at head width .*: use bf16 autocast or impl='fast'"):
        TTT(64, 2, impl="triton").double().to(DEVICE)(torch.randn(1, 4, 64, dtype=torch.float64, device=DEVICE), 2, 2)


def test_triton_layer_equals_fast_layer_with_rope_and_checkpointing():
    """The layer wiring (RoPE frequencies, projection, autocast off) and gradient checkpointing."""
    torch.manual_seed(1)
    fast = TTT(64, 2, impl="fast").to(DEVICE)
    tri = TTT(64, 2, impl="triton").to(DEVICE)
    tri.load_state_dict(fast.state_dict())
    rope = RoPE2d(64)
    x = torch.randn(2, 12, 64, device=DEVICE, requires_grad=True)
    y_fast = fast(x, 3, 4, rope)
    (g_fast,) = torch.autograd.grad(y_fast.square().sum(), x)
    y_tri = torch.utils.checkpoint.checkpoint(tri, x, 3, 4, rope, use_reentrant=False)
    (g_tri,) = torch.autograd.grad(y_tri.square().sum(), x)
    assert rel(y_tri, y_fast) <= 1e-4 and rel(g_tri, g_fast) <= 1e-4
    with torch.no_grad():  # inference skips the autograd function
        assert rel(tri(x, 3, 4, rope), y_fast) <= 1e-4


# ---------------------------------------------------------------- impl="auto": the first-use check, VIT3_TTT_IMPL


@pytest.fixture
def auto_unchecked(monkeypatch):
    """impl="auto" with no verdicts yet and no forced path, taking Triton on DEVICE (on CPU tensors too, where
    the interpreter runs the kernels, as the compiled kernels run on a GPU)."""
    monkeypatch.setattr(dispatch, "TRITON_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(dispatch, "VERDICTS", {})
    monkeypatch.setattr(dispatch, "FORCED_IMPL", None)


def watch_triton(monkeypatch, replace=None) -> list:
    """Counts the calls of the Triton path (the layer's and the check's); replace(real, *args, **kwargs), if
    given, stands in for each call."""
    from vit3.ttt import triton_ops

    real, calls = triton_ops.ttt_triton, []

    def watched(*args, **kwargs):
        calls.append(1)
        return replace(real, *args, **kwargs) if replace else real(*args, **kwargs)

    monkeypatch.setattr(triton_ops, "ttt_triton", watched)
    return calls


def raises(real, *args, **kwargs):
    raise RuntimeError("injected: no kernel image is available for execution on the device")


def fast_and_auto(dim=64, heads=2):
    torch.manual_seed(0)
    fast = TTT(dim, heads, impl="fast").to(DEVICE)
    auto = TTT(dim, heads).to(DEVICE)
    auto.load_state_dict(fast.state_dict())
    return fast, auto, torch.randn(2, 12, dim, device=DEVICE)


def test_auto_checks_triton_once_per_case_then_takes_it(auto_unchecked, monkeypatch):
    calls = watch_triton(monkeypatch)
    fast, auto, x = fast_and_auto()
    rng = torch.get_rng_state()
    with warnings.catch_warnings(), torch.inference_mode():  # no warning; the check needs no grad mode
        warnings.simplefilter("error")
        y = auto(x, 3, 4)
        assert len(calls) == 2  # the check, then the layer's own call
        assert rel(auto(x, 3, 4), y) == 0 and len(calls) == 3  # no second check for this case
        auto(x, 3, 4, RoPE2d(64))  # another case: RoPE
        assert len(calls) == 5
    assert torch.equal(torch.get_rng_state(), rng)  # the check draws from a generator of its own
    assert dispatch.VERDICTS == {(x.device, torch.float32, 32, False): None, (x.device, torch.float32, 32, True): None}
    assert rel(y, fast(x, 3, 4)) <= 1e-4


def test_auto_falls_back_for_good_when_triton_raises(auto_unchecked, monkeypatch):
    calls = watch_triton(monkeypatch, raises)
    fast, auto, x = fast_and_auto()
    case = re.escape(f"on {x.device}, torch.float32, head width 32, without RoPE: RuntimeError: injected: no kernel")
    with pytest.warns(RuntimeWarning, match=f"failed its first-use check {case}.*runs on the fast path") as record:
        y = auto(x, 3, 4)
    assert len([w for w in record if "first-use check" in str(w.message)]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one warning per case, not per call
        assert torch.equal(auto(x, 3, 4), y)
    assert len(calls) == 1  # the check's call only: the verdict is kept
    assert auto.path(x.device) == "fast" and torch.equal(y, fast(x, 3, 4))


def test_auto_falls_back_when_triton_differs(auto_unchecked, monkeypatch):
    calls = watch_triton(monkeypatch, lambda real, *a, **k: real(*a, **k) * 1.05)  # 5% off: a wrong kernel
    fast, auto, x = fast_and_auto()
    with torch.no_grad(), pytest.warns(RuntimeWarning, match=r"its output differs from the fast path's by 0\.05 "
                                                               r"\(relative RMS; tolerance 0\.005\)"):
        y = auto(x, 3, 4)
    assert len(calls) == 1 and dispatch.VERDICTS[(x.device, torch.float32, 32, False)].startswith("its output")
    with torch.no_grad():
        assert torch.equal(y, fast(x, 3, 4))


@pytest.mark.slow  # 10-30 s of compilation on 2 CPU cores
def test_check_runs_in_a_torch_compile_trace_without_graph_breaks(auto_unchecked, monkeypatch):
    fast, auto, x = fast_and_auto()

    def choose(x, rope: bool):
        return x * 2 if auto.path(x.device, x.dtype, rope) == "triton" else x * 3

    # fullgraph: a graph break raises (the layer itself has some, in the fast path's out= ops)
    compiled = torch.compile(choose, fullgraph=True)
    passing = watch_triton(monkeypatch)
    assert torch.equal(compiled(x, False), x * 2) and len(passing) == 1  # checked in the trace: Triton
    failing = watch_triton(monkeypatch, raises)
    with pytest.warns(RuntimeWarning, match="with RoPE: RuntimeError: injected"):
        assert torch.equal(compiled(x, True), x * 3)  # another case, checked in its own trace: fast
    rope = RoPE2d(64)
    y = torch.compile(auto)(x, 3, 4, rope)
    assert len(failing) == 1 and rel(y, fast(x, 3, 4, rope)) <= 1e-5  # the verdict is kept


def test_forced_impl_is_unchecked_and_raises(auto_unchecked, monkeypatch):
    calls = watch_triton(monkeypatch, raises)
    _, auto, x = fast_and_auto()
    monkeypatch.setattr(dispatch, "FORCED_IMPL", "triton")
    with pytest.raises(RuntimeError, match="injected"):  # no check, no fallback
        auto(x, 3, 4)
    assert dispatch.VERDICTS == {} and len(calls) == 1
    assert TTT(64, 2, impl="fast").path(x.device) == "fast"  # an explicit impl keeps its path
    assert TTT(64, 2, inner_loss="mse").path(x.device) == "reference"  # the only path of other designs
    for forced in ("fast", "reference"):
        monkeypatch.setattr(dispatch, "FORCED_IMPL", forced)
        assert auto.path(x.device) == forced
        auto(x, 3, 4)
    assert len(calls) == 1 and dispatch.VERDICTS == {}


@pytest.mark.subprocess
def test_env_var_forces_the_path_for_the_process():
    """VIT3_TTT_IMPL is read when vit3 is imported and checked at the first call: forced Triton on CPU tensors
    without the interpreter, or a value that names no path, is a ConfigError naming the variable."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import torch; from vit3.ttt import TTT; layer = TTT(64, 2)\n"
            "try:\n    layer(torch.randn(1, 4, 64), 2, 2)\nexcept ValueError as e:\n    print('raised:', e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300,
                         env=dict(env, VIT3_TTT_IMPL="triton"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("raised: VIT3_TTT_IMPL='triton' cannot run here (cpu tensors")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300,
                         env=dict(env, VIT3_TTT_IMPL="fastest"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("raised: VIT3_TTT_IMPL='fastest': choose one of fast, triton, reference")


@pytest.mark.ptxas
def test_kernels_compile_for_hopper_without_spills():
    """Every kernel of every shipped configuration compiles for sm_90 (Triton's compiler and ptxas run
    on the CPU), with no register spills and within Hopper's 227 KB of shared memory per block."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "triton_resources.py"), "--json",
                          "--dtypes", "bf16"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    assert {(r["d"], r["rope"]) for r in rows} == {(32, False), (32, True), (64, False), (72, False)}
    assert len({r["kernel"] for r in rows}) == 12
    for r in rows:
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, r
        assert r["shared"] <= 232448, r


# ---------------------------------------------------------------- on a GPU only


def _bf16_error(heads, d, h, w, rope):
    """Relative RMS error of the bf16 Triton path (under autocast, as training runs it) against the
    float32 fast path, for the output and every gradient."""
    torch.manual_seed(0)
    dim = heads * d
    ref = TTT(dim, heads, impl="fast").cuda()
    tri = TTT(dim, heads, impl="triton").cuda()
    tri.load_state_dict(ref.state_dict())
    rope_m = RoPE2d(dim) if rope else None
    x = torch.randn(4, h * w, dim, device="cuda")
    gy = torch.randn(4, h * w, dim, device="cuda")
    y_ref = ref(x.requires_grad_(), h, w, rope_m)
    g_ref = torch.autograd.grad(y_ref, [x, *ref.parameters()], gy)
    x2 = x.detach().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = tri(x2, h, w, rope_m)
    g = torch.autograd.grad(y, [x2, *tri.parameters()], gy)
    rms = lambda a, b: ((a.float() - b).square().mean().sqrt() / b.square().mean().sqrt()).item()  # noqa: E731
    return [rms(y, y_ref)] + [rms(a, b) for a, b in zip(g, g_ref)]


@pytest.mark.gpu
@pytest.mark.parametrize("heads,d,h,w,rope", [(6, 32, 14, 14, False), (2, 32, 56, 40, True),
                                              (6, 64, 32, 32, False), (16, 72, 16, 16, False)])
def test_bf16_triton_close_to_fp32(heads, d, h, w, rope):
    errors = _bf16_error(heads, d, h, w, rope)
    assert max(errors) <= 0.01, errors


@pytest.mark.gpu
def test_triton_deterministic_and_one_compilation_for_every_resolution():
    from vit3.ttt import conv_kernels, kernels

    def compiled(k):  # variants of kernel k compiled so far in this process (other tests add their own)
        return sum(len(cache[0]) for cache in k.device_caches.values())

    watched = (kernels.head_fwd_reduce, kernels.head_bwd_k, conv_kernels.conv_bwd_q)
    layer = TTT(384, 6, impl="triton").cuda()
    runs, after_first = [], None
    for h, w in [(16, 16), (16, 16), (24, 20), (33, 7)]:
        torch.manual_seed(0)
        x = torch.randn(2, h * w, 384, device="cuda", requires_grad=True)
        y = layer(x, h, w)
        runs.append((y, torch.autograd.grad(y.square().sum(), x)[0]))
        after_first = after_first or [compiled(k) for k in watched]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert [compiled(k) for k in watched] == after_first  # no new variant for the other resolutions


@pytest.mark.gpu
def test_triton_under_torch_compile_without_graph_breaks():
    layer = TTT(384, 6, impl="triton").cuda()
    x = torch.randn(2, 256, 384, device="cuda", requires_grad=True)
    y_eager = layer(x, 16, 16)
    compiled = torch.compile(layer, fullgraph=True)  # fullgraph: a graph break raises
    y = compiled(x, 16, 16)
    y.sum().backward()
    assert rel(y, y_eager) <= 1e-3
