"""The feature extractor ("detector") of FID: Inception-v3 as in TensorFlow's 2015-12-05 graph, and safe loading.

Every detector here has one contract: a module mapping uint8 images (N, 3, H, W) in [0, 255] to float features (N, D).
The network is always this project's `InceptionV3FID`; a detector file only supplies its weights, and no file is
ever run: `torch.jit.load` would run a TorchScript file's code (its `forward` can write any file), and a hash the
user computed of a file they were sent does not make that code safe. Two file formats are read, tensors only:
- a plain state dict of the FID Inception-v3 (read with `torch.load(weights_only=True)`), e.g. pytorch-fid's port of
  the TensorFlow graph, `pt_inception-2015-12-05-6726825d.pth` (FID_INCEPTION_URL below), which gives the 2048-d pool
  features FID is defined on;
- a TorchScript archive of a module with the same parameter names (e.g. `torch.jit.script(InceptionV3FID())`): its
  weights are read from the archive by torch_utils.archive without running or even unpickling its code, and any
  other TorchScript module is refused.

Files are verified by their full SHA-256 before use: against `--detector-sha256` when given, and otherwise against
FID_INCEPTION_SHA256, the hash of the standard file, so any other detector needs its hash given explicitly. The
8-digit prefix in the standard file's name (torch.hub's convention) is not enough: a file that matches 32 bits of a
hash can be made on purpose.

How to get the standard weights on a machine without network: download FID_INCEPTION_URL elsewhere and either pass
it with `--detector PATH` or copy it unchanged into the cache directory (`$MSM_CACHE_DIR`, default `~/.cache/msm`).
"""

import os
import re
import zipfile

import torch
import torch.nn.functional as F
from torch import nn

from dnnlib import EasyDict, UserError, file_sha256
from dnnlib.util import default_cache_dir, is_url, open_url
from torch_utils import archive

# The full SHA-256 of that file (95,628,359 bytes), as published by independent users of it (e.g. in torch-fidelity's
# copy, weights-inception-2015-12-05-6726825d.pth, the same bytes); it begins with the 8 digits in the file name.
FID_INCEPTION_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
FID_INCEPTION_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
)
FID_INCEPTION_DIM = 2048
INCEPTION_INPUT_SIZE = 299
# Its 23.9 M weights in float64 at most: a detector archive declaring more tensor data is refused before reading it.
MAX_DETECTOR_BYTES = 24_000_000 * 8


# ----------------------------------------------------------------------------------------------------------------------
# Architecture. Module and parameter names follow the published state dict (torchvision's Inception3 names), so the
# file loads with strict key checking. Where the 2015 TensorFlow graph differs from torchvision's Inception3 (pooling
# in the Mixed blocks), the TensorFlow behaviour is used, because that is what FID is defined with.


class ConvBN(nn.Module):
    """Convolution without bias, batch norm (eps 1e-3, as in the TensorFlow graph), ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=1e-3)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _tf_avg_pool_3x3(x):
    # TensorFlow's SAME-padded average pool divides by the number of real pixels in the window, not by 9.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35x35 block (Mixed_5b/5c/5d): 1x1, 5x5, double 3x3 and pooled 1x1 branches."""

    def __init__(self, in_channels: int, pool_features: int):
        super().__init__()
        self.branch1x1 = ConvBN(in_channels, 64, 1)
        self.branch5x5_1 = ConvBN(in_channels, 48, 1)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(in_channels, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(in_channels, pool_features, 1)

    def forward(self, x):
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch5x5_2(self.branch5x5_1(x)),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                self.branch_pool(_tf_avg_pool_3x3(x)),
            ],
            dim=1,
        )


class InceptionB(nn.Module):
    """Grid reduction 35 -> 17 (Mixed_6a)."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3 = ConvBN(in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(in_channels, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat(
            [
                self.branch3x3(x),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                F.max_pool2d(x, kernel_size=3, stride=2),
            ],
            dim=1,
        )


class InceptionC(nn.Module):
    """17x17 block with factorised 7x7 convolutions (Mixed_6b..6e); `c7` is the width inside the 7x7 branches."""

    def __init__(self, in_channels: int, c7: int):
        super().__init__()
        self.branch1x1 = ConvBN(in_channels, 192, 1)
        self.branch7x7_1 = ConvBN(in_channels, c7, 1)
        self.branch7x7_2 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = ConvBN(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = ConvBN(in_channels, c7, 1)
        self.branch7x7dbl_2 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = ConvBN(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = ConvBN(in_channels, 192, 1)

    def forward(self, x):
        double = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4):
            double = layer(double)
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
                self.branch7x7dbl_5(double),
                self.branch_pool(_tf_avg_pool_3x3(x)),
            ],
            dim=1,
        )


class InceptionD(nn.Module):
    """Grid reduction 17 -> 8 (Mixed_7a)."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3_1 = ConvBN(in_channels, 192, 1)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(in_channels, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x):
        seven = self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x)))
        return torch.cat(
            [
                self.branch3x3_2(self.branch3x3_1(x)),
                self.branch7x7x3_4(seven),
                F.max_pool2d(x, kernel_size=3, stride=2),
            ],
            dim=1,
        )


class InceptionE(nn.Module):
    """8x8 block with split 1x3 / 3x1 outputs (Mixed_7b, Mixed_7c).

    `pool` is 'avg' for Mixed_7b and 'max' for Mixed_7c: the 2015 TensorFlow graph max-pools in its last block (unlike
    the paper and torchvision), and FID is defined by that graph.
    """

    def __init__(self, in_channels: int, pool: str):
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool
        self.branch1x1 = ConvBN(in_channels, 320, 1)
        self.branch3x3_1 = ConvBN(in_channels, 384, 1)
        self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBN(in_channels, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = ConvBN(in_channels, 192, 1)

    def forward(self, x):
        single = self.branch3x3_1(x)
        double = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = _tf_avg_pool_3x3(x) if self.pool == "avg" else F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch3x3_2a(single),
                self.branch3x3_2b(single),
                self.branch3x3dbl_3a(double),
                self.branch3x3dbl_3b(double),
                self.branch_pool(pooled),
            ],
            dim=1,
        )


class InceptionV3FID(nn.Module):
    """Inception-v3 of the 2015-12-05 TensorFlow graph, as a detector: uint8 (N, 3, H, W) -> pool3 features (N, 2048).

    Preprocessing is pytorch-fid's: values scaled from [0, 255] to [-1, 1], then resized to 299x299 with
    `F.interpolate(mode='bilinear', align_corners=False)` and no antialiasing (identity at 299x299). The features are
    the spatial mean of Mixed_7c's output. `fc` (1008 ImageNet-2012 classes of that graph) is part of the published
    state dict and kept so the file loads strictly; FID does not use it.
    """

    feature_dim = FID_INCEPTION_DIM

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, c7=128)
        self.Mixed_6c = InceptionC(768, c7=160)
        self.Mixed_6d = InceptionC(768, c7=160)
        self.Mixed_6e = InceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc = nn.Linear(FID_INCEPTION_DIM, 1008)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        x = images.to(torch.float32) / 127.5 - 1
        x = F.interpolate(x, size=(INCEPTION_INPUT_SIZE, INCEPTION_INPUT_SIZE), mode="bilinear", align_corners=False)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return x.mean(dim=(2, 3))


# ----------------------------------------------------------------------------------------------------------------------
# Loading and verification.


def _check_sha256(path: str, digest: str, sha256: str | None):
    """Refuse a detector file whose full SHA-256 `digest` is not `sha256` (default: the standard file's)."""
    if sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", sha256):
        raise UserError(f"--detector-sha256 {sha256} is not a SHA-256 (expected 64 hexadecimal digits).")
    if sha256 is None and digest != FID_INCEPTION_SHA256:
        raise UserError(f"Detector file {path} has SHA-256 {digest}, not the standard FID Inception file's "
                        f"{FID_INCEPTION_SHA256}; pass --detector-sha256 with its hash to use another detector, or "
                        "delete it and download it again.")
    if sha256 is not None and digest != sha256.lower():
        raise UserError(f"Detector file {path} has SHA-256 {digest}, but --detector-sha256 expects {sha256.lower()}; "
                        "the file is corrupt or not the expected one.")


def _inception_from_state(state: dict, path: str) -> InceptionV3FID:
    """InceptionV3FID with the weights `state` (names and shapes checked; refused naming the file otherwise)."""
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"Detector file {path} does not hold a state dict of tensors.")
    net = InceptionV3FID()
    expected = {k: v.shape for k, v in net.state_dict().items()}
    # BatchNorm's step counter is absent from files saved by old PyTorch versions and plays no part in evaluation.
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [k for k in state if k in expected and state[k].shape != expected[k]]
    if missing or unexpected or wrong_shape:
        problem = (
            f"has no {missing[0]}" if missing
            else f"has an unexpected {unexpected[0]}" if unexpected
            else f"has {wrong_shape[0]} of shape {tuple(state[wrong_shape[0]].shape)}, "
            f"expected {tuple(expected[wrong_shape[0]])}"
        )
        raise UserError(f"Detector file {path} is not a state dict of the FID Inception-v3 layout: it {problem}.")
    net.load_state_dict(state, strict=False)
    return net


def _load_inception_state_dict(path: str) -> InceptionV3FID:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises a variety of types for foreign or corrupt files
        raise UserError(
            f"Detector file {path} is neither TorchScript nor a state dict readable with weights_only=True ({e})."
        ) from e
    return _inception_from_state(state, path)


def _load_torchscript_weights(index: archive.ArchiveIndex, path: str) -> InceptionV3FID:
    """The weights of a TorchScript archive in InceptionV3FID: names and shapes are checked on the archive's index, so
    a module of another layout is refused before any storage is read, and its code is never looked at."""
    entries = archive.tensor_entries(index.root)
    expected = {k: tuple(v.shape) for k, v in InceptionV3FID().state_dict().items()}
    layout_fits = set(entries) <= set(expected) and all(entries[k].shape == expected[k] for k in entries) and all(
        k in entries for k in expected if not k.endswith("num_batches_tracked"))
    if not layout_fits:
        raise UserError(f"Detector file {path} is a TorchScript module whose weights are not the FID Inception-v3 "
                        "layout; only the weights of a TorchScript detector are read (its code is never run), so "
                        "only that layout can be used.")
    return _inception_from_state(archive.load_tensors(index, entries), path)


def load_detector(detector: str = FID_INCEPTION_URL, sha256: str | None = None, device="cpu"):
    """Fetch (URL, cached) or open a detector file, verify its full SHA-256 (`sha256`, default the standard file's),
    and load its weights into InceptionV3FID without running or unpickling any code from it.

    Returns (module, info): `module` maps uint8 (N, 3, H, W) to features (N, D), in eval mode, on `device`, without
    gradients; `info` is an EasyDict {detector, detector_path, detector_sha256, detector_format} for result records.
    """
    try:
        path = open_url(detector)
    except OSError as e:
        if is_url(detector):
            cached = os.path.join(default_cache_dir(), os.path.basename(detector))
            raise UserError(
                f"Could not download the detector {detector} ({e}); download it on a machine with network and pass "
                f"it with --detector PATH, or copy it to {cached}."
            ) from e
        raise UserError(f"--detector {detector} is neither a readable file nor an http(s) URL.") from e

    digest = file_sha256(path)
    _check_sha256(path, digest, sha256)

    index = archive.read_index(path, f"Detector file {path}", torchscript=True) if zipfile.is_zipfile(path) else None
    if index is not None and index.total_bytes > MAX_DETECTOR_BYTES:
        raise UserError(f"Detector file {path} declares {index.total_bytes} bytes of tensors, more than the FID "
                        f"Inception-v3 needs ({MAX_DETECTOR_BYTES} at most), so it is not read.")
    if index is not None and index.is_torchscript:
        net = _load_torchscript_weights(index, path)
        fmt = "torchscript"
    else:
        net = _load_inception_state_dict(path)
        fmt = "state_dict"
    net = net.eval().to(device)
    for param in net.parameters():
        param.requires_grad_(False)
    info = EasyDict(detector=detector, detector_path=os.path.abspath(path), detector_sha256=digest,
                    detector_format=fmt)
    return net, info
