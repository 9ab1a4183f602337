"""reconstruct.py end to end on tiny untrained snapshots: outputs, metrics recomputed independently, sharding, and
bad input refused before anything is written. (Reconstruction quality is the posterior tests' business.)"""

import csv
import json
import os
import shutil

import numpy as np
import pytest
import skimage.metrics
import torch

from tests.helpers import make_phantoms, run_cli
from torch_utils import checkpoint
from training.measurements import MeasurementConfig
from training.mri import MRIDataset
from training.networks import network_kwargs_for

RES = 16


def write_snapshot(path: str, dataset: dict, measurement: dict | None, channels: int) -> str:
    cfg = network_kwargs_for(arch="ddpmpp", precond="vp", img_resolution=RES, in_channels=channels,
                             out_channels=channels, label_dim=0, cbase=8, cres=[1, 2], num_blocks=1,
                             attn_resolutions=[], dropout=0.0)
    torch.manual_seed(0)
    checkpoint.save_snapshot(path, {"network": cfg, "dataset": dataset, "measurement": measurement},
                             checkpoint.build_network(cfg))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("recon")
    phantoms = make_phantoms(str(root / "phantoms.zip"), num=3, resolution=RES)
    run_cli(["dataset_tool.py", "simulate-mri", "--source", phantoms, "--dest", str(root / "mri"), "--coils", "4"])
    run_cli(["dataset_tool.py", "simulate-mri", "--source", phantoms, "--dest", str(root / "stored"), "--coils", "4",
             "--mask-kind", "lines-random", "--acs", "2"])
    mri_law = MeasurementConfig("mri", {"kind": "lines-random", "R": 4, "acs": 2}).to_config()
    image_law = MeasurementConfig("identity", {"kind": "box", "p": 0.4}).to_config()
    return {
        "phantoms": phantoms, "mri": str(root / "mri"), "stored": str(root / "stored"),
        "mri_model": write_snapshot(str(root / "mri.pt"), {"kind": "mri", "shape": [RES, RES]}, mri_law, 2),
        "image_model": write_snapshot(str(root / "image.pt"), {"kind": "image", "image_shape": [1, RES, RES]},
                                      image_law, 1),
    }


def read_rows(outdir) -> list[dict]:
    with open(os.path.join(outdir, "metrics.csv")) as f:
        lines = [line for line in f if not line.startswith("#")]
    return list(csv.DictReader(lines))


def test_mri_all_methods_metrics_and_rank_independence(tmp_path, files):
    # --indices, not --num: torchrun's own parser would take --num for an abbreviation of its --numa-binding.
    common = ["reconstruct.py", "--network", files["mri_model"], "--data", files["mri"], "--task", "mri",
              "--indices", "0-1", "--seeds", "0-1", "--steps", "4",
              "--methods", "msm,dps,zero-filled,cs", "--cs-iters", "10"]
    run_cli([*common, "--outdir", str(tmp_path / "one"), "--batch", "4"])
    run_cli([*common, "--outdir", str(tmp_path / "two"), "--batch", "1"], torchrun=2)
    names = [f"{i:05d}-{s:06d}" for i in range(2) for s in range(2)]
    for outdir in (tmp_path / "one", tmp_path / "two"):
        assert sorted(os.listdir(outdir / "panels")) == [f"{n}.png" for n in names]
    rows = read_rows(tmp_path / "one")
    assert [(r["example"], r["seed"], r["method"]) for r in rows] == [
        (str(i), str(s), m) for i in range(2) for s in range(2) for m in ("msm", "dps", "zero-filled", "cs")]
    # The same samples on 1 rank with batch 4 and on 2 ranks with batch 1. CS (sigpy, numpy) rounds differently with
    # another number of threads (torchrun sets OMP_NUM_THREADS=1), so it is compared to a tolerance.
    for one, two in zip(rows, read_rows(tmp_path / "two"), strict=True):
        if one["method"] == "cs":
            assert float(one["psnr"]) == pytest.approx(float(two["psnr"]), rel=1e-4)
        else:
            assert one == two
    with open(tmp_path / "one" / "metrics.csv") as f:
        assert "fastMRI" in f.readline()  # conventions first
    summary = json.load(open(tmp_path / "one" / "summary.json"))
    for method in ("msm", "dps", "zero-filled", "cs"):
        values = [float(r["psnr"]) for r in rows if r["method"] == method]
        assert summary["methods"][method]["psnr_mean"] == pytest.approx(np.mean(values))
    # Recompute from the saved reconstructions with fastMRI's definitions (skimage on magnitudes, range max(gt)).
    dataset = MRIDataset(files["mri"])
    for row in rows[:8]:
        reference = dataset[int(row["example"])]["image"].numpy().astype(np.float64)
        gt = np.abs(reference[0] + 1j * reference[1])
        saved = np.load(tmp_path / "one" / "reconstructions" / f"{int(row['example']):05d}-{int(row['seed']):06d}.npz")
        pred = np.abs(saved[row["method"]][0] + 1j * saved[row["method"]][1]).astype(np.float64)
        assert float(row["psnr"]) == pytest.approx(
            skimage.metrics.peak_signal_noise_ratio(gt, pred, data_range=gt.max()), rel=1e-4)
        assert float(row["ssim"]) == pytest.approx(
            skimage.metrics.structural_similarity(gt, pred, data_range=gt.max()), rel=1e-3, abs=1e-5)
    zero_filled = {r["example"]: r["psnr"] for r in rows if r["method"] == "zero-filled"}
    assert len(set(zero_filled.values())) == 2  # deterministic per example, different across examples


@pytest.mark.parametrize("task", ["sr", "box", "pixel"])
def test_image_tasks_run_end_to_end(tmp_path, files, task):
    run_cli(["reconstruct.py", "--network", files["image_model"], "--data", files["phantoms"], "--task", task,
             "--num", "2", "--steps", "3", "--methods", "msm,dps,zero-filled", "--outdir", str(tmp_path)])
    rows = read_rows(tmp_path)
    assert [r["method"] for r in rows] == ["msm", "dps", "zero-filled"] * 2
    assert all(np.isfinite(float(r[k])) for r in rows for k in ("psnr", "ssim", "nmse"))
    assert len(os.listdir(tmp_path / "panels")) == 2


def test_baselines_only_and_stored_measurements(tmp_path, files):
    proc = run_cli(["reconstruct.py", "--data", files["mri"], "--task", "mri", "--num", "2", "--cs-iters", "30",
                    "--outdir", str(tmp_path / "baselines")])
    rows = read_rows(tmp_path / "baselines")
    assert [r["method"] for r in rows] == ["zero-filled", "cs"] * 2
    summary = json.load(open(tmp_path / "baselines" / "summary.json"))["methods"]
    assert summary["cs"]["psnr_mean"] > summary["zero-filled"]["psnr_mean"]  # CS beats zero-filling at R = 4
    assert "cs" in proc.stdout  # the printed table
    run_cli(["reconstruct.py", "--network", files["mri_model"], "--data", files["stored"], "--task", "mri",
             "--num", "1", "--steps", "2", "--outdir", str(tmp_path / "stored")])
    assert not os.path.exists(tmp_path / "stored" / "metrics.csv")
    assert json.load(open(tmp_path / "stored" / "summary.json"))["methods"] is None
    assert os.listdir(tmp_path / "stored" / "panels") == ["00000-000000.png"]


def test_bad_input_is_one_sentence_and_writes_nothing(tmp_path, files):
    broken = str(tmp_path / "stored-without-mask")
    shutil.copytree(files["stored"], broken)
    record = os.path.join(broken, "slices", "000000.npz")
    arrays = dict(np.load(record))
    del arrays["mask"]
    np.savez(record, **arrays)
    cases = {
        "fit the model": ["--network", files["image_model"], "--data", files["mri"], "--task", "mri"],
        "mask must be stored": ["--network", files["mri_model"], "--data", broken, "--task", "mri"],
        "--dc-step": ["--network", files["mri_model"], "--data", files["mri"], "--task", "mri", "--dc-step", "-1"],
        "needs a model": ["--data", files["phantoms"], "--task", "box", "--methods", "msm"],
    }
    for k, (expected, args) in enumerate(cases.items()):
        outdir = tmp_path / f"out{k}"
        proc = run_cli(["reconstruct.py", *args, "--outdir", str(outdir)], check=False)
        assert proc.returncode == 1 and expected in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
        assert not os.path.exists(outdir)
