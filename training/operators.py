"""Linear measurement operators: forward `A`, exact adjoint `AH`, and `pinv` where the pseudo-inverse is exact.

Conventions (shared by the MSM loss, Ambient training and every sampler):
- Images are real batches (N, C, H, W), exactly what the network sees. A complex MRI image is 2 real channels
  (re, im); `complex_to_channels` / `channels_to_complex` convert.
- Measurements are real for natural images and complex64 (N, coils, H, W) for multi-coil MRI.
- The inner product is `<a, b> = Re sum(conj(a) * b)` (`inner`). In the 2-channel representation of a complex image
  it is the ordinary real dot product, so `<A x, y> = <x, AH y>` holds with `x` real and `y` complex.
- A mask `P` (see training/masks.py) is NOT part of an operator: it multiplies measurement entries, so the full
  measurement model is y = P (A x + sigma_y n) (`measure`).
- Operators are immutable: they hold only their parameters (mask, factor, kernel, coil maps) and no RNG or cache that
  changes between calls. Parameters live on the device they were built on; inputs must be on the same device.
- `pinv` exists only where the Moore-Penrose pseudo-inverse is exact and cheap; callers test `hasattr(op, 'pinv')`.
"""

import torch
import torch.nn.functional as F

from dnnlib import UserError

# ----------------------------------------------------------------------------
# Complex <-> 2 real channels, inner product, noise in measurement space.


def complex_to_channels(z: torch.Tensor) -> torch.Tensor:
    """Complex (N, H, W) or (N, 1, H, W) -> real (N, 2, H, W) with channels (re, im)."""
    if z.ndim == 4:
        if z.shape[1] != 1:
            raise UserError(f"complex_to_channels expects (N,H,W) or (N,1,H,W), got shape {tuple(z.shape)}.")
        z = z[:, 0]
    if not z.is_complex() or z.ndim != 3:
        raise UserError(f"complex_to_channels expects a complex (N,H,W) tensor, got {z.dtype} {tuple(z.shape)}.")
    return torch.stack([z.real, z.imag], dim=1)


def channels_to_complex(x: torch.Tensor) -> torch.Tensor:
    """Real (N, 2, H, W) with channels (re, im) -> complex (N, H, W)."""
    if x.is_complex() or x.ndim != 4 or x.shape[1] != 2:
        raise UserError(f"channels_to_complex expects a real (N,2,H,W) tensor, got {x.dtype} {tuple(x.shape)}.")
    return torch.complex(x[:, 0].contiguous(), x[:, 1].contiguous())


def mri_magnitude(images: torch.Tensor) -> torch.Tensor:
    """2-channel complex images (N, 2, H, W) -> magnitudes (N, 1, H, W)."""
    return channels_to_complex(images).abs()[:, None]


def inner(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Real inner product Re sum(conj(a) * b) over all entries (a scalar tensor)."""
    if a.is_complex() or b.is_complex():
        return (torch.conj(a) * b).real.sum()
    return (a * b).sum()


def measurement_randn(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise shaped like `like`, in the real representation of its entries: for complex entries the
    real and the imaginary part are each N(0, 1) (so E|n|^2 = 2 per complex entry). This matches MSM's
    y = P (z + eta n), n ~ N(0, I) on the real vector of measurement entries."""
    real_dtype = like.real.dtype if like.is_complex() else like.dtype
    if like.is_complex():
        shape = (*like.shape, 2)
        noise = torch.randn(shape, generator=generator, dtype=real_dtype, device=like.device)
        return torch.view_as_complex(noise)
    return torch.randn(like.shape, generator=generator, dtype=real_dtype, device=like.device)


def check_noise_std(value: float, flag: str = "--sigma-y"):
    """The one check of a measurement noise std (sigma_y, or a relative noise level): >= 0 and not NaN."""
    if not value >= 0:
        raise UserError(f"{flag} must be >= 0, got {value}.")


def measure(
    operator,
    x: torch.Tensor,
    mask: torch.Tensor | None = None,
    sigma_y: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """y = P (A x + sigma_y n): `mask` broadcastable to the measurement (None = everything observed), `n` from
    `measurement_randn` (complex entries: std sigma_y on the real and on the imaginary part each). Unobserved entries
    are exact zeros in a full-size tensor. A noise draw needs an explicit `generator` (None = torch's default one)."""
    check_noise_std(sigma_y)
    y = operator.A(x)
    if sigma_y > 0:
        y = y + sigma_y * measurement_randn(y, generator)
    return y if mask is None else y * mask


# ----------------------------------------------------------------------------
# Centred orthonormal 2-D FFT.


def _checkerboard(height: int, width: int, device, dtype) -> torch.Tensor:
    """(-1)^(h + w) as an (H, W) tensor."""
    h = torch.arange(height, device=device)
    w = torch.arange(width, device=device)
    return (1 - 2 * ((h[:, None] + w[None, :]) % 2)).to(dtype)


def checkerboard_applies(height: int, width: int) -> bool:
    """The checkerboard form of the centred FFT is exact only when both sizes are even (then fftshift and ifftshift
    are the same roll by half the size, and that roll is a (-1)^k modulation in the other domain)."""
    return height % 2 == 0 and width % 2 == 0


def _checkerboard_sign(height: int, width: int) -> int:
    # For even sizes, fftshift(fft2(ifftshift(x)))[k] = (-1)^(H/2 + W/2) (-1)^(k1+k2) fft2((-1)^(n1+n2) x)[k].
    return -1 if (height // 2 + width // 2) % 2 else 1


def _centred(transform, x: torch.Tensor, use_checkerboard: bool | None) -> torch.Tensor:
    """fftshift(transform(ifftshift(x))) over the last two axes, or its shift-free equivalent for even sizes."""
    height, width = x.shape[-2:]
    if use_checkerboard is None:
        use_checkerboard = checkerboard_applies(height, width)
    if use_checkerboard:
        chk = _checkerboard(height, width, x.device, x.real.dtype)
        return transform(x * chk, norm="ortho") * (chk * _checkerboard_sign(height, width))
    return torch.fft.fftshift(transform(torch.fft.ifftshift(x, dim=(-2, -1)), norm="ortho"), dim=(-2, -1))


def fft2c(x: torch.Tensor, use_checkerboard: bool | None = None) -> torch.Tensor:
    """Centred orthonormal 2-D FFT over the last two axes: fftshift(fft2(ifftshift(x)), norm='ortho').
    k-space index (H//2, W//2) is the zero frequency, for odd sizes too. `use_checkerboard` (default: whenever it is
    exact) replaces both shifts by (-1)^(h+w) modulations, which avoids two full memory copies (roll)."""
    return _centred(torch.fft.fft2, x, use_checkerboard)


def ifft2c(y: torch.Tensor, use_checkerboard: bool | None = None) -> torch.Tensor:
    """Inverse of `fft2c` (and its adjoint, since it is unitary): fftshift(ifft2(ifftshift(y)), norm='ortho')."""
    return _centred(torch.fft.ifft2, y, use_checkerboard)


# ----------------------------------------------------------------------------
# Operators.


class Identity:
    """T = I (natural images, MSM.md section 1): the measurement is the image itself."""

    def A(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x, or P x with a mask (the measurement operators of MSM's partial denoisers take P with T)."""
        return x if mask is None else x * mask

    def AH(self, y: torch.Tensor) -> torch.Tensor:
        return y

    def pinv(self, y: torch.Tensor) -> torch.Tensor:
        return y

    def measurement_shape(self, image_shape: tuple) -> tuple:
        return tuple(image_shape)


class PixelMask:
    """A = M for a fixed binary mask M (N or 1, 1, H, W) shared across channels: inpainting with a known mask.
    M is an orthogonal projection, so AH = pinv = A."""

    def __init__(self, mask: torch.Tensor):
        if mask.ndim != 4 or mask.shape[1] != 1:
            raise UserError(f"PixelMask expects a mask of shape (N or 1, 1, H, W), got {tuple(mask.shape)}.")
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise UserError("PixelMask expects a binary mask with entries 0 or 1.")
        self.mask = mask.to(torch.float32)

    def A(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.mask.to(x.dtype)

    def AH(self, y: torch.Tensor) -> torch.Tensor:
        return y * self.mask.to(y.dtype)

    def pinv(self, y: torch.Tensor) -> torch.Tensor:
        return self.AH(y)

    def measurement_shape(self, image_shape: tuple) -> tuple:
        return tuple(image_shape)


class BoxInpainting(PixelMask):
    """A = M with M zero on one box (the hole) and one elsewhere. Default: a centred square hole of side
    `box_size` (MSM.md section 7: a 64x64 hole at the centre of a 128 image). `corner` = (top, left) overrides."""

    def __init__(self, resolution: int, box_size: int, corner: tuple[int, int] | None = None, device=None):
        if not 0 < box_size <= resolution:
            raise UserError(f"BoxInpainting: box_size must be in 1..{resolution}, got {box_size}.")
        top, left = corner if corner is not None else ((resolution - box_size) // 2,) * 2
        if not (0 <= top <= resolution - box_size and 0 <= left <= resolution - box_size):
            raise UserError(f"BoxInpainting: a {box_size} box at corner {corner} does not fit in {resolution}.")
        mask = torch.ones(1, 1, resolution, resolution, device=device)
        mask[..., top : top + box_size, left : left + box_size] = 0
        super().__init__(mask)
        self.box_size, self.corner = box_size, (top, left)


class AvgPoolSR:
    """Super-resolution: A = average pooling by `factor` s (N, C, H, W) -> (N, C, H/s, W/s). AH spreads each
    low-resolution value over its s x s block divided by s^2 (the exact adjoint, not nearest-neighbour upsampling).
    A AH = I / s^2, hence pinv = s^2 AH (nearest-neighbour upsampling)."""

    def __init__(self, factor: int):
        if int(factor) != factor or factor < 1:
            raise UserError(f"AvgPoolSR: factor must be a positive integer, got {factor}.")
        self.factor = int(factor)

    def A(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        if height % self.factor or width % self.factor:
            raise UserError(f"AvgPoolSR: image size {height}x{width} is not divisible by factor {self.factor}.")
        return F.avg_pool2d(x, self.factor)

    def AH(self, y: torch.Tensor) -> torch.Tensor:
        s = self.factor
        return y.repeat_interleave(s, dim=-2).repeat_interleave(s, dim=-1) / (s * s)

    def pinv(self, y: torch.Tensor) -> torch.Tensor:
        return self.AH(y) * (self.factor**2)

    def measurement_shape(self, image_shape: tuple) -> tuple:
        *lead, height, width = image_shape
        return (*lead, height // self.factor, width // self.factor)


class GaussianBlur:
    """A = convolution with a normalised, separable Gaussian kernel (odd `kernel_size`, std `sigma` pixels) applied
    per channel, output the same size as the input. Boundary: the image is taken as zero outside its support
    (zero padding), so A is a banded Toeplitz matrix and AH is the transposed convolution with the same kernel
    (which equals A here because the kernel is symmetric; AH is still computed as the transpose). No exact cheap
    pseudo-inverse exists, so there is no `pinv`."""

    def __init__(self, sigma: float, kernel_size: int):
        if not sigma > 0:
            raise UserError(f"GaussianBlur: sigma must be > 0, got {sigma}.")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise UserError(f"GaussianBlur: kernel_size must be a positive odd integer, got {kernel_size}.")
        self.sigma, self.kernel_size = float(sigma), int(kernel_size)
        offsets = torch.arange(kernel_size, dtype=torch.float64) - kernel_size // 2
        kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
        self.kernel_1d = kernel / kernel.sum()

    def _weights(self, x: torch.Tensor):
        k = self.kernel_1d.to(device=x.device, dtype=x.dtype)
        channels = x.shape[1]
        return k.view(1, 1, -1, 1).repeat(channels, 1, 1, 1), k.view(1, 1, 1, -1).repeat(channels, 1, 1, 1)

    def A(self, x: torch.Tensor) -> torch.Tensor:
        vertical, horizontal = self._weights(x)
        pad, channels = self.kernel_size // 2, x.shape[1]
        x = F.conv2d(x, vertical, padding=(pad, 0), groups=channels)
        return F.conv2d(x, horizontal, padding=(0, pad), groups=channels)

    def AH(self, y: torch.Tensor) -> torch.Tensor:
        vertical, horizontal = self._weights(y)
        pad, channels = self.kernel_size // 2, y.shape[1]
        y = F.conv_transpose2d(y, horizontal, padding=(0, pad), groups=channels)
        return F.conv_transpose2d(y, vertical, padding=(pad, 0), groups=channels)

    def measurement_shape(self, image_shape: tuple) -> tuple:
        return tuple(image_shape)


class MultiCoilMRI:
    """Multi-coil Cartesian MRI, T = F S (MSM.md section 1): image x (N, 2, H, W) real (re, im channels) ->
    k-space (N, C, H, W) complex64, y_c = fft2c(S_c x), with coil maps `maps` complex (N, C, H, W) (N may be 1 to
    share maps across the batch). AH(y) = sum_c conj(S_c) ifft2c(y_c), returned as 2 channels.

    AH A = diag(sum_c |S_c|^2) =: D because fft2c is unitary, so pinv = D^+ AH is exact for any maps (and equals AH
    where sum_c |S_c|^2 = 1). Undersampling is the caller's mask on the k-space entries, not part of the operator.

    For even H and W the two fftshifts are replaced by (-1)^(h+w) modulations: the input modulation (and the global
    sign) are folded into the stored maps once, so A costs one map multiply, one FFT and one sign multiply. Odd sizes
    use the shifts (the modulation there would be a complex phase, exact only up to rounding).
    """

    def __init__(self, maps: torch.Tensor, use_checkerboard: bool | None = None):
        if maps.ndim != 4 or not maps.is_complex():
            raise UserError(
                f"MultiCoilMRI expects complex coil maps (N, C, H, W), got {maps.dtype} {tuple(maps.shape)}."
            )
        self.maps = maps
        height, width = maps.shape[-2:]
        exact = checkerboard_applies(height, width)
        if use_checkerboard and not exact:
            raise UserError(f"MultiCoilMRI: the checkerboard FFT is exact only for even sizes, got {height}x{width}.")
        self.use_checkerboard = exact if use_checkerboard is None else use_checkerboard
        if self.use_checkerboard:
            chk = _checkerboard(height, width, maps.device, maps.real.dtype)
            self._kspace_sign = chk
            self._modulated_maps = maps * (chk * _checkerboard_sign(height, width))

    @property
    def num_coils(self) -> int:
        return self.maps.shape[1]

    def _batch_matches(self, n: int) -> bool:
        return self.maps.shape[0] in (1, n)

    def _check_image(self, x: torch.Tensor):
        bad_shape = x.ndim != 4 or x.shape[1] != 2 or x.shape[-2:] != self.maps.shape[-2:]
        if bad_shape or x.is_complex() or not self._batch_matches(x.shape[0]):
            raise UserError(
                f"MultiCoilMRI with maps {tuple(self.maps.shape)} expects real images (N, 2, H, W) of the same size "
                f"and batch, got {x.dtype} {tuple(x.shape)}."
            )

    def _check_kspace(self, y: torch.Tensor):
        if y.ndim != 4 or y.shape[1:] != self.maps.shape[1:] or not self._batch_matches(y.shape[0]):
            raise UserError(
                f"MultiCoilMRI with maps {tuple(self.maps.shape)} expects k-space of the same shape, got "
                f"{tuple(y.shape)}."
            )

    def A(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """T x, or P T x when a k-space mask P (broadcastable to the k-space) is given: with the checkerboard the mask
        is folded into the output sign, so the masked forward costs no pass more than the plain one."""
        self._check_image(x)
        image = channels_to_complex(x).to(self.maps.dtype)[:, None]  # (N, 1, H, W)
        if self.use_checkerboard:
            sign = self._kspace_sign if mask is None else self._kspace_sign * mask.to(self._kspace_sign.dtype)
            return torch.fft.fft2(self._modulated_maps * image, norm="ortho") * sign
        kspace = fft2c(self.maps * image, use_checkerboard=False)
        return kspace if mask is None else kspace * mask

    def AH(self, y: torch.Tensor) -> torch.Tensor:
        self._check_kspace(y)
        if self.use_checkerboard:
            coil_images = torch.fft.ifft2(y * self._kspace_sign, norm="ortho")
            image = (torch.conj(self._modulated_maps) * coil_images).sum(dim=1)
        else:
            image = (torch.conj(self.maps) * ifft2c(y, use_checkerboard=False)).sum(dim=1)
        return complex_to_channels(image)

    def pinv(self, y: torch.Tensor) -> torch.Tensor:
        sum_sq = (self.maps.abs() ** 2).sum(dim=1)  # (N, H, W): the diagonal of AH A
        scale = torch.where(sum_sq > 0, 1 / sum_sq.clamp_min(torch.finfo(sum_sq.dtype).tiny), 0)
        return self.AH(y) * scale[:, None]

    def measurement_shape(self, image_shape: tuple) -> tuple:
        return (image_shape[0], self.num_coils, *image_shape[-2:])
