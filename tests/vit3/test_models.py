"""The ViT³ / H-ViT³ classifiers: official layout and outputs, timm integration, any input size.

tests/data/official_vit3.json was written once from the official code (LeapLabTHU/ViTTT,
vittt/models, run outside this repository, nothing of it kept): the state-dict key ->
shape table of all six models (their `rope.rotations` buffers included), and the logits
of vit3_tiny / hvit3_tiny (10 classes) for the deterministic weights and input below.
"""
import json
import math
import sys
import types
import zlib
from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn

from vit3 import complexity, load_official_checkpoint
from vit3.mixers import Attention
from vit3.models import MODEL_NAMES, HViT3, ViT3, create_model
from vit3.ttt import TTT

OFFICIAL = json.loads((Path(__file__).resolve().parents[1] / "data" / "official_vit3.json").read_text())

# parameters of the official models at 1000 classes (the RoPE tables are buffers, not counted)
OFFICIAL_PARAMS = {
    "vit3_tiny": 6_149_416, "vit3_small": 23_799_400, "vit3_base": 90_055_912,
    "hvit3_tiny": 28_703_560, "hvit3_small": 54_362_056, "hvit3_base": 94_369_304,
}
# FlopCounterMode on the official models at 224, halved (the paper's "FLOPs")
OFFICIAL_GMACS = {"vit3_tiny": 1.2188, "vit3_small": 4.8075, "vit3_base": 17.9372,
                  "hvit3_tiny": 4.9033, "hvit3_small": 8.7320, "hvit3_base": 16.6821}


def _hash_uniform(n: int, seed: int) -> torch.Tensor:
    """n values in [-0.5, 0.5), pseudo-random but platform-independent (a float64 sine hash)."""
    t = torch.sin(torch.arange(n, dtype=torch.float64) * 12.9898 + seed) * 43758.5453
    return t - t.floor() - 0.5


def deterministic_tensor(key: str, shape) -> torch.Tensor:
    """A fixed value for a state-dict entry, in float64."""
    if key.endswith("num_batches_tracked"):
        return torch.tensor(0)
    u = _hash_uniform(math.prod(shape), zlib.crc32(key.encode()) % 1000).reshape(shape)
    if key.endswith("running_var"):
        return 0.75 + u
    if key.endswith("weight") and len(shape) == 1:  # LayerNorm / BatchNorm scale
        return 1.0 + 0.2 * u
    if len(shape) > 1:  # weights: variance 1 / fan-in, so the input still matters at the head
        return u * (12 / math.prod(shape[1:])) ** 0.5
    return 0.1 * u


def deterministic_input(shape) -> torch.Tensor:
    return 2 * _hash_uniform(math.prod(shape), 7).reshape(shape)


def official_state_dict(name: str) -> dict:
    """Random official-format weights (RoPE tables included) for `name` at 1000 classes."""
    gen = torch.Generator().manual_seed(0)
    return {k: torch.tensor(0) if k.endswith("num_batches_tracked") else torch.randn(s, generator=gen)
            for k, s in OFFICIAL["shapes"][name].items()}


def meta_model(name: str, **kwargs) -> nn.Module:
    with torch.device("meta"):  # shapes without allocating or initialising
        return create_model(name, **kwargs)


def small_input(name: str, batch: int = 2) -> torch.Tensor:
    # h != w; ViT³: 2 x 3 patches, H-ViT³: stages at 16x24 ... 2x3
    return torch.randn(batch, 3, *((32, 48) if name.startswith("vit3") else (64, 96)))


# --- registry ---------------------------------------------------------------------------

def test_registered_with_timm():
    assert set(MODEL_NAMES) <= set(timm.list_models("*vit3_*"))
    model = meta_model("vit3_small", num_classes=10, img_size=64)  # through timm.create_model
    assert isinstance(model, ViT3) and model.head.out_features == 10
    assert model.pretrained_cfg["input_size"] == (3, 64, 64)
    with torch.device("meta"):
        model = timm.create_model("hvit3_tiny", num_classes=5, pretrained_cfg_overlay=dict(crop_pct=1.0))
    assert isinstance(model, HViT3) and model.pretrained_cfg["crop_pct"] == 1.0


def test_unknown_name():
    with pytest.raises(ValueError, match="unknown model"):
        create_model("vit_tiny_patch16_224")


# --- official layout, weights and outputs -----------------------------------------------

@pytest.mark.parametrize("name", MODEL_NAMES)
def test_param_count_matches_official(name):
    assert sum(p.numel() for p in meta_model(name).parameters()) == OFFICIAL_PARAMS[name]


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_state_dict_layout_matches_official(name):
    model = meta_model(name)
    official = {k: s for k, s in OFFICIAL["shapes"][name].items() if not k.endswith("rope.rotations")}
    if name.startswith("hvit3"):  # one RoPE table per block in the official files
        assert len(OFFICIAL["shapes"][name]) - len(official) == sum(isinstance(m, TTT) for m in model.modules())
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == official


def _save_official_file(path, model_sd, ema_sd):
    """What the official trainers write, the yacs config pickled too (yacs is not installed here)."""
    yacs, config = types.ModuleType("yacs"), types.ModuleType("yacs.config")

    class CfgNode(dict):  # pickles as yacs' CfgNode does: dict items plus a few attributes
        def __init__(self, init=None):
            super().__init__(init or {})
            self.__dict__.update(__immutable__=False, __deprecated_keys__=set(), __new_allowed__=False)

    CfgNode.__module__, CfgNode.__qualname__ = "yacs.config", "CfgNode"
    yacs.config, config.CfgNode = config, CfgNode
    cfg = CfgNode({"MODEL": CfgNode({"TYPE": "h_vittt_tiny", "DROP_PATH_RATE": 0.2}),
                   "DATA": CfgNode({"IMG_SIZE": 224})})
    with pytest.MonkeyPatch.context() as mp:  # pickle finds the class by its module path
        mp.setitem(sys.modules, "yacs", yacs)
        mp.setitem(sys.modules, "yacs.config", config)
        torch.save({"model": model_sd, "optimizer": {"state": {}, "param_groups": []},
                    "lr_scheduler": {"t_initial": 300}, "max_accuracy": 84.0, "epoch": 299, "config": cfg,
                    "state_dict_ema": ema_sd}, path)


@pytest.mark.parametrize("name", ["vit3_tiny", "hvit3_tiny"])
def test_load_official_checkpoint(name, tmp_path):
    model_sd = official_state_dict(name)
    ema_sd = {k: -v for k, v in model_sd.items()}
    path = tmp_path / "official.pth"
    _save_official_file(path, model_sd, ema_sd)
    model = create_model(name)
    for ema, expected in ((False, model_sd), (True, ema_sd)):
        load_official_checkpoint(model, path, ema=ema)
        assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())
    with pytest.raises(TypeError, match="ema"):  # which weights is the caller's choice, as in dit3's loader
        load_official_checkpoint(model, path)
    load_official_checkpoint(model, model_sd, ema=False)  # a bare state dict
    assert torch.equal(model.head.bias, model_sd["head.bias"])
    del model_sd["head.bias"]
    with pytest.raises(RuntimeError, match="head.bias"):  # strict
        load_official_checkpoint(model, {"model": model_sd}, ema=False)
    with pytest.raises(KeyError, match="state_dict_ema"):
        load_official_checkpoint(model, {"model": model_sd}, ema=True)


@pytest.mark.parametrize("name", ["vit3_tiny", "hvit3_tiny"])
def test_outputs_match_official(name):
    """Same weights, same input, same logits as the official model (H-ViT³ at h != w: RoPE layout)."""
    ref = OFFICIAL["outputs"][name]
    model = create_model(name, num_classes=ref["num_classes"]).double().eval()
    sd = {k: deterministic_tensor(k, v.shape) for k, v in model.state_dict().items()}
    model.load_state_dict(sd)
    with torch.no_grad():
        logits = model(deterministic_input(ref["input_shape"]))
    torch.testing.assert_close(logits, torch.tensor(ref["logits"], dtype=torch.float64), rtol=1e-6, atol=1e-6)


# --- training and inference -------------------------------------------------------------

@pytest.mark.parametrize("name", MODEL_NAMES)
def test_forward_backward(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7, drop_path_rate=0.1)
    out = model(small_input(name))
    assert out.shape == (2, 7) and out.isfinite().all()
    out.square().mean().backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and p.grad.isfinite().all(), n


@pytest.mark.parametrize("name, size, feature_shape", [
    ("vit3_tiny", (32, 80), (2, 10, 192)),  # 2 x 5 patches
    ("vit3_tiny", (80, 32), (2, 10, 192)),
    ("hvit3_tiny", (64, 96), (2, 512, 2, 3)),
    ("hvit3_tiny", (72, 40), (2, 512, 3, 2)),  # stem 18 x 10, then 9 x 5, 5 x 3, 3 x 2
])
def test_any_input_size(name, size, feature_shape):
    model = create_model(name, img_size=224).eval()
    with torch.no_grad():
        feats = model.forward_features(torch.randn(2, 3, *size))
        assert feats.shape == feature_shape and feats.isfinite().all()
        assert model.forward_head(feats).shape == (2, 1000)


@pytest.mark.parametrize("name", ["vit3_tiny", "hvit3_tiny"])
def test_features_and_reset_classifier(name):
    model = create_model(name, num_classes=0).eval()
    x = small_input(name)
    with torch.no_grad():
        feats = model(x)
        assert feats.shape == (2, model.num_features)
        torch.testing.assert_close(feats, model.forward_head(model.forward_features(x), pre_logits=True))
        model.reset_classifier(3)
        assert model(x).shape == (2, 3) and model.get_classifier().out_features == 3


@pytest.mark.parametrize("name", ["vit3_tiny", "hvit3_tiny"])
def test_grad_checkpointing_same_result(name):
    torch.manual_seed(0)
    model, x = create_model(name), small_input(name)
    results = []
    for enable in (False, True):
        model.set_grad_checkpointing(enable)
        model.zero_grad()
        out = model(x)
        out.sum().backward()
        results.append([out.detach()] + [p.grad.clone() for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_drop_path_schedule():
    model = create_model("hvit3_tiny", drop_path_rate=0.2)
    rates = [getattr(b.drop_path, "drop_prob", 0.0) for s in model.layers for b in s.blocks]
    assert len(rates) == 17 and rates[0] == 0.0 and rates[-1] == pytest.approx(0.2)
    assert all(a < b for a, b in zip(rates, rates[1:]))


def test_official_init():
    torch.manual_seed(0)
    model = create_model("vit3_small")
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    weights = torch.cat([m.weight.flatten() for m in linears])
    assert weights.std().item() == pytest.approx(0.02, rel=0.02)
    assert all(not m.bias.any() for m in linears)
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    assert all(m.eps == 1e-6 and (m.weight == 1).all() and not m.bias.any() for m in norms)
    assert all(m.eps == 1e-5 for m in meta_model("hvit3_tiny").modules() if isinstance(m, nn.LayerNorm))


# --- mixers ------------------------------------------------------------------------------

def test_attention_baseline():
    torch.manual_seed(0)
    model = create_model("vit3_tiny", mixer="attention", num_classes=5)
    assert all(isinstance(b.attn, Attention) for b in model.blocks)
    assert model.blocks[0].attn.qkv.weight.shape == (576, 192)
    x = small_input("vit3_tiny")
    out = model(x)
    out.sum().backward()
    assert out.isfinite().all()
    math_model = create_model("vit3_tiny", mixer="attention", num_classes=5, mixer_kwargs=dict(impl="math"))
    math_model.load_state_dict(model.state_dict())
    torch.testing.assert_close(math_model(x), out, rtol=1e-4, atol=1e-5)
    # H-ViT³'s RoPE reaches the attention mixer too
    assert create_model("hvit3_tiny", mixer="attention", num_classes=5)(small_input("hvit3_tiny")).isfinite().all()


def test_mixer_kwargs_reach_ttt():
    torch.manual_seed(0)
    model = create_model("hvit3_tiny", num_classes=5, mixer_kwargs=dict(impl="reference")).eval()
    layers = [m for m in model.modules() if isinstance(m, TTT)]
    assert len(layers) == 17 and all(m.impl == "reference" for m in layers)
    x = small_input("hvit3_tiny")
    with torch.no_grad():
        ref = model(x)
        for m in layers:
            m.impl = "fast"
        torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-5)


# --- complexity --------------------------------------------------------------------------

@pytest.mark.parametrize("name", [n if "tiny" in n else pytest.param(n, marks=pytest.mark.slow) for n in MODEL_NAMES])
def test_complexity_matches_paper(name):
    result = complexity(create_model(name))  # img_size 224
    assert result.params == OFFICIAL_PARAMS[name]
    assert result.macs / 1e9 == pytest.approx(OFFICIAL_GMACS[name], rel=0.01)


def test_complexity_any_resolution_and_attention():
    model = create_model("vit3_tiny", img_size=64)
    head = 192 * 1000
    base = complexity(model).macs  # 4 x 4 patches
    # everything but the head is per token, the TTT layer included: 4 x 8 patches cost twice as much
    assert complexity(model, (64, 128)).macs - head == 2 * (base - head)
    n, c, depth = 16, 192, 12
    attn = complexity(create_model("vit3_tiny", img_size=64, mixer="attention")).macs
    linears = depth * n * 12 * c * c + n * 768 * c + head + depth * 9 * c * n  # blocks, patch embed, head, CPE
    assert attn == linears + depth * 2 * n * n * c  # q k^T and attn v


# --- compile -----------------------------------------------------------------------------

@pytest.mark.slow  # 10-30 s of compilation on 2 CPU cores
def test_torch_compile():
    torch.manual_seed(0)
    model = create_model("vit3_tiny", depth=2, num_classes=5)
    x = small_input("vit3_tiny")
    out = torch.compile(model)(x)
    out.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    ref = model(x)
    ref.sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-5)
