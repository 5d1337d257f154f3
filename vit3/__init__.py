"""vit3: Vision Test-Time Training (ViT³, arXiv 2512.01643)."""
from .layers import RoPE2d
from .mixers import MIXERS, Attention, LinearAttention, build_mixer
from .ttt import TTT

__all__ = ["TTT", "RoPE2d", "Attention", "LinearAttention", "build_mixer", "MIXERS"]
