"""Multi-coil MRI records: the reader (`MRIDataset`) and generate.py's source of coil maps. The writers (coil
simulation, fastMRI conversion, ESPIRiT maps, the normalisation) are in training/data_tools.py.

Record layout (a directory, written atomically as `<dest>.tmp-<pid>` then renamed, data_tools.MRIDatasetWriter):
    dest/dataset.json        facts about the data (see `MRIDatasetWriter.finish`), including one entry per slice
    dest/slices/000000.npz   arrays of one slice (np.savez, uncompressed, read with allow_pickle=False):
                               kspace  complex64 (C, H, W)  centred k-space (`operators.fft2c` convention)
                               maps    complex64 (C, H, W)  coil maps S_c
                               mask    float32 (1, 1, W) or (1, H, W), only for undersampled records; the stored
                                       k-space is then exactly zero where the mask is zero
The coil-combined image of a record is x = T^H k = sum_c conj(S_c) ifft2c(k_c) (`MultiCoilMRI.AH`). Each slice's
k-space is normalised so that its low-resolution ACS image has 99th percentile 1 (data_tools.normalisation_scale).
"""

import json
import os
import zipfile

import numpy as np
import torch

from dnnlib import UserError
from training.operators import MultiCoilMRI

FORMAT_VERSION = 1

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
