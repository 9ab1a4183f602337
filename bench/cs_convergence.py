"""Convergence of the compressed-sensing baselines (reconstruct.py's cs-tv and cs-l1): mean PSNR against iterations
on simulated multi-coil phantoms, for a few regularisation weights, so the iteration defaults are where PSNR stops
changing.

    python bench/cs_convergence.py [--num 8] [--resolution 64] [--coils 8] [--accel 4] [--max-iter 4000]

Data: random-ellipse phantoms (training/phantoms.py) simulated as --coils-coil k-space (training/mri.py), measured as
reconstruct.py measures them (lines-random R = --accel with the default ACS, noise std --sigma-y, mask seed 1).
For every regulariser and weight the sigpy app runs once to --max-iter and the image is scored (PSNR of magnitudes,
data range max of the reference, as reconstruct.py's metrics) at doubling iteration counts. Prints one table per
regulariser and, per weight, the first count after which the mean PSNR stays within --tol dB of its last value.
"""

import argparse
import os
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from training.data_tools import simulate_mri  # noqa: E402
from training.masks import default_acs  # noqa: E402
from training.metrics import psnr, reference_max  # noqa: E402
from training.mri import MRIDataset  # noqa: E402
from training.operators import complex_to_channels, mri_magnitude  # noqa: E402
from training.phantoms import random_ellipse_phantoms  # noqa: E402
from training.sampling.baselines import CS_REGULARISERS, cs_app  # noqa: E402
from training.tasks import TaskOptions, measure_example  # noqa: E402


def checkpoints(max_iter: int) -> list[int]:
    counts, n = [], 10
    while n < max_iter:
        counts.append(n)
        n *= 2
    return counts + [max_iter]


def psnr_trajectory(example, regulariser: str, lamda: float, counts: list[int]) -> list[float]:
    """PSNR after each count of iterations of one run (sigpy's own loop, stopped to score at the counts)."""
    app = cs_app(example.y[0], example.maps[0], example.mask[0], regulariser, lamda, counts[-1])
    reference = mri_magnitude(example.reference.to(torch.float64))
    scores, done = [], 0
    for count in counts:
        while done < count:
            app._pre_update()
            app.alg.update()
            app._post_update()
            done += 1
        image = complex_to_channels(torch.from_numpy(np.asarray(app._output(), dtype=np.complex64))[None])
        scores.append(psnr(reference, mri_magnitude(image.to(torch.float64)), reference_max(reference)).item())
    return scores


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--coils", type=int, default=8)
    parser.add_argument("--accel", type=float, default=4.0)
    parser.add_argument("--sigma-y", type=float, default=0.01)
    parser.add_argument("--max-iter", type=int, default=4000)
    parser.add_argument("--tol", type=float, default=0.05)
    parser.add_argument("--lambdas", default="1e-4,1e-3,1e-2")
    parser.add_argument("--regularisers", default=",".join(CS_REGULARISERS))
    args = parser.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        images = random_ellipse_phantoms(args.num, args.resolution, seed=0)
        from training.data_tools import ZipDatasetWriter

        source = os.path.join(tmp, "phantoms.zip")
        with ZipDatasetWriter(source) as writer:
            for image in images:
                writer.add_image(np.rint(image * 255).astype(np.uint8)[:, :, None])
            writer.finish({})
        simulate_mri(source, os.path.join(tmp, "mri"), num_coils=args.coils, seed=0)
        data = MRIDataset(os.path.join(tmp, "mri"))
        law = {"kind": "lines-random", "R": args.accel, "acs": default_acs(args.resolution)}
        opts = TaskOptions(task="mri", sigma_y=args.sigma_y, mask_seed=1, mri_mask=law)
        examples = [measure_example(data[i], opts) for i in range(args.num)]

    counts = checkpoints(args.max_iter)
    print(f"{args.num} phantoms {args.resolution}x{args.resolution}, {args.coils} coils, R = {args.accel}, "
          f"ACS {default_acs(args.resolution)}, sigma_y {args.sigma_y}: mean PSNR (dB) after N iterations")
    for regulariser in args.regularisers.split(","):
        print(f"\n{regulariser}\n{'lambda':>8} " + " ".join(f"{n:>7d}" for n in counts) + "   converged at")
        for lamda in (float(v) for v in args.lambdas.split(",")):
            mean = np.mean([psnr_trajectory(e, regulariser, lamda, counts) for e in examples], axis=0)
            stable = next(n for k, n in enumerate(counts) if np.all(np.abs(mean[k:] - mean[-1]) < args.tol))
            print(f"{lamda:>8.0e} " + " ".join(f"{v:>7.2f}" for v in mean) + f"   {stable}", flush=True)


if __name__ == "__main__":
    main()
