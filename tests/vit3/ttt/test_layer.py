"""The TTT layer (vit3/ttt/): fast path against the reference path, the reference against independent
formulas (torch.func per-sample gradients, linear attention), the design space, precision. The Triton
path: test_triton.py."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from vit3 import TTT, RoPE2d
from vit3.mixers import build_mixer
from vit3.ttt import INNER_LOSSES, INNER_MODELS, ttt_reference
from vit3.ttt import fast as fast_mod

# the fast path's SwiGLU branch in each of its forms, whatever the shape (fast.use_dual picks by shape)
FORMS = {"primal": 0.0, "dual": math.inf}


@pytest.fixture(params=list(FORMS))
def form(request, monkeypatch):
    monkeypatch.setitem(fast_mod.DUAL_FORM, "max_tokens_per_width", FORMS[request.param])
    return request.param


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def run_layer(layer, x, h, w, rope=None, seed=1):
    """Output, input gradient and parameter gradients for a fixed random output cotangent."""
    layer.zero_grad()
    x = x.detach().clone().requires_grad_()
    y = layer(x, h, w, rope)
    cot = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(y)
    (y * cot).sum().backward()
    return {"out": y.detach(), "x": x.grad, **{n: p.grad.clone() for n, p in layer.named_parameters()}}


def float64_layer(dim, heads):
    """A float64 TTT layer with larger inner weights than the init, so the inner gradient's nonlinearity matters."""
    torch.manual_seed(0)
    layer = TTT(dim, heads).double()
    with torch.no_grad():
        for p in layer.inner_params():
            p.normal_(0, 0.5)
    return layer


@pytest.mark.parametrize("use_rope", [False, True])
def test_fast_matches_reference_float64(use_rope, form):
    b, heads, h, w, dim = 3, 3, 5, 7, 24
    layer = float64_layer(dim, heads)
    rope = RoPE2d(dim) if use_rope else None
    x = torch.randn(b, h * w, dim, dtype=torch.float64)
    layer.impl = "reference"
    ref = run_layer(layer, x, h, w, rope)
    layer.impl = "fast"
    fast = run_layer(layer, x, h, w, rope)
    assert set(ref) == {"out", "x", "qkv.weight", "qkv.bias", "w1", "w2", "w3", "proj.weight", "proj.bias"}
    for name in ref:
        assert rel(fast[name], ref[name]) < 1e-6, name


@pytest.mark.parametrize("budget", [64, 1200])  # ragged 4-token blocks of one head; head groups of 2 and 1
def test_fast_matches_reference_in_blocks(monkeypatch, budget):
    """The fast path works a block of heads and tokens at a time (sums over tokens accumulate across
    blocks); small block budgets split a CPU-sized problem the way large N splits a real one."""
    b, heads, h, w, dim = 2, 3, 5, 7, 24
    layer = float64_layer(dim, heads)
    rope = RoPE2d(dim)
    x = torch.randn(b, h * w, dim, dtype=torch.float64)
    layer.impl = "reference"
    ref = run_layer(layer, x, h, w, rope)
    layer.impl = "fast"
    monkeypatch.setitem(fast_mod.BLOCK_ELEMENTS, "cpu", budget)
    blocks = fast_mod._chunks(b, heads, h * w, dim // heads, x.device)
    assert len(blocks) == (27 if budget == 64 else 2)
    fast = run_layer(layer, x, h, w, rope)
    for name in ref:
        assert rel(fast[name], ref[name]) < 1e-6, name


def test_fast_gradient_in_place_or_not(form):
    """inplace_grad writes qkv's gradient over qkv; without it qkv is left alone. A second backward
    through a graph whose qkv was overwritten must fail, not compute with gradients as inputs."""
    from vit3.ttt import ttt_fast
    torch.manual_seed(0)
    heads, d, h, w = 2, 4, 3, 5
    qkv0 = torch.randn(2, h * w, 3 * heads * d + 3 * d, dtype=torch.float64)
    w1, w2 = (torch.randn(1, heads, d, d, dtype=torch.float64, requires_grad=True) for _ in range(2))
    w3 = torch.randn(d, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    pw = torch.randn(heads * d, heads * d + d, dtype=torch.float64, requires_grad=True)
    grads = []
    for inplace in (False, True):
        x = qkv0.clone().requires_grad_()
        qkv = x * 1.0  # a non-leaf, as the layer's projection output is
        out = ttt_fast(qkv, w1, w2, w3, pw, heads=heads, h=h, w=w, scale=1 / 3, lr=1.0, inplace_grad=inplace)
        out.sum().backward(retain_graph=True)
        grads.append(x.grad.clone())
        assert torch.equal(qkv.detach(), qkv0) != inplace
        if inplace:
            with pytest.raises(RuntimeError, match="modified by an inplace operation"):
                out.sum().backward()
    assert torch.equal(grads[0], grads[1])


def test_dual_form_for_few_tokens():
    """The dual form takes over where N x N Gram matrices are smaller than d x 2d weights per sample:
    the digits demo's 16 tokens of width 48, not DiT³-B/2's 256 tokens of width 64."""
    assert fast_mod.use_dual(16, 48) and fast_mod.use_dual(48, 48)
    assert not fast_mod.use_dual(49, 48) and not fast_mod.use_dual(256, 64)


def test_default_design_against_torch_func():
    """The paper's layer written independently: per-(sample, head) inner loss, torch.func.grad."""
    torch.manual_seed(0)
    b, heads, h, w, dim = 2, 2, 3, 4, 8
    d, n = dim // heads, h * w
    layer = TTT(dim, heads).double()
    with torch.no_grad():
        for p in layer.inner_params():
            p.normal_(0, 0.5)
    x = torch.randn(b, n, dim, dtype=torch.float64)
    scale = 9 ** -0.5

    def swiglu_loss(w12, k, v):  # k, v: [N, d]; w12: [2, d, d]
        pred = (k @ w12[0]) * F.silu(k @ w12[1])
        return -scale * (pred * v).sum(-1).mean()

    def conv_loss(kern, k, v):  # k, v: [h, w] maps; kern: [3, 3]
        pred = F.conv2d(k[None, None], kern[None, None], padding=1)[0, 0]
        return -scale * (pred * v).mean()

    def normed(g, dims):
        return g / (g.norm(dim=dims, keepdim=True) + 1)

    qkv = layer.qkv(x)
    q1, k1, v1, q2, k2, v2 = qkv.split([dim] * 3 + [d] * 3, dim=-1)
    out = torch.zeros(b, n, dim + d, dtype=torch.float64)
    for s in range(b):
        for hd in range(heads):
            sl = slice(hd * d, (hd + 1) * d)
            w12 = torch.stack([layer.w1[0, hd], layer.w2[0, hd]])
            g = torch.func.grad(swiglu_loss)(w12, k1[s, :, sl], v1[s, :, sl])
            w12 = w12 - normed(g, -2)
            out[s, :, sl] = (q1[s, :, sl] @ w12[0]) * F.silu(q1[s, :, sl] @ w12[1])
        for c in range(d):
            kern = layer.w3[c, 0]
            maps = [t[s, :, c].reshape(h, w) for t in (q2, k2, v2)]
            g = torch.func.grad(conv_loss)(kern, maps[1], maps[2])
            kern = kern - normed(g, (-2, -1))
            out[s, :, dim + c] = F.conv2d(maps[0][None, None], kern[None, None], padding=1).flatten()
    expected = layer.proj(out)
    for impl in ("fast", "reference"):
        layer.impl = impl
        assert rel(layer(x, h, w).detach(), expected.detach()) < 1e-10, impl


def test_official_parameter_layout():
    layer = TTT(384, 6)
    shapes = {n: tuple(p.shape) for n, p in layer.named_parameters()}
    assert shapes == {"qkv.weight": (384 * 3 + 64 * 3, 384), "qkv.bias": (384 * 3 + 64 * 3,),
                      "w1": (1, 6, 64, 64), "w2": (1, 6, 64, 64), "w3": (64, 1, 3, 3),
                      "proj.weight": (384, 384 + 64), "proj.bias": (384,)}
    for name in ("w1", "w2", "w3"):  # trunc-normal std 0.02
        assert 0.015 < getattr(layer, name).std().item() < 0.025


DESIGNS = list(itertools.product(INNER_MODELS, INNER_LOSSES, [1, 2], [None, 5], [True, False]))


@pytest.mark.parametrize("model,loss,steps,batch,grad_norm", DESIGNS)
def test_design_space_runs(model, loss, steps, batch, grad_norm):
    torch.manual_seed(0)
    layer = TTT(16, 2, inner_model=model, inner_loss=loss, inner_steps=steps, inner_batch=batch,
                grad_norm=grad_norm, inner_mlp_ratio=2)
    fast_ok = (model, loss, steps, batch, grad_norm) == ("swiglu+dwconv", "dot", 1, None, True)
    # dispatch picks a closed-form path (fast on CPU) exactly when it applies
    assert layer.path(torch.device("cpu")) == ("fast" if fast_ok else "reference")
    grads = run_layer(layer, torch.randn(2, 12, 16), 3, 4, RoPE2d(16) if "swiglu" in model else None)
    for name, g in grads.items():
        assert torch.isfinite(g).all(), name
    assert grads["x"].abs().sum() > 0


def linear_inner(layer, x, h, w):
    """Inner-model output on the queries for a single-branch layer (before proj)."""
    heads, c = layer.num_heads, x.shape[-1]
    q, k, v = layer.qkv(x).split([c] * 3, dim=-1)
    q, k, v = (t.unflatten(-1, (heads, c // heads)) for t in (q, k, v))
    out = ttt_reference(q, k, v, None, None, None, layer.head_params(), None, h=h, w=w,
                        head_kind=layer.head_kind, loss=layer.inner_loss, scale=layer.scale, lr=layer.inner_lr,
                        steps=layer.inner_steps, batch=layer.inner_batch, grad_norm=layer.grad_norm)
    return out, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def test_linear_inner_model_is_linear_attention():
    torch.manual_seed(0)
    h, w, lr = 3, 5, 0.7
    layer = TTT(12, 3, inner_model="linear", inner_loss="dot", grad_norm=False, inner_lr=lr).double()
    x = torch.randn(2, h * w, 12, dtype=torch.float64)
    out, q, k, v = linear_inner(layer, x, h, w)
    expected = q @ layer.w1 + (lr * layer.scale / (h * w)) * (q @ k.transpose(-2, -1)) @ v  # [B, H, N, d]
    assert rel(out, expected.transpose(1, 2).reshape(2, h * w, 12)) < 1e-12


def test_minibatches_and_steps_update_sequentially():
    """Linear model, dot loss, no normalisation: every chunk adds lr * scale / n_c * K_c^T V_c."""
    torch.manual_seed(0)
    h, w, lr, batch = 3, 5, 0.5, 4  # chunks of 4, 4, 4, 3 tokens
    layer = TTT(8, 2, inner_model="linear", inner_loss="dot", grad_norm=False, inner_lr=lr,
                inner_batch=batch, inner_steps=2).double()
    x = torch.randn(2, h * w, 8, dtype=torch.float64)
    out, q, k, v = linear_inner(layer, x, h, w)
    delta = sum(k[:, :, s:s + batch].transpose(-2, -1) @ v[:, :, s:s + batch] / k[:, :, s:s + batch].shape[2]
                for s in range(0, h * w, batch))
    expected = q @ (layer.w1 + 2 * lr * layer.scale * delta)
    assert rel(out, expected.transpose(1, 2).reshape(2, h * w, 8)) < 1e-12


@pytest.mark.parametrize("model", INNER_MODELS)
def test_l1_loss_gives_values_no_gradient(model):
    """d2L/(dv dv_hat) = 0 for L1: the value rows of qkv get exactly zero gradient (paper, insight 1)."""
    torch.manual_seed(0)
    layer = TTT(16, 2, inner_model=model, inner_loss="l1")
    with torch.no_grad():
        for p in layer.inner_params():
            p.normal_(0, 0.5)
    grads = run_layer(layer, torch.randn(2, 12, 16), 3, 4)
    hd, cd = (16 if layer.head_kind else 0), layer.conv_dim
    value_rows = list(range(2 * hd, 3 * hd)) + list(range(3 * hd + 2 * cd, 3 * hd + 3 * cd))
    other_rows = [r for r in range(3 * (hd + cd)) if r not in value_rows]
    assert torch.equal(grads["qkv.weight"][value_rows], torch.zeros_like(grads["qkv.weight"][value_rows]))
    assert torch.equal(grads["qkv.bias"][value_rows], torch.zeros_like(grads["qkv.bias"][value_rows]))
    assert grads["qkv.weight"][other_rows].abs().sum() > 0
    # with the dot loss the same rows do receive gradient
    layer.inner_loss = "dot"
    assert run_layer(layer, torch.randn(2, 12, 16), 3, 4)["qkv.weight"][value_rows].abs().sum() > 0


@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_bf16_autocast_close_to_float32(impl, form):
    torch.manual_seed(0)
    layer = TTT(64, 4, impl=impl)
    x = torch.randn(2, 8 * 8, 64)
    ref = run_layer(layer, x, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = run_layer(layer, x, 8, 8)
    assert low["out"].dtype == torch.bfloat16
    for name in ("out", "x", "qkv.weight", "w1", "w2", "w3"):
        assert torch.isfinite(low[name]).all(), name
        rms = ((low[name].float() - ref[name]).square().mean().sqrt() / ref[name].square().mean().sqrt()).item()
        assert rms < 0.02, (name, rms)


def test_inner_math_runs_in_float32_under_autocast(monkeypatch, form):
    import vit3.ttt.dual as dual_mod
    import vit3.ttt.layer as layer_mod
    seen = {}

    def spy(module, name):
        real = getattr(module, name)

        def wrapper(*args, **kwargs):
            seen.setdefault(name, []).extend(t.dtype for t in args if isinstance(t, torch.Tensor))
            return real(*args, **kwargs)
        monkeypatch.setattr(module, name, wrapper)

    inner = "_swiglu_inner_grads" if form == "primal" else "_gram_products"
    spy(fast_mod if form == "primal" else dual_mod, inner)  # inner gradient of the fast path
    spy(fast_mod, "_conv_weight_grad")  # conv-branch gradient of the fast path
    spy(layer_mod, "ttt_reference")
    layer = TTT(16, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(torch.randn(1, 9, 16), 3, 3)
        layer.impl = "reference"
        layer(torch.randn(1, 9, 16), 3, 3)
    assert set(seen) == {inner, "_conv_weight_grad", "ttt_reference"}
    assert all(dt == torch.float32 for dts in seen.values() for dt in dts), seen


def test_no_grad_inference_matches_training_output(form):
    torch.manual_seed(0)
    layer = TTT(16, 2)
    x = torch.randn(2, 20, 16)
    train_out = layer(x, 4, 5)
    with torch.no_grad():
        fast = layer(x, 4, 5)
        layer.impl = "reference"
        ref = layer(x, 4, 5)
    with torch.inference_mode():
        layer.impl = "fast"
        inf = layer(x, 4, 5)
    assert torch.allclose(fast, train_out, atol=1e-6) and torch.allclose(ref, fast, atol=1e-5)
    assert torch.allclose(inf, fast)


def test_any_token_count_and_non_square():
    layer = TTT(16, 2)
    for h, w in [(1, 1), (1, 9), (7, 3), (13, 11)]:
        assert layer(torch.randn(1, h * w, 16), h, w).shape == (1, h * w, 16)


def test_bad_input_errors():
    layer = TTT(16, 2)
    with pytest.raises(ValueError, match="tokens for an h x w"):
        layer(torch.randn(1, 10, 16), 3, 3)
    with pytest.raises(ValueError, match="not divisible"):
        TTT(10, 3)
    with pytest.raises(ValueError, match="unknown inner_model"):
        TTT(16, 2, inner_model="transformer")
    with pytest.raises(ValueError, match="impl='fast' covers"):  # at construction, not at the first forward
        TTT(16, 2, inner_loss="mse", impl="fast")
    with pytest.raises(ValueError, match="unknown impl 'fats'"):
        TTT(16, 2, impl="fats")
    layer = TTT(16, 2, inner_loss="mse")
    assert not layer.closed_form() and layer.path(torch.device("cpu")) == "reference"
    with pytest.raises(ValueError, match="impl='triton' covers"):  # and when set later
        layer.impl = "triton"
    assert layer.impl == "auto"
    with pytest.raises(ValueError, match="unknown mixer"):
        build_mixer("mamba", 16, 2)


@pytest.mark.gpu
def test_fast_matches_reference_cuda():
    torch.manual_seed(0)
    layer = TTT(96, 3).cuda().double()
    x = torch.randn(2, 14 * 9, 96, device="cuda", dtype=torch.float64)
    layer.impl = "reference"
    ref = run_layer(layer, x, 14, 9)
    layer.impl = "fast"
    fast = run_layer(layer, x, 14, 9)
    for name in ref:
        assert rel(fast[name].cpu(), ref[name].cpu()) < 1e-6, name
    layer.float()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        low = run_layer(layer, x.float(), 14, 9)
    assert all(torch.isfinite(g).all() for g in low.values())
