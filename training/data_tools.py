"""Writers and converters: everything that writes a dataset. The readers are training/dataset.py (images) and
training/mri.py (MRI records); dataset_tool.py is the command line over this module.

- Image datasets in EDM's zip layout (`ZipDatasetWriter`): from image folders or zips (`convert_images`) and
  random-ellipse phantoms (`write_phantoms`, training/phantoms.py).
- Multi-coil MRI records (layout: training/mri.py) written atomically by `MRIDatasetWriter`: simulated from an image
  dataset (`simulate_mri`: birdcage coils, smooth random phase) or converted from fastMRI multi-coil HDF5
  (`convert_fastmri`: ESPIRiT maps, crops, noise estimate), optionally undersampled with a mask law
  (`mri_mask_law`).

Normalisation of MRI records (`normalisation_scale`; the rule and every slice's scale are recorded in dataset.json):
each slice's k-space is multiplied by one scalar so that the 99th percentile of the magnitude of its low-resolution
ACS image (the coil-combined image of the `acs` centre phase-encode lines alone) is 1. Every mask law of the project
keeps those lines, so the scale is a function of measured data only, and the same slice gets the same scale whether
it is stored fully sampled or undersampled, simulated or converted from fastMRI.

sigpy (ESPIRiT) and h5py are imported lazily: they are needed only by the fastMRI converter.
"""

import io
import json
import os
import zipfile

import numpy as np
import PIL.Image
import torch

from dnnlib import UserError
from dnnlib.util import AtomicWriter, atomic_folder, atomic_write, check_outdir
from training.dataset import IMAGE_ERRORS, IMAGE_EXTENSIONS, ImageFolderDataset, _FileSource, _load_image, _reason
from training.masks import AcquiredMaskLaw, MaskLaw, acs_columns, default_acs, mask_config, mask_law_from_config
from training.mri import FORMAT_VERSION
from training.operators import MultiCoilMRI, channels_to_complex, fft2c, ifft2c
from training.phantoms import random_ellipse_phantoms

PERCENTILE = 99.0

# ----------------------------------------------------------------------------
# Image datasets (EDM's zip layout).


class ZipDatasetWriter(AtomicWriter):
    """Writes an EDM-layout zip atomically (dnnlib.util.atomic_write): `{i // 1000:05d}/img{i:08d}.png` files plus
    `dataset.json`."""

    def __init__(self, dest: str):
        if not dest.endswith(".zip"):
            raise UserError(f"--dest {dest} must end in .zip.")
        if os.path.exists(dest):
            raise UserError(f"--dest {dest} already exists; remove it or choose another name.")
        check_outdir(os.path.dirname(os.path.abspath(dest)), "--dest folder")
        os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
        super().__init__()
        # Staged after the file, so it is closed first: its central directory lands in the file before the rename.
        self.zip = self.stage(zipfile.ZipFile(self.stage(atomic_write(dest)), "w", compression=zipfile.ZIP_STORED))
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
        self.commit()



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


def convert_images(source: str, dest: str, resolution: int | None = None, max_images: int | None = None,
                   channels: int | None = None) -> tuple[int, bool]:
    """An image folder or zip -> EDM's zip layout with dataset.json; every image is read and checked before anything
    is written. Class folders named by integers (MGDM's layout, `<source>/<k>/.../image.png`) become labels k.
    `channels` 1 or 3 forces grayscale or RGB (None keeps the source's, RGB if mixed). -> (images written,
    whether labelled)."""
    src = _FileSource(source)
    names = [n for n in src.names if n.lower().endswith(IMAGE_EXTENSIONS)]
    if not names:
        raise UserError(f"--source {source} contains no PNG/JPEG images.")
    names = names[:max_images] if max_images else names
    tops = [n.split("/")[0] if "/" in n else None for n in names]
    use_labels = all(t is not None and t.isdigit() for t in tops)

    arrays = []
    for name in names:
        try:
            arr = _load_image(src.read(name))
        except IMAGE_ERRORS as e:  # nothing is written before every image is read
            raise UserError(f"--source {source}: {name} is not a readable image ({_reason(e)}).") from e
        arrays.append(center_crop_resize(arr, resolution))
    want = channels or (1 if all(a.shape[2] == 1 for a in arrays) else 3)
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
    return writer.count, use_labels


def write_phantoms(dest: str, num: int, resolution: int, seed: int):
    """`num` random-ellipse grayscale phantoms (training/phantoms.py), deterministic by `seed`, as an image zip."""
    imgs = random_ellipse_phantoms(num, resolution, seed)
    with ZipDatasetWriter(dest) as writer:
        for img in imgs:
            writer.add_image(np.rint(img * 255).astype(np.uint8)[:, :, None])
        writer.finish({"source": {"kind": "phantoms", "num": num, "resolution": resolution, "seed": seed}})


# ----------------------------------------------------------------------------
# Multi-coil MRI records.
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


def center_crop_kspace(kspace: np.ndarray, resolution: int, phase_crop: str = "image") -> np.ndarray:
    """Centre-crop a centred k-space (C, H, W) to resolution^2. The readout rows (fastMRI oversamples them 2x) are
    cropped in IMAGE space (ifft2c, the central rows, fft2c). The phase-encode columns too with phase_crop 'image';
    with 'kspace' they are cut in k-space to the centred window of `resolution` lines (`phase_encode_window`), which
    keeps an undersampled acquisition's lines as they were measured (the column transform cancels: it is applied
    and undone on every column)."""
    height, width = kspace.shape[-2:]
    top = (height - resolution) // 2
    columns = slice((width - resolution) // 2, (width - resolution) // 2 + resolution) if phase_crop == "image" \
        else slice(None)
    images = ifft2c(torch.from_numpy(kspace))[..., top : top + resolution, columns]
    cropped = fft2c(images.contiguous()).numpy().astype(np.complex64)
    return cropped if phase_crop == "image" else cropped[..., phase_encode_window(width, resolution)].copy()


# ----------------------------------------------------------------------------
# Writing records.


class MRIDatasetWriter(AtomicWriter):
    """Writes a record directory atomically (dnnlib.util.atomic_folder): everything goes to `<dest>.tmp-<pid>/`,
    renamed on `finish`, deleted on error (use as a context manager). `acs`: the centre lines every mask keeps, which
    the normalisation reads."""

    def __init__(self, dest: str, acs: int):
        if os.path.exists(dest):
            raise UserError(f"--dest {dest} already exists; remove it or choose another name.")
        check_outdir(os.path.dirname(os.path.abspath(dest)), "--dest folder")
        super().__init__()
        self.dest, self.acs = dest, acs
        self.tmp = self.stage(atomic_folder(dest))
        os.makedirs(os.path.join(self.tmp, "slices"))
        self.slices = []
        self.shape = None

    def add(self, kspace: np.ndarray, maps: np.ndarray, mask: np.ndarray | None = None, info: dict | None = None,
            noise_std: float | None = None):
        """One slice; k-space is multiplied by its normalisation scale here (recorded in dataset.json), and so is
        the slice's noise std estimate `noise_std` (raw units), recorded when given."""
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
        noise = {} if noise_std is None else {"noise_std": noise_std * scale}
        self.slices.append({"file": name, "scale": scale, **(info or {}), **noise})

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
        self.commit()



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
        acs = default_acs(width) if mask_law is None else mask_law.centre_lines(width)
    _check_acs(acs, width)
    if mask_law is not None and mask_law.centre_lines(width) < acs:
        raise UserError(f"The mask keeps {mask_law.centre_lines(width)} centre lines, fewer than the {acs} (--acs) "
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


def mri_mask_law(mask_kind: str, accel: float, acs: int | None, center_fraction: float | None, width: int):
    """dataset_tool's undersampling options -> (the mask law (None = fully sampled), the ACS lines the normalisation
    reads: its centre lines)."""
    if (center_fraction is not None) != mask_kind.startswith("fastmri"):
        raise UserError("--center-fraction is needed by, and only applies to, --mask-kind fastmri-random and "
                        "fastmri-equispaced.")
    if mask_kind == "none":
        return None, default_acs(width) if acs is None else acs
    law = mask_law_from_config(mask_config(mask_kind, width, {"R": accel, "acs": acs,
                                                              "center_fraction": center_fraction}))
    return law, law.centre_lines(width) if acs is None else acs



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


def _fastmri_header(f, path: str) -> dict:
    """The facts of a file's `ismrmrd_header` XML (ISMRMRD schema, as fastMRI stores it) that the converter uses:
    encoded and reconstructed matrix sizes and the phase-encode encoding limits. Refused in one sentence when the
    header is missing or lacks them; fully sampled files do not need it."""
    import xml.etree.ElementTree as ElementTree

    if "ismrmrd_header" not in f:
        raise UserError(f"{path} has no 'ismrmrd_header'; an undersampled fastMRI file needs it (matrix sizes and "
                        "encoding limits).")
    try:
        encoding = ElementTree.fromstring(bytes(np.asarray(f["ismrmrd_header"][()]).item())).find("{*}encoding")

        def integer(path: str) -> int:  # the ISMRMRD namespace, whatever its prefix
            return int(encoding.find("/".join(f"{{*}}{tag}" for tag in path.split("/"))).text)

        return {"encoded_matrix": [integer(f"encodedSpace/matrixSize/{axis}") for axis in "xyz"],
                "recon_matrix": [integer(f"reconSpace/matrixSize/{axis}") for axis in "xyz"],
                "phase_encode_center": integer("encodingLimits/kspace_encoding_step_1/center"),
                "phase_encode_maximum": integer("encodingLimits/kspace_encoding_step_1/maximum")}
    except (ElementTree.ParseError, AttributeError, TypeError, ValueError) as e:
        raise UserError(f"{path}: 'ismrmrd_header' is not ISMRMRD XML with encodedSpace, reconSpace and "
                        f"encodingLimits/kspace_encoding_step_1 ({type(e).__name__}).") from e


def _attribute(f, name: str):
    """A file attribute as a JSON-able value (None when absent): fastMRI stores numbers and byte or str strings."""
    value = f.attrs.get(name)
    if value is None:
        return None
    value = np.asarray(value).item() if np.ndim(value) == 0 else value
    return value.decode(errors="replace") if isinstance(value, bytes) else \
        value if isinstance(value, (int, float, str)) else float(value) if np.isscalar(value) else str(value)


def _check_fastmri_file(path: str, resolution: int) -> dict:
    """Validates one file's layout before anything is written: {'num_slices', 'mask' (bool (W,), or None when fully
    sampled), 'info' (what dataset.json records about the file)}.

    An undersampled file (fastMRI's test / challenge layout) holds `mask` (W,) over the phase-encode columns, the
    attributes `acceleration` and `num_low_frequency` (its centre lines, fastMRI's block of n columns from
    (W - n + 1) // 2) and the ISMRMRD header; each is checked (length, {0, 1} values, the centre block acquired)."""
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
            if min(kspace.shape[-2:]) < resolution:
                raise UserError(f"{path}: k-space {kspace.shape[-2:]} is smaller than --resolution {resolution}.")
            info = {"file": os.path.basename(path), "kspace_shape": list(kspace.shape),
                    **{name: _attribute(f, name) for name in ("acquisition", "patient_id", "max", "norm")}}
            if "mask" not in f:
                return {"num_slices": kspace.shape[0], "mask": None, "info": info}
            width = kspace.shape[-1]
            if f["mask"].shape != (width,):
                raise UserError(f"{path}: 'mask' has shape {f['mask'].shape}, but the k-space has {width} phase-encode "
                                f"columns; expected a mask of shape ({width},).")
            mask = np.asarray(f["mask"][()])
            if not np.isin(mask, (0, 1)).all():
                raise UserError(f"{path}: 'mask' must hold only 0 and 1 (acquired phase-encode columns).")
            mask = mask.astype(bool)
            low = _attribute(f, "num_low_frequency")
            if not isinstance(low, int) or not 1 <= low <= width:
                raise UserError(f"{path} has no integer attribute 'num_low_frequency' in [1, {width}] (its acquired "
                                "centre lines), which an undersampled fastMRI file stores.")
            start = (width - low + 1) // 2
            if not mask[start : start + low].all():
                raise UserError(f"{path}: 'mask' does not contain the {low} centre lines (columns {start}..."
                                f"{start + low - 1}) that its attribute num_low_frequency says were acquired.")
            info.update({"acceleration": _attribute(f, "acceleration"), "num_low_frequency": low,
                         "acquired_lines": int(mask.sum()), **_fastmri_header(f, path)})
            return {"num_slices": kspace.shape[0], "mask": mask, "info": info}
    except OSError as e:
        raise UserError(f"{path} is not a readable HDF5 file ({e}).") from e


def phase_encode_window(width: int, resolution: int) -> slice:
    """The `resolution` centre phase-encode columns of a centred k-space of `width` columns, [W//2 - r//2, ...):
    column W // 2 (the zero frequency) becomes column r // 2, so `acs_columns` keep their place."""
    start = width // 2 - resolution // 2
    return slice(start, start + resolution)


def _readout_fraction(info: dict) -> float:
    """The reconstructed share of the readout rows: the header's recon / encoded readout size where it is read and
    sensible, else fastMRI's 2x oversampling (1 / 2)."""
    encoded, recon = info.get("encoded_matrix", [0])[0], info.get("recon_matrix", [0])[0]
    return recon / encoded if 0 < recon < encoded else 0.5


def noise_std_estimate(kspace: np.ndarray, mask: np.ndarray | None, recon_fraction: float = 0.5) -> float:
    """The measurement noise std of one raw slice (C, H, W) (fastMRI layout, readout H oversampled), per real
    component, which is the project's sigma_y convention (`operators.measurement_randn`).

    Where: the readout direction is oversampled (fastMRI: 2x, the reconstructed field of view is the central
    `recon_fraction` of the rows), so after an orthonormal inverse FFT along the readout only (hybrid space x-ky) the
    rows outside the reconstructed field of view hold (nearly) no object, only noise; the orthonormal transform
    keeps white noise white with the same std. Only acquired columns count (the others are zeros, not noise).
    How: the median absolute deviation of the real and imaginary parts, times 1.4826 (= 1 / Phi^-1(3/4)), which is
    the std for Gaussian noise and, unlike the sample std, is hardly moved by the few entries where the object or
    its aliasing reaches outside the field of view (it tolerates up to half of the entries being contaminated)."""
    height = kspace.shape[-2]
    hybrid = torch.fft.fftshift(torch.fft.ifft(torch.fft.ifftshift(torch.from_numpy(kspace), dim=-2), dim=-2,
                                               norm="ortho"), dim=-2).numpy()
    margin = int(round(height * (1 - recon_fraction) / 2))
    outside = np.concatenate([hybrid[:, :margin], hybrid[:, height - margin :]], axis=1)
    if mask is not None:
        outside = outside[..., mask]
    values = np.concatenate([outside.real.ravel(), outside.imag.ravel()]).astype(np.float64)
    if values.size == 0:
        return 0.0
    return float(1.4826 * np.median(np.abs(values - np.median(values))))


def convert_fastmri(source: str, dest: str, resolution: int = 256, acs: int | None = None,
                    calib_width: int | None = None, kernel_width: int = 6, thresh: float = 0.02, crop: float = 0.95,
                    skip_edge_slices: int = 0, max_slices: int | None = None, mask_law: MaskLaw | None = None,
                    mask_seed: int = 0, phase_crop: str | None = None, progress=None) -> int:
    """fastMRI multi-coil HDF5 (`kspace` complex (slices, coils, H, W), fully sampled or undersampled with `mask`)
    -> MRI records.

    Per kept slice: crop the readout (rows, oversampled) to `resolution` in image space; crop the phase-encode
    columns to `resolution` either in image space too (`phase_crop` 'image', the default for fully sampled files) or
    in k-space, as the centred window of `resolution` lines with the mask cut with it ('kspace', the only choice for
    undersampled files: an image-space crop would mix acquired and missing lines). Undersample fully sampled data
    with `mask_law` if given (per-record seed, k-space zeroed off the mask); undersampled files keep their own masks
    (the stored record holds it, and dataset.json records the empirical law as mask law 'acquired'). ESPIRiT maps
    from the centre calib_width^2 of the k-space as stored, normalise on the `acs` centre lines (module docstring).
    `acs` (default `default_acs(resolution)`, or for undersampled files the fewest centre lines any file acquired)
    is the one width both depend on: calib_width defaults to it and may not exceed it, so the maps and the scale
    come from lines every mask keeps and are the same on every storage path. Each slice's noise std
    (`noise_std_estimate`, in stored units) is recorded. The first and last `skip_edge_slices` slices of every
    volume are skipped (mostly noise). Returns slices written.
    """
    import h5py

    if resolution < 4 or kernel_width < 1 or skip_edge_slices < 0:
        raise UserError("fastmri: --resolution must be >= 4, --kernel-width >= 1, --skip-edge-slices >= 0.")
    files = _fastmri_files(source)
    checked = {path: _check_fastmri_file(path, resolution) for path in files}
    acquired = {path for path, c in checked.items() if c["mask"] is not None}
    if acquired and len(acquired) < len(files):
        raise UserError(f"--source {source} mixes undersampled files ({os.path.basename(min(acquired))}) and fully "
                        f"sampled ones ({os.path.basename(min(set(files) - acquired))}); convert them separately.")
    if acquired and mask_law is not None:
        raise UserError(f"--source {source} is undersampled (its files hold a 'mask'); it keeps its acquired masks, so "
                        "--mask-kind must be none.")
    phase_crop = phase_crop or ("kspace" if acquired else "image")
    if phase_crop not in ("image", "kspace") or (acquired and phase_crop != "kspace"):
        raise UserError(f"--phase-crop must be image or kspace (kspace for undersampled files), got {phase_crop!r}.")
    if mask_law is not None:
        mask_law.observed_fraction((resolution, resolution))  # rejects a law that does not fit, before writing
    plan = []  # (file, slice index) of every slice to convert, decided before writing anything
    for path in files:
        plan += [(path, s) for s in range(skip_edge_slices, checked[path]["num_slices"] - skip_edge_slices)]
    plan = plan[:max_slices] if max_slices is not None else plan
    if not plan:
        raise UserError(f"--source {source}: no slices left after --skip-edge-slices {skip_edge_slices}.")
    if acquired:
        fewest = min((checked[path] for path, _ in plan), key=lambda c: c["info"]["num_low_frequency"])
        low = fewest["info"]["num_low_frequency"]
        acs = min(low, resolution) if acs is None else acs
        if acs > low:
            raise UserError(f"--acs {acs} exceeds the {low} centre lines that {fewest['info']['file']} acquired "
                            "(num_low_frequency); the normalisation and ESPIRiT may only read acquired lines.")
        if kernel_width > low:
            raise UserError(f"{fewest['info']['file']} acquired only {low} centre lines (num_low_frequency), too few "
                            f"for ESPIRiT's --kernel-width {kernel_width}; use a kernel width <= {low}.")
    acs = _normalisation_acs(acs, mask_law, resolution)
    calib_width = acs if calib_width is None else calib_width
    if not kernel_width <= calib_width <= acs:
        raise UserError(f"fastmri: need --kernel-width ({kernel_width}) <= --calib-width ({calib_width}) <= --acs "
                        f"({acs}): ESPIRiT must calibrate on centre lines that every training mask keeps.")

    espirit = {"kind": "espirit", "library": "sigpy.mri.app.EspiritCalib", "calib_width": calib_width,
               "kernel_width": kernel_width, "thresh": thresh, "crop": crop, "max_iter": 100}
    stored_masks = []
    with MRIDatasetWriter(dest, acs) as writer:
        for index, (path, s) in enumerate(plan if progress is None else progress(plan)):
            with h5py.File(path, "r") as f:
                raw = np.asarray(f["kspace"][s]).astype(np.complex64)
            file_mask, info = checked[path]["mask"], {"source": os.path.basename(path), "slice": s}
            noise = noise_std_estimate(raw, file_mask, _readout_fraction(checked[path]["info"]))
            kspace = center_crop_kspace(raw, resolution, phase_crop)
            if file_mask is None:
                kspace, mask = _undersample(kspace, mask_law, mask_seed, index)
            else:
                window = file_mask[phase_encode_window(raw.shape[-1], resolution)]
                mask = window.astype(np.float32).reshape(1, 1, resolution)
                kspace = (kspace * mask).astype(np.complex64)  # exactly zero off the acquired lines
                stored_masks.append(window)
                info.update({"acquired_lines": int(window.sum()),
                             "acquired_lines_outside_window": int(file_mask.sum() - window.sum())})
            maps = espirit_maps(kspace, calib_width, kernel_width, thresh, crop, where=f" on {path} slice {s}")
            writer.add(kspace, maps, mask, info, noise_std=noise)
        sampling = _sampling_meta(mask_law, mask_seed)
        if acquired:
            sampling = {"fully_sampled": False, "mask_law": AcquiredMaskLaw.from_masks(np.stack(stored_masks),
                                                                                       acs).to_config()}
        noise_stds = [entry["noise_std"] for entry in writer.slices]
        writer.finish({**sampling, "maps": espirit,
                       "noise": {"estimator": "noise_std_estimate: 1.4826 MAD of the real and imaginary parts of the "
                                              "hybrid-space rows outside the reconstructed field of view (readout "
                                              "oversampling), acquired columns only; per slice in stored units, the "
                                              "sigma_y convention (std per real component)",
                                 "median": float(np.median(noise_stds)), "min": float(np.min(noise_stds)),
                                 "max": float(np.max(noise_stds))},
                       "source": {"kind": "fastmri", "path": source, "resolution": resolution,
                                  "crop": {"readout": "image space, centre",
                                           "phase_encode": "image space, centre" if phase_crop == "image" else
                                           "k-space, the centred window of resolution lines (mask cut with it)"},
                                  "skip_edge_slices": skip_edge_slices, "acquired": bool(acquired),
                                  "files": [checked[path]["info"] for path in files]}})
    return len(plan)
