"""PaDIS's DPS-Langevin solver (training/sampling/solvers.py `padis_solver` with the `dps` term's 'state' law;
SEED_METHODS.md 4.4) on closed
forms: Gaussian data N(mu, C) has the exact denoiser mu + C (C + sigma^2 I)^-1 (x - mu), so the Langevin part's
stationary law at a fixed level, the DPS gradient and the posterior mean are known; and reconstruct.py's `padis`
method on every task, with an exact prior and end to end on tiny snapshots."""

import json
import math

import numpy as np
import pytest
import torch

import reconstruct
from dnnlib import UserError
from tests.gaussian import gaussian_denoiser, random_covariance
from tests.helpers import make_phantoms, run_cli, run_in_process
from tests.linear_gaussian import BatchGenerator, DenseOperator, moments
from tests.sampling.conftest import padis
from tests.sampling.test_posterior import SIZE, assert_close_to_posterior_mean, gaussian_problem
from tests.test_reconstruct import (
    RES,
    GaussianNetwork,
    gaussian_records,
    normalised_maps,
    read_rows,
    smooth_covariance,
    write_snapshot,
)
from torch_utils.misc import SeedGenerators
from training import evaluation, tasks
from training.masks import FullMask
from training.measurements import MeasurementConfig
from training.operators import PixelMask
from training.sampling import methods
from training.sampling.conditioning import dps
from training.sampling.denoisers import CountingNetwork
from training.sampling.solvers import Langevin, padis_initial_state, padis_step_sizes
from training.schedules import padis_sigmas


def padis_level(denoiser, x, generator, sigma, inner_steps, operator, y, mask=None, *, zeta, alpha_factor=0.5):
    """inner_steps PaDIS iterations at the one level sigma, with noise."""
    sigmas = torch.tensor([sigma], dtype=torch.float64)
    return Langevin(padis_step_sizes(sigmas, alpha_factor), inner_steps)(
        denoiser, x, generator, sigmas, conditioning=dps(operator, y, mask, zeta=zeta, law="state"))


def shifted_denoiser(mu: torch.Tensor, cov: torch.Tensor):
    """The exact denoiser of N(mu, cov) on chains (N, d)."""
    centred = gaussian_denoiser(cov, (len(mu),))
    return lambda x, sigma: mu + centred(x - mu, sigma)


# ----------------------------------------------------------------------------
# The Langevin part at a fixed level.


@pytest.mark.parametrize("alpha_factor", [0.5, 1.5])
def test_fixed_level_langevin_leaves_the_noised_prior_invariant(alpha_factor):
    # zeta = 0: x <- x + (alpha / 2) s + sqrt(alpha) z is unadjusted Langevin with step alpha / 2. For N(mu, C) its
    # stationary law is N(mu, (P - alpha P^2 / 4)^-1), P = (C + sigma^2 I)^-1: the target N(mu, C + sigma^2 I) up to
    # that O(alpha) bias. Noise sqrt(2 alpha) (temperature 2) or a step of alpha (not alpha / 2) fail both checks.
    sigma, chains, steps, dim = 0.5, 4000, 400, 4
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(dim, generator=g, dtype=torch.float64)
    cov = random_covariance(dim, rank=2, seed=3, diag=0.1) * 4
    operator = DenseOperator(torch.randn(3, dim, generator=g, dtype=torch.float64))
    target = cov + sigma**2 * torch.eye(dim, dtype=torch.float64)
    precision = torch.linalg.inv(target)
    alpha = alpha_factor * sigma**2
    stationary = torch.linalg.inv(precision - alpha * precision @ precision / 4)
    # Slowest contraction per step 1 - alpha lambda_min(P) / 2: 400 steps are > 10 relaxation times here.
    assert (1 - alpha * torch.linalg.eigvalsh(precision).min().item() / 2) ** steps < 1e-4
    x = BatchGenerator(1).randn_like(torch.zeros(chains, dim, dtype=torch.float64))
    out = padis_level(shifted_denoiser(mu, cov), x, BatchGenerator(2), sigma, steps, operator,
                      torch.zeros(chains, 3, dtype=torch.float64), zeta=0.0, alpha_factor=alpha_factor)
    emp_mean, emp_cov, se_mean, se_cov = moments(out)
    assert ((emp_mean - mu).abs() <= 4.5 * se_mean).all()
    assert ((emp_cov - stationary).abs() <= 4.5 * se_cov).all()
    assert ((emp_cov - target).abs() <= 4.5 * se_cov + (stationary - target).abs()).all()


# ----------------------------------------------------------------------------
# Iterate for iterate against the algorithm written out.


def reference_padis(cov, mask, y, x, seeds, sigmas, inner_steps, zeta):
    """PaDIS's loop written out with the closed-form DPS gradient of Gaussian data and a pixel mask M:
    grad_x ||M (y - D(x))|| = -J M r / ||M r||, r = y - D(x), J = C (C + sigma^2 I)^-1 (symmetric)."""
    gen = SeedGenerators(seeds)
    evals, evecs = torch.linalg.eigh(cov)
    levels = sigmas.tolist()
    for k, sigma in enumerate(levels):
        shrink = evecs @ torch.diag(evals / (evals + sigma**2)) @ evecs.T
        for _ in range(inner_steps):
            d = (x.flatten(1) @ shrink).reshape(x.shape)
            r = (mask * (y - d)).flatten(1)
            grad = -(r @ shrink) / r.norm(dim=1, keepdim=True)
            x = x - zeta * grad.reshape(x.shape) + (d - x) / 4  # alpha / 2 * (d - x) / sigma^2, alpha = sigma^2 / 2
            if k < len(levels) - 1:
                x = x + sigma / math.sqrt(2) * gen.randn_like(x)
    return x


@pytest.mark.parametrize("zeta", [0.0, 0.7])
def test_iterates_equal_the_algorithm_written_out(zeta):
    # zeta = 0 is prior Langevin sampling, iterate for iterate; zeta > 0 adds the DPS step, with the score taken at the
    # iterate before it. Every prefix of the schedule (its last level noise-free) matches to rounding.
    cov = random_covariance(16, rank=4, seed=2)
    g = torch.Generator().manual_seed(5)
    mask = (torch.rand(1, 1, 4, 4, generator=g) < 0.5).to(torch.float64)
    y = torch.randn(3, 1, 4, 4, generator=g, dtype=torch.float64) * mask
    x0 = torch.randn(3, 1, 4, 4, generator=g, dtype=torch.float64)
    sigmas, seeds = padis_sigmas(5, 0.05, 3.0), [4, 5, 6]
    for k in range(1, len(sigmas) + 1):
        for inner in (1, 3):
            out = padis(gaussian_denoiser(cov, (1, 4, 4)), x0, SeedGenerators(seeds), sigmas[:k],
                        PixelMask(mask), y, zeta=zeta, inner_steps=inner)
            expected = reference_padis(cov, mask, y, x0, seeds, sigmas[:k], inner, zeta)
            torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    # A sample depends only on its seed.
    alone = padis(gaussian_denoiser(cov, (1, 4, 4)), x0[1:2], SeedGenerators([5]), sigmas,
                  PixelMask(mask), y[1:2], zeta=zeta, inner_steps=2)
    together = padis(gaussian_denoiser(cov, (1, 4, 4)), x0, SeedGenerators(seeds), sigmas,
                     PixelMask(mask), y, zeta=zeta, inner_steps=2)
    torch.testing.assert_close(alone[0], together[1], rtol=0, atol=1e-14)


def test_schedule_and_starting_states():
    sigmas = padis_sigmas()
    assert len(sigmas) == 100 and sigmas[0].item() == pytest.approx(10.0) and sigmas[-1].item() == pytest.approx(0.003)
    i = torch.arange(100, dtype=torch.float64)
    rho = (10 ** (1 / 7) + i / 99 * (0.003 ** (1 / 7) - 10 ** (1 / 7))) ** 7  # EDM's eq. (5)
    torch.testing.assert_close(sigmas, rho, rtol=1e-12, atol=0)
    estimate = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    assert torch.equal(padis_initial_state("adjoint", estimate, SeedGenerators([0, 1]), 10.0), estimate)
    noise = padis_initial_state("noise", estimate, SeedGenerators([0, 1]), 10.0)
    assert torch.equal(noise, 10.0 * SeedGenerators([0, 1]).randn_like(estimate))
    for bad in [dict(num_steps=1), dict(sigma_min=1.0, sigma_max=1.0)]:
        with pytest.raises(UserError):
            padis_sigmas(**bad)
    for bad in [dict(zeta=-1.0), dict(zeta=0.3, inner_steps=0), dict(zeta=0.3, alpha_factor=0.0)]:
        with pytest.raises(UserError):
            padis(lambda x, s: x, estimate, SeedGenerators([0, 1]), sigmas, PixelMask(torch.ones(1, 1, 4, 4)),
                  estimate, **bad)


# ----------------------------------------------------------------------------
# With the DPS term: towards the posterior.


@pytest.mark.parametrize("zeta, max_ratio", [(1.0, 0.25), (0.0, None)])
def test_dps_term_approaches_the_posterior_mean(zeta, max_ratio):
    # Distance of the mean of 128 samples (20 levels, 10 inner steps, from A^+ y) to the closed-form posterior mean,
    # over that of A^+ y: 0.08 at zeta 1 (Monte-Carlo floor about 0.07); without the DPS term the chain forgets y and
    # lands at the prior mean: 1.9.
    cov = random_covariance(SIZE * SIZE, rank=8, seed=1)
    y, mask, posterior_mean = gaussian_problem(cov, seed=0)
    n = 128
    gen = SeedGenerators(range(n))
    samples = padis(gaussian_denoiser(cov, (1, SIZE, SIZE)), y.expand(n, -1, -1, -1).clone(), gen,
                    padis_sigmas(20), PixelMask(mask), y.expand(n, -1, -1, -1), zeta=zeta)
    if max_ratio is not None:
        assert_close_to_posterior_mean(samples, y, posterior_mean, max_ratio=max_ratio)
    else:
        with pytest.raises(AssertionError):
            assert_close_to_posterior_mean(samples, y, posterior_mean, max_ratio=1.0)


@pytest.mark.parametrize("task", ["mri", "sr", "box", "pixel", "ct"])
def test_padis_with_an_exact_prior_beats_the_classical_baseline(task):
    # reconstruct.py's measurements and method with the exact denoiser of the Gaussian data as the network and
    # PaDIS's defaults (100 levels x 10 inner steps, zeta 0.3, from A^+ y); mean of 4 samples per example, 4
    # examples, against A^+ y (FBP at 6 views for CT). Measured (dB, padis vs baseline): MRI 32.6 vs 9.3, SR 23.5 vs
    # 20.3, box 30.4 vs 22.3, pixels 41.3 vs 16.9, CT 34.9 vs 24.1. Required: half of each gain.
    channels, num, num_seeds = (2 if task == "mri" else 1), 4, 4
    cov = smooth_covariance(channels)
    maps = normalised_maps() if task == "mri" else None
    task_options = tasks.resolve_task_options(task, False, {"views": 6} if task == "ct" else {}, RES)
    examples = [tasks.measure_example(r, task_options) for r in gaussian_records(cov, channels, num, maps)]
    model = methods.Model(CountingNetwork(GaussianNetwork(cov, channels)),
                          kind="mri" if task == "mri" else "image", mask_law=FullMask(), loss_config=None)
    options = methods.MethodOptions(msm_steps=2, num_subsets=1, dc_step=1.0, eta=0.85, outer="ddnm", dps_steps=2,
                                    dps_step=1.0, cs={})
    run = methods.Run(model, task_options, options, torch.device("cpu"))
    pairs = [e for e in examples for _ in range(num_seeds)]

    def score(method):
        images = methods.METHODS[method].run(run, pairs, list(range(len(pairs))))
        means = images.reshape(num, num_seeds, *images.shape[1:]).mean(dim=1)
        return np.mean([evaluation.metric_rows(evaluation.display_images(e.reference, task),
                                                evaluation.display_images(means[j : j + 1], task), task)["psnr"]
                        for j, e in enumerate(examples)])

    gain = {"mri": 23.3, "sr": 3.2, "box": 8.1, "pixel": 24.4, "ct": 10.8}[task]
    baseline = score("fbp" if task == "ct" else "zero-filled")
    assert score("padis") > baseline + gain / 2, baseline


# ----------------------------------------------------------------------------
# reconstruct.py end to end.


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("padis")
    phantoms = make_phantoms(str(root / "phantoms.zip"), num=1, resolution=RES)
    run_cli(["dataset_tool.py", "simulate-mri", "--source", phantoms, "--dest", str(root / "mri"), "--coils", "2"])
    clean_loss = {"class_name": "training.loss.EDMLoss"}
    return {
        "phantoms": phantoms, "mri": str(root / "mri"),
        "clean": write_snapshot(str(root / "clean.pt"), {"kind": "image", "image_shape": [1, RES, RES]}, None, 1,
                                loss=clean_loss),
        "msm": write_snapshot(str(root / "msm.pt"), {"kind": "image", "image_shape": [1, RES, RES]},
                              MeasurementConfig("identity", {"kind": "box", "p": 0.4}).to_config(), 1),
        "mri-clean": write_snapshot(str(root / "mri-clean.pt"), {"kind": "mri", "shape": [RES, RES]}, None, 2,
                                    loss=clean_loss),
    }


TINY = ["--padis-steps", "3", "--inner-steps", "2", "--padis-sigma-max", "5"]


@pytest.mark.parametrize("task, prior", [("mri", "mri-clean"), ("sr", "clean"), ("box", "clean"), ("box", "msm"),
                                         ("pixel", "clean"), ("ct", "clean")])
def test_padis_runs_on_every_task(tmp_path, files, task, prior):
    baseline = "fbp" if task == "ct" else "zero-filled"
    extra = ["--views", "5"] if task == "ct" else []
    run_cli(["reconstruct.py", "--network", files[prior], "--data", files["mri" if task == "mri" else "phantoms"],
             "--task", task, "--num", "1", "--seeds", "0", "--methods", f"padis,{baseline}", *TINY, *extra,
             "--outdir", str(tmp_path)])
    rows = read_rows(tmp_path)
    assert [r["method"] for r in rows] == ["padis", baseline]
    assert all(np.isfinite(float(rows[0][k])) for k in ("psnr", "ssim", "nmse"))
    # levels x inner steps evaluations, each on K copies for an MSM prior's aggregate denoiser (K = 2 for images).
    k = 2 if prior == "msm" else 1
    assert float(rows[0]["nfe"]) == 3 * 2 * k
    settings = json.load(open(tmp_path / "summary.json"))["settings"]["padis"]
    assert {key: settings[key] for key in ("levels", "inner_steps", "alpha_factor", "init", "rho", "norm")} == \
        {"levels": 3, "inner_steps": 2, "alpha_factor": 0.5, "init": "adjoint", "rho": 7, "norm": "rms"}
    zeta = methods.step_default("padis", task, "padis_zeta")  # the task's tuned zeta, else the general one
    assert (settings["zeta"], settings["zeta_default"]) == zeta
    assert settings["sigma_max"] == pytest.approx(5.0) and settings["sigma_min"] == pytest.approx(0.003)
    assert settings["denoiser"] == ("msm-aggregate" if prior == "msm" else "full")


BAD_INPUT = {  # expected words of the one sentence: the padis options after the common arguments
    "--inner-steps must be": ["--inner-steps", "0"],
    "--padis-steps must be": ["--padis-steps", "1"],
    "0 < --padis-sigma-min < --padis-sigma-max": ["--padis-sigma-min", "20"],
    "--padis-zeta": ["--padis-zeta", "-0.1"],
    "--alpha-factor must be > 0": ["--alpha-factor", "0"],
}


@pytest.mark.parametrize("expected", list(BAD_INPUT))
def test_bad_options_are_one_sentence_and_write_nothing(tmp_path, files, capsys, expected):
    outdir = tmp_path / "out"
    code, err = run_in_process(reconstruct.main, ["--network", files["clean"], "--data", files["phantoms"], "--task",
                                                  "box", "--methods", "padis", *BAD_INPUT[expected], "--outdir",
                                                  outdir], capsys)
    assert code == 1 and expected in err and len(err.strip().splitlines()) == 1, err
    assert not outdir.exists()
