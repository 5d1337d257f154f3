"""DiT³: the Diffusion Transformer with the ViT³ test-time-training layer in place of attention.

ViT³: https://arxiv.org/abs/2512.01643 (DiT³ is its image-generation model).
DiT:  https://arxiv.org/abs/2212.09748

DiT³ is DiT with two changes in every block: the token mixer is the ViT³ TTT
layer (cost linear in the number of tokens) and a 3x3 depthwise-conv position
encoding (CPE) is added to the tokens before adaLN-Zero. Everything else is
DiT: patchified latents, fixed 2-D sin-cos positions, timestep and label
embeddings summed into one conditioning vector, adaLN-Zero blocks, learned
sigma. With mixer="attention" and cpe=False the model is exactly DiT, which is
how the baselines `DiT-*` are built.

Parameter names and shapes equal the official DiT³ release (and, for the
baselines, the official DiT release), so their checkpoints load with
strict=True: see `dit3.weights`.
"""
import math
from functools import partial

import torch
import torch.nn as nn
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from timm.layers import Mlp
from torch.utils.checkpoint import checkpoint

from vit3.layers import TokenDWConv
from vit3.mixers import MIXERS, build_mixer


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x [B, N, C], shift and scale [B, C]."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def sincos_pos_embed_2d(dim: int, h: int, w: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position table [h*w, dim] for an h x w grid, row-major tokens.

    The first dim/2 channels encode the column, the last dim/2 the row, each as
    [sin(p * omega), cos(p * omega)] with omega_k = 10000 ** (-k / (dim/4)):
    the MAE/DiT layout, so for h == w it equals DiT's table.
    """
    if dim % 4:
        raise ValueError(f"the 2-D sin-cos table needs a width divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # [dim/4]

    def embed_1d(pos: torch.Tensor) -> torch.Tensor:  # [M] -> [M, dim/2]
        angles = pos[:, None] * omega[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    rows = torch.arange(h, dtype=torch.float64).repeat_interleave(w)  # [h*w]
    cols = torch.arange(w, dtype=torch.float64).repeat(h)  # [h*w]
    return torch.cat([embed_1d(cols), embed_1d(rows)], dim=1).float()  # computed in float64 as DiT's numpy code


def _pair(size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else tuple(size)


#################################################################################
#                  Embedding layers for latents, timesteps, labels              #
#################################################################################

class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches of a [B, C, H, W] map to [B, H/p * W/p, D] tokens; any H, W divisible by p."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        if x.shape[-2] % self.patch_size or x.shape[-1] % self.patch_size:
            raise ValueError(f"latent size {tuple(x.shape[-2:])} is not divisible by the patch size {self.patch_size}")
        x = self.proj(x)  # [B, D, h, w]
        h, w = x.shape[-2:]
        return x.flatten(2).transpose(1, 2), (h, w)  # [B, h*w, D]


class TimestepEmbedder(nn.Module):
    """Scalar (possibly fractional) timesteps -> [B, D]: sinusoidal features, then a 2-layer MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        """[B] -> [B, dim] features [cos(t f_k), sin(t f_k)], f_k = max_period ** (-k / (dim/2)) (GLIDE's order)."""
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]  # [B, half]
        embedding = torch.cat([args.cos(), args.sin()], dim=-1)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size)  # [B, 256], float32
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))  # [B, D]


class LabelEmbedder(nn.Module):
    """Class labels -> [B, D]. Row `num_classes` is the null class of classifier-free guidance:
    in training a label is replaced by it with probability dropout_prob; at sampling time pass it as y."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def forward(self, labels: torch.Tensor, train: bool) -> torch.Tensor:
        if train and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(drop, self.num_classes, labels)
        return self.embedding_table(labels)  # [B, D]


#################################################################################
#                                 DiT³ blocks                                   #
#################################################################################

# The CPE and norm1 are recomputed in the backward from blocks of this many input elements up (1 MiB in float32):
# below it the copy saved is small and the recomputation's fixed cost is not (at the digits demo, 64 x 16 x 96, it
# cost 1.6 ms a block on 2 CPU cores, 5% of the DiT³ update: benchmarks/README.md, "Small models"). Every size in
# the whole-model benchmarks and the quality study is above it.
CPE_RECOMPUTE_MIN_ELEMENTS = 1 << 18


class DiT3Block(nn.Module):
    """CPE residual, then adaLN-Zero (shift, scale, gate from the conditioning) around the mixer and the MLP."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, mixer: str = "ttt",
                 cpe: bool = True, mixer_kwargs: dict | None = None):
        super().__init__()
        # The CPE sits outside adaLN-Zero, so unlike a DiT block a DiT³ block is not the identity at init.
        # The official DiT³ has it there and its checkpoints need it, so it stays.
        self.cpe = TokenDWConv(hidden_size) if cpe else None
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = build_mixer(mixer, hidden_size, num_heads, qkv_bias=True, **(mixer_kwargs or {}))
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), act_layer=partial(nn.GELU, approximate="tanh"))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor, h: int, w: int) -> torch.Tensor:
        # x: [B, h*w, D], c: [B, D]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        if self.cpe is None:
            xn = self.norm1(x)
        elif torch.is_grad_enabled() and x.numel() >= CPE_RECOMPUTE_MIN_ELEMENTS:
            # x + cpe(x) and its norm are recomputed in the backward (a depthwise conv and a norm, cheap), so the
            # block keeps one [B, N, D] copy of its input (the CPE's) instead of two (the CPE's and the norm's)
            x, xn = checkpoint(self._cpe_norm, x, h, w, use_reentrant=False)
        else:
            x, xn = self._cpe_norm(x, h, w)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(xn, shift_msa, scale_msa), h, w)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x  # [B, h*w, D]

    def _cpe_norm(self, x: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = x + self.cpe(x, h, w)
        return x, self.norm1(x)


class FinalLayer(nn.Module):
    """adaLN (shift, scale) then a linear map of each token to its p x p x out_channels patch."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # [B, N, p*p*out_channels]


#################################################################################
#                                  DiT³ model                                   #
#################################################################################

class DiT3(ModelMixin, ConfigMixin):
    """DiT³ (mixer="ttt", cpe=True) and its baselines: DiT (mixer="attention", cpe=False) and linear attention.

    Args:
        input_size: latent size, int or (H, W); it fixes the stored `pos_embed` table. Other sizes (non-square
            included) also run: their table is computed on the fly.
        patch_size, in_channels, hidden_size, depth, num_heads, mlp_ratio: as DiT.
        class_dropout_prob: label dropout for classifier-free guidance; > 0 adds the null class `num_classes`.
        num_classes: number of real classes.
        learn_sigma: also predict the variance interpolation (out_channels = 2 * in_channels).
        mixer: one of vit3.mixers.MIXERS ("ttt", "attention", "linear_attention").
        cpe: the 3x3 depthwise-conv position encoding at the start of each block (DiT³ only).
        mixer_kwargs: passed to the mixer (e.g. TTT impl="reference", attention impl="math").

    It is called as diffusers' DiTTransformer2DModel, `model(hidden_states, timestep, class_labels).sample`, so
    diffusers' DiTPipeline runs it; its config also carries the two entries that pipeline reads, `sample_size`
    and `out_channels`, derived from the arguments. `enable_gradient_checkpointing()` (diffusers) recomputes each
    block in the backward pass.
    """

    _supports_gradient_checkpointing = True
    _derived_config = ("sample_size", "out_channels")

    @register_to_config
    def __init__(self, input_size: int | tuple[int, int] = 32, patch_size: int = 2, in_channels: int = 4,
                 hidden_size: int = 1152, depth: int = 28, num_heads: int = 16, mlp_ratio: float = 4.0,
                 class_dropout_prob: float = 0.1, num_classes: int = 1000, learn_sigma: bool = True,
                 mixer: str = "ttt", cpe: bool = True, mixer_kwargs: dict | None = None):
        super().__init__()
        if mixer not in MIXERS:
            raise ValueError(f"unknown mixer {mixer!r}; choose one of {MIXERS}")
        height, width = _pair(input_size)
        if height % patch_size or width % patch_size:
            raise ValueError(f"input_size {(height, width)} is not divisible by patch_size {patch_size}")
        self.in_channels = in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.patch_size = patch_size
        self.num_classes = num_classes
        self.grid_size = (height // patch_size, width // patch_size)

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        # A fixed table, so a buffer (out of the optimizer and the EMA) rather than the official frozen
        # nn.Parameter; the name and shape [1, h*w, D] are the official ones, so its checkpoints load strictly.
        self.register_buffer("pos_embed", sincos_pos_embed_2d(hidden_size, *self.grid_size).unsqueeze(0))
        self.blocks = nn.ModuleList([
            DiT3Block(hidden_size, num_heads, mlp_ratio, mixer=mixer, cpe=cpe, mixer_kwargs=mixer_kwargs)
            for _ in range(depth)
        ])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.gradient_checkpointing = False
        self.initialize_weights()
        self.register_to_config(sample_size=input_size, out_channels=self.out_channels)

    @classmethod
    def extract_init_dict(cls, config_dict, **kwargs):
        # the derived entries are not arguments: leave them out quietly when a saved config is read back
        config_dict = {k: v for k, v in config_dict.items() if k not in cls._derived_config}
        return super().extract_init_dict(config_dict, **kwargs)

    def initialize_weights(self):
        """DiT's init: xavier linears, zero adaLN-Zero modulations and output layer. The TTT inner weights and
        the CPE keep their own init (trunc-normal, PyTorch's conv default), as in the official DiT³."""
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        self.apply(_basic_init)

        # patch embedding as a linear map of the flattened patch
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)

        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)

        # adaLN-Zero: every residual branch starts gated off, and the output starts at zero
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def pos_embed_for(self, h: int, w: int) -> torch.Tensor:
        """[1, h*w, D]: the stored table for the configured grid, else a freshly computed one."""
        if (h, w) == self.grid_size:
            return self.pos_embed
        return sincos_pos_embed_2d(self.pos_embed.shape[-1], h, w).unsqueeze(0).to(self.pos_embed)

    def unpatchify(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """[B, h*w, p*p*C] -> [B, C, h*p, w*p]."""
        p, c = self.patch_size, self.out_channels
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor,
                return_dict: bool = True) -> Transformer2DModelOutput | tuple[torch.Tensor]:
        """diffusers' DiT call. hidden_states: [B, C, H, W] latents; timestep: [B] (or scalar) timesteps, fractional
        allowed; class_labels: [B], the null class is `num_classes`. Returns, as `.sample` (or the tuple's one
        element), [B, out_channels, H, W]: epsilon, then (learn_sigma) the variance values."""
        x, (h, w) = self.x_embedder(hidden_states)  # [B, h*w, D]
        x = x + self.pos_embed_for(h, w)
        t = timestep.expand(x.shape[0]) if timestep.ndim == 0 else timestep
        c = self.t_embedder(t) + self.y_embedder(class_labels, self.training)  # [B, D]
        for block in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = self._gradient_checkpointing_func(block, x, c, h, w)  # [B, h*w, D]
            else:
                x = block(x, c, h, w)  # [B, h*w, D]
        x = self.final_layer(x, c)  # [B, h*w, p*p*out_channels]
        x = self.unpatchify(x, h, w)  # [B, out_channels, H, W]
        return Transformer2DModelOutput(sample=x) if return_dict else (x,)

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float,
                         channels: int | None = None) -> torch.Tensor:
        """Classifier-free guidance in one batched pass.

        x, t, y: [2n, ...] with y = [labels, null labels]; only the first n latents are used (both halves get them).
        Returns [2n, out_channels, H, W]: guided epsilon, uncond + cfg_scale * (cond - uncond), in both halves;
        the remaining channels (the variance) come from each half's own pass.
        channels: how many leading channels to guide; default all of epsilon (in_channels). channels=3 is
        DiT's choice, kept for exact reproduction of its samples.
        """
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half]), t, y).sample  # [2n, out_channels, H, W]
        channels = self.in_channels if channels is None else channels
        eps, rest = out[:, :channels], out[:, channels:]
        cond_eps, uncond_eps = eps.chunk(2)
        guided = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        return torch.cat([torch.cat([guided, guided]), rest], dim=1)


#################################################################################
#                                 Size registry                                 #
#################################################################################

SIZES = {
    "S": dict(depth=12, hidden_size=384, num_heads=6),
    "B": dict(depth=12, hidden_size=768, num_heads=12),
    "L": dict(depth=24, hidden_size=1024, num_heads=16),
    "XL": dict(depth=28, hidden_size=1152, num_heads=16),
}
FAMILIES = {
    "DiT3": dict(mixer="ttt", cpe=True),  # the paper's model (the official code calls it DiTTT)
    "DiT3-LA": dict(mixer="linear_attention", cpe=True),  # DiT³ with linear attention as the mixer
    "DiT": dict(mixer="attention", cpe=False),  # exactly DiT
}

# "DiT3-B/2", "DiT3-LA-XL/4", "DiT-S/8", ...: call with input_size, num_classes and any other DiT3 argument
DiT3_models = {
    f"{family}-{size}/{patch}": partial(DiT3, patch_size=patch, **SIZES[size], **FAMILIES[family])
    for family in FAMILIES for size in SIZES for patch in (2, 4, 8)
}
