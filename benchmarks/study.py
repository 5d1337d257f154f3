"""DiT³ against DiT and linear attention at equal budget: a study that drives train_dit.py and sample.py.

    python benchmarks/study.py                    # the digits study (configs/study_digits.yaml), CPU, alone
    python benchmarks/study.py --quick            # 1 seed, 4 updates, 10 samples: the orchestration only
    python benchmarks/study.py --quick --seeds 0 1   # --quick sets defaults: options given win
    python benchmarks/study.py --out DIR          # a killed study: rerun the same command, it continues
    python benchmarks/study.py --seeds 0 1 2 3    # a finished one grows by the runs of the new seeds
    python benchmarks/study.py --lrs 1.5e-3 3e-3 6e-3 1.2e-2   # or of new lrs: the sweep past its edge
    python benchmarks/study.py --minutes 24 --sweep-budget 0.25   # a --minutes 12 study's runs train on to 24
    python benchmarks/study.py objective=ddpm     # DiT's DDPM instead of flow matching: key=value reach every run

From one base config it trains one run per mixer (DiT3-*: TTT, DiT-*: softmax attention, DiT3-LA-*:
linear attention) and per seed, with equal updates, batch, recipe and data order per seed (the seed
sets the data order, the diffusion noise and the init). Before the seeded runs, a learning-rate sweep
per mixer (seed 0, to --sweep-budget of the updates) picks each mixer's lr by its unguided FID there, so
no mixer loses for a recipe tuned to another; the chosen lr's sweep run goes on to the end as that
mixer's seed-0 run (with a constant lr after warm-up, a run stopped early is the prefix of the longer one).

Each run is evaluated from its checkpoints at several budgets (fractions of the updates), with the same
samples, sampler steps and noise for every run (sample.py draws sample i from seed i):
- unguided (guidance 1, the paper's FID setting) and guided (--cfg-scale) samples;
- FID, precision and recall against held-out real images, through a domain feature extractor (on a built-in
  demo, its judge: a small ViT³ classifier trained by train_vit.py on the real train split, as
  `sample.py --feature-extractor` uses it) or Inception;
- class accuracy: the share of samples labelled as the class asked for, by the demo's SVC on the digits,
  by the judge (`sample.py --class-accuracy`) on the glyphs or with a --feature-extractor of yours.
Each mixer's time per training update is measured in this process, alone, before any run starts
(medians of interleaved rounds), for the FID-against-wall-clock view.

Every argument, and every run's and evaluation's arguments (read by train_dit.py's and sample.py's own
parsers, in this process), is checked before the first work; bad input is one line and exit code 2, an
--out that cannot be written exit code 5 (the scripts' codes). Then it writes into --out:
study.json (the spec; a rerun with another spec is refused), runs/<mixer>-lr<lr>-s<seed>/ (train_dit.py
run folders, each with its training time in wall_clock.json), evals/ (sample.py outputs), state.json (the
other timings), and the report of study_report.py: results.json, results.md and fid.png. Finished runs
and evaluations are skipped on a rerun; a killed run resumes from its last checkpoint (resume=auto).
The digits study's config trains with flow matching (SiT's objective: the DiT-S/2 runs are SiT-S/2),
which learns the classes in far fewer updates than DDPM here; objective=ddpm runs the same study with DiT's DDPM.

On GPUs (ImageNet latents, one run at a time over all GPUs; a feature extractor of your own or Inception):
    python benchmarks/study.py --config configs/dit3_b2_in256.yaml --updates 400000 --seeds 0 \\
        --lrs 1e-4 2e-4 --sweep-budget 0.25 --samples 10000 --steps 250 --cfg-scale 1.5 \\
        --fid-ref /data/VIRTUAL_imagenet256.npz --inception-weights /models/pt_inception-2015-12-05.pth \\
        --out results/study-b2 --launcher "accelerate launch --multi_gpu --num_processes 8" \\
        data.latents=/data/in256-latents
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shlex
import sys
from fractions import Fraction
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from study_report import FID, RunClock, choose_lr, write_report  # noqa: E402
from study_scripts import run_script  # noqa: E402

from vit3.engine.config import SEED_RULE  # noqa: E402
from vit3.engine.files import atomic_write_text  # noqa: E402
from vit3.errors import ConfigError, WriteError  # noqa: E402

MIXERS = ("DiT3", "DiT", "DiT3-LA")
# data.demo -> its judge: the train_vit.py config trained on the real train split, at this image size (None: the
# study's; the glyphs' judge is trained once at 32 px and judges any size, resized), and the accuracy of samples
JUDGES = {"digits": ("vit3_demo.yaml", None, "digits_accuracy"),  # the SVC's; the ViT³ gives the features
          "glyphs": ("vit3_glyphs.yaml", 32, "class_accuracy"),
          "glyphs_mono": ("vit3_glyphs.yaml", 32, "class_accuracy"),  # each judge trained on its own glyphs
          "glyphs_plain": ("vit3_glyphs.yaml", 32, "class_accuracy")}
# --quick changes these defaults; an option given with it wins (--quick --seeds 0 1: two seeds, quickly)
QUICK = dict(seeds=(0,), updates=4, budgets=(0.5, 1.0), sweep_budget=0.5, samples=10, steps=2, time_rounds=2)


# ----------------------------------------------------------------------------------------
# The study's spec
# ----------------------------------------------------------------------------------------
@dataclasses.dataclass
class Study:
    config: str = str(ROOT / "configs" / "study_digits.yaml")
    mixers: tuple = MIXERS
    size: str = ""  # "S/2": the model size and patch; "" = the config's model.name's
    seeds: tuple = (0, 1, 2)
    lrs: tuple = ()  # the sweep; () = the config's lr x 0.5, 1, 2 (quick: the config's lr)
    quick: bool = False
    updates: int = 0  # 0 = the config's max_steps
    # > 0: equal wall clock instead of equal updates: each mixer trains minutes x 60 s / its measured time per
    # update, so a faster mixer trains longer; budgets and the sweep are then fractions of these minutes
    minutes: float = 0.0
    budgets: tuple = (0.25, 0.5, 1.0)
    sweep_budget: float = 0.5  # the sweep's runs stop here (one of budgets); the chosen lr's run goes on to the end
    samples: int = 200
    steps: int = 0  # sampler steps; 0 = the config's sample.steps
    sampler: str = ""  # "" = the config's sample.sampler (else the run's default: ddpm, or sde-euler for flow)
    cfg_scale: float = 4.0
    fid_ref: str = ""  # "" on a built-in demo: its held-out real images at the study's size
    feature_extractor: str = ""  # "" on a built-in demo: its judge (JUDGES), trained into out/classifier
    inception_weights: str = ""
    overrides: tuple = ()  # key=value for every train_dit.py run
    classifier_overrides: tuple = ()  # key=value for the digits classifier's train_vit.py run
    time_rounds: int = 20


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit code 2, as the scripts' bad input (not argparse's usage block)
        raise ConfigError(f"{message} (python benchmarks/study.py --help lists the options)")


def parse_args(argv=None) -> tuple[Study, Path, list[str], bool]:
    """The study argv asks for, each argument checked on its own (ConfigError: one line, exit code 2); the config
    and every run's arguments are checked by `check_runs`."""
    p = _Parser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                epilog=__doc__)
    d = Study()
    p.add_argument("--config", default=d.config, help="the base train_dit.py config")
    p.add_argument("--mixers", nargs="+", default=list(d.mixers), choices=MIXERS)
    p.add_argument("--size", default=d.size, help='model size and patch, e.g. "S/2" ("" = the config\'s)')
    p.add_argument("--seeds", nargs="+", type=int, help="default 0 1 2 (quick: 0)")
    p.add_argument("--lrs", nargs="+", type=float, default=[], help="the lr sweep (default: config lr x 0.5, 1, 2)")
    p.add_argument("--updates", type=int, help="updates per run (default 0: the config's max_steps; quick: 4)")
    p.add_argument("--minutes", type=float, default=d.minutes,
                   help="equal wall clock: each mixer trains this many minutes at its measured time per update "
                        "(default 0: equal updates, --updates)")
    p.add_argument("--budgets", nargs="+", type=float,
                   help="fractions of the updates (default 0.25 0.5 1; quick: 0.5 1)")
    p.add_argument("--sweep-budget", type=float, help="the sweep runs this fraction of the updates (one of --budgets; "
                   "default 0.5); the chosen lr's run goes on")
    p.add_argument("--samples", type=int, help="samples per evaluation, balanced classes (default 200; quick: 10)")
    p.add_argument("--steps", type=int, help="sampler steps (default 0: the config's sample.steps; quick: 2)")
    p.add_argument("--sampler", default=d.sampler, help='"" = the config\'s sample.sampler')
    p.add_argument("--cfg-scale", type=float, default=d.cfg_scale, help="guidance of the guided evaluation")
    p.add_argument("--fid-ref", default=d.fid_ref)
    p.add_argument("--feature-extractor", default=d.feature_extractor)
    p.add_argument("--inception-weights", default=d.inception_weights)
    p.add_argument("--time-rounds", type=int, help="interleaved rounds timing the updates (default 20; quick: 2)")
    p.add_argument("--out", default="", help="the study folder (default results/study-<config name>)")
    p.add_argument("--launcher", default=sys.executable,
                   help='runs each script: "python", or e.g. "accelerate launch --num_processes 8"')
    p.add_argument("--quick", action="store_true",
                   help="1 seed, no sweep, 4 updates, 10 samples of 2 steps: the defaults; options given still win")
    p.add_argument("--retime", action="store_true",
                   help="measure the time per update again (e.g. when the first measurement was not alone)")
    p.add_argument("overrides", nargs="*", help="key=value for every train_dit.py run")
    a = p.parse_intermixed_args(argv)  # key=value before and after options
    defaults = {**dataclasses.asdict(d), **(QUICK if a.quick else {})}
    picked = {}
    for k in QUICK:  # the option given, else --quick's default, else the study's
        v = getattr(a, k)
        picked[k] = defaults[k] if v is None else tuple(v) if isinstance(v, list) else v
    study = Study(config=str(Path(a.config).resolve()), mixers=tuple(a.mixers), size=a.size, lrs=tuple(a.lrs),
                  quick=a.quick, minutes=a.minutes, sampler=a.sampler, cfg_scale=a.cfg_scale, fid_ref=a.fid_ref,
                  feature_extractor=a.feature_extractor, inception_weights=a.inception_weights,
                  overrides=tuple(a.overrides), **picked,
                  classifier_overrides=("max_steps=2", "data.num_workers=0", "data.batch_size=8") if a.quick else ())
    check_arguments(study)
    if not a.launcher.strip():
        raise ConfigError('--launcher is empty: give the command that runs a script, e.g. "python"')
    out = Path(a.out or ROOT / "results" / f"study-{Path(a.config).stem}").resolve()
    return dataclasses.replace(study, budgets=tuple(sorted(study.budgets))), out, shlex.split(a.launcher), a.retime


def check_arguments(s: Study):
    """ConfigError naming the first argument that is out of range, before anything is read or run."""
    for o in s.overrides:
        if "=" not in o:
            raise ConfigError(f"{o!r} is not key=value: overrides reach every train_dit.py run, "
                              "e.g. optim.weight_decay=0.01")
    for name, values in (("--mixers", s.mixers), ("--seeds", s.seeds), ("--lrs", s.lrs), ("--budgets", s.budgets)):
        twice = sorted({v for v in values if values.count(v) > 1})
        if twice:
            raise ConfigError(f"{name} names {', '.join(f'{v:g}' if isinstance(v, float) else str(v) for v in twice)} "
                              "twice: each value is one set of runs, give it once")
    seed_ok, seed_rule = SEED_RULE
    bad = [x for x in s.seeds if not seed_ok(x)]
    if bad:
        raise ConfigError(f"--seeds {bad[0]}: each seed must be {seed_rule}")
    if not all(math.isfinite(lr) and lr > 0 for lr in s.lrs):
        raise ConfigError(f"--lrs {' '.join(f'{lr:g}' for lr in s.lrs)}: learning rates are finite numbers > 0")
    if s.updates < 0:
        raise ConfigError(f"--updates {s.updates}: the updates per run, an integer > 0 (0 = the config's max_steps)")
    if not (math.isfinite(s.minutes) and s.minutes >= 0):
        raise ConfigError(f"--minutes {s.minutes:g}: the training minutes of each mixer, a number > 0 (0 = equal "
                          "updates instead)")
    if not all(0 < b <= 1 for b in s.budgets):
        raise ConfigError("--budgets are fractions of the updates in (0, 1], e.g. 0.25 0.5 1")
    if s.sweep_budget not in s.budgets:
        raise ConfigError(f"--sweep-budget {s.sweep_budget:g} must be one of --budgets "
                          f"{' '.join(f'{b:g}' for b in s.budgets)}: its evaluation picks the lr")
    if s.cfg_scale < 1 or not math.isfinite(s.cfg_scale):
        raise ConfigError("--cfg-scale is the guided evaluation's guidance, a finite number >= 1")
    for option, value, least, what in (("--samples", s.samples, 4, "samples per evaluation (precision and recall)"),
                                       ("--steps", s.steps, 0, "sampler steps (0 = the config's sample.steps)"),
                                       ("--time-rounds", s.time_rounds, 1, "rounds timing the updates")):
        if value < least:
            raise ConfigError(f"{option} {value}: the {what}, an integer >= {least}")


def study_config(study: Study) -> dict:
    """The base config with the study's key=value overrides applied, read and checked by train_dit.py's own parser
    (an unknown key or a bad value: its ConfigError), as every run will see it."""
    import train_dit
    from vit3.engine import config_to_dict

    return config_to_dict(train_dit.parse_config(["--config", study.config, *study.overrides])[0])


def demo(study: Study) -> str:
    """The config's built-in demo data (digits, glyphs), or "" for data of the user's."""
    return study_config(study).get("data", {}).get("demo") or ""


def demo_root(study: Study) -> Path:
    """The demo's folder (train/ and val/) that train_dit.py writes and trains on for the study's config."""
    import train_dit

    return Path(train_dit.resolve_data(train_dit.parse_config(["--config", study.config, *study.overrides])[0]).path
                ).parent


def accuracy_key(study: Study) -> str:
    """The class accuracy of samples sample.py reports for the study: the digits' SVC's, a judge's, or none ("")."""
    data = demo(study)
    return JUDGES[data][2] if data else "class_accuracy" if study.feature_extractor else ""


def resolve(study: Study) -> Study:
    """Fill the defaults that come from the config: size, updates, the lr sweep, the digits' reference."""
    cfg = study_config(study)
    size = study.size or cfg.get("model", {}).get("name", "DiT3-B/2").rsplit("-", 1)[1]
    updates = study.updates or int(cfg.get("max_steps", 400_000))
    lr = float(cfg.get("optim", {}).get("lr", 1e-4))
    fid_ref = study.fid_ref
    if not fid_ref:
        if not demo(study):
            raise ConfigError("--fid-ref is needed (an image folder or .npz of held-out real images): "
                              "only the built-in demos (data.demo) bring their own")
        fid_ref = str(demo_root(study) / "val")
    lrs = study.lrs or ((lr,) if study.quick else (lr / 2, lr, lr * 2))
    sample = cfg.get("sample", {})
    return dataclasses.replace(study, size=size, updates=updates, lrs=lrs, fid_ref=fid_ref,
                               steps=study.steps or int(sample.get("steps", 50)),
                               sampler=study.sampler or sample.get("sampler", ""))


def check_runs(study: Study, given: Study, out: Path):
    """Every train_dit.py run and sample.py evaluation the study will start, its arguments read and checked in this
    process by the script's own parser (ConfigError, exit code 2), before the study's first work."""
    import sample
    import train_dit
    from vit3.engine import config_to_dict

    # --minutes: each mixer's updates are a multiple of the budgets' quantum, whatever max_steps says
    updates = budget_quantum(study) if study.minutes else study.updates
    for mixer in study.mixers:
        for lr in study.lrs:
            for seed in study.seeds:
                cfg, _ = train_dit.parse_config(train_args(study, out, mixer, lr, seed, updates, updates))
                # the model name and its patch against the image size (a latent run also divides by the VAE's 8)
                train_dit.model_input(cfg, 1, 3)
    run = out / "runs" / run_name(study.mixers[-1], study.lrs[-1], study.seeds[-1])
    for guidance in dict.fromkeys((1.0, study.cfg_scale)):
        args = sample.parse_args(sample_args(study, run, study.updates, guidance, classifier=""))
        sample.resolve_objective(args, config_to_dict(cfg))  # the sampler and its steps fit the runs' objective
    # the files the user named (the digits' reference and classifier are written by the study)
    sample.check_metric_inputs(dataclasses.replace(args, fid_ref=given.fid_ref,
                                                   feature_extractor=given.feature_extractor))


def check_spec(study: Study, out: Path):
    """study.json holds the spec the study started with; a rerun must ask for the same study, or for the same
    with more seeds after the old ones (each seed's runs stand alone, so the study grows by those runs), more
    lrs (the sweep grows by their runs; the seeds train at the lr it then chooses, the old ones kept) or whole
    multiples of its minutes (`minutes_grow`: every run trains on). Written
    at every start, after every check: a refused command records nothing, and a folder that cannot be written
    is found before any work (WriteError, exit code 5)."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file: the study writes a folder there; give a new folder or a study's")
    path = out / "study.json"
    spec = json.loads(json.dumps(dataclasses.asdict(study)))  # tuples as lists, as read back
    if path.is_file():
        old = json.loads(path.read_text())
        changed = sorted(k for k in spec if old.get(k) != spec[k])
        grows = {"seeds": spec["seeds"][:len(old["seeds"])] == old["seeds"],
                 "lrs": set(old["lrs"]) <= set(spec["lrs"])}
        if "minutes" in changed:
            grows["minutes"] = grows["sweep_budget"] = minutes_grow(study, old)
        if changed and all(grows.get(k) for k in changed):
            for k in (k for k in changed if k in ("seeds", "lrs")):
                print(f"study: adding {k} {[v for v in spec[k] if v not in old[k]]} to {out}", flush=True)
            if "minutes" in changed:
                print(f"study: growing {out} from {old['minutes']:g} to {study.minutes:g} minutes: every run goes "
                      "on from its last checkpoint", flush=True)
                state = State(out)
                if "updates" in state.data and "updates_minutes" not in state.data:
                    # a state.json from before studies could grow: its updates are the old minutes' (main grows them)
                    state.set("updates_minutes", old["minutes"])
        elif changed:
            raise ConfigError(f"{out} holds a study with other settings ({', '.join(changed)}: "
                              + "; ".join(f"{k} {old.get(k)} -> {spec[k]}" for k in changed)
                              + "). Rerun it with its own settings (more --seeds may follow the old ones, more "
                              "--lrs extend the sweep, --minutes x k with --sweep-budget / k trains every run on), "
                              "or give a new --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(spec, indent=2))
    except OSError as e:
        raise WriteError(f"cannot write the study into {out} ({e.strerror or e}): give an --out that can be "
                         "written") from None


def minutes_grow(study: Study, old: dict) -> bool:
    """Whether a study of spec `old` may grow to study.minutes: by a whole factor k, the sweep keeping
    its minutes (--sweep-budget / k) and the budgets the same, so every run goes on from its last checkpoint to
    k x its updates (a constant-lr run stopped early is the prefix of the longer one), and each budget step the
    old runs passed is k x an old budget step: one of their checkpoints. ConfigError naming the rule broken."""
    k = study.minutes / old["minutes"] if old["minutes"] else 0.0
    if not (k > 1 and abs(k - round(k)) < 1e-9):
        if old["minutes"] and study.minutes > old["minutes"]:
            raise ConfigError(f"--minutes {old['minutes']:g} -> {study.minutes:g}: a study's minutes grow by a "
                              f"whole factor (--minutes {2 * old['minutes']:g}, {3 * old['minutes']:g}, ...), so "
                              "that its runs' checkpoints stay on the budgets")
        return False
    k = round(k)
    if len(old["lrs"]) > 1 and abs(study.sweep_budget * k - old["sweep_budget"]) > 1e-9:
        raise ConfigError(f"--minutes {old['minutes']:g} -> {study.minutes:g} keeps the sweep's runs as they are: "
                          f"give --sweep-budget {old['sweep_budget'] / k:g} (the old {old['sweep_budget']:g} / {k}), "
                          f"one of the --budgets")
    return True


# ----------------------------------------------------------------------------------------
# Running the scripts
# ----------------------------------------------------------------------------------------
class State:
    """state.json: seconds spent per evaluation and on the classifier, summed over reruns (a training run's
    are in its own folder: RunClock), and the time per update."""

    def __init__(self, out: Path):
        self.path = out / "state.json"
        self.data = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def add_seconds(self, key: str, seconds: float):
        self.data.setdefault("seconds", {})[key] = self.data.get("seconds", {}).get(key, 0.0) + seconds
        atomic_write_text(self.path, json.dumps(self.data, indent=2))

    def set(self, key: str, value):
        self.data[key] = value
        atomic_write_text(self.path, json.dumps(self.data, indent=2))


def run_name(mixer: str, lr: float, seed: int) -> str:
    return f"{mixer}-lr{lr:g}-s{seed}"


MAX_CHECKPOINTS = 64  # a run's checkpoints, one every gcd of its budget steps: more is a disk filled


def budget_quantum(study: Study) -> int:
    """The least number of updates of which every budget is a whole share (0.25 0.5 1: 4; 1/3 2/3 1: 3)."""
    return math.lcm(*(Fraction(b).limit_denominator(1000).denominator for b in study.budgets))


def mixer_updates(study: Study, update_ms: dict) -> dict:
    """mixer -> its updates: study.updates each, or (--minutes) the updates that fit the minutes at its measured
    ms per update, to the nearest multiple of the budgets' quantum: its budget checkpoints then fall on a
    common interval (4607 updates at budgets 0.25 0.5 1 would have a checkpoint at every update)."""
    if not study.minutes:
        return {m: study.updates for m in study.mixers}
    q = budget_quantum(study)
    return {m: q * max(1, round(study.minutes * 60e3 / update_ms[m] / q)) for m in study.mixers}


def budget_steps(study: Study, updates: int | None = None) -> list[int]:
    """The checkpoints evaluated: each budget's share of `updates` (default: study.updates)."""
    return [max(1, round(b * (updates or study.updates))) for b in study.budgets]


def checkpoint_every(study: Study, updates: int | None = None) -> int:
    """The checkpoint interval that lands on every budget step; ConfigError where it would save more than
    MAX_CHECKPOINTS checkpoints a run (--updates 1501 at budgets 0.25 0.5 1: one every update)."""
    updates = updates or study.updates
    every = math.gcd(*budget_steps(study, updates))
    if updates // every > MAX_CHECKPOINTS:
        raise ConfigError(f"--updates {updates} with --budgets {' '.join(f'{b:g}' for b in study.budgets)}: the "
                          f"budgets' checkpoints fall every {every} updates, {updates // every} checkpoints a run; "
                          f"give --updates a multiple of {budget_quantum(study)}")
    return every


def train_args(study: Study, out: Path, mixer: str, lr: float, seed: int, upto: int,
               updates: int | None = None) -> list[str]:
    """train_dit.py's arguments for one run to `upto` of the mixer's `updates` (default study.updates): a
    checkpoint at each budget (`check_runs` reads them before the first run)."""
    return ["--config", study.config, *study.overrides, f"output_dir={out / 'runs'}",
            f"run_name={run_name(mixer, lr, seed)}", f"model.name={mixer}-{study.size}", f"optim.lr={lr}",
            f"seed={seed}", f"max_steps={upto}", f"checkpoint.every_steps={checkpoint_every(study, updates)}",
            "checkpoint.keep_last=0", "resume=auto", "sample.every=0", "sample.digits_per_class=0",
            "sample.fid_every=0", "log.progress=false"]


def train(study: Study, out: Path, launcher: list[str], mixer: str, lr: float, seed: int, upto: int,
          updates: int, label: str) -> Path:
    """One train_dit.py run to update `upto`, with a checkpoint at every budget; a killed or shorter run of
    the same name is resumed (resume=auto: a constant-lr run stopped early is the prefix of the longer one)."""
    name = run_name(mixer, lr, seed)
    run = out / "runs" / name
    if (run / "checkpoints" / f"step-{upto:08d}").is_dir():
        print(f"{label} {name}: {upto} updates done before", flush=True)
        return run
    print(f"{label} {name}: training to {upto} updates", flush=True)
    cmd = [*launcher, str(ROOT / "train_dit.py"), *train_args(study, out, mixer, lr, seed, upto, updates)]
    seconds = run_script(cmd, out / "logs" / f"{name}.log", f"training {name}", echo="(step ", clock=RunClock(run))
    print(f"{label} {name}: done in {seconds / 60:.1f} min", flush=True)
    return run


def eval_folder(run: Path, step: int, cfg_scale: float) -> Path:
    return run.parent.parent / "evals" / run.name / f"step-{step:08d}-cfg{cfg_scale:g}"


def sample_args(study: Study, run: Path, step: int, cfg_scale: float, classifier: str) -> list[str]:
    """sample.py's arguments for one evaluation (`check_runs` reads them before the first run)."""
    args = ["--ckpt", str(run / "checkpoints" / f"step-{step:08d}"), "--num-samples", str(study.samples),
            "--steps", str(study.steps), "--cfg-scale", str(cfg_scale), "--out", str(eval_folder(run, step, cfg_scale)),
            "--fid-ref", study.fid_ref]
    args += ["--sampler", study.sampler] if study.sampler else []
    args += ["--feature-extractor", classifier] if classifier else []
    args += ["--inception-weights", study.inception_weights] if study.inception_weights else []
    args += {"digits_accuracy": ["--digits-accuracy"], "class_accuracy": ["--class-accuracy"], "": []}[
        accuracy_key(study)]
    threads = study_config(study).get("threads", 0)
    return args + (["--threads", str(threads)] if threads else [])  # as the runs: torch's default can oversubscribe


def evaluate(study: Study, out: Path, launcher: list[str], run: Path, step: int, cfg_scale: float,
             classifier: str) -> dict:
    """sample.py on one checkpoint at one guidance: FID / precision / recall (and the class accuracy)."""
    folder = eval_folder(run, step, cfg_scale)
    key = accuracy_key(study)
    wanted = [FID, "precision", "recall"] + ([key] if key else [])
    metrics_file = folder / "metrics.json"
    if metrics_file.is_file() and all(k in json.loads(metrics_file.read_text()) for k in wanted):
        return json.loads(metrics_file.read_text())
    cmd = [*launcher, str(ROOT / "sample.py"), *sample_args(study, run, step, cfg_scale, classifier)]
    seconds = run_script(cmd, out / "logs" / f"{run.name}-eval.log", f"evaluating {folder.name} of {run.name}")
    State(out).add_seconds(f"eval/{run.name}/{step}/cfg{cfg_scale:g}", seconds)
    metrics = json.loads(metrics_file.read_text())
    acc = f", {'SVC' if key == 'digits_accuracy' else 'judge'} {100 * metrics[key]:.1f}%" if key else ""
    print(f"    step {step}, guidance {cfg_scale:g}: FID {metrics[FID]:.3f}, precision {metrics['precision']:.2f}, "
          f"recall {metrics['recall']:.2f}{acc} ({seconds:.0f} s)", flush=True)
    return metrics


def evaluate_run(study: Study, out: Path, launcher: list[str], run: Path, classifier: str,
                 steps: list[int]) -> dict:
    return {step: {f"cfg{g:g}": evaluate(study, out, launcher, run, step, g, classifier)
                   for g in dict.fromkeys((1.0, study.cfg_scale))} for step in steps}


def judge_data(study: Study, size: int) -> Path:
    """The demo's real images (train/, val/) at the judge's `size`: the study's own folder at its size, else the
    folder beside it that train_dit.py would write at that size (~/.cache/vit3/glyphs32 beside .../glyphs64)."""
    from vit3.digits import prepare_demo_folder

    root = demo_root(study)
    if int(study_config(study)["model"]["image_size"]) == size:
        return root
    return prepare_demo_folder(demo(study), root.parent / f"{demo(study)}{size}", size)


def judge_top1(folder: Path) -> float | None:
    """The val top-1 (%) of a judge trained by train_vit.py, EMA weights (as the extractor loads them), last epoch."""
    path = folder / "metrics.jsonl"
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []
    tops = [x.get("val_ema/top1", x.get("val/top1")) for x in lines if "val/top1" in x]
    return tops[-1] if tops else None


def train_classifier(study: Study, out: Path, launcher: list[str]) -> str:
    """The demo's judge (JUDGES) trained into out/classifier once, unless --feature-extractor names one."""
    if study.feature_extractor or not demo(study):
        return study.feature_extractor
    folder = out / "classifier"
    state = State(out)
    if state.data.get("classifier_done"):
        return str(folder)
    config, size, _ = JUDGES[demo(study)]
    size = size or int(study_config(study)["model"]["image_size"])
    print(f"classifier: the ViT³ {demo(study)} judge (configs/{config}, {size} px) into {folder}", flush=True)
    cmd = [*launcher, str(ROOT / "train_vit.py"), "--config", str(ROOT / "configs" / config),
           f"output_dir={out}", "run_name=classifier", "resume=auto", "log.progress=false",
           f"model.img_size={size}", f"data.path={judge_data(study, size)}", *study.classifier_overrides]
    seconds = run_script(cmd, out / "logs" / "classifier.log", "training the classifier")
    state.add_seconds("classifier", seconds)
    state.set("classifier_done", True)
    return str(folder)


# ----------------------------------------------------------------------------------------
# Time per update, alone
# ----------------------------------------------------------------------------------------
def time_updates(study: Study, out: Path, again: bool = False) -> dict:
    """Median ms per training update of each mixer at the study's config, interleaved in this process."""
    from bench_small import median_ms, update_step

    state = State(out)
    if not again and set(state.data.get("update_ms", {})) >= set(study.mixers):
        return state.data["update_ms"]
    cfg = study_config(study)
    print(f"timing one update of each mixer ({study.time_rounds} interleaved rounds, this process alone)",
          flush=True)
    steps = {m: update_step(cfg, f"{m}-{study.size}") for m in study.mixers}
    ms = median_ms(steps, study.time_rounds)
    print("    " + ", ".join(f"{m} {v:.1f} ms" for m, v in ms.items()), flush=True)
    state.set("update_ms", ms)
    return ms


# ----------------------------------------------------------------------------------------
# The study
# ----------------------------------------------------------------------------------------
def prepare(argv=None) -> tuple[Study, Path, list[str], bool]:
    """The study argv asks for, every argument and every run's and evaluation's arguments checked, then its spec
    recorded: a refused command (ConfigError, exit code 2) leaves nothing behind, so the corrected one is
    accepted in the same folder."""
    given, out, launcher, retime = parse_args(argv)
    study = resolve(given)
    check_runs(study, given, out)
    check_spec(study, out)
    return study, out, launcher, retime


def main(argv=None) -> Path:
    study, out, launcher, retime = prepare(argv)
    budget = f"{study.minutes:g} minutes each" if study.minutes else f"{study.updates} updates"
    print(f"study: {', '.join(study.mixers)} at {study.size}, seeds {list(study.seeds)}, lrs "
          f"{[f'{lr:g}' for lr in study.lrs]}, {budget}, evaluated at {list(study.budgets)} of it "
          f"({study.samples} samples, {study.steps} steps, guidance 1 and {study.cfg_scale:g}) -> {out}", flush=True)
    update_ms, state = time_updates(study, out, again=retime), State(out)
    # the runs' lengths are fixed at the first start (a --retime changes the report's minutes, not the runs) and
    # grow with the minutes by their whole factor (check_spec)
    updates = state.data.get("updates") or mixer_updates(study, update_ms)
    grown = study.minutes / state.data.get("updates_minutes", study.minutes) if study.minutes else 1
    state.data["updates_minutes"] = study.minutes
    state.set("updates", {m: round(n * grown) for m, n in updates.items()})
    updates = state.data["updates"]
    if study.minutes:
        print("    updates in the minutes: " + ", ".join(f"{m} {n}" for m, n in updates.items()), flush=True)
    classifier = train_classifier(study, out, launcher)
    sweep_at = {m: budget_steps(study, updates[m])[study.budgets.index(study.sweep_budget)] for m in study.mixers}
    sweeping = len(study.lrs) > 1
    total = len(study.mixers) * (len(study.lrs) * sweeping + len(study.seeds))
    k = 0
    sweep = {}  # mixer -> lr -> the evaluation at the sweep budget of its seed-0 run
    if sweeping:
        for lr in study.lrs:  # lr outermost: a partial sweep already compares the mixers
            for mixer in study.mixers:
                k += 1
                run = train(study, out, launcher, mixer, lr, study.seeds[0], sweep_at[mixer], updates[mixer],
                            f"[run {k}/{total}]")
                sweep.setdefault(mixer, {})[lr] = evaluate_run(study, out, launcher, run, classifier,
                                                               [sweep_at[mixer]])[sweep_at[mixer]]
        print(f"chosen lr (lowest unguided FID at {study.sweep_budget:g} of the budget, seed {study.seeds[0]}): "
              + ", ".join(f"{m} {choose_lr(sweep[m]):g}" for m in study.mixers), flush=True)
        for m in study.mixers:
            if choose_lr(sweep[m]) in (min(study.lrs), max(study.lrs)):
                print(f"    {m}'s best lr {choose_lr(sweep[m]):g} is at the edge of the sweep: the same command "
                      "with more --lrs, past it, extends the sweep", flush=True)
    chosen = {m: choose_lr(sweep[m]) if sweeping else study.lrs[0] for m in study.mixers}
    runs = []
    judge = {"path": classifier, "val_top1": judge_top1(Path(classifier))} if classifier else None
    for seed in study.seeds:  # seed outermost: a partial study already compares the mixers
        for mixer in study.mixers:
            k += 1  # the chosen sweep run goes on from the sweep budget
            run = train(study, out, launcher, mixer, chosen[mixer], seed, updates[mixer], updates[mixer],
                        f"[run {k}/{total}]")
            steps = budget_steps(study, updates[mixer])
            print(f"evaluating {run.name} at {steps}", flush=True)
            runs.append({"mixer": mixer, "lr": chosen[mixer], "seed": seed, "run": str(run),
                         "evals": evaluate_run(study, out, launcher, run, classifier, steps)})
        # reported at every finished seed: a study of hours has its partial results on disk as they come
        report = write_report(study, out, runs, sweep, chosen, State(out).data, updates, judge)
        print(f"study: {'done' if seed == study.seeds[-1] else f'seed {seed} done'}; {report}", flush=True)
    return out


if __name__ == "__main__":
    from vit3.engine.script import run_script as script_main

    script_main(main)
