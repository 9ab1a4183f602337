"""Speed of the FID pieces: Frechet distance (ours vs scipy.linalg.sqrtm as EDM computes it), float64 statistics
accumulation, and the Inception-v3 detector (random weights; speed does not depend on them).

    python bench/bench_fid.py [--device cpu|cuda] [--dims 512,2048] [--batches 8,32]
"""

import os
import sys
import time

import click
import numpy as np
import scipy.linalg
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from training.inception import InceptionV3FID  # noqa: E402
from training.metrics import FeatureStats, frechet_distance  # noqa: E402


def best_of(fn, repeats=3, sync=lambda: None):
    """Fastest wall time of `repeats` calls (after one warm-up call)."""
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return min(times)


def timed(fn, *args):
    """(fn(*args), wall seconds of that one call)."""
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start


def scipy_sqrtm_distance(mu1, sigma1, mu2, sigma2):
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2).real
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


@click.command()
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--dims", default="512,2048", show_default=True, help="Feature dimensions for the distance")
@click.option("--batches", default="8,32", show_default=True, help="Batch sizes for the detector")
@click.option("--resolution", default=64, show_default=True, help="Input images (resized to 299 inside)")
def main(device, dims, batches, resolution):
    rng = np.random.default_rng(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}")
    print(f"{'what':<44}{'size':>10}{'seconds':>12}{'rate':>18}  agreement")
    for dim in [int(d) for d in dims.split(",")]:
        samples = [rng.standard_normal((dim + 500, dim)) @ rng.standard_normal((dim, dim)) / np.sqrt(dim)
                   for _ in range(2)]
        stats = [(s.mean(axis=0), np.cov(s, rowvar=False)) for s in samples]
        ours, t_ours = timed(frechet_distance, *stats[0], *stats[1])
        theirs, t_theirs = timed(scipy_sqrtm_distance, *stats[0], *stats[1])
        print(f"{'frechet_distance (eigh + svdvals)':<44}{dim:>10}{t_ours:>12.3f}{'':>18}  rel diff to scipy "
              f"{abs(ours - theirs) / abs(theirs):.1e}")
        print(f"{'scipy.linalg.sqrtm(S1 @ S2) (EDM)':<44}{dim:>10}{t_theirs:>12.3f}")

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    features = torch.randn(256, 2048, device=device)
    accumulator = FeatureStats(2048, device=device)
    t = best_of(lambda: accumulator.update(features), sync=sync)
    print(f"{'FeatureStats.update (float64 outer products)':<44}{'256x2048':>10}{t:>12.4f}{256 / t:>13.0f} img/s")

    net = InceptionV3FID().eval().to(device)
    generator = torch.Generator().manual_seed(0)
    for batch in [int(b) for b in batches.split(",")]:
        images = torch.randint(0, 256, (batch, 3, resolution, resolution), generator=generator, dtype=torch.uint8)
        images = images.to(device)

        def run(images=images):
            with torch.inference_mode():
                net(images)

        t = best_of(run, repeats=2, sync=sync)
        print(f"{'InceptionV3FID forward':<44}{f'{batch}x{resolution}':>10}{t:>12.3f}{batch / t:>13.1f} img/s")


if __name__ == "__main__":
    main()
