#!/usr/bin/env bash
# The posterior-sampler family at equal compute, at the defaults tuned on a validation split (README, "Results"):
#   bash bench/posterior_family.sh ct     # sparse-view CT, 20 views, 5% relative noise; out/ct
#   bash bench/posterior_family.sh sr     # 4x super-resolution of the same phantoms, sigma_y 0.01; out/sr (its oracle trained as CT's)
#   bash bench/posterior_family.sh mri    # the quickstart's R = 4 8-coil MRI (same data seeds and mask seed); out/mri
#   bash bench/posterior_family.sh box    # box inpainting of the same phantoms (a centred 16 px hole); out/box
#   TUNE=1 bash bench/posterior_family.sh ct   # first re-tune the defaults on the validation split (bench/tune_methods.py)
# Data as the quickstart makes it (32x32 phantoms: 2000 training, test = 8 of seed 1, validation = 4 of seed 2, never
# in a test table), one oracle prior (the quickstart's DDPM++ 1.75 M, 30 kimg, EDM loss on clean images), then every
# method at about 1000 network evaluations (DPS: the levels of DDPM's 1000 inside the training range; ALD 333 levels x
# 3 steps; PC 332 x 3 evaluations; DDS --dds-steps 1000; PaDIS 100 x 10; MSM 200 levels), every step parameter at its
# registry default (the validation choices of docs/tuning.json). Ends with the table (bench/recon_table.py) and the
# residual / noise column (bench/data_consistency.py). On 2 CPU cores alone: training 8-10 minutes, tuning 40-60,
# the test table 15-25 per task.
set -euo pipefail
cd "$(dirname "$0")/.."
TASK=${1:?usage: bash bench/posterior_family.sh ct|sr|mri|box}
O=${OUT:-out/$TASK}
PY=${PYTHON:-python3}
mkdir -p "$O"
[ -f "$O/phantoms-train.zip" ] || $PY dataset_tool.py phantoms --dest "$O/phantoms-train.zip" --num 2000 --resolution 32 --seed 0
[ -f "$O/phantoms-test.zip" ] || $PY dataset_tool.py phantoms --dest "$O/phantoms-test.zip" --num 16 --resolution 32 --seed 1
[ -f "$O/phantoms-val.zip" ] || $PY dataset_tool.py phantoms --dest "$O/phantoms-val.zip" --num 16 --resolution 32 --seed 2
NET="--arch ddpmpp --cbase 32 --cres 1,2,2 --blocks 2 --attn 16 --batch 32 --lr 2e-3 --lr-rampup 0.001 --ema 0.002
     --dropout 0 --duration 0.03 --tick 2 --snap 5 --dump 5 --channels-last"
LEARNED="ald,pc-jalal,pc-dps,pc-dds,dds,dps,padis"
case "$TASK" in
mri)
    [ -d "$O/mri-train" ] || $PY dataset_tool.py simulate-mri --source "$O/phantoms-train.zip" --dest "$O/mri-train" --coils 8 --seed 0
    [ -d "$O/mri-test" ] || $PY dataset_tool.py simulate-mri --source "$O/phantoms-test.zip" --dest "$O/mri-test" --coils 8 --seed 1
    [ -d "$O/mri-val" ] || $PY dataset_tool.py simulate-mri --source "$O/phantoms-val.zip" --dest "$O/mri-val" --coils 8 --seed 2
    TRAIN="$O/mri-train"
    TEST="--data $O/mri-test --task mri --accel 4 --mask-seed 1"; VAL="--data $O/mri-val --task mri --accel 4 --mask-seed 2"
    METHODS="zero-filled,cs-tv,msm,pc-projection,$LEARNED";;
ct)
    TRAIN="$O/phantoms-train.zip"
    TEST="--data $O/phantoms-test.zip --task ct --views 20"; VAL="--data $O/phantoms-val.zip --task ct --views 20"
    METHODS="fbp,$LEARNED";;
sr)
    TRAIN="$O/phantoms-train.zip"
    TEST="--data $O/phantoms-test.zip --task sr"; VAL="--data $O/phantoms-val.zip --task sr"
    METHODS="zero-filled,msm,pc-projection,$LEARNED";;
box)
    TRAIN="$O/phantoms-train.zip"
    TEST="--data $O/phantoms-test.zip --task box"; VAL="--data $O/phantoms-val.zip --task box"
    METHODS="zero-filled,msm,pc-projection,$LEARNED";;
*) echo "usage: bash bench/posterior_family.sh ct|sr|mri|box" >&2; exit 2;;
esac
ls -d "$O"/runs/*-oracle >/dev/null 2>&1 || $PY train.py --outdir "$O/runs" --data "$TRAIN" $NET --loss edm --desc oracle
PRIOR=$(ls -d "$O"/runs/*-oracle | tail -n 1)
[ -d "$O/val-meas" ] || $PY reconstruct.py $VAL --first 0 --num 4 --methods "$(echo "$METHODS" | cut -d, -f1)" \
    --save-measurements "$O/val-meas" --outdir "$O/val-baseline"
if [ -n "${TUNE:-}" ]; then
    $PY bench/tune_methods.py --network "$PRIOR" --measurements "$O/val-meas" --out "$O/tune" --record "$O/tuning.json"
fi
rm -rf "$O/meas" "$O/test"
$PY reconstruct.py --network "$PRIOR" $TEST --first 0 --num 8 --save-measurements "$O/meas" --outdir "$O/test" \
    --methods "$METHODS" --dds-steps 1000 --steps 200
$PY bench/recon_table.py "$O/test=oracle" | tee "$O/table.md"
$PY bench/data_consistency.py --measurements "$O/meas" "$O/test" | tee -a "$O/table.md"
