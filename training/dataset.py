"""Image datasets in EDM's layout: an uncompressed zip (or a folder) of PNG/JPEG files plus an optional
`dataset.json` with `{"labels": [[relative_path, class_index], ...]}`.

Items are dicts so image and measurement datasets share one collate path:
    {'image': float32 (C,H,W) in [-1,1], 'label': float32 one-hot (label_dim,) or (0,), 'index': raw example index}
`index` is the index into the underlying files (x-flipped copies keep the index of their source); the `fixed`
measurement protocol seeds each example's mask by it, so an example keeps its mask across epochs and ranks.
Nothing here touches global RNGs: the optional `max_size` subset is drawn from a local generator.
"""

import io
import json
import os
import zipfile

import numpy as np
import PIL.Image
import torch

from dnnlib import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
# What reading an image file raises when it is not an image, is truncated or corrupt (PIL raises SyntaxError for
# broken PNG chunks), or is a decompression bomb (PIL refuses images of more than 2 * PIL.Image.MAX_IMAGE_PIXELS
# pixels, 179 M by default, before decoding them).
IMAGE_ERRORS = (PIL.UnidentifiedImageError, PIL.Image.DecompressionBombError, OSError, ValueError, SyntaxError,
                zipfile.BadZipFile)
# dataset.json holds one label per image (EDM's layout: ["00000/img00000000.png", 3]); a bigger one is refused
# before it is read: LABELS_BASE_BYTES plus LABELS_BYTES_PER_IMAGE for each image.
LABELS_BASE_BYTES, LABELS_BYTES_PER_IMAGE = 2**20, 1024
MAX_CLASSES = 2**16  # the one-hot labels are (label_dim,) per example: a label of 10^9 would allocate gigabytes


class _FileSource:
    """Uniform read access to the files of a folder or a zip archive."""

    def __init__(self, path: str):
        self.path = path
        if os.path.isdir(path):
            self.kind = "dir"
            self.names = sorted(
                os.path.relpath(os.path.join(root, f), path).replace(os.sep, "/")
                for root, _dirs, files in os.walk(path)
                for f in files
            )
            # Files are read only inside the folder once symlinks are resolved (docs/security.md): a link to a file
            # elsewhere is refused; the folder itself may be a link.
            real = os.path.realpath(path)
            outside = next((n for n in self.names if os.path.commonpath(
                [real, os.path.realpath(os.path.join(real, n))]) != real), None)
            if outside is not None:
                raise UserError(f"Dataset {path}: {outside} links to a file outside the dataset folder; copy the file "
                                "in, or link the whole folder instead.")
        elif os.path.isfile(path):
            if not zipfile.is_zipfile(path):
                raise UserError(f"Dataset file {path} is not a valid zip archive (expected a zip or a folder).")
            self.kind = "zip"
            try:
                with zipfile.ZipFile(path) as zf:
                    self.names = sorted(zf.namelist())
            except (zipfile.BadZipFile, OSError) as e:
                raise UserError(f"Dataset file {path} is a corrupt zip archive ({e}).") from e
        else:
            raise UserError(f"Dataset path {path} does not exist (expected a zip file or a folder of images).")
        self._zip = None  # opened lazily per process (data-loader workers must not share a handle)

    def open(self, name: str):
        if self.kind == "dir":
            return open(os.path.join(self.path, name), "rb")
        if self._zip is None:
            self._zip = zipfile.ZipFile(self.path)
        return self._zip.open(name, "r")

    def total_size(self, names: list) -> int:
        """Bytes of the named files (uncompressed sizes in a zip), from the directory / zip index only."""
        if self.kind == "dir":
            return sum(os.path.getsize(os.path.join(self.path, n)) for n in names)
        with zipfile.ZipFile(self.path) as zf:
            return sum(zf.getinfo(n).file_size for n in names)

    def read(self, name: str) -> bytes:
        with self.open(name) as f:
            return f.read()

    def __getstate__(self):
        return {**self.__dict__, "_zip": None}


def _reason(error: Exception) -> str:
    """The first line of an image reading error, for one-sentence messages."""
    if isinstance(error, PIL.UnidentifiedImageError):  # its text names an in-memory buffer, not the file
        return "PIL recognises no image format in it"
    return (str(error).splitlines() or [type(error).__name__])[0].rstrip(".")


def _load_image(data: bytes) -> np.ndarray:
    """Bytes of an image file -> uint8 array (H, W, C) with C in {1, 3}."""
    img = PIL.Image.open(io.BytesIO(data))
    if img.mode in ("L", "I;16", "I", "F"):
        arr = np.asarray(img.convert("L"))[:, :, None]
    else:
        arr = np.asarray(img.convert("RGB"))
    return arr


class ImageFolderDataset(torch.utils.data.Dataset):
    """Images from a zip or folder in EDM's layout, with optional class labels and x-flip augmentation.

    Validation, and what it costs: opening the dataset reads every image's header (PIL reads a few hundred bytes,
    not the pixels), so unreadable files and mixed shapes are refused, naming the file, before anything is written.
    When the image files total at most FULL_CHECK_BYTES every image is decoded on opening too (a truncated or corrupt
    file is then refused before a run folder exists); larger datasets are not decoded in full at every start, and a
    file whose header is fine but whose pixel data is corrupt is refused where it is read, with a UserError naming
    it. 8-bit pixels are always finite, so there is no NaN / Inf check to make.
    """

    FULL_CHECK_BYTES = 64 * 2**20

    def __init__(
        self,
        path: str,
        resolution: int | None = None,  # expected resolution; None = whatever the data has
        use_labels: bool = False,
        xflip: bool = False,  # doubles the dataset with mirrored copies (EDM semantics)
        max_size: int | None = None,  # use a random subset of at most this many images
        random_seed: int = 0,  # seed of that subset (local RNG)
    ):
        self.path = path
        self._source = _FileSource(path)
        self.image_names = [n for n in self._source.names if n.lower().endswith(IMAGE_EXTENSIONS)]
        if not self.image_names:
            raise UserError(f"Dataset {path} contains no PNG/JPEG images.")

        # Shapes from the image headers (cheap: PIL reads only the header), so mixed sizes fail before training; the
        # pixels too when the files are small in total, so a truncated file fails before a run folder exists.
        decode = self._source.total_size(self.image_names) <= self.FULL_CHECK_BYTES
        shapes = {}
        for name in self.image_names:
            with self._source.open(name) as f:
                try:
                    img = PIL.Image.open(f)
                    channels = 1 if img.mode in ("L", "I;16", "I", "F") else 3
                    shapes.setdefault((channels, img.height, img.width), name)
                    if decode:
                        img.load()
                except IMAGE_ERRORS as e:
                    raise UserError(f"Dataset {path}: {name} is not a readable image ({_reason(e)}).") from e
        if len(shapes) > 1:
            (s0, n0), (s1, n1) = list(shapes.items())[:2]
            raise UserError(
                f"Dataset {path} mixes image shapes: {n0} is {s0} (C,H,W) but {n1} is {s1}; "
                "convert it with dataset_tool.py convert --resolution to make all images the same size."
            )
        self.image_shape = list(next(iter(shapes)))
        if self.image_shape[1] != self.image_shape[2]:
            raise UserError(f"Dataset {path} has non-square images {self.image_shape[1:]}; expected square images.")
        if resolution is not None and self.image_shape[1] != resolution:
            raise UserError(
                f"Dataset {path} has resolution {self.image_shape[1]}, but resolution {resolution} was expected."
            )

        self.labels = self._load_labels() if use_labels else None
        self.label_dim = int(self.labels.max()) + 1 if self.labels is not None else 0

        raw_idx = np.arange(len(self.image_names), dtype=np.int64)
        if max_size is not None and len(raw_idx) > max_size:
            rng = np.random.RandomState(random_seed % (1 << 31))
            raw_idx = np.sort(rng.choice(raw_idx, size=max_size, replace=False))
        self._raw_idx = np.tile(raw_idx, 2) if xflip else raw_idx
        self._xflip = np.zeros(len(self._raw_idx), dtype=bool)
        if xflip:
            self._xflip[len(raw_idx) :] = True

    def _load_labels(self) -> np.ndarray:
        if "dataset.json" not in self._source.names:
            raise UserError(f"Dataset {self.path} has no dataset.json, so it has no labels; drop --cond.")
        limit = LABELS_BASE_BYTES + LABELS_BYTES_PER_IMAGE * len(self.image_names)
        size = self._source.total_size(["dataset.json"])
        if size > limit:
            raise UserError(f"Dataset {self.path}: dataset.json holds {size} bytes, more than the {limit} that labels "
                            f"of {len(self.image_names)} images need.")
        try:
            meta = json.loads(self._source.read("dataset.json"))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise UserError(f"Dataset {self.path}: dataset.json is not valid JSON ({e}).") from e
        labels = meta.get("labels") if isinstance(meta, dict) else None
        if labels is None:
            raise UserError(f"Dataset {self.path}: dataset.json holds no labels; drop --cond or add labels.")
        if not isinstance(labels, list) or not all(isinstance(p, list) and len(p) == 2 and isinstance(p[0], str)
                                                   for p in labels):
            raise UserError(f"Dataset {self.path}: dataset.json's labels must be a list of [file name, class] pairs.")
        table = dict(labels)
        missing = [n for n in self.image_names if n not in table]
        if missing:
            raise UserError(f"Dataset {self.path}: dataset.json has no label for {missing[0]}.")
        # Classes are integers 0 .. MAX_CLASSES - 1 (JSON's 1.5, true or -1 would be truncated, or index from the end).
        bad = next((n for n in self.image_names if isinstance(table[n], bool) or not isinstance(table[n], int)
                    or not 0 <= table[n] < MAX_CLASSES), None)
        if bad is not None:
            raise UserError(f"Dataset {self.path}: dataset.json labels {bad} with {table[bad]!r:.40}; a class must be "
                            f"an integer in [0, {MAX_CLASSES}).")
        return np.array([table[n] for n in self.image_names], dtype=np.int64)

    @property
    def num_channels(self) -> int:
        return self.image_shape[0]

    @property
    def resolution(self) -> int:
        return self.image_shape[1]

    def __len__(self) -> int:
        return len(self._raw_idx)

    def get_label(self, idx: int) -> torch.Tensor:
        onehot = torch.zeros(self.label_dim, dtype=torch.float32)
        if self.labels is not None:
            onehot[self.labels[self._raw_idx[idx]]] = 1
        return onehot

    def __getitem__(self, idx: int) -> dict:
        raw = int(self._raw_idx[idx])
        try:
            arr = _load_image(self._source.read(self.image_names[raw]))
        except IMAGE_ERRORS as e:
            name = self.image_names[raw]
            raise UserError(f"Dataset {self.path}: {name} is not a readable image ({_reason(e)}).") from e
        if list(arr.shape) != [self.image_shape[1], self.image_shape[2], self.image_shape[0]]:
            raise UserError(f"Dataset {self.path}: {self.image_names[raw]} has shape {arr.shape}, expected HWC "
                            f"{self.image_shape[1:] + self.image_shape[:1]}.")
        image = torch.from_numpy(arr.copy()).permute(2, 0, 1).to(torch.float32) / 127.5 - 1
        if self._xflip[idx]:
            image = image.flip(-1)
        return {"image": image, "label": self.get_label(idx), "index": raw}

    def describe(self) -> dict:
        """JSON-able facts recorded in training_options.json and snapshot configs."""
        return {
            "kind": "image",
            "path": self.path,
            "num_images": len(self.image_names),
            "image_shape": self.image_shape,
            "label_dim": self.label_dim,
        }


def is_mri_dataset(path: str) -> bool:
    """True when `path` is a directory whose dataset.json declares an MRI record index (training/mri.py)."""
    meta_path = os.path.join(path, "dataset.json")
    if not os.path.isfile(meta_path):
        return False
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(meta, dict) and meta.get("kind") == "mri"


def open_dataset(path: str, use_labels: bool = False, xflip: bool = False, max_size: int | None = None,
                 measurement: dict | None = None) -> torch.utils.data.Dataset:
    """The training dataset at `path`, by what it holds: an MRI record directory -> MRIDataset, anything else ->
    ImageFolderDataset. With `measurement` (a MeasurementConfig.to_config() dict) it is wrapped in MeasuredDataset,
    which hands out measurements only and applies the x-flip itself (after measuring); train.py records these
    arguments in `dataset_kwargs` and the training loop calls this function with them."""
    from training.measurements import MeasuredDataset, MeasurementConfig
    from training.mri import MRIDataset

    if is_mri_dataset(path):
        if use_labels:
            raise UserError(f"--cond was given but the MRI dataset {path} has no labels.")
        if xflip:
            raise UserError("--xflip is not supported for MRI data (a flip is not a plain k-space flip).")
        base = MRIDataset(path, max_size=max_size)
    else:
        base = ImageFolderDataset(path, use_labels=use_labels, xflip=xflip and measurement is None, max_size=max_size)
    if measurement is None:
        return base
    return MeasuredDataset(base, MeasurementConfig.from_config(measurement), xflip=xflip)
