"""FID, IS, KID, precision / recall of sample images, with torch-fidelity.

The features come from torch-fidelity's InceptionV3 (the layers ADM's evaluator uses) or, for a
domain FID, from a classifier trained by train_vit.py. Against a reference with images (a folder,
or an ADM-style .npz) all five metrics are torch-fidelity's `calculate_metrics`; against saved
statistics (mu, sigma) FID and IS come from its lower-level functions, as `calculate_metrics`
takes no precomputed statistics.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vit3.errors import DataError

FID_LAYER, ISC_LAYER = "2048", "logits_unbiased"  # torch-fidelity's InceptionV3 layers (as ADM's evaluator)
INCEPTION = "inception-v3-compat"
CLASSIFIER_EXTRACTOR = "vit3-classifier"


# ----------------------------------------------------------------------------------------
# Feature extractors
# ----------------------------------------------------------------------------------------
def classifier_checkpoint(path: str | Path) -> tuple[Path, dict]:
    """(the checkpoint, its model config) of a train_vit.py run folder (its latest) or checkpoint."""
    import yaml

    from vit3.engine import find_latest_checkpoint

    path = Path(path)
    ckpt = find_latest_checkpoint(path / "checkpoints") if (path / "checkpoints").is_dir() else path
    if ckpt is None or not (ckpt / "config.yaml").is_file():
        raise FileNotFoundError(f"{path} is not a train_vit.py run folder or checkpoint (no config.yaml)")
    return ckpt, yaml.safe_load((ckpt / "config.yaml").read_text())["model"]


def load_classifier(path: str | Path):
    """(timm model, its image size) from a train_vit.py run folder or checkpoint (EMA weights if present)."""
    import timm

    from vit3 import load_weights  # also registers the ViT³ models with timm

    ckpt, mc = classifier_checkpoint(path)
    model = timm.create_model(mc["name"], num_classes=mc["num_classes"], img_size=mc["img_size"], **mc["kwargs"])
    if not load_weights(model, ckpt, ema=True):
        load_weights(model, ckpt)
    return model.eval(), mc["img_size"]


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


def extractor_kwargs(inception_weights=None, classifier=None) -> dict:
    """torch-fidelity's keywords for the feature extractor: its name, weights and layer per metric.

    Inception ('inception-v3-compat') comes from torch-fidelity's download, or from a local weights
    file (clusters without internet: copy the file torch-fidelity downloads,
    pt_inception-2015-12-05-*.pth). A classifier (a train_vit.py run or checkpoint) is registered
    with torch-fidelity on first use. KID and precision / recall use the FID layer.
    """
    if classifier is None:
        if inception_weights is not None and not Path(inception_weights).is_file():
            raise FileNotFoundError(f"Inception weights file {inception_weights} does not exist")
        name, weights, fid_layer, isc_layer = INCEPTION, inception_weights, FID_LAYER, ISC_LAYER
    else:
        from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

        if CLASSIFIER_EXTRACTOR not in FEATURE_EXTRACTORS_REGISTRY:
            register_feature_extractor(CLASSIFIER_EXTRACTOR, _classifier_extractor_class())
        name, weights, fid_layer, isc_layer = CLASSIFIER_EXTRACTOR, classifier, "prelogits", "logits"
    return {"feature_extractor": name, "feature_extractor_weights_path": str(weights) if weights else None,
            "feature_layer_fid": fid_layer, "feature_layer_isc": isc_layer, "feature_layer_kid": fid_layer,
            "feature_layer_prc": fid_layer}


def feature_extractor(cuda: bool, inception_weights=None, classifier=None):
    """(extractor, FID layer, IS layer), built as `calculate_metrics` builds it from `extractor_kwargs`."""
    from torch_fidelity.utils import create_feature_extractor

    kw = extractor_kwargs(inception_weights, classifier)
    fid_layer, isc_layer = kw["feature_layer_fid"], kw["feature_layer_isc"]
    ext = create_feature_extractor(kw["feature_extractor"], [fid_layer, isc_layer], cuda=cuda, verbose=False,
                                   feature_extractor_weights_path=kw["feature_extractor_weights_path"])
    return ext, fid_layer, isc_layer


# ----------------------------------------------------------------------------------------
# Images and their features
# ----------------------------------------------------------------------------------------
def image_files(folder: str | Path) -> list[str]:
    """The PNG / JPEG files under `folder` (recursive), as torch-fidelity finds them: sorted real paths."""
    from torch_fidelity.utils import glob_samples_paths

    files = glob_samples_paths(str(folder), samples_find_deep=True, samples_find_ext="png,jpg,jpeg", verbose=False)
    if not files:
        raise FileNotFoundError(f"no images (png, jpg, jpeg) under {folder}")
    return files


def dataset_features(dataset, extractor, cuda: bool, batch_size: int = 64) -> dict:
    """torch-fidelity features dict ({layer: [N, D]}) of a Dataset of uint8 [3, H, W] images."""
    from torch_fidelity.utils import get_featuresdict_from_dataset

    return get_featuresdict_from_dataset(dataset, extractor, batch_size, cuda, save_cpu_ram=False, verbose=False)


def image_features(folder: str | Path, extractor, cuda: bool, batch_size: int = 64) -> dict:
    """torch-fidelity features dict ({layer: [N, D]}) of the PNG / JPEG images under `folder` (recursive)."""
    from torch_fidelity.datasets import ImagesPathDataset

    return dataset_features(ImagesPathDataset(image_files(folder)), extractor, cuda, batch_size)


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


# ----------------------------------------------------------------------------------------
# Saved statistics
# ----------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------
def _check_counts(num_samples: int, num_ref: int | None, reference: Path):
    """DataError unless there are enough images for the metrics (else scipy fails with "Array must not contain
    infs or NaNs"): FID a covariance (2 samples); against images, precision / recall each image's 3 nearest
    neighbours besides itself (4 on each side). num_ref None: a statistics file (FID and IS only)."""
    need = 2 if num_ref is None else 4
    if num_samples < need or (num_ref is not None and num_ref < need):
        ref = "" if num_ref is None else f" and {num_ref} reference images in {reference}"
        raise DataError(f"FID needs at least 2 samples, and against reference images precision / recall need at least "
                        f"4 samples and 4 reference images; got {num_samples} samples{ref}. Draw more samples "
                        "(--num-samples, sample.fid_samples) or use a larger reference")


def fidelity_metrics(samples: str | Path | list, reference: str | Path, *, cuda: bool, inception_weights=None,
                     classifier=None, batch_size: int = 64, save_ref_stats: str | Path | None = None) -> dict:
    """FID, IS, KID, precision and recall of the images under `samples` (a folder, or a list of image files:
    exactly those) against `reference`.

    reference: an image folder or an ADM-style .npz of images (arr_0, uint8 [N, H, W, 3]): all five
    metrics; or an .npz of statistics (mu, sigma, e.g. from --save-ref-stats): FID and IS only, as
    KID and precision / recall need the reference's features. The metric code is torch-fidelity's;
    KID's subset size is capped at the number of images. classifier: a train_vit.py run or checkpoint
    whose features replace Inception's (domain FID, e.g. for the digits demo).
    """
    from torch_fidelity import calculate_metrics
    from torch_fidelity.metric_fid import fid_featuresdict_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_isc import isc_featuresdict_to_metric

    reference = Path(reference)
    if not reference.exists():
        raise FileNotFoundError(f"FID reference {reference} does not exist: pass an image folder or an .npz of "
                                "statistics written with --save-ref-stats")
    with_images = reference.is_dir()
    if not with_images:
        with np.load(reference) as f:
            with_images = "mu" not in f and "sigma" not in f
    # bad input fails before any features are extracted: a malformed statistics file, a missing weights
    # file, a folder without images
    ref_stats = None if with_images else load_reference_statistics(reference)
    extractor = extractor_kwargs(inception_weights, classifier)
    from torch_fidelity.datasets import ImagesPathDataset

    files = [str(f) for f in samples] if isinstance(samples, (list, tuple)) else image_files(samples)
    missing = [f for f in files if not Path(f).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} sample images are missing, e.g. {missing[0]}")
    sample_images, num_samples = ImagesPathDataset(files), len(files)
    if with_images:
        # folders as absolute paths: a relative one named like a torch-fidelity dataset (cifar10-train, ...)
        # would be read as that dataset
        if reference.is_dir():
            ref_images, num_ref = os.path.abspath(reference), len(image_files(reference))
        else:
            ref_images = _ArrayImages(load_image_batch(reference))
            num_ref = len(ref_images)
        _check_counts(num_samples, num_ref, reference)
        metrics = calculate_metrics(
            input1=sample_images, input2=ref_images, cuda=cuda, batch_size=batch_size,
            isc=True, fid=True, kid=True, prc=True, **extractor, kid_subset_size=min(1000, num_samples, num_ref),
            samples_find_deep=True, cache=False, verbose=False)
        if save_ref_stats:
            # calculate_metrics keeps the reference's features to itself: they are extracted once more, and
            # only when statistics are asked for
            ext, fid_layer, _ = feature_extractor(cuda, inception_weights, classifier)
            ref_feats = (image_features(reference, ext, cuda, batch_size) if reference.is_dir()
                         else dataset_features(ref_images, ext, cuda, batch_size))
            save_reference_statistics(save_ref_stats, ref_feats, fid_layer)
    else:
        _check_counts(num_samples, None, reference)
        ext, fid_layer, isc_layer = feature_extractor(cuda, inception_weights, classifier)
        feats = dataset_features(sample_images, ext, cuda, batch_size)
        # float64 as the loaded statistics: torch-fidelity asserts one dtype on both sides
        stats = {k: v.astype(np.float64) for k, v in fid_featuresdict_to_statistics(feats, fid_layer).items()}
        if ref_stats["mu"].shape != stats["mu"].shape:
            raise ValueError(f"{reference}: mu of shape {ref_stats['mu'].shape} does not fit the "
                             f"{stats['mu'].shape[0]}-dim features of this extractor")
        metrics = {**isc_featuresdict_to_metric(feats, isc_layer, verbose=False),
                   **fid_statistics_to_metric(stats, ref_stats, verbose=False)}
    metrics["num_samples"] = num_samples
    metrics["feature_extractor"] = INCEPTION if classifier is None else f"classifier {classifier}"
    return {k: v if isinstance(v, str) else float(v) for k, v in metrics.items()}


def class_accuracy(images: np.ndarray, labels, classifier: str | Path, *, cuda: bool, batch_size: int = 64) -> float:
    """The share of `images` (uint8 [N, H, W, 3]) that `classifier` (a train_vit.py run or checkpoint) labels as
    `labels` [N]: its logits, from the same extractor, resize and normalisation as its domain FID's features."""
    labels = torch.as_tensor(labels)
    if len(images) != len(labels) or not len(images):
        raise ValueError(f"{len(images)} images and {len(labels)} labels: class accuracy needs one label per image")
    ext, _, isc_layer = feature_extractor(cuda, classifier=classifier)
    logits = dataset_features(_ArrayImages(images), ext, cuda, batch_size)[isc_layer]  # [N, classes]
    if int(labels.max()) >= logits.shape[1]:
        raise ValueError(f"label {int(labels.max())} is past the {logits.shape[1]} classes of the classifier "
                         f"{classifier}: judge samples with a classifier of the same classes")
    return (logits.argmax(1).cpu() == labels).double().mean().item()
