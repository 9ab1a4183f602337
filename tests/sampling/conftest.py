"""Shared pieces of the sampling tests: the named methods assembled from the package's four pieces (as the method
registry assembles them), so that every test drives the same assembly. Closed forms live in tests/gaussian.py
(exact Gaussian denoisers and samples) and tests/linear_gaussian.py (exact posteriors of linear Gaussian problems)."""

import torch

from training.sampling.conditioning import dps, msm_aggregate_step, msm_partial_step
from training.sampling.denoisers import MSMAggregate, ambient_masks, masked_denoiser, real_view
from training.sampling.solvers import (
    ODE,
    Ancestral,
    Langevin,
    PredictorCorrector,
    msm_reference,
    noise_start,
    padis_solver,
)
from training.schedules import rho_schedule


def edm_generate(denoiser, latents: torch.Tensor, generator, num_steps: int = 18, sigma_min: float = 0.002,
                 sigma_max: float = 80.0, rho: float = 7.0, **ode_options) -> torch.Tensor:
    """EDM's sampler: the ODE solver (Heun by default, options as `ODE`) on EDM's rho schedule from standard normal
    latents; complex latents are stepped as their real view."""
    sigmas = rho_schedule(num_steps, sigma_min, sigma_max, rho)
    solver = ODE(**ode_options)
    if latents.is_complex():
        x = torch.view_as_real(noise_start(latents, sigmas[0].item()))
        return torch.view_as_complex(solver(real_view(denoiser), x, generator, sigmas).contiguous())
    return solver(denoiser, noise_start(latents, sigmas[0].item()), generator, sigmas)


def ambient_generate(masked, latents, mask_law, delta, generator, **edm_options):
    """Ambient Diffusion's sampler: EDM's sampler over the masked denoiser at each seed's fixed mask."""
    masks = ambient_masks(mask_law, delta, tuple(latents.shape[-2:]), generator).to(latents.device)
    return edm_generate(masked_denoiser(masked, masks), latents, generator, **edm_options)


def ancestral_generate(denoiser, latents, generator, sigmas, **options):
    """The ancestral solver from standard normal latents (options as `Ancestral`)."""
    start = noise_start(latents, sigmas[0].item(), options.get("precision", "single"))
    return Ancestral(**options)(denoiser, start, generator, sigmas)


def msm_generate(partial, latents, law, generator, *, num_subsets=3, sigmas=None, variant="batched", eta=1.0,
                 outer="ddim", precision="single", num_steps=18, partial_step=None, term=None, callback=None):
    """MSM's sampler: the ancestral solver on the MSM aggregate ('batched'), the reference write-back loop
    ('reference'), or Heun's ODE on EDM's grid over the aggregate ('heun'); `partial_step` and `term` are MSM's
    data-consistency steps. Uncovered entries keep the estimate the solver used (`MSMAggregate.remember`)."""
    if variant == "reference":
        return msm_reference(partial, noise_start(latents, sigmas[0].item(), precision), generator, sigmas, law,
                             num_subsets, eta=eta, outer=outer, precision=precision, partial_step=partial_step,
                             conditioning=term, callback=callback)
    aggregate = MSMAggregate(partial, law, generator, num_subsets, partial_step=partial_step)

    def remember(sigma, z_hat):
        aggregate.remember(sigma, z_hat)
        if callback is not None:
            callback(sigma, z_hat)

    if variant == "heun":
        grid = rho_schedule(num_steps)
        if latents.is_complex():
            x = torch.view_as_real(noise_start(latents, grid[0].item()))
            out = ODE()(real_view(aggregate), x, generator, grid,
                        callback=lambda sigma, x0: remember(sigma, torch.view_as_complex(x0)))
            return torch.view_as_complex(out.contiguous())
        return ODE()(aggregate, noise_start(latents, grid[0].item()), generator, grid, conditioning=term,
                     callback=remember)
    return Ancestral(eta, outer, precision)(aggregate, noise_start(latents, sigmas[0].item(), precision), generator,
                                            sigmas, conditioning=term, callback=remember)


def msm_posterior(partial, latents, law, generator, y, *, placement, dc_step, mask=None, operator=None,
                  solver="ancestral", **options):
    """MSM posterior sampling: MSM's data-consistency step on each partial estimate ('partial', MRI's placement) or
    on the aggregate ('aggregate', images), with the ancestral solver or ('heun') Heun's ODE."""
    steps = ({"partial_step": msm_partial_step(y, mask, dc_step)} if placement == "partial" else
             {"term": msm_aggregate_step(operator, y, dc_step)})
    return msm_generate(partial, latents, law, generator, variant="heun" if solver == "heun" else "batched",
                        **steps, **options)


def dps_generate(denoiser, latents, generator, operator, y, mask=None, *, sigmas, zeta=1.0):
    """DPS (Chung et al. 2023): the ancestral solver (eta 1, float64 state and noise) with the 'ddpm' law."""
    start = noise_start(latents, sigmas[0].item())
    return Ancestral(precision="double", noise="state")(denoiser, start, generator, sigmas,
                                                        conditioning=dps(operator, y, mask, zeta=zeta, law="ddpm"))


def ald(denoiser, x, generator, sigmas, step_sizes, steps_each, *, conditioning=None, **options):
    """ALD: the Langevin solver with one step size per level (`ald_step_sizes`)."""
    return Langevin(step_sizes, steps_each, **options)(denoiser, x, generator, sigmas, conditioning=conditioning)


def pc(denoiser, x, generator, sigmas, *, conditioning=None, **options):
    """The predictor-corrector solver (options as `PredictorCorrector`)."""
    return PredictorCorrector(**options)(denoiser, x, generator, sigmas, conditioning=conditioning)


def padis(denoiser, x, generator, sigmas, operator, y, mask=None, *, zeta, inner_steps=10, alpha_factor=0.5):
    """PaDIS's solver with its DPS term, as reconstruct.py's padis method assembles it."""
    term = dps(operator, y, mask, zeta=zeta, law="state")
    return padis_solver(sigmas, inner_steps, alpha_factor)(denoiser, x, generator, sigmas, conditioning=term)
