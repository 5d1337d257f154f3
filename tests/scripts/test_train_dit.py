"""Smoke, resume, signal, divergence, latent, multi-process and bad-input tests of train_dit.py on CPU.

Tiny DiT³s (32-dim, 2 blocks) on a 3-class ImageFolder of 16x16 noise images, in pixel space or
through a tiny randomly initialised AutoencoderKL saved to a local folder (no hub access).
"""
import errno
import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from dit3 import diffusion as D
from dit3.latents import LatentShards, image_transform, load_vae
from dit3.train_config import ModelConfig
from dit3.weights import load_dit3_weights
from tests.dit3.tiny import tiny_vae
from tests.trainer_helpers import (
    ROOT,
    assert_same_weights,
    checkpoint_weights,
    latest_checkpoint_step,
    launch_two_processes,
    load_script,
    make_unwritable,
    run_main,
    run_script,
    sigterm_at,
    two_process_ranks,
    weights_digest,
    write_images,
)
from vit3 import engine as T
from vit3.digits import prepare_digits
from vit3.engine import ConfigError, DataError

train_dit = load_script("train_dit")
pytestmark = pytest.mark.usefixtures("fresh_accelerate")

TINY = "{depth: 2, hidden_size: 32, num_heads: 2}"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """3 classes x 8 images: 3 updates per epoch at global batch 8."""
    root = tmp_path_factory.mktemp("data") / "train"
    write_images(root, "abc", 8)
    return root


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    """A tiny random AutoencoderKL (2x downsampling, 4 latent channels) saved as a local folder."""
    path = tmp_path_factory.mktemp("vae") / "tiny-vae"
    tiny_vae().save_pretrained(path)
    return path


def _argv(data, out, *extra):
    return ["model.name=DiT3-S/2", "model.image_size=8", "model.num_classes=0", f"model.kwargs={TINY}",
            "vae.name=", f"data.path={data}", "data.batch_size=8", "data.num_workers=0", "max_steps=4",
            "mixed_precision=no", "log.every=1", "log.log_with=none", "log.progress=false", "threads=1",
            "sample.every=0", "sample.steps=4", "sample.classes=[0, 1, 2]", "optim.lr=1e-3",
            "checkpoint.every_steps=2", f"output_dir={out}", *extra]


def _run(data, out, *extra):
    return run_main(train_dit.main, _argv(data, out, *extra))


# ---------------------------------------------------------------------------------------------
# training runs
# ---------------------------------------------------------------------------------------------
def test_run_folder_metrics_checkpoints_and_grids(data, tmp_path):
    r = _run(data, tmp_path, "name=smoke", "sample.every=2", "log.log_with=tensorboard",
             "checkpoint.keep_last=1")
    run = r["run_dir"]
    assert run.name == "000-smoke" and r["step"] == 4 and r["stopped"] is None
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["model"]["num_classes"] == 3 and cfg["optim"]["weight_decay"] == 0.0  # resolved config
    info = json.loads((run / "run.json").read_text())
    assert info["model_input"] == [3, 8, 8] and info["environment"]["world_size"] == 1
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert all(np.isfinite(m["train/loss"]) and m["train/grad_norm"] > 0 and m["train/steps_per_s"] > 0
               and m["train/images_per_s"] > 0 for m in metrics)
    assert list(run.rglob("events.out.tfevents.*"))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000004"]  # keep_last=1
    grids = sorted(p.name for p in (run / "samples").glob("*.png"))
    assert grids == ["final.png", "step-0000002.png"]
    img = Image.open(run / "samples" / "final.png")
    assert img.size == (3 * 65 + 1, 65 + 1)  # 3 classes of 8x8 enlarged to 64x64 in a row, 1-pixel padding
    ckpt = run / "checkpoints" / "step-00000004"
    assert set(checkpoint_weights(run, 4)) == set(checkpoint_weights(run, 4, "ema"))
    assert yaml.safe_load((ckpt / "config.yaml").read_text()) == cfg


def test_an_unwritable_samples_folder_stops_the_run_before_its_first_update(data, tmp_path, monkeypatch):
    """The grids' folder is checked with the run folder, before any work, not found at the final grid after the
    training. make_unwritable refuses new files there as the kernel does for a normal user (we run as root)."""
    samples = make_unwritable(tmp_path / "grid" / "samples", monkeypatch)
    updates = []
    monkeypatch.setattr(T, "optimizer_step", lambda *args: updates.append(1))
    with pytest.raises(T.WriteError, match=rf"cannot write {samples}: Permission denied; make {samples} writable"):
        _run(data, tmp_path, "run_name=grid")
    assert updates == [] and sorted(p.name for p in (tmp_path / "grid").iterdir()) == ["samples"]


def test_a_failed_save_is_tried_again_at_the_next_save_point(data, tmp_path, monkeypatch):
    """The disk is full at the save of step 2: one line in the log, training goes on from the state in memory, and
    the save of step 4 (the next save point) writes it."""
    real = T.checkpoint._write_files

    def full_at_step_2(tmp, accelerator, modules, states, trainer_state, config, step):
        if step == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tmp, accelerator, modules, states, trainer_state, config, step)

    monkeypatch.setattr(T.checkpoint, "_write_files", full_at_step_2)
    run = _run(data, tmp_path, "run_name=full")["run_dir"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000004"]
    log = (run / "log.txt").read_text()
    assert "saving step 2 failed: cannot write a checkpoint into" in log and "the disk is full" in log
    assert "the save of step 2 had failed" in log and "done at step 4" in log


def test_ema_starts_as_the_model_and_follows_with_its_decay(data, tmp_path):
    r = _run(data, tmp_path, "max_steps=1", "ema.decay=0.5", "run_name=ema", "checkpoint.every_steps=1")
    model, ema = checkpoint_weights(r["run_dir"], 1), checkpoint_weights(r["run_dir"], 1, "ema")
    # after one update with decay 0.5 from a copy of the initial weights: ema = (init + model) / 2
    T.seed_process(0)  # the trainer builds its model right after this seeding
    init = train_dit.create_model(train_dit.TrainConfig(model=ModelConfig(
        name="DiT3-S/2", kwargs=yaml.safe_load(TINY))), 3, 8, 3).state_dict()
    for k in model:
        torch.testing.assert_close(ema[k], (init[k] + model[k]) / 2, rtol=1e-6, atol=1e-7, msg=k)
        assert ema[k].dtype == torch.float32


def test_resume_is_bitwise_identical(data, tmp_path, monkeypatch):
    """4 straight updates == 2, stop, resume, 2 more: mid-epoch resume, an epoch boundary in between,
    gradient accumulation, flips, label dropout, timesteps and noise, so every RNG and the data
    position must be restored."""
    common = ("optim.grad_accum_steps=2",)
    a = _run(data, tmp_path, "run_name=straight", *common)
    _run(data, tmp_path, "run_name=split", "max_steps=2", *common)
    c = _run(data, tmp_path, "run_name=split", "resume=latest", *common)
    assert c["step"] == 4
    assert_same_weights(a["run_dir"], c["run_dir"], 4)

    # control: the same resume without restoring the RNG states ends elsewhere
    monkeypatch.setattr(T.checkpoint, "restore_rng_state", lambda state: None)
    d = _run(data, tmp_path, f"resume={c['run_dir'] / 'checkpoints' / 'step-00000002'}", *common)
    wa, wd = checkpoint_weights(a["run_dir"], 4), checkpoint_weights(d["run_dir"], 4)
    assert not all(torch.equal(wa[k], wd[k]) for k in wa)


def test_in_memory_data_trains_exactly_as_the_folder(data, tmp_path):
    """data.in_memory decodes the images once and draws each flip from the sample's seed as the folder's
    transform does: items and whole runs (flips on) are identical."""
    from vit3.data import ClassificationFolder, InMemoryFolder

    folder = ClassificationFolder(data, image_transform(8, hflip=True))
    memory = InMemoryFolder(ClassificationFolder(data, image_transform(8, hflip=False)), hflip=True)
    items = [(i, seed) for i in range(len(folder)) for seed in (3, 4, 11, 12)]
    flips = 0
    for item in items:
        a, b = folder[item], memory[item]
        assert torch.equal(a[0], b[0]) and a[1:] == b[1:], item
        flips += not torch.equal(b[0], memory.images[item[0]])
    assert 0 < flips < len(items)  # the seeds flip some images, not all
    disk = _run(data, tmp_path, "run_name=disk")
    ram = _run(data, tmp_path, "run_name=ram", "data.in_memory=true")
    assert weights_digest(disk["model"]) == weights_digest(ram["model"])


def test_nan_loss_stops_naming_the_step_and_last_good_checkpoint(data, tmp_path, monkeypatch):
    real = D.GaussianDiffusion.training_losses
    calls = []

    def poisoned(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        calls.append(1)
        if len(calls) >= 3:  # the third update goes bad
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(D.GaussianDiffusion, "training_losses", poisoned)
    with pytest.raises(T.TrainingDiverged,
                       match=r"NaN or inf at step 3.*Last good checkpoint: .*step-00000002"):
        _run(data, tmp_path, "run_name=nan", "max_steps=6", "log.every=4", "checkpoint.every_steps=2")
    # the check runs before every save: step 4's checkpoint (bad weights) was never written
    assert sorted(p.name for p in (tmp_path / "nan" / "checkpoints").iterdir()) == ["step-00000002"]


def test_a_run_resumed_at_its_end_draws_the_final_grid(data, tmp_path):
    """A run that died after its last checkpoint, before its final grid: resuming it draws the grid."""
    r = _run(data, tmp_path, "run_name=end", "max_steps=2")
    final = r["run_dir"] / "samples" / "final.png"
    first = final.read_bytes()
    final.unlink()
    again = _run(data, tmp_path, "run_name=end", "max_steps=2", "resume=latest")
    assert again["step"] == 2 and again["grid"] == final and final.read_bytes() == first


def test_bf16_and_gradient_checkpointing_two_steps(data, tmp_path):
    r = _run(data, tmp_path, "mixed_precision=bf16", "model.grad_checkpointing=true", "max_steps=2",
             "optim.clip_grad=1.0")
    loss = [json.loads(x)["train/loss"] for x in (r["run_dir"] / "metrics.jsonl").read_text().splitlines()]
    assert len(loss) == 2 and all(np.isfinite(loss))


@pytest.mark.subprocess
def test_sigterm_saves_and_exits_cleanly_then_resumes(data, tmp_path):
    argv = _argv(data, tmp_path, "run_name=sig", "max_steps=100000", "checkpoint.every_steps=0",
                 "data.num_workers=1")
    code, log = sigterm_at("train_dit.py", argv, "(step 0000001)")
    assert code == T.script.EXIT_PREEMPTED, log  # saved, and distinct from done: a job script requeues
    assert "stopping at step" in log and "SIGTERM" in log
    step = latest_checkpoint_step(tmp_path / "sig" / "checkpoints", log)
    assert 1 <= step < 1000
    r = _run(data, tmp_path, "run_name=sig", "resume=latest", f"max_steps={step + 1}")
    assert r["step"] == step + 1


# ---------------------------------------------------------------------------------------------
# latent space: VAE on the fly and pre-extracted shards
# ---------------------------------------------------------------------------------------------
def test_latent_extraction_shards_resume_and_training(data, vae_dir, tmp_path):
    latents = tmp_path / "latents"
    common = (f"vae.name={vae_dir}", "model.image_size=16", f"data.latents={latents}", "data.latent_shard_size=10",
              "data.latent_dtype=float32")
    r = _run(data, tmp_path / "out", *common, "--extract-latents")
    assert r["latents"] == latents and not any((tmp_path / "out").iterdir())  # extraction is not a run
    index = json.loads((latents / "index.json").read_text())
    assert index["complete"] and index["num_images"] == 24 and index["num_shards"] == 3
    assert index["latent_shape"] == [4, 8, 8]

    # shard 1 holds images 10..19: the posterior of each image and of its mirror image
    shard = load_file(str(latents / "shard-00001.safetensors"))
    assert shard["mean"].shape == (10, 2, 4, 8, 8) and shard["labels"].tolist() == [1] * 6 + [2] * 4
    from torchvision.datasets import ImageFolder
    images = ImageFolder(str(data), transform=image_transform(16, hflip=False))
    vae = load_vae(str(vae_dir))
    x = images[12][0][None]
    with torch.no_grad():
        direct = vae.encode(torch.cat([x, x.flip(-1)])).latent_dist
    torch.testing.assert_close(shard["mean"][2], direct.mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(shard["std"][2], direct.std, rtol=1e-4, atol=1e-6)

    # resumable: a lost shard is re-encoded, finished ones are kept as they are
    mtime = (latents / "shard-00000.safetensors").stat().st_mtime_ns
    (latents / "shard-00001.safetensors").unlink()
    idx = json.loads((latents / "index.json").read_text())
    (latents / "index.json").write_text(json.dumps({**idx, "complete": False}))
    _run(data, tmp_path / "out", *common, "--extract-latents")
    assert load_file(str(latents / "shard-00001.safetensors"))["mean"].equal(shard["mean"])
    assert (latents / "shard-00000.safetensors").stat().st_mtime_ns == mtime

    # items: scaled draws from the stored posterior; the sample seed fixes flip and draw
    ds = LatentShards(latents, scale=0.5)
    z1, y1, _ = ds[(12, 7)]
    z2, _, _ = ds[(12, 7)]
    assert z1.equal(z2) and y1 == 1 and z1.shape == (4, 8, 8)
    assert not ds[(12, 8)][0].equal(z1)
    flips = {int(torch.randint(0, 2, (), generator=torch.Generator().manual_seed(s))) for s in range(20)}
    assert flips == {0, 1}
    z, _, _ = ds[(12, 7)]
    f = int(torch.randint(0, 2, (), generator=torch.Generator().manual_seed(7)))
    assert ((z / 0.5 - shard["mean"][2, f]).abs() <= 6 * shard["std"][2, f] + 1e-6).all()

    # train from the shards, and with the VAE on the fly
    r = _run(data, tmp_path / "out", *common, "max_steps=2")
    assert r["step"] == 2 and (r["run_dir"] / "samples" / "final.png").is_file()
    r = _run(data, tmp_path / "out", f"vae.name={vae_dir}", "model.image_size=16", "max_steps=2")
    assert r["step"] == 2


def test_latent_folder_of_other_settings_is_refused(data, vae_dir, tmp_path):
    latents = tmp_path / "latents"
    _run(data, tmp_path, f"vae.name={vae_dir}", "model.image_size=16", f"data.latents={latents}", "--extract-latents")
    with pytest.raises(ConfigError, match=r"latents in .* are of 16px images .* this run asks for 32px"):
        _run(data, tmp_path, f"vae.name={vae_dir}", "model.image_size=32", f"data.latents={latents}")


# ---------------------------------------------------------------------------------------------
# two processes
# ---------------------------------------------------------------------------------------------
@pytest.mark.subprocess
def test_two_processes_agree(data, vae_dir, tmp_path):
    """Two real gloo processes: world size 2, shards extracted by both, identical weights on both ranks and
    in the checkpoint, the train loss all-reduced, each checkpoint written once."""
    latents = tmp_path / "latents"
    launch_two_processes("train_dit.py", _argv(
        data, tmp_path, "run_name=ddp", "threads=0", f"vae.name={vae_dir}",
        "model.image_size=16", f"data.latents={latents}", "data.latent_shard_size=5", "data.latent_dtype=float32",
        "log.every=2"))
    run = tmp_path / "ddp"
    ranks = two_process_ranks(run)

    # each checkpoint once: one folder per save, both ranks' RNG in it, no temporary left over
    log = (run / "log.txt").read_text()
    assert log.count("saved checkpoint") == 2
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]
    assert sorted(p.name for p in (run / "checkpoints" / "step-00000004").glob("rng-*")) == ["rng-0.pt", "rng-1.pt"]
    model = train_dit.create_model(train_dit.TrainConfig(model=ModelConfig(
        name="DiT3-S/2", kwargs=yaml.safe_load(TINY))), 3, 8, 4)
    load_dit3_weights(model, run / "checkpoints" / "step-00000004")
    assert weights_digest(model) == ranks[0]["model_digest"]

    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    local = [r["local_train"]["loss"] for r in ranks]
    assert local[0] != local[1]  # each rank saw its own shard of the batch ...
    assert metrics[-1]["train/loss"] == pytest.approx(sum(local) / 2, rel=1e-6)  # ... the log shows the mean

    # the 5 shards were spread over the two processes and equal a one-process extraction
    single = tmp_path / "single"
    _run(data, tmp_path / "o", f"vae.name={vae_dir}", "model.image_size=16", f"data.latents={single}",
         "data.latent_shard_size=5", "data.latent_dtype=float32", "--extract-latents")
    for k in range(5):
        a = load_file(str(latents / f"shard-{k:05d}.safetensors"))
        b = load_file(str(single / f"shard-{k:05d}.safetensors"))
        assert all(torch.allclose(a[n].float(), b[n].float(), rtol=1e-5, atol=1e-6) for n in a), k


# ---------------------------------------------------------------------------------------------
# bad input: clear errors that name the problem and the fix
# ---------------------------------------------------------------------------------------------
def test_image_size_not_divisible(data, vae_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"model.image_size=9 is not divisible by the patch size 2"):
        _run(data, tmp_path, "model.image_size=9")
    with pytest.raises(ConfigError, match=r"model.image_size=18 is not divisible by 2 \(VAE\) x 2 \(patch\) = 4; "
                                          r"use a multiple of 4"):
        _run(data, tmp_path, f"vae.name={vae_dir}", "model.image_size=18")
    assert not any(tmp_path.iterdir())  # no run folders left behind


def test_missing_vae(data, tmp_path):
    with pytest.raises(ConfigError, match=r"VAE folder vae.name=/nowhere/vae does not exist.*save_pretrained"):
        _run(data, tmp_path, "vae.name=/nowhere/vae", "model.image_size=16")
    # a hub name that cannot be fetched offline says how to get the weights onto the machine
    with pytest.raises(ConfigError, match=r"(?s)cannot load the VAE 'nobody/no-such-vae'.*pass vae.name=DIR"):
        _run(data, tmp_path, "vae.name=nobody/no-such-vae", "model.image_size=16")


def test_missing_and_empty_data_folder(tmp_path):
    with pytest.raises(DataError, match=r"data folder .*nowhere does not exist"):
        _run(tmp_path / "nowhere", tmp_path / "out")
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match=r"empty holds no images"):
        _run(tmp_path / "empty", tmp_path / "out")
    assert not any((tmp_path / "out").iterdir())  # failed runs leave no empty run folders


def test_class_count_mismatch(data, tmp_path):
    with pytest.raises(DataError, match=r"model.num_classes=1000 but .* has 3 classes; set model.num_classes=3"):
        _run(data, tmp_path, "model.num_classes=1000")
    with pytest.raises(ConfigError, match=r"sample.classes \[207\] are not class ids of this data \(0 .. 2\)"):
        _run(data, tmp_path, "sample.classes=[0, 207]")


def test_resume_of_another_model_is_refused(data, tmp_path):
    _run(data, tmp_path, "run_name=m", "max_steps=2")
    with pytest.raises(ConfigError, match=r"another model \(model.kwargs: checkpoint .*'hidden_size': 32.* "
                                          r"vs this run .*'hidden_size': 64"):
        _run(data, tmp_path, "run_name=m", "resume=latest", "model.kwargs.hidden_size=64")
    with pytest.raises(ConfigError, match=r"another model \(model.name: checkpoint 'DiT3-S/2' vs this run 'DiT-S/2'"):
        _run(data, tmp_path, "run_name=m", "resume=latest", "model.name=DiT-S/2")


@pytest.mark.subprocess
def test_unknown_model_and_cli_error(data, tmp_path):
    with pytest.raises(ConfigError, match=r"unknown model.name 'DiT3-Q/2'; choose one of .*DiT3-B/2"):
        _run(data, tmp_path, "model.name=DiT3-Q/2")
    p = run_script("train_dit.py", ["model.image_sise=3"])
    assert p.returncode == 2 and "Did you mean 'image_size'" in p.stderr and "Traceback" not in p.stderr


# ---------------------------------------------------------------------------------------------
# flow matching (objective=flow)
# ---------------------------------------------------------------------------------------------
FLOW = ("objective=flow", "sample.sampler=heun", "sample.steps=3")


def test_flow_objective_trains_records_itself_and_resumes_bitwise(data, tmp_path, monkeypatch):
    """objective=flow trains with dit3.flow (never the DDPM loss), its checkpoints say so, its grids come from a
    flow sampler, and 2 + 2 updates equal 4 as for DDPM (the flow times and noise come from the restored RNG)."""
    from dit3.flow import FlowMatching

    calls = []
    real = FlowMatching.training_losses
    monkeypatch.setattr(FlowMatching, "training_losses", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    monkeypatch.setattr(D.GaussianDiffusion, "training_losses", lambda *a, **k: pytest.fail("the DDPM loss ran"))
    a = _run(data, tmp_path, "run_name=straight", "sample.every=2", *FLOW)
    assert len(calls) == 4 and a["step"] == 4
    cfg = yaml.safe_load((a["run_dir"] / "checkpoints" / "step-00000004" / "config.yaml").read_text())
    assert cfg["objective"] == "flow" and cfg["sample"]["sampler"] == "heun"
    flow = cfg["flow"]
    assert (flow["path"], flow["prediction"], flow["loss_weight"]) == ("linear", "velocity", "none")
    assert sorted(p.name for p in (a["run_dir"] / "samples").glob("*.png")) == ["final.png", "step-0000002.png"]
    _run(data, tmp_path, "run_name=split", "max_steps=2", *FLOW)
    c = _run(data, tmp_path, "run_name=split", "resume=latest", *FLOW)
    assert_same_weights(a["run_dir"], c["run_dir"], 4)


@pytest.mark.subprocess
def test_flow_settings_and_ddpm_settings_do_not_mix(data, tmp_path):
    with pytest.raises(ConfigError, match=r"sample.sampler='heun' does not sample objective=ddpm models; "
                                          r"choose one of ddpm, ddim, dpm"):
        _run(data, tmp_path, "sample.sampler=heun")
    with pytest.raises(ConfigError, match=r"sample.sampler='ddpm' does not sample objective=flow models"):
        _run(data, tmp_path, "objective=flow", "sample.sampler=ddpm")
    with pytest.raises(ConfigError, match=r"with flow.prediction=velocity use flow.loss_weight=none"):
        _run(data, tmp_path, "objective=flow", "flow.loss_weight=likelihood")
    _run(data, tmp_path, "run_name=d", "max_steps=2")
    with pytest.raises(ConfigError, match=r"was trained with objective=ddpm, this run asks for objective=flow"):
        _run(data, tmp_path, "run_name=d", "resume=latest", *FLOW)
    _run(data, tmp_path, "run_name=f", "max_steps=2", *FLOW)
    with pytest.raises(ConfigError, match=r"flow.prediction: checkpoint 'velocity' vs this run 'noise'"):
        _run(data, tmp_path, "run_name=f", "resume=latest", *FLOW, "flow.prediction=noise")
    p = run_script("train_dit.py", ["objective=flow", "sample.sampler=ddim", f"output_dir={tmp_path / 'x'}"])
    assert p.returncode == 2 and "does not sample objective=flow models" in p.stderr
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------
# FID during training (the metrics themselves: tests/dit3/test_evaluation.py; the shipped configs and the
# demo: test_train_dit_configs.py)
# ---------------------------------------------------------------------------------------------
def test_training_runs_a_periodic_fid(inception_weights, tmp_path):
    root = prepare_digits(tmp_path / "digits16", 16)
    r = run_main(train_dit.main, ["--config", str(ROOT / "configs" / "dit3_demo.yaml"), f"data.path={root}",
                                  f"output_dir={tmp_path}", "max_steps=2", "log.progress=false", "log.log_with=none",
                                  "data.num_workers=0", "sample.every=0", "sample.steps=2", "sample.digits_per_class=0",
                                  "sample.fid_every=1", "sample.fid_samples=5", f"sample.fid_ref={root / 'val' / '0'}",
                                  f"sample.fid_inception_weights={inception_weights}"])
    rows = [json.loads(x) for x in (r["run_dir"] / "metrics.jsonl").read_text().splitlines()]
    fids = [m for m in rows if "fid/frechet_inception_distance" in m]
    assert [m["step"] for m in fids] == [1, 2] and all(m["fid/frechet_inception_distance"] > 0 for m in fids)
    assert not any((r["run_dir"] / "fid").iterdir())  # sample images are removed, numbers kept
    with pytest.raises(ConfigError, match=r"sample.fid_every=1 needs sample.fid_ref"):
        train_dit.main(["--config", str(ROOT / "configs" / "dit3_demo.yaml"), "sample.fid_every=1"])


def test_samples_that_are_not_images_are_a_warning_that_names_the_step(data, inception_weights, tmp_path):
    """A guidance scale that blows the samples up: each periodic grid, the periodic FID and the final grid are
    skipped with a warning naming the step (no PNG, no number, no FID folder left), and the training itself
    runs to its end."""
    r = _run(data, tmp_path, "run_name=blowup", "sample.every=1", "sample.cfg_scale=1e30", "sample.fid_every=2",
             "sample.fid_samples=4", "sample.fid_cfg_scale=1e30", f"sample.fid_ref={data / 'a'}",
             f"sample.fid_inception_weights={inception_weights}", *FLOW)
    log = (r["run_dir"] / "log.txt").read_text()
    assert r["step"] == 4 and r["stopped"] is None and r["grid"] is None
    # at step 1 the EMA model is still DiT's zero-output init, which any guidance scale leaves at zero
    assert [p.name for p in (r["run_dir"] / "samples").glob("*.png")] == ["step-0000001.png"]
    for step in (2, 3):
        assert f"(step {step:07d}) no sample grid: the sampler gave" in log
    for step in (2, 4):
        assert f"(step {step:07d}) no FID: the sampler gave" in log
    assert "(step 0000004) no final sample grid" in log
    assert not any("fid/" in key for line in (r["run_dir"] / "metrics.jsonl").read_text().splitlines()
                   for key in json.loads(line))
    assert not any((r["run_dir"] / "fid").iterdir())
