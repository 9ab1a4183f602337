"""The denoisers of training/sampling/denoisers.py. MSM's aggregate as an image-space denoiser (`MSMAggregate` with
an operator and the 'shrink' fallback) on exact Gaussian
partial denoisers: full coverage reduces to the exact full denoiser, independent entries are denoised exactly once
covered, a row depends only on its seed, and the partial measurements of a multi-coil operator (T T^H != I) carry
white noise, as the partial denoisers were trained on."""

import torch

from tests.gaussian import gaussian_denoiser, random_covariance
from tests.test_msm_sampler import diagonal_covariance, gaussian_partial_denoiser
from torch_utils.misc import SeedGenerators
from training.masks import BoxMaskLaw, FullMask
from training.operators import Identity, MultiCoilMRI
from training.sampling.denoisers import MSMAggregate

RES, COILS = 4, 2


def image_aggregate(partial, operator, law, generator, num_subsets):
    """The MSM aggregate as the image denoiser DPS and the ALD family sample MSM models with."""
    return MSMAggregate(partial, law, generator, num_subsets, fallback="shrink", operator=operator)


def coil_maps(seed: int = 0) -> torch.Tensor:
    """Small random coil maps (1, COILS, RES, RES) normalised so that sum_c |S_c|^2 = 1: T^H T = I, T T^H != I."""
    g = torch.Generator().manual_seed(seed)
    maps = torch.complex(*torch.randn(2, COILS, RES, RES, generator=g, dtype=torch.float64))
    return (maps / maps.abs().square().sum(dim=0).sqrt())[None]


def operator_matrix(operator) -> torch.Tensor:
    """T on the real view: (2 COILS RES^2, 2 RES^2), columns T e_j flattened as view_as_real(k-space)."""
    basis = torch.eye(2 * RES * RES, dtype=torch.float64).reshape(-1, 2, RES, RES)
    return torch.stack([torch.view_as_real(operator.A(e[None])).flatten() for e in basis], dim=1)


def complex_partial_denoiser(cov: torch.Tensor):
    """The exact partial denoiser of k-space z0 ~ N(0, cov) (cov over the real view), for complex s."""
    real = gaussian_partial_denoiser(cov)

    def denoise(s, mask, sigma):
        return torch.view_as_complex(real(torch.view_as_real(s), mask[..., None], sigma).contiguous())

    return denoise


def mri_problem(seed: int = 0):
    """A correlated Gaussian image prior pushed through a 2-coil operator: (operator, image cov, k-space cov)."""
    operator = MultiCoilMRI(coil_maps(seed))
    image_cov = random_covariance(2 * RES * RES, rank=6, seed=seed)
    matrix = operator_matrix(operator)
    return operator, image_cov, matrix @ image_cov @ matrix.T


def test_a_law_that_covers_everything_gives_the_exact_full_denoiser():
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    cov = random_covariance(64, rank=8, seed=2)
    exact = gaussian_denoiser(cov, (1, 8, 8))
    operator, image_cov, kspace_cov = mri_problem()
    x_mri = torch.randn(3, 2, RES, RES, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    exact_mri = gaussian_denoiser(image_cov, (2, RES, RES))
    for law in (FullMask(), BoxMaskLaw(0.0)):
        images = image_aggregate(gaussian_partial_denoiser(cov), Identity(), law, SeedGenerators([0, 1, 2]), 3)
        mri = image_aggregate(complex_partial_denoiser(kspace_cov), operator, law, SeedGenerators([0, 1, 2]), 3)
        for sigma in (0.05, 0.7, 20.0):
            torch.testing.assert_close(images(x, sigma), exact(x, sigma), rtol=0, atol=1e-10)
            # The out-of-range noise is drawn here too, and T^H (I - T T^H) = 0 removes it.
            torch.testing.assert_close(mri(x_mri, sigma), exact_mri(x_mri, sigma), rtol=0, atol=1e-10)


def test_independent_entries_are_exact_once_covered_and_shrunk_where_not():
    # With a diagonal covariance every partial estimate is the exact denoiser on its entries, so the aggregate is
    # exact wherever a mask covered; one box mask (K = 1) leaves 6 of 16 cells to the sd^2 / (sd^2 + sigma^2) x
    # fallback, and K = 8 coverage-aware masks cover everything.
    cov = diagonal_covariance(64, seed=4)
    exact = gaussian_denoiser(cov, (1, 8, 8))
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    sigma = 0.8
    errors = {}
    for k in (1, 2, 8):
        out = image_aggregate(gaussian_partial_denoiser(cov), Identity(), BoxMaskLaw(0.4),
                              SeedGenerators(range(4)), k)(x, sigma)
        exact_entries = (out - exact(x, sigma)).abs() < 1e-12
        fallback_entries = (out - x * (0.25 / (0.25 + sigma**2))).abs() < 1e-12
        assert bool((exact_entries | fallback_entries).all())
        errors[k] = (out - exact(x, sigma)).norm().item()
        if k == 1:
            assert (~exact_entries).sum().item() == 4 * 6 * 4  # 4 rows x 6 dropped cells x 4 pixels each
    assert errors[1] > 0.1 and errors[8] < 1e-10, errors


def test_rows_depend_only_on_their_seed():
    operator, _, kspace_cov = mri_problem()
    x = torch.randn(2, 2, RES, RES, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    both = image_aggregate(complex_partial_denoiser(kspace_cov), operator, BoxMaskLaw(0.4),
                           SeedGenerators([3, 5]), 2)
    alone = image_aggregate(complex_partial_denoiser(kspace_cov), operator, BoxMaskLaw(0.4),
                            SeedGenerators([5]), 2)
    for sigma in (2.0, 0.3):  # successive calls: the coverage record and the streams move on per seed
        torch.testing.assert_close(both(x, sigma)[1:], alone(x[1:], sigma), rtol=0, atol=1e-12)
    other = image_aggregate(complex_partial_denoiser(kspace_cov), operator, BoxMaskLaw(0.4),
                            SeedGenerators([4]), 2)
    assert (other(x[1:], 2.0) - alone(x[1:], 2.0)).abs().max() > 1e-3


def test_partial_measurements_of_a_multi_coil_operator_carry_white_noise():
    # The state x = x0 + sigma n_img gives T x = T x0 + sigma T n_img, noise of covariance T T^H (rank 32 of 64
    # here): the denoiser must add (I - T T^H) n so that what the partial denoisers see has covariance sigma^2 I.
    # The sample covariance of n = 3000 draws in d = 64 dimensions misses I by about sqrt(d / n) = 0.15 (relative,
    # Frobenius); omitting the added noise would miss it by ||T T^H - I|| / ||I|| = sqrt(1/2) = 0.71 and more.
    operator = MultiCoilMRI(coil_maps(7))
    num, sigma = 3000, 0.6
    x0 = torch.randn(1, 2, RES, RES, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    x = x0 + sigma * torch.randn(num, 2, RES, RES, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    seen = []

    def recording_partial_denoiser(s, mask, sigma):
        seen.append(s)
        return s

    image_aggregate(recording_partial_denoiser, operator, FullMask(), SeedGenerators(range(num)), 1)(x, sigma)
    noise = torch.view_as_real(seen[0] - operator.A(x0)).reshape(num, -1) / sigma
    covariance = noise.T @ noise / num
    eye = torch.eye(covariance.shape[0], dtype=torch.float64)
    assert ((covariance - eye).norm() / eye.norm()).item() < 0.25
