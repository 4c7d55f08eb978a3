"""Standard FID and Inception Score with the FID Inception network of pytorch-fid / torch-fidelity.

The network is torch-fidelity's `FeatureExtractorInceptionV3` (the TF-1 "2015-12-05" Inception
graph ported to PyTorch): it takes uint8 images of any size, resizes them to 299x299 with TF-1's
bilinear interpolation and scales to [-1, 1] itself, so numbers match the published FID/IS
protocol. FID uses the 2048-d pool features, IS the 1008-way logits without the bias
("logits_unbiased", as torch-fidelity and the original TF code do).

Weights come from, in order: an explicit path (`evaluate.inception_weights`), the torch hub cache
that torch-fidelity and pytorch-fid download into, or a download when the caller explicitly allows
it. Nothing is downloaded on import or implicitly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from ddpm.core.atomic import atomic_open, atomic_path
from ddpm.core.checkpoint import load_weights_only
from ddpm.errors import UserError
from ddpm.evaluation.metrics import ArrayLike, feature_statistics, frechet_distance

# torch-fidelity's download; pytorch-fid publishes the same converted weights (same SHA-256 prefix)
# under its own name, and either file in the torch hub cache is used.
INCEPTION_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
INCEPTION_SHA256_PREFIX = "6726825d"
CACHE_NAMES = ("weights-inception-2015-12-05-6726825d.pth", "pt_inception-2015-12-05-6726825d.pth")
FEATURES = ("2048", "logits_unbiased")
FEATURE_DIM = 2048
NUM_LOGITS = 1008


def hub_cache_paths() -> list[Path]:
    """Where torch-fidelity / pytorch-fid cache the weights: `<torch hub dir>/checkpoints/<name>`."""
    checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    return [checkpoints / name for name in CACHE_NAMES]


def _missing_weights_error(detail: str) -> UserError:
    return UserError(
        f"{detail}. FID/IS need the FID Inception weights: download {INCEPTION_URL} "
        f"(or pytorch-fid's pt_inception-2015-12-05-6726825d.pth) on a machine with network access and "
        f"either set evaluate.inception_weights to the file's path or copy it to {hub_cache_paths()[0]}; "
        "or set evaluate.fid: false to skip FID and IS"
    )


def resolve_inception_weights(weights: str | Path | None, allow_download: bool = False) -> Path:
    """The weights file to use: `weights` if given, else the hub cache, else a download if allowed."""
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise _missing_weights_error(f"evaluate.inception_weights={weights} does not exist")
        return path
    for path in hub_cache_paths():
        if path.is_file():
            return path
    if not allow_download:
        raise _missing_weights_error("no Inception weights given and none in the torch hub cache")
    return _download(hub_cache_paths()[0])


def _download(dest: Path) -> Path:
    """Fetch the weights into the hub cache, checking the SHA-256 prefix; atomic."""
    try:
        with atomic_path(dest) as tmp:
            torch.hub.download_url_to_file(INCEPTION_URL, str(tmp), hash_prefix=INCEPTION_SHA256_PREFIX)
    except (OSError, RuntimeError) as err:
        raise _missing_weights_error(f"downloading the Inception weights failed ({err})") from None
    return dest


def _check_weights_file(path: Path) -> None:
    """Open the file with the weights-only unpickler before torch-fidelity loads it.

    torch-fidelity's own loader unpickles without that restriction; a file that loads under the
    restricted unpickler holds only tensors and containers, so the second load runs no code.
    """
    try:
        state = load_weights_only(path)
    except Exception as err:  # corrupt, truncated or a pickle with code in it
        raise _missing_weights_error(f"{path} is not a readable weights file ({err})") from None
    fc = state.get("fc.weight") if isinstance(state, dict) else None
    if fc is None or tuple(fc.shape) != (NUM_LOGITS, FEATURE_DIM):
        raise _missing_weights_error(f"{path} does not hold the FID Inception state dict (no fc.weight of 1008x2048)")


class InceptionFeatures(nn.Module):
    """The FID Inception network in eval mode on `device`: uint8 (B, 3, H, W) -> (pool (B, 2048), logits (B, 1008)).

    `weights`: a local weights file; None looks in the torch hub cache and then downloads only if
    `allow_download`. Raises a UserError explaining how to provide the weights when none are found.
    """

    def __init__(self, weights: str | Path | None, device: torch.device | str = "cpu", allow_download: bool = False):
        super().__init__()
        # Imported here: torch-fidelity pulls in torchvision and its other extractors (~1 s).
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        self.weights_path = resolve_inception_weights(weights, allow_download)
        _check_weights_file(self.weights_path)
        try:
            self.net = FeatureExtractorInceptionV3(
                "inception-v3-compat", list(FEATURES), feature_extractor_weights_path=str(self.weights_path)
            )
        except RuntimeError as err:  # load_state_dict: wrong keys or shapes
            detail = f"{self.weights_path} does not match the FID Inception network ({err})"
            raise _missing_weights_error(detail) from None
        self.to(device).eval()

    @property
    def device(self) -> torch.device:
        """Where the network's weights are (batches are moved there)."""
        return next(self.net.parameters()).device

    def forward(self, images_u8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pool features (B, 2048) and unbiased logits (B, 1008), float32, for uint8 images (B, 3, H, W)."""
        pool, logits = self.net(images_u8)
        return pool, logits


def inception_outputs(
    extractor: InceptionFeatures, images_u8: ArrayLike, batch_size: int = 200
) -> tuple[np.ndarray, np.ndarray]:
    """Pool features (N, 2048) and IS logits (N, 1008) as float64 numpy, `batch_size` images at a time.

    `images_u8` is uint8 (N, 3, H, W) on any device (numpy or tensor); only one batch at a time is
    moved to the extractor's device, so memory is bounded by `batch_size`.
    """
    images = torch.as_tensor(images_u8)
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected uint8 images (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
    pools, logits = [], []
    with torch.inference_mode():
        for batch in images.split(batch_size):
            pool, logit = extractor(batch.to(extractor.device))  # (b, 2048), (b, 1008)
            pools.append(pool.to("cpu", torch.float64))
            logits.append(logit.to("cpu", torch.float64))
    return torch.cat(pools).numpy(), torch.cat(logits).numpy()


def fid_from_features(features: ArrayLike, ref_mu: ArrayLike, ref_sigma: ArrayLike) -> float:
    """FID of features (N, 2048) against reference statistics (e.g. the training set's, see `load_stats`)."""
    mu, sigma = feature_statistics(features)
    return frechet_distance(mu, sigma, ref_mu, ref_sigma)


def inception_score(logits: ArrayLike, splits: int = 10, shuffle_seed: int | None = 2020) -> tuple[float, float]:
    """Inception Score (mean, std over `splits` chunks) from IS logits (N, 1008), in float64.

    IS = exp(E_x KL(p(y|x) || p(y))) per chunk, as torch-fidelity computes it; the rows are first
    shuffled with its fixed seed (2020) so numbers match torch-fidelity's. `shuffle_seed=None` keeps
    the order.
    """
    logits_t = torch.as_tensor(np.asarray(logits), dtype=torch.float64)  # (N, K)
    n = logits_t.shape[0]
    if logits_t.ndim != 2 or n < splits or splits < 1:
        raise UserError(f"the Inception Score needs at least splits={splits} samples, got {n}; evaluate more samples")
    if shuffle_seed is not None:
        logits_t = logits_t[np.random.RandomState(shuffle_seed).permutation(n)]
    log_p = logits_t.log_softmax(dim=1)  # (N, K)
    scores = []
    for i in range(splits):
        chunk = log_p[i * n // splits : (i + 1) * n // splits]  # (n_i, K)
        log_marginal = chunk.exp().mean(dim=0, keepdim=True).log()  # (1, K)
        kl = (chunk.exp() * (chunk - log_marginal)).sum(dim=1)  # (n_i,)
        scores.append(float(kl.mean().exp()))
    return float(np.mean(scores)), float(np.std(scores))


def save_stats(path: str | Path, mu: ArrayLike | None, sigma: ArrayLike | None) -> None:
    """Atomically store reference statistics (mu (D,), sigma (D, D), float64) as an .npz file.

    `mu = sigma = None` writes a marker file meaning "FID disabled" (the pipeline keeps its shape);
    `load_stats` then returns (None, None).
    """
    if mu is None and sigma is None:
        arrays = {"disabled": np.array(True)}
    else:
        mu64, sigma64 = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
        if mu64.ndim != 1 or sigma64.shape != (mu64.shape[0], mu64.shape[0]):
            raise ValueError(f"need mu (D,) and sigma (D, D), got {mu64.shape} and {sigma64.shape}")
        arrays = {"mu": mu64, "sigma": sigma64}
    with atomic_open(path, "wb") as f:  # a file object: np.savez would append ".npz" to a bare path
        np.savez(f, **arrays)


def load_stats(path: str | Path) -> tuple[np.ndarray, np.ndarray] | tuple[None, None]:
    """Read statistics written by `save_stats` ((None, None) for the disabled marker).

    A missing, corrupt or malformed file is a UserError.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"FID reference statistics {path} not found; rerun the stage that computes them")
    try:
        with np.load(path, allow_pickle=False) as data:
            if "disabled" in data.files:
                return None, None
            mu, sigma = data["mu"], data["sigma"]
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"cannot read FID statistics {path} ({err}); delete it and rerun the stage") from None
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise UserError(f"{path} holds malformed statistics (mu {mu.shape}, sigma {sigma.shape}); delete it and rerun")
    return mu, sigma
