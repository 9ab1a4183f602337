"""reconstruct.py with the ALD / predictor-corrector family (training/sampling/solvers.py and conditioning.py) and the
CT task (training/ct.py): every method runs on MRI, an image task and CT with a clean and an MSM prior; with an exact
Gaussian prior each beats the classical baseline; the noise conventions (--rel-noise, --snr-db); an SNR sweep gives one
table row per SNR; bad input is one sentence and writes nothing."""

import json
import math
import os

import numpy as np
import pytest
import torch

from tests.helpers import make_phantoms, run_cli
from tests.test_reconstruct import (
    RES,
    GaussianNetwork,
    gaussian_records,
    normalised_maps,
    read_rows,
    smooth_covariance,
    write_snapshot,
)
from training import evaluation, tasks
from training.masks import FullMask
from training.measurements import MeasurementConfig
from training.sampling import methods
from training.sampling.denoisers import CountingNetwork

FAMILY = ["ald", "pc-jalal", "pc-dps", "pc-projection", "pc-dds"]
TINY = ["--levels", "3", "--steps-each", "2", "--sigma-max", "5"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("family")
    phantoms = make_phantoms(str(root / "phantoms.zip"), num=2, resolution=RES)
    run_cli(["dataset_tool.py", "simulate-mri", "--source", phantoms, "--dest", str(root / "mri"), "--coils", "2"])
    image = {"kind": "image", "image_shape": [1, RES, RES]}
    mri = {"kind": "mri", "shape": [RES, RES]}
    clean_loss = {"class_name": "training.loss.EDMLoss"}
    return {
        "phantoms": phantoms, "mri": str(root / "mri"),
        "image": {"clean": write_snapshot(str(root / "clean.pt"), image, None, 1, loss=clean_loss),
                  "msm": write_snapshot(str(root / "msm.pt"), image, MeasurementConfig(
                      "identity", {"kind": "box", "p": 0.4}).to_config(), 1)},
        "mri_models": {"clean": write_snapshot(str(root / "mri-clean.pt"), mri, None, 2, loss=clean_loss),
                       "msm": write_snapshot(str(root / "mri-msm.pt"), mri, MeasurementConfig(
                           "mri", {"kind": "lines-random", "R": 2, "acs": 4}).to_config(), 2)},
    }


@pytest.mark.parametrize("prior", ["clean", "msm"])
@pytest.mark.parametrize("task", ["mri", "box", "ct"])
def test_every_method_runs_with_every_prior(tmp_path, files, task, prior):
    family = [m for m in FAMILY if not (task == "ct" and m == "pc-projection")]  # CT has no exact A^+
    baselines = {"mri": ["zero-filled", "cs-tv"], "box": ["zero-filled"], "ct": ["fbp"]}[task]
    msm = [] if task == "ct" else ["msm"]  # MSM's image data consistency needs A^+
    extra = {"mri": ["--cs-tv-iters", "5"], "box": [], "ct": ["--views", "5", "--angular-range", "120"]}[task]
    model = files["mri_models" if task == "mri" else "image"][prior]
    data = files["mri"] if task == "mri" else files["phantoms"]
    methods = [*msm, "dps", *family, *baselines]
    run_cli(["reconstruct.py", "--network", model, "--data", data, "--task", task, "--num", "1", "--seeds", "0",
             "--steps", "2", "--dps-steps", "2", "--methods", ",".join(methods), *TINY, *extra,
             "--outdir", str(tmp_path)])
    rows = read_rows(tmp_path)
    assert [r["method"] for r in rows] == methods
    assert all(np.isfinite(float(r[k])) for r in rows for k in ("psnr", "ssim", "nmse"))
    # An MSM prior drives dps and the family through its aggregate denoiser: every evaluation is one network call on
    # the batch tiled K times (K = --subsets, default 3 MRI, 2 images), so K images per evaluation per example.
    k = 1 if prior == "clean" else 3 if task == "mri" else 2
    nfe = {r["method"]: float(r["nfe"]) for r in rows}
    assert nfe["ald"] == 3 * 2 * k and nfe["pc-jalal"] == 2 * 3 * k and nfe["pc-dds"] == 2 * 3 * k  # levels x steps;
    settings = json.load(open(tmp_path / "summary.json"))["settings"]
    assert nfe["dps"] == settings["dps"]["levels"] * k  # (levels - 1) x (1 + 2) for the family; DPS: one per level
    assert nfe[baselines[0]] == 0
    expected = {"denoiser": "full"} if prior == "clean" else {"denoiser": "msm-aggregate", "K": k}
    for method in ["dps", *family]:
        assert {key: settings[method].get(key) for key in expected} == expected, method


def test_samples_depend_only_on_their_seed(tmp_path, files):
    common = ["reconstruct.py", "--network", files["image"]["msm"], "--data", files["phantoms"], "--task", "pixel",
              "--num", "1", "--seeds", "0-1", "--methods", ",".join(FAMILY), *TINY, "--corrector-steps", "2"]
    run_cli([*common, "--batch", "2", "--outdir", str(tmp_path / "two")])
    run_cli([*common, "--batch", "1", "--outdir", str(tmp_path / "one")])
    for name in ("00000-000000.npz", "00000-000001.npz"):
        together, alone = np.load(tmp_path / "two" / "reconstructions" / name), np.load(
            tmp_path / "one" / "reconstructions" / name)
        for method in FAMILY:
            np.testing.assert_allclose(together[method], alone[method], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("task", ["mri", "box", "ct"])
def test_family_with_an_exact_prior_beats_the_classical_baseline(task):
    # The exact denoiser of Gaussian data as the network (tests/test_reconstruct.py), reconstruct.py's own
    # measurements and method table; the mean of 4 posterior samples per example against A^+ y (FBP for CT, at 6
    # views, fewer measurements than pixels). Measured (dB, 4 examples; ald, pc-jalal, pc-dps, pc-projection, pc-dds vs
    # baseline): MRI 30.5, 22.5, 23.2, 25.8, 21.8 vs 9.3; box 27.6, 26.7, 27.0, 29.2, 26.6 vs 22.3;
    # CT 29.3, 27.4, 27.8, -, 27.0 vs 24.1. Required: half of the smallest gain.
    channels, num, num_seeds = (2 if task == "mri" else 1), 4, 4
    cov = smooth_covariance(channels)
    maps = normalised_maps() if task == "mri" else None
    task_options = tasks.resolve_task_options(task, False, {"views": 6} if task == "ct" else {}, RES)
    examples = [tasks.measure_example(r, task_options) for r in gaussian_records(cov, channels, num, maps)]
    model = methods.Model(CountingNetwork(GaussianNetwork(cov, channels)),
                          kind="mri" if task == "mri" else "image", mask_law=FullMask(), loss_config=None)
    family = methods.FamilyOptions(sigma_max=5.0, levels=100, steps_each=3)
    options = methods.MethodOptions(msm_steps=2, num_subsets=1, dc_step=1.0, eta=0.85, outer="ddnm", dps_steps=2,
                                    dps_step=None, cs={}, family=family)
    run = methods.Run(model, task_options, options, torch.device("cpu"))
    pairs = [e for e in examples for _ in range(num_seeds)]

    def score(method):
        images = methods.METHODS[method].run(run, pairs, list(range(len(pairs))))
        means = images.reshape(num, num_seeds, *images.shape[1:]).mean(dim=1)
        return np.mean([evaluation.metric_rows(evaluation.display_images(e.reference, task),
                                                evaluation.display_images(means[j : j + 1], task), task)["psnr"]
                        for j, e in enumerate(examples)])

    baseline = score("fbp" if task == "ct" else "zero-filled")
    margin = {"mri": 6.0, "box": 2.0, "ct": 1.4}[task]
    for method in FAMILY:
        if task in methods.METHODS[method].tasks:
            assert score(method) > baseline + margin, (method, baseline)


def test_noise_conventions():
    image = torch.from_numpy(np.linspace(-1, 1, RES * RES, dtype=np.float32).reshape(1, RES, RES))
    record = {"index": 3, "image": image}
    ct = tasks.resolve_task_options("ct", False, {"views": 30}, RES)
    assert ct.rel_noise == 0.05 and ct.sigma_y is None  # seed 003's default for CT
    example = tasks.measure_example(record, ct)
    clean = tasks.task_operator(ct, RES).A(image[None].to(torch.float64))
    expected = 0.05 * clean.abs().mean().item()
    assert example.sigma_y.item() == pytest.approx(expected, rel=1e-6)
    assert (example.y - clean).std().item() == pytest.approx(expected, rel=0.1)  # 30 x 23 noise draws
    for level in (0.0, 20.0):
        box = tasks.resolve_task_options("box", False, {"snr_db": level}, RES)
        example = tasks.measure_example(record, box)
        signal = tasks.task_operator(box, RES).A(image[None].to(torch.float64)).square().mean().item()
        assert example.sigma_y.item() == pytest.approx(math.sqrt(signal / 10 ** (level / 10)), rel=1e-6)
    # Complex MRI entries carry sigma_y on each part: E|n|^2 = 2 sigma_y^2.
    assert tasks.noise_std(tasks.TaskOptions("mri", snr_db=10.0), torch.full((1, 1, 2, 2), 1 + 1j),
                                 None) == pytest.approx(math.sqrt(2 / (2 * 10)))


def test_snr_sweep_tabulates_one_row_per_snr(tmp_path, files):
    proc = run_cli(["reconstruct.py", "--network", files["image"]["clean"], "--data", files["phantoms"], "--task",
                    "box", "--num", "2", "--methods", "pc-jalal,zero-filled", "--snr-db", "5,40", *TINY,
                    "--outdir", str(tmp_path)])
    rows = read_rows(tmp_path)
    assert [(r["snr_db"], r["example"], r["method"]) for r in rows] == [
        (level, str(i), m) for level in ("5.0", "40.0") for i in range(2) for m in ("pc-jalal", "zero-filled")]
    table = [line.split()[0:3] for line in proc.stdout.splitlines() if " @ " in line]
    assert table == [["pc-jalal", "@", "5"], ["zero-filled", "@", "5"], ["pc-jalal", "@", "40"],
                     ["zero-filled", "@", "40"]]
    zero_filled = {r["snr_db"]: float(r["psnr"]) for r in rows if r["method"] == "zero-filled"}
    assert zero_filled["40.0"] > zero_filled["5.0"] + 4  # the same examples, less noise (the hole caps it at 20 dB)
    with open(tmp_path / "metrics.csv") as f:
        header = f.read()
    assert "SNR = mean |M A x|^2 / E|n|^2" in header and header.count("# measurements: sha256") == 2
    assert sorted(os.listdir(tmp_path / "panels"))[0] == "00000-000000-snr40dB.png"


BAD_INPUT = {  # expected words of the one sentence: the arguments after --network/--data
    "applies to --task": ["--task", "ct", "--methods", "pc-projection"],
    "--methods msm applies": ["--task", "ct", "--methods", "msm"],
    "--steps-each must be an integer >= 1": ["--task", "box", "--methods", "ald", "--steps-each", "0"],
    "0 < --sigma-min < --sigma-max": ["--task", "box", "--methods", "ald", "--sigma-min", "5", "--sigma-max", "5"],
    "unknown method": ["--task", "box", "--methods", "ald,langevin"],
    "give only one": ["--task", "box", "--snr-db", "10", "--sigma-y", "0.1"],
    "--snr-db must be": ["--task", "box", "--snr-db", "10,ten"],
    "--views": ["--task", "ct", "--views", "0"],
    "applies only to --task ct": ["--task", "box", "--views", "10"],
}


@pytest.mark.parametrize("expected", list(BAD_INPUT))
def test_bad_input_is_one_sentence_and_writes_nothing(tmp_path, files, expected):
    outdir = tmp_path / "out"
    proc = run_cli(["reconstruct.py", "--network", files["image"]["clean"], "--data", files["phantoms"],
                    *BAD_INPUT[expected], "--outdir", str(outdir)], check=False)
    assert proc.returncode == 1 and expected in proc.stderr, (expected, proc.stderr)
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert not os.path.exists(outdir)
