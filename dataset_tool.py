"""Build datasets: image folders/zips -> EDM's zip layout, random-ellipse phantoms, and (see the MRI commands)
multi-coil MRI records from fastMRI HDF5 files or simulated coils.

Every command writes to a temporary file beside `--dest` and renames it at the end, so rejected input or an
interrupted run leaves nothing behind.

Examples:
    python dataset_tool.py phantoms --dest datasets/phantoms-64.zip --num 2000 --resolution 64 --seed 0
    python dataset_tool.py convert --source ~/images --dest datasets/mine-64.zip --resolution 64
"""

import json
import os

import click

import dnnlib
from training import data_tools, masks


@click.group()
def cli():
    """Dataset preparation for training, generation and reconstruction."""


@cli.command()
@click.option("--source", required=True, help="Folder or zip of PNG/JPEG images (class folders 0/, 1/, ... = labels)")
@click.option("--dest", required=True, help="Output zip")
@click.option("--resolution", type=click.IntRange(min=4), default=None, help="Centre-crop to square and resize")
@click.option("--max-images", type=click.IntRange(min=1), default=None, help="Stop after this many images")
@click.option("--channels", type=click.Choice(["auto", "1", "3"]), default="auto",
              help="Force grayscale (1) or RGB (3); auto keeps the source's (RGB if mixed)")
def convert(source, dest, resolution, max_images, channels):
    """Convert an image folder or zip into EDM's zip layout with dataset.json."""
    count, use_labels = data_tools.convert_images(source, dest, resolution, max_images,
                                                  {"1": 1, "3": 3}.get(channels))
    click.echo(f"Wrote {count} images{' with labels' if use_labels else ''} to {dest}")


@cli.command()
@click.option("--dest", required=True, help="Output zip")
@click.option("--num", type=click.IntRange(min=1), default=2000, show_default=True, help="Number of phantoms")
@click.option("--resolution", type=click.IntRange(min=8), default=64, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def phantoms(dest, num, resolution, seed):
    """Random-ellipse (Shepp-Logan-like) grayscale phantoms, deterministic by --seed."""
    data_tools.write_phantoms(dest, num, resolution, seed)
    click.echo(f"Wrote {num} phantoms at {resolution}x{resolution} to {dest}")


# ---- MRI commands (fastmri, simulate-mri) are registered below this line. ----


def _mri_mask_options(command):
    """Options shared by the MRI commands: optional retrospective undersampling with the `fixed` protocol."""
    command = click.option("--mask-kind", type=click.Choice(["none", "lines-random", "lines-equispaced",
                                                             "fastmri-random", "fastmri-equispaced"]),
                           default="none", show_default=True,
                           help="Store undersampled k-space + mask (none = fully sampled)")(command)
    command = click.option("--center-fraction", type=float, default=None,
                           help="fastmri-* masks: fraction of the columns at the centre (fastMRI's; 0.08 at 4x, 0.04 "
                           "at 8x), which sets --acs to round(W * fraction)")(command)
    command = click.option("--accel", type=float, default=masks.MASK_DEFAULTS["R"], show_default=True,
                           help="Acceleration R")(command)
    command = click.option("--acs", type=click.IntRange(min=1), default=None,
                           help="Centre lines every mask keeps, read by the intensity normalisation and (fastmri) the "
                           f"ESPIRiT calibration, fully sampled or not  [default: {masks.ACS_RULE}]")(command)
    command = click.option("--mask-seed", type=int, default=0, show_default=True, help="Per-slice mask seed")(command)
    return command


@cli.command("fastmri")
@click.option("--source", required=True, help="fastMRI multi-coil .h5 file or folder of them")
@click.option("--dest", required=True, help="Output directory (must not exist)")
@click.option("--resolution", type=int, default=256, show_default=True, help="Image-space centre crop (square)")
@click.option("--calib-width", type=int, default=None, help="ESPIRiT calibration region width  [default: --acs]")
@click.option("--kernel-width", type=int, default=6, show_default=True, help="ESPIRiT kernel width")
@click.option("--skip-edge-slices", type=int, default=0, show_default=True, help="Skip N slices at each volume end")
@click.option("--max-slices", type=click.IntRange(min=1), default=None, help="Stop after this many slices")
@click.option("--phase-crop", type=click.Choice(["image", "kspace"]), default=None,
              help="Crop the phase-encode columns in image space, or to the centred window of lines in k-space  "
                   "[default: image; kspace (the only choice) for undersampled files]")
@_mri_mask_options
def fastmri(source, dest, resolution, calib_width, kernel_width, skip_edge_slices, max_slices, phase_crop, mask_kind,
            accel, acs, center_fraction, mask_seed):
    """fastMRI multi-coil HDF5, fully sampled or undersampled (with `mask`) -> MRI records (ESPIRiT maps, readout
    crop in image space, per-slice normalisation and noise estimate); docs/fastmri.md."""
    import tqdm

    mask_law, law_acs = data_tools.mri_mask_law(mask_kind, accel, acs, center_fraction, resolution)
    count = data_tools.convert_fastmri(source, dest, resolution=resolution,
                                       acs=law_acs if mask_law is not None else acs, calib_width=calib_width,
                                       kernel_width=kernel_width, skip_edge_slices=skip_edge_slices,
                                       max_slices=max_slices, mask_law=mask_law, mask_seed=mask_seed,
                                       phase_crop=phase_crop, progress=tqdm.tqdm)
    with open(os.path.join(dest, "dataset.json")) as f:
        noise = json.load(f)["noise"]
    click.echo(f"Wrote {count} slices at {resolution}x{resolution} to {dest}; estimated noise std (median over "
               f"slices, stored units): {noise['median']:.4g}, usable as --sigma-y (docs/fastmri.md)")


@cli.command("simulate-mri")
@click.option("--source", required=True, help="Image dataset (zip or folder; RGB is converted to grayscale)")
@click.option("--dest", required=True, help="Output directory (must not exist)")
@click.option("--coils", type=int, default=8, show_default=True, help="Number of birdcage coils")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the phases and coil rotations")
@click.option("--max-images", type=click.IntRange(min=1), default=None, help="Stop after this many images")
@_mri_mask_options
def simulate_mri_command(source, dest, coils, seed, max_images, mask_kind, accel, acs, center_fraction, mask_seed):
    """Images -> simulated multi-coil k-space (birdcage maps, smooth random phase), deterministic by --seed."""
    import tqdm

    from training.dataset import ImageFolderDataset

    width = ImageFolderDataset(source).image_shape[-1]
    mask_law, acs = data_tools.mri_mask_law(mask_kind, accel, acs, center_fraction, width)
    count = data_tools.simulate_mri(source, dest, num_coils=coils, seed=seed, max_images=max_images, acs=acs,
                                    mask_law=mask_law, mask_seed=mask_seed, progress=tqdm.tqdm)
    click.echo(f"Wrote {count} simulated {coils}-coil slices to {dest}")


if __name__ == "__main__":
    dnnlib.run_cli(cli)
