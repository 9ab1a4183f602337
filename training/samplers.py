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
from training.masks import coverage_aware_select, empty_coverage
from training.measurements import partial_denoise
from training.operators import Identity, measurement_randn
from training.sampling.schedules import (  # noqa: F401 (re-exported for the scripts until methods.py lands)
    EDM_SIGMA_MAX,
    check_sigmas,
    rho_schedule,
    sigmas_in_training_range,
    training_sigma_max,
    vp200_sigmas,
    vp_grid_of,
)


def net_denoiser(net, class_labels=None):
    """Wrap a preconditioned network (float32, any device) as a float64 denoiser D(x, sigma).

    A network with more input than output channels takes a mask as its extra input (trained with the Ambient loss or
    --mask-channel); feeding it the noisy state there would sample garbage, so it is refused: such networks are
    sampled by `ambient_sampler` or the MSM samplers, which give it a mask."""
    if net.in_channels != net.out_channels:
        raise UserError(f"This network takes {net.in_channels - net.out_channels} mask channel(s) besides its "
                        f"{net.out_channels} image channel(s); a plain image denoiser would feed the noisy state into "
                        "them, so sample it with the ambient or msm sampler.")

    def denoise(x, sigma):
        s = torch.full((x.shape[0],), float(sigma), dtype=torch.float32, device=x.device)
        return net(x.to(torch.float32), s, class_labels).to(torch.float64)

    return denoise


class CountingNetwork:
    """A network that counts the images it evaluates (forward passes, batch rows summed) and ticks an optional
    progress bar (`bar.update(1)`) once per call; every other attribute is the network's. Denoisers built on it
    (`net_denoiser`, `net_partial_denoiser`, posterior.image_denoiser) then report the NFE of any sampler."""

    def __init__(self, net):
        self.net, self.images, self.bar = net, 0, None

    def __call__(self, x, sigma, class_labels=None, **kwargs):
        self.images += x.shape[0]
        if self.bar is not None:
            self.bar.update(1)
        return self.net(x, sigma, class_labels, **kwargs)

    def __getattr__(self, name):
        return getattr(self.net, name)


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
    t_steps = rho_schedule(num_steps, sigma_min, sigma_max, rho).tolist()  # Python floats: no host sync in the loop
    x_next = latents.to(torch.float64) * t_steps[0]
    gamma_max = min(S_churn / num_steps, math.sqrt(2) - 1)
    for i in range(num_steps):
        t_cur, t_next = t_steps[i], t_steps[i + 1]
        x_cur = x_next
        # Churn: raise the noise level from t_cur to t_hat by adding fresh noise.
        gamma = gamma_max if S_min <= t_cur <= S_max else 0.0
        t_hat = t_cur + gamma * t_cur
        if gamma > 0:
            x_hat = x_cur + math.sqrt(t_hat**2 - t_cur**2) * S_noise * generator.randn_like(x_cur).to(torch.float64)
        else:
            x_hat = x_cur
        x_next = ode_step(denoiser, x_hat, t_hat, t_next, solver)
    return x_next


def ode_step(denoiser, x: torch.Tensor, t_cur: float, t_next: float, solver: str = "heun") -> torch.Tensor:
    """One step of the probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma from t_cur > 0 to t_next, in
    either direction (down: sampling; up: inversion): Euler, plus Heun's correction when solver == 'heun' and
    t_next > 0 (at t_next = 0 the slope is undefined, so EDM's last step is Euler)."""
    d_cur = (x - denoiser(x, t_cur)) / t_cur
    x_next = x + (t_next - t_cur) * d_cur
    if solver == "heun" and t_next != 0:
        d_prime = (x_next - denoiser(x_next, t_next)) / t_next
        x_next = x + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next


# ----------------------------------------------------------------------------
# Per-seed noise in measurement space and the outer (ancestral / DDIM / DDNM) update shared by the samplers below.


def seed_measurement_randn(generator, like: torch.Tensor) -> torch.Tensor:
    """Standard normal noise shaped like `like` (N, ...), row i from generator.generators[i] (SeedGenerators) in one
    call; complex entries get N(0, 1) real and imaginary parts (operators.measurement_randn). The MSM samplers draw
    their noise with it, and it makes the latents of MRI generation.

    Drawn and returned in single precision (float32 / complex64) whatever the dtype of `like`: a float64 state gains
    nothing from float64 noise (its 24 bits are far below the sampler's error), a float64 draw costs about 5x as much,
    and adding the float32 noise to the float64 state promotes it inside the same operation."""
    out = torch.empty(like.shape, dtype=_single_dtype(like), device=generator.device)
    real = torch.view_as_real(out) if out.is_complex() else out
    for row, g in zip(real, generator.generators):  # in place: the same numbers as measurement_randn, no stack copy
        row.normal_(generator=g)
    return out.to(like.device)


OUTER_UPDATES = ("ddim", "ddnm")


def outer_step(z, z_hat, s0: float, s1: float, noise, outer: str, eta: float):
    """Move the state z at level s0 to level s1 < s0, with z_hat the denoised estimate and `noise` standard normal.

    'ddim': the DDIM step with parameter eta (eta = 1 is DDPM's ancestral step) in sigma form:
        sigma_up = eta * sqrt(s1^2 (s0^2 - s1^2) / s0^2);  z <- z_hat + sqrt(s1^2 - sigma_up^2) (z - z_hat) / s0
        + sigma_up * noise.
    'ddnm': MSM.md section 7's posterior form z <- z_hat + s1 (eta noise + sqrt(1 - eta^2) (z - z_hat) / s0).
    """
    # Both are z' = (1 - b) z_hat + b z + c noise with scalar b, c; written as three fused passes over the state
    # (the textbook form takes seven), in the state's precision whatever the precision of z_hat and the noise.
    if outer == "ddim":
        sigma_up = eta * math.sqrt(s1**2 * (s0**2 - s1**2) / s0**2)
        b, c = math.sqrt(max(s1**2 - sigma_up**2, 0.0)) / s0, sigma_up
    else:
        b, c = s1 * math.sqrt(1 - eta**2) / s0, s1 * eta
    out = z * b
    out.add_(z_hat, alpha=1 - b)
    return out.add_(noise, alpha=c)


def check_outer(outer: str, eta: float):
    if outer not in OUTER_UPDATES:
        raise ValueError(f"outer must be one of {', '.join(OUTER_UPDATES)}, got {outer!r}")
    if not 0 <= eta <= 1:
        raise ValueError(f"eta must be in [0, 1], got {eta}")


STATE_PRECISIONS = ("single", "double")


def _state_dtype(latents: torch.Tensor, precision: str = "double") -> torch.dtype:
    """The sampler state's dtype for these latents: float32 / complex64 ('single') or float64 / complex128."""
    if precision not in STATE_PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(STATE_PRECISIONS)}, got {precision!r}")
    if precision == "single":
        return _single_dtype(latents)
    return torch.complex128 if latents.is_complex() else torch.float64


def _single_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.complex64 if x.is_complex() else torch.float32


def ancestral_sampler(denoiser, latents: torch.Tensor, generator, sigmas: torch.Tensor | None = None,
                      eta: float = 1.0, outer: str = "ddim", precision: str = "single") -> torch.Tensor:
    """The plain full-denoiser version of the MSM sampler's outer loop (the reference's DDPM / DDIM sampling).

    denoiser: D(z, sigma) -> E[z_0 | z] on the state (single precision by default, see `msm_sampler`).
    latents: standard normal (N, ...); the state starts at sigmas[0] * latents.
    generator: torch_utils.misc.SeedGenerators, one stream per batch element.
    sigmas: decreasing positive float64 levels (default `vp200_sigmas()`). At every level the state is denoised;
    between levels the `outer` update ('ddim' with parameter eta, or 'ddnm') moves it down. Returns the last
    denoised estimate, D(z; sigmas[-1]).
    """
    check_outer(outer, eta)
    sigmas = check_sigmas(vp200_sigmas() if sigmas is None else sigmas).tolist()
    z = latents.to(_state_dtype(latents, precision)) * sigmas[0]
    for k in range(len(sigmas)):
        s0 = sigmas[k]
        z_hat = denoiser(z, s0)
        if k + 1 < len(sigmas):
            z = outer_step(z, z_hat, s0, sigmas[k + 1], seed_measurement_randn(generator, z), outer, eta)
    return z_hat


# ----------------------------------------------------------------------------
# MSM stochastic partial-score sampler (MSM.md section 6).


def net_partial_denoiser(net, operator, class_labels=None, skip_space: str = "image"):
    """Wrap a network as a partial denoiser `partial_denoiser(s, mask, sigma) -> s_hat = P T D(T^H s; sigma)`
    (training.measurements.partial_denoise, with the skip space the network was trained with) on measurement-space
    batches.

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
        # T^H and T in single precision, as the float32 network (complex128 FFTs would cost 4x for no digit it keeps).
        s_hat, _ = partial_denoise(net, tiled_operators[repeats], mask, s.to(_single_dtype(s)), sigma_in, labels,
                                   skip_space)
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


def to_device(x: torch.Tensor, device) -> torch.Tensor:
    """x (on the CPU) on `device` without making the host wait for the GPU: a CUDA copy from pinned memory is queued
    (non_blocking); a plain copy from pageable memory would synchronise with the device every step."""
    device = torch.device(device)
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


class _SubsetDraws:
    """Coverage-aware masks from the law, per batch element: element i draws the random numbers of its masks from its
    own mask generator and keeps its own coverage record for the whole sampling run (reset when complete, as in
    masks.coverage_aware_masks). Only the random numbers are drawn element by element (a few tiny calls per seed);
    the masks of the whole batch are then selected together (masks.coverage_aware_select), with the same result as
    drawing each element alone."""

    def __init__(self, mask_law, shape: tuple[int, int], generator, device):
        self.law, self.shape, self.device = mask_law, shape, device
        self.generators = _mask_generators(generator)
        self.covered = empty_coverage(mask_law, len(self.generators), shape)

    def next(self, k: int) -> torch.Tensor:
        """(k, N, ...) float masks on `device`, the law's mask shape per subset."""
        randoms = [self.law.row_randoms(self.shape, self.generators) for _ in range(k)]
        masks, self.covered = coverage_aware_select(self.law, randoms, self.shape, self.covered)
        return to_device(masks, self.device)


def aggregate_partial_estimates(estimates: torch.Tensor, masks: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """MSM's finite-K denoiser: z_hat = sum_i s_i / count where count = sum_i P_i > 0, and `previous` (the last
    estimate, stale) where no mask of the step covers the entry.

    estimates (K, N, ...) partial estimates s_i (zero off P_i), masks (K, N, ...) broadcastable to them,
    previous (N, ...). Returns (N, ...).
    """
    if estimates.shape[0] == 1:  # one subset: its estimate where it looks, nothing to average
        return torch.where(masks[0] > 0, estimates[0], previous)
    count = masks.sum(dim=0)
    # 1 / count on the (small) mask shape, so the full-size tensors see one multiply instead of a division
    combined = estimates.sum(dim=0) * (1 / count.to(estimates.real.dtype).clamp_min(1))
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
    guidance=None,
    project=None,
    return_trajectory: bool = False,
    precision: str = "single",
):
    """MSM's stochastic partial-score sampler (MSM.md section 6) in measurement space.

    partial_denoiser(s, mask, sigma) -> s_hat: the P-masked estimate of P z from s = P (z + sigma n)
        (`net_partial_denoiser`, or an exact Gaussian one in the tests); called with a batch of any size.
    latents: standard normal (N, ...) of the measurement shape: real (N, C, H, W) for images, complex
        (N, coils, H, W) for MRI (N(0, 1) real and imaginary parts). The state starts at sigmas[0] * latents.
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
    guidance(z, sigma) -> a correction added to the aggregate, evaluated at the start-of-step state z
        (training.guidance.correction: sigma^2 * scale * grad G), so a guided MSM model samples like the guided
        full denoiser does in `edm_sampler`.
    project(z_hat) -> z_hat': applied to every aggregate first (training.measurements.aggregate_projection: onto
        range(T) for networks with the measurement-space skip).
    precision: the state's, 'single' (float32 / complex64, default) or 'double' (float64 / complex128, as EDM keeps
        its sampler state). Each level rounds the state once at 6e-8 relative, so even a deterministic run (eta 0)
        of 200 levels drifts by at most about 1e-5, far below the network's own error, and with eta > 0 fresh noise
        covers it at every level; on exact Gaussian partial denoisers the two agree to 1e-5 of the samples' scale
        from the same seeds (tests/test_hot_paths.py). On a CPU the double state costs 1.6x the single one outside
        the network (8-coil MRI, batch 8, K 1: 6.4 against 4.1 ms per step; images 1.2x): complex128 arithmetic
        runs at half the rate, and each cast between the state and the single-precision network is a pass more.
        The noise is single precision either way (`seed_measurement_randn`).
    Returns the last aggregate z_hat (N, ...) at sigmas[-1], in the state's dtype; with return_trajectory, (z_hat,
    list of the aggregate at every level).
    """
    if not (isinstance(num_subsets, int) and num_subsets >= 1):
        raise UserError(f"The number of subsets K must be an integer >= 1, got {num_subsets!r}.")
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    check_outer(outer, eta)
    if variant == "batched" and mask_law.kind == "full":
        num_subsets = 1  # every mask is P = I: the K estimates would be one network evaluation repeated K times
    sigmas = check_sigmas(vp200_sigmas() if sigmas is None else sigmas).tolist()  # floats: no host sync in the loop
    z = latents.to(_state_dtype(latents, precision)) * sigmas[0]
    draws = _SubsetDraws(mask_law, tuple(latents.shape[-2:]), generator, latents.device)
    z_hat = torch.zeros_like(z)
    trajectory = []
    for k in range(len(sigmas)):
        s0 = sigmas[k]
        s1 = sigmas[k + 1] if k + 1 < len(sigmas) else None
        masks = draws.next(num_subsets)  # (K, N, ...)
        z_start = z
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
        if project is not None:
            z_hat = project(z_hat)
        if guidance is not None:
            z_hat = z_hat + guidance(z_start, s0).to(z_hat.dtype)
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
    guidance=None,
    project=None,
) -> torch.Tensor:
    """EDM's Heun sampler (`edm_sampler`, rho schedule, no churn) with the MSM aggregate as the denoiser: every
    denoiser evaluation draws K new coverage-aware masks and evaluates the K partial estimates in one batched call.
    Arguments as `msm_sampler`; complex (MRI) latents run through edm_sampler as their real view (..., 2). Its last
    step (sigma_min -> 0) returns the aggregate at sigma_min, in the latents' layout (float64 / complex128)."""
    if not (isinstance(num_subsets, int) and num_subsets >= 1):
        raise UserError(f"The number of subsets K must be an integer >= 1, got {num_subsets!r}.")
    if mask_law.kind == "full":
        num_subsets = 1  # every mask is P = I: the K estimates would be one network evaluation repeated K times
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
        if project is not None:
            z_hat = project(z_hat)
        if guidance is not None:
            z_hat = z_hat + guidance(z, sigma).to(z_hat.dtype)
        if dc_aggregate is not None:
            z_hat = dc_aggregate(z_hat, sigma)
        state["z_hat"] = z_hat
        return torch.view_as_real(z_hat) if is_complex else z_hat

    start = torch.view_as_real(latents.to(torch.complex128)) if is_complex else latents
    out = edm_sampler(aggregate, start, generator, num_steps=num_steps, sigma_min=sigma_min, sigma_max=sigma_max,
                      rho=rho, solver="heun")
    return torch.view_as_complex(out.contiguous()) if is_complex else out


def msm_aggregate_denoiser(partial_denoiser, operator, mask_law, generator, num_subsets: int,
                           sigma_data: float = 0.5):
    """MSM's aggregate as an image-space denoiser D(x, sigma) -> x0_hat (float64 (N, C, H, W) in and out), so that
    any sampler written for a full denoiser (training/sde.py, DPS) is driven by an MSM prior as MSM samples it.

    partial_denoiser(s, mask, sigma) -> s_hat as for `msm_sampler` (`net_partial_denoiser`), trained on
    s = P (z0 + sigma n) with z0 = T x0 and n white (N(0, 1) per real component) on the whole measurement space.
    operator: T of the N batch elements, with T^H T = I (Identity; MultiCoilMRI with sum_c |S_c|^2 = 1) and pinv.
    generator: torch_utils.misc.SeedGenerators of the N seeds; masks and the noise below come from each seed's own
    mask stream (`_mask_generators`), so a row depends only on its seed (and the calls so far), and the solver's
    noise streams are left as they would be with a plain denoiser.

    Every call draws K = num_subsets coverage-aware masks per seed (the coverage record carries across calls, as in
    `msm_heun_sampler`), evaluates the K partial estimates in one batched call and aggregates them with 1/count
    weights (`aggregate_partial_estimates`), then returns T^+ of the aggregate.

    The measurement handed to the partial denoiser is s_full = T x + sigma w with w = (I - T T^H) n, n white and
    independent of x. Why: the state is x = x0 + sigma n_img with n_img white on the image space, so
    T x = T x0 + sigma T n_img, whose noise T n_img ~ N(0, T T^H) is white only on range(T) (T T^H = Pi, the
    orthogonal projector onto it; real view, where T^H is the adjoint for Re <a, b>). (I - Pi) n ~ N(0, I - Pi) is
    independent of n_img, so T n_img + (I - Pi) n ~ N(0, Pi + I - Pi) = N(0, I): (z0, s_full) has exactly the joint
    law the partial denoisers were trained on, and P_i s_full is a training input for every mask. Without w, P_i T x
    would carry noise of covariance sigma^2 P_i Pi P_i, not sigma^2 P_i (multi-coil MRI: coil images are correlated).
    The added noise never changes a full-mask estimate: T^H (I - Pi) = 0, so a law that always covers everything
    returns D(x) itself. For Identity, Pi = I and w = 0 (nothing is drawn).

    Entries no mask of the call covers (only when the K masks leave gaps) get sd^2 / (sd^2 + sigma^2) s_full,
    sd = sigma_data (default 0.5: EDM's data std, the scale of the house's [-1, 1] data): the MMSE estimate of an
    entry from its own white-noise measurement if that entry were N(0, sd^2) (EDM's c_skip). It tends to the prior
    mean 0 at high noise (where `msm_sampler` uses 0) and to the measurement at low noise; the previous estimate
    `msm_sampler` keeps there does not exist in a denoiser that solvers call at arbitrary levels (and differentiate
    through, for DPS).
    A law that always covers everything (kind 'full') uses one subset: K copies of P = I would repeat one estimate.
    """
    if not (isinstance(num_subsets, int) and num_subsets >= 1):
        raise UserError(f"The number of subsets K must be an integer >= 1, got {num_subsets!r}.")
    if mask_law.kind == "full":
        num_subsets = 1
    out_of_range_noise = not isinstance(operator, Identity)
    draws = None

    def denoise(x, sigma):
        nonlocal draws
        z = operator.A(x)
        z = z.to(torch.complex128 if z.is_complex() else torch.float64)
        if draws is None:
            draws = _SubsetDraws(mask_law, tuple(z.shape[-2:]), generator, z.device)
        masks = draws.next(num_subsets)  # (K, N, ...)
        if out_of_range_noise:
            template = torch.empty(z.shape[1:], dtype=z.dtype)
            n = torch.stack([measurement_randn(template, g) for g in draws.generators]).to(z.device)
            z = z + float(sigma) * (n - operator.A(operator.AH(n)).to(z.dtype))
        estimates = partial_denoiser((masks * z).flatten(0, 1), masks.flatten(0, 1), sigma)
        estimates = estimates.reshape(num_subsets, *z.shape).to(z.dtype)
        fallback = z * (sigma_data**2 / (sigma_data**2 + float(sigma) ** 2))
        z_hat = aggregate_partial_estimates(estimates, masks, fallback)
        return operator.pinv(z_hat).to(torch.float64)

    return denoise


# ----------------------------------------------------------------------------
# Ambient Diffusion's sampler (Daras et al. 2023; REFERENCES.md).


def ambient_masks(mask_law, delta: float, shape: tuple[int, int], generator) -> torch.Tensor:
    """One mask per batch element, corrupted as `AmbientLoss` corrupts in training: a draw of the training law, then
    each unit of the law's mask shape (a pixel, or a phase-encode line) dropped with probability `delta`, so an entry
    survives with probability (1 - p)(1 - delta) for the pixel law (E[P] (1 - delta) for any law). Drawn on the CPU
    from the element's own mask stream (`_mask_generators`): a seed's mask depends on nothing else.
    Returns float32 (N, 1, H, W) or (N, 1, 1, W)."""
    generators = _mask_generators(generator)
    masks = mask_law.from_randoms(mask_law.row_randoms(shape, generators), shape)
    drops = torch.cat([torch.rand(mask_law.mask_shape(1, shape), generator=g) for g in generators])
    return masks * (drops >= delta)


def net_ambient_denoiser(net, operator, class_labels=None):
    """Wrap a network trained with `AmbientLoss` as masked_denoiser(s, mask, sigma) -> T x0_hat, the estimate of the
    whole clean measurement from s = M z: x0_hat = D(T^H s; sigma) with M as the network's mask channel where it has
    one (images; MRI networks get none), which is the input AmbientLoss trains it on (`partial_denoise`).

    `operator` is the full operator T of the N batch elements (Identity, or MultiCoilMRI with their coil maps) and
    `class_labels` (N, label_dim) or None. Returns T x0_hat in the dtype of s."""

    def denoise(s, mask, sigma):
        sigma_in = torch.full((s.shape[0],), float(sigma), dtype=torch.float32, device=s.device)
        _, x0_hat = partial_denoise(net, operator, mask, s.to(_single_dtype(s)), sigma_in, class_labels)
        return operator.A(x0_hat).to(s.dtype)

    return denoise


def ambient_sampler(masked_denoiser, latents: torch.Tensor, mask_law, delta: float, generator,
                    **edm_options) -> torch.Tensor:
    """Ambient Diffusion's sampler, as Daras et al. sample their models: EDM's sampler (`edm_sampler` with
    `edm_options`: Heun by default, optional churn) in measurement space, where every denoiser evaluation sees only
    M z and M. M is one mask per seed (`ambient_masks`: the training law followed by the extra delta drop), the same
    at every step, so the network always gets the kind of input it was trained on.

    masked_denoiser(s, mask, sigma) -> the estimate of z_0 on every entry from s = M (z_0 + sigma n) (e.g.
        `net_ambient_denoiser`; AmbientLoss trains the network towards E[z_0 | M z_sigma, M]).
    latents: standard normal (N, ...) of the measurement shape, real, or complex for MRI k-space (then stepped as
        (re, im) pairs, like `msm_heun_sampler`). generator: torch_utils.misc.SeedGenerators.
    The reference's optional clipping of the estimate and its guidance from several masks are left out (both off
    here: neither is part of the method). Returns the final estimate (N, ...) in the latents' space.
    """
    if not 0 <= delta < 1:
        raise UserError(f"Ambient's extra drop probability delta must lie in [0, 1), got {delta}.")
    masks = ambient_masks(mask_law, delta, tuple(latents.shape[-2:]), generator).to(latents.device)
    is_complex = latents.is_complex()

    def denoise(x, sigma):
        z = torch.view_as_complex(x.contiguous()) if is_complex else x
        z_hat = masked_denoiser(masks * z, masks, sigma).to(z.dtype)
        return torch.view_as_real(z_hat) if is_complex else z_hat

    start = torch.view_as_real(latents.to(torch.complex128)) if is_complex else latents
    out = edm_sampler(denoise, start, generator, **edm_options)
    return torch.view_as_complex(out.contiguous()) if is_complex else out
