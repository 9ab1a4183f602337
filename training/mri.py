"""Multi-coil MRI data: coil simulation, ESPIRiT coil maps, fastMRI conversion, and the record dataset.

Record layout (a directory, written atomically as `<dest>.tmp-<pid>` then renamed):
    dest/dataset.json        facts about the data (see `MRIDatasetWriter.finish`), including one entry per slice
    dest/slices/000000.npz   arrays of one slice (np.savez, uncompressed, read with allow_pickle=False):
                               kspace  complex64 (C, H, W)  centred k-space (`operators.fft2c` convention)
                               maps    complex64 (C, H, W)  coil maps S_c
                               mask    float32 (1, 1, W) or (1, H, W), only for undersampled records; the stored
                                       k-space is then exactly zero where the mask is zero
The coil-combined image of a record is x = T^H k = sum_c conj(S_c) ifft2c(k_c) (`MultiCoilMRI.AH`).

Normalisation (`normalisation_scale`; the rule and every slice's scale are recorded in dataset.json): each slice's
k-space is multiplied by one scalar so that the 99th percentile of the magnitude of its low-resolution ACS image (the
coil-combined image of the `acs` centre phase-encode lines alone) is 1. Every mask law of the project keeps those
lines, so the scale is a function of measured data only, and the same slice gets the same scale whether it is
stored fully sampled or undersampled, simulated or converted from fastMRI.

sigpy (ESPIRiT) and h5py are imported lazily: they are needed only by the fastMRI converter.
"""

import json
import os
import shutil
import zipfile

import numpy as np
import torch

from dnnlib import UserError
from dnnlib.util import AtomicWriter, check_outdir
from training.masks import MaskLaw, acs_columns, default_acs
from training.operators import MultiCoilMRI, channels_to_complex, fft2c, ifft2c

FORMAT_VERSION = 1
PERCENTILE = 99.0

# ----------------------------------------------------------------------------
# Small numeric helpers (numpy in, numpy out; torch does the FFTs so the conventions are the operators').


def coil_combine(kspace: np.ndarray, maps: np.ndarray) -> np.ndarray:
    """T^H k: (C, H, W) k-space and maps -> complex (H, W) image."""
    operator = MultiCoilMRI(torch.from_numpy(maps)[None])
    return channels_to_complex(operator.AH(torch.from_numpy(kspace)[None]))[0].numpy()


def normalisation(acs: int) -> dict:
    """The normalisation rule as dataset.json records it (see `normalisation_scale`)."""
    return {"kind": "acs-percentile", "percentile": PERCENTILE, "value": 1.0, "acs": acs,
            "of": "magnitude of the coil-combined image sum_c conj(S_c) ifft2c(k_c) of the k-space restricted to the "
                  "acs centre phase-encode lines (columns)"}


def _check_acs(acs: int, width: int):
    if not 1 <= acs <= width:
        raise UserError(f"The intensity normalisation reads the --acs centre lines: need 1 <= acs <= {width}, got "
                        f"{acs}.")


def normalisation_scale(kspace: np.ndarray, maps: np.ndarray, acs: int) -> float:
    """The intensity scale of one slice: 1 / (99th percentile of |T^H (k restricted to the `acs` centre columns)|),
    falling back to the maximum, and to 1 for an all-zero image.

    Why the ACS image: the scale must be computable from what is measured, and be the same number for a slice
    whatever way it is stored, or a model trained on acquired (undersampled) data is evaluated at another intensity
    than it was trained at. Every line mask of the project keeps its `acs` centre lines in every draw (masks.py), so
    the ACS image exists on every storage path and does not depend on which other lines a mask drew; the zero-filled
    image of the stored k-space does (its intensity falls with R and varies from mask to mask), and the clean image
    is not measured at all. The centre of k-space holds most of the image energy, so the low-resolution image's 99th
    percentile is a stable intensity reference. With ESPIRiT maps calibrated inside the ACS region (the fastMRI
    converter's default), the scale reads nothing outside it.
    """
    width = kspace.shape[-1]
    _check_acs(acs, width)
    low_resolution = kspace * acs_columns(width, acs).numpy()
    magnitude = np.abs(coil_combine(low_resolution.astype(np.complex64), maps))
    reference = float(np.percentile(magnitude, PERCENTILE))
    reference = reference if reference > 0 else float(magnitude.max())
    return 1.0 / reference if reference > 0 else 1.0


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
    on error (use as a context manager). `acs`: the centre lines every mask keeps, which the normalisation reads."""

    def __init__(self, dest: str, acs: int):
        if os.path.exists(dest):
            raise UserError(f"--dest {dest} already exists; remove it or choose another name.")
        check_outdir(os.path.dirname(os.path.abspath(dest)), "--dest folder")
        self.dest, self.acs = dest, acs
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
        scale = normalisation_scale(kspace, maps, self.acs)
        if mask is not None and not mask[..., acs_columns(kspace.shape[-1], self.acs).numpy()].all():
            raise UserError(f"MRI record {len(self.slices)}: its mask does not keep the {self.acs} centre lines "
                            "(--acs) that the intensity normalisation reads.")
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
                  "num_coils": num_coils, "shape": [height, width], "normalisation": normalisation(self.acs), **meta,
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


def _normalisation_acs(acs: int | None, mask_law: MaskLaw | None, width: int) -> int:
    """The centre lines the normalisation reads: `acs`; by default the mask law's ACS lines when undersampling, else
    `default_acs(width)` (train.py's default too). A mask law must keep them all. dataset_tool.py passes its --acs
    to both the law and here, so the same slice gets the same scale on either storage path."""
    if acs is None:
        acs = default_acs(width) if mask_law is None else getattr(mask_law, "acs", 0)
    _check_acs(acs, width)
    if mask_law is not None and getattr(mask_law, "acs", 0) < acs:
        raise UserError(f"The mask keeps {getattr(mask_law, 'acs', 0)} centre lines, fewer than the {acs} (--acs) "
                        "that the intensity normalisation reads; give the mask law the same --acs.")
    return acs


def _sampling_meta(mask_law: MaskLaw | None, mask_seed: int) -> dict:
    if mask_law is None:
        return {"fully_sampled": True}
    return {"fully_sampled": False, "mask_law": mask_law.to_config(), "mask_seed": mask_seed}


def simulate_mri(source: str, dest: str, num_coils: int = 8, seed: int = 0, max_images: int | None = None,
                 mask_law: MaskLaw | None = None, mask_seed: int = 0, acs: int | None = None, progress=None) -> int:
    """Simulated multi-coil data from an image dataset (ImageFolderDataset: grayscale, or RGB -> luminance).

    Per image i (all randomness from numpy SeedSequence([seed, i])): magnitude = image in [0, 1], a smooth random
    phase (`smooth_phase`), birdcage maps (`birdcage_maps`) with the coil ring rotated by a random angle, so
    sum_c |S_c|^2 = 1 at every pixel; k-space = fft2c(S x), fully sampled unless `mask_law` undersamples it;
    normalised on the `acs` centre lines (`_normalisation_acs`). Returns the number of slices written."""
    from training.dataset import ImageFolderDataset

    if num_coils < 1:
        raise UserError(f"--coils must be >= 1, got {num_coils}.")
    images = ImageFolderDataset(source)
    count = len(images) if max_images is None else min(max_images, len(images))
    if mask_law is not None:
        mask_law.observed_fraction(tuple(images.image_shape[1:]))  # rejects a law that does not fit, before writing
    acs = _normalisation_acs(acs, mask_law, images.image_shape[-1])
    luminance = torch.tensor([0.299, 0.587, 0.114])
    with MRIDatasetWriter(dest, acs) as writer:
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


def convert_fastmri(source: str, dest: str, resolution: int = 256, acs: int | None = None,
                    calib_width: int | None = None, kernel_width: int = 6, thresh: float = 0.02, crop: float = 0.95,
                    skip_edge_slices: int = 0, max_slices: int | None = None, mask_law: MaskLaw | None = None,
                    mask_seed: int = 0, progress=None) -> int:
    """fastMRI multi-coil HDF5 (`kspace` complex (slices, coils, H, W)) -> MRI records.

    Per kept slice: crop to resolution^2 in image space (`center_crop_kspace`), undersample with `mask_law` if given
    (per-record seed, k-space zeroed off the mask), ESPIRiT maps from the centre calib_width^2 of the k-space as
    stored, normalise on the `acs` centre lines (module docstring). `acs` (default `default_acs(resolution)`) is the
    one width both depend on: calib_width defaults to it and may not exceed it, fully sampled or not, so the maps and
    the scale come from lines every training mask keeps and are the same on both storage paths.
    The first and last `skip_edge_slices` slices of every volume are skipped (mostly noise). Returns slices written.
    """
    import h5py

    if resolution < 4 or kernel_width < 1 or skip_edge_slices < 0:
        raise UserError("fastmri: --resolution must be >= 4, --kernel-width >= 1, --skip-edge-slices >= 0.")
    if mask_law is not None:
        mask_law.observed_fraction((resolution, resolution))  # rejects a law that does not fit, before writing
    acs = _normalisation_acs(acs, mask_law, resolution)
    calib_width = acs if calib_width is None else calib_width
    if not kernel_width <= calib_width <= acs:
        raise UserError(f"fastmri: need --kernel-width ({kernel_width}) <= --calib-width ({calib_width}) <= --acs "
                        f"({acs}): ESPIRiT must calibrate on centre lines that every training mask keeps.")
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
    with MRIDatasetWriter(dest, acs) as writer:
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


def _npy_header(archive: zipfile.ZipFile, member: str) -> tuple[tuple, np.dtype]:
    """(shape, dtype) of one .npy member of an .npz archive, from its header alone (a few hundred bytes)."""
    with archive.open(member) as f:
        version = np.lib.format.read_magic(f)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        if version not in read_header:
            raise ValueError(f".npy format version {version} is not supported")
        shape, _fortran_order, dtype = read_header[version](f)
    return tuple(shape), dtype


class MRIDataset(torch.utils.data.Dataset):
    """Multi-coil MRI records (module docstring). Items (default-collate friendly):
        'kspace' complex64 (C, H, W), 'maps' complex64 (C, H, W), 'index' int, 'label' float32 (0,),
        'mask'  float32 (1, 1, W) or (1, H, W)      only for undersampled records (`fully_sampled` False),
        'image' float32 (2, H, W) = T^H k as (re, im) only for fully sampled records (oracle training, references).

    Validation, and what it costs: opening the dataset checks dataset.json and, for every record in use, that its
    file lies inside the dataset folder and exists, and that its array headers (a few hundred bytes per record, read
    from the .npz members without reading the data) hold exactly the expected arrays, shapes and numeric dtypes (no
    object arrays). So wrong shapes, missing files and foreign arrays are refused, naming the record, before a run
    directory or any output exists, at the cost of opening each record file once (seconds for 10^4 records, not a
    read of the data). Finiteness needs the values: when the records in use total at most FULL_CHECK_BYTES they are
    all read and checked on opening too (about a second); larger datasets are not read in full at every start, and
    every record is checked where it is read instead. Either way a record with NaN or Inf is refused with a
    UserError naming its file and is never used (reconstruct.py reads its examples before writing anything).
    """

    FULL_CHECK_BYTES = 512 * 2**20
    # One slice of the largest scans (fastMRI brain: 20 coils x 640 x 320, complex64) holds 66 MB: 4 GiB is far above.
    MAX_RECORD_BYTES = 4 * 2**30

    def __init__(self, path: str, max_size: int | None = None, random_seed: int = 0):
        meta_path = os.path.join(path, "dataset.json")
        if not os.path.isfile(meta_path):
            raise UserError(f"MRI dataset {path} has no dataset.json (build it with dataset_tool.py fastmri or "
                            "simulate-mri).")
        try:
            with open(meta_path) as f:
                meta = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"MRI dataset {path}: dataset.json is not valid JSON ({e}).") from e
        if not isinstance(meta, dict) or meta.get("kind") != "mri" or meta.get("format_version") != FORMAT_VERSION:
            raise UserError(f"MRI dataset {path}: dataset.json is not an MRI record index of format {FORMAT_VERSION}.")
        self.path, self.meta = path, meta
        self._check_index()
        self.fully_sampled = meta["fully_sampled"]
        self.num_coils = meta["num_coils"]
        self.shape = tuple(meta["shape"])
        self.resolution = self.shape[0]
        raw_idx = np.arange(len(meta["slices"]), dtype=np.int64)
        if max_size is not None and len(raw_idx) > max_size:
            raw_idx = np.sort(np.random.RandomState(random_seed % (1 << 31)).choice(raw_idx, max_size, replace=False))
        self._raw_idx = raw_idx
        for raw in raw_idx:
            self._check_record_headers(int(raw))
        if sum(os.path.getsize(self.record_file(int(raw))) for raw in raw_idx) <= self.FULL_CHECK_BYTES:
            for raw in raw_idx:
                self._read_arrays(int(raw))

    def _check_index(self):
        """dataset.json's fields that reading relies on: types, and record files that stay inside the folder."""
        meta, where = self.meta, f"MRI dataset {self.path}: dataset.json"
        shape = meta.get("shape")
        if not (isinstance(meta.get("num_coils"), int) and meta["num_coils"] >= 1 and isinstance(shape, list)
                and len(shape) == 2 and all(isinstance(n, int) and n >= 1 for n in shape)
                and isinstance(meta.get("fully_sampled"), bool) and isinstance(meta.get("slices"), list)
                and isinstance(meta.get("normalisation"), dict) and isinstance(meta.get("maps"), dict)):
            raise UserError(f"{where} needs num_coils >= 1, shape [H, W], fully_sampled true/false, a list of slices, "
                            "normalisation and maps.")
        # Record files must lie inside the dataset folder after symlinks are resolved (docs/security.md): a symlink
        # inside the folder may point within it, or the whole folder may be a symlink, but no entry reads elsewhere.
        root = os.path.realpath(self.path)
        for i, entry in enumerate(meta["slices"]):
            name = entry.get("file") if isinstance(entry, dict) else None
            if (not isinstance(name, str) or os.path.isabs(name) or not name.endswith(".npz")
                    or os.path.normpath(name).split(os.sep)[0] == ".." or "\\" in name
                    or os.path.commonpath([root, os.path.realpath(os.path.join(root, name))]) != root):
                raise UserError(f"{where}: slice {i} must name an .npz file inside the dataset folder, got "
                                f"{name!r:.80}.")

    def record_file(self, raw: int) -> str:
        return os.path.join(self.path, self.meta["slices"][raw]["file"])

    def _check_record_headers(self, raw: int):
        name = self.record_file(raw)
        try:
            with zipfile.ZipFile(name) as archive:
                headers = {member[: -len(".npy")]: _npy_header(archive, member) for member in archive.namelist()}
                sizes = {member[: -len(".npy")]: archive.getinfo(member).file_size for member in archive.namelist()}
        except (OSError, zipfile.BadZipFile, ValueError, EOFError) as e:
            raise UserError(f"MRI record {name} is missing or not a readable .npz file ({e}).") from e
        self._check_arrays(name, headers)
        # Sizes before anything is read: dataset.json and the headers agree on a shape, but an .npy member must also
        # hold the bytes its header declares (np.load allocates them first), and a record at most MAX_RECORD_BYTES.
        declared = {key: int(np.prod(shape, dtype=np.float64)) * dtype.itemsize for key, (shape, dtype) in
                    headers.items()}
        for key, nbytes in declared.items():
            if nbytes > sizes[key]:
                raise UserError(f"MRI record {name} declares {key} {headers[key][0]} ({nbytes} bytes), but its file "
                                f"holds only {sizes[key]} bytes.")
        if sum(declared.values()) > self.MAX_RECORD_BYTES:
            raise UserError(f"MRI record {name} holds {sum(declared.values())} bytes of arrays, more than the "
                            f"{self.MAX_RECORD_BYTES} a record may hold (MRIDataset.MAX_RECORD_BYTES).")

    def _check_arrays(self, name: str, arrays: dict):
        """arrays: {key: (shape, dtype)}: exactly complex kspace and maps (C, H, W), plus a float mask (1, 1, W) or
        (1, H, W) exactly when the data is undersampled."""
        expected = {"kspace": ((self.num_coils, *self.shape),), "maps": ((self.num_coils, *self.shape),)}
        if not self.fully_sampled:
            expected["mask"] = ((1, 1, self.shape[1]), (1, *self.shape))
        if ("mask" in arrays) == self.fully_sampled:
            raise UserError(f"MRI record {name}: a mask must be stored exactly when the data is undersampled "
                            f"(dataset.json says {'fully sampled' if self.fully_sampled else 'undersampled'}).")
        for key, (shape, dtype) in arrays.items():
            kind = "f" if key == "mask" else "c"
            if key not in expected or tuple(shape) not in expected[key] or dtype.kind != kind:
                raise UserError(f"MRI record {name} holds {key!r:.40} {dtype} {tuple(shape)}, but expected only "
                                f"complex kspace and maps of shape {expected['kspace'][0]}"
                                f"{'' if self.fully_sampled else ' and a float mask (1, 1, W) or (1, H, W)'}.")
        missing = sorted(set(expected) - set(arrays))
        if missing:
            raise UserError(f"MRI record {name} has no {missing[0]} array.")

    def __len__(self) -> int:
        return len(self._raw_idx)

    def _read_arrays(self, raw: int) -> dict:
        """The arrays of record `raw`, refused (UserError naming the file) unless well-formed and finite."""
        name = self.record_file(raw)
        try:
            with np.load(name, allow_pickle=False) as record:
                arrays = {key: record[key] for key in record.files}
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
            raise UserError(f"MRI record {name} is missing or not a readable .npz file ({e}).") from e
        self._check_arrays(name, {key: (array.shape, array.dtype) for key, array in arrays.items()})
        # Cast to the dtypes used before checking: complex128 values beyond float32's range become Inf in the cast.
        with np.errstate(over="ignore"):
            arrays = {key: array.astype(np.float32 if key == "mask" else np.complex64, copy=False)
                      for key, array in arrays.items()}
        for key, array in arrays.items():
            if not np.isfinite(array).all():
                raise UserError(f"MRI record {name} holds NaN or Inf values in {key} (as {array.dtype}); rebuild or "
                                "remove the record.")
        return arrays

    def __getitem__(self, idx: int) -> dict:
        raw = int(self._raw_idx[idx])
        arrays = self._read_arrays(raw)
        item = {"kspace": torch.from_numpy(arrays["kspace"]), "maps": torch.from_numpy(arrays["maps"]),
                "label": torch.zeros(0), "index": raw}
        if self.fully_sampled:
            item["image"] = MultiCoilMRI(item["maps"][None]).AH(item["kspace"][None])[0]
        else:
            item["mask"] = torch.from_numpy(arrays["mask"])
        return item

    def describe(self) -> dict:
        """JSON-able facts recorded in training_options.json and snapshot configs."""
        return {"kind": "mri", "path": os.path.abspath(self.path), "num_slices": len(self.meta["slices"]),
                "num_coils": self.num_coils, "shape": list(self.shape), "image_channels": 2,
                "fully_sampled": self.fully_sampled, "normalisation": self.meta["normalisation"],
                "maps": self.meta["maps"], **({"mask_law": self.meta["mask_law"]} if not self.fully_sampled else {})}



def coil_map_records(path: str | None, num_coils: int, shape: tuple) -> MRIDataset:
    """generate.py's default source of coil maps: a snapshot's training records at `path` (resolved by
    checkpoint.load_snapshot; None when the snapshot records none), refused with a message naming --maps when they
    are not there or do not fit. The records are only read."""
    if path is None:
        raise UserError("This MRI snapshot records no training data to take coil maps from; pass coil maps with "
                        "--maps FILE.npy (complex (C, H, W)).")
    if not os.path.isfile(os.path.join(path, "dataset.json")):
        raise UserError(f"The coil maps of this MRI snapshot come from its training records at {path}, which are not "
                        "there; pass coil maps with --maps FILE.npy (complex (C, H, W)).")
    records = MRIDataset(path)
    if records.num_coils != num_coils or tuple(records.shape) != tuple(shape):
        raise UserError(f"The training records at {path} hold {records.num_coils} coils of {records.shape}, but the "
                        f"snapshot needs {num_coils} of {tuple(shape)}; pass coil maps with --maps FILE.npy.")
    return records
