"""Sampling DiT³: ancestral DDPM with the learned variance and classifier-free guidance.

This is DiT's sampler (ADM's p_sample on a respaced chain, e.g. 250 of the 1000 training
steps), driven by `dit3.diffusion.GaussianDiffusion`. All noise comes from a caller's generator
on the CPU, so a sample depends only on that generator's seed, never on the device, the batch it
was drawn in, or the training RNG streams (training draws its grids mid-run).
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .diffusion import create_diffusion


@torch.no_grad()
def sample_ddpm(model, labels: torch.Tensor, shape: tuple[int, int, int], *, num_steps: int = 250,
                cfg_scale: float = 1.0, cfg_channels: int | None = None, generator: torch.Generator | None = None,
                noise: torch.Tensor | None = None, autocast=None, progress: bool = False) -> torch.Tensor:
    """Draw len(labels) samples [B, *shape] (latents or pixels, unscaled model space).

    model: a DiT3 (not a DDP wrapper), put in eval mode here and restored after.
    labels: [B] class ids on the model's device. cfg_scale > 1 guides with the null class
    (model.num_classes); cfg_channels: guide only the leading channels (DiT's 3), default all.
    noise: the starting x_T [B, *shape] (default: drawn from `generator`).
    autocast: a context manager factory for the model calls (e.g. accelerator.autocast).
    """
    device = labels.device
    diffusion = create_diffusion(str(num_steps))
    n = len(labels)
    x = noise if noise is not None else torch.randn((n, *shape), generator=generator)
    x = x.to(device, torch.float32)
    guided = cfg_scale > 1.0
    if guided:
        labels = torch.cat([labels, torch.full_like(labels, model.num_classes)])  # [2B]: cond, then null
    was_training = model.training
    model.eval()
    steps = list(range(diffusion.num_timesteps))[::-1]
    for i in tqdm(steps, desc="sampling", disable=not progress, leave=False):
        t = torch.full((n,), i, device=device, dtype=torch.long)
        t_model = diffusion.timestep_map.to(device)[t]  # the original timestep the network knows
        with autocast() if autocast is not None else torch.autocast(device.type, enabled=False):
            if guided:
                out = model.forward_with_cfg(torch.cat([x, x]), torch.cat([t_model, t_model]), labels,
                                             cfg_scale, channels=cfg_channels)[:n]
            else:
                out = model(x, t_model, labels)
        step_noise = torch.randn(x.shape, generator=generator).to(device)
        x = diffusion.p_sample(out.float(), x, t, noise=step_noise)
    model.train(was_training)
    return x
