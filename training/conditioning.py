"""Conditioning terms: how a measurement y = M (A x + sigma_y n) enters the solvers of training/sde.py
(SEED_METHODS.md sections 2-3; ARCHITECTURE.md "Sampling as four orthogonal pieces").

Each function here takes the measurement once (operator A from training/operators.py, y zero off the mask, mask M or
None where the operator holds its own mask) and returns a term cond(denoiser, x, sigma) -> conditioned x0_hat that a
solver uses in place of the denoiser. Two families:
- likelihood terms add sigma^2 grad log p(y | x) to the Tweedie estimate, so the solver's score (x0_c - x) / sigma^2
  becomes the prior score plus that gradient: `jalal` (its annealed form is ALD's 'annealed' data consistency),
  `jalal_normalized` (ALD's 'normalized'), `dps` (through the denoiser, training/posterior.py `dps_gradient`);
- data-consistency terms replace the Tweedie estimate by a consistent one: `projection`, `dds`.
They know nothing of networks beyond the denoiser interface and keep no state across calls. Per-example norms
everywhere, so a sample never depends on its batch mates (the references take batch norms).

Measurement noise: complex measurement entries carry N(0, sigma_y^2) on the real and on the imaginary part
(operators.measurement_randn), so sigma_y^2 is the variance per real component, which is what the Gaussian
likelihood's gradient over the real view needs. Aali's code divides its sigma_y^2 by 2 because there sigma_y^2 is the
total variance of a complex entry; both are the same likelihood.
"""

import torch

from dnnlib import UserError
from training.posterior import dps_gradient
from training.sde import per_example_norm


def masked(residual: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return residual if mask is None else residual * mask


def likelihood_gradient(operator, y: torch.Tensor, mask: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """A^H M (y - M A x) = -grad_x 1/2 ||M (A x) - y||^2 over the real view of x (M binary: M^H M = M)."""
    ax = operator.A(x)
    return operator.AH(masked(y.to(ax.dtype) - ax, mask)).to(x.dtype)


def jalal(operator, y: torch.Tensor, mask: torch.Tensor | None = None, *, sigma_y: float = 0.0, gamma=None,
          scale: float = 1.0):
    """Jalal et al. 2021's likelihood term: grad log p(y | x) ~ scale A^H M (y - M A x) / (sigma_y^2 + gamma^2).

    sigma_y: a number, or a tensor (N, 1, ..., 1) of per-example noise levels (relative noise, SNR sweeps).
    gamma: None = gamma_i = sigma_i (the annealed form: ALD's 'annealed' data consistency, SDS
    annealedLangevin.py L29-32, with the paper's sigma_y^2 rather than the code's complex sigma_y^2 / 2), a number
    (constant), or a callable gamma(sigma). scale is ALD's dc_boost; scale = 0 gives prior sampling exactly."""
    if not bool((torch.as_tensor(sigma_y) >= 0).all()):
        raise UserError(f"--sigma-y must be >= 0, got {sigma_y}.")
    if not scale >= 0:
        raise UserError(f"--dc-boost (the data-consistency scale) must be >= 0, got {scale}.")
    gamma_of = (lambda sigma: sigma) if gamma is None else gamma if callable(gamma) else (lambda sigma: float(gamma))
    # Checked once here, not per call: reading a tensor sigma_y on the host inside the loop would sync with the GPU.
    noisy = bool((torch.as_tensor(sigma_y) > 0).all())

    def cond(denoiser, x, sigma):
        variance = sigma_y**2 + gamma_of(sigma) ** 2
        if not (noisy or gamma_of(sigma) ** 2 > 0):
            raise UserError("The Jalal term needs sigma_y > 0 or gamma > 0 (a zero-variance likelihood).")
        return denoiser(x, sigma) + (sigma**2 * scale / variance) * likelihood_gradient(operator, y, mask, x)

    return cond


def jalal_normalized(operator, y: torch.Tensor, mask: torch.Tensor | None = None, *, weight: float = 5.0):
    """The data term of Jalal et al.'s code (CSGM main.py): g = A^H M (y - M A x) rescaled to weight ||s|| / ||g||
    times itself, s the prior score (norms per example; the code uses batch norms and mse = 5), so the data step is
    always `weight` times as long as the prior step. No 1 / (sigma_y^2 + gamma^2). The code's kappa (the 99th
    percentile of |MVUE| used to normalise the data) is the data's scaling, not part of the term."""
    if not weight > 0:
        raise UserError(f"--dc-norm-weight must be > 0, got {weight}.")

    def cond(denoiser, x, sigma):
        x0 = denoiser(x, sigma)
        score = (x0 - x) / sigma**2
        g = likelihood_gradient(operator, y, mask, x)
        g = g * (weight * per_example_norm(score) / per_example_norm(g).clamp_min(torch.finfo(g.dtype).tiny))
        return x0 + sigma**2 * g

    return cond


def dps(operator, y: torch.Tensor, mask: torch.Tensor | None = None, *, zeta: float = 1.0, squared: bool = False):
    """DPS as a score term (SEED's `dps`: G = s - zeta grad_x ||y - M A x0_hat(x)||, the unsquared norm by default,
    or its square), the gradient through the denoiser from training/posterior.py `dps_gradient` (Tweedie with
    sigma^2: SEED's first version used sigma, a bug). The Tweedie estimate it returns is the one the gradient
    was taken at, so each evaluation costs one network call and its backward pass."""
    if not zeta > 0:
        raise UserError(f"--dps-step (zeta) must be > 0, got {zeta}.")

    def cond(denoiser, x, sigma):
        grad, x0 = dps_gradient(denoiser, x, sigma, operator, y, mask, squared=squared)
        return x0 - sigma**2 * zeta * grad

    return cond


def projection(operator, y: torch.Tensor, mask: torch.Tensor | None = None):
    """Hard data consistency on the Tweedie estimate: x0 + A^+ M (y - M A x0).

    Exact orthogonal projection onto {x : A x = y} for an operator with an exact pseudo-inverse and no separate mask
    (pixel and box masks, super-resolution); for an operator with a separate mask (MRI lines) it is the A^+-based
    step, exact when A A^H = I (single-coil MRI with unit maps) and an approximation for multi-coil data. Ignores the
    measurement noise (noisy entries are copied as they are)."""
    if not hasattr(operator, "pinv"):
        raise UserError(f"projection conditioning needs an operator with an exact pseudo-inverse; "
                        f"{type(operator).__name__} has none (use jalal, dps or dds).")

    def cond(denoiser, x, sigma):
        x0 = denoiser(x, sigma)
        ax0 = operator.A(x0)
        return x0 + operator.pinv(masked(y.to(ax0.dtype) - ax0, mask)).to(x0.dtype)

    return cond


def conjugate_gradient(apply, b: torch.Tensor, x: torch.Tensor, iterations: int) -> torch.Tensor:
    """`iterations` CG steps on apply(x) = b (apply symmetric positive definite on the real view) from x, with
    per-example step lengths (each example is its own system)."""

    def dot(u, v):  # per-example real inner product Re sum(conj(u_i) v_i), shaped to broadcast
        products = (torch.conj(u) * v).real if u.is_complex() or v.is_complex() else u * v
        return products.flatten(1).sum(dim=1).reshape(-1, *([1] * (u.ndim - 1)))

    r = b - apply(x)
    p, rr = r, dot(r, r)
    for _ in range(iterations):
        ap = apply(p)
        alpha = rr / dot(p, ap).clamp_min(torch.finfo(rr.dtype).tiny)
        x, r = x + alpha * p, r - alpha * ap
        rr_next = dot(r, r)
        p, rr = r + (rr_next / rr.clamp_min(torch.finfo(rr.dtype).tiny)) * p, rr_next
    return x


def dds(operator, y: torch.Tensor, mask: torch.Tensor | None = None, *, gamma: float = 1.0, cg_iters: int = 5):
    """Decomposed diffusion sampling's data step (Chung, Lee, Ye 2023; SEED HEAD): the Tweedie estimate is replaced
    by `cg_iters` conjugate-gradient iterations, started at x0, on (I + gamma A^H M A) x = x0 + gamma A^H y, the
    proximal step of gamma / 2 ||M A x - y||^2 around x0. (SEED's defaults: gamma 0.01 on [0, 1] CT data, 5
    iterations.) DDS's own DDIM renoising is the solver's business, not this term's."""
    if not gamma > 0:
        raise UserError(f"--dds-gamma must be > 0, got {gamma}.")
    if not (isinstance(cg_iters, int) and cg_iters >= 1):
        raise UserError(f"--cg-iters must be an integer >= 1, got {cg_iters!r}.")

    def cond(denoiser, x, sigma):
        x0 = denoiser(x, sigma)

        def normal(v):
            return v + gamma * operator.AH(masked(operator.A(v), mask)).to(v.dtype)

        b = x0 + gamma * operator.AH(y).to(x0.dtype)
        return conjugate_gradient(normal, b, x0, cg_iters)

    return cond
