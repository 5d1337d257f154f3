"""dit3: DiT³, the Diffusion Transformer with the ViT³ test-time-training layer (arXiv 2512.01643)."""
from .diffusion import GaussianDiffusion, create_diffusion, space_timesteps
from .flow import FlowMatching, FlowScheduler, create_flow
from .models import DiT3, DiT3_models
from .weights import load_dit3, load_dit3_weights, load_official_checkpoint

__all__ = ["DiT3", "DiT3_models", "load_official_checkpoint", "load_dit3", "load_dit3_weights", "GaussianDiffusion",
           "create_diffusion",
           "space_timesteps", "FlowMatching", "FlowScheduler", "create_flow"]
