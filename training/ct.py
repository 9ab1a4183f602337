"""2-D parallel-beam CT (sparse-view and limited-angle): the Radon transform as a measurement operator with an exact
adjoint, and filtered back-projection (FBP), batched, on CPU and GPU.

Why our own torch code: the libraries made for this are either unavailable here or unfit. torch-radon has no wheel
on PyPI for current torch (`pip download torch-radon` finds no distribution) and its CUDA build does not compile
against current toolkits; ASTRA (with ODL, what seed 003 uses) ships through conda, its parallel-beam projectors run on
CUDA only and its CPU back-projector is not the exact transpose of its forward projector; scikit-image's
`radon`/`iradon` are numpy, single-image, CPU-only and not an adjoint pair. So the projector is written here with
torch's `grid_sample` and checked against scikit-image (tests/test_ct.py), and the back-projector is its exact
transpose, obtained by autograd (the backward pass of bilinear sampling is the transposed scatter of the same
weights), so <A x, y> = <x, A^H y> to rounding, on any device.

Geometry (scikit-image's `radon(image, theta, circle=False)`, to which A agrees to rounding): a square n x n image
is zero-padded to D = n + ceil(sqrt(2) n - n) pixels so that every pixel is seen from every angle; for view angle
theta the padded image is rotated about pixel (D // 2, D // 2) with bilinear interpolation (zero outside) and summed
along columns: ray integrals with unit step, one detector per column, D detectors. Angles are
theta_k = k * angular_range / views degrees, k = 0..views-1 (180 views over 180 degrees: scikit-image's default
theta). Sinograms are (N, C, views, D).

Scale: A returns those ray sums divided by sqrt(n views) (`ParallelBeamCT.scale`), so that ||A||_2 is about 1
(the ray sums' normal operator has top eigenvalue about 0.965 n views) like every other operator of the house (masks,
super-resolution, MRI with normalised maps). The likelihood terms of training/sampling/conditioning.py take explicit
steps of about sigma^2 ||A||^2 / (sigma_y^2 + sigma^2), stable only for ||A|| of order 1; raw ray sums (||A||^2 ~ n
views, thousands) would need task-specific step sizes. scikit-image's `radon` is A x / scale.

FBP: the Ram-Lak ramp sampled in the spatial domain (Kak & Slaney eq. 3.61, which avoids the DC bias of |f|; the
same filter as scikit-image's 'ramp'), optionally with a Shepp-Logan window, applied along the detector axis with
zero padding, then back-projected with A^H and scaled by the angular step / 2 (pi / (2 views) for 180 degrees) and
by 1 / scale^2 (A's normalisation).
"""

import math

import torch
import torch.nn.functional as F

from dnnlib import UserError

FBP_FILTERS = ("ramp", "shepp-logan")
SAMPLE_BUDGET = 1 << 24  # bilinear samples per chunk of views: bounds the projector's memory


class ParallelBeamCT:
    """A = the Radon transform of real images (N, C, n, n) -> sinograms (N, C, views, detectors); `AH` its exact
    adjoint (the transposed bilinear back-projection). No `pinv` (A has none in closed form: use `fbp`)."""

    def __init__(self, size: int, views: int, angular_range: float = 180.0):
        if not (isinstance(size, int) and size >= 2):
            raise UserError(f"CT needs square images of at least 2 x 2 pixels, got size {size!r}.")
        if not (isinstance(views, int) and views >= 1):
            raise UserError(f"--views must be an integer >= 1, got {views!r}.")
        if not 0 < angular_range <= 180:
            raise UserError(f"--angular-range must be in (0, 180] degrees, got {angular_range}.")
        self.size, self.views, self.angular_range = size, views, float(angular_range)
        self.detectors = size + math.ceil(math.sqrt(2) * size - size)
        self.offset = self.detectors // 2 - size // 2  # padding before the image on each axis
        self.angles = torch.arange(views, dtype=torch.float64) * math.radians(angular_range) / views
        self.scale = 1 / math.sqrt(size * views)  # ||A||_2 about 1 (module docstring)

    def measurement_shape(self, image_shape: tuple) -> tuple:
        return (*image_shape[:-2], self.views, self.detectors)

    def _grid(self, angles: torch.Tensor, dtype, device) -> torch.Tensor:
        """grid_sample coordinates (1, views * D, D, 2) of the rotated frames: output pixel (r, c) of view theta
        reads the padded image at column C + cos u + sin v, row C - sin u + cos v (u = c - C, v = r - C)."""
        centre = self.detectors // 2
        t = torch.arange(self.detectors, dtype=torch.float64) - centre
        v, u = torch.meshgrid(t, t, indexing="ij")
        cos, sin = angles.cos()[:, None, None], angles.sin()[:, None, None]
        col = centre + cos * u + sin * v - self.offset  # in image pixels
        row = centre - sin * u + cos * v - self.offset
        scale = 2 / (self.size - 1)  # align_corners=True: pixel 0 -> -1, pixel n - 1 -> +1
        grid = torch.stack([col * scale - 1, row * scale - 1], dim=-1)
        return grid.reshape(1, -1, self.detectors, 2).to(device=device, dtype=dtype)

    def _check(self, x: torch.Tensor):
        if x.ndim != 4 or x.shape[-2:] != (self.size, self.size) or x.is_complex():
            raise UserError(f"CT with {self.size} x {self.size} images expects real (N, C, {self.size}, {self.size}) "
                            f"batches, got {x.dtype} {tuple(x.shape)}.")

    def A(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        n, c = x.shape[:2]
        images = x.reshape(1, n * c, self.size, self.size)
        chunk = max(1, SAMPLE_BUDGET // (n * c * self.detectors**2))
        parts = []
        for start in range(0, self.views, chunk):
            angles = self.angles[start : start + chunk]
            grid = self._grid(angles, x.dtype, x.device)
            rotated = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
            parts.append(rotated.reshape(n * c, len(angles), self.detectors, self.detectors).sum(dim=2))
        return torch.cat(parts, dim=1).reshape(n, c, self.views, self.detectors) * self.scale

    def AH(self, y: torch.Tensor) -> torch.Tensor:
        expected = (self.views, self.detectors)
        if y.ndim != 4 or y.shape[-2:] != expected:
            raise UserError(f"CT back-projection expects sinograms (N, C, {expected[0]}, {expected[1]}), got "
                            f"{tuple(y.shape)}.")
        with torch.enable_grad():
            zero = torch.zeros(*y.shape[:2], self.size, self.size, dtype=y.dtype, device=y.device,
                               requires_grad=True)
            (image,) = torch.autograd.grad(self.A(zero), zero, grad_outputs=y)
        return image


def ramp_filter(length: int, window: str = "ramp", dtype=torch.float64, device="cpu") -> torch.Tensor:
    """Frequency response (length,) of the spatially sampled Ram-Lak filter h[0] = 1/4, h[k] = -1 / (pi k)^2 for odd
    k, 0 for even k (k taken circularly), times 2; with window 'shepp-logan' also times sinc(f)."""
    if window not in FBP_FILTERS:
        raise UserError(f"--fbp-filter must be one of {', '.join(FBP_FILTERS)}, got {window!r}.")
    k = torch.arange(length, dtype=torch.float64)
    k = torch.minimum(k, length - k)  # circular distance
    h = torch.where(k % 2 == 1, -1 / (math.pi * k.clamp_min(1)) ** 2, torch.zeros_like(k))
    h[0] = 0.25
    response = 2 * torch.fft.fft(h).real
    if window == "shepp-logan":
        omega = math.pi * torch.fft.fftfreq(length, dtype=torch.float64)
        response[1:] *= torch.sin(omega[1:]) / omega[1:]
    return response.to(device=device, dtype=dtype)


def fbp(operator: ParallelBeamCT, sinogram: torch.Tensor, window: str = "ramp") -> torch.Tensor:
    """Filtered back-projection of sinograms (N, C, views, D) -> images (N, C, n, n): ramp-filter each projection
    (zero-padded to max(64, the power of 2 >= 2 D) samples), back-project with A^H, scale by the angular step / 2.
    Limited-angle data is back-projected over the range it covers (no extrapolation)."""
    detectors = operator.detectors
    padded = max(64, 1 << math.ceil(math.log2(2 * detectors)))
    response = ramp_filter(padded, window, sinogram.dtype, sinogram.device)
    spectrum = torch.fft.fft(F.pad(sinogram, (0, padded - detectors)), dim=-1)
    filtered = torch.fft.ifft(spectrum * response, dim=-1).real[..., :detectors]
    step = math.radians(operator.angular_range) / operator.views
    return operator.AH(filtered.contiguous()) * (step / 2 / operator.scale**2)
