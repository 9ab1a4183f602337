"""Metrics: the Frechet distance of FID with the feature statistics it is computed from, and the reconstruction
metrics PSNR / SSIM / NMSE (conventions in the section that defines them, and in metrics.csv of reconstruct.py).

FID (Heusel et al. 2017) is the Frechet distance between Gaussians fitted to detector features of two image sets:
mean and covariance accumulated in float64 (sum, sum of outer products, count), summed across ranks, with the
unbiased (n - 1) covariance, as EDM does. Reference statistics are stored as .npz files (`mu`, `sigma` and metadata)
and read with `allow_pickle=False`.
"""

import math
import os

import numpy as np
import scipy.linalg
import torch
import tqdm

from dnnlib import UserError, atomic_write
from torch_utils import distributed
from training.operators import mri_magnitude


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)) for means (D,) and covariances (D, D), in float64.

    tr((S1 S2)^(1/2)) is computed as the sum of singular values of S1^(1/2) S2^(1/2) (S1 S2 is similar to
    S1^(1/2) S2 S1^(1/2), whose eigenvalues are those singular values squared), with the PSD square roots taken by
    symmetric eigendecomposition. Unlike `scipy.linalg.sqrtm(S1 @ S2)` (EDM's choice) this stays real, is symmetric in
    its arguments, and is accurate when the covariances are singular (fewer samples than feature dimensions): singular
    values near zero carry rounding error of order eps, where square roots of eigenvalues would carry sqrt(eps).
    bench/bench_fid.py compares the speed of both.
    """
    mu1, mu2 = np.asarray(mu1, dtype=np.float64), np.asarray(mu2, dtype=np.float64)
    sigma1, sigma2 = np.asarray(sigma1, dtype=np.float64), np.asarray(sigma2, dtype=np.float64)
    dim = mu1.shape[0] if mu1.ndim == 1 else -1
    if mu1.shape != (dim,) or mu2.shape != (dim,) or sigma1.shape != (dim, dim) or sigma2.shape != (dim, dim):
        raise ValueError(
            f"expected means (D,) and covariances (D, D) of one D, got {mu1.shape}, {sigma1.shape}, {mu2.shape}, "
            f"{sigma2.shape}"
        )
    product = _psd_sqrt(sigma1) @ _psd_sqrt(sigma2)
    trace_sqrt_product = scipy.linalg.svdvals(product).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt_product)


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root of a covariance; eigenvalues below zero (rounding) count as zero."""
    eigval, eigvec = scipy.linalg.eigh(sigma)
    return (eigvec * np.sqrt(np.clip(eigval, 0, None))) @ eigvec.T


class FeatureStats:
    """Running float64 sum, sum of outer products and count of feature vectors (D,), on `device`.

    Each rank accumulates its own share, then `all_reduce_()` sums them (one collective call, the same on every rank);
    afterwards `mean()` and `cov()` describe the union.
    """

    def __init__(self, dim: int, device="cpu"):
        self.dim = dim
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        self.count = torch.zeros(1, dtype=torch.float64, device=device)  # float64 counts exactly up to 2^53

    def update(self, features: torch.Tensor, mask: torch.Tensor | None = None):
        """Add features (N, D); rows where the boolean `mask` (N,) is False are padding and ignored."""
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise ValueError(f"expected features (N, {self.dim}), got {tuple(features.shape)}")
        x = features.to(torch.float64)
        if mask is not None:
            x = x[mask.to(x.device)]
        self.sum += x.sum(dim=0)
        self.outer += x.T @ x
        self.count += x.shape[0]

    def all_reduce_(self) -> "FeatureStats":
        """Sum over ranks, in place (a no-op in one process)."""
        packed = torch.cat([self.count, self.sum, self.outer.flatten()])
        distributed.all_reduce_(packed)
        self.count, self.sum = packed[:1], packed[1 : 1 + self.dim]
        self.outer = packed[1 + self.dim :].view(self.dim, self.dim)
        return self

    @property
    def num(self) -> int:
        return int(self.count.item())

    def mean(self) -> np.ndarray:
        """(D,) float64."""
        return (self.sum / self.count).cpu().numpy()

    def cov(self) -> np.ndarray:
        """(D, D) float64, unbiased (divides by n - 1)."""
        n = self.num
        if n < 2:
            raise ValueError(f"a covariance needs at least 2 feature vectors, got {n}")
        mu = self.sum / n
        return ((self.outer - n * torch.outer(mu, mu)) / (n - 1)).cpu().numpy()


def images_to_uint8_rgb(images: torch.Tensor) -> torch.Tensor:
    """Dataset images float (N, C, H, W) in [-1, 1], C in {1, 3} -> uint8 (N, 3, H, W); grayscale is replicated."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images (N, 1 or 3, H, W), got {tuple(images.shape)}")
    pixels = ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return pixels.expand(-1, 3, -1, -1) if pixels.shape[1] == 1 else pixels


def dataset_feature_stats(
    dataset, detector, feature_dim: int, batch_size: int = 64, device="cpu", num_workers: int = 2,
    progress: bool = True,
) -> FeatureStats:
    """Feature statistics of every item of `dataset` (items {'image': (C, H, W) in [-1, 1], ...}), summed over ranks.

    Items are split across ranks with `distributed.shard`. Every rank runs the same number of batches of
    `batch_size` (the ranks' shares differ by at most one item; shorter shares are padded with item 0 and the padding
    is masked out), so ranks stay in step and each issues exactly one collective call, at the end.
    """
    world_size = distributed.get_world_size()
    mine = distributed.shard(list(range(len(dataset))))
    num_batches = math.ceil(math.ceil(len(dataset) / world_size) / batch_size)
    padded = mine + [-1] * (num_batches * batch_size - len(mine))
    batches = [padded[i * batch_size : (i + 1) * batch_size] for i in range(num_batches)]
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=[[max(i, 0) for i in batch] for batch in batches], num_workers=num_workers
    )
    stats = FeatureStats(feature_dim, device=device)
    show = progress and distributed.get_rank() == 0
    with torch.inference_mode():
        for batch, items in tqdm.tqdm(zip(batches, loader), total=num_batches, unit="batch", disable=not show):
            features = detector(images_to_uint8_rgb(items["image"]).to(device))
            stats.update(features, mask=torch.tensor(batch) >= 0)
    return stats.all_reduce_()


def save_reference_stats(path: str, mu: np.ndarray, sigma: np.ndarray, num: int, detector_sha256: str):
    """Write FID reference statistics atomically: .npz with `mu` (D,), `sigma` (D, D), `num`, `detector_sha256`."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_write(path) as f:
        np.savez(f, mu=mu, sigma=sigma, num=np.int64(num), detector_sha256=np.str_(detector_sha256))


def load_reference_stats(path: str) -> dict:
    """Read an .npz of reference statistics -> {'mu', 'sigma', 'num' or None, 'detector_sha256' or None}.

    EDM's published reference files hold only `mu` and `sigma`; they are accepted, with the metadata left None.
    """
    try:
        with np.load(path, allow_pickle=False) as data:
            contents = {key: data[key] for key in data.files}
    except Exception as e:  # numpy raises several types for missing, truncated or foreign files
        raise UserError(f"Reference statistics {path} cannot be read as an .npz file ({e}).") from e
    if "mu" not in contents or "sigma" not in contents:
        raise UserError(f"Reference statistics {path} hold no 'mu' and 'sigma' arrays (found {sorted(contents)}).")
    mu, sigma = contents["mu"].astype(np.float64), contents["sigma"].astype(np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise UserError(
            f"Reference statistics {path} have mu {mu.shape} and sigma {sigma.shape}; expected (D,) and (D, D)."
        )
    return {
        "mu": mu,
        "sigma": sigma,
        "num": int(contents["num"]) if "num" in contents else None,
        "detector_sha256": str(contents["detector_sha256"]) if "detector_sha256" in contents else None,
    }


# ----------------------------------------------------------------------------
# Reconstruction quality: PSNR, SSIM, NMSE (fastMRI definitions, batched torch, float64).
#
# Conventions (the same ones reconstruct.py writes into metrics.csv):
# - Inputs are real images (N, C, H, W) or (N, H, W): MRI magnitude images |x|, or natural images mapped from
#   [-1, 1] to [0, 1]. The caller chooses the data range: fastMRI uses the maximum of the reference image
#   (`reference_max`), natural images use 1.
# - PSNR = 10 log10(data_range^2 / MSE), MSE over all entries of one image (skimage.metrics.peak_signal_noise_ratio).
# - SSIM (Wang et al. 2004) as skimage.metrics.structural_similarity with its defaults, which fastMRI uses:
#   7x7 uniform window, K1 = 0.01, K2 = 0.03, sample covariances (normalised by 48 / 49), the mean of the SSIM map
#   over the pixels whose window lies inside the image (skimage crops 3 pixels from every border); channels are
#   averaged (skimage's channel_axis).
# - NMSE = ||reference - estimate||^2 / ||reference||^2 per image (fastMRI).


def _as_batch(images: torch.Tensor) -> torch.Tensor:
    images = torch.as_tensor(images)
    if images.is_complex():
        raise ValueError("metrics take real images; pass magnitudes for complex data")
    if images.ndim == 3:
        images = images[:, None]
    if images.ndim != 4:
        raise ValueError(f"expected images (N, C, H, W) or (N, H, W), got {tuple(images.shape)}")
    return images.to(torch.float64)


def _data_range(data_range, n: int, device) -> torch.Tensor:
    """A float or per-image (N,) data range -> float64 (N,)."""
    return torch.as_tensor(data_range, dtype=torch.float64, device=device).reshape(-1).expand(n)


def reference_max(reference: torch.Tensor) -> torch.Tensor:
    """fastMRI's data range: the maximum of each reference image -> float64 (N,)."""
    return _as_batch(reference).flatten(1).amax(dim=1)


def psnr(reference: torch.Tensor, estimate: torch.Tensor, data_range) -> torch.Tensor:
    """PSNR in dB per image -> float64 (N,); inf where the images are equal."""
    reference, estimate = _as_batch(reference), _as_batch(estimate)
    mse = (reference - estimate).square().flatten(1).mean(dim=1)
    return 10 * torch.log10(_data_range(data_range, len(reference), reference.device) ** 2 / mse)


def nmse(reference: torch.Tensor, estimate: torch.Tensor) -> torch.Tensor:
    """||reference - estimate||^2 / ||reference||^2 per image -> float64 (N,)."""
    reference, estimate = _as_batch(reference), _as_batch(estimate)
    return (reference - estimate).square().flatten(1).sum(dim=1) / reference.square().flatten(1).sum(dim=1)


SSIM_WINDOW = 7


def ssim(reference: torch.Tensor, estimate: torch.Tensor, data_range) -> torch.Tensor:
    """SSIM per image (module conventions above) -> float64 (N,). Images must be at least 7x7.

    Local means and second moments are 7x7 box averages over the windows that lie inside the image ('valid'
    pooling), which is exactly the part of skimage's reflect-padded SSIM map that skimage averages.
    """
    reference, estimate = _as_batch(reference), _as_batch(estimate)
    if min(reference.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW}, got {tuple(reference.shape)}")
    data_range = _data_range(data_range, len(reference), reference.device).reshape(-1, 1, 1, 1)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2

    def local_mean(a):
        return torch.nn.functional.avg_pool2d(a, SSIM_WINDOW, stride=1)

    mu_x, mu_y = local_mean(reference), local_mean(estimate)
    sample_cov = SSIM_WINDOW**2 / (SSIM_WINDOW**2 - 1)
    var_x = sample_cov * (local_mean(reference * reference) - mu_x * mu_x)
    var_y = sample_cov * (local_mean(estimate * estimate) - mu_y * mu_y)
    cov_xy = sample_cov * (local_mean(reference * estimate) - mu_x * mu_y)
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(dim=1)


def quality_row(reference: torch.Tensor, estimate: torch.Tensor, data_range) -> dict:
    """{'psnr', 'ssim', 'nmse'} of one image pair as floats (a metrics row of reconstruct.py)."""
    return {"psnr": psnr(reference, estimate, data_range).item(), "ssim": ssim(reference, estimate, data_range).item(),
            "nmse": nmse(reference, estimate).item()}


# ----------------------------------------------------------------------------
# Evaluation conventions for MRI, side by side (reconstruct.py --metric-convention):
# - 'sense' (the default above): magnitude of the coil-combined (SENSE) image, per image, data range = its reference's
#   maximum.
# - 'fastmri' (fastMRI's evaluate.py): root-sum-of-squares magnitude images, centre-cropped to at most 320 x 320,
#   scored per VOLUME: PSNR = 10 log10(max^2 / MSE over the whole volume), SSIM = the mean over the volume's slices
#   of the per-slice SSIM, NMSE over the volume, with max = the reference volume's maximum as the data range of both.
# - 'msm' (the MSM paper): each magnitude image min-max normalised to [0, 1] on its own, data range 1.

FASTMRI_CROP = 320  # fastMRI's reconstruction size: evaluate.py crops the targets and reconstructions to it


def center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """The central min(size, H) x min(size, W) block of images (..., H, W) (fastMRI's `center_crop`)."""
    height, width = images.shape[-2:]
    h, w = min(size, height), min(size, width)
    top, left = (height - h) // 2, (width - w) // 2
    return images[..., top : top + h, left : left + w]


def fastmri_volume_metrics(reference: torch.Tensor, estimate: torch.Tensor) -> dict:
    """fastMRI's volume metrics of real magnitude volumes (S, H, W) (already RSS and cropped): {'psnr', 'ssim',
    'nmse'} with the reference volume's maximum as the data range (fastMRI evaluate.py)."""
    reference, estimate = _as_batch(reference), _as_batch(estimate)
    maximum = reference.max()
    mse = (reference - estimate).square().mean()
    return {"psnr": float(10 * torch.log10(maximum**2 / mse)),
            "ssim": float(ssim(reference, estimate, maximum).mean()),
            "nmse": float((reference - estimate).square().sum() / reference.square().sum())}


def minmax_normalise(images: torch.Tensor) -> torch.Tensor:
    """Each image (N, C, H, W) or (N, H, W) mapped to [0, 1] by its own minimum and maximum (the MSM paper's MRI
    convention); a constant image becomes 0."""
    images = _as_batch(images)
    low = images.flatten(1).amin(dim=1).reshape(-1, 1, 1, 1)
    span = images.flatten(1).amax(dim=1).reshape(-1, 1, 1, 1) - low
    return (images - low) / torch.where(span > 0, span, torch.ones_like(span))


CONVENTIONS = ("sense", "fastmri", "msm")
CONVENTION_TEXT = {
    "sense": "MRI convention 'sense': the magnitude of the coil-combined (SENSE) image per image, data range = the "
             "reference's maximum.",
    "fastmri": "MRI convention 'fastmri' (fastMRI evaluate.py): root-sum-of-squares magnitude sqrt(sum_c |S_c x|^2) "
               "of the coil images of each image (the reference's: of T T^H k, its coil data projected on the stored "
               "maps), centre-cropped to at most 320 x 320; data range = the maximum of the reference VOLUME (the "
               "selected slices of one source file); rows are per slice (PSNR, SSIM with that range), volumes.csv "
               "holds fastMRI's per-volume PSNR (volume MSE), SSIM (mean over slices) and NMSE.",
    "msm": "MRI convention 'msm' (the MSM paper): magnitude images each min-max normalised to [0, 1], data range 1.",
}


def rss_images(images: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    """2-channel coil-combined images (N, 2, H, W) -> root-sum-of-squares magnitudes (N, 1, H, W) of their coil
    images S_c x, cropped as fastMRI evaluates (FASTMRI_CROP)."""
    coil_energy = (maps.abs().to(torch.float64) ** 2).sum(dim=1, keepdim=True)
    return center_crop(mri_magnitude(images.to(torch.float64)) * coil_energy.sqrt(), FASTMRI_CROP)


def convention_row(convention: str, reference: torch.Tensor, estimate: torch.Tensor, maps: torch.Tensor,
                    volume_max: float | None) -> dict:
    """An MRI row under a non-default convention (CONVENTION_TEXT); reference / estimate: 2-channel images."""
    if convention == "fastmri":
        reference, estimate, data_range = rss_images(reference, maps), rss_images(estimate, maps), volume_max
    else:
        reference, estimate = (minmax_normalise(mri_magnitude(image.to(torch.float64)))
                               for image in (reference, estimate))
        data_range = 1.0
    return quality_row(reference, estimate, data_range)
