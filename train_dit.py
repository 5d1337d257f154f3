"""Train a class-conditional DiT³ (or the DiT baseline) with Accelerate.

    accelerate launch train_dit.py --config configs/dit3_b2_in256.yaml data.path=/data/imagenet/train
    python train_dit.py --config configs/dit3_demo.yaml             # digits demo, pixel space, CPU, minutes
    python train_dit.py --config configs/dit3_demo_flow.yaml        # the same with flow matching (SiT)
    accelerate launch train_dit.py --config ... data.latents=/data/in256-latents --extract-latents
    python train_dit.py --config ... resume=latest                  # continue the newest run
    python train_dit.py --help                                      # every key, its default, what it does

Recipe (DiT): AdamW lr 1e-4, no weight decay, constant lr, global batch 256, EMA 0.9999 per
update (initialised from the model, kept in float32), class dropout 0.1, the hybrid loss (epsilon
MSE + the variational bound for the learned variance, `dit3.diffusion`), uniform timesteps,
400K updates. `objective=flow` trains with SiT's flow matching instead (`dit3.flow`, the `flow` section:
interpolant, prediction, loss weight, time distribution; its samplers draw the grids), as
configs/sit_b2_in256.yaml does for the SiT-B/2 baseline. Checkpoints hold the model and its EMA as
diffusers folders (`DiT3.from_pretrained`); the saved config names the objective.
Data: an ImageFolder with DiT's centre crop and horizontal flips, encoded by
Stable Diffusion's VAE on the fly, or read from pre-extracted latents (`data.latents`), or
used as pixels (`vae.name=""`).

Everything runs inside main(argv) so tests can run a few CPU steps in-process.
"""
from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from dit3.diffusion import create_diffusion
from dit3.evaluation import fidelity_metrics
from dit3.flow import create_flow, flow_scheduler
from dit3.latents import (
    LatentShards,
    extract_latents,
    image_transform,
    latents_complete,
    load_vae,
    vae_downsample,
)
from dit3.models import DiT3_models
from dit3.repa import Alignment, check_encoder
from dit3.sampling import FLOW_SAMPLERS, SAMPLERS, sample_images, sample_seed, save_grid, save_pngs, to_uint8
from dit3.train_config import DataConfig, RepaConfig, TrainConfig
from dit3.weights import load_dit3_weights
from vit3 import engine
from vit3.data import InMemoryFolder, open_image_folder
from vit3.digits import DigitsClassifier, prepare_demo_folder
from vit3.engine import ConfigError, DataError, SamplingDiverged

FLAGS = {"--extract-latents": "extract_only=true"}
ARCH_KEYS = ("name", "num_classes", "image_size", "kwargs")  # a checkpoint must match these to resume
FLOW_KEYS = ("path", "prediction")  # a flow checkpoint must match these to resume
REPA_KEYS = ("encoder", "projector", "projector_dim")  # fix the projector's shape: a resumed run keeps them
DEFAULT_SAMPLER = {"ddpm": "ddpm", "flow": "sde-euler"}  # the grids' sampler when sample.sampler is ""


# ----------------------------------------------------------------------------------------
# Model and data
# ----------------------------------------------------------------------------------------
def model_input(cfg: TrainConfig, downsample: int, channels: int) -> tuple[int, int]:
    """(input size, channels) of the network: latents of image_size / downsample, or pixels."""
    name, size = cfg.model.name, cfg.model.image_size
    if name not in DiT3_models:
        raise ConfigError(f"unknown model.name {name!r}; choose one of {', '.join(DiT3_models)}")
    patch = int(name.rsplit("/", 1)[1])
    need = downsample * patch
    if size % need:
        what = f"{downsample} (VAE) x {patch} (patch)" if downsample > 1 else f"the patch size {patch}"
        raise ConfigError(f"model.image_size={size} is not divisible by {what} = {need}; use a multiple of "
                          f"{need} (e.g. model.image_size={need * max(1, round(size / need))})")
    return size // downsample, channels


def create_model(cfg: TrainConfig, num_classes: int, input_size: int, in_channels: int) -> nn.Module:
    mc = cfg.model
    try:
        model = DiT3_models[mc.name](input_size=input_size, in_channels=in_channels, num_classes=num_classes,
                                     class_dropout_prob=mc.class_dropout_prob, **mc.kwargs)
    except TypeError as e:
        raise ConfigError(f"{mc.name} cannot be built with model.kwargs={mc.kwargs}: {e}") from None
    if mc.grad_checkpointing:
        model.enable_gradient_checkpointing()
    return model


def check_repa(cfg: TrainConfig):
    """ConfigError, one line, for repa settings that cannot run: checked before any work (the encoder's grid
    when it is loaded, before the first update)."""
    rc = cfg.repa
    if not rc.encoder:
        return
    if cfg.model.name in DiT3_models:
        depth = cfg.model.kwargs.get("depth", DiT3_models[cfg.model.name].keywords["depth"])
        if rc.depth > depth:
            raise ConfigError(f"repa.depth={rc.depth} is past the last block of {cfg.model.name} ({depth} blocks); "
                              f"use 1 .. {depth} (REPA aligns block 8 of SiT-XL's 28)")
    check_encoder(rc.encoder, rc.encoder_file)


def resolve_data(cfg: TrainConfig) -> DataConfig:
    """The data config with the demo folder written and filled in."""
    if not cfg.data.demo:
        return cfg.data
    root = Path(cfg.data.path) if cfg.data.path else ""
    if root and root.name == "train":  # data.path names the train split, as for ImageNet
        root = root.parent
    root = prepare_demo_folder(cfg.data.demo, root, cfg.model.image_size)
    return dataclasses.replace(cfg.data, path=str(root / "train"))


def build_data(cfg: TrainConfig, accelerator, vae, log):
    """Training dataset: latent shards (extracted first if needed) or an image folder."""
    data = cfg.data
    if data.latents:
        if not latents_complete(data.latents):
            images = open_image_folder(Path(data.path), image_transform(cfg.model.image_size, hflip=False),
                                       data.bad_images)
            log.info(f"extracting latents of {len(images)} images from {data.path} into {data.latents} "
                     f"({accelerator.num_processes} process(es))")
            extract_latents(images, vae, data.latents, accelerator, image_size=cfg.model.image_size,
                            vae_name=cfg.vae.name, shard_size=data.latent_shard_size,
                            batch_size=data.extract_batch_size, dtype=data.latent_dtype,
                            progress=cfg.log.progress, pixels=bool(cfg.repa.encoder))
        shards = LatentShards(data.latents, cfg.vae.scale, hflip=data.hflip, pixels=bool(cfg.repa.encoder))
        idx = shards.index
        if idx["image_size"] != cfg.model.image_size or idx["vae"] != cfg.vae.name:
            raise ConfigError(f"latents in {data.latents} are of {idx['image_size']}px images through VAE "
                              f"{idx['vae']!r}, this run asks for {cfg.model.image_size}px through {cfg.vae.name!r}; "
                              "point data.latents to a matching folder (or a new one to extract into)")
        return shards
    if data.in_memory:  # the flips are drawn per item, the rest of the transform is done once
        folder = open_image_folder(Path(data.path), image_transform(cfg.model.image_size, hflip=False), data.bad_images)
        return InMemoryFolder(folder, hflip=data.hflip, log=log)
    return open_image_folder(Path(data.path), image_transform(cfg.model.image_size, data.hflip), data.bad_images)


# ----------------------------------------------------------------------------------------
# Samples during training (main process, EMA model)
# ----------------------------------------------------------------------------------------
def draw_images(model: nn.Module, labels: torch.Tensor, generator, cfg_scale: float, cfg: TrainConfig, vae, shape,
                autocast) -> torch.Tensor:
    """Images [B, 3, H, W] in [-1, 1]: sample.sampler with sample.steps, decoded by the VAE."""
    sampler = cfg.sample.sampler
    flow = flow_scheduler(dataclasses.asdict(cfg.flow), sampler) if cfg.objective == "flow" else None
    return sample_images(model, labels, shape, vae, cfg.vae.scale, sampler=sampler, num_steps=cfg.sample.steps,
                         cfg_scale=cfg_scale, generator=generator, autocast=autocast, flow=flow)


def sample_grid(model, cfg: TrainConfig, vae, shape, path: Path, accelerator) -> Path:
    """PNG grid of the fixed classes x per_class from fixed noise (the same images at every step)."""
    sc = cfg.sample
    labels = torch.tensor([c for c in sc.classes for _ in range(sc.per_class)], device=accelerator.device)
    images = draw_images(model, labels, torch.Generator().manual_seed(sc.seed), sc.cfg_scale, cfg, vae, shape,
                         accelerator.autocast)
    return save_grid(images, path, nrow=sc.per_class * max(1, 8 // sc.per_class))


def periodic_fid(model, cfg: TrainConfig, vae, shape, folder: Path, batch: int, accelerator) -> dict:
    """FID and friends of sample.fid_samples samples (balanced classes, seeded per sample); the images
    are deleted after, the numbers kept."""
    sc, dev = cfg.sample, accelerator.device
    folder.mkdir(parents=True, exist_ok=True)
    try:
        for lo in range(0, sc.fid_samples, batch):
            idx = list(range(lo, min(lo + batch, sc.fid_samples)))
            labels = torch.tensor([i % model.num_classes for i in idx], device=dev)
            generators = [torch.Generator().manual_seed(sample_seed(sc.seed, i)) for i in idx]
            images = to_uint8(draw_images(model, labels, generators, sc.fid_cfg_scale, cfg, vae, shape,
                                          accelerator.autocast))
            save_pngs(images.numpy(), [folder / f"{i:06d}.png" for i in idx])
        metrics = fidelity_metrics(folder, sc.fid_ref, cuda=dev.type == "cuda",
                                   inception_weights=sc.fid_inception_weights or None,
                                   classifier=sc.fid_classifier or None)
    finally:  # also after samples that were not images: no half-drawn folder is left
        shutil.rmtree(folder, ignore_errors=True)
    return {f"fid/{k}": v for k, v in metrics.items() if not isinstance(v, str)}


def digits_accuracy_of_model(model, cfg: TrainConfig, shape, run: engine.Run) -> float:
    """Digits demo: the share of sample.digits_per_class guided samples per class that an SVC trained on the real
    digits labels as asked."""
    t0 = time.time()
    clf = DigitsClassifier(Path(cfg.data.path).parent)
    n, sc = cfg.sample.digits_per_class, cfg.sample
    labels = torch.arange(model.num_classes, device=run.accelerator.device).repeat_interleave(n)
    x = draw_images(model, labels, torch.Generator().manual_seed(sc.seed + 1), sc.cfg_scale, cfg, None, shape,
                    run.accelerator.autocast)
    acc = clf.accuracy(x, labels)
    run.log.info(f"digits sample accuracy {100 * acc:.1f}% ({len(labels)} guided samples, cfg {sc.cfg_scale}, "
                 f"{sc.sampler} {sc.steps} steps; the SVC scores {100 * clf.val_accuracy:.1f}% on real val digits) "
                 f"in {time.time() - t0:.1f} s")
    engine.write_json(run.dir / "digits_accuracy.json", {
        "accuracy": acc, "samples": len(labels), "cfg_scale": sc.cfg_scale, "sampler": sc.sampler, "steps": sc.steps,
        "classifier_val_accuracy": clf.val_accuracy}, run.accelerator)
    return acc


def unless_samples_diverged(what: str, step: int, run: engine.Run, evaluate):
    """evaluate(), or None with a warning naming the step where its samples were not images (SamplingDiverged):
    an evaluation of the model never stops its training, and writes no PNG or number from such samples."""
    try:
        return evaluate()
    except SamplingDiverged as e:
        run.log.warning(f"(step {step:07d}) no {what}: {e}")
        return None


def sample_during_training(model, cfg: TrainConfig, vae, shape, step: int, batch: int, run: engine.Run,
                           metrics_file: engine.MetricsFile):
    """The sample grid every sample.every updates and the FID every sample.fid_every, on the main process."""
    acc, sc = run.accelerator, cfg.sample
    if acc.is_main_process and sc.every and step % sc.every == 0 and step < cfg.max_steps:
        grid = unless_samples_diverged("sample grid", step, run, lambda: sample_grid(
            model, cfg, vae, shape, run.dir / "samples" / f"step-{step:07d}.png", acc))
        if grid:
            run.log.info(f"sample grid {grid}")
    if acc.is_main_process and sc.fid_every and step % sc.fid_every == 0:
        t0 = time.time()
        fid = unless_samples_diverged("FID", step, run, lambda: periodic_fid(
            model, cfg, vae, shape, run.dir / "fid" / f"step-{step:07d}", batch, acc))
        if fid:
            acc.log(fid, step=step)
            metrics_file.write(step, fid)
            run.log.info(f"(step {step:07d}) FID {fid['fid/frechet_inception_distance']:.3f} of {sc.fid_samples} "
                         f"EMA samples ({time.time() - t0:.1f} s)")
    if (sc.every and step % sc.every == 0) or (sc.fid_every and step % sc.fid_every == 0):
        acc.wait_for_everyone()


# ----------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------
def check_objective(cfg: TrainConfig) -> TrainConfig:
    """The config with sample.sampler resolved; ConfigError for a sampler or flow setting of the other objective."""
    sampler = cfg.sample.sampler or DEFAULT_SAMPLER[cfg.objective]
    fits = FLOW_SAMPLERS if cfg.objective == "flow" else SAMPLERS
    if sampler not in fits:
        raise ConfigError(f"sample.sampler={sampler!r} does not sample objective={cfg.objective} models; "
                          f"choose one of {', '.join(fits)}")
    if cfg.objective == "flow" and cfg.flow.prediction == "velocity" and cfg.flow.loss_weight != "none":
        raise ConfigError(f"flow.loss_weight={cfg.flow.loss_weight!r} weights noise and score losses (as in SiT); "
                          "with flow.prediction=velocity use flow.loss_weight=none")
    if cfg.objective == "flow" and sampler != "dopri5" and cfg.sample.steps < 2:
        raise ConfigError(f"sample.steps={cfg.sample.steps}: a flow sampler's grid needs at least 2 points (t0, t1)")
    if cfg.objective == "flow":
        try:  # the grids' sampler with the run's flow settings: refused where it divides by zero
            flow_scheduler(dataclasses.asdict(cfg.flow), sampler)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    return dataclasses.replace(cfg, sample=dataclasses.replace(cfg.sample, sampler=sampler))


def parse_config(argv: list[str] | None = None) -> tuple[TrainConfig, str]:
    """(config, run name) that argv asks for, every value checked before any work: ConfigError (exit code 2)
    otherwise. benchmarks/study.py checks each of its runs' arguments with it before its first run."""
    cfg, cfg_path = engine.load_config(TrainConfig, argv, flags=FLAGS, usage=__doc__.split("\n\n")[1])
    name = cfg.name or (Path(cfg_path).stem if cfg_path else cfg.model.name.replace("/", "-"))
    cfg = check_objective(cfg)
    if cfg.max_steps <= 0 and not cfg.extract_only:
        raise ConfigError(f"max_steps must be positive (the number of updates to train), got {cfg.max_steps}")
    if cfg.extract_only and not cfg.data.latents:
        raise ConfigError("--extract-latents needs data.latents=FOLDER (where to write them)")
    sc = cfg.sample
    if sc.fid_every and not (sc.fid_ref and Path(sc.fid_ref).exists()):
        raise ConfigError(f"sample.fid_every={sc.fid_every} needs sample.fid_ref: an existing image folder or .npz, "
                          f"got {sc.fid_ref!r}")
    for key in ("fid_inception_weights", "fid_classifier"):
        if getattr(sc, key) and not Path(getattr(sc, key)).exists():
            raise ConfigError(f"sample.{key}={getattr(sc, key)} does not exist")
    if sc.digits_per_class and cfg.data.demo != "digits":
        raise ConfigError(f"sample.digits_per_class={sc.digits_per_class} scores samples with the digits' SVC, and "
                          f"this run trains on data.demo={cfg.data.demo!r}: set sample.digits_per_class=0 (the "
                          "glyphs are judged by a classifier: sample.py --class-accuracy, benchmarks/study.py)")
    if cfg.data.latents and not cfg.vae.name:
        raise ConfigError("data.latents needs a VAE (vae.name); pixel-space training (vae.name='') reads images")
    check_repa(cfg)
    return cfg, name


def main(argv: list[str] | None = None) -> dict:
    """Train as the config and overrides in argv say; returns a summary."""
    cfg, name = parse_config(argv)
    if cfg.tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    writes = {"samples": "output_dir", **({"fid": "output_dir"} if cfg.sample.fid_every else {}),
              **({cfg.data.latents: "data.latents"} if cfg.data.latents and not latents_complete(cfg.data.latents)
                 else {})}  # checked before any work, with the run folder
    with engine.start_run(cfg, name, ARCH_KEYS, writes=writes) as run:
        return train(dataclasses.replace(cfg, name=name), run)


def check_resumed_objective(cfg: TrainConfig, run: engine.Run):
    """The network's output means what the objective says, so a resumed run keeps its objective (and flow
    settings); ConfigError otherwise."""
    if not run.resume_from:
        return
    trained = engine.read_trainer_state(run.resume_from)
    objective = (trained.get("config") or {}).get("objective", "ddpm")  # checkpoints before flow: ddpm
    if objective != cfg.objective:
        raise ConfigError(f"checkpoint {run.resume_from} was trained with objective={objective}, this run asks for "
                          f"objective={cfg.objective}: resume it with its own, or start a new run")
    if objective == "flow":
        engine.check_same_model(trained, dataclasses.asdict(cfg.flow), FLOW_KEYS, run.resume_from, section="flow")
    # checkpoints before REPA: off; the projector's shape and its optimizer state must match this run's
    repa = {**dataclasses.asdict(RepaConfig()), **((trained.get("config") or {}).get("repa") or {})}
    engine.check_same_model({"config": {"repa": repa}}, dataclasses.asdict(cfg.repa), REPA_KEYS, run.resume_from,
                            section="repa")


def classes_of(cfg: TrainConfig, dataset) -> int:
    """The data's number of classes, checked against model.num_classes and sample.classes."""
    num_classes = len(dataset.classes)
    if cfg.model.num_classes and cfg.model.num_classes != num_classes:
        raise DataError(f"model.num_classes={cfg.model.num_classes} but {cfg.data.latents or cfg.data.path} has "
                        f"{num_classes} classes; set model.num_classes={num_classes} (or 0 to follow the data)")
    bad = [c for c in cfg.sample.classes if not 0 <= int(c) < num_classes]
    if bad:
        raise ConfigError(f"sample.classes {bad} are not class ids of this data (0 .. {num_classes - 1}); "
                          "set sample.classes=[...]")
    return num_classes


def train(cfg: TrainConfig, run: engine.Run) -> dict:
    acc, log, dev = run.accelerator, run.log, run.accelerator.device
    accum = cfg.optim.grad_accum_steps
    micro = engine.split_batch(cfg.data.batch_size, acc.num_processes, accum)  # per process, per forward
    check_resumed_objective(cfg, run)

    # ---- VAE, data ----------------------------------------------------------------------------
    vae = load_vae(cfg.vae.name, dev) if cfg.vae.name else None
    downsample, channels = (vae_downsample(vae), vae.config.latent_channels) if vae else (1, 3)
    input_size, in_channels = model_input(cfg, downsample, channels)
    shape = (in_channels, input_size, input_size)
    with acc.main_process_first():
        cfg = dataclasses.replace(cfg, data=resolve_data(cfg))
    dataset = build_data(cfg, acc, vae, log)
    if cfg.extract_only:  # not a training run: no run folder is kept
        engine.finish(run, f"latents ready in {cfg.data.latents}")
        engine.discard(run)
        return {"latents": Path(cfg.data.latents)}
    num_classes = classes_of(cfg, dataset)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_classes=num_classes))
    config = engine.config_to_dict(cfg)
    sampler = engine.ResumableBatchSampler(len(dataset), micro, acc.num_processes, acc.process_index,
                                           seed=cfg.seed, accum_steps=accum)
    if sampler.updates_per_epoch == 0:
        raise DataError(f"{cfg.data.path} has {len(dataset)} images, fewer than one global batch "
                        f"({cfg.data.batch_size}); lower data.batch_size")
    loader = engine.make_loader(dataset, sampler, cfg.data, cfg.seed)

    # ---- model, EMA, optimizer ---------------------------------------------------------------
    engine.seed_process(cfg.seed)  # same init on every process
    raw_model = create_model(cfg, num_classes, input_size, in_channels).to(dev)
    alignment = Alignment.build(cfg.repa, raw_model, dev) if cfg.repa.encoder else None
    model, ema, optimizer, scheduler = engine.build_optimization(
        raw_model, cfg, sampler.updates_per_epoch, cfg.max_steps, acc, trained=alignment and alignment.aligned)
    fc = cfg.flow
    diffusion = create_diffusion("") if cfg.objective == "ddpm" else None
    flow = create_flow(fc.path, fc.prediction, fc.loss_weight, fc.train_eps, fc.sample_eps, fc.time_dist,
                       fc.logit_mean, fc.logit_std) if cfg.objective == "flow" else None
    objective = "DDPM (eps + learned variance)" if flow is None else \
        f"flow matching ({fc.path} path, {fc.prediction} prediction, {fc.time_dist} times)"
    n_params = sum(p.numel() for p in raw_model.parameters())
    lr = engine.scaled_lrs(cfg.optim, cfg.data.batch_size)[0]
    space = f"latents {in_channels}x{input_size}x{input_size} ({cfg.vae.name})" if vae else \
        f"pixels 3x{input_size}x{input_size}"
    metrics_file = engine.log_start(run, cfg, extra={
        "global_batch": cfg.data.batch_size, "per_process_batch": micro, "grad_accum_steps": accum,
        "updates_per_epoch": sampler.updates_per_epoch, "scaled_lr": lr, "ema_decay": ema.decay if ema else None,
        "params": n_params, "train_images": len(dataset), "model_input": list(shape)}, lines=[
        f"{cfg.model.name}: {n_params / 1e6:.2f}M params, {num_classes} classes, {space} | "
        f"{len(dataset)} images from {cfg.data.latents or cfg.data.path}",
        f"global batch {cfg.data.batch_size} = {acc.num_processes} x {accum} x {micro} | lr {lr:.3g} | "
        f"{sampler.updates_per_epoch} updates/epoch | {cfg.max_steps} updates",
        f"objective: {objective} | samples: {cfg.sample.sampler}, {cfg.sample.steps} steps",
        *([alignment.describe()] if alignment else [])])

    # ---- resume or start ----------------------------------------------------------------------
    ckpt = engine.Checkpointer(run, modules={"model": raw_model, **({"ema": ema.module} if ema else {}),
                                             **({"repa_projector": alignment.aligned.projector} if alignment else {})},
                               states={"optimizer": optimizer, "scheduler": scheduler, "scaler": acc.scaler},
                               config=config, keep_last=cfg.checkpoint.keep_last)
    if not ckpt.restore(cfg.seed, sampler.updates_per_epoch) and cfg.weights:
        # an official file: its EMA weights; our checkpoint: its trained weights
        load_dit3_weights(raw_model, cfg.weights, ema=Path(cfg.weights).suffix in (".pt", ".pth"))
        if ema is not None:
            ema.set(raw_model)
    st = ckpt.state
    if acc.log_with:
        acc.init_trackers(cfg.name, config=engine.flat_config(config))

    # ---- train --------------------------------------------------------------------------------
    sample_model = ema.module if ema is not None else raw_model
    tlog = engine.TrainLog(acc, metrics_file, cfg.log.every)
    step, stopped = st.global_step, None
    log.info(f"training to step {cfg.max_steps} from step {step}")
    model.train()
    while step < cfg.max_steps and stopped is None:
        epoch = st.epoch
        # epochs hold whole updates and a resume starts at an update's first micro-batch, so Accelerate's
        # accumulation count (reset by nothing here) stays in phase with the updates
        sampler.set_epoch(epoch, st.updates_in_epoch * accum)
        skipped = torch.zeros((), dtype=torch.long)
        bar = tqdm(total=cfg.max_steps, initial=step, desc=f"step (epoch {epoch + 1})",
                   disable=not (acc.is_main_process and cfg.log.progress), dynamic_ncols=True)
        for x, y, bad, *pixels in loader:  # pixels: the images of latents extracted for REPA
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            images = pixels[0].to(dev, non_blocking=True) if pixels else x  # clean, flipped: REPA's encoder input
            skipped += bad.sum()
            if vae is not None and not cfg.data.latents:
                with torch.no_grad():
                    x = vae.encode(x).latent_dist.sample() * cfg.vae.scale  # [B, 4, H/8, W/8]
            with acc.accumulate(model):
                if diffusion is not None:
                    t = diffusion.sample_timesteps(len(x), device=dev)
                    with acc.autocast():
                        loss = diffusion.training_losses(model, x, t, dict(class_labels=y))["loss"].mean()
                else:
                    with acc.autocast():
                        loss = flow.training_losses(model, x, dict(class_labels=y))["loss"].mean()
                if alignment is not None:
                    with acc.autocast():
                        loss_repa = alignment.loss(images)
                    tlog.meters.add("loss_diffusion", loss)
                    tlog.meters.add("loss_repa", loss_repa)
                    loss = loss + alignment.coeff * loss_repa
                engine.optimizer_step(acc, model, optimizer, loss, cfg.optim.clip_grad, tlog.meters)
            tlog.add(loss, len(x), acc.sync_gradients)
            if not acc.sync_gradients:
                continue

            step = st.advance()
            bar.update(1)
            ckpt.watch(loss, step)
            engine.after_update(step, scheduler, ema, raw_model)
            if tlog.due(step, cfg.max_steps):
                ckpt.check()
                tlog.write(step, optimizer, bar)
            if cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0:
                ckpt.save()
            with tlog.paused():  # throughput counts training time only
                sample_during_training(sample_model, cfg, vae, shape, step, micro, run, metrics_file)
            stopped = "done" if step >= cfg.max_steps else run.stop.reason(acc, step, cfg.checkpoint.stop_check_every)
            if stopped:
                break
        bar.close()
        if st.updates_in_epoch >= sampler.updates_per_epoch:  # the epoch ran out
            n_skipped = engine.count_over_processes(skipped, acc)
            st.end_epoch(n_skipped)
            if n_skipped:
                log.warning(f"epoch {epoch + 1}: skipped {n_skipped} unreadable images (data.bad_images=skip)")
            if cfg.checkpoint.every_epochs and (epoch + 1) % cfg.checkpoint.every_epochs == 0:
                ckpt.save()
    if step >= cfg.max_steps:  # also a run resumed from its last checkpoint: the final grid is drawn again
        stopped = "done"
    elif stopped:
        log.info(f"stopping at step {step} ({stopped}): saving a checkpoint")
    ckpt.save(last=True)

    result = {"run_dir": run.dir, "step": step, "state": st, "stopped": None if stopped == "done" else stopped,
              "preempted": run.stop.fired, "world_size": acc.num_processes, "model": raw_model,
              "ema": ema.module if ema else None, "local_train": tlog.meters.last_local,
              "repa_projector": alignment.aligned.projector if alignment else None}
    if stopped == "done" and acc.is_main_process:
        result["grid"] = unless_samples_diverged("final sample grid", step, run, lambda: sample_grid(
            sample_model, cfg, vae, shape, run.dir / "samples" / "final.png", acc))
        if result["grid"]:
            log.info(f"final sample grid {result['grid']}")
        if cfg.sample.digits_per_class:
            result["digits_accuracy"] = unless_samples_diverged("digits accuracy", step, run, lambda: (
                digits_accuracy_of_model(sample_model, cfg, shape, run)))
            if result["digits_accuracy"] is not None:
                metrics_file.write(step, {"samples/digits_accuracy": result["digits_accuracy"]})
    engine.finish(run, f"done at step {step}" + (f" (stopped: {stopped})" if result["stopped"] else ""))
    return result


if __name__ == "__main__":
    engine.run_script(main)
