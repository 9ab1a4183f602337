import math

import torch

from tests.gaussian import exact_samples, gaussian_denoiser, random_covariance, relative_cov_error
from torch_utils.misc import SeedGenerators
from training.samplers import edm_sampler, rho_schedule

SHAPE = (1, 4, 4)  # 16-dimensional "images"


def test_rho_schedule_matches_formula():
    t = rho_schedule(5, sigma_min=0.01, sigma_max=10.0, rho=3.0)
    i = torch.arange(5, dtype=torch.float64)
    expected = (10 ** (1 / 3) + i / 4 * (0.01 ** (1 / 3) - 10 ** (1 / 3))) ** 3
    assert torch.allclose(t[:-1], expected) and t[-1] == 0
    assert math.isclose(t[0].item(), 10.0, rel_tol=1e-12) and math.isclose(t[-2].item(), 0.01, rel_tol=1e-12)


def test_solvers_converge_to_the_exact_probability_flow_at_their_order():
    """For Gaussian data the ODE maps x_T to x_s = V diag(sqrt((l + s^2) / (l + T^2))) V^T x_T exactly; the sampler's
    last step (sigma_min -> 0) returns D(x_s; s). Heun's error must fall ~4x per doubling of steps, Euler's ~2x."""
    cov = random_covariance(16, rank=4, seed=1)
    evals, evecs = torch.linalg.eigh(cov)
    gen = SeedGenerators(range(32))
    latents = gen.randn([32, *SHAPE], dtype=torch.float64)
    T, s = 80.0, 1e-4
    x_t = latents.reshape(32, -1) * T
    exact = ((x_t @ evecs) * torch.sqrt((evals + s**2) / (evals + T**2)) * (evals / (evals + s**2))) @ evecs.T

    def error(num_steps, solver):
        out = edm_sampler(gaussian_denoiser(cov, SHAPE), latents, gen, num_steps=num_steps, sigma_min=s,
                          sigma_max=T, rho=7, solver=solver)
        return ((out.reshape(32, -1) - exact).norm() / exact.norm()).item()

    heun = [error(n, "heun") for n in (64, 128)]
    euler = [error(n, "euler") for n in (64, 128)]
    assert heun[1] < 1e-3, heun
    assert 3.5 < heun[0] / heun[1] < 4.5, heun
    assert 1.8 < euler[0] / euler[1] < 2.2, euler


def test_sample_covariance_matches_the_data_covariance():
    """Heun with and without churn: the empirical covariance is C within Monte-Carlo error. 64 steps keep the
    discretisation bias (about 0.10 at EDM's 18 steps on this spectrum, whose smallest variance is 0.05) well below
    the Monte-Carlo floor; the order test above covers the discretisation itself."""
    n = 4000
    cov = random_covariance(16, rank=4, seed=2)
    gen = SeedGenerators(range(n))
    latents = gen.randn([n, *SHAPE], dtype=torch.float64)
    for churn in (0.0, 10.0):
        out = edm_sampler(gaussian_denoiser(cov, SHAPE), latents, gen, num_steps=64, S_churn=churn)
        err = relative_cov_error(out, cov)
        floor = sum(relative_cov_error(exact_samples(cov, n, seed), cov) for seed in range(5)) / 5
        # floor ~ 0.03 here; the tolerance allows two standard deviations of one estimate on top.
        assert err < floor + 0.03, (churn, err, floor)
        assert out.reshape(n, -1).mean(0).abs().max() < 4 * math.sqrt(cov.diag().max() / n)


def test_seed_generators_do_not_depend_on_batching():
    a = SeedGenerators([3, 4, 5]).randn([3, 2, 2])
    b = torch.cat([SeedGenerators([3]).randn([1, 2, 2]), SeedGenerators([4, 5]).randn([2, 2, 2])])
    assert torch.equal(a, b)
