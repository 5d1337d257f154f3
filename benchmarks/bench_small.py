"""Small models on CPU: the digits demo's training step, DiT³ against DiT, in time and in ATen ops.

    python benchmarks/bench_small.py                 # writes results/bench_small_cpu.{md,json}
    python benchmarks/bench_small.py --rounds 10     # a quicker, noisier look

At 16 tokens a step is a few hundred small ops, so fixed per-op cost, not arithmetic, sets its
time. This measures, at the demo config (configs/dit3_demo.yaml: DiT3-S/4 and the DiT-S/4 of the
same size, hidden 96, depth 4, 2 heads, 16x16 pixels, batch 64):

- the training step as train_dit.py runs it (the hybrid diffusion loss, backward, gradient
  clipping, the trainer's optimizer and EMA from vit3.engine), DiT³ against DiT: the median of
  rounds that run one step of each in turn in this process, and ATen ops per step (a
  torch.profiler count of every aten:: op, nested ones included) by phase;
- one token-mixer layer, forward + backward: TTT (its default form, and the primal form
  forced), SDPA attention;
- the TTT layer's two forms of the SwiGLU branch (primal, dual) across token counts, the
  measurement behind fast.DUAL_FORM;
- one batch of the demo's data: 64 PNGs decoded through the transform, against data.in_memory;
- two floors, the same update with DiT³'s TTT layer replaced by less than the layer (FloorTTT): how
  far the step and its op count could fall if the layer's own work cost nothing.

Run it alone: on 2 cores a second busy process stalls every 2-thread op (OpenMP waits for its
second thread), which makes any ratio noise. Times are in ms.
"""
import argparse
import collections
import json
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from bench_common import interleaved_times_ms
from torch.profiler import ProfilerActivity, profile, record_function

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"
DEMO = yaml.safe_load((ROOT / "configs" / "dit3_demo.yaml").read_text())
PHASES = ("forward", "backward", "clip", "optimizer", "ema")
TARGET_STEP_RATIO = 1.3  # DiT³ step / DiT step at the demo size


def median_ms(fns: dict, rounds: int) -> dict:
    """Median time (ms) of each callable over `rounds` interleaved rounds: the benchmarks' one timer, on the CPU."""
    return {name: t["time_ms"] for name, t in interleaved_times_ms(fns, "cpu", rounds=rounds).items()}


def aten_ops(fn, phases: tuple = ()) -> dict:
    """ATen ops of one call of fn (nested included): {"total": n, phase: n, ...} for record_function phases."""
    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    counts = collections.Counter()
    for e in prof.events():
        if not e.name.startswith("aten::"):
            continue
        counts["total"] += 1
        parent = e.cpu_parent
        while parent is not None and parent.name not in phases:
            parent = parent.cpu_parent
        if parent is not None:
            counts[parent.name] += 1
    return dict(counts)


# ----------------------------------------------------------------------------------------
# The demo's training step
# ----------------------------------------------------------------------------------------
def update_step(config: dict, model_name: str):
    """One training update of a train_dit.py config (a dict as read from its yaml) in pixel or latent space,
    as train_dit.py runs it: the config's objective (DDPM's hybrid loss or flow matching), backward,
    gradient clipping, the trainer's optimizer and EMA from vit3.engine. model_name: "DiT3-S/4", "DiT-S/2", ..."""
    from dit3.diffusion import create_diffusion
    from dit3.flow.objective import create_flow
    from dit3.models import DiT3_models
    from vit3 import engine

    m, o, batch = config["model"], config.get("optim", {}), config["data"]["batch_size"]
    latent = bool(config.get("vae", {}).get("name", "stabilityai/sd-vae-ft-ema"))
    size, channels = (m["image_size"] // 8, 4) if latent else (m["image_size"], 3)
    torch.manual_seed(0)
    model = DiT3_models[model_name](input_size=size, in_channels=channels, num_classes=m["num_classes"],
                                    class_dropout_prob=m.get("class_dropout_prob", 0.1), **m.get("kwargs", {}))
    clip = o.get("clip_grad", 0.0)
    optim_cfg = engine.OptimConfig(lr=o.get("lr", 1e-4), lr_batch=0, weight_decay=o.get("weight_decay", 0.0),
                                   sched="constant", warmup_epochs=0, clip_grad=clip)
    # a repa section (train_dit.py's): the encoder, the projector and its term, as the trainer runs them
    alignment = repa_alignment(config.get("repa") or {}, model)
    trained = alignment.aligned if alignment else model
    optimizer, _ = engine.create_optimizer_and_scheduler(trained, optim_cfg, batch, 1, 1)  # constant lr
    ema = engine.create_ema(model, engine.EMAConfig(decay=config.get("ema", {}).get("decay", 0.9999), decay_batch=0),
                            batch)
    if config.get("objective", "ddpm") == "flow":
        f = config.get("flow", {})
        flow = create_flow(f.get("path", "linear"), f.get("prediction", "velocity"), f.get("loss_weight", "none"))

        def losses(x, y):
            return flow.training_losses(trained, x, dict(class_labels=y))["loss"]
    else:
        diffusion = create_diffusion("")

        def losses(x, y):
            return diffusion.training_losses(trained, x, diffusion.sample_timesteps(batch),
                                             dict(class_labels=y))["loss"]
    x = torch.randn(batch, channels, size, size)
    y = torch.randint(0, m["num_classes"], (batch,))

    def step():
        with record_function("forward"):
            loss = losses(x, y).mean()
            if alignment:  # pixel space: x is the image the encoder sees
                loss = loss + alignment.coeff * alignment.loss(x.clamp(-1, 1))
        with record_function("backward"):
            loss.backward()
        with record_function("clip"):  # what accelerator.clip_grad_norm_ calls on one process
            if clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        with record_function("optimizer"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        with record_function("ema"):
            ema.update(model)
        return loss.detach()
    return step


def repa_alignment(repa: dict, model):
    """dit3.repa.Alignment for a train_dit.py config's repa section, or None when it names no encoder."""
    if not repa.get("encoder"):
        return None
    from dit3.repa import Alignment
    from dit3.train_config import RepaConfig

    return Alignment.build(RepaConfig(**repa), model, "cpu")


def mixer_step(name: str, form: str | None = None, batch: int = 64, side: int = 4, dim: int = 96, heads: int = 2):
    """Forward + backward of one token mixer ("ttt", "attention") on [batch, side^2, dim]; form forces the
    TTT SwiGLU branch's form ("primal" or "dual")."""
    from vit3.mixers import build_mixer
    from vit3.ttt import fast

    torch.manual_seed(0)
    layer = build_mixer(name, dim, heads)
    x = torch.randn(batch, side * side, dim, requires_grad=True)

    def step():  # -> the layer's output
        old = fast.DUAL_FORM["max_tokens_per_width"]
        if form is not None:
            fast.DUAL_FORM["max_tokens_per_width"] = {"primal": 0.0, "dual": float("inf")}[form]
        try:
            y = layer(x, side, side)
            y.sum().backward()
        finally:
            fast.DUAL_FORM["max_tokens_per_width"] = old
        return y.detach()
    return step


# ----------------------------------------------------------------------------------------
# Floors: the DiT³ update with less than its TTT layer
# ----------------------------------------------------------------------------------------
def floor_ttt(kind: str, dim: int, num_heads: int, **kwargs):
    """A stand-in for the TTT layer with its parameters and shapes but less work (not its maths; never trained):

    - "matmuls": the dual form's GEMMs ([Q; K] W, the Gram matrices [Q; K] K^T, their product with P) and the
      conv branch's convolutions (the kernel's gradient from k and v, the trained kernel on q), at the fast
      path's shapes, joined by two additions and nothing else: no silu terms, norms or step, and autograd's
      backward (the same number of GEMMs as the fast path's). No implementation of the layer's maths on torch's
      GEMMs and convolutions does less.
    - "none": no inner step at all: SDPA on the layer's own q1, k1, v1, the conv columns passed to the
      projection. What a DiT³ costs beyond DiT without test-time training: the CPE, the 1.5x wider qkv
      projection, the wider output projection, more parameter tensors to clip, step and average.
    """
    from vit3.ttt import TTT

    class FloorTTT(TTT):
        def forward(self, x, h, w, rope=None):  # x: [B, N, C]
            b, n, dim = x.shape
            heads, c = self.num_heads, self.conv_dim
            d = dim // heads
            qkv = self.qkv(x)  # [B, N, 3C + 3c]
            if kind == "none":
                q, k, v = qkv[..., :3 * dim].view(b, n, 3, heads, d).permute(2, 0, 3, 1, 4)
                y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, dim)
                return self.proj(torch.cat([y, qkv[..., 3 * dim:3 * dim + c]], -1))
            t = qkv[..., :3 * dim].view(b, n, 3, heads, d).permute(3, 2, 0, 1, 4).contiguous()  # [H, 3, B, N, d]
            zz = torch.bmm(t[:, :2].reshape(heads, 2 * b * n, d), torch.cat([self.w1, self.w2], -1)[0])
            sg = t[:, :2] @ t[:, 1:2].transpose(-1, -2)  # [S; G]: [H, 2, B, N, N]
            y = zz[:, :b * n].view(heads, b, n, 2 * d) + (sg @ zz[:, b * n:].view(heads, 1, b, n, 2 * d))[:, 0]
            maps = qkv[..., 3 * dim:].reshape(b, h, w, 3, c).permute(3, 1, 2, 0, 4).contiguous()  # [3, h, w, B, c]
            q2, k2, v2 = (m.view(1, h, w, b * c).permute(0, 3, 1, 2) for m in maps.unbind(0))
            g3 = torch.nn.grad.conv2d_weight(k2, (b * c, 1, 3, 3), v2, padding=1, groups=b * c)
            y2 = F.conv2d(q2, g3 + self.w3.repeat(b, 1, 1, 1), padding=1, groups=b * c)  # [1, B*c, h, w]
            y2 = y2.permute(0, 2, 3, 1).reshape(n, b, c).transpose(0, 1)
            return self.proj(torch.cat([y[..., :d].permute(1, 2, 0, 3).reshape(b, n, dim), y2], -1))

    return FloorTTT(dim, num_heads, **kwargs)


def floor_step(kind: str):
    """The demo's DiT³ update (update_step) with floor_ttt(kind) in place of each TTT layer."""
    import dit3.models

    build = dit3.models.build_mixer
    dit3.models.build_mixer = lambda name, *a, **k: floor_ttt(kind, *a, **k) if name == "ttt" else build(name, *a, **k)
    try:
        return update_step(DEMO, "DiT3-S/4")
    finally:
        dit3.models.build_mixer = build


def data_batch(in_memory: bool):
    """Reading one batch of 64 demo digits (items as the ResumableBatchSampler asks for them)."""
    from dit3.latents import image_transform
    from vit3.data import InMemoryFolder, open_image_folder
    from vit3.digits import default_demo_path, prepare_digits

    root = prepare_digits(default_demo_path("digits", 16), 16) / "train"
    folder = open_image_folder(root, image_transform(16, hflip=False))  # the demo's transform
    dataset = InMemoryFolder(folder, hflip=False) if in_memory else folder
    items = [(i * 7 % len(dataset), i) for i in range(64)]
    return lambda: torch.utils.data.default_collate([dataset[i] for i in items])


# ----------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------
def measure(rounds: int) -> dict:
    res = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
           "torch": torch.__version__, "rounds": rounds}
    steps = {f: update_step(DEMO, f"{f}-S/4") for f in ("DiT3", "DiT")}
    res["step_ms"] = median_ms(steps, rounds)
    res["step_ratio"] = res["step_ms"]["DiT3"] / res["step_ms"]["DiT"]
    res["step_ops"] = {f: aten_ops(s, PHASES) for f, s in steps.items()}
    floors = {"DiT": steps["DiT"], "matmuls": floor_step("matmuls"), "none": floor_step("none")}
    res["floor_ms"] = median_ms(floors, rounds)  # with DiT again: ratios within one run
    res["floor_ops"] = {k: aten_ops(floors[k])["total"] for k in ("matmuls", "none")}
    layers = {"ttt": mixer_step("ttt"), "ttt_primal": mixer_step("ttt", "primal"),
              "attention": mixer_step("attention")}
    res["layer_ms"] = median_ms(layers, rounds * 4)
    res["layer_ops"] = {k: aten_ops(s)["total"] for k, s in layers.items()}
    res["forms"] = []
    for side in (4, 6, 8, 10):  # N = 16 .. 100 tokens at head width 48, ~1024 tokens a call
        n = side * side
        forms = {f: mixer_step("ttt", f, batch=max(1, 1024 // n), side=side) for f in ("primal", "dual")}
        res["forms"].append({"tokens": n, "head_width": 48, **median_ms(forms, rounds * 2)})
    res["data_ms"] = median_ms({"png_folder": data_batch(False), "in_memory": data_batch(True)}, rounds)
    return res


def markdown(res: dict) -> list[str]:
    ops = res["step_ops"]
    lines = [f"Measured on {res['machine']}, torch {res['torch']}, medians of {res['rounds']} interleaved rounds "
             "(`python benchmarks/bench_small.py`).", "",
             "| training step, demo config | DiT³-S/4 | DiT-S/4 | ratio |", "|---|---:|---:|---:|",
             f"| time (ms) | {res['step_ms']['DiT3']:.1f} | {res['step_ms']['DiT']:.1f} | {res['step_ratio']:.2f}x |"]
    for phase in ("total", *PHASES):
        a, b = ops["DiT3"].get(phase, 0), ops["DiT"].get(phase, 0)
        lines.append(f"| ATen ops, {phase} | {a} | {b} | {a / max(b, 1):.2f}x |")
    fl = res["floor_ms"]
    lines += ["", "| the DiT³ update with its TTT layers replaced (floors) | ms | / DiT (same run) | ATen ops |",
              "|---|---:|---:|---:|"]
    for k, label in (("matmuls", "the layer's GEMMs and convolutions only"), ("none", "no inner step (SDPA)")):
        lines.append(f"| {label} | {fl[k]:.1f} | {fl[k] / fl['DiT']:.2f}x | {res['floor_ops'][k]} |")
    lines += ["", "| one mixer layer, forward + backward, B=64, 4x4 tokens, C=96, 2 heads | ms | ATen ops |",
              "|---|---:|---:|"]
    for k, label in (("ttt", "TTT (fast path, default form)"), ("ttt_primal", "TTT, primal form forced"),
                     ("attention", "attention (SDPA)")):
        lines.append(f"| {label} | {res['layer_ms'][k]:.2f} | {res['layer_ops'][k]} |")
    lines += ["", "| tokens N (head width 48, 1024 tokens a call) | primal (ms) | dual (ms) | dual / primal |",
              "|---:|---:|---:|---:|"]
    for f in res["forms"]:
        lines.append(f"| {f['tokens']} | {f['primal']:.2f} | {f['dual']:.2f} | {f['dual'] / f['primal']:.2f} |")
    d = res["data_ms"]
    lines += ["", "| one batch of 64 demo digits | ms |", "|---|---:|",
              f"| PNG folder (decode + transform per image) | {d['png_folder']:.2f} |",
              f"| data.in_memory | {d['in_memory']:.2f} |"]
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=30, help="timed rounds of each step (layers: 4x)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the demo config's)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for bench_small_cpu.{md,json}")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    res = measure(args.rounds)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_small_cpu.json").write_text(json.dumps(res, indent=2))
    text = "\n".join(markdown(res)) + "\n"
    (args.out / "bench_small_cpu.md").write_text(text)
    print(text)
    ok = res["step_ratio"] <= TARGET_STEP_RATIO
    floor = res["floor_ms"]["matmuls"] / res["floor_ms"]["DiT"]
    print(f"target: DiT³ step <= {TARGET_STEP_RATIO}x DiT's: {'met' if ok else 'MISSED'} ({res['step_ratio']:.2f}x; "
          f"with the TTT layer's GEMMs and convolutions only: {floor:.2f}x)")


if __name__ == "__main__":
    main()
