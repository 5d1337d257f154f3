"""`DiT3Pipeline`: class-conditional DiT³ sampling as a diffusers DiffusionPipeline.

    pipe = DiT3Pipeline(transformer=model, scheduler=make_scheduler("ddpm"), vae=vae)
    images = pipe(class_labels=[207, 360], num_inference_steps=250, guidance_scale=4.0).images
    pipe.save_pretrained("dit3-b2"); pipe = DiT3Pipeline.from_pretrained("dit3-b2")
    pipe.push_to_hub("user/dit3-b2")   # needs a network and `huggingface-cli login`

`python sample.py --ckpt RUN --export DIR` writes a training run as such a folder. `id2label` (class id ->
name, as in diffusers' DiTPipeline folders) is kept in the folder's model_index.json.

Unlike diffusers' DiTPipeline, the null class is the transformer's own `num_classes` (DiTPipeline
hard-codes 1000, which breaks guidance for other label sets), guidance covers all latent
channels by default, and `vae` is optional (pixel-space models). A DDPMScheduler with learned
variance runs DiT's respaced chain (the ADM spacing of `dit3.space_timesteps`) and receives the
predicted variance; DDIM, DPM-Solver and other epsilon schedulers receive epsilon only. A flow-matching
model comes with a `dit3.flow.FlowScheduler`, which runs its sampler (ODE or SDE, SiT's) on the same
noise and guidance as `dit3.sampling.sample`.
"""
from __future__ import annotations

import torch
from diffusers import DDPMScheduler, DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from .diffusion import space_timesteps
from .flow import FlowScheduler
from .sampling import check_samples, flow_model_fn, guided_output


class DiT3Pipeline(DiffusionPipeline):
    model_cpu_offload_seq = "transformer->vae"
    _optional_components = ["vae"]

    def __init__(self, transformer, scheduler, vae=None, id2label: dict | None = None):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler, vae=vae)
        # int keys: model_index.json gives them back as strings
        self.register_to_config(id2label={int(k): v for k, v in id2label.items()} if id2label else None)

    @torch.no_grad()
    def __call__(self, class_labels: list[int] | torch.Tensor, num_inference_steps: int = 250,
                 guidance_scale: float = 4.0, guidance_channels: int | None = None,
                 guidance_interval: tuple[float, float] | None = None,
                 generator: torch.Generator | list[torch.Generator] | None = None,
                 output_type: str = "pil", return_dict: bool = True):
        """Draw one image per class label. output_type: "pil", "np" ([B, H, W, 3] in [0, 1]) or "pt"
        ([B, 3, H, W] in [0, 1])."""
        model = self.transformer
        labels = torch.as_tensor(class_labels, device=self._execution_device, dtype=torch.long).reshape(-1)
        if ((labels < 0) | (labels >= model.num_classes)).any():
            raise ValueError(f"class labels must lie in 0 .. {model.num_classes - 1}, got {labels.tolist()}")
        size = model.config.input_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        channels = model.config.in_channels
        x = randn_tensor((len(labels), channels, h, w), generator=generator, device=self._execution_device,
                         dtype=torch.float32)

        scheduler = self.scheduler
        model.eval()
        if isinstance(scheduler, FlowScheduler):  # a flow-matching model: the whole solve in one call
            fn = flow_model_fn(model, labels, guidance_scale, guidance_channels, guidance_interval)
            x = scheduler.sample(fn, x, num_inference_steps, generator=generator)
        else:
            learned_variance = isinstance(scheduler, DDPMScheduler) and \
                scheduler.config.variance_type in ("learned", "learned_range")
            if learned_variance:  # DiT's chain: ADM's spacing of the training steps
                steps = space_timesteps(scheduler.config.num_train_timesteps, num_inference_steps)
                scheduler.set_timesteps(timesteps=steps[::-1], device=self._execution_device)
            else:
                scheduler.set_timesteps(num_inference_steps, device=self._execution_device)
            x = x * scheduler.init_noise_sigma
            for t in self.progress_bar(scheduler.timesteps):
                x_in = scheduler.scale_model_input(x, t)
                out = guided_output(model, x_in, t.expand(len(x)), labels, guidance_scale, guidance_channels,
                                    guidance_interval, scheduler.config.num_train_timesteps).float()
                model_output = out if learned_variance else out[:, :channels]
                x = scheduler.step(model_output, t, x, generator=generator).prev_sample

        decoded = (self.vae.decode(x / self.vae.config.scaling_factor).sample if self.vae is not None else x)
        check_samples(x, decoded.clamp(-1, 1), f"{type(scheduler).__name__}, {num_inference_steps} steps, "
                                               f"guidance_scale {guidance_scale:g}")
        images = (decoded / 2 + 0.5).clamp(0, 1)  # [B, 3, H, W]
        if output_type == "pt":
            out = images
        else:
            out = images.cpu().permute(0, 2, 3, 1).float().numpy()
            if output_type == "pil":
                out = self.numpy_to_pil(out)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=out) if return_dict else (out,)
