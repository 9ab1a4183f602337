"""Denoising score-matching losses (EDM paper, Table 1) for training on clean images.

Every loss is called as `loss_fn(net, batch, generator) -> (N,)`: one loss value per example, summed over its
entries (EDM's scale, so EDM's learning rates carry over). The training loop averages over the global batch.
All random draws (noise level, noise) come from the explicit `generator`, so a resumed run draws exactly what an
uninterrupted one would.
"""

import torch


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
