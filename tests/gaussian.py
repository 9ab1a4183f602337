"""Zero-mean Gaussian data N(0, C): exact denoisers and samples, the analytic references of the sampler tests."""

import torch


def random_covariance(dim: int, rank: int, seed: int, diag: float = 0.05) -> torch.Tensor:
    """A low-rank-plus-diagonal covariance (float64), scaled to mean variance ~0.25 (sigma_data = 0.5)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(dim, rank, generator=g, dtype=torch.float64)
    c = u @ u.T / rank * 0.2 + diag * torch.eye(dim, dtype=torch.float64)
    return c


def gaussian_denoiser(cov: torch.Tensor, shape):
    """D(x; s) = C (C + s^2 I)^{-1} x on batches of `shape` (flattened to dim = prod(shape))."""
    evals, evecs = torch.linalg.eigh(cov)

    def denoise(x, sigma):
        flat = x.reshape(x.shape[0], -1).to(torch.float64)
        coeff = flat @ evecs
        out = (coeff * (evals / (evals + float(sigma) ** 2))) @ evecs.T
        return out.reshape(x.shape)

    return denoise


def relative_cov_error(samples: torch.Tensor, cov: torch.Tensor) -> float:
    flat = samples.reshape(samples.shape[0], -1).to(torch.float64)
    emp = flat.T @ flat / flat.shape[0]  # the mean is known to be zero
    return ((emp - cov).norm() / cov.norm()).item()


def exact_samples(cov: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    chol = torch.linalg.cholesky(cov)
    return torch.randn(n, cov.shape[0], generator=g, dtype=torch.float64) @ chol.T
