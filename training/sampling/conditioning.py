"""Conditioning: how a measurement y = M (A x + sigma_y n) enters a solver (SEED_METHODS.md sections 2-4; MSM.md
section 7; ARCHITECTURE.md "Sampling as four orthogonal pieces").

ONE protocol for every data term: a term is `cond(denoiser, x, step) -> x0_hat_c`, the conditioned Tweedie estimate
that the solver uses in place of D(x, step.sigma). `step` is the solver's `Step(sigma, sigma_next, x0_weight)` for this
evaluation, x0_weight = d x_next / d x0_hat of the solver's update (training/sampling/solvers.py says it per solver:
ancestral 1 - b of `outer_step`, Euler / Heun their coefficients, Langevin with step eps: eps / sigma^2, EM
(sigma^2 - sigma_next^2) / sigma^2, 1 for an estimate returned as it is). So a term that corrects the STATE by delta
(Chung's DPS law, PaDIS's) returns x0_hat + delta / x0_weight, and every solver applies it exactly; terms that act on
the estimate or the score ignore x0_weight. Terms (each validates its options once, when it is built):
- likelihood terms, which add sigma^2 grad log p(y | x) to the estimate: `jalal` (its annealed form is ALD's
  'annealed' data consistency), `jalal_normalized` (ALD's 'normalized');
- `dps`: the likelihood gradient through the denoiser (`dps_gradient`, written once) in one of three laws, 'score'
  (a score term), 'ddpm' (Chung et al.'s ancestral step law), 'state' (PaDIS's Langevin step);
- data-consistency terms, which replace the estimate by a consistent one: `projection`, `dds` (CG on the denoised
  image), `msm_aggregate_step` (MSM's step on the aggregate);
- `msm_partial_step`, MSM's step on each partial estimate, is not a term of the solver: the MSM aggregate applies it
  to each subset (training/sampling/denoisers.py `MSMAggregate`).
They know nothing of networks beyond the denoiser interface and keep no state across calls. Per-example norms
everywhere, so a sample never depends on its batch mates (the references take batch norms).

Measurement noise: complex measurement entries carry N(0, sigma_y^2) on the real and on the imaginary part
(operators.measurement_randn), so sigma_y^2 is the variance per real component, which is what the Gaussian
likelihood's gradient over the real view needs. Aali's code divides its sigma_y^2 by 2 because there sigma_y^2 is the
total variance of a complex entry; both are the same likelihood.
"""

import dataclasses
import math

import torch

from dnnlib import UserError


@dataclasses.dataclass(frozen=True)
class Step:
    """What a solver tells a conditioning term about the evaluation it asks for: the level sigma of the state, the
    level sigma_next the update moves it to, and x0_weight = d x_next / d x0_hat (None where the step size depends on
    the estimate itself, as in the snr-rule Langevin corrector: terms that correct the state refuse it)."""

    sigma: float
    sigma_next: float
    x0_weight: float | None


def masked(residual: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return residual if mask is None else residual * mask


def per_example_norm(v: torch.Tensor) -> torch.Tensor:
    """||v_i|| for each example, shaped (N, 1, ..., 1) to broadcast against v."""
    return v.flatten(1).norm(dim=1).reshape(-1, *([1] * (v.ndim - 1)))


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

    def cond(denoiser, x, step):
        sigma = step.sigma
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

    def cond(denoiser, x, step):
        sigma = step.sigma
        x0 = denoiser(x, sigma)
        score = (x0 - x) / sigma**2
        g = likelihood_gradient(operator, y, mask, x)
        g = g * (weight * per_example_norm(score) / per_example_norm(g).clamp_min(torch.finfo(g.dtype).tiny))
        return x0 + sigma**2 * g

    return cond


# ----------------------------------------------------------------------------
# DPS (Chung et al. 2023) and its step laws.


def dps_gradient(denoiser, x: torch.Tensor, sigma: float, operator, y: torch.Tensor, mask: torch.Tensor | None = None,
                 squared: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """DPS's likelihood gradient at the EDM state x = x0 + sigma n, per example:
        grad_x ||M (y - A D(x; sigma))||      (squared=False: the unsquared norm, as DPS's code differentiates), or
        grad_x ||M (y - A D(x; sigma))||^2    (squared=True: the paper's Algorithm 1 with a fixed step),
    taken through the denoiser by autograd (works under torch.no_grad; x itself is not modified).

    denoiser D(x, sigma) float64 and differentiable; x (N, ...) the state in EDM coordinates; operator A with y and
    mask M (None: everything observed). Returns (grad (N, ...) float64 in EDM coordinates, x0_hat = D(x; sigma)
    detached). The gradient with respect to DDPM's state x_ddpm = x / sqrt(1 + sigma^2) is sqrt(1 + sigma^2) times
    this one (`dps`'s 'ddpm' law converts). An example whose residual is exactly 0 gets gradient 0.
    """
    with torch.enable_grad():
        x_in = x.detach().to(torch.float64).requires_grad_(True)
        x0_hat = denoiser(x_in, sigma)
        residual = y - operator.A(x0_hat)
        residual = (residual if mask is None else residual * mask).flatten(1)
        loss = residual.abs().square().sum(dim=1) if squared else torch.linalg.vector_norm(residual, dim=1)
        (grad,) = torch.autograd.grad(loss.sum(), x_in)
    return grad, x0_hat.detach()


DPS_LAWS = ("score", "ddpm", "state")
DPS_ZETA = 1.0  # DPS's step zeta (Chung et al. 2023: 1.0 for inpainting and super-resolution)
DPS_NORMS = ("rms", "norm")


def measured_entries(y: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """m, the number of measured entries of each example (a complex entry counts once), shaped (N, 1, ..., 1)."""
    counted = torch.ones_like(y, dtype=torch.float64) if mask is None else torch.broadcast_to(
        (mask != 0).to(torch.float64), y.shape)
    return counted.flatten(1).sum(dim=1).clamp_min(1).reshape(-1, *([1] * (y.ndim - 1)))


def dps(operator, y: torch.Tensor, mask: torch.Tensor | None = None, *, zeta: float = DPS_ZETA, squared: bool = False,
        law: str = "score", norm: str = "norm"):
    """DPS's likelihood gradient g = grad_x ||M (y - A x0_hat(x))|| (`dps_gradient`; its square with squared=True)
    entered by one of three laws; each evaluation costs one denoiser call and its backward pass.

    norm (unsquared g only): 'norm' is DPS's and PaDIS's step zeta / ||residual|| (g is J^T A^H r / ||r||): the
    residual's norm grows as the square root of the entries an example holds, so the same zeta is a smaller step per
    pixel on a larger image, and an example tiled from n copies of a problem moves each copy 1 / sqrt(n) as far.
    'rms' uses zeta / RMS(residual), i.e. sqrt(m) g with m the example's measured entries (`measured_entries`): the
    step per pixel then depends on the residual per entry only, the same at every image size and layout. 'rms' is the
    registry's default; zeta_rms = zeta_norm / sqrt(m) gives the published step at a given size.

    The laws:

    'score' (SEED's `dps`): the score term G = s - zeta g, i.e. x0_hat - sigma^2 zeta g (Tweedie with sigma^2: SEED's
        first version used sigma, a bug). For any solver.
    'ddpm' (Chung et al.'s Algorithm 1, DPS's code): the state after the solver's step is corrected by
        delta = -zeta sqrt((1 + s0^2) (1 + s1^2)) g, s0 = step.sigma, s1 = step.sigma_next. Why: DDPM's state is
        x_ddpm = x / sqrt(1 + sigma^2) (abar = 1 / (1 + sigma^2)); x0_hat depends on x_ddpm(s0) through
        x = sqrt(1 + s0^2) x_ddpm(s0), so grad_{x_ddpm} = sqrt(1 + s0^2) g, and the correction, made to x_ddpm(s1),
        is sqrt(1 + s1^2) times itself in EDM coordinates. DPS's ancestral step is the ancestral solver with eta = 1
        (`outer_step`: its sigma_up^2 = s1^2 (s0^2 - s1^2) / s0^2 is beta_tilde (1 + s1^2), its mean the DDPM
        posterior mean); at the last level (s1 = 0, x0_weight 1) it returns x0_hat - zeta sqrt(1 + s0^2) g as DPS's
        last iteration does.
    'state' (PaDIS's solver): the state is corrected by delta = -zeta g, with Langevin's step eps = alpha / 2.
    For 'ddpm' and 'state' the term returns x0_hat + delta / step.x0_weight, so the solver's update moves the state
    by exactly delta more than the prior step would.
    """
    if law not in DPS_LAWS:
        raise ValueError(f"the DPS law must be one of {', '.join(DPS_LAWS)}, got {law!r}")
    if norm not in DPS_NORMS:
        raise UserError(f"--dps-norm must be one of {', '.join(DPS_NORMS)}, got {norm!r}.")
    rms = norm == "rms" and not squared
    root_m = measured_entries(y, mask).sqrt() if rms and y is not None else None
    if law == "state":
        if not zeta >= 0:
            raise UserError(f"--padis-zeta / --pc-dps-step (the DPS step) must be >= 0, got {zeta}.")
    elif not zeta > 0:
        raise UserError(f"--dps-step (zeta) must be > 0, got {zeta}.")

    def cond(denoiser, x, step):
        grad, x0 = dps_gradient(denoiser, x, step.sigma, operator, y, mask, squared=squared)
        if root_m is not None:
            grad = grad * root_m.to(grad.device).reshape(-1, *([1] * (grad.ndim - 1)))
        if law == "score":
            return x0 - step.sigma**2 * zeta * grad
        if not step.x0_weight:
            raise ValueError(f"the DPS law {law!r} corrects the state, so its solver must give the weight of x0_hat "
                             "in its update (this one has none)")
        scale = zeta * math.sqrt((1 + step.sigma**2) * (1 + step.sigma_next**2)) if law == "ddpm" else zeta
        return x0 - (scale / step.x0_weight) * grad

    return cond


# ----------------------------------------------------------------------------
# Data consistency on the denoised estimate.


def projection(operator, y: torch.Tensor, mask: torch.Tensor | None = None):
    """Hard data consistency on the Tweedie estimate: x0 + A^+ M (y - M A x0).

    Exact orthogonal projection onto {x : A x = y} for an operator with an exact pseudo-inverse and no separate mask
    (pixel and box masks, super-resolution); for an operator with a separate mask (MRI lines) it is the A^+-based
    step, exact when A A^H = I (single-coil MRI with unit maps) and an approximation for multi-coil data. Ignores the
    measurement noise (noisy entries are copied as they are)."""
    if not hasattr(operator, "pinv"):
        raise UserError(f"projection conditioning needs an operator with an exact pseudo-inverse; "
                        f"{type(operator).__name__} has none (use jalal, dps or dds).")

    def cond(denoiser, x, step):
        x0 = denoiser(x, step.sigma)
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


DDS_LAWS = ("estimate", "ddim")


def dds(operator, y: torch.Tensor, mask: torch.Tensor | None = None, *, gamma: float = 1.0, cg_iters: int = 5,
        law: str = "estimate"):
    """Decomposed diffusion sampling's data step (Chung, Lee, Ye 2023; SEED_METHODS.md 3.3): the Tweedie estimate
    is replaced by `cg_iters` conjugate-gradient iterations, started at x0, on (I + gamma A^H M A) x = x0 +
    gamma A^H y, the proximal step of gamma / 2 ||M A x - y||^2 around x0. (SEED's defaults: gamma 0.01 on [0, 1] CT
    data, 5 iterations.) DDS's own DDIM renoising (eta 0.15) is the solver's business: methods.py's `dds` assembles
    DDS as published (the Ancestral solver and law 'ddim'), its `pc-dds` this term in the predictor-corrector ladder.
    law 'estimate': the solver uses the CG result x0' in place of x0 everywhere (an ancestral step then re-derives its
    noise direction from x0'); 'ddim' (DDS's Algorithm: x' = sqrt(abar') x0' + c eps_theta(x) + noise, the network's
    own eps): the solver's step moves the state by exactly x0' - x0 more than the prior step, returned as
    x0 + (x0' - x0) / x0_weight (as the DPS laws that correct the state)."""
    if not gamma > 0:
        raise UserError(f"--dds-gamma must be > 0, got {gamma}.")
    if not (isinstance(cg_iters, int) and cg_iters >= 1):
        raise UserError(f"--cg-iters must be an integer >= 1, got {cg_iters!r}.")
    if law not in DDS_LAWS:
        raise ValueError(f"the DDS law must be one of {', '.join(DDS_LAWS)}, got {law!r}")

    def cond(denoiser, x, step):
        x0 = denoiser(x, step.sigma)

        def normal(v):
            return v + gamma * operator.AH(masked(operator.A(v), mask)).to(v.dtype)

        b = x0 + gamma * operator.AH(y).to(x0.dtype)
        x0c = conjugate_gradient(normal, b, x0, cg_iters)
        return x0c if law == "estimate" else x0 + (x0c - x0) / step.x0_weight

    return cond


# ----------------------------------------------------------------------------
# MSM's data-consistency steps (MSM.md section 7). Neither models the measurement noise: with lambda = 1 measured
# entries take the noisy y_obs as they are.


def check_dc_step(dc_step: float):
    if not (isinstance(dc_step, (int, float)) and dc_step > 0):
        raise UserError(f"--dc-step (the data-consistency step lambda) must be a number > 0, got {dc_step!r}.")


def msm_partial_step(y_obs: torch.Tensor, mask: torch.Tensor, dc_step: float):
    """MSM's step on each partial estimate (MRI, the reference's choice), for `MSMAggregate`'s partial_step:
    s_i <- P_i (s_i - lambda M (s_i - y_obs)), all in measurement space.

    y_obs (N, ...) the measurement (zero off M), mask M broadcastable to it; s_i (N, ...) a partial estimate and P_i
    its mask. With lambda = 1, s_i equals y_obs on every entry that P_i and M both cover (an exact projection);
    lambda = 2 reflects (the reference's default)."""
    check_dc_step(dc_step)

    def step(s, partial_mask, sigma):
        # (1 - lambda M) s + lambda M y: the same step, written so that lambda = 1 gives y bit for bit.
        weight = dc_step * mask
        return partial_mask * ((1 - weight) * s + weight * y_obs.to(s.dtype))

    return step


def msm_aggregate_step(operator, y_obs: torch.Tensor, dc_step: float):
    """MSM's step on the aggregate (images; the reference's default lambda = 1.75) as a conditioning term:
    z_hat <- z_hat - lambda A^+ (A z_hat - y_obs) for an operator with an exact `pinv` (any mask is part of the
    operator, e.g. BoxInpainting). With lambda = 1, A z_hat' = A A^+ y_obs = y_obs for y_obs in the range of A
    (AvgPoolSR, PixelMask: every y)."""
    check_dc_step(dc_step)
    if not hasattr(operator, "pinv"):
        raise UserError(f"{type(operator).__name__} has no exact pseudo-inverse, so the aggregate data-consistency "
                        "step does not apply to it.")

    def cond(denoiser, x, step):
        z_hat = denoiser(x, step.sigma)
        return z_hat - dc_step * operator.pinv(operator.A(z_hat) - y_obs.to(z_hat.dtype))

    return cond
