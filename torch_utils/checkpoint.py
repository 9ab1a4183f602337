"""Checkpoint files: state dicts plus a JSON config, written atomically, read with `torch.load(weights_only=True)`.

Two kinds, as in EDM's run directories:
- network snapshot `network-snapshot-{kimg:06d}.pt`: {'format', 'config' (JSON text), 'ema' (state dict)}. The
  config holds the network class and kwargs, the data shape, the loss and the measurement process, so generate.py and
  reconstruct.py rebuild everything from the file alone.
- training state `training-state-{kimg:06d}.pt`: {'format', 'config', 'net', 'ema', 'optimizer', 'progress',
  'rng' (one entry per rank)}: everything needed to continue exactly.
No pickled code: loading needs only this source tree's classes named in the config, and never unpickles objects.
"""

import glob
import json
import os
import re

import torch

from dnnlib import UserError, construct_class_by_name

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
        raise UserError(f"{path} is not a {what.lower()} of this project (format {found!r}, expected "
                        f"{expected_format!r}).")
    data["config"] = json.loads(data["config"])
    return data


def save_snapshot(path: str, config: dict, ema: torch.nn.Module):
    state = {k: v.detach().cpu() for k, v in ema.state_dict().items()}
    atomic_save({"format": SNAPSHOT_FORMAT, "config": json.dumps(config), "ema": state}, path)


def build_network(network_config: dict) -> torch.nn.Module:
    """{'class_name': ..., 'kwargs': {...}} -> a fresh network (only classes under training.* are accepted)."""
    name = network_config["class_name"]
    if not name.startswith("training."):
        raise UserError(f"Network class {name!r} in the snapshot config is not a class of this project.")
    return construct_class_by_name(class_name=name, **network_config["kwargs"])


def resolve_snapshot_path(path: str) -> str:
    """A snapshot file, or a run directory (-> its latest network snapshot)."""
    if os.path.isdir(path):
        found = latest_file(path, "network-snapshot")
        if found is None:
            raise UserError(f"Run directory {path} holds no network-snapshot-*.pt file.")
        return found
    return path


def load_snapshot(path: str, device="cpu") -> tuple[torch.nn.Module, dict]:
    """Rebuild the EMA network of a snapshot (or the latest one in a run directory) -> (net in eval mode, config)."""
    path = resolve_snapshot_path(path)
    data = _load(path, SNAPSHOT_FORMAT, "Network snapshot")
    net = build_network(data["config"]["network"])
    net.load_state_dict(data["ema"])
    return net.eval().requires_grad_(False).to(device), data["config"]


def save_training_state(path: str, config: dict, state: dict):
    atomic_save({"format": STATE_FORMAT, "config": json.dumps(config), **state}, path)


def load_training_state(path: str) -> dict:
    return _load(path, STATE_FORMAT, "Training state")


def latest_file(run_dir: str, prefix: str) -> str | None:
    """The `{prefix}-{kimg:06d}.pt` with the largest kimg in run_dir, or None."""
    best, best_kimg = None, -1
    for p in glob.glob(os.path.join(run_dir, f"{prefix}-*.pt")):
        m = re.fullmatch(rf"{re.escape(prefix)}-(\d+)\.pt", os.path.basename(p))
        if m and int(m.group(1)) > best_kimg:
            best, best_kimg = p, int(m.group(1))
    return best
