"""Configs: nested dataclasses filled from a yaml file and command-line overrides.

One command-line style for every script (train_vit.py, train_dit.py, sample.py):

    script.py [--config FILE] [key=value | --key value | --key=value | --flag] ...

Keys are the dataclass fields, dotted for sections (`optim.lr=1e-3`, `--optim.lr 1e-3`); dashes
read as underscores (`--cfg-scale 2` is `cfg_scale=2`). A list key takes every value up to the
next option (`--classes 1 3 7`), a bool key alone means true (`--eval-only`). Later wins. Unknown
keys are errors with a "did you mean"; `--help` lists every key with its default and the comment
beside it in the dataclass.
"""
from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import re
import sys
import types
import typing
from pathlib import Path

import yaml

from ..errors import ConfigError


# ----------------------------------------------------------------------------------------
# Dataclass <-> plain dicts
# ----------------------------------------------------------------------------------------
def config_to_dict(cfg) -> dict:
    """Plain nested dict of a config dataclass (tuples as lists), ready for yaml/json."""

    def plain(v):
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return plain(dataclasses.asdict(cfg))


def flat_config(d: dict, prefix: str = "") -> dict:
    """Flat {"a/b": scalar} of a nested config for tracker hparams (lists as strings)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat_config(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


def config_diffs(old: dict, new: dict, ignore=(), prefix: str = "") -> list[str]:
    """'key: old -> new' for each leaf that differs, but the dotted keys in `ignore` (a resumed run warns with
    these)."""
    diffs = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict) and k != "kwargs":
            diffs += config_diffs(a, b, ignore, f"{prefix}{k}.")
        elif a != b and prefix + k not in ignore:
            diffs.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return diffs


def launch_keys(cfg, prefix: str = "") -> list[str]:
    """The dotted keys declared with `launch`: how this launch runs, not what it trains."""
    keys = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            keys += launch_keys(value, f"{prefix}{f.name}.")
        elif f.metadata.get("launch"):
            keys.append(prefix + f.name)
    return keys


def _field_names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _unknown_key(key: str, section: str, cls, source: str) -> ConfigError:
    valid = _field_names(cls)
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], valid, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    where = f" in '{section}'" if section else ""
    return ConfigError(f"unknown config key '{key}' (from {source}).{hint} Valid keys{where}: {', '.join(valid)}")


def _coerce(value, tp, key: str, source: str):
    """Check / convert one yaml or CLI value to the field's annotated type."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union or origin is types.UnionType:
        if value is None and type(None) in args:
            return None
        tp = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(tp), typing.get_args(tp)

    def bad(expected):
        return ConfigError(f"config key '{key}' (from {source}) must be {expected}, got {value!r}")

    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise bad("true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad("an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # yaml 1.1 reads "5e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise bad("a number")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad("a string")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise bad("a list")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise bad(f"a list of {len(args)} items")
            return tuple(_coerce(v, a, key, source) for v, a in zip(value, args))
        inner = args[0] if args else typing.Any
        items = [v if inner is typing.Any else _coerce(v, inner, key, source) for v in value]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise bad("a mapping")
        return dict(value)
    return value


def _set(cfg, key: str, value, source: str, parse=None, check=_coerce, depth: int = 0):
    """A copy of `cfg` with the dotted `key` set to `value`, checked by `check`: the one path of yaml and command-line
    values. `parse` (yaml.safe_load for the command line) reads the raw text, or each text of `--key v1 v2 ...`, but
    for a string key; a key inside a free-form mapping field (model.kwargs.depth=4) sets that entry."""
    parts = key.split(".")
    name, rest, cls = parts[depth], parts[depth + 1:], type(cfg)
    if name not in _field_names(cls):
        raise _unknown_key(key, ".".join(parts[:depth]), cls, source)
    hint, current = typing.get_type_hints(cls)[name], getattr(cfg, name)
    if dataclasses.is_dataclass(current):
        if not rest:
            raise ConfigError(f"'{key}' is a config section; set one of its keys: "
                              + ", ".join(f"{key}.{k}" for k in _field_names(type(current))))
        return dataclasses.replace(cfg, **{name: _set(current, key, value, source, parse, check, depth + 1)})
    if rest and not isinstance(current, dict):
        raise _unknown_key(key, ".".join(parts[:depth + 1]), cls, source)
    if parse and hint is not str:
        value = [parse(v) for v in value] if isinstance(value, list) else parse(value)
    if rest:
        node = new = dict(current)
        for p in rest[:-1]:
            node = node.setdefault(p, {})
        node[rest[-1]] = value
        value = new
    return dataclasses.replace(cfg, **{name: check(value, hint, key, source)})


def merge_config(cfg, data: dict, source: str, prefix: str = ""):
    """A copy of dataclass `cfg` (the section `prefix`) with the (nested) mapping `data` applied, strictly."""
    if not isinstance(data, dict):
        section = prefix.rstrip(".") or "<top>"
        raise ConfigError(f"config section '{section}' (from {source}) must be a mapping, got {data!r}")
    for key, value in data.items():
        if key not in _field_names(type(cfg)):
            raise _unknown_key(prefix + str(key), prefix.rstrip("."), type(cfg), source)
        if dataclasses.is_dataclass(getattr(cfg, key)):
            cfg = dataclasses.replace(cfg, **{key: merge_config(getattr(cfg, key), value, source, f"{prefix}{key}.")})
        else:
            cfg = _set(cfg, prefix + key, value, source, depth=prefix.count("."))
    return cfg


# ----------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------
def _comments(cls) -> dict[str, str]:
    """field name -> the comment beside it (or on the lines just above it) in the source of the class that
    declares it (a subclass's inherited fields keep their base class's comments)."""
    found = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            found.update(_class_comments(klass))
    return found


def _class_comments(cls) -> dict[str, str]:
    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):
        return {}
    found, above = {}, []
    for line in lines:
        s = line.strip()
        if s.startswith("#"):
            above.append(s.lstrip("# "))
            continue
        m = re.match(r"^(\w+)\s*:[^=]*(?:=.*?)?(?:\s+#\s*(.*))?$", s)
        if m and not s.startswith(("def ", "class ")):
            found[m.group(1)] = " ".join(above + ([m.group(2)] if m.group(2) else []))
        above = []
    return found


def config_help(cfg, prefix: str = "") -> str:
    """One line per key: `key=default  # comment`, sections in order."""
    comments = _comments(type(cfg))
    lines = []
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            lines.append(f"\n  [{prefix}{f.name}]" + (f"  # {comments[f.name]}" if comments.get(f.name) else ""))
            lines.append(config_help(v, prefix + f.name + "."))
        else:
            item = f"  {prefix}{f.name}={v!r}"
            lines.append(f"{item:<44}  # {comments[f.name]}" if comments.get(f.name) else item)
    return "\n".join(lines)


def _cli_type(cfg, key: str):
    """The type of a command-line key, Optional stripped; None for an unknown key or one inside a mapping."""
    *sections, name = key.split(".")
    for section in sections:
        cfg = getattr(cfg, section) if section in _field_names(type(cfg)) else None
        if not dataclasses.is_dataclass(cfg):
            return None
    hint = typing.get_type_hints(type(cfg))[name] if name in _field_names(type(cfg)) else None
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def load_config(cls, argv: list[str] | None = None, flags: dict[str, str] | None = None,
                usage: str = ""):
    """Build a `cls` config from `--config FILE` and overrides (see the module docstring).

    `flags` maps extra bare options to overrides, e.g. {"--no-ema": "ema=false"}. Every value is checked
    against the rule beside its field (`check_values`). Returns (config, path of the yaml or None).
    """
    argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    flags = flags or {}
    defaults = cls()
    path, overrides = None, []  # overrides: (key, raw text or list of raw texts)
    i = 0
    while i < len(argv):
        tok = argv[i]
        i += 1
        if tok in ("-h", "--help"):
            print((usage + "\n\n" if usage else "")
                  + "options: --config FILE, then key=value or --key value (dashes read as underscores)"
                  + (f"; flags: {', '.join(flags)}" if flags else "")
                  + "\nkeys and defaults:\n" + config_help(defaults))
            raise SystemExit(0)
        if tok in ("--config", "--cfg"):
            if i >= len(argv):
                raise ConfigError("--config needs a yaml file")
            path, i = argv[i], i + 1
        elif tok.startswith("--config="):
            path = tok.split("=", 1)[1]
        elif tok in flags:
            overrides.append(tuple(flags[tok].split("=", 1)))
        elif tok.startswith("--"):
            key, eq, raw = tok[2:].partition("=")
            key = key.replace("-", "_")
            if eq:
                overrides.append((key, raw))
            elif _cli_type(defaults, key) is bool and (i >= len(argv) or argv[i].lower() not in ("true", "false")):
                overrides.append((key, "true"))
            elif typing.get_origin(_cli_type(defaults, key)) in (list, tuple):
                values = []
                while i < len(argv) and not argv[i].startswith("--") and "=" not in argv[i]:
                    values.append(argv[i])
                    i += 1
                overrides.append((key, values))
            elif i < len(argv) and not argv[i].startswith("--"):
                overrides.append((key, argv[i]))
                i += 1
            else:
                _set(defaults, key, None, "command line", check=lambda v, *_: v)  # an unknown key: "did you mean"
                raise ConfigError(f"--{tok[2:]} needs a value")
        elif "=" in tok:
            overrides.append(tuple(tok.split("=", 1)))
        else:
            raise ConfigError(f"cannot read argument {tok!r}: use --config FILE, key=value or --key value")

    cfg = defaults
    if path is not None:
        if not Path(path).is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(Path(path).read_text())
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ConfigError(f"config file {path} is not valid yaml{where}: {getattr(e, 'problem', None) or e}. "
                              "Indent with spaces, not tabs") from None
        if data is None:  # falling back to every default (ImageNet, downloads) is never what was meant
            raise ConfigError(f"config file {path} is empty (or only comments): give it the settings of the run, or "
                              "leave out --config to use the defaults")
        cfg = merge_config(cfg, data, source=str(path))
    for key, raw in overrides:
        cfg = _set(cfg, key.strip(), raw, "command line", yaml.safe_load)
    check_values(cfg)
    return cfg, path


# ----------------------------------------------------------------------------------------
# Values: each key's accepted range, checked before any work starts
# ----------------------------------------------------------------------------------------
def at_least(lo: float, what: str = ""):
    return (lambda v: v is not None and v >= lo), what or (f"an integer >= {lo}" if isinstance(lo, int) else f">= {lo}")


def between(lo: float, hi: float, what: str = ""):
    return (lambda v: v is not None and lo <= v <= hi), what or f"between {lo} and {hi}"


def one_of(*choices):
    return (lambda v: v in choices), "one of " + ", ".join(repr(c) for c in choices)


# torch seeds are 64-bit; a process adds its rank to the seed
SEED_RULE = between(0, 2**63 - 1, "an integer from 0 to 2**63 - 1")


def checked(default=dataclasses.MISSING, rule=None, **field_kwargs):
    """A dataclass field whose accepted values `rule` (check, what it must be) says; `load_config` checks it."""
    return dataclasses.field(default=default, metadata={"rule": rule}, **field_kwargs)


def launch(default, rule=None):
    """A field that says how this launch runs, not what it trains (where to resume, when to stop): a resumed run
    may change it without a warning. `rule` as for `checked`."""
    return dataclasses.field(default=default, metadata={"rule": rule, "launch": True})


def _get(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _field_rules(cfg, prefix: str = ""):
    """(dotted key, rule) of each `checked` field of `cfg` and of its sections, in the order they are declared."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            yield from _field_rules(value, f"{prefix}{f.name}.")
        elif f.metadata.get("rule"):
            yield prefix + f.name, f.metadata["rule"]


def check_values(cfg, rules: dict | None = None):
    """ConfigError (exit code 2) naming the first key whose value is not accepted, the value, and what is: the
    rule beside each field (`checked`), then the {dotted key: rule} of `rules`. inf and nan are never accepted:
    no key means anything by them (a guidance scale of inf draws black images)."""
    for key, (ok, what) in [*_field_rules(cfg), *(rules or {}).items()]:
        value = _get(cfg, key)
        finite = not (isinstance(value, float) and not math.isfinite(value))
        try:
            accepted = finite and bool(ok(value))
        except TypeError:  # e.g. None where a number is needed
            accepted = False
        if not accepted:
            raise ConfigError(f"{key}={value!r} is not accepted: it must be {'' if finite else 'a finite number, '}"
                              f"{what}")
