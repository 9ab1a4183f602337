"""Wall time of the MSM sampler (training/sampling/: Ancestral on MSMAggregate) against its network floor, for
K = 1..4, on grayscale and RGB images and 8-coil MRI.

    python bench/msm_sampler.py [--device cpu|cuda] [--batch 4] [--levels 5] [--rounds 7] [--threads 2]
                                [--cases gray32,gray64,rgb64,mri64] [--json out.json]

For a fixed untrained network (DDPM++ cbase 32, channel multipliers 1,2,2, one block per resolution) and B = --batch
seeds, each case times per image:
- msm batched: the default sampler (one partial-denoiser call on K x B per level, masks, noise, aggregation, outer
  update; for MRI also T^H and T);
- floor: levels x one network call on a batch of K x B, the least the batched sampler can cost;
- K calls of B: levels x K network calls on batches of B, what evaluating the subsets one after another costs (as the
  reference variant must);
- msm reference: the reference variant (sequential write-back);
- mask draws: the coverage-aware per-seed mask draws of one run alone (CPU);
- outside (stub): the batched sampler with the network swapped for one that costs nothing (it returns half its
  input), i.e. everything outside the network measured directly. "batched / floor" is a ratio of two noisy times of
  which the network is nearly all; 1 + stub / floor estimates the same ratio with the noise of the small part only.

Honest timing on a shared machine: every timed item (case x K x column) runs once per round, in an order shuffled
anew each round, so slow phases of the machine spread over all columns instead of falling on one of them. Each cell is
the median over rounds; the ratio "batched / floor" is taken within each round (the two ran seconds apart) and its
median and range over rounds are printed, the range being the noise of that figure. Compare ratios, not absolute
times, across machines or runs.
"""

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from torch_utils.misc import SeedGenerators  # noqa: E402
from training import snapshot as checkpoint  # noqa: E402
from training.data_tools import birdcage_maps  # noqa: E402
from training.masks import BoxMaskLaw, RandomLineMaskLaw  # noqa: E402
from training.networks import network_kwargs_for  # noqa: E402
from training.operators import Identity, MultiCoilMRI  # noqa: E402
from training.sampling.denoisers import MSMAggregate, SubsetDraws, net_partial_denoiser  # noqa: E402
from training.sampling.solvers import (  # noqa: E402
    Ancestral,
    msm_reference,
    noise_start,
    seed_measurement_randn,
)
from training.schedules import vp200_sigmas  # noqa: E402

# name -> (network channels, resolution, coils or 0 for images)
CASES = {"gray32": (1, 32, 0), "gray64": (1, 64, 0), "rgb64": (3, 64, 0), "mri64": (2, 64, 8)}
COLUMNS = ("msm batched", "floor", "K calls of B", "msm reference", "mask draws", "outside (stub)")


class StubNetwork(torch.nn.Module):
    """A "network" that costs nothing beside the sampler: the preconditioned interface, output = input / 2."""

    def __init__(self, channels: int):
        super().__init__()
        self.in_channels = self.out_channels = channels

    def forward(self, x, sigma, class_labels=None):
        return x * 0.5


class Case:
    """The network, operator, mask law and latents of one benchmark case."""

    def __init__(self, name: str, batch: int, device):
        channels, resolution, coils = CASES[name]
        self.name, self.batch, self.device = name, batch, device
        cfg = network_kwargs_for(arch="ddpmpp", precond="edm", img_resolution=resolution, in_channels=channels,
                                 out_channels=channels, label_dim=0, cbase=32, cres=[1, 2, 2], num_blocks=1,
                                 attn_resolutions=[], dropout=0.0)
        torch.manual_seed(0)
        self.net = checkpoint.build_network(cfg).eval().requires_grad_(False).to(device)
        self.image_shape = (channels, resolution, resolution)
        self.seeds = list(range(batch))
        if coils:
            maps = torch.from_numpy(birdcage_maps(coils, resolution, resolution))[None].to(device)
            self.operator = MultiCoilMRI(maps)
            self.law = RandomLineMaskLaw(4, min(20, resolution // 8))
            self.latent_template = torch.empty([batch, coils, resolution, resolution], dtype=torch.complex64)
        else:
            self.operator = Identity()
            self.law = BoxMaskLaw(0.4)
            self.latent_template = torch.empty([batch, *self.image_shape], dtype=torch.float32)
        self.partial = net_partial_denoiser(self.net, self.operator)
        self.stub_partial = net_partial_denoiser(StubNetwork(channels).to(device), self.operator)

    def describe(self) -> str:
        c, r, _ = self.image_shape
        kind = f"{CASES[self.name][2]}-coil MRI, lines R = 4" if CASES[self.name][2] else "images, box p = 0.4"
        return f"{self.name}: {kind}, network input {c}x{r}x{r}"

    def run(self, column: str, k: int, sigmas: torch.Tensor):
        if column in ("msm batched", "msm reference", "outside (stub)"):
            gen = SeedGenerators(self.seeds, device=self.device)
            latents = seed_measurement_randn(gen, self.latent_template).to(self.device)
            partial = self.stub_partial if column == "outside (stub)" else self.partial
            x = noise_start(latents, sigmas[0].item(), "single")
            if column == "msm reference":
                msm_reference(partial, x, gen, sigmas, self.law, k)
            else:
                Ancestral()(MSMAggregate(partial, self.law, gen, k), x, gen, sigmas)
        elif column in ("floor", "K calls of B"):
            calls, size = (len(sigmas), k * self.batch) if column == "floor" else (len(sigmas) * k, self.batch)
            x = torch.randn(size, *self.image_shape, device=self.device)
            sigma = torch.full((size,), 1.0, device=self.device)
            for _ in range(calls):
                self.net(x, sigma)
        else:
            draws = SubsetDraws(self.law, self.image_shape[-2:], SeedGenerators(self.seeds), self.device)
            for _ in range(len(sigmas)):
                draws.next(k)


def timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--levels", type=int, default=5, help="first LEVELS of the 200 VP levels")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (the median is reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads [default: torch's]")
    parser.add_argument("--subsets", default="1,2,3,4", help="K values")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma list of {', '.join(CASES)}")
    parser.add_argument("--json", default=None, help="also write the raw timings here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    names = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        parser.error(f"--cases: unknown case(s) {', '.join(unknown)}; expected {', '.join(CASES)}")
    ks = [int(k) for k in args.subsets.split(",")]
    cases = [Case(name, args.batch, device) for name in names]
    sigmas = vp200_sigmas()[: args.levels]
    items = [(case, k, column) for case in cases for k in ks for column in COLUMNS]
    times = {(case.name, k, column): [] for case, k, column in items}

    print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads, {platform.processor() or ''}"
          f" {os.cpu_count()} logical CPUs; batch B = {args.batch}, {len(sigmas)} levels, {args.rounds} interleaved "
          "rounds; DDPM++ cbase 32 (1,2,2), 1 block")
    with torch.no_grad():
        for case, k, column in items:  # warm-up: allocator, FFT plans, one-time costs
            case.run(column, k, sigmas)
        for r in range(args.rounds):
            order = items[:]
            random.Random(r).shuffle(order)
            for case, k, column in order:
                times[case.name, k, column].append(timed(lambda c=case, k=k, col=column: c.run(col, k, sigmas), device))

    per_image = 1000 / args.batch
    report = {"machine": {"torch": torch.__version__, "device": str(device), "threads": torch.get_num_threads(),
                          "cpus": os.cpu_count(), "processor": platform.processor()},
              "settings": vars(args), "milliseconds_per_image": {}}
    for case in cases:
        print(f"\n{case.describe()}; milliseconds per image (median over rounds)")
        print(f"{'K':>2} " + " ".join(f"{c:>14}" for c in COLUMNS) + f" {'batched/floor (range)':>24}")
        for k in ks:
            cells = [statistics.median(times[case.name, k, c]) * per_image for c in COLUMNS]
            ratios = [b / f for b, f in zip(times[case.name, k, "msm batched"], times[case.name, k, "floor"])]
            ratio = statistics.median(ratios)
            print(f"{k:>2} " + " ".join(f"{v:>14.1f}" for v in cells) +
                  f" {ratio:>11.3f} ({min(ratios):.2f}-{max(ratios):.2f})")
            report["milliseconds_per_image"][f"{case.name}/K={k}"] = {
                **dict(zip(COLUMNS, cells)), "batched_over_floor": ratio,
                "batched_over_floor_range": [min(ratios), max(ratios)]}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**report, "raw_seconds": {f"{n}/K={k}/{c}": v for (n, k, c), v in times.items()}}, f, indent=2)


if __name__ == "__main__":
    main()
