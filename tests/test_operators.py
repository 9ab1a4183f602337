"""Measurement operators: adjointness, projections, pseudo-inverses, the centred FFT, and agreement with sigpy."""

import numpy as np
import pytest
import scipy.ndimage
import torch

from dnnlib import UserError
from training.operators import (
    AvgPoolSR,
    BoxInpainting,
    GaussianBlur,
    Identity,
    MultiCoilMRI,
    PixelMask,
    channels_to_complex,
    complex_to_channels,
    fft2c,
    ifft2c,
    inner,
    measure,
    measurement_randn,
)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _complex_randn(*shape, generator, dtype=torch.complex128):
    return torch.randn(*shape, generator=generator, dtype=dtype)


def _random_maps(n, coils, height, width, generator, normalise=True):
    maps = _complex_randn(n, coils, height, width, generator=generator)
    return maps / (maps.abs() ** 2).sum(dim=1, keepdim=True).sqrt() if normalise else maps


def _operators(height, width, channels, generator):
    """(name, operator, image shape) for every operator at one size; float64 so tolerances can be tight."""
    mask = (torch.rand(2, 1, height, width, generator=generator) > 0.3).double()
    side = min(height, width)
    ops = [
        ("identity", Identity(), (2, channels, height, width)),
        ("pixel-mask", PixelMask(mask), (2, channels, height, width)),
        ("box", BoxInpainting(side, 3, corner=(1, 2)), (2, channels, side, side)),
        ("blur", GaussianBlur(1.3, 5), (2, channels, height, width)),
        ("mri", MultiCoilMRI(_random_maps(2, 4, height, width, generator)), (2, 2, height, width)),
        ("mri-shared-maps", MultiCoilMRI(_random_maps(1, 3, height, width, generator)), (2, 2, height, width)),
    ]
    if height % 3 == 0 and width % 3 == 0:
        ops.append(("sr", AvgPoolSR(3), (2, channels, height, width)))
    return ops


@pytest.mark.parametrize("height,width", [(9, 12), (7, 9), (8, 6), (12, 12)])
def test_adjointness_every_operator(height, width):
    generator = _gen(1)
    for name, op, shape in _operators(height, width, 3, generator):
        x = torch.randn(shape, generator=generator, dtype=torch.float64)
        y_example = op.A(x)
        assert tuple(y_example.shape) == op.measurement_shape(shape), name
        y = measurement_randn(y_example, generator)
        assert y.dtype == y_example.dtype
        lhs, rhs = inner(op.A(x), y), inner(x, op.AH(y))
        assert abs(lhs - rhs) <= 1e-10 * abs(lhs).clamp_min(1), (name, lhs.item(), rhs.item())


@pytest.mark.parametrize("height,width", [(8, 6), (10, 8), (6, 10)])  # H/2 + W/2 odd and even: both global signs
def test_mri_checkerboard_path_equals_shift_path(height, width):
    generator = _gen(2)
    maps = _random_maps(3, 4, height, width, generator)
    x = torch.randn(3, 2, height, width, generator=generator, dtype=torch.float64)
    y = _complex_randn(3, 4, height, width, generator=generator)
    fast, slow = MultiCoilMRI(maps), MultiCoilMRI(maps, use_checkerboard=False)
    assert fast.use_checkerboard and not slow.use_checkerboard
    torch.testing.assert_close(fast.A(x), slow.A(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fast.AH(y), slow.AH(y), rtol=1e-12, atol=1e-12)


def test_checkerboard_refused_for_odd_sizes():
    with pytest.raises(UserError):
        MultiCoilMRI(_random_maps(1, 2, 7, 8, _gen()), use_checkerboard=True)


@pytest.mark.parametrize("height,width", [(8, 8), (7, 9), (6, 5), (10, 6)])
def test_centred_fft_matches_numpy_definition_and_is_orthonormal(height, width):
    x = _complex_randn(2, 3, height, width, generator=_gen(3))
    reference = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(x.numpy(), axes=(-2, -1)), norm="ortho"), axes=(-2, -1))
    np.testing.assert_allclose(fft2c(x).numpy(), reference, rtol=0, atol=1e-12)
    dc = x.numpy().sum(axis=(-2, -1)) / np.sqrt(height * width)
    assert np.abs(reference[..., height // 2, width // 2] - dc).max() < 1e-12  # zero frequency at (H//2, W//2)
    torch.testing.assert_close(fft2c(x).norm(), x.norm(), rtol=1e-12, atol=0)
    torch.testing.assert_close(ifft2c(fft2c(x)), x, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("height,width", [(8, 8), (7, 9)])
def test_mri_full_sampling_is_isometry_when_maps_are_normalised(height, width):
    generator = _gen(4)
    op = MultiCoilMRI(_random_maps(2, 5, height, width, generator))
    x = torch.randn(2, 2, height, width, generator=generator, dtype=torch.float64)
    torch.testing.assert_close(op.AH(op.A(x)), x, rtol=1e-12, atol=1e-12)  # A^H A = I
    torch.testing.assert_close(op.A(x).norm(), x.norm(), rtol=1e-12, atol=0)  # orthonormal FFT keeps norms
    y = _complex_randn(2, 5, height, width, generator=generator)
    torch.testing.assert_close(op.pinv(y), op.AH(y), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("height,width", [(8, 8), (7, 9)])
def test_pseudo_inverses_satisfy_moore_penrose(height, width):
    """A A+ A = A, A+ A A+ = A+, and A A+, A+ A self-adjoint, checked on random vectors."""
    generator = _gen(5)
    ops = [op for op in _operators(height, width, 2, generator) if hasattr(op[1], "pinv")]
    ops.append(("mri-unnormalised", MultiCoilMRI(_random_maps(2, 3, height, width, generator, normalise=False)),
                (2, 2, height, width)))
    zero_pixel_maps = _random_maps(2, 3, height, width, generator)
    zero_pixel_maps[..., 0, :] = 0  # maps that vanish on a row (as ESPIRiT's crop does outside the object)
    ops.append(("mri-cropped-maps", MultiCoilMRI(zero_pixel_maps), (2, 2, height, width)))
    assert {name for name, _, _ in ops} >= {"identity", "pixel-mask", "box", "mri", "mri-unnormalised"}
    for name, op, shape in ops:
        x = torch.randn(shape, generator=generator, dtype=torch.float64)
        y = measurement_randn(op.A(x), generator)
        torch.testing.assert_close(op.A(op.pinv(op.A(x))), op.A(x), rtol=1e-10, atol=1e-10, msg=name)
        torch.testing.assert_close(op.pinv(op.A(op.pinv(y))), op.pinv(y), rtol=1e-10, atol=1e-10, msg=name)
        x2 = torch.randn(shape, generator=generator, dtype=torch.float64)
        lhs, rhs = inner(op.pinv(op.A(x)), x2), inner(x, op.pinv(op.A(x2)))
        assert abs(lhs - rhs) < 1e-9 * abs(lhs).clamp_min(1), name


def test_avgpool_sr_relations():
    op = AvgPoolSR(4)
    generator = _gen(6)
    y = torch.randn(3, 3, 5, 6, generator=generator, dtype=torch.float64)
    torch.testing.assert_close(op.A(op.AH(y)), y / 16)  # A A^H = I / s^2
    torch.testing.assert_close(op.A(op.pinv(y)), y)  # pinv is a right inverse
    x = torch.randn(3, 3, 20, 24, generator=generator, dtype=torch.float64)
    expected = x.reshape(3, 3, 5, 4, 6, 4).mean(dim=(3, 5))
    torch.testing.assert_close(op.A(x), expected)
    with pytest.raises(UserError):
        op.A(torch.zeros(1, 1, 10, 12))


def test_gaussian_blur_matches_scipy_with_zero_boundary():
    generator = _gen(7)
    x = torch.randn(2, 3, 11, 13, generator=generator, dtype=torch.float64)
    op = GaussianBlur(sigma=1.5, kernel_size=7)
    offsets = np.arange(7) - 3
    kernel_1d = np.exp(-0.5 * (offsets / 1.5) ** 2)
    kernel = np.outer(kernel_1d, kernel_1d) / kernel_1d.sum() ** 2
    expected = np.stack([[scipy.ndimage.convolve(c, kernel, mode="constant") for c in img] for img in x.numpy()])
    np.testing.assert_allclose(op.A(x).numpy(), expected, rtol=0, atol=1e-12)
    with pytest.raises(UserError):
        GaussianBlur(1.0, 4)
    with pytest.raises(UserError):
        GaussianBlur(0.0, 5)


def test_mask_operators_are_projections():
    generator = _gen(8)
    x = torch.randn(2, 3, 16, 16, generator=generator)
    box = BoxInpainting(16, 8)
    assert box.mask.sum() == 16 * 16 - 64 and box.mask[0, 0, 4:12, 4:12].sum() == 0  # centred hole
    for op in (box, PixelMask((torch.rand(1, 1, 16, 16, generator=generator) > 0.5).float())):
        torch.testing.assert_close(op.A(op.A(x)), op.A(x), rtol=0, atol=0)  # P^2 = P
    with pytest.raises(UserError):
        PixelMask(torch.full((1, 1, 4, 4), 0.5))
    with pytest.raises(UserError):
        BoxInpainting(16, 10, corner=(8, 0))


@pytest.mark.parametrize("height,width", [(16, 12), (9, 11)])
def test_mri_agrees_with_sigpy_sense(height, width):
    """sigpy.mri.linop.Sense uses its own centred FFT (ifftshift -> fftn(norm='ortho') -> fftshift) and applies
    sqrt(weights) after it; with a binary line mask that is P F S."""
    sigpy_mri_linop = pytest.importorskip("sigpy.mri.linop")
    generator = _gen(9)
    maps = _random_maps(1, 6, height, width, generator, normalise=False).to(torch.complex64)
    mask = (torch.rand(1, 1, 1, width, generator=generator) > 0.5).float()
    image = _complex_randn(1, height, width, generator=generator, dtype=torch.complex64)
    kspace = _complex_randn(1, 6, height, width, generator=generator, dtype=torch.complex64)

    sense = sigpy_mri_linop.Sense(maps[0].numpy(), coil_batch_size=None,
                                  weights=np.broadcast_to(mask[0, 0].numpy(), (height, width)).copy())
    op = MultiCoilMRI(maps)
    ours_forward = (op.A(complex_to_channels(image)) * mask)[0].numpy()
    ref_forward = sense(image[0].numpy())
    assert np.linalg.norm(ours_forward - ref_forward) <= 1e-5 * np.linalg.norm(ref_forward)
    ours_adjoint = channels_to_complex(op.AH(kspace * mask))[0].numpy()
    ref_adjoint = sense.H(kspace[0].numpy())
    assert np.linalg.norm(ours_adjoint - ref_adjoint) <= 1e-5 * np.linalg.norm(ref_adjoint)


def test_measure_noise_convention_and_determinism():
    generator = _gen(10)
    maps = _random_maps(1, 4, 32, 32, generator).to(torch.complex64)
    op = MultiCoilMRI(maps)
    x = torch.randn(4, 2, 32, 32, generator=generator)
    mask = torch.zeros(4, 1, 1, 32)
    mask[..., ::2] = 1
    y = measure(op, x, mask, sigma_y=0.3, generator=_gen(11))
    torch.testing.assert_close(measure(op, x, mask, sigma_y=0.3, generator=_gen(11)), y, rtol=0, atol=0)
    assert bool((y[..., 1::2] == 0).all())  # unobserved entries are exact zeros
    noise = (y - op.A(x) * mask)[..., ::2]
    for part in (noise.real, noise.imag):  # std sigma_y on the real and on the imaginary part each
        assert abs(part.std().item() - 0.3) < 0.01 and abs(part.mean().item()) < 0.01
    torch.testing.assert_close(measure(Identity(), x, None), x)
    with pytest.raises(UserError):
        measure(Identity(), x, None, sigma_y=-1.0)


def test_complex_channel_helpers_and_shape_errors():
    z = _complex_randn(3, 5, 7, generator=_gen(12), dtype=torch.complex64)
    x = complex_to_channels(z)
    assert x.shape == (3, 2, 5, 7) and x.dtype == torch.float32
    torch.testing.assert_close(channels_to_complex(x), z, rtol=0, atol=0)
    torch.testing.assert_close(complex_to_channels(z[:, None]), x, rtol=0, atol=0)
    assert abs(inner(z, z * 1j).item()) < 1e-4  # Re <z, i z> = 0
    with pytest.raises(UserError):
        channels_to_complex(torch.zeros(3, 3, 5, 7))
    with pytest.raises(UserError):
        complex_to_channels(torch.zeros(3, 5, 7))
    op = MultiCoilMRI(_random_maps(2, 4, 8, 8, _gen()))
    with pytest.raises(UserError):  # k-space whose coils/size do not match the maps
        op.AH(torch.zeros(2, 3, 8, 8, dtype=torch.complex128))
    with pytest.raises(UserError):
        op.A(torch.zeros(2, 2, 8, 6, dtype=torch.float64))
    with pytest.raises(UserError):
        op.A(torch.zeros(3, 2, 8, 8, dtype=torch.float64))  # batch of 3 against maps of 2
    with pytest.raises(UserError):
        MultiCoilMRI(torch.zeros(4, 8, 8))
