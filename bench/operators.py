"""Throughput of the multi-coil MRI operator (fftshift vs checkerboard path) and of the MRI training data path against
the rate at which training consumes it, both measured here.

    python bench/operators.py [--threads N] [--rounds 5] [--slices 256] [--workers 2] [--resolution 64]

1. A and A^H (slices/s) for 8 coils 64x64 and 20 coils 256x256 at batch 1/4/16, both paths timed in the same rounds
   in alternating order; medians over rounds.
2. The data path training uses (training.dataset.open_dataset with the run's measurement config -> MeasuredDataset,
   fed by the training loop's StreamSampler into a DataLoader with --workers) on simulated 8-coil data, fully sampled
   records measured with the fixed protocol (R = 4 lines) and stored undersampled records, against the images/s of
   MSM training steps (forward, backward, Adam) of the quickstart's network (DDPM++ cbase 32, 1,2,2, 2 blocks,
   attention at 16) on the same batches, measured in the same rounds. The ratio loader / training is the figure:
   above 1 the loader keeps up. The loader's rate is measured with the training process idle; while training runs
   its workers share the CPU with it, so on a 2-core machine a ratio near 1 is not enough.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from training import snapshot as checkpoint  # noqa: E402
from training.data_tools import (  # noqa: E402
    ZipDatasetWriter,  # noqa: E402
    birdcage_maps,
    simulate_mri,
)
from training.dataset import open_dataset  # noqa: E402
from training.loss import MSMLoss  # noqa: E402
from training.masks import RandomLineMaskLaw  # noqa: E402
from training.measurements import measurement_config_for  # noqa: E402
from training.networks import network_kwargs_for  # noqa: E402
from training.operators import MultiCoilMRI  # noqa: E402
from training.phantoms import random_ellipse_phantoms  # noqa: E402
from training.training_loop import StreamSampler  # noqa: E402

BATCH = 32


def elapsed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_operator(rounds: int):
    print(f"{'coils':>5} {'size':>7} {'batch':>5} | {'A shift':>9} {'A chk':>9} {'x':>5} | "
          f"{'AH shift':>9} {'AH chk':>9} {'x':>5}   (slices/s, median of {rounds} alternating rounds)")
    generator = torch.Generator().manual_seed(0)
    for coils, size in [(8, 64), (20, 256)]:
        maps = torch.from_numpy(birdcage_maps(coils, size, size))[None]
        for batch in (1, 4, 16):
            x = torch.randn(batch, 2, size, size, generator=generator)
            y = torch.view_as_complex(torch.randn(batch, coils, size, size, 2, generator=generator))
            ops = {"shift": MultiCoilMRI(maps, use_checkerboard=False),
                   "chk": MultiCoilMRI(maps, use_checkerboard=True)}
            times = {(f, p): [] for f in ("A", "AH") for p in ops}
            for r in range(rounds + 1):  # round 0 warms up (FFT plans, allocator)
                for path in (("shift", "chk") if r % 2 else ("chk", "shift")):
                    for fn_name, arg in (("A", x), ("AH", y)):
                        t = elapsed(lambda op=ops[path], f=fn_name, a=arg: getattr(op, f)(a))
                        if r:
                            times[fn_name, path].append(t)
            rate = {key: batch / statistics.median(v) for key, v in times.items()}
            print(f"{coils:>5} {size:>3}x{size:<3} {batch:>5} | {rate['A', 'shift']:>9.1f} {rate['A', 'chk']:>9.1f} "
                  f"{rate['A', 'chk'] / rate['A', 'shift']:>5.2f} | {rate['AH', 'shift']:>9.1f} "
                  f"{rate['AH', 'chk']:>9.1f} {rate['AH', 'chk'] / rate['AH', 'shift']:>5.2f}")


def training_dataset(path: str, resolution: int):
    """The dataset a `--loss msm --mask lines-random --accel 4` run builds (train.py -> open_dataset)."""
    mask = {"kind": "lines-random", "R": 4, "acs": min(20, resolution // 8)}
    plain = open_dataset(path)
    config = measurement_config_for(plain, mask, sigma_y=0.0, protocol="fixed", seed=0)
    return open_dataset(path, measurement=config.to_config()), config.to_config()


def loader_batches(dataset, workers: int, count: int):
    """`count` batches through the training loop's sampler and loader settings; returns a function timing them."""
    sampler = StreamSampler(len(dataset), 0, 1, BATCH, 1, seed=0, with_position=True)
    loader = torch.utils.data.DataLoader(dataset, sampler=sampler, batch_size=BATCH, num_workers=workers,
                                         prefetch_factor=4 if workers else None, persistent_workers=workers > 0,
                                         generator=torch.Generator().manual_seed(0))
    iterator = iter(loader)
    next(iterator)  # start the workers outside the timed part, as a long training run amortises that

    def run():
        for _ in range(count):
            next(iterator)

    return run


def training_steps(dataset, measurement: dict, resolution: int, count: int):
    cfg = network_kwargs_for(arch="ddpmpp", precond="edm", img_resolution=resolution, in_channels=2, out_channels=2,
                             label_dim=0, cbase=32, cres=[1, 2, 2], num_blocks=2, attn_resolutions=[16], dropout=0.0)
    torch.manual_seed(0)
    net = checkpoint.build_network(cfg).train()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-4)
    loss_fn, gen = MSMLoss(measurement), torch.Generator().manual_seed(0)
    batch = torch.utils.data.default_collate([dataset[i] for i in range(BATCH)])
    batch["label"] = None

    def run():
        for _ in range(count):
            optimizer.zero_grad(set_to_none=True)
            (loss_fn(net=net, batch=batch, generator=gen).sum() / BATCH).backward()
            optimizer.step()

    run()  # warm-up
    return run


def bench_loader(num_slices: int, workers: int, resolution: int, rounds: int):
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "phantoms.zip")
        with ZipDatasetWriter(source) as writer:
            for img in random_ellipse_phantoms(num_slices, resolution, 0):
                writer.add_image(np.rint(img * 255).astype(np.uint8)[:, :, None])
            writer.finish()
        cases = {}
        for name, law in (("fully sampled", None), ("undersampled", RandomLineMaskLaw(4, min(20, resolution // 8)))):
            dest = os.path.join(tmp, name.replace(" ", "-"))
            simulate_mri(source, dest, num_coils=8, mask_law=law)
            dataset, measurement = training_dataset(dest, resolution)
            for w in sorted({0, workers}):
                cases[f"loader, {name} records, {w} workers"] = (loader_batches(dataset, w, 4), 4 * BATCH)
            if law is None:
                cases["MSM training steps (what the loader feeds)"] = (training_steps(dataset, measurement,
                                                                                      resolution, 2), 2 * BATCH)
        rates = {name: [] for name in cases}
        for r in range(rounds):
            order = list(cases) if r % 2 == 0 else list(reversed(cases))
            for name in order:
                run, images = cases[name]
                rates[name].append(images / elapsed(run))
        training = statistics.median(rates["MSM training steps (what the loader feeds)"])
        print(f"\n8 coils {resolution}x{resolution}, batch {BATCH}, {num_slices} simulated slices, {rounds} "
              "alternating rounds (median images/s)")
        print(f"{'path':<48} {'images/s':>9} {'x training':>10}")
        for name, values in rates.items():
            rate = statistics.median(values)
            print(f"{name:<48} {rate:>9.1f} {rate / training:>10.2f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=None, help="torch threads [default: torch's]")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--slices", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=64)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} logical CPUs\n")
    bench_operator(args.rounds)
    bench_loader(args.slices, args.workers, args.resolution, args.rounds)


if __name__ == "__main__":
    main()
