"""Train or evaluate ViT³ / H-ViT³ (or any timm classifier) on an ImageFolder with Accelerate.

    accelerate launch train_vit.py --config configs/vit3_small_in1k.yaml data.path=/data/imagenet
    python train_vit.py --config configs/vit3_demo.yaml                    # digits demo, CPU, minutes
    python train_vit.py --config configs/vit3_small_in1k.yaml --eval-only resume=results/000-x/checkpoints/step-N
    python train_vit.py --config ... resume=latest                          # continue the newest run
    python train_vit.py --help                                              # every key, its default, what it does

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
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.loss import SoftTargetCrossEntropy
from tqdm.auto import tqdm

from vit3 import engine, load_weights
from vit3.data import DataConfig, build_datasets, build_mixup, prepare_demo
from vit3.engine import ConfigError, DataError, at_least, between, checked, launch


@dataclasses.dataclass
class ModelConfig:
    name: str = "vit3_small"  # a registered timm model: vit3_tiny/small/base, hvit3_tiny/small/base, ...
    # 0 = the number of class folders
    num_classes: int = checked(0, at_least(0, "an integer >= 0 (0 = the number of class folders)"))
    img_size: int = checked(224, at_least(1))
    drop_path_rate: float = checked(0.1, between(0.0, 1.0))
    grad_checkpointing: bool = False  # recompute each block in the backward pass (less memory, slower)
    kwargs: dict = dataclasses.field(default_factory=dict)  # more create_model kwargs (depth, embed_dim, mixer, ...)


@dataclasses.dataclass
class TrainConfig(engine.TrainConfig):
    """The engine's keys (run folder, seed, precision, optim, ema, checkpoint, log, ...) and these."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    # weight of CE(out, softmax(EMA out)); needs ema.enabled (H-ViT³: 1.0/1.5/2.0 for T/S/B)
    mesa: float = checked(0.0, at_least(0.0))
    mesa_start: float = checked(0.25, between(0.0, 1.0))  # fraction of the epochs after which MESA is on
    weights: str = ""  # model weights to start from or to evaluate (.safetensors, .pth, checkpoint folder)
    eval_only: bool = launch(False)  # evaluate the weights of `resume` or `weights` (model and EMA), then stop
    eval_every_epochs: int = checked(1, at_least(1))
    # stop (with a checkpoint) after this many updates in total; 0 = full schedule
    max_steps: int = launch(0, at_least(0, "an integer >= 0 (0 = the full schedule)"))


@dataclasses.dataclass
class VitState(engine.TrainState):
    """The engine's position and the best top-1 so far, of the model and of its EMA."""

    best_top1: float = 0.0
    best_ema_top1: float = 0.0


FLAGS = {"--eval": "eval_only=true"}
ARCH_KEYS = ("name", "num_classes", "img_size", "kwargs")  # a checkpoint must match these to resume


# ----------------------------------------------------------------------------------------
# Model, data, evaluation
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


def build_data(cfg: TrainConfig, accelerator, micro: int):
    """(cfg with the data folder and class count filled in, train sampler, train loader, val loader)."""
    world, rank = accelerator.num_processes, accelerator.process_index
    with accelerator.main_process_first():
        data_cfg = prepare_demo(cfg.data, cfg.model.img_size)
    train_ds, val_ds = build_datasets(data_cfg, cfg.model.img_size)
    num_classes = len(train_ds.classes)
    if cfg.model.num_classes and cfg.model.num_classes != num_classes:
        raise DataError(f"model.num_classes={cfg.model.num_classes} but {data_cfg.path} has {num_classes} class "
                        f"folders; set model.num_classes={num_classes} (or 0 to follow the data)")
    sampler = engine.ResumableBatchSampler(len(train_ds), micro, world, rank, seed=cfg.seed,
                                           accum_steps=cfg.optim.grad_accum_steps)
    if sampler.updates_per_epoch == 0 and not cfg.eval_only:
        raise DataError(f"{data_cfg.path}/train has {len(train_ds)} images, fewer than one global batch "
                        f"({cfg.data.batch_size}); lower data.batch_size")
    val_sampler = engine.ShardedEvalSampler(len(val_ds), cfg.data.eval_batch_size or micro, world, rank)
    cfg = dataclasses.replace(cfg, data=data_cfg, model=dataclasses.replace(cfg.model, num_classes=num_classes))
    return (cfg, sampler, engine.make_loader(train_ds, sampler, data_cfg, cfg.seed),
            engine.make_loader(val_ds, val_sampler, data_cfg, cfg.seed))


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


def evaluate_all(models: dict[str, nn.Module], loader, run: engine.Run) -> dict:
    """{"val": ..., "val_ema": ...} for each model given, logged in one line."""
    results = {k: evaluate(m, loader, run.accelerator) for k, m in models.items()}
    run.log.info(" | ".join(f"{k} top-1 {r['top1']:.2f} top-5 {r['top5']:.2f} loss {r['loss']:.4f} ({r['n']} images)"
                            for k, r in results.items()))
    return results


def evaluate_epoch(models: dict[str, nn.Module], loader, run: engine.Run, state: VitState, step: int,
                   metrics_file: engine.MetricsFile) -> dict:
    """After epoch `state.epoch` is counted: evaluate, keep the best top-1 in `state`, log to the trackers and
    metrics.jsonl."""
    results = evaluate_all(models, loader, run)
    for key, best in (("val", "best_top1"), ("val_ema", "best_ema_top1")):
        if key in results:
            setattr(state, best, max(getattr(state, best), results[key]["top1"]))
    flat = {f"{k}/{m}": v for k, r in results.items() for m, v in r.items()}
    flat["train/skipped_images"] = state.skipped_images
    run.accelerator.log(flat, step=step)
    metrics_file.write(step, {"epoch": state.epoch, **flat})
    run.log.info(f"epoch {state.epoch}: best top-1 {state.best_top1:.2f}"
                 + (f" ema {state.best_ema_top1:.2f}" if "val_ema" in results else ""))
    return results


def export_timm(model: nn.Module, folder: Path) -> Path:
    """`model` as timm saves for the hub (config.json with its architecture, arguments and data config,
    model.safetensors): timm.create_model(f"local-dir:{folder}", pretrained=True) builds and loads it."""
    from timm.models import save_for_hf

    with engine.atomic_dir(folder) as tmp:  # a fresh folder: no write follows a link left in the old one
        save_for_hf(model, tmp, safe_serialization=True)
    return folder


# ----------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict:
    """Train (or evaluate) as the config and overrides in argv say; returns a summary."""
    cfg, cfg_path = engine.load_config(TrainConfig, argv, flags=FLAGS, usage=__doc__.split("\n\n")[1])
    name = cfg.name or (Path(cfg_path).stem if cfg_path else cfg.model.name)
    if cfg.mesa > 0 and not cfg.ema.enabled:
        raise ConfigError("mesa > 0 needs the EMA teacher: set ema.enabled=true or mesa=0")
    if cfg.eval_only and not (cfg.resume or cfg.weights):
        raise ConfigError("eval_only needs weights: pass resume=<checkpoint folder>|latest or weights=<file>")
    writes = {} if cfg.eval_only else {"timm": "output_dir"}  # checked before any work, with the run folder
    with engine.start_run(cfg, name, ARCH_KEYS, new_run=cfg.eval_only, writes=writes) as run:
        return train(dataclasses.replace(cfg, name=name), run)


def train(cfg: TrainConfig, run: engine.Run) -> dict:
    """Build data, model, EMA, optimizer; resume; train and evaluate (or only evaluate)."""
    acc, log, dev = run.accelerator, run.log, run.accelerator.device
    accum = cfg.optim.grad_accum_steps
    micro = engine.split_batch(cfg.data.batch_size, acc.num_processes, accum)  # per process, per forward
    mixup_on = cfg.data.mixup > 0 or cfg.data.cutmix > 0
    if mixup_on and micro % 2 and not cfg.eval_only:
        raise ConfigError(f"Mixup/CutMix needs an even per-process batch, got {micro}; change data.batch_size")
    cfg, sampler, train_loader, val_loader = build_data(cfg, acc, micro)
    num_classes, config = cfg.model.num_classes, engine.config_to_dict(cfg)

    engine.seed_process(cfg.seed)  # same init on every process
    raw_model = create_model(cfg.model, num_classes).to(dev)
    per_epoch = max(sampler.updates_per_epoch, 1)  # evaluation alone may have less than a batch of training data
    model, ema, optimizer, scheduler = engine.build_optimization(raw_model, cfg, per_epoch,
                                                                 cfg.optim.epochs * per_epoch, acc)
    n_params = sum(p.numel() for p in raw_model.parameters())
    lr, warmup_lr, min_lr = engine.scaled_lrs(cfg.optim, cfg.data.batch_size)
    metrics_file = engine.log_start(run, cfg, extra={
        "global_batch": cfg.data.batch_size, "per_process_batch": micro, "grad_accum_steps": accum,
        "updates_per_epoch": sampler.updates_per_epoch, "scaled_lr": lr, "scaled_warmup_lr": warmup_lr,
        "scaled_min_lr": min_lr, "ema_decay": ema.decay if ema else None, "params": n_params,
        "train_images": len(train_loader.dataset), "val_images": len(val_loader.dataset)}, lines=[
        f"{cfg.model.name}: {n_params / 1e6:.2f}M params, {num_classes} classes, img {cfg.model.img_size} | "
        f"train {len(train_loader.dataset)} / val {len(val_loader.dataset)} images from {cfg.data.path}",
        f"global batch {cfg.data.batch_size} = {acc.num_processes} x {accum} x {micro} | lr {lr:.3g} "
        f"(warm-up from {warmup_lr:.3g}, min {min_lr:.3g}) | {sampler.updates_per_epoch} updates/epoch"])
    models = {"val": raw_model, **({"val_ema": ema.module} if ema else {})}

    if cfg.eval_only:
        src = Path(run.resume_from or cfg.weights)
        load_weights(raw_model, src)
        if ema is not None and not load_weights(ema.module, src, ema=True):
            del models["val_ema"]
        results = evaluate_all(models, val_loader, run)
        engine.write_json(run.dir / "eval.json", {"weights": str(src), **results}, acc)
        engine.finish(run, f"evaluated {src}")
        return {"run_dir": run.dir, "eval": results, "model": raw_model, "ema": ema.module if ema else None}

    # ---- resume or start ----------------------------------------------------------------------
    ckpt = engine.Checkpointer(run, modules={"model": raw_model, **({"ema": ema.module} if ema else {})},
                               states={"optimizer": optimizer, "scheduler": scheduler, "scaler": acc.scaler},
                               config=config, keep_last=cfg.checkpoint.keep_last, state=VitState())
    if not ckpt.restore(cfg.seed, sampler.updates_per_epoch) and cfg.weights:
        load_weights(raw_model, cfg.weights)
        if ema is not None:
            ema.set(raw_model)
    st = ckpt.state
    if acc.log_with:  # (main process only, inside Accelerate)
        acc.init_trackers(cfg.name, config=engine.flat_config(config))

    # ---- train --------------------------------------------------------------------------------
    criterion = SoftTargetCrossEntropy() if mixup_on else nn.CrossEntropyLoss(label_smoothing=cfg.data.label_smoothing)
    mixup_fn = build_mixup(cfg.data, num_classes)
    total_epochs = cfg.optim.epochs + cfg.optim.cooldown_epochs
    mesa_epoch = int(cfg.mesa_start * total_epochs)
    tlog = engine.TrainLog(acc, metrics_file, cfg.log.every)
    step, stopped, last_eval = st.global_step, None, {}
    log.info(f"training {total_epochs} epochs from epoch {st.epoch} (step {step})"
             + (f", MESA {cfg.mesa} from epoch {mesa_epoch}" if cfg.mesa > 0 else ""))
    model.train()
    while st.epoch < total_epochs and stopped is None:
        epoch = st.epoch
        # epochs hold whole updates and a resume starts at an update's first micro-batch, so Accelerate's
        # accumulation count (reset by nothing here) stays in phase with the updates
        sampler.set_epoch(epoch, st.updates_in_epoch * accum)
        mesa_on = cfg.mesa > 0 and epoch >= mesa_epoch
        skipped = torch.zeros((), dtype=torch.long)
        bar = tqdm(total=sampler.batches_per_epoch, initial=st.updates_in_epoch * accum,
                   desc=f"epoch {epoch + 1}/{total_epochs}", disable=not (acc.is_main_process and cfg.log.progress),
                   dynamic_ncols=True)
        for x, y, bad in train_loader:
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            skipped += bad.sum()
            if mixup_fn is not None:
                x, y = mixup_fn(x, y)  # y: [B, classes] soft targets with label smoothing
            with acc.accumulate(model):
                with acc.autocast():
                    out = model(x).float()  # [B, classes]
                    loss = criterion(out, y)
                    if mesa_on:
                        with torch.no_grad():
                            teacher = ema.module(x).float().softmax(dim=-1)  # [B, classes]
                        loss = loss + cfg.mesa * SoftTargetCrossEntropy()(out, teacher)
                engine.optimizer_step(acc, model, optimizer, loss, cfg.optim.clip_grad, tlog.meters)
            tlog.add(loss, len(x), acc.sync_gradients)
            bar.update(1)
            if not acc.sync_gradients:
                continue

            step = st.advance()
            ckpt.watch(loss, step)
            engine.after_update(step, scheduler, ema, raw_model)
            if tlog.due(step):
                ckpt.check()
                tlog.write(step, optimizer, bar, epoch=epoch + st.updates_in_epoch / sampler.updates_per_epoch)
            if cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0:
                ckpt.save()
            stopped = run.stop.reason(acc, step, cfg.checkpoint.stop_check_every) or \
                (f"max_steps={cfg.max_steps}" if cfg.max_steps and step >= cfg.max_steps else None)
            if stopped:
                log.info(f"stopping at step {step} ({stopped}): saving a checkpoint")
                ckpt.save(last=True)
                break
        bar.close()
        if stopped:
            break

        # ---- end of epoch: evaluate, checkpoint ------------------------------------------------
        with tlog.paused():  # images/s counts training time only
            n_skipped = engine.count_over_processes(skipped, acc)
            st.end_epoch(n_skipped)
            if n_skipped:
                log.warning(f"epoch {epoch + 1}: skipped {n_skipped} unreadable images (data.bad_images=skip)")
            last_epoch = epoch + 1 == total_epochs
            if (epoch + 1) % cfg.eval_every_epochs == 0 or last_epoch:
                # the bare model: DDP's forward would broadcast buffers, a collective that hangs when
                # the val shards hold different numbers of batches
                last_eval = evaluate_epoch(models, val_loader, run, st, step, metrics_file)
            if (cfg.checkpoint.every_epochs and (epoch + 1) % cfg.checkpoint.every_epochs == 0) or last_epoch:
                ckpt.save(last=last_epoch)
            stopped = run.stop.reason(acc, 0, 1)
            if stopped:
                log.info(f"stopping after epoch {epoch + 1} ({stopped}): saving a checkpoint")
                ckpt.save(last=True)

    if acc.is_main_process:  # the weights the run ends with (a resumed run writes them again)
        export_timm(ema.module if ema is not None else raw_model, run.dir / "timm")
    engine.finish(run, f"done at step {step}" + (f" (stopped: {stopped})" if stopped else ""))
    return {"run_dir": run.dir, "step": step, "state": st, "eval": last_eval, "stopped": stopped,
            "preempted": run.stop.fired, "world_size": acc.num_processes, "model": raw_model,
            "ema": ema.module if ema else None, "local_train": tlog.meters.last_local}


if __name__ == "__main__":
    engine.run_script(main)
