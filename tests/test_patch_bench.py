"""bench/patch_priors.py: the equal-compute rule and run planning (fast), and an end-to-end --quick run (slow)."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import patch_priors as pp  # noqa: E402

from training.patches import PatchLaw  # noqa: E402


def test_equal_compute_kimg_closed_form():
    # One crop per image: whole kimg x W^2 / E[p^2]; sizes 16/32/64 at 64 px with real-p 0.5.
    law = PatchLaw.from_options([16, 32, 64], None, 0.5, None)
    expected = 10 * 64**2 / (0.2 * 16**2 + 0.3 * 32**2 + 0.5 * 64**2)
    assert math.isclose(pp.equal_compute_kimg(10, 64, law), expected, rel_tol=1e-12)
    # Crops (p_max / p)^2 per image: every patch step has p_max^2 pixels per crop-slot, so kimg = whole x W^2 x
    # E[mul] / p_max^2.
    muls = pp.constant_pixel_muls([4, 8, 16])
    assert muls == [16, 4, 1]
    law = PatchLaw.from_options([4, 8, 16], None, 0.5, muls)
    mean_mul = 0.2 * 16 + 0.3 * 4 + 0.5 * 1
    assert math.isclose(pp.equal_compute_kimg(1.6, 32, law), 1.6 * 32**2 * mean_mul / 16**2, rel_tol=1e-12)


def test_constant_pixel_muls_refuses_sizes_that_do_not_divide():
    with pytest.raises(ValueError, match="divide the largest"):
        pp.constant_pixel_muls([6, 16])


def test_patch_run_counts_the_draws_train_py_makes():
    # Recount independently from PatchLaw.step_choice (what training_loop.py draws at step data_nimg // batch).
    law = PatchLaw.from_options([4, 8, 16], None, 0.5, None)
    plan = pp.patch_run_for_pixels(law, seed=3, batch=8, target_pixels=200_000)
    draws = [law.step_choice(3, s) for s in range(plan["steps"])]
    pixels = [8 * m * p * p for p, m in draws]
    assert plan["pixels"] == sum(pixels) >= 200_000 > sum(pixels[:-1])  # the shortest run reaching the target
    assert plan["nimg"] == 8 * plan["steps"]
    assert plan["duration"] * 1e6 == pytest.approx(plan["nimg"], abs=1e-6)
    # Over many steps the realised count approaches the expected rule (law of large numbers, ~2% here).
    long = pp.patch_run_for_pixels(law, seed=0, batch=8, target_pixels=100 * 32**2 * 1000)
    assert long["nimg"] / 1000 == pytest.approx(pp.equal_compute_kimg(100, 32, law), rel=0.05)


def test_constant_pixel_plan_matches_the_whole_model_exactly():
    settings = dict(pp.DEFAULT)
    _, whole = pp.train_options(settings, "whole")
    options, patch = pp.train_options(settings, "patch")
    assert patch["pixels"] == whole["pixels"] and patch["steps"] == whole["steps"]
    assert patch["batch"] * max(patch["sizes"]) ** 2 == whole["batch"] * settings["resolution"] ** 2
    assert options[options.index("--patch-muls") + 1] == "16,4,1"
    assert options[options.index("--pad-width") + 1] == str(settings["resolution"] // 4)


@pytest.mark.slow
def test_quick_run_end_to_end(tmp_path):
    out = tmp_path / "pb"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "patch_priors.py"), "--out", str(out),
                           "--quick"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "results.json").read_text())
    rows = report["data_efficiency"]["rows"]
    assert {(r["task"], r["model"], r["n"]) for r in rows} == {(t, m, 16) for t in pp.TASKS for m in pp.MODELS}
    for task in pp.TASKS:
        whole, patch = (next(r for r in rows if r["task"] == task and r["model"] == m) for m in pp.MODELS)
        assert whole["pixels"] == patch["pixels"]  # equal training compute, counted from the draws
        assert patch["trained_kimg"] == pytest.approx(patch["kimg"], abs=1e-3)
        for r in (whole, patch):
            assert np.isfinite(r["psnr_mean"]) and np.isfinite(r["ssim_mean"]) and r["nfe_mean"] >= 1
    cost = report["training_cost"]["rows"]
    assert {r["model"] for r in cost} == {"whole", "PD 8/16/32"}  # PaDIS 2/4/8 is below the UNet divisor
    for r in cost:
        assert r["images_per_s"] > 0 and r["peak_mib"] >= 0
        assert r["pixels_per_s"] == pytest.approx(r["whole_image_equivalents_per_s"] * r["resolution"] ** 2)
    for name in report["plots"]:
        with PIL.Image.open(out / name) as img:
            assert img.size[0] > 100
    text = (out / "results.md").read_text()
    assert "(a) Training cost" in text and "(b) Data efficiency" in text and "zero-filled" in text
