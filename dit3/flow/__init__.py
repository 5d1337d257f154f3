"""Flow matching beside DDPM: SiT's interpolants, predictions and samplers (https://arxiv.org/abs/2401.08740).

    paths.py      the interpolants: linear, GVP, VP (alpha_t, sigma_t and their derivatives)
    objective.py  FlowMatching: training losses, prediction conversions, time intervals
    samplers.py   ODE (Euler, Heun, dopri5 through torchdiffeq) and SDE (Euler-Maruyama, Heun) samplers,
                  and FlowScheduler, the sampler as a diffusers scheduler for DiT3Pipeline
"""
from .objective import LOSS_WEIGHTS, PREDICTIONS, TIME_DISTRIBUTIONS, FlowMatching, create_flow, default_eps
from .paths import PATHS, GVPPath, LinearPath, VPPath
from .samplers import (
    DIFFUSION_FORMS,
    LAST_STEPS,
    FlowScheduler,
    diffusion_coefficient,
    flow_scheduler,
    sample_ode,
    sample_sde,
    time_grid,
)

__all__ = ["FlowMatching", "create_flow", "default_eps", "PREDICTIONS", "LOSS_WEIGHTS", "TIME_DISTRIBUTIONS",
           "PATHS", "LinearPath", "GVPPath", "VPPath", "DIFFUSION_FORMS", "LAST_STEPS", "FlowScheduler",
           "flow_scheduler", "diffusion_coefficient", "sample_ode", "sample_sde", "time_grid"]
