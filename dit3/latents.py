"""Images in, latents out: DiT's image transform, the VAE, and a cache of pre-extracted latents.

DiT trains on the latents of Stable Diffusion's VAE (diffusers' AutoencoderKL, `sd-vae-ft-ema`),
scaled by 0.18215 so they have about unit variance; with `vae.name=""` it trains on pixels instead
(small datasets such as the built-in digits demo).

Encoding every image at every step (DiT's train.py) costs about as much as the DiT³-B/2 step
itself. `extract_latents` encodes the dataset once, with the horizontally flipped copy of each
image (the flip of a latent is not the latent of the flipped image), into safetensors shards;
`LatentShards` serves them. A shard stores the posterior mean and standard deviation, not one
draw, so each training step still sees a fresh sample of q(z | x), as with on-the-fly encoding.
With `pixels=True` a shard also keeps each cropped image as uint8, once (its mirror image is flipped when
read), for what needs the image itself: REPA's encoder. That is the cheaper trade than storing the
encoder's features: 3 x 256 x 256 bytes (192 KiB) an image, against 256 tokens x 768 x 2 bytes x 2 flips
(768 KiB) for DINOv2-B's; the encoder then runs at each step, a DINOv2-B/14 forward at 224 px being about
a fifth of a SiT-XL/2 forward's FLOPs (~23 against ~119 GFLOPs), a sixteenth of its update.
Extraction is spread over all processes, shows a progress bar and is resumable: every shard is
written to a temporary file and renamed, and finished shards are skipped on a restart.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vit3.errors import ConfigError, DataError

LATENT_FORMAT = 1


# ----------------------------------------------------------------------------------------
# Images: DiT's centre crop
# ----------------------------------------------------------------------------------------
def center_crop_arr(pil_image: Image.Image, image_size: int) -> Image.Image:
    """ADM's / DiT's centre crop: halve with a box filter while the short side is at least twice the
    target, resize bicubically so the short side equals image_size, then crop the centre square."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    top, left = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return Image.fromarray(arr[top:top + image_size, left:left + image_size])


def image_transform(image_size: int, hflip: bool = True):
    """PIL image -> [3, image_size, image_size] in [-1, 1]: centre crop, random flip (if hflip)."""
    from torchvision import transforms

    steps = [transforms.Lambda(lambda img: center_crop_arr(img, image_size))]
    if hflip:
        steps.append(transforms.RandomHorizontalFlip())
    steps += [transforms.ToTensor(), transforms.Normalize([0.5, 0.5, 0.5], [0.5, 0.5, 0.5], inplace=True)]
    return transforms.Compose(steps)


# ----------------------------------------------------------------------------------------
# The VAE
# ----------------------------------------------------------------------------------------
def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def load_vae(name: str, device: torch.device | str = "cpu"):
    """diffusers AutoencoderKL from a local folder or a hub name, frozen, in eval mode.

    A missing local folder, or a hub name that cannot be fetched (offline, no cache), raises a
    ConfigError that says how to provide the weights.
    """
    from diffusers import AutoencoderKL

    local = Path(name).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise ConfigError(f"vae.name={name} is a folder without config.json: it must be a folder written by "
                              "AutoencoderKL.save_pretrained (config.json + diffusion_pytorch_model.safetensors)")
        source = str(local)
    elif _looks_like_path(name):
        raise ConfigError(f"VAE folder vae.name={name} does not exist. Pass a local folder written by "
                          "AutoencoderKL.save_pretrained, a hub name such as stabilityai/sd-vae-ft-ema, or "
                          "vae.name='' to train in pixel space")
    else:
        source = name
    try:
        vae = AutoencoderKL.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load the VAE {name!r}: {e}\nWithout internet, download it once elsewhere "
                          "(AutoencoderKL.from_pretrained(name).save_pretrained(DIR)) and pass vae.name=DIR") from None
    return vae.to(device).eval().requires_grad_(False)


def vae_downsample(vae) -> int:
    """Pixels per latent cell along each side (8 for Stable Diffusion's VAE)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


@torch.no_grad()
def decode(vae, z: torch.Tensor, scale: float) -> torch.Tensor:
    """Scaled latents [B, C, h, w] -> images [B, 3, H, W] in [-1, 1] (VAE in float32)."""
    return vae.decode(z.float() / scale).sample.clamp(-1, 1)


# ----------------------------------------------------------------------------------------
# Pre-extracted latents
# ----------------------------------------------------------------------------------------
def _shard_path(root: Path, k: int) -> Path:
    return root / f"shard-{k:05d}.safetensors"


def _spec(dataset, image_size: int, vae_name: str, shard_size: int, dtype: str, pixels: bool) -> dict:
    return {"format": LATENT_FORMAT, "num_images": len(dataset), "classes": list(dataset.classes),
            "image_size": image_size, "vae": vae_name, "shard_size": shard_size, "dtype": dtype,
            "images": str(Path(dataset.root).resolve()), "pixels": pixels}


def _check_spec(root: Path, spec: dict):
    """ConfigError if root holds latents of other images, size or VAE than `spec` describes."""
    found = json.loads((root / "index.json").read_text())
    found.setdefault("pixels", False)  # folders from before pixels were stored hold none
    keys = ("format", "num_images", "classes", "image_size", "vae", "shard_size", "dtype", "pixels")
    diffs = [k for k in keys if found.get(k) != spec.get(k)]
    if diffs:
        detail = "; ".join(f"{k}: folder {str(found.get(k))[:60]} vs this run {str(spec.get(k))[:60]}" for k in diffs)
        raise ConfigError(f"latent folder {root} was written for other data or settings ({detail}). "
                          "Use another data.latents folder, or delete this one to extract again")


def latents_complete(root: str | os.PathLike) -> bool:
    index = Path(root) / "index.json"
    return index.is_file() and json.loads(index.read_text()).get("complete", False)


@torch.no_grad()
def extract_latents(dataset, vae, root: str | os.PathLike, accelerator, *, image_size: int, vae_name: str,
                    shard_size: int = 1024, batch_size: int = 64, dtype: str = "float16",
                    progress: bool = True, pixels: bool = False) -> Path:
    """Encode `dataset` (items (image [3, H, W] in [-1, 1], label, skipped), no random flip) into shards.

    Shard k holds images k*shard_size ... in dataset order: "mean" and "std" [n, 2, C, h, w] (index 1
    of dim 1 is the flipped image) in `dtype`, "labels" [n] and, with `pixels`, the images themselves as
    "pixels" [n, 3, H, W] uint8 (not flipped). Process r encodes shards r, r+R, ...;
    shards already on disk are kept. index.json records what was extracted, "complete" at the end.
    """
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from vit3.engine.files import atomic_path, atomic_write_text  # the training engine: not loaded by `import dit3`

    root = Path(root).expanduser()
    spec = _spec(dataset, image_size, vae_name, shard_size, dtype, pixels)
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if (root / "index.json").is_file():
            _check_spec(root, spec)
        else:
            atomic_write_text(root / "index.json", json.dumps({**spec, "complete": False}, indent=2))
    accelerator.wait_for_everyone()
    _check_spec(root, spec)

    num_shards = math.ceil(len(dataset) / shard_size)
    mine = [k for k in range(accelerator.process_index, num_shards, accelerator.num_processes)
            if not _shard_path(root, k).is_file()]
    store = getattr(torch, dtype)
    device = next(vae.parameters()).device
    bar = tqdm(total=len(mine), desc=f"extracting latents (process {accelerator.process_index})", unit="shard",
               disable=not progress, dynamic_ncols=True)
    for k in mine:
        lo, hi = k * shard_size, min((k + 1) * shard_size, len(dataset))
        means, stds, labels, images = [], [], [], []
        for b in range(lo, hi, batch_size):
            items = [dataset[i] for i in range(b, min(b + batch_size, hi))]
            x = torch.stack([it[0] for it in items]).to(device)  # [n, 3, H, W]
            x = torch.cat([x, x.flip(-1)])  # [2n, 3, H, W]: the images, then their mirror images
            dist = vae.encode(x).latent_dist
            n = len(items)
            means.append(torch.stack([dist.mean[:n], dist.mean[n:]], dim=1).to(store).cpu())  # [n, 2, C, h, w]
            stds.append(torch.stack([dist.std[:n], dist.std[n:]], dim=1).to(store).cpu())
            labels += [int(it[1]) for it in items]
            if pixels:  # [-1, 1] back to the image's bytes: (x + 1) * 127.5 is an integer up to rounding
                images.append(((x[:n] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).cpu())
        with atomic_path(_shard_path(root, k)) as tmp:
            save_file({"mean": torch.cat(means).contiguous(), "std": torch.cat(stds).contiguous(),
                       "labels": torch.tensor(labels, dtype=torch.long),
                       **({"pixels": torch.cat(images).contiguous()} if pixels else {})}, str(tmp))
        bar.update(1)
    bar.close()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        missing = [k for k in range(num_shards) if not _shard_path(root, k).is_file()]
        if missing:
            raise DataError(f"latent extraction into {root} left shards {missing[:5]} missing; run again to finish")
        index = {**spec, "complete": True, "num_shards": num_shards,
                 "latent_shape": list(LatentShards.peek_shape(root))}
        atomic_write_text(root / "index.json", json.dumps(index, indent=2))
    accelerator.wait_for_everyone()
    return root


class LatentShards(torch.utils.data.Dataset):
    """Training items (scaled latent [C, h, w], label, 0) from `extract_latents` shards; with `pixels`, also the
    image [3, H, W] in [-1, 1], flipped as its latent is (a folder extracted with pixels=True).

    The item index may be (index, seed), as `training.ResumableBatchSampler` yields: the seed picks
    the flip and the draw z = mean + std * noise, so a resumed run sees the same latents.
    Shards are memory-mapped (safetensors), opened lazily in each loader worker.
    """

    def __init__(self, root: str | os.PathLike, scale: float, hflip: bool = True, pixels: bool = False):
        self.root = Path(root).expanduser()
        if not latents_complete(self.root):
            raise DataError(f"{self.root} holds no complete latent extraction (index.json with complete=true); "
                            "run train_dit.py with data.latents set to extract them first")
        self.index = json.loads((self.root / "index.json").read_text())
        self.classes = self.index["classes"]
        self.shard_size = self.index["shard_size"]
        self.scale, self.hflip, self.pixels = scale, hflip, pixels
        if pixels and not self.index.get("pixels"):
            raise ConfigError(f"latents in {self.root} hold no images, and repa's encoder needs them: extract into a "
                              "new data.latents folder with repa on (the images are then stored with the latents)")
        self._files: dict[int, object] = {}

    @staticmethod
    def peek_shape(root: Path) -> tuple[int, ...]:
        from safetensors import safe_open

        with safe_open(str(_shard_path(Path(root), 0)), framework="pt") as f:
            return tuple(f.get_slice("mean").get_shape()[2:])

    def __len__(self):
        return self.index["num_images"]

    def _shard(self, k: int):
        from safetensors import safe_open

        if k not in self._files:
            self._files[k] = safe_open(str(_shard_path(self.root, k)), framework="pt")
        return self._files[k]

    def __getitem__(self, item):
        index, seed = item if isinstance(item, (tuple, list)) else (item, None)
        f = self._shard(index // self.shard_size)
        j = index % self.shard_size
        g = torch.Generator()
        g.manual_seed(seed if seed is not None else index)
        flip = int(torch.randint(0, 2, (), generator=g)) if self.hflip else 0
        mean = f.get_slice("mean")[j:j + 1, flip:flip + 1][0, 0].float()  # [C, h, w]
        std = f.get_slice("std")[j:j + 1, flip:flip + 1][0, 0].float()
        z = mean + std * torch.randn(mean.shape, generator=g)
        label = int(f.get_slice("labels")[j:j + 1][0])
        if not self.pixels:
            return z * self.scale, label, 0
        image = f.get_slice("pixels")[j:j + 1][0].float() / 127.5 - 1  # [3, H, W] in [-1, 1]
        return z * self.scale, label, 0, image.flip(-1) if flip else image

    def __getstate__(self):  # loader workers open their own memory maps
        return {**self.__dict__, "_files": {}}
