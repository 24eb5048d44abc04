"""data/: the bundled dataset, .npz files, image folders, torchvision sources and ImageData."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from antidoor.data import ImageData, dataset_names, load_dataset, load_npz
from antidoor.data.sources import BUNDLE, BUNDLED, TORCHVISION
from antidoor.errors import AntidoorError
from conftest import shared_file

# --- the bundled dataset ----------------------------------------------------------------------


def test_bundled_dataset_shape_and_balance(bundled: ImageData) -> None:
    assert bundled.name == "cifar10-mini"
    assert bundled.x_train.shape == (5000, 3, 32, 32) and bundled.x_test.shape == (1000, 3, 32, 32)
    assert bundled.x_train.dtype == torch.uint8 and bundled.y_train.dtype == torch.int64
    assert bundled.classes[:3] == ["airplane", "automobile", "bird"] and bundled.num_classes == 10
    assert torch.bincount(bundled.y_train).tolist() == [500] * 10
    assert torch.bincount(bundled.y_test).tolist() == [100] * 10
    assert bundled.hflip and bundled.image_shape == (3, 32, 32)
    assert "CIFAR-10" in bundled.source["provenance"]
    # real photographs: per-channel statistics like CIFAR-10's (mean ~0.47, std ~0.25)
    assert all(0.4 < m < 0.55 for m in bundled.mean) and all(0.2 < s < 0.3 for s in bundled.std)
    x = bundled.x_train.float() / 255
    assert torch.allclose(torch.tensor(bundled.mean), x.mean(dim=(0, 2, 3)), atol=1e-5)


def _hashes(x: np.ndarray) -> set[bytes]:
    return {hashlib.sha1(img.tobytes()).digest() for img in x}


def test_bundled_images_come_from_the_shared_cifar10_splits(bundled: ImageData) -> None:
    """Provenance: training images from CIFAR-10's training split, test images from its test split."""
    with np.load(shared_file("cifar10-train20k.npz")) as f:
        train = _hashes(f["x_train"])
    with np.load(shared_file("cifar10-test.npz")) as f:
        test = _hashes(f["x_test"])
    ours_train = _hashes(bundled.x_train.permute(0, 2, 3, 1).contiguous().numpy())
    ours_test = _hashes(bundled.x_test.permute(0, 2, 3, 1).contiguous().numpy())
    assert ours_train <= train and ours_test <= test
    assert not ours_train & test


def test_bundled_file_is_listed() -> None:
    assert BUNDLE.is_file() and BUNDLE.stat().st_size <= 20_000_000  # the package's data budget
    assert {"cifar10-mini", "cifar10-10k"} <= set(dataset_names()) and "<file.npz>" in dataset_names()
    assert BUNDLED == {"cifar10-mini": 5000, "cifar10-10k": 10000}


def test_the_bundle_is_lossless_and_mini_is_its_first_half(bundled: ImageData, tmp_path: Path) -> None:
    """Every bundled image decodes to the shared source's pixels at its recorded index; cifar10-10k extends mini."""
    big = load_dataset("cifar10-10k", root=tmp_path)
    assert big.x_train.shape == (10000, 3, 32, 32) and torch.bincount(big.y_train).tolist() == [1000] * 10
    assert torch.equal(big.x_train[:5000], bundled.x_train) and torch.equal(big.x_test, bundled.x_test)
    assert torch.bincount(big.y_train[5000:]).tolist() == [500] * 10  # each half class-balanced on its own
    with np.load(BUNDLE) as f:
        train_index, test_index = f["train_index"], f["test_index"]
    with np.load(shared_file("cifar10-train20k.npz")) as f:
        assert np.array_equal(f["x_train"][train_index], big.x_train.permute(0, 2, 3, 1).numpy())
        assert np.array_equal(f["y_train"][train_index], big.y_train.numpy())
    with np.load(shared_file("cifar10-test.npz")) as f:
        assert np.array_equal(f["x_test"][test_index], big.x_test.permute(0, 2, 3, 1).numpy())
    assert len(set(train_index.tolist())) == 10000


def test_the_decoded_bundle_is_cached_and_a_broken_cache_is_rebuilt(tmp_path: Path, monkeypatch) -> None:
    from antidoor.data import sources

    monkeypatch.setattr(sources, "_DECODED", {})
    first = load_dataset("cifar10-mini", root=tmp_path)
    (cache,) = (tmp_path / "bundled").glob("cifar10-*.npz")
    monkeypatch.setattr(sources, "_DECODED", {})
    monkeypatch.setattr(sources, "decode_webp_array", lambda *a: pytest.fail("decoded although cached"))
    assert torch.equal(load_dataset("cifar10-mini", root=tmp_path).x_train, first.x_train)  # read from the cache
    monkeypatch.undo()
    monkeypatch.setattr(sources, "_DECODED", {})
    cache.write_bytes(b"not an npz")
    assert torch.equal(load_dataset("cifar10-mini", root=tmp_path).x_train, first.x_train)  # decoded again
    with np.load(cache) as f:  # and the cache rewritten whole
        assert f["x_train"].shape == (10000, 32, 32, 3)


# --- .npz files -------------------------------------------------------------------------------


def _save(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def test_npz_nhwc_with_classes(fixture500: tuple, tmp_path: Path) -> None:
    x, y, classes = fixture500
    nhwc = x.permute(0, 2, 3, 1).numpy()
    path = _save(tmp_path / "fix.npz", x_train=nhwc[:400], y_train=y[:400].numpy().astype(np.uint8),
                 x_test=nhwc[400:], y_test=y[400:].numpy(), classes=np.array(classes))
    data = load_npz(path)
    assert data.name == "fix" and data.classes == classes and data.hflip
    assert torch.equal(data.x_train, x[:400]) and torch.equal(data.y_test, y[400:])
    assert data.source == {"kind": "npz", "path": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    assert load_dataset(str(path), hflip=False).hflip is False


def test_npz_nchw_and_classes_from_labels(fixture500: tuple, tmp_path: Path) -> None:
    x, y, _ = fixture500
    path = _save(tmp_path / "nchw.npz", x_train=x[:300].numpy(), y_train=y[:300].numpy(),
                 x_test=x[300:].numpy(), y_test=y[300:].numpy())
    data = load_dataset(str(path))
    assert torch.equal(data.x_train, x[:300]) and data.classes == [str(i) for i in range(10)]


def test_npz_grayscale_nhw(mnist_npz_arrays: dict[str, np.ndarray], tmp_path: Path) -> None:
    path = _save(tmp_path / "digits.npz", **mnist_npz_arrays)
    data = load_dataset(str(path))
    assert data.image_shape == (1, 28, 28) and data.num_classes == 5 and data.classes == ["5", "6", "7", "8", "9"]
    assert torch.equal(data.x_train[:, 0], torch.from_numpy(mnist_npz_arrays["x_train"]))
    assert len(data.mean) == 1 and 0.05 < data.mean[0] < 0.25  # dark digits on black


def test_npz_errors(fixture500: tuple, tmp_path: Path) -> None:
    x, y, _ = fixture500
    xn, yn = x[::25].numpy(), y[::25].numpy()  # 20 images, two per class
    with pytest.raises(AntidoorError, match="does not exist"):
        load_npz(tmp_path / "missing.npz")
    with pytest.raises(AntidoorError, match=r"missing keys \['y_test'\]") as exc:
        load_npz(_save(tmp_path / "keys.npz", x_train=xn, y_train=yn, x_test=xn))
    assert "unpickling" not in str(exc.value), "a missing key is not a pickle problem"
    with pytest.raises(AntidoorError, match="images must be uint8"):
        load_npz(_save(tmp_path / "float.npz", x_train=xn / 255, y_train=yn, x_test=xn, y_test=yn))
    with pytest.raises(AntidoorError, match="labels must be integers"):
        load_npz(_save(tmp_path / "flab.npz", x_train=xn, y_train=yn.astype(float), x_test=xn, y_test=yn))
    with pytest.raises(AntidoorError, match="2 class names but labels up to"):
        load_npz(_save(tmp_path / "cls.npz", x_train=xn, y_train=yn, x_test=xn, y_test=yn, classes=np.array(["a", "b"])))
    with pytest.raises(AntidoorError, match="C in 1 or 3"):
        load_npz(_save(tmp_path / "chan.npz", x_train=xn[:, :2], y_train=yn, x_test=xn[:, :2], y_test=yn))
    with pytest.raises(AntidoorError, match="labels of shape"):
        load_npz(_save(tmp_path / "len.npz", x_train=xn, y_train=yn[:5], x_test=xn, y_test=yn))
    with pytest.raises(AntidoorError, match="differ in shape"):
        load_npz(_save(tmp_path / "shape.npz", x_train=xn, y_train=yn, x_test=xn[:, :, :16], y_test=yn))
    good = _save(tmp_path / "good.npz", x_train=xn, y_train=yn, x_test=xn, y_test=yn)
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(AntidoorError, match=r"truncated\.npz: not a readable \.npz"):
        load_npz(truncated)
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"this is not a zip file")
    with pytest.raises(AntidoorError, match=r"junk\.npz"):  # numpy takes it for a pickle, which is refused
        load_npz(junk)


def test_npz_with_pickled_objects_is_refused_without_unpickling(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    objects = np.array([_Marker(marker)], dtype=object)
    path = tmp_path / "obj.npz"
    np.savez(path, x_train=objects, y_train=np.zeros(1, np.int64), x_test=objects, y_test=np.zeros(1, np.int64))
    with pytest.raises(AntidoorError, match="without unpickling"):
        load_npz(path)
    assert not marker.exists()


class _Marker:
    """Unpickling this object creates a file: proof that a loader unpickled it."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.path,))


def test_unknown_dataset_name_lists_what_is_allowed() -> None:
    with pytest.raises(AntidoorError, match=r"neither a known dataset.*allowed: cifar10-mini, cifar10"):
        load_dataset("imagenet-21k")


@pytest.mark.parametrize("name", sorted(TORCHVISION))
def test_torchvision_source_offline_without_download(name: str, tmp_path: Path) -> None:
    with pytest.raises(AntidoorError, match=f"dataset '{name}' not found under .*data.download=true"):
        load_dataset(name, root=tmp_path, download=False)
    assert not any(tmp_path.rglob("*.gz")) and not any(tmp_path.rglob("*.tar*"))


# --- image folders ----------------------------------------------------------------------------


def _write_folder(root: Path, x: torch.Tensor, y: torch.Tensor, names: list[str], split: str) -> None:
    for i, (img, label) in enumerate(zip(x, y, strict=True)):
        d = root / split / names[int(label)]
        d.mkdir(parents=True, exist_ok=True)
        arr = img.permute(1, 2, 0).numpy()
        Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(d / f"{i:04d}.png")


def _pick(x: torch.Tensor, y: torch.Tensor, classes: list[int], per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
    idx = torch.cat([torch.nonzero(y == c).flatten()[:per_class] for c in classes])
    return x[idx], y[idx]


def test_image_folder_rgb(bundled: ImageData, tmp_path: Path) -> None:
    names = {3: "cat", 5: "dog", 0: "airplane"}
    xtr, ytr = _pick(bundled.x_train, bundled.y_train, [3, 5, 0], 4)
    xte, yte = _pick(bundled.x_test, bundled.y_test, [3, 5, 0], 2)
    labels = [names[int(c)] for c in range(10) if c in names]
    root = tmp_path / "pets"
    _write_folder(root, xtr, ytr, [names.get(c, "") for c in range(10)], "train")
    _write_folder(root, xte, yte, [names.get(c, "") for c in range(10)], "test")
    (root / "train" / "cat" / "notes.txt").write_text("not an image")  # ignored
    data = load_dataset(str(root))
    assert data.name == "pets" and data.classes == sorted(labels) == ["airplane", "cat", "dog"]
    assert data.x_train.shape == (12, 3, 32, 32) and data.x_test.shape == (6, 3, 32, 32)
    assert data.source["kind"] == "folder"
    # pixel-exact (PNG is lossless) and labelled by folder
    for cls_index, cls in enumerate(data.classes):
        original = {v: k for k, v in names.items()}[cls]
        expected = xtr[ytr == original]
        assert torch.equal(data.x_train[data.y_train == cls_index], expected)
    resized = load_dataset(str(root), image_size=16)
    assert resized.image_shape == (3, 16, 16)


def test_image_folder_grayscale(mnist_npz_arrays: dict[str, np.ndarray], tmp_path: Path) -> None:
    x = torch.from_numpy(mnist_npz_arrays["x_train"])[:, None]
    y = torch.from_numpy(mnist_npz_arrays["y_train"].astype(np.int64))
    xtr, ytr = _pick(x, y, [0, 1], 3)
    _write_folder(tmp_path / "digits", xtr, ytr, ["five", "six", "", "", ""], "train")
    _write_folder(tmp_path / "digits", xtr, ytr, ["five", "six", "", "", ""], "test")
    data = load_dataset(str(tmp_path / "digits"))
    assert data.image_shape == (1, 28, 28) and data.classes == ["five", "six"]
    assert torch.equal(data.x_train, xtr)


def test_image_folder_errors(bundled: ImageData, tmp_path: Path) -> None:
    root = tmp_path / "f"
    (root / "train").mkdir(parents=True)
    with pytest.raises(AntidoorError, match="missing test/"):
        load_dataset(str(root))
    (root / "test").mkdir()
    with pytest.raises(AntidoorError, match="has no class folders"):
        load_dataset(str(root))
    (root / "train" / "a").mkdir()
    (root / "test" / "a").mkdir()
    with pytest.raises(AntidoorError, match="holds no images"):
        load_dataset(str(root))
    Image.fromarray(bundled.x_train[0].permute(1, 2, 0).numpy()).save(root / "train" / "a" / "0.png")
    Image.fromarray(bundled.x_train[1].permute(1, 2, 0).numpy()[:20]).save(root / "train" / "a" / "1.png")
    Image.fromarray(bundled.x_test[0].permute(1, 2, 0).numpy()).save(root / "test" / "a" / "0.png")
    with pytest.raises(AntidoorError, match=r"images differ in size.*data\.image_size"):
        load_dataset(str(root))
    (root / "train" / "a" / "1.png").write_bytes(b"broken")
    with pytest.raises(AntidoorError, match="cannot read image"):
        load_dataset(str(root))


# --- ImageData --------------------------------------------------------------------------------


def test_image_data_validation(bundled: ImageData) -> None:
    x, y = bundled.x_test[::100], bundled.y_test[::100]  # one image per class
    classes = bundled.classes
    with pytest.raises(AntidoorError, match="must be uint8"):
        ImageData("d", x.float(), y, x, y, classes)
    with pytest.raises(AntidoorError, match="must be uint8"):
        ImageData("d", x[0], y, x, y, classes)
    with pytest.raises(AntidoorError, match="labels of shape"):
        ImageData("d", x, y[:3], x, y, classes)
    with pytest.raises(AntidoorError, match="is empty"):
        ImageData("d", x[:0], y[:0], x, y, classes)
    with pytest.raises(AntidoorError, match=r"labels must lie in \[0, 1\]"):
        ImageData("d", x, y, x, y, classes[:2])
    with pytest.raises(AntidoorError, match="differ in shape"):
        ImageData("d", x, y, x[:, :, :16], y, classes)
    with pytest.raises(AntidoorError, match="1 or 3 channels"):
        ImageData("d", x[:, :2], y, x[:, :2], y, classes)


def test_image_data_to_and_describe(bundled: ImageData) -> None:
    moved = bundled.to(torch.device("cpu"))
    assert moved.mean == bundled.mean and moved.classes == bundled.classes and torch.equal(moved.x_test, bundled.x_test)
    d = bundled.describe()
    assert d["n_train"] == 5000 and d["n_test"] == 1000 and d["image_shape"] == [3, 32, 32] and d["hflip"] is True
