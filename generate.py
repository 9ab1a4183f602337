"""Generate images from a network snapshot: one PNG per seed plus a grid, seeds sharded across ranks.

    python generate.py --network runs/00000-phantoms/network-snapshot-000050.pt --outdir out/samples --seeds 0-63
    python generate.py --network RUN_DIR --outdir out/msm --sampler msm --subsets 3     # MSM model, 200 VP levels
    torchrun --standalone --nproc_per_node=2 generate.py --network RUN_DIR --outdir out/samples --seeds 0-49999

Everything about the model (architecture, preconditioning, data shape, labels, measurement operator and mask law)
comes from the snapshot. Each seed has its own random stream, so an image depends only on its seed, not on --batch or
the number of ranks.

Samplers: `edm` (EDM's Heun/Euler on the image, for models trained on clean data) and `msm` (MSM's stochastic
partial-score sampler in measurement space, training/samplers.py; the default for models trained on measurements).
For MRI the operator T needs coil maps: those of --maps, or those of training record (seed mod number of records) of
the snapshot's dataset.

MRI output (any sampler): the magnitude of the coil-combined image T^+ z_hat as an 8-bit grayscale PNG with one fixed
scale for every seed, pixel = 255 * magnitude / MRI_DISPLAY_MAX, clipped. Datasets are normalised so that the 99th
percentile of the magnitude is 1 (training/mri.py), which lands at 170 and leaves headroom for the brightest 1%.
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
from training.measurements import MeasurementConfig
from training.mri import MRIDataset
from training.samplers import (
    edm_sampler,
    msm_heun_sampler,
    msm_sampler,
    net_denoiser,
    net_partial_denoiser,
    rho_schedule,
    seed_measurement_randn,
    vp200_sigmas,
)

MRI_DISPLAY_MAX = 1.5  # magnitude shown as white in MRI PNGs (module docstring)


def seed_batches(seeds: list[int], max_batch: int, rank: int, world: int) -> list[list[int]]:
    """Split seeds into batches of at most max_batch and deal them to ranks round-robin."""
    num_batches = max(int(np.ceil(len(seeds) / (max_batch * world))), 1) * world
    batches = [b.tolist() for b in np.array_split(np.array(seeds, dtype=np.int64), num_batches)]
    return [b for b in batches[rank::world] if len(b)]


def image_path(outdir: str, seed: int, subdirs: bool) -> str:
    return os.path.join(outdir, f"{seed - seed % 1000:06d}", f"{seed:06d}.png") if subdirs else \
        os.path.join(outdir, f"{seed:06d}.png")


def mri_magnitude_images(image: torch.Tensor) -> np.ndarray:
    """Complex images as 2 channels (N, 2, H, W) -> uint8 (N, H, W, 1) magnitudes on the fixed display scale."""
    magnitude = image.to(torch.float64).square().sum(dim=1, keepdim=True).sqrt()
    pixels = (magnitude * (255 / MRI_DISPLAY_MAX)).round().clamp(0, 255).to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu().numpy()


def load_maps_file(path: str, expected_shape: tuple) -> torch.Tensor:
    """--maps: a .npy complex array (C, H, W) of the snapshot's coil count and size."""
    try:
        maps = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise UserError(f"--maps {path} could not be read as a .npy array ({e}).") from e
    if not np.iscomplexobj(maps) or tuple(maps.shape) != tuple(expected_shape):
        raise UserError(f"--maps {path} must hold complex coil maps of shape {tuple(expected_shape)}, got "
                        f"{maps.dtype} {tuple(maps.shape)}.")
    return torch.from_numpy(maps.astype(np.complex64))


def msm_sigmas(schedule: str, num_steps: int, sigma_min: float, sigma_max: float, rho: float) -> torch.Tensor:
    """The MSM sampler's decreasing noise levels: the 200 VP levels, or EDM's rho schedule without its final 0."""
    return vp200_sigmas() if schedule == "vp200" else rho_schedule(num_steps, sigma_min, sigma_max, rho)[:-1]


class MSMSetup:
    """What the MSM sampler needs from a snapshot: the measurement's mask law and operator family, and for MRI the
    coil maps (--maps, or training record seed mod N per seed) and the measurement shape."""

    def __init__(self, net, config: dict, maps_path: str | None, device):
        self.net, self.device = net, device
        measurement = MeasurementConfig.from_config(config["measurement"])
        self.measurement = measurement
        resolution = net.img_resolution
        if measurement.operator == "mri":
            self.records = MRIDataset(config["dataset"]["path"]) if maps_path is None else None
            num_coils = config["dataset"]["num_coils"]
            self.fixed_maps = None if maps_path is None else load_maps_file(maps_path, (num_coils, resolution,
                                                                                        resolution))
            self.shape, self.dtype = [num_coils, resolution, resolution], torch.complex64
        else:
            self.shape, self.dtype = [net.out_channels, resolution, resolution], torch.float32

    def operator(self, seeds: list[int]):
        if self.measurement.operator != "mri":
            return self.measurement.full_operator()
        if self.fixed_maps is not None:
            maps = self.fixed_maps[None]
        else:
            maps = torch.stack([self.records[seed % len(self.records)]["maps"] for seed in seeds])
        return self.measurement.full_operator(maps.to(self.device))

    def generate(self, seeds, gen, labels, *, num_subsets, variant, sigmas, eta, num_steps, sigma_min, sigma_max,
                 rho) -> torch.Tensor:
        """Images (N, C, H, W) (MRI: the complex image T^+ z_hat as 2 channels) for the seeds of `gen`."""
        operator = self.operator(seeds)
        latents = seed_measurement_randn(gen, torch.empty([len(seeds), *self.shape], dtype=self.dtype))
        latents = latents.to(self.device)
        partial = net_partial_denoiser(self.net, operator, labels)
        if variant == "heun":
            z_hat = msm_heun_sampler(partial, latents, self.measurement.law, gen, num_subsets=num_subsets,
                                     num_steps=num_steps, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho)
        else:
            z_hat = msm_sampler(partial, latents, self.measurement.law, gen, num_subsets=num_subsets, sigmas=sigmas,
                                variant=variant, eta=eta)
        return operator.pinv(z_hat) if self.measurement.operator == "mri" else z_hat


def resolve_sampler(sampler: str | None, config: dict) -> str:
    """--sampler default: msm for a model trained on measurements whose mask law hides something, else edm."""
    measurement = config.get("measurement")
    if sampler is None:
        return "msm" if measurement is not None and measurement["mask"]["kind"] != "full" else "edm"
    if sampler == "msm" and measurement is None:
        raise UserError("--sampler msm needs a snapshot trained on measurements, but this snapshot's config has no "
                        "measurement process (use --sampler edm).")
    return sampler


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
@click.option("--sampler", type=click.Choice(["edm", "msm"]), default=None,
              help="Sampler [default: msm for a model trained on masked measurements, else edm]")
@click.option("--subsets", "num_subsets", type=int, default=3, show_default=True,
              help="MSM: masks (partial estimates) per noise level, K >= 1")
@click.option("--schedule", type=click.Choice(["vp200", "rho"]), default="vp200", show_default=True,
              help="MSM noise levels: the reference's 200 VP levels, or EDM's rho schedule (--steps, --sigma-*)")
@click.option("--variant", type=click.Choice(["batched", "reference", "heun"]), default="batched",
              show_default=True, help="MSM: K estimates from the start-of-step state in one batched call; the "
              "reference's sequential write-back; or EDM Heun on the aggregate (rho schedule)")
@click.option("--eta", type=click.FloatRange(min=0, max=1), default=1.0, show_default=True,
              help="MSM: DDIM eta of the outer update (1 = ancestral)")
@click.option("--maps", "maps_path", default=None, help="MRI: coil maps .npy complex (C,H,W) [default: from the "
              "training records]")
@click.option("--subdirs", is_flag=True, help="Save images in subdirectories of 1000")
@click.option("--grid", "grid_path", default=None, help="Grid image of the first 64 seeds [default: OUTDIR-grid.png]")
@click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True)
def main(network_path, outdir, seeds, max_batch, class_idx, num_steps, sigma_min, sigma_max, rho, solver, S_churn,
         S_min, S_max, S_noise, sampler, num_subsets, schedule, variant, eta, maps_path, subdirs, grid_path, device):
    if num_subsets < 1:
        raise UserError(f"--subsets must be an integer >= 1, got {num_subsets}.")
    device = dist.init(device)
    rank, world = dist.get_rank(), dist.get_world_size()
    seeds = parse_seeds(seeds)
    net, config = checkpoint.load_snapshot(network_path, device=device)
    if class_idx is not None and class_idx >= net.label_dim:
        raise UserError(f"--class {class_idx} is out of range: the network has {net.label_dim} classes.")
    sampler = resolve_sampler(sampler, config)
    is_mri = config.get("dataset", {}).get("kind") == "mri"
    if maps_path is not None and not (is_mri and sampler == "msm"):
        raise UserError("--maps applies only to the msm sampler of an MRI model.")
    sigma_min, sigma_max = max(sigma_min, net.sigma_min), min(sigma_max, net.sigma_max)
    shape = [net.in_channels, net.img_resolution, net.img_resolution]
    if sampler == "msm":
        msm = MSMSetup(net, config, maps_path, device)
        sigmas = msm_sigmas(schedule, num_steps, sigma_min, sigma_max, rho)
        settings = (f"msm {variant}, K = {num_subsets}, "
                    + (f"{num_steps} Heun steps" if variant == "heun" else f"{schedule} schedule, eta = {eta}"))
    else:
        settings = f"edm {solver}, {num_steps} steps"
    dist.print0(f"Generating {len(seeds)} images from {checkpoint.resolve_snapshot_path(network_path)} "
                f"({settings}) on {world} rank(s) to {outdir}")

    batches = seed_batches(seeds, max_batch, rank, world)
    for batch_seeds in tqdm.tqdm(batches, disable=rank != 0, unit="batch"):
        gen = SeedGenerators(batch_seeds, device=device)
        latents = gen.randn([len(batch_seeds), *shape]).to(device) if sampler == "edm" else None
        labels = None
        if net.label_dim:
            idx = (torch.full((len(batch_seeds),), class_idx) if class_idx is not None
                   else gen.randint(0, net.label_dim, [len(batch_seeds), 1])[:, 0])
            labels = torch.nn.functional.one_hot(idx.to(device), net.label_dim).float()
        with torch.no_grad():
            if sampler == "msm":
                images = msm.generate(batch_seeds, gen, labels, num_subsets=num_subsets, variant=variant,
                                      sigmas=sigmas, eta=eta, num_steps=num_steps, sigma_min=sigma_min,
                                      sigma_max=sigma_max, rho=rho)
            else:
                images = edm_sampler(net_denoiser(net, labels), latents, gen, num_steps=num_steps,
                                     sigma_min=sigma_min, sigma_max=sigma_max, rho=rho, solver=solver,
                                     S_churn=S_churn, S_min=S_min, S_max=S_max, S_noise=S_noise)
        pixels = mri_magnitude_images(images) if is_mri else to_uint8_images(images)
        for seed, img in zip(batch_seeds, pixels):
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
