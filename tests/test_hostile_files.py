"""Hostile files (issue 29, sections 2 and 3): no file runs code, and sizes are checked before anything is allocated.

Every input is crafted here and small on disk: storages of gigabytes of zeros are zip-deflated members written from a
repeated compressed block (`add_zero_member`), so a 2 GiB tensor costs a few MB and milliseconds. Each case of the
table runs a CLI in this process (tests.helpers.run_in_process) and must exit 1 with one sentence naming the file or
option, no traceback, nothing written anywhere under the test's folders, and no canary file: the TorchScript
detectors and pickles here try to create one. Refusing a gigabyte file in one sentence is itself the proof that
nothing was allocated for it (reading it would take seconds and gigabytes); `test_refusal_happens_before_allocation`
also measures the peak memory of two CLIs in subprocesses.
"""

import collections
import io
import json
import os
import pickle
import re
import struct
import subprocess
import sys
import zipfile
import zlib

import numpy as np
import PIL.Image
import pytest
import torch

import dataset_tool
import fid
import generate
import reconstruct
import train
from dnnlib import file_sha256
from tests.helpers import REPO, assert_refused_leaving_nothing, write_mri_records
from tests.test_fid import make_canary_detector
from tests.test_security import image_config, small_network
from training import snapshot as checkpoint
from training.mri import MRIDataset
from training.networks import build_network

GIB = 2**30

# ----------------------------------------------------------------------------------------------------------------------
# Crafting torch archives by hand: torch.save's layout (data.pkl with storages by key, data/<key>), with storages
# that may be gigabytes of deflated zeros, lie about their size, or be pickles of code.


class ZeroTensor:
    """Stands for a float32 tensor of zeros in a crafted archive: `numel` elements in its storage (default: those of
    `shape`), of which `stored` bytes are really in the archive (default: all, deflated)."""

    def __init__(self, shape, numel=None, stored=None):
        self.shape = tuple(shape)
        self.numel = int(np.prod(self.shape)) if numel is None else numel
        self.stored = self.numel * 4 if stored is None else stored

    def __reduce__(self):
        strides = tuple(int(np.prod(self.shape[i + 1:])) for i in range(len(self.shape)))
        return torch._utils._rebuild_tensor_v2, (_ZeroStorage(self), 0, self.shape, strides, False,
                                                 collections.OrderedDict())


class _ZeroStorage:
    def __init__(self, tensor: ZeroTensor):
        self.tensor = tensor


class _ArchivePickler(pickle.Pickler):
    """torch.save's pickling of storages (by key, bytes in data/<key>), plus ZeroTensor storages."""

    def __init__(self, file, members: dict):
        super().__init__(file, protocol=2)
        self.members = members  # key -> bytes, or int: that many zero bytes

    def persistent_id(self, obj):
        if isinstance(obj, _ZeroStorage):
            key = str(len(self.members))
            self.members[key] = obj.tensor.stored
            return "storage", torch.FloatStorage, key, "cpu", obj.tensor.numel
        if isinstance(obj, torch.storage.TypedStorage):
            key = str(len(self.members))
            raw = torch.empty(0, dtype=torch.uint8).set_(obj._untyped_storage).numpy().tobytes()
            self.members[key] = raw
            return "storage", getattr(torch, obj._pickle_storage_type()), key, "cpu", obj._size()
        return None


def add_zero_member(zf: zipfile.ZipFile, name: str, size: int):
    """A deflated member of `size` zero bytes, written in milliseconds: after a full flush, deflate's output for the
    same input repeats, so one compressed 16 MiB block is repeated (zipfile still writes the true CRC and sizes)."""
    block = 1 << 24
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    unit = compressor.compress(bytes(block)) + compressor.flush(zlib.Z_FULL_FLUSH)

    class Repeat:  # zipfile's compressor interface, fed `block` zero bytes at a time
        def compress(self, data):
            if len(data) == block:
                return unit
            tail = zlib.compressobj(9, zlib.DEFLATED, -15)
            return tail.compress(data) + tail.flush(zlib.Z_FULL_FLUSH)

        def flush(self):
            return zlib.compressobj(9, zlib.DEFLATED, -15).flush()

    info = zipfile.ZipInfo(name)
    info.compress_type = zipfile.ZIP_DEFLATED
    original = zipfile._get_compressor
    zipfile._get_compressor = lambda *args: Repeat()
    try:
        with zf.open(info, "w", force_zip64=True) as f:
            chunk = bytes(block)
            for start in range(0, size, block):
                f.write(chunk if size - start >= block else bytes(size - start))
    finally:
        zipfile._get_compressor = original


def write_archive(path, obj, extra_members=()) -> str:
    """A torch zip archive of `obj` (tensors, ZeroTensor, anything picklable) under the folder 'archive/'."""
    members, data = {}, io.BytesIO()
    _ArchivePickler(data, members).dump(obj)
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", data.getvalue())
        zf.writestr("archive/byteorder", "little")
        zf.writestr("archive/version", "3\n")
        for key, content in members.items():
            if isinstance(content, int):
                add_zero_member(zf, f"archive/data/{key}", content)
            else:
                zf.writestr(f"archive/data/{key}", content)
        for name in extra_members:
            zf.writestr(name, b"")
    return str(path)


class _Touch:
    """Pickles as a call of os.system that would create `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


# ----------------------------------------------------------------------------------------------------------------------
# Crafting images: PNG chunks by hand.


def _chunk(kind: bytes, data: bytes, crc=None) -> bytes:
    crc = zlib.crc32(kind + data) if crc is None else crc
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def png_header_only(width: int, height: int, bad_crc: bool = False) -> bytes:
    """A grayscale PNG that declares width x height pixels (PIL decides from this header alone) with one empty row."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr, crc=0 if bad_crc else None)
            + _chunk(b"IDAT", zlib.compress(b"\x00")) + _chunk(b"IEND", b""))


def write_image_folder(folder, extra: dict | None = None) -> str:
    """Two good 8x8 PNGs plus `extra` {name: bytes}."""
    os.makedirs(folder)
    for i in range(2):
        PIL.Image.fromarray(np.full((8, 8), 60 * i, dtype=np.uint8)).save(os.path.join(folder, f"{i}.png"))
    for name, data in (extra or {}).items():
        with open(os.path.join(folder, name), "wb") as f:
            f.write(data)
    return str(folder)


def truncated_png() -> bytes:
    noise = np.random.default_rng(0).integers(0, 256, (8, 8), dtype=np.uint8)  # incompressible pixels
    buf = io.BytesIO()
    PIL.Image.fromarray(noise).save(buf, format="png")
    return buf.getvalue()[:60]  # header intact, pixel data cut


def _npy_header(shape, dtype) -> bytes:
    f = io.BytesIO()
    np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                             "fortran_order": False, "shape": shape})
    return f.getvalue()


# ----------------------------------------------------------------------------------------------------------------------
# Inputs


def _snapshot(path, config, ema, **extra) -> str:
    return write_archive(path, {"format": checkpoint.SNAPSHOT_FORMAT, "config": json.dumps(config), "ema": ema,
                                **extra})


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    canary = root / "canary"
    weights = build_network(small_network()).state_dict()
    config = image_config()
    first = next(iter(weights))
    out = {"root": root, "canary": str(canary), "images": write_image_folder(root / "images")}

    # Snapshots (generate.py --network, reconstruct.py --network, train.py --transfer).
    out["snap-extra-2gib"] = _snapshot(root / "s1" / "snap.pt", config, weights, extra=ZeroTensor((GIB // 2,)))
    out["snap-weight-2gib"] = _snapshot(root / "s2" / "snap.pt", config, {**weights, first: ZeroTensor((GIB // 2,))})
    out["snap-size-lie"] = _snapshot(root / "s3" / "snap.pt", config,
                                     {**weights, first: ZeroTensor(weights[first].shape, stored=16)})
    out["snap-beyond-storage"] = _snapshot(root / "s4" / "snap.pt", config,
                                           {**weights, first: ZeroTensor((10**6,), numel=4)})
    looped = dict(weights)
    looped["self"] = looped
    out["snap-loop"] = _snapshot(root / "s7" / "snap.pt", config, looped)
    out["snap-os-system"] = _snapshot(root / "s5" / "snap.pt", config, weights, extra=_Touch(canary))
    out["snap-member-outside"] = write_archive(root / "s6" / "snap.pt", {"format": checkpoint.SNAPSHOT_FORMAT},
                                               extra_members=["elsewhere/payload"])
    with zipfile.ZipFile(root / "big-pkl.pt", "w") as zf:
        add_zero_member(zf, "archive/data.pkl", 80 * 2**20)
    out["snap-big-pickle"] = str(root / "big-pkl.pt")
    (root / "legacy.pt").write_bytes(pickle.dumps({"format": checkpoint.SNAPSHOT_FORMAT, "x": _Touch(canary)}))
    out["snap-legacy-pickle"] = str(root / "legacy.pt")
    out["snap-torchscript"] = str(make_canary_detector(root / "ts-snapshot.pt", canary))
    sizes = {"4p7gb": dict(model_channels=512, channel_mult=[2, 2], num_blocks=6),
             "6p8tib": dict(model_channels=1024, channel_mult=[16] * 8, num_blocks=16, img_resolution=128)}
    for name, kwargs in sizes.items():
        cfg = image_config()
        cfg["network"]["kwargs"].update(kwargs)
        resolution = cfg["network"]["kwargs"]["img_resolution"]
        cfg["dataset"]["image_shape"] = [1, resolution, resolution]
        out[f"snap-{name}"] = _snapshot(root / f"s-{name}" / "snap.pt", cfg, weights)
    cfg = image_config()
    cfg["network"]["kwargs"].update(img_resolution=4096, attn_resolutions=[4096])
    cfg["dataset"]["image_shape"] = [1, 4096, 4096]
    out["snap-attention-4096"] = _snapshot(root / "s-attn" / "snap.pt", cfg, build_network(cfg["network"]).state_dict())

    # Detectors (fid.py --detector with --detector-sha256 of the file itself: the hash does not make a file safe).
    out["det-canary"] = str(make_canary_detector(root / "canary-detector.pt", canary))
    torch.save({"fc.weight": _Touch(canary)}, root / "det-code.pth")
    out["det-code"] = str(root / "det-code.pth")
    out["det-2gib"] = write_archive(root / "det-2gib.pth", {"fc.weight": ZeroTensor((GIB // 2,))})
    loop = {"fc.weight": torch.zeros(2)}
    loop["Mixed_5b"] = loop  # a container holding itself, as pickle's memo allows
    out["det-loop"] = write_archive(root / "det-loop.pt", loop, extra_members=["archive/constants.pkl"])
    for name in ("det-canary", "det-code", "det-2gib", "det-loop"):
        out[f"{name}-sha"] = file_sha256(out[name])

    # Datasets.
    with zipfile.ZipFile(root / "labels-1gib.zip", "w") as zf:
        for i in range(2):
            buf = io.BytesIO()
            PIL.Image.fromarray(np.full((8, 8), 60 * i, dtype=np.uint8)).save(buf, format="png")
            zf.writestr(f"{i}.png", buf.getvalue())
        add_zero_member(zf, "dataset.json", GIB)
    out["labels-1gib"] = str(root / "labels-1gib.zip")
    out["bomb"] = write_image_folder(root / "bomb", {"bomb.png": png_header_only(20000, 20000)})
    with zipfile.ZipFile(root / "bomb.zip", "w") as zf:
        zf.writestr("bomb.png", png_header_only(20000, 20000))
    out["bomb-zip"] = str(root / "bomb.zip")
    out["truncated"] = write_image_folder(root / "truncated", {"cut.png": truncated_png()})
    out["bad-crc"] = write_image_folder(root / "bad-crc", {"crc.png": png_header_only(8, 8, bad_crc=True)})

    # MRI records whose headers (and dataset.json) declare 100000 x 100000 slices in a few bytes.
    good = {"kspace": np.ones((2, 8, 8), np.complex64), "maps": np.ones((2, 8, 8), np.complex64)}
    records = write_mri_records(str(root / "mri-huge"), [good])
    with open(os.path.join(records, "dataset.json")) as f:
        meta = json.load(f)
    meta["shape"] = [100_000, 100_000]
    with open(os.path.join(records, "dataset.json"), "w") as f:
        json.dump(meta, f)
    with zipfile.ZipFile(os.path.join(records, "slices", "000000.npz"), "w") as zf:
        for key in ("kspace", "maps"):
            zf.writestr(f"{key}.npy", _npy_header((2, 100_000, 100_000), np.complex64) + bytes(64))
    out["mri-huge"] = records
    out["mri-good"] = write_mri_records(str(root / "mri-good"), [good])
    return out


TRAIN = ["--cbase", "4", "--cres", "1", "--blocks", "1", "--attn", "", "--duration", "0.0001", "--batch", "2",
         "--workers", "0", "--device", "cpu"]
GENERATE = ["--outdir", "OUT", "--seeds", "0", "--steps", "2", "--device", "cpu", "--network"]
RECONSTRUCT = ["--outdir", "OUT", "--data", "{images}", "--task", "box", "--methods", "zero-filled", "--device", "cpu",
               "--network"]
FID_REF = ["ref", "--data", "{images}", "--dest", "OUT/ref.npz", "--device", "cpu", "--workers", "0"]
FID_CALC = ["calc", "--images", "{images}", "--ref", "{images}", "--num", "2", "--out", "OUT/fid.json", "--device",
            "cpu", "--workers", "0"]
NOT_FIT = "does not fit the network of its config"

# (id, command, arguments (OUT: the output folder, {name}: an input of `fx`), words the sentence must hold)
CASES = [
    # Section 3: snapshots checked from their zip index before torch.load and before any network is built.
    ("generate-extra-entry-2gib", generate.main, [*GENERATE, "{snap-extra-2gib}"],
     ["{snap-extra-2gib}", "unexpected entry 'extra'"]),
    ("reconstruct-extra-entry-2gib", reconstruct.main, [*RECONSTRUCT, "{snap-extra-2gib}"],
     ["{snap-extra-2gib}", "unexpected entry 'extra'"]),
    ("train-transfer-extra-entry-2gib", train.main, ["--outdir", "OUT", "--data", "{images}", *TRAIN, "--transfer",
                                                     "{snap-extra-2gib}"], ["{snap-extra-2gib}", "unexpected entry"]),
    ("generate-weight-of-2gib", generate.main, [*GENERATE, "{snap-weight-2gib}"],
     ["{snap-weight-2gib}", NOT_FIT, "(536870912,)"]),
    ("generate-storage-size-lie", generate.main, [*GENERATE, "{snap-size-lie}"],
     ["{snap-size-lie}", "declares a storage", "holds 16 bytes"]),
    ("generate-tensor-beyond-storage", generate.main, [*GENERATE, "{snap-beyond-storage}"],
     ["{snap-beyond-storage}", "beyond its storage of 4 elements"]),
    ("generate-pickled-os-system", generate.main, [*GENERATE, "{snap-os-system}"],
     ["{snap-os-system}", "refers to posix.system, which a weights file never holds"]),
    ("generate-ema-holding-itself", generate.main, [*GENERATE, "{snap-loop}"],
     ["{snap-loop}", "does not hold a state dict of tensors"]),
    ("generate-member-outside-folder", generate.main, [*GENERATE, "{snap-member-outside}"],
     ["{snap-member-outside}", "outside its folder archive/"]),
    ("generate-data-pkl-80mib", generate.main, [*GENERATE, "{snap-big-pickle}"],
     ["{snap-big-pickle}", "data.pkl of 83886080 bytes"]),
    ("generate-legacy-pickle", generate.main, [*GENERATE, "{snap-legacy-pickle}"],
     ["{snap-legacy-pickle}", "could not be read as a zip archive"]),
    ("generate-torchscript-snapshot", generate.main, [*GENERATE, "{snap-torchscript}"],
     ["{snap-torchscript}", "is a TorchScript module (it holds code)"]),
    ("generate-config-4.7gb", generate.main, [*GENERATE, "{snap-4p7gb}"], ["{snap-4p7gb}", NOT_FIT]),
    ("generate-config-6.8tib", generate.main, [*GENERATE, "{snap-6p8tib}"], ["{snap-6p8tib}", NOT_FIT]),
    ("reconstruct-config-6.8tib", reconstruct.main, [*RECONSTRUCT, "{snap-6p8tib}"], ["{snap-6p8tib}", NOT_FIT]),
    ("train-transfer-config-6.8tib", train.main, ["--outdir", "OUT", "--data", "{images}", *TRAIN, "--transfer",
                                                  "{snap-6p8tib}"], ["{snap-6p8tib}", NOT_FIT]),
    ("generate-attention-at-4096", generate.main, [*GENERATE, "{snap-attention-4096}"],
     ["{snap-attention-4096}", "tensor of 1.049e+06 GiB", "MSM_MAX_TENSOR_GIB"]),
    ("reconstruct-attention-at-4096", reconstruct.main, [*RECONSTRUCT, "{snap-attention-4096}"],
     ["{snap-attention-4096}", "one call of its network on one image"]),
    # Section 2: detectors give weights only; their code never runs, whatever hash the user passes.
    ("fid-ref-canary-torchscript", fid.cli, [*FID_REF, "--detector", "{det-canary}", "--detector-sha256",
                                             "{det-canary-sha}"], ["{det-canary}", "not the FID Inception-v3 layout"]),
    ("fid-calc-canary-torchscript", fid.cli, [*FID_CALC, "--detector", "{det-canary}", "--detector-sha256",
                                              "{det-canary-sha}"], ["{det-canary}", "its code is never run"]),
    ("fid-ref-pickled-code", fid.cli, [*FID_REF, "--detector", "{det-code}", "--detector-sha256", "{det-code-sha}"],
     ["{det-code}", "which a weights file never holds"]),
    ("fid-calc-pickled-code", fid.cli, [*FID_CALC, "--detector", "{det-code}", "--detector-sha256", "{det-code-sha}"],
     ["{det-code}", "which a weights file never holds"]),
    ("fid-ref-detector-2gib", fid.cli, [*FID_REF, "--detector", "{det-2gib}", "--detector-sha256", "{det-2gib-sha}"],
     ["{det-2gib}", "declares 2147483648 bytes of tensors"]),
    ("fid-ref-torchscript-holding-itself", fid.cli, [*FID_REF, "--detector", "{det-loop}", "--detector-sha256",
                                                     "{det-loop-sha}"], ["{det-loop}", "not the FID Inception-v3"]),
    # Section 3: datasets.
    ("train-cond-dataset-json-1gib", train.main, ["--outdir", "OUT", "--data", "{labels-1gib}", "--cond", *TRAIN],
     ["{labels-1gib}", "dataset.json holds 1073741824 bytes"]),
    ("reconstruct-png-bomb", reconstruct.main, ["--outdir", "OUT", "--data", "{bomb}", "--task", "box", "--methods",
                                                "zero-filled", "--device", "cpu"], ["bomb.png", "decompression bomb"]),
    ("reconstruct-png-bomb-in-zip", reconstruct.main, ["--outdir", "OUT", "--data", "{bomb-zip}", "--task", "box",
                                                       "--methods", "zero-filled", "--device", "cpu"],
     ["{bomb-zip}", "bomb.png", "decompression bomb"]),
    ("fid-ref-png-bomb", fid.cli, ["ref", "--data", "{bomb}", "--dest", "OUT/ref.npz"], ["bomb.png", "bomb"]),
    ("train-png-bomb", train.main, ["--outdir", "OUT", "--data", "{bomb}", *TRAIN], ["bomb.png", "bomb"]),
    ("dataset-tool-convert-png-bomb", dataset_tool.cli, ["convert", "--source", "{bomb}", "--dest", "OUT/d.zip"],
     ["--source", "bomb.png", "decompression bomb"]),
    ("dataset-tool-convert-truncated-png", dataset_tool.cli, ["convert", "--source", "{truncated}", "--dest",
                                                              "OUT/d.zip"], ["--source", "cut.png", "truncated"]),
    ("dataset-tool-convert-broken-png", dataset_tool.cli, ["convert", "--source", "{bad-crc}", "--dest", "OUT/d.zip"],
     ["--source", "crc.png", "not a readable image"]),
    ("reconstruct-truncated-png", reconstruct.main, ["--outdir", "OUT", "--data", "{truncated}", "--task", "box",
                                                     "--methods", "zero-filled", "--device", "cpu"],
     ["cut.png", "not a readable image"]),
    # Section 3: MRI records whose headers declare 100000 x 100000 slices.
    ("reconstruct-mri-100000", reconstruct.main, ["--outdir", "OUT", "--data", "{mri-huge}", "--task", "mri",
                                                  "--methods", "zero-filled", "--device", "cpu"],
     ["000000.npz", "declares kspace (2, 100000, 100000)"]),
    ("train-mri-100000", train.main, ["--outdir", "OUT", "--data", "{mri-huge}", "--loss", "msm", *TRAIN],
     ["000000.npz", "declares kspace (2, 100000, 100000)"]),
]


def _fill(text: str, fx: dict, out: str) -> str:
    return text.replace("OUT", out).format(**fx) if "OUT" in text or "{" in text else text


@pytest.mark.parametrize("name, command, args, words", CASES, ids=[c[0] for c in CASES])
def test_hostile_input_is_refused_in_one_sentence_leaving_nothing(fx, tmp_path, monkeypatch, capsys, name, command,
                                                                   args, words):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("MSM_CACHE_DIR", str(work / "cache"))
    out = str(work / "out")
    args = [_fill(a, fx, out) for a in args]
    words = [w.format(**fx) for w in words]
    assert_refused_leaving_nothing(command, args, words, capsys, [tmp_path, fx["root"]])
    assert not os.path.exists(fx["canary"])


def test_the_limits_hold_and_honest_files_still_load(fx, monkeypatch):
    """The refusals are limits, not blanket bans: the attention snapshot loads under a raised MSM_MAX_TENSOR_GIB
    (its weights are honest), a malformed value of it is named, and MRI records above MAX_RECORD_BYTES are refused
    while the same records load under the default."""
    from dnnlib import UserError

    monkeypatch.setenv(checkpoint.MAX_TENSOR_GIB_VARIABLE, "2e6")
    net, config = checkpoint.load_snapshot(fx["snap-attention-4096"])
    assert config["network"]["kwargs"]["attn_resolutions"] == [4096]
    monkeypatch.setenv(checkpoint.MAX_TENSOR_GIB_VARIABLE, "lots")
    with pytest.raises(UserError, match="MSM_MAX_TENSOR_GIB='lots' is not a number of GiB"):
        checkpoint.load_snapshot(fx["snap-attention-4096"])
    assert len(MRIDataset(fx["mri-good"])) == 1
    monkeypatch.setattr(MRIDataset, "MAX_RECORD_BYTES", 1000)
    with pytest.raises(UserError, match=r"000000\.npz holds 2048 bytes of arrays, more than the 1000"):
        MRIDataset(fx["mri-good"])
    assert not os.path.exists(fx["canary"])


def test_training_states_are_checked_the_same_way(fx, tmp_path):
    """A training state: an unexpected entry, a 2 GiB tensor under an entry it may hold (the optimizer's), and
    weights of another network are each refused before torch.load."""
    from dnnlib import UserError

    weights = build_network(small_network()).state_dict()
    state = {"format": checkpoint.STATE_FORMAT, "config": json.dumps(image_config()), "net": weights, "ema": weights,
             "optimizer": {"state": {}, "param_groups": []}, "progress": {"cur_nimg": 0}, "rng": []}
    cases = [({"extra": torch.zeros(1)}, "unexpected entry 'extra'"),
             ({"optimizer": {"state": {0: {"exp_avg": ZeroTensor((GIB // 2,))}}}}, "bytes of tensors, more than"),
             ({"net": build_network(small_network(in_channels=2)).state_dict()}, "(net) does not fit the network")]
    for i, (change, words) in enumerate(cases):
        path = write_archive(tmp_path / f"training-state-{i}.pt", {**state, **change})
        with pytest.raises(UserError, match=r"Training state .* " + re.escape(words)):
            checkpoint.load_training_state(path)


def test_zero_members_are_what_they_claim(fx, tmp_path):
    """The crafted bombs are real: a member from `add_zero_member` inflates to exactly its declared number of zeros
    with a valid CRC (zipfile checks it at the end of the member), here one of 3 blocks and a tail; the 2 GiB ones
    declare their size in a few MB."""
    size = 3 * (1 << 24) + 12345
    with zipfile.ZipFile(tmp_path / "z.zip", "w") as zf:
        add_zero_member(zf, "zeros", size)
    with zipfile.ZipFile(tmp_path / "z.zip") as zf:
        data = zf.read("zeros")
    assert len(data) == size and not any(data) and os.path.getsize(tmp_path / "z.zip") < size // 500
    with zipfile.ZipFile(fx["det-2gib"]) as zf:
        assert zf.getinfo("archive/data/0").file_size == 2 * GIB and os.path.getsize(fx["det-2gib"]) < 4 * 2**20


# The script's peak resident memory from /proc (VmHWM): getrusage's ru_maxrss would also count the memory of the
# pytest process it was forked from, which Linux carries across fork and exec.
_PEAK_RSS = """
import re, runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    with open("/proc/self/status") as f:
        sys.stderr.write("\\npeak-rss-kib " + re.search(r"VmHWM:\\s*(\\d+) kB", f.read()).group(1) + "\\n")
"""


@pytest.mark.parametrize("script, args, words", [
    ("generate.py", ["--network", "{snap-extra-2gib}", "--outdir", "OUT", "--seeds", "0", "--device", "cpu"],
     "unexpected entry 'extra'"),
    ("train.py", ["--outdir", "OUT", "--data", "{labels-1gib}", "--cond", *TRAIN], "dataset.json holds"),
], ids=["generate-2gib-entry", "train-1gib-dataset-json"])
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the peak memory from Linux's /proc")
def test_refusal_happens_before_allocation(fx, tmp_path, script, args, words):
    """The CLI in its own process: refused, with a peak resident memory far below the file's inflated size (the
    interpreter and torch take a few hundred MB; before the fix generate.py reached 2.3 GB on this snapshot)."""
    args = [_fill(a, fx, str(tmp_path / "out")) for a in args]
    proc = subprocess.run([sys.executable, "-c", _PEAK_RSS, script, *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 1 and words in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    peak_kib = int(proc.stderr.rsplit("peak-rss-kib ", 1)[1])
    assert peak_kib < GIB // 1024, f"peak RSS {peak_kib} KiB"
    assert not (tmp_path / "out").exists()
