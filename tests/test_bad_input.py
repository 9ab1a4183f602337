"""Bad input to the five CLIs (issue 16 item 9): every case exits with status 1 and one sentence, no traceback, and
leaves nothing behind: neither in the output folder nor anywhere else under the test's folders.

Each case runs in this process through the scripts' own entry point (dnnlib.util.run_cli), which keeps the table
fast; the refusal path is the same as on the command line.
"""

import json
import os

import numpy as np
import PIL.Image
import pytest
import torch

import dataset_tool
import fid
import generate
import reconstruct
import train
from tests.helpers import assert_refused_leaving_nothing, write_mri_records
from training import snapshot as checkpoint
from training.networks import network_kwargs_for

RES = 16
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


def _save_snapshot(path, cbase: int) -> str:
    cfg = network_kwargs_for(arch="ddpmpp", precond="edm", img_resolution=RES, in_channels=1, out_channels=1,
                             label_dim=0, cbase=cbase, cres=[1, 2], num_blocks=1, attn_resolutions=[], dropout=0.0)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    checkpoint.save_snapshot(str(path), {"network": cfg, "dataset": {"kind": "image", "image_shape": [1, RES, RES]}},
                             checkpoint.build_network(cfg))
    return str(path)


def _mri_arrays(num_coils=2, res=RES, dtype=np.complex64):
    rng = np.random.default_rng(0)
    shape = (num_coils, res, res)
    return {"kspace": (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(dtype),
            "maps": np.full(shape, 1 / np.sqrt(num_coils), dtype)}


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    """Inputs shared by the cases: an image folder, snapshots, a text file, and MRI records broken in each way."""
    root = tmp_path_factory.mktemp("inputs")
    images = root / "images"
    images.mkdir()
    for i in range(4):
        PIL.Image.fromarray(np.full((RES, RES), 50 * i, dtype=np.uint8)).save(images / f"{i:06d}.png")
    (root / "notes.txt").write_text("not a snapshot\n")
    (root / "a-file").write_text("a file where a folder belongs\n")
    crafted = _save_snapshot(root / "crafted" / "network-snapshot-000000.pt", cbase=4)
    data = torch.load(crafted, weights_only=True)
    config = json.loads(data["config"])
    config["network"]["kwargs"]["num_blocks"] = "1"  # a string where an integer belongs
    torch.save({**data, "config": json.dumps(config)}, crafted)
    good = _mri_arrays()
    nan = {**good, "kspace": good["kspace"].copy()}
    nan["kspace"][0, 3, 5] = np.nan
    write_mri_records(str(root / "mri-nan"), [good, nan])
    write_mri_records(str(root / "mri-shape"), [good, _mri_arrays(res=RES // 2)])
    write_mri_records(str(root / "mri-object"), [good, {**good, "maps": np.array([None, 1], dtype=object)}])
    write_mri_records(str(root / "mri-missing"), [good, good])
    os.remove(root / "mri-missing" / "slices" / "000001.npz")
    return {"root": root, "images": str(images), "text": str(root / "notes.txt"), "file": str(root / "a-file"),
            "snapshot": _save_snapshot(root / "run" / "network-snapshot-000000.pt", cbase=4),
            "other": _save_snapshot(root / "other" / "network-snapshot-000000.pt", cbase=8),
            "crafted": crafted, **{name: str(root / name) for name in ("mri-nan", "mri-shape", "mri-object",
                                                                      "mri-missing")}}


TRAIN = ["--data", "{images}", "--cbase", "4", "--cres", "1,2", "--blocks", "1", "--attn", "", "--duration", "0.0001",
         "--batch", "2", "--workers", "0", "--device", "cpu"]
TRAIN_MSM = ["--loss", "msm", "--cbase", "4", "--cres", "1,2", "--blocks", "1", "--attn", "", "--duration", "0.0001",
             "--batch", "2", "--workers", "0", "--device", "cpu"]
GENERATE = ["--network", "{snapshot}", "--steps", "2", "--device", "cpu"]
RECONSTRUCT = ["--data", "{images}", "--task", "box", "--methods", "zero-filled", "--device", "cpu"]

# (id, command, arguments (OUT is the output folder, {name} an input of `fx`), words the sentence must hold)
CASES = [
    ("train-cres-text", train.main, ["--outdir", "OUT", *TRAIN, "--cres", "abc"], ["--cres", "abc"]),
    ("train-cres-zero", train.main, ["--outdir", "OUT", *TRAIN, "--cres", "0,1"], ["--cres"]),
    ("train-cres-decreasing", train.main, ["--outdir", "OUT", *TRAIN, "--cres", "2-1"], ["--cres", "2-1"]),
    ("train-attn-text", train.main, ["--outdir", "OUT", *TRAIN, "--attn", "8x"], ["--attn", "8x"]),
    ("train-transfer-text", train.main, ["--outdir", "OUT", *TRAIN, "--transfer", "{text}"], ["{text}"]),
    ("train-transfer-other-network", train.main, ["--outdir", "OUT", *TRAIN, "--transfer", "{other}"],
     ["--transfer", "does not fit"]),
    ("train-outdir-is-file", train.main, ["--outdir", "{file}", *TRAIN], ["--outdir", "not a directory"]),
    ("train-outdir-under-file", train.main, ["--outdir", "{file}/runs", *TRAIN], ["--outdir", "is a file"]),
    pytest.param("train-device-cuda", train.main, ["--outdir", "OUT", *TRAIN, "--device", "cuda"], ["--device cuda"],
                 marks=NO_CUDA),
    ("train-mri-nan", train.main, ["--outdir", "OUT", "--data", "{mri-nan}", *TRAIN_MSM], ["000001.npz", "NaN"]),
    ("train-mri-shape", train.main, ["--outdir", "OUT", "--data", "{mri-shape}", *TRAIN_MSM], ["000001.npz"]),
    ("train-mri-object", train.main, ["--outdir", "OUT", "--data", "{mri-object}", *TRAIN_MSM], ["000001.npz"]),
    ("train-mri-missing", train.main, ["--outdir", "OUT", "--data", "{mri-missing}", *TRAIN_MSM], ["000001.npz"]),
    ("generate-seeds-decreasing", generate.main, ["--outdir", "OUT", *GENERATE, "--seeds", "5-2"], ["--seeds", "5-2"]),
    ("generate-seeds-text", generate.main, ["--outdir", "OUT", *GENERATE, "--seeds", "abc"], ["--seeds", "abc"]),
    ("generate-seeds-negative", generate.main, ["--outdir", "OUT", *GENERATE, "--seeds=-3"], ["--seeds", "-3"]),
    ("generate-outdir-is-file", generate.main, ["--outdir", "{file}", *GENERATE, "--seeds", "0"], ["--outdir"]),
    ("generate-config-wrong-types", generate.main, ["--outdir", "OUT", *GENERATE, "--network", "{crafted}"],
     ["{crafted}", "network.kwargs.num_blocks"]),
    pytest.param("generate-device-cuda", generate.main, ["--outdir", "OUT", *GENERATE, "--device", "cuda"],
                 ["--device cuda"], marks=NO_CUDA),
    ("reconstruct-indices-text", reconstruct.main, ["--outdir", "OUT", *RECONSTRUCT, "--indices", "a-b"],
     ["--indices", "a-b"]),
    ("reconstruct-indices-decreasing", reconstruct.main, ["--outdir", "OUT", *RECONSTRUCT, "--indices", "3-1"],
     ["--indices", "3-1"]),
    ("reconstruct-indices-out-of-range", reconstruct.main, ["--outdir", "OUT", *RECONSTRUCT, "--indices", "99"],
     ["--indices 99"]),
    ("reconstruct-outdir-is-file", reconstruct.main, ["--outdir", "{file}", *RECONSTRUCT], ["--outdir"]),
    ("reconstruct-mri-nan", reconstruct.main, ["--outdir", "OUT", "--data", "{mri-nan}", "--task", "mri", "--methods",
                                               "zero-filled", "--device", "cpu"], ["000001.npz", "NaN"]),
    ("dataset-tool-dest-under-file", dataset_tool.cli, ["phantoms", "--dest", "{file}/x.zip", "--num", "2"],
     ["--dest", "not a directory"]),
    ("dataset-tool-mri-dest-under-file", dataset_tool.cli,
     ["simulate-mri", "--source", "{images}", "--dest", "{file}/mri", "--coils", "2"], ["--dest", "not a directory"]),
    ("fid-ref-without-detector", fid.cli, ["ref", "--data", "{images}", "--dest", "OUT/ref.npz", "--detector",
                                           "http://127.0.0.1:9/pt_inception.pth", "--device", "cpu"], ["--detector"]),
    ("fid-ref-dest-under-file", fid.cli, ["ref", "--data", "{images}", "--dest", "{file}/ref.npz"], ["--dest"]),
]


@pytest.mark.parametrize("name, command, args, words", CASES, ids=[
    c.values[0] if hasattr(c, "values") else c[0] for c in CASES])
def test_bad_input_is_refused_in_one_sentence_leaving_nothing(fx, tmp_path, monkeypatch, capsys, name, command, args,
                                                               words):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("MSM_CACHE_DIR", str(work / "cache"))  # a failed download must not leave the cache folder
    out = str(work / "out")
    args = [a.replace("OUT", out).format(**fx) if "OUT" in a or "{" in a else a for a in args]
    words = [w.format(**fx) for w in words]
    assert_refused_leaving_nothing(command, args, words, capsys, [tmp_path, fx["root"]])


def test_nan_records_of_large_datasets_are_refused_where_they_are_read(fx, monkeypatch):
    """Above MRIDataset.FULL_CHECK_BYTES the values are checked where a record is read: the NaN record opens (its
    headers are fine) but reading it raises the same sentence; the good record still reads."""
    from dnnlib import UserError
    from training.mri import MRIDataset

    monkeypatch.setattr(MRIDataset, "FULL_CHECK_BYTES", 0)
    records = MRIDataset(fx["mri-nan"])
    assert torch.isfinite(records[0]["kspace"]).all()
    with pytest.raises(UserError, match=r"000001\.npz holds NaN or Inf values in kspace"):
        records[1]


class _RefusingDataset(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, idx):
        from dnnlib import UserError

        raise UserError(f"Record {idx} is refused.")


def test_refusal_inside_a_data_loader_worker_is_still_one_sentence():
    """torch re-raises a worker's exception with the worker's traceback as its message; the scripts print only the
    sentence (dnnlib.util.user_message)."""
    from dnnlib import UserError
    from dnnlib.util import user_message

    loader = torch.utils.data.DataLoader(_RefusingDataset(), batch_size=1, num_workers=1)
    with pytest.raises(UserError) as error:
        next(iter(loader))
    assert "Traceback" in str(error.value)
    assert user_message(error.value) == "Record 0 is refused."


def test_image_whose_pixel_data_is_corrupt_is_refused_where_it_is_read(tmp_path, monkeypatch):
    """The header is read up front (shape checks); above ImageFolderDataset.FULL_CHECK_BYTES the pixels only where
    the image is read, naming the file (below it, on opening: tests/test_hostile_state.py png-truncated)."""
    from dnnlib import UserError
    from training.dataset import ImageFolderDataset

    monkeypatch.setattr(ImageFolderDataset, "FULL_CHECK_BYTES", 0)
    noise = np.random.default_rng(0).integers(0, 256, (2, 64, 64), dtype=np.uint8)  # incompressible pixels
    for i in range(2):
        PIL.Image.fromarray(noise[i]).save(tmp_path / f"{i}.png")
    data = (tmp_path / "1.png").read_bytes()
    (tmp_path / "1.png").write_bytes(data[: len(data) // 2])  # header intact, pixel data cut
    images = ImageFolderDataset(str(tmp_path))
    assert images[0]["image"].shape == (1, 64, 64)
    with pytest.raises(UserError, match=r"1\.png is not a readable image"):
        images[1]
