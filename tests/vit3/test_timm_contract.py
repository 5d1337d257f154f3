"""What timm users expect of every registered ViT³ / H-ViT³ model, written from timm's conventions.

Each model is checked against timm itself where timm has the answer: its optimizer factory (layer-wise lr
decay groups, set out as timm's own ViT groups them), its feature wrappers (getter and FX), its pretrained
loader (the official file layout, in_chans and num_classes adaptation; downloads from an HTTP server on
127.0.0.1 into a temporary torch hub cache) and its data config. Shapes are
small: where no forward is needed a model is built at full size on the meta device; where one is, at its
full width but shallow (SHALLOW), so that every model's contract costs seconds on a CPU.
"""
import math
import re
import socket

import pytest
import timm
import torch
import torch.nn as nn
from timm.data import resolve_data_config
from timm.models import create_feature_extractor
from timm.optim import create_optimizer_v2

import vit3.models
import vit3.vit
from tests.vit3.test_models import _save_official_file, official_state_dict
from vit3.models import MODEL_NAMES, HViT3
from vit3.weights import cached_file_name

REGISTERED = sorted(n for n in timm.list_models() if timm.models.model_entrypoint(n).__module__ == "vit3.models")
# one cheap forward per model: H-ViT³ sides that halve unevenly (stem 18 x 10, then 9 x 5, 5 x 3, 3 x 2)
SIZE = {name: (32, 48) if name.startswith("vit3") else (72, 40) for name in MODEL_NAMES}
# the registered widths and heads, fewer blocks
SHALLOW = {name: dict(depth=3) if name.startswith("vit3") else dict(depths=(1, 1, 2, 1)) for name in MODEL_NAMES}


def test_every_registered_model_is_covered():
    assert REGISTERED == sorted(MODEL_NAMES)


def build(name, **kwargs):
    """The registered model, shallow (SHALLOW), in eval mode."""
    torch.manual_seed(0)
    return timm.create_model(name, **SHALLOW[name], **kwargs).eval()


def meta(name, **kwargs):
    return timm.create_model(name, device="meta", **kwargs)


def stride(name):
    return 16 if name.startswith("vit3") else 32


# --- construction: device, dtype, in_chans, default cfg ------------------------------------------

@pytest.mark.parametrize("name", REGISTERED)
def test_device_dtype_and_in_chans(name):
    model = meta(name, dtype=torch.bfloat16)  # made there, not moved: a base model costs nothing here
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert meta(name).in_chans == meta(name).pretrained_cfg["input_size"][0] == 3  # timm's test_model_default_cfgs
    model = meta(name, in_chans=1)
    first = model.get_submodule(model.pretrained_cfg["first_conv"])
    assert isinstance(first, nn.Conv2d) and first.in_channels == 1
    assert model.in_chans == 1 and model.pretrained_cfg["input_size"] == (1, 224, 224)
    assert meta(name, in_chans=1, features_only=True).in_chans == 1


@pytest.mark.parametrize("name", REGISTERED)
def test_forward_on_the_meta_device(name):
    """timm's test_model_default_cfgs runs every model on the meta device, for its shapes only."""
    model = meta(name)
    logits = model(torch.randn(1, 3, 64, 96, device="meta"))
    assert logits.device.type == "meta" and logits.shape == (1, 1000)


@pytest.mark.parametrize("name", REGISTERED)
def test_default_cfg_is_complete(name):
    model = meta(name)
    cfg = model.pretrained_cfg
    assert cfg["tag"] == "official_in1k" and f"{name}.official_in1k" in timm.list_pretrained(name)
    assert cfg["url"] == vit3.models.OFFICIAL_WEIGHTS[name] and cfg["url"].startswith("https://cloud.tsinghua")
    assert cfg["input_size"] == (3, 224, 224) and cfg["pool_size"] == (224 // stride(name),) * 2
    assert cfg["crop_pct"] == 0.875 and cfg["interpolation"] == "bicubic" and cfg["num_classes"] == 1000
    assert isinstance(model.get_submodule(cfg["first_conv"]), nn.Conv2d)
    assert model.get_submodule(cfg["classifier"]) is model.get_classifier()
    data = resolve_data_config({}, model=model)
    assert data["mean"] == timm.data.IMAGENET_DEFAULT_MEAN and data["std"] == timm.data.IMAGENET_DEFAULT_STD
    # built for another size, the cfg follows it (the pool size is the real final map; H-ViT³ rounds up)
    model = build(name, img_size=SIZE[name], num_classes=0)
    h, w = SIZE[name]
    assert model.pretrained_cfg["input_size"] == (3, h, w)
    with torch.no_grad():
        feats = model.forward_features(torch.randn(1, 3, h, w))
    spatial = feats.shape[-2:] if feats.ndim == 4 else (h // 16, w // 16)
    expected = (math.ceil(h / stride(name)), math.ceil(w / stride(name)))
    assert model.pretrained_cfg["pool_size"] == tuple(spatial) == expected


# --- features ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", REGISTERED)
def test_features_only_and_forward_intermediates(name):
    h, w = SIZE[name]
    x = torch.randn(2, 3, h, w)
    model = build(name)
    out_indices = (0, 1, 2, 3) if name.startswith("hvit3") else (0, 2)
    features = build(name, features_only=True, out_indices=out_indices)
    features.model.load_state_dict(model.state_dict(), strict=False)  # pruned of its head
    info = features.feature_info
    assert info.reduction() == ([4, 8, 16, 32] if name.startswith("hvit3") else [16] * 2)
    with torch.no_grad():
        maps = features(x)
        final, intermediates = model.forward_intermediates(x, indices=list(out_indices))
        normed = model.forward_intermediates(x, indices=1, norm=True, intermediates_only=True)[0]
        # where feature_info says each map comes from: a hook there sees the same values, as tokens
        hooked = []
        handles = [model.get_submodule(m).register_forward_hook(lambda mod, i, o: hooked.append(o))
                   for m in info.module_name()]
        reference = model.forward_features(x)
        for handle in handles:
            handle.remove()
    assert len(maps) == len(intermediates) == len(hooked) == len(out_indices)
    for fmap, inter, channels, reduction, tokens in zip(maps, intermediates, info.channels(), info.reduction(), hooked):
        assert fmap.shape == (2, channels, math.ceil(h / reduction), math.ceil(w / reduction))
        torch.testing.assert_close(fmap, inter)
        torch.testing.assert_close(fmap.flatten(2).transpose(1, 2), tokens)
    # the last block's output through the final norm is forward_features' output
    torch.testing.assert_close(final, reference)
    torch.testing.assert_close(normed if name.startswith("hvit3") else normed.flatten(2).transpose(1, 2), reference)


def test_hvit3_stage_maps_at_detection_sizes():
    model = build("hvit3_tiny", features_only=True)  # the maps' sizes come from the stem and the mergings
    with torch.no_grad():
        for (h, w), sides in (((224, 224), [(56, 56), (28, 28), (14, 14), (7, 7)]),
                              ((512, 640), [(128, 160), (64, 80), (32, 40), (16, 20)])):
            maps = model(torch.randn(1, 3, h, w))
            assert [tuple(m.shape) for m in maps] == [(1, c, *s) for c, s in zip((64, 128, 320, 512), sides)]


@pytest.mark.parametrize("name", REGISTERED)
def test_fx_feature_extraction(name):
    """timm's FX extractors trace the model (the TTT layer and RoPE stay whole) and give the same values."""
    h, w = SIZE[name]
    x = torch.randn(2, 3, h, w)
    model = build(name, num_classes=5)
    graph = create_feature_extractor(model, return_nodes={"head": "logits"})
    fx = build(name, num_classes=5, features_only=True, feature_cls="fx")
    fx.load_state_dict(model.state_dict(), strict=False)
    with torch.no_grad():
        torch.testing.assert_close(graph(x)["logits"], model(x))
        tokens = fx(x)
        maps = model.forward_intermediates(x, indices=4 if name.startswith("hvit3") else 3, intermediates_only=True)
    assert len(tokens) == len(maps)
    for t, m in zip(tokens, maps):
        torch.testing.assert_close(t, m.flatten(2).transpose(1, 2))


# --- head ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", REGISTERED)
def test_reset_classifier_and_no_pooling(name):
    model = meta(name, dtype=torch.bfloat16).eval()
    model.reset_classifier(7, global_pool="")
    assert model.head.weight.device.type == "meta" and model.head.weight.dtype == torch.bfloat16
    assert not model.head.training  # the new head takes the model's mode
    assert model.global_pool == ""
    with pytest.raises(ValueError, match="global_pool"):
        model.reset_classifier(7, global_pool="max")

    h, w = SIZE[name]
    x = torch.randn(2, 3, h, w)
    model = build(name, num_classes=7)
    dense = build(name, num_classes=7, global_pool="")
    dense.load_state_dict(model.state_dict())
    with torch.no_grad():
        logits, per_position, feats = model(x), dense(x), model.forward_features(x)
    if name.startswith("hvit3"):
        assert per_position.shape == (2, 7, *feats.shape[-2:])
        mean = per_position.mean(dim=(2, 3))
    else:
        assert per_position.shape == (2, (h // 16) * (w // 16), 7)
        mean = per_position.mean(dim=1)
    torch.testing.assert_close(mean, logits)  # a linear head: the logits of the average, the average of the logits
    model.reset_classifier(0, global_pool="")
    with torch.no_grad():
        torch.testing.assert_close(model(x), feats)


# --- optimizer groups ---------------------------------------------------------------------------

def expected_layer_ids(model) -> dict[str, int]:
    """timm's ViT layer-decay layout, written out: the stem 0, then one id per block in order (a final norm,
    and H-ViT³'s patch merging, join the block before), the head last."""
    names = [n for n, _ in model.named_parameters()]
    blocks = []  # block prefixes in forward order
    for n in names:
        parts = n.split(".")
        if parts[0] in ("blocks", "layers") and "downsample" not in parts:
            prefix = ".".join(parts[:2] if parts[0] == "blocks" else parts[:4])  # blocks.j, layers.i.blocks.j
            if prefix not in blocks:
                blocks.append(prefix)
    ids = {}
    for n in names:
        if n.startswith(("patch_embed", "cls_token", "pos_embed", "reg_token", "norm_pre")):
            ids[n] = 0
        elif n.startswith("head"):
            ids[n] = len(blocks) + 1
        elif n.startswith("norm") or n.startswith("fc_norm"):
            ids[n] = len(blocks)
        elif ".downsample." in n:  # layers.i.downsample: after stage i's last block
            stage = n.split(".")[1]
            ids[n] = max(j for j, b in enumerate(blocks, 1) if b.startswith(f"layers.{stage}."))
        else:
            ids[n] = next(j for j, b in enumerate(blocks, 1) if n.startswith(b + "."))
    return ids


def lr_scales(model, layer_decay=0.65) -> dict[str, tuple[float, float]]:
    opt = create_optimizer_v2(model, "adamw", lr=1.0, weight_decay=0.05, layer_decay=layer_decay)
    by_param = {id(p): (g["lr_scale"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]}
    return {n: by_param[id(p)] for n, p in model.named_parameters()}


def check_layer_decay(model, layer_decay=0.65):
    ids = expected_layer_ids(model)
    top = max(ids.values())
    scales = lr_scales(model, layer_decay)
    for n, p in model.named_parameters():
        assert scales[n][0] == pytest.approx(layer_decay ** (top - ids[n])), n
        no_decay = p.ndim <= 1 or n in model.no_weight_decay()  # timm's rule
        assert scales[n][1] == (0.0 if no_decay else 0.05), n
    return top


def test_layer_decay_layout_is_timms_own_vit():
    """The rule the next test applies to our models, checked first on timm's own DeiT-style ViT."""
    with torch.device("meta"):
        vit = timm.create_model("vit_tiny_patch16_224")
    assert check_layer_decay(vit) == 13  # stem, 12 blocks, head


@pytest.mark.parametrize("name", REGISTERED)
def test_layer_decay_groups_by_block(name):
    model = meta(name)
    assert model.no_weight_decay() == set()
    depth = sum(len(s.blocks) for s in model.layers) if isinstance(model, HViT3) else len(model.blocks)
    assert check_layer_decay(model) == depth + 1
    if isinstance(model, HViT3):  # coarse: one group per stage
        groups = timm.models.group_parameters(model, model.group_matcher(coarse=True))
        assert [sorted({n.split(".")[1] for n in g if n.startswith("layers")}) for g in groups.values()][1:5] == \
            [["0"], ["1"], ["2"], ["3"]]


# --- pretrained weights -------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["vit3_tiny", "hvit3_tiny"])
def test_pretrained_official_file_through_timm(name, tmp_path):
    """An official release file (yacs config pickled in, RoPE tables stored, H-ViT³ with EMA weights)
    loads through timm's pretrained path; timm adapts the head and the input channels as for its own."""
    model_sd = official_state_dict(name)
    ema_sd = {k: -v for k, v in model_sd.items()} if name.startswith("hvit3") else None
    path = tmp_path / "official.pth"
    _save_official_file(path, model_sd, ema_sd)
    expected = ema_sd or model_sd  # timm's loader takes the EMA weights when a file has them
    overlay = dict(file=str(path))
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay)
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())

    adapted = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, num_classes=10, in_chans=1)
    first = adapted.pretrained_cfg["first_conv"] + ".weight"
    torch.testing.assert_close(adapted.state_dict()[first], expected[first].sum(dim=1, keepdim=True))
    assert adapted.head.out_features == 10


def small_official_file(name, path) -> dict:
    """A shallow `name` (SHALLOW) saved as the official trainers save (H-ViT³: RoPE tables stored, EMA
    weights beside the model's); returns the weights timm's loader should take from it."""
    model = build(name)
    model_sd = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    ema_sd = None
    if name.startswith("hvit3"):
        model_sd.update({f"{m}.rope.rotations": torch.randn(2, 2, 2, 2) for m, block in model.named_modules()
                         if isinstance(block, vit3.vit.Block)})
        ema_sd = {k: -v if v.is_floating_point() else v for k, v in model_sd.items()}
    _save_official_file(path, model_sd, ema_sd)
    return ema_sd or model_sd


@pytest.mark.parametrize("name", ["vit3_tiny", "hvit3_tiny"])
def test_pretrained_downloads_a_release_link_once(name, tmp_path, torch_home, release_server):
    """pretrained=True with a release link (/f/<id>/?dl=1, as the official ones) downloads the file into the
    torch hub cache under a name made from the tag, then loads it as a file= overlay does; later calls
    read the cache."""
    expected = small_official_file(name, tmp_path / "release.pth")
    release_server.files["a1b2c3"] = (tmp_path / "release.pth").read_bytes()
    overlay = dict(url=release_server.url("a1b2c3"))
    model = timm.create_model(f"{name}.official_in1k", pretrained=True, pretrained_cfg_overlay=overlay,
                              **SHALLOW[name])
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())  # the EMA weights, if any
    cached = torch_home / f"{name}.official_in1k-a1b2c3.pth"
    assert [p.name for p in torch_home.iterdir()] == [cached.name]
    assert cached.read_bytes() == release_server.files["a1b2c3"]

    adapted = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, num_classes=10, in_chans=1,
                                **SHALLOW[name])
    assert len(release_server.requests) == 1  # the second call read the cache
    first = adapted.pretrained_cfg["first_conv"] + ".weight"
    torch.testing.assert_close(adapted.state_dict()[first], expected[first].sum(dim=1, keepdim=True))
    assert adapted.in_chans == 1 and adapted.head.out_features == 10


def test_pretrained_default_url_reads_the_cache(tmp_path, torch_home):
    """The registered url (the official release link) maps to its own name in the cache: a file put there
    by hand loads with no network."""
    expected = small_official_file("vit3_tiny", tmp_path / "release.pth")
    torch_home.mkdir(parents=True)
    url = vit3.models.OFFICIAL_WEIGHTS["vit3_tiny"]
    (tmp_path / "release.pth").rename(torch_home / cached_file_name(url, "vit3_tiny.official_in1k"))
    model = timm.create_model("vit3_tiny", pretrained=True, **SHALLOW["vit3_tiny"])
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())


def test_cached_file_name():
    release = "https://cloud.tsinghua.edu.cn/f/4ab59ca54b474dff9b70/?dl=1"
    assert cached_file_name(release, "vit3_small.official_in1k") == "vit3_small.official_in1k-4ab59ca54b474dff9b70.pth"
    other = [cached_file_name(f"https://host/weights/{f}", "vit3_small") for f in ("a.safetensors", "b.safetensors")]
    assert other[0] != other[1] and all(re.fullmatch(r"vit3_small-[0-9a-f]{12}\.safetensors", n) for n in other)


def test_partial_download_is_never_taken_for_the_file(tmp_path, torch_home, release_server):
    expected = small_official_file("vit3_tiny", tmp_path / "release.pth")
    body = release_server.files["cut"] = (tmp_path / "release.pth").read_bytes()
    release_server.truncated.add("cut")
    overlay = dict(url=release_server.url("cut"))
    with pytest.raises(RuntimeError, match=f"ended after {len(body) // 2} of {len(body)} bytes"):
        timm.create_model("vit3_tiny", pretrained=True, pretrained_cfg_overlay=overlay, **SHALLOW["vit3_tiny"])
    assert list(torch_home.iterdir()) == []  # neither the final name nor the partial one
    release_server.truncated.clear()  # the next attempt downloads it whole
    model = timm.create_model("vit3_tiny", pretrained=True, pretrained_cfg_overlay=overlay, **SHALLOW["vit3_tiny"])
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())


def test_download_errors_name_the_url_and_the_offline_way(torch_home, release_server):
    missing = release_server.url("missing")
    with pytest.raises(RuntimeError, match="HTTP 404") as http_error:
        timm.create_model("vit3_tiny", pretrained=True, pretrained_cfg_overlay=dict(url=missing))
    with socket.socket() as sock:  # a port nothing listens on: what an offline machine's refused connection gives
        sock.bind(("127.0.0.1", 0))
        refused = f"http://127.0.0.1:{sock.getsockname()[1]}/f/abc/?dl=1"
    with pytest.raises(RuntimeError, match="Connection refused") as offline:
        timm.create_model("vit3_tiny", pretrained=True, pretrained_cfg_overlay=dict(url=refused))
    for error, url in ((http_error, missing), (offline, refused)):
        assert url in str(error.value) and "pretrained_cfg_overlay=dict(file=PATH)" in str(error.value)
        assert str(torch_home / cached_file_name(url, "vit3_tiny.official_in1k")) in str(error.value)
