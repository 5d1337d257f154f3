"""Sample a trained DiT³ run: a PNG grid, or many samples (PNG files + an ADM-style .npz) and their FID.

    python sample.py --ckpt results/000-dit3_b2_in256 --classes 207 360 387 974 --cfg-scale 4.0 --seed 0
    accelerate launch sample.py --ckpt RUN --num-samples 50000 --cfg-scale 1.0 --out samples/dit3-b2
    python sample.py --ckpt RUN --num-samples 50000 --out DIR --fid-ref /data/imagenet256-val
    python sample.py --ckpt results/000-dit3_demo --num-samples 1000 --out DIR --digits-accuracy
    python sample.py --ckpt DiTTT-B-2.pt --classes 207 360 --vae /models/sd-vae-ft-ema   # official release file
    python sample.py --ckpt RUN --export dit3-pipeline [--push-to-hub user/dit3-b2]   # a DiT3Pipeline folder

The model (its diffusers config), the VAE and its scale come from the checkpoint, so no model
flag is repeated; the EMA weights are used unless --no-ema. A run folder means its newest
checkpoint. Official DiT³ / DiT .pt files work too: their `args` name the model (DiT's bare
weight files need --model and --image-size).

Bulk mode is distributed and resumable. Sample i is drawn from its own noise (seeded by
(seed, i)) with its class (i mod classes when balanced, else drawn from (seed, i)), in the fixed
batch i // batch_size; process r draws batches r, r + R, ... So the images, and the .npz, are the
same whatever the number of processes, and a restarted job skips the batches already on disk.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import parse_flag_from_env
from tqdm.auto import tqdm

from dit3.latents import decode, load_vae, vae_downsample
from dit3.models import DiT3
from dit3.sampling import SAMPLERS, sample, sample_seed, save_grid, save_pngs, to_uint8
from vit3 import training as T
from vit3.training import ConfigError


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", required=True, help="a run folder (its newest checkpoint) or a checkpoints/step-N folder")
    p.add_argument("--no-ema", action="store_true", help="use the model weights, not the EMA")
    # only for official DiT³ / DiT .pt files, and only where the file does not say (DiT's bare EMA weights)
    p.add_argument("--model", default=None, help="official file: model name (DiT3-B/2 or the official DiTTT-B/2)")
    p.add_argument("--image-size", type=int, default=None, help="official file: image size (256)")
    p.add_argument("--num-classes", type=int, default=None, help="official file: classes (1000)")
    p.add_argument("--vae", default=None, help="VAE folder or hub name, instead of the one the run trained with")
    p.add_argument("--sampler", default="ddpm", choices=SAMPLERS)
    p.add_argument("--steps", type=int, default=250, help="sampling steps (DDPM: respaced as DiT)")
    p.add_argument("--cfg-scale", type=float, default=4.0, help="classifier-free guidance scale (1 = none)")
    p.add_argument("--cfg-channels", type=int, default=None, help="guide only these leading channels (DiT: 3)")
    p.add_argument("--cfg-interval", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="guide only at timesteps t / 1000 in [LO, HI]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32, help="samples per network call (fixed batches; see above)")
    p.add_argument("--mixed-precision", default="no", choices=("no", "bf16", "fp16"))
    # grid mode
    p.add_argument("--classes", type=int, nargs="+", default=None, help="grid mode: one column per class")
    p.add_argument("--per-class", type=int, default=1, help="grid mode: rows")
    # bulk mode
    p.add_argument("--num-samples", type=int, default=0, help="bulk mode: how many samples")
    p.add_argument("--labels", default="balanced", choices=("balanced", "random"))
    p.add_argument("--out", default=None, help="grid: the PNG (default in the run's samples/); bulk: a folder")
    p.add_argument("--fid-ref", default=None,
                   help="bulk mode: FID/IS/KID/precision/recall against an image folder, an ADM .npz or a stats .npz")
    p.add_argument("--inception-weights", default=None, help="local InceptionV3 weights for torch-fidelity")
    p.add_argument("--feature-extractor", default=None,
                   help="a train_vit.py run or checkpoint whose features replace Inception's (domain FID)")
    p.add_argument("--save-ref-stats", default=None, help="write the reference's mu / sigma to this .npz")
    p.add_argument("--digits-accuracy", action="store_true",
                   help="digits demo: the share of samples an SVC trained on the real digits labels as asked")
    # export
    p.add_argument("--export", default=None, metavar="DIR",
                   help="write a DiT3Pipeline folder: EMA transformer, the --sampler's scheduler, VAE, id2label")
    p.add_argument("--push-to-hub", default=None, metavar="REPO",
                   help="with --export: upload the folder to this hub repo")
    return p.parse_args(argv)


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
        latest = T.find_latest_checkpoint(p / "checkpoints")
        if latest is None:
            raise ConfigError(f"--ckpt {path}: the run folder has no complete checkpoint")
        return latest
    if not (p / "trainer_state.json").is_file():
        raise ConfigError(f"--ckpt {path} is not a checkpoint (no trainer_state.json): pass a run folder, "
                          "a checkpoints/step-N folder written by train_dit.py, or an official .pt file")
    return p


def load_official(path: Path, ema: bool = True, device="cpu", vae_name: str | None = None, model_name=None,
                  image_size=None, num_classes=None):
    """(model, VAE, scale, config) from an official DiT³ / DiT file: the train.py dict, whose `args` name the
    model, image size, classes and VAE, or DiT's bare EMA weights (then --model and --image-size are needed)."""
    import argparse

    from dit3.models import DiT3_models, load_official_checkpoint

    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle / zip errors of a damaged or foreign file
        first = (str(e).splitlines() or [""])[0]
        raise ConfigError(f"cannot read {path} ({type(e).__name__}: {first}): the file is damaged or not a "
                          "checkpoint") from None
    args = ckpt.get("args") if isinstance(ckpt, dict) else None
    name = (model_name or getattr(args, "model", None) or "").replace("DiTTT-", "DiT3-")
    image_size = image_size or getattr(args, "image_size", None)
    if name not in DiT3_models or not image_size:
        raise ConfigError(f"{path} does not say its model and image size (found model {name or None!r}, image size "
                          f"{image_size}): pass --model (e.g. DiT3-B/2) and --image-size (e.g. 256)")
    vae_name = vae_name or f"stabilityai/sd-vae-ft-{getattr(args, 'vae', 'ema')}"
    vae = load_vae(vae_name, device)
    model = DiT3_models[name](input_size=image_size // vae_downsample(vae), in_channels=vae.config.latent_channels,
                              num_classes=num_classes or getattr(args, "num_classes", 1000))
    try:
        load_official_checkpoint(model, ckpt, ema=ema)
    except (RuntimeError, KeyError) as e:
        raise ConfigError(f"{path} does not fit {name} at {image_size}px: {e}") from None
    return model.to(device).eval(), vae, 0.18215, {"vae": {"name": vae_name, "scale": 0.18215}}


def load_run(ckpt: Path, ema: bool = True, device="cpu", vae_name: str | None = None, **official):
    """(model in eval mode, VAE or None, latent scale, training config) from a train_dit.py checkpoint
    (or an official file, see load_official)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    if ckpt.is_file():
        return load_official(ckpt, ema, device, vae_name, **official)
    state = T.read_trainer_state(ckpt)
    if "model_config" not in state:
        raise ConfigError(f"checkpoint {ckpt} has no model_config: it was not written by train_dit.py")
    model = DiT3.from_config(state["model_config"])
    weights = ckpt / ("ema.safetensors" if ema else "model.safetensors")
    if not weights.is_file():
        hint = " (trained without EMA: use --no-ema)" if ema else ""
        raise ConfigError(f"checkpoint {ckpt} has no {weights.name}{hint}")
    try:
        load_model(model, str(weights), strict=True)
    except (SafetensorError, RuntimeError, OSError) as e:
        raise ConfigError(f"cannot read the weights {weights}: {e}. The file is damaged; use another "
                          "checkpoint") from None
    config = state["config"]
    name = vae_name if vae_name is not None else config["vae"]["name"]
    vae = load_vae(name, device) if name else None
    return model.to(device).eval(), vae, config["vae"]["scale"], config


# ----------------------------------------------------------------------------------------
# Drawing
# ----------------------------------------------------------------------------------------
def labels_for(indices: list[int], num_classes: int, mode: str, seed: int) -> list[int]:
    if mode == "balanced":
        return [i % num_classes for i in indices]
    return [int(torch.randint(0, num_classes, (), generator=torch.Generator().manual_seed(sample_seed(seed, i, 1))))
            for i in indices]


def draw(model, vae, scale, labels: list[int], seeds: list[int], args, device) -> torch.Tensor:
    """uint8 images [B, H, W, 3] for these labels and per-sample seeds."""
    cfg = model.config
    size = (cfg.input_size, cfg.input_size) if isinstance(cfg.input_size, int) else tuple(cfg.input_size)
    autocast = None
    if args.mixed_precision != "no":
        dtype = torch.bfloat16 if args.mixed_precision == "bf16" else torch.float16
        autocast = lambda: torch.autocast(torch.device(device).type, dtype=dtype)  # noqa: E731
    x = sample(model, torch.tensor(labels, device=device), (cfg.in_channels, *size), sampler=args.sampler,
               num_steps=args.steps, cfg_scale=args.cfg_scale, cfg_channels=args.cfg_channels,
               cfg_interval=tuple(args.cfg_interval) if args.cfg_interval else None,
               generator=[torch.Generator().manual_seed(s) for s in seeds], autocast=autocast)
    return to_uint8(decode(vae, x, scale) if vae is not None else x.clamp(-1, 1))


def save_npz(path: Path, arr: np.ndarray):
    """arr_0 in an .npz (np.load-compatible), byte-reproducible (fixed zip timestamps), written atomically."""
    tmp = path.with_name(f".{path.name}.tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        info = zipfile.ZipInfo("arr_0.npy", date_time=(1980, 1, 1, 0, 0, 0))
        with zf.open(info, "w", force_zip64=True) as f:
            np.lib.format.write_array(f, np.ascontiguousarray(arr), allow_pickle=False)
    os.replace(tmp, path)


def read_images(folder: Path, n: int) -> np.ndarray:
    from PIL import Image

    return np.stack([np.asarray(Image.open(folder / f"{i:06d}.png").convert("RGB")) for i in range(n)])


def bulk(model, vae, scale, args, state: PartialState, out: Path) -> Path:
    """Draw args.num_samples images into out/images/NNNNNN.png (resumable), then out/samples.npz."""
    images_dir = out / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    # a restart may only continue the same drawing: other settings would mix two sample sets
    spec = {"ckpt": str(resolve_checkpoint(args.ckpt).resolve()), "ema": not args.no_ema, "sampler": args.sampler,
            "steps": args.steps, "cfg_scale": args.cfg_scale, "cfg_channels": args.cfg_channels,
            "cfg_interval": args.cfg_interval, "seed": args.seed, "labels": args.labels,
            "batch_size": args.batch_size, "vae": args.vae}
    spec_path = out / "spec.json"
    if spec_path.is_file() and json.loads(spec_path.read_text()) != spec:
        old = json.loads(spec_path.read_text())
        diff = ", ".join(f"{k}: {old.get(k)!r} -> {v!r}" for k, v in spec.items() if old.get(k) != v)
        raise ConfigError(f"{out} holds samples drawn with other settings ({diff}); use another --out")
    state.wait_for_everyone()
    if state.is_main_process:
        spec_path.write_text(json.dumps(spec, indent=2))
    n, b = args.num_samples, args.batch_size
    batches = [list(range(k * b, min((k + 1) * b, n))) for k in range(math.ceil(n / b))]
    mine = [idx for k, idx in enumerate(batches) if k % state.num_processes == state.process_index
            and not all((images_dir / f"{i:06d}.png").is_file() for i in idx)]
    t0, done = time.time(), 0
    for idx in tqdm(mine, desc=f"sampling (process {state.process_index})", disable=not state.is_main_process):
        labels = labels_for(idx, model.num_classes, args.labels, args.seed)
        images = draw(model, vae, scale, labels, [sample_seed(args.seed, i) for i in idx], args, state.device)
        save_pngs(images.numpy(), [images_dir / f"{i:06d}.png" for i in idx])
        done += len(idx)
    state.wait_for_everyone()
    npz = out / "samples.npz"
    if state.is_main_process:
        save_npz(npz, read_images(images_dir, n))
        labels = labels_for(list(range(n)), model.num_classes, args.labels, args.seed)
        info = {"num_samples": n, "labels": labels, "seed": args.seed, "sampler": args.sampler, "steps": args.steps,
                "cfg_scale": args.cfg_scale, "cfg_channels": args.cfg_channels, "cfg_interval": args.cfg_interval,
                "ckpt": str(args.ckpt), "ema": not args.no_ema, "processes": state.num_processes,
                "seconds_per_image_this_process": (time.time() - t0) / done if done else None}
        (out / "info.json").write_text(json.dumps(info, indent=2))
    state.wait_for_everyone()
    return npz


def main(argv=None) -> dict:
    args = parse_args(argv)
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    ckpt = resolve_checkpoint(args.ckpt)
    model, vae, scale, config = load_run(ckpt, ema=not args.no_ema, device=state.device, vae_name=args.vae,
                                         model_name=args.model, image_size=args.image_size,
                                         num_classes=args.num_classes)
    run_dir = ckpt.parent if ckpt.is_file() else ckpt.parent.parent
    for c in args.classes or []:
        if not 0 <= c < model.num_classes:
            raise ConfigError(f"class {c} is out of range: this model has classes 0 .. {model.num_classes - 1}")
    if args.fid_ref and not Path(args.fid_ref).exists():
        raise ConfigError(f"--fid-ref {args.fid_ref} does not exist: pass an image folder, an ADM-style .npz "
                          "(arr_0) or a statistics .npz (mu, sigma)")
    if args.inception_weights and not Path(args.inception_weights).is_file():
        raise ConfigError(f"--inception-weights {args.inception_weights} does not exist")
    if args.feature_extractor and not Path(args.feature_extractor).exists():
        raise ConfigError(f"--feature-extractor {args.feature_extractor} does not exist: pass a train_vit.py run "
                          "folder or checkpoint")
    if args.push_to_hub and not args.export:
        raise ConfigError("--push-to-hub uploads an exported folder: give --export DIR too")
    if args.classes is None and not args.num_samples and not args.export:
        raise ConfigError("say what to do: --classes C ... (a grid), --num-samples N --out DIR, or --export DIR")

    result: dict = {"ckpt": ckpt}
    if args.export and state.is_main_process:
        result["export"] = export_pipeline(model, vae, scale, config, args)
    if args.classes:
        labels = [c for _ in range(args.per_class) for c in args.classes]
        seeds = [sample_seed(args.seed, i) for i in range(len(labels))]
        t0 = time.time()
        images = draw(model, vae, scale, labels, seeds, args, state.device) if state.is_main_process else None
        if state.is_main_process:
            out = Path(args.out) if args.out else run_dir / "samples" / (
                f"{ckpt.name}-{args.sampler}{args.steps}-cfg{args.cfg_scale:g}-seed{args.seed}.png")
            grid = images.permute(0, 3, 1, 2).float() / 127.5 - 1
            result["grid"] = save_grid(grid, out, nrow=len(args.classes))
            print(f"wrote {out} ({len(labels)} samples in {time.time() - t0:.1f} s)")
        state.wait_for_everyone()
    if args.num_samples:
        if not args.out:
            raise ConfigError("--num-samples needs --out DIR")
        result["npz"] = bulk(model, vae, scale, args, state, Path(args.out))
        if state.is_main_process:
            print(f"wrote {result['npz']}")
            if args.fid_ref:
                result["metrics"] = fidelity(Path(args.out), args, state)
            if args.digits_accuracy:
                result["digits_accuracy"] = digits_accuracy(config, Path(args.out), args)
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


def export_pipeline(model, vae, scale, config: dict, args) -> Path:
    """The run as a DiT3Pipeline folder; `DiT3Pipeline.from_pretrained(DIR)` loads it offline. The VAE is saved
    in it (so the folder needs nothing else), its scaling_factor set to the run's latent scale."""
    from dit3.pipeline import DiT3Pipeline
    from dit3.sampling import make_scheduler

    out = Path(args.export)
    if vae is not None and vae.config.scaling_factor != scale:
        vae.register_to_config(scaling_factor=scale)  # the pipeline scales latents by the VAE's own factor
    pipe = DiT3Pipeline(transformer=model, scheduler=make_scheduler(args.sampler), vae=vae,
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
    metrics = json.loads(path.read_text()) if path.is_file() else {}
    metrics.update(new)
    tmp = path.with_name(".metrics.json.tmp")
    tmp.write_text(json.dumps(metrics, indent=2))
    os.replace(tmp, path)
    return metrics


def fidelity(out: Path, args, state: PartialState) -> dict:
    """torch-fidelity metrics of out/images against --fid-ref, into out/metrics.json."""
    from dit3.evaluation import fidelity_metrics

    t0 = time.time()
    try:
        metrics = fidelity_metrics(out / "images", args.fid_ref, cuda=state.device.type == "cuda",
                                   inception_weights=args.inception_weights, classifier=args.feature_extractor,
                                   save_ref_stats=args.save_ref_stats)
    except ValueError as e:  # a reference file of the wrong kind
        raise ConfigError(str(e)) from None
    _update_metrics(out, {**metrics, "fid_ref": str(args.fid_ref)})
    print("  ".join(f"{k} {v:.4g}" for k, v in metrics.items() if not isinstance(v, str))
          + f"  ({metrics['feature_extractor']}, {time.time() - t0:.0f} s)")
    return metrics


def digits_accuracy(config: dict, out: Path, args) -> float:
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
    try:
        main()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
