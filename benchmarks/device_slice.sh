#!/usr/bin/env bash
# Issue 15, item 7: a slice of benchmarks/backdoorbench_scale.yaml on a CUDA machine in under 10 minutes.
#
# The slice: the study file unchanged (PreAct-ResNet18 width 64, its 100-epoch recipe, 2,500 defender
# images, the defenses' and the stress suite's defaults) but one attack (BadNets), one seed and the
# defenses FT, SAU and EP, on a 10,000-image subset of the shared CIFAR-10 (8,000 train, 2,000 test),
# because the device machine reaches no network and the whole carried tree must stay under 64 MiB.
# SLICE_DEFENSES overrides the defense list (a YAML list), SLICE_BUDGET the seconds the grid may run
# (what finished by then is reported; the grid resumes with the same command).
#
#   bash benchmarks/device_slice.sh prepare   # here: the data subset and pydantic for Python 3.12 into runs/device/
#   bash benchmarks/device_slice.sh           # there (device tool: carry ["runs/device"], timeout_s 600); results in $OUT:
#       grid.log, results.md and study.tar.gz (unpack it into a folder, then `antidoor report FOLDER`)
#   SLICE=tiny bash benchmarks/device_slice.sh   # the same pipeline at tiny scale on a CPU (tests/test_study_files.py)
set -euo pipefail
cd "$(dirname "$0")/.."
DEV=runs/device
OUT=${OUT:-runs/device-slice-out}

if [ "${1:-}" = prepare ]; then
    mkdir -p "$DEV"
    [ -f "$DEV/cifar10-slice.npz" ] || python tools/make_bundled.py --npz --train-per-class 800 --test-per-class 200 \
        --out "$DEV/cifar10-slice.npz"
    # the device image has torch, typer, rich, PyYAML and safetensors but no pydantic: carry it, unpacked, for 3.12
    rm -rf "$DEV/wheels" "$DEV/pylib" && mkdir -p "$DEV/wheels" "$DEV/pylib"
    python -m pip download -q --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
        --implementation cp -d "$DEV/wheels" "pydantic>=2.5"
    for w in "$DEV"/wheels/*.whl; do python -m zipfile -e "$w" "$DEV/pylib"; done
    rm -rf "$DEV/wheels"
    du -sh "$DEV"
    exit 0
fi

mkdir -p "$OUT"
WORK=$(mktemp -d)
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
[ -d "$DEV/pylib" ] && export PYTHONPATH="$PYTHONPATH:$DEV/pylib"  # after src, so an installed pydantic wins
export PYTHONUNBUFFERED=1
TINY_DEFENSES='[{name: ft, epochs: 1, batch_size: 32}, {name: sau, rounds: 1, batch_size: 32}, {name: ep, epochs: 1, batch_size: 32}]'
SLICE_DEFAULT_DEFENSES='[{name: ft}, {name: sau}, {name: ep}]'
if [ "${SLICE:-device}" = tiny ]; then
    ARGS=(--set 'datasets=[{name: cifar10-mini, n_train: 500, n_test: 200, clean_count: 100}]'
          --set 'models=[{name: preact_resnet18, width: 4}]' --set train.epochs=1 --set device=cpu
          --set "defenses=${SLICE_DEFENSES:-$TINY_DEFENSES}"
          --set stress.ra.seeds=[0] --set stress.ra.epochs=1 --set stress.qra.epochs=1 --set stress.qra.n_clean=50 --set stress.qra.n_poison=50 --set stress.path.points=3)
else
    ARGS=(--set "datasets=[{name: $DEV/cifar10-slice.npz}]" --set "defenses=${SLICE_DEFENSES:-$SLICE_DEFAULT_DEFENSES}")
fi
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" | tee "$OUT/grid.log"
status=0
timeout "${SLICE_BUDGET:-500}" python -m antidoor grid benchmarks/backdoorbench_scale.yaml --out "$WORK/bb" --quiet \
    --set seeds=[0] --set 'attacks=[{name: badnets, pratio: 0.1, target: 0}]' "${ARGS[@]}" 2>&1 | tee -a "$OUT/grid.log" \
    || status=$?
python -m antidoor results "$WORK/bb" --mean --format markdown > "$OUT/results.md" || true
python -m antidoor results "$WORK/bb" --format markdown >> "$OUT/results.md" || true
# the store and the stress results, without the checkpoints: `antidoor report` reads them back here
tar -czf "$OUT/study.tar.gz" -C "$WORK/bb" study.sqlite $(cd "$WORK/bb" && ls artifacts/stress/*.json 2>/dev/null) || true
cat "$OUT/results.md"
exit "$status"
