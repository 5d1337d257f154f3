"""Sampling DiT³: DiT's DDPM with the learned variance, diffusers' DDIM and DPM-Solver++, and SiT's flow samplers.

DDPM runs (`dit3.diffusion`):

* "ddpm": ADM's ancestral p_sample on a respaced chain (DiT samples 250 of the 1000 training
  steps), with the variance the network predicts; `dit3.diffusion.GaussianDiffusion` does the math.
* "ddim", "dpm": diffusers' DDIMScheduler (eta 0) and DPMSolverMultistepScheduler (DPM-Solver++,
  order 2) on the same betas; they use the predicted epsilon only.

Flow-matching runs (`dit3.flow`, SiT: https://arxiv.org/abs/2401.08740), through a `FlowScheduler`:
"euler", "heun", "dopri5" (probability-flow ODE), "sde-euler", "sde-heun" (SDE).

Classifier-free guidance: eps = uncond + s * (cond - uncond) on all latent channels by default
(`cfg_channels=3` is DiT's choice, for exact reproduction), optionally only for timesteps inside
`cfg_interval` (fractions of the 1000-step chain, "guidance interval"; for flow runs the noise
fraction 1 - t, t running from noise 0 to data 1). A flow model's prediction (velocity, noise or
score) is guided as DiT guides epsilon.

Noise: `generator` is one CPU torch.Generator for the whole batch, or a list with one per sample;
with a list, sample i depends only on its own generator, never on the batch it is drawn in, the
device, or the training RNG streams (training draws its grids mid-run); dopri5 is the exception, its
adaptive steps being chosen for the whole batch (bulk sampling's fixed batches keep it reproducible).
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from tqdm.auto import tqdm

from .diffusion import create_diffusion
from .latents import decode

SAMPLERS = ("ddpm", "ddim", "dpm")  # DDPM runs
FLOW_SAMPLERS = ("euler", "heun", "dopri5", "sde-euler", "sde-heun")  # flow-matching runs


def randn(shape: Sequence[int], generator: torch.Generator | Sequence[torch.Generator] | None) -> torch.Tensor:
    """[n, *shape[1:]] standard normal on the CPU: one draw per sample if `generator` is a list."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for {shape[0]} samples")
        return torch.stack([torch.randn(tuple(shape[1:]), generator=g) for g in generator])
    return torch.randn(tuple(shape), generator=generator)


def make_scheduler(sampler: str, num_train_timesteps: int = 1000):
    """The diffusers scheduler for `sampler` with DiT's linear betas (1e-4 .. 0.02) and epsilon prediction."""
    common = dict(num_train_timesteps=num_train_timesteps, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                  prediction_type="epsilon")
    if sampler == "ddpm":
        return DDPMScheduler(**common, variance_type="learned_range", clip_sample=False)
    if sampler == "ddim":
        return DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=False)
    if sampler == "dpm":
        return DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++", solver_order=2)
    raise ValueError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")


def guided_output(model, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, cfg_scale: float,
                  cfg_channels: int | None = None, cfg_interval: tuple[float, float] | None = None,
                  num_train_timesteps: int = 1000) -> torch.Tensor:
    """The network's output [B, out_channels, H, W] at x [B, C, H, W], original timesteps t [B], guided.

    Guidance runs when cfg_scale > 1 and t / num_train_timesteps lies in cfg_interval (if given);
    it batches the conditional and the null-class pass together (DiT's forward_with_cfg).
    """
    frac = float(t[0]) / num_train_timesteps
    if cfg_scale <= 1.0 or (cfg_interval is not None and not cfg_interval[0] <= frac <= cfg_interval[1]):
        return model(x, t, labels).sample
    null = torch.full_like(labels, model.num_classes)
    out = model.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null]), cfg_scale,
                                 channels=cfg_channels)
    return out[: len(x)]


def flow_model_fn(model, labels: torch.Tensor, cfg_scale: float, cfg_channels: int | None = None,
                  cfg_interval: tuple[float, float] | None = None, autocast=None):
    """The network as the flow samplers call it: (x [B, C, H, W], t [B] in [0, 1]) -> its prediction
    [B, C, H, W] in x's dtype, guided where the noise fraction 1 - t lies in cfg_interval (if given); a
    learned-sigma model's second half of channels is dropped, as SiT does."""

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        inside = cfg_interval is None or cfg_interval[0] <= 1.0 - float(t[0]) <= cfg_interval[1]
        with autocast() if autocast is not None else torch.autocast(x.device.type, enabled=False):
            out = guided_output(model, x, t, labels, cfg_scale if inside else 1.0, cfg_channels)
        return out[:, : x.shape[1]].to(x.dtype)

    return fn


@torch.no_grad()
def sample(model, labels: torch.Tensor, shape: tuple[int, int, int], *, sampler: str = "ddpm",
           num_steps: int = 250, cfg_scale: float = 1.0, cfg_channels: int | None = None,
           cfg_interval: tuple[float, float] | None = None,
           generator: torch.Generator | Sequence[torch.Generator] | None = None, autocast=None,
           progress: bool = False, flow=None) -> torch.Tensor:
    """Draw len(labels) samples [B, *shape] in the model's space (scaled latents or pixels).

    model: a DiT3 (not a DDP wrapper); put in eval mode here, its mode restored after.
    labels: [B] class ids on the model's device; the null class is model.num_classes.
    autocast: a context-manager factory for the network calls (e.g. accelerator.autocast).
    flow: the `dit3.flow.FlowScheduler` of a flow-matching model, for the FLOW_SAMPLERS (num_steps counts
    as SiT's: grid points; dopri5 picks its own steps).
    """
    if sampler in FLOW_SAMPLERS and flow is None:
        raise ValueError(f"sampler {sampler!r} samples flow-matching models: pass the model's FlowScheduler as flow=")
    if flow is not None and sampler not in FLOW_SAMPLERS:
        raise ValueError(f"a flow-matching model samples with {', '.join(FLOW_SAMPLERS)}, not {sampler!r}")
    device = labels.device
    n = len(labels)
    x = randn((n, *shape), generator).to(device)
    was_training = model.training
    model.eval()

    def net(x, t_model):
        with autocast() if autocast is not None else torch.autocast(device.type, enabled=False):
            out = guided_output(model, x, t_model, labels, cfg_scale, cfg_channels, cfg_interval)
        return out.float()

    if flow is not None:
        fn = flow_model_fn(model, labels, cfg_scale, cfg_channels, cfg_interval, autocast)
        x = flow.sample(fn, x, num_steps, sampler=sampler, generator=generator, progress=progress)
    elif sampler == "ddpm":
        diffusion = create_diffusion(str(num_steps))
        for i in tqdm(range(diffusion.num_timesteps)[::-1], desc="sampling", disable=not progress, leave=False):
            t = torch.full((n,), i, device=device, dtype=torch.long)
            out = net(x, diffusion.on(diffusion.timestep_map, device)[t])  # the network knows the original timesteps
            x = diffusion.p_sample(out, x, t, noise=randn(x.shape, generator).to(device))
    else:
        scheduler = make_scheduler(sampler)
        scheduler.set_timesteps(num_steps)
        for t in tqdm(scheduler.timesteps, desc="sampling", disable=not progress, leave=False):
            eps = net(x, t.to(device).expand(n))[:, : x.shape[1]]
            x = scheduler.step(eps, t, x).prev_sample
    model.train(was_training)
    return x


def sample_images(model, labels: torch.Tensor, shape: tuple[int, int, int], vae=None, scale: float = 1.0,
                  **kwargs) -> torch.Tensor:
    """Images [B, 3, H, W] in [-1, 1]: `sample` (kwargs: sampler, num_steps, guidance, generator, ...), then the
    VAE's decoding of the latents scaled by `scale`, or (vae None, pixel space) the samples clamped.
    SamplingDiverged where a sample is not an image (`check_samples`)."""
    x = sample(model, labels, shape, **kwargs)
    images = decode(vae, x, scale) if vae is not None else x.clamp(-1, 1)
    check_samples(x, images, f"sampler {kwargs.get('sampler', 'ddpm')}, {kwargs.get('num_steps', 250)} steps, "
                             f"cfg_scale {kwargs.get('cfg_scale', 1.0):g}")
    return images


# Data and the starting noise have an RMS of about 1 (pixels in [-1, 1], latents scaled by the VAE's factor). An
# untrained network's few-step DDPM chain extrapolates x0 by up to 1 / sqrt(alpha_bar) = 160 times its error at
# t = 999, which is noise to look at, not a broken sampler; 10^4 times the data's scale is a solver that blew up
# (a huge cfg_scale or diffusion_norm), whatever clamping would hide.
MAX_SAMPLE_RMS = 1e4


def check_samples(x: torch.Tensor, images: torch.Tensor, settings: str):
    """SamplingDiverged, in one line, if any sample is not an image: x [B, ...] (the model's space) NaN / inf
    or past MAX_SAMPLE_RMS, or images [B, 3, H, W] in [-1, 1] (decoded) NaN / inf or flat (one colour, to
    within a level of 8 bits). SiT's and DiT's samplers would write these as black or grey PNGs."""
    from vit3.errors import SamplingDiverged

    x, images = x.detach().flatten(1).float(), images.detach().flatten(1).float()
    bad = {"NaN / inf": ~(x.isfinite().all(1) & images.isfinite().all(1)),
           f"saturated (RMS over {MAX_SAMPLE_RMS:g} in the model's space, the data's is about 1)":
               x.nan_to_num().pow(2).mean(1).sqrt() > MAX_SAMPLE_RMS,
           "flat (a single colour)": images.nan_to_num().amax(1) - images.nan_to_num().amin(1) < 2 / 255}
    found = {what: int(mask.sum()) for what, mask in bad.items() if mask.any()}
    if found:
        kinds = ", ".join(f"{n} {what}" for what, n in found.items())
        raise SamplingDiverged(
            f"the sampler gave {kinds} of {len(x)} samples ({settings}): not images, so none was written; a "
            "setting is out of the sampler's stable range (lower cfg_scale or diffusion_norm, more steps) or the "
            "checkpoint diverged")


def sample_seed(seed: int, i: int, stream: int = 0) -> int:
    """The seed of sample i of a run seeded `seed` (stream 0: its noise, 1: its random class)."""
    return int(np.random.SeedSequence([seed, i, stream]).generate_state(1)[0])


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] in [-1, 1] -> uint8 [B, H, W, 3] on the CPU, DiT's conversion (so its samples are reproduced)."""
    return torch.clamp(127.5 * images + 128.0, 0, 255).permute(0, 2, 3, 1).to("cpu", dtype=torch.uint8)


def save_pngs(images: np.ndarray, paths: Sequence[Path]):
    """uint8 [B, H, W, 3] images to these PNG paths, each written atomically."""
    from PIL import Image

    from vit3.engine.files import atomic_path  # the training engine: not loaded by `import dit3`

    for img, path in zip(images, paths):
        with atomic_path(path, suffix=".png") as tmp:
            Image.fromarray(img).save(tmp)


def save_grid(images: torch.Tensor, path: Path, nrow: int = 8) -> Path:
    """[B, 3, H, W] in [-1, 1] -> PNG grid, written atomically; images under 64 pixels are enlarged
    (nearest neighbour) so a grid of small images is viewable as it is."""
    from torchvision.utils import save_image

    from vit3.engine.files import atomic_path

    zoom = max(1, 64 // images.shape[-1])
    if zoom > 1:
        images = torch.nn.functional.interpolate(images.float(), scale_factor=zoom, mode="nearest")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, suffix=".png") as tmp:
        save_image(images.float(), tmp, nrow=nrow, normalize=True, value_range=(-1, 1), padding=1)
    return path
