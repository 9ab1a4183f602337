"""MSM against the clean-data oracle: posterior quality per training image and per network evaluation (issue 14), on
phantom MRI at R = 4 with classical CS on the same measurements (--task mri), or on phantom images with MSM trained on
box-masked images and the posterior filling a centred box hole (--task box).

    python bench/msm_vs_oracle.py --out out/msm-vs-oracle --data out/quickstart/mri-train \\
        --test-data out/quickstart/mri-test --test-measurements out/quickstart/measurements-r4 \\
        --run msm-image=out/quickstart/runs/00000-mri-train-uncond-ddpmpp-edm-gpus1-batch32-fp32-msm-r4 \\
        --run oracle=out/quickstart/runs/00001-mri-train-uncond-ddpmpp-edm-gpus1-batch32-fp32-oracle \\
        --kimg 10,20,30 --lock /tmp/heavy.lock
    python bench/msm_vs_oracle.py --out out/mvo-box --task box --kimg 10,20,30
    python bench/msm_vs_oracle.py --out out/mvo-edm2 --data out/quickstart/mri-train \
        --test-data out/quickstart/mri-test --test-measurements out/quickstart/measurements-r4 \
        --models msm-image,oracle --kimg 10,20,30 --recipe edm2 --compare out/msm-vs-oracle   # the two recipes
    python bench/msm_vs_oracle.py --out /tmp/mvo --quick       # tiny end-to-end run (tests/test_msm_vs_oracle.py)

Every step is skipped when its output exists, so a re-run continues, and a larger --kimg only adds what is missing.
1. Data (unless given): random-ellipse phantoms, simulated 8-coil MRI (the quickstart's recipe): a training set and
   a held-out set.
2. Measurements, made once (reconstruct.py --save-measurements) so every row sees identical data: the test set is
   held-out slices 0..n-1 (or --test-measurements, e.g. the quickstart's), the validation set slices n..2n-1 of the
   same held-out data. Settings (K, levels, dc-step, the skip space) are chosen on validation only; the test
   measurements only ever appear in the table.
3. Training, the --models with the quickstart's network, optimiser and schedule on the same training data. MRI:
   'msm-image' (MSM loss, the reference's image-space skip), 'msm-measurement' (MSM loss, --skip-space measurement),
   'msm-vp200' (MSM loss, the reference's VP-200 training sigmas: not trained by default) and 'oracle' (EDM loss on
   the clean images). Box: 'msm' (MSM loss, box law p 0.4, fixed masks), 'msm-mask-channel' (the same with the mask
   as an input channel), 'msm-vp200' and 'oracle'. --recipe (RECIPES): 'edm' (the default), EDM's learning rate
   constant after its ramp-up (1 kimg here) and a fixed EMA half-life; 'edm2', EDM2's inverse square root decay
   and post-hoc EMA; 'isqrt-b16', the decay at batch 16 with the fixed EMA. None depends on the planned duration,
   so one run evaluated at its snapshots after 10, 20, 30 ... kimg is the same as separate runs of those lengths;
   each model is trained once to the largest budget (a given --run is continued with train.py --resume when it is
   shorter).
4. Evaluation at every budget on test and validation: under 'edm2' every post-hoc EMA length of the recipe is
   reconstructed (posthoc_ema.py) and evaluated on validation, and the test row uses the best one.
   reconstruct.py's MSM posterior sampler with its defaults
   (MRI: K 3 for MSM models, dc-step 2; box: K 2, dc-step 1.75; K 1 for the oracle; the VP-200 grid; eta 0.85), and
   zero-filled (and for MRI cs-tv and cs-l1) on the same measurements (the horizontal lines of the plot).
5. Quality per network evaluation, on validation, for the best MSM model and the oracle at the largest budget:
   levels x K of the MSM posterior sampler (the oracle: K 1 on the respaced DDPM grid), its Heun variant
   (--msm-solver heun: EDM's rho grid, 2 N - 1 evaluations of K subsets), and the dc-step.
6. results.md (the table, with each row's settings and the commands), results.json, psnr_vs_kimg.png and
   psnr_vs_nfe.png in --out.

Each train.py / reconstruct.py call runs as its own process, under `flock --lock` when given, so other heavy jobs
interleave between calls.
"""

import glob
import json
import os
import shlex
import shutil
import subprocess
import sys

import click

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from dnnlib import UserError  # noqa: E402
from torch_utils.misc import parse_int_list  # noqa: E402
from torch_utils.plot import line_plot  # noqa: E402
from training import snapshot as checkpoint  # noqa: E402

LINES_R4 = ["--loss", "msm", "--mask", "lines-random", "--accel", "4"]
BOX = ["--loss", "msm", "--mask", "box", "--p", "0.4"]
# Per task: the models (train.py options; the last is --desc, which names the run), those trained by default, how the
# held-out measurements are made, the classical baselines (and which are the plot's horizontal lines), and
# reconstruct.py's defaults of K and the dc-step for the task (so those sweep points reuse the main rows).
TASKS = {
    "mri": dict(models={"msm-image": [*LINES_R4, "--desc", "r4"],
                        "msm-measurement": [*LINES_R4, "--skip-space", "measurement", "--desc", "r4-consistent"],
                        "msm-vp200": [*LINES_R4, "--sigma-dist", "vp200", "--desc", "r4-vp200"],
                        "oracle": ["--loss", "edm", "--desc", "oracle"]},
                default_models=("msm-image", "msm-measurement", "oracle"),
                measure=["--task", "mri", "--accel", 4, "--mask-seed", 1], baselines=("zero-filled", "cs-tv", "cs-l1"),
                hlines=("cs-tv", "cs-l1"), subsets=3, dc_step=2.0, title="phantom MRI R = 4"),
    "box": dict(models={"msm": [*BOX, "--desc", "box"],
                        "msm-mask-channel": [*BOX, "--mask-channel", "--desc", "box-mc"],
                        "msm-vp200": [*BOX, "--sigma-dist", "vp200", "--desc", "box-vp200"],
                        "oracle": ["--loss", "edm", "--desc", "oracle"]},
                default_models=("msm", "msm-mask-channel", "oracle"),
                measure=["--task", "box", "--mask-seed", 1], baselines=("zero-filled",), hlines=("zero-filled",),
                subsets=2, dc_step=1.75, title="box inpainting, 16 px hole"),
}
# Training recipes (--recipe): train.py options added to every model's, and the post-hoc EMA lengths (sigma_rel)
# evaluated at each budget. 'edm': EDM's constant rate after the ramp-up and the network options' EMA (half-life
# --ema), one network per budget. 'edm2': EDM2's inverse square root decay after 10 kimg (training/lr_schedules.py)
# and power-function EMA profiles; at each budget every sigma_rel of `posthoc` is reconstructed (posthoc_ema.py) and
# evaluated on validation, and the test row uses the one that validation chose. 'isqrt-b16': the decay with half the
# batch (twice the optimiser steps per training image) and the network options' EMA. All are anytime recipes
# (nothing depends on the planned duration), so one run evaluated at its snapshots is a run of each length.
RECIPES = {"edm": dict(train=[], posthoc=()),
           "edm2": dict(train=["--lr-schedule", "isqrt", "--ema-profiles", "0.05,0.1"],
                        posthoc=(0.03, 0.05, 0.1, 0.15)),
           "isqrt-b16": dict(train=["--lr-schedule", "isqrt", "--batch", "16"], posthoc=())}
FULL = dict(num=2000, held_out=16, resolution=32, kimg="10,20,30", tick=2.0, snap=5, steps=200,
            nfe_levels=(25, 50, 100, 200), nfe_subsets=(1, 2, 3, 4, 6, 8), heun_steps=(10, 25, 50, 100),
            dc_steps=(1.0, 1.5, 2.0), cs_iters=None,
            network=["--arch", "ddpmpp", "--cbase", "32", "--cres", "1,2,2", "--blocks", "2", "--attn", "16",
                     "--batch", "32", "--lr", "2e-3", "--lr-rampup", "0.001", "--ema", "0.002", "--dropout", "0",
                     "--channels-last"])
QUICK = dict(num=48, held_out=4, resolution=16, kimg="0.064,0.128", tick=0.032, snap=2, steps=4, nfe_levels=(2, 4),
             nfe_subsets=(1, 2), heun_steps=(2,), dc_steps=(1.0, 2.0), cs_iters=20,
             network=["--arch", "ddpmpp", "--cbase", "8", "--cres", "1,2", "--blocks", "1", "--attn", "",
                      "--batch", "8", "--lr", "2e-3", "--lr-rampup", "0.00002", "--ema", "0.0001", "--dropout", "0",
                      "--workers", "0"])


class Bench:
    def __init__(self, out: str, lock: str | None, log):
        self.out, self.lock, self.log, self.commands = out, lock, log, []

    def run(self, script: str, args: list, heavy: bool = True):
        """python script args, in the repository, under flock when a lock is given; stops the bench on failure."""
        cmd = [sys.executable, script, *[str(a) for a in args]]
        if heavy and self.lock:
            cmd = ["flock", self.lock, *cmd]
        line = " ".join(shlex.quote(c) for c in cmd)
        self.commands.append(line)
        self.log(f"$ {line}")
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            raise click.ClickException(f"{script} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n"
                                       f"{proc.stderr[-2000:]}")


def snapshots(run_dir: str) -> dict[float, str]:
    """kimg -> network snapshot path of a run directory."""
    found = {}
    for path in glob.glob(os.path.join(glob.escape(run_dir), "network-snapshot-*.pt")):
        nimg = checkpoint.progress_of(path, "network-snapshot")  # -000060.pt at whole kimg, -000010.112.pt else
        if nimg is not None:
            found[nimg / 1000] = path
    return found


def snapshot_for(run_dir: str, budget: float, tick: float) -> str | None:
    """The snapshot written at `budget` kimg: the first tick end at or after it (within one tick)."""
    near = [k for k in snapshots(run_dir) if budget - 1e-9 <= k < budget + tick]
    return snapshots(run_dir)[min(near)] if near else None


def newest_run(outdir: str, desc_suffix: str) -> str | None:
    runs = sorted(glob.glob(os.path.join(glob.escape(outdir), f"[0-9][0-9][0-9][0-9][0-9]-*-{desc_suffix}")))
    return runs[-1] if runs else None


def training_loss(run_dir: str, kimg: float) -> float | None:
    """The logged training loss of the tick that ended at `kimg` (stats.jsonl), or None."""
    path = os.path.join(run_dir, "stats.jsonl")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    rows = [r for r in rows if abs(r["kimg"] - kimg) < 1e-6]
    return rows[-1]["loss"] if rows else None


def fit_error(posthoc_snapshot: str) -> float:
    """The relative fit error posthoc_ema.py recorded in a reconstructed snapshot's config."""
    return float(checkpoint.load_snapshot(posthoc_snapshot)[1]["source"]["fit_error"])


def summary_of(folder: str) -> dict:
    with open(os.path.join(folder, "summary.json")) as f:
        return json.load(f)


def method_row(folder: str, method: str) -> dict:
    summary = summary_of(folder)
    s = summary["methods"][method]
    return {"psnr": s["psnr_mean"], "psnr_std": s["psnr_std"], "ssim": s["ssim_mean"], "ssim_std": s["ssim_std"],
            "nfe": s["nfe_mean"], "seconds": s["seconds_mean"], "settings": summary["settings"].get(method) or {},
            "hash": summary["measurements"]["hash"]}


@click.command()
@click.option("--out", required=True, help="Output folder (data, runs, measurements, evaluations, results)")
@click.option("--quick", is_flag=True, help="A tiny end-to-end configuration (16 px, a few steps; for the test)")
@click.option("--task", type=click.Choice(list(TASKS)), default="mri", show_default=True,
              help="mri: multi-coil phantom MRI at R = 4; box: phantom images, MSM trained on box-masked images, "
                   "posterior on a centred box hole")
@click.option("--models", "model_list", default=None,
              help="Comma list of the task's models to train and evaluate  [default: mri "
                   f"{','.join(TASKS['mri']['default_models'])}; box {','.join(TASKS['box']['default_models'])}; "
                   "also msm-vp200 (the reference's VP-200 training sigmas)]")
@click.option("--data", default=None, help="Training records (MRI records / image zip) [default: simulated in --out]")
@click.option("--test-data", default=None, help="Held-out records [default: simulated in --out]")
@click.option("--test-measurements", default=None, help="Saved test measurements [default: made from --test-data]")
@click.option("--run", "runs", multiple=True, metavar="MODEL=RUN_DIR",
              help="An existing run of a model to evaluate and continue")
@click.option("--kimg", default=None, help="Budgets in kimg, multiples of the snapshot interval  [default: 10,20,30]")
@click.option("--extend", default="", help="Comma list of models trained and evaluated on to --extend-kimg as well")
@click.option("--extend-kimg", default="", help="Further budgets for the --extend models, e.g. 40,50,60")
@click.option("--val-kimg", default=None, help="Budgets evaluated on validation too  [default: all]")
@click.option("--num", "num_slices", type=click.IntRange(min=1), default=None,
              help="Slices per split (test and validation)  [default: 8]")
@click.option("--lock", default=None, help="Run each heavy call under `flock LOCK`")
@click.option("--no-nfe", is_flag=True, help="Skip the quality-per-NFE and dc-step sweeps")
@click.option("--nfe-subsets", default=None, help="K values of the levels x K sweep  [default: 1,2,3,4,6,8]")
@click.option("--nfe-kimg", type=float, default=None,
              help="Budget of the NFE and dc-step sweeps  [default: the largest of --kimg]")
@click.option("--recipe", "recipe_name", type=click.Choice(list(RECIPES)), default="edm", show_default=True,
              help="Training recipe of every model (RECIPES): edm (constant rate, fixed EMA), edm2 (inverse square "
                   "root decay, post-hoc EMA chosen on validation per budget) or isqrt-b16 (the decay at batch 16, "
                   "fixed EMA); use one --out per recipe")
@click.option("--compare", multiple=True, metavar="OUT",
              help="Another recipe's --out: its curves are drawn beside these in the kimg plots (repeatable)")
def main(out, quick, task, model_list, data, test_data, test_measurements, runs, kimg, extend, extend_kimg, val_kimg,
         num_slices, lock, no_nfe, nfe_subsets, nfe_kimg, recipe_name, compare):
    p, t = dict(QUICK if quick else FULL), TASKS[task]
    recipe = RECIPES[recipe_name]
    posthoc = recipe["posthoc"][1:3] if quick else recipe["posthoc"]  # quick: two lengths
    compared = []
    for folder in compare:
        try:
            with open(os.path.join(folder, "results.json")) as f:
                compared.append(json.load(f))
        except (OSError, ValueError) as e:
            raise click.BadParameter(f"expected a finished bench folder with results.json, got {folder} ({e})",
                                     param_hint="--compare") from None
    if nfe_subsets is not None:
        try:
            p["nfe_subsets"] = tuple(parse_int_list(nfe_subsets, "--nfe-subsets", minimum=1))
        except UserError as e:
            raise click.UsageError(str(e)) from None
    models = tuple(m for m in (model_list or ",".join(t["default_models"])).split(",") if m)
    if set(models) - set(t["models"]) or "oracle" not in models or len(models) < 2:
        msm_models = ", ".join(m for m in t["models"] if m != "oracle")
        raise click.BadParameter(f"expected 'oracle' and at least one of {msm_models} for --task {task}, got "
                                 f"{model_list}", param_hint="--models")
    model_options, baselines = t["models"], t["baselines"]
    task_subsets, task_dc_step = t["subsets"], t["dc_step"]
    num_slices = num_slices or (2 if quick else 8)
    budgets = [float(b) for b in (kimg or p["kimg"]).split(",")]
    extended = [m for m in extend.split(",") if m]
    if set(extended) - set(models):
        raise click.BadParameter(f"expected models among {', '.join(models)}, got {extend}", param_hint="--extend")
    val_budgets = None if val_kimg is None else [float(b) for b in val_kimg.split(",")]
    if posthoc and val_budgets is not None:
        raise click.BadParameter(f"--recipe {recipe_name} chooses each budget's EMA length on validation, so every "
                                 "budget is validated", param_hint="--val-kimg")
    model_budgets = {m: budgets + ([float(b) for b in extend_kimg.split(",") if b] if m in extended else [])
                     for m in models}
    os.makedirs(out, exist_ok=True)
    log_file = open(os.path.join(out, "bench.log"), "a")

    def log(msg: str):
        print(msg, flush=True)
        log_file.write(msg + "\n")
        log_file.flush()

    bench = Bench(out, lock, log)
    given = dict(r.split("=", 1) for r in runs)
    unknown = set(given) - set(models)
    if unknown:
        raise click.BadParameter(f"unknown model(s) {', '.join(sorted(unknown))}; expected {', '.join(models)}",
                                 param_hint="--run")

    # 1. Data.
    if data is None or test_data is None:
        for split, count, seed in (("train", p["num"], 0), ("test", p["held_out"], 1)):
            zip_path, mri_path = os.path.join(out, f"phantoms-{split}.zip"), os.path.join(out, f"mri-{split}")
            if not os.path.exists(zip_path):
                bench.run("dataset_tool.py", ["phantoms", "--dest", zip_path, "--num", count, "--resolution",
                                              p["resolution"], "--seed", seed], heavy=False)
            if task == "mri" and not os.path.exists(mri_path):
                bench.run("dataset_tool.py", ["simulate-mri", "--source", zip_path, "--dest", mri_path, "--coils", 8,
                                              "--seed", seed], heavy=False)
        prefix = "mri-" if task == "mri" else "phantoms-"
        suffix = "" if task == "mri" else ".zip"
        data = data or os.path.join(out, f"{prefix}train{suffix}")
        test_data = test_data or os.path.join(out, f"{prefix}test{suffix}")

    # 2. Measurements (test and validation), and the baselines on them.
    splits = {"test": test_measurements or os.path.join(out, "measurements-test"),
              "val": os.path.join(out, "measurements-val")}
    first = {"test": 0, "val": num_slices}
    cs = ["--cs-tv-iters", p["cs_iters"], "--cs-l1-iters", p["cs_iters"]] if p["cs_iters"] and task == "mri" else []
    for split, path in splits.items():
        folder = os.path.join(out, "eval", split, "baselines")
        if not os.path.exists(os.path.join(path, "measurements.json")):
            bench.run("reconstruct.py", ["--data", test_data, *t["measure"], "--first", first[split], "--num",
                                         num_slices, "--save-measurements", path,
                                         "--outdir", folder, "--methods", ",".join(baselines), *cs])
        elif not os.path.exists(os.path.join(folder, "summary.json")):
            # A run stopped after saving the measurements left its partial outputs under the --data command's
            # settings; reconstruct.py refuses to mix a second command's results into them, so start the folder anew.
            shutil.rmtree(folder, ignore_errors=True)
            bench.run("reconstruct.py", ["--measurements", path, "--outdir", folder, "--methods",
                                         ",".join(baselines), *cs])

    # 3. Training, one run per model to the largest budget.
    def desc(model: str) -> str:
        return model_options[model][-1] + ("" if recipe_name == "edm" else f"-{recipe_name}")

    run_dirs = {}
    for model in models:
        run_dir = given.get(model) or newest_run(os.path.join(out, "runs"), desc(model))
        model_top = max(model_budgets[model])
        if run_dir is None or snapshot_for(run_dir, model_top, p["tick"]) is None:
            args = ["--outdir", os.path.join(out, "runs"), "--data", data, *p["network"], *model_options[model][:-2],
                    "--desc", desc(model), *recipe["train"], "--duration", model_top / 1000, "--tick", p["tick"],
                    "--snap", p["snap"], "--dump", p["snap"]]
            bench.run("train.py", args + (["--resume", run_dir] if run_dir else []))
            run_dir = run_dir or newest_run(os.path.join(out, "runs"), desc(model))
        run_dirs[model] = run_dir

    # 4. Posterior quality per budget, on test and validation.
    def evaluate(split: str, name: str, snapshot: str, extra: list) -> str:
        """reconstruct.py's MSM posterior sampler (its defaults, --steps from the configuration, then `extra`) into
        eval/SPLIT/NAME, unless that folder already holds a summary."""
        folder = os.path.join(out, "eval", split, name)
        if not os.path.exists(os.path.join(folder, "summary.json")):
            bench.run("reconstruct.py", ["--network", snapshot, "--measurements", splits[split], "--outdir", folder,
                                         "--methods", "msm", "--steps", p["steps"], *extra])
        return folder

    def posthoc_snapshots(model: str, budget: float, snapshot: str) -> list:
        """[(sigma_rel, path)]: the run's post-hoc EMAs at the network snapshot of `budget`, made once."""
        folder = os.path.join(out, "posthoc", f"{model}-{budget:g}")
        found = {s: glob.glob(os.path.join(glob.escape(folder), f"posthoc-ema-{s:g}-*.pt")) for s in posthoc}
        if not all(found.values()):
            kimg_at = checkpoint.progress_of(snapshot, "network-snapshot") / 1000
            bench.run("posthoc_ema.py", ["--run", run_dirs[model], "--kimg", f"{kimg_at:g}", "--sigma-rel",
                                         ",".join(f"{s:g}" for s in posthoc), "--outdir", folder])
            found = {s: glob.glob(os.path.join(glob.escape(folder), f"posthoc-ema-{s:g}-*.pt")) for s in posthoc}
        return [(s, paths[0]) for s, paths in found.items()]

    # The network of each (model, budget): the snapshot, or under a post-hoc recipe the EMA length that validation
    # chose (every length is evaluated on validation; the test set sees only the chosen one).
    chosen = {}
    for model in models:
        for budget in model_budgets[model]:
            snapshot = snapshot_for(run_dirs[model], budget, p["tick"])
            if snapshot is None:
                raise click.ClickException(f"{run_dirs[model]} has no snapshot at {budget:g} kimg (snapshots: "
                                           f"{sorted(snapshots(run_dirs[model]))}).")
            entry = {"name": f"{model}-{budget:g}", "network": snapshot, "snapshot": snapshot, "ema": None,
                     "ema_sweep": []}
            if posthoc:
                sweep = [(s, f"{model}-{budget:g}-ema{s:g}", path) for s, path in
                         posthoc_snapshots(model, budget, snapshot)]
                psnrs = [method_row(evaluate("val", name, path, []), "msm")["psnr"] for _, name, path in sweep]
                best = max(range(len(sweep)), key=lambda i: psnrs[i])
                # The fit error says how far a reconstructed network is from the EMA it is named after (lengths
                # outside the tracked profiles, early in a run, can be 10-20% off).
                entry.update(ema=sweep[best][0], name=sweep[best][1], network=sweep[best][2],
                             ema_sweep=[{"sigma_rel": s, "psnr": v, "fit_error": fit_error(path)}
                                        for (s, _, path), v in zip(sweep, psnrs)])
            chosen[model, budget] = entry

    results = {"task": task, "recipe": recipe_name, "models": models, "budgets": model_budgets, "runs": run_dirs,
               "rows": [], "nfe": [], "heun": [], "dc_step": [], "baselines": {}}
    for split in splits:
        folder = os.path.join(out, "eval", split, "baselines")
        results["baselines"][split] = {m: method_row(folder, m) for m in baselines}
        for model in models:
            for budget in model_budgets[model]:
                if split == "val" and val_budgets is not None and budget not in val_budgets:
                    continue
                c = chosen[model, budget]
                folder = evaluate(split, c["name"], c["network"], [])
                results["rows"].append({"split": split, "model": model, "kimg": budget, "snapshot": c["network"],
                                        "ema": c["ema"], "ema_sweep": c["ema_sweep"],
                                        "train_loss": training_loss(run_dirs[model], checkpoint.progress_of(
                                            c["snapshot"], "network-snapshot") / 1000),
                                        **method_row(folder, "msm")})

    for split in splits:
        hashes = {r["hash"] for r in results["rows"] if r["split"] == split}
        hashes |= {r["hash"] for r in results["baselines"][split].values()}
        if len(hashes) != 1:
            raise click.ClickException(f"The {split} rows reconstructed different measurement sets ({hashes}).")

    # 5. Quality per NFE and the dc-step, on validation, at the largest budget.
    def best_msm(budget: float) -> str:
        """The MSM model with the best validation PSNR at `budget`, or if that was not validated for both, at the
        largest budget validated for both MSM models."""
        rows = [r for r in results["rows"] if r["split"] == "val" and r["model"] != "oracle"]
        shared = [k for k in {r["kimg"] for r in rows} if sum(r["kimg"] == k for r in rows) == len(models) - 1]
        at = budget if budget in shared else max(shared)
        return max((r for r in rows if r["kimg"] == at), key=lambda r: r["psnr"])["model"]

    if not no_nfe:
        sweep_kimg = max(budgets) if nfe_kimg is None else nfe_kimg
        if sweep_kimg not in budgets:
            raise click.BadParameter(f"expected one of the --kimg budgets {budgets}, got {nfe_kimg:g}",
                                     param_hint="--nfe-kimg")
        best = best_msm(sweep_kimg)
        for model in (best, "oracle"):
            model_top = sweep_kimg
            default_name, snapshot = chosen[model, model_top]["name"], chosen[model, model_top]["network"]
            default_subsets = 1 if model == "oracle" else task_subsets
            for subsets in p["nfe_subsets"] if model != "oracle" else (1,):
                for levels in p["nfe_levels"]:
                    name = (default_name if (levels, subsets) == (p["steps"], default_subsets) else
                            f"nfe-{model}-{model_top:g}-L{levels}-K{subsets}")
                    folder = evaluate("val", name, snapshot, ["--steps", levels, "--subsets", subsets])
                    results["nfe"].append({"model": model, "kimg": model_top, "levels": levels, "K": subsets,
                                           **method_row(folder, "msm")})
            for steps in p["heun_steps"]:  # EDM's Heun ODE sampler on its rho grid, the default K
                folder = evaluate("val", f"heun-{model}-{model_top:g}-N{steps}", snapshot,
                                  ["--msm-solver", "heun", "--steps", steps])
                results["heun"].append({"model": model, "kimg": model_top, "steps": steps, "K": default_subsets,
                                        **method_row(folder, "msm")})
            for dc_step in sorted(set(p["dc_steps"]) | {task_dc_step}):  # the task default among them
                name = (default_name if dc_step == task_dc_step else
                        f"dc-{model}-{model_top:g}-{dc_step:g}")
                folder = evaluate("val", name, snapshot, ["--dc-step", dc_step])
                results["dc_step"].append({"model": model, "kimg": model_top, "dc_step": dc_step,
                                           **method_row(folder, "msm")})

    # 6. Table, JSON and plots.
    results["commands"] = bench.commands
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(report(results, run_dirs))
    for split in splits:
        series = {m: [(r["kimg"], r["psnr"]) for r in results["rows"] if r["split"] == split and r["model"] == m]
                  for m in models}
        if compared:  # every recipe's curves, each named by its recipe
            series = {f"{m} ({recipe_name})": points for m, points in series.items()}
            for other in compared:
                for m in other["models"]:
                    series[f"{m} ({other.get('recipe', 'edm')})"] = [
                        (r["kimg"], r["psnr"]) for r in other["rows"] if r["split"] == split and r["model"] == m]
        hlines = {m: results["baselines"][split][m]["psnr"] for m in t["hlines"]}
        line_plot(os.path.join(out, f"psnr_vs_kimg_{split}.png"), f"Posterior PSNR vs kimg, {t['title']} ({split})",
                  "kimg", "PSNR (dB)", series, hlines)
    if results["nfe"]:
        series = {}
        for r in results["nfe"]:
            series.setdefault(f"{r['model']} K{r['K']}", []).append((r["nfe"], r["psnr"]))
        for r in results["heun"]:
            series.setdefault(f"{r['model']} Heun K{r['K']}", []).append((r["nfe"], r["psnr"]))
        hlines = {m: results["baselines"]["val"][m]["psnr"] for m in t["hlines"]}
        line_plot(os.path.join(out, "psnr_vs_nfe.png"), f"Posterior PSNR vs NFE, {t['title']} (val)",
                  "NFE per example (log)", "PSNR (dB)", series, hlines, log_x=True)
    log(f"Wrote {os.path.join(out, 'results.md')} and the plots.")


def report(results: dict, run_dirs: dict) -> str:
    lines = ["| split | prior | kimg | PSNR (dB) | SSIM | NFE | train loss | settings |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        loss = f"{r['train_loss']:.0f}" if r["train_loss"] is not None else ""
        ema = "" if r.get("ema") is None else (
            f"post-hoc EMA sigma_rel {r['ema']:g} (validation, relative fit error: "
            + ", ".join(f"{e['sigma_rel']:g} {e['psnr']:.2f} ({e['fit_error']:.0e})" for e in r["ema_sweep"]) + "), ")
        lines.append(f"| {r['split']} | {r['model']} | {r['kimg']:g} | {r['psnr']:.2f} +- {r['psnr_std']:.2f} | "
                     f"{r['ssim']:.3f} | {r['nfe']:.0f} | {loss} | {ema}{settings_text(r['settings'])} |")
    for split, rows in results["baselines"].items():
        for method, r in rows.items():
            lines.append(f"| {split} | {method} | | {r['psnr']:.2f} +- {r['psnr_std']:.2f} | {r['ssim']:.3f} | 0 | | "
                         f"{settings_text(r['settings'])} |")
    text = "\n".join(lines) + "\n"
    if results["nfe"]:
        text += "\nQuality per NFE (validation):\n\n| prior | levels | K | NFE | PSNR (dB) | SSIM | s / example |\n"
        text += "|---|---|---|---|---|---|---|\n"
        for r in results["nfe"]:
            text += (f"| {r['model']} | {r['levels']} | {r['K']} | {r['nfe']:.0f} | {r['psnr']:.2f} | {r['ssim']:.3f} "
                     f"| {r['seconds']:.1f} |\n")
        if results["heun"]:
            text += ("\nHeun variant (validation; EDM's rho grid, --msm-solver heun, 2 N - 1 evaluations of K "
                     "subsets):\n\n| prior | Heun steps N | K | NFE | PSNR (dB) | SSIM | s / example |\n")
            text += "|---|---|---|---|---|---|---|\n"
            for r in results["heun"]:
                text += (f"| {r['model']} | {r['steps']} | {r['K']} | {r['nfe']:.0f} | {r['psnr']:.2f} | "
                         f"{r['ssim']:.3f} | {r['seconds']:.1f} |\n")
        text += "\ndc-step (validation, default levels and K):\n\n| prior | dc-step | PSNR (dB) | SSIM |\n"
        text += "|---|---|---|---|\n"
        for r in results["dc_step"]:
            text += f"| {r['model']} | {r['dc_step']:g} | {r['psnr']:.2f} | {r['ssim']:.3f} |\n"
    text += f"\nRecipe: {results['recipe']} (RECIPES in bench/msm_vs_oracle.py).\n"
    text += "\nRuns:\n\n" + "\n".join(f"- {m}: {d}" for m, d in run_dirs.items()) + "\n"
    text += ("\nTraining loss: the logged loss of the tick that ended at the snapshot. The measurement-space skip's "
             "loss carries a constant the network cannot change (noise outside range(P T)), so it is not comparable "
             "with the image-space loss.\n")
    return text


def settings_text(settings: dict) -> str:
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in settings.items()
                     if k != "schedule")


if __name__ == "__main__":
    main()
