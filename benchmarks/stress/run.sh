#!/usr/bin/env bash
# The stress benchmark on the bundled data (see benchmarks/README.md, section "stress").
# Usage: benchmarks/stress/run.sh [RUNS_DIR]   (from the repository root, with antidoor installed in .venv
# or ANTIDOOR="python -m antidoor.cli"). Writes benchmarks/stress/{stress.json,stress.md,ra_curve.png,path.png}
# and benchmarks/stress/demo.md (the demo's own tables).
set -euo pipefail
RUNS=${1:-runs/bench-stress}
ANTIDOOR=${ANTIDOOR:-.venv/bin/antidoor}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# 1. the demo: clean + BadNets small_cnn (width 16, 20 epochs), FT, SAU and EP, and its RA table (2 seeds)
/usr/bin/time -f "demo wall %e s, user %U s" $ANTIDOOR demo --out "$RUNS" --quiet
cp "$RUNS/results.md" benchmarks/stress/demo.md
# 2. a stronger fine-tuning (lr 0.1, 20 epochs) that does lower the asr of this model
$ANTIDOOR purify "$RUNS/badnets.safetensors" --defense ft --set defense.lr=0.1 --set defense.epochs=20 \
    --out "$RUNS/ft-strong" --quiet > /dev/null
# 3. the stress suite at its full defaults (RA 3 seeds, QRA 50 epochs, 21 path points, BatchNorm re-estimated)
/usr/bin/time -f "stress wall %e s, user %U s" $ANTIDOOR stress "$RUNS/badnets-ft.safetensors" \
    "ft-strong=$RUNS/ft-strong/model.safetensors" "$RUNS/badnets-sau.safetensors" \
    --backdoored "$RUNS/badnets.safetensors" --clean-ref "$RUNS/clean.safetensors" --ep "$RUNS/badnets-ep.safetensors" \
    --out benchmarks/stress --quiet > /dev/null
