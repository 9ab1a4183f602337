"""One Markdown table from several reconstruct.py output folders, refusing to mix measurement sets.

    python bench/recon_table.py out/recon-msm=MSM out/recon-oracle=oracle [--allow-different-measurements]

Each argument is an --outdir of reconstruct.py, optionally `=LABEL` naming its prior. Rows: prior, method, PSNR /
SSIM / NMSE (mean +- std over example x seed rows), network evaluations and seconds per example, and the settings the
method ran with (from summary.json). The table is fair only if every folder reconstructed the same measurements:
their sha256 (summary.json 'measurements.hash') must agree, else this stops with one sentence.
"""

import argparse
import json
import os
import sys


def load(arg: str) -> tuple[str, dict]:
    folder, _, label = arg.partition("=")
    path = os.path.join(folder, "summary.json")
    try:
        with open(path) as f:
            summary = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        sys.exit(f"Error: {path} is not a reconstruct.py summary ({e}).")
    if not summary.get("methods"):
        sys.exit(f"Error: {path} has no metrics (stored measurements have no reference).")
    return label or os.path.basename(os.path.normpath(folder)), summary


def settings_text(settings: dict) -> str:
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in settings.items()
                     if k != "schedule")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", metavar="OUTDIR[=LABEL]")
    parser.add_argument("--allow-different-measurements", action="store_true")
    args = parser.parse_args()
    loaded = [load(a) for a in args.folders]
    hashes = {s["measurements"]["hash"] for _, s in loaded}
    if len(hashes) > 1 and not args.allow_different_measurements:
        sys.exit("Error: the folders reconstructed different measurement sets (sha256 "
                 + ", ".join(sorted(h[:12] for h in hashes)) + "); pass the same --measurements to every run.")
    print(f"Measurements: sha256 {', '.join(sorted(h[:12] for h in hashes))}, task "
          f"{json.dumps(loaded[0][1]['measurements']['task'], sort_keys=True)}\n")
    print("| prior | method | PSNR (dB) | SSIM | NMSE | NFE | s / example | settings |")
    print("|---|---|---|---|---|---|---|---|")
    for label, summary in loaded:
        for method, s in summary["methods"].items():
            prior = label if summary["settings"].get(method) is not None and method not in (
                "zero-filled", "fbp", "cs-tv", "cs-l1") else "none"
            print(f"| {prior} | {method} | {s['psnr_mean']:.2f} +- {s['psnr_std']:.2f} | {s['ssim_mean']:.3f} +- "
                  f"{s['ssim_std']:.3f} | {s['nmse_mean']:.4f} | {s['nfe_mean']:.0f} | {s['seconds_mean']:.1f} | "
                  f"{settings_text(summary['settings'].get(method) or {})} |")


if __name__ == "__main__":
    main()
