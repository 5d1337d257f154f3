"""Smoke, resume, signal, multi-process and bad-input tests of train_vit.py on CPU.

Tiny models (16-dim, 2 blocks) on a 3-class ImageFolder of 16x16 noise images: each in-process
run takes well under a second; the subprocess tests pay for Python / torch start-up.
"""
import json
import signal
import time

import numpy as np
import pytest
import timm
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file
from timm.loss import SoftTargetCrossEntropy

from tests.trainer_helpers import (
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
from vit3 import load_weights
from vit3.engine import ConfigError, DataError

train_vit = load_script("train_vit")
pytestmark = pytest.mark.usefixtures("fresh_accelerate")

TINY = "{patch_size: 4, embed_dim: 16, depth: 2, num_heads: 2}"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """3 classes x 8 train / 4 val images: 3 updates per epoch at global batch 8."""
    root = tmp_path_factory.mktemp("data")
    write_images(root / "train", "abc", 8, seed=0)
    write_images(root / "val", "abc", 4, seed=1)
    return root


def _argv(data, out, *extra):
    return ["model.name=vit3_tiny", "model.img_size=16", "model.drop_path_rate=0.2", f"model.kwargs={TINY}",
            f"data.path={data}", "data.batch_size=8", "data.num_workers=0", "optim.epochs=3",
            "optim.warmup_epochs=1", "mixed_precision=no", "log.every=1", "log.log_with=none",
            "log.progress=false", "threads=1", f"output_dir={out}", *extra]


def _run(data, out, *extra):
    return run_main(train_vit.main, _argv(data, out, *extra))


# ---------------------------------------------------------------------------------------------
# training runs
# ---------------------------------------------------------------------------------------------
def test_two_steps_run_folder_and_trackers(data, tmp_path):
    r = _run(data, tmp_path, "max_steps=2", "log.log_with=tensorboard", "name=smoke")
    run = r["run_dir"]
    assert run.name == "000-smoke" and r["step"] == 2
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["model"]["num_classes"] == 3 and cfg["max_steps"] == 2  # resolved config
    info = json.loads((run / "run.json").read_text())
    assert info["seed"] == 0 and info["git"] and info["environment"]["world_size"] == 1
    assert {"torch", "timm", "accelerate"} <= set(info["environment"])
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    assert all(np.isfinite(m["train/loss"]) and m["train/images_per_s"] > 0 for m in metrics)
    assert list(run.rglob("events.out.tfevents.*"))  # TensorBoard tracker
    ckpt = run / "checkpoints" / "step-00000002"
    assert yaml.safe_load((ckpt / "config.yaml").read_text()) == cfg  # config in every checkpoint
    assert json.loads((ckpt / "trainer_state.json").read_text())["updates_in_epoch"] == 2
    # the finished run as a timm folder: timm builds the same architecture and loads the EMA weights
    exported = timm.create_model(f"local-dir:{run / 'timm'}", pretrained=True)
    assert exported.num_classes == 3 and len(exported.blocks) == 2
    assert exported.pretrained_cfg["input_size"] == (3, 16, 16)
    ema = load_file(ckpt / "ema.safetensors")
    assert exported.state_dict().keys() == ema.keys()
    assert all(torch.equal(v, ema[k]) for k, v in exported.state_dict().items())


def test_resume_is_bitwise_identical(data, tmp_path, monkeypatch):
    """4 straight updates == 2, stop, resume, 2 more: mid-epoch resume, an epoch boundary (eval +
    checkpoint) in between, gradient accumulation, drop-path, Mixup/CutMix, RandAugment, random
    erasing and MESA (EMA teacher) all on, so every RNG and the data position must be restored."""
    common = ("optim.grad_accum_steps=2", "mesa=1.0", "mesa_start=0.0")
    a = _run(data, tmp_path, "run_name=straight", "max_steps=4", *common)
    _run(data, tmp_path, "run_name=split", "max_steps=2", *common)
    c = _run(data, tmp_path, "run_name=split", "resume=latest", "max_steps=4", *common)
    assert c["step"] == 4
    assert_same_weights(a["run_dir"], c["run_dir"], 4)
    opt_a = torch.load(a["run_dir"] / "checkpoints/step-00000004/optimizer.pt", weights_only=True)
    opt_c = torch.load(c["run_dir"] / "checkpoints/step-00000004/optimizer.pt", weights_only=True)
    assert all(torch.equal(opt_a["state"][k]["exp_avg"], opt_c["state"][k]["exp_avg"]) for k in opt_a["state"])

    # control: the same resume without restoring the RNG states ends elsewhere
    monkeypatch.setattr(T.checkpoint, "restore_rng_state", lambda state: None)
    d = _run(data, tmp_path, f"resume={c['run_dir'] / 'checkpoints' / 'step-00000002'}", "max_steps=4", *common)
    wa, wd = checkpoint_weights(a["run_dir"], 4), checkpoint_weights(d["run_dir"], 4)
    assert not all(torch.equal(wa[k], wd[k]) for k in wa)


def test_every_epochs_0_saves_only_at_the_end_with_the_umask(data, tmp_path):
    """checkpoint.every_epochs=0 ("never at epoch ends") trains on and saves once, at the end; checkpoint and
    timm export files have the umask's mode (safetensors alone writes 0600)."""
    r = _run(data, tmp_path, "checkpoint.every_epochs=0", "optim.epochs=2", "run_name=e0")
    assert r["step"] == 6 and sorted(p.name for p in (r["run_dir"] / "checkpoints").iterdir()) == ["step-00000006"]
    mode = 0o666 & ~T.files.UMASK
    files = [*(r["run_dir"] / "checkpoints" / "step-00000006").iterdir(), *(r["run_dir"] / "timm").iterdir()]
    assert {p.name: p.stat().st_mode & 0o777 for p in files} == {p.name: mode for p in files}


def test_resume_with_changed_settings(data, tmp_path):
    """Another data.batch_size is refused (the position, lr scaling and schedule count its updates); other
    changes are logged key by key, recorded in run.json, and the first config.yaml is kept."""
    run = _run(data, tmp_path, "run_name=c", "max_steps=1")["run_dir"]
    first = (run / "config.yaml").read_text()
    with pytest.raises(ConfigError, match=r"data.batch_size=4 but checkpoint .*step-00000001 was trained with "
                                          r"data.batch_size=8.*Resume with data.batch_size=8, or .*weights="):
        _run(data, tmp_path, "run_name=c", "resume=latest", "max_steps=2", "data.batch_size=4")
    _run(data, tmp_path, "run_name=c", "resume=latest", "max_steps=2", "optim.lr=1e-3", "model.drop_path_rate=0.1",
         "mixed_precision=bf16")
    changed = ["mixed_precision: 'no' -> 'bf16'", "model.drop_path_rate: 0.2 -> 0.1", "optim.lr: 0.0005 -> 0.001"]
    assert json.loads((run / "run.json").read_text())["resumes"][-1]["changed"] == changed
    log = (run / "log.txt").read_text()
    assert all(f"resumed with a changed setting: {c}" in log for c in changed)
    assert (run / "config.yaml").read_text() == first


def test_eval_only_matches_training_eval(data, tmp_path):
    r = _run(data, tmp_path, "run_name=train", "optim.epochs=1")  # one epoch: eval + checkpoint at step 3
    ckpt = r["run_dir"] / "checkpoints" / "step-00000003"
    e = _run(data, tmp_path, "--eval-only", f"resume={ckpt}")
    assert e["eval"] == r["eval"]
    assert e["run_dir"].name.endswith("-eval") and (e["run_dir"] / "eval.json").is_file()
    e2 = _run(data, tmp_path, "eval_only=true", f"weights={ckpt / 'model.safetensors'}")
    assert e2["eval"]["val"] == r["eval"]["val"] and "val_ema" not in e2["eval"]
    # an official-style .pth: {'model', 'state_dict_ema', 'config'}, read with weights_only=True
    official = {"model": load_file(str(ckpt / "model.safetensors")),
                "state_dict_ema": load_file(str(ckpt / "ema.safetensors")), "config": {"MODEL": {"TYPE": "x"}}}
    torch.save(official, tmp_path / "official.pth")
    e3 = _run(data, tmp_path, "eval_only=true", f"weights={tmp_path / 'official.pth'}")
    assert e3["eval"] == e["eval"]


def test_hvit3_mesa_bf16_two_steps(data, tmp_path):
    r = _run(data, tmp_path, "model.name=hvit3_tiny", "model.img_size=32",
             "model.kwargs={embed_dims: [8, 8, 8, 8], depths: [1, 1, 1, 1], num_heads: [1, 1, 1, 1]}",
             "mesa=1.0", "mesa_start=0.0", "mixed_precision=bf16", "max_steps=2", "model.grad_checkpointing=true")
    assert r["step"] == 2
    loss = [json.loads(x)["train/loss"] for x in (r["run_dir"] / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(loss))


@pytest.mark.subprocess
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_saves_and_exits_cleanly_then_resumes(data, tmp_path, sig):
    """SIGTERM (or Ctrl-C's SIGINT) to the whole process group (as a cluster's scancel, or a terminal,
    does: loader worker included) after the first update: a checkpoint, the preempted exit code, and the run
    resumes from it."""
    argv = _argv(data, tmp_path, "run_name=sig", "optim.epochs=200", "checkpoint.every_epochs=1000",
                 "data.num_workers=1")
    code, log = sigterm_at("train_vit.py", argv, "(step 0000001)", sig)
    assert code == T.script.EXIT_PREEMPTED, log  # saved, and distinct from done: a job script requeues
    assert "stopping at step" in log and signal.Signals(sig).name in log
    step = latest_checkpoint_step(tmp_path / "sig" / "checkpoints", log)
    assert 1 <= step < 600
    r = _run(data, tmp_path, "run_name=sig", "optim.epochs=200", "resume=latest", f"max_steps={step + 1}")
    assert r["step"] == step + 1


def test_nan_loss_stops_naming_the_step_and_last_good_checkpoint(data, tmp_path, monkeypatch):
    real, calls = SoftTargetCrossEntropy.forward, []

    def poisoned(self, x, target):
        calls.append(1)
        out = real(self, x, target)
        return out * float("nan") if len(calls) >= 3 else out  # the third update goes bad

    monkeypatch.setattr(SoftTargetCrossEntropy, "forward", poisoned)
    with pytest.raises(T.TrainingDiverged, match=r"NaN or inf at step 3.*Last good checkpoint: .*step-00000002"):
        _run(data, tmp_path, "run_name=nan", "optim.epochs=3", "log.every=4", "checkpoint.every_steps=2")
    # the check runs before every save: the epoch-end checkpoint of step 3 (bad weights) was never written
    assert sorted(p.name for p in (tmp_path / "nan" / "checkpoints").iterdir()) == ["step-00000002"]


@pytest.mark.subprocess
def test_a_failing_step_with_loader_workers_exits_promptly(tmp_path):
    """An error inside the loop (here a zero-byte image read by one of two workers) exits with its code at
    once: the workers, which ignore stop signals, are killed rather than waited for."""
    write_images(tmp_path / "d" / "train", "abc", 8)
    write_images(tmp_path / "d" / "val", "abc", 2)
    (tmp_path / "d" / "train" / "b" / "3.png").write_bytes(b"")
    t0 = time.time()
    p = run_script("train_vit.py", _argv(tmp_path / "d", tmp_path / "out", "optim.epochs=2", "data.num_workers=2"))
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-2000:]
    assert "cannot read image" in p.stderr and "Traceback" not in p.stderr
    assert time.time() - t0 < 60


def test_rolling_back_branches_and_keeps_the_newer_checkpoints(data, tmp_path):
    first = _run(data, tmp_path, "max_steps=3", "checkpoint.every_steps=1", "checkpoint.keep_last=5")
    newer = {s: checkpoint_weights(first["run_dir"], s) for s in (2, 3)}
    with pytest.warns(UserWarning, match="rolls back"):
        branch = _run(data, tmp_path, f"resume={first['run_dir'] / 'checkpoints' / 'step-00000001'}", "max_steps=3",
                      "checkpoint.every_steps=1", "checkpoint.keep_last=5")
    assert branch["run_dir"] != first["run_dir"] and branch["step"] == 3
    for s, w in newer.items():  # the newer line is untouched
        assert all(torch.equal(w[k], checkpoint_weights(first["run_dir"], s)[k]) for k in w)
    assert _run(data, tmp_path, "resume=latest", "max_steps=4")["run_dir"] == branch["run_dir"]


@pytest.mark.subprocess
def test_two_processes_agree(data, tmp_path):
    """Two real gloo processes: world size 2 recorded, identical weights on both ranks (and in the
    checkpoint), train loss all-reduced, validation sums over both shards."""
    launch_two_processes("train_vit.py", _argv(data, tmp_path, "run_name=ddp", "optim.epochs=1",
                                               "threads=0"))
    run = tmp_path / "ddp"
    ranks = two_process_ranks(run)
    model = train_vit.create_model(train_vit.ModelConfig(name="vit3_tiny", img_size=16, drop_path_rate=0.2,
                                                         kwargs=yaml.safe_load(TINY)), 3)
    load_weights(model, run / "checkpoints" / "step-00000003")
    assert weights_digest(model) == ranks[0]["model_digest"]
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    last_train = [m for m in metrics if "train/loss" in m][-1]
    local = [r["local_train"]["loss"] for r in ranks]
    assert local[0] != local[1]  # each rank saw its own shard ...
    assert last_train["train/loss"] == pytest.approx(sum(local) / 2, rel=1e-6)  # ... and the log shows the mean
    val = [m for m in metrics if "val/n" in m][-1]
    assert val["val/n"] == 12  # both shards, no padding


# ---------------------------------------------------------------------------------------------
# bad input: clear errors that name the problem and the fix
# ---------------------------------------------------------------------------------------------
def test_missing_and_empty_data_folder(tmp_path):
    with pytest.raises(DataError, match=r"does not exist.*data.path must hold train/ and val/"):
        _run(tmp_path / "nowhere", tmp_path / "out")
    for split in ("train", "val"):
        (tmp_path / "empty" / split / "a").mkdir(parents=True)
    with pytest.raises(DataError, match=r"empty/train holds no images"):
        _run(tmp_path / "empty", tmp_path / "out")
    assert not any((tmp_path / "out").iterdir())  # failed runs leave no empty run folders


def test_a_directory_link_loop_is_refused_and_an_empty_class_folder_is_fine(tmp_path):
    """A link back up the tree is read once, not until the path is too long (120 images became 14,760); an
    empty class folder keeps its class, as the class-mismatch message says."""
    from vit3.data import open_image_folder

    write_images(tmp_path / "d" / "train", "ab", 2)
    (tmp_path / "d" / "train" / "c").mkdir()
    with pytest.warns(UserWarning, match=r"class folders without images: c \(their classes keep their index\)"):
        ds = open_image_folder(tmp_path / "d" / "train", None)
    assert ds.classes == ["a", "b", "c"] and len(ds) == 4
    (tmp_path / "d" / "train" / "a" / "again").symlink_to(tmp_path / "d" / "train")
    with pytest.raises(DataError, match=r"train/a/again/a is .*train/a again, through a directory link.*remove"):
        open_image_folder(tmp_path / "d" / "train", None)


def test_train_val_class_mismatch(tmp_path):
    write_images(tmp_path / "d" / "train", "abc", 2)
    write_images(tmp_path / "d" / "val", "abd", 2)
    with pytest.raises(DataError, match=r"only in train \['c'\], only in val \['d'\]"):
        _run(tmp_path / "d", tmp_path / "out")


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    """A 16-bit greyscale PNG reads as its 8-bit image (value / 257), not clipped to white."""
    from vit3.data import load_rgb

    grey16 = (np.arange(16 * 64).reshape(16, 64) * 64).astype(np.uint16)  # 0 .. 65472
    Image.fromarray(grey16).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    rgb = np.asarray(load_rgb(str(tmp_path / "g16.png")))
    expected = np.round(grey16 / 257).astype(np.uint8)
    assert rgb.shape == (16, 64, 3) and np.array_equal(rgb[..., 0], expected) and np.array_equal(rgb[..., 2], expected)
    assert abs(rgb.mean() - grey16.mean() / 257) < 0.5  # a gradient, not 255 almost everywhere


def test_corrupt_image_error_or_skip(tmp_path):
    write_images(tmp_path / "d" / "train", "abc", 8)
    write_images(tmp_path / "d" / "val", "abc", 2)
    bad = tmp_path / "d" / "train" / "b" / "3.png"
    bad.write_bytes(bad.read_bytes()[:60])  # truncated PNG
    with pytest.raises(DataError, match=rf"cannot read image {bad}.*data.bad_images=skip"):
        _run(tmp_path / "d", tmp_path / "out", "optim.epochs=1")
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        r = _run(tmp_path / "d", tmp_path / "out", "optim.epochs=1", "data.bad_images=skip")
    assert r["state"].skipped_images == 1  # all 24 images are used once per epoch


def test_image_size_not_divisible_by_patch(data, tmp_path):
    with pytest.raises(ConfigError, match=r"model.img_size=18 is not divisible by the patch size 4.*model.img_size=16"):
        _run(data, tmp_path, "model.img_size=18")
    with pytest.raises(ConfigError, match=r"vit3_tiny cannot be built with model.kwargs=.*'dpth'"):
        _run(data, tmp_path, "model.kwargs.dpth=3")


@pytest.mark.subprocess
def test_unknown_config_key(data, tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.lrr'.*Did you mean 'lr'.*Valid keys in 'optim'"):
        _run(data, tmp_path, "optim.lrr=1e-3")
    p = run_script("train_vit.py", ["data.bogus=1"])
    assert p.returncode == 2 and "error: unknown config key 'data.bogus'" in p.stderr and "Traceback" not in p.stderr


def test_weights_that_are_not_a_checkpoint(data, tmp_path):
    """weights= of a file that is no checkpoint, or of another model: an error naming the file and what was
    expected, never an unpickling traceback (the files are read with weights_only)."""
    junk = tmp_path / "junk.pth"
    junk.write_text("not a checkpoint")
    with pytest.raises(ConfigError, match=rf"cannot read {junk} .*expected classifier weights"):
        _run(data, tmp_path, "max_steps=1", f"weights={junk}")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 16)
    with pytest.raises(ConfigError, match=rf"cannot read {bad} "):
        _run(data, tmp_path, "max_steps=1", f"weights={bad}")
    other = train_vit.create_model(train_vit.ModelConfig(name="vit3_tiny", img_size=16, kwargs={
        "embed_dim": 8, "depth": 1, "num_heads": 1, "patch_size": 4}), 3)
    torch.save({"model": other.state_dict()}, tmp_path / "other.pth")
    with pytest.raises(ConfigError, match=r"other.pth do not fit this model"):
        _run(data, tmp_path, "max_steps=1", f"weights={tmp_path / 'other.pth'}")


def test_help_lists_every_key_with_default_and_comment(capsys):
    with pytest.raises(SystemExit) as e:
        train_vit.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for f in ("optim.lr=0.0005", "ema.decay_batch=4096", "data.batch_size=1024", "checkpoint.keep_last=3"):
        assert f in out
    line = next(x for x in out.splitlines() if x.strip().startswith("optim.lr_batch="))
    assert "scaled by global_batch / lr_batch" in line  # the comment beside the field
    decay = next(x for x in out.splitlines() if x.strip().startswith("ema.decay_batch="))
    assert "per `decay_batch` images" in decay  # a comment on the lines above the field


@pytest.mark.subprocess
def test_two_runs_on_one_folder(data, tmp_path):
    """A run folder held by a live process stops a second run at once, naming the holder."""
    import socket
    import subprocess

    (tmp_path / "busy").mkdir()
    other = subprocess.Popen(["sleep", "30"])
    try:
        (tmp_path / "busy" / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": other.pid}))
        with pytest.raises(ConfigError, match=rf"run folder .*busy is in use by process {other.pid}"):
            _run(data, tmp_path, "run_name=busy", "max_steps=1")
    finally:
        other.kill()
        other.wait()
    assert not (tmp_path / "busy" / "checkpoints").exists()


def test_an_unwritable_checkpoint_folder_stops_the_run_before_its_first_update(data, tmp_path, monkeypatch, capsys):
    """Found at the start (exit code 5, one line), not at the first save, after the training it would throw away.
    make_unwritable refuses new files under checkpoints/ as the kernel does for a normal user (we run as root,
    which a chmod would not stop)."""
    run = _run(data, tmp_path, "run_name=ro", "max_steps=1")["run_dir"]
    make_unwritable(run / "checkpoints", monkeypatch)
    updates = []
    monkeypatch.setattr(T, "optimizer_step", lambda *args: updates.append(1))
    with pytest.raises(SystemExit) as e:
        T.run_script(lambda: train_vit.main(_argv(data, tmp_path, "run_name=ro", "resume=latest", "max_steps=3")))
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert e.value.code == 5 and updates == []
    assert errors == [f"error: [Errno 13] cannot write {run / 'checkpoints'}: Permission denied; make "
                      f"{run / 'checkpoints'} writable for this user or choose another output_dir"]


def test_resume_of_another_model_is_refused(data, tmp_path):
    _run(data, tmp_path, "run_name=m", "max_steps=1")
    with pytest.raises(ConfigError, match=r"another model \(model.kwargs: checkpoint .*'embed_dim': 16.* "
                                          r"vs this run .*'embed_dim': 32"):
        _run(data, tmp_path, "run_name=m", "resume=latest", "model.kwargs.embed_dim=32")
    with pytest.raises(ConfigError, match=r"already holds checkpoints; pass resume=latest"):
        _run(data, tmp_path, "run_name=m")

