"""PSNR / SSIM / NMSE against scikit-image and the fastMRI definitions (fastmri/evaluate.py) on fixtures."""

import numpy as np
import pytest
import skimage.metrics
import torch

from training.metrics import nmse, psnr, reference_max, ssim


def fixtures(channels: int, size: int = 24, seed: int = 0):
    """A smooth reference (a blurred random field, so SSIM is far from both 0 and 1) and a noisy estimate."""
    rng = np.random.default_rng(seed)
    field = rng.standard_normal((2, channels, size + 4, size + 4)).cumsum(-1).cumsum(-2)[..., 4:, 4:]
    reference = np.abs(field) / np.abs(field).max()
    estimate = reference + 0.05 * rng.standard_normal(reference.shape)
    return reference, estimate


def fastmri_nmse(gt, pred):
    return np.linalg.norm(gt - pred) ** 2 / np.linalg.norm(gt) ** 2


def fastmri_psnr(gt, pred):
    return skimage.metrics.peak_signal_noise_ratio(gt, pred, data_range=gt.max())


def fastmri_ssim(gt, pred):
    return skimage.metrics.structural_similarity(gt, pred, data_range=gt.max())


def test_magnitude_metrics_match_fastmri():
    reference, estimate = fixtures(channels=1)
    data_range = reference_max(torch.from_numpy(reference))
    ours_psnr = psnr(torch.from_numpy(reference), torch.from_numpy(estimate), data_range)
    ours_ssim = ssim(torch.from_numpy(reference), torch.from_numpy(estimate), data_range)
    ours_nmse = nmse(torch.from_numpy(reference), torch.from_numpy(estimate))
    for i in range(len(reference)):
        gt, pred = reference[i, 0], estimate[i, 0]
        assert ours_psnr[i].item() == pytest.approx(fastmri_psnr(gt, pred), rel=1e-10)
        assert ours_ssim[i].item() == pytest.approx(fastmri_ssim(gt, pred), rel=1e-8)
        assert ours_nmse[i].item() == pytest.approx(fastmri_nmse(gt, pred), rel=1e-10)
        assert 0.2 < ours_ssim[i].item() < 0.95  # a fixture that tells SSIM implementations apart


def test_rgb_metrics_match_skimage_with_data_range_one():
    reference, estimate = fixtures(channels=3, size=16, seed=1)
    estimate = estimate.clip(0, 1)
    ours_psnr = psnr(torch.from_numpy(reference), torch.from_numpy(estimate), 1.0)
    ours_ssim = ssim(torch.from_numpy(reference), torch.from_numpy(estimate), 1.0)
    for i in range(len(reference)):
        gt, pred = reference[i].transpose(1, 2, 0), estimate[i].transpose(1, 2, 0)
        expected_psnr = skimage.metrics.peak_signal_noise_ratio(gt, pred, data_range=1.0)
        expected_ssim = skimage.metrics.structural_similarity(gt, pred, data_range=1.0, channel_axis=2)
        assert ours_psnr[i].item() == pytest.approx(expected_psnr, rel=1e-10)
        assert ours_ssim[i].item() == pytest.approx(expected_ssim, rel=1e-8)


def test_identical_images_score_perfectly_and_small_images_are_refused():
    reference, _ = fixtures(channels=1)
    ref = torch.from_numpy(reference)
    assert torch.isinf(psnr(ref, ref, 1.0)).all()
    assert torch.allclose(ssim(ref, ref, 1.0), torch.ones(2, dtype=torch.float64))
    assert (nmse(ref, ref) == 0).all()
    with pytest.raises(ValueError, match="7x7"):
        ssim(ref[..., :6, :6], ref[..., :6, :6], 1.0)
