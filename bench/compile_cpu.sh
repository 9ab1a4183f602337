#!/bin/bash
# --compile on this CPU: training images/s with and without (one small run each, plus a second plain run to see the
# run-to-run noise), and the sampling network's forward rate (interleaved rounds). Run it with nothing else heavy on the machine:
#   bash bench/compile_cpu.sh      (a few minutes on 2 cores; OUT=DIR writes elsewhere)
set -euo pipefail
cd "$(dirname "$0")/.."
export OUT=${OUT:-out/compile-bench}
export OMP_NUM_THREADS=2
rm -rf $OUT/runs $OUT/ph32.zip
python dataset_tool.py phantoms --dest $OUT/ph32.zip --num 256 --resolution 32 --seed 0 >/dev/null
ARGS=(--data $OUT/ph32.zip --arch ddpmpp --cbase 32 --cres 1,2,2 --blocks 1 --attn "" --batch 32 --dropout 0.1
      --duration 0.00128 --tick 0.128 --snap 100 --dump 100 --workers 0 --lr-rampup 0 --device cpu)
for variant in plain compiled plain2; do
  extra=(); [ $variant = compiled ] && extra=(--compile)
  /usr/bin/time -f "$variant wall %e s" python train.py --outdir $OUT/runs/$variant "${ARGS[@]}" "${extra[@]}" \
    > $OUT/$variant.log 2>&1 || { tail $OUT/$variant.log; exit 1; }
  tail -1 $OUT/$variant.log
done
python - <<'PY'
import glob, json, os, statistics
out = os.environ.get("OUT", "out/compile-bench")
rates = {}
for variant in ("plain", "compiled", "plain2"):
    (path,) = glob.glob(f"{out}/runs/{variant}/*/stats.jsonl")
    stats = [json.loads(l) for l in open(path)]
    steady = [s["images_per_sec"] for s in stats[2:]]  # ticks 0-1 hold start-up and compilation
    rates[variant] = statistics.median(steady)
    print(f"{variant:9s} first tick {stats[0]['sec_per_tick']:7.1f} s, steady img/s median {rates[variant]:.2f} "
          f"(ticks 2-{len(stats) - 1}: {', '.join(f'{r:.1f}' for r in steady)})")
print(f"compiled / plain img/s: {rates['compiled'] / rates['plain']:.3f} (vs plain2: "
      f"{rates['compiled'] / rates['plain2']:.3f}; plain2 / plain: {rates['plain2'] / rates['plain']:.3f})")
json.dump(rates, open(f"{out}/training_rates.json", "w"), indent=2)
PY
python - <<'PY'
# Sampling: the snapshot network's forward (eval, no grad) at batch 32, compiled vs plain, 7 interleaved rounds of
# 10 calls each; the compiled module is warmed up (compiled) first.
import glob, json, os, statistics, time, torch
from training import snapshot as checkpoint
out = os.environ.get("OUT", "out/compile-bench")
snap = checkpoint.latest_file(glob.glob(f"{out}/runs/plain/*")[0], "network-snapshot")
net, _ = checkpoint.load_snapshot(snap)
net.eval().requires_grad_(False)
compiled = torch.compile(net)
x = torch.randn(32, 1, 32, 32, generator=torch.Generator().manual_seed(0))
sigma = torch.full((32,), 0.5)
t = time.perf_counter(); compiled(x, sigma); compile_s = time.perf_counter() - t
def rate(f):
    t = time.perf_counter()
    for _ in range(10):
        f(x, sigma)
    return 320 / (time.perf_counter() - t)
rounds = []
for r in range(7):
    order = [("plain", net), ("compiled", compiled)][:: 1 if r % 2 else -1]
    rounds.append({name: rate(f) for name, f in order})
ratios = [r["compiled"] / r["plain"] for r in rounds]
res = {"compile_s": compile_s, "plain_img_s": statistics.median(r["plain"] for r in rounds),
       "compiled_img_s": statistics.median(r["compiled"] for r in rounds), "ratio_median": statistics.median(ratios),
       "ratios": ratios}
print(f"sampling forward, batch 32: first compiled call {compile_s:.1f} s; img/s plain {res['plain_img_s']:.1f}, "
      f"compiled {res['compiled_img_s']:.1f}; per-round ratio median {res['ratio_median']:.3f} "
      f"(min {min(ratios):.3f}, max {max(ratios):.3f})")
json.dump(res, open(f"{out}/sampling_rates.json", "w"), indent=2)
PY
