"""Checkpoint files: state dicts plus a JSON config, written atomically, read with `torch.load(weights_only=True)`.

Two kinds, as in EDM's run directories:
- network snapshot `network-snapshot-{kimg:06d}.pt`: {'format', 'config' (JSON text), 'ema' (state dict)}. The
  config holds the network class and kwargs, the data shape, the loss and the measurement process, so generate.py and
  reconstruct.py rebuild everything from the file alone.
- training state `training-state-{kimg:06d}.pt`: {'format', 'config', 'net', 'ema', 'optimizer', 'progress',
  'rng' (one entry per rank)}: everything needed to continue exactly.
No pickled code, and no code chosen by the file: the config is JSON, validated field by field before anything is
built from it (`check_snapshot_config`): the network must be a class of the registry in training/networks.py with
arguments of the types and ranges its table allows, the measurement process and mask law must be ones the code knows,
and a data path is only ever read (a relative one is resolved against the snapshot's run directory). Anything else
is refused with one sentence naming the file and the field, before anything is written.

A new top-level config section (e.g. for a new kind of model) needs an entry in `SNAPSHOT_SECTIONS`; a new network
class needs `register_network` (training/networks.py) and an import of its module here.
"""

import glob
import json
import os
import re

import torch

from dnnlib import ConfigError, Field, UserError, check_fields
from training import classifier, networks, patches  # noqa: F401 (classifier: registers NoiseAwareClassifier)
from training.loss import with_recorded_vp_grid
from training.masks import mask_law_from_config
from training.measurements import SKIP_SPACES, MeasurementConfig
from training.networks import VP_GRID_RULES

SNAPSHOT_FORMAT = "msm-network-snapshot-v1"
STATE_FORMAT = "msm-training-state-v1"


def atomic_save(obj, path: str):
    """torch.save to a temporary file in the same folder, fsync, then rename: a crash never leaves a torn file."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def remove_stale_temp_files(folder: str) -> list[str]:
    """Delete the `*.pt.tmp-PID` files a killed `atomic_save` left in folder (call it where no other process writes
    there, as rank 0 does at the start of a run) -> their names."""
    stale = sorted(glob.glob(os.path.join(glob.escape(folder), "*.pt.tmp-*")))
    for p in stale:
        os.remove(p)
    return [os.path.basename(p) for p in stale]


def _load(path: str, expected_format: str, what: str) -> dict:
    if not os.path.isfile(path):
        raise UserError(f"{what} {path} does not exist.")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for foreign or corrupt files
        raise UserError(
            f"{path} is not a {what.lower()} of this project (it could not be read as a weights-only checkpoint: "
            f"{type(e).__name__})."
        ) from e
    if not isinstance(data, dict) or data.get("format") != expected_format:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise UserError(f"{path} is not a {what.lower()} of this project (format {found!r:.80}, expected "
                        f"{expected_format!r}).")
    try:
        data["config"] = json.loads(data.get("config"))
    except (TypeError, ValueError, RecursionError) as e:
        raise UserError(f"{what} {path} is refused: its config is not JSON text ({type(e).__name__}).") from e
    try:
        check_snapshot_config(data["config"])
    except ConfigError as e:
        raise UserError(f"{what} {path} is refused: its config {e}.") from e
    except UserError as e:  # a value of the right type out of its range, in the words of the class that checks it
        raise UserError(f"{what} {path} is refused: its config is not valid ({str(e).rstrip('.')}).") from e
    if "loss" in data["config"]:  # a vp200 run from before the grid rule was recorded trained on the section rule
        data["config"]["loss"] = with_recorded_vp_grid(data["config"]["loss"])
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
SNAPSHOT_SECTIONS = {"network": Field("json", required=True), "dataset": Field("json", required=True),
                     "loss": Field("json"), "measurement": Field("json", optional=True), "training": Field("json"),
                     "patches": Field("json"),  # patch priors: canvas geometry and patch law (training/patches.py)
                     "source": Field("json")}  # converted snapshots: where the weights came from (never interpreted)


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
    """Refuse (UserError) a state dict that does not fit `net` exactly (names and shapes), naming `what`."""
    expected = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{what} does not hold a state dict of tensors.")
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in expected if k in state and tuple(state[k].shape) != expected[k])
    if missing or unexpected or wrong:
        problem = (f"has no weight {missing[0]}" if missing else f"has an unexpected weight {unexpected[0]!r:.80}"
                   if unexpected else f"has {wrong[0]} of shape {tuple(state[wrong[0]].shape)}, expected "
                   f"{expected[wrong[0]]}")
        raise UserError(f"{what} does not fit the network of its config: it {problem}.")


def save_snapshot(path: str, config: dict, ema: torch.nn.Module):
    state = {k: v.detach().cpu() for k, v in ema.state_dict().items()}
    atomic_save({"format": SNAPSHOT_FORMAT, "config": json.dumps(config), "ema": state}, path)


def build_network(network_config: dict) -> torch.nn.Module:
    """{'class_name': ..., 'kwargs': {...}} -> a fresh network; only registered classes with allowed arguments
    (training/networks.py, `build_network`)."""
    return networks.build_network(network_config)


def _build_for(network_config: dict, what: str) -> torch.nn.Module:
    """build_network for a file's config: settings that pass the per-field checks but do not fit together are
    refused naming the file."""
    try:
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
    data_path = config["dataset"].get("path")
    if data_path is not None and not os.path.isabs(data_path):
        config["dataset"]["path"] = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(path)), data_path))
    return net.eval().requires_grad_(False).to(device), config


def check_transfer(path: str, network_config: dict):
    """--transfer: refuse, before anything is written, a file that is not a snapshot whose weights fit the network
    about to be trained."""
    data = _load(resolve_snapshot_path(path), SNAPSHOT_FORMAT, "--transfer snapshot")
    _build_for(data["config"]["network"], f"--transfer {path}")  # its own config must describe a network too
    check_weights(build_network(network_config), data.get("ema"), f"--transfer {path}")


def save_training_state(path: str, config: dict, state: dict):
    atomic_save({"format": STATE_FORMAT, "config": json.dumps(config), **state}, path)


def load_training_state(path: str) -> dict:
    return _load(path, STATE_FORMAT, "Training state")


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
