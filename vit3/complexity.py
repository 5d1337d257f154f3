"""Parameters and multiply-accumulates of a classifier, counted as the paper counts its FLOPs."""
from __future__ import annotations

from typing import NamedTuple
from unittest.mock import patch

import torch
import torch.nn as nn
from timm.layers import to_2tuple
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from .ttt import TTT


class Complexity(NamedTuple):
    params: int
    macs: int  # multiply-accumulates, what the paper (like most vision papers) calls FLOPs

    def __str__(self) -> str:
        return f"{self.params / 1e6:.2f}M params, {self.macs / 1e9:.2f} GMACs"


def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    # torch's counter knows the CUDA attention kernels but not the CPU one
    return sdpa_flop_count(query_shape, key_shape, value_shape)


@torch.no_grad()
def complexity(model: nn.Module, img_size: int | tuple[int, int] | None = None, in_chans: int = 3) -> Complexity:
    """Parameters and multiply-accumulates for one image (default size: the model's img_size).

    Counted like the paper's FLOPs: torch's FlopCounterMode (every matmul, linear,
    convolution and attention kernel of a forward) halved, except the TTT inner step,
    which is hidden from the counter and counted analytically (TTT.inner_macs): its
    kernels (batched GEMMs, grouped-convolution weight gradients) are counted differently
    by different torch versions. Norms, activations and other elementwise work are not
    counted. On the official models the counter gives 1.219 G for ViT³-T at 224 (it sees
    the conv that applies the trained inner conv, not the elementwise inner gradient);
    this count is 0.06% higher.
    """
    h, w = to_2tuple(img_size or model.img_size)
    param = next(model.parameters())
    x = torch.zeros(1, in_chans, h, w, device=param.device, dtype=param.dtype)
    inner_macs = []

    def counted_forward(module: TTT, x: torch.Tensor, h: int, w: int, rope=None) -> torch.Tensor:
        qkv = module.qkv(x)
        inner_macs.append(qkv.shape[0] * module.inner_macs(qkv.shape[1]))
        return module.proj(qkv.new_zeros(*qkv.shape[:2], module.proj.in_features))

    counter = FlopCounterMode(display=False, custom_mapping={
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops})
    was_training = model.training
    model.eval()  # BatchNorm statistics untouched, no stochastic depth
    try:
        with patch.object(TTT, "forward", counted_forward), counter:
            model(x)
    finally:
        model.train(was_training)
    return Complexity(sum(p.numel() for p in model.parameters()), counter.get_total_flops() // 2 + sum(inner_macs))
