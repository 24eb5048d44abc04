"""Dataset sources: the bundled CIFAR-10 subsets, any ``.npz``, torchvision datasets, image folders.

Every source returns an :class:`ImageData` with uint8 (N, C, H, W) images. Which source is used
follows from the name: ``cifar10-mini`` or ``cifar10-10k`` (bundled, offline), a path to a ``.npz`` file, a path to a
folder laid out as ``train/<class>/*`` and ``test/<class>/*``, or a torchvision name
(``cifar10``, ``cifar100``, ``gtsrb``, ``mnist``, ``svhn``) that may be downloaded.
"""

from __future__ import annotations

import functools
import io
import math
import os
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from antidoor.data.dataset import ImageData
from antidoor.errors import AntidoorError, clip
from antidoor.utils import file_sha256
from antidoor.validate import MAX_CLASSES, MAX_IMAGE_SIDE, MIN_IMAGE_SIDE, max_array_bytes, user_file

BUNDLE = Path(__file__).parent / "bundled" / "cifar10_bundle.npz"
# name -> how many of the bundle's training images it keeps (class-balanced prefixes: see bundled/README.md)
BUNDLED = {"cifar10-mini": 5000, "cifar10-10k": 10000}
# Digits and traffic signs change meaning when mirrored.
TORCHVISION = {"cifar10": True, "cifar100": True, "gtsrb": False, "mnist": False, "svhn": False}
MAX_SOURCE_PIXELS = 4096 * 4096  # an image file larger than this is not decoded (resized images are smaller)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".webp", ".tif", ".tiff"}


def dataset_names() -> list[str]:
    return [*BUNDLED, *TORCHVISION, "<file.npz>", "<image folder>"]


def load_dataset(
    name: str,
    root: str | Path = "~/.cache/antidoor",
    download: bool = False,
    hflip: bool | None = None,
    image_size: int | None = None,
) -> ImageData:
    """Load a dataset by name or path (see the module docstring for what a name may be)."""
    path = Path(name).expanduser()
    if name in BUNDLED:
        data = load_bundled(name, Path(root).expanduser())
    elif name.lower() in TORCHVISION:
        data = load_torchvision(name.lower(), Path(root).expanduser(), download, image_size)
    elif path.suffix == ".npz":
        data = load_npz(path, name=path.stem)
    elif path.is_dir():
        data = load_image_folder(path, image_size)
    else:
        raise AntidoorError(
            f"data.name {name!r} is neither a known dataset nor an existing .npz file or image folder; "
            f"allowed: {', '.join(dataset_names())}"
        )
    if hflip is not None:
        data.hflip = hflip
    return data


def _to_nchw(x: np.ndarray, what: str) -> torch.Tensor:
    """Accept (N, H, W), (N, H, W, C) or (N, C, H, W) uint8 arrays; return (N, C, H, W)."""
    if x.dtype != np.uint8:
        raise AntidoorError(f"{what}: images must be uint8 (0..255), got {x.dtype}")
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.transpose(0, 3, 1, 2)
    elif not (x.ndim == 4 and x.shape[1] in (1, 3)):
        raise AntidoorError(f"{what}: images must be (N, H, W), (N, H, W, C) or (N, C, H, W) with C in 1 or 3, got {x.shape}")
    if not all(MIN_IMAGE_SIDE <= side <= MAX_IMAGE_SIDE for side in x.shape[2:]):
        raise AntidoorError(f"{what}: images of {x.shape[2]}x{x.shape[3]} pixels; "
                            f"allowed: {MIN_IMAGE_SIDE}..{MAX_IMAGE_SIDE} per side")
    return torch.from_numpy(np.ascontiguousarray(x))


def _labels(y: np.ndarray, what: str) -> torch.Tensor:
    """Integer labels in ``[0, MAX_CLASSES)``, shape (N,) or (N, 1) (Keras' layout); checked before
    anything is sized by them (the class count follows from the largest label)."""
    if not np.issubdtype(y.dtype, np.integer):
        raise AntidoorError(f"{what}: labels must be integers, got {y.dtype}")
    if not (y.ndim == 1 or (y.ndim == 2 and y.shape[1] == 1)):
        raise AntidoorError(f"{what}: labels must have shape (N,) or (N, 1), got {y.shape}")
    if y.size == 0:
        raise AntidoorError(f"{what}: no labels (the split is empty)")
    lo, hi = y.min(), y.max()  # compared in the array's own dtype: no wrap-around of uint64 values
    if lo < 0 or hi >= MAX_CLASSES:
        raise AntidoorError(f"{what}: labels range over {lo}..{hi}; allowed: 0..{MAX_CLASSES - 1} "
                            f"(at most {MAX_CLASSES:,} classes)")
    return torch.from_numpy(y.astype(np.int64).reshape(-1))


NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test", "classes")


def _check_npz_members(path: Path) -> None:
    """Read only the ``.npy`` headers: refuse object arrays (pickles) and arrays that would not fit
    in ``max_array_bytes()`` before numpy allocates anything for them."""
    total = 0
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            if info.filename.removesuffix(".npy") not in NPZ_KEYS:
                continue  # never read
            with z.open(info) as f:
                version = np.lib.format.read_magic(f)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, _, dtype = read(f)
            if dtype.hasobject:
                raise AntidoorError(f"{path}: {info.filename} holds Python objects, refused without unpickling; "
                                    "store plain numeric arrays")
            total += math.prod(shape) * dtype.itemsize
    limit = max_array_bytes()
    if total > limit:
        raise AntidoorError(f"{path}: its arrays would take {total / 2**30:.1f} GiB; at most {limit / 2**30:.1f} GiB are "
                            "allowed (half this machine's memory, at most 16 GiB)")


def load_npz(path: str | Path, name: str | None = None, default_hflip: bool = True) -> ImageData:
    """An ``.npz`` with ``x_train, y_train, x_test, y_test`` and optionally ``classes``.

    Read with ``allow_pickle=False``: an array of Python objects is refused, never unpickled.
    """
    path = user_file(path, "data file")
    try:
        _check_npz_members(path)
        with np.load(path, allow_pickle=False) as f:
            missing = {"x_train", "y_train", "x_test", "y_test"} - set(f.files)
            if missing:
                raise AntidoorError(f"{path}: missing keys {sorted(missing)}; "
                                    "an .npz needs x_train, y_train, x_test, y_test[, classes]")
            arrays = {k: f[k] for k in NPZ_KEYS if k in f.files}
    except AntidoorError:  # a ValueError too: keep its own message
        raise
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error, NotImplementedError) as e:
        raise AntidoorError(f"{path}: not a readable .npz file ({clip(str(e), 200)})") from None
    except ValueError as e:  # object arrays need pickle, which we refuse; malformed .npy headers
        raise AntidoorError(f"{path}: not a readable .npz of plain arrays ({clip(str(e), 200)})") from None
    y_train, y_test = _labels(arrays["y_train"], f"{path} y_train"), _labels(arrays["y_test"], f"{path} y_test")
    n_classes = int(max(y_train.max(), y_test.max())) + 1
    if "classes" in arrays:
        names = arrays["classes"]
        if names.ndim != 1 or not 1 <= len(names) <= MAX_CLASSES:
            raise AntidoorError(f"{path}: classes must be a list of 1..{MAX_CLASSES:,} names, got shape {names.shape}")
        classes = [clip(str(c), 100) for c in names]
    else:
        classes = [str(i) for i in range(n_classes)]
    if len(classes) < n_classes:
        raise AntidoorError(f"{path}: {len(classes)} class names but labels up to {n_classes - 1}")
    return ImageData(
        name=name or path.stem,
        x_train=_to_nchw(arrays["x_train"], f"{path} x_train"), y_train=y_train,
        x_test=_to_nchw(arrays["x_test"], f"{path} x_test"), y_test=y_test,
        classes=classes, hflip=default_hflip,
        source={"kind": "npz", "path": str(path), "sha256": file_sha256(path)},
    )


def decode_webp_array(blob: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Concatenated lossless WebP images (and their n + 1 offsets) -> (n, H, W, 3) uint8."""
    from PIL import Image

    raw = blob.tobytes()
    return np.stack([np.asarray(Image.open(io.BytesIO(raw[a:b])).convert("RGB"))
                     for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist(), strict=True)])


def load_bundled(name: str, cache_root: Path | None = None) -> ImageData:
    """A bundled CIFAR-10 subset: the first ``BUNDLED[name]`` training images of the bundle and its test images.

    The bundle stores each image as a lossless WebP (twice as many images as a compressed ``.npz`` in
    the same 20 MB). Decoding all 11,000 takes seconds, so the decoded arrays are kept in
    ``cache_root/bundled/`` (a plain ``.npz`` named by the bundle's hash) and read from there next time;
    where that folder cannot be written, every load decodes.
    """
    digest = _bundle_digest()
    x_train, x_test = _decoded_bundle(digest, cache_root)
    with np.load(BUNDLE, allow_pickle=False) as f:
        y_train, y_test, classes = f["y_train"], f["y_test"], [str(c) for c in f["classes"]]
    n = BUNDLED[name]
    return ImageData(
        name=name, x_train=_to_nchw(x_train[:n], f"{name} x_train"), y_train=_labels(y_train[:n], f"{name} y_train"),
        x_test=_to_nchw(x_test, f"{name} x_test"), y_test=_labels(y_test, f"{name} y_test"), classes=classes, hflip=True,
        source={"kind": "bundled", "path": str(BUNDLE), "sha256": digest, "train_images": n,
                "provenance": "CIFAR-10 (Krizhevsky 2009), class-balanced subset, see antidoor/data/bundled/README.md"},
    )


_DECODED: dict[str, tuple[np.ndarray, np.ndarray]] = {}


def _decoded_bundle(digest: str, cache_root: Path | None) -> tuple[np.ndarray, np.ndarray]:
    if digest in _DECODED:
        return _DECODED[digest]
    cache = cache_root / "bundled" / f"cifar10-{digest[:16]}.npz" if cache_root is not None else None
    arrays = None
    if cache is not None and cache.is_file():
        try:
            with np.load(cache, allow_pickle=False) as f:
                arrays = f["x_train"], f["x_test"]
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError):
            arrays = None  # a broken cache is decoded again and rewritten
    if arrays is None:
        with np.load(BUNDLE, allow_pickle=False) as f:
            arrays = (decode_webp_array(f["train_webp"], f["train_offsets"]),
                      decode_webp_array(f["test_webp"], f["test_offsets"]))
        if cache is not None:
            try:
                cache.parent.mkdir(parents=True, exist_ok=True)
                tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
                with open(tmp, "wb") as out:
                    np.savez(out, x_train=arrays[0], x_test=arrays[1])
                os.replace(tmp, cache)  # atomic: a concurrent reader sees the old file or the whole new one
            except OSError:
                pass  # an unwritable cache only costs the decoding next time
    _DECODED[digest] = arrays
    return arrays


@functools.cache
def _bundle_digest() -> str:
    """The bundle ships inside the package and does not change while a process runs: hashed once."""
    return file_sha256(BUNDLE)


def load_torchvision(name: str, root: Path, download: bool, image_size: int | None = None) -> ImageData:
    """CIFAR-10/100, GTSRB, MNIST or SVHN through torchvision, downloaded when ``download`` is set."""
    from torchvision import datasets

    def make(train: bool) -> Any:
        if name == "cifar10":
            return datasets.CIFAR10(root, train=train, download=download)
        if name == "cifar100":
            return datasets.CIFAR100(root, train=train, download=download)
        if name == "mnist":
            return datasets.MNIST(root, train=train, download=download)
        if name == "svhn":
            return datasets.SVHN(root, split="train" if train else "test", download=download)
        return datasets.GTSRB(root, split="train" if train else "test", download=download)

    try:
        splits = [make(True), make(False)]
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted"
        raise AntidoorError(
            f"dataset {name!r} not found under {root} ({e}); pass --set data.download=true while online, "
            f"or data.root=DIR where it already lies"
        ) from None
    except OSError as e:  # URLError and friends: no network
        raise AntidoorError(f"could not download dataset {name!r} into {root} ({e}); are you offline? "
                            "use the bundled cifar10-mini or an .npz") from None

    xs, ys = [], []
    for ds in splits:
        if name in ("cifar10", "cifar100", "mnist"):
            x = ds.data.numpy() if isinstance(ds.data, torch.Tensor) else ds.data
            y = np.asarray(ds.targets)
        elif name == "svhn":
            x, y = ds.data, ds.labels  # already (N, C, H, W)
        else:  # GTSRB: images of varying size on disk
            x, y = _read_images([p for p, _ in ds._samples], image_size or 32), np.array([t for _, t in ds._samples])
        xs.append(_to_nchw(np.asarray(x), name))
        ys.append(_labels(np.asarray(y), name))
    classes = list(getattr(splits[0], "classes", [])) or [str(i) for i in range(int(max(ys[0].max(), ys[1].max())) + 1)]
    return ImageData(name, xs[0], ys[0], xs[1], ys[1], classes=[str(c) for c in classes], hflip=TORCHVISION[name],
                     source={"kind": "torchvision", "name": name, "root": str(root)})


def _read_images(paths: list[Path | str], size: int | None) -> np.ndarray:
    from PIL import Image

    images = []
    for p in paths:
        try:
            with Image.open(p) as im:
                if im.width * im.height > MAX_SOURCE_PIXELS:  # known from the header, before decoding
                    raise AntidoorError(f"image {p} is {im.width}x{im.height} pixels; "
                                        f"at most {MAX_SOURCE_PIXELS:,} pixels are decoded")
                im = im.convert("L" if im.mode in ("L", "1", "I;16") else "RGB")
                if size is not None and im.size != (size, size):
                    im = im.resize((size, size), Image.BILINEAR)
                images.append(np.asarray(im))
        except AntidoorError:
            raise
        except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError... for bad files
            raise AntidoorError(f"cannot read image {p}: {clip(str(e) or type(e).__name__, 200)}") from None
    shapes = {a.shape for a in images}
    if len(shapes) > 1:
        raise AntidoorError(f"images differ in size ({sorted(shapes)[:3]}...); set data.image_size to resize them")
    return np.stack(images)


def load_image_folder(root: Path, image_size: int | None = None) -> ImageData:
    """A folder ``root/train/<class>/<image>`` and ``root/test/<class>/<image>``; classes sorted by name."""
    splits = {s: root / s for s in ("train", "test")}
    for s, d in splits.items():
        if not d.is_dir():
            raise AntidoorError(f"image folder {root}: missing {s}/ (expected {root}/train/<class>/* and {root}/test/<class>/*)")
    classes = sorted(p.name for p in splits["train"].iterdir() if p.is_dir())
    if not classes:
        raise AntidoorError(f"image folder {root}/train has no class folders")
    if len(classes) > MAX_CLASSES:
        raise AntidoorError(f"image folder {root}/train has {len(classes):,} class folders; at most {MAX_CLASSES:,} allowed")
    arrays = {}
    for s, d in splits.items():
        paths, labels = [], []
        for c, cls in enumerate(classes):
            files = sorted(p for p in (d / cls).glob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if (d / cls).is_dir() else []
            paths += files
            labels += [c] * len(files)
        if not paths:
            raise AntidoorError(f"image folder {d} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        arrays[s] = (_to_nchw(_read_images(paths, image_size), str(d)), torch.tensor(labels, dtype=torch.int64))
    return ImageData(root.name, *arrays["train"], *arrays["test"], classes=classes,
                     source={"kind": "folder", "path": str(root)})
