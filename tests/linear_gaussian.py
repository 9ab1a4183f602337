"""Linear-Gaussian inverse problems with closed forms (SEED_METHODS.md 2.5): prior N(0, s^2 I), y = M A x + noise.

Many independent chains run as one tensor: the image axis is the last one, every other axis indexes chains, and a
dense operator acts on the last axis only. One torch.Generator drives the whole batch (these tests measure
distributions, not per-seed reproducibility)."""

import torch


class BatchGenerator:
    """The solvers' generator interface (randn_like, rand) on one torch.Generator."""

    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(seed)

    def randn_like(self, x):
        return torch.randn(x.shape, generator=self.generator, dtype=x.dtype)

    def rand(self, shape, dtype=torch.float64):
        return torch.rand(shape, generator=self.generator, dtype=dtype)


class DenseOperator:
    """A = a dense (m, d) matrix on the last axis; A^+ its Moore-Penrose pseudo-inverse."""

    def __init__(self, matrix: torch.Tensor):
        self.matrix = matrix.to(torch.float64)
        self.pseudo_inverse = torch.linalg.pinv(self.matrix)

    def A(self, x):
        return x @ self.matrix.T

    def AH(self, y):
        return y @ self.matrix

    def pinv(self, y):
        return y @ self.pseudo_inverse.T


def isotropic_denoiser(s: float):
    """The exact denoiser of N(0, s^2 I): D(x, sigma) = s^2 / (s^2 + sigma^2) x."""
    return lambda x, sigma: x * (s**2 / (s**2 + sigma**2))


def annealed_target(normal: torch.Tensor, adjoint_y: torch.Tensor, s: float, sigma_y: float, sigma: float):
    """Jalal's annealed target at level sigma (gamma = sigma): precision Lambda = I / (s^2 + sigma^2) +
    A^H M A / (sigma_y^2 + sigma^2), mean Lambda^-1 A^H y / (sigma_y^2 + sigma^2). `normal` = A^H M A as a (d, d)
    matrix on the real view, `adjoint_y` = A^H y (d,). sigma = 0 gives the exact posterior. Returns
    (mean, covariance, precision)."""
    dim = normal.shape[0]
    precision = torch.eye(dim, dtype=torch.float64) / (s**2 + sigma**2) + normal / (sigma_y**2 + sigma**2)
    covariance = torch.linalg.inv(precision)
    return covariance @ adjoint_y / (sigma_y**2 + sigma**2), covariance, precision


def moments(chains: torch.Tensor):
    """Empirical mean (d,) and covariance (d, d) of chains (..., d), and the standard errors of both."""
    flat = chains.reshape(-1, chains.shape[-1])
    n = flat.shape[0]
    mean = flat.mean(0)
    centred = flat - mean
    cov = centred.T @ centred / (n - 1)
    var = cov.diagonal()
    return mean, cov, (var / n).sqrt(), ((var[:, None] * var[None, :] + cov**2) / n).sqrt()
