"""Every learned posterior method of the registry (training/sampling/methods.py METHODS), on reconstruct.py's own
measurements of Gaussian draws with the exact denoiser of their prior as an oracle network
(tests/test_reconstruct.py GaussianNetwork): the mean of its samples beats A^+ y (FBP for CT) on PSNR; the exact
samplers move it toward the closed-form posterior mean; the NFE it reports equals the network calls counted. A method
added to METHODS gets these checks by being there (its default options, at the budgets below)."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from tests.sampling.golden import CallTally, method_options
from tests.test_reconstruct import RES, GaussianNetwork, gaussian_records, normalised_maps, smooth_covariance
from training import evaluation, tasks
from training.masks import FullMask
from training.sampling import baselines, methods
from training.sampling.denoisers import CountingNetwork

LEARNED = [name for name, m in methods.METHODS.items() if m.run is not None and m.needs_model]
TASKS = ("box", "sr", "mri", "ct")
# Measured below A^+ y at these budgets with their default steps (PSNR of the 4-sample mean; A^+ y: sr 20.29): dps
# sr 17.55 and padis sr 20.12 at SR's tuned steps (0.08, 0.16; at the general steps 14.64 and 15.93). Those steps
# were chosen for ~1000 levels on phantoms; DPS's zeta is a step per level and this test runs 100 (at --dps-step 0.3:
# 23.29). Kept as strict xfails so that a fix shows. The cases that were below A^+ y before the step rules and tuned
# defaults (ald sr / ct, pc-jalal sr / ct, pc-dps box / sr / ct, padis box / ct) pass.
BELOW_CLASSICAL = {("dps", "sr"), ("padis", "sr")}


def case(name, task, known=()):
    marks = [pytest.mark.slow] if task in ("mri", "ct") else []  # the 4-coil MRI and CT cases take 5-20 s each
    if (name, task) in known:
        marks.append(pytest.mark.xfail(strict=True, reason="measured below A^+ y at this budget"))
    return pytest.param(name, task, marks=marks, id=f"{name}-{task}")


CASES = [(name, task) for name in LEARNED for task in TASKS if task in methods.METHODS[name].tasks]
NUM, SEEDS = 4, [0, 1, 2, 3]
# Generous budgets (the defaults are sized for networks at 256 px): NFE of 40-200 per sample.
BUDGET = dict(msm_steps=50, dps_steps=100, dds_steps=50,
              family={"levels": 40, "steps_each": 3, "sigma_max": 20.0, "dds_gamma": 100.0},
              padis=methods.PadisOptions(steps=20, inner_steps=5))
EXACT = ("ald", "pc-jalal", "pc-projection")  # samplers of the exact posterior (up to discretisation)


def problem(task: str):
    channels = 2 if task == "mri" else 1
    cov = smooth_covariance(channels)
    options = tasks.resolve_task_options(task, False, {}, RES)
    records = gaussian_records(cov, channels, NUM, normalised_maps() if task == "mri" else None)
    examples = [tasks.measure_example(r, options) for r in records]
    tally = CallTally()
    inner = CountingNetwork(GaussianNetwork(cov, channels))
    inner.bar = tally  # ticks once per forward call (the registry's own counter is run_method's progress bar)
    model = methods.Model(CountingNetwork(inner), kind="mri" if task == "mri" else "image", mask_law=FullMask(),
                          loss_config=None)
    return cov, options, examples, model, tally


def sample_means(name, run, examples):
    pairs = [e for e in examples for _ in SEEDS]
    images, _, _ = methods.run_method(name, run, pairs, SEEDS * len(examples), "test")
    return images.to(torch.float64).reshape(len(examples), len(SEEDS), *images.shape[1:]).mean(dim=1)


def psnr(task, examples, images) -> float:
    return float(np.mean([evaluation.metric_rows(evaluation.display_images(e.reference, task),
                                                 evaluation.display_images(images[j : j + 1].float(), task),
                                                 task)["psnr"] for j, e in enumerate(examples)]))


@pytest.fixture(scope="module")
def results():
    """Each case run once: (PSNR of the sample mean, PSNR of A^+ y, sample means, reported NFE, counted calls)."""
    cache = {}

    def get(name, task):
        if (name, task) not in cache:
            cov, options, examples, model, tally = problem(task)
            run = methods.Run(model, options, method_options(task, **BUDGET), torch.device("cpu"))
            reported = methods.METHODS[name].network_calls(run)
            means = sample_means(name, run, examples)
            counted = tally.calls
            baseline = sample_means("fbp" if task == "ct" else "zero-filled", run, examples)
            cache[(name, task)] = (psnr(task, examples, means), psnr(task, examples, baseline), means, reported,
                                   counted, cov, examples, options)
        return cache[(name, task)]

    return get


@pytest.mark.parametrize("name,task", [case(n, t, BELOW_CLASSICAL) for n, t in CASES])
def test_beats_the_classical_estimate(name, task, results):
    learned, classical = results(name, task)[:2]
    assert learned > classical + 1.0, f"{name} on {task}: {learned:.2f} dB, A^+ y {classical:.2f} dB"


@pytest.mark.parametrize("name,task", [case(n, t) for n, t in CASES])
def test_reported_nfe_is_counted(name, task, results):
    reported, counted = results(name, task)[3:5]
    assert counted == reported, f"{name} on {task}: reports {reported} network calls, {counted} counted"


def posterior_mean(cov, example, options):
    """E[x | y] = C A^T (A C A^T + sigma_y^2 I)^-1 y for the image tasks (the operator as a dense matrix)."""
    operator = tasks.task_operator(options, RES, example.mask, example.maps)
    basis = torch.eye(RES * RES, dtype=torch.float64).reshape(-1, 1, RES, RES)
    a = operator.A(basis).reshape(RES * RES, -1).T
    y = example.y.to(torch.float64).flatten()
    gram = a @ cov @ a.T + float(example.sigma_y) ** 2 * torch.eye(len(y), dtype=torch.float64)
    return (cov @ a.T @ torch.linalg.solve(gram, y)).reshape(1, 1, RES, RES)


@pytest.mark.parametrize("name", [n for n in EXACT if n in LEARNED])
def test_exact_samplers_approach_the_posterior_mean(name, results):
    # Box inpainting: the observed pixels pin most of the posterior, so 4 samples resolve its mean (on SR x4 the
    # posterior variance is most of the prior's and a 4-sample mean is no nearer to it than A^+ y).
    task = "box"
    _, _, means, _, _, cov, examples, options = results(name, task)
    exact = torch.cat([posterior_mean(cov, e, options) for e in examples])
    classical = torch.cat([baselines.first_estimate(task, tasks.task_operator(options, RES, e.mask, e.maps), e.y)
                           for e in examples]).to(torch.float64)
    error, before = (means - exact).norm() / exact.norm(), (classical - exact).norm() / exact.norm()
    # measured at the general steps (0.8): ald 0.247, pc-jalal 0.336, pc-projection 0.281 of the norm, A^+ y 0.445.
    assert error < 0.8 * before, f"{name} on {task}: {error:.3f} of the posterior mean's norm away (A^+ y {before:.3f})"


def test_budget_options_are_those_of_the_registry():
    # the budgets above name options the registry has (a renamed option would silently fall back to a default)
    replace(method_options("box"), **{k: v for k, v in BUDGET.items() if k != "family"})
