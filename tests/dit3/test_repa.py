"""dit3.repa: the loss and the spatial normalisation against independent formulas, the projectors' shapes for every
model size, the hidden states caught at each depth (every mixer, with and without gradient checkpointing), the
encoder's input and features, and the encoder frozen through updates."""
import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from dit3 import repa
from dit3.models import SIZES, DiT3, DiT3_models
from vit3.errors import ConfigError


def test_alignment_loss_is_the_mean_negative_cosine_of_each_token():
    g = torch.Generator().manual_seed(0)
    p, z = torch.randn(3, 5, 7, generator=g), torch.randn(3, 5, 7, generator=g)
    pn, zn = p.double().numpy(), z.double().numpy()
    cos = (pn * zn).sum(-1) / (np.linalg.norm(pn, axis=-1) * np.linalg.norm(zn, axis=-1))  # [3, 5]
    assert repa.alignment_loss(p, z).item() == pytest.approx(-cos.mean(), rel=1e-6)
    assert repa.alignment_loss(p, 2.5 * p).item() == pytest.approx(-1.0, abs=1e-6)  # scale-free
    assert repa.alignment_loss(p.bfloat16(), z.bfloat16()).dtype == torch.float32


def test_spatial_norm_is_ireps_formula_over_the_tokens():
    z = torch.randn(2, 9, 4, generator=torch.Generator().manual_seed(1)) + 3.0
    zn = z.double().numpy()
    centred = zn - 0.7 * zn.mean(axis=1, keepdims=True)
    expected = centred / (centred.std(axis=1, ddof=1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(repa.spatial_norm(z, 0.7).numpy(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", repa.PROJECTORS)
def test_projector_shapes_for_every_model_size(kind):
    for size, dims in SIZES.items():
        proj = repa.build_projector(kind, dims["hidden_size"], 24, projector_dim=8)
        out = proj(torch.randn(2, 6, dims["hidden_size"]), (2, 3))
        assert out.shape == (2, 6, 24), size
    mlp = repa.build_projector("mlp", 1152, 768, 2048)  # REPA's SiT-XL/2 with DINOv2-B: 1152 -> 2048 -> 2048 -> 768
    assert [tuple(m.weight.shape) for m in mlp.mlp if isinstance(m, torch.nn.Linear)] == [
        (2048, 1152), (2048, 2048), (768, 2048)]


def test_the_conv_projector_sees_the_grid_row_major():
    """A token's conv output depends on its grid neighbours: the tokens are laid out as the model's (row-major)."""
    proj = repa.build_projector("conv", 4, 4, 0)
    h = torch.zeros(1, 6, 4)
    h[0, 1] = 1.0  # row 0, column 1 of a 2 x 3 grid
    out = proj(h, (2, 3)) - proj(torch.zeros(1, 6, 4), (2, 3))
    touched = out.abs().sum(-1)[0] > 0
    assert touched.tolist() == [True, True, True, True, True, True]  # 3x3 around (0, 1) covers the whole 2x3 grid
    out = proj(h, (3, 2)) - proj(torch.zeros(1, 6, 4), (3, 2))  # on a 3 x 2 grid token 1 is (0, 1): rows 0 .. 1
    assert (out.abs().sum(-1)[0] > 0).tolist() == [True, True, True, True, False, False]


def _tiny(family: str, depth: int = 3) -> DiT3:
    torch.manual_seed(0)
    model = DiT3_models[f"{family}-S/2"](input_size=8, in_channels=3, num_classes=3, hidden_size=32, depth=depth,
                                         num_heads=2)
    with torch.no_grad():  # open the adaLN-Zero gates, so every block changes its tokens
        for p in model.parameters():
            if p.dim() > 1 and p.abs().sum() == 0:
                p.normal_(0, 0.05)
    return model


def _block_output(model: DiT3, x, t, y, depth: int) -> torch.Tensor:
    """Block `depth`'s output tokens [B, N, C] computed step by step, as DiT3.forward does."""
    h, (gh, gw) = model.x_embedder(x)
    h = h + model.pos_embed_for(gh, gw)
    c = model.t_embedder(t) + model.y_embedder(y, False)
    for block in model.blocks[:depth]:
        h = block(h, c, gh, gw)
    return h


@pytest.mark.parametrize("family", ["DiT3", "DiT", "DiT3-LA"])
def test_the_aligned_model_catches_the_output_of_block_depth(family):
    model = _tiny(family).eval()
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([3, 700]), torch.tensor([0, 2])
    plain = model(x, t, y).sample
    for depth in (1, 2, 3):
        proj = repa.build_projector("mlp", 32, 5, 8)
        aligned = repa.AlignedModel(model, proj, depth)
        out = aligned(x, t, y).sample
        assert torch.equal(out, plain)  # the network's output is untouched
        torch.testing.assert_close(aligned.take_projected(), proj(_block_output(model, x, t, y, depth), (4, 4)))
        assert aligned.take_projected() is None  # taken once
    assert not any(b._forward_hooks for b in model.blocks)  # no hook stays on the network
    assert set(aligned.state_dict()) == {f"model.{k}" for k in model.state_dict()} | {
        f"projector.{k}" for k in proj.state_dict()}
    with pytest.raises(ValueError, match="depth 4 is not a block of this 3-block model"):
        repa.AlignedModel(model, proj, 4)


def test_gradient_checkpointing_gives_the_same_alignment_gradients():
    """The hook catches the block's output inside checkpoint(): the gradients equal those without checkpointing,
    and the recomputation in the backward catches nothing."""
    grads = []
    for ckpt in (False, True):
        model = _tiny("DiT3").train()
        model.y_embedder.dropout_prob = 0.0
        if ckpt:
            model.enable_gradient_checkpointing()
        torch.manual_seed(1)
        aligned = repa.AlignedModel(model, repa.build_projector("mlp", 32, 5, 8), 2)
        x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
        out = aligned(x, torch.tensor([3, 700]), torch.tensor([0, 2])).sample
        loss = out.square().mean() + repa.alignment_loss(aligned.take_projected(), torch.ones(2, 16, 5))
        loss.backward()
        assert aligned._projected is None
        grads.append({n: p.grad.clone() for n, p in aligned.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], msg=n)


# ---------------------------------------------------------------------------------------------
# the encoder
# ---------------------------------------------------------------------------------------------
def test_a_timm_encoder_from_a_local_file_sees_the_image_at_patch_x_grid(vit_file):
    """The weights come from the file (pretrained_cfg_overlay); the input is the [-1, 1] image resized to 16 x 4
    pixels and normalised with the encoder's mean / std; the class token is dropped."""
    enc = repa.load_encoder("test_vit.r160_in1k", str(vit_file), grid=4, device="cpu")
    assert (enc.size, enc.dim, enc.prefix) == (64, 64, 1)
    ref = timm.create_model("test_vit")
    ref.load_state_dict(load_file(str(vit_file)))
    ref.set_input_size(img_size=(64, 64))
    images = torch.rand(2, 3, 8, 8) * 2 - 1
    x = F.interpolate((images + 1) / 2, size=(64, 64), mode="bicubic", align_corners=False)
    x = (x - 0.5) / 0.5  # test_vit's pretrained mean and std
    torch.testing.assert_close(enc(images), ref.eval().forward_features(x)[:, 1:])


def test_the_encoder_stays_frozen_through_updates(vit_file):
    enc = repa.load_encoder("test_vit.r160_in1k", str(vit_file), grid=4, device="cpu")
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    model = _tiny("DiT3").train()
    aligned = repa.AlignedModel(model, repa.build_projector("conv", 32, enc.dim, 0), 1)
    alignment = repa.Alignment(aligned, enc, 0.5, 0.7)
    opt = torch.optim.AdamW(aligned.parameters(), lr=1e-2)
    assert not {id(p) for p in enc.parameters()} & {id(p) for p in aligned.parameters()}
    aligned.train()
    enc.train()  # the trainer's model.train() cannot switch it to training mode
    assert not enc.training and not enc.model.training
    proj_before = aligned.projector.conv.weight.clone()
    for _ in range(2):
        images = torch.rand(2, 3, 8, 8) * 2 - 1
        out = aligned(images, torch.tensor([3, 700]), torch.tensor([0, 2])).sample
        loss = out.square().mean() + alignment.loss(images)
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(p.grad is None and not p.requires_grad for p in enc.parameters())
    assert all(torch.equal(before[k], v) for k, v in enc.state_dict().items())
    assert not torch.equal(proj_before, aligned.projector.conv.weight)  # the projector did train


def test_encoders_that_cannot_be_used_are_one_line(vit_file, tmp_path):
    with pytest.raises(ConfigError, match=r"repa.encoder=/nowhere/run does not exist: pass a train_vit.py run"):
        repa.check_encoder("/nowhere/run", "")
    with pytest.raises(ConfigError, match=r"repa.encoder='no_such_vit' is neither an existing path nor a timm model"):
        repa.check_encoder("no_such_vit", "")
    with pytest.raises(ConfigError, match=r"repa.encoder_file=/nowhere/w.safetensors does not exist"):
        repa.check_encoder("test_vit.r160_in1k", "/nowhere/w.safetensors")
    other = tmp_path / "other.safetensors"  # weights of another model
    save_file({"w": torch.zeros(2)}, str(other))
    with pytest.raises(ConfigError, match=r"cannot load the weights of repa.encoder=test_vit.r160_in1k from "
                                          r"repa.encoder_file=.*other.safetensors"):
        repa.load_encoder("test_vit.r160_in1k", str(other), grid=4, device="cpu")
    with pytest.raises(ConfigError, match=r"cannot load the weights of repa.encoder=test_vit.r160_in1k from timm's "
                                          r"cache .*pass repa.encoder_file=PATH"):
        repa.load_encoder("test_vit.r160_in1k", "", grid=4, device="cpu")  # offline, nothing cached
    with pytest.raises(ConfigError, match=r"is not a ViT with square patches: its features have no patch grid"):
        repa.FrozenEncoder(timm.create_model("resnet10t"), 4, "timm resnet10t")
