"""Score-based solvers on a noise-level grid (SEED_METHODS.md sections 2-3): annealed Langevin dynamics (ALD, the
Aali/Tamir pipeline and Jalal et al. 2021), the Euler-Maruyama predictor, the Langevin corrector with Song et al.'s
snr step rule, predictor-corrector, the probability-flow ODE in both directions, warm starts, and PaDIS's
DPS-Langevin solver (SEED_METHODS.md 4.4).

Conventions shared by every solver here:
- The noise model is EDM's VE one, x_sigma = x_0 + sigma n, and every solver takes and returns states in it.
- `denoiser` D(x, sigma) -> x0_hat on float64 tensors (training/samplers.py `net_denoiser`, training/posterior.py
  `image_denoiser`, the MSM aggregate, or a closed form in the tests). The score is (D(x, sigma) - x) / sigma^2.
- `conditioning` is None (prior sampling) or a term of training/conditioning.py: a callable
  (denoiser, x, sigma) -> conditioned x0_hat, used in place of the denoiser, so the solver follows the score
  (x0_c - x) / sigma^2 = prior score + likelihood term. Solvers know nothing of measurements.
- `x` is the state at sigmas[0] (float64; `noise_start` / `warm_start` / `ald_initial_state` build it), `generator`
  anything with `randn_like(x)` (torch_utils.misc.SeedGenerators: each image depends only on its seed).
- `sigmas` are float64, positive and strictly decreasing (probability_flow: monotone either way). No state survives a
  call. Every solver returns the last iterate; `final_denoise` replaces it by its (conditioned) Tweedie estimate.
"""

import math

import numpy as np
import torch

from dnnlib import UserError
from training.posterior import dps_gradient
from training.samplers import ode_step
from training.sampling.schedules import check_sigmas, geometric_ladder, padis_sigmas  # noqa: F401 (the scripts)

SDE_KINDS = ("ve", "vp")
ALD_INITS = ("noise", "uniform", "adjoint")


def denoised(denoiser, conditioning, x: torch.Tensor, sigma: float) -> torch.Tensor:
    """The (conditioned) Tweedie estimate at level sigma."""
    return denoiser(x, sigma) if conditioning is None else conditioning(denoiser, x, sigma)


def per_example_norm(v: torch.Tensor) -> torch.Tensor:
    """||v_i|| for each example, shaped (N, 1, ..., 1) to broadcast against v."""
    return v.flatten(1).norm(dim=1).reshape(-1, *([1] * (v.ndim - 1)))


# ----------------------------------------------------------------------------
# Sigma ladders and the ALD step rule (SEED_METHODS.md 2.1, 2.3).


def ald_step_sizes(sigmas: torch.Tensor, eps: float) -> torch.Tensor:
    """alpha_i = eps (sigma_i / sigma_L)^2 (SDS annealedLangevin.py L16): alpha = eps at the last level."""
    if not eps > 0:
        raise UserError(f"--eps (the ALD step at the last level) must be > 0, got {eps}.")
    sigmas = check_sigmas(sigmas)
    return eps * (sigmas / sigmas[-1]) ** 2


def ncsnv2_criterion(eps: float | np.ndarray, sigma_last: float, gamma: float, steps_each: int):
    """NCSNv2 Technique 4: with u = eps / sigma_L^2 and gamma the ladder ratio sigma_{i-1} / sigma_i,
    (1 - u)^(2T) (gamma^2 - 2 eps / (sigma_L^2 - sigma_L^2 (1 - u)^2)) + 2 eps / (sigma_L^2 - sigma_L^2 (1 - u)^2),
    which should be close to 1."""
    u = np.asarray(eps, dtype=np.float64) / sigma_last**2
    stationary = 2 * u / (1 - (1 - u) ** 2)
    return (1 - u) ** (2 * steps_each) * (gamma**2 - stationary) + stationary


AUTO_EPS_GRID = 10000


def auto_eps(sigmas: torch.Tensor, steps_each: int) -> float:
    """The eps of a log grid (AUTO_EPS_GRID points of u = eps / sigma_L^2 in [1e-12, 1)) whose NCSNv2 criterion is
    closest to 1; gamma is the ratio of the last two levels. The reference searches eps in [1e-11, 1e-7], a range
    tied to its own sigma_L; the criterion depends on eps only through u, so the grid is on u."""
    sigmas = check_sigmas(sigmas)
    if len(sigmas) < 2:
        raise UserError("The automatic ALD step needs a ladder of at least 2 levels.")
    sigma_last, gamma = sigmas[-1].item(), (sigmas[-2] / sigmas[-1]).item()
    eps = np.logspace(-12, 0, AUTO_EPS_GRID, endpoint=False) * sigma_last**2
    return float(eps[np.argmin(np.abs(ncsnv2_criterion(eps, sigma_last, gamma, steps_each) - 1))])


# ----------------------------------------------------------------------------
# Starting states.


def noise_start(latents: torch.Tensor, sigma: float) -> torch.Tensor:
    """The prior at a high level: sigma times standard normal latents, float64."""
    return latents.to(torch.float64) * float(sigma)


def ald_initial_state(init: str, shape, generator, sigma: float, adjoint: torch.Tensor | None = None):
    """ALD's starting state (N, ...) float64:
    'noise'   sigma_1 z (Aali's code starts from unit-variance noise, not scaled to the ladder);
    'uniform' uniform in [-1, 1), the house's data range (Jalal's code uses [0, 1) on its [0, 1]-scaled MVUE);
    'adjoint' the given A^H y (or A^+ y, FBP), as is."""
    if init not in ALD_INITS:
        raise UserError(f"--init must be one of {', '.join(ALD_INITS)}, got {init!r}.")
    if init == "adjoint":
        if adjoint is None:
            raise UserError("--init adjoint needs a measurement (prior sampling has none).")
        return adjoint.to(torch.float64).clone()
    if init == "noise":
        return generator.randn(shape, dtype=torch.float64) * float(sigma)
    return generator.rand(shape, dtype=torch.float64) * 2 - 1


def warm_start(x_init: torch.Tensor, sigmas: torch.Tensor, generator, *, start_sigma: float | None = None,
               fraction: float | None = None):
    """Start the chain part-way down from an estimate (A^+ y, FBP): returns (x, sigmas[i0:]) with
    x = x_init + sigmas[i0] z. i0 = ceil(fraction * N) for `fraction` in [0, 1) (SEED's smpl_start_prc), or the first
    level <= `start_sigma`. With neither, i0 = 0."""
    sigmas = check_sigmas(sigmas)
    if fraction is not None and start_sigma is not None:
        raise UserError("Give either --start-sigma or --start-fraction, not both.")
    i0 = 0
    if fraction is not None:
        if not 0 <= fraction < 1:
            raise UserError(f"--start-fraction must be in [0, 1), got {fraction}.")
        i0 = min(math.ceil(fraction * len(sigmas)), len(sigmas) - 1)
    elif start_sigma is not None:
        below = (sigmas <= start_sigma).nonzero()
        if not start_sigma > 0 or len(below) == 0:
            raise UserError(f"--start-sigma {start_sigma} is below every level of the grid (the lowest is "
                            f"{sigmas[-1].item():.4g}).")
        i0 = int(below[0])
    x_init = x_init.to(torch.float64)
    return x_init + sigmas[i0].item() * generator.randn_like(x_init).to(torch.float64), sigmas[i0:]


# ----------------------------------------------------------------------------
# Annealed Langevin dynamics.


def annealed_langevin(denoiser, x: torch.Tensor, generator, sigmas: torch.Tensor, step_sizes: torch.Tensor,
                      steps_each: int, *, noise_boost: float = 1.0, sigma_offset: int = 0, conditioning=None,
                      final_denoise: bool = False) -> torch.Tensor:
    """ALD (SDS annealedLangevin.py): for each level i >= sigma_offset, steps_each times
        x <- x + alpha_i score_c(x, sigma_i) + sqrt(2 alpha_i noise_boost) z,   z ~ N(0, I) per real component.
    noise_boost = 1 is Langevin at the correct temperature. The reference draws z complex with variance 1/2 per real
    component, i.e. noise_boost = 0.5 reproduces it (temperature 1/2). `sigma_offset` = k skips the k highest levels
    (it starts at sigmas[k]; x is then the state for that level). The conditioning supplies the data term: Jalal's
    annealed A^H (y - A x) / (sigma_y^2 + sigma_i^2) times dc_boost, or the normalized one (training/conditioning.py).
    Returns the last iterate (or its Tweedie estimate with final_denoise); no oracle selection."""
    sigmas = check_sigmas(sigmas)
    step_sizes = torch.as_tensor(step_sizes, dtype=torch.float64)
    if step_sizes.shape != sigmas.shape or not bool((step_sizes > 0).all()):
        raise UserError("ALD needs one positive step size per level.")
    if not (isinstance(steps_each, int) and steps_each >= 1):
        raise UserError(f"--steps-each must be an integer >= 1, got {steps_each!r}.")
    if not (isinstance(sigma_offset, int) and 0 <= sigma_offset < len(sigmas)):
        raise UserError(f"--sigma-offset must be in 0..{len(sigmas) - 1} (levels to skip), got {sigma_offset!r}.")
    if not noise_boost >= 0:
        raise UserError(f"--noise-boost must be >= 0, got {noise_boost}.")
    x = x.to(torch.float64)
    for sigma, alpha in zip(sigmas[sigma_offset:].tolist(), step_sizes[sigma_offset:].tolist(), strict=True):
        noise_std = math.sqrt(2 * alpha * noise_boost)
        for _ in range(steps_each):
            score = (denoised(denoiser, conditioning, x, sigma) - x) / sigma**2
            x = x + alpha * score + noise_std * generator.randn_like(x).to(torch.float64)
    return denoised(denoiser, conditioning, x, sigmas[-1].item()) if final_denoise else x


# ----------------------------------------------------------------------------
# Euler-Maruyama predictor, Langevin corrector, predictor-corrector.


def em_step(x: torch.Tensor, x0: torch.Tensor, sigma: float, sigma_next: float, noise: torch.Tensor,
            sde: str = "ve") -> torch.Tensor:
    """One reverse-time Euler-Maruyama step from sigma to sigma_next < sigma, given x0 = D_c(x, sigma).
    've': x + d score + sqrt(d) z with d = sigma^2 - sigma_next^2 (= g^2 dt of the VE SDE over the step).
    'vp': the same step of the VP SDE (Song et al.'s EM predictor, drift -beta x / 2) on the VP state
        x_vp = x / sqrt(1 + sigma^2), with beta dt = b = (sigma^2 - sigma_next^2) / (1 + sigma^2):
        x_vp' = (1 + b / 2) x_vp + b score_vp + sqrt(b) z, score_vp = sqrt(1 + sigma^2) score; mapped back to VE."""
    score = (x0 - x) / sigma**2
    d = sigma**2 - sigma_next**2
    if sde == "ve":
        return x + d * score + math.sqrt(d) * noise
    if sde == "vp":
        scale, scale_next = math.sqrt(1 + sigma**2), math.sqrt(1 + sigma_next**2)
        b = d / (1 + sigma**2)
        x_vp = (1 + b / 2) * x / scale + b * scale * score + math.sqrt(b) * noise
        return x_vp * scale_next
    raise UserError(f"--sde must be one of {', '.join(SDE_KINDS)}, got {sde!r}.")


def corrector_step_size(score: torch.Tensor, snr: float) -> torch.Tensor:
    """Song et al.'s rule eps = 2 (snr ||z|| / ||score||)^2 per example, with ||z|| replaced by its typical value
    sqrt(d) as SEED does (deterministic given the score). Norms are per example (the reference averages over the
    batch, which would make a sample depend on its batch mates). Shaped (N, 1, ..., 1)."""
    dim = score[0].numel()
    return 2 * (snr * math.sqrt(dim) / per_example_norm(score).clamp_min(torch.finfo(score.dtype).tiny)) ** 2


def langevin_corrector(denoiser, x: torch.Tensor, generator, sigma: float, steps: int, snr: float,
                       conditioning=None) -> torch.Tensor:
    """`steps` Langevin steps at a fixed level: x <- x + eps G + sqrt(2 eps) z, G the (conditioned) score,
    eps from `corrector_step_size`. They leave N(0, s^2 + sigma^2) invariant up to O(eps^2) for Gaussian data."""
    x = x.to(torch.float64)
    for _ in range(steps):
        score = (denoised(denoiser, conditioning, x, sigma) - x) / sigma**2
        eps = corrector_step_size(score, snr)
        x = x + eps * score + (2 * eps).sqrt() * generator.randn_like(x).to(torch.float64)
    return x


def check_pc_options(corrector_steps: int, snr: float, sde: str, predictor: str):
    if not (isinstance(corrector_steps, int) and corrector_steps >= 0):
        raise UserError(f"--corrector-steps must be an integer >= 0, got {corrector_steps!r}.")
    if not snr > 0:
        raise UserError(f"--snr (the corrector's signal-to-noise ratio) must be > 0, got {snr}.")
    if sde not in SDE_KINDS:
        raise UserError(f"--sde must be one of {', '.join(SDE_KINDS)}, got {sde!r}.")
    if predictor not in ("em", "none"):
        raise UserError(f"--predictor must be 'em' or 'none', got {predictor!r}.")
    if predictor == "none" and corrector_steps == 0:
        raise UserError("With --predictor none the corrector must run (--corrector-steps >= 1).")


def predictor_corrector(denoiser, x: torch.Tensor, generator, sigmas: torch.Tensor, *, predictor: str = "em",
                        corrector_steps: int = 1, snr: float = 0.16, sde: str = "ve", conditioning=None,
                        final_denoise: bool = False) -> torch.Tensor:
    """Song et al. 2021's PC sampler (Alg. 2): from x at sigmas[0], for each next level an EM predictor step onto it
    (skipped with predictor 'none') then `corrector_steps` Langevin corrector steps at it. SEED runs the corrector
    before the predictor at each level; this order is Song's. corrector_steps = 0 is plain Euler-Maruyama.
    Returns the state at sigmas[-1] (SEED returns the last predictor mean: use final_denoise for a clean estimate)."""
    check_pc_options(corrector_steps, snr, sde, predictor)
    sigmas = check_sigmas(sigmas)
    x = x.to(torch.float64)
    levels = sigmas.tolist()
    for sigma, sigma_next in zip(levels[:-1], levels[1:]):
        if predictor == "em":
            x0 = denoised(denoiser, conditioning, x, sigma)
            x = em_step(x, x0, sigma, sigma_next, generator.randn_like(x).to(torch.float64), sde)
        x = langevin_corrector(denoiser, x, generator, sigma_next, corrector_steps, snr, conditioning)
    return denoised(denoiser, conditioning, x, levels[-1]) if final_denoise else x


def euler_maruyama(denoiser, x: torch.Tensor, generator, sigmas: torch.Tensor, *, sde: str = "ve",
                   conditioning=None, final_denoise: bool = False) -> torch.Tensor:
    """The Euler-Maruyama predictor alone from sigmas[0] down to sigmas[-1] (noise added at every step, so with the
    exact score the state ends distributed as the data convolved with N(0, sigmas[-1]^2))."""
    return predictor_corrector(denoiser, x, generator, sigmas, corrector_steps=0, sde=sde, conditioning=conditioning,
                               final_denoise=final_denoise)


# ----------------------------------------------------------------------------
# Probability-flow ODE.


def probability_flow(denoiser, x: torch.Tensor, sigmas, conditioning=None, solver: str = "heun") -> torch.Tensor:
    """Integrate EDM's probability-flow ODE dx/dsigma = (x - D_c(x, sigma)) / sigma (`samplers.ode_step`: Heun, or
    Euler) from sigmas[0] to sigmas[-1] through every listed level, in whichever direction they go: decreasing
    generates, increasing inverts (encodes an image into its latent at a high level: DDIB, the dual bridge). Only
    the last level may be 0 (that step is Euler, as in EDM). Deterministic: no generator."""
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64).flatten()
    steps = sigmas[1:] - sigmas[:-1]
    monotone = bool((steps < 0).all()) or bool((steps > 0).all())
    if len(sigmas) < 2 or not monotone or not bool((sigmas[:-1] > 0).all()) or sigmas[-1] < 0:
        raise ValueError("probability_flow needs >= 2 strictly monotone noise levels, all > 0 but possibly the last")
    conditioned = denoiser if conditioning is None else (lambda x, sigma: conditioning(denoiser, x, sigma))
    x = x.to(torch.float64)
    for sigma, sigma_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        x = ode_step(conditioned, x, sigma, sigma_next, solver)
    return x


# ----------------------------------------------------------------------------
# PaDIS's DPS-Langevin solver (SEED_METHODS.md 4.4; PADIS inverse_nodist.py `dps`).

PADIS_INITS = ("adjoint", "noise")


def check_padis_options(zeta: float, inner_steps: int, alpha_factor: float):
    if not zeta >= 0:
        raise UserError(f"--padis-zeta (the DPS step) must be >= 0, got {zeta}.")
    if not (isinstance(inner_steps, int) and inner_steps >= 1):
        raise UserError(f"--inner-steps must be an integer >= 1, got {inner_steps!r}.")
    if not alpha_factor > 0:
        raise UserError(f"--alpha-factor must be > 0, got {alpha_factor}.")


def padis_level(denoiser, x: torch.Tensor, generator, sigma: float, inner_steps: int, operator, y: torch.Tensor,
                mask: torch.Tensor | None = None, *, zeta: float, alpha_factor: float = 0.5,
                noise: bool = True) -> torch.Tensor:
    """`inner_steps` PaDIS iterations at the fixed level sigma, each with one evaluation of D (and its backward pass):
        g = grad_x ||M (y - A D(x; sigma))||      (`posterior.dps_gradient`, the unsquared norm),
        s = (D(x; sigma) - x) / sigma^2           (the prior score at the iterate before the DPS step, as PaDIS),
        x <- x - zeta g + (alpha / 2) s + sqrt(alpha) z,   alpha = alpha_factor sigma^2,   z ~ N(0, I)
    (z left out with noise=False). With zeta = 0 this is unadjusted Langevin on the prior at level sigma with step
    alpha / 2: for N(mu, C) data it leaves N(mu, (P - alpha P^2 / 4)^-1), P = (C + sigma^2 I)^-1, invariant, i.e.
    the noised prior N(mu, C + sigma^2 I) up to O(alpha)."""
    alpha = alpha_factor * sigma**2
    x = x.to(torch.float64)
    for _ in range(inner_steps):
        grad, x0 = dps_gradient(denoiser, x, sigma, operator, y, mask)
        x = x - zeta * grad + (alpha / 2) * (x0 - x) / sigma**2
        if noise:
            x = x + math.sqrt(alpha) * generator.randn_like(x).to(torch.float64)
    return x


def padis_dps_langevin(denoiser, x: torch.Tensor, generator, sigmas: torch.Tensor, operator, y: torch.Tensor,
                       mask: torch.Tensor | None = None, *, zeta: float, inner_steps: int = 10,
                       alpha_factor: float = 0.5) -> torch.Tensor:
    """PaDIS's inverse solver: `padis_level` at every level of `sigmas` (`padis_sigmas`), inner_steps iterations
    each, without noise at the last level; returns the last iterate (no final denoising, as PaDIS).

    x is the starting state (float64): PaDIS's code starts from the FBP / A^+ y image itself at sigma_max (its line
    that draws sigma_max noise is overwritten), although its paper starts from noise; `padis_initial_state` builds
    either. The denoiser is any D(x, sigma) (a network, the MSM aggregate, the stitched patch denoiser, whose fresh
    random tile shift per call is drawn from `generator` too), operator A, y and mask M as in `dps_gradient`.
    inner_steps * len(sigmas) evaluations of D, each with its backward pass. Per-example norms, so a sample depends
    only on its seed (PaDIS takes the norm over its batch of one)."""
    check_padis_options(zeta, inner_steps, alpha_factor)
    levels = check_sigmas(sigmas).tolist()
    for k, sigma in enumerate(levels):
        x = padis_level(denoiser, x, generator, sigma, inner_steps, operator, y, mask, zeta=zeta,
                        alpha_factor=alpha_factor, noise=k < len(levels) - 1)
    return x


def padis_initial_state(init: str, estimate: torch.Tensor, generator, sigma: float) -> torch.Tensor:
    """PaDIS's starting state at level sigma (float64): 'adjoint' the classical estimate itself (A^+ y, FBP for CT),
    without noise, as PaDIS's code does; 'noise' sigma z, as its paper. PaDIS also clamps its FBP to its [0, 1]
    data range; the estimate is used here as it is (A^+ y stays in range for the image tasks)."""
    if init not in PADIS_INITS:
        raise UserError(f"--padis-init must be one of {', '.join(PADIS_INITS)}, got {init!r}.")
    estimate = estimate.to(torch.float64)
    return estimate.clone() if init == "adjoint" else generator.randn_like(estimate).to(torch.float64) * float(sigma)
