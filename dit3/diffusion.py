"""The Gaussian diffusion DiT³ is trained on: DiT's objective, ported from ADM only as far as DiT uses it.

DDPM (Ho et al. 2020): https://arxiv.org/abs/2006.11239
Improved DDPM, learned variances (Nichol & Dhariwal 2021): https://arxiv.org/abs/2102.09672

1000 steps with linear betas 1e-4 .. 0.02. The network outputs, per latent
element, epsilon and a value v in [-1, 1] that sets the log variance of
p(x_{t-1} | x_t) between the posterior variance (v = -1) and beta_t (v = 1)
("learned range"). The loss of a sample at a uniform random t is

    MSE(epsilon) + VB,    VB = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) in bits per element
                               (-log p(x_0 | x_1), discretised, at t = 0),

where VB sees the predicted epsilon through a stop-gradient, so it trains only
the variance. DiT creates its diffusion with ADM's loss type MSE, not
RESCALED_MSE, so the VB term is not multiplied by num_timesteps / 1000 (a
factor that is 1 at the 1000 training steps anyway).

DDPM sampling (`dit3.sampling`'s "ddpm", DiT's sampler) runs `p_sample` here on
a chain `respaced` as ADM shortens it; the tests check each step against diffusers'
DDPMScheduler (learned range), which `DiT3Pipeline` runs. DDIM and DPM-Solver++
are diffusers' schedulers alone (`dit3.sampling.make_scheduler`).
"""
import math

import torch


def linear_betas(num_timesteps: int = 1000) -> torch.Tensor:
    """DDPM's linear schedule in float64, rescaled as ADM does so other step counts keep its shape."""
    scale = 1000 / num_timesteps
    return torch.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=torch.float64)


def space_timesteps(num_timesteps: int, section_counts: int | str | list[int]) -> list[int]:
    """Timesteps to keep from a chain of `num_timesteps`, sorted: ADM's respacing, as DiT samples.

    The chain is cut into len(section_counts) near-equal sections and section i keeps
    section_counts[i] steps spread over it, both ends included: a fractional stride
    (size - 1) / (count - 1) is accumulated and each position rounded, as ADM's loop does
    (rounding j * stride instead differs for 278 of the 1000 counts of a 1000-step chain).
    "250" keeps 250 of 1000; "10,15,20" keeps 10, 15 and 20 from three thirds; "ddimN"
    keeps every k-th step from 0 for the integer stride k that gives exactly N steps.
    """
    if isinstance(section_counts, str) and section_counts.startswith("ddim"):
        desired = int(section_counts[len("ddim"):])
        for stride in range(1, num_timesteps):
            if len(range(0, num_timesteps, stride)) == desired:
                return list(range(0, num_timesteps, stride))
        raise ValueError(f"cannot take exactly {desired} of {num_timesteps} steps with an integer stride")
    if isinstance(section_counts, int):
        section_counts = [section_counts]
    elif isinstance(section_counts, str):
        section_counts = [int(c) for c in section_counts.split(",")]
    size_per, extra = divmod(num_timesteps, len(section_counts))
    steps, start = [], 0
    for i, count in enumerate(section_counts):
        size = size_per + (i < extra)
        if not 1 <= count <= size:
            raise ValueError(f"cannot take {count} steps from a section of {size}")
        stride = (size - 1) / (count - 1) if count > 1 else 1
        position = 0.0
        for _ in range(count):
            steps.append(start + round(position))
            position += stride
        start += size
    return sorted(set(steps))


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over all but the batch dimension: [B, ...] -> [B]."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) per element, in nats; broadcasts."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """The tanh approximation of the standard normal CDF that ADM uses (the likelihood numbers depend on it)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """log P(x's bin) under N(means, exp(log_scales) ** 2), per element, in nats.

    The data are taken as 8-bit values scaled to [-1, 1]: bins of width 2/255 around x, the two end bins
    stretched to -inf and +inf. (DiT applies this to VAE latents as well, which are not 8-bit; it only
    scores t = 0.)
    """
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """Half precision to float32 (the losses are reductions); float32 and float64 unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


class GaussianDiffusion:
    """A discrete Gaussian diffusion chain: q(x_t | x_0), its posterior, and the learned-range model p.

    All per-step tables are float64 (as ADM's numpy); they are read out in the dtype of the
    data, at least float32. `timestep_map[t]` is the timestep the network is called with: the
    identity for the full chain, the kept original steps for a respaced one.
    """

    def __init__(self, betas: torch.Tensor, timestep_map: torch.Tensor | None = None):
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.ndim != 1 or len(betas) < 2 or not ((betas > 0) & (betas <= 1)).all():
            raise ValueError("betas must be a 1-D sequence of at least 2 values in (0, 1]")
        self.num_timesteps = len(betas)
        self.timestep_map = (torch.arange(self.num_timesteps) if timestep_map is None
                             else torch.as_tensor(timestep_map, dtype=torch.long))
        self.betas = betas
        self.log_betas = torch.log(betas)
        self._on_device: dict = {}  # (table id, device) -> the table on that device
        alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(alphas, dim=0)
        self.alphas_cumprod_prev = torch.cat([betas.new_ones(1), self.alphas_cumprod[:-1]])
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()
        self.sqrt_recip_alphas_cumprod = (1.0 / self.alphas_cumprod).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / self.alphas_cumprod - 1.0).sqrt()

        # q(x_{t-1} | x_t, x_0) = N(coef1 * x_0 + coef2 * x_t, posterior_variance)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # the posterior variance is 0 at t = 0: its log takes the t = 1 value there
        self.posterior_log_variance_clipped = torch.log(
            torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]]))
        self.posterior_mean_coef1 = betas * self.alphas_cumprod_prev.sqrt() / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * alphas.sqrt() / (1.0 - self.alphas_cumprod)

    def respaced(self, use_timesteps) -> "GaussianDiffusion":
        """The chain through `use_timesteps` only (indices into this chain, e.g. from space_timesteps).

        Its betas make its alphas_cumprod equal this chain's at the kept steps, and its
        timestep_map sends its step i back to the original timestep the network was trained on.
        """
        keep = sorted({int(t) for t in use_timesteps})
        alphas_cumprod = self.alphas_cumprod[keep]
        betas = 1.0 - alphas_cumprod / torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
        return GaussianDiffusion(betas, timestep_map=self.timestep_map[keep])

    def on(self, table: torch.Tensor, device: torch.device) -> torch.Tensor:
        """`table` (one of this chain's tables) on `device`, copied once: a training step reads ~10 tables."""
        key = (id(table), device)
        if key not in self._on_device:
            self._on_device[key] = table.to(device)
        return self._on_device[key]

    def _extract(self, table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """table[t] shaped [B, 1, ..., 1] to broadcast against `like` [B, ...]."""
        dtype = torch.promote_types(like.dtype, torch.float32)
        return self.on(table, t.device)[t].to(dtype).view(-1, *([1] * (like.ndim - 1)))

    def sample_timesteps(self, batch_size: int, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Uniform training timesteps [B] in 0 .. num_timesteps - 1."""
        return torch.randint(0, self.num_timesteps, (batch_size,), device=device, generator=generator)

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """A draw of x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I); t = 0 is one step of noise."""
        noise = torch.randn_like(x_start) if noise is None else noise
        return (self._extract(self.sqrt_alphas_cumprod, t, x_start) * x_start
                + self._extract(self.sqrt_one_minus_alphas_cumprod, t, x_start) * noise)

    def q_posterior_mean_variance(self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x_0)."""
        mean = (self._extract(self.posterior_mean_coef1, t, x_t) * x_start
                + self._extract(self.posterior_mean_coef2, t, x_t) * x_t)
        variance = self._extract(self.posterior_variance, t, x_t)
        log_variance = self._extract(self.posterior_log_variance_clipped, t, x_t)
        return mean, variance, log_variance

    def predict_xstart_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return (self._extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
                - self._extract(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps)

    def p_mean_variance(self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                        clip_denoised: bool = False) -> dict:
        """p(x_{t-1} | x_t) from the network's output [B, 2C, ...] = (epsilon, v) at x_t [B, C, ...].

        log variance = (v + 1)/2 * log(beta_t) + (1 - v)/2 * log(posterior variance, clipped);
        mean = the posterior mean at the x_0 that epsilon implies. Returns mean, variance,
        log_variance, pred_xstart.
        """
        channels = x_t.shape[1]
        if model_output.shape[1] != 2 * channels:
            raise ValueError(f"expected 2 x {channels} output channels, got {model_output.shape[1]}")
        eps, var_values = model_output.split(channels, dim=1)
        min_log = self._extract(self.posterior_log_variance_clipped, t, x_t)
        max_log = self._extract(self.log_betas, t, x_t)
        frac = (var_values + 1) / 2
        log_variance = frac * max_log + (1 - frac) * min_log
        pred_xstart = self.predict_xstart_from_eps(x_t, t, eps)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x_t, t)
        return {"mean": mean, "variance": log_variance.exp(), "log_variance": log_variance, "pred_xstart": pred_xstart}

    def p_sample(self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                 noise: torch.Tensor | None = None, clip_denoised: bool = False) -> torch.Tensor:
        """One ancestral step x_t -> x_{t-1}; no noise is added at t = 0."""
        out = self.p_mean_variance(model_output, x_t, t, clip_denoised)
        noise = torch.randn_like(x_t) if noise is None else noise
        nonzero = (t != 0).to(out["mean"].dtype).view(-1, *([1] * (x_t.ndim - 1)))
        return out["mean"] + nonzero * (0.5 * out["log_variance"]).exp() * noise

    def vb_terms_bpd(self, model_output: torch.Tensor, x_start: torch.Tensor, x_t: torch.Tensor,
                     t: torch.Tensor) -> torch.Tensor:
        """[B] variational-bound term in bits per element: the KL at t > 0, the decoder NLL at t = 0."""
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance(model_output, x_t, t)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])) / math.log(2.0)
        decoder_nll = -mean_flat(discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"])) / math.log(2.0)
        return torch.where(t == 0, decoder_nll, kl)

    def training_losses(self, model, x_start: torch.Tensor, t: torch.Tensor, model_kwargs: dict | None = None,
                        noise: torch.Tensor | None = None) -> dict:
        """DiT's hybrid loss at timesteps t [B]: {"loss", "mse", "vb"}, each [B] (take the mean to train).

        model(x_t, timesteps, **model_kwargs) -> [B, 2C, ...], or a diffusers output holding it as `.sample`
        (DiT3 and diffusers' DiTTransformer2DModel: model_kwargs=dict(class_labels=y)); it gets the original
        timesteps (timestep_map[t]), so a respaced chain trains the same network.
        """
        noise = torch.randn_like(x_start) if noise is None else noise
        x_t = self.q_sample(x_start, t, noise)
        model_output = model(x_t, self.on(self.timestep_map, t.device)[t], **(model_kwargs or {}))
        model_output = _upcast(getattr(model_output, "sample", model_output))
        if model_output.shape[1] != 2 * x_start.shape[1]:
            raise ValueError("the hybrid loss needs a learned-sigma model (out channels = 2 x in channels)")
        eps, var_values = model_output.split(x_start.shape[1], dim=1)
        # the VB term trains the variance only: the mean (epsilon) gets its gradient from the MSE alone
        frozen = torch.cat([eps.detach(), var_values], dim=1)
        vb = self.vb_terms_bpd(frozen, x_start, x_t, t)
        mse = mean_flat((noise - eps) ** 2)
        return {"loss": mse + vb, "mse": mse, "vb": vb}


def create_diffusion(timestep_respacing: int | str | list[int] | None = "", diffusion_steps: int = 1000
                     ) -> GaussianDiffusion:
    """DiT's diffusion: `diffusion_steps` linear-beta steps; respaced when timestep_respacing is given
    ("" or None for training, e.g. "250" for sampling as DiT does)."""
    diffusion = GaussianDiffusion(linear_betas(diffusion_steps))
    if timestep_respacing in ("", None):
        return diffusion
    return diffusion.respaced(space_timesteps(diffusion_steps, timestep_respacing))

