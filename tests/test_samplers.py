import math

import pytest
import torch

from dnnlib import UserError
from tests.gaussian import exact_samples, gaussian_denoiser, random_covariance, relative_cov_error
from torch_utils.misc import SeedGenerators
from training.masks import BoxMaskLaw, PixelMaskLaw, RandomLineMaskLaw
from training.operators import Identity
from training.samplers import (
    ambient_masks,
    ambient_sampler,
    edm_sampler,
    net_ambient_denoiser,
    net_denoiser,
    rho_schedule,
)

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


# ----------------------------------------------------------------------------
# Ambient Diffusion's sampler.


def masked_gaussian_denoiser(cov: torch.Tensor):
    """The exact Ambient denoiser of N(0, C) data: E[z_0 | M (z_0 + sigma n), M] = C M (M C M + sigma^2 M + I - M)^-1
    M s on every entry, with the mask M per batch element (what AmbientLoss trains a network towards)."""
    dim = cov.shape[0]

    def denoise(s, mask, sigma):
        n = s.shape[0]
        m = torch.diag_embed(mask.expand(s.shape).reshape(n, dim).to(torch.float64))
        eye = torch.eye(dim, dtype=torch.float64)
        system = m @ cov @ m + float(sigma) ** 2 * m + (eye - m)
        flat = torch.linalg.solve(system, (m @ s.reshape(n, dim, 1).to(torch.float64)))
        return (cov @ m @ flat).reshape(s.shape)

    return denoise


def test_ambient_sampler_covariance_matches_the_closed_form():
    """With the exact masked denoiser, the probability-flow ODE samples the observed entries o of each seed's mask
    from N(0, C_oo), and the last step returns the conditional mean C_uo C_oo^-1 z_o on the others; so a seed with
    mask M has covariance C P^T (P C P^T)^-1 P C, and the samples' covariance is its mean over the seeds' masks.
    A sampler that showed the network the unmasked state would give C (far from it, checked), one that drew a new
    mask per step another covariance."""
    n, law, delta = 4000, PixelMaskLaw(0.4), 0.3
    cov = random_covariance(16, rank=4, seed=3, diag=0.15)  # a diagonal part no other entry predicts
    gen = SeedGenerators(range(n))
    latents = gen.randn([n, *SHAPE], dtype=torch.float64)
    out = ambient_sampler(masked_gaussian_denoiser(cov), latents, law, delta, gen, num_steps=64)
    masks = ambient_masks(law, delta, SHAPE[-2:], gen).reshape(n, 16).bool()
    expected = torch.zeros(16, 16, dtype=torch.float64)
    for observed in masks:
        rows = cov[observed]  # P C
        expected += rows.T @ torch.linalg.solve(rows[:, observed], rows)
    expected /= n
    err = relative_cov_error(out, expected)
    floor = sum(relative_cov_error(exact_samples(expected, n, seed), expected) for seed in range(5)) / 5
    assert err < floor + 0.03, (err, floor)
    assert relative_cov_error(out, cov) > 3 * (floor + 0.03), (relative_cov_error(out, cov), floor)


def test_ambient_masks_have_the_stated_survival_rate():
    """Entries survive with probability E[P] (1 - delta): (1 - p)(1 - delta) for the pixel law, (1 - 6/16)(1 - delta)
    for the box law with p = 0.4, per phase-encode line for line laws (ACS lines too, as AmbientLoss drops them);
    within 4 binomial standard deviations."""
    seeds = range(2000)
    for law, shape, survival in ((PixelMaskLaw(0.4), (4, 4), 0.6 * 0.9), (BoxMaskLaw(0.4), (8, 8), 0.625 * 0.9),
                                 (RandomLineMaskLaw(4, 4), (1, 16), 0.25 * 0.9)):
        masks = ambient_masks(law, 0.1, shape, SeedGenerators(seeds))
        assert masks.shape == law.mask_shape(len(seeds), shape) and set(masks.unique().tolist()) <= {0.0, 1.0}
        count = masks.numel() if law.kind == "pixel" else len(seeds)  # box cells and line counts are not iid
        tolerance = 4 * math.sqrt(survival * (1 - survival) / count)
        assert abs(masks.mean().item() - survival) < tolerance, (law, masks.mean().item(), survival)
    masks = ambient_masks(PixelMaskLaw(0.4), 0.1, (4, 4), SeedGenerators([5, 6]))
    assert torch.equal(masks[1], ambient_masks(PixelMaskLaw(0.4), 0.1, (4, 4), SeedGenerators([6]))[0])


class _RecordingNetwork(torch.nn.Module):
    """A stand-in for an Ambient image network (1 image channel + 1 mask channel) that records its inputs."""

    in_channels, out_channels = 2, 1

    def __init__(self):
        super().__init__()
        self.inputs = []

    def forward(self, x, sigma, class_labels=None):
        self.inputs.append(x.clone())
        return torch.tanh(x[:, :1] * (1 + x[:, 1:]) / (1 + sigma.reshape(-1, 1, 1, 1)))


def test_ambient_sampler_feeds_the_network_its_seed_mask_and_the_masked_state():
    net, law, delta, seeds = _RecordingNetwork(), PixelMaskLaw(0.4), 0.1, [3, 4, 5, 6]
    gen = SeedGenerators(seeds)
    latents = gen.randn([4, 1, 8, 8], dtype=torch.float64)
    ambient_sampler(net_ambient_denoiser(net, Identity()), latents, law, delta, gen, num_steps=4)
    masks = ambient_masks(law, delta, (8, 8), SeedGenerators(seeds)).to(torch.float32)
    assert len(net.inputs) == 7  # Heun: 2 calls per step but the last
    for x in net.inputs:
        assert torch.equal(x[:, 1:], masks)  # the same mask at every step
        assert (x[:, :1][masks == 0] == 0).all() and (x[:, :1][masks == 1] != 0).all()
    with pytest.raises(UserError, match="mask channel"):
        net_denoiser(net)


@pytest.mark.parametrize("complex_state", [False, True])
def test_ambient_samples_depend_only_on_their_seeds(complex_state):
    """Per-seed masks, latents and churn noise: a seed's sample is the same in any batch (real images, and complex
    MRI-like k-space with a line law)."""
    law = RandomLineMaskLaw(2, 2) if complex_state else BoxMaskLaw(0.4)

    def denoiser(s, mask, sigma):
        return s / (1 + sigma**2) + 0.1 * mask.flatten(1).mean(1).reshape(-1, 1, 1, 1)  # per element

    def run(seeds):
        gen = SeedGenerators(seeds)
        latents = gen.randn([len(seeds), 2, 8, 8], dtype=torch.float64)
        latents = torch.complex(latents, gen.randn([len(seeds), 2, 8, 8], dtype=torch.float64)) if complex_state \
            else latents
        return ambient_sampler(denoiser, latents, law, 0.1, gen, num_steps=5, S_churn=10)

    together = run([3, 4, 5, 6])
    apart = torch.cat([run([3]), run([4, 5]), run([6])])
    assert together.is_complex() == complex_state
    assert (together - apart).abs().max() < 1e-12 and (together[0] - together[1]).abs().max() > 1e-3
    assert torch.equal(run([3, 4]), run([3, 4]))
