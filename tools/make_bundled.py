"""Build the bundled mini CIFAR-10 (src/antidoor/data/bundled/cifar10_mini.npz).

Source: ../shared/data/cifar10-train20k.npz and cifar10-test.npz (lossless CIFAR-10, see
that folder's README). We draw a class-balanced subset with a fixed seed so the file can be
rebuilt bit for bit:  python tools/make_bundled.py [--train-per-class 500 --test-per-class 100]
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import numpy as np


def balanced(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    picks = [rng.choice(np.flatnonzero(labels == c), per_class, replace=False) for c in np.unique(labels)]
    return np.sort(np.concatenate(picks))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--train-per-class", type=int, default=500)
    ap.add_argument("--test-per-class", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="src/antidoor/data/bundled/cifar10_mini.npz")
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    tr = np.load(Path(args.shared) / "cifar10-train20k.npz")
    te = np.load(Path(args.shared) / "cifar10-test.npz")
    i_tr = balanced(tr["y_train"], args.train_per_class, rng)
    i_te = balanced(te["y_test"], args.test_per_class, rng)
    np.savez_compressed(
        args.out,
        x_train=tr["x_train"][i_tr], y_train=tr["y_train"][i_tr],
        x_test=te["x_test"][i_te], y_test=te["y_test"][i_te],
        classes=tr["classes"],
    )
    digest = hashlib.sha256(Path(args.out).read_bytes()).hexdigest()
    print(f"wrote {args.out}: {len(i_tr)} train + {len(i_te)} test, sha256 {digest}")


if __name__ == "__main__":
    main()
