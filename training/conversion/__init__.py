"""Converters from published checkpoint formats to this project's network snapshots (convert_checkpoint.py).

Each converter reads a foreign file without executing anything in it and returns what a snapshot holds: a config
(training/snapshot.py `check_snapshot_config`: a registered network class with checked arguments, the data
shape, and where known the measurement process and the loss the network was trained with) and the EMA state dict of
the network that config builds. `write_converted_snapshot` (the one writer for every converter) checks both the way
loading will, writes an ordinary snapshot atomically and reads it back, so generate.py, reconstruct.py and every
sampler take the file unchanged.

- `guided_diffusion`: guided-diffusion UNet state dicts (the MSM reference's six networks among them) onto
  DhariwalUNet with DiscreteVPPrecond.
- `edm`: EDM-format network pickles, read by a restricted unpickler (its `convert_edm(path) -> (config, state)`).
"""

import copy
import os

import torch

from dnnlib import ConfigError, UserError, check_outdir
from training import networks
from training import snapshot as checkpoint


def check_dest(dest: str):
    """Refuse, before anything is read or written, a --dest that exists or whose folder cannot be written."""
    if os.path.exists(dest):
        raise UserError(f"--dest {dest} already exists; remove it or choose another name.")
    check_outdir(os.path.dirname(os.path.abspath(dest)), "--dest folder")


def write_converted_snapshot(dest: str, config: dict, state: dict, source: dict | None = None) -> torch.nn.Module:
    """Write `state` (a state dict for the network of `config`) as the network snapshot `dest` -> the network.

    `source` (JSON: format, file name, sha256, preset, ...) is stored as the snapshot's 'source' section, a record
    never interpreted, merged under any 'source' the converter's config already holds. Refused in one sentence, with
    nothing written: a dest that exists or cannot be written, a config that loading would refuse, a state dict that
    does not fit its network exactly (names and shapes) or holds non-finite values. The file is written under a
    temporary name, renamed, and loaded back with checkpoint.load_snapshot; if that fails it is removed again."""
    check_dest(dest)
    config = copy.deepcopy(config)
    if source is not None:  # a converter's own record (e.g. the hash of a pickle's embedded source) is kept
        config["source"] = {**source, **config.get("source", {})}
    try:
        checkpoint.check_snapshot_config(config)
        net = networks.build_network(config["network"])
    except ConfigError as e:
        raise UserError(f"The converted config is refused: {e}.") from e
    checkpoint.check_weights(net, state, "The converted state dict")
    for name, value in state.items():
        if not torch.is_floating_point(value) or not bool(torch.isfinite(value).all()):
            raise UserError(f"The converted weight {name} holds non-finite or non-float values.")
    net.load_state_dict({k: v.to(torch.float32) for k, v in state.items()})
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    checkpoint.save_snapshot(dest, config, net)
    try:
        checkpoint.load_snapshot(dest)
    except BaseException:
        os.remove(dest)
        raise
    return net.eval().requires_grad_(False)
