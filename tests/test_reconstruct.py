"""reconstruct.py end to end on tiny untrained snapshots: outputs, metrics recomputed independently, sharding, the
same measurements for every model, stored measurement sets, network-evaluation counts, and bad input refused before
anything is written; and reconstruction quality of its methods with an exact Gaussian denoiser as the network."""

import csv
import json
import os
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import skimage.metrics
import torch

from tests.gaussian import gaussian_denoiser
from tests.helpers import make_phantoms, run_cli
from training import snapshot as checkpoint
from training.masks import FullMask, RandomLineMaskLaw
from training.measurements import MeasurementConfig
from training.mri import MRIDataset
from training.networks import network_kwargs_for
from training.operators import MultiCoilMRI
from training.sampling.denoisers import CountingNetwork

RES = 16
MARGINS = {"mri": 10.0, "sr": 1.5, "box": 4.0, "pixel": 10.0}  # dB over zero-filling, exact prior (see its test)


def write_snapshot(path: str, dataset: dict, measurement: dict | None, channels: int, loss: dict | None = None) -> str:
    cfg = network_kwargs_for(arch="ddpmpp", precond="vp", img_resolution=RES, in_channels=channels,
                             out_channels=channels, label_dim=0, cbase=8, cres=[1, 2], num_blocks=1,
                             attn_resolutions=[], dropout=0.0)
    torch.manual_seed(0)
    config = {"network": cfg, "dataset": dataset, "measurement": measurement, **({"loss": loss} if loss else {})}
    checkpoint.save_snapshot(path, config, checkpoint.build_network(cfg))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("recon")
    phantoms = make_phantoms(str(root / "phantoms.zip"), num=3, resolution=RES)
    run_cli(["dataset_tool.py", "simulate-mri", "--source", phantoms, "--dest", str(root / "mri"), "--coils", "4"])
    run_cli(["dataset_tool.py", "simulate-mri", "--source", phantoms, "--dest", str(root / "stored"), "--coils", "4",
             "--mask-kind", "lines-random", "--acs", "2"])
    # The MSM model was trained with another line law (R = 2, 4 ACS lines) than the task's default (R = 4,
    # default_acs(16) = 2 lines), and the oracle with none: neither may change the measurements.
    mri_law = MeasurementConfig("mri", {"kind": "lines-random", "R": 2, "acs": 4}).to_config()
    image_law = MeasurementConfig("identity", {"kind": "box", "p": 0.4}).to_config()
    mri_dataset = {"kind": "mri", "shape": [RES, RES]}
    return {
        "phantoms": phantoms, "mri": str(root / "mri"), "stored": str(root / "stored"),
        "mri_model": write_snapshot(str(root / "mri.pt"), mri_dataset, mri_law, 2),
        "oracle_model": write_snapshot(str(root / "oracle.pt"), mri_dataset, None, 2,
                                       loss={"class_name": "training.loss.EDMLoss"}),
        "image_model": write_snapshot(str(root / "image.pt"), {"kind": "image", "image_shape": [1, RES, RES]},
                                      image_law, 1),
    }


def read_rows(outdir) -> list[dict]:
    with open(os.path.join(outdir, "metrics.csv")) as f:
        lines = [line for line in f if not line.startswith("#")]
    return list(csv.DictReader(lines))


def without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def test_mri_all_methods_metrics_and_rank_independence(tmp_path, files):
    # --indices, not --num: torchrun's own parser would take --num for an abbreviation of its --numa-binding.
    common = ["reconstruct.py", "--network", files["mri_model"], "--data", files["mri"], "--task", "mri",
              "--indices", "0-1", "--seeds", "0-1", "--steps", "4", "--dps-steps", "4",
              "--methods", "msm,dps,zero-filled,cs-tv,cs-l1", "--cs-tv-iters", "10", "--cs-l1-iters", "10"]
    run_cli([*common, "--outdir", str(tmp_path / "one"), "--batch", "4"])
    run_cli([*common, "--outdir", str(tmp_path / "two"), "--batch", "1"], torchrun=2)
    names = [f"{i:05d}-{s:06d}" for i in range(2) for s in range(2)]
    for outdir in (tmp_path / "one", tmp_path / "two"):
        assert sorted(os.listdir(outdir / "panels")) == [f"{n}.png" for n in names]
    rows = read_rows(tmp_path / "one")
    methods = ("msm", "dps", "zero-filled", "cs-tv", "cs-l1")
    assert [(r["example"], r["seed"], r["method"]) for r in rows] == [
        (str(i), str(s), m) for i in range(2) for s in range(2) for m in methods]
    # The same samples on 1 rank with batch 4 and on 2 ranks with batch 1. CS (sigpy, numpy) rounds differently with
    # another number of threads (torchrun sets OMP_NUM_THREADS=1), so it is compared to a tolerance.
    for one, two in zip(without_timing(rows), without_timing(read_rows(tmp_path / "two")), strict=True):
        if one["method"].startswith("cs"):
            assert float(one["psnr"]) == pytest.approx(float(two["psnr"]), rel=1e-4)
        else:
            assert one == two
    # Network evaluations per example: K = 3 partial estimates on each of 4 levels for MSM, and for DPS (the MSM
    # model's aggregate denoiser).
    assert {r["method"]: float(r["nfe"]) for r in rows} == {"msm": 12, "dps": 12, "zero-filled": 0, "cs-tv": 0,
                                                            "cs-l1": 0}
    assert all(float(r["seconds"]) > 0 for r in rows)
    with open(tmp_path / "one" / "metrics.csv") as f:
        assert "fastMRI" in f.readline()  # conventions first
    summary = json.load(open(tmp_path / "one" / "summary.json"))
    for method in methods:
        values = [float(r["psnr"]) for r in rows if r["method"] == method]
        assert summary["methods"][method]["psnr_mean"] == pytest.approx(np.mean(values))
    assert summary["settings"]["cs-tv"] == {"lamda": pytest.approx(1e-3), "max_iter": 10}
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


def test_msm_heun_solver_runs_edm_heun_on_its_grid(tmp_path, files):
    """--msm-solver heun: EDM's rho grid of --steps Heun steps from min(80, the training top) (this snapshot names
    no sigma range, so 80), 2 N - 1 aggregate evaluations of K = 3 subsets each, recorded beside the rows."""
    common = ["reconstruct.py", "--network", files["mri_model"], "--data", files["mri"], "--task", "mri",
              "--indices", "0", "--steps", "3", "--methods", "msm"]
    run_cli([*common, "--outdir", str(tmp_path / "ancestral")])
    run_cli([*common, "--outdir", str(tmp_path / "heun"), "--msm-solver", "heun"])
    settings = json.load(open(tmp_path / "heun" / "summary.json"))["settings"]["msm"]
    assert (settings["solver"], settings["steps"], settings["K"], settings["sigma_max"]) == ("heun", 3, 3, 80.0)
    heun, ancestral = read_rows(tmp_path / "heun")[0], read_rows(tmp_path / "ancestral")[0]
    assert float(heun["nfe"]) == 3 * (2 * 3 - 1) and float(ancestral["nfe"]) == 3 * 3
    assert heun["psnr"] != ancestral["psnr"]


def test_sample_accel_changes_only_the_sampling_masks(tmp_path, files):
    """--sample-accel draws the MSM sampler's masks from the training line law at another R (same kind and ACS),
    records it, and changes the samples; without it the training law is used as is."""
    common = ["reconstruct.py", "--network", files["mri_model"], "--data", files["mri"], "--task", "mri",
              "--indices", "0", "--steps", "3", "--methods", "msm"]
    run_cli([*common, "--outdir", str(tmp_path / "train-law")])
    run_cli([*common, "--outdir", str(tmp_path / "denser"), "--sample-accel", "1.5"])
    settings = {name: json.load(open(tmp_path / name / "summary.json"))["settings"]["msm"]
                for name in ("train-law", "denser")}
    assert "sample_R" not in settings["train-law"] and settings["denser"]["sample_R"] == 1.5
    assert read_rows(tmp_path / "train-law")[0]["psnr"] != read_rows(tmp_path / "denser")[0]["psnr"]

    from training.sampling import methods

    law = RandomLineMaskLaw(2, 4)
    run = SimpleNamespace(model=SimpleNamespace(mask_law=law), options=SimpleNamespace(sample_accel=None,
                                                                                       acquired_draw=None))
    assert methods.sampling_law(run) is law
    run.options.sample_accel = 4.0
    assert methods.sampling_law(run).to_config() == {"kind": "lines-random", "R": 4.0, "acs": 4}


@pytest.mark.parametrize("task", ["sr", "box", "pixel"])
def test_image_tasks_run_end_to_end(tmp_path, files, task):
    run_cli(["reconstruct.py", "--network", files["image_model"], "--data", files["phantoms"], "--task", task,
             "--num", "2", "--steps", "3", "--dps-steps", "3", "--methods", "msm,dps,zero-filled",
             "--outdir", str(tmp_path)])
    rows = read_rows(tmp_path)
    assert [r["method"] for r in rows] == ["msm", "dps", "zero-filled"] * 2
    assert all(np.isfinite(float(r[k])) for r in rows for k in ("psnr", "ssim", "nmse"))
    assert len(os.listdir(tmp_path / "panels")) == 2


def test_baselines_only_and_stored_measurements(tmp_path, files):
    proc = run_cli(["reconstruct.py", "--data", files["mri"], "--task", "mri", "--num", "2", "--cs-tv-iters", "30",
                    "--cs-l1-iters", "30", "--outdir", str(tmp_path / "baselines")])
    rows = read_rows(tmp_path / "baselines")
    assert [r["method"] for r in rows] == ["zero-filled", "cs-tv", "cs-l1"] * 2
    summary = json.load(open(tmp_path / "baselines" / "summary.json"))["methods"]
    for cs in ("cs-tv", "cs-l1"):
        assert summary[cs]["psnr_mean"] > summary["zero-filled"]["psnr_mean"]  # CS beats zero-filling at R = 4
        assert cs in proc.stdout  # the printed table
    assert "example 1 seed 0: zero-filled" in proc.stdout  # one line per finished example
    run_cli(["reconstruct.py", "--network", files["mri_model"], "--data", files["stored"], "--task", "mri",
             "--num", "1", "--steps", "2", "--methods", "msm,zero-filled", "--outdir", str(tmp_path / "stored")])
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
        "unknown method 'cs'": ["--data", files["mri"], "--task", "mri", "--methods", "cs"],
        "--sr-factor applies only to --task sr": ["--data", files["mri"], "--task", "mri", "--sr-factor", "2"],
        "--accel does not apply to stored": ["--data", files["stored"], "--task", "mri", "--accel", "8"],
        "not a measurement set": ["--measurements", files["phantoms"]],
        "already exists": ["--data", files["mri"], "--task", "mri", "--save-measurements", files["stored"]],
        "--sample-accel applies to MSM models trained on MRI line masks": [
            "--network", files["image_model"], "--data", files["phantoms"], "--task", "box", "--sample-accel", "2"],
    }
    for k, (expected, args) in enumerate(cases.items()):
        outdir = tmp_path / f"out{k}"
        proc = run_cli(["reconstruct.py", *args, "--outdir", str(outdir)], check=False)
        assert proc.returncode == 1 and expected in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
        assert not os.path.exists(outdir)


# ----------------------------------------------------------------------------
# The same measurements for every model, and stored measurement sets.


def saved_arrays(path) -> dict:
    out = {}
    for name in sorted(os.listdir(os.path.join(path, "examples"))):
        with np.load(os.path.join(path, "examples", name)) as arrays:
            out.update({f"{name}/{key}": arrays[key] for key in arrays.files})
    return out


def test_every_model_gets_the_same_measurements(tmp_path, files):
    # An MSM model trained with R = 2 and 4 ACS lines and an oracle trained on clean data: before the fix the first
    # was measured with its own law and the second with round(0.08 W) ACS lines, so their zero-filled rows differed.
    outputs = {}
    for name in ("mri_model", "oracle_model"):
        outdir, saved = tmp_path / name, tmp_path / f"{name}-measurements"
        run_cli(["reconstruct.py", "--network", files[name], "--data", files["mri"], "--task", "mri",
                 "--indices", "0-2", "--steps", "4", "--methods", "msm,zero-filled", "--save-measurements", str(saved),
                 "--outdir", str(outdir)])
        outputs[name] = (json.load(open(outdir / "summary.json")), read_rows(outdir), saved_arrays(saved))
    (msm_summary, msm_rows, msm_arrays), (oracle_summary, oracle_rows, oracle_arrays) = outputs.values()
    assert msm_summary["measurements"] == oracle_summary["measurements"]  # the hash, task options, indices
    assert msm_arrays.keys() == oracle_arrays.keys()
    assert {f"{i:06d}.npz/{key}" for i in range(3) for key in ("index", "y", "mask", "maps", "reference")} <= \
        msm_arrays.keys()
    for key, array in msm_arrays.items():
        assert array.tobytes() == oracle_arrays[key].tobytes(), key
    assert msm_summary["measurements"]["task"]["mri_mask"] == {"kind": "lines-random", "R": 4.0, "acs": 2}
    zero_filled = [without_timing([r for r in rows if r["method"] == "zero-filled"]) for rows in (msm_rows,
                                                                                                   oracle_rows)]
    assert zero_filled[0] == zero_filled[1]
    # The oracle's snapshot says log-normal sigma: of the 4 levels asked for, the one above 80 (157) is dropped. The
    # MSM model's snapshot says nothing, so its grid keeps all 4.
    assert oracle_summary["settings"]["msm"]["sigma_max"] <= 80 < msm_summary["settings"]["msm"]["sigma_max"]
    assert (oracle_summary["settings"]["msm"]["levels"], msm_summary["settings"]["msm"]["levels"]) == (3, 4)
    # The oracle's full mask law makes one network call per level (not K = 3 identical ones); the MSM model makes 3.
    assert {r["method"]: float(r["nfe"]) for r in oracle_rows}["msm"] == 3
    assert {r["method"]: float(r["nfe"]) for r in msm_rows}["msm"] == 3 * 4
    with open(tmp_path / "oracle_model" / "metrics.csv") as f:
        assert f"sha256 {oracle_summary['measurements']['hash']}" in f.read()


def test_a_saved_measurement_set_is_reused_exactly(tmp_path, files):
    saved = tmp_path / "set"
    baselines = ["--methods", "zero-filled,cs-tv", "--cs-tv-iters", "20"]
    run_cli(["reconstruct.py", "--data", files["mri"], "--task", "mri", "--indices", "1-2", "--accel", "2",
             "--sigma-y", "0.05", "--mask-seed", "7", *baselines, "--save-measurements", str(saved),
             "--outdir", str(tmp_path / "first")])
    assert sorted(os.listdir(tmp_path)) == ["first", "set"]  # no temporary folder left behind
    # Reused without --data or any task option, and with the stored values repeated: the same rows and hash.
    run_cli(["reconstruct.py", "--measurements", str(saved), *baselines, "--outdir", str(tmp_path / "again")])
    run_cli(["reconstruct.py", "--measurements", str(saved), "--task", "mri", "--accel", "2", "--mask-seed", "7",
             "--indices", "2", *baselines, "--outdir", str(tmp_path / "subset")])
    first = without_timing(read_rows(tmp_path / "first"))
    assert without_timing(read_rows(tmp_path / "again")) == first
    assert without_timing(read_rows(tmp_path / "subset")) == [r for r in first if r["example"] == "2"]
    hashes = [json.load(open(tmp_path / d / "summary.json"))["measurements"]["hash"] for d in ("first", "again")]
    assert hashes[0] == hashes[1]
    # Task options that contradict the stored ones are refused in one sentence, before anything is written.
    for args, expected in ((["--accel", "4"], "--accel 4.0 contradicts"), (["--task", "sr"], "--task sr contradicts"),
                           (["--data", files["mri"]], "exclude each other")):
        proc = run_cli(["reconstruct.py", "--measurements", str(saved), *args, "--outdir", str(tmp_path / "bad")],
                       check=False)
        assert proc.returncode == 1 and expected in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and not os.path.exists(tmp_path / "bad")
    # A set whose arrays were changed after it was written no longer matches its hash.
    record = saved / "examples" / "000001.npz"
    arrays = dict(np.load(record))
    arrays["y"][..., 0] += 1
    np.savez(record, **arrays)
    proc = run_cli(["reconstruct.py", "--measurements", str(saved), "--outdir", str(tmp_path / "bad")], check=False)
    assert proc.returncode == 1 and "do not match the set's hash" in proc.stderr, proc.stderr


# ----------------------------------------------------------------------------
# Reconstruction quality with an exact denoiser as the network.


class GaussianNetwork(torch.nn.Module):
    """The exact denoiser of N(0, C) images in a network's place: net(x, sigma) = C (C + sigma^2 I)^{-1} x."""

    def __init__(self, cov: torch.Tensor, channels: int):
        super().__init__()
        self.img_resolution, self.in_channels, self.out_channels, self.label_dim = RES, channels, channels, 0
        self.denoise = gaussian_denoiser(cov, (channels, RES, RES))

    def forward(self, x, sigma, class_labels=None):
        assert bool((sigma == sigma.flatten()[0]).all())  # every sampler here denoises a batch at one level
        return self.denoise(x, float(sigma.flatten()[0])).to(x.dtype)


def smooth_covariance(channels: int) -> torch.Tensor:
    """Squared-exponential covariance (length 3 pixels, variance 0.16) on (channels, 16, 16), channels independent."""
    rows, cols = torch.meshgrid(torch.arange(RES), torch.arange(RES), indexing="ij")
    points = torch.stack([rows.flatten(), cols.flatten()], dim=1).to(torch.float64)
    c = 0.16 * torch.exp(-torch.cdist(points, points).square() / 18) + 1e-4 * torch.eye(RES * RES, dtype=torch.float64)
    return torch.kron(torch.eye(channels, dtype=torch.float64), c)


def gaussian_records(cov: torch.Tensor, channels: int, num: int, maps=None) -> list[dict]:
    """Draws of N(0, cov) as dataset records (index, image; MRI: kspace, maps)."""
    g = torch.Generator().manual_seed(11)
    images = (torch.linalg.cholesky(cov) @ torch.randn(len(cov), num, generator=g, dtype=torch.float64)).T
    records = []
    for i, image in enumerate(images.reshape(num, channels, RES, RES).to(torch.float32)):
        record = {"index": i, "image": image}
        if maps is not None:
            record.update(maps=maps, kspace=MultiCoilMRI(maps[None]).A(image[None])[0])
        records.append(record)
    return records


def normalised_maps(coils: int = 4) -> torch.Tensor:
    """Random complex coil maps with sum |S|^2 = 1 (so T^H T = I), fixed by a seed."""
    g = torch.Generator().manual_seed(12)
    maps = torch.complex(torch.randn(coils, RES, RES, generator=g), torch.randn(coils, RES, RES, generator=g))
    return maps / maps.abs().square().sum(dim=0).sqrt()


@pytest.mark.parametrize("task", ["mri", "sr", "box", "pixel"])
def test_methods_with_an_exact_prior_beat_zero_filling(task):
    # reconstruct.py's own measurement, operators and method table with the exact denoiser of the Gaussian data as
    # an oracle network. Each method's mean over 4 seeds (an estimate of the posterior mean) must beat A^+ y by
    # MARGINS dB of mean PSNR over 8 examples: about half the gains measured (MSM / DPS over zero-filled):
    # MRI R = 4: 29.1 / 37.5 against 8.8; SR x4: 24.6 / 23.9 against 20.9; box: 30.1 / 30.6 against 21.7;
    # pixels p = 0.5: 36.1 / 39.8 against 17.1.
    from training import evaluation, tasks
    from training.sampling import methods

    channels, num, num_seeds = (2 if task == "mri" else 1), 8, 4
    cov = smooth_covariance(channels)
    maps = normalised_maps() if task == "mri" else None
    task_options = tasks.resolve_task_options(task, False, {}, RES)
    examples = [tasks.measure_example(r, task_options) for r in gaussian_records(cov, channels, num, maps)]
    model = methods.Model(CountingNetwork(GaussianNetwork(cov, channels)),
                          kind="mri" if task == "mri" else "image", mask_law=FullMask(), loss_config=None)
    # DPS's zeta is a step per level: the defaults are tuned for DDPM's ~1000 levels, this test runs 200.
    options = methods.MethodOptions(msm_steps=50, num_subsets=3, dc_step=2.0 if task == "mri" else 1.75,
                                    eta=0.85, outer="ddnm", dps_steps=200, dps_step=0.15, cs={})
    run = methods.Run(model, task_options, options, torch.device("cpu"))
    pairs = [e for e in examples for _ in range(num_seeds)]
    scores = {}
    for method in ("msm", "dps", "zero-filled"):
        images = methods.METHODS[method].run(run, pairs, list(range(len(pairs))))
        means = images.reshape(num, num_seeds, *images.shape[1:]).mean(dim=1)
        scores[method] = np.mean([
            evaluation.metric_rows(evaluation.display_images(e.reference, task),
                                    evaluation.display_images(means[j : j + 1], task), task)["psnr"]
            for j, e in enumerate(examples)])
    assert scores["msm"] > scores["zero-filled"] + MARGINS[task], scores
    assert scores["dps"] > scores["zero-filled"] + MARGINS[task], scores
