#!/usr/bin/env bash
# README command 1: install, then run the MSM pipeline on the embedded default data, generated here:
#   phantoms -> simulated 8-coil MRI -> an MSM model trained only on R = 4 undersampled k-space, and an oracle trained
#   on the clean images -> samples from both -> reconstructions of held-out R = 4 slices with a metrics table
#   (MSM posterior sampling with either prior, zero-filled, and L1-wavelet compressed sensing).
#
#   bash quickstart.sh            # about 40 minutes on a 2-core CPU
#   QUICK=1 bash quickstart.sh    # a few-minute smoke run of the same pipeline (the models barely train)
#
# Everything lands in $OUT (default out/quickstart). Re-running continues unfinished training runs and redoes the rest.
set -euo pipefail
cd "$(dirname "$0")"
OUT=${OUT:-out/quickstart}
PY=${PYTHON:-python3}

$PY -m pip install -q -r requirements.txt -c constraints.txt

# The training budget goes mostly to MSM, which learns from a quarter of each slice's k-space: at batch 16 it passes
# converged TV on the validation slices at about 90 kimg (docs/benchmarks.md, "Training recipes"), while the oracle,
# learning from whole images, is past TV's level at 10. MSM_DURATION / ORACLE_DURATION (Mimg) override the split.
if [ "${QUICK:-0}" = "1" ]; then
    NUM=256; TICK=0.25; STEPS=20; DPS_STEPS=50; TEST=4
    MSM_DURATION=${MSM_DURATION:-0.001}; ORACLE_DURATION=${ORACLE_DURATION:-0.001}
else
    NUM=2000; TICK=2; STEPS=200; DPS_STEPS=1000; TEST=8
    MSM_DURATION=${MSM_DURATION:-0.1}; ORACLE_DURATION=${ORACLE_DURATION:-0.01}
fi
mkdir -p "$OUT"

# 1. Data: random-ellipse phantoms at 32x32 (training set seed 0, held-out set seed 1), then simulated 8-coil MRI:
#    birdcage coil maps, a smooth random phase, fully sampled k-space, each slice normalised (99th percentile = 1).
[ -f "$OUT/phantoms-train.zip" ] || $PY dataset_tool.py phantoms --dest "$OUT/phantoms-train.zip" --num $NUM \
    --resolution 32 --seed 0
[ -f "$OUT/phantoms-test.zip" ] || $PY dataset_tool.py phantoms --dest "$OUT/phantoms-test.zip" --num 16 \
    --resolution 32 --seed 1
[ -d "$OUT/mri-train" ] || $PY dataset_tool.py simulate-mri --source "$OUT/phantoms-train.zip" --dest "$OUT/mri-train" \
    --coils 8 --seed 0
[ -d "$OUT/mri-test" ] || $PY dataset_tool.py simulate-mri --source "$OUT/phantoms-test.zip" --dest "$OUT/mri-test" \
    --coils 8 --seed 1

# 2. Two models with the same network (DDPM++, 1.75 M parameters) and recipe (batch 16, EDM2's inverse square root
#    decay of the learning rate after 10 kimg, EMA half-life 2 kimg): the MSM model sees only R = 4 random-line
#    k-space of each training slice (one fixed mask per slice), never an image; the oracle is trained with EDM's loss
#    on the clean complex images.
NET="--arch ddpmpp --cbase 32 --cres 1,2,2 --blocks 2 --attn 16 --batch 16 --lr 2e-3 --lr-rampup 0.001
     --lr-schedule isqrt --ema 0.002 --dropout 0 --tick $TICK --snap 5 --dump 5 --channels-last"
$PY train.py --outdir "$OUT/runs" --data "$OUT/mri-train" $NET --duration $MSM_DURATION \
    --loss msm --mask lines-random --accel 4 --desc r4
$PY train.py --outdir "$OUT/runs" --data "$OUT/mri-train" $NET --duration $ORACLE_DURATION \
    --loss edm --desc oracle
MSM=$(ls -d "$OUT"/runs/*-msm-r4 | tail -n 1)  # train.py appends the loss
ORACLE=$(ls -d "$OUT"/runs/*-oracle | tail -n 1)

# 3. Samples (magnitude images): the MSM stochastic partial-score sampler (K = 3 subsets per step, 200 levels) and
#    EDM's Heun sampler for the oracle.
$PY generate.py --network "$MSM" --outdir "$OUT/msm-samples" --seeds 0-15 --batch 16
$PY generate.py --network "$ORACLE" --outdir "$OUT/oracle-samples" --seeds 0-15 --batch 16

# 4. Reconstructions of held-out slices from R = 4 measurements. The measurements (masks and noise) are made once
#    and saved; every later run reuses the same set, so every row of the table sees identical data:
#    MSM posterior sampling with the MSM prior, the classical baselines (zero-filled, converged TV and L1-wavelet CS),
#    then MSM posterior sampling and DPS (Chung et al., its own 1000-level DDPM grid) with the oracle prior.
rm -rf "$OUT/measurements-r4"
$PY reconstruct.py --network "$MSM" --data "$OUT/mri-test" --task mri --first 0 --num $TEST --accel 4 --mask-seed 1 \
    --save-measurements "$OUT/measurements-r4" --outdir "$OUT/recon-msm" --steps $STEPS \
    --methods msm,zero-filled,cs-tv,cs-l1
$PY reconstruct.py --network "$ORACLE" --measurements "$OUT/measurements-r4" --outdir "$OUT/recon-oracle" \
    --steps $STEPS --dps-steps $DPS_STEPS --methods msm,dps
$PY bench/recon_table.py "$OUT/recon-msm=MSM (R = 4 data only)" "$OUT/recon-oracle=oracle (clean images)" \
    | tee "$OUT/results.md"
echo "Done. Sample grids: $OUT/msm-samples-grid.png, $OUT/oracle-samples-grid.png;"
echo "reconstructions: $OUT/recon-*/panels; the table above: $OUT/results.md"
