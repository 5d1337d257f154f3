"""REPA: representation alignment of a diffusion transformer's hidden states with a frozen vision encoder.

REPA: https://arxiv.org/abs/2410.06940 (Yu et al.; code: sihyun-yu/REPA)
iREPA: https://arxiv.org/abs/2512.10794 (Singh et al.: a conv projector and spatially normalised targets)

The output tokens h [B, N, C] of one block of the network are mapped by a small trained projector to the
encoder's width and pulled toward the encoder's patch features z [B, N, D] of the clean image:
loss = mean over batch and tokens of -cos(proj(h), z), added with a coefficient to the diffusion or flow
loss. The projector trains with the network but is no part of it (its own module, its own checkpoint file),
so the network's weights, exports and samplers are those of a plain run. The encoder is frozen.

The pieces here know nothing of the trainer's config: the projectors, the spatial normalisation, the loss,
the frozen encoder (a timm model or a train_vit.py classifier) and `AlignedModel`, the network with the
projector as the objective calls it.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from vit3.errors import ConfigError, load_error_text

PROJECTORS = ("mlp", "conv")


# ----------------------------------------------------------------------------------------
# Projectors, normalisation, loss
# ----------------------------------------------------------------------------------------
class MLPProjector(nn.Module):
    """REPA's projector: Linear-SiLU-Linear-SiLU-Linear on each token, [B, N, C] -> [B, N, D]."""

    def __init__(self, hidden_size: int, encoder_dim: int, projector_dim: int = 2048):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(hidden_size, projector_dim), nn.SiLU(),
                                 nn.Linear(projector_dim, projector_dim), nn.SiLU(),
                                 nn.Linear(projector_dim, encoder_dim))

    def forward(self, h: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        return self.mlp(h)  # [B, N, D]


class ConvProjector(nn.Module):
    """iREPA's projector: one 3x3 convolution over the token grid, [B, h*w, C] -> [B, h*w, D]. Unlike the
    per-token MLP it sees each token's neighbours, which the paper finds carries the spatial structure over."""

    def __init__(self, hidden_size: int, encoder_dim: int):
        super().__init__()
        self.conv = nn.Conv2d(hidden_size, encoder_dim, kernel_size=3, padding=1)

    def forward(self, h: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        x = h.transpose(1, 2).unflatten(2, grid)  # [B, C, h, w]
        return self.conv(x).flatten(2).transpose(1, 2)  # [B, h*w, D]


def build_projector(kind: str, hidden_size: int, encoder_dim: int, projector_dim: int) -> nn.Module:
    if kind == "mlp":
        return MLPProjector(hidden_size, encoder_dim, projector_dim)
    if kind == "conv":
        return ConvProjector(hidden_size, encoder_dim)
    raise ValueError(f"unknown projector {kind!r}; choose one of {PROJECTORS}")


def spatial_norm(z: torch.Tensor, gamma: float) -> torch.Tensor:
    """iREPA's spatial normalisation of encoder features z [B, N, D]: over the tokens of each image, subtract
    gamma x the mean (the global part shared by all tokens) and divide by the standard deviation, so the targets
    differ more between tokens. The paper uses gamma in [0.6, 0.8] and eps 1e-6."""
    z = z - gamma * z.mean(dim=1, keepdim=True)
    return z / (z.std(dim=1, keepdim=True) + 1e-6)


def alignment_loss(projected: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over batch and tokens of the negative cosine similarity of [B, N, D] and [B, N, D] (REPA's
    projection loss), in float32 whatever the autocast: a reduction over D under bf16 loses the small
    differences the gradient is made of."""
    p = F.normalize(projected.float(), dim=-1)
    z = F.normalize(target.float(), dim=-1)
    return -(p * z).sum(dim=-1).mean()


# ----------------------------------------------------------------------------------------
# The frozen encoder
# ----------------------------------------------------------------------------------------
def is_path(encoder: str) -> bool:
    """A run folder / checkpoint rather than a timm name: timm names hold no '/' except the hub's prefix."""
    return ("/" in encoder and not encoder.startswith(("hf-hub:", "hf_hub:"))) or Path(encoder).exists()


def check_encoder(encoder: str, encoder_file: str):
    """ConfigError, one line, for an encoder that cannot be there: a path that does not exist, an unknown
    timm name, a weights file that does not exist (checked before any work; the grid is checked at load)."""
    import timm

    import vit3  # noqa: F401  registers the ViT³ classifiers with timm

    if is_path(encoder):
        if not Path(encoder).exists():
            raise ConfigError(f"repa.encoder={encoder} does not exist: pass a train_vit.py run folder or checkpoint, "
                              "or a timm model name (e.g. vit_base_patch14_dinov2.lvd142m)")
        if encoder_file:
            raise ConfigError(f"repa.encoder_file is for a timm encoder; repa.encoder={encoder} is a run folder or "
                              "checkpoint, which holds its weights: leave repa.encoder_file empty")
        return
    if not timm.is_model(encoder):
        raise ConfigError(f"repa.encoder={encoder!r} is neither an existing path nor a timm model name; e.g. "
                          "vit_base_patch14_dinov2.lvd142m, or a train_vit.py run folder")
    if encoder_file and not Path(encoder_file).is_file():
        raise ConfigError(f"repa.encoder_file={encoder_file} does not exist: pass the weights file of "
                          f"{encoder} (a .safetensors or .pth state dict), or leave it empty for timm's cache")


def _load_model(encoder: str, encoder_file: str) -> tuple[nn.Module, str]:
    """(the encoder network, its description): a train_vit.py classifier (EMA weights where there are any) or
    a timm model with its pretrained weights (timm's cache, or encoder_file through pretrained_cfg_overlay)."""
    import timm

    if is_path(encoder):
        from .evaluation import load_classifier

        try:
            return load_classifier(encoder)[0], f"ViT³ classifier {encoder}"
        except (FileNotFoundError, KeyError, RuntimeError) as e:  # no config.yaml, or one of another trainer
            raise ConfigError(f"repa.encoder={encoder} is not a train_vit.py run folder or checkpoint "
                              f"({type(e).__name__}: {e}); pass one, or a timm model name") from None
    overlay = dict(file=str(Path(encoder_file).resolve())) if encoder_file else None
    try:
        model = timm.create_model(encoder, pretrained=True, pretrained_cfg_overlay=overlay)
    except (RuntimeError, OSError, ValueError) as e:  # no cached weights offline, a file of another model
        where = f"repa.encoder_file={encoder_file}" if encoder_file else "timm's cache (the Hugging Face hub)"
        raise ConfigError(f"cannot load the weights of repa.encoder={encoder} from {where} ({load_error_text(e)}); "
                          "pass repa.encoder_file=PATH, a local weights file of that model") from None
    return model, f"timm {encoder}" + (f" ({encoder_file})" if encoder_file else "")


class FrozenEncoder(nn.Module):
    """The encoder's patch features [B, grid*grid, D] of images in [-1, 1] [B, 3, H, W], without gradients.

    The grid is matched by resizing the input, never by interpolating features: every encoder taken is a
    patch-token ViT that runs at any multiple of its patch (timm's `set_input_size` resamples its position
    table once; ViT³ has none), so at patch x grid pixels each encoder token covers exactly the image region of
    one model token, as REPA's 224 px for DINOv2-B/14 and a 16 x 16 grid. Interpolated features would blur
    each target over its neighbours. The input is resized bicubically (REPA) and normalised with the
    encoder's own pretrained mean and std; prefix tokens (class, registers: timm's num_prefix_tokens) are
    dropped, as REPA takes DINOv2's normed patch tokens.
    """

    def __init__(self, model: nn.Module, grid: int, description: str):
        super().__init__()
        from timm.data import resolve_data_config

        patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
        if patch is None or len(set(patch)) != 1:
            raise ConfigError(f"repa.encoder {description} is not a ViT with square patches: its features have no "
                              f"patch grid to match the model's {grid}x{grid} tokens; use a ViT encoder")
        self.size = patch[0] * grid
        if hasattr(model, "set_input_size"):
            model.set_input_size(img_size=(self.size, self.size))
        self.model = model.eval().requires_grad_(False)
        self.prefix = getattr(model, "num_prefix_tokens", 0)
        data = resolve_data_config({}, model=model)
        self.register_buffer("mean", torch.tensor(data["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(data["std"]).view(1, 3, 1, 1), persistent=False)
        tokens = self(torch.zeros(1, 3, self.size, self.size))
        if tokens.ndim != 3 or tokens.shape[1] != grid * grid:
            raise ConfigError(f"repa.encoder {description} gives features of shape {tuple(tokens.shape)} for a "
                              f"{self.size} px image, not {grid}x{grid} patch tokens: its grid cannot match the "
                              "model's; use a ViT encoder")
        self.dim = tokens.shape[-1]

    def train(self, mode: bool = True):
        return super().train(False)  # always eval: no dropout, no stochastic depth in the targets

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate((images.float() + 1) / 2, size=(self.size, self.size), mode="bicubic", align_corners=False)
        x = (x - self.mean) / self.std
        return self.model.forward_features(x)[:, self.prefix:]  # [B, grid*grid, D]


def load_encoder(encoder: str, encoder_file: str, grid: int, device) -> FrozenEncoder:
    """The frozen encoder for a model of grid x grid tokens; ConfigError (one line) if it cannot be loaded or its
    patch grid cannot match."""
    check_encoder(encoder, encoder_file)
    model, description = _load_model(encoder, encoder_file)
    return FrozenEncoder(model, grid, description).to(device)


# ----------------------------------------------------------------------------------------
# The network with its projector
# ----------------------------------------------------------------------------------------
class AlignedModel(nn.Module):
    """The network and the projector as one module for the optimizer and DDP; called as the network.

    forward(x, t, class_labels) returns the network's output and keeps the projected output tokens of block
    `depth` (1-based, as REPA's encoder_depth) for `take_projected()`. The tokens are caught by a forward hook
    on that block, registered for this call only: the network's forward and parameter names stay as they are,
    and with gradient checkpointing the block's recomputation in the backward (after the hook is gone) catches
    nothing. The hook sees the block's output inside checkpoint(), which is the tensor the network goes on with
    (non-reentrant checkpointing, diffusers' default), so the alignment's gradient flows through it. The
    projection runs inside forward, so DDP and the run's autocast cover the projector as the network.
    """

    def __init__(self, model: nn.Module, projector: nn.Module, depth: int):
        super().__init__()
        if not 1 <= depth <= len(model.blocks):
            raise ValueError(f"depth {depth} is not a block of this {len(model.blocks)}-block model")
        self.model, self.projector, self.depth = model, projector, depth
        self._projected = None

    def forward(self, *args, **kwargs):
        caught = []

        def catch(block, inputs, output):  # inputs: (x, c, h, w)
            caught.append((output, (inputs[2], inputs[3])))

        handle = self.model.blocks[self.depth - 1].register_forward_hook(catch)
        try:
            out = self.model(*args, **kwargs)
        finally:
            handle.remove()
        hidden, grid = caught[0]
        self._projected = self.projector(hidden, grid)  # [B, N, D]
        return out

    def take_projected(self) -> torch.Tensor:
        """The projection of the last forward [B, N, D]; held until taken, so no graph outlives its step."""
        projected, self._projected = self._projected, None
        return projected


class Alignment:
    """The REPA term of a training step: `loss(images)` after the aligned model's forward on the same batch, to be
    added to the objective's loss times `coeff`."""

    def __init__(self, aligned: AlignedModel, encoder: FrozenEncoder, coeff: float, spatial_norm_gamma: float | None,
                 encoder_name: str = ""):
        self.aligned, self.encoder, self.coeff, self.gamma = aligned, encoder, coeff, spatial_norm_gamma
        self.encoder_name = encoder_name

    @classmethod
    def build(cls, settings, model: nn.Module, device) -> Alignment:
        """The encoder and the projector of `settings` (train_dit.py's repa section: encoder, encoder_file, depth,
        coeff, projector, projector_dim, spatial_norm_gamma) for a DiT3 `model`. Build it right after the model, with
        the same seed on every process: the projector's initial weights are then the same everywhere."""
        encoder = load_encoder(settings.encoder, settings.encoder_file, model.grid_size[0], device)
        projector = build_projector(settings.projector, model.config.hidden_size, encoder.dim, settings.projector_dim)
        gamma = settings.spatial_norm_gamma if settings.projector == "conv" else None  # iREPA's pair
        return cls(AlignedModel(model, projector.to(device), settings.depth), encoder, settings.coeff, gamma,
                   settings.encoder)

    def describe(self) -> str:
        a, enc = self.aligned, self.encoder
        n = sum(p.numel() for p in a.projector.parameters())
        return (f"REPA: block {a.depth} aligned with {self.encoder_name} ({enc.size} px input, {enc.dim}-dim patch "
                f"features{', spatially normalised' if self.gamma is not None else ''}) through a "
                f"{type(a.projector).__name__} ({n / 1e6:.2f}M params), coeff {self.coeff}")

    def loss(self, images: torch.Tensor) -> torch.Tensor:
        """images: the clean batch the network was trained on [B, 3, H, W] in [-1, 1] (flipped as it was)."""
        target = self.encoder(images)  # [B, N, D], no gradient
        if self.gamma is not None:
            target = spatial_norm(target.float(), self.gamma)
        return alignment_loss(self.aligned.take_projected(), target)
