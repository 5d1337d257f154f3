"""SiT's interpolants x_t = alpha_t x1 + sigma_t x0 between noise x0 (t = 0) and data x1 (t = 1).

SiT, "Exploring Flow and Diffusion-based Generative Models with Scalable Interpolant Transformers"
(Ma et al. 2024): https://arxiv.org/abs/2401.08740

    linear  alpha_t = t,              sigma_t = 1 - t                  (rectified flow, SiT's default)
    gvp     alpha_t = sin(pi t / 2),  sigma_t = cos(pi t / 2)          (alpha^2 + sigma^2 = 1)
    vp      alpha_t = exp(m(t)),      sigma_t = sqrt(1 - alpha_t^2)    (score SDE's VP, beta 0.1 .. 20)
            m(t) = -(1 - t)^2 (beta_max - beta_min) / 4 - (1 - t) beta_min / 2

Each path gives its coefficients and their time derivatives, the ratio alpha_t' / alpha_t (in a form that
stays finite where alpha_t -> 0 allows it), and w_t = alpha_t'/alpha_t sigma_t^2 - sigma_t sigma_t', the
factor that turns the score into velocity:

    v(x, t) = alpha_t'/alpha_t x + w_t score(x, t)

(SiT's `compute_drift` returns (-alpha_t'/alpha_t x, w_t)). `t` is a tensor shaped to broadcast against x
([B, 1, ..., 1]) or a Python float.
"""
from __future__ import annotations

import math

import torch


class LinearPath:
    """alpha_t = t, sigma_t = 1 - t: straight lines from noise to data, constant velocity x1 - x0."""

    def alpha(self, t):
        """(alpha_t, alpha_t')."""
        return t, 1.0

    def sigma(self, t):
        """(sigma_t, sigma_t')."""
        return 1 - t, -1.0

    def alpha_ratio(self, t):
        """alpha_t' / alpha_t."""
        return 1 / t

    def velocity_weight(self, t):
        """w_t = alpha_t'/alpha_t sigma_t^2 - sigma_t sigma_t'."""
        sigma, d_sigma = self.sigma(t)
        return self.alpha_ratio(t) * sigma ** 2 - sigma * d_sigma


class GVPPath(LinearPath):
    """alpha_t = sin(pi t / 2), sigma_t = cos(pi t / 2): variance preserving, no schedule constants."""

    def alpha(self, t):
        return torch.sin(t * math.pi / 2), math.pi / 2 * torch.cos(t * math.pi / 2)

    def sigma(self, t):
        return torch.cos(t * math.pi / 2), -math.pi / 2 * torch.sin(t * math.pi / 2)

    def alpha_ratio(self, t):
        return math.pi / (2 * torch.tan(t * math.pi / 2))


class VPPath(LinearPath):
    """The VP SDE's marginals (linear beta from beta_max at noise to beta_min at data), in SiT's time."""

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0):
        self.beta_min, self.beta_max = beta_min, beta_max

    def log_alpha(self, t):
        """m(t) = log alpha_t."""
        return -0.25 * (1 - t) ** 2 * (self.beta_max - self.beta_min) - 0.5 * (1 - t) * self.beta_min

    def alpha_ratio(self, t):
        """m'(t) = beta(t) / 2, beta(t) = beta_min + (1 - t) (beta_max - beta_min)."""
        return 0.5 * (1 - t) * (self.beta_max - self.beta_min) + 0.5 * self.beta_min

    def alpha(self, t):
        alpha = torch.exp(self.log_alpha(t))
        return alpha, alpha * self.alpha_ratio(t)

    def sigma(self, t):
        alpha_sq = torch.exp(2 * self.log_alpha(t))
        sigma = torch.sqrt(1 - alpha_sq)
        return sigma, -alpha_sq * self.alpha_ratio(t) / sigma  # from sigma^2 = 1 - alpha^2

    def velocity_weight(self, t):
        """beta(t) / 2: with sigma^2 = 1 - alpha^2 the general form m' sigma^2 + alpha^2 m' reduces to m'."""
        return self.alpha_ratio(t)


PATHS = {"linear": LinearPath, "gvp": GVPPath, "vp": VPPath}
