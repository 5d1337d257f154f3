"""train_dit.py's config: the engine's base (`vit3.engine.TrainConfig`) and DiT³'s own sections, each key
with the values it accepts beside it. `python train_dit.py --help` lists them with these comments.
"""
from __future__ import annotations

import dataclasses

from vit3 import engine
from vit3.digits import DEMOS
from vit3.engine import SEED_RULE, at_least, between, checked, launch, one_of

from .flow import DIFFUSION_FORMS, LAST_STEPS, LOSS_WEIGHTS, PATHS, PREDICTIONS, TIME_DISTRIBUTIONS
from .repa import PROJECTORS
from .sampling import FLOW_SAMPLERS, SAMPLERS

POSITIVE = (lambda v: v > 0, "a positive number")
EPS = (lambda v: v is None or 0 <= v < 0.5, "null (SiT's default) or a number in [0, 0.5)")
GUIDANCE = at_least(0.0, ">= 0 (1 or less: no guidance, as in DiT and diffusers)")
STEPS = between(1, 1000, "an integer from 1 to 1000 (the diffusion chain has 1000 steps)")


@dataclasses.dataclass
class ModelConfig:
    name: str = "DiT3-B/2"  # a dit3.DiT3_models name: DiT3-{S,B,L,XL}/{2,4,8}, DiT-*, DiT3-LA-*
    # 0 = the number of class folders
    num_classes: int = checked(1000, at_least(0, "an integer >= 0 (0 = the number of class folders)"))
    # pixels; the model sees image_size / 8 latents (image_size itself in pixel space)
    image_size: int = checked(256, at_least(1))
    class_dropout_prob: float = checked(0.1, between(0.0, 1.0))  # label dropout for classifier-free guidance
    grad_checkpointing: bool = False  # recompute each block in the backward pass (less memory, ~30% slower)
    kwargs: dict = dataclasses.field(default_factory=dict)  # more DiT3 arguments (depth, mixer_kwargs, ...)


@dataclasses.dataclass
class DataConfig(engine.DataConfig):
    """The engine's data keys (batch_size, num_workers, pin_memory, bad_images) and these."""

    path: str = "data/imagenet/train"  # an ImageFolder: one sub-folder of images per class
    # "digits": scikit-learn's digits, "glyphs": the digits drawn with fonts at any size (vit3.glyphs),
    # "glyphs_mono": the same white on black, "glyphs_plain": white on black with less variety; written as an
    # ImageFolder under ~/.cache/vit3 (path "")
    demo: str = checked("", one_of("", *DEMOS))
    hflip: bool = True  # random horizontal flips (DiT); turn off for data that is not mirror-symmetric
    in_memory: bool = False  # decode every image once and keep them in memory (small data sets: the digits demo)
    latents: str = ""  # folder of pre-extracted latents: extracted there first if incomplete, then trained on
    latent_shard_size: int = checked(1024, at_least(1))  # images per shard
    # storage of the posterior mean / std: float16 or float32
    latent_dtype: str = checked("float16", one_of("float16", "float32"))
    extract_batch_size: int = checked(64, at_least(1))  # images per VAE call during extraction (per process)


@dataclasses.dataclass
class VAEConfig:
    # a Hugging Face hub name (needs the hub or its local cache) or a local folder written by
    # AutoencoderKL.save_pretrained; "" = train in pixel space, no VAE
    name: str = "stabilityai/sd-vae-ft-ema"
    # latents are multiplied by this (Stable Diffusion's scaling factor)
    scale: float = checked(0.18215, POSITIVE)


@dataclasses.dataclass
class FlowConfig:
    """objective=flow: SiT's flow matching (arXiv 2401.08740), t from noise 0 to data 1 (dit3.flow). The
    sampling keys (shift on) serve the grids and FID, and are sample.py's defaults for the run."""

    # the interpolant: linear (SiT's default), gvp (cos / sin), vp (score SDE's VP)
    path: str = checked("linear", one_of(*PATHS))
    prediction: str = checked("velocity", one_of(*PREDICTIONS))  # what the network predicts: velocity, noise or score
    # noise / score predictions: none, velocity or likelihood (SiT's weights)
    loss_weight: str = checked("none", one_of(*LOSS_WEIGHTS))
    train_eps: float | None = checked(None, EPS)  # training times keep this far from the ends; null = SiT's default
    sample_eps: float | None = checked(None, EPS)  # the same for sampling; null = SiT's default
    # training times: uniform (SiT) or logit_normal (LightningDiT, SD3)
    time_dist: str = checked("uniform", one_of(*TIME_DISTRIBUTIONS))
    logit_mean: float = 0.0  # logit_normal: t = sigmoid(N(mean, std)); mean < 0 favours noisier times
    logit_std: float = checked(1.0, POSITIVE)
    # timestep shift of the fixed-step grids toward noise (SD3; > 1 for larger images)
    shift: float = checked(1.0, (lambda v: v > 0, "a positive number (1 = no shift)"))
    # SDE samplers: w(t) = sigma, SBDM, constant, linear, decreasing, ...
    diffusion_form: str = checked("sigma", one_of(*DIFFUSION_FORMS))
    diffusion_norm: float = checked(1.0, at_least(0.0))  # SDE samplers: the scale of w(t)
    # SDE samplers: the last step to t = 1: mean, tweedie, euler or none
    last_step: str = checked("mean", one_of(*LAST_STEPS))
    last_step_size: float = checked(0.04, (lambda v: 0 <= v < 0.5, "a number in [0, 0.5)"))  # SDE samplers: its size
    atol: float = checked(1e-6, POSITIVE)  # dopri5: absolute tolerance
    rtol: float = checked(1e-3, POSITIVE)  # dopri5: relative tolerance


@dataclasses.dataclass
class RepaConfig:
    """REPA (arXiv 2410.06940): align the output tokens of block `depth` through a trained projector with the
    patch features of a frozen encoder of the clean image (dit3.repa). Off while encoder is "". The projector
    is saved in checkpoints beside the model, never in it: exports and sample.py see a plain model."""

    # "" = off; a timm model name (vit_base_patch14_dinov2.lvd142m: REPA's DINOv2-B/14) or a train_vit.py run
    # folder / checkpoint (a ViT³ classifier)
    encoder: str = ""
    encoder_file: str = ""  # a timm encoder's weights file ("" = timm's cache, i.e. the Hugging Face hub's)
    # the block (1 = the first) whose output tokens are aligned; REPA: 8 of SiT-XL's 28
    depth: int = checked(8, at_least(1, "a block number >= 1 (1 = the first block's output)"))
    coeff: float = checked(0.5, at_least(0.0))  # weight of the alignment loss (REPA: 0.5)
    # mlp: REPA's (Linear-SiLU-Linear-SiLU-Linear); conv: iREPA's 3x3 conv, with spatially normalised targets
    projector: str = checked("mlp", one_of(*PROJECTORS))
    projector_dim: int = checked(2048, at_least(1))  # mlp: hidden width (REPA: 2048)
    spatial_norm_gamma: float = checked(0.7, between(0.0, 1.0))  # conv: share of the token mean removed (iREPA)


@dataclasses.dataclass
class TrainingSamplesConfig:
    """The `sample` section: what the run draws while it trains (grids, FID) and at its end (the digits
    accuracy). sample.py's own options are its SampleConfig."""

    # a grid from the EMA model every N updates (0 = only at the end)
    every: int = checked(10000, at_least(0, "an integer >= 0 (0 = only the final grid)"))
    classes: list = checked(rule=(lambda v: len(v) > 0, "a non-empty list of class ids"),
                            default_factory=lambda: [207, 360, 387, 974, 88, 979, 417, 279])
    per_class: int = checked(1, at_least(1))  # grid columns: samples per class
    # "" = ddpm for objective=ddpm (also ddim, dpm), sde-euler for flow (also euler, heun, dopri5, sde-heun)
    sampler: str = checked("", one_of("", *SAMPLERS, *FLOW_SAMPLERS))
    steps: int = checked(250, STEPS)  # ddpm: respaced steps; flow: SiT's grid points (steps - 1 steps; dopri5: its own)
    cfg_scale: float = checked(4.0, GUIDANCE)  # classifier-free guidance (1 = none)
    seed: int = checked(0, SEED_RULE)  # the grid's noise: the same images at every step of a run
    # digits demo, at the end: N guided samples per class judged by an SVC on the real digits
    digits_per_class: int = checked(0, at_least(0))
    # periodic FID of the EMA model (main process): fid_samples balanced samples against fid_ref
    fid_every: int = checked(0, at_least(0, "an integer >= 0 (0 = no periodic FID)"))  # updates between evaluations
    fid_samples: int = checked(1000, at_least(4, "an integer >= 4 (precision and recall need 4 samples)"))
    fid_ref: str = ""  # an image folder, an ADM-style .npz (arr_0) or a statistics .npz (mu, sigma)
    fid_cfg_scale: float = checked(1.0, GUIDANCE)  # papers report FID-50K without guidance
    fid_inception_weights: str = ""  # local InceptionV3 weights for torch-fidelity ("" = its download)
    fid_classifier: str = ""  # a train_vit.py run whose features replace Inception's (domain FID)


@dataclasses.dataclass
class TrainConfig(engine.TrainConfig):
    """The engine's keys (run folder, seed, precision, resume, threads, ...) with DiT's defaults, and these."""

    data: DataConfig = dataclasses.field(default_factory=lambda: DataConfig(batch_size=256, num_workers=4))
    optim: engine.OptimConfig = dataclasses.field(default_factory=lambda: engine.OptimConfig(
        lr=1e-4, lr_batch=0, weight_decay=0.0, sched="constant", warmup_epochs=0, clip_grad=0.0))
    ema: engine.EMAConfig = dataclasses.field(default_factory=lambda: engine.EMAConfig(decay=0.9999, decay_batch=0))
    checkpoint: engine.CheckpointConfig = dataclasses.field(default_factory=lambda: engine.CheckpointConfig(
        every_steps=50_000, every_epochs=0, keep_last=3))
    log: engine.LogConfig = dataclasses.field(default_factory=lambda: engine.LogConfig(every=100))
    tf32: bool = True  # TF32 matmuls and convolutions on Ampere+ GPUs
    # ddpm (DiT's hybrid loss) or flow (SiT's flow matching: the flow section)
    objective: str = checked("ddpm", one_of("ddpm", "flow"))
    flow: FlowConfig = dataclasses.field(default_factory=FlowConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    vae: VAEConfig = dataclasses.field(default_factory=VAEConfig)
    max_steps: int = launch(400_000, at_least(0))  # optimizer updates in total (the schedule's length)
    weights: str = ""  # start from these weights: our .safetensors / checkpoint folder, or an official DiT³ / DiT .pt
    extract_only: bool = False  # only extract data.latents, then exit
    repa: RepaConfig = dataclasses.field(default_factory=RepaConfig)
    sample: TrainingSamplesConfig = dataclasses.field(default_factory=TrainingSamplesConfig)
