# shim for the scripts until methods.py lands
"""The old sampler functions of generate.py and reconstruct.py, as adapters over training/sampling/ (denoisers,
solvers, schedules). Nothing but the two scripts may import this module; library code and tests use the package."""

import math

import torch

from training.sampling.denoisers import (  # noqa: F401 (re-exported for the scripts)
    CountingNetwork,
    MSMAggregate,
    ambient_masks,
    masked_denoiser,
    net_ambient_denoiser,
    net_denoiser,
    net_partial_denoiser,
    real_view,
)
from training.sampling.schedules import (  # noqa: F401 (re-exported for the scripts)
    EDM_SIGMA_MAX,
    rho_schedule,
    sigmas_in_training_range,
    training_sigma_max,
    vp200_sigmas,
    vp_grid_of,
)
from training.sampling.solvers import (  # noqa: F401 (re-exported for the scripts)
    ODE,
    OUTER_UPDATES,
    Ancestral,
    msm_reference,
    noise_start,
    seed_measurement_randn,
)


def edm_sampler(denoiser, latents, generator, num_steps: int = 18, sigma_min: float = 0.002, sigma_max: float = 80.0,
                rho: float = 7.0, solver: str = "heun", S_churn: float = 0.0, S_min: float = 0.0,
                S_max: float = math.inf, S_noise: float = 1.0):
    sigmas = rho_schedule(num_steps, sigma_min, sigma_max, rho)
    return ODE(solver, S_churn, S_min, S_max, S_noise)(denoiser, noise_start(latents, sigmas[0].item()), generator,
                                                      sigmas)


def _guidance_of(guidance):
    """The old `guidance(z, sigma) -> correction` argument as a denoiser wrapper."""
    if guidance is None:
        return lambda denoiser: denoiser

    def wrap(denoiser):
        def denoise(z, sigma):
            z_hat = denoiser(z, sigma)
            return z_hat + guidance(z, sigma).to(z_hat.dtype)
        return denoise

    return wrap


def msm_sampler(partial_denoiser, latents, mask_law, generator, *, num_subsets: int = 3, sigmas=None,
                variant: str = "batched", eta: float = 1.0, outer: str = "ddim", dc_partial=None, dc_aggregate=None,
                guidance=None, project=None, return_trajectory: bool = False, precision: str = "single"):
    if variant not in ("batched", "reference"):
        raise ValueError(f"variant must be one of batched, reference, got {variant!r}")
    sigmas = vp200_sigmas() if sigmas is None else sigmas
    x = noise_start(latents, float(sigmas[0]), precision)
    trajectory = []
    if variant == "reference":
        z_hat = msm_reference(partial_denoiser, x, generator, sigmas, mask_law, num_subsets, eta=eta, outer=outer,
                              precision=precision, partial_step=dc_partial, project=project, guidance=guidance,
                              conditioning=dc_aggregate, callback=lambda sigma, z_hat: trajectory.append(z_hat))
    else:
        aggregate = MSMAggregate(partial_denoiser, mask_law, generator, num_subsets, partial_step=dc_partial,
                                 project=project)

        def callback(sigma, z_hat):
            aggregate.remember(sigma, z_hat)
            trajectory.append(z_hat)

        z_hat = Ancestral(eta, outer, precision)(_guidance_of(guidance)(aggregate), x, generator, sigmas,
                                                 conditioning=dc_aggregate, callback=callback)
    return (z_hat, trajectory) if return_trajectory else z_hat


def msm_heun_sampler(partial_denoiser, latents, mask_law, generator, *, num_subsets: int = 3, num_steps: int = 18,
                     sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0, dc_partial=None,
                     dc_aggregate=None, guidance=None, project=None):
    aggregate = MSMAggregate(partial_denoiser, mask_law, generator, num_subsets, partial_step=dc_partial,
                             project=project)
    denoiser = _guidance_of(guidance)(aggregate)
    sigmas = rho_schedule(num_steps, sigma_min, sigma_max, rho)
    if latents.is_complex():  # k-space: the ODE steps (re, im) pairs; the aggregate step is for images only
        x = torch.view_as_real(noise_start(latents, sigmas[0].item()))
        return torch.view_as_complex(ODE("heun")(real_view(denoiser), x, generator, sigmas).contiguous())
    return ODE("heun")(denoiser, noise_start(latents, sigmas[0].item()), generator, sigmas, conditioning=dc_aggregate,
                       callback=aggregate.remember)


def msm_aggregate_denoiser(partial_denoiser, operator, mask_law, generator, num_subsets: int,
                           sigma_data: float = 0.5):
    return MSMAggregate(partial_denoiser, mask_law, generator, num_subsets, fallback="shrink", sigma_data=sigma_data,
                        operator=operator)


def ambient_sampler(masked, latents, mask_law, delta: float, generator, **edm_options):
    masks = ambient_masks(mask_law, delta, tuple(latents.shape[-2:]), generator).to(latents.device)
    denoiser = masked_denoiser(masked, masks)
    if latents.is_complex():
        out = edm_sampler(real_view(denoiser), torch.view_as_real(latents.to(torch.complex128)), generator,
                          **edm_options)
        return torch.view_as_complex(out.contiguous())
    return edm_sampler(denoiser, latents, generator, **edm_options)

