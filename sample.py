"""Sample a trained DiT³ run: a PNG grid, or many samples (PNG files + an ADM-style .npz) and their FID.

    python sample.py --ckpt results/000-dit3_b2_in256 --classes 207 360 387 974 --cfg-scale 4.0 --seed 0
    accelerate launch sample.py --ckpt RUN --num-samples 50000 --cfg-scale 1.0 --out samples/dit3-b2
    python sample.py --ckpt RUN --num-samples 50000 --out DIR --fid-ref /data/imagenet256-val
    python sample.py --ckpt results/000-dit3_demo --num-samples 1000 --out DIR --digits-accuracy
    python sample.py --ckpt RUN --num-samples 1000 --out DIR --fid-ref REAL --feature-extractor VIT_RUN --class-accuracy
    python sample.py --ckpt DiTTT-B-2.pt --classes 207 360 --vae /models/sd-vae-ft-ema   # official release file
    python sample.py --ckpt RUN --export dit3-pipeline [--push-to-hub user/dit3-b2]   # a DiT3Pipeline folder
    python sample.py --ckpt FLOW_RUN --classes 207 360 --sampler heun --steps 50   # a flow run: ODE / SDE samplers
    python sample.py --help                     # every option, its default, what it does

Options are written `--key value`, `--key=value` or `key=value` (the trainers' style); `--config FILE`
takes them from a yaml file.

The model (its diffusers config), the VAE and its scale come from the checkpoint, so no model
flag is repeated; the EMA weights are used unless --no-ema. A run folder means its newest
checkpoint. Official DiT³ / DiT .pt files work too: their `args` name the model (DiT's bare
weight files need --model and --image-size).

The objective comes from the checkpoint too: a DDPM run samples with ddpm, ddim or dpm, a flow-matching
run (train_dit.py objective=flow) with euler, heun, dopri5 (ODE), sde-euler or sde-heun (SDE), its flow
settings the defaults of the flow options; the default --sampler is the one the run drew its grids with.

Bulk mode is distributed and resumable. Sample i is drawn from its own noise (seeded by
(seed, i)) with its class (i mod classes when balanced, else drawn from (seed, i)), in the fixed
batch i // batch_size; process r draws batches r, r + R, ... So the images, and the .npz, are the
same whatever the number of processes, and a restarted job skips the batches already on disk.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import parse_flag_from_env
from tqdm.auto import tqdm

from dit3.flow import DIFFUSION_FORMS, LAST_STEPS, FlowScheduler, flow_scheduler
from dit3.latents import load_vae, vae_downsample
from dit3.sampling import FLOW_SAMPLERS, SAMPLERS, sample_images, sample_seed, save_grid, save_pngs, to_uint8
from dit3.weights import load_dit3
from vit3 import engine
from vit3.engine import ConfigError, WriteError
from vit3.ttt.dispatch import forced_impl


@dataclasses.dataclass
class SampleConfig:
    ckpt: str = ""  # a run folder (its newest checkpoint), a checkpoints/step-N folder, or an official .pt
    ema: bool = True  # the EMA weights (--no-ema: the trained ones)
    # only for official DiT³ / DiT .pt files, and only where the file does not say (DiT's bare EMA weights)
    model: str = ""  # official file: model name (DiT3-B/2 or the official DiTTT-B/2)
    image_size: int = 0  # official file: image size (256)
    num_classes: int = 0  # official file: classes (1000)
    vae: str = ""  # VAE folder or hub name, instead of the one the run trained with
    # "" = the run's (its grids'); DDPM runs: ddpm (DiT's, respaced), ddim, dpm (DPM-Solver++);
    # flow runs: euler, heun, dopri5 (ODE), sde-euler, sde-heun (SDE)
    sampler: str = ""
    steps: int = 250  # sampling steps (flow: SiT's grid points, steps - 1 steps; dopri5 takes its own)
    cfg_scale: float = 4.0  # classifier-free guidance scale; 1 (or anything up to 1, as DiT and diffusers) = none
    cfg_channels: int | None = None  # guide only these leading channels (DiT: 3); None = all of epsilon
    cfg_interval: tuple[float, float] | None = None  # guide only at timesteps t / 1000 (flow: 1 - t) in [LO, HI]
    # flow runs only, None = the run's (train_dit.py's flow section): the fixed-step grids' timestep shift (SD3)
    shift: float | None = None
    diffusion_form: str | None = None  # flow SDE: w(t) = sigma, SBDM, constant, linear, ...; None = the run's
    diffusion_norm: float | None = None  # flow SDE: the scale of w(t); None = the run's
    last_step: str | None = None  # flow SDE: the last step to t = 1: mean, tweedie, euler, none; None = the run's
    last_step_size: float | None = None  # flow SDE: its size; None = the run's
    atol: float | None = None  # flow dopri5: absolute tolerance; None = the run's
    rtol: float | None = None  # flow dopri5: relative tolerance; None = the run's
    seed: int = 0
    # samples per network call. Each sample has its own noise, but bulk mode keeps it on a restart: float
    # rounding can follow the batch's shape, and dopri5 picks its steps for the whole batch
    batch_size: int = 32
    mixed_precision: str = "no"  # no | bf16 | fp16
    threads: int = 0  # torch intra-op threads per process (CPU sampling); 0 = torch's default
    classes: list[int] | None = None  # grid mode: one column per class
    per_class: int = 1  # grid mode: rows
    num_samples: int = 0  # bulk mode: how many samples
    labels: str = "balanced"  # bulk mode: balanced (i mod classes) or random (drawn from (seed, i))
    out: str = ""  # grid: the PNG (default in the run's samples/); bulk: a folder
    fid_ref: str = ""  # bulk mode: FID/IS/KID/precision/recall against an image folder, an ADM .npz or a stats .npz
    inception_weights: str = ""  # local InceptionV3 weights for torch-fidelity
    feature_extractor: str = ""  # a train_vit.py run or checkpoint whose features replace Inception's (domain FID)
    save_ref_stats: str = ""  # write the reference's mu / sigma to this .npz
    digits_accuracy: bool = False  # digits demo: the share of samples an SVC trained on the real digits labels as asked
    class_accuracy: bool = False  # the share of samples the --feature-extractor classifier labels as the class asked
    export: str = ""  # write a DiT3Pipeline folder: EMA transformer, the sampler's scheduler, VAE, id2label
    push_to_hub: str = ""  # with export: upload the folder to this hub repo


FLAGS = {"--no-ema": "ema=false"}
POSITIVE = (lambda v: v is None or v > 0, "a positive number, or None for the run's")
RULES = {  # accepted values, checked before anything is loaded
    "sampler": engine.one_of("", *SAMPLERS, *FLOW_SAMPLERS),
    "shift": POSITIVE,
    "diffusion_form": (lambda v: v is None or v in DIFFUSION_FORMS, "one of " + ", ".join(DIFFUSION_FORMS)),
    "diffusion_norm": (lambda v: v is None or v >= 0, ">= 0, or None for the run's"),
    "last_step": (lambda v: v is None or v in LAST_STEPS, "one of " + ", ".join(LAST_STEPS)),
    "last_step_size": (lambda v: v is None or 0 <= v < 0.5, "a number in [0, 0.5), or None for the run's"),
    "atol": POSITIVE,
    "rtol": POSITIVE,
    "steps": engine.between(1, 1000, "an integer from 1 to 1000 (the diffusion chain has 1000 steps)"),
    "cfg_scale": engine.at_least(0.0, ">= 0 (1 or less: no guidance, as in DiT and diffusers)"),
    "cfg_channels": (lambda v: v is None or v >= 1, "an integer >= 1, or None for every channel of epsilon"),
    "cfg_interval": (lambda v: v is None or 0 <= v[0] <= v[1] <= 1, "two numbers LO <= HI in [0, 1], or None"),
    "seed": engine.SEED_RULE,
    "batch_size": engine.at_least(1),
    "mixed_precision": engine.one_of("no", "bf16", "fp16"),
    "threads": engine.at_least(0),
    "classes": (lambda v: v is None or len(v) > 0, "at least one class id"),
    "per_class": engine.at_least(1),
    "num_samples": engine.at_least(0),
    "labels": engine.one_of("balanced", "random"),
    "image_size": engine.at_least(0),
    "num_classes": engine.at_least(0),
}


def parse_args(argv=None) -> SampleConfig:
    args, _ = engine.load_config(SampleConfig, argv, flags=FLAGS, usage=__doc__.split("\n\n")[1])
    if not args.ckpt:
        raise ConfigError("--ckpt is required: a run folder, a checkpoints/step-N folder or an official .pt file")
    engine.check_values(args, RULES)
    return args


def check_metric_inputs(args: SampleConfig):
    """ConfigError for a metrics input that is not there (benchmarks/study.py checks its own with this)."""
    if args.fid_ref and not Path(args.fid_ref).exists():
        raise ConfigError(f"--fid-ref {args.fid_ref} does not exist: pass an image folder, an ADM-style .npz "
                          "(arr_0) or a statistics .npz (mu, sigma)")
    if args.inception_weights and not Path(args.inception_weights).is_file():
        raise ConfigError(f"--inception-weights {args.inception_weights} does not exist")
    if args.feature_extractor and not Path(args.feature_extractor).exists():
        raise ConfigError(f"--feature-extractor {args.feature_extractor} does not exist: pass a train_vit.py run "
                          "folder or checkpoint")


def check_judge(args: SampleConfig, num_classes: int):
    """ConfigError unless --class-accuracy has a classifier of the model's classes to judge with."""
    if not args.class_accuracy:
        return
    from dit3.evaluation import classifier_checkpoint

    if not args.feature_extractor or not args.num_samples:
        raise ConfigError("--class-accuracy judges bulk samples with the --feature-extractor classifier: give "
                          "--num-samples N --out DIR --feature-extractor RUN (a train_vit.py run on the same classes)")
    try:
        _, mc = classifier_checkpoint(args.feature_extractor)
    except FileNotFoundError as e:
        raise ConfigError(f"--feature-extractor: {e}") from None
    if mc["num_classes"] != num_classes:
        raise ConfigError(f"--class-accuracy: the classifier {args.feature_extractor} has {mc['num_classes']} classes, "
                          f"the model {num_classes}: judge with a classifier trained on the model's classes")


# ----------------------------------------------------------------------------------------
# Loading a checkpoint
# ----------------------------------------------------------------------------------------
def resolve_checkpoint(path: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(f"--ckpt {path} does not exist: pass a run folder or a checkpoints/step-N folder")
    if p.is_file() and p.suffix in (".pt", ".pth"):  # an official DiT³ / DiT release file
        return p
    if (p / "checkpoints").is_dir():
        latest = engine.find_latest_checkpoint(p / "checkpoints")
        if latest is None:
            raise ConfigError(f"--ckpt {path}: the run folder has no complete checkpoint")
        return latest
    if not (p / "trainer_state.json").is_file():
        raise ConfigError(f"--ckpt {path} is not a checkpoint (no trainer_state.json): pass a run folder, "
                          "a checkpoints/step-N folder written by train_dit.py, or an official .pt file")
    reason = engine.verify_checkpoint(p)
    if reason:
        raise ConfigError(f"checkpoint {p} is damaged ({reason}): pass an older one, or the run folder to take "
                          "its newest usable checkpoint")
    return p


def load_run(ckpt: Path, args: SampleConfig, device):
    """(model in eval mode, VAE or None, latent scale, training config) of a checkpoint or official file."""
    vae = load_vae(args.vae, device) if args.vae else None
    # official files only: the model's flags where the file does not say, and the latent shape of --vae
    official = dict(model_name=args.model or None, image_size=args.image_size or None,
                    num_classes=args.num_classes or None)
    if vae is not None:
        official.update(in_channels=vae.config.latent_channels, downsample=vae_downsample(vae))
    model, config = load_dit3(ckpt, ema=args.ema, **official)
    if vae is None and config["vae"]["name"]:
        vae = load_vae(config["vae"]["name"], device)
    return model.to(device).eval(), vae, config["vae"]["scale"], config


FLOW_OPTIONS = ("shift", "diffusion_form", "diffusion_norm", "last_step", "last_step_size", "atol", "rtol")


def resolve_objective(args: SampleConfig, config: dict) -> tuple[SampleConfig, FlowScheduler | None]:
    """(args with the sampler resolved, the run's FlowScheduler or None) for the checkpoint's objective;
    ConfigError for a sampler or option of the other objective."""
    objective = config.get("objective", "ddpm")  # official files and runs before flow matching: DDPM
    sampler = args.sampler or config.get("sample", {}).get("sampler") or "ddpm"
    fits = FLOW_SAMPLERS if objective == "flow" else SAMPLERS
    if sampler not in fits:
        raise ConfigError(f"--sampler {sampler} does not sample this checkpoint: it was trained with "
                          f"objective={objective}; choose one of {', '.join(fits)}")
    if objective != "flow":
        given = [f"--{k.replace('_', '-')}" for k in FLOW_OPTIONS if getattr(args, k) is not None]
        if given:
            raise ConfigError(f"{', '.join(given)}: flow-matching options, and this checkpoint is a DDPM run")
        return dataclasses.replace(args, sampler=sampler), None
    if sampler != "dopri5" and args.steps < 2:
        raise ConfigError(f"steps={args.steps}: a flow sampler's grid needs at least 2 points (t0 and t1)")
    try:
        flow = flow_scheduler(config["flow"], sampler, **{k: getattr(args, k) for k in FLOW_OPTIONS})
    except ValueError as e:  # settings where the sampler divides by zero
        raise ConfigError(str(e)) from None
    return dataclasses.replace(args, sampler=sampler), flow


# ----------------------------------------------------------------------------------------
# Drawing
# ----------------------------------------------------------------------------------------
def labels_for(indices: list[int], num_classes: int, mode: str, seed: int) -> list[int]:
    if mode == "balanced":
        return [i % num_classes for i in indices]
    return [int(torch.randint(0, num_classes, (), generator=torch.Generator().manual_seed(sample_seed(seed, i, 1))))
            for i in indices]


def draw_images(model, vae, scale, labels: list[int], seeds: list[int], args, device, flow=None) -> torch.Tensor:
    """Images [B, 3, H, W] in [-1, 1] for these labels and per-sample seeds (flow: a flow run's FlowScheduler)."""
    cfg = model.config
    size = (cfg.input_size, cfg.input_size) if isinstance(cfg.input_size, int) else tuple(cfg.input_size)
    autocast = None
    if args.mixed_precision != "no":
        dtype = torch.bfloat16 if args.mixed_precision == "bf16" else torch.float16
        autocast = lambda: torch.autocast(torch.device(device).type, dtype=dtype)  # noqa: E731
    return sample_images(model, torch.tensor(labels, device=device), (cfg.in_channels, *size), vae, scale,
                         sampler=args.sampler, num_steps=args.steps, cfg_scale=args.cfg_scale,
                         cfg_channels=args.cfg_channels,
                         cfg_interval=tuple(args.cfg_interval) if args.cfg_interval else None,
                         generator=[torch.Generator().manual_seed(s) for s in seeds], autocast=autocast, flow=flow)


def flow_settings(flow: FlowScheduler | None) -> dict | None:
    """A flow run's sampling settings as spec.json and info.json record them."""
    return None if flow is None else {k: v for k, v in flow.config.items() if not k.startswith("_")}


def save_npz(path: Path, arr: np.ndarray):
    """arr_0 in an .npz (np.load-compatible), byte-reproducible (fixed zip timestamps), written atomically."""
    with engine.atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED,
                                                          allowZip64=True) as zf:
        info = zipfile.ZipInfo("arr_0.npy", date_time=(1980, 1, 1, 0, 0, 0))
        with zf.open(info, "w", force_zip64=True) as f:
            np.lib.format.write_array(f, np.ascontiguousarray(arr), allow_pickle=False)


def read_images(folder: Path, n: int) -> np.ndarray:
    from PIL import Image

    return np.stack([np.asarray(Image.open(folder / f"{i:06d}.png").convert("RGB")) for i in range(n)])


@contextlib.contextmanager
def writing(out: Path, what: str):
    """A failed write (disk full, quota, permissions) becomes a WriteError (exit code 5) naming the folder and
    its free space; the files are written under temporary names, so nothing partial is left under a final one."""
    try:
        yield
    except OSError as e:
        if isinstance(e, WriteError):
            raise
        if engine.is_permission_error(e):  # free space is not the fix
            raise WriteError(e.errno, f"cannot write {what} into {out}: permission denied ({e.strerror or e}); choose "
                                      "a folder this user can write (--out), or change its permissions") from None
        existing = next(p for p in (out, *out.parents) if p.exists())  # out itself may not be made yet
        free = shutil.disk_usage(existing).free / 2**30
        raise WriteError(e.errno, f"cannot write {what} into {out}: {e.strerror or e}; {free:.2f} GiB are free. "
                                  "Free space and run the same command again: it continues where it stopped") from None


def bulk(model, vae, scale, args, state: PartialState, out: Path, ckpt: Path, flow=None) -> Path:
    """Draw args.num_samples images into out/images/NNNNNN.png (resumable), then out/samples.npz."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; bulk mode writes a folder (images/, samples.npz): name a folder")
    images_dir = out / "images"
    with writing(out.parent, "the sample folder"):
        images_dir.mkdir(parents=True, exist_ok=True)
    # one sample.py per output folder: the main process takes out/.lock, every process hears if it failed
    lock = engine.on_main_process(state, lambda: engine.acquire_lock(out, "sample folder"))
    try:
        return _draw_all(model, vae, scale, args, state, out, ckpt, flow)
    finally:
        if state.is_main_process:
            engine.release_lock(lock)


def read_spec(path: Path, spec: dict) -> dict:
    """The settings recorded in a sample folder's spec.json. A damaged one (from before it was written
    atomically) is rebuilt from `spec`, with a warning, while no image is drawn; after, it is refused."""
    engine.refuse_link(path, "sample.py")
    try:
        old = json.loads(path.read_text())
        if not isinstance(old, dict):
            raise ValueError(f"a JSON {type(old).__name__}, not an object")
    except (OSError, ValueError) as e:
        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if any((path.parent / "images").glob("[0-9]*.png")):
            raise ConfigError(f"{path} is damaged ({reason}): it records the settings the images in "
                              f"{path.parent / 'images'} were drawn with. If they were drawn with these settings, "
                              "delete it and run again; else use another --out") from None
        warnings.warn(f"{path} is damaged ({reason}) and no image was drawn yet: written again from these settings",
                      stacklevel=2)
        return spec
    return old


def _draw_all(model, vae, scale, args, state: PartialState, out: Path, ckpt: Path, flow) -> Path:
    images_dir = out / "images"
    # a restart may only continue the same drawing: other settings would mix two sample sets
    spec = {"ckpt": str(ckpt.resolve()), "ema": args.ema, "sampler": args.sampler,
            "steps": args.steps, "cfg_scale": args.cfg_scale, "cfg_channels": args.cfg_channels,
            "cfg_interval": list(args.cfg_interval) if args.cfg_interval else None, "seed": args.seed,
            "labels": args.labels, "batch_size": args.batch_size, "vae": args.vae or None,
            "mixed_precision": args.mixed_precision, "flow": flow_settings(flow)}
    spec_path = out / "spec.json"
    if os.path.lexists(spec_path):
        old = read_spec(spec_path, spec)
        diff = ", ".join(f"{k}: {old.get(k)!r} -> {v!r}" for k, v in spec.items() if old.get(k) != v)
        # no image yet (the first command failed before its first batch): nothing to mix, the new settings hold
        if diff and any(images_dir.glob("[0-9]*.png")):
            raise ConfigError(f"{out} holds samples drawn with other settings ({diff}); use another --out")
    state.wait_for_everyone()
    if state.is_main_process:
        with writing(out, "spec.json"):
            engine.atomic_write_text(spec_path, json.dumps(spec, indent=2))
    if state.is_main_process:  # images a kill -9 left half-written, under temporary names
        for tmp in images_dir.glob(".*.tmp.png"):
            tmp.unlink(missing_ok=True)
    n, b = args.num_samples, args.batch_size
    batches = [list(range(k * b, min((k + 1) * b, n))) for k in range(math.ceil(n / b))]
    mine = [idx for k, idx in enumerate(batches) if k % state.num_processes == state.process_index
            and not all((images_dir / f"{i:06d}.png").is_file() for i in idx)]
    t0, done = time.time(), 0
    for idx in tqdm(mine, desc=f"sampling (process {state.process_index})", disable=not state.is_main_process):
        labels = labels_for(idx, model.num_classes, args.labels, args.seed)
        images = draw_images(model, vae, scale, labels, [sample_seed(args.seed, i) for i in idx], args, state.device,
                             flow)
        with writing(out, "sample images"):
            save_pngs(to_uint8(images).numpy(), [images_dir / f"{i:06d}.png" for i in idx])
        done += len(idx)
    state.wait_for_everyone()
    npz = out / "samples.npz"
    if state.is_main_process:
        with writing(out, "samples.npz"):
            save_npz(npz, read_images(images_dir, n))
        # the drawing's settings (spec.json's) and what it drew: "labels" lists the classes (spec.json's "labels"
        # is the mode that chose them), and how fast
        drawn = labels_for(list(range(n)), model.num_classes, args.labels, args.seed)
        info = {**spec, "num_samples": n, "labels": drawn, "processes": state.num_processes,
                "seconds_per_image_this_process": (time.time() - t0) / done if done else None}
        with writing(out, "info.json"):
            engine.atomic_write_text(out / "info.json", json.dumps(info, indent=2))
    state.wait_for_everyone()
    return npz


def main(argv=None) -> dict:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return execute(args)
    finally:
        torch.set_num_threads(threads)  # in-process callers (tests, notebooks) get theirs back


def execute(args: SampleConfig) -> dict:
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    forced_impl(state.device.type)  # a bad VIT3_TTT_IMPL: one line before any work
    ckpt = resolve_checkpoint(args.ckpt)
    model, vae, scale, config = load_run(ckpt, args, state.device)
    args, flow = resolve_objective(args, config)
    run_dir = ckpt.parent if ckpt.is_file() else ckpt.parent.parent
    for c in args.classes or []:
        if not 0 <= c < model.num_classes:
            raise ConfigError(f"class {c} is out of range: this model has classes 0 .. {model.num_classes - 1}")
    check_metric_inputs(args)
    check_judge(args, model.num_classes)
    if args.export and Path(args.export).exists() and not Path(args.export).is_dir():
        raise ConfigError(f"--export {args.export} is a file; the export is a folder (a DiT3Pipeline): name a new "
                          "folder, or an existing one to write it into")
    if args.push_to_hub and not args.export:
        raise ConfigError("--push-to-hub uploads an exported folder: give --export DIR too")
    if args.classes is None and not args.num_samples and not args.export:
        raise ConfigError("say what to do: --classes C ... (a grid), --num-samples N --out DIR, or --export DIR")

    result: dict = {"ckpt": ckpt}
    if args.export and state.is_main_process:
        result["export"] = export_pipeline(model, vae, scale, config, args, flow)
    if args.classes:
        labels = [c for _ in range(args.per_class) for c in args.classes]
        seeds = [sample_seed(args.seed, i) for i in range(len(labels))]
        t0 = time.time()
        if state.is_main_process:
            images = draw_images(model, vae, scale, labels, seeds, args, state.device, flow)
            out = Path(args.out) if args.out else run_dir / "samples" / (
                f"{ckpt.name}-{args.sampler}{args.steps}-cfg{args.cfg_scale:g}-seed{args.seed}.png")
            with writing(out.parent, "the sample grid"):
                result["grid"] = save_grid(images, out, nrow=len(args.classes))
            print(f"wrote {out} ({len(labels)} samples in {time.time() - t0:.1f} s)")
        state.wait_for_everyone()
    if args.num_samples:
        if not args.out:
            raise ConfigError("--num-samples needs --out DIR")
        result["npz"] = bulk(model, vae, scale, args, state, Path(args.out), ckpt, flow)
        if state.is_main_process:
            print(f"wrote {result['npz']}")
            if args.fid_ref:
                result["metrics"] = fidelity(Path(args.out), args, state)
            if args.digits_accuracy:
                result["digits_accuracy"] = digits_accuracy_of_folder(config, Path(args.out), args)
            if args.class_accuracy:
                result["class_accuracy"] = class_accuracy_of_folder(Path(args.out), args, state)
    return result


def class_names(config: dict, num_classes: int) -> dict[int, str]:
    """id -> name: the class folders of the run's data (ImageFolder's order), else the ids themselves."""
    from torchvision.datasets.folder import find_classes

    path = Path(config.get("data", {}).get("path") or "")
    if path.is_dir():
        names, _ = find_classes(str(path))
        if len(names) == num_classes:
            return dict(enumerate(names))
    return {i: str(i) for i in range(num_classes)}


def export_pipeline(model, vae, scale, config: dict, args, flow=None) -> Path:
    """The run as a DiT3Pipeline folder; `DiT3Pipeline.from_pretrained(DIR)` loads it offline. The VAE is saved
    in it (so the folder needs nothing else), its scaling_factor set to the run's latent scale. A flow run's
    scheduler is its FlowScheduler, with --sampler and the flow options as its defaults."""
    from dit3.pipeline import DiT3Pipeline
    from dit3.sampling import make_scheduler

    out = Path(args.export)
    if vae is not None and vae.config.scaling_factor != scale:
        vae.register_to_config(scaling_factor=scale)  # the pipeline scales latents by the VAE's own factor
    scheduler = flow if flow is not None else make_scheduler(args.sampler)
    pipe = DiT3Pipeline(transformer=model, scheduler=scheduler, vae=vae,
                        id2label=class_names(config, model.num_classes))
    pipe.save_pretrained(out)
    print(f"wrote {out} (DiT3Pipeline.from_pretrained({str(out)!r}))")
    if args.push_to_hub:
        try:
            pipe.push_to_hub(args.push_to_hub)
        except Exception as e:  # network, offline mode, login: the errors come from several libraries
            raise ConfigError(
                f"could not upload to the hub repo {args.push_to_hub} ({type(e).__name__}: {e}). It needs a network, "
                f"HF_HUB_OFFLINE unset and `huggingface-cli login`. The folder {out} is complete: upload it later "
                f"with `huggingface-cli upload {args.push_to_hub} {out}`") from None
        print(f"uploaded to https://huggingface.co/{args.push_to_hub}")
    return out


def _update_metrics(out: Path, new: dict) -> dict:
    path = out / "metrics.json"
    engine.refuse_link(path, "sample.py")
    metrics = json.loads(path.read_text()) if path.is_file() else {}
    metrics.update(new)
    with writing(out, "metrics.json"):
        engine.atomic_write_text(path, json.dumps(metrics, indent=2))
    return metrics


def fidelity(out: Path, args, state: PartialState) -> dict:
    """torch-fidelity metrics of out/images against --fid-ref, into out/metrics.json."""
    from dit3.evaluation import fidelity_metrics

    t0 = time.time()
    files = [out / "images" / f"{i:06d}.png" for i in range(args.num_samples)]  # this run's, not all in the folder
    try:
        metrics = fidelity_metrics(files, args.fid_ref, cuda=state.device.type == "cuda",
                                   inception_weights=args.inception_weights or None,
                                   classifier=args.feature_extractor or None,
                                   save_ref_stats=args.save_ref_stats or None)
    except ValueError as e:  # a reference file of the wrong kind
        raise ConfigError(str(e)) from None
    _update_metrics(out, {**metrics, "fid_ref": str(args.fid_ref)})
    print("  ".join(f"{k} {v:.4g}" for k, v in metrics.items() if not isinstance(v, str))
          + f"  ({metrics['feature_extractor']}, {time.time() - t0:.0f} s)")
    return metrics


def class_accuracy_of_folder(out: Path, args, state: PartialState) -> float:
    """The share of the samples in `out` that the --feature-extractor classifier labels as asked."""
    from dit3.evaluation import class_accuracy

    labels = json.loads((out / "info.json").read_text())["labels"]
    acc = class_accuracy(np.load(out / "samples.npz")["arr_0"], labels, args.feature_extractor,
                         cuda=state.device.type == "cuda")
    _update_metrics(out, {"class_accuracy": acc, "class_judge": str(args.feature_extractor)})
    print(f"class accuracy {100 * acc:.1f}% of {len(labels)} samples (judged by {args.feature_extractor})")
    return acc


def digits_accuracy_of_folder(config: dict, out: Path, args) -> float:
    """Digits demo: the share of the samples in `out` that an SVC trained on the run's real digits labels as asked."""
    from vit3.digits import DigitsClassifier

    if "data" not in config:
        raise ConfigError("--digits-accuracy needs a run trained by train_dit.py on the digits demo")
    root = Path(config["data"]["path"]).parent
    if not (root / "val").is_dir():
        raise ConfigError(f"--digits-accuracy needs the run's digits data at {root} (train/ and val/)")
    clf = DigitsClassifier(root)
    images = torch.from_numpy(np.load(out / "samples.npz")["arr_0"]).permute(0, 3, 1, 2).float() / 127.5 - 1
    labels = torch.tensor(json.loads((out / "info.json").read_text())["labels"])
    acc = clf.accuracy(images, labels)
    _update_metrics(out, {"digits_accuracy": acc, "digits_classifier_val_accuracy": clf.val_accuracy})
    print(f"digits accuracy {100 * acc:.1f}% of {len(labels)} samples (the SVC scores "
          f"{100 * clf.val_accuracy:.1f}% on real val digits)")
    return acc


if __name__ == "__main__":
    engine.run_script(main)
