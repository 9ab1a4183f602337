"""Closed-form fixtures of the sampling tests (ARCHITECTURE.md "Sampling as four orthogonal pieces"): exact Gaussian
denoisers (tests/gaussian.py), exact partial denoisers and exact posteriors of linear Gaussian problems
(tests/linear_gaussian.py), and `edm_generate`, EDM's sampler assembled from the package's pieces."""

import pytest
import torch

from tests.gaussian import gaussian_denoiser, random_covariance
from torch_utils.misc import SeedGenerators
from training.sampling.schedules import rho_schedule
from training.sampling.solvers import ODE, noise_start


def edm_generate(denoiser, latents: torch.Tensor, generator, num_steps: int = 18, sigma_min: float = 0.002,
                 sigma_max: float = 80.0, rho: float = 7.0, **ode_options) -> torch.Tensor:
    """EDM's sampler: the ODE solver (Heun by default, options as `ODE`) on EDM's rho schedule from standard normal
    latents."""
    sigmas = rho_schedule(num_steps, sigma_min, sigma_max, rho)
    return ODE(**ode_options)(denoiser, noise_start(latents, sigmas[0].item()), generator, sigmas)


def exact_partial(denoiser):
    """The exact partial denoiser of a prior whose full denoiser is `denoiser` and whose partial measurements are
    masked images with P = I off nothing: P D(s) for the full law (the oracle's partial denoiser)."""

    def partial(s, mask, sigma):
        return mask * denoiser(s, sigma)

    return partial


class CallCounter:
    """A denoiser that counts its calls: the NFE a solver reports must equal them."""

    def __init__(self, denoiser):
        self.denoiser, self.calls = denoiser, 0

    def __call__(self, x, sigma):
        self.calls += 1
        return self.denoiser(x, sigma)


@pytest.fixture
def gaussian_prior():
    """(covariance (16, 16), exact denoiser on (1, 4, 4) images) of a random Gaussian prior."""
    cov = random_covariance(16, 4, seed=3)
    return cov, gaussian_denoiser(cov, (1, 4, 4))


@pytest.fixture
def seeds():
    return SeedGenerators(range(64))
