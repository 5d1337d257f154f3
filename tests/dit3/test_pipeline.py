"""DiT3Pipeline: images and the offline save / load round trip, pixel space and other schedulers, and diffusers'
own DiTPipeline running DiT³ as ours does."""
import numpy as np
import pytest
import torch

from dit3.models import DiT3
from dit3.pipeline import DiT3Pipeline
from dit3.sampling import make_scheduler
from tests.dit3.tiny import tiny_dit, tiny_vae


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


def test_pipeline_refuses_samples_that_are_not_images():
    """A guidance scale that makes the samples blow up is an error naming it, not black PIL images."""
    from vit3.errors import SamplingDiverged

    pipe = DiT3Pipeline(transformer=tiny_dit(in_channels=3, num_classes=3), scheduler=make_scheduler("ddim"))
    pipe.set_progress_bar_config(disable=True)
    with pytest.raises(SamplingDiverged, match=r"of 1 samples \(DDIMScheduler, 3 steps, guidance_scale 1e\+30\)"):
        pipe(class_labels=[1], num_inference_steps=3, guidance_scale=1e30)
