"""Posterior sampling: data-consistency steps, and posterior means of exact Gaussian priors against the closed form.

The Gaussian tests measure y = M x + sigma_y n on 8x8 real images (x ~ N(0, C), M a fixed random pixel mask, sigma_y
0.01) and compare the sample mean of a posterior sampler with the closed-form posterior mean
mu = C A^T (A C A^T + sigma_y^2 I)^{-1} y (A: the rows of the identity at the measured pixels). Unmeasured pixels are
predicted from correlated measured ones, so the zero-filled A^+ y is far from mu.

Which prior is fair: with correlated C the MSM score is a product of partial experts, not the data prior (MSM.md
section 1), so an MSM sampler with a partial mask law would target another distribution. The MSM test therefore uses
a covariance whose units are the mask law's: columns are independent (C = C_col (x) I over columns, each column
correlated along its rows) and the law draws whole columns, so the partial denoiser P D(P z) is exact and the MSM
score equals the data score. The full-denoiser tests (MSM sampler with the full mask law, which is what an oracle
model runs, and DPS) use a general low-rank-plus-diagonal C.
"""


import numpy as np
import pytest
import torch

from tests.gaussian import gaussian_denoiser, random_covariance
from tests.sampling.conftest import dps_generate, edm_generate, msm_posterior
from torch_utils.misc import SeedGenerators
from training.masks import FullMask, RandomLineMaskLaw
from training.operators import AvgPoolSR, BoxInpainting, MultiCoilMRI, PixelMask, complex_to_channels
from training.sampling.baselines import cs_mri, zero_filled
from training.sampling.conditioning import Step, dps_gradient, msm_aggregate_step, msm_partial_step
from training.sampling.denoisers import MSMAggregate
from training.sampling.solvers import Ancestral, noise_start
from training.schedules import (
    ddpm_sigmas,
    respaced_sigmas,
)

SIZE, SIGMA_Y = 8, 0.01


# ----------------------------------------------------------------------------
# Data-consistency steps.


def test_partial_dc_with_lambda_one_puts_y_on_measured_entries_of_each_estimate():
    g = torch.Generator().manual_seed(0)
    shape = (3, 4, 8, 8)
    y_mask = (torch.rand(3, 1, 1, 8, generator=g) < 0.5).to(torch.float32)
    y = torch.complex(torch.randn(shape, generator=g), torch.randn(shape, generator=g)) * y_mask
    estimate_mask = (torch.rand(3, 1, 1, 8, generator=g) < 0.5).to(torch.float32)
    estimate = torch.complex(torch.randn(shape, generator=g), torch.randn(shape, generator=g)) * estimate_mask
    out = msm_partial_step(y, y_mask, 1.0)(estimate, estimate_mask, 1.0)
    both = (y_mask * estimate_mask).expand(shape).bool()
    assert torch.equal(out[both], y[both])  # measured and covered: exactly y
    only_estimate = (estimate_mask * (1 - y_mask)).expand(shape).bool()
    assert torch.equal(out[only_estimate], estimate[only_estimate])  # not measured: untouched
    uncovered = ~estimate_mask.expand(shape).bool()
    assert torch.equal(out[uncovered], torch.zeros_like(out[uncovered]))
    reflected = msm_partial_step(y, y_mask, 2.0)(estimate, estimate_mask, 1.0)
    assert torch.allclose(reflected[both], 2 * y[both] - estimate[both])  # lambda = 2 reflects about y


@pytest.mark.parametrize("operator", [AvgPoolSR(4), BoxInpainting(8, 4),
                                      PixelMask((torch.arange(64).reshape(1, 1, 8, 8) % 3 == 0).float())])
def test_aggregate_dc_with_lambda_one_makes_the_estimate_consistent(operator):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64)
    y = operator.A(x) + 0.1 * operator.A(torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64))
    z_hat = torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64)
    out = msm_aggregate_step(operator, y, 1.0)(lambda x, sigma: z_hat, z_hat, Step(1.0, 0.0, 1.0))
    assert torch.allclose(operator.A(out), y, atol=1e-12)
    assert not torch.allclose(operator.A(z_hat), y)


def test_bad_dc_steps_are_refused():
    y = torch.zeros(1, 1, 8, 8)
    for bad in (0.0, -1.0):
        with pytest.raises(Exception, match="--dc-step"):
            msm_partial_step(y, y, bad)
        with pytest.raises(Exception, match="--dc-step"):
            msm_aggregate_step(PixelMask(torch.ones(1, 1, 8, 8)), y, bad)


# ----------------------------------------------------------------------------
# Gaussian posterior means.


def gaussian_problem(cov: torch.Tensor, seed: int):
    """A measurement of one draw x ~ N(0, cov) -> (y (1,1,8,8), M (1,1,8,8), closed-form posterior mean)."""
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(1, 1, SIZE, SIZE, generator=g) < 0.5).to(torch.float64)
    x = torch.linalg.cholesky(cov) @ torch.randn(SIZE * SIZE, generator=g, dtype=torch.float64)
    y = (x.reshape(mask.shape) + SIGMA_Y * torch.randn(mask.shape, generator=g, dtype=torch.float64)) * mask
    measured = mask.flatten().bool()
    A = torch.eye(SIZE * SIZE, dtype=torch.float64)[measured]
    gram = A @ cov @ A.T + SIGMA_Y**2 * torch.eye(int(measured.sum()), dtype=torch.float64)
    posterior_mean = cov @ A.T @ torch.linalg.solve(gram, y.flatten()[measured])
    return y, mask, posterior_mean.reshape(mask.shape)


def column_covariance() -> torch.Tensor:
    """Independent columns, each with a smooth (squared-exponential, length 2) covariance along its rows; the flat
    index is h * W + w, so C = C_col (x) I_W."""
    rows = torch.arange(SIZE, dtype=torch.float64)
    c_col = 0.25 * torch.exp(-((rows[:, None] - rows[None]) ** 2) / 8) + 0.01 * torch.eye(SIZE, dtype=torch.float64)
    return torch.kron(c_col, torch.eye(SIZE, dtype=torch.float64))


def assert_close_to_posterior_mean(samples, y, posterior_mean, max_ratio):
    error = (samples.mean(dim=0) - posterior_mean[0]).norm().item()
    zero_filled_error = (y - posterior_mean).norm().item()
    assert error < max_ratio * zero_filled_error, (error, zero_filled_error)


# Measured (mean error, zero-filled error): the stochastic sampler 0.48, Monte-Carlo floor sqrt(tr(posterior cov) / n)
# = 0.21, zero-filled 2.90; Heun 1.06 against 3.03 (ratio 0.35; lambda 1: 0.53; no DC: 4.47, the prior mean's error).
# An ODE with a DC step is not a posterior sampler, and it shows.
@pytest.mark.parametrize("solver, options, max_ratio", [
    ("ancestral", dict(sigmas=respaced_sigmas(100), outer="ddnm", eta=0.85), 0.3),
    ("heun", dict(num_steps=32), 0.45),
])
def test_msm_posterior_with_exact_column_experts_approaches_the_posterior_mean(solver, options, max_ratio):
    # K = 3 masks of 2 of the 8 columns per level: some columns keep the previous level's estimate, as in real use;
    # partial DC (MRI's placement) with its default lambda 2, for the stochastic sampler and the Heun variant.
    cov = column_covariance()
    y, mask, posterior_mean = gaussian_problem(cov, seed=2)
    full = gaussian_denoiser(cov, (1, SIZE, SIZE))
    exact_partial = lambda s, partial_mask, sigma: partial_mask * full(s, sigma)
    n = 64
    gen = SeedGenerators(range(n))
    latents = gen.randn([n, 1, SIZE, SIZE], dtype=torch.float64)
    samples = msm_posterior(exact_partial, latents, RandomLineMaskLaw(4, 0), gen, y.expand(n, -1, -1, -1),
                            placement="partial", mask=mask, dc_step=2.0, num_subsets=3, solver=solver,
                            **options)
    assert_close_to_posterior_mean(samples, y, posterior_mean, max_ratio=max_ratio)


def test_full_law_msm_posterior_approaches_the_posterior_mean():
    cov = random_covariance(SIZE * SIZE, rank=8, seed=1)
    y, mask, posterior_mean = gaussian_problem(cov, seed=0)
    full = gaussian_denoiser(cov, (1, SIZE, SIZE))
    n, sigmas = 128, respaced_sigmas(100)
    gen = SeedGenerators(range(n))
    latents = gen.randn([n, 1, SIZE, SIZE], dtype=torch.float64)
    ys = y.expand(n, -1, -1, -1)
    # An oracle model's run: the full mask law, DC on the aggregate (image placement) with the default lambda.
    samples = msm_posterior(lambda s, m, sigma: m * full(s, sigma), latents, FullMask(), gen, ys,
                            placement="aggregate", operator=PixelMask(mask), dc_step=1.75, num_subsets=1,
                            sigmas=sigmas, outer="ddnm", eta=0.85)
    # Measured at n = 256: 0.11 against zero-filled 1.59 (Monte-Carlo floor at n = 128: 0.12).
    assert_close_to_posterior_mean(samples, y, posterior_mean, max_ratio=0.2)


def test_heun_posterior_with_the_full_law_is_edm_heun_on_the_consistent_denoiser():
    # solver 'heun' with a law that always covers everything is EDM's Heun sampler (no churn) whose denoiser is
    # D followed by the aggregate DC step: the same float64 numbers, written independently of the MSM plumbing.
    cov = random_covariance(SIZE * SIZE, rank=8, seed=1)
    y, mask, _ = gaussian_problem(cov, seed=0)
    full = gaussian_denoiser(cov, (1, SIZE, SIZE))
    n, operator = 4, PixelMask(mask)
    ys = y.expand(n, -1, -1, -1)
    gen = SeedGenerators(range(n))
    latents = gen.randn([n, 1, SIZE, SIZE], dtype=torch.float64)
    ours = msm_posterior(lambda s, m, sigma: m * full(s, sigma), latents, FullMask(), gen, ys,
                         placement="aggregate", operator=operator, dc_step=1.75, solver="heun",
                         num_subsets=1, num_steps=12)
    dc = msm_aggregate_step(operator, ys, 1.75)
    reference = edm_generate(lambda x, sigma: dc(full, x, Step(sigma, 0.0, 1.0)), latents, SeedGenerators(range(n)),
                             num_steps=12, sigma_max=80.0)
    torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-12)


def test_full_mask_law_evaluates_the_denoiser_once_per_level():
    # An oracle model runs the MSM sampler with the full mask law, whose K masks are all P = I: K identical network
    # evaluations per level before the fix, one now, with the same samples.
    cov = random_covariance(SIZE * SIZE, rank=8, seed=1)
    full = gaussian_denoiser(cov, (1, SIZE, SIZE))
    rows = []

    def counting(s, m, sigma):
        rows.append(s.shape[0])
        return m * full(s, sigma)

    n, sigmas = 4, respaced_sigmas(10)
    results = []
    for num_subsets in (1, 3):
        gen = SeedGenerators(range(n))
        latents = gen.randn([n, 1, SIZE, SIZE], dtype=torch.float64)
        aggregate = MSMAggregate(counting, FullMask(), gen, num_subsets)
        results.append(Ancestral()(aggregate, noise_start(latents, sigmas[0].item(), "single"), gen, sigmas))
    assert rows == [n] * (2 * len(sigmas))
    assert torch.equal(results[0], results[1])


# ----------------------------------------------------------------------------
# DPS.


def linear_problem(operator_name: str):
    """An exact linear denoiser W = C (C + s^2 I)^{-1} on (1 or 2, 8, 8) images, an operator with its dense matrix
    (real adjoint: A^T r = AH(r) for the real inner product Re <., .>), a mask, a measurement and a state."""
    g = torch.Generator().manual_seed(4)
    channels = 2 if operator_name == "mri" else 1
    shape = (channels, SIZE, SIZE)
    cov = random_covariance(channels * SIZE * SIZE, rank=6, seed=2)
    if operator_name == "mri":
        maps = torch.complex(torch.randn(1, 3, SIZE, SIZE, generator=g, dtype=torch.float64),
                             torch.randn(1, 3, SIZE, SIZE, generator=g, dtype=torch.float64))
        operator, mask = MultiCoilMRI(maps), (torch.rand(1, 1, 1, SIZE, generator=g) < 0.5).to(torch.float64)
    else:
        mask = (torch.rand(1, 1, SIZE, SIZE, generator=g) < 0.5).to(torch.float64)
        operator = PixelMask(mask)
    x_true = torch.randn(2, *shape, generator=g, dtype=torch.float64) * 0.5
    y = operator.A(x_true) * mask
    state = torch.randn(2, *shape, generator=g, dtype=torch.float64) * 1.5
    return gaussian_denoiser(cov, shape), cov, operator, mask, y, state


@pytest.mark.parametrize("operator_name", ["pixel", "mri"])
def test_dps_gradient_is_the_closed_form_for_a_linear_denoiser(operator_name):
    # ||r|| with r = M (y - A W x): grad = -W^T A^T M r / ||r|| (unsquared), -2 W^T A^T M r (squared); W symmetric.
    denoiser, cov, operator, mask, y, x = linear_problem(operator_name)
    sigma = 0.7
    W = cov @ torch.linalg.inv(cov + sigma**2 * torch.eye(len(cov), dtype=torch.float64))
    residual = (y - operator.A(denoiser(x, sigma))) * mask
    back = operator.AH(residual * mask).reshape(len(x), -1) @ W.T
    norms = residual.flatten(1).abs().square().sum(dim=1).sqrt()
    grad, x0_hat = dps_gradient(denoiser, x, sigma, operator, y, mask)
    assert torch.allclose(x0_hat, denoiser(x, sigma), atol=1e-12)
    assert (grad.reshape(len(x), -1) - (-back / norms[:, None])).abs().max() < 1e-6
    squared, _ = dps_gradient(denoiser, x, sigma, operator, y, mask, squared=True)
    assert (squared.reshape(len(x), -1) - (-2 * back)).abs().max() < 1e-6
    assert back.abs().max() > 0.1  # the comparison is not between zeros


def ddpm_dps_reference(denoiser, x_edm, abar, noise, operator, y, mask, zeta):
    """DPS's Algorithm 1 with its code's unsquared norm, computed in DDPM's own coordinates on the levels abar
    (decreasing noise, a final abar_prev = 1), with an epsilon predictor built from the EDM denoiser. Returns the
    final image; noise[i] is the ancestral noise of step i. Written from the paper's equations, independently of
    training/sampling/ (the `dps` term's 'ddpm' law and the ancestral solver)."""
    x = x_edm * abar[0].sqrt()  # x_T = sqrt(abar_T) (x0 + sigma n) = sqrt(abar_T) x_edm
    for i in range(len(abar)):
        a_t, a_prev = abar[i], abar[i + 1] if i + 1 < len(abar) else torch.tensor(1.0, dtype=torch.float64)
        alpha, beta = a_t / a_prev, 1 - a_t / a_prev
        x_t = x.detach().requires_grad_(True)
        sigma = ((1 - a_t) / a_t).sqrt().item()
        eps = (x_t - a_t.sqrt() * denoiser(x_t / a_t.sqrt(), sigma)) / (1 - a_t).sqrt()
        x0_hat = (x_t - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        norm = ((y - operator.A(x0_hat)) * mask).flatten(1).norm(dim=1)
        (grad,) = torch.autograd.grad(norm.sum(), x_t)
        mean = (a_prev.sqrt() * beta / (1 - a_t)) * x0_hat + (alpha.sqrt() * (1 - a_prev) / (1 - a_t)) * x_t
        variance = beta * (1 - a_prev) / (1 - a_t)
        x = (mean + variance.sqrt() * noise[i] if i + 1 < len(abar) else mean).detach() - zeta * grad
    return x


def test_dps_steps_equal_the_algorithm_in_ddpm_coordinates():
    # Three levels around sigma 2 (where the old EDM-coordinate step was 1 + sigma^2 = 5 times too small), then the
    # final step to sigma 0. The noise draws are the sampler's: latents, then one per level below the first.
    denoiser, _, operator, mask, y, _ = linear_problem("pixel")
    sigmas = ddpm_sigmas(200)
    sigmas = sigmas[(sigmas > 1.5) & (sigmas < 2.6)][:3]
    assert len(sigmas) == 3
    gen = SeedGenerators([5, 6])
    latents = gen.randn([2, 1, SIZE, SIZE], dtype=torch.float64)
    noise = [gen.randn([2, 1, SIZE, SIZE], dtype=torch.float64) for _ in range(2)]
    gen = SeedGenerators([5, 6])
    got = dps_generate(denoiser, gen.randn([2, 1, SIZE, SIZE], dtype=torch.float64), gen, operator, y, mask,
                       sigmas=sigmas, zeta=0.5)
    abar = 1 / (1 + sigmas**2)
    expected = ddpm_dps_reference(denoiser, latents * sigmas[0], abar, noise, operator, y, mask, zeta=0.5)
    assert torch.allclose(got, expected, rtol=0, atol=1e-10), (got - expected).abs().max()


@pytest.mark.parametrize(("num_steps", "max_ratio"), [(1000, 0.2), (20, 0.4)])
def test_dps_approaches_the_posterior_mean(num_steps, max_ratio):
    # DPS is not an exact posterior sampler; its sample mean still lands near the closed form. Distance of the mean
    # of 128 samples to the posterior mean over that of zero-filling (Monte-Carlo floor about 0.07):
    #   1000 levels (DPS's grid): 0.148 (the old EDM-coordinate step: 0.161);
    #   20 levels: 0.27 (the old step, too small by 1 + sigma^2, guided too little: 0.53).
    cov = random_covariance(SIZE * SIZE, rank=8, seed=1)
    y, mask, posterior_mean = gaussian_problem(cov, seed=0)
    n = 128
    gen = SeedGenerators(range(n))
    latents = gen.randn([n, 1, SIZE, SIZE], dtype=torch.float64)
    samples = dps_generate(gaussian_denoiser(cov, (1, SIZE, SIZE)), latents, gen, PixelMask(mask),
                           y.expand(n, -1, -1, -1), sigmas=ddpm_sigmas(num_steps), zeta=1.0)
    assert_close_to_posterior_mean(samples, y, posterior_mean, max_ratio=max_ratio)


# ----------------------------------------------------------------------------
# Baselines.


def test_zero_filled_is_the_pseudo_inverse():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 1, 8, 8, generator=g, dtype=torch.float64)
    sr = AvgPoolSR(2)
    assert torch.allclose(sr.A(zero_filled(sr, sr.A(x))), sr.A(x))  # A A^+ = I
    box = BoxInpainting(8, 4)
    assert torch.equal(zero_filled(box, box.A(x)), box.A(x))  # the hole stays 0


def test_cs_recovers_a_sparse_image_and_sigpy_sense_is_our_operator():
    import sigpy.mri

    rng = np.random.default_rng(0)
    maps = torch.from_numpy((rng.standard_normal((4, 16, 16)) + 1j * rng.standard_normal((4, 16, 16)))
                            .astype(np.complex64))
    maps = maps / (maps.abs() ** 2).sum(dim=0).sqrt()
    operator = MultiCoilMRI(maps[None])
    image = torch.zeros(16, 16, dtype=torch.complex64)
    image[4:12, 6:10] = 1.0  # piecewise constant: sparse in Haar-like wavelets and in TV
    x = complex_to_channels(image[None])
    kspace = operator.A(x)[0]
    sense = sigpy.mri.linop.Sense(maps.numpy()) * image.numpy()
    assert np.abs(sense - kspace.numpy()).max() < 1e-5
    mask = torch.zeros(1, 1, 16)
    mask[..., ::2] = 1
    mask[..., 6:10] = 1
    zf_error = (zero_filled(operator, kspace[None] * mask)[0] - x[0]).norm() / x.norm()
    for regulariser in ("l1-wavelet", "tv"):
        estimate = cs_mri(kspace * mask, maps, mask, regulariser, lamda=1e-3, max_iter=200)
        assert (estimate - x[0]).norm() / x.norm() < 0.3 * zf_error
        # Deterministic: no step size from a power iteration on an unseeded random start (sigpy's default).
        assert torch.equal(cs_mri(kspace * mask, maps, mask, regulariser, lamda=1e-3, max_iter=20),
                           cs_mri(kspace * mask, maps, mask, regulariser, lamda=1e-3, max_iter=20))
