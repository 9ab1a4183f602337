"""Samplers are plain functions: `sampler(denoiser, latents, generator, ...)`, with no state across calls.

A denoiser is any callable `D(x, sigma) -> E[x_0 | x]` on float64 tensors (sigma a python float): a trained network
wrapped by `net_denoiser`, an exact Gaussian denoiser in the tests, or the MSM aggregate of partial denoisers.
Randomness comes only from `generator`, an object with `randn_like(x)` (torch_utils.misc.SeedGenerators: one stream
per seed, so results do not depend on batch size or rank count).
"""

import math

import numpy as np
import torch

from dnnlib import UserError
from training.masks import coverage_aware_masks, empty_coverage
from training.measurements import partial_denoise
from training.networks import vp_grid_sigmas
from training.operators import measurement_randn


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


# ----------------------------------------------------------------------------
# Noise-level grids of the MSM reference.


def vp200_sigmas(device="cpu") -> torch.Tensor:
    """The MSM reference's 200 noise levels, float64 (200,), decreasing from about 157.4 to about 0.0100.

    The reference trains and samples a VP diffusion with 1000 linearly spaced betas in [1e-4, 0.02], respaced to 200
    steps as guided-diffusion's `space_timesteps(1000, '200')` does: kept time steps t_i = round(i * 999 / 199),
    i = 0..199 (no rounding ties occur). Respacing keeps alpha_bar at the kept steps, so the VE-equivalent noise
    level of step t is sigma = sqrt(1 / alpha_bar_t - 1). One definition: `networks.vp_grid_sigmas` (which
    training draws from), here in decreasing order.
    """
    return vp_grid_sigmas().flip(0).to(device)


def check_sigmas(sigmas: torch.Tensor) -> torch.Tensor:
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
    decreasing = bool((sigmas[1:] < sigmas[:-1]).all()) if sigmas.ndim == 1 else False
    if sigmas.ndim != 1 or len(sigmas) < 1 or not bool((sigmas > 0).all()) or not decreasing:
        raise ValueError("sigmas must be a 1-D tensor of positive, strictly decreasing noise levels "
                         "(drop the trailing 0 of rho_schedule)")
    return sigmas


# ----------------------------------------------------------------------------
# Per-seed noise in measurement space and the outer (ancestral / DDIM / DDNM) update shared by the samplers below.


def seed_measurement_randn(generator, like: torch.Tensor) -> torch.Tensor:
    """Standard normal noise shaped like `like` (N, ...) in its dtype, row i from generator.generators[i]
    (SeedGenerators); complex entries get N(0, 1) real and imaginary parts (operators.measurement_randn). The MSM
    samplers draw their noise with it, and it makes the latents of MRI generation."""
    template = torch.empty(like.shape[1:], dtype=like.dtype, device=generator.device)
    return torch.stack([measurement_randn(template, g) for g in generator.generators]).to(like.device)


OUTER_UPDATES = ("ddim", "ddnm")


def outer_step(z, z_hat, s0: float, s1: float, noise, outer: str, eta: float):
    """Move the state z at level s0 to level s1 < s0, with z_hat the denoised estimate and `noise` standard normal.

    'ddim': the DDIM step with parameter eta (eta = 1 is DDPM's ancestral step) in sigma form:
        sigma_up = eta * sqrt(s1^2 (s0^2 - s1^2) / s0^2);  z <- z_hat + sqrt(s1^2 - sigma_up^2) (z - z_hat) / s0
        + sigma_up * noise.
    'ddnm': MSM.md section 7's posterior form z <- z_hat + s1 (eta noise + sqrt(1 - eta^2) (z - z_hat) / s0).
    """
    eps_hat = (z - z_hat) / s0
    if outer == "ddim":
        sigma_up = eta * math.sqrt(s1**2 * (s0**2 - s1**2) / s0**2)
        return z_hat + math.sqrt(max(s1**2 - sigma_up**2, 0.0)) * eps_hat + sigma_up * noise
    return z_hat + s1 * (eta * noise + math.sqrt(1 - eta**2) * eps_hat)


def check_outer(outer: str, eta: float):
    if outer not in OUTER_UPDATES:
        raise ValueError(f"outer must be one of {', '.join(OUTER_UPDATES)}, got {outer!r}")
    if not 0 <= eta <= 1:
        raise ValueError(f"eta must be in [0, 1], got {eta}")


def _state_dtype(latents: torch.Tensor) -> torch.dtype:
    return torch.complex128 if latents.is_complex() else torch.float64


def ancestral_sampler(denoiser, latents: torch.Tensor, generator, sigmas: torch.Tensor | None = None,
                      eta: float = 1.0, outer: str = "ddim") -> torch.Tensor:
    """The plain full-denoiser version of the MSM sampler's outer loop (the reference's DDPM / DDIM sampling).

    denoiser: D(z, sigma) -> E[z_0 | z] on the state (float64, or complex128 for complex latents).
    latents: standard normal (N, ...); the state starts at sigmas[0] * latents.
    generator: torch_utils.misc.SeedGenerators, one stream per batch element.
    sigmas: decreasing positive float64 levels (default `vp200_sigmas()`). At every level the state is denoised;
    between levels the `outer` update ('ddim' with parameter eta, or 'ddnm') moves it down. Returns the last
    denoised estimate, D(z; sigmas[-1]).
    """
    check_outer(outer, eta)
    sigmas = check_sigmas(vp200_sigmas() if sigmas is None else sigmas)
    z = latents.to(_state_dtype(latents)) * sigmas[0].item()
    for k in range(len(sigmas)):
        s0 = sigmas[k].item()
        z_hat = denoiser(z, s0)
        if k + 1 < len(sigmas):
            z = outer_step(z, z_hat, s0, sigmas[k + 1].item(), seed_measurement_randn(generator, z), outer, eta)
    return z_hat


# ----------------------------------------------------------------------------
# MSM stochastic partial-score sampler (MSM.md section 6).


def net_partial_denoiser(net, operator, class_labels=None):
    """Wrap a network as a partial denoiser `partial_denoiser(s, mask, sigma) -> s_hat = P T D(T^H s; sigma)`
    (training.measurements.partial_denoise) on measurement-space batches.

    `operator` is the full operator T of the N batch elements (Identity, or MultiCoilMRI with maps (N or 1, C, H, W))
    and `class_labels` (N, label_dim) or None. The MSM sampler calls the wrapper on K subsets at once, a batch of
    K * N arranged subset-major (rows j * N .. j * N + N - 1 are subset j); coil maps and labels are tiled to match.
    Returns s_hat in the dtype of s.
    """
    tiled_operators = {}

    def denoise(s, mask, sigma):
        n = s.shape[0]
        maps = getattr(operator, "maps", None)
        repeats = n // maps.shape[0] if maps is not None and maps.shape[0] not in (1, n) else 1
        if repeats not in tiled_operators:
            tiled_operators[repeats] = operator if repeats == 1 else type(operator)(maps.repeat(repeats, 1, 1, 1))
        labels = class_labels
        if labels is not None and labels.shape[0] != n:
            labels = labels.repeat(n // labels.shape[0], 1)
        sigma_in = torch.full((n,), float(sigma), dtype=torch.float32, device=s.device)
        s_hat, _ = partial_denoise(net, tiled_operators[repeats], mask, s, sigma_in, labels)
        return s_hat.to(s.dtype)

    return denoise


_MASK_STREAM_SALT = 0x3A5C  # keeps the per-seed mask streams apart from the noise streams of the same seeds


def _mask_generators(generator) -> list[torch.Generator]:
    """One mask generator per batch element, derived from that element's seed (its generator's initial seed).

    Masks come from their own streams so that drawing them does not shift the noise streams: with a law that always
    covers everything, the MSM sampler then draws exactly the noise of `ancestral_sampler` and returns the same
    samples, whatever random numbers the law consumes (a box law with p = 0 still draws its rolls). The mask streams
    live on the CPU whatever the device: a mask draw is a few tiny ops, cheaper there than as GPU kernel launches, and
    the masks of a seed are then the same on every device."""
    gens = []
    for g in generator.generators:
        seed = g.initial_seed()
        state = np.random.SeedSequence([seed & 0xFFFFFFFF, seed >> 32, _MASK_STREAM_SALT]).generate_state(2)
        gens.append(torch.Generator().manual_seed(int(state[0]) << 31 | int(state[1]) >> 1))
    return gens


class _SubsetDraws:
    """Coverage-aware masks from the law, per batch element: element i draws with its own mask generator and keeps
    its own coverage record for the whole sampling run (reset when complete, as in masks.coverage_aware_masks)."""

    def __init__(self, mask_law, shape: tuple[int, int], generator, device):
        self.law, self.shape, self.device = mask_law, shape, device
        self.generators = _mask_generators(generator)
        self.covered = [empty_coverage(mask_law, 1, shape) for _ in self.generators]

    def next(self, k: int) -> torch.Tensor:
        """(k, N, ...) float masks on `device`, the law's mask shape per subset."""
        per_element = []
        for i, g in enumerate(self.generators):
            masks, self.covered[i] = coverage_aware_masks(self.law, k, self.shape, self.covered[i], g)
            per_element.append(masks)
        return torch.cat(per_element, dim=1).to(self.device)


def aggregate_partial_estimates(estimates: torch.Tensor, masks: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """MSM's finite-K denoiser: z_hat = sum_i s_i / count where count = sum_i P_i > 0, and `previous` (the last
    estimate, stale) where no mask of the step covers the entry.

    estimates (K, N, ...) partial estimates s_i (zero off P_i), masks (K, N, ...) broadcastable to them,
    previous (N, ...). Returns (N, ...).
    """
    count = masks.sum(dim=0)
    combined = estimates.sum(dim=0) / count.clamp_min(1)
    return torch.where(count > 0, combined, previous)


VARIANTS = ("batched", "reference")


def msm_sampler(
    partial_denoiser,
    latents: torch.Tensor,
    mask_law,
    generator,
    *,
    num_subsets: int = 3,
    sigmas: torch.Tensor | None = None,
    variant: str = "batched",
    eta: float = 1.0,
    outer: str = "ddim",
    dc_partial=None,
    dc_aggregate=None,
    return_trajectory: bool = False,
):
    """MSM's stochastic partial-score sampler (MSM.md section 6) in measurement space.

    partial_denoiser(s, mask, sigma) -> s_hat: the P-masked estimate of P z from s = P (z + sigma n)
        (`net_partial_denoiser`, or an exact Gaussian one in the tests); called with a batch of any size.
    latents: standard normal (N, ...) of the measurement shape: real (N, C, H, W) for images, complex
        (N, coils, H, W) for MRI (N(0, 1) real and imaginary parts). The state starts at sigmas[0] * latents and is
        kept in float64 / complex128.
    mask_law: a training.masks.MaskLaw; masks have the law's shape for the last two dims of the latents.
    generator: torch_utils.misc.SeedGenerators. Masks (from per-seed mask streams, see `_mask_generators`) and noise
        are drawn per element, so each sample depends only on its seed, not on the batch.
    sigmas: decreasing positive levels (default `vp200_sigmas()`).

    At every level sigma_k, K = num_subsets coverage-aware masks P_i give partial estimates s_i, which are
    aggregated with 1/count weights (`aggregate_partial_estimates`); an entry no mask covered keeps the previous
    level's estimate (at the first level, where there is none, 0: the prior mean of zero-mean data). The outer update
    ('ddim' with eta, 1 = ancestral; or 'ddnm', see `outer_step`) then moves the state to sigma_{k+1}.
    variant 'batched' (default): the K estimates come from the start-of-step state, in one partial_denoiser call on a
        (K N, ...) batch.
    variant 'reference': as the reference code, one subset at a time, each estimate written back into the state on
        P_i with DDIM re-noise at the same level before the next mask is drawn:
        z <- (1 - P_i) z + P_i (s_i + sqrt(sigma_k^2 - sigma_up^2) (z - s_i) / sigma_k + sigma_up n_i), with sigma_up
        the outer update's for this step (0 at the last level); the outer update starts from the written-back state.
        On exact Gaussian partial denoisers the batched variant gets closer to the K = infinity sampler as K grows,
        the reference one does not (tests/test_msm_sampler.py), hence the default.
    dc_partial(s_i, P_i, sigma) -> s_i': applied to each subset's estimate (N, ...) before aggregation (MRI
        posterior sampling); dc_aggregate(z_hat, sigma) -> z_hat' after aggregation (image posterior sampling).
    Returns the last aggregate z_hat (N, ...) at sigmas[-1]; with return_trajectory, (z_hat, list of the aggregate
    at every level).
    """
    if not (isinstance(num_subsets, int) and num_subsets >= 1):
        raise UserError(f"The number of subsets K must be an integer >= 1, got {num_subsets!r}.")
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    check_outer(outer, eta)
    sigmas = check_sigmas(vp200_sigmas() if sigmas is None else sigmas)
    z = latents.to(_state_dtype(latents)) * sigmas[0].item()
    draws = _SubsetDraws(mask_law, tuple(latents.shape[-2:]), generator, latents.device)
    z_hat = torch.zeros_like(z)
    trajectory = []
    for k in range(len(sigmas)):
        s0 = sigmas[k].item()
        s1 = sigmas[k + 1].item() if k + 1 < len(sigmas) else None
        masks = draws.next(num_subsets)  # (K, N, ...)
        if variant == "batched":
            s = (masks * z).flatten(0, 1)
            estimates = partial_denoiser(s, masks.flatten(0, 1), s0).reshape(num_subsets, *z.shape).to(z.dtype)
            if dc_partial is not None:
                estimates = torch.stack([dc_partial(estimates[i], masks[i], s0) for i in range(num_subsets)])
        else:
            sigma_up = 0.0 if s1 is None else eta * math.sqrt(s1**2 * (s0**2 - s1**2) / s0**2)
            estimates = []
            for i in range(num_subsets):
                estimate = partial_denoiser(masks[i] * z, masks[i], s0).to(z.dtype)
                if dc_partial is not None:
                    estimate = dc_partial(estimate, masks[i], s0)
                renoised = (estimate + math.sqrt(s0**2 - sigma_up**2) * (z - estimate) / s0
                            + sigma_up * seed_measurement_randn(generator, z))
                z = torch.where(masks[i] > 0, renoised, z)
                estimates.append(estimate)
            estimates = torch.stack(estimates)
        z_hat = aggregate_partial_estimates(estimates, masks, z_hat)
        if dc_aggregate is not None:
            z_hat = dc_aggregate(z_hat, s0)
        if return_trajectory:
            trajectory.append(z_hat)
        if s1 is not None:
            z = outer_step(z, z_hat, s0, s1, seed_measurement_randn(generator, z), outer, eta)
    return (z_hat, trajectory) if return_trajectory else z_hat


def msm_heun_sampler(
    partial_denoiser,
    latents: torch.Tensor,
    mask_law,
    generator,
    *,
    num_subsets: int = 3,
    num_steps: int = 18,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    dc_partial=None,
    dc_aggregate=None,
) -> torch.Tensor:
    """EDM's Heun sampler (`edm_sampler`, rho schedule, no churn) with the MSM aggregate as the denoiser: every
    denoiser evaluation draws K new coverage-aware masks and evaluates the K partial estimates in one batched call.
    Arguments as `msm_sampler`; complex (MRI) latents run through edm_sampler as their real view (..., 2). Its last
    step (sigma_min -> 0) returns the aggregate at sigma_min, in the latents' layout (float64 / complex128)."""
    if not (isinstance(num_subsets, int) and num_subsets >= 1):
        raise UserError(f"The number of subsets K must be an integer >= 1, got {num_subsets!r}.")
    draws = _SubsetDraws(mask_law, tuple(latents.shape[-2:]), generator, latents.device)
    state = {"z_hat": None}
    is_complex = latents.is_complex()

    def aggregate(x, sigma):
        z = torch.view_as_complex(x.contiguous()) if is_complex else x
        masks = draws.next(num_subsets)
        estimates = partial_denoiser((masks * z).flatten(0, 1), masks.flatten(0, 1), sigma)
        estimates = estimates.reshape(num_subsets, *z.shape).to(z.dtype)
        if dc_partial is not None:
            estimates = torch.stack([dc_partial(estimates[i], masks[i], sigma) for i in range(num_subsets)])
        previous = state["z_hat"] if state["z_hat"] is not None else torch.zeros_like(z)
        z_hat = aggregate_partial_estimates(estimates, masks, previous)
        if dc_aggregate is not None:
            z_hat = dc_aggregate(z_hat, sigma)
        state["z_hat"] = z_hat
        return torch.view_as_real(z_hat) if is_complex else z_hat

    start = torch.view_as_real(latents.to(torch.complex128)) if is_complex else latents
    out = edm_sampler(aggregate, start, generator, num_steps=num_steps, sigma_min=sigma_min, sigma_max=sigma_max,
                      rho=rho, solver="heun")
    return torch.view_as_complex(out.contiguous()) if is_complex else out
