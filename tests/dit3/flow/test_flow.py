"""Flow matching (dit3.flow) against the maths and against SiT's formulas, in float64.

* The paths' alpha_t, sigma_t against closed forms written here, their derivatives against autograd.
* The velocity / score / noise conversions against a Gaussian data distribution, where all three are
  known exactly, and the probability-flow ODE against that distribution's exact transport map.
* The training loss, the ODE and the SDE trajectories against an independent transcription of SiT's
  formulas (github.com/willisma/SiT, transport/: path.py, transport.py, integrators.py), written out
  below in SiT's own arrangement (its per-path drift, VP's beta form, constant dt, t + dt, the last
  step at t1): relative difference <= 1e-10.
* SiT's eps defaults and intervals, timestep sampling, the timestep shift, guidance, per-sample noise,
  FlowScheduler in DiT3Pipeline (offline round trip).
"""
import itertools
import math

import numpy as np
import pytest
import torch
from torchdiffeq import odeint

from dit3.flow import LAST_STEPS, FlowScheduler, create_flow, default_eps, sample_ode, sample_sde, time_grid
from dit3.flow.samplers import check_sampler
from dit3.pipeline import DiT3Pipeline
from dit3.sampling import flow_model_fn, sample
from tests.dit3.tiny import tiny_dit

PATHS, PREDICTIONS = ("linear", "gvp", "vp"), ("velocity", "noise", "score")
F64 = torch.float64


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def toy(x: torch.Tensor, t: torch.Tensor, **_) -> torch.Tensor:
    """A smooth nonlinear stand-in for the network: x [B, C, H, W], t [B] -> [B, C, H, W]."""
    tt = t.view(-1, 1, 1, 1)
    return torch.tanh(0.3 * x.roll(1, dims=1) - 0.2 * x) * (1 + tt) + 0.1 * torch.cos(3 * tt) * x.flip(-1)


def data(seed=0, shape=(3, 2, 4, 4)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=F64), torch.randn(shape, generator=g, dtype=F64)


# ---------------------------------------------------------------------------------------------
# SiT's formulas, transcribed (float64; t is [B] or [B, 1, 1, 1])
# ---------------------------------------------------------------------------------------------
def sit_coefficients(path, t):
    """(alpha, d_alpha, sigma, d_sigma) as SiT's ICPlan / GVPCPlan / VPCPlan compute them."""
    if path == "linear":
        return t, 1.0, 1 - t, -1.0
    if path == "gvp":
        return (torch.sin(t * np.pi / 2), np.pi / 2 * torch.cos(t * np.pi / 2), torch.cos(t * np.pi / 2),
                -np.pi / 2 * torch.sin(t * np.pi / 2))
    log_mean = -0.25 * (1 - t) ** 2 * (20.0 - 0.1) - 0.5 * (1 - t) * 0.1
    d_log_mean = 0.5 * (1 - t) * (20.0 - 0.1) + 0.5 * 0.1
    alpha, sigma = torch.exp(log_mean), torch.sqrt(1 - torch.exp(2 * log_mean))
    return alpha, alpha * d_log_mean, sigma, torch.exp(2 * log_mean) * (2 * d_log_mean) / (-2 * sigma)


def sit_drift(path, x, t):
    """SiT's compute_drift: (drift mean, drift var); the probability-flow velocity is -mean + var * score."""
    t = t.view(-1, 1, 1, 1)
    if path == "vp":
        beta = 0.1 + (1 - t) * (20.0 - 0.1)
        return -0.5 * beta * x, beta / 2
    ratio = 1 / t if path == "linear" else np.pi / (2 * torch.tan(t * np.pi / 2))
    _, _, sigma, d_sigma = sit_coefficients(path, t)
    return -ratio * x, ratio * sigma ** 2 - sigma * d_sigma


def sit_velocity_and_score(path, prediction, out, x, t):
    """SiT's get_drift() and get_score() for a model output `out`."""
    mean, var = sit_drift(path, x, t)
    alpha, d_alpha, sigma, d_sigma = sit_coefficients(path, t.view(-1, 1, 1, 1))
    if prediction == "velocity":
        reverse = alpha / d_alpha
        return out, (reverse * out - x) / (sigma ** 2 - reverse * d_sigma * sigma)
    score = out if prediction == "score" else out / -sigma
    return -mean + var * score, score


def sit_interval(path, prediction, eps, sde=False, form="sigma", last_step_size=0.0):
    """SiT's Transport.check_interval."""
    t0, t1 = 0.0, 1.0
    if path == "vp":
        t1 = 1 - eps if (not sde or last_step_size == 0) else 1 - last_step_size
    elif prediction != "velocity" or sde:
        t0 = eps if (form == "SBDM" and sde) or prediction != "velocity" else 0.0
        t1 = 1 - eps if (not sde or last_step_size == 0) else 1 - last_step_size
    return t0, t1


def sit_loss(path, prediction, weight, model, x1, x0, t):
    """SiT's Transport.training_losses at given t, x0 (its path.plan and the weights)."""
    alpha, d_alpha, sigma, d_sigma = sit_coefficients(path, t.view(-1, 1, 1, 1))
    xt, ut = alpha * x1 + sigma * x0, d_alpha * x1 + d_sigma * x0
    out = model(xt, t)
    if prediction == "velocity":
        return ((out - ut) ** 2).mean(dim=(1, 2, 3))
    _, var = sit_drift(path, xt, t)
    w = {"none": 1.0, "velocity": (var / sigma) ** 2, "likelihood": var / sigma ** 2}[weight]
    error = out - x0 if prediction == "noise" else out * sigma + x0
    return (w * error ** 2).mean(dim=(1, 2, 3))


def sit_diffusion(path, form, x, t, norm=1.0):
    t = t.view(-1, 1, 1, 1)
    return {"sigma": lambda: norm * sit_coefficients(path, t)[2], "SBDM": lambda: norm * sit_drift(path, x, t)[1],
            "linear": lambda: norm * (1 - t), "decreasing": lambda: 0.25 * (norm * torch.cos(np.pi * t) + 1) ** 2,
            "increasing-decreasing": lambda: norm * torch.sin(np.pi * t) ** 2}[form]()


def sit_sde(path, prediction, model, x, num_steps, method, form, last_step, last_step_size, eps, generator):
    """SiT's sde.sample + Sampler.sample_sde: Euler-Maruyama or its Heun, then the last step at t1."""
    size = 0.0 if last_step is None else last_step_size
    t0, t1 = sit_interval(path, prediction, eps, sde=True, form=form, last_step_size=size)
    ts = torch.linspace(t0, t1, num_steps, dtype=F64)
    dt = ts[1] - ts[0]

    def drift(x, t):
        v, s = sit_velocity_and_score(path, prediction, model(x, t), x, t)
        return v + sit_diffusion(path, form, x, t) * s

    for ti in ts[:-1]:
        t = torch.ones(len(x), dtype=F64) * ti
        dw = torch.randn(x.shape, generator=generator).to(F64) * torch.sqrt(dt)
        if method == "euler":
            x = x + drift(x, t) * dt + torch.sqrt(2 * sit_diffusion(path, form, x, t)) * dw
        else:
            xhat = x + torch.sqrt(2 * sit_diffusion(path, form, x, t)) * dw
            k1 = drift(xhat, t)
            k2 = drift(xhat + dt * k1, t + dt)
            x = xhat + 0.5 * dt * (k1 + k2)
    t = torch.ones(len(x), dtype=F64) * t1
    if last_step == "mean":
        return x + drift(x, t) * size
    if last_step == "euler":
        return x + sit_velocity_and_score(path, prediction, model(x, t), x, t)[0] * size
    if last_step == "tweedie":
        alpha, _, sigma, _ = sit_coefficients(path, t[0])
        return x / alpha + sigma ** 2 / alpha * sit_velocity_and_score(path, prediction, model(x, t), x, t)[1]
    return x


# ---------------------------------------------------------------------------------------------
# the paths and the conversions, from the maths
# ---------------------------------------------------------------------------------------------
T = torch.tensor([0.013, 0.2, 0.5, 0.77, 0.99], dtype=F64)


@pytest.mark.parametrize("path", PATHS)
def test_coefficients_are_the_closed_forms_and_their_derivatives(path):
    flow = create_flow(path)
    closed = {"linear": (lambda t: t, lambda t: 1 - t),
              "gvp": (lambda t: torch.sin(math.pi * t / 2), lambda t: torch.cos(math.pi * t / 2)),
              "vp": (lambda t: torch.exp(-(1 - t) ** 2 * 19.9 / 4 - (1 - t) * 0.05),
                     lambda t: torch.sqrt(1 - torch.exp(-(1 - t) ** 2 * 19.9 / 2 - (1 - t) * 0.1)))}[path]
    t = T.clone().requires_grad_(True)
    for got, f in zip((flow.path.alpha(t), flow.path.sigma(t)), closed):
        value = f(t)
        slope, = torch.autograd.grad(value.sum(), t)
        torch.testing.assert_close(torch.as_tensor(got[0], dtype=F64).expand(5), value, rtol=1e-13, atol=0)
        torch.testing.assert_close(torch.as_tensor(got[1], dtype=F64).expand(5), slope, rtol=1e-12, atol=1e-14)
    with torch.no_grad():
        (a, da), (s, ds) = flow.path.alpha(T), flow.path.sigma(T)
        torch.testing.assert_close(torch.as_tensor(flow.path.alpha_ratio(T)).expand(5), da / a, rtol=1e-12, atol=0)
        w = flow.path.velocity_weight(T)
        torch.testing.assert_close(torch.as_tensor(w).expand(5), da / a * s ** 2 - s * ds, rtol=1e-12, atol=0)
    if path != "linear":  # variance preserving
        torch.testing.assert_close(a ** 2 + s ** 2, torch.ones_like(T), rtol=1e-14, atol=0)


@pytest.mark.parametrize("path", PATHS)
def test_conversions_on_gaussian_data_are_exact(path):
    """Data x1 ~ N(m, s^2) per element: x_t ~ N(alpha m, var_t), var_t = alpha^2 s^2 + sigma^2, so
    score = -(x - alpha m) / var_t, E[x0 | x] = sigma (x - alpha m) / var_t,
    E[x1 | x] = m + alpha s^2 (x - alpha m) / var_t and v = alpha' E[x1 | x] + sigma' E[x0 | x]."""
    m, s = 0.7, 0.4
    x = torch.randn(5, 2, 3, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    tt = T.view(-1, 1, 1, 1)
    path_ = create_flow(path).path
    (a, da), (sg, dsg) = path_.alpha(tt), path_.sigma(tt)
    var = a ** 2 * s ** 2 + sg ** 2
    truth = {"score": -(x - a * m) / var, "noise": sg * (x - a * m) / var}
    truth["velocity"] = da * (m + a * s ** 2 * (x - a * m) / var) + dsg * truth["noise"]
    for prediction in PREDICTIONS:
        flow = create_flow(path, prediction)
        out = truth[prediction]
        for name, fn in (("velocity", flow.velocity), ("score", flow.score), ("noise", flow.noise)):
            assert rel(fn(out, x, T), truth[name]) < 1e-10, (prediction, name)


@pytest.mark.parametrize("path", PATHS)
def test_ode_transports_gaussian_noise_to_gaussian_data_exactly(path):
    """With the true velocity of N(m, s^2) data the flow map is affine: x_t = alpha_t m + sqrt(var_t / var_t0)
    (x_t0 - alpha_t0 m). dopri5 at tight tolerances lands on it, Heun converges as h^2. (dopri5 steps past t1
    and interpolates back, as SiT's does, so the velocity is written with sigma^2 and sigma sigma' = (sigma^2)'/2,
    which stay defined a little past t = 1 on the VP path, unlike sigma.)"""
    m, s = 0.7, 0.4
    flow = create_flow(path)
    x0 = torch.randn(2, 1, 3, 3, generator=torch.Generator().manual_seed(1), dtype=F64)
    t0, t1 = flow.interval(sampling=True)

    def coefficients(t):
        """alpha, alpha', sigma^2, sigma sigma'."""
        a, da = flow.path.alpha(t)
        if path == "linear":
            return a, da, (1 - t) ** 2, -(1 - t)
        if path == "gvp":
            return a, da, torch.cos(math.pi * t / 2) ** 2, -math.pi / 2 * torch.sin(math.pi * t / 2) * torch.cos(
                math.pi * t / 2)
        return a, da, 1 - a ** 2, -a * da

    def velocity(x, t):
        a, da, sig2, sig_dsig = coefficients(t.view(-1, 1, 1, 1))
        var = a ** 2 * s ** 2 + sig2
        return da * (m + a * s ** 2 * (x - a * m) / var) + sig_dsig * (x - a * m) / var

    (a0, _, v0, _), (a1, _, v1, _) = (coefficients(torch.tensor(t, dtype=F64)) for t in (t0, t1))
    exact = a1 * m + torch.sqrt((a1 ** 2 * s ** 2 + v1) / (a0 ** 2 * s ** 2 + v0)) * (x0 - a0 * m)
    assert rel(sample_ode(flow, velocity, x0, method="dopri5", atol=1e-10, rtol=1e-10), exact) < 1e-7
    errors = [rel(sample_ode(flow, velocity, x0, method="heun", num_steps=n), exact) for n in (21, 41)]
    assert errors[1] < errors[0] / 3 and errors[1] < 1e-2  # second order: about a quarter per halved step


# ---------------------------------------------------------------------------------------------
# against SiT's formulas
# ---------------------------------------------------------------------------------------------
def test_eps_defaults_and_intervals_are_sits():
    assert default_eps("vp", "velocity") == (1e-5, 1e-3)
    for path in ("linear", "gvp"):
        assert default_eps(path, "velocity") == (0.0, 0.0)
        assert default_eps(path, "noise") == default_eps(path, "score") == (1e-3, 1e-3)
    for path, prediction in itertools.product(PATHS, PREDICTIONS):
        flow = create_flow(path, prediction)
        assert flow.interval() == sit_interval(path, prediction, flow.train_eps)
        for sde, form, size in itertools.product((False, True), ("sigma", "SBDM"), (0.0, 0.04)):
            assert flow.interval(True, sde, form, size) == sit_interval(path, prediction, flow.sample_eps, sde, form,
                                                                        size), (path, prediction, sde, form, size)
    assert create_flow("linear", "noise", train_eps=0.01).interval() == (0.01, 0.99)
    with pytest.raises(ValueError, match="weights noise and score losses"):
        create_flow("linear", "velocity", "likelihood")


@pytest.mark.parametrize("path,prediction", list(itertools.product(PATHS, PREDICTIONS)))
def test_training_loss_is_sits_for_given_x1_x0_t(path, prediction):
    x1, x0 = data()
    for weight in ("none",) if prediction == "velocity" else ("none", "velocity", "likelihood"):
        flow = create_flow(path, prediction, weight)
        t0, t1 = flow.interval()
        t = t0 + (t1 - t0) * torch.tensor([0.01, 0.3, 0.65], dtype=F64)
        got = flow.training_losses(toy, x1, {}, t=t, noise=x0)["loss"]
        assert rel(got, sit_loss(path, prediction, weight, toy, x1, x0, t)) <= 1e-10, weight
    # a learned-sigma network's second half is dropped, as SiT does
    doubled = lambda x, t: torch.cat([toy(x, t), 1e3 * x], dim=1)  # noqa: E731
    assert torch.equal(flow.training_losses(doubled, x1, t=t, noise=x0)["loss"],
                       flow.training_losses(toy, x1, t=t, noise=x0)["loss"])


@pytest.mark.parametrize("path,prediction", list(itertools.product(PATHS, PREDICTIONS)))
def test_ode_trajectories_are_sits(path, prediction):
    """Euler and Heun step as SiT's torchdiffeq fixed grids do (linspace(t0, t1, num_steps), written out
    here); dopri5 equals torchdiffeq run on SiT's drift over SiT's output grid."""
    flow, (x0, _) = create_flow(path, prediction), data(1)
    t0, t1 = sit_interval(path, prediction, flow.sample_eps)
    ts = torch.linspace(t0, t1, 12, dtype=F64)
    for method in ("euler", "heun"):
        x = x0
        for a, b in zip(ts[:-1], ts[1:]):
            ta, tb = torch.full((len(x),), float(a), dtype=F64), torch.full((len(x),), float(b), dtype=F64)
            k1 = sit_velocity_and_score(path, prediction, toy(x, ta), x, ta)[0]
            if method == "euler":
                x = x + (b - a) * k1
            else:
                k2 = sit_velocity_and_score(path, prediction, toy(x + (b - a) * k1, tb), x + (b - a) * k1, tb)[0]
                x = x + (b - a) * (k1 + k2) / 2
        assert rel(sample_ode(flow, toy, x0, method=method, num_steps=12), x) <= 1e-10, method
    if (path, prediction) == ("vp", "noise"):
        return  # dopri5 steps past t1 (SiT's too), where VP's sigma_t, which a noise prediction divides by, is NaN

    def drift(t, x):
        t = torch.ones(len(x), dtype=F64) * t
        return sit_velocity_and_score(path, prediction, toy(x, t), x, t)[0]

    theirs = odeint(drift, x0, ts, method="dopri5", atol=[1e-6], rtol=[1e-3])[-1]
    assert rel(sample_ode(flow, toy, x0, method="dopri5"), theirs) <= 1e-10


@pytest.mark.parametrize("path,prediction", list(itertools.product(PATHS, PREDICTIONS)))
def test_sde_trajectories_are_sits(path, prediction):
    flow, (x0, _) = create_flow(path, prediction), data(2)
    # SBDM's w_t is infinite at t = 0, where a velocity model's SDE starts (SiT's default eps is 0 there)
    sbdm = "SBDM" if prediction != "velocity" else "sigma"
    cases = [("euler", "sigma", "mean"), ("heun", "sigma", "mean"), ("euler", sbdm, "tweedie"),
             ("heun", "linear", "euler"), ("euler", "decreasing", None), ("euler", "increasing-decreasing", "mean")]
    for method, form, last in cases:
        theirs = sit_sde(path, prediction, toy, x0, 9, method, form, last, 0.04, flow.sample_eps,
                         torch.Generator().manual_seed(3))
        ours = sample_sde(flow, toy, x0, method=method, num_steps=9, diffusion_form=form, last_step=last or "none",
                          last_step_size=0.04, generator=torch.Generator().manual_seed(3))
        assert torch.isfinite(theirs).all() and rel(ours, theirs) <= 1e-10, (method, form, last)
    ours = sample_sde(flow, toy, x0, num_steps=9, diffusion_form="constant", generator=torch.Generator().manual_seed(3))
    assert torch.isfinite(ours).all()  # SiT's own "constant" form fails (a float under its sqrt)


# ---------------------------------------------------------------------------------------------
# timesteps, shift
# ---------------------------------------------------------------------------------------------
def test_timestep_sampling_uniform_and_logit_normal():
    flow = create_flow("linear", "noise")  # t on [1e-3, 1 - 1e-3]
    t = flow.sample_timesteps(4096, generator=torch.Generator().manual_seed(0), dtype=F64)
    u = torch.rand(4096, generator=torch.Generator().manual_seed(0), dtype=F64)
    torch.testing.assert_close(t, 1e-3 + u * (1 - 2e-3))
    ln = create_flow("linear", "noise", time_dist="logit_normal", logit_mean=-0.5, logit_std=1.2)
    t = ln.sample_timesteps(4096, generator=torch.Generator().manual_seed(0), dtype=F64)
    n = torch.randn(4096, generator=torch.Generator().manual_seed(0), dtype=F64)
    torch.testing.assert_close(t, 1e-3 + (1 - 2e-3) / (1 + torch.exp(-(-0.5 + 1.2 * n))))
    assert abs(float(t.median()) - 1 / (1 + math.exp(0.5))) < 0.02  # the median sits at sigmoid(mean): noisier


def test_timestep_shift_is_sd3s_on_the_noise_level():
    assert time_grid(0.0, 1.0, 5) == [0.0, 0.25, 0.5, 0.75, 1.0]
    grid = time_grid(0.0, 0.96, 5, shift=3.0)
    for u, t in zip([0.0, 0.25, 0.5, 0.75, 1.0], grid):
        noise = 1 - u
        assert t == pytest.approx(0.96 * (1 - 3 * noise / (1 + 2 * noise)), rel=1e-14, abs=1e-15)
    assert grid[0] == 0.0 and grid[-1] == pytest.approx(0.96) and grid[1] < 0.24  # ends kept, denser near noise


# ---------------------------------------------------------------------------------------------
# the samplers around a DiT
# ---------------------------------------------------------------------------------------------
def test_guidance_drops_sigma_and_follows_the_interval_in_noise_fraction():
    model, x, y = tiny_dit(), torch.randn(2, 4, 8, 8), torch.tensor([1, 2])
    t = torch.full((2,), 0.3)  # noise fraction 0.7
    cond, uncond = model(x, t, y).sample[:, :4], model(x, t, torch.full_like(y, 10)).sample[:, :4]
    guided = flow_model_fn(model, y, 3.0)(x, t)
    torch.testing.assert_close(guided, uncond + 3 * (cond - uncond), rtol=1e-5, atol=1e-5)
    dit_mode = flow_model_fn(model, y, 3.0, cfg_channels=3)(x, t)  # SiT's (and DiT's) 3-channel guidance
    torch.testing.assert_close(dit_mode[:, :3], guided[:, :3])
    torch.testing.assert_close(dit_mode[:, 3], cond[:, 3])
    torch.testing.assert_close(flow_model_fn(model, y, 3.0, cfg_interval=(0.0, 0.6))(x, t), cond)
    torch.testing.assert_close(flow_model_fn(model, y, 3.0, cfg_interval=(0.6, 0.8))(x, t), guided)


@pytest.mark.parametrize("sampler", ["euler", "heun", "dopri5", "sde-euler", "sde-heun"])
def test_each_sampler_draws_from_its_own_noise(sampler):
    """A sample depends on its own generator only: alone or in a batch it comes out the same (dopri5 sizes its
    steps for the whole batch, so only the fixed-step samplers promise this)."""
    model, flow = tiny_dit(), FlowScheduler()
    gens = lambda *seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    both = sample(model, torch.tensor([3, 5]), (4, 8, 8), sampler=sampler, num_steps=4, cfg_scale=2.0,
                  generator=gens(7, 8), flow=flow)
    assert both.shape == (2, 4, 8, 8) and torch.isfinite(both).all()
    if sampler != "dopri5":
        one = sample(model, torch.tensor([5]), (4, 8, 8), sampler=sampler, num_steps=4, cfg_scale=2.0,
                     generator=gens(8), flow=flow)
        torch.testing.assert_close(one[0], both[1], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="a flow-matching model samples with euler"):
        sample(model, torch.tensor([3]), (4, 8, 8), sampler="ddpm", num_steps=2, flow=flow)
    with pytest.raises(ValueError, match=f"sampler '{sampler}' samples flow-matching models"):
        sample(model, torch.tensor([3]), (4, 8, 8), sampler=sampler, num_steps=2)


def test_pipeline_with_a_flow_scheduler_round_trips_offline_and_draws_as_sample(tmp_path):
    model = tiny_dit()
    scheduler = FlowScheduler(path="gvp", prediction="velocity", sampler="sde-heun", shift=2.0, last_step="tweedie")
    pipe = DiT3Pipeline(transformer=model, scheduler=scheduler)
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = DiT3Pipeline.from_pretrained(tmp_path / "pipe")
    assert type(loaded.scheduler) is FlowScheduler and loaded.scheduler.config.shift == 2.0
    assert loaded.scheduler.config.sampler == "sde-heun" and loaded.scheduler.flow.path_name == "gvp"
    kw = dict(class_labels=[0, 9], num_inference_steps=5, guidance_scale=3.0, output_type="pt")
    a = pipe(**kw, generator=[torch.Generator().manual_seed(s) for s in (1, 2)]).images
    b = loaded(**kw, generator=[torch.Generator().manual_seed(s) for s in (1, 2)]).images
    x = sample(model, torch.tensor([0, 9]), (4, 8, 8), sampler="sde-heun", num_steps=5, cfg_scale=3.0,
               generator=[torch.Generator().manual_seed(s) for s in (1, 2)], flow=scheduler)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a, (x / 2 + 0.5).clamp(0, 1), rtol=0, atol=0)


def _draw_unchecked(flow, sampler, form, last, size, monkeypatch):
    """The sampler's output on the toy model with check_sampler switched off: what SiT's code would return."""
    import dit3.flow.samplers as samplers

    monkeypatch.setattr(samplers, "check_sampler", lambda *a, **k: None)
    x0 = data(5, (2, 2, 4, 4))[0].double()
    if sampler.startswith("sde-"):
        return sample_sde(flow, toy, x0, method=sampler[4:], num_steps=5, diffusion_form=form, last_step=last,
                          last_step_size=size, generator=torch.Generator().manual_seed(0))
    return sample_ode(flow, toy, x0, method=sampler, num_steps=5)


SAMPLER_SETTINGS = [("euler", "sigma", "mean", 0.04), ("heun", "sigma", "mean", 0.04),
                    ("dopri5", "sigma", "mean", 0.04)] + [
    (f"sde-{m}", form, last, size) for m in ("euler", "heun") for form in ("sigma", "SBDM")
    for last in LAST_STEPS for size in (0.0, 0.04)]


@pytest.mark.parametrize("path,prediction", list(itertools.product(PATHS, PREDICTIONS)))
def test_singular_settings_are_refused_exactly_where_the_sampler_gives_nan(path, prediction, monkeypatch):
    """For every path, prediction, sampler, diffusion form, last step and sample_eps (SiT's default, or 0),
    check_sampler refuses (one line naming a fix) exactly the settings whose unchecked sampling returns NaN /
    inf on a smooth toy model (or, dopri5, fails); sample_ode / sample_sde refuse them before any network call."""
    for eps, (sampler, form, last, size) in itertools.product((None, 0.0), SAMPLER_SETTINGS):
        flow = create_flow(path, prediction, sample_eps=eps)
        with monkeypatch.context() as m:
            try:
                finite = bool(torch.isfinite(_draw_unchecked(flow, sampler, form, last, size, m)).all())
            except AssertionError as e:  # dopri5 shrinks its step to nothing where the velocity is infinite
                assert sampler == "dopri5" and "underflow in dt" in str(e)
                finite = False
        try:
            check_sampler(flow, sampler, 5, 1.0, form, 1.0, last, size)
            ok = True
        except ValueError as e:
            ok = False
            assert "divides by zero" in str(e) and "use " in str(e) and "\n" not in str(e)
            with pytest.raises(ValueError, match="divides by zero"):
                draw = sample_sde if sampler.startswith("sde-") else sample_ode
                kwargs = (dict(method=sampler[4:], diffusion_form=form, last_step=last, last_step_size=size)
                          if sampler.startswith("sde-") else dict(method=sampler))
                draw(flow, lambda *_: pytest.fail("the network was called"), torch.zeros(1, 2),
                              num_steps=5, **kwargs)
        assert ok == finite, (eps, sampler, form, last, size)


def test_the_issue_cases_are_refused_and_sits_defaults_are_not():
    """The settings that gave black images (velocity with SBDM, Heun evaluating t = 1, Tweedie or the mean step
    at t = 1) are refused with the setting to change; SiT's defaults and the shipped demo's are accepted."""
    flow = create_flow()  # linear, velocity: sample_eps 0
    cases = {("sde-euler", "SBDM", "mean", 0.04): "diffusion_form=sigma",
             ("sde-heun", "sigma", "none", 0.04): "last_step=mean",
             ("sde-euler", "sigma", "tweedie", 0.0): "last_step_size > 0",
             ("sde-euler", "sigma", "mean", 0.0): "last_step_size > 0"}
    for (sampler, form, last, size), fix in cases.items():
        with pytest.raises(ValueError, match=f"use {fix}"):
            check_sampler(flow, sampler, 50, 1.0, form, 1.0, last, size)
        with pytest.raises(ValueError, match=f"use {fix}"):
            FlowScheduler(sampler=sampler, diffusion_form=form, last_step=last, last_step_size=size)
    for sampler in ("euler", "heun", "dopri5", "sde-euler", "sde-heun"):
        FlowScheduler(sampler=sampler)
