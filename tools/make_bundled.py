"""Build the bundled CIFAR-10 (src/antidoor/data/bundled/cifar10_bundle.npz), or a plain .npz subset.

Source: ../shared/data/cifar10-train20k.npz and cifar10-test.npz (lossless CIFAR-10, see that
folder's README). Class-balanced draws with a fixed seed, so each file can be rebuilt bit for bit.

The bundle (the default) holds 10,000 training images (1,000 per class) and 1,000 test images (100 per
class), each a lossless WebP, so that twice the images of a plain compressed .npz fit the package's
20 MB. Its first 5,000 training images are ``cifar10-mini`` (500 per class, the same draw as before
the bundle existed); all 10,000 are ``cifar10-10k``. The build decodes every image again and checks it
pixel for pixel against the source.

    python tools/make_bundled.py                       # the bundle
    python tools/make_bundled.py --npz --train-per-class 2000 --test-per-class 1000 --out runs/data/cifar10-20k.npz
"""

from __future__ import annotations

import argparse
import hashlib
import io
from pathlib import Path

import numpy as np

BUNDLE = "src/antidoor/data/bundled/cifar10_bundle.npz"


def balanced(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    picks = [rng.choice(np.flatnonzero(labels == c), per_class, replace=False) for c in np.unique(labels)]
    return np.sort(np.concatenate(picks))


def encode(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """NHWC uint8 images -> (concatenated lossless WebP bytes, offsets with n + 1 entries)."""
    from PIL import Image

    blobs = []
    for im in images:
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, "WEBP", lossless=True, quality=100, method=4)
        blobs.append(buf.getvalue())
    offsets = np.zeros(len(blobs) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(b) for b in blobs])
    return np.frombuffer(b"".join(blobs), dtype=np.uint8), offsets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--npz", action="store_true", help="a plain compressed .npz of --train/--test-per-class images")
    ap.add_argument("--train-per-class", type=int, default=500, help="the first draw (the bundle: cifar10-mini's)")
    ap.add_argument("--extra-train-per-class", type=int, default=500, help="the bundle: a second draw after the first")
    ap.add_argument("--test-per-class", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help=f"default: {BUNDLE} (the bundle)")
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    tr = np.load(Path(args.shared) / "cifar10-train20k.npz")
    te = np.load(Path(args.shared) / "cifar10-test.npz")
    i_tr = balanced(tr["y_train"], args.train_per_class, rng)
    i_te = balanced(te["y_test"], args.test_per_class, rng)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    if args.npz:
        out = Path(args.out or "cifar10-subset.npz")
        np.savez_compressed(out, x_train=tr["x_train"][i_tr], y_train=tr["y_train"][i_tr],
                            x_test=te["x_test"][i_te], y_test=te["y_test"][i_te], classes=tr["classes"])
    else:
        out = Path(args.out or BUNDLE)
        rest = np.setdiff1d(np.arange(len(tr["y_train"])), i_tr)
        i_tr = np.concatenate([i_tr, rest[balanced(tr["y_train"][rest], args.extra_train_per_class, rng)]])
        x_tr, x_te = tr["x_train"][i_tr], te["x_test"][i_te]
        train_webp, train_offsets = encode(x_tr)
        test_webp, test_offsets = encode(x_te)
        np.savez(out, train_webp=train_webp, train_offsets=train_offsets, test_webp=test_webp, test_offsets=test_offsets,
                 y_train=tr["y_train"][i_tr], y_test=te["y_test"][i_te], classes=tr["classes"],
                 train_index=i_tr, test_index=i_te)
        from antidoor.data.sources import decode_webp_array

        with np.load(out, allow_pickle=False) as f:  # lossless, checked: every image decodes to its source pixels
            assert np.array_equal(decode_webp_array(f["train_webp"], f["train_offsets"]), x_tr)
            assert np.array_equal(decode_webp_array(f["test_webp"], f["test_offsets"]), x_te)
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    print(f"wrote {out}: {len(i_tr)} train + {len(i_te)} test, {out.stat().st_size / 1e6:.1f} MB, sha256 {digest}")


if __name__ == "__main__":
    main()
