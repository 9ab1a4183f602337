"""The step rules and defaults of the exact posterior samplers (ALD, pc-jalal, pc-projection) on closed-form linear
Gaussian problems, assembled as the method registry assembles them (methods.family_pieces, the registry's default
ladder and budget); and the DPS step rule's independence of how a problem is laid out in examples.

Problems (prior N(0, C), C low rank plus diagonal; tests/gaussian.py random_covariance):
- 'dense': a dense A (8 x 16, ||A|| = 1) with noise sigma_y 0.1;
- 'masked': 8 of 16 coordinates measured without noise;
- 'mri': complex multi-coil MRI (2 coils, 4 x 4, maps with sum |S|^2 = 1, half the columns), noise 0.05 per real
  component, on the 32-dimensional real view.
Each runs CHAINS chains from one measurement. The closed-form posterior is N(mu, Sigma). Figures:
The samplers return their last iterate, a sample at the ladder's last level sigma_L, whose exact law is the posterior
convolved with N(0, sigma_L^2 I): the reference is N(mu, Sigma_L), Sigma_L = Sigma + sigma_L^2 I.
- mean error: the RMS over coordinates of (sample mean - mu) / sqrt((Sigma_L)_ii); Monte-Carlo floor
  1 / sqrt(CHAINS) = 0.022;
- covariance error: ||sample covariance - Sigma_L||_F / ||Sigma_L||_F; Monte-Carlo floor about
  sqrt((tr(Sigma)^2 / ||Sigma||_F^2 + 1) / CHAINS), 0.04-0.06 here;
- residual: E ||y - A x||^2 over the chains against the exact ||y - A mu||^2 + tr(A Sigma_L A^T).
The layouts: 'many' runs the chains as CHAINS examples, 'one' as one example holding all of them (the operator and
the denoiser act on each block), which is what an image made of many independent patches looks like to a step rule
with per-example norms.
"""

import json
import math
import os
from dataclasses import replace

import pytest
import torch

from tests.gaussian import random_covariance
from tests.linear_gaussian import BatchGenerator, DenseOperator
from training.operators import MultiCoilMRI
from training.sampling import methods
from training.sampling.conditioning import dps
from training.sampling.solvers import PredictorCorrector
from training.schedules import geometric_ladder

CHAINS, DIM = 2000, 16


def block_denoiser(cov: torch.Tensor):
    """The exact denoiser of N(0, C), C (C + sigma^2 I)^-1 x, on the last axis (every other axis indexes chains), or on
    the flattened image of (N, 2, H, W) MRI chains."""
    eye = torch.eye(cov.shape[0], dtype=torch.float64)

    def denoise(x, sigma):
        flat = x.flatten(1) if x.ndim == 4 else x  # MRI chains (N, 2, H, W); dense chains (..., d)
        w = cov @ torch.linalg.inv(cov + float(sigma) ** 2 * eye)
        return (flat @ w.T).reshape(x.shape)

    return denoise


def dense_problem(kind: str):
    """('dense' | 'masked') -> operator, y (rows,), sigma_y, prior covariance, posterior mean and covariance."""
    g = torch.Generator().manual_seed(0)
    cov = random_covariance(DIM, 4, 10)
    if kind == "dense":
        a, sigma_y = torch.randn(8, DIM, generator=g, dtype=torch.float64), 0.1
        a = a / torch.linalg.matrix_norm(a, 2)
    else:
        a, sigma_y = torch.eye(DIM, dtype=torch.float64)[torch.randperm(DIM, generator=g)[:8]], 0.0
    x = torch.linalg.cholesky(cov) @ torch.randn(DIM, generator=g, dtype=torch.float64)
    y = a @ x + sigma_y * torch.randn(a.shape[0], generator=g, dtype=torch.float64)
    return DenseOperator(a), y, sigma_y, cov, *posterior(a, y, sigma_y, cov)


def posterior(a, y, sigma_y, cov):
    gain = cov @ a.T @ torch.linalg.inv(a @ cov @ a.T + sigma_y**2 * torch.eye(a.shape[0], dtype=torch.float64))
    return gain @ y, cov - gain @ a @ cov


MRI_SIZE, MRI_COILS, MRI_SIGMA_Y = 4, 2, 0.05


def mri_problem(coils: int = MRI_COILS, sigma_y: float = MRI_SIGMA_Y):
    """Complex MRI: operator, mask, y (1, C, H, W), sigma_y, the dense real-view A restricted to measured entries
    (rows over the real and imaginary parts), its y, the prior covariance on the real view, posterior mean and
    covariance. One coil gets unit maps (A A^H = I: the A^+-based projection is exact)."""
    g = torch.Generator().manual_seed(1)
    maps = torch.view_as_complex(torch.randn(1, coils, MRI_SIZE, MRI_SIZE, 2, generator=g, dtype=torch.float64))
    maps = maps / maps.abs().square().sum(dim=1, keepdim=True).sqrt()  # sum_c |S_c|^2 = 1: ||A|| = 1
    if coils == 1:
        maps = torch.ones_like(maps)
    operator = MultiCoilMRI(maps)
    mask = torch.zeros(1, 1, 1, MRI_SIZE, dtype=torch.float64)
    mask[..., ::2] = 1
    dim = 2 * MRI_SIZE * MRI_SIZE
    cov = random_covariance(dim, 6, 11)
    x = (torch.linalg.cholesky(cov) @ torch.randn(dim, generator=g, dtype=torch.float64)).reshape(1, 2, MRI_SIZE,
                                                                                                  MRI_SIZE)
    noise = torch.view_as_complex(torch.randn(1, coils, MRI_SIZE, MRI_SIZE, 2, generator=g, dtype=torch.float64))
    y = (operator.A(x) + sigma_y * noise) * mask
    measured = mask.expand(1, coils, MRI_SIZE, MRI_SIZE).flatten().bool()
    columns = operator.A(torch.eye(dim, dtype=torch.float64).reshape(dim, 2, MRI_SIZE, MRI_SIZE)).reshape(dim, -1)
    a = torch.cat([columns.real.T[measured], columns.imag.T[measured]])
    y_real = torch.cat([y.flatten().real[measured], y.flatten().imag[measured]])
    return operator, mask, y, sigma_y, a, y_real, cov, *posterior(a, y_real, sigma_y, cov)


def figures(samples, sigmas, a, y, mu, sigma_post):
    """(mean error in posterior sds, covariance error, residual / the exact one's) of samples (CHAINS, d). The last
    iterate is a sample at the ladder's last level sigma_L, so its exact law is the posterior convolved with
    N(0, sigma_L^2 I): the reference covariance is Sigma + sigma_L^2 I."""
    reference = sigma_post + sigmas[-1].item() ** 2 * torch.eye(len(mu), dtype=torch.float64)
    mean_error = ((samples.mean(0) - mu) / reference.diagonal().sqrt()).square().mean().sqrt().item()
    cov_error = ((torch.cov(samples.T) - reference).norm() / reference.norm()).item()
    residual = (samples @ a.T - y).square().sum(1).mean().item()
    exact = (a @ mu - y).square().sum().item() + torch.trace(a @ reference @ a.T).item()
    return mean_error, cov_error, residual / exact


def registry_sampler(name: str, task: str, **options):
    """The registry's solver and term for `name` at its defaults for `task` (the ladder and budget of FamilyOptions)."""
    f = replace(methods.FamilyOptions(), **options)
    sigmas = geometric_ladder(f.sigma_max, f.sigma_min, f.levels)
    solver, term, settings = methods.family_pieces(name, f, task, sigmas)
    return solver, term, sigmas, settings


def run_dense(name, kind, layout, **options):
    operator, y, sigma_y, cov, mu, sigma_post = dense_problem(kind)
    solver, term, sigmas, _ = registry_sampler(name, kind, **options)
    shape = (CHAINS, DIM) if layout == "many" else (1, CHAINS, DIM)
    batch = methods.Batch(operator, y.expand(*shape[:-1], len(y)).clone(), None, sigma_y, None, shape)
    gen = BatchGenerator(1)
    x = torch.randn(shape, generator=gen.generator, dtype=torch.float64) * sigmas[0].item()
    out = solver(block_denoiser(cov), x, gen, sigmas, conditioning=term(batch)).reshape(CHAINS, DIM)
    return figures(out, sigmas, operator.matrix, y, mu, sigma_post), solver.evaluations(sigmas)


# The default budget is about 1000 network evaluations (ALD: 333 levels x 3 steps; PC: 332 x (1 + 2)).
# Measured (mean error, covariance error, residual ratio) at the general defaults (step 0.8 sigma^2):
# ald dense 0.127 / 0.110 / 1.08, masked 0.056 / 0.079; pc-jalal dense 0.162 / 0.155 / 1.09, masked 0.071 / 0.097;
# pc-projection masked 0.034 / 0.076. The layouts give the same figures (the rules have no per-example norm).
# Before (NCSNv2's step, Song's snr 0.16 with one corrector step, 100 levels): ald dense 0.57 / 1.63, pc-jalal dense
# 0.60 / 1.12, pc-projection masked 0.45 / 1.05.
EXACT_CASES = [("ald", "dense"), ("ald", "masked"), ("pc-jalal", "dense"), ("pc-jalal", "masked"),
               ("pc-projection", "masked")]


@pytest.mark.parametrize("layout", ["many", "one"])
@pytest.mark.parametrize("name,kind", EXACT_CASES)
def test_exact_samplers_reach_the_posterior_at_their_defaults(name, kind, layout):
    (mean_error, cov_error, residual), nfe = run_dense(name, kind, layout)
    assert 900 <= nfe <= 1100
    assert mean_error < 0.2 and cov_error < 0.2, (name, kind, layout, mean_error, cov_error)
    if kind == "dense":
        assert abs(residual - 1) < 0.1, (name, kind, layout, residual)
    else:  # noiseless: the exact residual is 8 sigma_L^2 (on sigma_L's scale, the chains' last steps see a data
        assert residual < 4, (name, kind, layout, residual)  # curvature 2 / sigma_L^2: measured 1.6-1.7)


@pytest.mark.parametrize("name", ["ald", "pc-jalal", "pc-projection"])
def test_exact_samplers_reach_the_mri_posterior_at_their_defaults(name):
    # pc-projection is exact where A^+ is the projection and y has no noise: single-coil unit maps, noiseless (with
    # 2 coils its A^+-based step is an approximation: 0.54 sds and 92% off).
    projection = name == "pc-projection"
    operator, mask, y, sigma_y, a, y_real, cov, mu, sigma_post = mri_problem(*((1, 0.0) if projection else ()))
    # The general defaults: the 'mri' task's tuned ones are chosen for PSNR on phantoms and may temper the likelihood.
    solver, term, sigmas, settings = registry_sampler(name, "closed-form")
    shape = (CHAINS, 2, MRI_SIZE, MRI_SIZE)
    batch = methods.Batch(operator, y.expand(CHAINS, -1, -1, -1).clone(), mask, sigma_y, None, shape)
    gen = BatchGenerator(2)
    x = torch.randn(shape, generator=gen.generator, dtype=torch.float64) * sigmas[0].item()
    out = solver(block_denoiser(cov), x, gen, sigmas, conditioning=term(batch)).reshape(CHAINS, -1)
    mean_error, cov_error, residual = figures(out, sigmas, a, y_real, mu, sigma_post)
    assert mean_error < 0.2 and cov_error < 0.2, (name, settings, mean_error, cov_error)
    assert residual < 4 if projection else abs(residual - 1) < 0.1, (name, settings, residual)


def test_the_snr_rule_depends_on_the_layout_and_the_fraction_rule_does_not():
    # Song's snr rule takes per-example norms: one example of 2000 chains and 2000 examples of one chain get
    # different steps (the reason it is not the default).
    def run(layout, **options):
        return run_dense("pc-jalal", "dense", layout, levels=100, **options)[0]

    assert run("many") == pytest.approx(run("one"), rel=1e-6)
    assert run("many", snr=0.16) != pytest.approx(run("one", snr=0.16), rel=1e-3)  # measured: cov 0.87 vs 0.79


def test_fraction_steps_are_refused_outside_their_range():
    for bad in (0.0, -0.1, 2.0):
        with pytest.raises(Exception, match="--ald-step"):
            registry_sampler("ald", "dense", ald_step=bad)
        with pytest.raises(Exception, match="--corrector-step"):
            registry_sampler("pc-jalal", "dense", corrector_step=bad)
    with pytest.raises(Exception, match="not both"):
        registry_sampler("pc-jalal", "dense", corrector_step=0.5, snr=0.16)
    with pytest.raises(Exception, match="not both"):
        registry_sampler("ald", "dense", ald_step=0.5, eps=1e-5)


def test_pc_dps_laws_and_their_step_defaults():
    # The law is tuned per task with its step; a law without a step tuned for it takes that law's general step (the
    # laws' steps are in different units). Song's snr rule gives no x0 weight, which the state law needs.
    for task, tuned in [(task, v) for (m, task), v in methods.TUNED_STEP_DEFAULTS.items() if m == "pc-dps"]:
        law, other = tuned["pc_dps_law"], next(x for x in methods.PC_DPS_LAWS if x != tuned["pc_dps_law"])
        settings = registry_sampler("pc-dps", task)[3]
        assert (settings["pc_dps_law"], settings["pc_dps_step"], settings["pc_dps_step_default"]) == (
            law, tuned["pc_dps_step"], "tuned")
        settings = registry_sampler("pc-dps", task, pc_dps_law=other)[3]
        assert (settings["pc_dps_law"], settings["pc_dps_step"], settings["pc_dps_step_default"]) == (
            other, methods.PC_DPS_GENERAL_STEPS[other], "general")
    settings = registry_sampler("pc-dps", "no-such-task")[3]
    assert (settings["pc_dps_law"], settings["pc_dps_step"]) == ("state", methods.PC_DPS_GENERAL_STEPS["state"])
    assert registry_sampler("pc-dps", "mri", pc_dps_law="score", pc_dps_step=5.0)[3]["pc_dps_step"] == 5.0
    with pytest.raises(Exception, match="--snr gives the corrector no weight"):
        registry_sampler("pc-dps", "no-such-task", snr=0.16)
    registry_sampler("pc-dps", "no-such-task", snr=0.16, pc_dps_law="score")
    with pytest.raises(Exception, match="--pc-dps-law must be one of"):
        registry_sampler("pc-dps", "mri", pc_dps_law="ddpm")


# ----------------------------------------------------------------------------
# DPS's step: per RMS residual, the same for every layout.


def dps_chains(norm: str, layout: str, zeta: float):
    """pc-dps's term (the 'score' law) in a short predictor-corrector run on 'dense', laid out as `layout`; returns
    the mean squared residual per measured entry."""
    operator, y, sigma_y, cov, _, _ = dense_problem("dense")
    chains = 256
    shape = (chains, DIM) if layout == "many" else (1, chains, DIM)
    yy = y.expand(*shape[:-1], len(y)).clone()
    sigmas = geometric_ladder(5.0, 0.05, 40)
    gen = BatchGenerator(3)
    x = torch.randn(shape, generator=gen.generator, dtype=torch.float64) * sigmas[0].item()
    out = PredictorCorrector(corrector_steps=1, corrector_step=0.5)(
        block_denoiser(cov), x, gen, sigmas, conditioning=dps(operator, yy, zeta=zeta, norm=norm))
    return (operator.A(out.reshape(chains, DIM)) - y).square().mean().item()


def test_dps_rms_step_does_not_depend_on_the_layout():
    # Measured (mean squared residual per entry; the prior alone 0.188): rms zeta 2: 0.051 as 256 examples, 0.048 as
    # one; DPS's own norm with the same step per chain (zeta sqrt(8)): 0.051 as 256 examples, 0.162 as one.
    many, one = dps_chains("rms", "many", 2.0), dps_chains("rms", "one", 2.0)
    prior = dps_chains("rms", "many", 1e-9)
    assert many < 0.4 * prior  # the term pulls towards y
    assert one == pytest.approx(many, rel=0.15)  # one example's RMS residual is about each chain's
    # DPS's own step per residual norm: the same zeta moves a chain sqrt(256) times less when it shares an example.
    norm_many, norm_one = dps_chains("norm", "many", 2.0 * math.sqrt(8)), dps_chains("norm", "one", 2.0 * math.sqrt(8))
    assert norm_many == pytest.approx(many, rel=1e-6)  # zeta_norm = zeta_rms sqrt(m), m = 8 measured entries
    assert norm_one > 2 * many


# ----------------------------------------------------------------------------
# The tuned defaults.


def test_tuned_defaults_are_the_recorded_validation_choices():
    # methods.TUNED_STEP_DEFAULTS is copied from docs/tuning.json, which bench/tune_methods.py --record writes.
    with open(os.path.join(os.path.dirname(__file__), "..", "..", "docs", "tuning.json")) as f:
        recorded = json.load(f)
    expected = {(method, task): values for task, entry in recorded.items()
                for method, values in entry["chosen"].items()}
    assert methods.TUNED_STEP_DEFAULTS == expected
    for (method, task), values in expected.items():
        assert set(values) <= set(methods.GENERAL_STEP_DEFAULTS[method]), (method, task, values)


def test_a_given_value_wins_over_the_tuned_and_the_general_default():
    (method, task), values = next(iter(methods.TUNED_STEP_DEFAULTS.items()))
    parameter, tuned = next(iter(values.items()))
    assert methods.step_default(method, task, parameter) == (tuned, "tuned")
    assert methods.step_default(method, task, parameter, 0.123) == (0.123, "given")
    general = methods.GENERAL_STEP_DEFAULTS[method][parameter]
    assert methods.step_default(method, "no-such-task", parameter) == (general, "general")
