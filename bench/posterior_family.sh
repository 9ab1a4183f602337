#!/usr/bin/env bash
# The posterior-sampler family at equal compute on one saved measurement set (README, "Results"):
#   bash bench/posterior_family.sh ct     # sparse-view CT, 20 views, 5% relative noise; out/ct
#   bash bench/posterior_family.sh mri    # the quickstart's R = 4 8-coil MRI (same data seeds and mask seed); out/mri
# Data as the quickstart makes it (32x32 phantoms, 2000 training / 8 held-out), one oracle prior (the quickstart's
# DDPM++ 1.75 M, 30 kimg, EDM loss on clean images), then every method with about 1000 network evaluations
# (DPS: 930 of DDPM's 1000 levels lie in the training range; ALD 3 steps per level; PC 2 evaluations per level),
# untuned defaults otherwise. Ends with the table (bench/recon_table.py) and the residual / noise column
# (bench/data_consistency.py). About 25 (CT) / 35 (MRI) minutes on 2 CPU cores alone.
set -euo pipefail
cd "$(dirname "$0")/.."
TASK=${1:?usage: bash bench/posterior_family.sh ct|mri}
O=${OUT:-out/$TASK}
PY=${PYTHON:-python3}
mkdir -p "$O"
[ -f "$O/phantoms-train.zip" ] || $PY dataset_tool.py phantoms --dest "$O/phantoms-train.zip" --num 2000 --resolution 32 --seed 0
[ -f "$O/phantoms-test.zip" ] || $PY dataset_tool.py phantoms --dest "$O/phantoms-test.zip" --num 16 --resolution 32 --seed 1
NET="--arch ddpmpp --cbase 32 --cres 1,2,2 --blocks 2 --attn 16 --batch 32 --lr 2e-3 --lr-rampup 0.001 --ema 0.002
     --dropout 0 --duration 0.03 --tick 2 --snap 5 --dump 5 --channels-last"
if [ "$TASK" = mri ]; then
    [ -d "$O/mri-train" ] || $PY dataset_tool.py simulate-mri --source "$O/phantoms-train.zip" --dest "$O/mri-train" --coils 8 --seed 0
    [ -d "$O/mri-test" ] || $PY dataset_tool.py simulate-mri --source "$O/phantoms-test.zip" --dest "$O/mri-test" --coils 8 --seed 1
    TRAIN="$O/mri-train"; MEASURE="--data $O/mri-test --task mri --accel 4 --mask-seed 1"
    FIRST="msm,dps,zero-filled,cs-tv --steps 200"; ALD_LEVELS=310; PC_LEVELS=466; PC="pc-jalal,pc-dps,pc-projection,pc-dds"
else
    TRAIN="$O/phantoms-train.zip"; MEASURE="--data $O/phantoms-test.zip --task ct --views 20"
    FIRST="fbp,dps,padis"; ALD_LEVELS=333; PC_LEVELS=501; PC="pc-jalal,pc-dps,pc-dds"
fi
ls -d "$O"/runs/*-oracle >/dev/null 2>&1 || $PY train.py --outdir "$O/runs" --data "$TRAIN" $NET --loss edm --desc oracle
PRIOR=$(ls -d "$O"/runs/*-oracle | tail -n 1)
rm -rf "$O/meas" "$O/first" "$O/ald" "$O/pc"
$PY reconstruct.py --network "$PRIOR" $MEASURE --first 0 --num 8 --save-measurements "$O/meas" --outdir "$O/first" \
    --dps-steps 1000 --methods $FIRST
$PY reconstruct.py --network "$PRIOR" --measurements "$O/meas" --outdir "$O/ald" --methods ald --levels $ALD_LEVELS
$PY reconstruct.py --network "$PRIOR" --measurements "$O/meas" --outdir "$O/pc" --methods $PC --levels $PC_LEVELS
$PY bench/recon_table.py "$O/first=oracle" "$O/ald=oracle" "$O/pc=oracle" | tee "$O/table.md"
$PY bench/data_consistency.py --measurements "$O/meas" "$O/first" "$O/ald" "$O/pc" | tee -a "$O/table.md"
