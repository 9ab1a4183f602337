"""The classical baselines the samplers are compared with: `zero_filled` (A^+ y_obs, or A^H y_obs where A has no
pseudo-inverse: masked entries stay 0) and, for multi-coil MRI, `cs_mri` (sigpy's L1-wavelet or total-variation
regularised SENSE reconstruction). CT's filtered back-projection is training/ct.py `fbp`.
"""

import math

import numpy as np
import torch

from dnnlib import UserError
from training.ct import fbp
from training.operators import complex_to_channels


def zero_filled(operator, y_obs: torch.Tensor) -> torch.Tensor:
    """A^+ y_obs where the operator has an exact pseudo-inverse (MRI: D^+ T^H y with D = sum_c |S_c|^2, i.e. the
    zero-filled coil combination; SR: nearest-neighbour upsampling; inpainting: holes stay 0), else A^H y_obs."""
    return operator.pinv(y_obs) if hasattr(operator, "pinv") else operator.AH(y_obs)


def first_estimate(task: str, operator, y: torch.Tensor) -> torch.Tensor:
    """The classical estimate a warm start or ALD's --init adjoint begins from: FBP for CT, else A^+ y (A^H y)."""
    return fbp(operator, y) if task == "ct" else zero_filled(operator, y)


CS_REGULARISERS = ("l1-wavelet", "tv")
# Defaults per regulariser (bench/cs_convergence.py on 4 simulated 8-coil 64x64 phantoms, R = 4, sigma_y 0.01):
# lamda 1e-3 gave the best converged PSNR of 1e-4, 1e-3, 1e-2 for both (TV 31.61 dB, L1-wavelet 19.12 dB), and mean
# PSNR stayed within 0.05 dB of its 2560-iteration value from 320 (TV) and 160 (L1-wavelet) iterations on; the
# defaults keep about 3x that for images with more detail than phantoms.
CS_DEFAULTS = {"tv": {"lamda": 1e-3, "max_iter": 1000}, "l1-wavelet": {"lamda": 1e-3, "max_iter": 500}}


def cs_app(kspace: torch.Tensor, maps: torch.Tensor, mask: torch.Tensor, regulariser: str, lamda: float,
           max_iter: int, show_pbar: bool = False):
    """The sigpy app of `cs_mri` (not yet run): L1WaveletRecon (accelerated proximal gradient) or TotalVariationRecon
    (primal-dual hybrid gradient, PDHG).

    Step sizes come from bounds on the operator norms, not from sigpy's default power iteration, which starts from an
    unseeded random vector (two runs of the same slice differed) and sets PDHG's steps to sigma = 1,
    tau = 1 / ||K||^2. With s = max over pixels of sum_c |S_c|^2 >= ||A||^2 (the mask only removes rows of the
    unitary FFT) and ||G||^2 <= 8 for 2-D circular finite differences, L = sqrt(s + 8) >= ||K = [A; G]||:
    the gradient step 1 / s for L1-wavelet; for TV, PDHG steps tau = 1 / (L sqrt(lamda)), sigma = sqrt(lamda) / L
    (sigma tau L^2 = 1, so PDHG converges). The ratio tau / sigma = 1 / lamda was the fastest of tau = c / L,
    sigma = 1 / (c L) for c = 1, 3, 10, 30, 100 at lamda 1e-4, 1e-3, 1e-2 on phantoms; at lamda 1e-3 TV then
    converges (31.61 dB) within 320 iterations, where sigpy's default steps reached 27.88 dB after 5120 and were still
    rising (bench/cs_convergence.py).
    """
    import sigpy.mri

    if regulariser not in CS_REGULARISERS:
        raise UserError(f"The CS regulariser must be one of {', '.join(CS_REGULARISERS)}, got {regulariser!r}.")
    if not lamda > 0:
        raise UserError(f"The CS weight lamda (--cs-tv-lambda, --cs-l1-lambda) must be > 0, got {lamda}.")
    y = kspace.detach().cpu().numpy().astype(np.complex64)
    mps = maps.detach().cpu().numpy().astype(np.complex64)
    weights = np.broadcast_to(mask.detach().cpu().numpy().astype(np.float32), y.shape)
    sensitivity = max(float((np.abs(mps) ** 2).sum(axis=0).max()), 1e-12)
    common = dict(weights=weights, max_iter=max_iter, show_pbar=show_pbar, leave_pbar=False)
    if regulariser == "l1-wavelet":
        return sigpy.mri.app.L1WaveletRecon(y, mps, lamda, alpha=1 / sensitivity, **common)
    norm_bound = math.sqrt(sensitivity + 8)
    return sigpy.mri.app.TotalVariationRecon(y, mps, lamda, tau=1 / (norm_bound * math.sqrt(lamda)),
                                             sigma=math.sqrt(lamda) / norm_bound, **common)


def cs_mri(kspace: torch.Tensor, maps: torch.Tensor, mask: torch.Tensor, regulariser: str = "l1-wavelet",
           lamda: float = 1e-3, max_iter: int = 100, show_pbar: bool = False) -> torch.Tensor:
    """Classical compressed-sensing SENSE reconstruction of one slice with sigpy (CPU):
        argmin_x 1/2 ||M (F S x - y)||^2 + lamda R(x),  R = ||Psi x||_1 (Daubechies-4 wavelets, sigpy's default)
    or total variation, solved by sigpy.mri.app.L1WaveletRecon / TotalVariationRecon (`cs_app`) with the same maps
    and mask as the learned methods (sigpy's Sense operator equals MultiCoilMRI: tests/sampling/test_posterior.py).

    kspace (C, H, W) complex (zero off the mask), maps (C, H, W) complex, mask broadcastable to (C, H, W).
    Returns the image as 2 channels (2, H, W) float32.
    """
    image = cs_app(kspace, maps, mask, regulariser, lamda, max_iter, show_pbar).run()
    return complex_to_channels(torch.from_numpy(np.asarray(image, dtype=np.complex64))[None])[0]
