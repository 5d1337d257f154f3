"""Train a class-conditional DiT³ (or the DiT baseline) with Accelerate.

    accelerate launch train_dit.py --config configs/dit3_b2_in256.yaml data.path=/data/imagenet/train
    python train_dit.py --config configs/dit3_demo.yaml             # digits demo, pixel space, CPU, minutes
    accelerate launch train_dit.py --config ... data.latents=/data/in256-latents --extract-latents
    python train_dit.py --config ... resume=latest                  # continue the newest run

Recipe (DiT): AdamW lr 1e-4, no weight decay, constant lr, global batch 256, EMA 0.9999 per
update (initialised from the model, kept in float32), class dropout 0.1, the hybrid loss (epsilon
MSE + the variational bound for the learned variance, `dit3.diffusion`), uniform timesteps,
400K updates. Data: an ImageFolder with DiT's centre crop and horizontal flips, encoded by
Stable Diffusion's VAE on the fly, or read from pre-extracted latents (`data.latents`), or
used as pixels (`vae.name=""`).

Everything runs inside main(argv) so tests can run a few CPU steps in-process.
"""
from __future__ import annotations

import dataclasses
import json
import math
import shutil
import signal
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from dit3.diffusion import create_diffusion
from dit3.evaluation import fidelity_metrics
from dit3.latents import (
    LatentShards,
    VAEConfig,
    decode,
    extract_latents,
    image_transform,
    latents_complete,
    load_vae,
    vae_downsample,
)
from dit3.models import DiT3_models, load_official_checkpoint
from dit3.sampling import sample_ddpm, sample_seed, save_grid, save_pngs, to_uint8
from vit3 import training as T
from vit3.data import DataError, open_image_folder
from vit3.digits import DigitsClassifier, default_demo_path, prepare_digits
from vit3.training import CheckpointConfig, ConfigError, EMAConfig, LogConfig, OptimConfig


@dataclasses.dataclass
class ModelConfig:
    name: str = "DiT3-B/2"  # a dit3.DiT3_models name: DiT3-{S,B,L,XL}/{2,4,8}, DiT-*, DiT3-LA-*
    num_classes: int = 1000  # 0 = the number of class folders
    image_size: int = 256  # pixels; the model sees image_size / 8 latents (image_size itself in pixel space)
    class_dropout_prob: float = 0.1  # label dropout for classifier-free guidance
    grad_checkpointing: bool = False  # recompute each block in the backward pass (less memory, ~30% slower)
    kwargs: dict = dataclasses.field(default_factory=dict)  # more DiT3 arguments (depth, mixer_kwargs, ...)


@dataclasses.dataclass
class DataConfig:
    path: str = "data/imagenet/train"  # an ImageFolder: one sub-folder of images per class
    demo: str = ""  # "digits": scikit-learn's digits, written as an ImageFolder under ~/.cache/vit3 (path "")
    batch_size: int = 256  # global: per process = batch_size / (processes * grad_accum_steps)
    num_workers: int = 4
    pin_memory: bool = True
    hflip: bool = True  # random horizontal flips (DiT); turn off for data that is not mirror-symmetric
    bad_images: str = "error"  # "error" names an unreadable file; "skip" replaces it and counts
    latents: str = ""  # folder of pre-extracted latents: extracted there first if incomplete, then trained on
    latent_shard_size: int = 1024  # images per shard
    latent_dtype: str = "float16"  # storage of the posterior mean / std: float16 or float32
    extract_batch_size: int = 64  # images per VAE call during extraction (per process)


@dataclasses.dataclass
class SampleConfig:
    every: int = 10000  # a grid from the EMA model every N updates (0 = only at the end)
    classes: list = dataclasses.field(default_factory=lambda: [207, 360, 387, 974, 88, 979, 417, 279])
    per_class: int = 1  # grid columns: samples per class
    steps: int = 250  # respaced DDPM steps
    cfg_scale: float = 4.0  # classifier-free guidance (1 = none)
    seed: int = 0  # the grid's noise: the same images at every step of a run
    digits_accuracy: int = 0  # digits demo: classify N guided samples per class with an SVC on the real digits
    # periodic FID of the EMA model (main process): fid_samples balanced samples against fid_ref
    fid_every: int = 0  # updates between evaluations (0 = off)
    fid_samples: int = 1000
    fid_ref: str = ""  # an image folder, an ADM-style .npz (arr_0) or a statistics .npz (mu, sigma)
    fid_cfg_scale: float = 1.0  # papers report FID-50K without guidance
    fid_inception_weights: str = ""  # local InceptionV3 weights for torch-fidelity ("" = its download)
    fid_classifier: str = ""  # a train_vit.py run whose features replace Inception's (domain FID)


@dataclasses.dataclass
class TrainConfig:
    name: str = ""  # experiment name, run folder output_dir/NNN-name; "" = the config file's stem
    seed: int = 0
    output_dir: str = "results"
    run_name: str = ""  # fixed run folder output_dir/run_name instead of a numbered one
    mixed_precision: str = "bf16"  # "no" | "fp16" | "bf16" (the TTT inner step runs in float32 regardless)
    tf32: bool = True  # TF32 matmuls and convolutions on Ampere+ GPUs
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    vae: VAEConfig = dataclasses.field(default_factory=VAEConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=lambda: OptimConfig(
        lr=1e-4, lr_batch=0, weight_decay=0.0, sched="constant", warmup_epochs=0, clip_grad=0.0))
    ema: EMAConfig = dataclasses.field(default_factory=lambda: EMAConfig(decay=0.9999, decay_batch=0))
    max_steps: int = 400_000  # optimizer updates in total (the schedule's length)
    resume: str = ""  # "latest" | "auto" (latest if any, else fresh) | a checkpoint or run folder
    weights: str = ""  # start from these weights: our .safetensors / checkpoint folder, or an official DiT³ / DiT .pt
    extract_only: bool = False  # only extract data.latents, then exit
    compile: bool = False  # torch.compile the model
    threads: int = 0  # torch intra-op threads per process; 0 = torch's default
    sample: SampleConfig = dataclasses.field(default_factory=SampleConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=lambda: CheckpointConfig(
        every_steps=50_000, every_epochs=0, keep_last=3))
    log: LogConfig = dataclasses.field(default_factory=lambda: LogConfig(every=100))


FLAGS = {"--extract-latents": "extract_only=true"}
ARCH_KEYS = ("name", "num_classes", "image_size", "kwargs")  # a checkpoint must match these to resume


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf."""


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


def resolve_data(cfg: TrainConfig) -> DataConfig:
    """The data config with the demo folder written and filled in."""
    if not cfg.data.demo:
        return cfg.data
    if cfg.data.demo != "digits":
        raise ConfigError(f"unknown data.demo {cfg.data.demo!r}: the built-in demo dataset is 'digits' ('' for none)")
    root = Path(cfg.data.path) if cfg.data.path else default_demo_path("digits", cfg.model.image_size)
    root = prepare_digits(root.parent if root.name == "train" else root, cfg.model.image_size)
    return dataclasses.replace(cfg.data, path=str(root / "train"))


def load_start_weights(model: nn.Module, path: str):
    """Weights to start from: our .safetensors / checkpoint folder, or an official DiT³ / DiT file."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(f"weights={path} does not exist")
    if p.is_file() and p.suffix != ".safetensors":
        try:
            load_official_checkpoint(model, p, ema=True)
        except (RuntimeError, KeyError) as e:
            raise ConfigError(f"weights {p} do not fit model.name / model.kwargs of this run: {e}") from None
    else:
        T.load_weights(model, p, key="model")


# ----------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict:
    """Train as the config and `key=value` overrides in argv say; returns a summary."""
    cfg, cfg_path = T.load_config(TrainConfig, argv, flags=FLAGS)
    name = cfg.name or (Path(cfg_path).stem if cfg_path else cfg.model.name.replace("/", "-"))
    if cfg.mixed_precision not in ("no", "fp16", "bf16"):
        raise ConfigError(f"mixed_precision must be no, fp16 or bf16, got {cfg.mixed_precision!r}")
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
    if cfg.data.latents and not cfg.vae.name:
        raise ConfigError("data.latents needs a VAE (vae.name); pixel-space training (vae.name='') reads images")
    if cfg.tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    return T.run_training(cfg, name, train, ARCH_KEYS)



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
                            progress=cfg.log.progress)
        shards = LatentShards(data.latents, cfg.vae.scale, hflip=data.hflip)
        idx = shards.index
        if idx["image_size"] != cfg.model.image_size or idx["vae"] != cfg.vae.name:
            raise ConfigError(f"latents in {data.latents} are of {idx['image_size']}px images through VAE "
                              f"{idx['vae']!r}, this run asks for {cfg.model.image_size}px through {cfg.vae.name!r}; "
                              "point data.latents to a matching folder (or a new one to extract into)")
        return shards
    return open_image_folder(Path(data.path), image_transform(cfg.model.image_size, data.hflip), data.bad_images)


def train(cfg: TrainConfig, name: str, run_dir: Path, resume_ckpt: Path | None, accelerator, log,
          stop: T.StopSignal) -> dict:
    world, rank, dev = accelerator.num_processes, accelerator.process_index, accelerator.device
    accum = cfg.optim.grad_accum_steps
    if cfg.data.batch_size % (world * accum):
        raise ConfigError(f"data.batch_size={cfg.data.batch_size} (global) is not divisible by processes x "
                          f"optim.grad_accum_steps = {world} x {accum}; pick a multiple of {world * accum}")
    micro = cfg.data.batch_size // (world * accum)

    # ---- VAE, data ----------------------------------------------------------------------------
    vae = load_vae(cfg.vae.name, dev) if cfg.vae.name else None
    downsample, channels = (vae_downsample(vae), vae.config.latent_channels) if vae else (1, 3)
    input_size, in_channels = model_input(cfg, downsample, channels)
    with accelerator.main_process_first():
        data_cfg = resolve_data(cfg)
    cfg = dataclasses.replace(cfg, data=data_cfg)
    dataset = build_data(cfg, accelerator, vae, log)
    if cfg.extract_only:  # not a training run: no run folder is kept
        log.info(f"latents ready in {cfg.data.latents}")
        accelerator.wait_for_everyone()
        accelerator.end_training()
        T.close_logging()
        T.remove_unused_run(run_dir, accelerator)
        return {"latents": Path(cfg.data.latents)}
    num_classes = len(dataset.classes)
    if cfg.model.num_classes and cfg.model.num_classes != num_classes:
        raise DataError(f"model.num_classes={cfg.model.num_classes} but {cfg.data.latents or cfg.data.path} has "
                        f"{num_classes} classes; set model.num_classes={num_classes} (or 0 to follow the data)")
    bad = [c for c in cfg.sample.classes if not 0 <= int(c) < num_classes]
    if bad:
        raise ConfigError(f"sample.classes {bad} are not class ids of this data (0 .. {num_classes - 1}); "
                          "set sample.classes=[...]")
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_classes=num_classes), name=name)
    config = T.config_to_dict(cfg)

    sampler = T.ResumableBatchSampler(len(dataset), micro, world, rank, seed=cfg.seed, accum_steps=accum)
    if sampler.updates_per_epoch == 0:
        raise DataError(f"{cfg.data.path} has {len(dataset)} images, fewer than one global batch "
                        f"({cfg.data.batch_size}); lower data.batch_size")
    use_workers = cfg.data.num_workers > 0
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.data.num_workers,
                        pin_memory=cfg.data.pin_memory and torch.cuda.is_available(),
                        persistent_workers=use_workers, worker_init_fn=T.ignore_stop_signals if use_workers else None,
                        generator=torch.Generator().manual_seed(cfg.seed))

    # ---- model, EMA, optimizer ---------------------------------------------------------------
    T.seed_process(cfg.seed)  # same init on every process
    raw_model = create_model(cfg, num_classes, input_size, in_channels).to(dev)
    n_params = sum(p.numel() for p in raw_model.parameters())
    ema = T.create_ema(raw_model, cfg.ema, cfg.data.batch_size)
    epochs = math.ceil(cfg.max_steps / sampler.updates_per_epoch)
    optimizer, scheduler = T.create_optimizer_and_scheduler(
        raw_model, dataclasses.replace(cfg.optim, epochs=epochs), cfg.data.batch_size, sampler.updates_per_epoch)
    model = torch.compile(raw_model) if cfg.compile else raw_model
    model, optimizer = accelerator.prepare(model, optimizer)
    diffusion = create_diffusion("")
    # the network's own config (diffusers ConfigMixin), so sample.py rebuilds it without the trainer
    model_config = {k: v for k, v in raw_model.config.items() if not k.startswith("_")}

    lr = T.scaled_lrs(cfg.optim, cfg.data.batch_size)[0]
    info = T.write_run_info(run_dir, config, accelerator, cfg.seed, extra={
        "global_batch": cfg.data.batch_size, "per_process_batch": micro, "grad_accum_steps": accum,
        "updates_per_epoch": sampler.updates_per_epoch, "scaled_lr": lr, "ema_decay": ema.decay if ema else None,
        "params": n_params, "train_images": len(dataset), "model_input": [in_channels, input_size, input_size],
        "resumed_from": str(resume_ckpt or "")})
    space = f"latents {in_channels}x{input_size}x{input_size} ({cfg.vae.name})" if vae else \
        f"pixels 3x{input_size}x{input_size}"
    log.info(f"run folder {run_dir} | git {info['git']} | {world} process(es) on {dev} | "
             f"mixed precision {accelerator.mixed_precision}")
    log.info(f"{cfg.model.name}: {n_params / 1e6:.2f}M params, {num_classes} classes, {space} | "
             f"{len(dataset)} images from {cfg.data.latents or cfg.data.path}")
    log.info(f"global batch {cfg.data.batch_size} = {world} x {accum} x {micro} | lr {lr:.3g} | "
             f"{sampler.updates_per_epoch} updates/epoch | {cfg.max_steps} updates")
    metrics_file = T.MetricsFile(run_dir / "metrics.jsonl", accelerator.is_main_process)

    # ---- resume -------------------------------------------------------------------------------
    state = {"epoch": 0, "updates_in_epoch": 0, "global_step": 0, "skipped_images": 0}
    modules = {"model": raw_model, **({"ema": ema.module} if ema else {})}
    states = {"optimizer": optimizer, "scheduler": scheduler, "scaler": accelerator.scaler}
    if resume_ckpt:
        old = T.load_checkpoint(accelerator, resume_ckpt, modules=modules, states=states, restore_rng=True)
        state.update({k: old[k] for k in state if k in old})
        log.info(f"resumed from {resume_ckpt}: step {state['global_step']} (epoch {state['epoch']}, "
                 f"update {state['updates_in_epoch']} of it)")
    else:
        if cfg.weights:
            load_start_weights(raw_model, cfg.weights)
            if ema is not None:
                ema.set(raw_model)
        T.seed_process(cfg.seed + 1 + rank)  # noise, timesteps, label dropout differ between processes

    if accelerator.log_with:
        accelerator.init_trackers(name, config=T.flat_config(config))

    # ---- samples ------------------------------------------------------------------------------
    sample_model = ema.module if ema is not None else raw_model

    def sample_grid(tag: str) -> Path | None:
        """PNG grid of the fixed classes x per_class from fixed noise (main process only)."""
        if not accelerator.is_main_process:
            return None
        sc = cfg.sample
        labels = torch.tensor([c for c in sc.classes for _ in range(sc.per_class)], device=dev)
        x = sample_ddpm(sample_model, labels, (in_channels, input_size, input_size), num_steps=sc.steps,
                        cfg_scale=sc.cfg_scale, generator=torch.Generator().manual_seed(sc.seed),
                        autocast=accelerator.autocast)
        images = decode(vae, x, cfg.vae.scale) if vae else x.clamp(-1, 1)
        return save_grid(images, run_dir / "samples" / f"{tag}.png", nrow=sc.per_class * max(1, 8 // sc.per_class))

    def periodic_fid(step: int) -> dict:
        """FID and friends of sample.fid_samples EMA samples (balanced classes, seeded per sample)."""
        if not accelerator.is_main_process:
            return {}
        sc = cfg.sample
        folder = run_dir / "fid" / f"step-{step:07d}"
        folder.mkdir(parents=True, exist_ok=True)
        for lo in range(0, sc.fid_samples, micro):
            idx = list(range(lo, min(lo + micro, sc.fid_samples)))
            x = sample_ddpm(sample_model, torch.tensor([i % num_classes for i in idx], device=dev),
                            (in_channels, input_size, input_size), num_steps=sc.steps, cfg_scale=sc.fid_cfg_scale,
                            generator=[torch.Generator().manual_seed(sample_seed(sc.seed, i)) for i in idx],
                            autocast=accelerator.autocast)
            images = to_uint8(decode(vae, x, cfg.vae.scale) if vae else x.clamp(-1, 1))
            save_pngs(images.numpy(), [folder / f"{i:06d}.png" for i in idx])
        metrics = fidelity_metrics(folder, sc.fid_ref, cuda=dev.type == "cuda",
                                   inception_weights=sc.fid_inception_weights or None,
                                   classifier=sc.fid_classifier or None)
        shutil.rmtree(folder)  # the numbers are what is kept
        return {f"fid/{k}": v for k, v in metrics.items() if not isinstance(v, str)}

    # ---- train --------------------------------------------------------------------------------
    meters = T.RunningMeans(dev)
    step = state["global_step"]
    ckpt_root = run_dir / "checkpoints"
    last_saved = step if resume_ckpt else None
    last_good = resume_ckpt
    first_bad = torch.full((), -1, dtype=torch.long, device=dev)  # first step with a non-finite loss, no host sync
    stopped = None
    last_local: dict = {}

    def check_finite():
        """Raise TrainingDiverged (on every process) if any process saw a non-finite loss."""
        bad_steps = accelerator.gather(first_bad.reshape(1)) if world > 1 else first_bad.reshape(1)
        bad_steps = [s for s in bad_steps.tolist() if s >= 0]
        if bad_steps:
            raise TrainingDiverged(
                f"the loss became NaN or inf at step {min(bad_steps)}; training stopped. Last good checkpoint: "
                f"{last_good or 'none (no checkpoint was written before)'}. Resume from it (resume=<that folder>) "
                "with a lower optim.lr, optim.clip_grad > 0, or mixed_precision=bf16 instead of fp16")

    def save():
        nonlocal last_saved, last_good
        if last_saved == step:
            return
        check_finite()  # never write diverged weights
        path = T.save_checkpoint(accelerator, ckpt_root, step, modules=modules, states=states,
                                 trainer_state={**state, "global_step": step, "model_config": model_config},
                                 config=config,
                                 keep_last=cfg.checkpoint.keep_last)
        last_saved, last_good = step, path
        log.info(f"saved checkpoint {path}")

    log.info(f"training to step {cfg.max_steps} from step {step}")
    model.train()
    t_log, images_since, steps_since = time.time(), 0, 0
    while step < cfg.max_steps and stopped is None:
        epoch = state["epoch"]
        sampler.set_epoch(epoch, state["updates_in_epoch"] * accum)
        accelerator.step = 0  # epochs hold whole updates, so accumulation restarts in phase
        skipped = torch.zeros((), dtype=torch.long)
        bar = tqdm(total=cfg.max_steps, initial=step, desc=f"step (epoch {epoch + 1})",
                   disable=not (accelerator.is_main_process and cfg.log.progress), dynamic_ncols=True)
        for x, y, bad in loader:
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            skipped += bad.sum()
            if vae is not None and not cfg.data.latents:
                with torch.no_grad():
                    x = vae.encode(x).latent_dist.sample() * cfg.vae.scale  # [B, 4, H/8, W/8]
            with accelerator.accumulate(model):
                t = diffusion.sample_timesteps(len(x), device=dev)
                with accelerator.autocast():
                    loss = diffusion.training_losses(model, x, t, dict(class_labels=y))["loss"].mean()
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    max_norm = cfg.optim.clip_grad if cfg.optim.clip_grad > 0 else math.inf
                    meters.add("grad_norm", accelerator.clip_grad_norm_(model.parameters(), max_norm))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            loss = loss.detach()
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), step + 1, first_bad)
            meters.add("loss", loss)
            images_since += len(x)
            if not accelerator.sync_gradients:
                continue

            step += 1
            steps_since += 1
            state["updates_in_epoch"] += 1
            bar.update(1)
            if scheduler is not None:
                scheduler.step_update(num_updates=step)
            if ema is not None:
                ema.update(raw_model)

            if step % cfg.log.every == 0 or step == cfg.max_steps:
                check_finite()
                if cfg.log.debug_ranks:
                    last_local = meters.local()
                elapsed = max(time.time() - t_log, 1e-9)
                m = meters.reduce(accelerator, extra_sums={"images_per_s": images_since / elapsed})
                m.update(lr=optimizer.param_groups[0]["lr"], steps_per_s=steps_since / elapsed)
                accelerator.log({f"train/{k}": v for k, v in m.items()}, step=step)
                metrics_file.write(step, {f"train/{k}": v for k, v in m.items()})
                log.info(f"(step {step:07d}) loss {m['loss']:.4f} grad_norm {m['grad_norm']:.3f} "
                         f"steps/s {m['steps_per_s']:.2f} images/s {m['images_per_s']:.1f}")
                bar.set_postfix(loss=f"{m['loss']:.4f}")
                meters.reset()
                t_log, images_since, steps_since = time.time(), 0, 0
            if cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0:
                save()
            if cfg.sample.every and step % cfg.sample.every == 0 and step < cfg.max_steps:
                t0 = time.time()
                path = sample_grid(f"step-{step:07d}")
                if path:
                    log.info(f"sample grid {path} ({time.time() - t0:.1f} s)")
                t_log += time.time() - t0  # throughput counts training time only
                accelerator.wait_for_everyone()
            if cfg.sample.fid_every and step % cfg.sample.fid_every == 0:
                t0 = time.time()
                fid = periodic_fid(step)
                if fid:
                    accelerator.log(fid, step=step)
                    metrics_file.write(step, fid)
                    log.info(f"(step {step:07d}) FID {fid['fid/frechet_inception_distance']:.3f} of "
                             f"{cfg.sample.fid_samples} EMA samples ({time.time() - t0:.1f} s)")
                t_log += time.time() - t0
                accelerator.wait_for_everyone()
            if step >= cfg.max_steps:
                stopped = "done"
            elif (world == 1 or step % cfg.checkpoint.stop_check_every == 0) and stop.should_stop(accelerator):
                stopped = signal.Signals(stop.received).name if stop.received else "a signal on another process"
            if stopped:
                break
        bar.close()
        if state["updates_in_epoch"] >= sampler.updates_per_epoch:  # the epoch ran out
            state["epoch"], state["updates_in_epoch"] = epoch + 1, 0
            n_skipped = int(accelerator.reduce(skipped.to(dev), "sum").item()) if world > 1 else int(skipped)
            state["skipped_images"] += n_skipped
            if n_skipped:
                log.warning(f"epoch {epoch + 1}: skipped {n_skipped} unreadable images (data.bad_images=skip)")
            if cfg.checkpoint.every_epochs and (epoch + 1) % cfg.checkpoint.every_epochs == 0:
                save()
    state["global_step"] = step
    if stopped not in (None, "done"):
        log.info(f"stopping at step {step} ({stopped}): saving a checkpoint")
    save()

    result = {"run_dir": run_dir, "step": step, "state": state, "stopped": None if stopped == "done" else stopped,
              "world_size": world}
    if stopped == "done":
        t0 = time.time()
        grid = sample_grid("final")
        if grid:
            log.info(f"final sample grid {grid} ({time.time() - t0:.1f} s)")
            result["grid"] = grid
        if cfg.sample.digits_accuracy and accelerator.is_main_process:
            result["digits_accuracy"] = digits_accuracy(cfg, sample_model, (in_channels, input_size, input_size),
                                                        accelerator, log)
            metrics_file.write(step, {"samples/digits_accuracy": result["digits_accuracy"]})
    if cfg.log.debug_ranks:
        T.write_rank_debug(run_dir, accelerator, {
            "model_digest": T.weights_digest(raw_model), "ema_digest": T.weights_digest(ema.module) if ema else None,
            "step": step, "local_train": last_local})
    log.info(f"done at step {step}" + (f" (stopped: {stopped})" if result["stopped"] else ""))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


def digits_accuracy(cfg: TrainConfig, model: nn.Module, shape, accelerator, log) -> float:
    """Digits demo: the share of guided samples that an SVC trained on the real digits labels as asked."""
    t0 = time.time()
    clf = DigitsClassifier(Path(cfg.data.path).parent)
    n = cfg.sample.digits_accuracy
    labels = torch.arange(model.num_classes, device=accelerator.device).repeat_interleave(n)
    x = sample_ddpm(model, labels, shape, num_steps=cfg.sample.steps, cfg_scale=cfg.sample.cfg_scale,
                    generator=torch.Generator().manual_seed(cfg.sample.seed + 1), autocast=accelerator.autocast)
    acc = clf.accuracy(x.clamp(-1, 1), labels)
    log.info(f"digits sample accuracy {100 * acc:.1f}% ({len(labels)} guided samples, cfg {cfg.sample.cfg_scale}, "
             f"{cfg.sample.steps} steps; the SVC scores {100 * clf.val_accuracy:.1f}% on real val digits) "
             f"in {time.time() - t0:.1f} s")
    if accelerator.is_main_process:
        (Path(accelerator.project_dir) / "digits_accuracy.json").write_text(json.dumps(
            {"accuracy": acc, "samples": len(labels), "cfg_scale": cfg.sample.cfg_scale, "steps": cfg.sample.steps,
             "classifier_val_accuracy": clf.val_accuracy}, indent=2))
    return acc


if __name__ == "__main__":
    try:
        main()
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)
