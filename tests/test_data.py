"""The prepare stage: shapes, ImageFolder and CIFAR-10 sources, the files it writes, and its errors."""

import io
import json
import pickle
import socket
import tarfile
import urllib.error
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from ddpm.config import Config
from ddpm.data.cifar10 import CIFAR10_URL
from ddpm.data.datasets import prepare
from ddpm.data.prepared import load_prepared
from ddpm.data.shapes import generate_shapes
from ddpm.data.splits import stratified_split
from ddpm.errors import UserError


def _cfg(**sections) -> Config:
    """A config with small-image-friendly model defaults (no 16x16 attention for 8x8 images)."""
    data = {"seed": sections.pop("seed", 0), **sections}
    data.setdefault("model", {})
    data["model"] = {"attention_resolutions": [], **data["model"]}
    return Config.from_dict(data)


def _shapes_cfg(seed=0, per_class=20, size=16, classes=10) -> Config:
    return _cfg(seed=seed, data={"dataset": "shapes", "shapes_per_class": per_class, "image_size": size},
                model={"num_classes": classes})


# ------------------------------------------------------------------------------------------ shapes


def test_shapes_prepare_writes_npz_and_meta_that_load_back(tmp_path):
    meta = prepare(_shapes_cfg(), tmp_path)
    saved = json.loads((tmp_path / "meta.json").read_text())
    assert saved == meta
    assert meta["num_train"] == 180 and meta["num_eval"] == 20 and meta["num_classes"] == 10
    assert meta["skipped_files"] == 0 and meta["image_size"] == 16 and meta["dataset"] == "shapes"
    data = load_prepared(tmp_path)
    assert data.train_images.dtype == torch.uint8 and data.train_images.shape == (180, 3, 16, 16)
    assert data.train_labels.dtype == torch.int64 and data.eval_labels.dtype == torch.int64
    assert torch.equal(torch.bincount(data.eval_labels), torch.full((10,), 2))  # stratified: 10 % per class
    assert data.class_names == meta["class_names"] and data.content_hash == meta["content_hash"]
    # train + eval is exactly the generated set, each image once
    images, labels, _ = generate_shapes(20, 16, seed=0)
    both = torch.cat([data.train_images, data.eval_images]).flatten(1)
    assert sorted(map(bytes, both.numpy())) == sorted(map(bytes, images.reshape(200, -1)))


def test_hash_and_file_bytes_are_stable_and_change_with_the_seed(tmp_path):
    a = prepare(_shapes_cfg(seed=1), tmp_path / "a")
    b = prepare(_shapes_cfg(seed=1), tmp_path / "b")
    c = prepare(_shapes_cfg(seed=2), tmp_path / "c")
    assert a["content_hash"] == b["content_hash"] != c["content_hash"]
    assert (tmp_path / "a/dataset.npz").read_bytes() == (tmp_path / "b/dataset.npz").read_bytes()  # DVC-stable


def test_class_count_mismatch_names_both_numbers_and_writes_nothing(tmp_path):
    with pytest.raises(UserError, match=r"10 classes but model.num_classes is 7.*num_classes: 10"):
        prepare(_shapes_cfg(classes=7), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unconditional_model_accepts_any_class_count(tmp_path):
    assert prepare(_shapes_cfg(classes=0), tmp_path)["num_classes"] == 10


def test_load_prepared_without_prepare_says_to_run_it(tmp_path):
    with pytest.raises(UserError, match="run the prepare stage"):
        load_prepared(tmp_path)


def test_stratified_split_sizes_and_seed():
    labels = np.repeat(np.arange(3), [10, 5, 1])
    train, held = stratified_split(labels, 0.2, seed=0)
    assert np.bincount(labels[held], minlength=3).tolist() == [2, 1, 0]  # a single image stays in train
    assert sorted(np.concatenate([train, held]).tolist()) == list(range(16))
    assert np.array_equal(held, stratified_split(labels, 0.2, seed=0)[1])
    assert not np.array_equal(held, stratified_split(labels, 0.2, seed=1)[1])


# ------------------------------------------------------------------------------------------ folder


def _save(path: Path, array: np.ndarray, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path)


def _image_folder(root: Path) -> None:
    """cats: 3 solid-colour PNGs of odd sizes/modes; dogs: striped images for the crop check; + bad files."""
    _save(root / "cats/a.png", np.full((16, 16, 3), (200, 10, 10), np.uint8))  # downscaled to 8x8
    _save(root / "cats/b.png", np.full((8, 8), 77, np.uint8))  # greyscale -> RGB
    _save(root / "cats/c.png", np.full((8, 8, 4), (1, 2, 3, 128), np.uint8))  # RGBA -> RGB
    stripes = np.zeros((8, 24, 3), np.uint8)  # 24 wide, 8 high: red | green | blue stripes
    stripes[:, :8, 0], stripes[:, 8:16, 1], stripes[:, 16:, 2] = 255, 255, 255
    for i in range(3):
        _save(root / f"dogs/sub/{i}.png", stripes)  # nested folders are part of the class
    (root / "dogs/broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "cats/notes.txt").write_text("not an image")


def _folder_cfg(root: Path, classes=2) -> Config:
    return _cfg(data={"dataset": "folder", "folder": str(root), "image_size": 8, "holdout_fraction": 0.34},
                model={"num_classes": classes})


def test_folder_converts_crops_and_skips_bad_files(tmp_path, caplog):
    _image_folder(tmp_path / "imgs")
    meta = prepare(_folder_cfg(tmp_path / "imgs"), tmp_path / "out")
    assert meta["class_names"] == ["cats", "dogs"]
    assert meta["skipped_files"] == 2
    assert meta["skipped_examples"] == ["cats/notes.txt", "dogs/broken.jpg"]
    assert "skipped 2 non-image or unreadable file(s)" in caplog.text
    data = load_prepared(tmp_path / "out")
    images = torch.cat([data.train_images, data.eval_images])  # (6, 3, 8, 8)
    labels = torch.cat([data.train_labels, data.eval_labels])
    assert images.shape == (6, 3, 8, 8) and sorted(labels.tolist()) == [0, 0, 0, 1, 1, 1]
    colours = {tuple(img[:, 0, 0].tolist()) for img in images[labels == 0]}
    assert colours == {(200, 10, 10), (77, 77, 77), (1, 2, 3)}
    assert all((img == img[:, :1, :1]).all() for img in images[labels == 0])  # solid colours stay solid
    green = torch.tensor([0, 255, 0], dtype=torch.uint8)[:, None, None].expand(3, 8, 8)
    assert all(torch.equal(img, green) for img in images[labels == 1])  # centre crop = middle stripe
    assert torch.bincount(data.eval_labels).tolist() == [1, 1]


def test_missing_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match=str(tmp_path / "nope")):
        prepare(_folder_cfg(tmp_path / "nope"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_folder_without_class_subfolders_is_a_user_error(tmp_path):
    (tmp_path / "flat").mkdir()
    _save(tmp_path / "flat/x.png", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(UserError, match="no class subfolders"):
        prepare(_folder_cfg(tmp_path / "flat"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_class_folder_without_images_is_a_user_error(tmp_path):
    _image_folder(tmp_path / "imgs")
    (tmp_path / "imgs/empty").mkdir()
    (tmp_path / "imgs/empty/readme.txt").write_text("nothing here")
    with pytest.raises(UserError, match=r"imgs/empty hold no readable images"):
        prepare(_folder_cfg(tmp_path / "imgs", classes=3), tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------- archives


def _archive(folder: Path, out: Path, wrap: str | None) -> Path:
    """`folder`'s class folders as a .tar.gz / .tgz / .tar / .zip, optionally inside one top-level folder `wrap`."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    names = {p: "/".join(filter(None, (wrap, str(p.relative_to(folder))))) for p in files}
    if out.suffix == ".zip":
        with zipfile.ZipFile(out, "w") as zf:
            for p in reversed(files):  # archive order must not matter
                zf.write(p, names[p])
    else:
        mode = "w" if out.suffix == ".tar" else "w:gz"
        with tarfile.open(out, mode) as tar:
            for p in reversed(files):
                tar.add(p, names[p])
    return out


@pytest.mark.parametrize("name,wrap", [("imgs.tar.gz", "train"), ("imgs.zip", None), ("imgs.tgz", None),
                                       ("imgs.tar", "train")])
def test_archive_prepares_exactly_like_its_folder(tmp_path, name, wrap, caplog):
    _image_folder(tmp_path / "imgs")
    from_folder = prepare(_folder_cfg(tmp_path / "imgs"), tmp_path / "a")
    archive = _archive(tmp_path / "imgs", tmp_path / name, wrap)
    caplog.clear()  # the warning is logged (the CLI's handler prints it): caplog sees it whatever ran before
    from_archive = prepare(_folder_cfg(archive), tmp_path / "b")
    assert from_archive["content_hash"] == from_folder["content_hash"]
    assert from_archive["skipped_examples"] == ["cats/notes.txt", "dogs/broken.jpg"]  # same skip-and-count rule
    assert "skipped 2" in caplog.text
    a, b = load_prepared(tmp_path / "a"), load_prepared(tmp_path / "b")
    assert torch.equal(a.train_images, b.train_images) and torch.equal(a.eval_labels, b.eval_labels)
    assert (tmp_path / "a/dataset.npz").read_bytes() == (tmp_path / "b/dataset.npz").read_bytes()
    assert not any(p.suffix == ".png" for p in (tmp_path / "b").rglob("*"))  # nothing extracted


def test_archive_errors_name_the_archive(tmp_path):
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(b"not a tar")
    with pytest.raises(UserError, match="bad.tar.gz is not a readable archive"):
        prepare(_folder_cfg(bad), tmp_path / "out")
    flat = tmp_path / "flat.zip"
    with zipfile.ZipFile(flat, "w") as zf:
        zf.writestr("x.png", b"")
    with pytest.raises(UserError, match="has no class folders"):
        prepare(_folder_cfg(flat), tmp_path / "out")
    other = tmp_path / "images.rar"
    other.write_bytes(b"")
    with pytest.raises(UserError, match="not a supported archive"):
        prepare(_folder_cfg(other), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("member", ["/etc/cats/evil.png", "../cats/evil.png", "cats/../../evil.png",
                                    "train/cats/../../../evil.png", "cats\\..\\..\\evil.png"])
@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_archive_members_with_absolute_or_parent_paths_are_refused(tmp_path, member, kind):
    """A member that would land outside the folder (as `tar -x` or `unzip` would put it) is no class image:
    prepare refuses the archive naming the member, and an earlier prepared output stays as it was."""
    _image_folder(tmp_path / "imgs")
    out = tmp_path / "out"
    prepare(_folder_cfg(tmp_path / "imgs"), out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    archive = _archive(tmp_path / "imgs", tmp_path / f"imgs.{kind}", wrap=None)
    png = (tmp_path / "imgs/cats/a.png").read_bytes()
    if kind == "zip":
        with zipfile.ZipFile(archive, "a") as zf:
            zf.writestr(zipfile.ZipInfo(member), png)
    else:  # rewrite the tar.gz with the extra member (a compressed tar cannot be appended to)
        with tarfile.open(archive) as tar:
            members = [(m, tar.extractfile(m).read()) for m in tar if m.isfile()]
        with tarfile.open(archive, "w:gz") as tar:
            for info, data in [*members, (tarfile.TarInfo(member), png)]:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    with pytest.raises(UserError, match="unsafe path") as err:
        prepare(_folder_cfg(archive), out)
    assert repr(member) in str(err.value) and archive.name in str(err.value)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing overwritten
    assert not list(tmp_path.rglob("evil.png")) and not (tmp_path.parent / "evil.png").exists()  # not extracted


def test_archive_members_under_dot_folders_are_ordinary_relative_paths(tmp_path):
    """`tar -czf x.tgz .` names its members ./cats/a.png: that is relative, and reads like the folder."""
    _image_folder(tmp_path / "imgs")
    from_folder = prepare(_folder_cfg(tmp_path / "imgs"), tmp_path / "a")
    archive = tmp_path / "dotted.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "imgs", arcname=".")
    assert prepare(_folder_cfg(archive), tmp_path / "b")["content_hash"] == from_folder["content_hash"]


CIFAR_JPEG = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg-train.tar.gz"


@pytest.mark.slow
@pytest.mark.skipif(not CIFAR_JPEG.is_file(), reason=f"{CIFAR_JPEG} (the CIFAR-10 JPEG archive) is not here")
def test_cifar10_jpeg_archive_prepares_at_16x16(tmp_path):
    cfg = _cfg(data={"dataset": "folder", "folder": str(CIFAR_JPEG), "image_size": 16, "holdout_fraction": 0.1},
               model={"num_classes": 10})
    meta = prepare(cfg, tmp_path)
    assert meta["class_names"] == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                                   "ship", "truck"]
    assert meta["skipped_files"] == 0 and meta["num_train"] + meta["num_eval"] == 50_000
    data = load_prepared(tmp_path)
    assert torch.equal(torch.bincount(data.eval_labels), torch.full((10,), 500))
    pixels = data.train_images.float() / 255  # CIFAR-10's known channel means, about (0.49, 0.48, 0.45)
    torch.testing.assert_close(pixels.mean(dim=(0, 2, 3)), torch.tensor([0.491, 0.482, 0.447]), atol=0.02, rtol=0)


# ----------------------------------------------------------------------------------------- cifar10


def _cifar_batch(path: Path, images: np.ndarray, labels: list[int]) -> None:
    """A batch in CIFAR-10's pickle layout: rows of 3072 bytes, R plane then G then B.

    Protocol 2 and numpy's old module path, as in the real (Python 2) files.
    """
    entry = {"batch_label": path.name, "labels": labels, "data": images.reshape(len(labels), -1),
             "filenames": [f"{i}.png" for i in range(len(labels))]}
    raw = pickle.dumps(entry, protocol=2).replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
    assert b"cnumpy.core.multiarray\n" in raw
    path.write_bytes(raw)


def _cifar_archive(raw: Path) -> tuple[np.ndarray, np.ndarray]:
    """raw/cifar-10-python.tar.gz with 4 images per training batch and 3 test images."""
    rng = np.random.default_rng(0)
    src = raw / "build" / "cifar-10-batches-py"
    src.mkdir(parents=True)
    train = rng.integers(0, 256, size=(5, 4, 3, 32, 32), dtype=np.uint8)
    for b in range(5):
        _cifar_batch(src / f"data_batch_{b + 1}", train[b], [(b + i) % 10 for i in range(4)])
    test = rng.integers(0, 256, size=(3, 3, 32, 32), dtype=np.uint8)
    _cifar_batch(src / "test_batch", test, [9, 8, 7])
    with open(src / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)], "num_vis": 3072}, f, protocol=2)
    with tarfile.open(raw / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(src, arcname="cifar-10-batches-py")
    return train.reshape(20, 3, 32, 32), test


@pytest.fixture
def no_network(monkeypatch):
    """Any download attempt fails the test."""

    def refuse(*args, **kwargs):
        pytest.fail("prepare tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "download", refuse)


def _cifar_cfg(raw: Path, size=32) -> Config:
    return _cfg(data={"dataset": "cifar10", "raw_dir": str(raw), "image_size": size})


def test_cifar10_from_a_local_archive_without_network(tmp_path, no_network):
    train, test = _cifar_archive(tmp_path / "raw")
    meta = prepare(_cifar_cfg(tmp_path / "raw"), tmp_path / "out")
    assert meta["num_train"] == 20 and meta["num_eval"] == 3
    data = load_prepared(tmp_path / "out")
    assert torch.equal(data.train_images, torch.from_numpy(train))  # channel-major rows -> (3, 32, 32)
    assert torch.equal(data.eval_images, torch.from_numpy(test))
    assert data.train_labels[:8].tolist() == [0, 1, 2, 3, 1, 2, 3, 4]
    assert data.eval_labels.tolist() == [9, 8, 7]
    assert data.class_names == [f"class{i}" for i in range(10)]
    # The extracted folder alone (archive gone) works too and gives the same data.
    (tmp_path / "raw/cifar-10-python.tar.gz").unlink()
    assert prepare(_cifar_cfg(tmp_path / "raw"), tmp_path / "out2")["content_hash"] == meta["content_hash"]


def test_cifar10_resizes_when_image_size_is_not_32(tmp_path, no_network):
    _cifar_archive(tmp_path / "raw")
    prepare(_cifar_cfg(tmp_path / "raw", size=16), tmp_path / "out")
    data = load_prepared(tmp_path / "out")
    assert data.train_images.shape == (20, 3, 16, 16) and data.eval_images.shape == (3, 3, 16, 16)


def test_cifar10_offline_without_archive_says_where_to_put_it(tmp_path, monkeypatch):
    def offline(self):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.datasets.CIFAR10, "download", offline)
    raw = tmp_path / "raw"
    with pytest.raises(UserError) as err:
        prepare(_cifar_cfg(raw), tmp_path / "out")
    assert str(raw.resolve() / "cifar-10-python.tar.gz") in str(err.value)
    assert CIFAR10_URL in str(err.value)
    assert not (tmp_path / "out").exists()


def test_cifar10_refuses_pickles_that_would_run_code(tmp_path, no_network):
    _cifar_archive(tmp_path / "raw")
    with tarfile.open(tmp_path / "raw/cifar-10-python.tar.gz") as tar:
        tar.extractall(tmp_path / "raw", filter="data")
    with open(tmp_path / "raw/cifar-10-batches-py/test_batch", "wb") as f:
        pickle.dump({"data": print}, f)  # a global that is not a numpy array type
    with pytest.raises(UserError, match="test_batch is damaged"):
        prepare(_cifar_cfg(tmp_path / "raw"), tmp_path / "out")
