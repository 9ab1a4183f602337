"""training/sampling/conditioning.py against identities and closed forms: the likelihood gradient is autograd's
gradient of the data misfit, the DPS term is its closed form for a linear denoiser, projection and DDS are the exact
solutions of their linear problems (dense matrices on small problems)."""

import math

import pytest
import torch

from dnnlib import UserError
from tests.linear_gaussian import DenseOperator, isotropic_denoiser
from training.operators import AvgPoolSR, BoxInpainting, GaussianBlur, MultiCoilMRI, PixelMask, measure
from training.sampling.conditioning import (
    Step,
    dds,
    dps,
    jalal,
    jalal_normalized,
    likelihood_gradient,
    projection,
)

S = 0.8


def at(sigma: float) -> Step:
    """The Step of an evaluation whose estimate the update takes as it is (x0_weight 1)."""
    return Step(sigma, 0.0, 1.0)


def mri_setup(size=5, coils=3, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    maps = torch.view_as_complex(torch.randn(1, coils, size, size, 2, generator=g, dtype=torch.float64)) / 2
    operator = MultiCoilMRI(maps)
    mask = (torch.rand(1, 1, 1, size, generator=g) < 0.5).to(torch.float64)
    y = measure(operator, torch.randn(batch, 2, size, size, generator=g, dtype=torch.float64), mask, 0.05, g)
    x = torch.randn(batch, 2, size, size, generator=g, dtype=torch.float64)
    return operator, mask, y, x


def dense_setup(rows=3, dim=6, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    operator = DenseOperator(torch.randn(rows, dim, generator=g, dtype=torch.float64))
    y = torch.randn(batch, rows, generator=g, dtype=torch.float64)
    return operator, None, y, torch.randn(batch, dim, generator=g, dtype=torch.float64)


def misfit_gradient(operator, mask, y, x):
    """-grad_x 1/2 ||M A x - y||^2 by autograd over the real view of x."""
    x = x.clone().requires_grad_(True)
    residual = operator.A(x) - y
    residual = residual if mask is None else residual * mask
    (grad,) = torch.autograd.grad(0.5 * residual.abs().square().sum(), x)
    return -grad


@pytest.mark.parametrize("setup", [mri_setup, dense_setup])
def test_likelihood_gradient_is_the_misfit_gradient_and_jalal_adds_it(setup):
    operator, mask, y, x = setup()
    g = likelihood_gradient(operator, y, mask, x)
    assert torch.allclose(g, misfit_gradient(operator, mask, y, x), rtol=1e-10, atol=1e-12)
    assert g.abs().max() > 0.1
    sigma, sigma_y = 0.4, 0.05
    denoiser = isotropic_denoiser(S)
    annealed = jalal(operator, y, mask, sigma_y=sigma_y, scale=2.0)(denoiser, x, at(sigma))
    assert torch.allclose(annealed, denoiser(x, sigma) + sigma**2 * 2.0 * g / (sigma_y**2 + sigma**2), rtol=1e-12)
    constant = jalal(operator, y, mask, sigma_y=sigma_y, gamma=0.1)(denoiser, x, at(sigma))
    assert torch.allclose(constant, denoiser(x, sigma) + sigma**2 * g / (sigma_y**2 + 0.01), rtol=1e-12)
    unscaled = jalal(operator, y, mask, sigma_y=sigma_y, scale=0.0)(denoiser, x, at(sigma))
    assert torch.equal(unscaled, denoiser(x, sigma))


def test_normalized_term_has_weight_times_the_score_norm():
    operator, mask, y, x = mri_setup(batch=3)
    sigma, denoiser = 0.3, isotropic_denoiser(S)
    out = jalal_normalized(operator, y, mask, weight=5.0)(denoiser, x, at(sigma))
    score = (denoiser(x, sigma) - x) / sigma**2
    term = (out - denoiser(x, sigma)) / sigma**2
    assert torch.allclose(term.flatten(1).norm(dim=1), 5.0 * score.flatten(1).norm(dim=1), rtol=1e-10)
    direction = likelihood_gradient(operator, y, mask, x).flatten(1)
    cosine = (term.flatten(1) * direction).sum(1) / (term.flatten(1).norm(dim=1) * direction.norm(dim=1))
    assert torch.allclose(cosine, torch.ones(3, dtype=torch.float64), atol=1e-10)


@pytest.mark.parametrize("squared", [False, True])
def test_dps_term_is_the_closed_form_for_gaussian_data(squared):
    # Isotropic Gaussian data: x0_hat = c x with c = s^2 / (s^2 + sigma^2), so grad_x ||r||^2 = -2 c A^H M r and
    # grad_x ||r|| = -c A^H M r / ||r||, r = M (y - A x0_hat); the term moves x0_hat by -sigma^2 zeta grad.
    operator, mask, y, x = mri_setup()
    sigma, zeta = 0.6, 0.3
    c = S**2 / (S**2 + sigma**2)
    residual = (y - operator.A(c * x)) * mask
    back = c * operator.AH(residual)
    norms = residual.flatten(1).abs().square().sum(1).sqrt().reshape(-1, 1, 1, 1)
    grad = -2 * back if squared else -back / norms
    out = dps(operator, y, mask, zeta=zeta, squared=squared)(isotropic_denoiser(S), x, at(sigma))
    assert (out - (c * x - sigma**2 * zeta * grad)).abs().max() < 1e-6
    assert (sigma**2 * zeta * grad).abs().max() > 1e-2


def test_projection_is_the_orthogonal_projection_for_exact_pseudo_inverses():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 1, 8, 8, generator=g, dtype=torch.float64)
    operators = [PixelMask((torch.rand(1, 1, 8, 8, generator=g) < 0.5).to(torch.float64)), BoxInpainting(8, 4),
                 AvgPoolSR(2)]
    for operator in operators:
        y = operator.A(torch.randn(2, 1, 8, 8, generator=g, dtype=torch.float64))
        out = projection(operator, y)(isotropic_denoiser(S), x, at(0.5))
        # argmin ||v - x0|| subject to A v = y, from the dense matrix.
        basis = torch.eye(64, dtype=torch.float64).reshape(64, 1, 8, 8)
        matrix = operator.A(basis).reshape(64, -1).T
        x0 = isotropic_denoiser(S)(x, 0.5).reshape(2, 64)
        expected = x0 + (torch.linalg.pinv(matrix) @ (y.reshape(2, -1) - x0 @ matrix.T).T).T
        assert torch.allclose(out.reshape(2, 64), expected, atol=1e-10)
    with pytest.raises(UserError, match="pseudo-inverse"):
        projection(GaussianBlur(1.0, 3), x)


@pytest.mark.parametrize("setup", [mri_setup, dense_setup])
def test_dds_solves_the_proximal_problem(setup):
    operator, mask, y, x = setup()
    sigma, gamma = 0.5, 0.7
    denoiser = isotropic_denoiser(S)
    x0 = denoiser(x, sigma)
    dim = x0[0].numel()
    basis = torch.eye(dim, dtype=torch.float64).reshape(dim, *x0.shape[1:])
    measured = operator.A(basis) if mask is None else operator.A(basis) * mask
    normal = operator.AH(measured).reshape(dim, dim)
    rhs = (x0 + gamma * operator.AH(y)).reshape(len(x), dim)
    exact = torch.linalg.solve(torch.eye(dim, dtype=torch.float64) + gamma * normal, rhs.T).T
    converged = dds(operator, y, mask, gamma=gamma, cg_iters=dim)(denoiser, x, at(sigma))
    assert torch.allclose(converged.reshape(len(x), dim), exact, atol=1e-8)
    few = dds(operator, y, mask, gamma=gamma, cg_iters=2)(denoiser, x, at(sigma))
    start_error = (x0.reshape(len(x), dim) - exact).norm()
    assert (few.reshape(len(x), dim) - exact).norm() < 0.5 * start_error
    # Each example is its own system: a batch of one gives the same answer.
    alone = dds(operator, y[1:], mask, gamma=gamma, cg_iters=2)(denoiser, x[1:], at(sigma))
    assert torch.allclose(alone, few[1:], atol=1e-12)
    with pytest.raises(UserError, match="cg-iters"):
        dds(operator, y, mask, cg_iters=0)
    assert math.isfinite(float(few.sum()))
