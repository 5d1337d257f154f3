"""DiT³ and its baselines: tiny forward/backward, official layout, sizes and outputs, CFG, save/load."""
import argparse
import json
import math
from pathlib import Path

import pytest
import torch

from dit3 import load_official_checkpoint
from dit3.models import DiT3, DiT3_models, sincos_pos_embed_2d
from vit3.engine import ConfigError

DATA = Path(__file__).resolve().parents[1] / "data"
TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=2, num_classes=10)
FAMILIES = {"DiT3": dict(mixer="ttt", cpe=True), "DiT3-LA": dict(mixer="linear_attention", cpe=True),
            "DiT": dict(mixer="attention", cpe=False)}


def fill_deterministic(model: torch.nn.Module, std: float = 0.1) -> torch.nn.Module:
    """Every state-dict entry but pos_embed, in sorted key order i, to std * randn(seed i): the recipe
    tests/data/official_out_dit_tiny.pt was made with on the official models."""
    state = model.state_dict()
    with torch.no_grad():
        for i, key in enumerate(sorted(state)):
            if key != "pos_embed":
                state[key].copy_(torch.randn(state[key].shape, generator=torch.Generator().manual_seed(i)) * std)
    return model


def inputs(n=2, h=8, w=8, num_classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, h, w, generator=g), torch.randint(0, 1000, (n,), generator=g), \
        torch.randint(0, num_classes, (n,), generator=g)


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_backward_finite(family):
    model = fill_deterministic(DiT3(**TINY, **FAMILIES[family])).train()
    x, t, y = inputs()
    out = model(x, t, y).sample
    assert out.shape == (2, 8, 8, 8) and torch.isfinite(out).all()
    out.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    for name, p in model.blocks[0].attn.named_parameters():
        assert p.grad.abs().sum() > 0, name
    # a scalar timestep is broadcast over the batch
    model.eval()
    torch.testing.assert_close(model(x, t[0], y).sample, model(x, t[:1].expand(2), y).sample)


def test_bf16_autocast_forward_is_finite():
    model = fill_deterministic(DiT3(**TINY)).eval()
    x, t, y = inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, y).sample
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), model(x, t, y).sample, atol=0.1, rtol=0.1)


def test_init_is_adaln_zero_except_the_cpe():
    model = DiT3(**TINY).eval()
    x, t, y = inputs()
    assert (model(x, t, y).sample == 0).all()  # zero output layer
    tokens, c = torch.randn(2, 16, 64), torch.randn(2, 64)
    # the CPE residual is outside adaLN-Zero: a DiT³ block is not the identity at init, a DiT block is
    assert not torch.allclose(model.blocks[0](tokens, c, 4, 4), tokens)
    baseline = DiT3(**TINY, mixer="attention", cpe=False)
    torch.testing.assert_close(baseline.blocks[0](tokens, c, 4, 4), tokens)


# official counts (official code, input 32x32x4, 1000 classes; pos_embed included): 34.79M, 134.15M, 689.41M
@pytest.mark.parametrize("name,official", [("DiT3-S/2", 34_788_128), ("DiT3-B/2", 134_152_736),
                                           ("DiT3-XL/2", 689_410_976), ("DiT-S/2", 32_963_360),
                                           ("DiT-XL/2", 675_129_632)])
def test_param_counts_equal_official(name, official):
    with torch.device("meta"):  # counting needs no memory
        model = DiT3_models[name](input_size=32, num_classes=1000)
    # pos_embed is a buffer here, a frozen parameter in the official count
    assert sum(p.numel() for p in model.parameters()) + model.pos_embed.numel() == official


@pytest.mark.parametrize("name,fixture", [("DiT3-S/2", "official_keys_dit3_s2.json"),
                                          ("DiT-S/2", "official_keys_dit_s2.json")])
def test_state_dict_layout_equals_official(name, fixture):
    expected = json.loads((DATA / fixture).read_text())
    with torch.device("meta"):
        model = DiT3_models[name](input_size=expected["input_size"], num_classes=expected["num_classes"])
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert list(ours.items()) == list(expected["state_dict"].items())


@pytest.mark.parametrize("family,impl", [("DiT3", "fast"), ("DiT3", "reference"), ("DiT", "sdpa"), ("DiT", "math")])
def test_outputs_equal_official(family, impl):
    ref = torch.load(DATA / "official_out_dit_tiny.pt", weights_only=True)
    model = DiT3(**ref["config"], **FAMILIES[family], mixer_kwargs={"impl": impl}).eval()
    fill_deterministic(model)
    with torch.no_grad():
        out = model(ref["x"], ref["t"], ref["y"]).sample
    torch.testing.assert_close(out, ref["out_dit3" if family == "DiT3" else "out_dit"], rtol=1e-5, atol=1e-5)


def test_sincos_table():
    h, w, dim = 3, 5, 16
    table = sincos_pos_embed_2d(dim, h, w)
    omega = [10000 ** (-k / 4) for k in range(4)]
    for i in range(h):
        for j in range(w):  # columns in the first half, rows in the second, as DiT / MAE
            expected = ([math.sin(j * o) for o in omega] + [math.cos(j * o) for o in omega]
                        + [math.sin(i * o) for o in omega] + [math.cos(i * o) for o in omega])
            torch.testing.assert_close(table[i * w + j], torch.tensor(expected))


def test_non_square_latents():
    model = fill_deterministic(DiT3(**{**TINY, "input_size": (8, 12)})).eval()
    assert model.pos_embed.shape == (1, 4 * 6, 64)
    x, t, y = inputs(h=8, w=12)
    out = model(x, t, y).sample
    assert out.shape == (2, 8, 8, 12) and torch.isfinite(out).all()
    # a model built for 8x8 runs on 12x8 with a table computed for it; the stored one is what 8x12 uses
    square = DiT3(**TINY)
    square.load_state_dict(model.state_dict() | {"pos_embed": square.pos_embed})
    torch.testing.assert_close(square.eval()(x, t, y).sample, out)
    assert square(torch.randn(1, 4, 12, 8), t[:1], y[:1]).sample.shape == (1, 8, 12, 8)
    with pytest.raises(ValueError):
        square(torch.randn(1, 4, 9, 8), t[:1], y[:1]).sample


def test_forward_with_cfg():
    model = fill_deterministic(DiT3(**TINY)).eval()
    x, t, y = inputs(n=3)
    null = torch.full((3,), TINY["num_classes"])
    xx, tt, yy = torch.cat([x, torch.randn_like(x)]), torch.cat([t, t]), torch.cat([y, null])
    cond, uncond = model(x, t, y).sample, model(x, t, null).sample

    out = model.forward_with_cfg(xx, tt, yy, cfg_scale=1.0)
    assert out.shape == (6, 8, 8, 8)
    torch.testing.assert_close(out[:3], cond)

    out = model.forward_with_cfg(xx, tt, yy, cfg_scale=4.0)
    guided = uncond[:, :4] + 4.0 * (cond[:, :4] - uncond[:, :4])
    torch.testing.assert_close(out[:3, :4], guided)
    torch.testing.assert_close(out[3:, :4], guided)
    torch.testing.assert_close(out[:3, 4:], cond[:, 4:])  # the variance comes from each half's own pass
    torch.testing.assert_close(out[3:, 4:], uncond[:, 4:])

    out = model.forward_with_cfg(xx, tt, yy, cfg_scale=4.0, channels=3)  # DiT's reproduction mode
    torch.testing.assert_close(out[:3, :3], guided[:, :3])
    torch.testing.assert_close(out[:3, 3:], cond[:, 3:])


def test_label_dropout_only_in_training():
    model = DiT3(**TINY, class_dropout_prob=0.5)
    labels = torch.arange(10).repeat(20)
    dropped = model.y_embedder.embedding_table.weight[TINY["num_classes"]]
    kept = lambda emb: (emb != dropped).any(dim=1)  # noqa: E731
    assert 0.3 < 1 - kept(model.y_embedder(labels, train=True)).float().mean() < 0.7
    assert kept(model.y_embedder(labels, train=False)).all()
    assert DiT3(**TINY, class_dropout_prob=0.0).y_embedder.embedding_table.num_embeddings == 10


def test_save_pretrained_round_trip(tmp_path):
    config = {**TINY, "input_size": (8, 12), "mixer_kwargs": {"impl": "reference"}}
    model = fill_deterministic(DiT3(**config)).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").exists() and (tmp_path / "config.json").exists()
    loaded = DiT3.from_pretrained(tmp_path).eval()
    assert loaded.grid_size == (4, 6) and loaded.blocks[0].attn.impl == "reference"
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0)
    x, t, y = inputs(h=8, w=12)
    torch.testing.assert_close(loaded(x, t, y).sample, model(x, t, y).sample, rtol=0, atol=0)


def test_load_official_checkpoint(tmp_path):
    ema, live = fill_deterministic(DiT3(**TINY)), fill_deterministic(DiT3(**TINY), std=0.2)
    opt = torch.optim.AdamW(live.parameters(), lr=1e-4)
    live(*inputs()).sample.mean().backward()
    opt.step()
    # the dict the official train.py saves, argparse.Namespace included
    path = tmp_path / "0050000.pt"
    torch.save({"model": live.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                "args": argparse.Namespace(model="DiTTT-B/2", image_size=256)}, path)

    def same(a, b):
        return all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())

    with pytest.raises(TypeError, match="ema"):  # which weights is the caller's choice, as in vit3's loader
        load_official_checkpoint(DiT3(**TINY), path)
    assert same(load_official_checkpoint(DiT3(**TINY), path, ema=True), ema)
    assert same(load_official_checkpoint(DiT3(**TINY), path, ema=False), live)
    with pytest.raises(KeyError):
        load_official_checkpoint(DiT3(**TINY), {"model": live.state_dict()}, ema=True)

    # a bare state dict into a model for another latent size (so another pos_embed)
    torch.save(ema.state_dict(), path)
    other_size = load_official_checkpoint(DiT3(**{**TINY, "input_size": 16}), path, ema=True)
    assert torch.equal(other_size.pos_embed, sincos_pos_embed_2d(64, 8, 8)[None])
    assert torch.equal(other_size.blocks[1].attn.w3, ema.blocks[1].attn.w3)
    with pytest.raises(RuntimeError):  # strict
        load_official_checkpoint(DiT3(**TINY), {k: v for k, v in ema.state_dict().items() if "cpe" not in k},
                                 ema=True)

    # weights_only: anything but tensors, containers and the Namespace is refused, with an error naming the file
    torch.save({"ema": ema.state_dict(), "args": Path("x")}, path)
    with pytest.raises(ConfigError, match=r"cannot read .*0050000.pt \(UnpicklingError.*not a checkpoint"):
        load_official_checkpoint(DiT3(**TINY), path, ema=True)


def test_registry():
    sizes = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
    assert set(DiT3_models) == {f"{f}-{s}/{p}" for f in FAMILIES for s in sizes for p in (2, 4, 8)}
    for name, entry in DiT3_models.items():
        family, rest = name.rsplit("-", 1)
        size, patch = rest.split("/")
        depth, hidden, heads = sizes[size]
        assert entry.keywords == dict(patch_size=int(patch), depth=depth, hidden_size=hidden, num_heads=heads,
                                      **FAMILIES[family])
    with torch.device("meta"):
        model = DiT3_models["DiT3-LA-B/4"](input_size=32, num_classes=1000)
    assert type(model.blocks[0].attn).__name__ == "LinearAttention" and model.blocks[0].cpe is not None
    with pytest.raises(ValueError):
        DiT3(**TINY, mixer="mamba")


def test_gradient_checkpointing_gives_the_same_gradients():
    """diffusers' enable_gradient_checkpointing() recomputes each block; outputs and every gradient unchanged."""
    x, t, y = inputs()
    grads = []
    for checkpointing in (False, True):
        model = fill_deterministic(DiT3(**TINY, class_dropout_prob=0.0)).train()
        if checkpointing:
            model.enable_gradient_checkpointing()
        calls, block_forward = [], model.blocks[0].forward
        model.blocks[0].forward = lambda *a: calls.append(1) or block_forward(*a)
        out = model(x, t, y).sample
        out.square().mean().backward()
        assert len(calls) == (2 if checkpointing else 1)  # checkpointing reruns the block in the backward pass
        grads.append((out.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}))
    (out0, g0), (out1, g1) = grads
    torch.testing.assert_close(out1, out0, rtol=1e-6, atol=1e-6)
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-5, atol=1e-7, msg=k)


def test_cpe_and_norm_are_recomputed_with_the_same_gradients(monkeypatch):
    """A DiT³ block of a large input keeps x + cpe(x) and its norm for the backward by recomputing them (one
    saved copy of the block input instead of two); gradients equal those of the plain, stored computation, which
    a small input takes."""
    import dit3.models as models
    x, t, y = inputs()
    grads, recomputed, default = [], [], models.CPE_RECOMPUTE_MIN_ELEMENTS
    for recompute in (True, False):
        model = fill_deterministic(DiT3(**TINY, class_dropout_prob=0.0)).train()
        # the tiny model's blocks are below the default threshold; a threshold of 0 makes them large
        monkeypatch.setattr(models, "CPE_RECOMPUTE_MIN_ELEMENTS", 0 if recompute else default)
        calls, cpe_norm = [], model.blocks[0]._cpe_norm
        model.blocks[0]._cpe_norm = lambda *a: calls.append(1) or cpe_norm(*a)
        model(x, t, y).sample.square().mean().backward()
        recomputed.append(len(calls) == 2)
        grads.append({k: p.grad.clone() for k, p in model.named_parameters()})
    assert recomputed == [True, False]
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], rtol=1e-6, atol=1e-8, msg=k)
