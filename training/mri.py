"""Multi-coil MRI data: coil simulation, ESPIRiT coil maps, fastMRI conversion, and the record dataset.

Record layout (a directory, written atomically as `<dest>.tmp-<pid>` then renamed):
    dest/dataset.json        facts about the data (see `MRIDatasetWriter.finish`), including one entry per slice
    dest/slices/000000.npz   arrays of one slice (np.savez, uncompressed, read with allow_pickle=False):
                               kspace  complex64 (C, H, W)  centred k-space (`operators.fft2c` convention)
                               maps    complex64 (C, H, W)  coil maps S_c
                               mask    float32 (1, 1, W) or (1, H, W), only for undersampled records; the stored
                                       k-space is then exactly zero where the mask is zero
The coil-combined image of a record is x = T^H k = sum_c conj(S_c) ifft2c(k_c) (`MultiCoilMRI.AH`).

Normalisation (recorded in dataset.json): every slice's k-space is multiplied by one scalar `scale` so that the
99th percentile of |T^H k| over the slice is 1, with T^H k computed from the k-space as stored (zero-filled when
undersampled: no fully sampled data is needed to normalise). The per-slice scale is kept in dataset.json.

sigpy (ESPIRiT) and h5py are imported lazily: they are needed only by the fastMRI converter.
"""

import json
import os
import shutil

import numpy as np
import torch

from dnnlib import UserError
from dnnlib.util import AtomicWriter
from training.masks import MaskLaw
from training.operators import MultiCoilMRI, channels_to_complex, fft2c, ifft2c

FORMAT_VERSION = 1
NORMALISATION = {"kind": "slice-percentile", "percentile": 99.0, "value": 1.0,
                 "of": "magnitude of the coil-combined image sum_c conj(S_c) ifft2c(k_c) of the stored k-space"}

# ----------------------------------------------------------------------------
# Small numeric helpers (numpy in, numpy out; torch does the FFTs so the conventions are the operators').


def coil_combine(kspace: np.ndarray, maps: np.ndarray) -> np.ndarray:
    """T^H k: (C, H, W) k-space and maps -> complex (H, W) image."""
    operator = MultiCoilMRI(torch.from_numpy(maps)[None])
    return channels_to_complex(operator.AH(torch.from_numpy(kspace)[None]))[0].numpy()


def normalisation_scale(image: np.ndarray) -> float:
    """1 / (99th percentile of |image|); falls back to the maximum, and to 1 for an all-zero image."""
    magnitude = np.abs(image)
    reference = float(np.percentile(magnitude, NORMALISATION["percentile"]))
    reference = reference if reference > 0 else float(magnitude.max())
    return NORMALISATION["value"] / reference if reference > 0 else 1.0


def birdcage_maps(num_coils: int, height: int, width: int, rotation: float = 0.0, ring_radius: float = 1.5):
    """Birdcage-style coil maps, complex64 (C, H, W), normalised so sum_c |S_c|^2 = 1 at every pixel.

    Coil c sits at angle 2 pi c / C + rotation on a ring of radius `ring_radius` (in units of half the field of
    view, so 1.5 is outside the image, corners included); its sensitivity has magnitude 1 / distance and phase
    equal to the direction from the coil to the pixel plus the coil's angle (smooth inside the image).
    """
    v, u = np.meshgrid((np.arange(height) - height / 2) / (height / 2), (np.arange(width) - width / 2) / (width / 2),
                       indexing="ij")
    angles = 2 * np.pi * np.arange(num_coils) / num_coils + rotation
    du = u[None] - ring_radius * np.cos(angles)[:, None, None]
    dv = v[None] - ring_radius * np.sin(angles)[:, None, None]
    maps = np.exp(1j * (np.arctan2(dv, du) + angles[:, None, None])) / np.hypot(du, dv)
    return (maps / np.sqrt((np.abs(maps) ** 2).sum(axis=0))).astype(np.complex64)


def smooth_phase(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """A smooth random phase pi (c0 + c1 u + c2 v + c3 u v + c4 u^2 + c5 v^2), c_j ~ U(-1/2, 1/2), u, v in [-1, 1]."""
    v, u = np.meshgrid(np.linspace(-1, 1, height), np.linspace(-1, 1, width), indexing="ij")
    c = rng.uniform(-0.5, 0.5, size=6)
    return np.pi * (c[0] + c[1] * u + c[2] * v + c[3] * u * v + c[4] * u**2 + c[5] * v**2)


def espirit_maps(kspace: np.ndarray, calib_width: int, kernel_width: int, thresh: float, crop: float,
                 max_iter: int = 100, where: str = "") -> np.ndarray:
    """ESPIRiT coil maps (sigpy.mri.app.EspiritCalib, one set of maps) from the centre calib_width^2 region of a
    centred k-space (C, H, W). Maps are zero where the eigenvalue is below `crop`, and unit-norm across coils
    elsewhere. sigpy returns all-zero maps without complaint when the calibration region is too small for the
    kernel; that is an error here."""
    import sigpy.mri

    num_coils, height, width = kspace.shape
    if calib_width > min(height, width) or kernel_width > calib_width:
        raise UserError(f"ESPIRiT{where}: need kernel_width ({kernel_width}) <= calib_width ({calib_width}) <= "
                        f"image size {height}x{width}.")
    maps = sigpy.mri.app.EspiritCalib(kspace, calib_width=calib_width, thresh=thresh, kernel_width=kernel_width,
                                      crop=crop, max_iter=max_iter, show_pbar=False).run()
    covered = (np.abs(maps) ** 2).sum(axis=0) > 0.5
    if covered.mean() < 0.01:
        raise UserError(f"ESPIRiT{where} returned (almost) all-zero coil maps; use a larger --calib-width or a "
                        f"smaller --kernel-width (now {calib_width} and {kernel_width}).")
    return maps.astype(np.complex64)


def center_crop_kspace(kspace: np.ndarray, resolution: int) -> np.ndarray:
    """Centre-crop a centred k-space (C, H, W) to resolution^2 in IMAGE space (fastMRI k-space is oversampled in
    the readout direction): ifft2c, crop the central block, fft2c."""
    height, width = kspace.shape[-2:]
    top, left = (height - resolution) // 2, (width - resolution) // 2
    images = ifft2c(torch.from_numpy(kspace))[..., top : top + resolution, left : left + resolution]
    return fft2c(images.contiguous()).numpy().astype(np.complex64)


# ----------------------------------------------------------------------------
# Writing records.


class MRIDatasetWriter(AtomicWriter):
    """Writes a record directory atomically: everything goes to `<dest>.tmp-<pid>/`, renamed on `finish`, deleted
    on error (use as a context manager)."""

    def __init__(self, dest: str):
        if os.path.exists(dest):
            raise UserError(f"--dest {dest} already exists; remove it or choose another name.")
        self.dest = dest
        self.tmp = f"{os.path.abspath(dest)}.tmp-{os.getpid()}"
        os.makedirs(os.path.join(self.tmp, "slices"))
        self.slices = []
        self.shape = None

    def add(self, kspace: np.ndarray, maps: np.ndarray, mask: np.ndarray | None = None, info: dict | None = None):
        """One slice; k-space is multiplied by its normalisation scale here (recorded in dataset.json)."""
        if kspace.shape != maps.shape or kspace.ndim != 3:
            raise UserError(f"MRI record {len(self.slices)}: maps {maps.shape} and k-space {kspace.shape} must both "
                            "be (C, H, W) of the same shape.")
        if self.shape is not None and kspace.shape != self.shape:
            raise UserError(f"MRI record {len(self.slices)} has shape {kspace.shape}, but earlier ones {self.shape}.")
        self.shape = kspace.shape
        scale = normalisation_scale(coil_combine(kspace, maps))
        arrays = {"kspace": (kspace * scale).astype(np.complex64), "maps": maps.astype(np.complex64)}
        if mask is not None:
            arrays["mask"] = mask.astype(np.float32)
        name = f"slices/{len(self.slices):06d}.npz"
        np.savez(os.path.join(self.tmp, name), **arrays)
        self.slices.append({"file": name, "scale": scale, **(info or {})})

    def finish(self, meta: dict):
        """Write dataset.json (format, shape, coils, normalisation, sampling, maps, source, slices) and rename."""
        if not self.slices:
            raise UserError(f"No MRI slices to write to {self.dest}.")
        num_coils, height, width = self.shape
        record = {"kind": "mri", "format_version": FORMAT_VERSION, "num_slices": len(self.slices),
                  "num_coils": num_coils, "shape": [height, width], "normalisation": NORMALISATION, **meta,
                  "slices": self.slices}
        with open(os.path.join(self.tmp, "dataset.json"), "w") as f:
            json.dump(record, f, indent=2)
        os.replace(self.tmp, self.dest)

    def abort(self):
        shutil.rmtree(self.tmp, ignore_errors=True)



def _undersample(kspace: np.ndarray, mask_law: MaskLaw | None, mask_seed: int, index: int):
    """Retrospective undersampling of record `index` with the `fixed` protocol's per-example mask (None = keep)."""
    if mask_law is None:
        return kspace, None
    mask = mask_law.sample_for_examples([index], kspace.shape[-2:], mask_seed)[0].numpy()
    return (kspace * mask).astype(np.complex64), mask


def _sampling_meta(mask_law: MaskLaw | None, mask_seed: int) -> dict:
    if mask_law is None:
        return {"fully_sampled": True}
    return {"fully_sampled": False, "mask_law": mask_law.to_config(), "mask_seed": mask_seed}


def simulate_mri(source: str, dest: str, num_coils: int = 8, seed: int = 0, max_images: int | None = None,
                 mask_law: MaskLaw | None = None, mask_seed: int = 0, progress=None) -> int:
    """Simulated multi-coil data from an image dataset (ImageFolderDataset: grayscale, or RGB -> luminance).

    Per image i (all randomness from numpy SeedSequence([seed, i])): magnitude = image in [0, 1], a smooth random
    phase (`smooth_phase`), birdcage maps (`birdcage_maps`) with the coil ring rotated by a random angle, so
    sum_c |S_c|^2 = 1 at every pixel; k-space = fft2c(S x), fully sampled unless `mask_law` undersamples it.
    Returns the number of slices written."""
    from training.dataset import ImageFolderDataset

    if num_coils < 1:
        raise UserError(f"--coils must be >= 1, got {num_coils}.")
    images = ImageFolderDataset(source)
    count = len(images) if max_images is None else min(max_images, len(images))
    if mask_law is not None:
        mask_law.observed_fraction(tuple(images.image_shape[1:]))  # rejects a law that does not fit, before writing
    luminance = torch.tensor([0.299, 0.587, 0.114])
    with MRIDatasetWriter(dest) as writer:
        for i in range(count) if progress is None else progress(range(count)):
            image = (images[i]["image"] + 1) / 2
            magnitude = (image[0] if image.shape[0] == 1 else torch.einsum("chw,c->hw", image, luminance)).numpy()
            rng = np.random.default_rng(np.random.SeedSequence([seed, i]))
            height, width = magnitude.shape
            x = magnitude * np.exp(1j * smooth_phase(height, width, rng))
            maps = birdcage_maps(num_coils, height, width, rotation=rng.uniform(0, 2 * np.pi))
            kspace = fft2c(torch.from_numpy((maps * x).astype(np.complex64))).numpy()
            kspace, mask = _undersample(kspace, mask_law, mask_seed, i)
            writer.add(kspace, maps, mask, {"source_index": i})
        writer.finish({**_sampling_meta(mask_law, mask_seed),
                       "maps": {"kind": "birdcage", "ring_radius": 1.5, "rotation": "uniform per slice"},
                       "source": {"kind": "simulated", "images": source, "seed": seed, "phase": "quadratic"}})
    return count


# ----------------------------------------------------------------------------
# fastMRI conversion.


def _fastmri_files(source: str) -> list[str]:
    if os.path.isdir(source):
        files = sorted(os.path.join(source, f) for f in os.listdir(source) if f.endswith((".h5", ".hdf5")))
        if not files:
            raise UserError(f"--source {source} contains no .h5 files.")
        return files
    if not os.path.isfile(source):
        raise UserError(f"--source {source} does not exist (expected a fastMRI .h5 file or a folder of them).")
    return [source]


def _check_fastmri_file(path: str, resolution: int) -> int:
    """Validates one file's layout before anything is written; returns its number of slices."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            if "kspace" not in f:
                raise UserError(f"{path} has no 'kspace' dataset; expected a fastMRI multi-coil HDF5 file.")
            kspace = f["kspace"]
            if kspace.ndim == 3:
                raise UserError(f"{path} holds single-coil k-space {kspace.shape}; expected multi-coil "
                                "(slices, coils, H, W).")
            if kspace.ndim != 4 or not np.issubdtype(kspace.dtype, np.complexfloating):
                raise UserError(f"{path}: 'kspace' is {kspace.dtype} {kspace.shape}; expected complex "
                                "(slices, coils, H, W).")
            if "mask" in f:
                raise UserError(f"{path} is undersampled (it has a 'mask' dataset); convert fully sampled files and "
                                "undersample them with --mask-kind.")
            if min(kspace.shape[-2:]) < resolution:
                raise UserError(f"{path}: k-space {kspace.shape[-2:]} is smaller than --resolution {resolution}.")
            return kspace.shape[0]
    except OSError as e:
        raise UserError(f"{path} is not a readable HDF5 file ({e}).") from e


def convert_fastmri(source: str, dest: str, resolution: int = 256, calib_width: int = 24, kernel_width: int = 6,
                    thresh: float = 0.02, crop: float = 0.95, skip_edge_slices: int = 0,
                    max_slices: int | None = None, mask_law: MaskLaw | None = None, mask_seed: int = 0,
                    progress=None) -> int:
    """fastMRI multi-coil HDF5 (`kspace` complex (slices, coils, H, W)) -> MRI records.

    Per kept slice: crop to resolution^2 in image space (`center_crop_kspace`), undersample with `mask_law` if given
    (per-record seed, k-space zeroed off the mask), ESPIRiT maps from the centre calib_width^2 of the k-space as
    stored (so with undersampling, calib_width must not exceed the ACS width), normalise (module docstring).
    The first and last `skip_edge_slices` slices of every volume are skipped (mostly noise). Returns slices written.
    """
    import h5py

    if resolution < 4 or calib_width < 1 or kernel_width < 1 or skip_edge_slices < 0:
        raise UserError("fastmri: --resolution must be >= 4, --calib-width and --kernel-width >= 1, "
                        "--skip-edge-slices >= 0.")
    if mask_law is not None and calib_width > getattr(mask_law, "acs", calib_width):
        raise UserError(f"--calib-width {calib_width} exceeds the {mask_law.acs} ACS lines of the mask: ESPIRiT "
                        "would calibrate on unmeasured k-space.")
    if mask_law is not None:
        mask_law.observed_fraction((resolution, resolution))  # rejects a law that does not fit, before writing
    files = _fastmri_files(source)
    plan = []  # (file, slice index) of every slice to convert, decided before writing anything
    for path in files:
        num_slices = _check_fastmri_file(path, resolution)
        plan += [(path, s) for s in range(skip_edge_slices, num_slices - skip_edge_slices)]
    plan = plan[:max_slices] if max_slices is not None else plan
    if not plan:
        raise UserError(f"--source {source}: no slices left after --skip-edge-slices {skip_edge_slices}.")

    espirit = {"kind": "espirit", "library": "sigpy.mri.app.EspiritCalib", "calib_width": calib_width,
               "kernel_width": kernel_width, "thresh": thresh, "crop": crop, "max_iter": 100}
    with MRIDatasetWriter(dest) as writer:
        for index, (path, s) in enumerate(plan if progress is None else progress(plan)):
            with h5py.File(path, "r") as f:
                kspace = np.asarray(f["kspace"][s]).astype(np.complex64)
            kspace, mask = _undersample(center_crop_kspace(kspace, resolution), mask_law, mask_seed, index)
            maps = espirit_maps(kspace, calib_width, kernel_width, thresh, crop, where=f" on {path} slice {s}")
            writer.add(kspace, maps, mask, {"source": os.path.basename(path), "slice": s})
        writer.finish({**_sampling_meta(mask_law, mask_seed), "maps": espirit,
                       "source": {"kind": "fastmri", "path": source, "resolution": resolution,
                                  "crop": "image space, centre", "skip_edge_slices": skip_edge_slices}})
    return len(plan)


# ----------------------------------------------------------------------------
# Reading records.


class MRIDataset(torch.utils.data.Dataset):
    """Multi-coil MRI records (module docstring). Items (default-collate friendly):
        'kspace' complex64 (C, H, W), 'maps' complex64 (C, H, W), 'index' int, 'label' float32 (0,),
        'mask'  float32 (1, 1, W) or (1, H, W)      only for undersampled records (`fully_sampled` False),
        'image' float32 (2, H, W) = T^H k as (re, im) only for fully sampled records (oracle training, references).
    """

    def __init__(self, path: str, max_size: int | None = None, random_seed: int = 0):
        meta_path = os.path.join(path, "dataset.json")
        if not os.path.isfile(meta_path):
            raise UserError(f"MRI dataset {path} has no dataset.json (build it with dataset_tool.py fastmri or "
                            "simulate-mri).")
        try:
            with open(meta_path) as f:
                meta = json.load(f)
        except json.JSONDecodeError as e:
            raise UserError(f"MRI dataset {path}: dataset.json is not valid JSON ({e}).") from e
        if not isinstance(meta, dict) or meta.get("kind") != "mri" or meta.get("format_version") != FORMAT_VERSION:
            raise UserError(f"MRI dataset {path}: dataset.json is not an MRI record index of format {FORMAT_VERSION}.")
        self.path, self.meta = path, meta
        self.fully_sampled = bool(meta["fully_sampled"])
        self.num_coils = int(meta["num_coils"])
        self.shape = tuple(meta["shape"])
        self.resolution = self.shape[0]
        raw_idx = np.arange(len(meta["slices"]), dtype=np.int64)
        if max_size is not None and len(raw_idx) > max_size:
            raw_idx = np.sort(np.random.RandomState(random_seed % (1 << 31)).choice(raw_idx, max_size, replace=False))
        self._raw_idx = raw_idx

    def __len__(self) -> int:
        return len(self._raw_idx)

    def __getitem__(self, idx: int) -> dict:
        raw = int(self._raw_idx[idx])
        name = os.path.join(self.path, self.meta["slices"][raw]["file"])
        with np.load(name, allow_pickle=False) as record:
            arrays = {key: record[key] for key in record.files}
        kspace, maps = arrays.get("kspace"), arrays.get("maps")
        expected = (self.num_coils, *self.shape)
        if kspace is None or maps is None or kspace.shape != expected or maps.shape != expected:
            raise UserError(f"MRI record {name}: maps {getattr(maps, 'shape', None)} and k-space "
                            f"{getattr(kspace, 'shape', None)} must both have shape {expected}.")
        if ("mask" in arrays) == self.fully_sampled:
            raise UserError(f"MRI record {name}: a mask must be stored exactly when the data is undersampled.")
        item = {"kspace": torch.from_numpy(kspace.astype(np.complex64)),
                "maps": torch.from_numpy(maps.astype(np.complex64)),
                "label": torch.zeros(0), "index": raw}
        if self.fully_sampled:
            item["image"] = MultiCoilMRI(item["maps"][None]).AH(item["kspace"][None])[0]
        else:
            item["mask"] = torch.from_numpy(arrays["mask"].astype(np.float32))
        return item

    def describe(self) -> dict:
        """JSON-able facts recorded in training_options.json and snapshot configs."""
        return {"kind": "mri", "path": self.path, "num_slices": len(self.meta["slices"]),
                "num_coils": self.num_coils, "shape": list(self.shape), "image_channels": 2,
                "fully_sampled": self.fully_sampled, "normalisation": self.meta["normalisation"],
                "maps": self.meta["maps"], **({"mask_law": self.meta["mask_law"]} if not self.fully_sampled else {})}

