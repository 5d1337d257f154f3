"""Flow matching, SiT's objective: regress the velocity, the noise or the score of an interpolant.

SiT (Ma et al. 2024): https://arxiv.org/abs/2401.08740 ; stochastic interpolants (Albergo et al. 2023):
https://arxiv.org/abs/2303.08797 ; logit-normal timesteps (SD3, Esser et al. 2024):
https://arxiv.org/abs/2403.03206

Time runs from noise (t = 0) to data (t = 1), as in SiT, and the network is called with t itself in
[0, 1] (SiT feeds it to DiT's timestep embedder unscaled). For data x1 and noise x0 ~ N(0, I):

    x_t = alpha_t x1 + sigma_t x0,    u_t = alpha_t' x1 + sigma_t' x0        (dit3.flow.paths)

and the loss of a sample at time t is, by prediction,

    velocity   |v(x_t) - u_t|^2
    noise      lambda_t |eps(x_t) - x0|^2
    score      lambda_t |sigma_t s(x_t) + x0|^2        (the true score is -x0 / sigma_t)

averaged over elements, with lambda_t = 1 (loss_weight "none"), (w_t / sigma_t)^2 ("velocity") or
w_t / sigma_t^2 ("likelihood"), w_t the path's velocity weight; SiT weights only noise and score
losses. Training times are uniform (SiT) or logit-normal (LightningDiT, SD3) on [t0, t1], an interval
that keeps clear of the ends where a prediction divides by zero: SiT's train_eps and sample_eps,
whose defaults depend on the path and the prediction (`default_eps`).
"""
from __future__ import annotations

import torch

from ..diffusion import _upcast, mean_flat
from .paths import PATHS

PREDICTIONS = ("velocity", "noise", "score")
LOSS_WEIGHTS = ("none", "velocity", "likelihood")
TIME_DISTRIBUTIONS = ("uniform", "logit_normal")


def default_eps(path: str, prediction: str) -> tuple[float, float]:
    """SiT's (train_eps, sample_eps): VP never reaches alpha = 1 stably (1e-5, 1e-3); linear and GVP are
    stable everywhere for velocity (0, 0) and keep 1e-3 from both ends for noise and score."""
    if path == "vp":
        return 1e-5, 1e-3
    return (0.0, 0.0) if prediction == "velocity" else (1e-3, 1e-3)


def expand_like(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """[B] -> [B, 1, ..., 1] to broadcast against x [B, ...]."""
    return t.view(-1, *([1] * (x.ndim - 1)))


class FlowMatching:
    """One interpolant and what the network predicts on it: losses, conversions, the sampling interval.

    path: "linear", "gvp" or "vp"; prediction: "velocity", "noise" or "score"; loss_weight: "none",
    "velocity" or "likelihood" (noise and score only); train_eps / sample_eps: None for SiT's default;
    time_dist: "uniform" or "logit_normal" (t = sigmoid(N(logit_mean, logit_std)) mapped onto [t0, t1];
    logit_mean < 0 favours noisier times).
    """

    def __init__(self, path: str = "linear", prediction: str = "velocity", loss_weight: str = "none",
                 train_eps: float | None = None, sample_eps: float | None = None, time_dist: str = "uniform",
                 logit_mean: float = 0.0, logit_std: float = 1.0):
        for name, value, choices in (("path", path, tuple(PATHS)), ("prediction", prediction, PREDICTIONS),
                                     ("loss_weight", loss_weight, LOSS_WEIGHTS),
                                     ("time_dist", time_dist, TIME_DISTRIBUTIONS)):
            if value not in choices:
                raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}")
        if prediction == "velocity" and loss_weight != "none":
            raise ValueError("loss_weight weights noise and score losses (as SiT); a velocity loss is unweighted")
        self.path_name, self.prediction, self.loss_weight = path, prediction, loss_weight
        self.path = PATHS[path]()
        default_train, default_sample = default_eps(path, prediction)
        self.train_eps = default_train if train_eps is None else train_eps
        self.sample_eps = default_sample if sample_eps is None else sample_eps
        self.time_dist, self.logit_mean, self.logit_std = time_dist, logit_mean, logit_std

    # ---- the interval ---------------------------------------------------------------------------
    def interval(self, sampling: bool = False, sde: bool = False, diffusion_form: str = "sigma",
                 last_step_size: float = 0.0) -> tuple[float, float]:
        """(t0, t1), SiT's `check_interval`. Linear and GVP with velocity run on [0, 1] (an ODE has no
        singularity there); an SDE, noise or score prediction stops eps short of the data end, or
        last_step_size short for an SDE that ends with a last step; noise / score predictions (and
        the SBDM diffusion) also start eps after the noise end. VP always starts at 0."""
        eps = self.sample_eps if sampling else self.train_eps
        t1 = 1 - eps if not sde or last_step_size == 0 else 1 - last_step_size
        if self.path_name == "vp":
            return 0.0, t1
        if self.prediction == "velocity" and not sde:
            return 0.0, 1.0
        starts_late = self.prediction != "velocity" or diffusion_form == "SBDM"
        return (eps if starts_late else 0.0), t1

    def sample_timesteps(self, batch_size: int, device=None, generator: torch.Generator | None = None,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Training times [B] on [t0, t1]: uniform, or logit-normal."""
        t0, t1 = self.interval()
        if self.time_dist == "uniform":
            u = torch.rand(batch_size, device=device, generator=generator, dtype=dtype)
        else:
            n = torch.randn(batch_size, device=device, generator=generator, dtype=dtype)
            u = torch.sigmoid(self.logit_mean + self.logit_std * n)
        return u * (t1 - t0) + t0

    # ---- conversions between predictions --------------------------------------------------------
    def velocity(self, output: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The probability-flow velocity (the ODE's drift) [B, ...] from the network's prediction at x_t = x,
        times t [B]."""
        if self.prediction == "velocity":
            return output
        tt = expand_like(t, x)
        score = output if self.prediction == "score" else -output / self.path.sigma(tt)[0]
        return self.path.alpha_ratio(tt) * x + self.path.velocity_weight(tt) * score

    def score(self, output: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """grad log p_t(x) [B, ...] from the network's prediction. From velocity it inverts
        v = alpha'/alpha x + w s multiplied through by alpha / alpha', which stays finite at t = 0 on the
        linear and GVP paths (SiT's form): s = (alpha/alpha' v - x) / (sigma^2 - alpha/alpha' sigma' sigma)."""
        tt = expand_like(t, x)
        if self.prediction == "score":
            return output
        if self.prediction == "noise":
            return -output / self.path.sigma(tt)[0]
        alpha, d_alpha = self.path.alpha(tt)
        sigma, d_sigma = self.path.sigma(tt)
        inverse_ratio = alpha / d_alpha
        return (inverse_ratio * output - x) / (sigma ** 2 - inverse_ratio * d_sigma * sigma)

    def noise(self, output: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """E[x0 | x_t = x] [B, ...] from the network's prediction (= -sigma_t times the score)."""
        if self.prediction == "noise":
            return output
        tt = expand_like(t, x)
        sigma, d_sigma = self.path.sigma(tt)
        if self.prediction == "score":
            return -sigma * output
        alpha, d_alpha = self.path.alpha(tt)
        inverse_ratio = alpha / d_alpha
        return (inverse_ratio * output - x) / (inverse_ratio * d_sigma - sigma)

    # ---- training -------------------------------------------------------------------------------
    def loss_weights(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor | float:
        """lambda_t, [B, 1, ..., 1] (or 1.0)."""
        if self.loss_weight == "none":
            return 1.0
        tt = expand_like(t, x)
        w, sigma = self.path.velocity_weight(tt), self.path.sigma(tt)[0]
        return (w / sigma) ** 2 if self.loss_weight == "velocity" else w / sigma ** 2

    def training_losses(self, model, x1: torch.Tensor, model_kwargs: dict | None = None,
                        t: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> dict:
        """{"loss": [B]} for data x1 [B, C, ...] at times t [B] (drawn if None) with noise x0 (drawn if None).

        model(x_t, t, **model_kwargs) -> [B, C, ...] or [B, 2C, ...] (a learned-sigma DiT: the second half
        is dropped, as SiT does), or a diffusers output holding it as `.sample`.
        """
        t = self.sample_timesteps(len(x1), x1.device, dtype=x1.dtype) if t is None else t
        x0 = torch.randn_like(x1) if noise is None else noise
        tt = expand_like(t, x1)
        alpha, d_alpha = self.path.alpha(tt)
        sigma, d_sigma = self.path.sigma(tt)
        x_t = alpha * x1 + sigma * x0
        output = model(x_t, t, **(model_kwargs or {}))
        output = _upcast(getattr(output, "sample", output))
        channels = x1.shape[1]
        if output.shape[1] not in (channels, 2 * channels):
            raise ValueError(f"the model gives {output.shape[1]} channels for {channels}-channel data")
        output = output[:, :channels]
        if self.prediction == "velocity":
            return {"loss": mean_flat((output - (d_alpha * x1 + d_sigma * x0)) ** 2)}
        error = output - x0 if self.prediction == "noise" else sigma * output + x0
        return {"loss": mean_flat(self.loss_weights(t, x1) * error ** 2)}


def create_flow(path: str = "linear", prediction: str = "velocity", loss_weight: str = "none",
                train_eps: float | None = None, sample_eps: float | None = None, time_dist: str = "uniform",
                logit_mean: float = 0.0, logit_std: float = 1.0) -> FlowMatching:
    """SiT's defaults: the linear path, velocity prediction, uniform times (its `create_transport`)."""
    return FlowMatching(path, prediction, loss_weight, train_eps, sample_eps, time_dist, logit_mean, logit_std)
