"""dit3.diffusion against formulas written out here independently (float64 numpy / scipy) and diffusers' DDPM."""
import math

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from scipy import integrate, stats

from dit3.diffusion import (
    GaussianDiffusion,
    create_diffusion,
    discretized_gaussian_log_likelihood,
    linear_betas,
    normal_kl,
    space_timesteps,
)
from dit3.sampling import make_scheduler

T = 1000
BETAS = np.linspace(1e-4, 0.02, T)  # DDPM's schedule, written out


def chain_moments(t: int) -> tuple[float, float]:
    """q(x_t | x_0) = N(a x_0, v) by running the one-step kernels x_k = sqrt(1 - b_k) x_{k-1} + sqrt(b_k) z."""
    a, v = 1.0, 0.0
    for b in BETAS[: t + 1]:
        a, v = math.sqrt(1 - b) * a, (1 - b) * v + b
    return a, v


def bayes_posterior(x0: float, xt: float, t: int) -> tuple[float, float]:
    """q(x_{t-1} | x_t, x_0) ∝ q(x_t | x_{t-1}) q(x_{t-1} | x_0), as a product of two Gaussians in x_{t-1}."""
    a, v = chain_moments(t - 1)  # prior N(a x0, v)
    b = BETAS[t]  # likelihood N(sqrt(1 - b) x_{t-1}, b)
    precision = 1 / v + (1 - b) / b
    return (a * x0 / v + math.sqrt(1 - b) * xt / b) / precision, 1 / precision


def kl_gauss(m1, v1, m2, v2):
    return 0.5 * (np.log(v2 / v1) + (v1 + (m1 - m2) ** 2) / v2 - 1)


def approx_cdf(x):
    return 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def bin_log_prob(x, mean, std):
    """log of the probability of x's 8-bit bin (end bins open) under N(mean, std^2), with ADM's approximate cdf
    and its floor of 1e-12 on the probability."""
    upper = 1.0 if x > 0.999 else approx_cdf((x - mean + 1 / 255) / std)
    lower = 0.0 if x < -0.999 else approx_cdf((x - mean - 1 / 255) / std)
    return np.log(max(upper - lower, 1e-12))


def test_betas_match_the_ddpm_scheduler_the_pipeline_samples_with():
    betas = linear_betas(T)
    assert betas.dtype == torch.float64 and len(betas) == T
    np.testing.assert_allclose(betas.numpy(), BETAS, rtol=1e-12)
    reference = DDPMScheduler(num_train_timesteps=T, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
    diffusion = create_diffusion("")
    np.testing.assert_allclose(diffusion.alphas_cumprod.numpy(), reference.alphas_cumprod.double().numpy(), rtol=1e-5)
    np.testing.assert_allclose(make_scheduler("ddpm").alphas_cumprod.numpy(), reference.alphas_cumprod.numpy())
    # other step counts keep the schedule's shape: betas scaled by 1000 / steps, as ADM
    np.testing.assert_allclose(linear_betas(250).numpy(), np.linspace(4e-4, 0.08, 250), rtol=1e-12)


@pytest.mark.parametrize("t", [0, 1, 10, 500, 999])
def test_q_sample_is_the_forward_chain(t):
    diffusion = create_diffusion("")
    a, v = chain_moments(t)
    x0 = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    noise = torch.randn_like(x0)
    ts = torch.full((3,), t)
    np.testing.assert_allclose(diffusion.q_sample(x0, ts, noise).numpy(), (a * x0 + math.sqrt(v) * noise).numpy(),
                               rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("t", [1, 2, 10, 500, 999])
def test_posterior_is_bayes(t):
    diffusion = create_diffusion("")
    x0, xt = torch.tensor([[0.7], [-1.3]], dtype=torch.float64), torch.tensor([[-0.2], [2.1]], dtype=torch.float64)
    mean, var, log_var = diffusion.q_posterior_mean_variance(x0, xt, torch.full((2,), t))
    for i in range(2):
        m, v = bayes_posterior(x0[i].item(), xt[i].item(), t)
        assert mean[i].item() == pytest.approx(m, rel=1e-9, abs=1e-12)
        assert var[i].item() == pytest.approx(v, rel=1e-9)
        assert log_var[i].item() == pytest.approx(math.log(v), rel=1e-9)


def test_posterior_at_t0_is_x0_and_log_variance_is_clipped():
    diffusion = create_diffusion("")
    x0, xt = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    mean, var, log_var = diffusion.q_posterior_mean_variance(x0, xt, torch.zeros(2, dtype=torch.long))
    torch.testing.assert_close(mean, x0)
    assert (var == 0).all()
    assert log_var[0, 0].item() == pytest.approx(math.log(bayes_posterior(0.0, 0.0, 1)[1]), rel=1e-9)


@pytest.mark.parametrize("m1,v1,m2,v2", [(0.0, 1.0, 0.0, 1.0), (0.3, 0.5, -1.0, 2.0), (2.0, 0.01, 1.9, 0.02)])
def test_normal_kl_against_numerical_integration(m1, v1, m2, v2):
    p, q = stats.norm(m1, math.sqrt(v1)), stats.norm(m2, math.sqrt(v2))
    s = math.sqrt(v1)
    expected, _ = integrate.quad(lambda x: p.pdf(x) * (p.logpdf(x) - q.logpdf(x)), m1 - 12 * s, m1 + 12 * s)
    got = normal_kl(*(torch.tensor(float(a), dtype=torch.float64) for a in (m1, math.log(v1), m2, math.log(v2))))
    assert got.item() == pytest.approx(expected, rel=1e-6, abs=1e-10)


def test_discretized_gaussian_log_likelihood():
    bins = torch.linspace(-1, 1, 256, dtype=torch.float64)  # every 8-bit value
    for mean, std in [(0.0, 0.1), (0.4, 0.05), (-0.9, 0.3)]:
        log_p = discretized_gaussian_log_likelihood(bins, torch.full_like(bins, mean),
                                                    torch.full_like(bins, math.log(std)))
        # the bins cover the real line: their probabilities sum to one
        assert log_p.exp().sum().item() == pytest.approx(1.0, abs=1e-9)
        expected = [bin_log_prob(x, mean, std) for x in bins.tolist()]
        np.testing.assert_allclose(log_p.numpy(), expected, rtol=1e-6)  # tail bins: differences of cdfs near 1
        # and it is close to the exact normal probability of the bin wherever the bin has mass
        exact = np.diff(stats.norm(mean, std).cdf(np.r_[-np.inf, (bins[:-1] + bins[1:]).numpy() / 2, np.inf]))
        heavy = exact > 1e-3
        np.testing.assert_allclose(log_p.exp().numpy()[heavy], exact[heavy], rtol=2e-2)


def test_p_mean_variance_learned_range():
    diffusion = create_diffusion("")
    t = torch.tensor([0, 1, 400, 999])
    xt = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    eps = torch.randn_like(xt)
    for v in (-1.0, 0.0, 1.0):
        out = diffusion.p_mean_variance(torch.cat([eps, torch.full_like(eps, v)], dim=1), xt, t)
        for i, ti in enumerate(t.tolist()):
            a, var = chain_moments(ti)
            x0 = (xt[i] - math.sqrt(var) * eps[i]) / a
            torch.testing.assert_close(out["pred_xstart"][i], x0)
            if ti > 0:
                post_var = bayes_posterior(0.0, 0.0, ti)[1]
                expected_mean = torch.tensor([bayes_posterior(x0_, xt_, ti)[0]
                                              for x0_, xt_ in zip(x0.flatten().tolist(), xt[i].flatten().tolist())])
                torch.testing.assert_close(out["mean"][i].flatten(), expected_mean.double())
            else:
                post_var = bayes_posterior(0.0, 0.0, 1)[1]  # clipped to the t = 1 value
                torch.testing.assert_close(out["mean"][i], x0)
            # v = -1: posterior variance, v = 1: beta_t, in between: geometric interpolation
            expected = (1 + v) / 2 * math.log(BETAS[ti]) + (1 - v) / 2 * math.log(post_var)
            torch.testing.assert_close(out["log_variance"][i], torch.full_like(xt[i], expected))


class ToyModel(torch.nn.Module):
    """Learned-sigma toy: a 1x1 conv to 2C channels, modulated by t; records the timesteps it sees."""

    def __init__(self, channels=2):
        super().__init__()
        self.conv = torch.nn.Conv2d(channels, 2 * channels, 1).double()
        self.seen = []

    def forward(self, x, t, y=None):
        self.seen.append(t.clone())
        return torch.tanh(self.conv(x) * (1 + t.double().view(-1, 1, 1, 1) / 1000))


def test_training_loss_matches_direct_computation():
    torch.manual_seed(0)
    diffusion, model = create_diffusion(""), ToyModel()
    x0 = torch.rand(5, 2, 4, 4, dtype=torch.float64) * 2 - 1
    x0[0, 0, 0, :2] = torch.tensor([-1.0, 1.0])  # t = 0 scores the open end bins too
    t = torch.tensor([0, 1, 17, 500, 999])
    noise = torch.randn_like(x0)
    losses = diffusion.training_losses(model, x0, t, noise=noise)

    for i, ti in enumerate(t.tolist()):
        a, v = chain_moments(ti)
        xt = (a * x0[i] + math.sqrt(v) * noise[i]).numpy()
        out = model(torch.from_numpy(xt)[None], torch.tensor([ti])).detach()[0].numpy()
        eps, frac = out[:2], (out[2:] + 1) / 2
        mse = np.mean((eps - noise[i].numpy()) ** 2)
        x0_pred = (xt - math.sqrt(v) * eps) / a
        post_var_t = bayes_posterior(0.0, 0.0, max(ti, 1))[1]
        log_var = frac * math.log(BETAS[ti]) + (1 - frac) * math.log(post_var_t)
        if ti == 0:
            mean = x0_pred  # the posterior mean at t = 0 is x_0
            nll = [-bin_log_prob(x, m, s) for x, m, s in
                   zip(x0[i].numpy().ravel(), mean.ravel(), np.exp(0.5 * log_var).ravel())]
            vb = np.mean(nll) / math.log(2)
        else:
            true = [bayes_posterior(p, q, ti)[0] for p, q in zip(x0[i].numpy().ravel(), xt.ravel())]
            model_mean = [bayes_posterior(p, q, ti)[0] for p, q in zip(x0_pred.ravel(), xt.ravel())]
            kl = kl_gauss(np.array(true), post_var_t, np.array(model_mean), np.exp(log_var).ravel())
            vb = np.mean(kl) / math.log(2)
        assert losses["mse"][i].item() == pytest.approx(mse, rel=1e-9)
        assert losses["vb"][i].item() == pytest.approx(vb, rel=1e-7, abs=1e-10)
        assert losses["loss"][i].item() == pytest.approx(mse + vb, rel=1e-7)


def test_vb_term_trains_only_the_variance():
    diffusion = create_diffusion("")
    x0 = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 3, 300, 999])
    output = torch.randn(4, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    losses = diffusion.training_losses(lambda x, ts: output, x0, t, noise=noise)
    grad, = torch.autograd.grad(losses["loss"].sum(), output)
    # epsilon channels: the MSE gradient alone; variance channels: a nonzero VB gradient
    torch.testing.assert_close(grad[:, :2], 2 * (output[:, :2] - noise).detach() / 18)
    assert (grad[:, 2:].abs().sum(dim=(1, 2, 3)) > 0).all()


def test_space_timesteps():
    # ADM's example: 300 steps in thirds of 100, taking 10, 15 and 20 from each, both ends included
    steps = space_timesteps(300, "10,15,20")
    assert len(steps) == 45 and [steps[0], steps[9], steps[10], steps[24], steps[25], steps[-1]] == [0, 99, 100, 199,
                                                                                                     200, 299]
    steps = space_timesteps(1000, "250")
    assert len(steps) == 250 and steps[0] == 0 and steps[-1] == 999
    assert space_timesteps(1000, 1000) == list(range(1000)) == space_timesteps(1000, [1000])
    with pytest.raises(ValueError):
        space_timesteps(10, "11")


def dit_space_timesteps(num_timesteps, section_counts):
    """DiT's diffusion/respace.py space_timesteps, written out as it is there (a set of kept steps)."""
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired_count = int(section_counts[len("ddim"):])
            for i in range(1, num_timesteps):
                if len(range(0, num_timesteps, i)) == desired_count:
                    return set(range(0, num_timesteps, i))
            raise ValueError(f"cannot create exactly {num_timesteps} steps with an integer stride")
        section_counts = [int(x) for x in section_counts.split(",")]
    size_per = num_timesteps // len(section_counts)
    extra = num_timesteps % len(section_counts)
    start_idx = 0
    all_steps = []
    for i, section_count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < section_count:
            raise ValueError(f"cannot divide section of {size} steps into {section_count}")
        frac_stride = 1 if section_count <= 1 else (size - 1) / (section_count - 1)
        cur_idx = 0.0
        taken_steps = []
        for _ in range(section_count):
            taken_steps.append(start_idx + round(cur_idx))
            cur_idx += frac_stride
        all_steps += taken_steps
        start_idx += size
    return set(all_steps)


def test_space_timesteps_equals_dit_for_every_step_count():
    for count in range(1, 1001):
        assert space_timesteps(1000, str(count)) == sorted(dit_space_timesteps(1000, str(count))), count
    assert 499 in space_timesteps(1000, "21") and 500 not in space_timesteps(1000, "21")  # the example
    for spec in ("10,15,20", "1,2,3,4", "250,250", "7,333"):
        assert space_timesteps(1000, spec) == sorted(dit_space_timesteps(1000, spec)), spec
    for count in (2, 10, 25, 50, 100, 250, 500, 1000):
        assert space_timesteps(1000, f"ddim{count}") == sorted(dit_space_timesteps(1000, f"ddim{count}")), count
    for impossible in ("ddim300", "ddim1"):  # no integer stride below 1000 gives 300 (or 1) of 1000
        with pytest.raises(ValueError):
            dit_space_timesteps(1000, impossible)
        with pytest.raises(ValueError, match="integer stride"):
            space_timesteps(1000, impossible)


def test_respaced_chain():
    base = create_diffusion("")
    torch.testing.assert_close(base.respaced(range(T)).betas, base.betas)
    spaced = create_diffusion("25")
    keep = space_timesteps(T, 25)
    assert spaced.num_timesteps == 25 and spaced.timestep_map.tolist() == keep
    torch.testing.assert_close(spaced.alphas_cumprod, base.alphas_cumprod[keep])
    # the network sees the original timesteps
    model = ToyModel()
    spaced.training_losses(model, torch.randn(3, 2, 2, 2, dtype=torch.float64), torch.tensor([0, 1, 24]))
    assert model.seen[-1].tolist() == [keep[0], keep[1], keep[24]]


@pytest.mark.parametrize("respacing", ["", "25"])
def test_p_sample_matches_diffusers_ddpm_step(respacing):
    """Our ancestral step is diffusers' DDPMScheduler step (learned range), also on ADM's respaced chain."""
    diffusion, scheduler = create_diffusion(respacing), make_scheduler("ddpm")
    if respacing:
        scheduler.set_timesteps(timesteps=diffusion.timestep_map.flip(0).tolist())
    torch.manual_seed(0)
    for i in (diffusion.num_timesteps - 1, diffusion.num_timesteps // 2, 1, 0):
        x = torch.randn(2, 4, 4, 4)
        output = torch.cat([torch.randn(2, 4, 4, 4), torch.rand(2, 4, 4, 4) * 2 - 1], dim=1)
        original_t = int(diffusion.timestep_map[i])
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(i))  # what step() draws
        ours = diffusion.p_sample(output, x, torch.full((2,), i), noise=noise)
        theirs = scheduler.step(output, original_t, x, generator=torch.Generator().manual_seed(i)).prev_sample
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_gaussian_diffusion_rejects_bad_betas():
    with pytest.raises(ValueError):
        GaussianDiffusion(torch.tensor([0.1, 0.0, 0.2]))
