"""The evaluation classifier: learns a tiny synthetic problem, is deterministic, and round-trips on disk."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ddpm.config import ClassifierConfig
from ddpm.errors import UserError
from ddpm.evaluation.classifier import (
    Classifier,
    _augment,
    extract_features,
    load_classifier,
    predict,
    predict_logits,
    save_classifier,
    train_classifier,
)


def _toy_images(n_per_class: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """4 classes of uint8 (N, 3, size, size) images: filled square, hollow square, horizontal bar, vertical bar.

    Random position, size, colours (foreground and background on opposite sides of mid-grey) and noise.
    """
    rng = np.random.default_rng(seed)
    n = 4 * n_per_class
    labels = np.tile(np.arange(4), n_per_class)  # (N,)
    yy, xx = np.mgrid[:size, :size]  # (S, S)
    half = rng.integers(size // 4, size // 3 + 1, size=n)  # (N,)
    cy = rng.integers(half, size - half)  # (N,)
    cx = rng.integers(half, size - half)  # (N,)
    dy = np.abs(yy[None] - cy[:, None, None])  # (N, S, S)
    dx = np.abs(xx[None] - cx[:, None, None])  # (N, S, S)
    h = half[:, None, None]
    square = (dy < h) & (dx < h)
    masks = np.stack(
        [square, square & ((dy >= h - 1) | (dx >= h - 1)), (dy < 2) & (dx < h), (dx < 2) & (dy < h)], axis=1
    )[np.arange(n), labels]  # (N, S, S)
    bg = rng.uniform(0.0, 0.4, size=(n, 3, 1, 1))
    fg = rng.uniform(0.6, 1.0, size=(n, 3, 1, 1))
    img = np.where(masks[:, None], fg, bg) + rng.normal(0.0, 0.05, size=(n, 3, size, size))  # (N, 3, S, S)
    return (np.clip(img, 0.0, 1.0) * 255).round().astype(np.uint8), labels


FAST = ClassifierConfig(width=8, epochs=4, batch_size=64, lr=0.1)


def test_learns_toy_problem_quickly():
    x_train, y_train = _toy_images(150, 16, seed=0)
    x_eval, y_eval = _toy_images(50, 16, seed=1)
    # 36 SGD steps of a width-8 network: ~1-2 s on an idle core (no wall-clock assert: the CI
    # machine is shared, so timings are noisy).
    model, accuracy, per_class = train_classifier(x_train, y_train, x_eval, y_eval, FAST, "cpu", seed=0)
    assert accuracy > 0.95, per_class
    assert len(per_class) == 4 and min(per_class) > 0.85
    pred = predict(model, x_eval, batch_size=37, device="cpu")
    assert (pred.numpy() == y_eval).mean() == pytest.approx(accuracy)


def test_deterministic_for_a_seed_and_leaves_global_rng_alone():
    x, y = _toy_images(16, 16, seed=2)
    cfg = ClassifierConfig(width=8, epochs=1, batch_size=16)
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a, acc_a, _ = train_classifier(x, y, x, y, cfg, "cpu", seed=5)
    assert torch.equal(torch.random.get_rng_state(), before)
    b, acc_b, _ = train_classifier(x, y, x, y, cfg, "cpu", seed=5)
    c, _, _ = train_classifier(x, y, x, y, cfg, "cpu", seed=6)
    assert acc_a == acc_b
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.head.weight, c.head.weight)


def test_save_load_round_trip_gives_identical_logits(tmp_path):
    x, _ = _toy_images(4, 16, seed=3)
    model = Classifier(num_classes=4, width=8, image_size=16)
    with torch.no_grad():  # non-trivial BN statistics must survive the round trip too
        model.body[0][1].running_mean.uniform_(-1, 1)
    path = tmp_path / "sub" / "classifier.pt"
    save_classifier(path, model, {"eval_accuracy": 0.5, "per_class": [1.0, float("nan")], "seed": 0})
    loaded = load_classifier(path, "cpu")
    assert loaded.arch == {"num_classes": 4, "width": 8, "image_size": 16}
    assert loaded.meta["eval_accuracy"] == 0.5 and loaded.meta["seed"] == 0
    assert torch.equal(predict_logits(model, x), predict_logits(loaded, x))
    assert torch.equal(extract_features(model, x), extract_features(loaded, x))
    assert list(tmp_path.joinpath("sub").iterdir()) == [path]  # no temporary files left behind


def test_load_errors_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_classifier(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="retrain"):
        load_classifier(bad)
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(UserError, match="not a classifier checkpoint"):
        load_classifier(other)
    with pytest.raises(ValueError, match="JSON-like"):
        save_classifier(tmp_path / "x.pt", Classifier(2, 8, 8), {"array": np.zeros(2)})


def test_features_and_logits_shapes_batching_and_size_check():
    x, _ = _toy_images(5, 16, seed=4)  # 20 images
    model = Classifier(num_classes=4, width=8, image_size=16).eval()
    feats = extract_features(model, x, batch_size=3)
    assert feats.shape == (20, 64) and feats.dtype == torch.float32
    torch.testing.assert_close(feats, extract_features(model, x, batch_size=20))
    logits = predict_logits(model, torch.from_numpy(x), batch_size=7)
    labels = predict(model, torch.from_numpy(x), batch_size=7)
    assert logits.shape == (20, 4) and labels.dtype == torch.int64
    torch.testing.assert_close(logits, model.head(feats) * model.logit_scale)
    assert torch.equal(labels, logits.argmax(dim=1))
    with pytest.raises(ValueError, match="move it"):
        predict(model, x, device="meta")
    with pytest.raises(UserError, match="16x16"):
        predict(model, np.zeros((2, 3, 32, 32), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        predict(model, np.zeros((2, 3, 16, 16), np.float32))


def test_augment_crops_are_shifted_windows_and_flips_mirror():
    """Each image of a large batch gets its own random window and its own coin flip, at the documented rates."""
    n = 900
    x = torch.rand(n, 2, 6, 6, generator=torch.Generator().manual_seed(0))  # (B, C, H, W) distinct images
    limit = 5 * (n * 0.5 * 0.5) ** 0.5  # 5 sigma of a Binomial(n, 1/2)
    out = _augment(x, pad=0, hflip=True, gen=torch.Generator().manual_seed(1))
    same = torch.tensor([torch.equal(o, i) for o, i in zip(out, x, strict=True)])  # (B,)
    mirrored = torch.tensor([torch.equal(o, i.flip(-1)) for o, i in zip(out, x, strict=True)])  # (B,)
    assert bool((same | mirrored).all())  # without padding: the image itself or its mirror image, nothing else
    assert abs(int(mirrored.sum()) - n / 2) < limit  # a fair coin per image (not one for the whole batch)
    out = _augment(x, pad=1, hflip=False, gen=torch.Generator().manual_seed(2))
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")  # (B, C, 8, 8)
    offsets = [(r, c) for r in range(3) for c in range(3)]
    chosen = []
    for i in range(n):  # each crop is one of the 9 windows of ITS OWN reflect-padded image
        hits = [k for k, (r, c) in enumerate(offsets) if torch.equal(out[i], padded[i, :, r : r + 6, c : c + 6])]
        assert len(hits) == 1, i
        chosen.append(hits[0])
    counts = torch.bincount(torch.tensor(chosen), minlength=9).double()  # (9,)
    p = 1 / 9
    assert ((counts - n * p).abs() < 5 * (n * p * (1 - p)) ** 0.5).all(), counts  # every offset, uniformly


def test_saved_file_bytes_do_not_depend_on_the_path(tmp_path):
    # DVC hashes models/classifier.pt: the same weights must give the same bytes wherever they are written
    model = Classifier(num_classes=3, width=8, image_size=16)
    save_classifier(tmp_path / "a.pt", model, {"accuracy": 0.5})
    save_classifier(tmp_path / "other.pt", model, {"accuracy": 0.5})
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "other.pt").read_bytes()
