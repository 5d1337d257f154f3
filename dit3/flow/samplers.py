"""Sampling a flow-matching model: SiT's ODE and SDE samplers, and `FlowScheduler` for pipelines.

SiT (Ma et al. 2024): https://arxiv.org/abs/2401.08740 ; timestep shift (SD3, Esser et al. 2024):
https://arxiv.org/abs/2403.03206 ; dopri5 through torchdiffeq: https://github.com/rtqichen/torchdiffeq

From noise x at t0 to data at t1 (`FlowMatching.interval`), with v the velocity and s the score that
the network's prediction gives:

* ODE, the probability flow dx = v dt: "euler", "heun" (torchdiffeq's heun2: Heun's trapezoid on
  a fixed grid, the end included) and "dopri5" (adaptive Dormand-Prince, tolerances atol / rtol;
  the number of steps is its own; like SiT's, its last step may reach past t1 before it interpolates
  back, so the network is called a little beyond t1 there).
* SDE, dx = (v + w(t) s) dt + sqrt(2 w(t)) dW, with w(t) of SiT's forms (`diffusion_coefficient`):
  "euler" (Euler-Maruyama) or "heun" (noise first, then Heun's step on the drift, as SiT), then SiT's
  last step to t = 1: "mean" (a drift step without noise), "tweedie" (E[x1 | x_t]), "euler" (a velocity
  step) or "none" (stop at t1 = 1 - sample_eps).

The fixed grids count as SiT's num_steps: num_steps points from t0 to t1, so num_steps - 1 steps
(plus the SDE's last step). `shift` > 1 moves the grid toward noise, as SD3 does for larger images: the
noise level 1 - u of a uniform grid u becomes shift (1 - u) / (1 + (shift - 1)(1 - u)), ends kept.
The network sees t [B] in [0, 1]; SDE noise is drawn per step from `generator` (one CPU generator, or
one per sample: then each sample's noise is its own, as for the DDPM samplers).
"""
from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from torchdiffeq import odeint
from tqdm.auto import tqdm

from ..sampling import FLOW_SAMPLERS, randn
from .objective import FlowMatching, expand_like

ODE_METHODS = {"euler": "euler", "heun": "heun2", "dopri5": "dopri5"}  # ours -> torchdiffeq's
SDE_METHODS = ("euler", "heun")
DIFFUSION_FORMS = ("sigma", "SBDM", "constant", "linear", "decreasing", "increasing-decreasing")
LAST_STEPS = ("mean", "tweedie", "euler", "none")

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x [B, ...], t [B]) -> prediction [B, ...]


def time_grid(t0: float, t1: float, num_steps: int, shift: float = 1.0) -> list[float]:
    """num_steps times from t0 to t1 (float64 values), shifted toward noise by `shift`."""
    if shift == 1.0:  # SiT's grid, value for value
        return torch.linspace(t0, t1, num_steps, dtype=torch.float64).tolist()
    noise_level = 1 - torch.linspace(0, 1, num_steps, dtype=torch.float64)
    u = 1 - shift * noise_level / (1 + (shift - 1) * noise_level)
    return (t0 + (t1 - t0) * u).tolist()


def diffusion_coefficient(flow: FlowMatching, t: torch.Tensor, form: str = "sigma", norm: float = 1.0):
    """w(t), SiT's forms: "sigma" norm sigma_t (SiT's sampling default), "SBDM" norm w_t (the score
    SDE's own), "constant" norm, "linear" norm (1 - t), "decreasing" (norm cos(pi t) + 1)^2 / 4,
    "increasing-decreasing" norm sin(pi t)^2."""
    if form == "sigma":
        return norm * flow.path.sigma(t)[0]
    if form == "SBDM":
        return norm * flow.path.velocity_weight(t)
    if form == "constant":  # a tensor, where SiT's float breaks its own sqrt
        return torch.full_like(t, norm)
    if form == "linear":
        return norm * (1 - t)
    if form == "decreasing":
        return 0.25 * (norm * torch.cos(math.pi * t) + 1) ** 2
    if form == "increasing-decreasing":
        return norm * torch.sin(math.pi * t) ** 2
    raise ValueError(f"unknown diffusion form {form!r}; choose one of {', '.join(DIFFUSION_FORMS)}")


def _times(t: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """t as [B] in x's dtype and device."""
    return torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(len(x))


@torch.no_grad()
def sample_ode(flow: FlowMatching, model_fn: ModelFn, x: torch.Tensor, *, method: str = "heun",
               num_steps: int = 50, shift: float = 1.0, atol: float = 1e-6, rtol: float = 1e-3) -> torch.Tensor:
    """The probability-flow ODE from noise x [B, ...] at t0 to t1: the sample [B, ...]."""
    if method not in ODE_METHODS:
        raise ValueError(f"unknown ODE method {method!r}; choose one of {', '.join(ODE_METHODS)}")
    check_sampler(flow, method, num_steps, shift)
    t0, t1 = flow.interval(sampling=True)

    def velocity(t, x):
        t = _times(t, x)
        return flow.velocity(model_fn(x, t), x, t)

    if method == "dopri5":  # adaptive: only the ends matter; the steps are the solver's
        ends = torch.tensor([t0, t1], dtype=torch.float64, device=x.device)
        return odeint(velocity, x, ends, method="dopri5", atol=atol, rtol=rtol)[-1]
    grid = torch.tensor(time_grid(t0, t1, num_steps, shift), dtype=x.dtype, device=x.device)
    # the grid goes in as the solver's own steps, so only the two ends are kept in memory
    return odeint(velocity, x, grid[[0, -1]], method=ODE_METHODS[method],
                  options=dict(grid_constructor=lambda *_: grid))[-1]


@torch.no_grad()
def sample_sde(flow: FlowMatching, model_fn: ModelFn, x: torch.Tensor, *, method: str = "euler",
               num_steps: int = 250, diffusion_form: str = "sigma", diffusion_norm: float = 1.0,
               last_step: str = "mean", last_step_size: float = 0.04, shift: float = 1.0,
               generator: torch.Generator | Sequence[torch.Generator] | None = None,
               progress: bool = False) -> torch.Tensor:
    """The reverse-time SDE from noise x [B, ...] at t0 to t = 1 (SiT's `sample_sde`): the sample [B, ...]."""
    if method not in SDE_METHODS or last_step not in LAST_STEPS:
        raise ValueError(f"SDE method {method!r}, last step {last_step!r}: choose from {SDE_METHODS}, {LAST_STEPS}")
    check_sampler(flow, f"sde-{method}", num_steps, shift, diffusion_form, diffusion_norm, last_step, last_step_size)
    last_step_size = 0.0 if last_step == "none" else last_step_size
    t0, t1 = flow.interval(sampling=True, sde=True, diffusion_form=diffusion_form, last_step_size=last_step_size)
    grid = time_grid(t0, t1, num_steps, shift)

    def w(t, x):  # w(t) shaped to broadcast against x
        return diffusion_coefficient(flow, expand_like(t, x), diffusion_form, diffusion_norm)

    def drift(x, t):
        """(SDE drift, velocity, score) at x, times t [B]: one network call."""
        out = model_fn(x, t)
        v, s = flow.velocity(out, x, t), flow.score(out, x, t)
        return v + w(t, x) * s, v, s

    for t_cur, t_next in tqdm(list(zip(grid[:-1], grid[1:])), desc="sampling", disable=not progress, leave=False):
        dt, t = t_next - t_cur, _times(t_cur, x)
        dw = randn(x.shape, generator).to(x) * math.sqrt(dt)
        if method == "euler":  # Euler-Maruyama
            x = x + drift(x, t)[0] * dt + torch.sqrt(2 * w(t, x)) * dw
        else:  # SiT's Heun: the noise first, then Heun's step on the drift from there
            x = x + torch.sqrt(2 * w(t, x)) * dw
            k1 = drift(x, t)[0]
            k2 = drift(x + dt * k1, _times(t_next, x))[0]
            x = x + 0.5 * dt * (k1 + k2)
    if last_step == "none":
        return x
    t = _times(t1, x)
    sde_drift, v, s = drift(x, t)
    if last_step == "mean":
        return x + sde_drift * last_step_size
    if last_step == "euler":
        return x + v * last_step_size
    alpha, sigma = flow.path.alpha(expand_like(t, x))[0], flow.path.sigma(expand_like(t, x))[0]
    return x / alpha + sigma ** 2 / alpha * s  # Tweedie: E[x1 | x_t] = (x_t + sigma_t^2 score) / alpha_t


DOPRI5_OVERSHOOT = 0.1  # how far past t1 dopri5's adaptive last step is taken to reach, as a share of [t0, t1]


def network_times(flow: FlowMatching, sampler: str, num_steps: int = 2, shift: float = 1.0,
                  diffusion_form: str = "sigma", last_step: str = "mean",
                  last_step_size: float = 0.04) -> tuple[list[float], float | None]:
    """(the grid times at which `sampler` calls the network, the time of the SDE's last step or None).
    Euler calls it at every grid point but the last, Heun at every one (its second stage lands on the
    next point); dopri5 at its ends, where the maths can be singular, and past t1, where its last step may
    reach (DOPRI5_OVERSHOOT of the interval is probed)."""
    sde = sampler.startswith("sde-")
    size = 0.0 if last_step == "none" else last_step_size
    t0, t1 = flow.interval(sampling=True, sde=sde, diffusion_form=diffusion_form, last_step_size=size)
    if sampler == "dopri5":  # past t1, densely: VP's sigma_t is NaN only just past 1
        past = torch.linspace(t1, t1 + DOPRI5_OVERSHOOT * (t1 - t0), 1001, dtype=torch.float64)[1:].tolist()
        return [t0, t1, *past], None
    grid = time_grid(t0, t1, num_steps, shift)
    return (grid if sampler.endswith("heun") else grid[:-1]), (t1 if sde and last_step != "none" else None)


def check_sampler(flow: FlowMatching, sampler: str, num_steps: int = 2, shift: float = 1.0,
                  diffusion_form: str = "sigma", diffusion_norm: float = 1.0, last_step: str = "mean",
                  last_step_size: float = 0.04):
    """ValueError, one line naming the setting and a safe alternative, where `sampler` divides by zero.

    SiT's maths is singular at the ends of [0, 1] for some settings: the score of a velocity or noise model
    at t = 1 (sigma_t = 0), SBDM's w(t) and a noise model's velocity at t = 0 (alpha_t = 0). SiT's samplers
    then return NaN, black images, without a word. Here each step's own arithmetic (the ODE's velocity, the
    SDE's drift v + w s, the last step) runs in float64 on x = prediction = 1 at each time the sampler calls
    the network; a non-finite result is refused before any network call."""
    times, last = network_times(flow, sampler, num_steps, shift, diffusion_form, last_step, last_step_size)
    sde = sampler.startswith("sde-")

    def step_values(t: list[float], step: str) -> torch.Tensor:
        """What the step at times t [T] computes from x = prediction = 1, [T, 1]: the ODE's velocity, the SDE's
        drift, or the last step's (mean: the drift, euler: the velocity, tweedie: E[x1 | x_t])."""
        tt = torch.tensor(t, dtype=torch.float64)
        x = torch.ones(len(t), 1, dtype=torch.float64)
        v = flow.velocity(x, x, tt)
        if step in ("ode", "euler"):
            return v
        s = flow.score(x, x, tt)
        if step == "tweedie":
            alpha, sigma = flow.path.alpha(tt.view(-1, 1))[0], flow.path.sigma(tt.view(-1, 1))[0]
            return x / alpha + sigma ** 2 / alpha * s
        return v + diffusion_coefficient(flow, tt.view(-1, 1), diffusion_form, diffusion_norm) * s

    for ts, step in [(times, "sde" if sde else "ode")] + ([([last], last_step)] if last is not None else []):
        finite = torch.isfinite(step_values(ts, step)).all(1)
        if not finite.all():
            t = ts[int((~finite).nonzero()[0])]
            raise ValueError(_singular_message(flow, sampler, t, diffusion_form, last_step, last_step_size))


def _singular_message(flow: FlowMatching, sampler: str, t: float, diffusion_form: str, last_step: str,
                      last_step_size: float) -> str:
    sde = sampler.startswith("sde-")
    settings = f"path={flow.path_name}, prediction={flow.prediction}, sample_eps={flow.sample_eps:g}"
    if sde:
        settings += f", diffusion_form={diffusion_form}, last_step={last_step}, last_step_size={last_step_size:g}"
    if sampler == "dopri5" and t > 1 - flow.sample_eps:
        where = f"t = {t:.3g}, past t1, where dopri5's last step may reach and the {flow.path_name} path is undefined"
        fix = "sampler heun or euler, whose fixed grids stop at t1"
    elif t > 0.5:
        where = "t = 1 (data), where sigma_t = 0 and the score is infinite"
        if sde and last_step == "none":
            fix = "last_step=mean (SiT's default), sampler sde-euler, or flow.sample_eps > 0 (e.g. 0.001)"
        elif sde and last_step_size == 0:
            fix = "last_step_size > 0 (SiT's 0.04), or flow.sample_eps > 0 (e.g. 0.001)"
        else:
            fix = "flow.sample_eps > 0 (e.g. 0.001, SiT's default for this prediction)"
    else:
        where = "t = 0 (noise), where alpha_t = 0"
        fix = ("diffusion_form=sigma (SiT's default), or flow.sample_eps > 0 (e.g. 0.001)"
               if sde and diffusion_form == "SBDM" else "flow.sample_eps > 0 (e.g. 0.001)")
    return (f"flow sampler {sampler} with {settings} divides by zero at {where}: SiT's maths is singular there "
            f"and gives NaN (black images); use {fix}")


class FlowScheduler(SchedulerMixin, ConfigMixin):
    """A flow run's sampler as a diffusers scheduler (saved in a DiT3Pipeline folder as scheduler_config.json):
    the interpolant (path, prediction, eps; the loss settings do not matter here), the default sampler
    ("euler", "heun", "dopri5", "sde-euler", "sde-heun") and its settings. Unlike diffusers' step-wise
    schedulers it runs the whole solve, `sample(model_fn, noise, num_steps)`, since dopri5 picks its own steps."""

    config_name = "scheduler_config.json"
    init_noise_sigma = 1.0

    @register_to_config
    def __init__(self, path: str = "linear", prediction: str = "velocity", train_eps: float | None = None,
                 sample_eps: float | None = None, sampler: str = "sde-euler", shift: float = 1.0,
                 diffusion_form: str = "sigma", diffusion_norm: float = 1.0, last_step: str = "mean",
                 last_step_size: float = 0.04, atol: float = 1e-6, rtol: float = 1e-3):
        if sampler not in FLOW_SAMPLERS:
            raise ValueError(f"unknown flow sampler {sampler!r}; choose one of {', '.join(FLOW_SAMPLERS)}")
        self.flow = FlowMatching(path, prediction, train_eps=train_eps, sample_eps=sample_eps)
        # a singular default is refused where the scheduler is made (a run's flow section, sample.py, a
        # pipeline folder), not at its first sample
        check_sampler(self.flow, sampler, 2, shift, diffusion_form, diffusion_norm, last_step, last_step_size)

    def sample(self, model_fn: ModelFn, x: torch.Tensor, num_steps: int, *, sampler: str | None = None,
               generator: torch.Generator | Sequence[torch.Generator] | None = None,
               progress: bool = False) -> torch.Tensor:
        """From noise x [B, ...] to the sample [B, ...] with `sampler` (default: the config's)."""
        c = self.config
        sampler = sampler or c.sampler
        if sampler not in FLOW_SAMPLERS:
            raise ValueError(f"unknown flow sampler {sampler!r}; choose one of {', '.join(FLOW_SAMPLERS)}")
        if sampler.startswith("sde-"):
            return sample_sde(self.flow, model_fn, x, method=sampler[len("sde-"):], num_steps=num_steps,
                              diffusion_form=c.diffusion_form, diffusion_norm=c.diffusion_norm,
                              last_step=c.last_step, last_step_size=c.last_step_size, shift=c.shift,
                              generator=generator, progress=progress)
        return sample_ode(self.flow, model_fn, x, method=sampler, num_steps=num_steps, shift=c.shift,
                          atol=c.atol, rtol=c.rtol)


def flow_scheduler(flow_config: dict, sampler: str, **overrides) -> FlowScheduler:
    """A FlowScheduler from a run's flow settings (train_dit.py's `flow` section, as saved in its config);
    `overrides` that are not None replace them (sample.py's options)."""
    keys = set(inspect.signature(FlowScheduler.__init__).parameters) - {"self", "sampler"}
    settings = {k: v for k, v in flow_config.items() if k in keys}
    settings.update({k: v for k, v in overrides.items() if v is not None})
    return FlowScheduler(sampler=sampler, **settings)
