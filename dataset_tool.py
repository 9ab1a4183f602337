"""Build datasets: image folders/zips -> EDM's zip layout, random-ellipse phantoms, and (see the MRI commands)
multi-coil MRI records from fastMRI HDF5 files or simulated coils.

Every command writes to a temporary file beside `--dest` and renames it at the end, so rejected input or an
interrupted run leaves nothing behind.

Examples:
    python dataset_tool.py phantoms --dest datasets/phantoms-64.zip --num 2000 --resolution 64 --seed 0
    python dataset_tool.py convert --source ~/images --dest datasets/mine-64.zip --resolution 64
"""

import io
import json
import os
import zipfile

import click
import numpy as np
import PIL.Image

import dnnlib
from dnnlib import UserError, check_outdir
from training.dataset import IMAGE_ERRORS, IMAGE_EXTENSIONS, _FileSource, _load_image, _reason
from training.phantoms import random_ellipse_phantoms


class ZipDatasetWriter(dnnlib.util.AtomicWriter):
    """Writes an EDM-layout zip atomically: `{i // 1000:05d}/img{i:08d}.png` files plus `dataset.json`."""

    def __init__(self, dest: str):
        if not dest.endswith(".zip"):
            raise UserError(f"--dest {dest} must end in .zip.")
        if os.path.exists(dest):
            raise UserError(f"--dest {dest} already exists; remove it or choose another name.")
        check_outdir(os.path.dirname(os.path.abspath(dest)), "--dest folder")
        os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
        self.dest = dest
        self.tmp = f"{dest}.tmp-{os.getpid()}"
        self.zip = zipfile.ZipFile(self.tmp, "w", compression=zipfile.ZIP_STORED)
        self.labels = []
        self.count = 0

    def add_image(self, arr: np.ndarray, label: int | None = None):
        name = f"{self.count // 1000:05d}/img{self.count:08d}.png"
        img = PIL.Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)
        buf = io.BytesIO()
        img.save(buf, format="png", compress_level=0, optimize=False)
        self.zip.writestr(name, buf.getvalue())
        if label is not None:
            self.labels.append([name, int(label)])
        self.count += 1

    def finish(self, extra: dict | None = None):
        meta = {"labels": self.labels if self.labels else None, **(extra or {})}
        self.zip.writestr("dataset.json", json.dumps(meta, indent=2))
        self.zip.close()
        os.replace(self.tmp, self.dest)

    def abort(self):
        self.zip.close()
        if os.path.exists(self.tmp):
            os.remove(self.tmp)



def center_crop_resize(arr: np.ndarray, resolution: int | None) -> np.ndarray:
    """Centre-crop to a square, then resize (Lanczos) to `resolution` (no resize if None)."""
    h, w = arr.shape[:2]
    s = min(h, w)
    arr = arr[(h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]
    if resolution is not None and s != resolution:
        img = PIL.Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)
        arr = np.asarray(img.resize((resolution, resolution), PIL.Image.LANCZOS))
        arr = arr[:, :, None] if arr.ndim == 2 else arr
    return arr


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
    src = _FileSource(source)
    names = [n for n in src.names if n.lower().endswith(IMAGE_EXTENSIONS)]
    if not names:
        raise UserError(f"--source {source} contains no PNG/JPEG images.")
    names = names[:max_images] if max_images else names

    # Labels from class folders named by integers (MGDM layout): <source>/<k>/.../image.png -> label k.
    tops = [n.split("/")[0] if "/" in n else None for n in names]
    use_labels = all(t is not None and t.isdigit() for t in tops)

    arrays = []
    for name in names:
        try:
            arr = _load_image(src.read(name))
        except IMAGE_ERRORS as e:  # nothing is written before every image is read
            raise UserError(f"--source {source}: {name} is not a readable image ({_reason(e)}).") from e
        arrays.append(center_crop_resize(arr, resolution))
    want = {"1": 1, "3": 3}.get(channels) or (1 if all(a.shape[2] == 1 for a in arrays) else 3)
    shapes = {a.shape[:2] for a in arrays}
    if len(shapes) > 1:
        raise UserError(f"--source {source} has images of different sizes {sorted(shapes)[:2]}; pass --resolution.")

    with ZipDatasetWriter(dest) as writer:
        for arr, top in zip(arrays, tops):
            if want == 3 and arr.shape[2] == 1:
                arr = np.repeat(arr, 3, axis=2)
            elif want == 1 and arr.shape[2] == 3:
                arr = np.asarray(PIL.Image.fromarray(arr).convert("L"))[:, :, None]
            writer.add_image(arr, int(top) if use_labels else None)
        writer.finish()
    click.echo(f"Wrote {writer.count} images{' with labels' if use_labels else ''} to {dest}")


@cli.command()
@click.option("--dest", required=True, help="Output zip")
@click.option("--num", type=click.IntRange(min=1), default=2000, show_default=True, help="Number of phantoms")
@click.option("--resolution", type=click.IntRange(min=8), default=64, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def phantoms(dest, num, resolution, seed):
    """Random-ellipse (Shepp-Logan-like) grayscale phantoms, deterministic by --seed."""
    imgs = random_ellipse_phantoms(num, resolution, seed)
    with ZipDatasetWriter(dest) as writer:
        for img in imgs:
            writer.add_image(np.rint(img * 255).astype(np.uint8)[:, :, None])
        writer.finish({"source": {"kind": "phantoms", "num": num, "resolution": resolution, "seed": seed}})
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
    command = click.option("--accel", type=float, default=4.0, show_default=True, help="Acceleration R")(command)
    command = click.option("--acs", type=click.IntRange(min=1), default=None,
                           help="Centre lines every mask keeps, read by the intensity normalisation and (fastmri) the "
                           "ESPIRiT calibration, fully sampled or not  [default: min(20, W // 8)]")(command)
    command = click.option("--mask-seed", type=int, default=0, show_default=True, help="Per-slice mask seed")(command)
    return command


def _mri_mask_law(mask_kind, accel, acs, center_fraction, width):
    """(the undersampling law (None = fully sampled), the ACS lines the normalisation reads: its centre lines)."""
    from training.masks import default_acs, mask_law_from_config

    if (center_fraction is not None) != mask_kind.startswith("fastmri"):
        raise UserError("--center-fraction is needed by, and only applies to, --mask-kind fastmri-random and "
                        "fastmri-equispaced.")
    if mask_kind.startswith("fastmri"):
        law = mask_law_from_config({"kind": mask_kind, "R": accel, "center_fraction": center_fraction})
        return law, law.centre_lines(width) if acs is None else acs
    acs = default_acs(width) if acs is None else acs
    return None if mask_kind == "none" else mask_law_from_config({"kind": mask_kind, "R": accel, "acs": acs}), acs


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

    from training.mri import convert_fastmri

    mask_law, law_acs = _mri_mask_law(mask_kind, accel, acs, center_fraction, resolution)
    count = convert_fastmri(source, dest, resolution=resolution, acs=law_acs if mask_law is not None else acs,
                            calib_width=calib_width, kernel_width=kernel_width, skip_edge_slices=skip_edge_slices,
                            max_slices=max_slices, mask_law=mask_law, mask_seed=mask_seed, phase_crop=phase_crop,
                            progress=tqdm.tqdm)
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
    from training.mri import simulate_mri

    mask_law, acs = _mri_mask_law(mask_kind, accel, acs, center_fraction, ImageFolderDataset(source).image_shape[-1])
    count = simulate_mri(source, dest, num_coils=coils, seed=seed, max_images=max_images, acs=acs,
                         mask_law=mask_law, mask_seed=mask_seed, progress=tqdm.tqdm)
    click.echo(f"Wrote {count} simulated {coils}-coil slices to {dest}")


if __name__ == "__main__":
    dnnlib.run_cli(cli)
