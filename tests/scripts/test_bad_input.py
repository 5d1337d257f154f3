"""Every config key and CLI value is checked before any work starts: one line naming the key, the value and
what is accepted (ConfigError: exit code 2 through engine.run_script, see
tests/vit3/engine/test_run.py::test_exit_codes and test_train_vit.py::test_unknown_config_key), for each of the
three scripts."""
import dataclasses
import sys

import pytest

from tests.trainer_helpers import ROOT, load_script
from vit3 import engine
from vit3.engine import ConfigError, run_script


@pytest.mark.parametrize("script, argv, words", [
    ("train_vit", ["data.batch_size=0"], "data.batch_size=0 is not accepted: it must be an integer >= 1"),
    ("train_vit", ["data.batch_size=-8"], "data.batch_size=-8 is not accepted"),
    ("train_vit", ["optim.grad_accum_steps=0"], "optim.grad_accum_steps=0 is not accepted"),
    ("train_vit", ["log.every=0"], "log.every=0 is not accepted: it must be an integer >= 1"),
    ("train_vit", ["optim.sched=cosin"], "optim.sched='cosin' is not accepted: it must be a timm scheduler"),
    ("train_vit", ["optim.opt=adamww"], "optim.opt='adamww' is not accepted: it must be a timm optimizer"),
    ("train_vit", ["checkpoint.every_steps=-1"], "checkpoint.every_steps=-1 is not accepted"),
    ("train_vit", ["checkpoint.keep_last=-1"], "(0 = keep every checkpoint)"),
    ("train_vit", ["checkpoint.stop_check_every=0"], "checkpoint.stop_check_every=0 is not accepted"),
    ("train_vit", ["mixed_precision=fp8"], "mixed_precision='fp8' is not accepted: it must be one of 'no'"),
    ("train_vit", ["log.log_with=tensorbord"], "log.log_with='tensorbord' is not accepted"),
    ("train_vit", ["model.drop_path_rate=1.5"], "model.drop_path_rate=1.5 is not accepted"),
    ("train_vit", ["data.demo=cifar"], "data.demo='cifar' is not accepted"),
    ("train_dit", ["sample.steps=0"], "sample.steps=0 is not accepted: it must be an integer from 1 to 1000"),
    ("train_dit", ["sample.steps=1001"], "sample.steps=1001 is not accepted"),
    ("train_dit", ["sample.cfg_scale=-1"], "sample.cfg_scale=-1.0 is not accepted: it must be >= 0"),
    ("train_dit", ["data.latent_dtype=float64"], "data.latent_dtype='float64' is not accepted"),
    ("train_dit", ["sample.classes=[]"], "sample.classes=[] is not accepted"),
    ("sample", ["--ckpt", "x", "--steps", "0"], "steps=0 is not accepted"),
    ("sample", ["--ckpt", "x", "--steps", "-5"], "steps=-5 is not accepted"),
    ("sample", ["--ckpt", "x", "--steps", "1001"], "steps=1001 is not accepted"),
    ("sample", ["--ckpt", "x", "--batch-size", "0"], "batch_size=0 is not accepted"),
    ("sample", ["--ckpt", "x", "--per-class", "0"], "per_class=0 is not accepted"),
    ("sample", ["--ckpt", "x", "--num-samples", "-1"], "num_samples=-1 is not accepted"),
    ("sample", ["--ckpt", "x", "--cfg-interval", "0.9", "0.1"], "cfg_interval=(0.9, 0.1) is not accepted"),
    ("sample", ["--ckpt", "x", "--sampler", "eulr"], "sampler='eulr' is not accepted: it must be one of"),
    ("sample", ["--ckpt", "x", "--shift", "0"], "shift=0.0 is not accepted: it must be a positive number"),
    ("sample", ["--ckpt", "x", "--last-step", "tweedy"], "last_step='tweedy' is not accepted"),
    ("train_dit", ["objective=sit"], "objective='sit' is not accepted: it must be one of 'ddpm', 'flow'"),
    ("train_dit", ["flow.path=cosine"], "flow.path='cosine' is not accepted: it must be one of 'linear', 'gvp'"),
    ("train_dit", ["flow.prediction=x0"], "flow.prediction='x0' is not accepted"),
    ("train_dit", ["flow.train_eps=0.7"], "flow.train_eps=0.7 is not accepted"),
    ("train_dit", ["flow.shift=-1"], "flow.shift=-1.0 is not accepted: it must be a positive number"),
    ("train_dit", ["sample.sampler=euler_a"], "sample.sampler='euler_a' is not accepted"),
    ("sample", ["--steps", "2"], "--ckpt is required"),
    ("sample", ["--ckpt", "x", "--cfg-scale", "inf"], "cfg_scale=inf is not accepted: it must be a finite number"),
    ("sample", ["--ckpt", "x", "--cfg-scale", "nan"], "cfg_scale=nan is not accepted: it must be a finite number"),
    ("train_dit", ["sample.cfg_scale=inf"], "sample.cfg_scale=inf is not accepted: it must be a finite number"),
    ("train_vit", ["optim.lr=inf"], "optim.lr=inf is not accepted: it must be a finite number"),
    ("train_vit", [f"seed={2**70}"], f"seed={2**70} is not accepted: it must be an integer from 0 to 2**63 - 1"),
    ("train_dit", [f"sample.seed={2**70}"], f"sample.seed={2**70} is not accepted"),
    ("sample", ["--ckpt", "x", "--seed", str(2**70)], f"seed={2**70} is not accepted"),
    ("train_dit", ["sample.fid_samples=1"], "sample.fid_samples=1 is not accepted: it must be an integer >= 4"),
    # flow settings where the grids' sampler divides by zero (SiT's give black images there)
    ("train_dit", ["objective=flow", "sample.sampler=sde-euler", "flow.diffusion_form=SBDM"],
     "divides by zero at t = 0 (noise), where alpha_t = 0: SiT's maths is singular there and gives NaN (black "
     "images); use diffusion_form=sigma"),
    ("train_dit", ["objective=flow", "sample.sampler=sde-heun", "flow.last_step=none"],
     "flow sampler sde-heun with path=linear, prediction=velocity, sample_eps=0, diffusion_form=sigma, "
     "last_step=none, last_step_size=0.04 divides by zero at t = 1 (data)"),
    ("train_dit", ["objective=flow", "sample.sampler=sde-euler", "flow.last_step=tweedie", "flow.last_step_size=0"],
     "use last_step_size > 0 (SiT's 0.04)"),
    ("train_dit", ["objective=flow", "sample.sampler=euler", "flow.sample_eps=0", "flow.prediction=noise"],
     "flow sampler euler with path=linear, prediction=noise, sample_eps=0 divides by zero at t = 0"),
])
def test_bad_values_are_refused_before_any_work(script, argv, words, tmp_path):
    main = load_script(script).main  # looked up now: another test file may load the script again
    with pytest.raises(ConfigError) as e:
        main(argv if script == "sample" else [*argv, f"output_dir={tmp_path}"])
    assert words in str(e.value) and "\n" not in str(e.value)
    assert not any(tmp_path.iterdir())  # nothing was started


@pytest.mark.parametrize("argv, words", [
    (["threads=-1"], "threads=-1 is not accepted: it must be an integer >= 0"),
    (["data.batch_size=0"], "data.batch_size=0 is not accepted: it must be an integer >= 1"),
    (["data.bad_images=ignore"], "data.bad_images='ignore' is not accepted: it must be one of 'error', 'skip'"),
    (["optim.lr=0"], "optim.lr=0.0 is not accepted: it must be a positive number"),
    (["ema.decay=2"], "ema.decay=2.0 is not accepted: it must be between 0.0 and 1.0"),
])
def test_a_rule_of_the_base_config_holds_in_both_trainers(argv, words, tmp_path):
    """Both trainers' configs extend engine.TrainConfig (and its data section): the rule declared once beside a
    base key refuses the same value in each, and --help shows the base key's comment in each."""
    for script in ("train_vit", "train_dit"):
        module = load_script(script)
        assert issubclass(module.TrainConfig, engine.TrainConfig)
        assert isinstance(module.TrainConfig().data, engine.DataConfig)
        with pytest.raises(ConfigError) as e:
            module.main([*argv, f"output_dir={tmp_path}"])
        assert words in str(e.value), script
        assert not any(tmp_path.iterdir())
        rule = {f.name: f.metadata.get("rule") for f in dataclasses.fields(module.TrainConfig().data)}["batch_size"]
        assert rule is {f.name: f.metadata.get("rule") for f in dataclasses.fields(engine.DataConfig)}["batch_size"]
        helped = engine.config.config_help(module.TrainConfig())
        assert "data.batch_size=" in helped and "per process = batch_size / (processes * grad_accum_steps)" in helped


@pytest.mark.parametrize("script", ["train_vit", "train_dit", "sample"])
def test_help_exits_0_without_a_traceback(script, monkeypatch, capsys):
    """`script.py --help && ...` works: the key list, exit code 0, nothing on stderr (run as __main__ runs it)."""
    main = load_script(script).main
    monkeypatch.setattr(sys, "argv", [f"{script}.py", "--help"])
    with pytest.raises(SystemExit) as e:
        run_script(main)
    out, err = capsys.readouterr()
    assert e.value.code == 0 and err == "" and "keys and defaults:" in out


@pytest.mark.parametrize("script", ["train_vit", "train_dit", "sample"])
@pytest.mark.parametrize("value, words", [
    ("bogus", "VIT3_TTT_IMPL='bogus': choose one of fast, triton, reference, or unset it"),
    ("triton", "VIT3_TTT_IMPL='triton' cannot run here (cpu tensors, which need Triton's interpreter"),
])
def test_a_bad_ttt_impl_switch_is_one_line_before_the_run_folder(script, value, words, tmp_path, monkeypatch, capsys):
    """VIT3_TTT_IMPL (read when vit3 is imported) with an unknown value, or triton on a CPU without Triton's
    interpreter: exit 2, one line, and no run folder left."""
    import vit3.ttt.triton_ops
    from vit3.ttt import dispatch

    monkeypatch.setattr(dispatch, "FORCED_IMPL", value)
    monkeypatch.setattr(vit3.ttt.triton_ops, "INTERPRETED", False)  # the suite's CPU runs set TRITON_INTERPRET=1
    monkeypatch.setattr(sys, "argv", [f"{script}.py", *(["--ckpt", str(tmp_path / "run")] if script == "sample" else
                                                        ["--config", str(ROOT / f"configs/{script[6:]}3_demo.yaml"),
                                                         f"output_dir={tmp_path}"])])
    with pytest.raises(SystemExit) as e:
        run_script(load_script(script).main)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1 and words in err
    assert not any(tmp_path.iterdir())
