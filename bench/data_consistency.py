"""How well each reconstruction explains its measurements: ||M (A x - y)|| / (sigma_y sqrt(m)) per method.

    python bench/data_consistency.py --measurements out/ct/meas out/ct/dps-padis-fbp out/ct/ald out/ct/pc

For every reconstruct.py output folder given (all of the same saved measurement set) and every method in it, the
mean over its examples and seeds of the residual norm divided by the noise norm expected from the measurement noise
alone (m observed real entries, a complex entry counting twice). The ground truth scores about 1; a posterior sample
about sqrt(2) at most (its error adds a second, independent residual of the same size); a method far above that does
not explain its data, whatever its PSNR. The reference row is computed from the stored clean images.
"""

import argparse
import glob
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from training.tasks import load_measurements, task_operator  # noqa: E402


def residual_ratio(example, image: torch.Tensor, opts) -> float:
    """||M (A x - y)|| / (sigma_y sqrt(m)) of one image x (1, C, H, W) for one measured example."""
    x = image.to(torch.float64)  # MRI images are (re, im) channels, as MultiCoilMRI takes them
    operator = task_operator(opts, x.shape[-1], example.mask, example.maps)
    predicted = operator.A(x)
    mask = example.mask if opts.task == "mri" else None
    residual = (predicted - example.y) if mask is None else mask * (predicted - example.y)
    observed = residual.numel() if mask is None else int(mask.expand_as(residual).count_nonzero())
    observed *= 2 if residual.is_complex() else 1
    return float(torch.linalg.vector_norm(residual)) / (float(example.sigma_y) * observed**0.5)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--measurements", required=True)
    parser.add_argument("folders", nargs="+")
    args = parser.parse_args()
    measurements = load_measurements(args.measurements)
    opts = measurements.task
    rows = {}
    if all(e.reference is not None for e in measurements.examples.values()):
        rows["reference"] = [residual_ratio(e, e.reference, opts) for e in measurements.examples.values()]
    for folder in args.folders:
        with open(os.path.join(folder, "summary.json")) as f:
            stored = json.load(f).get("measurements", {}).get("hash")
        if stored != measurements.hash():
            sys.exit(f"Error: {folder} reconstructed other measurements (hash {stored}, expected "
                     f"{measurements.hash()}).")
        for path in sorted(glob.glob(os.path.join(folder, "reconstructions", "*.npz"))):
            example = measurements.examples[int(os.path.basename(path).split("-")[0])]
            with np.load(path) as arrays:
                for method in arrays.files:
                    image = torch.from_numpy(arrays[method]).reshape(1, -1, *arrays[method].shape[-2:])
                    rows.setdefault(method, []).append(residual_ratio(example, image, opts))
    print(f"Measurements {args.measurements} (sha256 {measurements.hash()[:12]}), task {opts.task}\n")
    print("| method | residual / noise (mean +- std) |\n|---|---|")
    for method, values in rows.items():
        print(f"| {method} | {np.mean(values):.2f} +- {np.std(values):.2f} |")


if __name__ == "__main__":
    main()
