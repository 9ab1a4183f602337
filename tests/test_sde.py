"""training/sde.py on closed forms (SEED_METHODS.md 2.5 and 3.5): Gaussian data N(0, s^2 I) has the exact denoiser
s^2 / (s^2 + sigma^2) x, and with a linear operator the annealed Langevin targets and the posterior are Gaussians
with known moments (tests/linear_gaussian.py)."""

import math

import numpy as np
import pytest
import scipy.optimize
import torch

from dnnlib import UserError
from tests.linear_gaussian import BatchGenerator, DenseOperator, annealed_target, isotropic_denoiser, moments
from torch_utils.misc import SeedGenerators
from training.conditioning import jalal, projection
from training.operators import MultiCoilMRI, measure
from training.sde import (
    ald_initial_state,
    ald_step_sizes,
    annealed_langevin,
    auto_eps,
    corrector_step_size,
    euler_maruyama,
    geometric_ladder,
    langevin_corrector,
    ncsnv2_criterion,
    predictor_corrector,
    probability_flow,
    warm_start,
)

S = 1.0  # prior std of the linear-Gaussian problems


def dense_problem(seed=1, dim=4, rows=3, sigma_y=0.1):
    g = torch.Generator().manual_seed(seed)
    operator = DenseOperator(torch.randn(rows, dim, generator=g, dtype=torch.float64) / 2)
    x_true = torch.randn(dim, generator=g, dtype=torch.float64) * S
    y = operator.A(x_true) + sigma_y * torch.randn(rows, generator=g, dtype=torch.float64)
    return operator, None, y, operator.matrix.T @ operator.matrix, operator.AH(y)


def mri_problem(sigma_y=0.1, size=3, coils=2):
    """Masked multi-coil MRI at an odd size, complex128 maps; the real view has 2 size^2 dimensions."""
    g = torch.Generator().manual_seed(4)
    maps = torch.randn(1, coils, size, size, 2, generator=g, dtype=torch.float64)
    operator = MultiCoilMRI(torch.view_as_complex(maps) / math.sqrt(2 * coils))
    mask = (torch.rand(1, 1, size, size, generator=g) < 0.5).to(torch.float64)
    x_true = torch.randn(1, 2, size, size, generator=g, dtype=torch.float64) * S
    y = measure(operator, x_true, mask, sigma_y, g)
    dim = 2 * size * size
    basis = torch.eye(dim, dtype=torch.float64).reshape(dim, 2, size, size)
    normal = operator.AH(operator.A(basis) * mask).reshape(dim, dim)
    return operator, mask, y, normal, operator.AH(y).reshape(dim)


def flat_view(x):
    """(N, 2, H, W) MRI chains -> (N, d), the real view used by the closed forms."""
    return x.reshape(x.shape[0], -1)


# ----------------------------------------------------------------------------
# Ladder and step rule.


def test_ladder_step_sizes_and_auto_eps():
    sigmas = geometric_ladder(50.0, 0.01, 100)
    rate = (0.01 / 50.0) ** (1 / 99)
    assert sigmas[0].item() == 50.0 and sigmas[-1].item() == pytest.approx(50.0 * rate**99, rel=1e-12)
    assert torch.allclose(sigmas[1:] / sigmas[:-1], torch.full((99,), rate, dtype=torch.float64), rtol=1e-12)
    alphas = ald_step_sizes(sigmas, 3e-6)
    assert alphas[-1].item() == pytest.approx(3e-6, rel=1e-12)
    assert torch.allclose(alphas / alphas[-1], (sigmas / sigmas[-1]) ** 2, rtol=1e-12)
    # The automatic eps brings NCSNv2's criterion as close to 1 as the best eps scipy finds (the criterion has a
    # minimum above 1 for such ladders, so "closest to 1" is a minimisation), up to the grid's resolution.
    steps_each = 5
    eps = auto_eps(sigmas, steps_each)

    def distance(log_u):
        return abs(ncsnv2_criterion(10**log_u * 0.01**2, 0.01, 1 / rate, steps_each) - 1)

    best = scipy.optimize.minimize_scalar(distance, bounds=(-12, 0), method="bounded", options={"xatol": 1e-10})
    assert distance(math.log10(eps / 0.01**2)) <= best.fun + 1e-6
    assert eps == pytest.approx(10**best.x * 0.01**2, rel=3e-3)  # one grid step is a factor 10^(12 / 10000)
    for bad in [(1.0, 2.0, 10), (1.0, 1.0, 10), (1.0, 0.1, 1)]:
        with pytest.raises(UserError):
            geometric_ladder(*bad)


def counting_denoiser(log):
    def denoise(x, sigma):
        log.append(sigma)
        return isotropic_denoiser(S)(x, sigma)

    return denoise


def test_ald_sigma_offset_dc_boost_zero_and_seed_independence():
    sigmas = geometric_ladder(2.0, 0.1, 6)
    alphas = ald_step_sizes(sigmas, 1e-3)
    operator, _, y, _, _ = dense_problem()
    x = ald_initial_state("noise", (3, 4), SeedGenerators([7, 8, 9]), sigmas[0].item())
    # --sigma-offset k: L - k levels starting at sigmas[k], each visited steps_each times.
    log = []
    out = annealed_langevin(counting_denoiser(log), x, SeedGenerators([7, 8, 9]), sigmas, alphas, 3, sigma_offset=2)
    assert log == [s for s in sigmas[2:].tolist() for _ in range(3)]
    assert torch.equal(out, annealed_langevin(isotropic_denoiser(S), x, SeedGenerators([7, 8, 9]), sigmas[2:],
                                              alphas[2:], 3))
    # dc_boost = 0 is prior sampling, iterate for iterate (each prefix of the ladder is the chain up to that level),
    # and dc_boost > 0 is not.
    for k in range(1, len(sigmas) + 1):
        prior = annealed_langevin(isotropic_denoiser(S), x, SeedGenerators([7, 8, 9]), sigmas[:k], alphas[:k], 2)
        zero = annealed_langevin(isotropic_denoiser(S), x, SeedGenerators([7, 8, 9]), sigmas[:k], alphas[:k], 2,
                                 conditioning=jalal(operator, y, sigma_y=0.1, scale=0.0))
        assert torch.equal(prior, zero)
    boosted = annealed_langevin(isotropic_denoiser(S), x, SeedGenerators([7, 8, 9]), sigmas, alphas, 2,
                                conditioning=jalal(operator, y, sigma_y=0.1, scale=1.0))
    assert not torch.allclose(boosted, prior)
    # A sample depends only on its seed.
    alone = annealed_langevin(isotropic_denoiser(S), x[1:2], SeedGenerators([8]), sigmas, alphas, 2)
    assert torch.equal(alone[0], prior[1])
    with pytest.raises(UserError, match="steps-each"):
        annealed_langevin(isotropic_denoiser(S), x, SeedGenerators([7, 8, 9]), sigmas, alphas, 0)
    with pytest.raises(UserError, match="sigma-offset"):
        annealed_langevin(isotropic_denoiser(S), x, SeedGenerators([7, 8, 9]), sigmas, alphas, 1, sigma_offset=6)


# ----------------------------------------------------------------------------
# ALD at a fixed level and down a ladder, against the annealed Gaussian targets.


@pytest.mark.parametrize("problem", ["dense", "mri"])
def test_ald_fixed_level_matches_annealed_target(problem):
    sigma, sigma_y, chains = 0.3, 0.1, 3000
    operator, mask, y, normal, adjoint_y = dense_problem() if problem == "dense" else mri_problem(sigma_y)
    steps = 1500 if problem == "dense" else 800  # about 11 relaxation times of the slowest direction
    mean, cov, precision = annealed_target(normal, adjoint_y, S, sigma_y, sigma)
    alpha = 0.1 / torch.linalg.eigvalsh(precision).max().item()
    shape = (chains, normal.shape[0]) if problem == "dense" else (chains, 2, *y.shape[-2:])
    x0 = BatchGenerator(0).randn_like(torch.zeros(shape, dtype=torch.float64))
    cond = jalal(operator, y, mask, sigma_y=sigma_y)

    def run(noise_boost):
        out = annealed_langevin(isotropic_denoiser(S), x0, BatchGenerator(2), torch.tensor([sigma]),
                                torch.tensor([alpha]), steps, noise_boost=noise_boost, conditioning=cond)
        return moments(flat_view(out) if problem == "mri" else out)

    emp_mean, emp_cov, se_mean, se_cov = run(1.0)
    # The unadjusted step's exact stationary covariance (Lambda - alpha Lambda^2 / 2)^-1: its distance to the target
    # is the O(alpha) bias allowed on top of the Monte Carlo error.
    bias = (torch.linalg.inv(precision - alpha * precision @ precision / 2) - cov).abs()
    assert ((emp_mean - mean).abs() <= 4.5 * se_mean).all()
    assert ((emp_cov - cov).abs() <= 4.5 * se_cov + bias).all()
    # noise_boost = 0.5 (the reference's complex noise) samples at temperature 1/2: half the covariance.
    _, half_cov, _, half_se = run(0.5)
    assert ((half_cov - cov / 2).abs() <= 4.5 * half_se + bias).all()
    assert ((half_cov - cov).abs() > 4.5 * half_se + bias).any()


def propagated_ald_moments(normal, adjoint_y, sigma_y, sigmas, alphas, steps_each, mean, cov):
    """The exact mean and covariance after linear-Gaussian ALD (the update is affine in x plus Gaussian noise)."""
    dim = normal.shape[0]
    for sigma, alpha in zip(sigmas.tolist(), alphas.tolist(), strict=True):
        _, _, precision = annealed_target(normal, adjoint_y, S, sigma_y, sigma)
        contraction = torch.eye(dim, dtype=torch.float64) - alpha * precision
        drift = alpha * adjoint_y / (sigma_y**2 + sigma**2)
        for _ in range(steps_each):
            mean, cov = contraction @ mean + drift, contraction @ cov @ contraction.T + 2 * alpha * torch.eye(dim)
    return mean, cov


def test_ald_ladder_approaches_posterior_as_last_level_goes_to_zero():
    sigma_y, chains, steps_each = 0.1, 4000, 100
    operator, _, y, normal, adjoint_y = dense_problem()
    post_mean, post_cov, post_precision = annealed_target(normal, adjoint_y, S, sigma_y, 0.0)
    errors = []
    for sigma_last in (0.3, 0.03):
        sigmas = geometric_ladder(3.0, sigma_last, 50)
        # The largest eps that keeps alpha_i lambda_max(level i) <= 0.5 at every level.
        eps = min(0.5 / (a / sigma_last**2 * torch.linalg.eigvalsh(annealed_target(
            normal, adjoint_y, S, sigma_y, sig)[2]).max().item()) for sig, a in zip(sigmas.tolist(),
                                                                                       (sigmas**2).tolist()))
        alphas = ald_step_sizes(sigmas, eps)
        start = BatchGenerator(0).randn_like(torch.zeros(chains, 4, dtype=torch.float64)) * sigmas[0].item()
        out = annealed_langevin(isotropic_denoiser(S), start, BatchGenerator(3), sigmas, alphas, steps_each,
                                conditioning=jalal(operator, y, sigma_y=sigma_y))
        exact_mean, exact_cov = propagated_ald_moments(normal, adjoint_y, sigma_y, sigmas, alphas, steps_each,
                                                       torch.zeros(4, dtype=torch.float64),
                                                       sigmas[0].item() ** 2 * torch.eye(4, dtype=torch.float64))
        emp_mean, emp_cov, se_mean, se_cov = moments(out)
        assert ((emp_mean - exact_mean).abs() <= 4.5 * se_mean).all()
        assert ((emp_cov - exact_cov).abs() <= 4.5 * se_cov).all()
        errors.append(((exact_cov - post_cov).norm() / post_cov.norm()).item()
                      + ((exact_mean - post_mean).norm() / post_mean.norm()).item())
    assert errors[1] < 0.08 and errors[0] > 0.5  # 0.03 lands near the posterior, 0.3 does not


# ----------------------------------------------------------------------------
# Euler-Maruyama, corrector, predictor-corrector.


def one_example_chains(shape, sigma):
    """Chains (1, 1, chains, d) as ONE example: the corrector's step rule takes per-example norms, and it is meant
    for high dimension, where ||score|| concentrates. With a few dimensions per example, the state-dependent step
    2 (snr sqrt(d) / ||score(x)||)^2 biases the chain's stationary law (by about 20% in variance at d = 4)."""
    return BatchGenerator(0).randn_like(torch.zeros(1, 1, *shape, dtype=torch.float64)) * sigma


def pixel_chains(variance, size=200_000, seed=0):
    """One 'image' of `size` i.i.d. pixels N(0, variance): an isotropic prior's chains in one SeedGenerators draw."""
    return SeedGenerators([seed]).randn((1, 1, 1, size), dtype=torch.float64) * math.sqrt(variance)


@pytest.mark.parametrize("sde", ["ve", "vp"])
def test_euler_maruyama_ends_at_data_plus_sigma_min(sde):
    s, sigma_max, sigma_min = 0.5, 20.0, 0.02
    target = s**2 + sigma_min**2
    errors = []
    for steps in (8, 64, 1024):
        sigmas = geometric_ladder(sigma_max, sigma_min, steps + 1)
        out = euler_maruyama(isotropic_denoiser(s), pixel_chains(s**2 + sigma_max**2, size=100_000),
                             SeedGenerators([1]), sigmas, sde=sde)
        errors.append(abs(out.var().item() / target - 1))
    # Monte Carlo: the variance of 1e5 samples has relative standard error sqrt(2 / 1e5) = 0.45%. The VE error is
    # exactly the recursion v' = v (1 - d / (s^2 + sigma^2))^2 + d, d = sigma^2 - sigma_next^2: 168%, 12%, 0.7%.
    assert errors[0] > 0.5 and 0.05 < errors[1] < 0.3 and errors[2] < 0.02


def test_corrector_step_rule_and_invariance():
    s, sigma, snr = 0.5, 0.4, 0.2
    v = s**2 + sigma**2
    x = pixel_chains(v)
    score = (isotropic_denoiser(s)(x, sigma) - x) / sigma**2
    eps = corrector_step_size(score, snr).item()
    assert eps == pytest.approx(2 * (snr * math.sqrt(x.numel()) / score.norm().item()) ** 2, rel=1e-12)
    assert eps == pytest.approx(2 * snr**2 * v, rel=0.01)  # ||score||^2 = ||x||^2 / v^2 ~ d / v
    out = langevin_corrector(isotropic_denoiser(s), x, SeedGenerators([3]), sigma, 1, snr)
    # Exactly: v' = v (1 - eps / v)^2 + 2 eps = v + eps^2 / v, an O(eps^2) change of the marginal.
    assert out.var().item() / v - 1 == pytest.approx((eps / v) ** 2, abs=0.013)
    assert abs(out.var().item() / v - 1) < 0.013 + 1.5 * (eps / v) ** 2


def test_predictor_corrector_with_jalal_approaches_posterior():
    sigma_y, chains = 0.1, 4000
    operator, _, y, normal, adjoint_y = dense_problem()
    post_mean, post_cov, _ = annealed_target(normal, adjoint_y, S, sigma_y, 0.0)
    sigmas = geometric_ladder(5.0, 0.01, 100)
    start = one_example_chains((chains, 4), 5.0)
    out = predictor_corrector(isotropic_denoiser(S), start, BatchGenerator(5), sigmas, corrector_steps=20, snr=0.16,
                              conditioning=jalal(operator, y, sigma_y=sigma_y))
    emp_mean, emp_cov, se_mean, se_cov = moments(out)
    _, level_cov, _ = annealed_target(normal, adjoint_y, S, sigma_y, 0.01)
    # Allowed: Monte Carlo, the last level's distance to the posterior, and 2% for the steps' discretisation.
    level_bias = (level_cov - post_cov).abs() + 0.02 * post_cov.abs().max()
    assert ((emp_mean - post_mean).abs() <= 4.5 * se_mean + 0.02 * post_mean.abs().max()).all()
    assert ((emp_cov - post_cov).abs() <= 4.5 * se_cov + level_bias).all()


def test_predictor_corrector_with_projection_samples_noiseless_posterior():
    """For an isotropic prior and noiseless y, the projected Tweedie estimate is the exact conditional denoiser, so
    PC + projection samples N(A^+ y, s^2 (I - A^+ A))."""
    g = torch.Generator().manual_seed(2)
    operator = DenseOperator(torch.randn(2, 4, generator=g, dtype=torch.float64))
    y = operator.A(torch.randn(4, generator=g, dtype=torch.float64))
    post_mean = operator.pinv(y)
    post_cov = S**2 * (torch.eye(4, dtype=torch.float64) - operator.pseudo_inverse @ operator.matrix)
    sigmas = geometric_ladder(5.0, 0.01, 100)
    out = predictor_corrector(isotropic_denoiser(S), one_example_chains((3000, 4), 5.0), BatchGenerator(6), sigmas,
                              corrector_steps=2, snr=0.1, conditioning=projection(operator, y), final_denoise=True)
    emp_mean, emp_cov, se_mean, se_cov = moments(out)
    assert ((emp_mean - post_mean).abs() <= 4.5 * se_mean + 1e-9).all()
    assert ((emp_cov - post_cov).abs() <= 4.5 * se_cov + 0.04 * post_cov.abs().max()).all()
    assert (operator.A(out) - y).abs().max() < 1e-10  # the output is consistent with y


def test_predictor_corrector_with_projection_on_masked_mri():
    """Single-coil MRI with unit maps (A A^H = I, so the A^+-based step is the exact projection) and an isotropic
    prior: k-space is the image's orthonormal transform, so the posterior keeps the measured entries and leaves every
    unmeasured real component N(0, s^2)."""
    g = torch.Generator().manual_seed(3)
    size, chains = 15, 64
    operator = MultiCoilMRI(torch.ones(1, 1, size, size, dtype=torch.complex128))
    mask = (torch.rand(1, 1, size, size, generator=g) < 0.4).to(torch.float64)
    y = measure(operator, torch.randn(1, 2, size, size, generator=g, dtype=torch.float64), mask)
    start = SeedGenerators(range(chains)).randn((chains, 2, size, size), dtype=torch.float64) * 5.0
    out = predictor_corrector(isotropic_denoiser(S), start, SeedGenerators(range(chains)),
                              geometric_ladder(5.0, 0.01, 100), corrector_steps=2, snr=0.1,
                              conditioning=projection(operator, y, mask), final_denoise=True)
    kspace = operator.A(out)
    assert ((kspace - y) * mask).abs().max() < 1e-10
    free = torch.view_as_real(kspace[:, 0][(mask[0, 0] == 0).expand(chains, size, size)]).flatten()
    assert free.mean().abs().item() < 4.5 / math.sqrt(free.numel())
    assert free.var().item() == pytest.approx(S**2, abs=4.5 * math.sqrt(2 / free.numel()) + 0.03)


# ----------------------------------------------------------------------------
# Probability flow and warm start.


def test_probability_flow_closed_form_both_directions():
    s = 0.5
    x = pixel_chains(1.0, size=1000)

    def exact(x, a, b):
        return x * math.sqrt((s**2 + b**2) / (s**2 + a**2))

    errors, errors_up = [], []
    for steps in (4, 8, 16):
        down = geometric_ladder(10.0, 0.05, steps + 1)
        errors.append((probability_flow(isotropic_denoiser(s), x, down) - exact(x, 10.0, 0.05)).abs().max().item())
        up = probability_flow(isotropic_denoiser(s), x, down.flip(0))
        errors_up.append((up / exact(x, 0.05, 10.0) - 1).abs().max().item())
    assert errors[0] / errors[1] > 3 and errors[1] / errors[2] > 3  # second order
    assert errors_up[0] / errors_up[1] > 3 and errors_up[1] / errors_up[2] > 3
    assert errors[2] < 1e-2 and errors_up[2] < 0.05
    round_trip = probability_flow(isotropic_denoiser(s), probability_flow(isotropic_denoiser(s), x,
                                                                          geometric_ladder(10.0, 0.05, 65)),
                                  geometric_ladder(10.0, 0.05, 65).flip(0))
    assert torch.allclose(round_trip, x, rtol=1e-3, atol=1e-4)
    with pytest.raises(ValueError):
        probability_flow(isotropic_denoiser(s), x, torch.tensor([1.0, 2.0, 1.5]))


def test_warm_start_index_and_variance():
    sigmas = geometric_ladder(10.0, 0.01, 50)
    truth = torch.zeros(1, 1, 1, 100_000, dtype=torch.float64) + 0.3
    x, tail = warm_start(truth, sigmas, SeedGenerators([4]), fraction=0.33)
    i0 = math.ceil(0.33 * 50)  # 17
    assert torch.equal(tail, sigmas[i0:])
    assert (x - truth).std().item() == pytest.approx(sigmas[i0].item(), rel=0.01)
    again, _ = warm_start(truth, sigmas, SeedGenerators([4]), fraction=0.33)
    assert torch.equal(x, again)
    _, tail = warm_start(truth, sigmas, SeedGenerators([4]), start_sigma=1.0)
    assert tail[0].item() <= 1.0 < sigmas[len(sigmas) - len(tail) - 1].item()
    with pytest.raises(UserError):
        warm_start(truth, sigmas, SeedGenerators([4]), start_sigma=1e-3)
    assert np.isfinite(x.numpy()).all()
