"""The tiny DiT³ and VAE the dit3 and script tests share: a 2-block, 32-dim DiT3 on 8x8 inputs, and a random
AutoencoderKL with 2x downsampling and 4 latent channels."""
import torch

from dit3.models import DiT3


def tiny_dit(in_channels=4, num_classes=10, seed=0):
    torch.manual_seed(seed)
    model = DiT3(input_size=8, patch_size=2, in_channels=in_channels, hidden_size=32, depth=2, num_heads=2,
                 num_classes=num_classes)
    with torch.no_grad():  # leave DiT's zero init of the output so the model's output is not trivially zero
        for p in model.parameters():
            if p.dim() > 1 and p.abs().sum() == 0:
                p.normal_(0, 0.05)
    return model.eval()


def tiny_vae():
    """A random AutoencoderKL (8/16 channels, one block a level): 2x downsampling, 4 latent channels."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                         layers_per_block=1)
