"""The measurement-space skip of the MSM partial denoiser (training/measurements.py `partial_denoise`, issue 14):
checked against closed forms on Gaussian data through the 8-coil MRI operator, its reduction to the image-space
skip where T T^H = I, the samplers' matching projection onto range(T), and the config that carries it."""

import numpy as np
import pytest
import torch

from dnnlib import UserError
from tests.gaussian import random_covariance
from tests.helpers import make_phantoms
from torch_utils.misc import SeedGenerators
from training.data_tools import birdcage_maps, smooth_phase
from training.loss import MSMLoss
from training.masks import FullMask, RandomLineMaskLaw
from training.measurements import aggregate_projection, partial_denoise, skip_space_of
from training.networks import EDMPrecond
from training.operators import Identity, MultiCoilMRI, complex_to_channels, measurement_randn
from training.phantoms import random_ellipse_phantoms
from training.sampling.denoisers import MSMAggregate
from training.sampling.solvers import Ancestral, noise_start

SIGMA_DATA = 0.5


class LinearNet(torch.nn.Module):
    """An EDM-preconditioned network whose F is a fixed linear map of the network input u (real view, flattened):
    D(u; sigma) = c_skip u + c_out (M u). Built for one sigma (M is the perfect predictor at that level)."""

    coefficients = EDMPrecond.coefficients

    def __init__(self, matrix: torch.Tensor, channels: int):
        super().__init__()
        self.matrix, self.in_channels, self.out_channels, self.sigma_data = matrix, channels, channels, SIGMA_DATA

    def forward(self, x, sigma, class_labels=None):
        sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1, 1, 1)
        c_skip, c_out = self.coefficients(sigma)[:2]
        x = x.to(torch.float64)
        return c_skip * x + c_out * (x.flatten(1) @ self.matrix.T).reshape(x.shape)


def edm_c_skip_c_out(sigma: float) -> tuple[float, float]:
    sd2 = SIGMA_DATA**2
    return sd2 / (sigma**2 + sd2), sigma * SIGMA_DATA / (sigma**2 + sd2) ** 0.5


def line_mask(columns, width: int) -> torch.Tensor:
    mask = torch.zeros(1, 1, 1, width, dtype=torch.float64)
    mask[..., list(columns)] = 1
    return mask


class GaussianMRI:
    """x ~ N(0, Sigma) on 2 x 8 x 8 complex images (real view, dim 128), 8 birdcage coils, a fixed 2-of-8 line mask
    P (R = 4). A = P T as a dense real matrix on the observed real entries, so every conditional is a closed form."""

    def __init__(self, seed: int = 0, size: int = 8, coils: int = 8):
        self.size, self.dim = size, 2 * size * size
        self.cov = random_covariance(self.dim, 24, seed)
        maps = torch.from_numpy(birdcage_maps(coils, size, size)).to(torch.complex128)[None]
        self.operator, self.mask = MultiCoilMRI(maps), line_mask((2, 5), size)
        basis = torch.eye(self.dim, dtype=torch.float64).reshape(self.dim, 2, size, size)
        kspace = self.operator.A(basis) * self.mask  # (dim, coils, H, W)
        self.observed = self.mask[0].expand(kspace.shape[1:]) > 0
        self.matrix = torch.stack([torch.view_as_real(k[self.observed]).flatten() for k in kspace], dim=1)

    def draw(self, n: int, sigma: float, seed: int):
        """(x (n, dim), s complex (n, coils, H, W)) with s = P (T x + sigma noise)."""
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, self.dim, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(self.cov).T
        z = self.operator.A(x.reshape(n, 2, self.size, self.size))
        return x, self.mask * (z + sigma * measurement_randn(z, g))

    def real_view(self, s: torch.Tensor) -> torch.Tensor:
        """Observed entries of complex k-space (n, coils, H, W) -> (n, m) real."""
        return torch.stack([torch.view_as_real(k[self.observed]).flatten() for k in s])

    def perfect_matrices(self, sigma: float) -> dict:
        """F of the perfect predictor at sigma as a linear map of u = A^T s, for each skip space: the network whose
        partial estimate (on range(A)) is the exact E[P z | s]. With G = (Sigma A^T A + sigma^2 I)^-1 Sigma the exact
        image posterior mean is G u; the measurement-space skip contributes c_skip A (A^T A)^+ u = c_skip Pi_A s, the
        image-space skip c_skip A u."""
        a = self.matrix
        gram = a.T @ a
        g = torch.linalg.solve(self.cov @ gram + sigma**2 * torch.eye(self.dim, dtype=torch.float64), self.cov)
        c_skip, c_out = edm_c_skip_c_out(sigma)
        return {"measurement": (g - c_skip * torch.linalg.pinv(gram, hermitian=True)) / c_out,
                "image": (g - c_skip * torch.eye(self.dim, dtype=torch.float64)) / c_out}

    def exact_partial(self, s_real: torch.Tensor, sigma: float) -> torch.Tensor:
        """E[P z | s] on the observed entries: A Sigma A^T (A Sigma A^T + sigma^2 I)^-1 s."""
        a = self.matrix
        cov_s = a @ self.cov @ a.T
        return (torch.linalg.solve(cov_s + sigma**2 * torch.eye(len(a), dtype=torch.float64), s_real.T).T
                @ cov_s.T)

    def reaching_size(self, x: torch.Tensor, matrix: torch.Tensor) -> float:
        """|A F u| / |A x| on noiseless inputs u = A^T A x: the size of the part of F that reaches the partial
        estimate (F's component in the null space of A is free), relative to the measurement."""
        a = self.matrix
        reaching = x @ (a.T @ a).T @ matrix.T @ a.T
        return (reaching.norm() / (x @ a.T).norm()).item()

    def range_projector(self) -> torch.Tensor:
        a = self.matrix
        return a @ torch.linalg.pinv(a)


def phantom_operator_residual(resolution: int = 32, coils: int = 8, num: int = 8) -> float:
    """|s - A A^H s| / |s| over `num` phantom slices of the quickstart's simulated 8-coil MRI (birdcage maps, smooth
    phase), R = 4 random lines with the default 4 centre lines, noiseless s = P T x."""
    rng = np.random.default_rng(0)
    images = random_ellipse_phantoms(num, resolution, seed=0)
    x = np.stack([im * np.exp(1j * smooth_phase(resolution, resolution, rng)) for im in images])
    maps = np.stack([birdcage_maps(coils, resolution, resolution, rotation=rng.uniform(0, 2 * np.pi))
                     for _ in range(num)])
    operator = MultiCoilMRI(torch.from_numpy(maps).to(torch.complex128))
    images = complex_to_channels(torch.from_numpy(x).to(torch.complex128))
    mask = RandomLineMaskLaw(4.0, 4).sample(num, (resolution, resolution), torch.Generator().manual_seed(1))
    s = operator.A(images) * mask
    return ((s - operator.A(operator.AH(s)) * mask).abs().norm() / s.abs().norm()).item()


def test_image_space_skip_is_not_measurement_consistent():
    """The quantity behind issue 14: on the 8-coil phantom operator at R = 4 the image-space skip moves a noiseless
    measurement by about a tenth of its norm (0.10), while T T^H = I leaves it in place."""
    residual = phantom_operator_residual()
    assert 0.05 < residual < 0.2, residual
    one_coil = MultiCoilMRI(torch.exp(1j * torch.rand(1, 1, 16, 16, dtype=torch.float64)))  # |S| = 1: T T^H = I
    s = one_coil.A(torch.randn(3, 2, 16, 16, dtype=torch.float64)) * line_mask((1, 6, 7, 12), 16)
    assert ((s - one_coil.A(one_coil.AH(s)) * line_mask((1, 6, 7, 12), 16)).abs().max() < 1e-12)


@pytest.mark.parametrize("sigma", [1e-3, 1e-2, 0.1, 1.0, 10.0])
def test_measurement_skip_perfect_predictor_is_exact(sigma):
    """Gaussian data through the 8-coil operator: with the measurement-space skip the perfect predictor's partial
    estimate is E[P z | s] + c_skip (I - Pi_A) s: exact on range(A), and the rest (noise the network cannot see or
    change) invisible to T^H, so the part of the loss the network controls is reduced to zero. Its F stays O(1)
    at every sigma, as EDM's preconditioning intends."""
    problem = GaussianMRI()
    x, s = problem.draw(64, sigma, seed=1)
    matrices = problem.perfect_matrices(sigma)
    net = LinearNet(matrices["measurement"], 2)
    s_hat, _ = partial_denoise(net, problem.operator, problem.mask, s, sigma, skip_space="measurement")
    assert torch.equal(s_hat * (1 - problem.mask), torch.zeros_like(s_hat))  # a partial estimate: zero off P
    s_real, s_hat_real = problem.real_view(s), problem.real_view(s_hat)
    exact = problem.exact_partial(s_real, sigma)
    c_skip, _ = edm_c_skip_c_out(sigma)
    outside = s_real - s_real @ problem.range_projector().T
    scale = s_real.norm()
    assert (s_hat_real - exact - c_skip * outside).norm() / scale < 1e-5  # the network input is float32
    assert (s_hat_real @ problem.range_projector().T - exact).norm() / scale < 1e-5
    leftover = torch.zeros_like(s_hat)
    leftover[:, problem.observed] = torch.view_as_complex((s_hat_real - exact).reshape(64, -1, 2).contiguous())
    assert problem.operator.AH(leftover).norm() / scale < 1e-5  # T^H (I - Pi_A) s = 0: outside range(T)
    assert problem.reaching_size(x, matrices["measurement"]) < 3


def test_image_skip_needs_a_predictor_that_grows_like_one_over_sigma():
    """The image-space skip fails the test above: its perfect predictor exists (F = (G - c_skip I) / c_out) but its
    size grows like 1 / sigma, and the F = 0 predictor's loss (what a network with O(1) output cannot get below)
    grows like 1 / sigma^2, while the measurement-space skip keeps both bounded."""
    problem = GaussianMRI()
    x, _ = problem.draw(64, 0.0, seed=2)
    sizes = {space: [problem.reaching_size(x, problem.perfect_matrices(sigma)[space]) for sigma in (1e-3, 1e-2)]
             for space in ("measurement", "image")}
    assert sizes["image"][0] > 8 * sizes["image"][1]  # ~ 1 / sigma
    assert sizes["image"][0] > 50 * sizes["measurement"][0]
    assert sizes["measurement"][0] < 2 * sizes["measurement"][1]

    zero = LinearNet(torch.zeros(problem.dim, problem.dim, dtype=torch.float64), 2)
    batch = {"y": problem.operator.A(x.reshape(-1, 2, 8, 8)) * problem.mask, "mask": problem.mask.expand(64, 1, 1, 8),
             "maps": problem.operator.maps.expand(64, -1, -1, -1)}
    measurement = {"operator": "mri", "mask": {"kind": "lines-random", "R": 4.0, "acs": 0}}
    losses = {}
    for space in ("measurement", "image"):
        for sigma in (1e-3, 1e-2):
            loss = MSMLoss(measurement, skip_space=space)
            loss.sample_sigma = lambda n, generator, device, sigma=sigma: torch.full((n, 1, 1, 1), sigma)
            losses[space, sigma] = loss(zero, batch, torch.Generator().manual_seed(3)).mean().item()
    assert losses["image", 1e-3] > 50 * losses["image", 1e-2]  # ~ 1 / sigma^2
    assert losses["measurement", 1e-3] < 1.5 * losses["measurement", 1e-2]
    assert losses["image", 1e-3] > 100 * losses["measurement", 1e-3]


def test_identity_operator_gives_edm_preconditioning_bit_for_bit():
    """T = I (images): s - P T T^H s = s - P s = 0, so the measurement-space skip changes nothing, bit for bit; the
    same at P = I, where both are EDM's D itself."""
    net = EDMPrecond(img_resolution=8, in_channels=3, out_channels=3, model_channels=16, channel_mult=[1, 2],
                     num_blocks=1, attn_resolutions=[]).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 8, 8, generator=g)
    mask = (torch.rand(4, 1, 8, 8, generator=g) > 0.4).float()
    sigma = torch.tensor([0.01, 0.3, 2.0, 40.0])
    with torch.no_grad():
        for m in (mask, torch.ones_like(mask)):
            s = m * (x + sigma.reshape(-1, 1, 1, 1) * torch.randn(x.shape, generator=g))
            image = partial_denoise(net, Identity(), m, s, sigma, skip_space="image")[0]
            consistent = partial_denoise(net, Identity(), m, s, sigma, skip_space="measurement")[0]
            assert torch.equal(image, consistent)
        assert torch.equal(partial_denoise(net, Identity(), torch.ones_like(mask), s, sigma)[0], net(s, sigma))


def test_single_coil_unit_map_reduces_to_image_skip():
    """T = F S with |S| = 1 (T T^H = I): the two skip spaces agree to rounding (1e-12, float64 operator)."""
    maps = torch.exp(1j * 2 * torch.pi * torch.rand(1, 1, 8, 8, dtype=torch.float64))
    operator, mask = MultiCoilMRI(maps), line_mask((0, 3, 4, 6), 8)
    net = LinearNet(torch.randn(128, 128, dtype=torch.float64) * 0.1, 2)
    s = mask * operator.A(torch.randn(5, 2, 8, 8, dtype=torch.float64))
    image = partial_denoise(net, operator, mask, s, 0.05, skip_space="image")[0]
    consistent = partial_denoise(net, operator, mask, s, 0.05, skip_space="measurement")[0]
    assert (image - consistent).abs().max() < 1e-12


def test_sampler_projection_removes_what_the_skip_leaves_outside_range_t():
    """With the full mask (an oracle-like law, K = 1) the measurement-space skip adds c_skip (I - Pi_T) z to the
    exact denoiser; the MSM sampler with `aggregate_projection` returns exactly the samples of the exact denoiser
    (the added part lies outside range(T)), and without it the samples differ."""
    size, coils = 4, 4
    maps = torch.from_numpy(birdcage_maps(coils, size, size)).to(torch.complex128)[None]
    operator = MultiCoilMRI(maps)
    cov = random_covariance(2 * size * size, 8, seed=4)
    basis = torch.eye(2 * size * size, dtype=torch.float64).reshape(-1, 2, size, size)
    t_matrix = torch.stack([torch.view_as_real(operator.A(b[None])[0]).flatten() for b in basis], dim=1)
    z_cov = t_matrix @ cov @ t_matrix.T  # z = T x: a singular Gaussian on range(T)

    def exact(s, mask, sigma):
        flat = torch.view_as_real(s).flatten(1)
        eye = torch.eye(len(z_cov), dtype=torch.float64)
        out = torch.linalg.solve(z_cov + sigma**2 * eye, flat.T).T @ z_cov.T
        return torch.view_as_complex(out.reshape(*s.shape, 2))

    def with_skip_noise(s, mask, sigma):
        c_skip = SIGMA_DATA**2 / (SIGMA_DATA**2 + sigma**2)
        return exact(s, mask, sigma) + c_skip * (s - operator.A(operator.AH(s)))

    latents = torch.view_as_complex(torch.randn(3, coils, size, size, 2, dtype=torch.float64,
                                                generator=torch.Generator().manual_seed(5)))
    sigmas = torch.tensor([20.0, 5.0, 1.0, 0.2, 0.02], dtype=torch.float64)
    start = noise_start(latents, sigmas[0].item())
    run = {name: Ancestral(precision="double")(MSMAggregate(fn, FullMask(), SeedGenerators([0, 1, 2]), 1,
                                                            project=project), start, SeedGenerators([0, 1, 2]), sigmas)
           for name, fn, project in (("exact", exact, None),
                                     ("projected", with_skip_noise, aggregate_projection("measurement", operator)),
                                     ("raw", with_skip_noise, None))}
    assert (run["projected"] - run["exact"]).abs().max() < 1e-6  # maps normalised in float32
    assert (run["raw"] - run["exact"]).abs().max() > 1e-3
    assert aggregate_projection("image", operator) is None and aggregate_projection("measurement", Identity()) is None


def test_skip_space_is_recorded_and_read_back(tmp_path):
    """train.py records --skip-space measurement in the loss config (and nothing when off, so earlier runs keep
    continuing); snapshots without the key read as 'image'; --skip-space outside --loss msm and unknown values are
    refused."""
    import train

    data = make_phantoms(str(tmp_path / "ph.zip"), num=8, resolution=16)
    common = ["--outdir", tmp_path / "runs", "--data", data, "--batch", 4]
    on = train.build_options(train_options(train, [*common, "--loss", "msm", "--skip-space", "measurement"]), 1)
    assert on.loss_kwargs["skip_space"] == "measurement"
    assert "skip_space" not in train.build_options(train_options(train, [*common, "--loss", "msm"]), 1).loss_kwargs
    for refused in (["--skip-space", "measurement"], ["--loss", "ambient", "--skip-space", "image"]):
        with pytest.raises(UserError, match="--skip-space"):
            train.build_options(train_options(train, [*common, *refused]), 1)
    assert skip_space_of(None) == "image" and skip_space_of({"class_name": "training.loss.MSMLoss"}) == "image"
    with pytest.raises(UserError, match="--skip-space"):
        MSMLoss({"operator": "identity", "mask": {"kind": "box", "p": 0.4}}, skip_space="pixel")


def train_options(train, args: list):
    """train.py's click options for `args`, as the EasyDict its main builds the run from."""
    from dnnlib import EasyDict

    context = train.main.make_context("train.py", [str(a) for a in args])
    return EasyDict(context.params)
