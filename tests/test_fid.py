"""FID/IS plumbing with a randomly initialised FID Inception (no download), weights resolution and stats files."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch_fidelity.feature_extractor_inceptionv3 as tf_inception
from torch_fidelity.metric_isc import isc_features_to_metric

from ddpm.errors import UserError
from ddpm.evaluation import fid
from ddpm.evaluation.fid import (
    InceptionFeatures,
    fid_from_features,
    hub_cache_paths,
    inception_outputs,
    inception_score,
    load_stats,
    resolve_inception_weights,
    save_stats,
)
from ddpm.pipeline.layout import Layout

pytestmark = pytest.mark.xdist_group("fid")  # under `-n`: one worker builds its module fixtures once


@pytest.fixture(scope="module")
def random_weights(tmp_path_factory) -> Path:
    """torch-fidelity's InceptionV3 with random weights, saved as the plain state dict it loads."""
    mp = pytest.MonkeyPatch()
    # Build the module without its weights: skip the download and the load of the (absent) state dict.
    mp.setattr(tf_inception, "load_state_dict_from_url", lambda *a, **k: {})
    mp.setattr(tf_inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            net = tf_inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    finally:
        mp.undo()
    # torch's default init shrinks the signal ~10x per layer (pool features ~1e-8, every FID ~0);
    # Kaiming init keeps the activations O(1) so the features actually differ between images.
    gen = torch.Generator().manual_seed(1)
    for module in net.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu", generator=gen)
    torch.nn.init.normal_(net.fc.weight, std=2048**-0.5, generator=gen)
    path = tmp_path_factory.mktemp("inception") / "random-inception.pth"
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, size=(6, 3, 1, 1))  # (N, 3, 1, 1) a colour per image
    noise = rng.integers(-40, 41, size=(6, 3, 16, 16))  # (N, 3, 16, 16)
    return np.clip(base + noise, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def outputs(random_weights, images) -> tuple[np.ndarray, np.ndarray]:
    extractor = InceptionFeatures(random_weights, "cpu")
    return inception_outputs(extractor, images, batch_size=4)


@pytest.fixture
def empty_hub(tmp_path, monkeypatch) -> Path:
    """An empty torch hub cache (TORCH_HOME is read on every torch.hub.get_dir call); downloads fail loudly."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def no_network(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return tmp_path / "torch" / "hub" / "checkpoints"


def test_end_to_end_shapes_and_batch_invariance(random_weights, images, outputs):
    pool, logits = outputs
    assert pool.shape == (6, 2048) and logits.shape == (6, 1008)
    assert pool.dtype == np.float64 and logits.dtype == np.float64
    assert np.isfinite(pool).all() and np.isfinite(logits).all()
    assert pool.std(axis=0).mean() > 1e-2  # different images -> clearly different features
    extractor = InceptionFeatures(random_weights, "cpu")
    pool_one_batch, logits_one_batch = inception_outputs(extractor, torch.from_numpy(images[:3]), batch_size=3)
    np.testing.assert_allclose(pool_one_batch, pool[:3], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(logits_one_batch, logits[:3], rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="uint8"):
        inception_outputs(extractor, images.astype(np.float32))


@pytest.mark.slow  # one 2048x2048 sqrtm: ~20 s on an idle core, over a minute on a busy shared one
def test_fid_of_a_set_with_itself_is_zero(outputs):
    pool, _ = outputs
    mu = pool.mean(axis=0)
    sigma = np.cov(pool, rowvar=False)
    assert np.trace(sigma) > 1.0  # a non-degenerate spread, so "≈ 0" below is meaningful
    assert fid_from_features(pool, mu, sigma) == pytest.approx(0.0, abs=1e-4)
    # shifting every feature by 0.1 adds exactly 2048 * 0.1² to the distance
    assert fid_from_features(pool + 0.1, mu, sigma) == pytest.approx(2048 * 0.01, rel=1e-4)


def test_inception_score_through_the_network_depends_only_on_the_predictions(random_weights, images, outputs):
    """One image four times: p(y|x) = p(y) for every x, so IS = 1 exactly; each of three images twice: the same
    distribution of predictions as the three once, so the same IS."""
    extractor = InceptionFeatures(random_weights, "cpu")
    _, logits = inception_outputs(extractor, images[[0, 1, 2, 0, 1, 2]], batch_size=6)
    _, same = inception_outputs(extractor, images[[4, 4, 4, 4]], batch_size=4)
    assert inception_score(same, splits=1) == pytest.approx((1.0, 0.0), abs=1e-9)
    three, _ = inception_score(outputs[1][:3], splits=1)
    assert inception_score(logits, splits=1)[0] == pytest.approx(three, rel=1e-6)
    assert three > 1.0 + 1e-6  # different images get different predictions from the (random) network


def _features_with_statistics(mu: np.ndarray, sigma: np.ndarray, n: int, seed: int) -> np.ndarray:
    """n vectors (n, D) whose sample mean is exactly mu and whose unbiased sample covariance is exactly sigma."""
    z = np.random.default_rng(seed).normal(size=(n, len(mu)))  # (n, D)
    z -= z.mean(axis=0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T  # sample covariance exactly I
    return mu + z @ np.linalg.cholesky(sigma).T  # (n, D)


def test_fid_from_features_is_the_closed_form_distance_of_two_gaussians():
    # 2-D with covariances that do not commute: for a 2x2 M with positive eigenvalues l1, l2,
    # Tr sqrt(M) = sqrt(l1) + sqrt(l2) = sqrt(Tr M + 2 sqrt(det M)), and det(S1 S2) = det S1 det S2
    mu1, s1 = np.array([1.0, -2.0]), np.array([[2.0, 0.6], [0.6, 1.0]])
    mu2, s2 = np.array([0.5, 1.0]), np.array([[1.0, -0.3], [-0.3, 0.5]])
    tr_sqrt = np.sqrt(np.trace(s1 @ s2) + 2 * np.sqrt(np.linalg.det(s1) * np.linalg.det(s2)))
    expected = 0.5**2 + 3.0**2 + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert fid_from_features(_features_with_statistics(mu1, s1, 40, 0), mu2, s2) == pytest.approx(expected, rel=1e-9)
    # 16-D, both covariances diagonal in the same rotated basis: sum over the axes of (sqrt a - sqrt b)^2
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.normal(size=(16, 16)))  # (16, 16) a random rotation
    a, b = rng.uniform(0.5, 4.0, 16), rng.uniform(0.5, 4.0, 16)  # (16,) variances along q's columns
    mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
    feats = _features_with_statistics(mu1, q @ np.diag(a) @ q.T, 100, 2)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert fid_from_features(feats, mu2, q @ np.diag(b) @ q.T) == pytest.approx(expected, rel=1e-9)


def test_no_weights_is_a_user_error_with_instructions(empty_hub):
    with pytest.raises(UserError) as err:
        InceptionFeatures(None, "cpu")
    message = str(err.value)
    assert fid.INCEPTION_URL in message
    assert "evaluate.inception_weights" in message and "evaluate.fid: false" in message
    with pytest.raises(UserError, match="does not exist"):
        resolve_inception_weights(empty_hub / "nowhere.pth")


def test_weights_come_from_path_then_cache_then_allowed_download(empty_hub, tmp_path, monkeypatch):
    explicit = tmp_path / "mine.pth"
    explicit.write_bytes(b"x")
    assert resolve_inception_weights(str(explicit)) == explicit
    cached = hub_cache_paths()[1]  # pytorch-fid's file name is accepted too
    assert cached.parent == empty_hub
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"x")
    assert resolve_inception_weights(None) == cached
    cached.unlink()

    def fake_download(url, dst, hash_prefix=None):
        assert url == fid.INCEPTION_URL and hash_prefix == "6726825d"
        Path(dst).write_bytes(b"downloaded")

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    with pytest.raises(UserError):  # a download needs explicit permission
        resolve_inception_weights(None)
    got = resolve_inception_weights(None, allow_download=True)
    assert got == hub_cache_paths()[0] and got.read_bytes() == b"downloaded"
    assert sorted(p.name for p in empty_hub.iterdir()) == [got.name]  # no temporary files left


def test_unusable_weights_files_are_user_errors(tmp_path, empty_hub):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a state dict")
    with pytest.raises(UserError, match="not a readable weights file"):
        InceptionFeatures(garbage, "cpu")
    wrong = tmp_path / "wrong.pth"
    torch.save({"fc.weight": torch.zeros(10, 2048)}, wrong)
    with pytest.raises(UserError, match="does not hold the FID Inception"):
        InceptionFeatures(wrong, "cpu")
    incomplete = tmp_path / "incomplete.pth"
    torch.save({"fc.weight": torch.zeros(1008, 2048)}, incomplete)
    with pytest.raises(UserError, match="does not match"):
        InceptionFeatures(incomplete, "cpu")


def test_inception_score_matches_torch_fidelity():
    logits = torch.randn(230, 1008, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3
    expected = isc_features_to_metric(logits, splits=10)
    mean, std = inception_score(logits.numpy(), splits=10)
    assert mean == pytest.approx(expected["inception_score_mean"], rel=1e-12)
    assert std == pytest.approx(expected["inception_score_std"], rel=1e-9)


def test_inception_score_analytic_values():
    # identical predictions: p(y|x) = p(y), KL = 0, IS = 1
    assert inception_score(np.tile(np.linspace(-1, 1, 1008), (40, 1)), splits=4) == pytest.approx((1.0, 0.0))
    # confident and uniformly spread over 50 classes: IS = exp(H(uniform_50)) = 50
    confident = np.zeros((50, 1008))
    confident[np.arange(50), np.arange(50)] = 100.0
    mean, std = inception_score(confident, splits=1)
    assert mean == pytest.approx(50.0, rel=1e-6) and std == 0.0
    # two chunks (in order): 10 identical predictions (IS 1), then 10 confident distinct ones (IS 10):
    # mean 5.5, population std 4.5 over the chunks
    two = np.concatenate([np.tile(np.linspace(-1, 1, 1008), (10, 1)), confident[:10]])
    mean, std = inception_score(two, splits=2, shuffle_seed=None)
    assert (mean, std) == pytest.approx((5.5, 4.5), rel=1e-6)
    with pytest.raises(UserError, match="at least splits"):
        inception_score(confident[:5], splits=10)


def test_stats_round_trip_and_errors(tmp_path):
    rng = np.random.default_rng(0)
    mu, sigma = rng.normal(size=7), rng.normal(size=(7, 7))
    path = tmp_path / "stats" / "train.npz"
    save_stats(path, mu, sigma)
    got_mu, got_sigma = load_stats(path)
    assert got_mu.dtype == np.float64 and np.array_equal(got_mu, mu) and np.array_equal(got_sigma, sigma)
    assert [p.name for p in path.parent.iterdir()] == ["train.npz"]  # np.savez added no suffix, no temp left
    with pytest.raises(UserError, match="not found"):
        load_stats(tmp_path / "missing.npz")
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"junk")
    with pytest.raises(UserError, match="cannot read"):
        load_stats(bad)
    with pytest.raises(ValueError):
        save_stats(tmp_path / "x.npz", mu, sigma[:3])
    with pytest.raises(UserError, match="cannot read"):  # an npz without the arrays
        np.savez(tmp_path / "other.npz", something=mu)
        load_stats(tmp_path / "other.npz")


def test_disabled_stats_marker(tmp_path):
    save_stats(tmp_path / "off.npz", None, None)
    assert load_stats(tmp_path / "off.npz") == (None, None)


@pytest.mark.slow
def test_pipeline_fid_and_sweep_load_the_inception_once(repo, random_weights, monkeypatch):
    """evaluate.fid: true end to end through the stages; the sweep reuses one Inception network."""
    import yaml
    from conftest import tiny_params

    import ddpm.pipeline.evaluate as evaluate_mod
    from ddpm.config import load_config
    from ddpm.data.datasets import prepare
    from ddpm.pipeline.classifier import classifier_stage
    from ddpm.pipeline.fid_stats import fid_stats_stage
    from ddpm.pipeline.run_files import load_samples
    from ddpm.pipeline.sample import sample_stage
    from ddpm.pipeline.train import train

    params = tiny_params(train={"steps": 2, "sample_every": 0},
                         evaluate={"fid": True, "inception_weights": str(random_weights), "download_inception": False,
                                   "classifier": {"epochs": 1, "width": 8, "batch_size": 32},
                                   "guidance_sweep": [0.0, 1.0], "sweep_samples": 20},
                         tracking={"mlflow": False, "tensorboard": False, "system_metrics": False})
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    cfg = load_config(repo / "params.yaml")
    prepare(cfg, repo / "data/prepared")
    paths = Layout.under(repo)
    classifier_stage(cfg, paths)
    fid_stats_stage(cfg, paths)
    train(cfg, Layout.under(repo))
    sample_stage(cfg, Layout.under(repo))
    built = []
    real = evaluate_mod.InceptionFeatures
    monkeypatch.setattr(evaluate_mod, "InceptionFeatures", lambda *a, **k: built.append(1) or real(*a, **k))
    metrics = evaluate_mod.evaluate_stage(cfg, paths)
    assert len(built) == 1
    # named by the sample count, and the numbers of the sample stage's 20 images against the fid_stats file,
    # recomputed here without sqrtm: S = Xc^T Xc / (n - 1) of n = 20 centred features Xc has rank <= 19, and
    # the nonzero eigenvalues of S S_ref are those of the 20 x 20 matrix Xc S_ref Xc^T / (n - 1), so
    # Tr (S S_ref)^1/2 is the sum of their square roots
    samples, _, _ = load_samples(paths.samples)
    feats, logits = inception_outputs(InceptionFeatures(random_weights, "cpu"), samples)
    ref_mu, ref_sigma = load_stats(paths.fid_stats)
    n, xc = len(feats), feats - feats.mean(axis=0)  # (20, 2048)
    roots = np.sqrt(np.linalg.eigvalsh(xc @ ref_sigma @ xc.T / (n - 1)).clip(min=0.0)).sum()
    expected = np.sum((feats.mean(axis=0) - ref_mu) ** 2) + np.sum(xc**2) / (n - 1) + np.trace(ref_sigma) - 2 * roots
    assert metrics["fid_20"] == pytest.approx(expected, rel=1e-4)
    assert metrics["inception_score_20"] == pytest.approx(inception_score(logits)[0], rel=1e-9)
    sweep = (repo / "plots/guidance_sweep.tsv").read_text().splitlines()
    assert sweep[0].split("\t")[-2:] == ["fid", "fid_samples"] and len(sweep) == 3
    assert all(math.isfinite(float(r.split("\t")[-2])) and r.split("\t")[-1] == "20" for r in sweep[1:])
