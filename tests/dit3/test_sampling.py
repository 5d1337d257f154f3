"""Samplers and DiT3Pipeline: ADM's respaced DDPM step against independent formulas, diffusers' DDPM step
against ours, per-sample determinism, guidance options, and the pipeline's offline save / load."""
import numpy as np
import pytest
import torch

from dit3.diffusion import create_diffusion, linear_betas, space_timesteps
from dit3.models import DiT3
from dit3.pipeline import DiT3Pipeline
from dit3.sampling import guided_output, make_scheduler, sample


def tiny_dit(in_channels=4, num_classes=10, seed=0):
    torch.manual_seed(seed)
    model = DiT3(input_size=8, patch_size=2, in_channels=in_channels, hidden_size=32, depth=2, num_heads=2,
                 num_classes=num_classes)
    with torch.no_grad():  # leave DiT's zero init of the output so the model's output is not trivially zero
        for p in model.parameters():
            if p.dim() > 1 and p.abs().sum() == 0:
                p.normal_(0, 0.05)
    return model.eval()


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
def tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                         layers_per_block=1)


def test_pipeline_images_and_offline_round_trip(tmp_path):
    pipe = DiT3Pipeline(transformer=tiny_dit(), scheduler=make_scheduler("ddpm"), vae=tiny_vae())
    pipe.set_progress_bar_config(disable=True)
    kw = dict(class_labels=[0, 9], num_inference_steps=4, guidance_scale=3.0)
    images = pipe(**kw, generator=torch.Generator().manual_seed(0)).images
    assert len(images) == 2 and images[0].size == (16, 16) and images[0].mode == "RGB"
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = DiT3Pipeline.from_pretrained(tmp_path / "pipe")
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.transformer) is DiT3 and loaded.scheduler.config.variance_type == "learned_range"
    a = pipe(**kw, generator=torch.Generator().manual_seed(0), output_type="np").images
    b = loaded(**kw, generator=torch.Generator().manual_seed(0), output_type="np").images
    np.testing.assert_allclose(a, b, atol=1e-6)
    assert a.shape == (2, 16, 16, 3) and 0 <= a.min() and a.max() <= 1
    with pytest.raises(ValueError, match=r"class labels must lie in 0 .. 9"):
        pipe(class_labels=[10], num_inference_steps=2)


def test_pipeline_pixel_space_and_other_schedulers():
    pipe = DiT3Pipeline(transformer=tiny_dit(in_channels=3, num_classes=3), scheduler=make_scheduler("ddim"))
    pipe.set_progress_bar_config(disable=True)
    out = pipe(class_labels=[0, 2], num_inference_steps=3, guidance_scale=2.0, output_type="pt").images
    assert out.shape == (2, 3, 8, 8) and torch.isfinite(out).all()  # guidance with 3 classes (null class 3)
    pipe.scheduler = make_scheduler("dpm")
    assert pipe(class_labels=[1], num_inference_steps=3, output_type="pt").images.shape == (1, 3, 8, 8)


def test_diffusers_dit_pipeline_runs_dit3_as_ours_does():
    """diffusers' own DiTPipeline (null class 1000) drives a 1000-class DiT3 through the DiT transformer call;
    with the same scheduler, noise and all-channel guidance it draws what DiT3Pipeline draws."""
    from diffusers import DiTPipeline

    model, vae = tiny_dit(num_classes=1000), tiny_vae()
    assert model.config.sample_size == 8 and model.config.out_channels == 8  # what DiTPipeline reads
    kw = dict(class_labels=[3, 999], num_inference_steps=4, guidance_scale=3.0, output_type="np")
    theirs = DiTPipeline(transformer=model, vae=vae, scheduler=make_scheduler("ddim"))
    ours = DiT3Pipeline(transformer=model, scheduler=make_scheduler("ddim"), vae=vae)
    for pipe in (theirs, ours):
        pipe.set_progress_bar_config(disable=True)
    a = theirs(**kw, generator=torch.Generator().manual_seed(0)).images
    b = ours(**kw, generator=torch.Generator().manual_seed(0)).images
    assert a.shape == (2, 16, 16, 3)
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert np.abs(a - theirs(**kw, generator=torch.Generator().manual_seed(1)).images).max() > 1e-3


def test_dit3_is_called_as_diffusers_dit_transformer(tmp_path, caplog, monkeypatch):
    from diffusers.models.modeling_outputs import Transformer2DModelOutput
    from diffusers.utils import logging as diffusers_logging

    # diffusers' warnings do not reach the root logger (pytest's caplog) unless they propagate
    monkeypatch.setattr(diffusers_logging._get_library_root_logger(), "propagate", True)

    model = tiny_dit()
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.tensor([1, 2])
    out = model(hidden_states=x, timestep=t, class_labels=y)
    assert isinstance(out, Transformer2DModelOutput) and out.sample.shape == (2, 8, 8, 8)
    sample, = model(x, t, y, return_dict=False)
    torch.testing.assert_close(sample, out.sample)
    # the derived config entries are written and read back without complaint
    model.save_pretrained(tmp_path)
    with caplog.at_level("WARNING"):
        loaded = DiT3.from_pretrained(tmp_path)
    assert "not expected" not in caplog.text
    assert loaded.config.sample_size == 8 and loaded.config.out_channels == 8
