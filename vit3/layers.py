"""Building blocks shared by the ViT³ / H-ViT³ classifiers and DiT³.

RoPE2d is imported by the TTT core (H-ViT³ rotates the SwiGLU branch's queries
and keys); the other layers are the plain pieces the models stack.
"""
from contextlib import nullcontext

import torch
import torch.nn as nn


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Rotate channel pairs (re, im) of x [..., C] by angles given as cos / sin [..., C/2] (broadcast);
    inverse=True rotates back (R^T)."""
    re, im = x.unflatten(-1, (-1, 2)).unbind(-1)
    if inverse:
        sin = -sin
    return torch.stack([re * cos - im * sin, re * sin + im * cos], dim=-1).flatten(-2)


def autocast_off(device: torch.device):
    """Autocast switched off, for code that picks its own precision; nothing to switch off on devices
    without autocast (the meta device, where timm's tests run models for their shapes)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return nullcontext()


class RoPE2d(nn.Module):
    """2-D rotary position embedding over the whole channel dimension.

    Channels are taken as (real, imaginary) pairs. The first C/4 pairs rotate with
    the row index, the last C/4 with the column index, at frequencies
    base ** (-k / (C/4)), k = 0 .. C/4 - 1; this is the layout of the official
    H-ViT³ (its checkpoints store the table as `rope.rotations`; here it is built
    on the fly for the actual feature map, so any h x w works and the key is not
    part of the state dict).
    """

    def __init__(self, dim: int, base: float = 10000.0):
        super().__init__()
        if dim % 4:
            raise ValueError(f"RoPE2d needs a channel count divisible by 4, got {dim}")
        self.dim = dim
        self.base = base
        self._cache: dict = {}
        self._theta: dict = {}

    def rotations(self, h: int, w: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin tables, each [h, w, C/2]."""
        key = (h, w, device, dtype)
        if key not in self._cache:
            k_max = self.dim // 4
            theta = self._theta64(device)
            rows = torch.arange(h, dtype=torch.float64, device=device)[:, None, None] * theta  # [h, 1, k]
            cols = torch.arange(w, dtype=torch.float64, device=device)[None, :, None] * theta  # [1, w, k]
            angles = torch.cat([rows.expand(h, w, k_max), cols.expand(h, w, k_max)], dim=-1)  # [h, w, C/2]
            self._cache = {key: (angles.cos().to(dtype), angles.sin().to(dtype))}  # keep one resolution
        return self._cache[key]

    def frequencies(self, device: torch.device) -> torch.Tensor:
        """theta [C/4], float32: the angle of pair p is row * theta[p] for p < C/4, column * theta[p - C/4]
        after (the Triton TTT kernels build their rotations from it)."""
        if device not in self._theta:
            self._theta[device] = self._theta64(device).float()
        return self._theta[device]

    def _theta64(self, device: torch.device) -> torch.Tensor:
        k_max = self.dim // 4
        return 1.0 / (self.base ** (torch.arange(k_max, dtype=torch.float64, device=device) / k_max))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, h, w, C] -> [B, h, w, C], rotated in float32 (or float64), returned in x's dtype
        _, h, w, c = x.shape
        if c != self.dim:
            raise ValueError(f"RoPE2d built for {self.dim} channels got {c}")
        dtype = torch.promote_types(x.dtype, torch.float32)
        cos, sin = self.rotations(h, w, x.device, dtype)
        return rotate_pairs(x.to(dtype), cos, sin).to(x.dtype)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, base={self.base}"


class TokenDWConv(nn.Conv2d):
    """3x3 depthwise convolution over tokens laid out as an h x w map.

    The blocks use it as the conditional position encoding (CPE, Chu et al.,
    https://arxiv.org/abs/2102.10882; the block adds its output to its input), and
    ConvFFN inside its hidden layer. It subclasses nn.Conv2d so that the parameters
    are `<name>.weight` / `<name>.bias`, the names in the official checkpoints.
    """

    def __init__(self, dim: int, kernel_size: int = 3):
        super().__init__(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        # x: [B, h*w, C] -> [B, h*w, C]
        b, n, c = x.shape
        # a channels-last view, no copy: oneDNN's depthwise conv is fastest on it, and the
        # output, channels-last too, flattens back to tokens without a copy
        y = super().forward(x.reshape(b, h, w, c).permute(0, 3, 1, 2))  # [B, C, h, w]
        return y.flatten(2).transpose(1, 2)


class ConvFFN(nn.Module):
    """MLP with a depthwise-conv residual on its hidden map (the FFN of H-ViT³).

    fc1 -> act -> (x + dwconv3x3(x)) -> act -> fc2, the activation applied on both
    sides of the conv as in the official model; parameters `fc1`, `dwc`, `fc2`.
    """

    def __init__(self, dim: int, hidden_dim: int, act_layer: type[nn.Module] = nn.GELU, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = act_layer()
        self.dwc = TokenDWConv(hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        x = self.drop(self.act(self.fc1(x)))  # [B, N, hidden]
        x = x + self.dwc(x, h, w)
        return self.drop(self.fc2(self.act(x)))  # [B, N, C]
