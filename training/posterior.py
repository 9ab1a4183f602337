"""Posterior sampling for inverse problems (MSM.md section 7) and the classical baselines it is compared with.

The measurement to invert is y_obs = M (A x + sigma_y n): A the task operator (training/operators.py), M its mask
(None = everything observed). Two families of samplers:

- MSM posterior sampling: the MSM sampler (training/samplers.py `msm_sampler`, which also runs oracle models with
  the full mask law) with a data-consistency (DC) step of size lambda on the denoised estimate:
    'partial' (MRI, the reference's choice): inside the K loop, on each partial k-space estimate,
        s_i <- P_i (s_i - lambda M (s_i - y_obs))    (`partial_data_consistency`)
      lambda = 1 replaces the measured entries by y_obs (exact projection), lambda = 2 reflects (reference default).
    'aggregate' (images): after aggregation, z_hat <- z_hat - lambda A^+ (A z_hat - y_obs)
        (`aggregate_data_consistency`), with T = I, so z = x; A^+ the operator's exact pseudo-inverse
      (reference default lambda = 1.75).
  Neither step models the measurement noise: with lambda = 1 measured entries take the noisy y_obs as they are.
- DPS (Chung et al. 2023, `dps_sampler`): DPS's Algorithm 1 (ancestral DDPM steps on DDPM's 1000-step grid, each
  followed by x <- x - zeta grad ||y_obs - M A x0_hat(x)||, the unsquared residual norm as DPS's code) written in
  EDM's sigma parametrisation (`dps_step` derives the mapping). The likelihood gradient is one public function,
  `dps_gradient`, which other solvers use as a conditioning term. It needs a full denoiser D(x; sigma): an oracle
  model trained on clean data, or an MSM model evaluated with the full mask, which is an approximation (the network
  was trained on partial inputs only; `image_denoiser`).

Baselines: `zero_filled` (A^+ y_obs, or A^H y_obs where A has no pseudo-inverse: masked entries stay 0) and, for
multi-coil MRI, `cs_mri` (sigpy's L1-wavelet or total-variation regularised SENSE reconstruction).

This module is separate from training/samplers.py (where ARCHITECTURE.md puts posterior samplers) only because both
were written at the same time; it builds on samplers.py and adds nothing to it.
"""

import math

import numpy as np
import torch

from dnnlib import UserError
from training.measurements import network_input
from training.operators import complex_to_channels
from training.samplers import msm_heun_sampler, msm_sampler, outer_step
from training.sampling.schedules import check_sigmas, ddpm_sigmas, respaced_sigmas  # noqa: F401 (the scripts)


def check_dc_step(dc_step: float):
    if not (isinstance(dc_step, (int, float)) and dc_step > 0):
        raise UserError(f"--dc-step (the data-consistency step lambda) must be a number > 0, got {dc_step!r}.")


# ----------------------------------------------------------------------------
# Data-consistency steps (the hooks of `msm_sampler`).


def partial_data_consistency(y_obs: torch.Tensor, mask: torch.Tensor, dc_step: float):
    """Hook dc_partial(s_i, P_i, sigma) -> P_i (s_i - lambda M (s_i - y_obs)), all in measurement space.

    y_obs (N, ...) the measurement (zero off M), mask M broadcastable to it; s_i (N, ...) a partial estimate and P_i
    its mask. With lambda = 1, s_i equals y_obs on every entry that P_i and M both cover."""
    check_dc_step(dc_step)

    def dc_partial(s, partial_mask, sigma):
        # (1 - lambda M) s + lambda M y: the same step, written so that lambda = 1 gives y bit for bit.
        step = dc_step * mask
        return partial_mask * ((1 - step) * s + step * y_obs.to(s.dtype))

    return dc_partial


def aggregate_data_consistency(operator, y_obs: torch.Tensor, dc_step: float):
    """Hook dc_aggregate(z_hat, sigma) -> z_hat - lambda A^+ (A z_hat - y_obs) for an operator with an exact `pinv`
    (any mask is part of the operator, e.g. BoxInpainting). With lambda = 1, A z_hat' = A A^+ y_obs = y_obs for y_obs
    in the range of A (AvgPoolSR, PixelMask: every y)."""
    check_dc_step(dc_step)
    if not hasattr(operator, "pinv"):
        raise UserError(f"{type(operator).__name__} has no exact pseudo-inverse, so the aggregate data-consistency "
                        "step does not apply to it.")

    def dc_aggregate(z_hat, sigma):
        return z_hat - dc_step * operator.pinv(operator.A(z_hat) - y_obs.to(z_hat.dtype))

    return dc_aggregate


def msm_posterior_sampler(partial_denoiser, latents: torch.Tensor, mask_law, generator, y_obs: torch.Tensor, *,
                          placement: str, dc_step: float, mask: torch.Tensor | None = None, operator=None,
                          solver: str = "ancestral", **sampler_kwargs) -> torch.Tensor:
    """`msm_sampler` with a data-consistency step (module docstring), or with solver 'heun' `msm_heun_sampler` (EDM's
    deterministic Heun sampler on its rho grid, the aggregate as the denoiser) with the same step applied wherever
    the aggregate is formed, i.e. at each of its 2 N - 1 denoiser evaluations.

    placement 'partial': y_obs and `mask` (M) live in the sampler's measurement space (MRI k-space; the sampler's
        T is the task operator), the step acts on every partial estimate inside the K loop.
    placement 'aggregate': `operator` (the task operator A, with pinv) maps the sampler's state (T = I, so the image)
        to y_obs; the step acts on the aggregate.
    sampler_kwargs: num_subsets, sigmas, eta, outer, variant, project of `msm_sampler` (project: for a network with
    the measurement-space skip, training.measurements.aggregate_projection, applied before the aggregate DC step);
    with solver 'heun': num_subsets, num_steps, sigma_min, sigma_max, rho, project of `msm_heun_sampler`.
    Returns the last aggregate z_hat.
    """
    if solver not in ("ancestral", "heun"):
        raise ValueError(f"solver must be 'ancestral' or 'heun', got {solver!r}")
    if placement == "partial":
        if mask is None:
            raise ValueError("the partial data-consistency step needs the measurement mask")
        hooks = {"dc_partial": partial_data_consistency(y_obs, mask, dc_step)}
    elif placement == "aggregate":
        hooks = {"dc_aggregate": aggregate_data_consistency(operator, y_obs, dc_step)}
    else:
        raise ValueError(f"placement must be 'partial' or 'aggregate', got {placement!r}")
    sampler = msm_heun_sampler if solver == "heun" else msm_sampler
    return sampler(partial_denoiser, latents, mask_law, generator, **hooks, **sampler_kwargs)


# ----------------------------------------------------------------------------
# DPS.


DPS_ZETA = 1.0  # DPS's step zeta (Chung et al. 2023: 1.0 for inpainting and super-resolution)


def image_denoiser(net, class_labels=None):
    """A network as a full denoiser D(x, sigma) on images (float64 in and out, differentiable in x): the network
    sees the whole image, plus an all-ones mask channel if it was built with one. For an MSM model this evaluates
    the partial denoiser with P = I, which its training never showed it (an approximation)."""

    def denoise(x, sigma):
        s = torch.full((x.shape[0],), float(sigma), dtype=torch.float32, device=x.device)
        full_mask = torch.ones_like(x[:, :1], dtype=torch.float32)
        return net(network_input(x.to(torch.float32), full_mask, net.in_channels), s, class_labels).to(torch.float64)

    return denoise


def dps_gradient(denoiser, x: torch.Tensor, sigma: float, operator, y: torch.Tensor, mask: torch.Tensor | None = None,
                 squared: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """DPS's likelihood gradient (Chung et al. 2023) at the EDM state x = x0 + sigma n, per example:
        grad_x ||M (y - A D(x; sigma))||      (squared=False: the unsquared norm, as DPS's code differentiates), or
        grad_x ||M (y - A D(x; sigma))||^2    (squared=True: the paper's Algorithm 1 with a fixed step),
    taken through the denoiser by autograd (works under torch.no_grad; x itself is not modified).

    denoiser D(x, sigma) float64 and differentiable; x (N, ...) the state in EDM coordinates; operator A with y and
    mask M as in `dps_sampler` (M None: everything observed). Returns (grad (N, ...) float64 in EDM coordinates,
    x0_hat = D(x; sigma) detached). The gradient with respect to DDPM's state x_ddpm = x / sqrt(1 + sigma^2) is
    sqrt(1 + sigma^2) times this one (`dps_step` converts). An example whose residual is exactly 0 gets gradient 0.
    """
    with torch.enable_grad():
        x_in = x.detach().to(torch.float64).requires_grad_(True)
        x0_hat = denoiser(x_in, sigma)
        residual = y - operator.A(x0_hat)
        residual = (residual if mask is None else residual * mask).flatten(1)
        loss = residual.abs().square().sum(dim=1) if squared else torch.linalg.vector_norm(residual, dim=1)
        (grad,) = torch.autograd.grad(loss.sum(), x_in)
    return grad, x0_hat.detach()


def dps_step(denoiser, x: torch.Tensor, s0: float, s1: float, noise: torch.Tensor, operator, y: torch.Tensor,
             mask: torch.Tensor | None, zeta: float) -> torch.Tensor:
    """One step of DPS's Algorithm 1 in EDM coordinates: the state x at level s0 -> the state at s1 < s0 (s1 = 0:
    the final step, which returns x0_hat - zeta * ... as DPS's last iteration does).

    DDPM's state at level t is x_ddpm = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps; EDM's is x = x_ddpm / sqrt(abar_t)
    = x0 + sigma eps with sigma^2 = (1 - abar_t) / abar_t, i.e. abar_t = 1 / (1 + sigma^2). DPS does
        x'_ddpm(s1) = ancestral DDPM step from x_ddpm(s0) (posterior mean of q(x_{t-1} | x_t, x0_hat) plus
                      sqrt(beta_tilde) z, beta_tilde = (1 - abar_{t-1}) / (1 - abar_t) beta_t),
        x_ddpm(s1)  = x'_ddpm(s1) - zeta grad_{x_ddpm(s0)} ||y - A x0_hat||.
    In EDM coordinates the ancestral step is DDIM with eta = 1 (`samplers.outer_step`: its sigma_up^2 =
    s1^2 (s0^2 - s1^2) / s0^2 is beta_tilde (1 + s1^2), its mean the DDPM posterior mean). For the gradient term,
    x0_hat depends on x_ddpm(s0) through x = sqrt(1 + s0^2) x_ddpm(s0), so grad_{x_ddpm} = sqrt(1 + s0^2) grad_x
    (`dps_gradient`), and the correction, made to x_ddpm(s1), becomes sqrt(1 + s1^2) times itself in EDM
    coordinates. Together:
        x(s1) = outer_step(x, x0_hat, s0, s1, noise, 'ddim', eta=1) - zeta sqrt((1 + s0^2) (1 + s1^2)) grad_x,
    about (1 + sigma^2) times the step zeta grad_x that the EDM-coordinate gradient alone would give.
    """
    grad, x0_hat = dps_gradient(denoiser, x, s0, operator, y, mask)
    scale = zeta * math.sqrt((1 + s0**2) * (1 + s1**2))
    moved = outer_step(x, x0_hat, s0, s1, noise, "ddim", 1.0) if s1 > 0 else x0_hat
    return moved - scale * grad


def dps_sampler(denoiser, latents: torch.Tensor, generator, operator, y_obs: torch.Tensor,
                mask: torch.Tensor | None = None, *, sigmas: torch.Tensor | None = None,
                step_size: float = DPS_ZETA) -> torch.Tensor:
    """Diffusion posterior sampling (Chung et al. 2023, Algorithm 1 with the step zeta / ||y - A x0_hat|| of their
    code) in EDM's sigma parametrisation: `dps_step` from level to level, its final step to sigma = 0 included.

    denoiser D(x, sigma) on images (N, C, H, W) float64, differentiable (`image_denoiser`, or a closed-form one);
    latents standard normal like the images, the state starts at sigmas[0] * latents (DDPM's x_T ~ N(0, I));
    generator a SeedGenerators; operator A and mask M with y_obs = M (A x + noise).
    Defaults are DPS's: DDPM's 1000-step linear-beta grid (`ddpm_sigmas`; a decreasing respacing of it, e.g.
    ddpm_sigmas(200), is DPS with respaced steps), ancestral steps (eta = 1), zeta = step_size = 1.0 (the paper's
    value for its inpainting and super-resolution tasks; measurements of other scales may need another zeta).
    Returns the images (N, C, H, W) float64. One network evaluation (with its backward pass) per level.
    """
    if not step_size > 0:
        raise UserError(f"--dps-step must be > 0, got {step_size}.")
    sigmas = check_sigmas(ddpm_sigmas() if sigmas is None else sigmas).tolist()  # floats: no host sync in the loop
    x = latents.to(torch.float64) * sigmas[0]
    for k in range(len(sigmas)):
        s0 = sigmas[k]
        s1 = sigmas[k + 1] if k + 1 < len(sigmas) else 0.0
        noise = generator.randn_like(x) if s1 > 0 else None
        x = dps_step(denoiser, x, s0, s1, noise, operator, y_obs, mask, step_size)
    return x


# ----------------------------------------------------------------------------
# Baselines.


def zero_filled(operator, y_obs: torch.Tensor) -> torch.Tensor:
    """A^+ y_obs where the operator has an exact pseudo-inverse (MRI: D^+ T^H y with D = sum_c |S_c|^2, i.e. the
    zero-filled coil combination; SR: nearest-neighbour upsampling; inpainting: holes stay 0), else A^H y_obs."""
    return operator.pinv(y_obs) if hasattr(operator, "pinv") else operator.AH(y_obs)


CS_REGULARISERS = ("l1-wavelet", "tv")
# Defaults per regulariser (bench/cs_convergence.py on 4 simulated 8-coil 64x64 phantoms, R = 4, sigma_y 0.01):
# lamda 1e-3 gave the best converged PSNR of 1e-4, 1e-3, 1e-2 for both (TV 31.61 dB, L1-wavelet 19.12 dB), and mean
# PSNR stayed within 0.05 dB of its 2560-iteration value from 320 (TV) and 160 (L1-wavelet) iterations on; the
# defaults keep about 3x that for images with more detail than phantoms.
CS_DEFAULTS = {"tv": {"lamda": 1e-3, "max_iter": 1000}, "l1-wavelet": {"lamda": 1e-3, "max_iter": 500}}


def cs_app(kspace: torch.Tensor, maps: torch.Tensor, mask: torch.Tensor, regulariser: str, lamda: float,
           max_iter: int, show_pbar: bool = False):
    """The sigpy app of `cs_mri` (not yet run): L1WaveletRecon (accelerated proximal gradient) or TotalVariationRecon
    (primal-dual hybrid gradient, PDHG).

    Step sizes come from bounds on the operator norms, not from sigpy's default power iteration, which starts from an
    unseeded random vector (two runs of the same slice differed) and sets PDHG's steps to sigma = 1,
    tau = 1 / ||K||^2. With s = max over pixels of sum_c |S_c|^2 >= ||A||^2 (the mask only removes rows of the
    unitary FFT) and ||G||^2 <= 8 for 2-D circular finite differences, L = sqrt(s + 8) >= ||K = [A; G]||:
    the gradient step 1 / s for L1-wavelet; for TV, PDHG steps tau = 1 / (L sqrt(lamda)), sigma = sqrt(lamda) / L
    (sigma tau L^2 = 1, so PDHG converges). The ratio tau / sigma = 1 / lamda was the fastest of tau = c / L,
    sigma = 1 / (c L) for c = 1, 3, 10, 30, 100 at lamda 1e-4, 1e-3, 1e-2 on phantoms; at lamda 1e-3 TV then
    converges (31.61 dB) within 320 iterations, where sigpy's default steps reached 27.88 dB after 5120 and were still
    rising (bench/cs_convergence.py).
    """
    import sigpy.mri

    if regulariser not in CS_REGULARISERS:
        raise UserError(f"The CS regulariser must be one of {', '.join(CS_REGULARISERS)}, got {regulariser!r}.")
    if not lamda > 0:
        raise UserError(f"The CS weight lamda (--cs-tv-lambda, --cs-l1-lambda) must be > 0, got {lamda}.")
    y = kspace.detach().cpu().numpy().astype(np.complex64)
    mps = maps.detach().cpu().numpy().astype(np.complex64)
    weights = np.broadcast_to(mask.detach().cpu().numpy().astype(np.float32), y.shape)
    sensitivity = max(float((np.abs(mps) ** 2).sum(axis=0).max()), 1e-12)
    common = dict(weights=weights, max_iter=max_iter, show_pbar=show_pbar, leave_pbar=False)
    if regulariser == "l1-wavelet":
        return sigpy.mri.app.L1WaveletRecon(y, mps, lamda, alpha=1 / sensitivity, **common)
    norm_bound = math.sqrt(sensitivity + 8)
    return sigpy.mri.app.TotalVariationRecon(y, mps, lamda, tau=1 / (norm_bound * math.sqrt(lamda)),
                                             sigma=math.sqrt(lamda) / norm_bound, **common)


def cs_mri(kspace: torch.Tensor, maps: torch.Tensor, mask: torch.Tensor, regulariser: str = "l1-wavelet",
           lamda: float = 1e-3, max_iter: int = 100, show_pbar: bool = False) -> torch.Tensor:
    """Classical compressed-sensing SENSE reconstruction of one slice with sigpy (CPU):
        argmin_x 1/2 ||M (F S x - y)||^2 + lamda R(x),  R = ||Psi x||_1 (Daubechies-4 wavelets, sigpy's default)
    or total variation, solved by sigpy.mri.app.L1WaveletRecon / TotalVariationRecon (`cs_app`) with the same maps
    and mask as the learned methods (sigpy's Sense operator equals MultiCoilMRI: tests/test_posterior.py).

    kspace (C, H, W) complex (zero off the mask), maps (C, H, W) complex, mask broadcastable to (C, H, W).
    Returns the image as 2 channels (2, H, W) float32.
    """
    image = cs_app(kspace, maps, mask, regulariser, lamda, max_iter, show_pbar).run()
    return complex_to_channels(torch.from_numpy(np.asarray(image, dtype=np.complex64))[None])[0]
