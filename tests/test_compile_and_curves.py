"""--compile (train.py, generate.py, reconstruct.py) and the loss curves per sigma band (torch_utils/loss_curves.py,
the training loop's stats.jsonl and loss.png).

Fast: the band arithmetic on hand-made noise levels, the sigma recorder on every loss class, the plot of a synthetic
stats.jsonl (old lines without bands included), tiny training runs with gradient accumulation and with two ranks
(bands add up to the tick's loss, loss.png and the ETA appear), and the --compile wiring with torch.compile's graph
capture but no code generation (backend 'eager', so it runs in seconds). Slow: the real inductor backend (compiled D
equals plain D, and dropout masks repeat under the fork of the RNG that the SURE term relies on), a --compile training
run whose snapshot keys equal a plain run's and that continues without --compile, and generate.py and reconstruct.py
(msm, and dps through the compiled network's gradient) giving the same outputs with --compile.
"""

import glob
import json
import math
import os
import shutil

import numpy as np
import PIL.Image
import pytest
import torch

import train
from tests.helpers import make_phantoms, run_cli, run_in_process, train_in_process
from torch_utils.loss_curves import (
    band_names,
    band_stats,
    band_totals,
    loss_series,
    read_stats,
    write_loss_plot,
)
from torch_utils.plot import HEIGHT, PALETTE, WIDTH
from training import snapshot as checkpoint
from training.loss import AmbientLoss, ClassifierLoss, EDMLoss, MSMLoss, VELoss, VPLoss
from training.training_loop import SigmaRecorder, format_duration

# 8 images per step in two accumulation rounds of 4; a tick every 2 steps, a snapshot at every tick.
TINY = ["--arch", "ddpmpp", "--cbase", "8", "--cres", "1,2", "--blocks", "1", "--attn", "", "--batch", "8",
        "--batch-gpu", "4", "--lr", "2e-3", "--lr-rampup", "0.00002", "--ema", "0.00005", "--dropout", "0.1",
        "--tick", "0.016", "--snap", "1", "--dump", "1", "--workers", "0", "--seed", "3"]


# --compile checks for a C++ compiler up front (torch_utils/compiling.py); inductor needs one on a CPU.
needs_cxx = pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "clang++", "c++")),
                               reason="no C++ compiler for torch.compile on this machine")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_phantoms(str(tmp_path_factory.mktemp("data") / "ph.zip"), num=24, resolution=16)


def _train_in_process(outdir, data, images, capsys, extra=()):
    return train_in_process(outdir, data, images, capsys, [*TINY, *extra])


def _assert_bands_add_up(stats: list[dict], images_per_tick: list[int]):
    """Per tick: band counts sum to the examples trained on, and count-weighted band means to the tick's mean."""
    assert [sum(s["count_bands"].values()) for s in stats] == images_per_tick
    for s in stats:
        assert list(s["loss_bands"]) == band_names()
        weighted = sum(s["count_bands"][n] * s["loss_bands"][n] for n in s["loss_bands"] if s["count_bands"][n])
        assert weighted / sum(s["count_bands"].values()) == pytest.approx(s["loss"], rel=1e-9)
        assert all((s["loss_bands"][n] is None) == (s["count_bands"][n] == 0) for n in s["loss_bands"])


# ---- the band arithmetic ------------------------------------------------------------------------------------------


def test_band_totals_put_each_sigma_in_its_half_open_band():
    # Each edge belongs to the band above it: [0, 0.1), [0.1, 0.5), [0.5, 1), [1, 5), [5, inf).
    sigma = torch.tensor([0.002, 0.0999, 0.1, 0.3, 0.5, 0.999, 1.0, 4.99, 5.0, 80.0]).reshape(-1, 1, 1, 1)
    loss = torch.tensor([1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0])
    totals = band_totals(sigma, loss)
    assert totals.dtype == torch.float64 and totals.shape == (2, 5)
    assert totals[0].tolist() == [3.0, 12.0, 48.0, 192.0, 768.0]
    assert totals[1].tolist() == [2.0, 2.0, 2.0, 2.0, 2.0]
    stats = band_stats(totals)
    assert stats["loss_bands"] == {"sigma<0.1": 1.5, "0.1<=sigma<0.5": 6.0, "0.5<=sigma<1": 24.0,
                                   "1<=sigma<5": 96.0, "sigma>=5": 384.0}


def test_band_stats_leave_empty_bands_null_and_keep_the_total():
    sigma = torch.tensor([0.05, 0.06, 2.0])
    loss = torch.tensor([1.0, 3.0, 10.0])
    stats = band_stats(band_totals(sigma, loss))
    assert stats["count_bands"] == {"sigma<0.1": 2, "0.1<=sigma<0.5": 0, "0.5<=sigma<1": 0, "1<=sigma<5": 1,
                                    "sigma>=5": 0}
    assert stats["loss_bands"]["0.1<=sigma<0.5"] is None and stats["loss_bands"]["sigma<0.1"] == 2.0
    with pytest.raises(ValueError, match="3 noise levels for 2 losses"):
        band_totals(sigma, loss[:2])


def test_format_duration():
    assert [format_duration(s) for s in (0, 59.4, 61, 3600 * 5 + 120, 86400 * 2 + 3600 * 3 + 60 * 4)] == \
        ["0s", "59s", "1m 01s", "5h 02m", "2d 03h 04m"]


# ---- the sigma recorder on every loss --------------------------------------------------------------------------


class SigmaSeeingNet(torch.nn.Module):
    """D(x; sigma) = x[:, :out] / (1 + sigma) + a small convolution, remembering the sigma of every call."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.weight = torch.nn.Parameter(torch.randn(out_channels, in_channels, 3, 3,
                                                     generator=torch.Generator().manual_seed(0)) * 0.1)
        self.calls = []

    def forward(self, x, sigma, class_labels=None):
        sigma = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1, 1, 1, 1)
        self.calls.append(sigma.expand(x.shape[0], 1, 1, 1).clone())
        return x[:, : self.out_channels] / (1 + sigma) + torch.nn.functional.conv2d(x, self.weight, padding=1)


def _measured_batch(n=6, size=8, p=0.4):
    g = torch.Generator().manual_seed(1)
    clean = torch.rand(n, 1, size, size, generator=g) * 2 - 1
    mask = (torch.rand(n, 1, size, size, generator=g) >= p).float()
    return {"y": clean * mask, "mask": mask}


MEASUREMENT = {"operator": "identity", "mask": {"kind": "pixel", "p": 0.4}}


@pytest.mark.parametrize("make_loss, batch, in_channels", [
    (lambda: EDMLoss(), lambda: {"image": torch.randn(6, 1, 8, 8)}, 1),
    (lambda: VPLoss(), lambda: {"image": torch.randn(6, 1, 8, 8)}, 1),
    (lambda: VELoss(), lambda: {"image": torch.randn(6, 1, 8, 8)}, 1),
    (lambda: MSMLoss(MEASUREMENT), _measured_batch, 1),
    (lambda: MSMLoss({**MEASUREMENT, "sigma_y": 0.1}), _measured_batch, 1),  # SURE first calls the net at eta
    (lambda: MSMLoss(MEASUREMENT, sigma_dist="vp200", weighting="inverse-variance"), _measured_batch, 1),
    (lambda: AmbientLoss(MEASUREMENT), _measured_batch, 2),
], ids=["edm", "vp", "ve", "msm", "msm-sure", "msm-vp200", "ambient"])
def test_recorder_sees_the_sigma_each_loss_trains_at_without_changing_it(make_loss, batch, in_channels):
    batch = batch()
    plain_net, recorded_net = SigmaSeeingNet(in_channels, 1), SigmaSeeingNet(in_channels, 1)
    plain = make_loss()(plain_net, batch, torch.Generator().manual_seed(5))
    loss_fn = make_loss()
    recorder = SigmaRecorder(loss_fn)
    assert recorder.active
    loss = loss_fn(recorded_net, batch, torch.Generator().manual_seed(5))
    torch.testing.assert_close(loss, plain, rtol=0, atol=0)  # recording changes no draw and no value
    sigma = recorder.take()
    assert sigma.numel() == loss.shape[0]
    # The diffusion term's network call (the last one) saw exactly the recorded per-example sigma.
    torch.testing.assert_close(recorded_net.calls[-1].flatten(), sigma.flatten().float(), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="without drawing"):
        recorder.take()  # one draw is handed out once


def test_classifier_loss_has_no_bands():
    assert not SigmaRecorder(ClassifierLoss()).active


# ---- the plot of stats.jsonl ----------------------------------------------------------------------------------


def _synthetic_stats(path):
    names = band_names()
    lines = [{"kimg": 0.5, "tick": 0, "loss": 3.0}, {"kimg": 1.0, "tick": 1, "loss": 2.5}]  # a run from before bands
    for i, kimg in enumerate((1.5, 2.0, 2.5)):
        means = [0.2 / (i + 1), 0.5, 1.0, 2.0, None if i == 1 else 8.0]
        lines.append({"kimg": kimg, "tick": 2 + i, "loss": 1.0 + i, "loss_bands": dict(zip(names, means)),
                      "count_bands": {n: (0 if m is None else 4) for n, m in zip(names, means)}})
    with open(path, "w") as f:
        f.write("".join(json.dumps(line) + "\n" for line in lines) + '{"kimg": 3.0, "lo')  # a torn last line
    return lines


def test_loss_series_tolerate_old_lines_missing_bands_and_a_torn_line(tmp_path):
    path = tmp_path / "stats.jsonl"
    _synthetic_stats(path)
    records = read_stats(str(path))
    assert len(records) == 5
    series = loss_series(records)
    assert list(series) == ["total", *band_names()]
    assert series["total"] == [(0.5, 3.0), (1.0, 2.5), (1.5, 1.0), (2.0, 2.0), (2.5, 3.0)]
    assert series["sigma<0.1"] == [(1.5, 0.2), (2.0, 0.1), (2.5, 0.2 / 3)]
    assert series["sigma>=5"] == [(1.5, 8.0), (2.5, 8.0)]  # the tick without examples there has no point


def test_loss_plot_draws_the_total_and_every_band(tmp_path):
    path = tmp_path / "stats.jsonl"
    _synthetic_stats(path)
    axes = write_loss_plot(str(path))
    png = tmp_path / "loss.png"
    image = np.asarray(PIL.Image.open(png).convert("RGB"))
    assert image.shape == (HEIGHT, WIDTH, 3) and axes.y.log  # every value is positive: log y
    # Series colours follow the order total, then the bands by sigma; each curve's dot sits where its point maps.
    for colour, (kimg, value) in zip(PALETTE, [(0.5, 3.0), (1.5, 0.2), (2.0, 0.5), (2.0, 1.0), (2.5, 2.0),
                                               (1.5, 8.0)]):
        col, row = (round(v) for v in axes.pixel(kimg, value))
        assert tuple(image[row, col]) == colour, (kimg, value)


def test_loss_plot_goes_linear_for_non_positive_losses_and_skips_an_empty_file(tmp_path):
    path = tmp_path / "stats.jsonl"
    path.write_text(json.dumps({"kimg": 1.0, "tick": 0, "loss": -0.5}) + "\n"
                    + json.dumps({"kimg": 2.0, "tick": 1, "loss": 0.25}) + "\n")
    assert not write_loss_plot(str(path)).y.log
    path.write_text(json.dumps({"kimg": 1.0, "tick": 0, "loss": float("nan")}) + "\n")
    assert write_loss_plot(str(path), str(tmp_path / "none.png")) is None
    assert not os.path.exists(tmp_path / "none.png")


# ---- training runs -----------------------------------------------------------------------------------------------


def test_training_writes_bands_that_add_up_a_loss_plot_and_an_eta(tmp_path, data, capsys):
    run_dir = _train_in_process(tmp_path / "runs", data, 40, capsys)
    stats = read_stats(os.path.join(run_dir, "stats.jsonl"))
    # Ticks end at 8 (the first step), 24, 40 images; two accumulation rounds of 4 per step.
    assert [round(s["kimg"] * 1000) for s in stats] == [8, 24, 40]
    _assert_bands_add_up(stats, [8, 16, 16])
    assert os.path.isfile(os.path.join(run_dir, "loss.png"))
    log = open(os.path.join(run_dir, "log.txt")).read()
    ticks = [line for line in log.splitlines() if line.startswith("tick ")]
    assert len(ticks) == 3 and all(" eta " in line for line in ticks) and ticks[-1].endswith("eta 0s")
    assert stats[-1]["eta_sec"] == 0 and stats[0]["eta_sec"] > 0
    with open(os.path.join(run_dir, "training_options.json")) as f:
        assert json.load(f)["compile"] is False


@pytest.fixture
def eager_compile(monkeypatch):
    """torch.compile with the 'eager' backend: dynamo captures the graphs as with inductor (so wrapping, state_dict
    keys and resume are exercised), but no kernels are generated, which keeps the test in seconds. Returns the list
    of compiled modules."""
    compiled, real = [], torch.compile

    def compile_eagerly(model, **kwargs):
        compiled.append(model)
        return real(model, backend="eager")

    monkeypatch.setattr(torch, "compile", compile_eagerly)
    yield compiled
    torch._dynamo.reset()


@needs_cxx
def test_compile_keeps_plain_state_dicts_and_may_be_switched_off_on_resume(tmp_path, data, capsys, eager_compile):
    plain_dir = _train_in_process(tmp_path / "plain", data, 8, capsys)
    run_dir = _train_in_process(tmp_path / "compiled", data, 8, capsys, ["--compile"])
    assert len(eager_compile) == 1
    with open(os.path.join(run_dir, "training_options.json")) as f:
        assert json.load(f)["compile"] is True
    plain_state = checkpoint.load_training_state(checkpoint.latest_file(plain_dir, "training-state"))
    state = checkpoint.load_training_state(checkpoint.latest_file(run_dir, "training-state"))
    assert list(state["net"]) == list(plain_state["net"]) and list(state["ema"]) == list(plain_state["ema"])
    plain_net, _ = checkpoint.load_snapshot(checkpoint.latest_file(plain_dir, "network-snapshot"))
    net, _ = checkpoint.load_snapshot(checkpoint.latest_file(run_dir, "network-snapshot"))
    assert list(net.state_dict()) == list(plain_net.state_dict())
    assert not any("_orig_mod" in k for k in state["net"])
    # The same command without --compile continues the run (compile may differ on resume), and vice versa.
    _train_in_process(tmp_path / "compiled", data, 24, capsys)
    assert len(eager_compile) == 1
    _train_in_process(tmp_path / "compiled", data, 40, capsys, ["--compile"])
    assert len(eager_compile) == 2
    log = open(os.path.join(run_dir, "log.txt")).read()
    assert log.count("Resuming from") == 2
    assert [round(s["kimg"] * 1000) for s in read_stats(os.path.join(run_dir, "stats.jsonl"))] == [8, 24, 40]


def test_compile_without_a_cpp_compiler_is_refused_up_front(tmp_path, data, capsys, monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler-h15b")
    code, err = run_in_process(train.main, ["--outdir", tmp_path / "runs", "--data", data, "--duration", 8e-6,
                                            *TINY, "--compile", "--device", "cpu"], capsys)
    assert code != 0 and "--compile on a CPU needs a C++ compiler" in err
    assert not os.path.exists(tmp_path / "runs")


# ---- slow: the inductor backend, generate.py, two ranks --------------------------------------------------------


def _tiny_network(dropout):
    from training.networks import network_kwargs_for

    kwargs = network_kwargs_for(arch="ddpmpp", precond="edm", cbase=8, cres=[1, 2], dropout=dropout,
                                img_resolution=16, in_channels=1, out_channels=1, label_dim=0, num_blocks=1,
                                attn_resolutions=[])
    torch.manual_seed(0)
    net = checkpoint.build_network(kwargs)
    with torch.no_grad():  # EDM zero-initialises the convolutions after dropout; random weights make dropout show
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.2)
    return net


@needs_cxx
@pytest.mark.slow
def test_inductor_compiled_denoiser_equals_the_plain_one():
    from training.loss import _shared_dropout

    torch._dynamo.reset()
    net = _tiny_network(dropout=0.3)
    compiled = torch.compile(net)
    x = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.01, 0.3, 2.0, 40.0])
    with torch.no_grad():
        net.eval()
        torch.testing.assert_close(compiled(x, sigma), net(x, sigma), rtol=1e-4, atol=1e-5)
        # Train mode: the SURE term's two calls under _shared_dropout must draw the same dropout masks compiled too.
        net.train()
        with _shared_dropout(x.device):
            first = compiled(x, sigma)
        second = compiled(x, sigma)
        third = compiled(x, sigma)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    assert not torch.allclose(second, third)  # dropout is on: without the fork the masks differ
    torch._dynamo.reset()


@needs_cxx
@pytest.mark.slow
def test_inductor_training_run_generate_and_reconstruct_match_plain(tmp_path, data):
    def args(images):
        return ["train.py", "--data", data, "--duration", str(images / 1e6), *TINY]

    run_cli([*args(16), "--outdir", str(tmp_path / "plain")])
    proc = run_cli([*args(16), "--outdir", str(tmp_path / "compiled"), "--compile"])
    assert "Compiling the network with torch.compile" in proc.stdout
    (plain_dir,) = glob.glob(str(tmp_path / "plain" / "0*"))
    (run_dir,) = glob.glob(str(tmp_path / "compiled" / "0*"))
    snapshot = checkpoint.latest_file(run_dir, "network-snapshot")
    plain_keys = list(checkpoint.load_snapshot(checkpoint.latest_file(plain_dir, "network-snapshot"))[0].state_dict())
    assert list(checkpoint.load_snapshot(snapshot)[0].state_dict()) == plain_keys
    _assert_bands_add_up(read_stats(os.path.join(run_dir, "stats.jsonl")), [8, 8])
    # The compiled run continues without --compile.
    proc = run_cli([*args(32), "--outdir", str(tmp_path / "compiled")])
    assert "Resuming from" in proc.stdout

    # generate.py: the same images for the same seeds, compiled or not (EDM Heun, 4 steps).
    common = ["generate.py", "--network", snapshot, "--seeds", "0-3", "--steps", "4", "--batch", "4"]
    run_cli([*common, "--outdir", str(tmp_path / "gen-plain")])
    run_cli([*common, "--outdir", str(tmp_path / "gen-compiled"), "--compile"])
    for seed in range(4):
        a, b = (np.asarray(PIL.Image.open(tmp_path / d / f"{seed:06d}.png"), dtype=np.int16)
                for d in ("gen-plain", "gen-compiled"))
        assert np.abs(a - b).max() <= 1, seed  # float rounding may move a pixel across a quantisation step

    # reconstruct.py: msm and dps (which differentiates through the compiled network) give the same reconstructions.
    common = ["reconstruct.py", "--network", snapshot, "--data", data, "--task", "box", "--num", "1", "--steps", "3",
              "--dps-steps", "3", "--methods", "msm,dps"]
    run_cli([*common, "--outdir", str(tmp_path / "rec-plain")])
    run_cli([*common, "--outdir", str(tmp_path / "rec-compiled"), "--compile"])
    plain, compiled = (np.load(tmp_path / d / "reconstructions" / "00000-000000.npz")
                       for d in ("rec-plain", "rec-compiled"))
    for method in ("msm", "dps"):
        np.testing.assert_allclose(compiled[method], plain[method], rtol=0, atol=1e-3, err_msg=method)


def test_two_ranks_reduce_the_band_sums_like_the_total(tmp_path, data):
    run_cli(["train.py", "--outdir", str(tmp_path), "--data", data, "--duration", str(40 / 1e6), *TINY,
             "--batch-gpu", "2"], torchrun=2)
    (run_dir,) = glob.glob(str(tmp_path / "0*"))
    _assert_bands_add_up(read_stats(os.path.join(run_dir, "stats.jsonl")), [8, 16, 16])
    assert math.isfinite(read_stats(os.path.join(run_dir, "stats.jsonl"))[-1]["loss"])
