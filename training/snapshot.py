"""Checkpoint files: state dicts plus a JSON config, written atomically, read with `torch.load(weights_only=True)`.

Two kinds, as in EDM's run directories:
- network snapshot `network-snapshot-{kimg:06d}.pt`: {'format', 'config' (JSON text), 'ema' (state dict)}. The
  config holds the network class and kwargs, the data shape, the loss and the measurement process, so generate.py and
  reconstruct.py rebuild everything from the file alone.
- training state `training-state-{kimg:06d}.pt`: {'format', 'config', 'net', 'ema', 'optimizer', 'progress',
  'rng' (one entry per rank)[, 'scaler', 'ema_profiles' (one state dict per --ema-profiles value)]}: everything needed
  to continue exactly.
A power-function EMA profile's snapshot (`power-ema-{sigma_rel}-{kimg:06d}.pt`, train.py --ema-profiles) is a network
snapshot whose config adds a 'power_ema' section: its sigma_rel, optimizer step and training position.
Before torch.load, `_load` checks the archive's index (torch_utils/archive.py: members, sizes, top-level entries) and
the weights' shapes against the network of the config, laid out without memory, so a crafted file is refused before
anything is allocated for it. No pickled code, and no code chosen by the file: the config is JSON, validated field by
field before anything is built from it (`check_snapshot_config`): the network must be a class of the registry in
training/networks.py with arguments of the types and ranges its table allows, the measurement process and mask law must
be ones the code knows, and a data path is only ever read (a relative one is resolved against the snapshot's run
directory). Anything else is refused with one sentence naming the file and the field, before anything is written.

A new top-level config section (e.g. for a new kind of model) needs an entry in `SNAPSHOT_SECTIONS`; a new network
class needs `register_network` (training/networks.py) and an import of its module here.
"""

import glob
import json
import math
import os
import re

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from dnnlib import ConfigError, Field, UserError, atomic_write, check_fields
from torch_utils import archive
from training import classifier, networks, patches  # classifier also registers NoiseAwareClassifier
from training.loss import with_recorded_vp_grid
from training.masks import mask_law_from_config
from training.measurements import SKIP_SPACES, MeasurementConfig
from training.power_ema import MAX_PROFILES, SIGMA_REL_MAX
from training.schedules import VP_GRID_RULES

SNAPSHOT_FORMAT = "msm-network-snapshot-v1"
STATE_FORMAT = "msm-training-state-v1"


def atomic_save(obj, path: str):
    """torch.save through dnnlib.util.atomic_write: a crash never leaves a torn file under `path`."""
    with atomic_write(path) as f:
        torch.save(obj, f)


def remove_stale_temp_files(folder: str) -> list[str]:
    """Delete the `*.pt.tmp-PID` files a killed `atomic_save` left in folder (call it where no other process writes
    there, as rank 0 does at the start of a run) -> their names."""
    stale = sorted(glob.glob(os.path.join(glob.escape(folder), "*.pt.tmp-*")))
    for p in stale:
        os.remove(p)
    return [os.path.basename(p) for p in stale]


# The top-level entries each format may hold (the first three of a training state, and every entry of a snapshot,
# are required), and the state dicts in them that must fit the network of the file's config.
_STATE_ENTRIES = {"format", "config", "net", "ema", "optimizer", "progress", "rng"}
_ENTRIES = {SNAPSHOT_FORMAT: ({"format", "config", "ema"}, {"format", "config", "ema"}, ("ema",)),
            STATE_FORMAT: (_STATE_ENTRIES, _STATE_ENTRIES | {"scaler", "ema_profiles"}, ("net", "ema"))}
# Tensor data beyond the weights' own: per-rank RNG states, optimizer step counters, the scaler. Copies of the
# weights a file may hold: the snapshot's EMA; the state's network, EMA and Adam's two moment estimates.
_EXTRA_TENSOR_BYTES = 64 * 2**20
_WEIGHT_COPIES = {SNAPSHOT_FORMAT: 1, STATE_FORMAT: 4}


# The largest tensor one network call on one image may create, in GiB; raise it with this environment variable.
MAX_TENSOR_GIB_VARIABLE, DEFAULT_MAX_TENSOR_GIB = "MSM_MAX_TENSOR_GIB", 64.0


class _LargestTensor(TorchFunctionMode):
    """Bytes of the largest tensor the torch functions called in this mode return, counting for attention the
    (N, heads, HW, HW) weight matrix its unfused computation holds (fused kernels avoid storing it, not the work)."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is F.scaled_dot_product_attention:
            q, k = args[0], args[1]
            self.bytes = max(self.bytes, q.shape[:-1].numel() * k.shape[-2] * q.element_size())
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.bytes = max(self.bytes, t.numel() * t.element_size())
        return out


def largest_call_tensor(layout: torch.nn.Module, network_config: dict) -> int:
    """Bytes of the largest tensor one call of the network on one image at its resolution creates, found by running
    its architecture (the preconditioner's `model`, or the classifier) on the meta device: shapes only, no memory
    and no arithmetic, so a network whose attention alone would need petabytes is measured in a fraction of a
    second. `layout` is the network built on the meta device."""
    kwargs = network_config["kwargs"]
    channels = kwargs["in_channels"] + kwargs.get("position_channels", 0)
    with torch.device("meta"), _LargestTensor() as mode:
        images = torch.zeros(1, channels, kwargs["img_resolution"], kwargs["img_resolution"])
        getattr(layout, "model", layout)(images, torch.ones(1))  # (x, noise labels) or the classifier's (x, sigma)
    return mode.bytes


def _check_call_memory(layout: torch.nn.Module, network_config: dict, named: str):
    """Refuse a network one call of which on one image would create a tensor above the limit."""
    try:
        limit_gib = float(os.environ.get(MAX_TENSOR_GIB_VARIABLE, DEFAULT_MAX_TENSOR_GIB))
    except ValueError as e:
        raise UserError(f"{MAX_TENSOR_GIB_VARIABLE}={os.environ[MAX_TENSOR_GIB_VARIABLE]!r:.40} is not a number "
                        "of GiB.") from e
    needed = largest_call_tensor(layout, network_config)
    if needed > limit_gib * 2**30:
        raise UserError(f"{named} is refused: one call of its network on one image would create a tensor of "
                        f"{needed / 2**30:.4g} GiB (e.g. attention over every pixel of a large image), more than the "
                        f"limit of {limit_gib:g} GiB (set {MAX_TENSOR_GIB_VARIABLE} to raise it).")


def _load(path: str, expected_format: str, what: str) -> dict:
    """Read a snapshot or training state, refusing (one sentence naming the file) before any tensor is loaded or any
    network is built: the archive's members, sizes and top-level entries (torch_utils.archive), the config
    (`check_snapshot_config`), the weights' names and shapes against the network the config describes (laid out on
    the meta device, which allocates nothing), the total tensor data against what those weights need, and the
    largest tensor one call of the network would create (`_check_call_memory`)."""
    if not os.path.isfile(path):
        raise UserError(f"{what} {path} does not exist.")
    named = f"{what} {path}"
    index = archive.read_index(path, f"{path} is not a {what.lower()} of this project: it")
    data = index.root
    if not isinstance(data, dict) or data.get("format") != expected_format:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise UserError(f"{path} is not a {what.lower()} of this project (format {found!r:.80}, expected "
                        f"{expected_format!r}).")
    required, allowed, state_dicts = _ENTRIES[expected_format]
    unexpected = sorted(str(k) for k in data if k not in allowed)
    if unexpected or not required <= set(data):
        problem = (f"an unexpected entry {unexpected[0]!r:.60}" if unexpected
                   else f"no entry {sorted(required - set(data))[0]!r}")
        raise UserError(f"{named} is refused: it holds {problem} (expected {', '.join(sorted(allowed))}).")
    try:
        config = json.loads(data.get("config"))
    except (TypeError, ValueError, RecursionError) as e:
        raise UserError(f"{named} is refused: its config is not JSON text ({type(e).__name__}).") from e
    try:
        check_snapshot_config(config)
    except ConfigError as e:
        raise UserError(f"{named} is refused: its config {e}.") from e
    except UserError as e:  # a value of the right type out of its range, in the words of the class that checks it
        raise UserError(f"{named} is refused: its config is not valid ({str(e).rstrip('.')}).") from e
    layout = _build_for(config["network"], named, device="meta")
    for key in state_dicts:
        check_weights(layout, data[key], named if expected_format == SNAPSHOT_FORMAT else f"{named} ({key})")
    profiles = data.get("ema_profiles", [])  # a training state's power-function EMAs (train.py --ema-profiles)
    if not isinstance(profiles, list) or len(profiles) > MAX_PROFILES:
        raise UserError(f"{named} is refused: its ema_profiles is not a list of at most {MAX_PROFILES} state dicts.")
    for i, profile in enumerate(profiles):
        check_weights(layout, profile, f"{named} (ema_profiles[{i}])")
    weight_bytes = sum(v.numel() * v.element_size() for v in layout.state_dict().values())
    limit = (_WEIGHT_COPIES[expected_format] + len(profiles)) * weight_bytes + _EXTRA_TENSOR_BYTES
    if index.total_bytes > limit:
        raise UserError(f"{named} is refused: it holds {index.total_bytes} bytes of tensors, more than the "
                        f"{limit} its network's weights need.")
    _check_call_memory(layout, config["network"], named)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for foreign or corrupt files
        raise UserError(
            f"{path} is not a {what.lower()} of this project (it could not be read as a weights-only checkpoint: "
            f"{type(e).__name__})."
        ) from e
    if "loss" in config:  # a vp200 run from before the grid rule was recorded trained on the section rule
        config["loss"] = with_recorded_vp_grid(config["loss"])
    data["config"] = config
    return data


_DATASET_FIELDS = {
    "kind": Field("str", choices=("image", "mri"), required=True), "path": Field("str"),
    # images (training/dataset.py ImageFolderDataset.describe)
    "num_images": Field("int", 0, 2**40), "image_shape": Field("ints", 1, 65536, max_items=3),
    "label_dim": Field("int", 0, 100_000),
    # MRI records (training/mri.py MRIDataset.describe)
    "num_slices": Field("int", 0, 2**40), "num_coils": Field("int", 1, 1024),
    "shape": Field("ints", 1, 65536, max_items=2),
    "image_channels": Field("int", 2, 2), "fully_sampled": Field("bool"), "mask_law": Field("json"),
    "normalisation": Field("json"), "maps": Field("json"),  # records of how the data were made, never interpreted
    "measurement": Field("json"),  # MeasuredDataset.describe: checked as the top-level 'measurement'
}
_LOSS_FIELDS = {
    "class_name": Field("str", required=True, choices=tuple(f"training.loss.{name}" for name in (
        "EDMLoss", "VPLoss", "VELoss", "MSMLoss", "AmbientLoss", "ClassifierLoss"))),
    "measurement": Field("json"), "sigma_dist": Field("str", choices=("lognormal", "vp200")),
    "weighting": Field("str", choices=("edm", "inverse-variance")), "sure_tau": Field("float", 0, 1e6),
    "sure_weight": Field("float", 0, 1e6), "pseudo_clean_grad": Field("bool"), "delta": Field("float", 0, 1),
    "skip_space": Field("str", choices=SKIP_SPACES),  # MSMLoss; absent = 'image' (older snapshots)
    "vp_grid": Field("str", choices=VP_GRID_RULES),  # sigma_dist vp200; absent = 'section' (loss.with_recorded_vp_grid)
    "P_mean": Field("float", -20, 20), "P_std": Field("float", 0, 20), "clean": Field("bool"),  # ClassifierLoss
}
_TRAINING_FIELDS = {"batch_size": Field("int", 1, 2**40), "total_kimg": Field("float", 0, 1e12),
                    "seed": Field("int", -(2**63), 2**63 - 1),
                    "precision": Field("str", choices=("fp32", "bf16", "fp16"))}
MAX_NIMG = 10**13  # ten billion kimg: far beyond any run, far below float precision trouble
# A power-function EMA profile's snapshot (train.py --ema-profiles): its sigma_rel, at which optimizer step (counted
# from 1) and training position. posthoc_ema.py combines such snapshots by these numbers.
_POWER_EMA_FIELDS = {"sigma_rel": Field("float", 0, SIGMA_REL_MAX, required=True),
                     "step": Field("int", 1, MAX_NIMG, required=True), "nimg": Field("int", 0, MAX_NIMG, required=True)}
SNAPSHOT_SECTIONS = {"network": Field("json", required=True), "dataset": Field("json", required=True),
                     "loss": Field("json"), "measurement": Field("json", optional=True), "training": Field("json"),
                     "patches": Field("json"),  # patch priors: canvas geometry and patch law (training/patches.py)
                     "power_ema": Field("json"),
                     # converted and post-hoc EMA snapshots: where the weights came from (never interpreted)
                     "source": Field("json")}


def check_snapshot_config(config: dict):
    """Refuse (ConfigError naming the field) any config a snapshot or training state carries that this code did not
    write: every section, key, type and range is checked here before anything is built from it."""
    check_fields(config, SNAPSHOT_SECTIONS, "config")
    networks.check_network_config(config["network"], "network")
    dataset = check_fields(config["dataset"], _DATASET_FIELDS, "dataset")
    for name in ("shape",) if dataset["kind"] == "mri" else ("image_shape",):
        if name not in dataset:
            raise ConfigError(f"dataset.{name}", f"is missing (a dataset of kind {dataset['kind']} has one)")
    if "mask_law" in dataset:
        mask_law_from_config(dataset["mask_law"], where="dataset.mask_law")
    if config.get("measurement") is not None:
        operator = MeasurementConfig.from_config(config["measurement"], where="measurement").operator
        if (operator == "mri") != (dataset["kind"] == "mri"):
            raise ConfigError("measurement.operator", f"{operator} does not fit a dataset of kind {dataset['kind']}")
    if "loss" in config:
        loss = check_fields(config["loss"], _LOSS_FIELDS, "loss")
        if loss.get("measurement") is not None:
            MeasurementConfig.from_config(loss["measurement"], where="loss.measurement")
    if "training" in config:
        check_fields(config["training"], _TRAINING_FIELDS, "training")
    if "power_ema" in config:
        power_ema = check_fields(config["power_ema"], _POWER_EMA_FIELDS, "power_ema")
        if not 0 < power_ema["sigma_rel"] < SIGMA_REL_MAX:
            raise ConfigError("power_ema.sigma_rel", f"must lie in (0, {SIGMA_REL_MAX:.4f}), got "
                              f"{power_ema['sigma_rel']!r:.20}")
        if power_ema["step"] > power_ema["nimg"]:  # every optimizer step trains on at least one example
            raise ConfigError("power_ema.step", f"{power_ema['step']} exceeds the {power_ema['nimg']} examples "
                              "trained on")
    _check_patches(config)


def _check_patches(config: dict):
    """A patch prior's geometry must fit its network (position channels) and its data (image size); a network with
    position channels needs the geometry they refer to."""
    position_channels = config["network"]["kwargs"].get("position_channels", 0)
    if "patches" not in config:
        if position_channels:
            raise ConfigError("patches", "is missing, but the network takes position channels")
        return
    geometry, _ = patches.from_patch_config(config["patches"], "patches")
    if position_channels != geometry.position_channels:
        raise ConfigError("network.kwargs.position_channels", f"must be {geometry.position_channels} for the "
                          f"position encoding {geometry.encoding}, got {position_channels!r:.20}")
    dataset = config["dataset"]
    size = (dataset.get("shape") or dataset.get("image_shape"))[-1]
    if size != geometry.image_size:
        raise ConfigError("patches.image_size", f"must be the data's image size {size}, got {geometry.image_size}")


def check_weights(net: torch.nn.Module, state, what: str):
    """Refuse (UserError) a state dict that does not fit `net` exactly (names and shapes), naming `what`. `state`
    holds tensors, or the TensorEntry headers of an archive not yet loaded; `net` may be laid out on the meta
    device."""
    expected = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    if not isinstance(state, dict) or not all(isinstance(v, (torch.Tensor, archive.TensorEntry))
                                              for v in state.values()):
        raise UserError(f"{what} does not hold a state dict of tensors.")
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in expected if k in state and tuple(state[k].shape) != expected[k])
    if missing or unexpected or wrong:
        problem = (f"has no weight {missing[0]}" if missing else f"has an unexpected weight {unexpected[0]!r:.80}"
                   if unexpected else f"has {wrong[0]} of shape {tuple(state[wrong[0]].shape)}, expected "
                   f"{expected[wrong[0]]}")
        raise UserError(f"{what} does not fit the network of its config: it {problem}.")
    # Values only once loaded: `state` may hold the headers of an archive not yet read (archive.TensorEntry).
    nonfinite = next((k for k, v in state.items() if isinstance(v, torch.Tensor) and v.is_floating_point()
                      and not torch.isfinite(v).all()), None)
    if nonfinite is not None:  # NaN weights would sample NaN images (or train on NaN) without a word
        raise UserError(f"{what} holds NaN or Inf values in {nonfinite}.")


def save_snapshot(path: str, config: dict, ema: torch.nn.Module):
    state = {k: v.detach().cpu() for k, v in ema.state_dict().items()}
    atomic_save({"format": SNAPSHOT_FORMAT, "config": json.dumps(config), "ema": state}, path)


def build_network(network_config: dict) -> torch.nn.Module:
    """{'class_name': ..., 'kwargs': {...}} -> a fresh network; only registered classes with allowed arguments
    (training/networks.py, `build_network`)."""
    return networks.build_network(network_config)


def _build_for(network_config: dict, what: str, device="cpu") -> torch.nn.Module:
    """build_network for a file's config: settings that pass the per-field checks but do not fit together are
    refused naming the file. On device 'meta' the network's weights have shapes but no memory."""
    try:
        with torch.device(device):
            return build_network(network_config)
    except ConfigError as e:
        raise UserError(f"{what} is refused: its config {e}.") from e


def resolve_snapshot_path(path: str) -> str:
    """A snapshot file, or a run directory (-> its latest network snapshot)."""
    if os.path.isdir(path):
        found = latest_file(path, "network-snapshot")
        if found is None:
            raise UserError(f"Run directory {path} holds no network-snapshot-*.pt file.")
        return found
    return path


def load_snapshot(path: str, device="cpu") -> tuple[torch.nn.Module, dict]:
    """Rebuild the EMA network of a snapshot (or the latest one in a run directory) -> (net in eval mode, config).

    The config is validated first (`check_snapshot_config`); a relative data path in it is returned resolved against
    the snapshot's run directory (its folder), never against the current directory."""
    path = resolve_snapshot_path(path)
    data = _load(path, SNAPSHOT_FORMAT, "Network snapshot")
    config = data["config"]
    net = _build_for(config["network"], f"Network snapshot {path}")
    check_weights(net, data.get("ema"), f"Network snapshot {path}")
    net.load_state_dict(data["ema"])
    _resolve_data_path(config, path)
    return net.eval().requires_grad_(False).to(device), config


def _resolve_data_path(config: dict, path: str):
    """A relative data path in the config of the file at `path` is relative to that file's folder: made absolute."""
    data_path = config["dataset"].get("path")
    if data_path is not None and not os.path.isabs(data_path):
        config["dataset"]["path"] = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(path)), data_path))


def load_power_ema(path: str) -> tuple[dict, dict]:
    """A power-function EMA profile's snapshot (train.py --ema-profiles, read by posthoc_ema.py) -> (its EMA state
    dict, its config with the data path resolved as load_snapshot does); a snapshot without the profile's 'power_ema'
    record is refused."""
    data = _load(path, SNAPSHOT_FORMAT, "Power-EMA snapshot")
    if "power_ema" not in data["config"]:
        raise UserError(f"Power-EMA snapshot {path} has no power_ema section in its config, so its EMA profile is not "
                        "known.")
    check_weights(network_shapes(data["config"]["network"]), data["ema"], f"Power-EMA snapshot {path}")
    _resolve_data_path(data["config"], path)
    return data["ema"], data["config"]


def load_classifier(path: str, device="cpu") -> tuple[torch.nn.Module, dict]:
    """A classifier snapshot (or a run directory's latest) -> (classifier in eval mode, config); a diffusion-model
    snapshot is refused with one sentence."""
    net, config = load_snapshot(path, device)
    if not classifier.is_classifier(config):
        raise UserError(f"--classifier {path} is a diffusion-model snapshot ({config['network']['class_name']}), "
                        "not a classifier; train one with train.py --kind classifier.")
    return net, config


def network_shapes(network_config: dict) -> torch.nn.Module:
    """The network of a config built on the meta device: its parameter names, shapes and dtypes without allocating
    or initialising any weight, for checking a file's tensors before anything real is built."""
    return _build_for(network_config, "The run's network", device="meta")


def check_transfer(path: str, network_config: dict):
    """--transfer: refuse, before anything is written, a file that is not a snapshot whose weights fit both its own
    config (what the training loop's load_snapshot checks later) and the network about to be trained."""
    data = _load(resolve_snapshot_path(path), SNAPSHOT_FORMAT, "--transfer snapshot")
    # _load has checked the weights against the file's own config (what load_snapshot checks later).
    check_weights(network_shapes(network_config), data.get("ema"), f"--transfer {path}")


def save_training_state(path: str, config: dict, state: dict):
    atomic_save({"format": STATE_FORMAT, "config": json.dumps(config), **state}, path)


def load_training_state(path: str, options: dict | None = None, world_size: int = 1, device="cpu") -> dict:
    """A training state file; with `options` (the run's training_options.json) every part of it is checked against
    the run before anything uses it (`check_training_state`)."""
    data = _load(path, STATE_FORMAT, "Training state")
    if options is not None:
        check_training_state(path, data, options, world_size, device)
    return data


# What a training state's config must share with the run's options to be continued by it (state config key,
# training_options.json key), besides the network.
_STATE_MATCHES = (("loss", "loss_kwargs"), ("measurement", "measurement"), ("patches", "patches"))
MAX_RANKS = 2**16
_PROGRESS_FIELDS = {"cur_nimg": Field("int", 0, MAX_NIMG, required=True),
                    "cur_tick": Field("int", 0, MAX_NIMG, required=True),
                    "total_kimg": Field("float", 0, MAX_NIMG / 1000, required=True),
                    "data_nimg": Field("int", 0, MAX_NIMG)}  # absent in states of runs before patch training


def _json(value):
    return json.loads(json.dumps(value))


def check_training_state(path: str, data: dict, options: dict, world_size: int, device="cpu"):
    """Refuse (UserError, one sentence naming the file and the part) a loaded training state that the run with
    `options` must not continue from: a config of another run or configuration, progress counters of the wrong type,
    out of range or inconsistent with the file name, network / EMA / optimizer tensors that do not fit the network or
    are not finite, optimizer hyperparameters or step counts the run did not write, and RNG states that are not
    states of this torch's generators. Checks only: builds nothing but a meta-device network, sets no state."""
    what = f"Training state {path}"
    config = data["config"]
    differing = ["network"] if _json(config["network"]) != _json(options["network"]) else []
    differing += [option for key, option in _STATE_MATCHES if _json(config.get(key)) != _json(options.get(option))]
    training = config.get("training", {})
    differing += [k for k in ("batch_size", "seed", "precision") if training.get(k) != options.get(k)]
    if differing:
        raise UserError(f"{what} was saved by a run with other options ({', '.join(differing)} differ from the run's "
                        "training_options.json); continue it only from its own run folder and options.")
    try:
        progress = check_fields(data.get("progress"), _PROGRESS_FIELDS, "progress")
    except ConfigError as e:
        raise UserError(f"{what} is refused: its {e}.") from e
    cur_nimg, batch = progress["cur_nimg"], options["batch_size"]
    data_nimg = progress.get("data_nimg", cur_nimg)
    named = progress_of(path, "training-state")
    problem = (f"cur_nimg {cur_nimg} does not match its file name ({named} images)" if named not in (None, cur_nimg)
               else f"data_nimg {data_nimg} exceeds cur_nimg {cur_nimg}" if data_nimg > cur_nimg
               else f"data_nimg {data_nimg} differs from cur_nimg {cur_nimg} without patch training"
               if data_nimg != cur_nimg and not options.get("patches")
               else f"data_nimg {data_nimg} is not a whole number of batches of {batch}" if data_nimg % batch
               else f"cur_tick {progress['cur_tick']} exceeds its {data_nimg // batch} optimizer steps"
               if progress["cur_tick"] > data_nimg // batch else None)
    if problem:
        raise UserError(f"{what} is refused: its progress is inconsistent ({problem}).")
    net = network_shapes(options["network"])
    for key in ("net", "ema"):
        check_weights(net, data.get(key), f"{what} ({key})")
    _check_optimizer(data.get("optimizer"), net, options["optimizer_kwargs"], data_nimg // batch, what)
    _check_scaler(data.get("scaler", {}), what)
    profiles, tracked = data.get("ema_profiles", []), len(options.get("ema_profiles") or [])
    if len(profiles) != tracked:
        raise UserError(f"{what} is refused: it holds {len(profiles)} power-function EMA profile(s), but the run "
                        f"tracks {tracked} (--ema-profiles).")
    for i, profile in enumerate(profiles):
        check_weights(net, profile, f"{what} (ema_profiles[{i}])")
    _check_rng(data.get("rng"), world_size, device, what)


def _check_optimizer(state, net: torch.nn.Module, optimizer_kwargs: dict, max_steps: int, what: str):
    """Adam's state dict as the training loop saves it: one parameter group over the network's parameters with the
    run's hyperparameters (load_state_dict would otherwise take betas, eps, weight decay or `maximize` from the file),
    and per parameter a step count in [0, optimizer steps so far] and finite moments of the parameter's shape."""
    params = list(net.parameters())  # the loop trains all of them (requires_grad_(True))
    kwargs = {k: v for k, v in optimizer_kwargs.items() if k != "class_name"}
    reference = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], **kwargs).state_dict()["param_groups"][0]
    groups = state.get("param_groups") if isinstance(state, dict) else None
    if not (isinstance(groups, list) and len(groups) == 1 and isinstance(groups[0], dict)
            and groups[0].get("params") == list(range(len(params))) and isinstance(state.get("state"), dict)):
        raise UserError(f"{what} is refused: its optimizer state is not Adam's state of one parameter group over the "
                        f"network's {len(params)} parameters.")
    group = groups[0]
    lr = group.get("lr")
    # Keys a state of another torch version lacks are filled in by Adam itself; unknown or different ones are refused.
    wrong = sorted(str(k) for k in group if k not in ("params", "lr")
                   and (k not in reference or _json(group[k]) != _json(reference[k])))
    if wrong or isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 <= lr < math.inf:
        name = wrong[0] if wrong else "lr"
        raise UserError(f"{what} is refused: its optimizer's {name} is {group.get(name)!r:.40}, but the run uses "
                        f"{reference.get(name, 'a finite learning rate >= 0')!r:.40}.")
    for index, moments in state["state"].items():
        if not (isinstance(index, int) and 0 <= index < len(params) and isinstance(moments, dict)
                and set(moments) == {"step", "exp_avg", "exp_avg_sq"}
                and all(isinstance(v, torch.Tensor) for v in moments.values())):
            raise UserError(f"{what} is refused: its optimizer state {index!r:.20} is not Adam's step, exp_avg and "
                            "exp_avg_sq of a network parameter.")
        step, shape = moments["step"], tuple(params[index].shape)
        if step.numel() != 1 or not torch.isfinite(step).all() or not (0 <= step.item() <= max_steps) \
                or step.item() != int(step.item()):
            raise UserError(f"{what} is refused: its optimizer step count of parameter {index} is "
                            f"{step.flatten()[:1].tolist()}, expected a whole number in [0, {max_steps}] (the "
                            "optimizer steps so far).")
        for key in ("exp_avg", "exp_avg_sq"):
            v = moments[key]
            if tuple(v.shape) != shape or not v.is_floating_point() or not torch.isfinite(v).all() \
                    or (key == "exp_avg_sq" and (v < 0).any()):
                raise UserError(f"{what} is refused: its optimizer {key} of parameter {index} is not a finite"
                                f"{' non-negative' if key == 'exp_avg_sq' else ''} float tensor of shape {shape}.")


def _check_scaler(state, what: str):
    """The fp16 GradScaler's state: empty (disabled) or finite numbers with a positive scale."""
    if not isinstance(state, dict) or any(isinstance(v, bool) or not isinstance(v, (int, float))
                                          or not math.isfinite(v) for v in state.values()) \
            or not set(state) <= {"scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker"} \
            or state.get("scale", 1) <= 0:
        raise UserError(f"{what} is refused: its gradient scaler state is not finite numbers with a positive scale.")


def _check_rng(states, world_size: int, device, what: str):
    """One RNG entry per saved rank, each {'loss', 'torch'[, 'cuda']} holding a state that a fresh generator of the
    kind it is restored into accepts (uint8 tensors of the right size and a valid Mersenne twister state), tried on
    scratch generators so that no global state changes. Only restored when the rank count is the same."""
    if not isinstance(states, list) or not 1 <= len(states) <= MAX_RANKS:
        raise UserError(f"{what} is refused: its rng must be a list of one RNG state per rank.")
    if len(states) != world_size:
        return  # the loop reseeds the noise draws instead (and says so)
    kinds = {"loss": torch.device(device).type, "torch": "cpu", "cuda": "cuda"}
    for rank, state in enumerate(states):
        if not isinstance(state, dict) or not {"loss", "torch"} <= set(state) <= set(kinds):
            raise UserError(f"{what} is refused: its rng[{rank}] must hold the loss and torch generator states.")
        for name, value in state.items():
            if name == "cuda" and not torch.cuda.is_available():
                continue  # not restored without CUDA
            ok = isinstance(value, torch.Tensor) and value.dtype == torch.uint8 and value.dim() == 1
            if ok:
                try:
                    torch.Generator(kinds[name]).set_state(value)
                except (RuntimeError, TypeError, ValueError):
                    ok = False
            if not ok:
                raise UserError(f"{what} is refused: its rng[{rank}].{name} is not a {kinds[name]} generator state "
                                "of this torch (saved on another device, or corrupt).")


def progress_file_name(prefix: str, nimg: int) -> str:
    """`{prefix}-{kimg:06d}.pt` at a whole number of kimg (EDM's names), else `{prefix}-{kimg:06d}.{rest:03d}.pt` with
    the images past the last whole kimg (512 images: `-000000.512.pt`): one name per training position."""
    kimg, rest = divmod(int(nimg), 1000)
    return f"{prefix}-{kimg:06d}.pt" if rest == 0 else f"{prefix}-{kimg:06d}.{rest:03d}.pt"


def progress_of(path: str, prefix: str) -> int | None:
    """The training images of a `progress_file_name` path of `prefix` (either form), or None for another name."""
    m = re.fullmatch(rf"{re.escape(prefix)}-(\d+)(?:\.(\d{{3}}))?\.pt", os.path.basename(path))
    return int(m.group(1)) * 1000 + int(m.group(2) or 0) if m else None


def latest_file(run_dir: str, prefix: str) -> str | None:
    """The `progress_file_name` file of `prefix` furthest into training in run_dir (by images, not by name), or None."""
    best, best_nimg = None, -1
    for p in glob.glob(os.path.join(run_dir, f"{prefix}-*.pt")):
        nimg = progress_of(p, prefix)
        if nimg is not None and nimg > best_nimg:
            best, best_nimg = p, nimg
    return best
