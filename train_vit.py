"""Train or evaluate ViT³ / H-ViT³ (or any timm classifier) on an ImageFolder with Accelerate.

    accelerate launch train_vit.py --config configs/vit3_small_in1k.yaml data.path=/data/imagenet
    python train_vit.py --config configs/vit3_demo.yaml                    # digits demo, CPU, minutes
    python train_vit.py --config configs/vit3_small_in1k.yaml --eval-only resume=results/000-x/checkpoints/step-N
    python train_vit.py --config ... resume=latest                          # continue the newest run

Recipe (official ViT³, DeiT-style): AdamW (0.9, 0.999), weight decay 0.05 off for 1-D params and
biases, lr 5e-4 x global batch / 512 with 20 warm-up epochs from 5e-7 and cosine to 5e-6, all
stepped per update; grad-norm clipping 5; RandAugment, random erasing, Mixup/CutMix with label
smoothing; EMA of the weights, evaluated each epoch beside the model. For H-ViT³ the official
main_ema.py adds MESA from 25% of the epochs on:
    loss = CE(out, y) + mesa * CE(out, softmax(ema(x)))
with the EMA's output on the same (mixed) batch as a soft target.

A run also leaves the weights it ends with (the EMA's when kept) as a timm folder, `RUN/timm/`:
    model = timm.create_model("local-dir:RUN/timm", pretrained=True)   # after `import vit3`

Everything runs inside main(argv) so tests can run a few CPU steps in-process.
"""
from __future__ import annotations

import dataclasses
import json
import signal
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.loss import SoftTargetCrossEntropy
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from vit3 import training as T
from vit3.data import DataConfig, DataError, build_datasets, build_mixup, prepare_demo
from vit3.training import CheckpointConfig, ConfigError, EMAConfig, LogConfig, OptimConfig


@dataclasses.dataclass
class ModelConfig:
    name: str = "vit3_small"  # a registered timm model: vit3_tiny/small/base, hvit3_tiny/small/base, ...
    num_classes: int = 0  # 0 = the number of class folders
    img_size: int = 224
    drop_path_rate: float = 0.1
    grad_checkpointing: bool = False
    kwargs: dict = dataclasses.field(default_factory=dict)  # more create_model kwargs (depth, embed_dim, mixer, ...)


@dataclasses.dataclass
class TrainConfig:
    name: str = ""  # experiment name, run folder output_dir/NNN-name; "" = the config file's stem
    seed: int = 0
    output_dir: str = "results"
    run_name: str = ""  # fixed run folder output_dir/run_name instead of a numbered one
    mixed_precision: str = "bf16"  # "no" | "fp16" (with a grad scaler) | "bf16", via Accelerate
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    ema: EMAConfig = dataclasses.field(default_factory=EMAConfig)
    mesa: float = 0.0  # weight of CE(out, softmax(EMA out)); needs ema.enabled (H-ViT³: 1.0/1.5/2.0 for T/S/B)
    mesa_start: float = 0.25  # fraction of the epochs after which MESA is on
    resume: str = ""  # "latest" | "auto" (latest if any, else fresh) | a checkpoint or run folder
    weights: str = ""  # model weights to start from or to evaluate (.safetensors, .pth, checkpoint folder)
    eval_only: bool = False
    eval_every_epochs: int = 1
    max_steps: int = 0  # stop (with a checkpoint) after this many updates in total; 0 = full schedule
    compile: bool = False  # torch.compile the model
    threads: int = 0  # torch intra-op threads per process (torch.set_num_threads); 0 = torch's default
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    log: LogConfig = dataclasses.field(default_factory=LogConfig)


FLAGS = {"--eval-only": "eval_only=true", "--eval": "eval_only=true"}
ARCH_KEYS = ("name", "num_classes", "img_size", "kwargs")  # a checkpoint must match these to resume


# ----------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------
def create_model(mc: ModelConfig, num_classes: int) -> nn.Module:
    import timm

    import vit3  # noqa: F401  registers vit3_* / hvit3_* with timm
    kwargs = dict(num_classes=num_classes, drop_path_rate=mc.drop_path_rate, img_size=mc.img_size, **mc.kwargs)
    try:
        model = timm.create_model(mc.name, **kwargs)
    except TypeError as e:  # an unknown or ill-typed model.kwargs entry
        raise ConfigError(f"{mc.name} cannot be built with model.kwargs={mc.kwargs}: {e}") from None
    except RuntimeError as e:
        if "Unknown model" not in str(e):
            raise
        known = [m for m in timm.list_models("*vit3*")]
        raise ConfigError(f"unknown model.name {mc.name!r}; ViT³ models: "
                          f"{', '.join(known) or '(vit3.models missing)'}, or any timm model name") from None
    check_img_size(model, mc)
    if mc.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model


def _as_int(p):
    return p[0] if isinstance(p, (tuple, list)) else p


def check_img_size(model: nn.Module, mc: ModelConfig):
    """ConfigError unless img_size is a multiple of the model's patch (total stride for H-ViT³)."""
    stride = getattr(model, "stride", None) or getattr(model, "total_stride", None)
    patch = getattr(model, "patch_size", None)
    if patch is None and hasattr(model, "patch_embed"):
        patch = getattr(model.patch_embed, "patch_size", None)
    need = _as_int(stride) if stride else _as_int(patch)
    if need and mc.img_size % int(need):
        fix = int(need) * max(1, round(mc.img_size / int(need)))
        raise ConfigError(f"model.img_size={mc.img_size} is not divisible by the patch size {int(need)} of "
                          f"{mc.name}; use a multiple of {int(need)} (e.g. model.img_size={fix}) or another patch size")


def load_model_weights(model: nn.Module, path: Path, ema: bool = False) -> bool:
    """Weights from one of our checkpoint folders or .safetensors files, or an official ViT³ /
    H-ViT³ .pth (vit3.load_official_checkpoint, weights_only). ema=True takes the EMA weights and
    returns False where the source has none."""
    path = Path(path)
    if path.is_file() and path.suffix != ".safetensors":
        from vit3.models import load_official_checkpoint

        try:
            load_official_checkpoint(model, path, ema=ema)
        except KeyError:  # no 'state_dict_ema' (official main.py checkpoints)
            if ema:
                return False
            raise
        except RuntimeError as e:
            raise ConfigError(f"weights {path} do not fit model.name / model.kwargs of this run: {e}") from None
        return True
    if ema:
        if not (path.is_dir() and (path / "ema.safetensors").is_file()):
            return False
        path = path / "ema.safetensors"
    T.load_weights(model, path, key="model")
    return True


# ----------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: nn.Module, loader, accelerator) -> dict:
    """Top-1 / top-5 / CE over the whole val set: per-process sums, one all-reduce."""
    was_training = model.training
    model.eval()
    dev = accelerator.device
    sums = torch.zeros(4, dtype=torch.float64, device=dev)  # correct1, correct5, loss, count
    for x, y, _ in loader:
        x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
        with accelerator.autocast():
            out = model(x)
        out = out.float()
        top = out.topk(min(5, out.shape[1]), dim=1).indices  # [B, 5]
        hit = top == y[:, None]
        sums += torch.stack([hit[:, 0].sum(), hit.any(1).sum(), F.cross_entropy(out, y, reduction="sum"),
                             torch.tensor(len(y), device=dev)]).double()
    if accelerator.num_processes > 1:
        sums = accelerator.reduce(sums, "sum")
    c1, c5, loss, n = sums.tolist()
    model.train(was_training)
    n = max(n, 1)
    return {"top1": 100 * c1 / n, "top5": 100 * c5 / n, "loss": loss / n, "n": int(n)}


# ----------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict:
    """Train (or evaluate) as the config and `key=value` overrides in argv say; returns a summary."""
    cfg, cfg_path = T.load_config(TrainConfig, argv, flags=FLAGS)
    name = cfg.name or (Path(cfg_path).stem if cfg_path else cfg.model.name)
    if cfg.mixed_precision not in ("no", "fp16", "bf16"):
        raise ConfigError(f"mixed_precision must be no, fp16 or bf16, got {cfg.mixed_precision!r}")
    if cfg.mesa > 0 and not cfg.ema.enabled:
        raise ConfigError("mesa > 0 needs the EMA teacher: set ema.enabled=true or mesa=0")
    if cfg.eval_only and not (cfg.resume or cfg.weights):
        raise ConfigError("eval_only needs weights: pass resume=<checkpoint folder>|latest or weights=<file>")

    return T.run_training(cfg, name, train, ARCH_KEYS, new_run=cfg.eval_only)



def train(cfg: TrainConfig, name: str, run_dir: Path, resume_ckpt: Path | None, accelerator, log,
          stop: T.StopSignal) -> dict:
    """Build data, model, EMA, optimizer; resume; train and evaluate (or only evaluate)."""
    world, rank, dev = accelerator.num_processes, accelerator.process_index, accelerator.device
    accum = cfg.optim.grad_accum_steps
    if cfg.data.batch_size % (world * accum):
        raise ConfigError(f"data.batch_size={cfg.data.batch_size} (global) is not divisible by processes x "
                          f"optim.grad_accum_steps = {world} x {accum}; pick a multiple of {world * accum}")
    micro = cfg.data.batch_size // (world * accum)  # per process, per forward
    mixup_on = cfg.data.mixup > 0 or cfg.data.cutmix > 0
    if mixup_on and micro % 2 and not cfg.eval_only:
        raise ConfigError(f"Mixup/CutMix needs an even per-process batch, got {micro}; change data.batch_size")

    # ---- data ------------------------------------------------------------------------------
    with accelerator.main_process_first():
        data_cfg = prepare_demo(cfg.data, cfg.model.img_size)
    train_ds, val_ds = build_datasets(data_cfg, cfg.model.img_size)
    num_classes = len(train_ds.classes)
    if cfg.model.num_classes and cfg.model.num_classes != num_classes:
        raise DataError(f"model.num_classes={cfg.model.num_classes} but {data_cfg.path} has {num_classes} class "
                        f"folders; set model.num_classes={num_classes} (or 0 to follow the data)")
    cfg = dataclasses.replace(cfg, name=name, data=data_cfg,
                              model=dataclasses.replace(cfg.model, num_classes=num_classes))
    config = T.config_to_dict(cfg)

    sampler = T.ResumableBatchSampler(len(train_ds), micro, world, rank, seed=cfg.seed, accum_steps=accum)
    if sampler.updates_per_epoch == 0 and not cfg.eval_only:
        raise DataError(f"{data_cfg.path}/train has {len(train_ds)} images, fewer than one global batch "
                        f"({cfg.data.batch_size}); lower data.batch_size")
    use_workers = cfg.data.num_workers > 0
    loader_kw = dict(num_workers=cfg.data.num_workers, pin_memory=cfg.data.pin_memory and torch.cuda.is_available(),
                     persistent_workers=use_workers, worker_init_fn=T.ignore_stop_signals if use_workers else None)
    # an own generator: creating a loader iterator must not draw from the global RNG (resume exactness)
    train_loader = DataLoader(train_ds, batch_sampler=sampler, generator=torch.Generator().manual_seed(cfg.seed),
                              **loader_kw)
    eval_bs = cfg.data.eval_batch_size or micro
    val_loader = DataLoader(val_ds, batch_sampler=T.ShardedEvalSampler(len(val_ds), eval_bs, world, rank),
                            generator=torch.Generator().manual_seed(cfg.seed), **loader_kw)

    # ---- model, EMA, optimizer ---------------------------------------------------------------
    T.seed_process(cfg.seed)  # same init on every process
    raw_model = create_model(cfg.model, num_classes).to(dev)
    n_params = sum(p.numel() for p in raw_model.parameters())
    global_batch = cfg.data.batch_size
    ema = T.create_ema(raw_model, cfg.ema, global_batch)
    optimizer, scheduler = T.create_optimizer_and_scheduler(raw_model, cfg.optim, global_batch,
                                                            max(sampler.updates_per_epoch, 1))
    model = torch.compile(raw_model) if cfg.compile else raw_model
    model, optimizer = accelerator.prepare(model, optimizer)

    lr, warmup_lr, min_lr = T.scaled_lrs(cfg.optim, global_batch)
    info = T.write_run_info(run_dir, config, accelerator, cfg.seed, extra={
        "global_batch": global_batch, "per_process_batch": micro, "grad_accum_steps": accum,
        "updates_per_epoch": sampler.updates_per_epoch, "scaled_lr": lr, "scaled_warmup_lr": warmup_lr,
        "scaled_min_lr": min_lr, "ema_decay": ema.decay if ema else None, "params": n_params,
        "train_images": len(train_ds), "val_images": len(val_ds), "resumed_from": str(resume_ckpt or "")})
    log.info(f"run folder {run_dir} | git {info['git']} | {world} process(es) on {dev} | "
             f"mixed precision {accelerator.mixed_precision}")
    log.info(f"{cfg.model.name}: {n_params / 1e6:.2f}M params, {num_classes} classes, img {cfg.model.img_size} | "
             f"train {len(train_ds)} / val {len(val_ds)} images from {data_cfg.path}")
    log.info(f"global batch {global_batch} = {world} x {accum} x {micro} | lr {lr:.3g} (warm-up from {warmup_lr:.3g}, "
             f"min {min_lr:.3g}) | {sampler.updates_per_epoch} updates/epoch")
    metrics_file = T.MetricsFile(run_dir / "metrics.jsonl", accelerator.is_main_process)

    # ---- eval only ----------------------------------------------------------------------------
    if cfg.eval_only:
        src = Path(resume_ckpt or cfg.weights)
        load_model_weights(raw_model, src)
        results = {"model": evaluate(raw_model, val_loader, accelerator)}
        if ema is not None and load_model_weights(ema.module, src, ema=True):
            results["ema"] = evaluate(ema.module, val_loader, accelerator)
        for k, r in results.items():
            log.info(f"eval {k}: top-1 {r['top1']:.2f}  top-5 {r['top5']:.2f}  loss {r['loss']:.4f}  ({r['n']} images)")
        if accelerator.is_main_process:
            (run_dir / "eval.json").write_text(json.dumps({"weights": str(src), **results}, indent=2))
        accelerator.wait_for_everyone()
        accelerator.end_training()
        return {"run_dir": run_dir, "eval": results}

    # ---- resume -------------------------------------------------------------------------------
    state = {"epoch": 0, "updates_in_epoch": 0, "global_step": 0, "best_top1": 0.0, "best_ema_top1": 0.0,
             "skipped_images": 0}
    modules = {"model": raw_model, **({"ema": ema.module} if ema else {})}
    states = {"optimizer": optimizer, "scheduler": scheduler, "scaler": accelerator.scaler}
    if resume_ckpt:
        old = T.load_checkpoint(accelerator, resume_ckpt, modules=modules, states=states, restore_rng=True)
        state.update({k: old[k] for k in state if k in old})
        diffs = _config_diffs(old.get("config", {}), config)
        if diffs:
            log.warning("config differs from the checkpoint's: " + "; ".join(diffs[:10]))
        if state["updates_in_epoch"] > sampler.updates_per_epoch:
            log.warning(f"checkpoint is {state['updates_in_epoch']} updates into an epoch of "
                        f"{sampler.updates_per_epoch}: the epoch is taken as finished")
            state["updates_in_epoch"] = sampler.updates_per_epoch
        log.info(f"resumed from {resume_ckpt}: epoch {state['epoch']}, update {state['updates_in_epoch']} of it, "
                 f"step {state['global_step']}")
    else:
        if cfg.weights:
            load_model_weights(raw_model, Path(cfg.weights))
            if ema is not None:
                ema.set(raw_model)
        T.seed_process(cfg.seed + 1 + rank)  # dropout / drop-path / mixup differ between processes

    if accelerator.log_with:  # (main process only, inside Accelerate)
        accelerator.init_trackers(name, config=T.flat_config(config))

    # ---- train --------------------------------------------------------------------------------
    criterion = SoftTargetCrossEntropy() if mixup_on else nn.CrossEntropyLoss(label_smoothing=cfg.data.label_smoothing)
    soft_ce = SoftTargetCrossEntropy()
    mixup_fn = build_mixup(cfg.data, num_classes)
    total_epochs = cfg.optim.epochs + cfg.optim.cooldown_epochs
    mesa_epoch = int(cfg.mesa_start * total_epochs)
    meters = T.RunningMeans(dev)
    step = state["global_step"]
    ckpt_root = run_dir / "checkpoints"
    last_saved = (step, state["epoch"]) if resume_ckpt else None  # (step, epoch) of the newest checkpoint
    last_eval: dict = {}
    last_local: dict = {}
    stopped = None

    def save():  # a second save at the same step (step and epoch-end checkpoint) replaces the first
        nonlocal last_saved
        if last_saved == (step, state["epoch"]):
            return
        path = T.save_checkpoint(accelerator, ckpt_root, step, modules=modules, states=states,
                                 trainer_state={**state, "global_step": step}, config=config,
                                 keep_last=cfg.checkpoint.keep_last)
        last_saved = (step, state["epoch"])
        log.info(f"saved checkpoint {path}")

    log.info(f"training {total_epochs} epochs from epoch {state['epoch']} (step {step})"
             + (f", MESA {cfg.mesa} from epoch {mesa_epoch}" if cfg.mesa > 0 else ""))
    model.train()
    t_log, images_since = time.time(), 0
    while state["epoch"] < total_epochs and stopped is None:
        epoch = state["epoch"]
        sampler.set_epoch(epoch, state["updates_in_epoch"] * accum)
        accelerator.step = 0  # epochs hold whole updates, so accumulation restarts in phase
        mesa_on = cfg.mesa > 0 and epoch >= mesa_epoch
        skipped = torch.zeros((), dtype=torch.long)
        bar = tqdm(total=sampler.batches_per_epoch, initial=state["updates_in_epoch"] * accum,
                   desc=f"epoch {epoch + 1}/{total_epochs}",
                   disable=not (accelerator.is_main_process and cfg.log.progress), dynamic_ncols=True)
        for x, y, bad in train_loader:
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            skipped += bad.sum()
            if mixup_fn is not None:
                x, y = mixup_fn(x, y)  # y: [B, classes] soft targets with label smoothing
            with accelerator.accumulate(model):
                with accelerator.autocast():
                    out = model(x)  # [B, classes]
                    loss = criterion(out.float(), y)
                    if mesa_on:
                        with torch.no_grad():
                            teacher = ema.module(x).float().softmax(dim=-1)  # [B, classes]
                        loss = loss + cfg.mesa * soft_ce(out.float(), teacher)
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.optim.clip_grad > 0:
                    meters.add("grad_norm", accelerator.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            meters.add("loss", loss)
            images_since += len(x)
            bar.update(1)
            if not accelerator.sync_gradients:
                continue

            step += 1
            state["updates_in_epoch"] += 1
            if scheduler is not None:
                scheduler.step_update(num_updates=step)
            if ema is not None:
                ema.update(raw_model)

            if step % cfg.log.every == 0:
                if cfg.log.debug_ranks:
                    last_local = meters.local()
                elapsed = time.time() - t_log
                m = meters.reduce(accelerator, extra_sums={"images_per_s": images_since / max(elapsed, 1e-9)})
                m.update(lr=optimizer.param_groups[0]["lr"],
                         epoch=epoch + state["updates_in_epoch"] / sampler.updates_per_epoch)
                accelerator.log({f"train/{k}": v for k, v in m.items()}, step=step)
                metrics_file.write(step, {f"train/{k}": v for k, v in m.items()})
                log.info(f"(step {step}) epoch {epoch + 1} loss {m['loss']:.4f} lr {m['lr']:.3e} "
                         + (f"grad_norm {m['grad_norm']:.3f} " if "grad_norm" in m else "")
                         + f"images/s {m['images_per_s']:.1f}")
                bar.set_postfix(loss=f"{m['loss']:.3f}", lr=f"{m['lr']:.2e}")
                meters.reset()
                t_log, images_since = time.time(), 0
            if cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0:
                save()
            if (world == 1 or step % cfg.checkpoint.stop_check_every == 0) and stop.should_stop(accelerator):
                stopped = signal.Signals(stop.received).name if stop.received else "a signal on another process"
            elif cfg.max_steps and step >= cfg.max_steps:
                stopped = f"max_steps={cfg.max_steps}"
            if stopped:
                state["global_step"] = step
                log.info(f"stopping at step {step} ({stopped}): saving a checkpoint")
                save()
                break
        bar.close()
        if stopped:
            break

        # ---- end of epoch: evaluate, checkpoint ------------------------------------------------
        t_epoch_end = time.time()
        state["global_step"] = step
        n_skipped = int(accelerator.reduce(skipped.to(dev), "sum").item()) if world > 1 else int(skipped)
        state["skipped_images"] += n_skipped
        if n_skipped:
            log.warning(f"epoch {epoch + 1}: skipped {n_skipped} unreadable images (data.bad_images=skip)")
        last_epoch = epoch + 1 == total_epochs
        if (epoch + 1) % cfg.eval_every_epochs == 0 or last_epoch:
            # the bare model: DDP's forward would broadcast buffers, a collective that hangs when
            # the val shards hold different numbers of batches
            last_eval = {"val": evaluate(raw_model, val_loader, accelerator)}
            if ema is not None:
                last_eval["val_ema"] = evaluate(ema.module, val_loader, accelerator)
            state["best_top1"] = max(state["best_top1"], last_eval["val"]["top1"])
            if "val_ema" in last_eval:
                state["best_ema_top1"] = max(state["best_ema_top1"], last_eval["val_ema"]["top1"])
            flat = {f"{k}/{m}": v for k, r in last_eval.items() for m, v in r.items()}
            flat["train/skipped_images"] = state["skipped_images"]
            accelerator.log(flat, step=step)
            metrics_file.write(step, {"epoch": epoch + 1, **flat})
            log.info(f"epoch {epoch + 1}: " + " | ".join(
                f"{k} top-1 {r['top1']:.2f} top-5 {r['top5']:.2f} loss {r['loss']:.4f}" for k, r in last_eval.items())
                + f" | best top-1 {state['best_top1']:.2f}" + (f" ema {state['best_ema_top1']:.2f}" if ema else ""))
        state["epoch"], state["updates_in_epoch"] = epoch + 1, 0
        if (epoch + 1) % cfg.checkpoint.every_epochs == 0 or last_epoch:
            save()
        if stop.should_stop(accelerator):
            stopped = signal.Signals(stop.received).name if stop.received else "a signal on another process"
            log.info(f"stopping after epoch {epoch + 1} ({stopped}): saving a checkpoint")
            save()
        t_log += time.time() - t_epoch_end  # images/s counts training time only

    if cfg.log.debug_ranks:
        T.write_rank_debug(run_dir, accelerator, {
            "model_digest": T.weights_digest(raw_model), "ema_digest": T.weights_digest(ema.module) if ema else None,
            "step": step, "local_train": last_local, "local_val_images": len(val_loader.batch_sampler.indices)})
    if accelerator.is_main_process:  # the weights the run ends with (a resumed run writes them again)
        export_timm(ema.module if ema is not None else raw_model, run_dir / "timm")
    log.info(f"done at step {step}" + (f" (stopped: {stopped})" if stopped else ""))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return {"run_dir": run_dir, "step": step, "state": state, "eval": last_eval, "stopped": stopped,
            "world_size": world}


def export_timm(model: nn.Module, folder: Path) -> Path:
    """`model` as timm saves for the hub (config.json with its architecture, arguments and data config,
    model.safetensors): timm.create_model(f"local-dir:{folder}", pretrained=True) builds and loads it."""
    from timm.models import save_for_hf

    save_for_hf(model, folder, safe_serialization=True)
    return folder


def _config_diffs(old: dict, new: dict, prefix: str = "") -> list[str]:
    diffs = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict) and k != "kwargs":
            diffs += _config_diffs(a, b, f"{prefix}{k}.")
        elif a != b and k not in ("resume", "run_name", "max_steps", "eval_only"):
            diffs.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return diffs


if __name__ == "__main__":
    try:
        main()
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
