"""sample.py (grid, bulk, distributed, resumable, bad input, metrics offline), on a tiny pixel-space DiT³
trained for two steps."""
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from PIL import Image

from dit3 import load_dit3
from dit3.sampling import sample
from tests.dit3.tiny import tiny_vae
from tests.trainer_helpers import make_unwritable, noise_images
from vit3 import engine
from vit3.digits import prepare_digits
from vit3.engine import ConfigError, SamplingDiverged

ROOT = Path(__file__).resolve().parents[2]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / f"{name}.py")
    module = sys.modules.setdefault(name, importlib.util.module_from_spec(spec))
    spec.loader.exec_module(module)
    return module


train_dit, sample_py = _load("train_dit"), _load("sample")


def _env():
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def train_digits(tmp, config: str, *extra) -> Path:
    """Two updates of a tiny DiT³ on the digits (pixel space, 16x16, 10 classes) with a shipped demo config."""
    digits = prepare_digits(tmp / "digits16", 16)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    r = train_dit.main(["--config", str(ROOT / "configs" / config), f"data.path={digits}", f"output_dir={tmp}",
                        "max_steps=2", "log.progress=false", "log.log_with=none", "data.num_workers=0",
                        "sample.every=0", "sample.steps=2", "sample.per_class=1", "sample.digits_per_class=0", *extra])
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return r["run_dir"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A digits run with DDPM (configs/dit3_demo.yaml)."""
    return train_digits(tmp_path_factory.mktemp("run"), "dit3_demo.yaml", "run_name=run")


@pytest.fixture(scope="module")
def flow_run(tmp_path_factory):
    """The same digits run trained with flow matching (configs/dit3_demo_flow.yaml)."""
    return train_digits(tmp_path_factory.mktemp("flow_run"), "dit3_demo_flow.yaml", "sample.sampler=sde-euler",
                        "run_name=flow")


def _sample(*argv):
    return sample_py.main([str(a) for a in argv])


def test_grid_reads_the_model_from_the_run(run):
    r = _sample("--ckpt", run, "--classes", 1, 3, 7, "--per-class", 2, "--steps", 3, "--seed", 0)
    assert r["ckpt"].name == "step-00000002"
    img = Image.open(r["grid"])
    assert img.size == (3 * 65 + 1, 2 * 65 + 1)  # 3 classes x 2 rows of 16x16 enlarged to 64


def test_threads_hold_while_sampling_and_are_given_back(run, monkeypatch):
    """--threads sets torch's intra-op threads for the work (CPU sampling beside other jobs), and an
    in-process caller gets its own count back, also when the work fails."""
    before = torch.get_num_threads()
    seen = []

    def execute(args):
        seen.append(torch.get_num_threads())
        raise ConfigError("stop here")
    monkeypatch.setattr(sample_py, "execute", execute)
    torch.set_num_threads(2)
    try:
        with pytest.raises(ConfigError, match="stop here"):
            _sample("--ckpt", run, "--classes", 0, "--threads", 1)
        assert seen == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ConfigError, match="threads"):
        _sample("--ckpt", run, "--classes", 0, "--threads", -1)


def test_export_is_a_pipeline_that_samples_as_the_run(run, tmp_path):
    """--export writes a DiT3Pipeline folder (EMA weights, scheduler, id2label) that loads offline and draws
    exactly what a pipeline around the run's own EMA model draws; --push-to-hub offline says what failed."""
    from dit3.pipeline import DiT3Pipeline
    from dit3.sampling import make_scheduler

    out = tmp_path / "pipe"
    assert _sample("--ckpt", run, "--export", out)["export"] == out
    loaded = DiT3Pipeline.from_pretrained(out)
    assert loaded.vae is None and loaded.scheduler.config.variance_type == "learned_range"  # pixels, DDPM
    assert loaded.config.id2label == {i: str(i) for i in range(10)}  # the digit folders
    model, _ = load_dit3(sample_py.resolve_checkpoint(str(run)), ema=True)
    direct = DiT3Pipeline(transformer=model, scheduler=make_scheduler("ddpm"))
    kw = dict(class_labels=[0, 7], num_inference_steps=3, guidance_scale=2.0, output_type="np")
    images = []
    for pipe in (loaded, direct):
        pipe.set_progress_bar_config(disable=True)
        images.append(pipe(**kw, generator=torch.Generator().manual_seed(0)).images)
    np.testing.assert_array_equal(images[0], images[1])
    with pytest.raises(ConfigError, match=r"could not upload to the hub repo someone/dit3.*huggingface-cli upload"):
        _sample("--ckpt", run, "--export", tmp_path / "again", "--push-to-hub", "someone/dit3")
    assert (tmp_path / "again" / "model_index.json").is_file()
    with pytest.raises(ConfigError, match="--push-to-hub uploads an exported folder"):
        _sample("--ckpt", run, "--push-to-hub", "someone/dit3")


def test_bulk_npz_resume_and_digits_accuracy(run, tmp_path):
    out = tmp_path / "bulk"
    r = _sample("--ckpt", run, "--num-samples", 7, "--batch-size", 3, "--steps", 2, "--out", out,
                "--digits-accuracy")
    arr = np.load(r["npz"])["arr_0"]
    assert arr.dtype == np.uint8 and arr.shape == (7, 16, 16, 3)
    info = json.loads((out / "info.json").read_text())
    assert info["labels"] == [i % 10 for i in range(7)]  # balanced
    assert 0 <= r["digits_accuracy"] <= 1 and "digits_accuracy" in json.loads((out / "metrics.json").read_text())
    # resumable: a lost image is redrawn (its whole batch), the rest is kept, the result is the same
    (out / "images" / "000004.png").unlink()
    kept = (out / "images" / "000000.png").stat().st_mtime_ns
    r2 = _sample("--ckpt", run, "--num-samples", 7, "--batch-size", 3, "--steps", 2, "--out", out)
    assert (out / "images" / "000000.png").stat().st_mtime_ns == kept
    assert Path(r2["npz"]).read_bytes() == Path(r["npz"]).read_bytes()
    with pytest.raises(ConfigError, match=r"holds samples drawn with other settings \(cfg_scale: 4.0 -> 2.0\)"):
        _sample("--ckpt", run, "--num-samples", 7, "--batch-size", 3, "--steps", 2, "--out", out, "--cfg-scale", 2)
    with pytest.raises(ConfigError, match=r"other settings \(mixed_precision: 'no' -> 'bf16'\)"):
        _sample("--ckpt", run, "--num-samples", 7, "--batch-size", 3, "--steps", 2, "--out", out,
                "--mixed-precision", "bf16")


@pytest.mark.subprocess
def test_bulk_output_folder_is_guarded(run, tmp_path, monkeypatch):
    """One sample.py per --out folder; a file is no folder; a full disk stops with exit code 5 and leaves no
    partial PNG under its final name; a negative guidance scale is refused."""
    import socket
    import subprocess

    common = ["--ckpt", run, "--num-samples", 3, "--batch-size", 3, "--steps", 2]
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match=r"--out .*file is a file"):
        _sample(*common, "--out", tmp_path / "file")
    with pytest.raises(ConfigError, match=r"cfg_scale=-2.0 is not accepted: it must be >= 0"):
        _sample(*common, "--out", tmp_path / "o", "--cfg-scale", -2)
    busy = tmp_path / "busy"
    busy.mkdir()
    other = subprocess.Popen(["sleep", "30"])
    try:
        (busy / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": other.pid, "since": "now"}))
        with pytest.raises(ConfigError, match=rf"sample folder .*busy is in use by process {other.pid}"):
            _sample(*common, "--out", busy)
    finally:
        other.kill()
        other.wait()
    with pytest.warns(UserWarning, match="taking over the lock"):  # its holder is gone now
        assert _sample(*common, "--out", busy)["npz"].is_file()
    assert not (busy / ".lock").exists()  # released at the end

    from PIL import Image

    def full(self, fp, *args, **kwargs):
        Path(fp).write_bytes(b"\x89PNG partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full)
    with pytest.raises(engine.WriteError, match=r"cannot write sample images into .*full: No space left.*GiB are free"):
        _sample(*common, "--out", tmp_path / "full")
    assert list((tmp_path / "full" / "images").iterdir()) == []


@pytest.mark.subprocess
@pytest.mark.parametrize("which,sampler", [("run", "ddpm"), ("flow_run", "sde-heun")])
def test_two_processes_give_the_same_npz_bytes(which, sampler, request, tmp_path):
    """A DDPM run, and a flow run with an SDE sampler (fresh noise at every step), drawn by one and by two
    processes: the same .npz bytes."""
    run = request.getfixturevalue(which)
    common = ["--ckpt", str(run), "--num-samples", "5", "--batch-size", "2", "--steps", "2", "--labels", "random",
              "--sampler", sampler]
    one = _sample(*common, "--out", tmp_path / "one")["npz"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
           str(ROOT / "sample.py"), *common, "--out", str(tmp_path / "two")]
    p = subprocess.run(cmd, cwd=ROOT, env={**_env(), "ACCELERATE_USE_CPU": "1"}, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert json.loads((tmp_path / "two" / "info.json").read_text())["processes"] == 2
    assert (tmp_path / "two" / "samples.npz").read_bytes() == Path(one).read_bytes()


def test_bad_input(run, tmp_path):
    with pytest.raises(ConfigError, match=r"--ckpt .*nowhere does not exist"):
        _sample("--ckpt", tmp_path / "nowhere", "--classes", 1)
    with pytest.raises(ConfigError, match=r"is not a checkpoint \(no trainer_state.json\)"):
        _sample("--ckpt", tmp_path, "--classes", 1)
    with pytest.raises(ConfigError, match=r"class 10 is out of range: this model has classes 0 .. 9"):
        _sample("--ckpt", run, "--classes", 1, 10)
    with pytest.raises(ConfigError, match=r"--fid-ref .*missing does not exist"):
        _sample("--ckpt", run, "--num-samples", 2, "--out", tmp_path / "o", "--fid-ref", tmp_path / "missing")
    # a damaged checkpoint: truncated weights (the manifest's sizes tell), or bytes overwritten in place
    bad = tmp_path / "bad"
    shutil.copytree(run / "checkpoints" / "step-00000002", bad)
    w = engine.module_weights_file(bad, "ema")
    good = w.read_bytes()
    w.write_bytes(good[:100])
    with pytest.raises(ConfigError, match=r"bad is damaged \(ema/diffusion_pytorch_model.safetensors has 100 bytes, "
                                          r"the manifest says \d+\): pass an older one"):
        _sample("--ckpt", bad, "--classes", 1)
    w.write_bytes(b"x" * 100 + good[100:])
    with pytest.raises(ConfigError, match=r"cannot read the weights .*ema.*safetensors.*damaged"):
        _sample("--ckpt", bad, "--classes", 1)


def test_no_write_leaves_the_sample_folder(run, tmp_path):
    """Links to a file outside, planted at the final names and at the predictable temporary names of earlier
    versions: the files are written beside them under fresh names and renamed over them, the outside file
    stays as it was."""
    out, victim = tmp_path / "out", tmp_path / "victim"
    victim.write_text("victim")
    for name in ("info.json", ".samples.npz.tmp", "images/.000000.tmp.png", "images/000001.png"):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).symlink_to(victim)
    _sample("--ckpt", run, "--num-samples", 2, "--batch-size", 2, "--steps", 2, "--out", out)
    (tmp_path / ".grid.tmp.png").symlink_to(victim)
    _sample("--ckpt", run, "--classes", 1, "--steps", 2, "--out", tmp_path / "grid.png")
    assert victim.read_text() == "victim"
    assert not any(p.is_symlink() for p in (out / "info.json", out / "images" / "000001.png"))
    (out / "metrics.json").symlink_to(victim)  # read, then written: refused in one line
    with pytest.raises(ConfigError, match=r"metrics.json is a symbolic link .*: sample.py writes only inside"):
        _sample("--ckpt", run, "--num-samples", 2, "--batch-size", 2, "--steps", 2, "--out", out, "--digits-accuracy")


def test_a_damaged_spec_is_rebuilt_before_any_image_and_refused_after(run, tmp_path):
    """spec.json is written atomically now; one cut short by an earlier version (a kill mid-write, before any
    image) is rebuilt with a warning, one beside images is refused in one line naming the file and the fix."""
    out = tmp_path / "out"
    common = ["--ckpt", run, "--num-samples", 2, "--batch-size", 2, "--steps", 2, "--out", out]
    out.mkdir()
    (out / "spec.json").write_text('{"ckpt": "/x", "ema')
    with pytest.warns(UserWarning, match=r"spec.json is damaged \(JSONDecodeError.*no image was drawn yet"):
        _sample(*common)
    assert json.loads((out / "spec.json").read_text())["steps"] == 2
    (out / "spec.json").write_text("")
    with pytest.raises(ConfigError, match=r"spec.json is damaged .*the images in .*images were drawn with. If they "
                                          r"were drawn with these settings, delete it.*another --out"):
        _sample(*common)


def test_unwritable_folders_too_few_fid_samples_and_export_onto_a_file(run, tmp_path, monkeypatch):
    """One line and its exit code for each (see tests/vit3/engine/test_run.py::test_exit_codes): a folder this
    user cannot write (exit 5, simulated under root, see make_unwritable) is a permission problem, not a full disk;
    FID says how many images it needs (exit 2); --export onto a file is refused (exit 2)."""
    ref = noise_images(tmp_path / "ref", 4, 0)
    with pytest.raises(ConfigError, match=r"FID needs at least 2 samples.*got 1 samples and 4 reference images"):
        _sample("--ckpt", run, "--num-samples", 1, "--steps", 2, "--out", tmp_path / "one", "--fid-ref", ref)
    (ref / "003.png").unlink()
    with pytest.raises(ConfigError, match=r"4 samples and 4 reference images; got 4 samples and 3 reference images"):
        _sample("--ckpt", run, "--num-samples", 4, "--steps", 2, "--out", tmp_path / "four", "--fid-ref", ref)
    (tmp_path / "pipe").write_text("x")
    with pytest.raises(ConfigError, match=r"--export .*pipe is a file; the export is a folder"):
        _sample("--ckpt", run, "--export", tmp_path / "pipe")

    ro = make_unwritable(tmp_path / "ro", monkeypatch)
    with pytest.raises(engine.WriteError, match=rf"cannot write the sample folder into {ro}: permission denied.*"
                                                r"choose a folder this user can write \(--out\)") as e:
        _sample("--ckpt", run, "--num-samples", 2, "--steps", 2, "--out", ro / "bulk")
    assert "free" not in str(e.value)
    with pytest.raises(engine.WriteError, match=rf"cannot write the sample grid into {ro}: permission denied"):
        _sample("--ckpt", run, "--classes", 1, "--steps", 2, "--out", ro / "grid.png")


def test_checkpoints_are_diffusers_folders_and_only_those_load(run, tmp_path):
    """model/ and ema/ are save_pretrained folders that DiT3.from_pretrained reads alone; bare .safetensors files
    in their place (no release ever wrote them) are refused with the folder that is missing."""
    from dit3.models import DiT3

    ckpt = run / "checkpoints" / "step-00000002"
    assert (ckpt / "ema" / "config.json").is_file() and (ckpt / "model" / "config.json").is_file()
    ema = DiT3.from_pretrained(ckpt / "ema")
    loaded, _ = load_dit3(ckpt, ema=True)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), ema.state_dict().values()))
    flat = tmp_path / "flat"
    shutil.copytree(ckpt, flat)
    shutil.move(flat / "ema" / "diffusion_pytorch_model.safetensors", flat / "ema.safetensors")
    shutil.rmtree(flat / "ema")
    with pytest.raises(ConfigError, match=r"flat has no ema weights \(ema/config.json\)"):
        load_dit3(flat, ema=True)


def test_bulk_looks_up_the_checkpoint_once_and_records_what_it_loaded(run, tmp_path, monkeypatch):
    """A run folder's newest usable checkpoint is found once (one warning for a damaged newer one), and spec.json
    and info.json name that checkpoint; info.json holds spec.json's settings and what was drawn."""
    shutil.copytree(run, tmp_path / "run")
    newer = tmp_path / "run" / "checkpoints" / "step-00000003"
    shutil.copytree(run / "checkpoints" / "step-00000002", newer)
    (newer / "manifest.json").unlink()
    calls = []
    real = engine.find_latest_checkpoint
    monkeypatch.setattr(engine, "find_latest_checkpoint", lambda *a, **k: calls.append(a) or real(*a, **k))
    out = tmp_path / "bulk"
    with pytest.warns(UserWarning, match="skipping checkpoint .*step-00000003: no manifest.json") as seen:
        _sample("--ckpt", tmp_path / "run", "--num-samples", 2, "--batch-size", 2, "--steps", 2, "--out", out)
    assert len(calls) == 1 and len([w for w in seen if "skipping checkpoint" in str(w.message)]) == 1
    spec, info = (json.loads((out / f).read_text()) for f in ("spec.json", "info.json"))
    assert spec["ckpt"] == str((tmp_path / "run" / "checkpoints" / "step-00000002").resolve())
    assert {k: v for k, v in info.items() if k in spec and k != "labels"} == {k: v for k, v in spec.items()
                                                                               if k != "labels"}
    assert info["labels"] == [0, 1] and spec["labels"] == "balanced" and info["num_samples"] == 2


def test_a_spec_without_every_setting_is_refused(run, tmp_path):
    """spec.json records every setting; one without mixed_precision is not taken as drawn in full precision."""
    out = tmp_path / "bulk"
    args = ("--ckpt", run, "--num-samples", 2, "--batch-size", 2, "--steps", 2, "--out", out)
    _sample(*args)
    spec = json.loads((out / "spec.json").read_text())
    del spec["mixed_precision"]
    (out / "spec.json").write_text(json.dumps(spec))
    with pytest.raises(ConfigError, match=r"other settings \(mixed_precision: None -> 'no'\)"):
        _sample(*args)


# ---------------------------------------------------------------------------------------------
# flow-matching runs
# ---------------------------------------------------------------------------------------------
def test_flow_run_samples_with_its_objective_and_its_settings(flow_run, tmp_path):
    """The objective and the flow settings come from the checkpoint: the default sampler is the run's grid
    sampler; every flow sampler draws; a bulk folder records its flow settings and refuses others on restart."""
    r = _sample("--ckpt", flow_run, "--classes", 1, 3, "--steps", 3)
    assert r["grid"].name == "step-00000002-sde-euler3-cfg4-seed0.png"
    for sampler in ("euler", "heun", "dopri5", "sde-heun"):
        r = _sample("--ckpt", flow_run, "--classes", 2, 5, "--steps", 3, "--sampler", sampler,
                    "--out", tmp_path / f"{sampler}.png")
        assert Image.open(r["grid"]).size == (2 * 65 + 1, 65 + 1)
    out = tmp_path / "bulk"
    common = ["--ckpt", flow_run, "--num-samples", 3, "--batch-size", 2, "--steps", 3, "--sampler", "heun",
              "--out", out]
    arr = np.load(_sample(*common, "--shift", 2)["npz"])["arr_0"]
    assert arr.shape == (3, 16, 16, 3)
    flow = json.loads((out / "info.json").read_text())["flow"]
    assert (flow["path"], flow["prediction"], flow["sampler"], flow["shift"]) == ("linear", "velocity", "heun", 2.0)
    with pytest.raises(ConfigError, match=r"holds samples drawn with other settings \(flow: .*'shift': 2.0"):
        _sample(*common, "--shift", 3)


@pytest.mark.subprocess
def test_a_sampler_of_the_other_objective_is_refused(run, flow_run):
    with pytest.raises(ConfigError, match=r"--sampler ddpm does not sample this checkpoint: it was trained with "
                                          r"objective=flow; choose one of euler, heun, dopri5, sde-euler, sde-heun"):
        _sample("--ckpt", flow_run, "--classes", 1, "--sampler", "ddpm")
    with pytest.raises(ConfigError, match=r"--sampler heun does not sample this checkpoint: it was trained with "
                                          r"objective=ddpm; choose one of ddpm, ddim, dpm"):
        _sample("--ckpt", run, "--classes", 1, "--sampler", "heun")
    with pytest.raises(ConfigError, match=r"--shift, --last-step: flow-matching options, and this checkpoint is a "
                                          r"DDPM run"):
        _sample("--ckpt", run, "--classes", 1, "--shift", 2, "--last-step", "euler")
    p = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--ckpt", str(flow_run), "--classes", "1",
                        "--sampler", "ddim"], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        "error: --sampler ddim does not sample this checkpoint: it was trained with objective=flow; choose one of "
        "euler, heun, dopri5, sde-euler, sde-heun"]


def test_flow_export_is_a_pipeline_that_samples_as_the_run(flow_run, tmp_path):
    """--export of a flow run writes its FlowScheduler (the run's interpolant, --sampler and the flow options);
    the loaded pipeline draws what sample.py draws from the same per-sample noise."""
    from dit3.flow import FlowScheduler
    from dit3.pipeline import DiT3Pipeline

    out = tmp_path / "pipe"
    _sample("--ckpt", flow_run, "--export", out, "--sampler", "sde-heun", "--last-step", "tweedie")
    loaded = DiT3Pipeline.from_pretrained(out)
    assert type(loaded.scheduler) is FlowScheduler
    c = loaded.scheduler.config
    assert (c.path, c.prediction, c.sampler, c.last_step, c.shift) == ("linear", "velocity", "sde-heun", "tweedie", 1.0)
    loaded.set_progress_bar_config(disable=True)
    gens = lambda: [torch.Generator().manual_seed(sample_py.sample_seed(0, i)) for i in range(2)]  # noqa: E731
    images = loaded(class_labels=[4, 7], num_inference_steps=3, guidance_scale=4.0, output_type="pt",
                    generator=gens()).images
    model, config = load_dit3(sample_py.resolve_checkpoint(str(flow_run)), ema=True)
    args, flow = sample_py.resolve_objective(sample_py.parse_args(
        ["--ckpt", str(flow_run), "--steps", "3", "--sampler", "sde-heun", "--last-step", "tweedie"]), config)
    x = sample(model, torch.tensor([4, 7]), (3, 16, 16), sampler=args.sampler, num_steps=3, cfg_scale=4.0,
               generator=gens(), flow=flow)  # as sample.py draws
    torch.testing.assert_close(images, (x / 2 + 0.5).clamp(0, 1), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# FID and friends (the metrics themselves: tests/dit3/test_evaluation.py)
# ---------------------------------------------------------------------------------------------
def test_sample_py_writes_metrics_offline(run, inception_weights, tmp_path):
    ref = noise_images(tmp_path / "ref", 6, 3)
    out = tmp_path / "bulk"
    _sample("--ckpt", run, "--num-samples", 8, "--batch-size", 6, "--steps", 2, "--out", out)  # 2 more on disk
    r = _sample("--ckpt", run, "--num-samples", 6, "--batch-size", 6, "--steps", 2, "--out", out,
                "--fid-ref", ref, "--inception-weights", inception_weights)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["frechet_inception_distance"] == r["metrics"]["frechet_inception_distance"] > 0
    assert metrics["num_samples"] == 6


def test_domain_fid_with_a_vit3_classifier(run, tmp_path):
    """The digits demo's evaluation: a ViT³ from train_vit.py as torch-fidelity's feature extractor."""
    from dit3.evaluation import fidelity_metrics

    train_vit = _load("train_vit")
    root = prepare_digits(tmp_path / "digits16", 16)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    vit = train_vit.main(["--config", str(ROOT / "configs" / "vit3_demo.yaml"), f"data.path={root}",
                          f"output_dir={tmp_path}", "max_steps=2", "log.progress=false", "log.log_with=none",
                          "data.num_workers=0"])["run_dir"]
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    same = fidelity_metrics(root / "val", root / "val", cuda=False, classifier=vit)
    assert abs(same["frechet_inception_distance"]) < 1e-3 and same["feature_extractor"].startswith("classifier")
    other = fidelity_metrics(root / "val" / "3", root / "val" / "7", cuda=False, classifier=vit)
    assert other["frechet_inception_distance"] > 0.01  # two different digits differ
    out = tmp_path / "bulk"
    r = _sample("--ckpt", run, "--num-samples", 10, "--batch-size", 10, "--steps", 2, "--out", out,
                "--fid-ref", root / "val", "--feature-extractor", vit, "--digits-accuracy", "--class-accuracy")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["frechet_inception_distance"] == r["metrics"]["frechet_inception_distance"]
    assert "digits_accuracy" in metrics
    # the classifier's accuracy: its own labels of the samples written, against the classes asked
    from dit3.evaluation import class_accuracy

    labels = json.loads((out / "info.json").read_text())["labels"]
    assert metrics["class_accuracy"] == r["class_accuracy"] == class_accuracy(
        np.load(out / "samples.npz")["arr_0"], labels, vit, cuda=False)
    with pytest.raises(ConfigError, match="--class-accuracy judges bulk samples with the --feature-extractor"):
        _sample("--ckpt", run, "--num-samples", 10, "--out", tmp_path / "b2", "--class-accuracy")
    other = tmp_path / "other-classes"  # a classifier of 7 classes cannot judge a model of 10
    shutil.copytree(engine.find_latest_checkpoint(vit / "checkpoints"), other)
    (other / "config.yaml").write_text((other / "config.yaml").read_text().replace("num_classes: 10", "num_classes: 7"))
    with pytest.raises(ConfigError, match="has 7 classes, the model 10"):
        _sample("--ckpt", run, "--num-samples", 10, "--out", tmp_path / "b3", "--feature-extractor", other,
                "--class-accuracy")
    assert not (tmp_path / "b2").exists() and not (tmp_path / "b3").exists()


def test_official_release_files(tmp_path):
    """An official train.py file ({'model', 'ema', 'opt', 'args'}) samples with no model flags; DiT's bare
    EMA weights need --model and --image-size."""
    import argparse

    from dit3.models import DiT3_models

    tiny_vae().save_pretrained(tmp_path / "vae")
    model = DiT3_models["DiT3-S/8"](input_size=16, num_classes=10)  # 32 px images through a 2x VAE
    sd = model.state_dict()
    torch.save({"model": sd, "ema": sd, "opt": {}, "args": argparse.Namespace(
        model="DiTTT-S/8", image_size=32, num_classes=10, vae="ema")}, tmp_path / "official.pt")
    r = _sample("--ckpt", tmp_path / "official.pt", "--vae", tmp_path / "vae", "--classes", 3, 4, "--steps", 2)
    assert Image.open(r["grid"]).size == (2 * 65 + 1, 65 + 1)  # two 32 px images, enlarged to 64
    torch.save(sd, tmp_path / "bare.pt")
    with pytest.raises(ConfigError, match=r"does not say its model and image size.*pass --model"):
        _sample("--ckpt", tmp_path / "bare.pt", "--vae", tmp_path / "vae", "--classes", 3)
    r = _sample("--ckpt", tmp_path / "bare.pt", "--vae", tmp_path / "vae", "--classes", 3, "--steps", 2,
                "--model", "DiT3-S/8", "--image-size", 32, "--num-classes", 10)
    assert r["grid"].is_file()
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match=r"cannot read .*junk.pt.*damaged or not a checkpoint"):
        _sample("--ckpt", tmp_path / "junk.pt", "--classes", 3)


def test_singular_or_absurd_flow_settings_write_no_black_images(flow_run, tmp_path):
    """sample.py refuses, in one line and before drawing, the flow settings where the sampler divides by zero;
    settings that are finite but blow the samples up (a huge guidance or diffusion norm) stop with
    SamplingDiverged (exit code 3) and write no grid, no image and no .npz."""
    singular = {("--sampler", "sde-heun", "--last-step", "none"): "use last_step=mean",
                ("--sampler", "sde-euler", "--diffusion-form", "SBDM"): "use diffusion_form=sigma",
                ("--sampler", "sde-euler", "--last-step", "tweedie", "--last-step-size", "0"): "last_step_size > 0"}
    for options, fix in singular.items():
        with pytest.raises(ConfigError, match=f"divides by zero .*{fix}"):
            _sample("--ckpt", flow_run, "--classes", 1, "--steps", 3, "--out", tmp_path / "grid.png", *options)
    for options in (("--cfg-scale", "1e30"), ("--sampler", "sde-euler", "--diffusion-norm", "1e6")):
        with pytest.raises(SamplingDiverged, match="not images, so none was written"):
            _sample("--ckpt", flow_run, "--classes", 1, 3, "--steps", 5, "--out", tmp_path / "grid.png", *options)
        with pytest.raises(SamplingDiverged):
            _sample("--ckpt", flow_run, "--num-samples", 3, "--steps", 5, "--out", tmp_path / "bulk", *options)
    assert not (tmp_path / "grid.png").exists() and not any((tmp_path / "bulk" / "images").iterdir())
    assert not (tmp_path / "bulk" / "samples.npz").exists()
    # the corrected command draws into the same folder: the failed ones drew nothing, so nothing is mixed
    arr = np.load(_sample("--ckpt", flow_run, "--num-samples", 3, "--steps", 5, "--out", tmp_path / "bulk")["npz"])
    assert arr["arr_0"].shape == (3, 16, 16, 3)
    assert json.loads((tmp_path / "bulk" / "spec.json").read_text())["cfg_scale"] == 4.0
