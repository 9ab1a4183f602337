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
- DPS (Chung et al. 2023, `dps_sampler`): a full-denoiser ancestral sampler in image space whose every step also
  moves x by -zeta grad_x ||y_obs - M A D(x; sigma)|| (the gradient of the residual norm, i.e. of the squared norm
  scaled by 1 / (2 ||residual||), as DPS does), the gradient taken through the denoiser by autograd. It needs a full
  denoiser D(x; sigma): an oracle model trained on clean data, or an MSM model evaluated with the full mask, which
  is an approximation (the network was trained on partial inputs only; `image_denoiser`).

Baselines: `zero_filled` (A^+ y_obs, or A^H y_obs where A has no pseudo-inverse: masked entries stay 0) and, for
multi-coil MRI, `cs_mri` (sigpy's L1-wavelet or total-variation regularised SENSE reconstruction).

This module is separate from training/samplers.py (where ARCHITECTURE.md puts posterior samplers) only because both
were written at the same time; it builds on samplers.py and adds nothing to it.
"""

import numpy as np
import torch

from dnnlib import UserError
from training.measurements import network_input
from training.operators import channels_to_complex, complex_to_channels
from training.samplers import check_outer, check_sigmas, msm_sampler, outer_step, vp200_sigmas


def check_dc_step(dc_step: float):
    if not (isinstance(dc_step, (int, float)) and dc_step > 0):
        raise UserError(f"--dc-step (the data-consistency step lambda) must be a number > 0, got {dc_step!r}.")


def respaced_sigmas(num_steps: int | None = None) -> torch.Tensor:
    """`num_steps` levels of the VP-200 grid (`vp200_sigmas`) at evenly spaced indices, first and last kept;
    None or 200 gives the grid itself. float64 (num_steps,), decreasing."""
    grid = vp200_sigmas()
    if num_steps is None or num_steps == len(grid):
        return grid
    if not (isinstance(num_steps, int) and 1 <= num_steps <= len(grid)):
        raise UserError(f"--steps must be an integer in 1..{len(grid)} (levels of the VP-200 grid), got {num_steps}.")
    return grid[torch.linspace(0, len(grid) - 1, num_steps, dtype=torch.float64).round().long()]


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
                          **sampler_kwargs) -> torch.Tensor:
    """`msm_sampler` with a data-consistency step (module docstring).

    placement 'partial': y_obs and `mask` (M) live in the sampler's measurement space (MRI k-space; the sampler's
        T is the task operator), the step acts on every partial estimate inside the K loop.
    placement 'aggregate': `operator` (the task operator A, with pinv) maps the sampler's state (T = I, so the image)
        to y_obs; the step acts on the aggregate.
    sampler_kwargs: num_subsets, sigmas, eta, outer, variant of `msm_sampler`. Returns the last aggregate z_hat.
    """
    if placement == "partial":
        if mask is None:
            raise ValueError("the partial data-consistency step needs the measurement mask")
        hooks = {"dc_partial": partial_data_consistency(y_obs, mask, dc_step)}
    elif placement == "aggregate":
        hooks = {"dc_aggregate": aggregate_data_consistency(operator, y_obs, dc_step)}
    else:
        raise ValueError(f"placement must be 'partial' or 'aggregate', got {placement!r}")
    return msm_sampler(partial_denoiser, latents, mask_law, generator, **hooks, **sampler_kwargs)


# ----------------------------------------------------------------------------
# DPS.


def image_denoiser(net, class_labels=None):
    """A network as a full denoiser D(x, sigma) on images (float64 in and out, differentiable in x): the network
    sees the whole image, plus an all-ones mask channel if it was built with one. For an MSM model this evaluates
    the partial denoiser with P = I, which its training never showed it (an approximation)."""

    def denoise(x, sigma):
        s = torch.full((x.shape[0],), float(sigma), dtype=torch.float32, device=x.device)
        full_mask = torch.ones_like(x[:, :1], dtype=torch.float32)
        return net(network_input(x.to(torch.float32), full_mask, net.in_channels), s, class_labels).to(torch.float64)

    return denoise


def dps_sampler(denoiser, latents: torch.Tensor, generator, operator, y_obs: torch.Tensor,
                mask: torch.Tensor | None = None, *, sigmas: torch.Tensor | None = None, step_size: float = 1.0,
                eta: float = 1.0, outer: str = "ddim") -> torch.Tensor:
    """Diffusion posterior sampling (Chung et al. 2023) on the MSM sampler's noise grid.

    denoiser D(x, sigma) on images (N, C, H, W) float64, differentiable (`image_denoiser`, or a closed-form one);
    latents standard normal like the images; generator a SeedGenerators; operator A and mask M with
    y_obs = M (A x + noise). At every level sigma_k: x0 = D(x; sigma_k), the outer update (samplers.outer_step,
    'ddim' with eta = 1 is DDPM's ancestral step) moves x to sigma_{k+1}, then
        x <- x - step_size * grad_x ||y_obs - M A x0(x)||     (per example; step_size is DPS's zeta).
    After the last level the returned image is x0 - step_size * grad (DPS's final update with sigma_{k+1} = 0).
    Needs autograd: do not call it under torch.no_grad.
    """
    check_outer(outer, eta)
    if not step_size > 0:
        raise UserError(f"--dps-step must be > 0, got {step_size}.")
    sigmas = check_sigmas(vp200_sigmas() if sigmas is None else sigmas)
    x = latents.to(torch.float64) * sigmas[0].item()
    for k in range(len(sigmas)):
        s0 = sigmas[k].item()
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            x0 = denoiser(x_in, s0)
            residual = y_obs - operator.A(x0)
            residual = residual if mask is None else residual * mask
            norm = residual.abs().square().flatten(1).sum(dim=1).sqrt()
            (grad,) = torch.autograd.grad(norm.sum(), x_in)
        x0 = x0.detach()
        if k + 1 < len(sigmas):
            noise = generator.randn_like(x)
            x = outer_step(x, x0, s0, sigmas[k + 1].item(), noise, outer, eta) - step_size * grad
        else:
            x = x0 - step_size * grad
    return x


# ----------------------------------------------------------------------------
# Baselines.


def zero_filled(operator, y_obs: torch.Tensor) -> torch.Tensor:
    """A^+ y_obs where the operator has an exact pseudo-inverse (MRI: D^+ T^H y with D = sum_c |S_c|^2, i.e. the
    zero-filled coil combination; SR: nearest-neighbour upsampling; inpainting: holes stay 0), else A^H y_obs."""
    return operator.pinv(y_obs) if hasattr(operator, "pinv") else operator.AH(y_obs)


CS_REGULARISERS = ("l1-wavelet", "tv")


def cs_mri(kspace: torch.Tensor, maps: torch.Tensor, mask: torch.Tensor, regulariser: str = "l1-wavelet",
           lamda: float = 1e-3, max_iter: int = 100) -> torch.Tensor:
    """Classical compressed-sensing SENSE reconstruction of one slice with sigpy (CPU):
        argmin_x 1/2 ||M (F S x - y)||^2 + lamda R(x),  R = ||Psi x||_1 (Daubechies-4 wavelets, sigpy's default)
    or total variation, solved by sigpy.mri.app.L1WaveletRecon / TotalVariationRecon with the same maps and mask as
    the learned methods (sigpy's Sense operator equals MultiCoilMRI: tests/test_posterior.py).

    kspace (C, H, W) complex (zero off the mask), maps (C, H, W) complex, mask broadcastable to (C, H, W).
    Returns the image as 2 channels (2, H, W) float32.
    """
    import sigpy.mri

    if regulariser not in CS_REGULARISERS:
        raise UserError(f"--cs-reg must be one of {', '.join(CS_REGULARISERS)}, got {regulariser!r}.")
    if not lamda > 0:
        raise UserError(f"--cs-lambda must be > 0, got {lamda}.")
    y = kspace.detach().cpu().numpy().astype(np.complex64)
    mps = maps.detach().cpu().numpy().astype(np.complex64)
    weights = np.broadcast_to(mask.detach().cpu().numpy().astype(np.float32), y.shape)
    app = sigpy.mri.app.L1WaveletRecon if regulariser == "l1-wavelet" else sigpy.mri.app.TotalVariationRecon
    image = app(y, mps, lamda, weights=weights, max_iter=max_iter, show_pbar=False).run()
    return complex_to_channels(torch.from_numpy(np.asarray(image, dtype=np.complex64))[None])[0]


def mri_magnitude(images: torch.Tensor) -> torch.Tensor:
    """2-channel complex images (N, 2, H, W) -> magnitudes (N, 1, H, W)."""
    return channels_to_complex(images).abs()[:, None]

