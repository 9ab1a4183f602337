"""Probability-flow inversion and MGDM's dual bridge (DDIB; SEED_METHODS.md section 1.5).

An image x is encoded to a latent by integrating the deterministic probability-flow ODE dx/dsigma = (x - D(x; sigma))
/ sigma upwards, from sigma_min (where x itself is taken as the state) to sigma_max, with the source label's
denoiser; the latent is decoded by integrating back down with the target label's denoiser, optionally guided
(training.guidance). Both directions integrate with `training.sde.probability_flow` (EDM's Heun step) on EDM's rho
schedule, the same levels in opposite order, so with the same denoiser decode(encode(x)) returns x up to the
discretisation error, which falls at second order in the number of steps. Decoding stops at sigma_min (no last jump
to 0) so that it retraces the encoding path.
"""

import torch

from training.sampling.schedules import bridge_sigmas
from training.sde import probability_flow


def encode(denoiser, images: torch.Tensor, num_steps: int = 64, sigma_min: float = 0.002, sigma_max: float = 80.0,
           rho: float = 7.0) -> torch.Tensor:
    """Images (N, ...) -> latent states at sigma_max (float64; divide by sigma_max for unit-variance noise)."""
    sigmas = bridge_sigmas(num_steps, sigma_min, sigma_max, rho, device=images.device)
    return probability_flow(denoiser, images, sigmas.flip(0))


def decode(denoiser, latents: torch.Tensor, num_steps: int = 64, sigma_min: float = 0.002, sigma_max: float = 80.0,
           rho: float = 7.0) -> torch.Tensor:
    """Latent states at sigma_max (N, ...) -> images at sigma_min (float64); the inverse path of `encode`."""
    sigmas = bridge_sigmas(num_steps, sigma_min, sigma_max, rho, device=latents.device)
    return probability_flow(denoiser, latents, sigmas)


def dual_bridge(source_denoiser, target_denoiser, images: torch.Tensor, num_steps: int = 64,
                sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    """MGDM's stage 2: encode images with the source label's denoiser, decode with the target label's (guided)
    denoiser. Deterministic; returns float64 images at sigma_min."""
    latents = encode(source_denoiser, images, num_steps, sigma_min, sigma_max, rho)
    return decode(target_denoiser, latents, num_steps, sigma_min, sigma_max, rho)
