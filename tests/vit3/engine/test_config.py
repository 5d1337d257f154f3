"""engine.config: dataclass configs from yaml and key=value overrides, value rules, errors that name the
key, and the keys that may change on resume."""
import dataclasses
import math

import pytest
import yaml

from vit3 import engine as T
from vit3.engine import ConfigError


@dataclasses.dataclass
class Inner:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    steps: int = 10


@dataclasses.dataclass
class Cfg:
    name: str = ""
    flag: bool = False
    inner: Inner = dataclasses.field(default_factory=Inner)
    kwargs: dict = dataclasses.field(default_factory=dict)


def test_config_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"name": "a", "inner": {"lr": "5e-4", "betas": [0.8, 0.9]}}))
    cfg, p = T.load_config(Cfg, ["--config", str(path), "inner.steps=7", "name=007", "kwargs.depth=4",
                                 "kwargs={depth: 2, dim: 8}", "kwargs.dim=16", "--flag"])
    assert p == str(path)
    assert cfg.inner.lr == 5e-4  # yaml 1.1 reads 5e-4 as a string; coerced
    assert cfg.inner.betas == (0.8, 0.9) and cfg.inner.steps == 7
    assert cfg.name == "007"  # string fields keep the raw text
    assert cfg.kwargs == {"depth": 2, "dim": 16} and cfg.flag is True
    # the resolved config round-trips through yaml
    again, _ = T.load_config(Cfg, [])
    again = T.merge_config(again, yaml.safe_load(yaml.safe_dump(T.config_to_dict(cfg))), "x")
    assert again == cfg


@pytest.mark.parametrize("argv, words", [
    (["inner.lrr=1"], ["unknown config key 'inner.lrr'", "Did you mean 'lr'", "lr, betas, steps"]),
    (["bogus=1"], ["unknown config key 'bogus'", "name, flag, inner, kwargs"]),
    (["inner.steps=abc"], ["'inner.steps'", "integer"]),
    (["inner.betas=[1, 2, 3]"], ["'inner.betas'", "2 items"]),
    (["inner=3"], ["config section", "inner.lr"]),
    (["stray"], ["cannot read argument 'stray'"]),
])
def test_config_errors_name_the_key(argv, words):
    with pytest.raises(ConfigError) as e:
        T.load_config(Cfg, argv)
    for w in words:
        assert w in str(e.value)


def test_config_option_styles():
    """--key value, --key=value, key=value, dashes as underscores, lists up to the next option, bare bools."""
    @dataclasses.dataclass
    class Opts:
        cfg_scale: float = 4.0
        classes: list[int] | None = None
        interval: tuple[float, float] | None = None
        ema: bool = True
        out: str = ""
        inner: Inner = dataclasses.field(default_factory=Inner)

    cfg, _ = T.load_config(Opts, ["--cfg-scale", "2", "--classes", "1", "3", "7", "--interval", "0.1", "0.9",
                                  "--out=x y", "--inner.steps", "3", "--no-ema"], flags={"--no-ema": "ema=false"})
    assert (cfg.cfg_scale, cfg.classes, cfg.interval, cfg.ema, cfg.out, cfg.inner.steps) == (
        2.0, [1, 3, 7], (0.1, 0.9), False, "x y", 3)
    cfg, _ = T.load_config(Opts, ["--ema", "--classes", "5", "inner.lr=0.5"])
    assert cfg.ema is True and cfg.classes == [5] and cfg.inner.lr == 0.5
    with pytest.raises(ConfigError, match=r"unknown config key 'cfg_scal'.*Did you mean 'cfg_scale'"):
        T.load_config(Opts, ["--cfg-scal", "2"])
    with pytest.raises(ConfigError, match=r"--out needs a value"):
        T.load_config(Opts, ["--out"])


def test_config_yaml_syntax_error_names_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("inner:\n\tlr: 1.0\n")
    with pytest.raises(ConfigError, match=r"c.yaml is not valid yaml.*spaces, not tabs"):
        T.load_config(Cfg, ["--config", str(path)])


@pytest.mark.parametrize("text", ["", "# only a comment\n"])
def test_an_empty_config_file_is_refused_by_name(tmp_path, text):
    """An empty yaml would silently run every default (ImageNet, downloads)."""
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"config file {path} is empty"):
        T.load_config(Cfg, ["--config", str(path)])


def test_inf_and_nan_are_never_accepted():
    rules = {"inner.lr": T.at_least(0.0)}
    T.check_values(Cfg(), rules)
    for bad in (math.inf, math.nan):
        with pytest.raises(ConfigError, match=r"inner.lr=(inf|nan) is not accepted: it must be a finite number, >= 0"):
            T.check_values(Cfg(inner=Inner(lr=bad)), rules)


def test_config_unknown_key_in_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("inner:\n  lr: 1.0\n  warmup: 3\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'inner.warmup' \(from .*c.yaml\)"
                                          r".*Valid keys in 'inner'"):
        T.load_config(Cfg, ["--config", str(path)])


def test_config_diffs_leave_out_the_launch_keys():
    """A key declared with `launch` (where to resume, when to stop, ...) may change on resume without a warning; the
    engine learns which keys those are from the config, not from a list of names."""
    @dataclasses.dataclass
    class Section:
        lr: float = 1.0
        stop: int = T.launch(0)

    @dataclasses.dataclass
    class Cfg(T.TrainConfig):
        inner: Section = dataclasses.field(default_factory=Section)
        eval_only: bool = T.launch(False)

    keys = T.launch_keys(Cfg())
    assert set(keys) == {"run_name", "resume", "inner.stop", "eval_only"}
    old = T.config_to_dict(Cfg())
    new = T.config_to_dict(Cfg(resume="latest", eval_only=True, inner=Section(lr=2.0, stop=5)))
    assert T.config_diffs(old, new, keys) == ["inner.lr: 1.0 -> 2.0"]
