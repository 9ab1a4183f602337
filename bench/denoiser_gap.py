"""Where an MSM prior stands against a clean-data prior, before any sampler: the denoising error per noise level of
MSM's aggregate denoiser (K partial estimates, training/sampling/denoisers.py `MSMAggregate`) and of an oracle's
network, on the same held-out images and the same noise.

    python bench/denoiser_gap.py --data out/mri/mri-test --indices 8-15 \\
        --snapshot oracle=RUN_ORACLE/network-snapshot-000060.pt --snapshot msm=RUN_MSM/network-snapshot-000060.pt \\
        [--subsets 3,12] [--sigmas 0.01,0.03,0.1,0.3,1,3] [--out gap.md]

For each snapshot and sigma: x_t = x + sigma n (n fixed per image, seed --seed), D(x_t; sigma) by the network itself
(a model trained on clean data) or by MSM's aggregate of K partial estimates under the model's training mask law (an
MSM model; once per K in --subsets), and the relative error ||D - x||^2 / ||x||^2 over the images. MRI records give
the coil-combined image and its maps (T = F S); image datasets give images (T = I). A posterior sampler can only be
as good as its denoiser: a gap here is the prior's, not the sampler's.
"""

import os
import sys

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dnnlib import UserError, run_cli  # noqa: E402
from torch_utils.misc import SeedGenerators, parse_int_list  # noqa: E402
from training.dataset import open_dataset  # noqa: E402
from training.masks import mask_law_from_config  # noqa: E402
from training.measurements import skip_space_of  # noqa: E402
from training.operators import Identity, MultiCoilMRI  # noqa: E402
from training.sampling.denoisers import MSMAggregate, net_partial_denoiser  # noqa: E402
from training.snapshot import load_snapshot  # noqa: E402


def parse_sigmas(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) <= 0:
        raise click.BadParameter(f"expected a comma list of positive noise levels, got {text!r}", param_hint="--sigmas")
    return values


def denoiser_errors(net, config: dict, images: torch.Tensor, maps: torch.Tensor | None, seeds: list[int],
                    sigmas: list[float], subsets: list[int], seed: int) -> dict[str, list[float]]:
    """{'K k' or 'network': [relative error per sigma]} of one snapshot."""
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    images = images.to(torch.float64)
    measurement = config.get("measurement")
    rows = {}
    for k in ([None] if measurement is None else subsets):
        errors = []
        for sigma in sigmas:
            noisy = images + sigma * noise
            with torch.no_grad():
                if measurement is None:
                    out = net(noisy.to(torch.float32), torch.full((len(images),), sigma)).to(torch.float64)
                else:
                    operator = MultiCoilMRI(maps) if maps is not None else Identity()
                    partial = net_partial_denoiser(net, operator, skip_space=skip_space_of(config.get("loss")))
                    law = mask_law_from_config(measurement["mask"])
                    aggregate = MSMAggregate(partial, law, SeedGenerators(seeds), k, fallback="shrink",
                                             operator=operator)
                    out = aggregate(noisy, sigma)
            errors.append(float(((out - images) ** 2).sum() / (images**2).sum()))
        rows["network" if k is None else f"K {k}"] = errors
    return rows


@click.command()
@click.option("--data", required=True, help="Held-out MRI records or images")
@click.option("--indices", default="0-7", show_default=True, help="Examples, e.g. 8-15 or 1,5,9")
@click.option("--snapshot", "snapshots", multiple=True, required=True, metavar="NAME=PATH",
              help="A network snapshot to measure (repeat)")
@click.option("--subsets", default="3,12", show_default=True, help="K values of an MSM model's aggregate")
@click.option("--sigmas", default="0.01,0.03,0.1,0.3,1,3", show_default=True, help="Noise levels")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the noise")
@click.option("--out", default=None, help="Also write the table (Markdown) here")
def main(data, indices, snapshots, subsets, sigmas, seed, out):
    sigmas, subsets = parse_sigmas(sigmas), parse_int_list(subsets, "--subsets", minimum=1)
    named = []
    for item in snapshots:
        name, sep, path = item.partition("=")
        if not sep or not os.path.isfile(path):
            raise click.BadParameter(f"expected NAME=PATH of a snapshot file, got {item!r}", param_hint="--snapshot")
        named.append((name, path))
    dataset = open_dataset(data)
    chosen = parse_int_list(indices, "--indices")
    if max(chosen) >= len(dataset):
        raise UserError(f"--indices {indices} goes past the {len(dataset)} examples of {data}.")
    records = [dataset[i] for i in chosen]
    images = torch.stack([torch.as_tensor(r["image"]) for r in records]).to(torch.float32)
    maps = torch.stack([r["maps"] for r in records]) if "maps" in records[0] else None
    lines = [f"Relative denoising error ||D(x + sigma n) - x||^2 / ||x||^2 on {data} examples {indices} (noise seed "
             f"{seed}); MSM models: the aggregate of K partial estimates under the training law.", "",
             "| snapshot | denoiser | " + " | ".join(f"sigma {s:g}" for s in sigmas) + " |",
             "|---|---|" + "---|" * len(sigmas)]
    for name, path in named:
        net, config = load_snapshot(path)
        net.eval()
        for denoiser, errors in denoiser_errors(net, config, images, maps, chosen, sigmas, subsets, seed).items():
            lines.append(f"| {name} | {denoiser} | " + " | ".join(f"{e:.4f}" for e in errors) + " |")
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if out:
        with open(out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    run_cli(main)
