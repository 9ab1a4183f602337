"""Denoisers: the one interface every solver drives, and the wrappers that make one from a network.

A denoiser is any callable `D(x, sigma) -> x0_hat`, an estimate of E[x_0 | x_0 + sigma n = x] with x (N, ...) and
sigma a python float: a network (`net_denoiser`), a guided or classifier-free guided one (training/sampling/
guidance.py), the MSM aggregate of K partial estimates (`MSMAggregate`), a masked Ambient network at a fixed mask
(`masked_denoiser`), the stitched patch prior (training/patches.py), or a closed form in the tests. Solvers may call
it with float64 or single-precision states; the wrappers here return the state's dtype.

A partial denoiser is `partial(s, mask, sigma) -> s_hat`, the P-masked estimate of P z from s = P (z + sigma n) in a
measurement space z = T x (`net_partial_denoiser`; Ambient's `net_ambient_denoiser` estimates all of z instead).
Both are called on batches of any size (the aggregate stacks K subsets of N rows, subset-major).

The masks of a seed come from that seed's own mask stream (`mask_generators`), never from the solver's noise
streams, so a sample depends only on its seed and a law that always covers everything leaves the noise as a plain
denoiser would.
"""

import numpy as np
import torch

from dnnlib import UserError
from training.masks import coverage_aware_select, empty_coverage
from training.measurements import network_input, partial_denoise
from training.operators import Identity, measurement_randn

# ----------------------------------------------------------------------------
# Networks as denoisers.

MASK_CHANNEL_POLICIES = ("refuse", "full")


def single_dtype(x: torch.Tensor) -> torch.dtype:
    """float32, or complex64 for a complex x: the precision of the networks and of the solvers' noise."""
    return torch.complex64 if x.is_complex() else torch.float32


def net_denoiser(net, class_labels=None, mask_channel: str = "refuse"):
    """Wrap a preconditioned network (float32, any device) as a denoiser D(x, sigma) on image batches, returning
    float64 (differentiable in x, so DPS can take its gradient).

    A network with more input than output channels takes a mask as its extra input (trained with the Ambient loss or
    --mask-channel). `mask_channel` says what it gets there:
      'refuse' (generation): such a network is refused, since a plain image denoiser has no mask to give it; it is
        sampled by the ambient or MSM methods, which do;
      'full' (posterior sampling of an MSM model as a full denoiser): an all-ones mask, i.e. the partial denoiser
        with P = I, which its training never showed it (an approximation). Networks without the channel ignore it.
    """
    if mask_channel not in MASK_CHANNEL_POLICIES:
        raise ValueError(f"mask_channel must be one of {', '.join(MASK_CHANNEL_POLICIES)}, got {mask_channel!r}")
    if mask_channel == "refuse" and net.in_channels != net.out_channels:
        raise UserError(f"This network takes {net.in_channels - net.out_channels} mask channel(s) besides its "
                        f"{net.out_channels} image channel(s); a plain image denoiser would feed the noisy state into "
                        "them, so sample it with the ambient or msm sampler.")

    def denoise(x, sigma):
        s = torch.full((x.shape[0],), float(sigma), dtype=torch.float32, device=x.device)
        u = x.to(torch.float32)
        if mask_channel == "full":
            u = network_input(u, torch.ones_like(u[:, :1]), net.in_channels)
        return net(u, s, class_labels).to(torch.float64)

    return denoise


class CountingNetwork:
    """A network that counts the images it evaluates (forward passes, batch rows summed) and ticks an optional
    progress bar (`bar.update(1)`) once per call; every other attribute is the network's. Denoisers built on it then
    report the NFE of any solver (tests compare it with the solvers' own `evaluations`)."""

    def __init__(self, net):
        self.net, self.images, self.bar = net, 0, None

    def __call__(self, x, sigma, class_labels=None, **kwargs):
        self.images += x.shape[0]
        if self.bar is not None:
            self.bar.update(1)
        return self.net(x, sigma, class_labels, **kwargs)

    def __getattr__(self, name):
        return getattr(self.net, name)


def net_partial_denoiser(net, operator, class_labels=None, skip_space: str = "image"):
    """Wrap a network as a partial denoiser `partial_denoiser(s, mask, sigma) -> s_hat = P T D(T^H s; sigma)`
    (training.measurements.partial_denoise, with the skip space the network was trained with) on measurement-space
    batches.

    `operator` is the full operator T of the N batch elements (Identity, or MultiCoilMRI with maps (N or 1, C, H, W))
    and `class_labels` (N, label_dim) or None. The MSM aggregate calls the wrapper on K subsets at once, a batch of
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
        s_hat, _ = partial_denoise(net, tiled_operators[repeats], mask, s.to(single_dtype(s)), sigma_in, labels,
                                   skip_space)
        return s_hat.to(s.dtype)

    return denoise


def net_ambient_denoiser(net, operator, class_labels=None):
    """Wrap a network trained with `AmbientLoss` as masked_denoiser(s, mask, sigma) -> T x0_hat, the estimate of the
    whole clean measurement from s = M z: x0_hat = D(T^H s; sigma) with M as the network's mask channel where it has
    one (images; MRI networks get none), which is the input AmbientLoss trains it on (`partial_denoise`).

    `operator` is the full operator T of the N batch elements (Identity, or MultiCoilMRI with their coil maps) and
    `class_labels` (N, label_dim) or None. Returns T x0_hat in the dtype of s."""

    def denoise(s, mask, sigma):
        sigma_in = torch.full((s.shape[0],), float(sigma), dtype=torch.float32, device=s.device)
        _, x0_hat = partial_denoise(net, operator, mask, s.to(single_dtype(s)), sigma_in, class_labels)
        return operator.A(x0_hat).to(s.dtype)

    return denoise


def masked_denoiser(masked, masks: torch.Tensor):
    """Ambient Diffusion's denoiser at fixed masks: D(z, sigma) = masked(M z, M, sigma) with masks M (N, ...) the same
    at every call (`ambient_masks`), so the network always sees the kind of input it was trained on."""

    def denoise(z, sigma):
        return masked(masks * z, masks, sigma).to(z.dtype)

    return denoise


def real_view(denoiser):
    """A denoiser of complex states (k-space) as one of their real views (..., 2), so that the real-valued ODE solver
    steps (re, im) pairs; `torch.view_as_complex` of the solver's result gives the complex state back."""

    def denoise(x, sigma):
        return torch.view_as_real(denoiser(torch.view_as_complex(x.contiguous()), sigma))

    return denoise


# ----------------------------------------------------------------------------
# Per-seed mask streams and coverage-aware subset draws.

_MASK_STREAM_SALT = 0x3A5C  # keeps the per-seed mask streams apart from the noise streams of the same seeds


def mask_generators(generator) -> list[torch.Generator]:
    """One mask generator per batch element, derived from that element's seed (its generator's initial seed).

    Masks come from their own streams so that drawing them does not shift the noise streams: with a law that always
    covers everything, the MSM aggregate then leaves the solver the noise of a plain denoiser and returns the same
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


class SubsetDraws:
    """Coverage-aware masks from the law, per batch element: element i draws the random numbers of its masks from its
    own mask generator and keeps its own coverage record for the whole sampling run (reset when complete, as in
    masks.coverage_aware_masks). Only the random numbers are drawn element by element (a few tiny calls per seed);
    the masks of the whole batch are then selected together (masks.coverage_aware_select), with the same result as
    drawing each element alone."""

    def __init__(self, mask_law, shape: tuple[int, int], generator, device):
        self.law, self.shape, self.device = mask_law, shape, device
        self.generators = mask_generators(generator)
        self.covered = empty_coverage(mask_law, len(self.generators), shape)

    def next(self, k: int) -> torch.Tensor:
        """(k, N, ...) float masks on `device`, the law's mask shape per subset."""
        randoms = [self.law.row_randoms(self.shape, self.generators) for _ in range(k)]
        masks, self.covered = coverage_aware_select(self.law, randoms, self.shape, self.covered)
        return to_device(masks, self.device)


def ambient_masks(mask_law, delta: float, shape: tuple[int, int], generator) -> torch.Tensor:
    """One mask per batch element, corrupted as `AmbientLoss` corrupts in training: a draw of the training law, then
    each unit of the law's mask shape (a pixel, or a phase-encode line) dropped with probability `delta`, so an entry
    survives with probability (1 - p)(1 - delta) for the pixel law (E[P] (1 - delta) for any law). Drawn on the CPU
    from the element's own mask stream (`mask_generators`): a seed's mask depends on nothing else.
    Returns float32 (N, 1, H, W) or (N, 1, 1, W)."""
    if not 0 <= delta < 1:
        raise UserError(f"Ambient's extra drop probability delta must lie in [0, 1), got {delta}.")
    generators = mask_generators(generator)
    masks = mask_law.from_randoms(mask_law.row_randoms(shape, generators), shape)
    drops = torch.cat([torch.rand(mask_law.mask_shape(1, shape), generator=g) for g in generators])
    return masks * (drops >= delta)


# ----------------------------------------------------------------------------
# MSM's aggregate of partial estimates (MSM.md section 6).


def subset_count(num_subsets, mask_law) -> int:
    """The number K of partial estimates per evaluation: an integer >= 1 (checked here, once for every method),
    and 1 for a law that always covers everything (kind 'full'), whose K masks P = I would repeat one estimate."""
    if not (isinstance(num_subsets, int) and num_subsets >= 1):
        raise UserError(f"--subsets K must be an integer >= 1, got {num_subsets!r}.")
    return 1 if mask_law.kind == "full" else num_subsets


def aggregate_partial_estimates(estimates: torch.Tensor, masks: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """MSM's finite-K denoiser: z_hat = sum_i s_i / count where count = sum_i P_i > 0, and `previous` (the fallback)
    where no mask of the call covers the entry.

    estimates (K, N, ...) partial estimates s_i (zero off P_i), masks (K, N, ...) broadcastable to them,
    previous (N, ...). Returns (N, ...).
    """
    if estimates.shape[0] == 1:  # one subset: its estimate where it looks, nothing to average
        return torch.where(masks[0] > 0, estimates[0], previous)
    count = masks.sum(dim=0)
    # 1 / count on the (small) mask shape, so the full-size tensors see one multiply instead of a division
    combined = estimates.sum(dim=0) * (1 / count.to(estimates.real.dtype).clamp_min(1))
    return torch.where(count > 0, combined, previous)


FALLBACKS = ("previous", "shrink")


class MSMAggregate:
    """MSM's aggregate of K partial denoisers as a denoiser D(z, sigma) -> z_hat, in the measurement space or (with
    `operator`) as an image denoiser. Every call draws K coverage-aware masks per seed from the per-seed mask streams
    (`SubsetDraws`; the coverage record carries across calls), evaluates the K partial estimates in ONE batched
    call of (K N, ...) rows, subset-major, optionally applies a data-consistency step to each (`partial_step`),
    aggregates them with 1/count weights (`aggregate_partial_estimates`) and optionally projects the aggregate
    (`project`, training.measurements.aggregate_projection: onto range(T) for the measurement-space skip).

    partial_denoiser(s, mask, sigma) -> s_hat (`net_partial_denoiser`, CFG-wrapped or not, or an exact one in tests).
    mask_law: the law the subsets are drawn from; num_subsets K (`subset_count`: 1 for a full law).
    generator: torch_utils.misc.SeedGenerators of the N seeds.
    fallback, for the entries that no mask of a call covers (only when the K masks leave gaps):
      'previous' (MSM's sampler): the previous estimate, 0 at the first call (the prior mean of zero-mean data):
        the aggregate this object returned last, or, where the solver reports its estimates to `remember` (its
        callback), the estimate the solver used, guided and conditioned, as MSM's sampler keeps it;
      'shrink' (an image denoiser that solvers call at arbitrary levels and differentiate through, where a previous
        estimate means nothing): sd^2 / (sd^2 + sigma^2) times the entry's own measurement, sd = sigma_data (0.5:
        EDM's data std, the scale of the house's [-1, 1] data), the MMSE estimate of an N(0, sd^2) entry from its
        white-noise measurement (EDM's c_skip): the prior mean 0 at high noise, the measurement at low noise.
    operator: None (the state is the measurement z itself) or T of the N batch elements, with T^H T = I (Identity;
      MultiCoilMRI with sum_c |S_c|^2 = 1) and pinv: the aggregate as an image denoiser, D(x) = T^+ z_hat from
      s_full = T x + sigma w with w = (I - T T^H) n, n white from the seed's mask stream. Why: the state is
      x = x0 + sigma n_img with n_img white on the image space, so T x = T x0 + sigma T n_img, whose noise
      T n_img ~ N(0, T T^H) is white only on range(T) (T T^H = Pi, the orthogonal projector onto it; real view).
      (I - Pi) n ~ N(0, I - Pi) is independent of n_img, so T n_img + (I - Pi) n ~ N(0, I): (z0, s_full) has exactly
      the joint law the partial denoisers were trained on, and P_i s_full is a training input for every mask.
      Without w, P_i T x would carry noise of covariance sigma^2 P_i Pi P_i, not sigma^2 P_i (multi-coil MRI: coil
      images are correlated). The added noise never changes a full-mask estimate (T^H (I - Pi) = 0); for Identity,
      Pi = I and nothing is drawn.
    partial_step(s_i, P_i, sigma) -> s_i': training/sampling/conditioning.py `msm_partial_step` (MRI posterior
      sampling), applied to each subset's estimate before aggregation.
    One object per sampling run (it keeps the coverage record and the previous estimate).
    """

    def __init__(self, partial_denoiser, mask_law, generator, num_subsets: int, *, fallback: str = "previous",
                 sigma_data: float = 0.5, operator=None, partial_step=None, project=None):
        if fallback not in FALLBACKS:
            raise ValueError(f"fallback must be one of {', '.join(FALLBACKS)}, got {fallback!r}")
        self.partial_denoiser, self.mask_law, self.generator = partial_denoiser, mask_law, generator
        self.num_subsets = subset_count(num_subsets, mask_law)
        self.fallback, self.sigma_data, self.operator = fallback, sigma_data, operator
        self.partial_step, self.project = partial_step, project
        self.draws, self.previous = None, None

    def __call__(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        k = self.num_subsets
        z = x
        if self.operator is not None:
            z = self.operator.A(x)
            z = z.to(torch.complex128 if z.is_complex() else torch.float64)
        if self.draws is None:
            self.draws = SubsetDraws(self.mask_law, tuple(z.shape[-2:]), self.generator, z.device)
        masks = self.draws.next(k)  # (K, N, ...)
        if self.operator is not None and not isinstance(self.operator, Identity):
            template = torch.empty(z.shape[1:], dtype=z.dtype)
            n = torch.stack([measurement_randn(template, g) for g in self.draws.generators]).to(z.device)
            z = z + float(sigma) * (n - self.operator.A(self.operator.AH(n)).to(z.dtype))
        estimates = self.partial_denoiser((masks * z).flatten(0, 1), masks.flatten(0, 1), sigma)
        estimates = estimates.reshape(k, *z.shape).to(z.dtype)
        if self.partial_step is not None:
            estimates = torch.stack([self.partial_step(estimates[i], masks[i], sigma) for i in range(k)])
        if self.fallback == "shrink":
            fallback = z * (self.sigma_data**2 / (self.sigma_data**2 + float(sigma) ** 2))
        else:
            fallback = self.previous if self.previous is not None else torch.zeros_like(z)
        z_hat = aggregate_partial_estimates(estimates, masks, fallback)
        if self.project is not None:
            z_hat = self.project(z_hat)
        self.previous = z_hat
        return z_hat if self.operator is None else self.operator.pinv(z_hat).to(torch.float64)

    def remember(self, sigma: float, z_hat: torch.Tensor):
        """A solver's callback: the estimate it used at this evaluation becomes the 'previous' fallback (measurement
        space: for an aggregate without `operator`)."""
        self.previous = z_hat
