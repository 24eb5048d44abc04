#!/usr/bin/env bash
# Issue 15, finding (2) on BadNets: the study's BadNets seed 1 again, with one thing changed, to see whether that
# makes the purified models superficial under RA. Everything else is the study's: presets fast + paper-defender, the
# shared 20k subset (split seed 1), FST at its defaults, SAU at the study's settings (10 rounds of batch 128 at
# lr 5e-4), EP purified by `antidoor stress` from the recorded poisoned samples, RA at its defaults (3 seeds, curves
# on 2,000 test images), and the study's 15-epoch seed-1 clean model as the clean reference (RA does not implant
# BadNets in it: p_asr 2.1%). Settings fixed before each ran; each step is skipped when its output exists.
#   stage: attack.stage=before_augment, BackdoorBench's order. The study stamps the patch after crop/flip
#          (antidoor's default), so it is always in the bottom-right corner; BackdoorBench stamps it before, so
#          random crops shift it and flips move it to the other corner.               -> runs/regime-stage
#   long:  45 epochs instead of 15 (EPOCHS; the recipe's warm-up and decay stretch with it). The papers' models
#          train for 100 epochs (~93% clean). A 45-epoch clean model is not trained, to halve the cost.
#                                                                                     -> runs/regime-long
#   CLEAN=runs/regime/artifacts/clean/029e5d3410d2f2078bdd.safetensors bash benchmarks/regime_seed1_probe.sh stage
set -euo pipefail
case "${1:-}" in
  stage) CHANGE=(--set attack.stage=before_augment); OUT=${OUT:-runs/regime-stage} ;;
  long) CHANGE=(--epochs "${EPOCHS:-45}"); OUT=${OUT:-runs/regime-long} ;;
  *) echo "usage: CLEAN=... bash $0 stage|long" >&2; exit 2 ;;
esac
CLEAN=${CLEAN:?set CLEAN to the seed-1 clean checkpoint of the regime study}
AD=${AD:-.venv/bin/antidoor}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}   # the study's thread count (bf16 sums depend on it)
BD=$OUT/badnets/model.safetensors
[ -f "$BD" ] || $AD attack --preset fast --preset paper-defender --data runs/data/cifar10-20k.npz --attack badnets \
  --pratio 0.1 --target 0 "${CHANGE[@]}" --seed 1 --out "$OUT/badnets" -q
[ -f "$OUT/fst/model.safetensors" ] || $AD purify "$BD" --defense fst --seed 1 --out "$OUT/fst" -q
[ -f "$OUT/sau/model.safetensors" ] || $AD purify "$BD" --defense sau --set defense.rounds=10 \
  --set defense.batch_size=128 --set defense.lr=5e-4 --seed 1 --out "$OUT/sau" -q
[ -f "$OUT/stress/stress.json" ] || $AD stress "sau=$OUT/sau/model.safetensors" "fst=$OUT/fst/model.safetensors" \
  --backdoored "$BD" --clean-ref "$CLEAN" --set qra=null --set path=null --set ra.curve_images=2000 --seed 1 \
  --out "$OUT/stress" -q
cat "$OUT/stress/stress.md"
