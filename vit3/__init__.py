"""vit3: Vision Test-Time Training (ViT³, arXiv 2512.01643)."""
from .layers import RoPE2d
from .mixers import MIXERS, Attention, LinearAttention, build_mixer
from .models import MODEL_NAMES, HViT3, ViT3, complexity, create_model, load_official_checkpoint  # registers with timm
from .ttt import TTT

__all__ = ["TTT", "RoPE2d", "Attention", "LinearAttention", "build_mixer", "MIXERS",
           "ViT3", "HViT3", "MODEL_NAMES", "create_model", "load_official_checkpoint", "complexity"]
