"""Frechet Inception Distance, EDM-compatible: `ref` computes reference statistics of a dataset, `calc` scores images.

Examples (one process, or any number of ranks under torchrun; `--batch` is per rank). Under torchrun, put `--` before
`fid.py`: torchrun's own parser accepts abbreviations and rejects `--num` as ambiguous (`--numa-binding`).
    # Reference statistics of a training set -> fid-refs/ffhq-64.npz and its record fid-refs/ffhq-64.json
    python fid.py ref --data datasets/ffhq-64x64.zip --dest fid-refs/ffhq-64.npz

    # Generate 50k samples and score them (the record goes to out/samples-fid.json)
    torchrun --standalone --nproc_per_node=8 generate.py --network SNAPSHOT --outdir out/samples --seeds 0-49999 \
        --batch 64
    torchrun --standalone --nproc_per_node=8 -- fid.py calc --images out/samples --ref fid-refs/ffhq-64.npz \
        --num 50000

`--images` and `--data` are anything `training.dataset.ImageFolderDataset` reads: a folder or zip of same-size square
PNG/JPEG images (1 or 3 channels; grayscale, such as MRI magnitude images, is replicated to 3 channels), searched
recursively. Every image in it counts, so keep other pictures (sample grids) out of the folder; generate.py writes its
grid beside the folder, not in it. `calc` scores `--num` of them chosen by `--seed` (all of them when there are exactly
`--num`) and refuses when there are fewer.

The detector is the FID Inception-v3 (2048-d pool features of TensorFlow's 2015-12-05 graph), by default pytorch-fid's
state dict port, downloaded once into `$MSM_CACHE_DIR` (default ~/.cache/msm) and verified by its full SHA-256
(training.inception.FID_INCEPTION_SHA256; another detector needs `--detector-sha256`). Without network:
download training.inception.FID_INCEPTION_URL elsewhere and pass `--detector PATH` or copy it into the cache directory.
`--detector` also takes a TorchScript archive of a module with InceptionV3FID's parameter names: only its weights are
read (training/inception.py); no detector file's code is ever run.

Results are printed and written as JSON records (FID, number of images, seed, detector and reference with their
SHA-256) so a number can be traced to exactly what produced it.
"""

import datetime
import json
import os
import time

import click

from dnnlib import UserError, atomic_write, file_sha256, run_cli
from dnnlib.util import check_outdir, is_url, open_url
from torch_utils import distributed
from training.dataset import ImageFolderDataset
from training.inception import FID_INCEPTION_URL, load_detector
from training.metrics import (
    dataset_feature_stats,
    frechet_distance,
    load_reference_stats,
    save_reference_stats,
)


def _rank0_first(fn):
    """Run `fn` on rank 0, then on the other ranks (e.g. a download into a shared cache). A failure on rank 0 is
    raised on every rank instead of leaving the others waiting for it."""
    result, error = None, None
    if distributed.get_rank() == 0:
        try:
            result = fn()
        except Exception as e:
            error = e
    message = distributed.broadcast_object(None if error is None else str(error))
    if error is not None:
        raise error
    if message is not None:
        raise UserError(message)
    return fn() if distributed.get_rank() != 0 else result


def _write_json(path: str, record: dict):
    """Write a JSON record atomically (temp file + rename)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_write(path, "w") as f:
        json.dump(record, f, indent=2)
        f.write("\n")


def _dataset_sha256(path: str) -> str | None:
    """SHA-256 of a dataset given as one file (zip); None for a folder, which has no single hash."""
    return file_sha256(path) if os.path.isfile(path) else None


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _load_detector_for(detector, detector_sha256, device):
    net, info = _rank0_first(lambda: load_detector(detector, detector_sha256, device=device))
    info.feature_dim = net.feature_dim
    return net, info


detector_options = [
    click.option("--detector", help="Feature extractor: URL or file (state dict or TorchScript)", metavar="URL|PATH",
                 default=FID_INCEPTION_URL, show_default=True),
    click.option("--detector-sha256", help="Expected full SHA-256 of the detector file", metavar="HEX"),
    click.option("--batch", help="Images per batch, per rank", metavar="INT", type=click.IntRange(min=1), default=64,
                 show_default=True),
    click.option("--workers", help="Data-loading worker processes per rank", metavar="INT",
                 type=click.IntRange(min=0), default=2, show_default=True),
    click.option("--device", help="Where the detector runs", type=click.Choice(["auto", "cpu", "cuda"]),
                 default="auto", show_default=True),
]


def with_detector_options(fn):
    for option in reversed(detector_options):
        fn = option(fn)
    return fn


@click.group()
def cli():
    """Frechet Inception Distance: reference statistics (`ref`) and scores (`calc`)."""


@cli.command()
@click.option("--data", help="Dataset (folder or zip of images)", metavar="PATH", required=True)
@click.option("--dest", help="Where to write the statistics (.npz)", metavar="NPZ", required=True)
@with_detector_options
def ref(data, dest, detector, detector_sha256, batch, workers, device):
    """Compute FID reference statistics of a dataset (all of its images)."""
    if not dest.endswith(".npz"):
        raise UserError(f"--dest {dest} must end in .npz.")
    check_outdir(os.path.dirname(os.path.abspath(dest)), "--dest folder")
    start = time.time()
    device = distributed.init(device)
    dataset = ImageFolderDataset(data)
    net, info = _load_detector_for(detector, detector_sha256, device)
    distributed.print0(f"Computing reference statistics of {len(dataset)} images in {data} ...")
    stats = dataset_feature_stats(dataset, net, info.feature_dim, batch_size=batch, device=device, num_workers=workers)
    if distributed.get_rank() != 0:
        return
    save_reference_stats(dest, stats.mean(), stats.cov(), num=stats.num, detector_sha256=info.detector_sha256)
    record = {
        "stats": os.path.abspath(dest),
        "stats_sha256": file_sha256(dest),
        "data": os.path.abspath(data),
        "data_sha256": _dataset_sha256(data),
        "num": stats.num,
        "image_shape": dataset.image_shape,
        **info,
        "world_size": distributed.get_world_size(),
        "time": _now(),
        "elapsed_s": round(time.time() - start, 3),
    }
    record_path = dest[: -len(".npz")] + ".json"
    _write_json(record_path, record)
    print(f"Saved {dest} ({stats.num} images, {info.feature_dim}-d features) and {record_path}")


@cli.command()
@click.option("--images", help="Images to score (folder or zip)", metavar="PATH", required=True)
@click.option("--ref", "ref_path", help="Reference statistics (.npz file or URL) or a dataset to compute them from",
              metavar="NPZ|URL|PATH", required=True)
@click.option("--num", help="Number of images to score", metavar="INT", type=click.IntRange(min=2), default=50000,
              show_default=True)
@click.option("--seed", help="Seed choosing which --num images are scored", metavar="INT", type=int, default=0,
              show_default=True)
@click.option("--out", help="JSON record  [default: beside the images, <images>-fid.json]", metavar="JSON")
@with_detector_options
def calc(images, ref_path, num, seed, out, detector, detector_sha256, batch, workers, device):
    """Compute FID of --num images against reference statistics."""
    start = time.time()
    device = distributed.init(device)
    dataset = ImageFolderDataset(images, max_size=num, random_seed=seed)
    if len(dataset.image_names) < num:
        raise UserError(f"--images {images} holds {len(dataset.image_names)} images, fewer than --num {num}.")
    if out is None:
        stem = images.rstrip("/\\")
        out = (stem[: -len(".zip")] if stem.endswith(".zip") else stem) + "-fid.json"
    check_outdir(os.path.dirname(os.path.abspath(out)), "--out folder")

    # Everything that can be rejected is checked before the long feature computation.
    ref_is_stats = is_url(ref_path) or ref_path.endswith(".npz")
    if ref_is_stats:
        try:
            ref_file = _rank0_first(lambda: open_url(ref_path))
        except OSError as e:
            raise UserError(f"--ref {ref_path} cannot be opened ({e}).") from e
        ref_stats = load_reference_stats(ref_file)
    else:
        ref_file = ref_path
        ref_dataset = ImageFolderDataset(ref_path)
    net, info = _load_detector_for(detector, detector_sha256, device)
    if ref_is_stats:
        ref_dim = ref_stats["mu"].shape[0]
        if ref_dim != info.feature_dim:
            raise UserError(f"--ref {ref_path} holds {ref_dim}-d statistics, but the detector gives "
                            f"{info.feature_dim}-d features.")
        if ref_stats["detector_sha256"] not in (None, info.detector_sha256):
            raise UserError(f"--ref {ref_path} was computed with detector SHA-256 {ref_stats['detector_sha256']}, "
                            f"but --detector has SHA-256 {info.detector_sha256}; use the same detector for both.")
        if ref_stats["detector_sha256"] is None:
            distributed.print0(f"Note: --ref {ref_path} does not record its detector; make sure it is the same one.")
    else:
        distributed.print0(f"Computing reference statistics of {len(ref_dataset)} images in {ref_path} ...")
        stats = dataset_feature_stats(ref_dataset, net, info.feature_dim, batch, device, num_workers=workers)
        ref_stats = {"mu": stats.mean(), "sigma": stats.cov(), "num": stats.num}

    distributed.print0(f"Computing statistics of {num} images in {images} ...")
    stats = dataset_feature_stats(dataset, net, info.feature_dim, batch, device, num_workers=workers)
    if distributed.get_rank() != 0:
        return
    fid = frechet_distance(stats.mean(), stats.cov(), ref_stats["mu"], ref_stats["sigma"])
    record = {
        "fid": fid,
        "num": stats.num,
        "seed": seed,
        "images": os.path.abspath(images),
        "ref": ref_path,
        "ref_path": os.path.abspath(ref_file),
        "ref_sha256": _dataset_sha256(ref_file),
        "ref_num": ref_stats["num"],
        **info,
        "image_shape": dataset.image_shape,
        "world_size": distributed.get_world_size(),
        "batch": batch,
        "time": _now(),
        "elapsed_s": round(time.time() - start, 3),
    }
    _write_json(out, record)
    print(f"FID {fid:g} ({stats.num} images of {images} against {ref_path}); record in {out}")


def main():
    try:
        run_cli(cli)
    finally:
        distributed.destroy()  # also after an error, so no rank of a sharded run is left waiting


if __name__ == "__main__":
    main()
