"""train_dit.py with REPA (the repa section, dit3.repa) on CPU: both losses logged, every mixer and objective, the
projector saved beside the model and resumed bit for bit, the encoder frozen, one process against two, a ViT³
run folder as encoder, exports and sample.py free of REPA, bad settings refused in one line.

Beside test_train_dit.py (its data and arguments, a tiny DiT³ in pixel space), in its own file to keep both
short. The encoder is timm's test_vit (patch 16, 64 dims, a class token) with random weights in a local file,
loaded through timm's pretrained_cfg_overlay as a downloaded DINOv2 would be (no network here).
"""
import json

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from dit3 import repa
from dit3.weights import load_dit3
from tests.trainer_helpers import (
    assert_same_weights,
    checkpoint_weights,
    launch_two_processes,
    load_script,
    run_main,
    run_script,
    two_process_ranks,
    write_images,
)
from vit3.engine import ConfigError

train_dit = load_script("train_dit")
pytestmark = pytest.mark.usefixtures("fresh_accelerate")

TINY = "{depth: 2, hidden_size: 32, num_heads: 2}"
ENCODER = "test_vit.r160_in1k"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """3 classes x 8 images of 16 x 16: 3 updates per epoch at global batch 8 (and a val split for train_vit.py)."""
    root = tmp_path_factory.mktemp("data")
    write_images(root / "train", "abc", 8)
    write_images(root / "val", "abc", 4, seed=1)
    return root / "train"


def _argv(data, out, vit_file, *extra):
    return ["model.name=DiT3-S/2", "model.image_size=8", "model.num_classes=0", f"model.kwargs={TINY}",
            "vae.name=", f"data.path={data}", "data.batch_size=8", "data.num_workers=0", "max_steps=4",
            "mixed_precision=no", "log.every=1", "log.log_with=none", "log.progress=false", "threads=1",
            "sample.every=0", "sample.steps=4", "sample.classes=[0, 1, 2]", "optim.lr=1e-3",
            "checkpoint.every_steps=2", f"output_dir={out}", f"repa.encoder={ENCODER}",
            f"repa.encoder_file={vit_file}", "repa.depth=1", "repa.projector_dim=16", *extra]


def _run(data, out, vit_file, *extra):
    return run_main(train_dit.main, _argv(data, out, vit_file, *extra))


def _metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------
# training runs
# ---------------------------------------------------------------------------------------------
def test_both_losses_are_logged_and_the_projector_is_saved_beside_the_model(data, vit_file, tmp_path, monkeypatch):
    """train/loss is what the optimizer minimises, loss_diffusion + coeff x loss_repa; the checkpoint holds the
    projector in its own file, the model folder exactly a plain run's keys, the optimizer the model's and the
    projector's parameters; the encoder's weights come out of the run as they went in."""
    encoders, loaded = [], []
    real = repa.load_encoder

    def load_encoder(*args, **kwargs):
        encoders.append(real(*args, **kwargs))
        loaded.append({k: v.clone() for k, v in encoders[-1].state_dict().items()})
        return encoders[-1]

    monkeypatch.setattr(repa, "load_encoder", load_encoder)
    r = _run(data, tmp_path, vit_file, "run_name=repa", "repa.coeff=0.25")
    run, step = r["run_dir"], r["step"]
    assert step == 4 and "REPA: block 1 aligned with test_vit.r160_in1k (64 px input, 64-dim" in (
        run / "log.txt").read_text()
    for m in _metrics(run):
        assert m["train/loss"] == pytest.approx(m["train/loss_diffusion"] + 0.25 * m["train/loss_repa"], rel=1e-5)
        assert -1 <= m["train/loss_repa"] <= 1

    ckpt = run / "checkpoints" / "step-00000004"
    projector = load_file(str(ckpt / "repa_projector.safetensors"))
    assert {k: tuple(v.shape) for k, v in projector.items()} == {
        "mlp.0.weight": (16, 32), "mlp.0.bias": (16,), "mlp.2.weight": (16, 16), "mlp.2.bias": (16,),
        "mlp.4.weight": (64, 16), "mlp.4.bias": (64,)}
    plain = _run(data, tmp_path, vit_file, "run_name=plain", "repa.encoder=", "repa.encoder_file=", "max_steps=2")
    for name in ("model", "ema"):
        assert set(checkpoint_weights(run, 4, name)) == set(checkpoint_weights(plain["run_dir"], 2, name))
    optimizer = torch.load(ckpt / "optimizer.pt", weights_only=True)
    n_params = len(list(r["model"].parameters())) + len(projector)
    assert sum(len(g["params"]) for g in optimizer["param_groups"]) == n_params == len(optimizer["state"])

    enc, file = encoders[0], load_file(str(vit_file))
    assert all(torch.equal(enc.model.state_dict()[k], v) for k, v in file.items() if k != "pos_embed")  # its weights
    assert all(torch.equal(v, loaded[0][k]) for k, v in enc.state_dict().items())  # untouched by the updates
    assert all(p.grad is None and not p.requires_grad for p in enc.parameters())


@pytest.mark.parametrize("model,extra", [
    ("DiT-S/2", ("objective=flow", "sample.sampler=euler")),  # SiT + REPA
    ("DiT3-LA-S/2", ()),
    ("DiT3-S/2", ("objective=flow", "sample.sampler=euler", "repa.projector=conv", "repa.depth=2")),  # iREPA
    ("DiT3-S/2", ("mixed_precision=bf16", "model.grad_checkpointing=true")),  # the encoder in the run's autocast
])
def test_every_mixer_and_objective_trains_with_repa(data, vit_file, tmp_path, model, extra):
    r = _run(data, tmp_path, vit_file, f"model.name={model}", "max_steps=2", *extra)
    assert r["step"] == 2 and all(abs(m["train/loss_repa"]) <= 1 for m in _metrics(r["run_dir"]))


def test_resume_with_repa_is_bitwise_identical(data, vit_file, tmp_path):
    """4 straight updates == 2, stop, resume, 2 more: the projector and its optimizer state come back with the rest,
    through gradient accumulation and an epoch boundary, with gradient checkpointing on."""
    common = ("optim.grad_accum_steps=2", "model.grad_checkpointing=true")
    a = _run(data, tmp_path, vit_file, "run_name=straight", *common)
    _run(data, tmp_path, vit_file, "run_name=split", "max_steps=2", *common)
    c = _run(data, tmp_path, vit_file, "run_name=split", "resume=latest", *common)
    assert c["step"] == 4
    assert_same_weights(a["run_dir"], c["run_dir"], 4)
    pa, pc = (load_file(str(r["run_dir"] / "checkpoints" / "step-00000004" / "repa_projector.safetensors"))
              for r in (a, c))
    assert all(torch.equal(pa[k], pc[k]) for k in pa)
    assert [m["train/loss_repa"] for m in _metrics(a["run_dir"])][2:] == [
        m["train/loss_repa"] for m in _metrics(c["run_dir"])][2:]

    with pytest.raises(ConfigError, match=r"another model \(repa.projector: checkpoint 'mlp' vs this run 'conv'"):
        _run(data, tmp_path, vit_file, "run_name=split", "resume=latest", "max_steps=6", "repa.projector=conv")
    with pytest.raises(ConfigError, match=r"another model \(repa.encoder: checkpoint 'test_vit.r160_in1k' vs this "
                                          r"run ''"):
        _run(data, tmp_path, vit_file, "run_name=split", "resume=latest", "max_steps=6", "repa.encoder=",
             "repa.encoder_file=")


@pytest.mark.subprocess
def test_two_processes_agree(data, vit_file, tmp_path):
    """Two gloo processes: identical model, EMA and projector on both ranks after 4 updates, and the logged REPA
    loss the mean of the ranks' own."""
    launch_two_processes("train_dit.py", _argv(data, tmp_path, vit_file, "run_name=ddp", "threads=0", "log.every=2"))
    ranks = two_process_ranks(tmp_path / "ddp")
    assert ranks[0]["repa_projector_digest"] == ranks[1]["repa_projector_digest"]
    local = [r["local_train"]["loss_repa"] for r in ranks]
    assert local[0] != local[1]
    assert _metrics(tmp_path / "ddp")[-1]["train/loss_repa"] == pytest.approx(sum(local) / 2, rel=1e-6)


def test_a_vit3_classifier_run_is_an_encoder(data, vit_file, tmp_path):
    """The project's own classifier (a train_vit.py run, patch 4) as the encoder: 16 px input for 4 x 4 tokens."""
    train_vit = load_script("train_vit")
    vit = run_main(train_vit.main, [
        "model.name=vit3_tiny", "model.img_size=16", "model.kwargs={patch_size: 4, embed_dim: 16, depth: 2, "
        "num_heads: 2}", f"data.path={data.parent}", "data.batch_size=8", "data.num_workers=0", "max_steps=1",
        "mixed_precision=no", "log.log_with=none", "log.progress=false", "threads=1", f"output_dir={tmp_path}",
        "run_name=vit"])["run_dir"]
    r = _run(data, tmp_path, vit_file, f"repa.encoder={vit}", "repa.encoder_file=", "max_steps=2", "run_name=own")
    assert r["step"] == 2
    assert f"aligned with {vit} (16 px input, 16-dim patch features)" in (r["run_dir"] / "log.txt").read_text()


def test_exports_and_sample_py_of_a_repa_run_hold_no_repa_part(data, vit_file, tmp_path):
    """sample.py draws from a REPA run, its export (a DiT3Pipeline) and load_dit3 see a plain model, and a plain run
    starts from the REPA run's weights."""
    from dit3.pipeline import DiT3Pipeline

    sample_py = load_script("sample")
    run = _run(data, tmp_path, vit_file, "run_name=repa", "max_steps=2")["run_dir"]
    assert sample_py.main(["--ckpt", str(run), "--classes", "0", "2", "--steps", "2"])["grid"].is_file()
    out = tmp_path / "pipe"
    sample_py.main(["--ckpt", str(run), "--export", str(out)])
    pipe = DiT3Pipeline.from_pretrained(out)
    keys = set(pipe.transformer.state_dict())
    assert keys == set(checkpoint_weights(run, 2, "ema")) and not any("projector" in k for k in keys)
    model, _ = load_dit3(run / "checkpoints" / "step-00000002")
    assert set(model.state_dict()) == keys
    r = _run(data, tmp_path, vit_file, "run_name=from_repa", "repa.encoder=", "repa.encoder_file=", "max_steps=1",
             f"weights={run / 'checkpoints' / 'step-00000002'}")
    assert r["step"] == 1


def test_latents_extracted_for_repa_keep_the_images_flipped_as_their_latents(data, vit_file, tmp_path):
    """With repa on, --extract-latents also stores each cropped image (uint8, once); an item gives it back in
    [-1, 1] with its latent's flip, so the encoder sees what it would from the image folder. A folder extracted
    without them is refused in one line when repa is on."""
    from dit3.latents import LatentShards, image_transform
    from tests.dit3.tiny import tiny_vae
    from vit3.data import open_image_folder

    vae = tmp_path / "vae"
    tiny_vae().save_pretrained(vae)
    common = (f"vae.name={vae}", "model.image_size=16", "data.latent_dtype=float32")
    latents = tmp_path / "latents"
    _run(data, tmp_path / "out", vit_file, *common, f"data.latents={latents}", "--extract-latents")
    assert json.loads((latents / "index.json").read_text())["pixels"] is True
    images = open_image_folder(data, image_transform(16, hflip=False), "error")
    shards = LatentShards(latents, scale=0.5, pixels=True)
    flips = set()
    for item in [(5, 1), (5, 2), (17, 3), (17, 4)]:
        z, label, _, image = shards[item]
        flip = int(torch.randint(0, 2, (), generator=torch.Generator().manual_seed(item[1])))
        flips.add(flip)
        expected = images[item[0]][0]
        torch.testing.assert_close(image, expected.flip(-1) if flip else expected, rtol=0, atol=1e-6)
        z_plain, label_plain, _ = LatentShards(latents, scale=0.5)[item]
        assert torch.equal(z, z_plain) and label == label_plain
    assert flips == {0, 1}
    r = _run(data, tmp_path / "out", vit_file, *common, f"data.latents={latents}", "max_steps=2")
    assert r["step"] == 2 and "REPA: block 1 aligned" in (r["run_dir"] / "log.txt").read_text()

    plain = tmp_path / "plain"
    _run(data, tmp_path / "out", vit_file, *common, f"data.latents={plain}", "--extract-latents", "repa.encoder=",
         "repa.encoder_file=")
    with pytest.raises(ConfigError, match=r"latents in .*plain hold no images, and repa's encoder needs them"):
        _run(data, tmp_path / "out", vit_file, *common, f"data.latents={plain}")
    index = json.loads((plain / "index.json").read_text())  # a folder from before images were stored ...
    del index["pixels"]
    (plain / "index.json").write_text(json.dumps({**index, "complete": False}))
    _run(data, tmp_path / "out", vit_file, *common, f"data.latents={plain}", "--extract-latents", "repa.encoder=",
         "repa.encoder_file=")  # ... is still finished by a plain extraction
    with pytest.raises(ConfigError, match=r"latent folder .*plain was written for other data or settings \(pixels: "
                                          r"folder False vs this run True\)"):
        (plain / "index.json").write_text(json.dumps({**index, "complete": False}))
        _run(data, tmp_path / "out", vit_file, *common, f"data.latents={plain}", "--extract-latents")


# ---------------------------------------------------------------------------------------------
# bad settings: one line, before any work
# ---------------------------------------------------------------------------------------------
def test_bad_settings_are_refused_before_any_work(data, vit_file, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=r"repa.depth=3 is past the last block of DiT3-S/2 \(2 blocks\); use 1 .. 2"):
        _run(data, out, vit_file, "repa.depth=3")
    with pytest.raises(ConfigError, match=r"repa.depth.* must be a block number >= 1"):
        _run(data, out, vit_file, "repa.depth=0")
    with pytest.raises(ConfigError, match=r"repa.encoder_file=/nowhere/dinov2.pth does not exist"):
        _run(data, out, vit_file, "repa.encoder_file=/nowhere/dinov2.pth")
    with pytest.raises(ConfigError, match=r"repa.encoder='vit_no_such_model' is neither an existing path nor a timm"):
        _run(data, out, vit_file, "repa.encoder=vit_no_such_model")
    with pytest.raises(ConfigError, match=r"repa.projector.* must be one of"):
        _run(data, out, vit_file, "repa.projector=attention")
    convnext = tmp_path / "convnext.safetensors"  # no patch grid: its features cannot be matched to the tokens
    torch.manual_seed(0)
    save_file(timm.create_model("test_convnext").state_dict(), str(convnext))
    with pytest.raises(ConfigError, match=r"repa.encoder timm test_convnext.r160_in1k .* is not a ViT with square "
                                          r"patches: its features have no patch grid to match the model's 4x4 tokens"):
        _run(data, out, vit_file, "repa.encoder=test_convnext.r160_in1k", f"repa.encoder_file={convnext}")
    assert not out.exists() or not any(out.iterdir())  # no run folder left behind
    dit_run = _run(data, tmp_path, vit_file, "run_name=dit", "max_steps=1", "repa.encoder=",
                   "repa.encoder_file=")["run_dir"]
    with pytest.raises(ConfigError, match=r"repa.encoder=.*dit is not a train_vit.py run folder or checkpoint"):
        _run(data, out, vit_file, f"repa.encoder={dit_run}", "repa.encoder_file=")


@pytest.mark.subprocess
def test_a_bad_setting_is_one_line_and_exit_code_2(data, vit_file, tmp_path):
    p = run_script("train_dit.py", _argv(data, tmp_path, vit_file, "repa.depth=9"))
    assert p.returncode == 2 and "repa.depth=9 is past the last block" in p.stderr
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir())
