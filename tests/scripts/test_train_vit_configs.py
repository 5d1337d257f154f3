"""train_vit.py's shipped configs: the official recipe of each model; the digits demo trains two steps."""
import pytest

from tests.trainer_helpers import ROOT, load_script
from vit3 import engine as T
from vit3.digits import prepare_digits

train_vit = load_script("train_vit")
pytestmark = pytest.mark.usefixtures("fresh_accelerate")

OFFICIAL = {  # model: (drop_path_rate, mesa) from the official cfgs/*.yaml (H-ViT³: the *_mesa ones)
    "vit3_tiny": (0.0, 0.0), "vit3_small": (0.1, 0.0), "vit3_base": (0.4, 0.0),
    "hvit3_tiny": (0.2, 1.0), "hvit3_small": (0.4, 1.5), "hvit3_base": (0.6, 2.0),
}


@pytest.mark.parametrize("model", sorted(OFFICIAL))
def test_shipped_configs_follow_the_official_recipe(model):
    cfg, _ = T.load_config(train_vit.TrainConfig, ["--config", str(ROOT / "configs" / f"{model}_in1k.yaml")])
    assert cfg.model.name == model and (cfg.model.drop_path_rate, cfg.mesa) == OFFICIAL[model]
    assert (cfg.model.img_size, cfg.data.batch_size, cfg.optim.epochs, cfg.optim.warmup_epochs) == (224, 1024, 300, 20)
    assert T.scaled_lrs(cfg.optim, cfg.data.batch_size) == pytest.approx((1e-3, 1e-6, 1e-5))
    o = cfg.optim
    assert (o.opt, o.betas, o.eps, o.weight_decay, o.clip_grad, o.sched) == (
        "adamw", (0.9, 0.999), 1e-8, 0.05, 5.0, "cosine")
    d = cfg.data
    assert (d.auto_augment, d.reprob, d.remode, d.interpolation, d.crop_pct) == (
        "rand-m9-mstd0.5-inc1", 0.25, "pixel", "bicubic", 0.875)
    assert (d.mixup, d.cutmix, d.label_smoothing, d.color_jitter, d.hflip) == (0.8, 1.0, 0.1, 0.4, 0.5)
    assert cfg.ema.enabled and cfg.ema.decay ** (1024 / cfg.ema.decay_batch) == pytest.approx(0.9999, abs=1e-6)
    assert cfg.mesa_start == 0.25


def test_demo_config_two_steps(tmp_path):
    digits = prepare_digits(tmp_path / "digits16", 16)
    r = train_vit.main(["--config", str(ROOT / "configs" / "vit3_demo.yaml"), f"data.path={digits}",
                        f"output_dir={tmp_path}", "max_steps=2", "log.progress=false", "log.log_with=none",
                        "data.num_workers=0"])
    assert r["step"] == 2 and r["run_dir"].name == "000-vit3_demo"


def test_glyphs_judge_config_two_steps(tmp_path):
    """configs/vit3_glyphs.yaml (the glyphs demo's judge) trains on a glyphs folder at 32 px."""
    from vit3.glyphs import prepare_glyphs

    glyphs = prepare_glyphs(tmp_path / "glyphs32", 32, train_per_class=2, val_per_class=1)
    r = train_vit.main(["--config", str(ROOT / "configs" / "vit3_glyphs.yaml"), f"data.path={glyphs}",
                        f"output_dir={tmp_path}", "max_steps=2", "log.progress=false", "log.log_with=none",
                        "threads=1", "data.batch_size=8"])
    assert r["step"] == 2 and r["run_dir"].name == "000-vit3_glyphs"
