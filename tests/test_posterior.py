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
from torch_utils.misc import SeedGenerators
from training.masks import FullMask, RandomLineMaskLaw
from training.operators import AvgPoolSR, BoxInpainting, MultiCoilMRI, PixelMask, complex_to_channels
from training.posterior import (
    aggregate_data_consistency,
    cs_mri,
    dps_sampler,
    msm_posterior_sampler,
    partial_data_consistency,
    respaced_sigmas,
    zero_filled,
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
    out = partial_data_consistency(y, y_mask, 1.0)(estimate, estimate_mask, 1.0)
    both = (y_mask * estimate_mask).expand(shape).bool()
    assert torch.equal(out[both], y[both])  # measured and covered: exactly y
    only_estimate = (estimate_mask * (1 - y_mask)).expand(shape).bool()
    assert torch.equal(out[only_estimate], estimate[only_estimate])  # not measured: untouched
    uncovered = ~estimate_mask.expand(shape).bool()
    assert torch.equal(out[uncovered], torch.zeros_like(out[uncovered]))
    reflected = partial_data_consistency(y, y_mask, 2.0)(estimate, estimate_mask, 1.0)
    assert torch.allclose(reflected[both], 2 * y[both] - estimate[both])  # lambda = 2 reflects about y


@pytest.mark.parametrize("operator", [AvgPoolSR(4), BoxInpainting(8, 4),
                                      PixelMask((torch.arange(64).reshape(1, 1, 8, 8) % 3 == 0).float())])
def test_aggregate_dc_with_lambda_one_makes_the_estimate_consistent(operator):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64)
    y = operator.A(x) + 0.1 * operator.A(torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64))
    z_hat = torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64)
    out = aggregate_data_consistency(operator, y, 1.0)(z_hat, 1.0)
    assert torch.allclose(operator.A(out), y, atol=1e-12)
    assert not torch.allclose(operator.A(z_hat), y)


def test_bad_dc_steps_are_refused():
    y = torch.zeros(1, 1, 8, 8)
    for bad in (0.0, -1.0):
        with pytest.raises(Exception, match="--dc-step"):
            partial_data_consistency(y, y, bad)
        with pytest.raises(Exception, match="--dc-step"):
            aggregate_data_consistency(PixelMask(torch.ones(1, 1, 8, 8)), y, bad)


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


def test_msm_posterior_with_exact_column_experts_approaches_the_posterior_mean():
    # K = 3 masks of 2 of the 8 columns per level: some columns keep the previous level's estimate, as in real use.
    cov = column_covariance()
    y, mask, posterior_mean = gaussian_problem(cov, seed=2)
    full = gaussian_denoiser(cov, (1, SIZE, SIZE))
    exact_partial = lambda s, partial_mask, sigma: partial_mask * full(s, sigma)
    n = 64
    gen = SeedGenerators(range(n))
    latents = gen.randn([n, 1, SIZE, SIZE], dtype=torch.float64)
    samples = msm_posterior_sampler(exact_partial, latents, RandomLineMaskLaw(4, 0), gen, y.expand(n, -1, -1, -1),
                                    placement="partial", mask=mask, dc_step=2.0, num_subsets=3,
                                    sigmas=respaced_sigmas(100), outer="ddnm", eta=0.85)
    # Measured: 0.48, Monte-Carlo floor sqrt(tr(posterior cov) / n) = 0.21, zero-filled 2.90.
    assert_close_to_posterior_mean(samples, y, posterior_mean, max_ratio=0.3)


def test_full_law_msm_posterior_and_dps_approach_the_posterior_mean():
    cov = random_covariance(SIZE * SIZE, rank=8, seed=1)
    y, mask, posterior_mean = gaussian_problem(cov, seed=0)
    full = gaussian_denoiser(cov, (1, SIZE, SIZE))
    n, sigmas = 128, respaced_sigmas(100)
    gen = SeedGenerators(range(n))
    latents = gen.randn([n, 1, SIZE, SIZE], dtype=torch.float64)
    ys = y.expand(n, -1, -1, -1)
    # An oracle model's run: the full mask law, DC on the aggregate (image placement) with the default lambda.
    samples = msm_posterior_sampler(lambda s, m, sigma: m * full(s, sigma), latents, FullMask(), gen, ys,
                                    placement="aggregate", operator=PixelMask(mask), dc_step=1.75, num_subsets=1,
                                    sigmas=sigmas, outer="ddnm", eta=0.85)
    # Measured at n = 256: 0.11 against zero-filled 1.59 (Monte-Carlo floor at n = 128: 0.12).
    assert_close_to_posterior_mean(samples, y, posterior_mean, max_ratio=0.2)
    gen = SeedGenerators(range(n))
    samples = dps_sampler(full, latents, gen, PixelMask(mask), ys, sigmas=sigmas, step_size=1.0)
    assert_close_to_posterior_mean(samples, y, posterior_mean, max_ratio=0.2)  # measured at n = 256: 0.11


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
