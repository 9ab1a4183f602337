"""Throughput of the multi-coil MRI operator (with and without the fftshift-free path) and of the MRI data loader.

    python bench/operators.py [--threads 2] [--repeats 5]

Prints one table of A and A^H rates (slices/s) for 8 coils 64x64 and 20 coils 256x256 at batch 1/4/16, and the
MRIDataset + DataLoader rate on a small simulated dataset against what training consumes.
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dataset_tool import ZipDatasetWriter  # noqa: E402
from training.masks import RandomLineMaskLaw  # noqa: E402
from training.mri import MRIDataset, birdcage_maps, simulate_mri  # noqa: E402
from training.operators import MultiCoilMRI  # noqa: E402
from training.phantoms import random_ellipse_phantoms  # noqa: E402

# What training consumes: an EDM-size network at 64x64 trains at about 36 images/s on this CPU with 2 threads
# (the project's measured figure); the loader must stay well above it.
TRAINING_RATE = 36.0


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up (FFT plans, allocator)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def bench_operator(repeats: int):
    print(f"{'coils':>5} {'size':>7} {'batch':>5} | {'A shift':>9} {'A chk':>9} {'x':>5} | "
          f"{'AH shift':>9} {'AH chk':>9} {'x':>5}   (slices/s)")
    generator = torch.Generator().manual_seed(0)
    for coils, size in [(8, 64), (20, 256)]:
        maps = torch.from_numpy(birdcage_maps(coils, size, size))[None]
        for batch in (1, 4, 16):
            x = torch.randn(batch, 2, size, size, generator=generator)
            y = torch.randn(batch, coils, size, size, 2, generator=generator)
            y = torch.view_as_complex(y)
            rates = {}
            for path, use_checkerboard in (("shift", False), ("chk", True)):
                op = MultiCoilMRI(maps, use_checkerboard=use_checkerboard)
                rates["A", path] = batch / best_time(lambda op=op, x=x: op.A(x), repeats)
                rates["AH", path] = batch / best_time(lambda op=op, y=y: op.AH(y), repeats)
            print(f"{coils:>5} {size:>3}x{size:<3} {batch:>5} | {rates['A', 'shift']:>9.1f} {rates['A', 'chk']:>9.1f} "
                  f"{rates['A', 'chk'] / rates['A', 'shift']:>5.2f} | {rates['AH', 'shift']:>9.1f} "
                  f"{rates['AH', 'chk']:>9.1f} {rates['AH', 'chk'] / rates['AH', 'shift']:>5.2f}")


def bench_loader(num_slices: int, workers: int):
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "phantoms.zip")
        with ZipDatasetWriter(source) as writer:
            for img in random_ellipse_phantoms(num_slices, 64, 0):
                writer.add_image(np.rint(img * 255).astype(np.uint8)[:, :, None])
            writer.finish()
        print(f"\nMRIDataset + DataLoader, {num_slices} simulated slices, 8 coils 64x64, batch 32 "
              f"(training consumes ~{TRAINING_RATE:.0f} images/s at 64x64, 2 threads)")
        print(f"{'records':>14} {'workers':>7} | {'slices/s':>9} {'x training':>10}")
        for name, mask_law in (("fully sampled", None), ("undersampled", RandomLineMaskLaw(4, 8))):
            dest = os.path.join(tmp, name.replace(" ", "-"))
            simulate_mri(source, dest, num_coils=8, mask_law=mask_law)
            dataset = MRIDataset(dest)
            for num_workers in sorted({0, workers}):
                loader = torch.utils.data.DataLoader(dataset, batch_size=32, shuffle=True, num_workers=num_workers,
                                                     generator=torch.Generator().manual_seed(0))
                start = time.perf_counter()
                count = sum(batch["kspace"].shape[0] for _ in range(2) for batch in loader)
                rate = count / (time.perf_counter() - start)
                print(f"{name:>14} {num_workers:>7} | {rate:>9.1f} {rate / TRAINING_RATE:>10.1f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--slices", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads; best of {args.repeats} runs\n")
    bench_operator(args.repeats)
    bench_loader(args.slices, args.workers)


if __name__ == "__main__":
    main()
