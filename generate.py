"""Generate images from a network snapshot: one PNG per seed plus a grid, seeds sharded across ranks.

    python generate.py --network runs/00000-phantoms/network-snapshot-000050.pt --outdir out/samples --seeds 0-63
    torchrun --standalone --nproc_per_node=2 generate.py --network RUN_DIR --outdir out/samples --seeds 0-49999

Everything about the model (architecture, preconditioning, data shape, labels) comes from the snapshot. Each seed
has its own random stream, so an image depends only on its seed, not on --batch or the number of ranks.
"""

import os

import click
import numpy as np
import PIL.Image
import torch
import tqdm

import dnnlib
from dnnlib import UserError
from torch_utils import checkpoint
from torch_utils import distributed as dist
from torch_utils.misc import SeedGenerators, image_grid, parse_seeds, save_image, to_uint8_images
from training.samplers import edm_sampler, net_denoiser


def seed_batches(seeds: list[int], max_batch: int, rank: int, world: int) -> list[list[int]]:
    """Split seeds into batches of at most max_batch and deal them to ranks round-robin."""
    num_batches = max(int(np.ceil(len(seeds) / (max_batch * world))), 1) * world
    batches = [b.tolist() for b in np.array_split(np.array(seeds, dtype=np.int64), num_batches)]
    return [b for b in batches[rank::world] if len(b)]


def image_path(outdir: str, seed: int, subdirs: bool) -> str:
    return os.path.join(outdir, f"{seed - seed % 1000:06d}", f"{seed:06d}.png") if subdirs else \
        os.path.join(outdir, f"{seed:06d}.png")


@click.command()
@click.option("--network", "network_path", required=True, help="Network snapshot file or run directory")
@click.option("--outdir", required=True, help="Where to save the images")
@click.option("--seeds", default="0-63", show_default=True, help="Seeds, e.g. 0-63 or 1,5,9-11")
@click.option("--batch", "max_batch", type=click.IntRange(min=1), default=64, show_default=True,
              help="Maximum batch size per rank")
@click.option("--class", "class_idx", type=click.IntRange(min=0), default=None, help="Class label (default: random)")
@click.option("--steps", "num_steps", type=click.IntRange(min=1), default=18, show_default=True)
@click.option("--sigma-min", type=click.FloatRange(min=0, min_open=True), default=0.002, show_default=True)
@click.option("--sigma-max", type=click.FloatRange(min=0, min_open=True), default=80.0, show_default=True)
@click.option("--rho", type=click.FloatRange(min=0, min_open=True), default=7.0, show_default=True)
@click.option("--solver", type=click.Choice(["heun", "euler"]), default="heun", show_default=True)
@click.option("--S-churn", "S_churn", type=click.FloatRange(min=0), default=0.0, show_default=True)
@click.option("--S-min", "S_min", type=click.FloatRange(min=0), default=0.0, show_default=True)
@click.option("--S-max", "S_max", type=click.FloatRange(min=0), default=float("inf"), show_default=True)
@click.option("--S-noise", "S_noise", type=float, default=1.0, show_default=True)
@click.option("--subdirs", is_flag=True, help="Save images in subdirectories of 1000")
@click.option("--grid", "grid_path", default=None, help="Grid image of the first 64 seeds [default: OUTDIR-grid.png]")
@click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True)
def main(network_path, outdir, seeds, max_batch, class_idx, num_steps, sigma_min, sigma_max, rho, solver, S_churn,
         S_min, S_max, S_noise, subdirs, grid_path, device):
    device = dist.init(device)
    rank, world = dist.get_rank(), dist.get_world_size()
    seeds = parse_seeds(seeds)
    net, config = checkpoint.load_snapshot(network_path, device=device)
    if class_idx is not None and class_idx >= net.label_dim:
        raise UserError(f"--class {class_idx} is out of range: the network has {net.label_dim} classes.")
    sigma_min, sigma_max = max(sigma_min, net.sigma_min), min(sigma_max, net.sigma_max)
    shape = [net.in_channels, net.img_resolution, net.img_resolution]
    dist.print0(f"Generating {len(seeds)} images from {checkpoint.resolve_snapshot_path(network_path)} "
                f"({solver}, {num_steps} steps) on {world} rank(s) to {outdir}")

    batches = seed_batches(seeds, max_batch, rank, world)
    for batch_seeds in tqdm.tqdm(batches, disable=rank != 0, unit="batch"):
        gen = SeedGenerators(batch_seeds, device=device)
        latents = gen.randn([len(batch_seeds), *shape]).to(device)
        labels = None
        if net.label_dim:
            idx = (torch.full((len(batch_seeds),), class_idx) if class_idx is not None
                   else gen.randint(0, net.label_dim, [len(batch_seeds), 1])[:, 0])
            labels = torch.nn.functional.one_hot(idx.to(device), net.label_dim).float()
        with torch.no_grad():
            images = edm_sampler(net_denoiser(net, labels), latents, gen, num_steps=num_steps,
                                 sigma_min=sigma_min, sigma_max=sigma_max, rho=rho, solver=solver, S_churn=S_churn,
                                 S_min=S_min, S_max=S_max, S_noise=S_noise)
        for seed, img in zip(batch_seeds, to_uint8_images(images)):
            path = image_path(outdir, seed, subdirs)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            save_image(img, path)

    dist.barrier()
    if rank == 0:
        grid_path = grid_path or os.path.normpath(outdir) + "-grid.png"
        first = [np.asarray(PIL.Image.open(image_path(outdir, s, subdirs))) for s in seeds[:64]]
        first = np.stack([a[:, :, None] if a.ndim == 2 else a for a in first])
        save_image(image_grid(first), grid_path)
        print(f"Wrote {len(seeds)} images to {outdir} and a grid to {grid_path}")
    dist.destroy()


if __name__ == "__main__":
    dnnlib.run_cli(main)
