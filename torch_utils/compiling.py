"""--compile of train.py, generate.py and reconstruct.py: torch.compile of a network, refused up front where it
cannot work.

torch.compile returns a wrapper (OptimizedModule) whose state_dict keys carry an `_orig_mod.` prefix; every caller
therefore keeps the plain module for saving and loading and hands only the wrapper to the code that calls the
network. Attributes (img_resolution, sigma_min, in_channels, ...) read through the wrapper to the module.
"""

import os
import shutil

import torch

from dnnlib import UserError


def check_compiler(device_type: str, option: str = "--compile"):
    """On a CPU, torch.compile's inductor backend builds C++ kernels, so a C++ compiler must be on PATH (the one in
    $CXX, else g++, clang++ or c++); refuse here rather than fail at the first network call."""
    if device_type == "cuda":
        return
    candidates = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "clang++", "c++"]
    if not any(shutil.which(name) for name in candidates):
        raise UserError(f"{option} on a CPU needs a C++ compiler for torch.compile ({' or '.join(candidates)} on "
                        f"PATH); install one or leave {option} off.")


def compile_network(net: torch.nn.Module, device_type: str) -> torch.nn.Module:
    """torch.compile(net) after check_compiler; the caller keeps `net` for state_dicts."""
    check_compiler(device_type)
    return torch.compile(net)
