#!/usr/bin/env bash
# Issue 15, finding (2) on BadNets: does stamping the trigger before augmentation (BackdoorBench's way) make the
# purified models superficial? The regime study stamps BadNets' patch after crop/flip (attack.stage: after_augment,
# antidoor's default), so the patch is always in the bottom-right corner; BackdoorBench stamps it before, so random
# crops shift it and flips move it to the other corner. This repeats the study's BadNets seed 1 with
# stage: before_augment and everything else the study's (preset fast + paper-defender, the shared 20k subset,
# SAU 10 rounds of batch 128 at lr 5e-4, FST and EP at their defaults, RA at its defaults on 2,000 curve images),
# with the study's seed-1 clean model as the clean reference. Each step is skipped when its output exists.
#   CLEAN=runs/regime/artifacts/clean/029e5d3410d2f2078bdd.safetensors bash benchmarks/regime_stage_probe.sh
set -euo pipefail
OUT=${OUT:-runs/regime-stage}
CLEAN=${CLEAN:?set CLEAN to the seed-1 clean checkpoint of the regime study}
AD=${AD:-.venv/bin/antidoor}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}   # the study's thread count (bf16 sums depend on it)
BD=$OUT/badnets/model.safetensors
[ -f "$BD" ] || $AD attack --preset fast --preset paper-defender --data runs/data/cifar10-20k.npz --attack badnets \
  --pratio 0.1 --target 0 --set attack.stage=before_augment --seed 1 --out "$OUT/badnets" -q
[ -f "$OUT/sau/model.safetensors" ] || $AD purify "$BD" --defense sau --set defense.rounds=10 \
  --set defense.batch_size=128 --set defense.lr=5e-4 --seed 1 --out "$OUT/sau" -q
[ -f "$OUT/fst/model.safetensors" ] || $AD purify "$BD" --defense fst --seed 1 --out "$OUT/fst" -q
[ -f "$OUT/stress/stress.json" ] || $AD stress "sau=$OUT/sau/model.safetensors" "fst=$OUT/fst/model.safetensors" \
  --backdoored "$BD" --clean-ref "$CLEAN" --set qra=null --set path=null --set ra.curve_images=2000 --seed 1 \
  --out "$OUT/stress" -q
cat "$OUT/stress/stress.md"
