"""Reporting of reconstructions: the images the metrics see, metric rows under each convention, panels, the
summary table, and the files metrics.csv, summary.json and volumes.csv (reconstruct.py's outputs).

The metrics themselves (PSNR, SSIM, NMSE and the MRI conventions) are training/metrics.py's; this module only says
which images they compare and where the numbers go.
"""

import csv
import json
import math
import os

import numpy as np
import PIL.Image
import PIL.ImageDraw
import torch

from dnnlib import UserError
from training.metrics import (
    CONVENTION_TEXT,
    convention_row,
    fastmri_volume_metrics,
    quality_row,
    reference_max,
    rss_images,
)
from training.operators import mri_magnitude
from training.tasks import NOISE_CONVENTION

METRIC_CONVENTIONS = (
    "MRI: magnitude images |x| of the coil-combined complex image (T^H k for the reference, the method's image for a "
    "reconstruction), no further normalisation; data range = max of the reference magnitude (fastMRI).",
    "Images: pixel values mapped from [-1, 1] to [0, 1] by (x + 1) / 2, reconstructions clipped to [0, 1]; "
    "data range = 1.",
    "PSNR = 10 log10(data_range^2 / MSE) (skimage.metrics.peak_signal_noise_ratio).",
    "SSIM: skimage.metrics.structural_similarity defaults as in fastMRI (7x7 uniform window, K1 0.01, K2 0.03, sample "
    "covariance), channels averaged.",
    "NMSE = ||reference - estimate||^2 / ||reference||^2 (fastMRI).",
    "nfe: network evaluations per example (images through the network; DPS's also run backward); seconds: wall time "
    "per example (a batch's time over its pairs).",
)
ERROR_GAIN = 4  # the |error| panel shows 4 |reference - estimate| / data range, so small errors stay visible


def display_images(images: torch.Tensor, task: str) -> torch.Tensor:
    """Images as the metrics see them: MRI magnitudes (N, 1, H, W), natural images in [0, 1]."""
    images = images.detach().to("cpu", torch.float64)
    return mri_magnitude(images) if task == "mri" else ((images + 1) / 2).clamp(0, 1)


def metric_rows(reference: torch.Tensor, estimate: torch.Tensor, task: str) -> dict:
    return quality_row(reference, estimate, reference_max(reference) if task == "mri" else 1.0)


def volume_rows(examples: dict, volumes: dict, outdir: str, seeds: list[int], methods: list[str]) -> list[dict]:
    """fastMRI's per-volume metrics of every (volume, seed, method), from the saved reconstructions."""
    rows = []
    for volume in sorted(set(volumes.values())):
        members = sorted(i for i in examples if volumes[i] == volume)
        reference = torch.cat([rss_images(examples[i].reference, examples[i].maps) for i in members])
        for seed in seeds:
            for m in methods:
                estimate = torch.cat([rss_images(torch.from_numpy(np.load(os.path.join(
                    outdir, "reconstructions", f"{i:05d}-{seed:06d}.npz"))[m])[None], examples[i].maps)
                    for i in members])
                rows.append({"volume": volume, "slices": len(members), "seed": seed, "method": m,
                             **fastmri_volume_metrics(reference[:, 0], estimate[:, 0])})
    return rows


def tile(image: torch.Tensor, scale: float, label: str, zoom: int) -> np.ndarray:
    """(C, H, W) float -> uint8 RGB tile (zoom H + 12, zoom W, 3) with `label` in a strip above."""
    pixels = (image / scale).clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    pixels = np.repeat(np.repeat(pixels, zoom, axis=0), zoom, axis=1)
    pixels = np.repeat(pixels, 3, axis=2) if pixels.shape[2] == 1 else pixels
    strip = PIL.Image.new("RGB", (pixels.shape[1], 12))
    PIL.ImageDraw.Draw(strip).text((2, 0), label, fill=(255, 255, 255))
    return np.concatenate([np.asarray(strip), pixels], axis=0)


def save_panel(path: str, measurement: torch.Tensor, results: dict, reference: torch.Tensor | None, task: str,
               learned: tuple = ()):
    """Measurement, each method, reference and |error| of the first learned method (a name in `learned`, or the
    first method), in a row. MRI tiles are scaled by the reference maximum (the zero-filled maximum without a
    reference)."""
    scale = float(reference_max(reference)) if task == "mri" and reference is not None else \
        float(measurement.max()) if task == "mri" else 1.0
    scale = scale if scale > 0 else 1.0
    zoom = max(1, math.ceil(96 / measurement.shape[-1]))
    tiles = [tile(measurement[0], scale, "measurement", zoom)]
    tiles += [tile(image[0], scale, name, zoom) for name, image in results.items()]
    if reference is not None:
        tiles.append(tile(reference[0], scale, "reference", zoom))
        shown = next((m for m in results if m in learned), next(iter(results)))
        error = (reference - results[shown]).abs().mean(dim=1, keepdim=True) * ERROR_GAIN
        tiles.append(tile(error[0], scale, f"|err| x{ERROR_GAIN} {shown}", zoom))
    PIL.Image.fromarray(np.concatenate(tiles, axis=1)).save(path)


SUMMARY_KEYS = ("psnr", "ssim", "nmse", "nfe", "seconds")


def summarise(rows: list[dict], methods: list[str]) -> dict:
    summary = {}
    for method in methods:
        values = [r for r in rows if r["method"] == method]
        if values:
            summary[method] = {"count": len(values)}
            for key in SUMMARY_KEYS:
                column = np.array([r[key] for r in values], dtype=np.float64)
                summary[method][f"{key}_mean"] = float(column.mean())
                summary[method][f"{key}_std"] = float(column.std())
    return summary


def format_table(summary: dict) -> str:
    width = max([12, *(len(m) for m in summary)])
    lines = [f"{'method':<{width}} {'n':>4} {'PSNR (dB)':>16} {'SSIM':>16} {'NMSE':>20} {'NFE':>6} {'s/example':>10}"]
    for method, s in summary.items():
        lines.append(f"{method:<{width}} {s['count']:>4} {s['psnr_mean']:>8.2f} +- {s['psnr_std']:<5.2f} "
                     f"{s['ssim_mean']:>8.4f} +- {s['ssim_std']:<6.4f} {s['nmse_mean']:>9.5f} +- {s['nmse_std']:<8.5f}"
                     f" {s['nfe_mean']:>6.0f} {s['seconds_mean']:>10.2f}")
    return "\n".join(lines)


def write_metrics(outdir: str, rows: list[dict], summary: dict, report: dict):
    with open(os.path.join(outdir, "metrics.csv"), "w", newline="") as f:
        f.write("".join(f"# {line}\n" for line in METRIC_CONVENTIONS))
        if report.get("metric_convention"):
            f.write(f"# {report['metric_convention']}\n")
        f.write("# Deterministic methods (zero-filled, cs-*) do not depend on the seed: their rows repeat across "
                "seeds.\n")
        f.write(f"# {NOISE_CONVENTION}\n")
        for measurements in report.get("snr_sweep", {"": report["measurements"]}).values():
            f.write(f"# measurements: sha256 {measurements['hash']} ({len(measurements['indices'])} examples, task "
                    f"{json.dumps(measurements['task'], sort_keys=True)})\n")
        for method, settings in report["settings"].items():
            f.write(f"# {method}: {json.dumps(settings, sort_keys=True)}\n")
        sweep = ["snr_db"] if "snr_sweep" in report else []
        writer = csv.DictWriter(f, fieldnames=["example", "seed", "method", *sweep, *SUMMARY_KEYS])
        writer.writeheader()
        writer.writerows(rows)
    with open(os.path.join(outdir, "summary.json"), "w") as f:
        json.dump({"conventions": METRIC_CONVENTIONS, **report, "methods": summary}, f, indent=2)


def example_line(index: int, seed: int, results: dict) -> str:
    parts = [f"{m} {r['psnr']:.2f} dB SSIM {r['ssim']:.4f} ({r['seconds']:.1f} s"
             + (f", {r['nfe']:.0f} NFE)" if r["nfe"] else ")") for m, r in results.items()]
    return f"example {index} seed {seed}: " + " | ".join(parts)


def example_volumes(examples: dict, slices: list) -> dict:
    """The volume of each example for fastMRI's per-volume metrics: its source file where the MRI records say
    (fastMRI conversions, `slices` their dataset.json entries), else the example alone."""
    return {i: slices[i].get("source", f"example {i}") if i < len(slices) else f"example {i}" for i in examples}


def volume_maxima(examples: dict, volumes: dict) -> dict:
    """fastMRI's data range: the maximum RSS magnitude of each reference volume."""
    maxima = {}
    for i, example in examples.items():
        if example.reference is not None:
            peak = float(rss_images(example.reference, example.maps).max())
            maxima[volumes[i]] = max(maxima.get(volumes[i], 0.0), peak)
    return maxima


def score(convention: str, task: str, example, image: torch.Tensor, shown: torch.Tensor, reference: torch.Tensor,
          volume_max) -> dict:
    """The metric row of one reconstruction: `image` as the method returned it; `shown` and `reference` (the
    example's) as display_images shows them."""
    if convention == "sense":
        return metric_rows(reference, shown, task)
    return convention_row(convention, example.reference, image, example.maps, volume_max)


def write_report(outdir: str, rows: list[dict], methods: list[str], report: dict, snr_list: list | None,
                 convention: str, task: str, examples: dict, volumes: dict, seeds: list[int]):
    """metrics.csv, summary.json (and volumes.csv under the fastmri convention) of the gathered rows; prints the
    table."""
    order = {m: k for k, m in enumerate(methods)}
    rows.sort(key=lambda r: (r.get("snr_db", 0), r["example"], r["seed"], order[r["method"]]))
    summary = summarise(rows, methods) if snr_list is None else {
        f"{m} @ {level:g} dB": values for level in snr_list
        for m, values in summarise([r for r in rows if r["snr_db"] == level], methods).items()}
    report["metric_convention"] = CONVENTION_TEXT[convention] if task == "mri" else None
    if convention == "fastmri":
        report["volumes"] = volume_rows(examples, volumes, outdir, seeds, methods)
        with open(os.path.join(outdir, "volumes.csv"), "w", newline="") as f:
            f.write(f"# {CONVENTION_TEXT['fastmri']}\n")
            writer = csv.DictWriter(f, fieldnames=["volume", "slices", "seed", "method", "psnr", "ssim", "nmse"])
            writer.writeheader()
            writer.writerows(report["volumes"])
    write_metrics(outdir, rows, summary, report)
    print(format_table(summary))


def check_metric_convention(convention: str, task: str, snr_list: list | None):
    if convention != "sense" and task != "mri":
        raise UserError(f"--metric-convention {convention} applies to --task mri only.")
    if convention == "fastmri" and snr_list is not None:
        raise UserError("--metric-convention fastmri scores whole volumes and does not combine with --snr-db.")


def write_unscored(outdir: str, report: dict):
    """summary.json of stored measurements, which have no reference: no metrics."""
    with open(os.path.join(outdir, "summary.json"), "w") as f:
        json.dump({**report, "methods": None, "note": "stored measurements have no reference: no metrics"}, f,
                  indent=2)
