#!/bin/bash
# The path a user with data of their own takes, at the defaults, through the public CLI (issue 15, "What I will
# check"): BadNets with the fast preset, the clean reference, `purify --defense sau` and `--defense pam` with no
# settings, then `stress` (RA, QRA, path; EP purified from the recorded poisoned samples).
#
# Default data: MNIST, a dataset no antidoor setting was chosen on, 600 training images per class drawn with seed
# 0 from the 60,000, and the full 10,000-image test set (digits: no flips).
#
#   OMP_NUM_THREADS=2 bash benchmarks/heldout_defaults.sh [DATA.npz] [OUT] [extra options for `attack`...]
#
# Nothing is timed inside: each command's wall time is printed by /usr/bin/time.
set -euo pipefail
DATA=${1:-runs/data/mnist6k.npz}
OUT=${2:-runs/heldout}
shift $(( $# < 2 ? $# : 2 ))
EXTRA=("$@")
A=${ANTIDOOR:-.venv/bin/antidoor}
PY=${PYTHON:-.venv/bin/python}
if [ ! -f "$DATA" ] && [ "$DATA" = runs/data/mnist6k.npz ]; then
    mkdir -p runs/data
    "$PY" - <<'EOF'
import numpy as np
d = np.load("../shared/data/mnist.npz")
rng = np.random.default_rng(0)
idx = np.sort(np.concatenate([rng.choice(np.flatnonzero(d["y_train"] == c), 600, replace=False) for c in range(10)]))
np.savez("runs/data/mnist6k.npz", x_train=d["x_train"][idx], y_train=d["y_train"][idx],
         x_test=d["x_test"], y_test=d["y_test"], classes=d["classes"])
EOF
    EXTRA+=(--set data.hflip=false)
fi
t() { echo "=== $(date -u +%T) $*"; /usr/bin/time -f "=== wall %e s" "$@"; }
t "$A" attack --preset fast --data "$DATA" --attack badnets "${EXTRA[@]}" --out "$OUT/badnets"
t "$A" attack --preset fast --data "$DATA" --pratio 0 "${EXTRA[@]}" --out "$OUT/clean"
t "$A" purify "$OUT/badnets/model.safetensors" --defense sau --out "$OUT/sau"
t "$A" purify "$OUT/badnets/model.safetensors" --defense pam --out "$OUT/pam"
t "$A" stress "$OUT/sau/model.safetensors" "$OUT/pam/model.safetensors" --backdoored "$OUT/badnets/model.safetensors" \
    --clean-ref "$OUT/clean/model.safetensors" --out "$OUT/stress"
