"""vit3: Vision Test-Time Training (ViT³, arXiv 2512.01643)."""
from .complexity import Complexity, complexity
from .layers import RoPE2d
from .mixers import MIXERS, Attention, LinearAttention, build_mixer
from .models import MODEL_NAMES, HViT3, ViT3, create_model  # registers with timm
from .ttt import TTT
from .weights import checkpoint_filter_fn, load_official_checkpoint, load_weights

__all__ = ["TTT", "RoPE2d", "Attention", "LinearAttention", "build_mixer", "MIXERS",
           "ViT3", "HViT3", "MODEL_NAMES", "create_model", "load_official_checkpoint",
           "load_weights", "checkpoint_filter_fn", "complexity", "Complexity"]
