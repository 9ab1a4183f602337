"""The noise grids of training/schedules.py against their formulas (EDM's rho schedule, the respaced
linear-beta VP grids of the MSM reference and of DPS) and the clipping of a grid to a snapshot's training range."""

import math

import numpy as np
import torch

from training.schedules import (
    ddpm_sigmas,
    rho_schedule,
    sigmas_in_training_range,
    training_sigma_max,
    vp200_sigmas,
)


def test_rho_schedule_matches_formula():
    t = rho_schedule(5, sigma_min=0.01, sigma_max=10.0, rho=3.0)
    i = torch.arange(5, dtype=torch.float64)
    expected = (10 ** (1 / 3) + i / 4 * (0.01 ** (1 / 3) - 10 ** (1 / 3))) ** 3
    assert torch.allclose(t[:-1], expected) and t[-1] == 0
    assert math.isclose(t[0].item(), 10.0, rel_tol=1e-12) and math.isclose(t[-2].item(), 0.01, rel_tol=1e-12)


def test_vp200_grid_matches_the_respaced_linear_schedule():
    sigmas = vp200_sigmas()
    assert sigmas.shape == (200,) and bool((sigmas[1:] < sigmas[:-1]).all())
    # Endpoints: t = 0 keeps alpha_bar = 1 - 1e-4; the reference's 'ddim200' top is t = 995, the product over the
    # first 996 betas.
    assert math.isclose(sigmas[-1].item(), math.sqrt(1 / (1 - 1e-4) - 1), rel_tol=1e-12)
    betas = [1e-4 + (0.02 - 1e-4) * i / 999 for i in range(1000)]
    alpha_bar_995 = math.prod(1 - b for b in betas[:996])
    assert math.isclose(sigmas[0].item(), math.sqrt(1 / alpha_bar_995 - 1), rel_tol=1e-9)
    # Level i (from the bottom) is time step 5 i: check one in the middle, step 500 (i = 100).
    alpha_bar_500 = math.prod(1 - b for b in betas[:501])
    assert math.isclose(sigmas.flip(0)[100].item(), math.sqrt(1 / alpha_bar_500 - 1), rel_tol=1e-9)
    # The section rule of runs from before the rule was recorded: level i is step round(i * 999 / 199), from 999.
    section = vp200_sigmas(rule="section")
    alpha_bar_last, alpha_bar_502 = math.prod(1 - b for b in betas), math.prod(1 - b for b in betas[:503])
    assert math.isclose(section[0].item(), math.sqrt(1 / alpha_bar_last - 1), rel_tol=1e-9)
    assert math.isclose(section.flip(0)[100].item(), math.sqrt(1 / alpha_bar_502 - 1), rel_tol=1e-9)


def test_sampling_grids_start_inside_the_training_range():
    lognormal = {"class_name": "training.loss.MSMLoss", "sigma_dist": "lognormal"}
    sigmas, note = sigmas_in_training_range(vp200_sigmas(), lognormal)
    assert 70 < sigmas[0] <= 80 and torch.equal(sigmas, vp200_sigmas()[vp200_sigmas() <= 80])
    assert "log-normal" in note and "dropped" in note
    narrow = {"class_name": "training.loss.EDMLoss", "P_mean": -3.0, "P_std": 0.5}  # 1 - 1e-6 quantile: 0.53
    assert sigmas_in_training_range(ddpm_sigmas(), narrow)[0][0] <= math.exp(-3.0 + 4.753 * 0.5)
    for grid_top in ({"class_name": "training.loss.MSMLoss", "sigma_dist": "vp200"}, None):
        assert torch.equal(sigmas_in_training_range(vp200_sigmas(), grid_top)[0], vp200_sigmas())
    # A vp200 model tops out at its own grid's top level: 151.2 (ddim) or 157.4 (section, also a config that records
    # no rule: it was trained before the rule was recorded).
    for rule, top in (("ddim", 151.18), ("section", 157.41), (None, 157.41)):
        loss = {"class_name": "training.loss.MSMLoss", "sigma_dist": "vp200", **({"vp_grid": rule} if rule else {})}
        assert abs(training_sigma_max(loss)[0] - top) < 0.01
        kept = sigmas_in_training_range(vp200_sigmas(rule="section"), loss)[0]
        assert len(kept) == (200 if top > 157 else 199)
    ve = sigmas_in_training_range(vp200_sigmas(), {"class_name": "training.loss.VELoss"})[0]
    assert ve[0] <= 100 < vp200_sigmas()[0]


def test_dps_sigmas_are_ddpm_linear_beta_levels():
    betas = np.linspace(1e-4, 0.02, 1000)
    abar = np.cumprod(1 - betas)
    assert np.allclose(ddpm_sigmas().numpy(), np.sqrt(1 / abar - 1)[::-1], rtol=1e-12)
    # DPS respaces with a plain step count, guided-diffusion's section rule (not the MSM reference's 'ddim200').
    assert np.allclose(ddpm_sigmas(200).numpy(), vp200_sigmas(rule="section").numpy(), rtol=1e-12)
