"""Solvers: the time stepping (SEED_METHODS.md sections 1-4; MSM.md section 6). One loop per kind:

- `ODE`: EDM's probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma, Heun or Euler, with optional churn,
  in either direction (decreasing grids generate; increasing ones invert, as the dual bridge encodes).
- `Ancestral`: denoise at every level, then the outer update (`outer_step`: DDIM with eta, eta = 1 DDPM's ancestral
  step, or DDNM's posterior form) to the next; returns the last denoised estimate. MSM's sampler is this solver
  driving the MSM aggregate (training/sampling/denoisers.py `MSMAggregate`); DPS is it with the `dps` term's 'ddpm'
  law; DDS as published is it with DDIM eta 0.15 and the `dds` term's 'ddim' law (methods.py's `dds`).
- `Langevin`: annealed Langevin dynamics on a grid, steps_each steps per level with one step size per level: ALD
  (`ald_step_sizes`, `auto_eps`) and PaDIS (`padis_step_sizes`, no noise at the last level, the `dps` term's
  'state' law).
- `PredictorCorrector`: Song et al.'s Euler-Maruyama predictor and snr-rule Langevin corrector; corrector_steps 0 is
  plain Euler-Maruyama.
- `msm_reference`: the MSM reference's sequential write-back loop, the one method-specific loop.

Every solver is a small frozen object built from its options (validated once, there) and called as
`solver(denoiser, x, generator, sigmas, conditioning=None, callback=None)`: x is the state at sigmas[0] (the initial
states below build it), generator a torch_utils.misc.SeedGenerators (one stream per seed, so a sample depends only on
its seed), sigmas its grid (training/schedules.py), conditioning a term of training/sampling/conditioning.py
(used in place of the denoiser, told the `Step` of each evaluation), callback(sigma, x0_hat) called after every
evaluation with the (conditioned) estimate the update uses (an MSM trajectory; `MSMAggregate.remember`).
`solver.evaluations(sigmas)` is the number of denoiser calls a run makes, so nobody re-derives step counts. No
state survives a call (the MSM aggregate is built per run).

The noise model is EDM's VE one, x_sigma = x_0 + sigma n.
"""

import dataclasses
import math

import numpy as np
import torch

from dnnlib import UserError
from training.sampling.conditioning import Step, per_example_norm
from training.sampling.denoisers import SubsetDraws, aggregate_partial_estimates, single_dtype, subset_count
from training.schedules import bridge_sigmas, check_sigmas


def denoised(denoiser, conditioning, x: torch.Tensor, step: Step, callback=None) -> torch.Tensor:
    """The (conditioned) Tweedie estimate for this evaluation, reported to the callback."""
    x0 = denoiser(x, step.sigma) if conditioning is None else conditioning(denoiser, x, step)
    if callback is not None:
        callback(step.sigma, x0)
    return x0


# ----------------------------------------------------------------------------
# Precision, noise and initial states.

STATE_PRECISIONS = ("single", "double")
NOISE_PRECISIONS = ("single", "state")


def state_dtype(x: torch.Tensor, precision: str = "double") -> torch.dtype:
    """The solver state's dtype for x: float32 / complex64 ('single') or float64 / complex128 ('double')."""
    if precision not in STATE_PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(STATE_PRECISIONS)}, got {precision!r}")
    if precision == "single":
        return single_dtype(x)
    return torch.complex128 if x.is_complex() else torch.float64


def seed_measurement_randn(generator, like: torch.Tensor) -> torch.Tensor:
    """Standard normal noise shaped like `like` (N, ...), row i from generator.generators[i] (SeedGenerators) in one
    call; complex entries get N(0, 1) real and imaginary parts (operators.measurement_randn). The ancestral solver
    draws its noise with it by default, and it makes the latents of MRI generation.

    Drawn and returned in single precision (float32 / complex64) whatever the dtype of `like`: a float64 state gains
    nothing from float64 noise (its 24 bits are far below the sampler's error), a float64 draw costs about 5x as much,
    and adding the float32 noise to the float64 state promotes it inside the same operation."""
    out = torch.empty(like.shape, dtype=single_dtype(like), device=generator.device)
    real = torch.view_as_real(out) if out.is_complex() else out
    for row, g in zip(real, generator.generators):  # in place: the same numbers as measurement_randn, no stack copy
        row.normal_(generator=g)
    return out.to(like.device)


def fresh_noise(generator, x: torch.Tensor, noise: str = "state") -> torch.Tensor:
    """Standard normal noise for the state x: 'state' in x's own dtype (`generator.randn_like`, real states), or
    'single' (`seed_measurement_randn`, real or complex)."""
    return seed_measurement_randn(generator, x) if noise == "single" else generator.randn_like(x)


def noise_start(latents: torch.Tensor, sigma: float, precision: str = "double") -> torch.Tensor:
    """The prior at a high level: sigma times standard normal latents, in the state's precision (rounded once: the
    latents are cast first, as every solver of this house has started)."""
    return latents.to(state_dtype(latents, precision)) * float(sigma)


ALD_INITS = ("noise", "uniform", "adjoint")


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


def warm_start_levels(sigmas: torch.Tensor, *, start_sigma: float | None = None,
                      fraction: float | None = None) -> torch.Tensor:
    """The levels a warm-started chain runs on, sigmas[i0:]: i0 = ceil(fraction * N) for `fraction` in [0, 1)
    (SEED's smpl_start_prc), or the first level <= `start_sigma`. With neither, i0 = 0. Known before any batch, so a
    method's NFE is its solver's count on them."""
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
    return sigmas[i0:]


def warm_start(x_init: torch.Tensor, sigmas: torch.Tensor, generator, *, start_sigma: float | None = None,
               fraction: float | None = None):
    """Start the chain part-way down from an estimate (A^+ y, FBP): returns (x, sigmas[i0:]) with
    x = x_init + sigmas[i0] z, sigmas[i0:] from `warm_start_levels`."""
    sigmas = warm_start_levels(sigmas, start_sigma=start_sigma, fraction=fraction)
    x_init = x_init.to(torch.float64)
    return x_init + sigmas[0].item() * generator.randn_like(x_init).to(torch.float64), sigmas


PADIS_INITS = ("adjoint", "noise")


def padis_initial_state(init: str, estimate: torch.Tensor, generator, sigma: float) -> torch.Tensor:
    """PaDIS's starting state at level sigma (float64): 'adjoint' the classical estimate itself (A^+ y, FBP for CT),
    without noise, as PaDIS's code does (its line that draws sigma_max noise is overwritten); 'noise' sigma z, as its
    paper. PaDIS also clamps its FBP to its [0, 1] data range; the estimate is used here as it is (A^+ y stays in
    range for the image tasks)."""
    if init not in PADIS_INITS:
        raise UserError(f"--padis-init must be one of {', '.join(PADIS_INITS)}, got {init!r}.")
    estimate = estimate.to(torch.float64)
    return estimate.clone() if init == "adjoint" else generator.randn_like(estimate).to(torch.float64) * float(sigma)


# ----------------------------------------------------------------------------
# ODE: Heun / Euler with churn, both directions.

ODE_SOLVERS = ("heun", "euler")


def ode_step(denoiser, x: torch.Tensor, t_cur: float, t_next: float, solver: str = "heun",
             conditioning=None, callback=None) -> torch.Tensor:
    """One step of the probability-flow ODE from t_cur > 0 to t_next, in either direction: Euler, plus Heun's
    correction when solver == 'heun' and t_next > 0 (at t_next = 0 the slope is undefined, so EDM's last step is
    Euler). Returns the state at t_next. x0_weight of the Euler evaluation:
    (t_cur - t_next) / t_cur; of Heun's second: (t_cur - t_next) / (2 t_next), each the coefficient of its x0_hat in
    the state it produces."""
    x0 = denoised(denoiser, conditioning, x, Step(t_cur, t_next, (t_cur - t_next) / t_cur), callback)
    d_cur = (x - x0) / t_cur
    x_next = x + (t_next - t_cur) * d_cur
    if solver == "heun" and t_next != 0:
        x0_next = denoised(denoiser, conditioning, x_next, Step(t_next, t_next, (t_cur - t_next) / (2 * t_next)),
                           callback)
        d_prime = (x_next - x0_next) / t_next
        x_next = x + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next


def check_ode_grid(sigmas) -> torch.Tensor:
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64).flatten()
    steps = sigmas[1:] - sigmas[:-1]
    monotone = bool((steps < 0).all()) or bool((steps > 0).all())
    if len(sigmas) < 2 or not monotone or not bool((sigmas[:-1] > 0).all()) or sigmas[-1] < 0:
        raise ValueError("the ODE solver needs >= 2 strictly monotone noise levels, all > 0 but possibly the last")
    return sigmas


@dataclasses.dataclass(frozen=True)
class ODE:
    """EDM's sampler (Karras et al. 2022, Algorithm 2) in float64 on any monotone grid: `ode_step` from level to
    level; with churn (S_churn > 0, decreasing grids), the level t_cur in [S_min, S_max] is first raised to
    t_hat = (1 + gamma) t_cur by fresh noise, gamma = min(S_churn / steps, sqrt(2) - 1). Deterministic without churn
    (generator may then be None). Returns the state at sigmas[-1] (rho_schedule's last level is 0: the samples)."""

    solver: str = "heun"
    S_churn: float = 0.0
    S_min: float = 0.0
    S_max: float = math.inf
    S_noise: float = 1.0

    def __post_init__(self):
        if self.solver not in ODE_SOLVERS:
            raise ValueError(f"solver must be 'heun' or 'euler', got {self.solver!r}")

    def __call__(self, denoiser, x, generator, sigmas, conditioning=None, callback=None):
        levels = check_ode_grid(sigmas).tolist()  # Python floats: no host sync in the loop
        gamma_max = min(self.S_churn / (len(levels) - 1), math.sqrt(2) - 1)
        x = x.to(torch.float64)
        for t_cur, t_next in zip(levels[:-1], levels[1:]):
            gamma = gamma_max if self.S_min <= t_cur <= self.S_max else 0.0
            t_hat = t_cur + gamma * t_cur
            if gamma > 0:
                x = x + math.sqrt(t_hat**2 - t_cur**2) * self.S_noise * generator.randn_like(x).to(torch.float64)
            x = ode_step(denoiser, x, t_hat, t_next, self.solver, conditioning, callback)
        return x

    def evaluations(self, sigmas) -> int:
        steps = len(sigmas) - 1
        return steps if self.solver == "euler" else 2 * steps - int(float(sigmas[-1]) == 0)


def encode(denoiser, images: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Probability-flow inversion (DDIB): images (N, ...), taken as the state at sigmas[-1], integrated up the
    decreasing grid `sigmas` (schedules.bridge_sigmas: no final 0) to their latent states at sigmas[0] (float64;
    divide by sigmas[0] for unit-variance noise)."""
    return ODE("heun")(denoiser, images, None, torch.as_tensor(sigmas).flip(0))


def decode(denoiser, latents: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """The inverse path of `encode`: latent states at sigmas[0] down to images at sigmas[-1] (no last jump to 0, so
    that it retraces the encoding path)."""
    return ODE("heun")(denoiser, latents, None, sigmas)


def dual_bridge(source_denoiser, target_denoiser, images: torch.Tensor, num_steps: int = 64,
                sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    """MGDM's stage 2 (SEED_METHODS.md 1.5): encode images with the source label's denoiser, decode with the target
    label's (guided) denoiser, both with Heun on the same `bridge_sigmas` levels in opposite order, so with the same
    denoiser decode(encode(x)) returns x up to a discretisation error of second order in the step count.
    Deterministic; returns float64 images at sigma_min; 2 num_steps denoiser calls each way (`ODE.evaluations`)."""
    sigmas = bridge_sigmas(num_steps, sigma_min, sigma_max, rho, device=images.device)
    return decode(target_denoiser, encode(source_denoiser, images, sigmas), sigmas)


# ----------------------------------------------------------------------------
# Ancestral: DDPM / DDIM / DDNM.

OUTER_UPDATES = ("ddim", "ddnm")


def outer_coefficients(s0: float, s1: float, outer: str, eta: float) -> tuple[float, float]:
    """(b, c) of the outer update z' = (1 - b) z_hat + b z + c noise from level s0 to s1 < s0 (`outer_step`)."""
    if outer == "ddim":
        sigma_up = eta * math.sqrt(s1**2 * (s0**2 - s1**2) / s0**2)
        return math.sqrt(max(s1**2 - sigma_up**2, 0.0)) / s0, sigma_up
    return s1 * math.sqrt(1 - eta**2) / s0, s1 * eta


def outer_step(z, z_hat, s0: float, s1: float, noise, outer: str, eta: float):
    """Move the state z at level s0 to level s1 < s0, with z_hat the denoised estimate and `noise` standard normal.

    'ddim': the DDIM step with parameter eta (eta = 1 is DDPM's ancestral step) in sigma form:
        sigma_up = eta * sqrt(s1^2 (s0^2 - s1^2) / s0^2);  z <- z_hat + sqrt(s1^2 - sigma_up^2) (z - z_hat) / s0
        + sigma_up * noise.
    'ddnm': MSM.md section 7's posterior form z <- z_hat + s1 (eta noise + sqrt(1 - eta^2) (z - z_hat) / s0).
    """
    # Both are z' = (1 - b) z_hat + b z + c noise with scalar b, c; written as three fused passes over the state
    # (the textbook form takes seven), in the state's precision whatever the precision of z_hat and the noise.
    b, c = outer_coefficients(s0, s1, outer, eta)
    out = z * b
    out.add_(z_hat, alpha=1 - b)
    return out.add_(noise, alpha=c)


def check_outer(outer: str, eta: float):
    if outer not in OUTER_UPDATES:
        raise ValueError(f"outer must be one of {', '.join(OUTER_UPDATES)}, got {outer!r}")
    if not 0 <= eta <= 1:
        raise ValueError(f"eta must be in [0, 1], got {eta}")


@dataclasses.dataclass(frozen=True)
class Ancestral:
    """Denoise at every level of a decreasing grid; between levels the `outer` update ('ddim' with eta, or 'ddnm')
    moves the state down. Returns the last (conditioned) estimate, at sigmas[-1]; conditioning sees x0_weight = 1 - b
    of the update, and 1 at the last level (sigma_next 0: the estimate is returned as it is).

    precision: the state's, 'single' (float32 / complex64, the MSM reference's) or 'double'. Each level rounds a
        single state once at 6e-8 relative, so even a deterministic run (eta 0) of 200 levels drifts by at most about
        1e-5, far below a network's own error, and with eta > 0 fresh noise covers it; on exact Gaussian partial
        denoisers the two agree to 1e-5 of the samples' scale from the same seeds (tests/sampling/test_solvers.py).
        On a CPU the double state costs 1.6x the single one outside the network (8-coil MRI, batch 8, K 1: 6.4
        against 4.1 ms per step; images 1.2x).
    noise: 'single' (`seed_measurement_randn`, real or complex, MSM's) or 'state' (`generator.randn_like` in the
        state's dtype: DPS draws its float64 noise so, and keeps its numbers with it).
    """

    eta: float = 1.0
    outer: str = "ddim"
    precision: str = "single"
    noise: str = "single"

    def __post_init__(self):
        check_outer(self.outer, self.eta)
        if self.precision not in STATE_PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(STATE_PRECISIONS)}, got {self.precision!r}")
        if self.noise not in NOISE_PRECISIONS:
            raise ValueError(f"noise must be one of {', '.join(NOISE_PRECISIONS)}, got {self.noise!r}")

    def __call__(self, denoiser, x, generator, sigmas, conditioning=None, callback=None):
        levels = check_sigmas(sigmas).tolist()  # floats: no host sync in the loop
        z = x.to(state_dtype(x, self.precision))
        for k, s0 in enumerate(levels):
            last = k + 1 == len(levels)
            s1 = 0.0 if last else levels[k + 1]
            b = 0.0 if last else outer_coefficients(s0, s1, self.outer, self.eta)[0]
            z_hat = denoised(denoiser, conditioning, z, Step(s0, s1, 1 - b), callback)
            if not last:
                z = outer_step(z, z_hat, s0, s1, fresh_noise(generator, z, self.noise), self.outer, self.eta)
        return z_hat

    def evaluations(self, sigmas) -> int:
        return len(sigmas)


# ----------------------------------------------------------------------------
# Langevin: ALD and PaDIS.


def fraction_step_sizes(sigmas: torch.Tensor, fraction: float, option: str = "--ald-step") -> torch.Tensor:
    """Langevin steps eps_i = fraction sigma_i^2, the default rule of ALD and of the predictor-corrector's corrector.

    Why a fraction of sigma_i^2: at level sigma the noised prior's log-density has curvature at most 1 / sigma^2 in
    every direction, for any data (its Hessian is Cov[x0 | x] / sigma^4 - I / sigma^2), and Jalal's annealed
    likelihood, weighted by dc_boost b, adds at most b ||A||^2 / (sigma_y^2 + sigma^2) <= b ||A||^2 / sigma^2. So one
    number, the fraction, fixes how far a step moves relative to the stiffest direction at every level, and with it
    the step's stability (fraction < 2 / (1 + b ||A||^2)) and the bias of the unadjusted chain's stationary law
    (relative O(fraction) at worst), whatever the image size, the number of steps per level or the ladder. More steps
    then mean more mixing, not smaller steps (NCSNv2's criterion, `auto_eps`, shrinks the step as the steps per level
    grow). It is the NCSN / Jalal parametrisation eps (sigma_i / sigma_L)^2 with eps = fraction sigma_L^2
    (`ald_step_sizes`)."""
    if not 0 < fraction < 2:
        raise UserError(f"{option} (the Langevin step as a fraction of sigma^2) must be in (0, 2), got {fraction}.")
    return fraction * check_sigmas(sigmas) ** 2


def ald_step_sizes(sigmas: torch.Tensor, eps: float) -> torch.Tensor:
    """alpha_i = eps (sigma_i / sigma_L)^2 (SDS annealedLangevin.py L16): alpha = eps at the last level, the
    reference's parametrisation (--eps); the same rule as `fraction_step_sizes` with fraction eps / sigma_L^2."""
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


def padis_step_sizes(sigmas: torch.Tensor, alpha_factor: float = 0.5) -> torch.Tensor:
    """PaDIS's Langevin step (SEED_METHODS.md 4.4; PADIS inverse_nodist.py `dps`): x <- x + (alpha / 2) s +
    sqrt(alpha) z with alpha = alpha_factor sigma^2, i.e. the Langevin step eps = alpha_factor sigma^2 / 2. With no
    data term this is unadjusted Langevin on the prior at level sigma: for N(mu, C) data it leaves
    N(mu, (P - alpha P^2 / 4)^-1), P = (C + sigma^2 I)^-1, invariant, the noised prior up to O(alpha)."""
    if not alpha_factor > 0:
        raise UserError(f"--alpha-factor must be > 0, got {alpha_factor}.")
    return alpha_factor * check_sigmas(sigmas) ** 2 / 2


@dataclasses.dataclass(frozen=True, eq=False)
class Langevin:
    """Annealed Langevin dynamics (SDS annealedLangevin.py; PaDIS's solver): for each level i >= offset, steps_each
    times
        x <- x + eps_i score_c(x, sigma_i) + sqrt(2 eps_i noise_boost) z,   z ~ N(0, I) per real component,
    score_c = (x0_c - x) / sigma_i^2, so conditioning sees x0_weight = eps_i / sigma_i^2.

    step_sizes: eps_i, one per level of the grid it runs on (`ald_step_sizes`, `padis_step_sizes`).
    noise_boost = 1 is Langevin at the correct temperature; the ALD reference draws z complex with variance 1/2 per
        real component, i.e. noise_boost = 0.5 reproduces it (temperature 1/2).
    offset k skips the k highest levels (x is then the state for sigmas[k]).
    last_level_noise False: no noise at the last level (PaDIS).
    final_denoise: return the (conditioned) Tweedie estimate at sigmas[-1] instead of the last iterate.
    """

    step_sizes: torch.Tensor
    steps_each: int = 1
    noise_boost: float = 1.0
    offset: int = 0
    last_level_noise: bool = True
    final_denoise: bool = False

    def __post_init__(self):
        if not (isinstance(self.steps_each, int) and self.steps_each >= 1):
            raise UserError(f"--steps-each must be an integer >= 1, got {self.steps_each!r}.")
        if not self.noise_boost >= 0:
            raise UserError(f"--noise-boost must be >= 0, got {self.noise_boost}.")

    def __call__(self, denoiser, x, generator, sigmas, conditioning=None, callback=None):
        sigmas = check_sigmas(sigmas)
        step_sizes = torch.as_tensor(self.step_sizes, dtype=torch.float64)
        if step_sizes.shape != sigmas.shape or not bool((step_sizes > 0).all()):
            raise UserError("Langevin sampling needs one positive step size per level.")
        if not (isinstance(self.offset, int) and 0 <= self.offset < len(sigmas)):
            raise UserError(f"--sigma-offset must be in 0..{len(sigmas) - 1} (levels to skip), got {self.offset!r}.")
        levels, steps = sigmas[self.offset:].tolist(), step_sizes[self.offset:].tolist()
        x = x.to(torch.float64)
        for i, (sigma, eps) in enumerate(zip(levels, steps, strict=True)):
            noisy = self.last_level_noise or i + 1 < len(levels)
            noise_std = math.sqrt(2 * eps * self.noise_boost)
            for _ in range(self.steps_each):
                x0 = denoised(denoiser, conditioning, x, Step(sigma, sigma, eps / sigma**2), callback)
                x = x + eps * ((x0 - x) / sigma**2)
                if noisy:
                    x = x + noise_std * generator.randn_like(x).to(torch.float64)
        if self.final_denoise:
            return denoised(denoiser, conditioning, x, Step(levels[-1], 0.0, 1.0), callback)
        return x

    def evaluations(self, sigmas) -> int:
        return (len(sigmas) - self.offset) * self.steps_each + int(self.final_denoise)


def padis_solver(sigmas: torch.Tensor, inner_steps: int = 10, alpha_factor: float = 0.5) -> Langevin:
    """PaDIS's inverse solver (SEED_METHODS.md 4.4) on its grid (schedules.padis_sigmas): Langevin with
    `padis_step_sizes`, inner_steps iterations per level, no noise at the last level, returning the last iterate (no
    final denoising, as PaDIS); its data term is conditioning.dps(..., law='state'). Per-example norms, so a sample
    depends only on its seed (PaDIS takes the norm over its batch of one)."""
    if not (isinstance(inner_steps, int) and inner_steps >= 1):
        raise UserError(f"--inner-steps must be an integer >= 1, got {inner_steps!r}.")
    return Langevin(padis_step_sizes(sigmas, alpha_factor), inner_steps, last_level_noise=False)


# ----------------------------------------------------------------------------
# Predictor-corrector: Euler-Maruyama predictor, Langevin corrector.

SDE_KINDS = ("ve", "vp")
PREDICTORS = ("em", "none")


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
    scale, scale_next = math.sqrt(1 + sigma**2), math.sqrt(1 + sigma_next**2)
    b = d / (1 + sigma**2)
    x_vp = (1 + b / 2) * x / scale + b * scale * score + math.sqrt(b) * noise
    return x_vp * scale_next


def em_x0_weight(sigma: float, sigma_next: float, sde: str) -> float:
    """d x_next / d x0 of `em_step`: d / sigma^2 (VE); b sqrt((1 + sigma^2) (1 + sigma_next^2)) / sigma^2 (VP)."""
    d = sigma**2 - sigma_next**2
    if sde == "ve":
        return d / sigma**2
    return d / (1 + sigma**2) * math.sqrt((1 + sigma**2) * (1 + sigma_next**2)) / sigma**2


def corrector_step_size(score: torch.Tensor, snr: float) -> torch.Tensor:
    """Song et al.'s rule (PredictorCorrector with `snr`): eps = 2 (snr ||z|| / ||score||)^2 per example, with ||z||
    replaced by its typical value sqrt(d) as SEED does (deterministic given the score). Norms are per example (the
    reference averages over the batch, which would make a sample depend on its batch mates). Shaped (N, 1, ..., 1)."""
    dim = score[0].numel()
    return 2 * (snr * math.sqrt(dim) / per_example_norm(score).clamp_min(torch.finfo(score.dtype).tiny)) ** 2


@dataclasses.dataclass(frozen=True)
class PredictorCorrector:
    """Song et al. 2021's PC sampler (Alg. 2): from x at sigmas[0], for each next level an EM predictor step onto it
    (skipped with predictor 'none') then `corrector_steps` Langevin corrector steps at it (x <- x + eps G +
    sqrt(2 eps) z, G the conditioned score). SEED runs the corrector before the predictor at each level; this order is
    Song's. corrector_steps = 0 is plain Euler-Maruyama (with the exact score the state ends distributed as the data
    convolved with N(0, sigmas[-1]^2)). Returns the state at sigmas[-1], or with final_denoise its (conditioned)
    Tweedie estimate (SEED returns the last predictor mean).

    The corrector's step: corrector_step c gives eps = c sigma^2 (`fraction_step_sizes`: the same move relative to
    the stiffest direction at every level, image size and budget; its evaluations carry x0_weight c, so terms that
    correct the state apply); with corrector_step None, Song's snr rule (`corrector_step_size`, per-example norms:
    a step that depends on the estimate itself and on how many pixels share the example's norm, so its evaluations
    carry no x0_weight)."""

    predictor: str = "em"
    corrector_steps: int = 1
    snr: float = 0.16
    sde: str = "ve"
    final_denoise: bool = False
    corrector_step: float | None = None

    def __post_init__(self):
        if not (isinstance(self.corrector_steps, int) and self.corrector_steps >= 0):
            raise UserError(f"--corrector-steps must be an integer >= 0, got {self.corrector_steps!r}.")
        if self.corrector_step is not None:
            fraction_step_sizes(torch.ones(1), self.corrector_step, "--corrector-step")  # checks the fraction
        elif not self.snr > 0:
            raise UserError(f"--snr (the corrector's signal-to-noise ratio) must be > 0, got {self.snr}.")
        if self.sde not in SDE_KINDS:
            raise UserError(f"--sde must be one of {', '.join(SDE_KINDS)}, got {self.sde!r}.")
        if self.predictor not in PREDICTORS:
            raise UserError(f"--predictor must be 'em' or 'none', got {self.predictor!r}.")
        if self.predictor == "none" and self.corrector_steps == 0:
            raise UserError("With --predictor none the corrector must run (--corrector-steps >= 1).")

    def __call__(self, denoiser, x, generator, sigmas, conditioning=None, callback=None):
        levels = check_sigmas(sigmas).tolist()
        x = x.to(torch.float64)
        for sigma, sigma_next in zip(levels[:-1], levels[1:]):
            if self.predictor == "em":
                x0 = denoised(denoiser, conditioning, x,
                              Step(sigma, sigma_next, em_x0_weight(sigma, sigma_next, self.sde)), callback)
                x = em_step(x, x0, sigma, sigma_next, generator.randn_like(x).to(torch.float64), self.sde)
            for _ in range(self.corrector_steps):
                fraction = self.corrector_step
                x0 = denoised(denoiser, conditioning, x, Step(sigma_next, sigma_next, fraction), callback)
                score = (x0 - x) / sigma_next**2
                eps = (corrector_step_size(score, self.snr) if fraction is None else
                       torch.tensor(fraction * sigma_next**2, dtype=torch.float64))
                x = x + eps * score + (2 * eps).sqrt() * generator.randn_like(x).to(torch.float64)
        if self.final_denoise:
            return denoised(denoiser, conditioning, x, Step(levels[-1], 0.0, 1.0), callback)
        return x

    def evaluations(self, sigmas) -> int:
        steps = len(sigmas) - 1
        return steps * (int(self.predictor == "em") + self.corrector_steps) + int(self.final_denoise)


# ----------------------------------------------------------------------------
# MSM's reference write-back loop (MSM.md section 6).


def msm_reference(partial_denoiser, x: torch.Tensor, generator, sigmas, mask_law, num_subsets: int, *,
                  eta: float = 1.0, outer: str = "ddim", precision: str = "single", partial_step=None, project=None,
                  guidance=None, conditioning=None, callback=None) -> torch.Tensor:
    """The MSM reference code's loop, in measurement space: at each level, one subset at a time, each partial
    estimate s_i written back into the state on P_i with DDIM re-noise at the same level before the next mask is
    drawn,
        z <- (1 - P_i) z + P_i (s_i + sqrt(sigma_k^2 - sigma_up^2) (z - s_i) / sigma_k + sigma_up n_i),
    sigma_up the outer update's for this step (0 at the last level); the K estimates are then aggregated as by
    `MSMAggregate` (fallback: the previous level's estimate, 0 at the first), projected (`project`), guided
    (guidance(z_start, sigma) -> a correction, training/sampling/guidance.py `correction`) and conditioned
    (`conditioning` on the aggregate, e.g. `msm_aggregate_step`), and the outer update starts from the written-back
    state. On exact Gaussian partial denoisers the ancestral solver on `MSMAggregate` (the default MSM sampler) gets
    closer to the K = infinity sampler as K grows, this loop does not (tests/test_msm_sampler.py).
    partial_step: MSM's per-subset data consistency (`msm_partial_step`). x the state at sigmas[0]; returns the last
    aggregate. The number of partial-denoiser calls is K per level (`subset_count`).
    """
    check_outer(outer, eta)
    k_subsets = subset_count(num_subsets, mask_law)
    levels = check_sigmas(sigmas).tolist()
    z = x.to(state_dtype(x, precision))
    draws = SubsetDraws(mask_law, tuple(x.shape[-2:]), generator, x.device)
    z_hat = torch.zeros_like(z)
    for k, s0 in enumerate(levels):
        s1 = levels[k + 1] if k + 1 < len(levels) else None
        masks = draws.next(k_subsets)  # (K, N, ...)
        z_start = z
        sigma_up = 0.0 if s1 is None else eta * math.sqrt(s1**2 * (s0**2 - s1**2) / s0**2)
        estimates = []
        for i in range(k_subsets):
            estimate = partial_denoiser(masks[i] * z, masks[i], s0).to(z.dtype)
            if partial_step is not None:
                estimate = partial_step(estimate, masks[i], s0)
            renoised = (estimate + math.sqrt(s0**2 - sigma_up**2) * (z - estimate) / s0
                        + sigma_up * seed_measurement_randn(generator, z))
            z = torch.where(masks[i] > 0, renoised, z)
            estimates.append(estimate)
        z_hat = aggregate_partial_estimates(torch.stack(estimates), masks, z_hat)
        if project is not None:
            z_hat = project(z_hat)
        if guidance is not None:
            z_hat = z_hat + guidance(z_start, s0).to(z_hat.dtype)
        if conditioning is not None:
            b = 0.0 if s1 is None else outer_coefficients(s0, s1, outer, eta)[0]
            z_hat = conditioning(lambda _x, _sigma, aggregate=z_hat: aggregate, z, Step(s0, s1 or 0.0, 1 - b))
        if callback is not None:
            callback(s0, z_hat)
        if s1 is not None:
            z = outer_step(z, z_hat, s0, s1, seed_measurement_randn(generator, z), outer, eta)
    return z_hat


def msm_reference_evaluations(sigmas, num_subsets: int, mask_law) -> int:
    """Partial-denoiser calls of `msm_reference`: K per level."""
    return len(sigmas) * subset_count(num_subsets, mask_law)
