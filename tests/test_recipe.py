"""The training-recipe options: learning-rate schedules (training/lr_schedules.py, train.py --lr-schedule) and EDM2's
power-function EMA (training/power_ema.py, train.py --ema-profiles, posthoc_ema.py): schedule values at given
positions, the EMA recursion against its closed-form weights, sigma_rel against the standard deviation of those
weights, post-hoc reconstruction against profiles tracked directly, exact resume with the new state, and bad input."""

import glob
import math
import os
import shutil

import numpy as np
import pytest
import torch

import generate
import posthoc_ema
import train
from tests.helpers import assert_refused_leaving_nothing, make_phantoms, run_cli, run_in_process
from training import snapshot as checkpoint
from training.lr_schedules import learning_rate
from training.power_ema import SIGMA_REL_MAX, PowerEMA, fit, gamma_of, sigma_rel_of, weights

BASE = 2e-3


# ---------------------------------------------------------------------------------------------------------------------
# Learning-rate schedules.

def test_constant_schedule_is_edms_expression_bit_for_bit():
    for rampup_kimg in (0, 0.02, 10_000):
        for nimg in (0, 8, 16, 17, 512, 10**6, 10**7, 3 * 10**7):
            expected = BASE * min(nimg / max(rampup_kimg * 1000, 1e-8), 1)  # the loop's expression before schedules
            assert learning_rate(nimg, BASE, rampup_kimg, 200_000) == expected
            assert learning_rate(nimg, BASE, rampup_kimg, 200_000, None) == expected


@pytest.mark.parametrize("schedule", [None, {"kind": "isqrt", "ref_kimg": 50}, {"kind": "cosine", "final": 0.1}])
def test_every_schedule_ramps_up_linearly(schedule):
    # Ramp-up 10 kimg, isqrt reference 50 kimg, duration 100 kimg: during the ramp only the ramp factor acts.
    for nimg, factor in ((0, 0), (2500, 0.25), (5000, 0.5), (10_000, 1)):
        assert learning_rate(nimg, BASE, 10, 100, schedule) == pytest.approx(BASE * factor, rel=1e-12)


def test_isqrt_is_flat_before_its_reference_then_falls_as_one_over_sqrt():
    schedule = {"kind": "isqrt", "ref_kimg": 50}
    for nimg in (10_000, 30_000, 50_000):
        assert learning_rate(nimg, BASE, 10, 1000, schedule) == BASE
    for ratio in (1.5, 4, 16, 100):
        assert learning_rate(int(50_000 * ratio), BASE, 10, 1000, schedule) == pytest.approx(BASE / math.sqrt(ratio),
                                                                                             rel=1e-12)
    # The ramp multiplies the decay when the reference lies inside the ramp-up.
    assert learning_rate(8000, BASE, 10, 1000, {"kind": "isqrt", "ref_kimg": 2}) == pytest.approx(
        BASE * 0.8 / 2, rel=1e-12)


@pytest.mark.parametrize("final", [0.0, 0.1])
def test_cosine_runs_from_the_base_rate_after_the_rampup_to_the_final_fraction_at_the_duration(final):
    schedule = {"kind": "cosine", "final": final}
    rampup_kimg, total_kimg = 10, 110  # the half cosine spans 10 .. 110 kimg
    at = lambda kimg: learning_rate(int(kimg * 1000), BASE, rampup_kimg, total_kimg, schedule)
    assert at(10) == pytest.approx(BASE, rel=1e-12)
    assert at(35) == pytest.approx(BASE * (final + (1 - final) * (1 + math.cos(math.pi / 4)) / 2), rel=1e-12)
    assert at(60) == pytest.approx(BASE * (1 + final) / 2, rel=1e-12)
    assert at(110) == pytest.approx(BASE * final, abs=1e-18)
    assert at(200) == pytest.approx(BASE * final, abs=1e-18)  # a run continued past its duration stays there
    rates = [at(k) for k in range(10, 111)]
    assert all(a >= b for a, b in zip(rates, rates[1:]))


# ---------------------------------------------------------------------------------------------------------------------
# Power-function EMA.

def test_gamma_of_inverts_sigma_rel_of():
    for sigma_rel in (1e-4, 0.01, 0.05, 0.1, 0.2, 0.2887, 0.3, SIGMA_REL_MAX * (1 - 1e-9)):
        assert sigma_rel_of(gamma_of(sigma_rel)) == pytest.approx(sigma_rel, rel=1e-12)
    for gamma in (-0.38, 0.0, 1.0, 6.94, 16.97, 100.0, 1e4):
        assert gamma_of(sigma_rel_of(gamma)) == pytest.approx(gamma, rel=1e-9)
    # EDM2's pairs (section 3): sigma_rel 0.05 and 0.10 are gamma 16.97 and 6.94.
    assert (round(gamma_of(0.05), 2), round(gamma_of(0.10), 2)) == (16.97, 6.94)


@pytest.mark.parametrize("sigma_rel", [0.05, 0.1, 0.25])
def test_sigma_rel_is_the_relative_std_of_the_discrete_weights(sigma_rel):
    """Independent of the formula: the weights that the EMA recursion gives the steps, seen as a distribution over
    i / t, have standard deviation sigma_rel (up to the discretisation, O(1/t))."""
    t = 100_000
    i = np.arange(1, t + 1)
    w = weights(gamma_of(sigma_rel), t, i)
    assert w.sum() == pytest.approx(1, abs=1e-12)
    mean = (w * i / t).sum()
    std = math.sqrt((w * (i / t - mean) ** 2).sum())
    assert std == pytest.approx(sigma_rel, rel=1e-3)


class Toy(torch.nn.Module):
    def __init__(self, dtype):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(3, 4, dtype=dtype))
        self.bias = torch.nn.Parameter(torch.zeros(5, dtype=dtype))


def trajectory(steps: int, seed: int = 0) -> torch.Tensor:
    """A toy parameter history theta_1..theta_T (T x 17): a drifting random walk, like weights under SGD."""
    g = torch.Generator().manual_seed(seed)
    drift = torch.linspace(0, 1, steps, dtype=torch.float64)[:, None] * torch.randn(1, 17, generator=g,
                                                                                   dtype=torch.float64)
    return drift + 0.05 * torch.randn(steps, 17, generator=g, dtype=torch.float64).cumsum(0) / math.sqrt(steps)


def set_params(net: Toy, theta: torch.Tensor):
    with torch.no_grad():
        net.weight.copy_(theta[:12].view(3, 4))
        net.bias.copy_(theta[12:])


def flat(state: dict) -> torch.Tensor:
    return torch.cat([state["weight"].flatten(), state["bias"]]).double()


def track(history: torch.Tensor, sigma_rels, every: int, dtype=torch.float64):
    """Run the tracker over the history; snapshots [(sigma_rel, step, flat weights)] every `every` steps."""
    net = Toy(dtype)
    profiles = PowerEMA(net, sigma_rels)
    snapshots = []
    for t, theta in enumerate(history, start=1):
        set_params(net, theta)
        profiles.update(net, t)
        if t % every == 0:
            snapshots += [(s, t, flat(state)) for s, state in zip(sigma_rels, profiles.state_dicts())]
    return snapshots


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_tracked_power_ema_is_the_closed_form_weighted_average_of_the_history(dtype):
    history = trajectory(300)
    for sigma_rel, t, ema in track(history.to(dtype).double(), [0.05, 0.15], every=50, dtype=dtype):
        w = torch.from_numpy(weights(gamma_of(sigma_rel), t, np.arange(1, t + 1)))
        torch.testing.assert_close(ema, w @ history[:t].to(dtype).double(), rtol=0, atol=1e-6)


def combine(snapshots, x):
    return sum(float(c) * ema for c, (_, _, ema) in zip(x, snapshots))


def test_posthoc_reconstruction_reproduces_a_tracked_profile_and_interpolates_others():
    history, every = trajectory(400), 25
    snapshots = track(history, [0.05, 0.10, 0.15], every)
    direct = {s: ema for s, t, ema in snapshots if t == 400}
    # A profile that was tracked: reproduced from all 48 snapshots (16 positions x 3 profiles) to 1e-6.
    stored = [(gamma_of(s), t) for s, t, _ in snapshots]
    x, error = fit(stored, (gamma_of(0.10), 400))
    assert error < 1e-6
    torch.testing.assert_close(combine(snapshots, x), direct[0.10], rtol=0, atol=1e-6)
    # The same profile from the other two only: close (measured: fit error 5.6e-3 of the weights' norm, parameters
    # within 1.0e-4 of the tracked ones, which lie up to 0.26 from the last weights).
    others = [snap for snap in snapshots if snap[0] != 0.10]
    x, error = fit([(gamma_of(s), t) for s, t, _ in others], (gamma_of(0.10), 400))
    assert error < 1e-2
    deviation = (combine(others, x) - direct[0.10]).abs().max()
    assert deviation < 1e-3 and deviation < 0.02 * (direct[0.10] - history[-1]).abs().max()


# ---------------------------------------------------------------------------------------------------------------------
# Through train.py and posthoc_ema.py.

# 16 steps of batch 8 = 128 images; a tick every 2 steps; a state at every tick, a snapshot every other tick.
TINY = ["--arch", "ddpmpp", "--cbase", "8", "--cres", "1,2", "--blocks", "1", "--attn", "", "--batch", "8",
        "--lr", "2e-3", "--lr-rampup", "0.00002", "--ema", "0.00005", "--dropout", "0.1", "--tick", "0.016",
        "--snap", "2", "--dump", "1", "--workers", "0", "--seed", "7",
        "--lr-schedule", "cosine", "--lr-final", "0.1", "--ema-profiles", "0.05,0.1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_phantoms(str(tmp_path_factory.mktemp("data") / "ph.zip"), num=24, resolution=16)


def train_run(outdir, data, duration_images):
    return run_cli(["train.py", "--outdir", str(outdir), "--data", data, "--duration", str(duration_images / 1e6),
                    *TINY])


def only_run(outdir) -> str:
    (run_dir,) = glob.glob(os.path.join(str(outdir), "0*"))
    return run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data):
    """One uninterrupted run of 128 images, and a copy of it as a run killed at 64 images would leave it (no later
    states, snapshots or profile snapshots), continued by the same command. (A run first trained to
    64 images with --duration 0.000064 would not do: its cosine ends there.)"""
    root = tmp_path_factory.mktemp("runs")
    train_run(root / "full", data, 128)
    shutil.copytree(root / "full", root / "killed")
    killed_dir = only_run(root / "killed")
    for path in glob.glob(os.path.join(killed_dir, "*.pt")):
        prefix = os.path.basename(path).rsplit("-", 1)[0]
        if checkpoint.progress_of(path, prefix) > 64:
            os.remove(path)
    resumed = train_run(root / "killed", data, 128)
    return only_run(root / "full"), killed_dir, resumed.stdout


def test_resume_with_schedule_and_profiles_is_exact(runs):
    full_dir, split_dir, resumed = runs
    assert "Resuming from" in resumed and "at 0.056 kimg" in resumed  # the last state before 64 images
    full = checkpoint.load_training_state(checkpoint.latest_file(full_dir, "training-state"))
    split = checkpoint.load_training_state(checkpoint.latest_file(split_dir, "training-state"))
    assert full["progress"]["cur_nimg"] == split["progress"]["cur_nimg"] == 128
    for key in ("net", "ema"):
        for name in full[key]:
            torch.testing.assert_close(split[key][name], full[key][name], rtol=1e-5, atol=1e-6)
    assert len(full["ema_profiles"]) == len(split["ema_profiles"]) == 2
    for a, b in zip(full["ema_profiles"], split["ema_profiles"]):
        for name in a:
            torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6)
    # The profile snapshots written after the resume match the uninterrupted run's, and say what they hold.
    names = sorted(os.path.basename(p) for p in glob.glob(os.path.join(full_dir, "power-ema-*.pt")))
    assert names == sorted(os.path.basename(p) for p in glob.glob(os.path.join(split_dir, "power-ema-*.pt")))
    assert "power-ema-0.1-000000.128.pt" in names and len(names) == 10  # 5 snapshot ticks x 2 profiles
    a, config = checkpoint.load_power_ema(os.path.join(full_dir, "power-ema-0.1-000000.128.pt"))
    b, _ = checkpoint.load_power_ema(os.path.join(split_dir, "power-ema-0.1-000000.128.pt"))
    assert config["power_ema"] == {"sigma_rel": 0.1, "step": 16, "nimg": 128}
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6)


def test_a_state_whose_profiles_do_not_fit_the_run_is_refused(runs, tmp_path):
    import json

    from dnnlib import UserError

    full_dir, _, _ = runs
    path = checkpoint.latest_file(full_dir, "training-state")
    state = torch.load(path, weights_only=True)
    with open(os.path.join(full_dir, "training_options.json")) as f:
        options = json.load(f)
    with pytest.raises(UserError, match=r"holds 2 power-function EMA profile\(s\), but the run tracks 0"):
        checkpoint.load_training_state(path, {k: v for k, v in options.items() if k != "ema_profiles"})
    first = state["ema_profiles"][0]
    name = next(iter(first))
    cases = [("not a list", "its ema_profiles is not a list of at most 16 state dicts"),
             ([{**first, "extra": torch.zeros(1)}, first], r"\(ema_profiles\[0\]\) does not fit the network"),
             ([first, {**first, name: torch.full_like(first[name], math.nan)}],
              r"\(ema_profiles\[1\]\) holds NaN or Inf values")]
    for i, (profiles, words) in enumerate(cases):
        crafted = tmp_path / f"case{i}" / os.path.basename(path)
        crafted.parent.mkdir()
        torch.save({**state, "ema_profiles": profiles}, crafted)
        with pytest.raises(UserError, match=words):
            checkpoint.load_training_state(str(crafted), options)


def test_the_loop_uses_the_schedule_and_logs_its_rate(runs):
    import json

    full_dir, split_dir, _ = runs
    with open(os.path.join(full_dir, "training_options.json")) as f:
        options = json.load(f)
    assert options["lr_schedule"] == {"kind": "cosine", "final": 0.1} and options["ema_profiles"] == [0.05, 0.1]
    for run_dir in (full_dir, split_dir):
        with open(os.path.join(run_dir, "stats.jsonl")) as f:
            stats = [json.loads(line) for line in f]
        # 'lr' is the rate of the tick's last step, taken at (position after the tick) - one batch.
        expected = [learning_rate(round(s["kimg"] * 1000) - 8, 2e-3, options["lr_rampup_kimg"],
                                  options["total_kimg"], options["lr_schedule"]) for s in stats]
        assert [s["lr"] for s in stats] == pytest.approx(expected, rel=1e-12)
        assert stats[-1]["lr"] < 0.3 * 2e-3  # decayed


def test_posthoc_ema_reproduces_a_tracked_profile_and_writes_ordinary_snapshots(runs, tmp_path, capsys):
    full_dir, _, _ = runs
    outdir = tmp_path / "phema"
    code, err = run_in_process(posthoc_ema.main, ["--run", full_dir, "--sigma-rel", "0.1,0.07",
                                                  "--outdir", outdir], capsys)
    assert code == 0, err
    tracked, _ = checkpoint.load_power_ema(os.path.join(full_dir, "power-ema-0.1-000000.128.pt"))
    net, config = checkpoint.load_snapshot(str(outdir / "posthoc-ema-0.1-000000.128.pt"))
    for name, value in net.state_dict().items():
        torch.testing.assert_close(value, tracked[name], rtol=0, atol=1e-6)
    assert config["source"]["kind"] == "post-hoc EMA" and config["source"]["snapshots"] == 10
    assert "power_ema" not in config
    # An intermediate length lies between the two stored ones; --kimg picks an earlier position.
    net, config = checkpoint.load_snapshot(str(outdir / "posthoc-ema-0.07-000000.128.pt"))
    assert 0 < config["source"]["fit_error"] < 0.1
    code, err = run_in_process(posthoc_ema.main, ["--run", full_dir, "--sigma-rel", "0.05", "--kimg", "0.1",
                                                  "--outdir", outdir], capsys)
    assert code == 0, err
    tracked, _ = checkpoint.load_power_ema(os.path.join(full_dir, "power-ema-0.05-000000.072.pt"))
    net, config = checkpoint.load_snapshot(str(outdir / "posthoc-ema-0.05-000000.072.pt"))
    assert config["source"]["snapshots"] == 6 and config["source"]["step"] == 9
    for name, value in net.state_dict().items():
        torch.testing.assert_close(value, tracked[name], rtol=0, atol=1e-6)
    # generate.py takes the written snapshot as it takes any other.
    code, err = run_in_process(generate.main, ["--network", outdir / "posthoc-ema-0.07-000000.128.pt", "--outdir",
                                               tmp_path / "images", "--seeds", "0-1", "--steps", "2", "--device",
                                               "cpu"], capsys)
    assert code == 0, err
    assert len(glob.glob(str(tmp_path / "images" / "*.png"))) == 2


# ---------------------------------------------------------------------------------------------------------------------
# The training noise levels (train.py --p-mean / --p-std).

def build(data, tmp_path, args):
    from dnnlib import EasyDict

    argv = [str(a) for a in ["--outdir", tmp_path / "runs", "--data", data, "--batch", 4, *args]]
    return train.build_options(EasyDict(train.main.make_context("train.py", argv).params), 1)


@pytest.mark.parametrize("loss", [[], ["--loss", "msm"], ["--loss", "ambient"]])
def test_p_mean_and_p_std_set_the_drawn_noise_levels_and_the_samplers_start(data, tmp_path, loss):
    """The losses draw ln sigma ~ N(P_mean, P_std^2) as given (moments of 20000 draws, 4 standard errors), the
    snapshot's loss config carries them to the samplers' starting level (the 1 - 1e-6 quantile), and nothing is
    recorded when they are not given (runs started before the options continue)."""
    from training.schedules import training_sigma_max
    from training.training_loop import LOSSES
    from training.training_loop import build as build_object

    c = build(data, tmp_path, [*loss, "--p-mean", "-0.5", "--p-std", "0.6"])
    assert (c.loss_kwargs["P_mean"], c.loss_kwargs["P_std"]) == (-0.5, 0.6)
    log_sigma = build_object(c.loss_kwargs, LOSSES).sample_sigma(20000, torch.Generator().manual_seed(0), "cpu").log()
    assert abs(log_sigma.mean().item() + 0.5) < 4 * 0.6 / math.sqrt(20000)
    assert abs(log_sigma.std().item() - 0.6) < 4 * 0.6 / math.sqrt(2 * 20000)
    assert training_sigma_max(c.loss_kwargs)[0] == pytest.approx(math.exp(-0.5 + 4.753 * 0.6))
    default = build(data, tmp_path, loss).loss_kwargs
    assert "P_mean" not in default and "P_std" not in default
    assert training_sigma_max(default)[0] == 80.0


# ---------------------------------------------------------------------------------------------------------------------
# Bad input: one sentence, exit 1, nothing written.

TRAIN_BAD = ["--arch", "ddpmpp", "--cbase", "4", "--cres", "1,2", "--blocks", "1", "--attn", "", "--batch", "2",
             "--duration", "0.0001", "--workers", "0", "--device", "cpu"]


@pytest.mark.parametrize("args, words", [
    (["--lr-schedule", "linear"], ["--lr-schedule 'linear' is not one of constant, isqrt, cosine"]),
    (["--lr-schedule", "cosine", "--lr-final", "1.5", "--lr-rampup", "0"], ["--lr-final 1.5", "[0, 1]"]),
    (["--lr-schedule", "cosine", "--lr-final", "-0.1", "--lr-rampup", "0"], ["--lr-final -0.1", "[0, 1]"]),
    (["--lr-final", "0.1"], ["--lr-final", "does not apply to constant"]),
    (["--lr-schedule", "cosine", "--lr-ref", "1", "--lr-rampup", "0"], ["--lr-ref", "does not apply to cosine"]),
    (["--lr-schedule", "cosine"], ["--lr-rampup 10 Mimg is not shorter than --duration 0.0001 Mimg"]),
    (["--ema-profiles", "0.4"], ["--ema-profiles", "0.4", "(0, 0.3003)"]),
    (["--ema-profiles", "0,0.1"], ["--ema-profiles", "0.0", "(0, 0.3003)"]),
    (["--ema-profiles", "0.05,0.05"], ["--ema-profiles 0.05,0.05 names a relative EMA length twice"]),
    (["--ema-profiles", "short"], ["--ema-profiles must be a comma list", "'short'"]),
    (["--p-std", "0"], ["--p-std must be in (0, 20], got 0"]),
    (["--p-std", "nan"], ["--p-std must be in (0, 20], got nan"]),
    (["--p-mean", "-inf"], ["--p-mean must be in [-20, 20]", "got -inf"]),
    (["--precond", "vp", "--p-mean", "0"], ["--p-mean / --p-std", "--precond vp", "use --precond edm"]),
    (["--loss", "msm", "--sigma-dist", "vp200", "--p-std", "1"], ["--p-mean / --p-std", "--sigma-dist vp200"]),
])
def test_bad_training_options_are_refused(data, tmp_path, capsys, args, words):
    outdir = tmp_path / "runs"
    assert_refused_leaving_nothing(train.main, ["--outdir", outdir, "--data", data, *TRAIN_BAD, *args], words, capsys,
                                   [tmp_path])


def test_bad_posthoc_input_is_refused(runs, tmp_path, capsys):
    full_dir, _, _ = runs
    plain_dir = tmp_path / "plain"  # a run folder with network snapshots only (trained without --ema-profiles)
    plain_dir.mkdir()
    shutil.copy(checkpoint.latest_file(full_dir, "network-snapshot"), plain_dir)
    out = tmp_path / "out"
    cases = [
        (["--run", plain_dir, "--sigma-rel", "0.1"], ["holds no power-ema-*.pt snapshots", "--ema-profiles"]),
        (["--run", tmp_path / "missing", "--sigma-rel", "0.1"], ["--run", "is not a directory"]),
        (["--run", full_dir, "--sigma-rel", "0.31"], ["--sigma-rel", "0.31", "(0, 0.3003)"]),
        (["--run", full_dir, "--sigma-rel", "0.1", "--kimg", "0.004"], ["--kimg 0.004", "first is at 0.008 kimg"]),
    ]
    for args, words in cases:
        assert_refused_leaving_nothing(posthoc_ema.main, [*args, "--outdir", out], words, capsys, [tmp_path, full_dir])
