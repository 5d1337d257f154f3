"""The TTT core shared by ViT³, H-ViT³ and DiT³: one layer, a reference and a fast path."""
from .fast import ttt_fast
from .layer import IMPLS, INNER_LOSSES, INNER_MODELS, TTT
from .reference import ttt_reference

__all__ = ["TTT", "INNER_MODELS", "INNER_LOSSES", "IMPLS", "ttt_fast", "ttt_reference"]
