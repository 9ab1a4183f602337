"""Wall time of the MSM sampler (training/samplers.py) per image against its floors, for K = 1, 2, 3, 4.

    python bench/msm_sampler.py [--device cpu|cuda] [--batch 4] [--levels 10] [--resolution 32] [--threads 2]

For a fixed untrained network (ddpmpp, box law p = 0.4, images 1xRxR) and B = --batch seeds, prints per image:
- msm batched: the default sampler (one partial-denoiser call on K x B per level, masks, noise, aggregation);
- floor: levels x one network call on a batch of K x B (what the batched sampler cannot go below);
- one after another: levels x K network calls on batches of B (what evaluating the subsets sequentially costs,
  as the reference variant must);
- msm reference: the reference variant (sequential write-back), for comparison;
- mask draws: the coverage-aware per-seed mask draws of one run alone (CPU, independent of the network).
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from torch_utils import checkpoint  # noqa: E402
from torch_utils.misc import SeedGenerators  # noqa: E402
from training.masks import BoxMaskLaw  # noqa: E402
from training.networks import network_kwargs_for  # noqa: E402
from training.operators import Identity  # noqa: E402
from training.samplers import _SubsetDraws, msm_sampler, net_partial_denoiser, vp200_sigmas  # noqa: E402


def timed(fn, device, repeats: int) -> float:
    """Best wall time of fn() over `repeats` runs after one warm-up, synchronising the GPU."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--levels", type=int, default=10, help="first LEVELS of the 200 VP levels")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = network_kwargs_for(arch="ddpmpp", precond="edm", img_resolution=args.resolution, in_channels=1,
                             out_channels=1, label_dim=0, cbase=32, cres=[1, 2, 2], num_blocks=1,
                             attn_resolutions=[], dropout=0.0)
    torch.manual_seed(0)
    net = checkpoint.build_network(cfg).eval().requires_grad_(False).to(device)
    law, batch, shape = BoxMaskLaw(0.4), args.batch, (1, args.resolution, args.resolution)
    sigmas = vp200_sigmas()[: args.levels]
    partial = net_partial_denoiser(net, Identity())
    seeds = list(range(batch))

    def network_calls(count, size):
        x = torch.randn(size, *shape, device=device)
        sigma = torch.full((size,), 1.0, device=device)
        for _ in range(count):
            net(x, sigma)

    def sampler(k, variant):
        gen = SeedGenerators(seeds, device=device)
        latents = gen.randn([batch, *shape]).to(device)
        msm_sampler(partial, latents, law, gen, num_subsets=k, sigmas=sigmas, variant=variant)

    def mask_draws(k):
        draws = _SubsetDraws(law, shape[-2:], SeedGenerators(seeds), device)
        for _ in range(len(sigmas)):
            draws.next(k)

    print(f"device {device}, {args.threads} threads, batch B = {batch}, {len(sigmas)} levels, images {shape}, "
          f"ddpmpp cbase 32; milliseconds per image")
    print(f"{'K':>2} {'msm batched':>12} {'floor (1 call KxB)':>19} {'K calls of B':>13} {'msm reference':>14} "
          f"{'mask draws':>11}")
    with torch.no_grad():
        for k in (1, 2, 3, 4):
            per_image = 1000 / batch
            row = [timed(lambda k=k: sampler(k, "batched"), device, args.repeats),
                   timed(lambda k=k: network_calls(len(sigmas), k * batch), device, args.repeats),
                   timed(lambda k=k: network_calls(len(sigmas) * k, batch), device, args.repeats),
                   timed(lambda k=k: sampler(k, "reference"), device, args.repeats),
                   timed(lambda k=k: mask_draws(k), device, args.repeats)]
            print(f"{k:>2} {row[0] * per_image:12.1f} {row[1] * per_image:19.1f} {row[2] * per_image:13.1f} "
                  f"{row[3] * per_image:14.1f} {row[4] * per_image:11.1f}")


if __name__ == "__main__":
    main()
