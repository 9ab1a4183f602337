"""Generate images from a network snapshot: one PNG per seed plus a grid, seeds sharded across ranks.

    python generate.py --network runs/00000-phantoms/network-snapshot-000050.pt --outdir out/samples --seeds 0-63
    python generate.py --network RUN_DIR --outdir out/msm --sampler msm --subsets 3     # MSM model, 200 VP levels
    torchrun --standalone --nproc_per_node=2 generate.py --network RUN_DIR --outdir out/samples --seeds 0-49999

Everything about the model (architecture, preconditioning, data shape, labels, measurement operator and mask law)
comes from the snapshot. OUTDIR/settings.json records the options the images depend on: rerunning the same command
may overwrite its images, another command is refused before anything is written (dnnlib.util.check_outdir_settings).
Each seed has its own random stream, so an image depends only on its seed, not on --batch or the number of ranks.

Samplers: `edm` (EDM's Heun/Euler on the image, for models trained on clean data), `msm` (MSM's stochastic
partial-score sampler in measurement space, training/sampling/; the default for models trained on measurements)
and `ambient` (Ambient Diffusion's sampler: EDM's Heun/Euler where the network sees one mask per seed of its training
law with the extra delta drop; the default for models trained with --loss ambient). A network with a mask input
channel is never given the noisy image there: `edm` is refused for it.
The MSM sampler's VP-200 grid is the reference's 'ddim200' (t = 0, 5, ..., 995), or the section rule a vp200 snapshot
was trained on (schedules.vp_grid_of; --vp-grid overrides); it starts inside the network's training range
(schedules.sigmas_in_training_range: levels above it are dropped, and the log says from where and why). Each batch
shows a bar of network calls with rate and ETA.
For MRI the operator T needs coil maps: those of --maps, or those of training record (seed mod number of records) of
the snapshot's dataset.

MRI output (any sampler): the magnitude of the coil-combined image T^+ z_hat as an 8-bit grayscale PNG with one fixed
scale for every seed, pixel = 255 * magnitude / MRI_DISPLAY_MAX, clipped. Datasets are normalised so that the 99th
percentile of the magnitude of the low-resolution ACS image is 1 (training/mri.py); the full image's 99th percentile
then lies higher (1.48 +- 0.18 for 32x32 phantoms with 4 ACS lines, 1.25 +- 0.16 for 64x64 with 8), which 2 keeps
below white, with headroom for the brightest 1%.
"""

import json
import os

import click
import numpy as np
import PIL.Image
import torch
import tqdm

import dnnlib
from dnnlib import UserError
from torch_utils import distributed as dist
from torch_utils.misc import SeedGenerators, image_grid, parse_seeds, save_image, to_uint8_images
from training import snapshot as checkpoint
from training.patches import use_seeds
from training.sampling.generation import Generation, bridge_images, open_bridge_source, parse_label_list
from training.sampling.methods import METHODS, cli_options, load_network, model_options, with_options

MRI_DISPLAY_MAX = 2.0  # magnitude shown as white in MRI PNGs (module docstring)


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




def write_labels_and_class_grids(outdir: str, seed_classes: list, grid_path: str, subdirs: bool):
    """Labelled outputs: `dataset.json` in outdir with EDM's {"labels": [[relative path, class], ...]} (so the folder
    feeds train.py --cond / --kind classifier directly) and a grid of the first 64 images of every class,
    `{grid}-class{k}.png`."""
    labels = [[os.path.relpath(image_path(outdir, seed, subdirs), outdir).replace(os.sep, "/"), int(k)]
              for seed, k in sorted(seed_classes)]
    with open(os.path.join(outdir, "dataset.json"), "w") as f:
        json.dump({"labels": labels}, f)
    stem = grid_path[:-4] if grid_path.endswith(".png") else grid_path
    for k in sorted({k for _, k in seed_classes}):
        members = [seed for seed, c in sorted(seed_classes) if c == k][:64]
        tiles = [np.asarray(PIL.Image.open(image_path(outdir, seed, subdirs))) for seed in members]
        save_image(image_grid(np.stack([a[:, :, None] if a.ndim == 2 else a for a in tiles])), f"{stem}-class{k}.png")



def dual_bridge_images(g: Generation, dataset, source_labels, target_labels, outdir: str, max_batch: int,
                       subdirs: bool, rank: int, world: int) -> list:
    """--bridge-source: every image of the labelled dataset whose class is in --source-label, re-synthesised under
    the matching --target-label class (`bridge_images`); image i of the dataset is written as image i. Returns this
    rank's (index, target class) pairs."""
    mapping = dict(zip(source_labels, target_labels))
    labels = [int(dataset.get_label(i).argmax()) for i in range(len(dataset))]
    chosen = [i for i in range(len(dataset)) if labels[i] in mapping][rank::world]
    written = []
    for start in tqdm.tqdm(range(0, len(chosen), max_batch), disable=rank != 0, unit="batch"):
        indices = chosen[start:start + max_batch]
        x = torch.stack([dataset[i]["image"] for i in indices]).to(g.device, torch.float64)
        src = torch.tensor([labels[i] for i in indices], device=g.device)
        tgt = torch.tensor([mapping[labels[i]] for i in indices], device=g.device)
        with torch.no_grad():
            out = bridge_images(g, x, src, tgt)
        for i, k, img in zip(indices, tgt.tolist(), to_uint8_images(out)):
            path = image_path(outdir, i, subdirs)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            save_image(img, path)
            written.append((i, k))
    return written


@click.command()
@click.option("--network", "network_path", required=True, help="Network snapshot file or run directory")
@click.option("--outdir", required=True, help="Where to save the images")
@click.option("--seeds", default="0-63", show_default=True, help="Seeds, e.g. 0-63 or 1,5,9-11")
@click.option("--batch", "max_batch", type=click.IntRange(min=1), default=64, show_default=True,
              help="Maximum batch size per rank")
@click.option("--class", "class_idx", type=click.IntRange(min=0), default=None, help="Class label (default: random)")
@click.option("--per-class", type=click.IntRange(min=1), default=None,
              help="N images of every class, seeds FIRST .. FIRST + K N - 1 (FIRST: the first of --seeds), seed "
              "FIRST + i of class i // N; with classes, dataset.json labels and a grid per class are written")
@with_options(*cli_options("generate"))
@click.option("--subdirs", is_flag=True, help="Save images in subdirectories of 1000")
@click.option("--grid", "grid_path", default=None, help="Grid image of the first 64 seeds [default: OUTDIR-grid.png]")
@with_options(model_options("seeds"))
@click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True)
def main(**options):
    o = dnnlib.EasyDict(options)
    # What the outputs depend on, recorded in OUTDIR/settings.json: a rerun may overwrite its own outputs only.
    recorded = {p.name: options[p.name] for p in click.get_current_context().command.params
                if p.name not in ("outdir", "max_batch", "compile_net", "device")}
    recorded.update(network_path=os.path.abspath(checkpoint.resolve_snapshot_path(o.network_path)),
                    grid_path=os.path.abspath(o.grid_path or os.path.normpath(o.outdir) + "-grid.png"),
                    **{k: os.path.abspath(o[k]) for k in ("classifier_path", "bridge_source", "maps_path")
                       if o[k] is not None})
    outdir, seeds, subdirs = o.outdir, parse_seeds(o.seeds), o.subdirs
    grid_path = o.grid_path or os.path.normpath(outdir) + "-grid.png"
    dnnlib.check_outdir(outdir)
    dnnlib.check_outdir_settings(outdir, recorded)
    dnnlib.check_outdir(os.path.dirname(os.path.abspath(grid_path)), "--grid folder")
    device = dist.init(o.device)
    rank, world = dist.get_rank(), dist.get_world_size()
    net, config = load_network(o.network_path, device, o.patch_size, o.patch_batch, o.assembly, o.compile_net,
                               needs="generate.py needs a diffusion model (a classifier goes to --classifier)")
    if o.bridge_source is not None and config.get("patches"):
        raise UserError("--bridge-source inverts the probability-flow ODE, which needs a deterministic denoiser; a "
                        "patch prior's whole-image denoiser draws a random grid shift and pad-ring noise per call.")
    g = Generation(net, config, o, device)
    guide, num_classes, method = g.guide, g.guide.num_classes, METHODS[g.sampler]
    if o.class_idx is not None and o.class_idx >= num_classes:
        raise UserError(f"--class {o.class_idx} is out of range: the model has {num_classes} classes.")
    if o.per_class is not None and not num_classes:
        raise UserError("--per-class needs classes: a class-conditional model or --guidance classifier with a "
                        "--classifier.")
    seed_class = None
    if o.per_class is not None:
        seeds = [seeds[0] + i for i in range(num_classes * o.per_class)]
        seed_class = {seed: i // o.per_class for i, seed in enumerate(seeds)}
    elif o.class_idx is not None:
        seed_class = {seed: o.class_idx for seed in seeds}
    if o.bridge_source is None and (o.source_label or o.target_label):
        raise UserError("--source-label and --target-label apply to --bridge-source only.")
    if o.bridge_source is not None:
        if g.sampler != "edm":
            raise UserError("--bridge-source needs a model trained on clean images (the edm sampler's denoiser).")
        bridge_classes = num_classes or guide.classifier_classes
        if not bridge_classes:
            raise UserError("--bridge-source needs classes: a class-conditional model or a --classifier with "
                            "--guidance.")
        source_labels = (parse_label_list(o.source_label, "--source-label", bridge_classes)
                         or list(range(bridge_classes)))
        target_labels = parse_label_list(o.target_label, "--target-label", bridge_classes) or source_labels
        if len(source_labels) != len(target_labels):
            raise UserError(f"--source-label and --target-label must list as many classes, got "
                            f"{len(source_labels)} and {len(target_labels)}.")
    settings, calls = g.describe(method.sample_settings(g)), method.sample_calls(g)
    bridge_dataset = None if o.bridge_source is None else open_bridge_source(net, guide, o.bridge_source)
    if rank == 0:  # everything is checked: record the settings before the first output
        dnnlib.write_outdir_settings(outdir, recorded)
    if o.bridge_source is not None:
        dist.print0(f"Dual bridge of {o.bridge_source} through {checkpoint.resolve_snapshot_path(o.network_path)} "
                    f"({o.num_steps} Heun steps each way; {settings}) on {world} rank(s) to {outdir}")
        written = dual_bridge_images(g, bridge_dataset, source_labels, target_labels, outdir, o.max_batch, subdirs,
                                     rank, world)
        written = [pair for part in dist.all_gather_object(written) for pair in part]
        if rank == 0:
            write_labels_and_class_grids(outdir, written, grid_path, subdirs)
            print(f"Wrote {len(written)} re-synthesised images with dataset.json labels to {outdir}")
        dist.destroy()
        return
    if config.get("patches"):
        settings += f"; {net.describe()}"
    dist.print0(f"Generating {len(seeds)} images from {checkpoint.resolve_snapshot_path(o.network_path)} "
                f"({settings}) on {world} rank(s) to {outdir}")

    batches = seed_batches(seeds, o.max_batch, rank, world)
    seed_classes = []  # (seed, class) of this rank's images
    for b, batch_seeds in enumerate(tqdm.tqdm(batches, disable=rank != 0, unit="batch")):
        net.bar = tqdm.tqdm(total=calls, disable=rank != 0, unit="call", leave=False,
                            desc=f"batch {b + 1}/{len(batches)}")
        gen = SeedGenerators(batch_seeds, device=device)
        use_seeds(net, batch_seeds, device)
        latents = g.latents(gen, batch_seeds)
        labels, idx = None, None
        if num_classes:
            idx = (torch.tensor([seed_class[seed] for seed in batch_seeds]) if seed_class is not None
                   else gen.randint(0, num_classes, [len(batch_seeds), 1])[:, 0]).to(device)
            labels = torch.nn.functional.one_hot(idx, net.label_dim).float() if net.label_dim else None
            seed_classes.extend(zip(batch_seeds, idx.tolist()))
        with torch.no_grad():
            images = method.sample(g, batch_seeds, gen, labels, idx, latents)
        net.bar.close()
        pixels = mri_magnitude_images(images) if g.is_mri else to_uint8_images(images)
        for seed, img in zip(batch_seeds, pixels):
            path = image_path(outdir, seed, subdirs)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            save_image(img, path)

    dist.barrier()
    seed_classes = [pair for part in dist.all_gather_object(seed_classes) for pair in part]
    if rank == 0:
        if seed_classes:
            write_labels_and_class_grids(outdir, seed_classes, grid_path, subdirs)
        first = [np.asarray(PIL.Image.open(image_path(outdir, s, subdirs))) for s in seeds[:64]]
        first = np.stack([a[:, :, None] if a.ndim == 2 else a for a in first])
        save_image(image_grid(first), grid_path)
        print(f"Wrote {len(seeds)} images to {outdir} and a grid to {grid_path}")
    dist.destroy()


if __name__ == "__main__":
    dnnlib.run_cli(main)
