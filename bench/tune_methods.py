"""Choose the learned methods' free step parameters on a validation split: the source of the registry's tuned defaults.

    python bench/tune_methods.py --network out/ct/runs/00000-oracle --measurements out/ct/val-meas \
        --out out/ct/tune [--methods ald,dps] [--record docs/tuning.json]

For each method (default: every learned method of reconstruct.py that applies to the measurements' task, except
msm), reconstruct.py runs the saved validation measurements (held-out examples that no test table uses:
`--save-measurements` of a split of its own) once per value of the method's free step parameter (GRIDS), at the
equal-compute budget of README's tables (about 1000 network evaluations: the registry's defaults, and BUDGET where
a method's default budget is another), everything else at its default. The value with the best mean PSNR wins; when
it lies at the end of its grid, the grid is extended by one value in that direction (at most EXTEND times), so the
choice is never a grid edge unless the step's range ends there. Writes OUT/tuning.json (every value's PSNR, SSIM,
data residual / noise and NFE, and the choice) and OUT/tuning.md; --record merges the choices into a JSON file keyed
by task (docs/tuning.json, from which training/sampling/methods.py TUNED_STEP_DEFAULTS is copied; a test checks the
two agree). Runs are cached in OUT by (method, value), so an interrupted tuning resumes where it stopped.
"""

import json
import math
import os
import shutil
import subprocess
import sys

import click
import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))
from data_consistency import residual_ratio  # noqa: E402

from dnnlib import atomic_write  # noqa: E402
from training.sampling import methods  # noqa: E402
from training.tasks import load_measurements  # noqa: E402

# Each method's free parameters: the values tried (dicts of its methods.GENERAL_STEP_DEFAULTS keys) and, for a method
# with one parameter, that parameter's bounds (the grid is extended past an edge it wins at); a list of such grids for a
# method with variants (pc-dps's laws, whose steps are in different units), each searched on its own. Fraction steps are
# Langevin steps per sigma^2, stable below about 2 / (1 + dc_boost ||A||^2); DPS's steps are per RMS residual. ALD and
# pc-jalal also try a stronger likelihood (dc_boost > 1, a tempered posterior that fits the data in fewer steps on
# ill-conditioned operators) at a step that keeps c (1 + dc_boost) below 2, extended towards stronger ones while the
# strongest wins (`extended`).
FLAGS = {"ald_step": "--ald-step", "corrector_step": "--corrector-step", "dc_boost": "--dc-boost",
         "pc_dps_law": "--pc-dps-law", "pc_dps_step": "--pc-dps-step", "dds_gamma": "--dds-gamma",
         "dps_step": "--dps-step", "padis_zeta": "--padis-zeta"}
BOOSTED = [(0.8, 1.0), (0.4, 1.0), (0.4, 3.0), (0.1, 15.0)]
GRIDS = {
    "ald": ([{"ald_step": c, "dc_boost": b} for c, b in BOOSTED], "boost"),
    "pc-jalal": ([{"corrector_step": c, "dc_boost": b} for c, b in BOOSTED], "boost"),
    "pc-projection": ([{"corrector_step": c} for c in (0.2, 0.4, 0.8)], (0, 2)),
    "pc-dps": [([{"pc_dps_law": "state", "pc_dps_step": v} for v in (0.01, 0.02, 0.04, 0.08, 0.16)], (0, None)),
               ([{"pc_dps_law": "score", "pc_dps_step": v} for v in (3.0, 10.0, 30.0)], (0, None))],
    "pc-dds": ([{"dds_gamma": v} for v in (3.0, 10.0, 30.0, 100.0)], (0, None)),
    "dds": ([{"dds_gamma": v} for v in (3.0, 10.0, 30.0, 100.0)], (0, None)),
    "dps": ([{"dps_step": v} for v in (0.01, 0.02, 0.04)], (0, None)),
    "padis": ([{"padis_zeta": v} for v in (0.005, 0.01, 0.02)], (0, None)),
}
BUDGET = {"dds": ["--dds-steps", "1000"]}  # DDS's own default is its paper's 50 NFE; the tables compare at ~1000
EXTEND = 3
# A tempered likelihood (dc_boost > 1) is chosen only when it beats the best value at dc_boost 1, the posterior
# itself, by more than this on validation (dB): 4 validation images do not resolve smaller differences.
TEMPER_MARGIN = 0.5


def extended(grid: list, best: int, bounds):
    """The values beyond the edge the best one sits at, or None where the range ends or the best is inside: for a
    one-parameter grid (options the same in every entry, such as a law, are kept) a geometric step; for the boosted
    pairs ('boost'), past the strongest likelihood, twice the boost at the same step (operators with ||A|| below 1,
    e.g. 4x super-resolution's 1/4, take much larger boosts before the step becomes unstable, which then shows as a
    worse PSNR and ends the search)."""
    if bounds == "boost":
        if best != len(grid) - 1:
            return None
        step, boost = grid[-1].items()
        return {step[0]: step[1], boost[0]: boost[1] * 2}
    key = next(k for k in grid[0] if len({g[k] for g in grid}) > 1)
    values, low, high = [g[key] for g in grid], *bounds
    if best == 0:  # the next value at the label's precision, so the recorded value is the one its label names
        value = float(text(values[0] ** 2 / values[1]))
        return {**grid[0], key: value} if value > low else None
    if best == len(grid) - 1:
        value = float(text(values[-1] ** 2 / values[-2]))
        return {**grid[0], key: value} if high is None or value < high else None
    return None


def text(value) -> str:
    return value if isinstance(value, str) else f"{value:.6g}"


def label(values: dict) -> str:
    return "-".join(f"{k}{text(v)}" for k, v in values.items())


def run_value(method: str, values: dict, network: str, measurements: str, out: str, seeds: str, device: str) -> dict:
    """One reconstruct.py run (cached in OUT) -> {values, psnr, ssim, residual, nfe, seconds}."""
    folder = os.path.join(out, "runs", f"{method}-{label(values)}")
    result_path = os.path.join(folder, "result.json")
    if os.path.exists(result_path):
        with open(result_path) as f:
            return json.load(f)
    shutil.rmtree(folder, ignore_errors=True)  # a run killed before its result: start it afresh
    command = [sys.executable, os.path.join(ROOT, "reconstruct.py"), "--network", network, "--measurements",
               measurements, "--outdir", folder, "--methods", method, "--seeds", seeds, "--device", device,
               *[a for k, v in values.items() for a in (FLAGS[k], text(v))], *BUDGET.get(method, [])]
    done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:  # reconstruct.py's own message (its progress bars are left out of the log)
        raise click.ClickException(f"reconstruct.py failed on {method} {label(values)}: "
                                   f"{done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ''}")
    with open(os.path.join(folder, "summary.json")) as f:
        summary = json.load(f)
    stats = summary["methods"][method]
    loaded = load_measurements(measurements)
    residuals = []
    for name in sorted(os.listdir(os.path.join(folder, "reconstructions"))):
        with np.load(os.path.join(folder, "reconstructions", name)) as arrays:
            image = torch.from_numpy(arrays[method]).reshape(1, -1, *arrays[method].shape[-2:])
        residuals.append(residual_ratio(loaded.examples[int(name.split("-")[0])], image, loaded.task))
    result = {"values": values, "psnr": stats["psnr_mean"], "psnr_std": stats["psnr_std"], "ssim": stats["ssim_mean"],
              "residual": float(np.mean(residuals)), "nfe": stats["nfe_mean"], "seconds": stats["seconds_mean"],
              "settings": summary.get("settings", {}).get(method)}
    with atomic_write(result_path, "w") as f:
        json.dump(result, f, indent=2)
    return result


def score(row: dict) -> float:
    """The mean validation PSNR; a diverged run (NaN or infinite) scores below every other."""
    return row["psnr"] if math.isfinite(row["psnr"]) else -math.inf


def tune(method: str, network, measurements, out, seeds, device, log) -> dict:
    """Each of the method's grids (GRIDS: one, or one per variant such as pc-dps's laws) searched and extended on its
    own; the best value over all of them is chosen."""
    grids = GRIDS[method] if isinstance(GRIDS[method], list) else [GRIDS[method]]
    rows, ordered = {}, []
    for grid, bounds in grids:
        grid = list(grid)
        for extension in range(EXTEND + 1):
            for values in grid:
                if label(values) not in rows:
                    r = rows[label(values)] = run_value(method, values, network, measurements, out, seeds, device)
                    log(f"{method} {label(values)}: PSNR {r['psnr']:.2f} dB, SSIM {r['ssim']:.4f}, residual / "
                        f"noise {r['residual']:.2f}, NFE {r['nfe']:.0f}")
            best = max(range(len(grid)), key=lambda i: score(rows[label(grid[i])]))
            nxt = extended(grid, best, bounds)
            if nxt is None or extension == EXTEND:
                break
            grid = [nxt, *grid] if best == 0 else [*grid, nxt]
        ordered += [{**rows[label(v)], "values": v} for v in grid]  # a cached run records the values as first run
    chosen = max(ordered, key=score)
    exact = [r for r in ordered if r["values"].get("dc_boost", 1.0) == 1.0]
    if exact and score(chosen) < score(max(exact, key=score)) + TEMPER_MARGIN:
        chosen = max(exact, key=score)  # the posterior itself unless tempering clearly wins
    return {"grid": ordered, "chosen": chosen["values"],
            "validation": {k: chosen[k] for k in ("psnr", "psnr_std", "ssim", "residual", "nfe")},
            "budget": BUDGET.get(method, [])}


def options_text(values: dict) -> str:
    return " ".join(f"{FLAGS[k]} {v if isinstance(v, str) else f'{v:.4g}'}" for k, v in values.items())


def markdown(report: dict) -> str:
    lines = [f"Validation: {report['measurements']} (task {report['task']}, {report['examples']} examples x seeds "
             f"{report['seeds']}), prior {report['network']}.", "",
             "| method | values tried (PSNR dB) | chosen | PSNR | SSIM | residual / noise | NFE |",
             "|---|---|---|---|---|---|---|"]
    for method, t in report["methods"].items():
        tried = ", ".join(f"{options_text(r['values'])} ({r['psnr']:.2f})" for r in t["grid"])
        v = t["validation"]
        lines.append(f"| {method} | {tried} | {options_text(t['chosen'])} | {v['psnr']:.2f} | {v['ssim']:.4f} | "
                     f"{v['residual']:.2f} | {v['nfe']:.0f} |")
    return "\n".join(lines) + "\n"


@click.command(help=__doc__)
@click.option("--network", required=True, help="The prior (snapshot or run directory)")
@click.option("--measurements", required=True, help="A saved VALIDATION measurement set (reconstruct.py "
              "--save-measurements)")
@click.option("--out", required=True, help="Folder for the runs and the report (reused to resume)")
@click.option("--methods", "method_list", default=None, help="Comma list [default: every tunable method of the task]")
@click.option("--seeds", default="0", show_default=True, help="Posterior sample seeds per example")
@click.option("--record", default=None, help="Merge the choices into this JSON file, keyed by task")
@click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True)
def main(network, measurements, out, method_list, seeds, record, device):
    loaded = load_measurements(measurements)
    task = loaded.task.task
    applicable = [m for m in GRIDS if task in methods.METHODS[m].tasks]
    chosen = applicable if method_list is None else [m.strip() for m in method_list.split(",") if m.strip()]
    unknown = [m for m in chosen if m not in applicable]
    if unknown:
        raise click.UsageError(f"--methods {','.join(unknown)}: expected some of {', '.join(applicable)} for task "
                               f"{task}.")
    os.makedirs(out, exist_ok=True)
    report = {"network": network, "measurements": measurements, "hash": loaded.hash(), "task": task,
              "examples": len(loaded.examples), "seeds": seeds, "methods": {}}
    report_path = os.path.join(out, "tuning.json")
    if os.path.exists(report_path):
        with open(report_path) as f:
            report["methods"] = json.load(f).get("methods", {})
    for method in chosen:
        report["methods"][method] = tune(method, network, measurements, out, seeds, device,
                                         lambda line: print(line, flush=True))
        with atomic_write(report_path, "w") as f:
            json.dump(report, f, indent=2)
    with atomic_write(os.path.join(out, "tuning.md"), "w") as f:
        f.write(markdown(report))
    print(markdown(report))
    if record is not None:
        recorded = {}
        if os.path.exists(record):
            with open(record) as f:
                recorded = json.load(f)
        entry = recorded.setdefault(task, {"validation": {}, "chosen": {}})
        entry["validation"].update({m: {"measurements": measurements, "hash": loaded.hash(), "network": network,
                                        "seeds": seeds, **{k: t[k] for k in ("budget", "validation")},
                                        "grid": [{k: r[k] for k in ("values", "psnr", "ssim", "residual", "nfe")}
                                                 for r in t["grid"]]}
                                    for m, t in report["methods"].items()})
        entry["chosen"].update({m: t["chosen"] for m, t in report["methods"].items()})
        with atomic_write(record, "w") as f:
            json.dump(recorded, f, indent=2, sort_keys=True)


if __name__ == "__main__":
    main()
