"""What bench_models.py measures: the classifier and DiT variants, their batch sizes, and one step of each
task (classifier inference, a DiT training step, a guided DiT sampling step), built on a device; also which
points are skipped because materialised attention's N x N matrices would not fit.
"""
import math

import torch

INFER_MODELS = {"vit3_tiny": "ViT³-T", "hvit3_tiny": "H-ViT³-T"}
INFER_VARIANTS = {  # name -> (mixer, mixer_kwargs)
    "ttt": ("ttt", None),
    "attn_sdpa": ("attention", {"impl": "sdpa"}),
    "attn_math": ("attention", {"impl": "math"}),
}
LABELS = {"ttt": "TTT", "attn_sdpa": "attention (SDPA)", "attn_math": "attention (materialised)"}
# DiT models per device: DiT³ first, then its attention baseline (run with SDPA)
TRAIN_MODELS = {"cpu": ("DiT3-S/2", "DiT-S/2"), "cuda": ("DiT3-B/2", "DiT-B/2")}
TRAIN_BATCH = {"cpu": 8, "cuda": 32}
SAMPLE_MODELS = ("DiT3-XL/2", "DiT-XL/2")
SAMPLE_BATCH = {"cpu": 2, "cuda": 32}  # images; the guided network batch is twice that
SAMPLE_STEPS, SAMPLE_CFG = 250, 4.0  # DiT's sample.py
LATENT_CHANNELS = 4


def dit_variant(model: str) -> str:
    """Results key of a DiT model: "DiT3-S/2" -> "dit3_s2", "DiT-S/2" (the SDPA baseline) -> "dit_s2_sdpa"."""
    key = model.lower().replace("-", "_").replace("/", "")
    return key + "_sdpa" if model.startswith("DiT-") else key


DIT_MODELS = {dit_variant(m): m for m in (*TRAIN_MODELS["cpu"], *TRAIN_MODELS["cuda"], *SAMPLE_MODELS)}


def label(variant: str) -> str:
    return LABELS.get(variant) or DIT_MODELS[variant] + (" (SDPA)" if variant.endswith("_sdpa") else "")


def train_variants(device: str) -> list[str]:
    return [dit_variant(m) for m in TRAIN_MODELS[device]]


def infer_batch(size: int, device: str) -> int:
    """Images per inference call: 1 on CPU; on CUDA 256 at 224 px and below, 16 above (at least 1.5M tokens
    of ViT³-T at 1248, a GPU-filling batch)."""
    return 1 if device == "cpu" else 256 if size <= 224 else 16


#################################################################################
#                                 Steps                                         #
#################################################################################

def stage_layout(model: str, size: int) -> list[tuple[int, int]]:
    """(tokens, heads) of the mixer at each resolution the model runs (one image)."""
    if model.startswith("vit3"):
        return [((size // 16) ** 2, 6)]
    side, out = math.ceil(size / 4), []
    for heads in (2, 4, 10, 16):  # H-ViT³-T stages; maps halve with rounding up
        out.append((side * side, heads))
        side = math.ceil(side / 2)
    return out


def math_attention_bytes(model: str, size: int, elem: int, batch: int = 1) -> int:
    """Largest live N x N memory of materialised attention: scores and their softmax, all heads and images."""
    return max(2 * batch * heads * n * n * elem for n, heads in stage_layout(model, size))


def available_bytes(device: str) -> int:
    if device == "cuda":
        return torch.cuda.mem_get_info()[1]
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) * 1024


def too_big(task: str, group: str, variant: str, size: int, device: str, batch: int = 1) -> str | None:
    """A reason to skip a point whose N x N attention would not fit, else None."""
    if task == "infer" and variant == "attn_math":
        need = math_attention_bytes(group, size, 2 if device == "cuda" else 4, batch)
        have = available_bytes(device)
        if need > 0.6 * have:
            return f"skipped: materialised attention needs ~{need / 2 ** 30:.0f} GiB (have {have / 2 ** 30:.0f})"
    return None


def make_infer_step(model_name: str, variant: str, size: int, device: str, batch: int = 1):
    """One eval-mode forward of a classifier on a batch of size x size images."""
    import vit3

    torch.manual_seed(0)
    mixer, kwargs = INFER_VARIANTS[variant]
    model = vit3.create_model(model_name, img_size=size, num_classes=1000, mixer=mixer,
                              mixer_kwargs=kwargs).to(device).eval()
    x = torch.randn(batch, 3, size, size, device=device)
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=(device == "cuda"))

    def step():
        with torch.inference_mode(), amp:
            model(x)
    return step, model


def build_dit(variant: str, latent: int, device: str, depth: int | None = None):
    """The DiT model of a variant key at a latent size; the baseline with SDPA; depth overridden if given."""
    from dit3.models import DiT3_models

    torch.manual_seed(0)
    kwargs = {"mixer_kwargs": {"impl": "sdpa"}} if variant.endswith("_sdpa") else {}
    if depth:
        kwargs["depth"] = depth
    return DiT3_models[DIT_MODELS[variant]](input_size=latent, num_classes=1000, **kwargs).to(device)


def make_train_step(variant: str, latent: int, device: str, batch: int, depth: int | None = None):
    """One DiT training step: hybrid diffusion loss, backward, AdamW step, on a batch of latents."""
    from dit3.diffusion import create_diffusion

    model = build_dit(variant, latent, device, depth).train()
    diffusion = create_diffusion("")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)
    # AdamW state exists from here on, so every measured step is a steady-state one
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    x = torch.randn(batch, LATENT_CHANNELS, latent, latent, device=device)
    t = torch.randint(0, diffusion.num_timesteps, (batch,), device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=(device == "cuda"))

    def step():
        opt.zero_grad(set_to_none=True)
        with amp:
            loss = diffusion.training_losses(model, x, t, {"class_labels": y})["loss"].mean()
        loss.backward()
        opt.step()
    return step, model


def make_sample_step(variant: str, latent: int, device: str, batch: int, depth: int | None = None):
    """One denoising step of DiT's sampler on a batch, as dit3.sampling.sample runs it: the guided network
    call (conditional and null-class halves in one batch of 2 x batch) and the ancestral DDPM update, at the
    middle step of the 250-step respaced chain (every step costs the same)."""
    from dit3.diffusion import create_diffusion
    from dit3.sampling import guided_output

    model = build_dit(variant, latent, device, depth).eval()
    diffusion = create_diffusion(str(SAMPLE_STEPS))
    x = torch.randn(batch, LATENT_CHANNELS, latent, latent, device=device)
    noise = torch.randn_like(x)
    labels = torch.randint(0, 1000, (batch,), device=device)
    t = torch.full((batch,), SAMPLE_STEPS // 2, device=device, dtype=torch.long)
    t_model = diffusion.on(diffusion.timestep_map, device)[t]  # the network sees the original timesteps
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=(device == "cuda"))

    def step():
        with torch.inference_mode():
            with amp:
                out = guided_output(model, x, t_model, labels, SAMPLE_CFG)
            diffusion.p_sample(out.float(), x, t, noise=noise)
    return step, model


def make_step(task: str, group: str, variant: str, size: int, device: str, batch: int, depth: int | None = None):
    if task == "infer":
        return make_infer_step(group, variant, size, device, batch)
    if task == "sample":
        return make_sample_step(variant, size, device, batch, depth)
    return make_train_step(variant, size, device, batch, depth)


def task_batch(args, task: str, size: int, device: str) -> int:
    """Images per step of a task: the device's default, or the command line's."""
    if task == "infer":
        return args.infer_batch or infer_batch(size, device)
    return (args.train_batch or TRAIN_BATCH[device]) if task == "train" else (args.sample_batch or SAMPLE_BATCH[device])


def ttt_path(model: torch.nn.Module) -> str | None:
    """Which TTT implementation the model's TTT layers run on their device, None without TTT: "triton",
    "fast" or "reference", by `TTT.path`."""
    from vit3.ttt import TTT

    paths = {m.path(m.qkv.weight.device) for m in model.modules() if isinstance(m, TTT)}
    return "+".join(sorted(paths)) or None
