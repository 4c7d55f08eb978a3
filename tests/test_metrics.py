"""Fréchet distance, precision/recall and class accuracy against analytic and independent references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from ddpm.errors import UserError
from ddpm.evaluation.metrics import class_accuracy, feature_statistics, frechet_distance, precision_recall


def _random_spd(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def _reference_fd(mu1, s1, mu2, s2) -> float:
    """pytorch-fid's computation as an independent reference: scipy's sqrtm of the product, with 1e-6·I added to
    both covariances when it is not finite, and the real part of its trace."""
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        offset = np.eye(len(mu1)) * 1e-6
        covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real)


def test_fd_diagonal_closed_form():
    rng = np.random.default_rng(0)
    d = 12
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    v1, v2 = rng.uniform(0.1, 3.0, size=d), rng.uniform(0.1, 3.0, size=d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(v1 + v2 - 2 * np.sqrt(v1 * v2))
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-10)


def test_fd_one_dimensional_is_wasserstein2():
    # 1-D Gaussians: W2² = (m1 - m2)² + (s1 - s2)²
    assert frechet_distance([1.0], [[4.0]], [-2.0], [[9.0]]) == pytest.approx(9.0 + 1.0, rel=1e-12)


def test_fd_random_spd_matches_reference():
    rng = np.random.default_rng(1)
    d = 40
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(_reference_fd(mu1, s1, mu2, s2), rel=1e-8)
    # torch tensors (e.g. float32 on a device) are accepted and promoted to float64
    got = frechet_distance(torch.tensor(mu1), torch.tensor(s1), torch.tensor(mu2), torch.tensor(s2))
    assert got == pytest.approx(_reference_fd(mu1, s1, mu2, s2), rel=1e-8)


def test_fd_rank_deficient_covariances():
    # 10 samples in 64 dimensions: both covariances have rank 9 and their product is singular.
    rng = np.random.default_rng(2)
    a = rng.normal(size=(10, 64))
    b = rng.normal(size=(10, 64)) * 1.5 + 0.3
    mu1, s1 = feature_statistics(a)
    mu2, s2 = feature_statistics(b)
    assert np.linalg.matrix_rank(s1) == 9
    got = frechet_distance(mu1, s1, mu2, s2)
    assert math.isfinite(got)
    assert got == pytest.approx(_reference_fd(mu1, s1, mu2, s2), rel=1e-5)


def test_fd_identical_sets_is_zero_and_symmetric():
    rng = np.random.default_rng(3)
    feats = rng.normal(size=(200, 32)) @ rng.normal(size=(32, 32))
    mu, sigma = feature_statistics(feats)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-7)
    mu2, sigma2 = feature_statistics(feats + 1.0)  # shifted by 1 in each of 32 dims
    assert frechet_distance(mu, sigma, mu2, sigma2) == pytest.approx(32.0, rel=1e-6)
    assert frechet_distance(mu2, sigma2, mu, sigma) == pytest.approx(frechet_distance(mu, sigma, mu2, sigma2))


def test_fd_matches_torch_fidelity():
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    rng = np.random.default_rng(4)
    d = 24
    stats = [{"mu": rng.normal(size=d), "sigma": _random_spd(rng, d)} for _ in range(2)]
    expected = fid_statistics_to_metric(stats[0], stats[1], verbose=False)["frechet_inception_distance"]
    got = frechet_distance(stats[0]["mu"], stats[0]["sigma"], stats[1]["mu"], stats[1]["sigma"])
    assert got == pytest.approx(expected, rel=1e-8)


def test_fd_shape_mismatch_and_too_few_samples():
    with pytest.raises(ValueError, match="mismatched"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(UserError, match="at least 2"):
        feature_statistics(np.zeros((1, 5)))


def test_feature_statistics_values():
    feats = np.array([[0.0, 1.0], [2.0, 3.0], [4.0, 8.0]], dtype=np.float32)
    mu, sigma = feature_statistics(feats)
    assert mu.dtype == np.float64 and sigma.dtype == np.float64
    np.testing.assert_allclose(mu, [2.0, 4.0])
    # unbiased covariance: var(x) = 4, var(y) = 13, cov = 7
    np.testing.assert_allclose(sigma, [[4.0, 7.0], [7.0, 13.0]])


def test_precision_recall_hand_computed():
    # k=1. Real radii: every real point's nearest neighbour is 1 away. Fake points: 0.5 is inside
    # the real manifold, 10 is not -> precision 1/2. Fake radii: both are 9.5 (their mutual
    # distance), and the ball around 0.5 holds all real points -> recall 1.
    real = np.array([[0.0], [1.0], [2.0], [3.0]])
    fake = np.array([[0.5], [10.0]])
    assert precision_recall(real, fake, k=1) == (0.5, 1.0)
    # k=1 on a lone fake point far away shrinks its ball: fake = {10, 10.5} -> radius 0.5, no real inside
    assert precision_recall(real, np.array([[10.0], [10.5]]), k=1) == (0.0, 0.0)


def test_precision_recall_same_distribution_is_high():
    gen = torch.Generator().manual_seed(0)
    real = torch.randn(600, 8, generator=gen)
    fake = torch.randn(600, 8, generator=gen)
    precision, recall = precision_recall(real, fake, k=3)
    assert precision > 0.8 and recall > 0.8


def test_precision_recall_disjoint_is_zero():
    gen = torch.Generator().manual_seed(1)
    real = torch.randn(300, 8, generator=gen)
    fake = torch.randn(300, 8, generator=gen) + 20.0
    assert precision_recall(real, fake, k=3) == (0.0, 0.0)


def test_precision_recall_mode_collapse():
    # real: 4 well separated clusters; fake: all from cluster 0 -> faithful (precision ~1), poor coverage (~1/4)
    gen = torch.Generator().manual_seed(2)
    centres = torch.eye(4, 8) * 30.0  # (4, 8)
    real = (centres[:, None, :] + torch.randn(4, 200, 8, generator=gen)).reshape(800, 8)
    fake = centres[0] + torch.randn(400, 8, generator=gen)
    precision, recall = precision_recall(real, fake, k=3)
    # k=3 manifolds of a few hundred points cover ~0.88 of their own distribution (see the test
    # above), so "high" is > 0.8 and the collapsed recall is about 0.88 / 4.
    assert precision > 0.8
    assert 0.15 < recall < 0.3


def test_precision_recall_batching_does_not_change_result():
    gen = torch.Generator().manual_seed(3)
    real, fake = torch.randn(157, 6, generator=gen), torch.randn(93, 6, generator=gen) * 1.3
    assert precision_recall(real, fake, k=3, batch_size=10) == precision_recall(real, fake, k=3, batch_size=1000)


def test_precision_recall_needs_more_than_k_samples():
    with pytest.raises(UserError, match="pr_k"):
        precision_recall(np.zeros((3, 2)), np.zeros((10, 2)), k=3)


def test_class_accuracy_known_array():
    target = np.array([0, 0, 0, 0, 1, 1, 2, 2, 2, 2])
    pred = np.array([0, 0, 0, 1, 1, 0, 2, 2, 2, 2])
    overall, per_class = class_accuracy(pred, torch.tensor(target), num_classes=4)
    assert overall == pytest.approx(0.8)
    assert per_class[:3] == [0.75, 0.5, 1.0]
    assert math.isnan(per_class[3])  # class 3 has no targets


def test_class_accuracy_rejects_bad_labels():
    with pytest.raises(ValueError):
        class_accuracy([0, 1], [0, 5], num_classes=3)
    with pytest.raises(ValueError):
        class_accuracy([0, 1, 2], [0, 1], num_classes=3)


def test_pixel_statistics_of_known_images():
    from ddpm.evaluation.metrics import pixel_comparison, pixel_statistics

    # channel r: half the pixels 0, half 200 -> mean 100, std 100; g: constant 50; b: 10 and 30 -> mean 20, std 10
    images = torch.zeros(2, 3, 2, 2, dtype=torch.uint8)
    images[0, 0], images[1, 0] = 0, 200
    images[:, 1] = 50
    images[:, 2, 0], images[:, 2, 1] = 10, 30
    mean, std = pixel_statistics(images)
    assert mean == pytest.approx([100.0, 50.0, 20.0]) and std == pytest.approx([100.0, 0.0, 10.0])
    brighter = images.clone()
    brighter[:, 1] = 55  # g mean 10 % high
    cmp = pixel_comparison(brighter, images)
    assert cmp["real_pixel_mean"] == {"r": 100.0, "g": 50.0, "b": 20.0}
    assert cmp["pixel_mean_rel_error"] == pytest.approx(0.1)
    assert cmp["pixel_std_rel_error"] == 0.0  # channel g has std 0 in the real images: no ratio to take
    with pytest.raises(UserError, match="non-empty"):
        pixel_statistics(torch.zeros(0, 3, 2, 2, dtype=torch.uint8))
