"""Denoising score-matching losses: EDM's (Table 1) for training on clean images, and the measurement losses
(MSMLoss, AmbientLoss) for training on partial measurements only.

Every loss is called as `loss_fn(net, batch, generator) -> (N,)`: one loss value per example, summed over its
entries (EDM's scale, so EDM's learning rates carry over). The training loop averages over the global batch.
All random draws (noise level, noise) come from the explicit `generator`, so a resumed run draws exactly what an
uninterrupted one would.
"""

import torch

from dnnlib import UserError
from training.measurements import SKIP_SPACES, MeasurementConfig, partial_denoise
from training.operators import measurement_randn
from training.schedules import VP_GRID_RULES, vp_grid_sigmas


def _randn(shape, generator, device):
    return torch.randn(shape, generator=generator, device=generator.device).to(device)


def _rand(shape, generator, device):
    return torch.rand(shape, generator=generator, device=generator.device).to(device)


class EDMLoss:
    """ln(sigma) ~ N(P_mean, P_std^2); weight (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2."""

    def __init__(self, P_mean: float = -1.2, P_std: float = 1.2, sigma_data: float = 0.5):
        self.P_mean, self.P_std, self.sigma_data = P_mean, P_std, sigma_data

    def sample_sigma(self, n, generator, device):
        return (_randn([n, 1, 1, 1], generator, device) * self.P_std + self.P_mean).exp()

    def weight(self, sigma):
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2

    def __call__(self, net, batch, generator):
        images, labels = batch["image"], batch.get("label")
        sigma = self.sample_sigma(images.shape[0], generator, images.device)
        noisy = images + _randn(images.shape, generator, images.device) * sigma
        denoised = net(noisy, sigma, labels)
        return (self.weight(sigma) * (denoised - images) ** 2).flatten(1).sum(1)


class VPLoss(EDMLoss):
    """Continuous VP (DDPM++): t ~ U(epsilon_t, 1), sigma = sigma_vp(t); weight 1 / sigma^2."""

    def __init__(self, beta_d: float = 19.9, beta_min: float = 0.1, epsilon_t: float = 1e-5):
        self.beta_d, self.beta_min, self.epsilon_t = beta_d, beta_min, epsilon_t

    def sample_sigma(self, n, generator, device):
        t = 1 + _rand([n, 1, 1, 1], generator, device) * (self.epsilon_t - 1)
        return ((0.5 * self.beta_d * t**2 + self.beta_min * t).exp() - 1).sqrt()

    def weight(self, sigma):
        return 1 / sigma**2


class VELoss(EDMLoss):
    """VE (NCSN++): ln(sigma) ~ U(ln sigma_min, ln sigma_max); weight 1 / sigma^2."""

    def __init__(self, sigma_min: float = 0.02, sigma_max: float = 100.0):
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def sample_sigma(self, n, generator, device):
        u = _rand([n, 1, 1, 1], generator, device)
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** u

    def weight(self, sigma):
        return 1 / sigma**2


class ClassifierLoss:
    """Cross-entropy of a noise-aware classifier (training/classifier.py) on images noised as the diffusion model's
    training noises them: ln(sigma) ~ N(P_mean, P_std^2) (EDMLoss's defaults), or sigma = 0 with clean=True (a clean
    classifier). The batch's one-hot labels give the target class."""

    def __init__(self, P_mean: float = -1.2, P_std: float = 1.2, clean: bool = False):
        self.P_mean, self.P_std, self.clean = P_mean, P_std, clean

    def __call__(self, net, batch, generator):
        images, labels = batch["image"], batch["label"]
        n = images.shape[0]
        if self.clean:
            sigma = torch.zeros([n, 1, 1, 1], device=images.device)
        else:
            sigma = (_randn([n, 1, 1, 1], generator, images.device) * self.P_std + self.P_mean).exp()
        noisy = images + _randn(images.shape, generator, images.device) * sigma
        logits = net(noisy, sigma)
        return torch.nn.functional.cross_entropy(logits.float(), labels.argmax(dim=1), reduction="none")


# ----------------------------------------------------------------------------------------------------------------------
# Losses on partial measurements (MSM.md sections 2-4) and the Ambient Diffusion baseline.
#
# Both are called like EDMLoss, with the batch MeasuredDataset hands out: {'y', 'mask', 'maps' (MRI), 'label',
# 'index'}. They build the operator T from the run's MeasurementConfig and read nothing else from the batch, so no
# code path can reach a clean image (MeasuredDataset does not even hand one out).
#
# Normalisation: per example, the squared residual is summed over the observed real entries (a complex k-space entry
# counts as 2, re and im) and multiplied by (all real entries) / (observed real entries). At P = I this is exactly
# EDMLoss's sum over entries for images, and for MRI with sum_c |S_c|^2 = 1 (T^H T = I) it equals EDMLoss on the
# 2-channel image, so EDM's learning rates carry over; with fewer observed entries the scale does not shrink.
#
# Noise lives in measurement space: s_sigma = P (y + sigma n) with n = measurement_randn (std 1 on re and im). For MRI
# the network input T^H s_sigma then carries image noise T^H P n of covariance T^H P T; at P = I that is T^H T = I
# where sum_c |S_c|^2 = 1, i.e. white noise of std sigma per real channel: exactly the sigma the network is told.

SIGMA_DISTRIBUTIONS = ("lognormal", "vp200")
WEIGHTINGS = ("edm", "inverse-variance")


def with_recorded_vp_grid(loss_config: dict | None) -> dict | None:
    """A stored loss config with its 200-level grid rule made explicit: a config of sigma_dist 'vp200' written before
    the rule was recorded trained on the 'section' rule (then the only one), so it gets vp_grid 'section'; anything
    else is returned unchanged. Applied where configs are read back (checkpoint loading, train.py's resume check),
    so an old run continues and samples on its own grid."""
    if isinstance(loss_config, dict) and loss_config.get("sigma_dist") == "vp200" and "vp_grid" not in loss_config:
        return {**loss_config, "vp_grid": "section"}
    return loss_config


def _sum_squares(r: torch.Tensor) -> torch.Tensor:
    """(N, ...) real or complex -> (N,): the sum of squares of the real entries (|r|^2 for complex)."""
    r = torch.view_as_real(r) if r.is_complex() else r
    return r.square().flatten(1).sum(1)


def _inner(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-example real inner product Re sum(conj(a) b) -> (N,)."""
    if a.is_complex():
        a, b = torch.view_as_real(a), torch.view_as_real(b)
    return (a * b).flatten(1).sum(1)


def _real_entries(y: torch.Tensor, mask: torch.Tensor) -> tuple[int, torch.Tensor]:
    """(number of real entries of one measurement, (N,) number of observed real entries, at least 1)."""
    per_entry = 2 if y.is_complex() else 1
    observed = mask.expand(y.shape).flatten(1).sum(1) * per_entry
    return y[0].numel() * per_entry, observed.clamp_min(1)


def _noise_like(y: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """measurement_randn drawn on the generator's device, moved to y's."""
    return measurement_randn(torch.empty_like(y, device=generator.device), generator).to(y.device)


def _shared_dropout(device: torch.device):
    """A context that restores the global RNG (which dropout draws from) on exit: the next network call then draws
    the same dropout masks as the one inside, so a finite difference of the two measures the input change only."""
    if device.type == "cuda":
        return torch.random.fork_rng(devices=[device], device_type="cuda")
    return torch.random.fork_rng(devices=[])


class _MeasurementLoss:
    """Shared part: the measurement process, the sigma distribution and the weighting lambda(sigma).

    measurement: MeasurementConfig.to_config() of the run. sigma_dist: 'lognormal' (EDM: ln sigma ~ N(P_mean, P_std^2))
    or 'vp200' (uniform over the reference's 200 levels, `vp_grid_sigmas` by the rule vp_grid: 'ddim', the
    reference's t = 0, 5, ..., 995, or 'section', t = round(i 999 / 199); see `with_recorded_vp_grid` for configs
    that record none). weighting: 'edm' ((sigma^2 + sd^2) / (sigma sd)^2, for EDMPrecond) or 'inverse-variance'
    (1 / sigma^2, for VP / VE).
    """

    def __init__(self, measurement: dict, sigma_dist: str = "lognormal", weighting: str = "edm", P_mean: float = -1.2,
                 P_std: float = 1.2, sigma_data: float = 0.5, vp_grid: str = "ddim"):
        if sigma_dist not in SIGMA_DISTRIBUTIONS:
            raise UserError(f"--sigma-dist must be one of {', '.join(SIGMA_DISTRIBUTIONS)}, got {sigma_dist!r}.")
        if weighting not in WEIGHTINGS:
            raise UserError(f"The loss weighting must be one of {', '.join(WEIGHTINGS)}, got {weighting!r}.")
        if vp_grid not in VP_GRID_RULES:
            raise UserError(f"--vp-grid must be one of {', '.join(VP_GRID_RULES)}, got {vp_grid!r}.")
        self.measurement = MeasurementConfig.from_config(measurement)
        self.sigma_dist, self.weighting, self.vp_grid = sigma_dist, weighting, vp_grid
        self.P_mean, self.P_std, self.sigma_data = P_mean, P_std, sigma_data
        self.grid = vp_grid_sigmas(rule=vp_grid).to(torch.float32) if sigma_dist == "vp200" else None

    def sample_sigma(self, n: int, generator: torch.Generator, device) -> torch.Tensor:
        """(n, 1, 1, 1) float32 noise levels."""
        if self.grid is None:
            return (_randn([n, 1, 1, 1], generator, device) * self.P_std + self.P_mean).exp()
        level = torch.randint(0, len(self.grid), (n,), generator=generator, device=generator.device).cpu()
        return self.grid[level].reshape(n, 1, 1, 1).to(device)

    def weight(self, sigma):
        if self.weighting == "edm":
            return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2
        return 1 / sigma**2

    def operator(self, batch: dict):
        return self.measurement.full_operator(batch.get("maps"))


class MSMLoss(_MeasurementLoss):
    """The MSM loss (MSM.md sections 3-4) on batches of partial measurements y = P (z + eta n), eta = sigma_y of the
    measurement config. Per example, with m the observed real entries and N all of them:

    eta = 0:  s = P (y + sigma n), s_hat = P T D(T^H s; sigma) (`partial_denoise`),
              loss = lambda(sigma) ||s_hat - y||^2 N / m.
    eta > 0:  pseudo-clean y1 = P T D(T^H y; eta) and y2 = P T D(T^H (y + tau b); eta), b ~ N(0, I) on observed
              entries (the two evaluations share dropout masks, so y2 - y1 measures the divergence, not dropout);
              L_sure = ||y1 - y||^2 / m - eta^2 + 2 eta^2 / (tau m) <b, y2 - y1>, an unbiased estimate (as tau -> 0)
              of ||y1 - P z||^2 / m, the per-entry error of the denoiser at sigma = eta.
      sigma > eta:  s = P (y + sqrt(sigma^2 - eta^2) n) (total noise sigma on observed entries); by Tweedie the
                    best estimate of the noisy target y is y_hat = c s_hat + (1 - c) s, c = (sigma^2 - eta^2) / sigma^2;
                    loss = lambda(sigma) ||y_hat - y||^2 N / m.
                    (Written in measurement space. MSM.md's P T [c D + (1 - c) T^H s] is the same for T = I; for
                    multi-coil MRI P T T^H s != s, and only the measurement-space form has E[y | s] as minimiser.)
      sigma <= eta: s = P (y1 + sigma n), loss = lambda(sigma) ||s_hat - y1||^2 N / m.
      plus sure_weight * lambda(eta) * N * L_sure in both cases: SURE estimates the noiseless loss at sigma = eta
      (lambda(eta) ||y1 - P z||^2 N / m), so sure_weight is its weight relative to one diffusion-level draw.
      Gradients through y1: y1 is trained by the SURE term; as the input and target of the sigma <= eta branch it is
      detached by default (a pseudo-clean target, like a teacher's, which that branch cannot move toward what is easy
      to denoise). pseudo_clean_grad=True lets the gradient flow there too, as the reference code does.
      Three network evaluations per example.
    skip_space: where s_hat's skip term lives ('image': the reference's A D(T^H s); 'measurement': c_skip s +
      c_out A F, consistent for multi-coil MRI; `partial_denoise` derives both). The measurement-space loss carries a
      constant the network cannot change (the noise outside range(P T)), so its values are not comparable with the
      image-space loss; its gradients are those of the consistent partial denoiser.
    """

    def __init__(self, measurement: dict, sigma_dist: str = "lognormal", weighting: str = "edm",
                 sure_tau: float = 0.005, sure_weight: float = 0.05, pseudo_clean_grad: bool = False,
                 skip_space: str = "image", P_mean: float = -1.2, P_std: float = 1.2, sigma_data: float = 0.5,
                 vp_grid: str = "ddim"):
        super().__init__(measurement, sigma_dist, weighting, P_mean, P_std, sigma_data, vp_grid)
        if skip_space not in SKIP_SPACES:
            raise UserError(f"--skip-space must be one of {', '.join(SKIP_SPACES)}, got {skip_space!r}.")
        self.skip_space = skip_space
        if not sure_tau > 0:
            raise UserError(f"--sure-tau must be > 0, got {sure_tau}.")
        if not sure_weight >= 0:
            raise UserError(f"--sure-weight must be >= 0, got {sure_weight}.")
        self.sure_tau, self.sure_weight, self.pseudo_clean_grad = float(sure_tau), float(sure_weight), pseudo_clean_grad

    def sure(self, net, operator, mask, y, labels, generator, observed):
        """(y1, L_sure (N,)): the pseudo-clean measurement and the SURE estimate of its per-entry error."""
        eta, tau = self.measurement.sigma_y, self.sure_tau
        probe = mask * _noise_like(y, generator)
        with _shared_dropout(y.device):
            y1, _ = partial_denoise(net, operator, mask, y, eta, labels, self.skip_space)
        y2, _ = partial_denoise(net, operator, mask, y + tau * probe, eta, labels, self.skip_space)
        divergence = _inner(probe, y2 - y1) / tau
        return y1, _sum_squares(y1 - y) / observed - eta**2 + 2 * eta**2 * divergence / observed

    def __call__(self, net, batch, generator):
        y, mask, labels = batch["y"], batch["mask"], batch.get("label")
        operator = self.operator(batch)
        sigma = self.sample_sigma(y.shape[0], generator, y.device)
        noise = _noise_like(y, generator)
        entries, observed = _real_entries(y, mask)
        eta = self.measurement.sigma_y
        if eta == 0:
            target, noise_std, tweedie, extra = y, sigma, 1.0, 0.0
        else:
            y1, sure = self.sure(net, operator, mask, y, labels, generator, observed)
            above = sigma > eta
            target = torch.where(above, y, y1 if self.pseudo_clean_grad else y1.detach())
            noise_std = torch.where(above, (sigma**2 - eta**2).clamp_min(0).sqrt(), sigma)
            tweedie = torch.where(above, (sigma**2 - eta**2) / sigma**2, torch.ones_like(sigma))
            extra = self.sure_weight * self.weight(eta) * entries * sure
        s = mask * (target + noise_std * noise)
        s_hat, _ = partial_denoise(net, operator, mask, s, sigma, labels, self.skip_space)
        estimate = tweedie * s_hat + (1 - tweedie) * s
        residual = _sum_squares(mask * (estimate - target))
        return self.weight(sigma).flatten() * residual * entries / observed + extra


class AmbientLoss(_MeasurementLoss):
    """Ambient Diffusion (Daras et al. 2023) on the same measurements, the main baseline. Per example: a further
    corruption A~ = A B, B dropping each unit of the mask tensor with probability `delta` (pixels for image laws,
    phase-encode lines for MRI line laws; ACS lines are not protected), drawn from the loss generator;
    x0 = D(T^H A~ (y + sigma n); sigma), the mask A~ appended as an input channel when the network has one
    (images; MRI networks get none, a line mask being no image); loss = lambda(sigma) ||A (T x0 - y)||^2 N / m_A on
    every entry A observed, normalised as MSMLoss. Noiseless measurements only (eta = 0), as in the paper.
    """

    def __init__(self, measurement: dict, delta: float = 0.1, sigma_dist: str = "lognormal", weighting: str = "edm",
                 P_mean: float = -1.2, P_std: float = 1.2, sigma_data: float = 0.5, vp_grid: str = "ddim"):
        super().__init__(measurement, sigma_dist, weighting, P_mean, P_std, sigma_data, vp_grid)
        if not 0 <= delta < 1:
            raise UserError(f"--ambient-delta must lie in [0, 1), got {delta}.")
        if self.measurement.sigma_y > 0:
            raise UserError("--loss ambient assumes noiseless measurements; use --sigma-y 0, or --loss msm for noisy "
                            "data.")
        self.delta = float(delta)

    def __call__(self, net, batch, generator):
        y, mask, labels = batch["y"], batch["mask"], batch.get("label")
        operator = self.operator(batch)
        sigma = self.sample_sigma(y.shape[0], generator, y.device)
        keep = (_rand(mask.shape, generator, mask.device) >= self.delta).to(mask.dtype)
        further = mask * keep
        noise = _noise_like(y, generator)
        _, x0 = partial_denoise(net, operator, further, further * (y + sigma * noise), sigma, labels)
        entries, observed = _real_entries(y, mask)
        residual = _sum_squares(mask * (operator.A(x0) - y))
        return self.weight(sigma).flatten() * residual * entries / observed
