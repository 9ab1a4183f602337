"""The measurement protocol of reconstruct.py (and of bench/): task options, noise conventions, the simulated
measurement of one example, the operator of a task, and saved measurement sets with their content hash.

The measurement of example i is a function of the data, i, the mask seed and the task options only, never of the
model, so every method and every prior sees the same measurements: a generator seeded by (mask seed, i) draws the
mask, then the noise (`operators.measure`, the one simulation of y = P (A x + sigma_y n) in the house). Stored
undersampled MRI records are used as acquired. A measurement set is written atomically with a sha256 over the task
options and every array, checked again when it is read, so two result tables come from the same measurements exactly
when their hashes agree.
"""

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass

import click
import numpy as np
import torch

from dnnlib import ConfigError, Field, UserError, check_fields
from dnnlib.util import atomic_folder
from torch_utils.misc import parse_seeds
from training.ct import ParallelBeamCT
from training.dataset import ImageFolderDataset
from training.masks import (
    ACS_RULE,
    DEFAULT_LAW,
    MASK_DEFAULTS,
    MASK_KINDS,
    PixelMaskLaw,
    example_generator,
    mask_config,
    mask_law_from_config,
)
from training.mri import MRIDataset
from training.operators import AvgPoolSR, BoxInpainting, Identity, MultiCoilMRI, PixelMask, check_noise_std, measure

TASKS = ("mri", "sr", "box", "pixel", "ct")
IMAGE_OPERATOR_TASKS = ("mri", "sr", "box", "pixel")  # operators with an exact pseudo-inverse (A^+ y baseline)
LINE_MASK_KINDS = tuple(kind for kind in MASK_KINDS if kind.startswith(("lines", "fastmri")))
MEASUREMENTS_FORMAT = "reconstruct-measurements-1"


def open_data(path: str):
    """MRI records (a folder with an MRI dataset.json) or an image zip / folder."""
    meta_path = os.path.join(path, "dataset.json")
    if os.path.isdir(path) and os.path.isfile(meta_path):
        try:
            with open(meta_path) as f:
                if json.load(f).get("kind") == "mri":
                    return MRIDataset(path)
        except (json.JSONDecodeError, AttributeError):
            pass  # not an MRI index: an image folder's dataset.json (labels), read as such below
    if not os.path.exists(path):
        raise UserError(f"--data {path} does not exist.")
    return ImageFolderDataset(path)



# ----------------------------------------------------------------------------
# Measurements: a function of the data, the example index and the task options only.


@dataclass(frozen=True)
class TaskOptions:
    """Everything a measurement depends on besides the data and the example index. Options of other tasks are None;
    `acquired` marks stored undersampled MRI records (measured as acquired: no mask law, noise or seed of ours)."""

    task: str
    sigma_y: float | None = None
    mask_seed: int | None = None
    mri_mask: dict | None = None  # the MRI line law's config {'kind', 'R', 'acs' or fastMRI's 'center_fraction'}
    sr_factor: int | None = None
    box_size: int | None = None
    pixel_p: float | None = None
    views: int | None = None  # CT
    angular_range: float | None = None  # CT, degrees
    rel_noise: float | None = None  # noise std = rel_noise * mean |A x| over the measured entries (seed 003)
    snr_db: float | None = None  # noise std from the measurement SNR (NOISE_CONVENTION)
    acquired: bool = False

    def to_config(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None and v is not False}

    @staticmethod
    def from_config(config: dict) -> "TaskOptions":
        try:
            return TaskOptions(**config)
        except TypeError as e:
            raise UserError(f"Stored task options {config} are not valid ({e}).") from e


# The CLI flag of each task option, and the task it belongs to (None: every simulated task).
TASK_FLAGS = {"sigma_y": ("--sigma-y", None), "mask_seed": ("--mask-seed", None), "kind": ("--mask-kind", "mri"),
              "R": ("--accel", "mri"), "acs": ("--acs", "mri"), "center_fraction": ("--center-fraction", "mri"),
              "sr_factor": ("--sr-factor", "sr"),
              "box_size": ("--box-size", "box"), "pixel_p": ("--pixel-p", "pixel"), "views": ("--views", "ct"),
              "angular_range": ("--angular-range", "ct"), "rel_noise": ("--rel-noise", None),
              "snr_db": ("--snr-db", None)}
NOISE_OPTIONS = ("sigma_y", "rel_noise", "snr_db")
NOISE_CONVENTION = (
    "Measurement noise: std sigma_y per real component (complex entries: on the real and on the imaginary part "
    "each); --rel-noise r: sigma_y = r * mean |A x| over the measured entries (seed 003's 5% for CT); --snr-db s: "
    "SNR = mean |M A x|^2 / E|n|^2 over the measured entries, E|n|^2 = 2 sigma_y^2 for complex entries and sigma_y^2 "
    "for real ones, i.e. sigma_y = sqrt(mean |M A x|^2 / (c 10^(s / 10))), c = 2 or 1.")


def flat_task_options(opts: TaskOptions) -> dict:
    """{option name of TASK_FLAGS: value} of a task, the MRI law's parameters flattened."""
    flat = {k: v for k, v in opts.to_config().items() if k in TASK_FLAGS}
    flat.update(opts.mri_mask or {})
    return flat


def check_task_flags(task: str, acquired: bool, given: dict):
    """Refuse task options that do not apply to the task (given: {option name: value}, only those on the command
    line)."""
    for name in given:
        flag, owner = TASK_FLAGS[name]
        if acquired:
            raise UserError(f"{flag} does not apply to stored undersampled MRI records, which are used as acquired.")
        if owner is not None and owner != task:
            raise UserError(f"{flag} applies only to --task {owner}, not to --task {task}.")


def resolve_task_options(task: str, acquired: bool, given: dict, resolution: int) -> TaskOptions:
    """The task options from those given, the rest at their defaults (the MRI ACS: `default_acs`)."""
    check_task_flags(task, acquired, given)
    if acquired:
        return TaskOptions(task=task, acquired=True)
    noise = {name: float(given[name]) for name in NOISE_OPTIONS if name in given}
    if len(noise) > 1:
        raise UserError("--sigma-y, --rel-noise and --snr-db each set the measurement noise; give only one.")
    noise = noise or ({"rel_noise": 0.05} if task == "ct" else {"sigma_y": 0.01})
    common = dict(task=task, mask_seed=int(given.get("mask_seed", 1)), **noise)
    for name in ("sigma_y", "rel_noise"):
        if name in noise:
            check_noise_std(noise[name], TASK_FLAGS[name][0])
    if task == "mri":
        kind = given.get("kind", DEFAULT_LAW["mri"])
        if kind.startswith("fastmri") and "acs" in given:  # fastMRI's own parameters (docs/fastmri.md)
            raise UserError(f"--acs does not apply to --mask-kind {kind}; give --center-fraction.")
        if not kind.startswith("fastmri") and "center_fraction" in given:
            raise UserError(f"--center-fraction applies to the fastmri mask kinds, not to --mask-kind {kind}.")
        law = mask_config(kind, resolution, {name: given.get(name) for name in ("R", "acs", "center_fraction")})
        mask_law_from_config(law).observed_fraction((resolution, resolution))  # e.g. ACS wider than the image
        return TaskOptions(**common, mri_mask=law)
    if task == "sr":
        factor = int(given.get("sr_factor", 4))
        if resolution % factor:
            raise UserError(f"--sr-factor {factor} does not divide the image size {resolution}.")
        return TaskOptions(**common, sr_factor=factor)
    if task == "ct":
        views, angular_range = int(given.get("views", 20)), float(given.get("angular_range", 180.0))
        ParallelBeamCT(resolution, views, angular_range)  # refuses a bad geometry
        return TaskOptions(**common, views=views, angular_range=angular_range)
    if task == "box":
        size = int(given.get("box_size", resolution // 2))
        if size > resolution:
            raise UserError(f"--box-size {size} exceeds the image size {resolution}.")
        return TaskOptions(**common, box_size=size)
    p = float(given.get("pixel_p", 0.5))
    if not 0 <= p < 1:
        raise UserError(f"--pixel-p must be in [0, 1), got {p}.")
    return TaskOptions(**common, pixel_p=p)


EXAMPLE_FIELDS = ("y", "mask", "maps", "reference", "sigma_y")


@dataclass
class Example:
    """One measured example: y (1, ...) the measurement, mask (1, ...) its mask (MRI lines or dust pixels; None
    where the operator holds it), maps (1, C, H, W) for MRI, reference image (1, C, H, W) or None (stored data)."""

    index: int
    y: torch.Tensor
    mask: torch.Tensor | None
    maps: torch.Tensor | None
    reference: torch.Tensor | None
    sigma_y: torch.Tensor | None = None  # (1,) float64, the noise std of y (stored acquired data: the converter's
    # per-slice estimate, None where the records have none)


def measure_example(record: dict, opts: TaskOptions) -> Example:
    """Simulate (or read, for stored MRI records) the measurement of one record; deterministic in
    (--mask-seed, index) and the task options."""
    index = int(record["index"])
    if opts.task == "mri":
        maps = record["maps"][None]
        if opts.acquired:
            if "mask" not in record:
                raise UserError(f"MRI record {index} holds no mask, but the dataset holds stored measurements.")
            return Example(index, record["kspace"][None], record["mask"][None], maps, None)
        g = example_generator(opts.mask_seed, index)
        kspace = record["kspace"][None]
        mask = mask_law_from_config(opts.mri_mask).sample(1, tuple(kspace.shape[-2:]), g)
        sigma_y = noise_std(opts, kspace, mask)
        return Example(index, measure(Identity(), kspace, mask, sigma_y, g), mask, maps, record["image"][None],
                       torch.tensor([sigma_y], dtype=torch.float64))
    g = example_generator(opts.mask_seed, index)
    image = record["image"][None]
    mask = PixelMaskLaw(opts.pixel_p).sample(1, tuple(image.shape[-2:]), g) if opts.task == "pixel" else None
    operator = task_operator(opts, image.shape[-1], mask)
    sigma_y = noise_std(opts, operator.A(image), mask)
    y = measure(operator, image, sigma_y=sigma_y, generator=g)
    return Example(index, y, mask, None, image, torch.tensor([sigma_y], dtype=torch.float64))


def noise_std(opts: TaskOptions, clean: torch.Tensor, mask: torch.Tensor | None) -> float:
    """sigma_y of one example from the task's noise option (NOISE_CONVENTION); clean = A x, mask M or None."""
    if opts.sigma_y is not None:
        return opts.sigma_y
    measured = clean[mask.expand_as(clean) > 0] if mask is not None else clean.flatten()
    if opts.rel_noise is not None:
        return opts.rel_noise * measured.abs().mean().item()
    components = 2 if clean.is_complex() else 1
    return math.sqrt(measured.abs().square().mean().item() / (components * 10 ** (opts.snr_db / 10)))


def task_operator(opts: TaskOptions, resolution: int, mask: torch.Tensor | None = None, maps=None, device="cpu"):
    """The operator A of a batch: MRI T = F S (its line mask M is applied separately), or the image operator (which
    holds its mask)."""
    if opts.task == "mri":
        return MultiCoilMRI(maps)
    if opts.task == "sr":
        return AvgPoolSR(opts.sr_factor)
    if opts.task == "box":
        return BoxInpainting(resolution, opts.box_size, device=device)
    if opts.task == "ct":
        return ParallelBeamCT(resolution, opts.views, opts.angular_range)
    return PixelMask(mask)


@dataclass
class MeasurementSet:
    task: TaskOptions
    examples: dict  # index -> Example
    source: str  # the data it was measured from (for the record; not part of the hash)

    def hash(self) -> str:
        """sha256 over the task options and every array (name, dtype, shape, bytes) of every example, in index
        order: equal exactly when the measurements are."""
        digest = hashlib.sha256(json.dumps(self.task.to_config(), sort_keys=True).encode())
        for index in sorted(self.examples):
            digest.update(f"example {index}".encode())
            for name in EXAMPLE_FIELDS:
                value = getattr(self.examples[index], name)
                array = None if value is None else value.detach().cpu().contiguous().numpy()
                digest.update(f"{name} {None if array is None else (array.dtype.str, array.shape)}".encode())
                if array is not None:
                    digest.update(array.tobytes())
        return digest.hexdigest()

    def describe(self) -> dict:
        return {"hash": self.hash(), "task": self.task.to_config(), "indices": sorted(self.examples),
                "source": self.source}


def save_measurements(path: str, measurements: MeasurementSet):
    """Write the set to a new folder `path` atomically (a temporary folder beside it, renamed when complete):
    measurements.json (format, task options, indices, source, hash) and examples/{index:06d}.npz."""
    with atomic_folder(path) as tmp:
        os.makedirs(os.path.join(tmp, "examples"))
        for index, example in measurements.examples.items():
            arrays = {name: getattr(example, name)[0].numpy() for name in EXAMPLE_FIELDS
                      if getattr(example, name) is not None}
            np.savez(os.path.join(tmp, "examples", f"{index:06d}.npz"), index=np.int64(index), **arrays)
        with open(os.path.join(tmp, "measurements.json"), "w") as f:
            json.dump({"format": MEASUREMENTS_FORMAT, **measurements.describe()}, f, indent=2)


def load_measurements(path: str) -> MeasurementSet:
    """Read a set written by `save_measurements`; refuse one that is not such a set or whose content no longer
    matches its hash."""
    meta_path = os.path.join(path, "measurements.json")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        if meta.get("format") != MEASUREMENTS_FORMAT:
            raise ValueError(f"format {meta.get('format')!r}")
        examples = {}
        for index in meta["indices"]:
            with np.load(os.path.join(path, "examples", f"{index:06d}.npz"), allow_pickle=False) as arrays:
                fields = {name: torch.from_numpy(arrays[name])[None] if name in arrays else None
                          for name in EXAMPLE_FIELDS}
            examples[int(index)] = Example(int(index), **fields)
    except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError) as e:
        raise UserError(f"--measurements {path} is not a measurement set written by --save-measurements "
                        f"({type(e).__name__}: {e}).") from e
    try:
        task = check_fields(meta["task"], TASK_FIELDS, "task")
        if task.get("mri_mask") is not None:
            check_fields(task["mri_mask"], MRI_MASK_FIELDS, "task.mri_mask")
    except ConfigError as e:
        raise UserError(f"--measurements {path} is refused: measurements.json's {e}.") from e
    measurements = MeasurementSet(TaskOptions.from_config(task), examples, meta.get("source", path))
    if measurements.hash() != meta.get("hash"):
        raise UserError(f"--measurements {path}: the stored arrays do not match the set's hash {meta.get('hash')} "
                        "(modified after they were written).")
    check_measurement_set(measurements, path)  # a hash recomputed after tampering proves nothing about the values
    return measurements


# measurements.json's task options: the types and ranges the CLI allows (their consistency with the images is
# checked by resolve_task_options, as for options given on the command line).
TASK_FIELDS = {"task": Field("str", choices=TASKS, required=True), "sigma_y": Field("float", 0),
               "mask_seed": Field("int", -(2**63), 2**63 - 1), "mri_mask": Field("json"),
               "sr_factor": Field("int", 1, 2**16), "box_size": Field("int", 1, 2**16), "pixel_p": Field("float", 0, 1),
               "views": Field("int", 1, 2**16), "angular_range": Field("float", 0, 360),
               "rel_noise": Field("float", 0), "snr_db": Field("float"), "acquired": Field("bool")}
MRI_MASK_FIELDS = {"kind": Field("str", choices=LINE_MASK_KINDS, required=True),
                   "R": Field("float", 1, 2**16, required=True), "acs": Field("int", 0, 2**16, required=True)}


def check_measurement_set(measurements: MeasurementSet, path: str):
    """Refuse a loaded set (one sentence naming the example and array) unless every example holds exactly the arrays
    its task stores, of the dtypes `measure_example` writes, finite, of one shape across examples, with y of the
    shape the task's operator gives the reference (MRI: of the coil maps' shape), and unless its task options are
    what the CLI would record for images of its size."""
    opts = measurements.task
    mri = opts.task == "mri"
    dtypes = {"y": torch.complex64 if mri else torch.float32, "mask": torch.float32, "maps": torch.complex64,
              "reference": torch.float32, "sigma_y": torch.float64}
    present = {"y": True, "mask": mri or opts.task == "pixel", "maps": mri, "reference": not opts.acquired,
               "sigma_y": not opts.acquired}
    first = None
    for index, example in measurements.examples.items():
        where = f"--measurements {path}: example {index}"
        arrays = {name: getattr(example, name) for name in EXAMPLE_FIELDS}
        for name, value in arrays.items():
            if (value is not None) != present[name]:
                raise UserError(f"{where} {'lacks' if present[name] else 'holds an unexpected'} {name} array for "
                                f"--task {opts.task}.")
            if value is not None and value.dtype != dtypes[name]:
                raise UserError(f"{where} holds {name} as {value.dtype}, expected {dtypes[name]}.")
            if value is not None and not torch.isfinite(value).all():
                raise UserError(f"{where} holds NaN or Inf values in {name}.")
        shapes = {name: tuple(v.shape) for name, v in arrays.items() if v is not None}
        first = first or shapes
        if shapes != first:
            name = next(n for n in shapes if shapes[n] != first[n])
            raise UserError(f"{where} holds {name} of shape {shapes[name][1:]}, but the first example's is "
                            f"{first[name][1:]}.")
        if arrays["sigma_y"] is not None and not (arrays["sigma_y"] >= 0).all():
            raise UserError(f"{where} holds a negative sigma_y.")
    try:
        resolved = resolve_task_options(opts.task, opts.acquired, flat_task_options(opts),
                                        measurement_resolution(measurements))
    except (UserError, ValueError, TypeError) as e:
        raise UserError(f"--measurements {path} is refused: its task options are not valid ({str(e).rstrip('.')})."
                        ) from e
    if resolved != opts:
        raise UserError(f"--measurements {path} is refused: its task options {opts.to_config()} are not what "
                        "reconstruct.py records for them.")
    for index, example in measurements.examples.items():
        arrays = {name: getattr(example, name) for name in EXAMPLE_FIELDS}
        y = arrays["y"]
        if mri:
            expected = tuple(arrays["maps"].shape)
            fits = (expected[-1] == expected[-2] and arrays["mask"].dim() == 4
                    and torch.broadcast_shapes(arrays["mask"].shape, y.shape) == y.shape)
        else:
            reference = arrays["reference"]
            fits = reference.dim() == 4 and reference.shape[-1] == reference.shape[-2] and 1 <= reference.shape[1] <= 4
            expected = tuple(task_operator(opts, reference.shape[-1], arrays["mask"]).A(
                torch.zeros_like(reference)).shape) if fits else None
        if not fits or tuple(y.shape) != expected:
            raise UserError(f"--measurements {path}: example {index} holds y of shape {tuple(y.shape[1:])}, which "
                            f"does not fit its {'coil maps' if mri else 'reference'} and mask for --task {opts.task}.")


def check_against_stored(stored: TaskOptions, task: str | None, given: dict, path: str):
    """Refuse task options given beside --measurements that contradict the stored ones (one sentence)."""
    if task is not None and task != stored.task:
        raise UserError(f"--task {task} contradicts --measurements {path}, which holds --task {stored.task} "
                        "measurements.")
    flat = flat_task_options(stored)
    for name, value in given.items():
        flag = TASK_FLAGS[name][0]
        if name not in flat:
            raise UserError(f"{flag} does not apply to the {stored.task} measurements in --measurements {path}.")
        if type(flat[name])(value) != flat[name]:
            raise UserError(f"{flag} {value} contradicts --measurements {path}, which was measured with {flag} "
                            f"{flat[name]}; omit the option or give the stored value.")


def measurement_resolution(measurements: MeasurementSet) -> int:
    example = next(iter(measurements.examples.values()))
    return (example.maps if example.maps is not None else example.reference).shape[-1]




def parse_snr_list(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or not all(math.isfinite(v) for v in values) or len(set(values)) != len(values):
        raise UserError(f"--snr-db must be a comma list of distinct SNRs in dB (e.g. 10,20,30), got {text!r}.")
    return values


def check_data_kind(task: str, data, data_path: str):
    data_kind = data.describe()["kind"]
    if (task == "mri") != (data_kind == "mri"):
        raise UserError(f"--task {task} needs {'MRI records' if task == 'mri' else 'an image dataset'}, but --data "
                        f"{data_path} holds {'MRI records' if data_kind == 'mri' else 'images'}.")



def selection_given(indices, first, num) -> bool:
    return indices is not None or first is not None or num is not None


def select_indices(indices: str | None, first: int | None, num: int | None, available: list[int]) -> list[int]:
    """The examples to reconstruct among `available` (the data's 0..N-1, or the indices of a stored set)."""
    if indices is not None:
        chosen = parse_seeds(indices, "--indices")
    else:
        chosen = [i for i in available if i >= (first or 0)]
        chosen = chosen if num is None or len(chosen) < num else chosen[:num]
    missing = sorted(set(chosen) - set(available))
    if not chosen or missing or (indices is None and num is not None and len(chosen) < num):
        what = f"--indices {indices}" if indices is not None else f"--first {first or 0}" + \
            (f" --num {num}" if num is not None else "")
        raise UserError(f"The examples to reconstruct ({what}) must be among the {len(available)} available "
                        f"(indices {min(available)}..{max(available)}).")
    return chosen


# ----------------------------------------------------------------------------
# The task options on the command line (reconstruct.py), declared once: click options in the order the CLI lists them.

TASK_OPTIONS = (
    click.option("--mask-kind", type=click.Choice(LINE_MASK_KINDS), default=None,
                 help=f"Task option, MRI line law [default: {DEFAULT_LAW['mri']}]"),
    click.option("--accel", type=click.FloatRange(min=1), default=None, help="Task option, MRI acceleration R "
                 f"[default: {MASK_DEFAULTS['R']:g}]"),
    click.option("--acs", type=click.IntRange(min=0), default=None, help=f"Task option, MRI centre lines [default: "
                 f"{ACS_RULE}, as train.py and dataset_tool.py]"),
    click.option("--center-fraction", type=click.FloatRange(min=0, max=1), default=None,
                 help="Task option, fastmri mask kinds: fraction of the columns at the centre "
                 f"[default: {MASK_DEFAULTS['center_fraction']:g}]"),
    click.option("--mask-seed", type=int, default=None, help="Task option, seed of the simulated masks and noise "
                 "[default: 1]"),
    click.option("--sr-factor", type=click.IntRange(min=1), default=None, help="Task option [default: 4]"),
    click.option("--box-size", type=click.IntRange(min=1), default=None, help="Task option, side of the centred hole "
                 "[default: res/2]"),
    click.option("--pixel-p", type=float, default=None, help="Task option, pixel drop probability [default: 0.5]"),
    click.option("--sigma-y", type=float, default=None, help="Task option, measurement noise std [default: 0.01; ct: "
                 "--rel-noise 0.05]"),
    click.option("--rel-noise", type=float, default=None,
                 help="Task option, noise std relative to mean |A x| (CT: 0.05)"),
    click.option("--snr-db", default=None, help="Task option, comma list of measurement SNRs in dB: the same examples "
                 "measured at each, tabulated per SNR"),
    click.option("--views", type=int, default=None, help="Task option, CT projection angles [default: 20]"),
    click.option("--angular-range", type=float, default=None, help="Task option, CT degrees covered [default: 180; "
                 "less: limited angle]"),
)
# The click parameter of each task option of TASK_FLAGS but --snr-db (a list: one measurement set per SNR).
TASK_PARAMETERS = {"sigma_y": "sigma_y", "mask_seed": "mask_seed", "kind": "mask_kind", "R": "accel", "acs": "acs",
                   "center_fraction": "center_fraction", "sr_factor": "sr_factor", "box_size": "box_size",
                   "pixel_p": "pixel_p", "views": "views", "angular_range": "angular_range", "rel_noise": "rel_noise"}


def given_task_options(options: dict) -> dict:
    """{task option name: value} of the task options on the command line (the parsed click options)."""
    return {name: options[parameter] for name, parameter in TASK_PARAMETERS.items() if options[parameter] is not None}


def measurement_sets(data_path: str | None, measurements_path: str | None, task: str | None, given: dict,
                     indices: str | None, first: int | None, num: int | None, snr_list: list | None):
    """The measurement sets to reconstruct -> ([(SNR level or None, MeasurementSet)], task, source, slices): the
    stored set of --measurements (its selected examples), or the selected examples of --data measured with the task
    options, one set per --snr-db level. `slices`: the MRI records' dataset.json entries ([] for a stored set or
    images), which name each slice's volume."""
    if measurements_path is not None:
        if data_path is not None:
            raise UserError("--data and --measurements exclude each other: the measurement set holds its data.")
        if snr_list is not None:
            raise UserError("--snr-db measures the examples anew at each SNR; it does not apply to --measurements.")
        measurements = load_measurements(measurements_path)
        check_against_stored(measurements.task, task, given, measurements_path)
        if selection_given(indices, first, num):
            chosen = select_indices(indices, first, num, sorted(measurements.examples))
            measurements.examples = {i: measurements.examples[i] for i in chosen}
        return [(None, measurements)], measurements.task.task, measurements_path, []
    if data_path is None or task is None:
        raise UserError("Give --data and --task (the data to measure and the task), or --measurements DIR.")
    data = open_data(data_path)
    check_data_kind(task, data, data_path)
    acquired = task == "mri" and not data.describe()["fully_sampled"]
    resolution = data.shape[-1] if task == "mri" else data.resolution
    chosen = select_indices(indices, first, num, list(range(len(data))))
    # Every rank measures every selected record: a bad record stops all ranks before anything is written, and
    # every rank knows the whole set's hash. Held-out sets are small, so they are kept in memory. With --snr-db,
    # one set per SNR (the same masks and noise draws, scaled to each SNR).
    sets = []
    for level in snr_list or [None]:
        task_options = resolve_task_options(task, acquired, given if level is None else {**given, "snr_db": level},
                                            resolution)
        measured = {i: measure_example(data[i], task_options) for i in chosen}
        if acquired:  # the converter's per-slice noise estimate, where recorded, is the noise std of the data
            for i, example in measured.items():
                noise = data.meta["slices"][i].get("noise_std")
                example.sigma_y = None if noise is None else torch.tensor([float(noise)], dtype=torch.float64)
        sets.append((level, MeasurementSet(task_options, measured, os.path.abspath(data_path))))
    return sets, task, data_path, data.meta["slices"] if task == "mri" else []
