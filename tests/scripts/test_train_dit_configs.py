"""train_dit.py's shipped configs: DiT's and SiT's recipes; the digits demos (DDPM and flow matching) train two steps;
data.demo goes through one function."""
import json
from pathlib import Path

import pytest
import yaml

from dit3.train_config import ModelConfig
from tests.trainer_helpers import ROOT, load_script
from vit3 import engine as T
from vit3.digits import prepare_digits
from vit3.engine import ConfigError

train_dit = load_script("train_dit")
pytestmark = pytest.mark.usefixtures("fresh_accelerate")


@pytest.mark.parametrize("config,model,image_size,max_steps", [
    ("dit3_s2_in256", "DiT3-S/2", 256, 400_000), ("dit3_b2_in256", "DiT3-B/2", 256, 400_000),
    ("dit3_xl2_in256", "DiT3-XL/2", 256, 400_000), ("dit_b2_in256", "DiT-B/2", 256, 400_000),
    ("dit3_xl2_in512", "DiT3-XL/2", 512, 3_000_000),  # DiT-XL/2 512x512: latent 64, 3M updates
    ("dit3_xl2_in256_repa", "DiT3-XL/2", 256, 400_000)])
def test_shipped_configs_follow_dits_recipe(config, model, image_size, max_steps):
    cfg, _ = T.load_config(train_dit.TrainConfig, ["--config", str(ROOT / "configs" / f"{config}.yaml")])
    assert cfg.name == config
    assert cfg.model.name == model and (cfg.model.image_size, cfg.model.num_classes) == (image_size, 1000)
    assert train_dit.model_input(cfg, 8, 4) == (image_size // 8, 4)  # latents through the VAE's 8x downsampling
    assert cfg.model.class_dropout_prob == 0.1 and cfg.max_steps == max_steps
    assert (cfg.vae.name, cfg.vae.scale) == ("stabilityai/sd-vae-ft-ema", 0.18215)
    o = cfg.optim
    assert (o.opt, o.lr, o.lr_batch, o.weight_decay, o.sched, o.warmup_epochs, o.clip_grad, o.betas) == (
        "adamw", 1e-4, 0, 0.0, "constant", 0, 0.0, (0.9, 0.999))
    assert cfg.data.batch_size == 256 and cfg.data.hflip
    assert cfg.ema.enabled and (cfg.ema.decay, cfg.ema.decay_batch) == (0.9999, 0)


@pytest.mark.parametrize("config,base", [("dit3_xl2_in256_repa", "dit3_xl2_in256"),
                                         ("sit_xl2_in256_repa", "sit_b2_in256")])
def test_repa_configs_are_their_base_with_repas_imagenet_recipe(config, base):
    """DINOv2-B/14 (its 14-pixel patches at 224 px = the 16 x 16 tokens of an XL/2 at 256), block 8, coefficient
    0.5, REPA's MLP projector of width 2048; everything else is the base config's (SiT's at the XL size)."""
    cfg, _ = train_dit.parse_config(["--config", str(ROOT / "configs" / f"{config}.yaml")])
    r = cfg.repa
    assert (r.encoder, r.encoder_file, r.depth, r.coeff, r.projector, r.projector_dim) == (
        "vit_base_patch14_dinov2.lvd142m", "", 8, 0.5, "mlp", 2048)
    assert train_dit.model_input(cfg, 8, 4)[0] // 2 * 14 == 224
    ours = yaml.safe_load((ROOT / "configs" / f"{config}.yaml").read_text())
    theirs = yaml.safe_load((ROOT / "configs" / f"{base}.yaml").read_text())
    theirs["model"]["name"] = ours["model"]["name"]
    assert {k: v for k, v in ours.items() if k not in ("name", "repa")} == {
        k: v for k, v in theirs.items() if k != "name"}


def test_demo_config_two_steps(tmp_path):
    digits = prepare_digits(tmp_path / "digits16", 16)
    r = train_dit.main(["--config", str(ROOT / "configs" / "dit3_demo.yaml"), f"data.path={digits}",
                        f"output_dir={tmp_path}", "max_steps=2", "log.progress=false", "log.log_with=none",
                        "data.num_workers=0", "sample.steps=2", "sample.digits_per_class=1"])
    assert r["step"] == 2 and r["run_dir"].name == "000-dit3_demo"
    assert 0.0 <= r["digits_accuracy"] <= 1.0 and (r["run_dir"] / "digits_accuracy.json").is_file()


@pytest.mark.parametrize("config", ["sit_b2_in256", "dit3_b2_in256_flow", "sit_xl2_in256_repa"])
def test_shipped_flow_configs_follow_sits_recipe(config):
    """SiT's train.py: linear path, velocity, uniform times, AdamW lr 1e-4, no weight decay, batch 256, EMA
    0.9999, class dropout 0.1, 400K updates; its FID sampler (SDE Euler, 250 steps) draws the grids."""
    cfg, _ = T.load_config(train_dit.TrainConfig, ["--config", str(ROOT / "configs" / f"{config}.yaml")])
    T.check_values(cfg)
    assert cfg.name == config and cfg.objective == "flow"
    assert cfg.model.name == {"sit_b2_in256": "DiT-B/2", "dit3_b2_in256_flow": "DiT3-B/2",
                              "sit_xl2_in256_repa": "DiT-XL/2"}[config]
    assert (cfg.model.image_size, cfg.model.num_classes, cfg.model.class_dropout_prob) == (256, 1000, 0.1)
    f = cfg.flow
    assert (f.path, f.prediction, f.loss_weight, f.time_dist, f.train_eps, f.sample_eps) == (
        "linear", "velocity", "none", "uniform", None, None)
    o = cfg.optim
    assert (o.opt, o.lr, o.lr_batch, o.weight_decay, o.sched, o.warmup_epochs, o.clip_grad) == (
        "adamw", 1e-4, 0, 0.0, "constant", 0, 0.0)
    assert cfg.data.batch_size == 256 and cfg.max_steps == 400_000 and (cfg.ema.decay, cfg.ema.decay_batch) == (
        0.9999, 0)
    assert train_dit.check_objective(cfg).sample.sampler == "sde-euler" and cfg.sample.steps == 250


def test_flow_demo_config_is_the_demo_with_flow_matching(tmp_path):
    """configs/dit3_demo_flow.yaml: configs/dit3_demo.yaml with objective=flow, a flow sampler and the shorter
    schedule flow matching allows (fewer updates at a higher lr, grids and checkpoints to match); nothing
    else differs. Two steps of it score their samples."""
    ddpm = yaml.safe_load((ROOT / "configs" / "dit3_demo.yaml").read_text())
    flow = yaml.safe_load((ROOT / "configs" / "dit3_demo_flow.yaml").read_text())
    assert flow.pop("objective") == "flow" and flow.pop("name") == "dit3_demo_flow" and ddpm.pop("name")
    sampler = flow["sample"].pop("sampler")
    assert flow.pop("flow")["prediction"] == "velocity" and sampler in ("euler", "heun", "dopri5", "sde-euler",
                                                                          "sde-heun")
    schedule = [("max_steps",), ("optim", "lr"), ("sample", "every"), ("checkpoint", "every_steps")]
    for path in schedule:
        *parents, leaf = path
        a, b = flow, ddpm
        for k in parents:
            a, b = a[k], b[k]
        assert a.pop(leaf) != b.pop(leaf), path
    assert flow == ddpm
    digits = prepare_digits(tmp_path / "digits16", 16)
    r = train_dit.main(["--config", str(ROOT / "configs" / "dit3_demo_flow.yaml"), f"data.path={digits}",
                        f"output_dir={tmp_path}", "max_steps=2", "log.progress=false", "log.log_with=none",
                        "data.num_workers=0", "sample.steps=2", "sample.digits_per_class=1"])
    assert r["step"] == 2 and r["run_dir"].name == "000-dit3_demo_flow"
    assert 0.0 <= r["digits_accuracy"] <= 1.0
    assert json.loads((r["run_dir"] / "digits_accuracy.json").read_text())["sampler"] == sampler


def test_both_trainers_write_the_demo_data_in_one_place(tmp_path, monkeypatch):
    """data.demo=digits goes through one function: both trainers' default is the same cache folder, train_dit's
    data.path names the train split of a folder it writes, and an unknown demo names the one there is."""
    import dataclasses

    from vit3.data import DataConfig as ClassifierData
    from vit3.data import prepare_demo
    from vit3.digits import prepare_demo_folder

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    vit = prepare_demo(ClassifierData(demo="digits"), 16)
    cfg = train_dit.TrainConfig(data=train_dit.DataConfig(demo="digits", path=""),
                                model=ModelConfig(image_size=16))
    dit = train_dit.resolve_data(cfg)
    assert Path(vit.path) == Path(dit.path).parent == tmp_path / "cache" / "vit3" / "digits16"
    given = train_dit.resolve_data(dataclasses.replace(cfg, data=dataclasses.replace(
        cfg.data, path=str(tmp_path / "d" / "train"))))
    assert given.path == str(tmp_path / "d" / "train") and (tmp_path / "d" / "val" / "3").is_dir()
    with pytest.raises(ConfigError, match="unknown data.demo 'mnist'.*demo datasets are digits, glyphs"):
        prepare_demo_folder("mnist", "", 16)


def test_glyphs_study_config_trains_on_the_glyphs_at_its_size(tmp_path):
    """configs/study_glyphs.yaml (the resolution study's base) trains on glyphs drawn at model.image_size; the
    digits' SVC score is refused for glyphs in one line."""
    from vit3.glyphs import prepare_glyphs

    glyphs = prepare_glyphs(tmp_path / "glyphs_plain16", 16, train_per_class=2, val_per_class=1, style="plain")
    base = ["--config", str(ROOT / "configs" / "study_glyphs.yaml"), f"data.path={glyphs}", f"output_dir={tmp_path}",
            "log.progress=false", "log.log_with=none", "threads=1", "data.batch_size=8", "model.image_size=16"]
    r = train_dit.main([*base, "max_steps=2", "sample.steps=2", "sample.per_class=1"])
    assert r["step"] == 2 and r["run_dir"].name == "000-study_glyphs"
    assert (r["run_dir"] / "samples" / "final.png").is_file()
    assert "20 images from" in (r["run_dir"] / "log.txt").read_text()  # the 2 x 10 train glyphs
    with pytest.raises(ConfigError, match="digits_per_class=5 scores samples with the digits' SVC.*'glyphs_plain'"):
        train_dit.parse_config([*base, "sample.digits_per_class=5"])
