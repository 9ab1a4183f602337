"""Samplers are plain functions: `sampler(denoiser, latents, generator, ...)`, with no state across calls.

A denoiser is any callable `D(x, sigma) -> E[x_0 | x]` on float64 tensors (sigma a python float): a trained network
wrapped by `net_denoiser`, an exact Gaussian denoiser in the tests, or the MSM aggregate of partial denoisers.
Randomness comes only from `generator`, an object with `randn_like(x)` (torch_utils.misc.SeedGenerators: one stream
per seed, so results do not depend on batch size or rank count).
"""

import math

import torch


def net_denoiser(net, class_labels=None):
    """Wrap a preconditioned network (float32, any device) as a float64 denoiser D(x, sigma)."""

    def denoise(x, sigma):
        s = torch.full((x.shape[0],), float(sigma), dtype=torch.float32, device=x.device)
        return net(x.to(torch.float32), s, class_labels).to(torch.float64)

    return denoise


def rho_schedule(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                 device="cpu") -> torch.Tensor:
    """EDM's time steps: sigma_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, then 0.

    Returns float64 (num_steps + 1,), decreasing, ending in 0.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    i = torch.arange(num_steps, dtype=torch.float64, device=device)
    frac = i / max(num_steps - 1, 1)
    t = (sigma_max ** (1 / rho) + frac * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([t, torch.zeros(1, dtype=torch.float64, device=device)])


def edm_sampler(
    denoiser,
    latents: torch.Tensor,  # (N, C, H, W) standard normal draws
    generator,  # provides randn_like for the churn noise
    num_steps: int = 18,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    solver: str = "heun",  # 'heun' (2nd order, EDM Algorithm 2) or 'euler'
    S_churn: float = 0.0,
    S_min: float = 0.0,
    S_max: float = math.inf,
    S_noise: float = 1.0,
) -> torch.Tensor:
    """EDM's stochastic sampler (Karras et al. 2022, Algorithm 2) in float64; returns float64 samples."""
    if solver not in ("heun", "euler"):
        raise ValueError(f"solver must be 'heun' or 'euler', got {solver!r}")
    t_steps = rho_schedule(num_steps, sigma_min, sigma_max, rho, device=latents.device)
    x_next = latents.to(torch.float64) * t_steps[0]
    gamma_max = min(S_churn / num_steps, math.sqrt(2) - 1)
    for i in range(num_steps):
        t_cur, t_next = t_steps[i].item(), t_steps[i + 1].item()
        x_cur = x_next
        # Churn: raise the noise level from t_cur to t_hat by adding fresh noise.
        gamma = gamma_max if S_min <= t_cur <= S_max else 0.0
        t_hat = t_cur + gamma * t_cur
        if gamma > 0:
            x_hat = x_cur + math.sqrt(t_hat**2 - t_cur**2) * S_noise * generator.randn_like(x_cur).to(torch.float64)
        else:
            x_hat = x_cur
        # Euler step from t_hat to t_next.
        d_cur = (x_hat - denoiser(x_hat, t_hat)) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        # Heun correction (not at the last step, where t_next = 0).
        if solver == "heun" and i < num_steps - 1:
            d_prime = (x_next - denoiser(x_next, t_next)) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next
