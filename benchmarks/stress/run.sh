#!/usr/bin/env bash
# The stress benchmark on the bundled data (see benchmarks/README.md, section "stress").
# Usage: benchmarks/stress/run.sh [RUNS_DIR]   (from the repository root, with antidoor installed in .venv
# or ANTIDOOR="python -m antidoor.cli"). Writes benchmarks/stress/{stress.json,stress.md,ra_curve.png,path.png}.
# RUNS_DIR holding the checkpoints of an earlier `antidoor demo --out RUNS_DIR` (same code, seed 0) is reused.
set -euo pipefail
RUNS=${1:-runs/bench-stress}
ANTIDOOR=${ANTIDOOR:-.venv/bin/antidoor}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# 1. the demo's models: clean + BadNets small_cnn (width 16, 20 epochs, lr 0.05), FT (defaults) and SAU (20 rounds, lr 1e-3)
if [ ! -f "$RUNS/badnets-sau.safetensors" ]; then
    /usr/bin/time -f "demo wall %e s, user %U s" $ANTIDOOR demo --out "$RUNS" --quiet --set ra=null
fi
# 2. a stronger fine-tuning (lr 0.1, 20 epochs) that does lower the asr of this model
if [ ! -f "$RUNS/ft-strong/model.safetensors" ]; then
    $ANTIDOOR purify "$RUNS/badnets.safetensors" --defense ft --set defense.lr=0.1 --set defense.epochs=20 \
        --out "$RUNS/ft-strong" --quiet > /dev/null
fi
# 3. the stress suite at its full defaults (RA 3 seeds, QRA 50 epochs, 21 path points, BatchNorm re-estimated);
#    EP (FT's recipe on the defender's data plus the poisoned samples with their true labels) is purified on the spot
/usr/bin/time -f "stress wall %e s, user %U s" $ANTIDOOR stress "$RUNS/badnets-ft.safetensors" \
    "ft-strong=$RUNS/ft-strong/model.safetensors" "$RUNS/badnets-sau.safetensors" \
    --backdoored "$RUNS/badnets.safetensors" --clean-ref "$RUNS/clean.safetensors" \
    --out benchmarks/stress --quiet > /dev/null
