"""FID, IS, KID, precision / recall of sample images, with torch-fidelity.

The features come from torch-fidelity's InceptionV3 (the layers ADM's evaluator uses) or, for a
domain FID, from a classifier trained by train_vit.py.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

FID_LAYER, ISC_LAYER = "2048", "logits_unbiased"  # torch-fidelity's InceptionV3 layers (as ADM's evaluator)
CLASSIFIER_EXTRACTOR = "vit3-classifier"


def inception(cuda: bool, weights: str | Path | None = None):
    """torch-fidelity's InceptionV3 ('inception-v3-compat'), from its default download or a local weights
    file (clusters without internet: copy the file torch-fidelity downloads, pt_inception-2015-12-05-*.pth)."""
    from torch_fidelity.utils import create_feature_extractor

    if weights is not None and not Path(weights).is_file():
        raise FileNotFoundError(f"Inception weights file {weights} does not exist")
    return create_feature_extractor("inception-v3-compat", [FID_LAYER, ISC_LAYER], cuda=cuda, verbose=False,
                                    feature_extractor_weights_path=str(weights) if weights else None)


def _classifier_extractor_class():
    """torch-fidelity feature extractor over a classifier trained by train_vit.py (domain FID).

    Features: "prelogits" (the pooled, normed features before the head; FID, KID, precision /
    recall) and "logits" (Inception Score). Images arrive as uint8 [B, 3, H, W]; they are resized
    to the classifier's training size and normalised as in its training.
    """
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase

    class ClassifierFeatures(FeatureExtractorBase):
        def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
            super().__init__(name, features_list)
            self.model, self.img_size = load_classifier(feature_extractor_weights_path)
            from timm.data import resolve_data_config

            data_cfg = resolve_data_config({}, model=self.model)
            self.register_buffer("mean", torch.tensor(data_cfg["mean"]).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(data_cfg["std"]).view(1, 3, 1, 1))

        @staticmethod
        def get_provided_features_list():
            return "prelogits", "logits"

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return {"isc": "logits"}.get(metric, "prelogits")

        @staticmethod
        def can_be_compiled():
            return False

        def forward(self, x):
            x = F.interpolate(x.float() / 255.0, size=(self.img_size, self.img_size), mode="bicubic",
                              align_corners=False)
            x = (x - self.mean) / self.std
            pre = self.model.forward_head(self.model.forward_features(x), pre_logits=True)  # [B, D]
            found = {"prelogits": pre, "logits": self.model.get_classifier()(pre)}
            return tuple(found[name].float() for name in self.features_list)

    return ClassifierFeatures


def load_classifier(path: str | Path):
    """(timm model, its image size) from a train_vit.py run folder or checkpoint (EMA weights if present)."""
    import timm
    import yaml
    from safetensors.torch import load_model

    import vit3  # noqa: F401  registers the ViT³ models with timm
    from vit3.training import find_latest_checkpoint

    path = Path(path)
    ckpt = find_latest_checkpoint(path / "checkpoints") if (path / "checkpoints").is_dir() else path
    if ckpt is None or not (ckpt / "config.yaml").is_file():
        raise FileNotFoundError(f"{path} is not a train_vit.py run folder or checkpoint (no config.yaml)")
    mc = yaml.safe_load((ckpt / "config.yaml").read_text())["model"]
    model = timm.create_model(mc["name"], num_classes=mc["num_classes"], img_size=mc["img_size"], **mc["kwargs"])
    weights = ckpt / "ema.safetensors" if (ckpt / "ema.safetensors").is_file() else ckpt / "model.safetensors"
    load_model(model, str(weights), strict=True)
    return model.eval(), mc["img_size"]


def feature_extractor(cuda: bool, inception_weights=None, classifier=None):
    """(extractor, FID layer, IS layer): torch-fidelity's Inception, or a train_vit.py classifier."""
    if classifier is None:
        return inception(cuda, inception_weights), FID_LAYER, ISC_LAYER
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor
    from torch_fidelity.utils import create_feature_extractor

    if CLASSIFIER_EXTRACTOR not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(CLASSIFIER_EXTRACTOR, _classifier_extractor_class())
    ext = create_feature_extractor(CLASSIFIER_EXTRACTOR, ["prelogits", "logits"], cuda=cuda, verbose=False,
                                   feature_extractor_weights_path=str(classifier))
    return ext, "prelogits", "logits"


def image_features(folder: str | Path, extractor, cuda: bool, batch_size: int = 64) -> dict:
    """torch-fidelity features dict ({layer: [N, D]}) of the PNG / JPEG images under `folder` (recursive)."""
    from torch_fidelity.datasets import ImagesPathDataset
    from torch_fidelity.utils import get_featuresdict_from_dataset, glob_samples_paths

    files = glob_samples_paths(str(folder), samples_find_deep=True, samples_find_ext="png,jpg,jpeg", verbose=False)
    if not files:
        raise FileNotFoundError(f"no images (png, jpg, jpeg) under {folder}")
    return get_featuresdict_from_dataset(ImagesPathDataset(sorted(files)), extractor, batch_size, cuda,
                                         save_cpu_ram=False, verbose=False)


class _ArrayImages(torch.utils.data.Dataset):
    """uint8 images [N, H, W, 3] served as torch-fidelity expects them: uint8 [3, H, W]."""

    def __init__(self, images: np.ndarray):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return torch.from_numpy(np.ascontiguousarray(self.images[i])).permute(2, 0, 1)


def load_image_batch(path: str | Path) -> np.ndarray:
    """arr_0 of an ADM-style sample / reference batch, checked: uint8 [N, H, W, 3]."""
    with np.load(path) as f:
        if "arr_0" not in f:
            raise ValueError(f"{path} has no arr_0 (images) and no mu / sigma (statistics): keys {list(f.keys())}")
        arr = f["arr_0"]
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"{path}: arr_0 must be uint8 images of shape [N, H, W, 3] (ADM's format), got "
                         f"{arr.dtype} {list(arr.shape)}")
    return arr


STATISTICS_FIELDS = "mu (float [D], the features' mean) and sigma (float [D, D], their covariance)"


def load_reference_statistics(path: str | Path) -> dict:
    """mu [D] and sigma [D, D] of a statistics .npz, as float64 whatever they were saved in (ours hold a
    float32 mu, pytorch-fid's and ADM's files float64; torch-fidelity wants one dtype on both sides)."""
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.keys()}
    mu, sigma = arrays.get("mu"), arrays.get("sigma")
    if (mu is None or sigma is None or mu.ndim != 1 or sigma.shape != (len(mu), len(mu))
            or not np.issubdtype(mu.dtype, np.floating) or not np.issubdtype(sigma.dtype, np.floating)):
        found = ", ".join(f"{k} {v.dtype} {list(v.shape)}" for k, v in arrays.items()) or "nothing"
        raise ValueError(f"{path} is not a statistics file: it needs {STATISTICS_FIELDS}; found {found}")
    return {"mu": mu.astype(np.float64), "sigma": sigma.astype(np.float64)}


def save_reference_statistics(path: str | Path, features: dict, layer: str = FID_LAYER):
    """mu and sigma of the FID layer, as an .npz that `fidelity_metrics` takes as its reference."""
    from torch_fidelity.metric_fid import fid_featuresdict_to_statistics

    stats = fid_featuresdict_to_statistics(features, layer)
    np.savez(path, mu=stats["mu"], sigma=stats["sigma"], num_images=len(features[layer]))


def fidelity_metrics(samples: str | Path, reference: str | Path, *, cuda: bool, inception_weights=None,
                     classifier=None, batch_size: int = 64, save_ref_stats: str | Path | None = None) -> dict:
    """FID, IS, KID, precision and recall of the images under `samples` against `reference`.

    reference: an image folder or an ADM-style .npz of images (arr_0, uint8 [N, H, W, 3]): all five
    metrics; or an .npz of statistics (mu, sigma, e.g. from --save-ref-stats): FID and IS only, as
    KID and precision / recall need the reference's features. The metric code is torch-fidelity's;
    KID's subset size is capped at the number of images. classifier: a train_vit.py run or checkpoint
    whose features replace Inception's (domain FID, e.g. for the digits demo).
    """
    from torch_fidelity.metric_fid import fid_featuresdict_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_isc import isc_featuresdict_to_metric
    from torch_fidelity.metric_kid import kid_featuresdict_to_metric
    from torch_fidelity.metric_prc import prc_featuresdict_to_metric

    reference = Path(reference)
    if not reference.exists():
        raise FileNotFoundError(f"FID reference {reference} does not exist: pass an image folder or an .npz of "
                                "statistics written with --save-ref-stats")
    with_images = reference.is_dir()
    if not with_images:
        with np.load(reference) as f:
            with_images = "mu" not in f and "sigma" not in f
    # a malformed statistics file fails here, before any features are extracted
    ref_stats = None if with_images else load_reference_statistics(reference)
    extractor, fid_layer, isc_layer = feature_extractor(cuda, inception_weights, classifier)
    feats = image_features(samples, extractor, cuda, batch_size)
    metrics = dict(isc_featuresdict_to_metric(feats, isc_layer, verbose=False))
    stats = fid_featuresdict_to_statistics(feats, fid_layer)
    if with_images:
        if reference.is_dir():
            ref_feats = image_features(reference, extractor, cuda, batch_size)
        else:
            from torch_fidelity.utils import get_featuresdict_from_dataset

            ref_feats = get_featuresdict_from_dataset(_ArrayImages(load_image_batch(reference)), extractor,
                                                      batch_size, cuda, save_cpu_ram=False, verbose=False)
        if save_ref_stats:
            save_reference_statistics(save_ref_stats, ref_feats, fid_layer)
        ref_stats = fid_featuresdict_to_statistics(ref_feats, fid_layer)
        n = min(len(feats[fid_layer]), len(ref_feats[fid_layer]))
        metrics.update(kid_featuresdict_to_metric(feats, ref_feats, fid_layer, kid_subset_size=min(1000, n),
                                                  verbose=False))
        metrics.update(prc_featuresdict_to_metric(feats, ref_feats, fid_layer, verbose=False))
    else:
        stats = {k: v.astype(np.float64) for k, v in stats.items()}  # torch-fidelity asserts one dtype on both sides
        if ref_stats["mu"].shape != stats["mu"].shape:
            raise ValueError(f"{reference}: mu of shape {ref_stats['mu'].shape} does not fit the "
                             f"{stats['mu'].shape[0]}-dim features of this extractor")
    metrics.update(fid_statistics_to_metric(stats, ref_stats, verbose=False))
    metrics["num_samples"] = len(feats[fid_layer])
    metrics["feature_extractor"] = "inception-v3-compat" if classifier is None else f"classifier {classifier}"
    return {k: v if isinstance(v, str) else float(v) for k, v in metrics.items()}
