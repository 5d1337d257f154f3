"""dit3.sampling: ADM's respaced DDPM step against independent formulas, diffusers' DDPM step against ours,
per-sample determinism, guidance options (the pipeline: test_pipeline.py)."""
import numpy as np
import pytest
import torch

from dit3.diffusion import create_diffusion, linear_betas, space_timesteps
from dit3.sampling import guided_output, make_scheduler, sample
from tests.dit3.tiny import tiny_dit


def test_respaced_p_sample_matches_adm_formulas():
    """One step of the 25-step respaced chain with learned-range variance, written out from ADM's
    respace.py + gaussian_diffusion.py in float64 numpy."""
    steps = space_timesteps(1000, "25")
    ours = create_diffusion("25")
    betas = linear_betas(1000).numpy()
    abar_full = np.cumprod(1 - betas)
    abar = abar_full[steps]  # the kept steps
    new_betas = 1 - abar / np.concatenate([[1.0], abar[:-1]])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64)
    out = torch.randn(3, 8, 8, 8, generator=g, dtype=torch.float64)
    out[:, 4:] = out[:, 4:].tanh()  # variance values in [-1, 1]
    noise = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64)
    for i in (0, 1, 12, 24):
        t = torch.full((3,), i)
        a, a_prev = abar[i], (abar[i - 1] if i > 0 else 1.0)
        beta = new_betas[i]
        post_var = beta * (1 - a_prev) / (1 - a)
        post_var_1 = new_betas[1] * (1 - abar[0]) / (1 - abar[1])
        min_log = np.log(post_var if i > 0 else post_var_1)
        max_log = np.log(beta)
        eps, v = out[:, :4].numpy(), out[:, 4:].numpy()
        frac = (v + 1) / 2
        log_var = frac * max_log + (1 - frac) * min_log
        x0 = np.sqrt(1 / a) * x.numpy() - np.sqrt(1 / a - 1) * eps
        mean = (beta * np.sqrt(a_prev) / (1 - a)) * x0 + ((1 - a_prev) * np.sqrt(1 - beta) / (1 - a)) * x.numpy()
        expect = mean + (i > 0) * np.exp(0.5 * log_var) * noise.numpy()
        got = ours.p_sample(out, x, t, noise=noise)
        np.testing.assert_allclose(got.numpy(), expect, rtol=1e-10, atol=1e-10)
    assert ours.timestep_map.tolist() == steps


def test_diffusers_ddpm_step_equals_ours():
    """diffusers' DDPMScheduler (learned_range, DiT's respaced timesteps) takes the same step as ADM's p_sample."""
    steps = space_timesteps(1000, "25")
    ours = create_diffusion("25")
    sched = make_scheduler("ddpm")
    sched.set_timesteps(timesteps=steps[::-1])
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=g)
    out = torch.randn(2, 8, 8, 8, generator=g)
    out[:, 4:] = out[:, 4:].tanh()
    for i in (24, 12, 1):
        t_orig = steps[i]
        theirs = sched.step(out, t_orig, x, generator=torch.Generator().manual_seed(5)).prev_sample
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
        mine = ours.p_sample(out, x, torch.full((2,), i), noise=noise)
        torch.testing.assert_close(theirs, mine, rtol=1e-4, atol=1e-5)


def test_each_sample_depends_only_on_its_own_generator():
    model = tiny_dit()
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    batch = sample(model, torch.tensor([1, 2, 3]), (4, 8, 8), num_steps=5, cfg_scale=2.0, generator=gens([7, 8, 9]))
    alone = sample(model, torch.tensor([2]), (4, 8, 8), num_steps=5, cfg_scale=2.0, generator=gens([8]))
    torch.testing.assert_close(batch[1:2], alone, rtol=1e-5, atol=1e-5)
    other = sample(model, torch.tensor([2]), (4, 8, 8), num_steps=5, cfg_scale=2.0, generator=gens([10]))
    assert not torch.allclose(other, alone)


@pytest.mark.parametrize("sampler", ["ddim", "dpm"])
def test_diffusers_samplers_run(sampler):
    x = sample(tiny_dit(), torch.tensor([0, 5]), (4, 8, 8), sampler=sampler, num_steps=4, cfg_scale=3.0,
               generator=torch.Generator().manual_seed(0))
    assert x.shape == (2, 4, 8, 8) and torch.isfinite(x).all()


def test_guidance_channels_and_interval():
    model = tiny_dit()
    x = torch.randn(2, 4, 8, 8)
    t = torch.full((2,), 500)
    y = torch.tensor([1, 2])
    cond, uncond = model(x, t, y).sample, model(x, t, torch.full_like(y, 10)).sample
    full = guided_output(model, x, t, y, 3.0)
    torch.testing.assert_close(full[:, :4], uncond[:, :4] + 3 * (cond[:, :4] - uncond[:, :4]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(full[:, 4:], cond[:, 4:])  # the variance comes from the conditional pass
    dit = guided_output(model, x, t, y, 3.0, cfg_channels=3)  # DiT's mode: the 4th channel is not guided
    torch.testing.assert_close(dit[:, 3:], cond[:, 3:])
    torch.testing.assert_close(guided_output(model, x, t, y, 3.0, cfg_interval=(0.0, 0.4)), cond)  # 0.5 outside
    torch.testing.assert_close(guided_output(model, x, t, y, 3.0, cfg_interval=(0.4, 0.6)), full)


# ---------------------------------------------------------------------------------------------
# DiT3Pipeline
# ---------------------------------------------------------------------------------------------


def test_check_samples_refuses_what_is_not_an_image():
    """NaN / inf (in the model's space or decoded), an RMS past MAX_SAMPLE_RMS, and a one-colour image are each
    refused in one line that counts them; real-looking samples (and a digit: mostly background, clamped) pass."""
    from dit3.sampling import MAX_SAMPLE_RMS, check_samples
    from vit3.errors import SamplingDiverged

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 8, 8, generator=g)
    digit = torch.full((3, 8, 8), -1.0)
    digit[:, 2:6, 3:5] = 1.0
    x[3] = digit * 1.2  # past the clamp, as a trained pixel model's background is
    check_samples(x, x.clamp(-1, 1), "ok")
    cases = {"1 NaN / inf": lambda x, im: x[1].view(-1).__setitem__(5, float("nan")),
             "1 saturated": lambda x, im: x[2].mul_(1.01 * MAX_SAMPLE_RMS / x[2].pow(2).mean().sqrt()),
             "1 flat (a single colour)": lambda x, im: im[0].fill_(-1.0),
             "NaN / inf of 4": lambda x, im: im[0].view(-1).__setitem__(0, float("inf"))}
    for words, spoil in cases.items():
        bad = x.clone()
        images = bad.clamp(-1, 1)
        spoil(bad, images)
        with pytest.raises(SamplingDiverged, match="samples") as e:
            check_samples(bad, images, "sampler test")
        assert words in str(e.value) and "\n" not in str(e.value) and "sampler test" in str(e.value)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_a_huge_guidance_scale_is_an_error_not_black_images(sampler):
    """sample_images with a finite but absurd cfg_scale: the samples blow up and are refused, not clamped into
    black or flat images; a sane scale on the same model and noise draws."""
    from dit3.sampling import sample_images
    from vit3.errors import SamplingDiverged

    model, labels = tiny_dit(in_channels=3), torch.tensor([1, 2])
    kw = dict(sampler=sampler, num_steps=4, generator=torch.Generator().manual_seed(0))
    assert sample_images(model, labels, (3, 8, 8), cfg_scale=3.0, **kw).isfinite().all()
    with pytest.raises(SamplingDiverged, match=rf"of 2 samples \(sampler {sampler}, 4 steps, cfg_scale 1e\+30\)"):
        sample_images(model, labels, (3, 8, 8), cfg_scale=1e30, **{**kw, "generator": torch.Generator().manual_seed(0)})
