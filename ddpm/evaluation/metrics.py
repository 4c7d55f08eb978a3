"""Distribution and classification metrics on feature vectors.

* `frechet_distance` / `feature_statistics`: the Fréchet distance between two Gaussians fitted to
  features (FID when the features are Inception pool features), computed in float64, the same value as
  pytorch-fid's so numbers are comparable with published ones.
* `precision_recall`: improved precision and recall (Kynkäänniemi et al. 2019) with k-NN manifolds,
  computed in row batches so 10,000 x 10,000 sets fit in memory.
* `class_accuracy`: overall and per-class accuracy of predicted labels.

Only numpy/scipy/torch: no tracking or pipeline code here.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ddpm.core.interruptible import interruptible
from ddpm.errors import UserError

ArrayLike = np.ndarray | torch.Tensor


def _as_float64(x: ArrayLike) -> np.ndarray:
    """A float64 numpy copy of a numpy array or (any-device) tensor."""
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def feature_statistics(features: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of features (N, D), both float64."""
    feats = _as_float64(features)  # (N, D)
    if feats.ndim != 2:
        raise ValueError(f"features must be 2-D (N, D), got shape {feats.shape}")
    if feats.shape[0] < 2:
        raise UserError(
            f"a covariance needs at least 2 feature vectors, got {feats.shape[0]}; evaluate more samples"
        )
    mu = feats.mean(axis=0)  # (D,)
    sigma = np.cov(feats, rowvar=False)  # (D, D)
    return mu, np.atleast_2d(sigma)


def _trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """Tr (sigma1 sigma2)^½ of two covariances (D, D), via two symmetric eigendecompositions.

    sigma1 sigma2 = A (A sigma2 A) A⁻¹ with A = sigma1^½, so its eigenvalues are those of the symmetric PSD
    A sigma2 A and the trace of its root is the sum of their roots: pytorch-fid's value (scipy's `sqrtm` of
    the product), never complex, and with no offset needed for singular covariances. numpy releases the GIL
    in these calls, which `interruptible` needs: scipy's `sqrtm` held it for 100 s at D = 2048 on a loaded
    CPU, so a SIGTERM during FID waited that long.
    """
    w, v = np.linalg.eigh(sigma1)  # (D,), (D, D)
    root1 = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T  # (D, D)
    m = root1 @ sigma2 @ root1  # (D, D), symmetric up to rounding
    return float(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0.0, None)).sum())


def frechet_distance(mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

    d² = ||mu1 - mu2||² + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^½), as in pytorch-fid (see
    `_trace_sqrt_product`), computed in a worker thread so a stop signal is handled meanwhile.
    """
    mu1, mu2 = np.atleast_1d(_as_float64(mu1)), np.atleast_1d(_as_float64(mu2))  # (D,)
    sigma1, sigma2 = np.atleast_2d(_as_float64(sigma1)), np.atleast_2d(_as_float64(sigma2))  # (D, D)
    d = mu1.shape[0]
    if mu1.shape != mu2.shape or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(
            f"mismatched statistics: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}"
        )
    diff = mu1 - mu2  # (D,)
    tr_covmean = interruptible(_trace_sqrt_product, sigma1, sigma2)
    value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean
    # The distance is >= 0; rounding can leave -1e-12 for identical statistics.
    return max(float(value), 0.0)


def _as_float_tensor(x: ArrayLike, device: torch.device | str) -> torch.Tensor:
    """A float32 tensor on `device` (distances only rank neighbours, float32 is ample)."""
    return torch.as_tensor(x).to(device=device, dtype=torch.float32)


def _knn_radii(feats: torch.Tensor, k: int, batch_size: int) -> torch.Tensor:
    """Distance from each row of feats (N, D) to its k-th nearest other row: (N,)."""
    radii = []
    for start in range(0, feats.shape[0], batch_size):
        dist = torch.cdist(feats[start : start + batch_size], feats)  # (b, N)
        # The (k+1)-th smallest skips the point itself (distance 0).
        radii.append(dist.kthvalue(k + 1, dim=1).values)  # (b,)
    return torch.cat(radii)  # (N,)


def _inside_manifold(queries: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, batch_size: int) -> float:
    """Fraction of queries (M, D) inside at least one ball (centres (N, D), radii (N,))."""
    inside = 0
    for start in range(0, queries.shape[0], batch_size):
        dist = torch.cdist(queries[start : start + batch_size], centres)  # (b, N)
        inside += int((dist <= radii[None, :]).any(dim=1).sum())
    return inside / queries.shape[0]


def precision_recall(
    real_feats: ArrayLike,
    fake_feats: ArrayLike,
    k: int = 3,
    batch_size: int = 1000,
    device: torch.device | str = "cpu",
) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) of fake features against real ones.

    Each set's manifold is the union of balls around its points with radius = distance to the
    point's k-th nearest neighbour in the same set (excluding itself). Precision is the fraction of
    fake points inside the real manifold (fidelity); recall the fraction of real points inside the
    fake manifold (coverage of the real distribution). Distances are computed `batch_size` rows at
    a time, so memory is O(batch_size * N).
    """
    real = _as_float_tensor(real_feats, device)  # (N, D)
    fake = _as_float_tensor(fake_feats, device)  # (M, D)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"features must be (N, D) with the same D, got {tuple(real.shape)} and {tuple(fake.shape)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    smallest = min(real.shape[0], fake.shape[0])
    if smallest <= k:
        raise UserError(
            f"precision/recall with k={k} needs more than {k} samples in each set, got {smallest}; "
            "evaluate more samples or lower evaluate.pr_k"
        )
    real_radii = _knn_radii(real, k, batch_size)  # (N,)
    fake_radii = _knn_radii(fake, k, batch_size)  # (M,)
    precision = _inside_manifold(fake, real, real_radii, batch_size)
    recall = _inside_manifold(real, fake, fake_radii, batch_size)
    return precision, recall


def class_accuracy(pred_labels: ArrayLike, target_labels: ArrayLike, num_classes: int) -> tuple[float, list[float]]:
    """Overall accuracy and per-class accuracy (recall of each target class).

    A class with no target samples gets NaN in the per-class list (there is nothing to measure).
    """
    pred = torch.as_tensor(pred_labels).to("cpu", torch.int64).reshape(-1)  # (N,)
    target = torch.as_tensor(target_labels).to("cpu", torch.int64).reshape(-1)  # (N,)
    if pred.shape != target.shape or pred.numel() == 0:
        raise ValueError(f"need equally long non-empty label arrays, got {tuple(pred.shape)} and {tuple(target.shape)}")
    if target.min() < 0 or target.max() >= num_classes:
        raise ValueError(
            f"target labels must lie in [0, {num_classes}), got [{int(target.min())}, {int(target.max())}]"
        )
    correct = (pred == target).to(torch.float64)  # (N,)
    hits = torch.bincount(target, weights=correct, minlength=num_classes)  # (C,)
    counts = torch.bincount(target, minlength=num_classes)  # (C,)
    per_class = [float(h / c) if c > 0 else math.nan for h, c in zip(hits.tolist(), counts.tolist())]
    return float(correct.mean()), per_class


CHANNEL_NAMES = ("r", "g", "b")


def pixel_statistics(images_u8: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation, in 0-255 pixel units, of uint8 images (N, C, H, W).

    Each channel's statistics pool every pixel of every image (the usual dataset normalisation constants),
    so a sampler that saturates colours or leaves noise shows up as a std far from the real images'.
    """
    if images_u8.ndim != 4 or images_u8.shape[0] == 0:
        raise UserError(f"pixel statistics need a non-empty batch (N, C, H, W), got shape {tuple(images_u8.shape)}")
    x = images_u8.to(torch.float64).transpose(0, 1).flatten(1)  # (C, N*H*W)
    return x.mean(dim=1).tolist(), x.std(dim=1, correction=0).tolist()


def pixel_comparison(samples_u8: torch.Tensor, real_u8: torch.Tensor) -> dict:
    """The samples' and the real images' per-channel pixel mean/std, and the worst relative gap of each.

    `pixel_mean_rel_error` / `pixel_std_rel_error` = max over channels of |sample / real - 1|.
    """
    s_mean, s_std = pixel_statistics(samples_u8)
    r_mean, r_std = pixel_statistics(real_u8)
    names = CHANNEL_NAMES if len(s_mean) == 3 else tuple(str(c) for c in range(len(s_mean)))

    def per_channel(values: list[float]) -> dict[str, float]:
        return dict(zip(names, values, strict=True))

    return {
        "sample_pixel_mean": per_channel(s_mean),
        "sample_pixel_std": per_channel(s_std),
        "real_pixel_mean": per_channel(r_mean),
        "real_pixel_std": per_channel(r_std),
        "pixel_mean_rel_error": max(abs(s / r - 1) for s, r in zip(s_mean, r_mean) if r > 0),
        "pixel_std_rel_error": max(abs(s / r - 1) for s, r in zip(s_std, r_std) if r > 0),
    }
