"""dit3.evaluation: torch-fidelity's metrics offline, with a local randomly initialised Inception (conftest's
`inception_weights`), checked against an independent Frechet distance and torch-fidelity's own calculate_metrics."""
import numpy as np
import pytest
from PIL import Image

from tests.trainer_helpers import noise_images


def frechet(fa: np.ndarray, fb: np.ndarray) -> float:
    """Frechet distance of two feature sets [n, D], independently of torch-fidelity's scipy sqrtm: with
    centred features X (covariance X^T X / (n - 1)), tr sqrt(S_a S_b) is the sum of the singular values of
    Xa Xb^T / (n - 1), an n x n problem (the D x D square root takes ~25 s at D = 2048 on 2 cores)."""
    xa, xb = fa - fa.mean(0), fb - fb.mean(0)
    assert len(fa) == len(fb)
    tr_covmean = np.linalg.svd(xa @ xb.T, compute_uv=False).sum() / (len(fa) - 1)
    tr_a, tr_b = (xa ** 2).sum() / (len(fa) - 1), (xb ** 2).sum() / (len(fb) - 1)
    return float(((fa.mean(0) - fb.mean(0)) ** 2).sum() + tr_a + tr_b - 2 * tr_covmean)


def test_fid_of_a_set_against_itself_is_zero_and_equals_an_independent_frechet(inception_weights, tmp_path):
    from dit3.evaluation import FID_LAYER, feature_extractor, fidelity_metrics, image_features

    a = noise_images(tmp_path / "a", 24, 0)
    b = noise_images(tmp_path / "b", 24, 1, shift=40)
    same = fidelity_metrics(a, a, cuda=False, inception_weights=inception_weights, batch_size=8)
    assert abs(same["frechet_inception_distance"]) < 1e-3
    assert same["precision"] == 1.0 and same["recall"] == 1.0
    diff = fidelity_metrics(a, b, cuda=False, inception_weights=inception_weights, batch_size=8,
                            save_ref_stats=tmp_path / "b_stats.npz")
    assert diff["frechet_inception_distance"] > 1.0
    assert {"inception_score_mean", "kernel_inception_distance_mean", "precision", "recall"} <= set(diff)

    # independent Frechet distance on the same features
    ext = feature_extractor(False, inception_weights)[0]
    fa = image_features(a, ext, False, 8)[FID_LAYER].double().numpy()
    fb = image_features(b, ext, False, 8)[FID_LAYER].double().numpy()
    assert diff["frechet_inception_distance"] == pytest.approx(frechet(fa, fb), rel=1e-3)

    # the cached reference statistics give the same FID
    stats = fidelity_metrics(a, tmp_path / "b_stats.npz", cuda=False, inception_weights=inception_weights,
                             batch_size=8)
    assert stats["frechet_inception_distance"] == pytest.approx(diff["frechet_inception_distance"], rel=1e-4)
    assert "precision" not in stats  # needs the reference's features


def test_fidelity_metrics_on_a_folder_are_torch_fidelity_calculate_metrics(inception_weights, tmp_path):
    """Against an image folder every number is torch-fidelity's own calculate_metrics, with its default
    Inception layers; KID's subset size is the smaller set."""
    import torch_fidelity

    from dit3.evaluation import fidelity_metrics

    # few images, as Inception runs at 299 px on the CPU; 10 samples fill IS's 10 splits
    a, b = noise_images(tmp_path / "a", 10, 0), noise_images(tmp_path / "b", 5, 2, shift=10)
    ours = fidelity_metrics(a, b, cuda=False, inception_weights=inception_weights)
    theirs = torch_fidelity.calculate_metrics(
        input1=str(a), input2=str(b), cuda=False, isc=True, fid=True, kid=True, prc=True,
        feature_extractor="inception-v3-compat", feature_extractor_weights_path=str(inception_weights),
        kid_subset_size=5, cache=False, verbose=False)
    assert ours == {**theirs, "num_samples": 10, "feature_extractor": "inception-v3-compat"}


def test_fid_reference_npz_is_checked(inception_weights, tmp_path):
    from dit3.evaluation import fidelity_metrics

    a = noise_images(tmp_path / "a", 8, 0)
    np.savez(tmp_path / "float.npz", arr_0=np.zeros((4, 32, 32, 3), np.float32))
    with pytest.raises(ValueError, match=r"arr_0 must be uint8 images of shape \[N, H, W, 3\].*float32"):
        fidelity_metrics(a, tmp_path / "float.npz", cuda=False, inception_weights=inception_weights)
    np.savez(tmp_path / "chw.npz", arr_0=np.zeros((4, 3, 32, 32), np.uint8))
    with pytest.raises(ValueError, match=r"got uint8 \[4, 3, 32, 32\]"):
        fidelity_metrics(a, tmp_path / "chw.npz", cuda=False, inception_weights=inception_weights)
    imgs = np.stack([np.asarray(Image.open(p)) for p in sorted(a.glob("*.png"))])
    np.savez(tmp_path / "adm.npz", arr_0=imgs)  # an ADM-style reference batch of the same images
    assert abs(fidelity_metrics(a, tmp_path / "adm.npz", cuda=False, inception_weights=inception_weights)
               ["frechet_inception_distance"]) < 1e-3


def test_statistics_npz_in_float64_or_float32_and_malformed(inception_weights, tmp_path):
    """pytorch-fid's statistics files hold float64 mu and sigma, ours a float32 mu: both load and give the
    Frechet distance of an independent formula; a malformed file is named with the fields it needs."""
    from dit3.evaluation import FID_LAYER, feature_extractor, fidelity_metrics, image_features

    a, b = noise_images(tmp_path / "a", 8, 0), noise_images(tmp_path / "b", 8, 1, shift=40)
    ext = feature_extractor(False, inception_weights)[0]
    fa, fb = (image_features(d, ext, False)[FID_LAYER].double().numpy() for d in (a, b))
    expect = frechet(fa, fb)
    mu_b, s_b = fb.mean(0), np.cov(fb, rowvar=False)
    for dtype in (np.float64, np.float32):
        np.savez(tmp_path / "stats.npz", mu=mu_b.astype(dtype), sigma=s_b.astype(dtype))
        fid = fidelity_metrics(a, tmp_path / "stats.npz", cuda=False, inception_weights=inception_weights)
        assert fid["frechet_inception_distance"] == pytest.approx(expect, rel=1e-3), dtype
    for name, fields in (("mu_only", dict(mu=mu_b)), ("sigma_1d", dict(mu=mu_b, sigma=mu_b)),
                         ("ints", dict(mu=mu_b.astype(np.int64), sigma=s_b))):
        np.savez(tmp_path / f"{name}.npz", **fields)
        with pytest.raises(ValueError, match=rf"{name}.npz is not a statistics file: it needs mu .* and sigma"):
            fidelity_metrics(a, tmp_path / f"{name}.npz", cuda=False, inception_weights=inception_weights)


def test_class_accuracy_is_train_vits_own_val_accuracy(tmp_path):
    """A classifier's accuracy on the real val glyphs through `class_accuracy` (torch-fidelity's extractor, the
    domain FID's resize and normalisation) is train_vit.py's own evaluation of the same EMA weights
    (the glyphs at the classifier's own size, so both resizes are the identity)."""
    import importlib.util
    import sys
    from pathlib import Path

    from accelerate.state import AcceleratorState, GradientState

    from dit3.evaluation import class_accuracy
    from vit3.glyphs import prepare_glyphs

    root_dir = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location("train_vit", root_dir / "train_vit.py")
    train_vit = sys.modules.setdefault("train_vit", importlib.util.module_from_spec(spec))
    spec.loader.exec_module(train_vit)
    root = prepare_glyphs(tmp_path / "glyphs16", 16, train_per_class=6, val_per_class=5)
    common = ["--config", str(root_dir / "configs" / "vit3_glyphs.yaml"), f"data.path={root}", f"output_dir={tmp_path}",
              "log.progress=false", "log.log_with=none", "threads=1", "data.batch_size=10", "model.img_size=16"]
    for argv in (["max_steps=12", "run_name=judge"], ["--eval", "resume=latest", "run_name=judge"]):
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        r = train_vit.main([*common, *argv])
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    top1 = r["eval"]["val_ema"]["top1"]
    files = sorted((root / "val").glob("*/*.png"))
    images = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])  # [50, 16, 16, 3]
    labels = [int(f.parent.name) for f in files]
    assert class_accuracy(images, labels, tmp_path / "judge", cuda=False) * 100 == pytest.approx(top1, abs=1e-9)
    # the same images under other labels: the accuracy follows the labels given
    shifted = [(y + 1) % 10 for y in labels]
    assert class_accuracy(images, shifted, tmp_path / "judge", cuda=False) < 1.0
    with pytest.raises(ValueError, match="one label per image"):
        class_accuracy(images, labels[:-1], tmp_path / "judge", cuda=False)
    with pytest.raises(ValueError, match="past the 10 classes"):
        class_accuracy(images[:1], [10], tmp_path / "judge", cuda=False)
