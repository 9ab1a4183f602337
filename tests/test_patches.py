"""Patch priors (training/patches.py): coordinates, the stitched whole-image network against closed forms, the
patch-size law and kimg accounting, patch training end to end (resume after kill -9, generate.py, reconstruct.py,
an MSM-trained patch prior) and bad input."""

import glob
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import generate
import reconstruct
import train
from dnnlib import ConfigError, UserError
from tests.helpers import HANG_GUARD_S, REPO, file_tree, make_phantoms, run_cli, run_in_process, train_in_process
from tests.sampling.conftest import edm_generate
from torch_utils.misc import SeedGenerators
from training import snapshot as checkpoint
from training.loss import EDMLoss
from training.networks import EDMPrecond
from training.patches import CanvasGeometry, PatchLaw, StitchedNetwork, crop_batch, tile_grid
from training.sampling.denoisers import net_denoiser

# 16 px phantoms padded by 4 (canvas 24); patches 4, 8, 16 with 4, 2, 1 crops per image.
BASE = ["--arch", "ddpmpp", "--cbase", "8", "--cres", "1,2", "--blocks", "1", "--attn", "", "--batch", "8",
        "--lr", "2e-3", "--lr-rampup", "0.00002", "--ema", "0.00005", "--dropout", "0.1", "--tick", "0.016",
        "--snap", "2", "--dump", "1", "--workers", "0", "--seed", "7"]
TINY = [*BASE, "--patch-sizes", "4,8,16", "--pad-width", "4", "--patch-muls", "4,2,1"]


# ----------------------------------------------------------------------------------------------------------------------
# Coordinates.


@pytest.mark.parametrize("encoding", ["xy", "fourier:2"])
def test_a_crop_of_the_canvas_map_equals_the_training_coordinates_of_that_crop(encoding):
    g = CanvasGeometry(12, 3, encoding)
    full = g.coordinate_map()
    assert full.shape == (1, g.position_channels, 18, 18)
    for size in (1, 4, 7, 18):
        for top in range(0, 18 - size + 1, 3):
            for left in range(0, 18 - size + 1, 2):
                crop = g.crop_coordinates(torch.tensor([top]), torch.tensor([left]), size)
                torch.testing.assert_close(crop, full[:, :, top : top + size, left : left + size], rtol=0, atol=1e-6)
    # Corners are +-1; channel 0 is the column, channel 1 the row.
    assert full[0, 0, 5, 0] == -1 and full[0, 0, 5, -1] == 1 and full[0, 1, 0, 5] == -1 and full[0, 1, -1, 5] == 1
    torch.testing.assert_close(full[0, 0, 0, 1].double(), torch.tensor(2 / 17 - 1, dtype=torch.float64), atol=1e-7,
                               rtol=0)


def test_crop_batch_crops_images_and_masks_where_their_coordinates_say():
    g = CanvasGeometry(8, 2, pad_value=-1.0)
    gen = torch.Generator().manual_seed(0)
    y = torch.randn(3, 2, 8, 8)
    mask = (torch.rand(3, 1, 8, 8) > 0.5).float()
    out, positions = crop_batch({"y": y, "mask": mask, "label": torch.eye(3)}, g, 5, 2, gen)
    assert out["y"].shape == (6, 2, 5, 5) and out["mask"].shape == (6, 1, 5, 5) and positions.shape == (6, 2, 5, 5)
    canvas_y, canvas_mask = g.pad(y), g.pad(mask, 1.0)
    for r in range(6):
        left = round(((positions[r, 0, 0, 0].item() + 1) / 2) * (g.canvas - 1))  # invert X = (j / (N-1) - 1/2) 2
        top = round(((positions[r, 1, 0, 0].item() + 1) / 2) * (g.canvas - 1))
        assert torch.equal(out["y"][r], canvas_y[r % 3, :, top : top + 5, left : left + 5])
        assert torch.equal(out["mask"][r], canvas_mask[r % 3, :, top : top + 5, left : left + 5])
        assert torch.equal(out["label"][r], torch.eye(3)[r % 3])


def test_positions_enter_the_network_after_c_in_unscaled():
    net = EDMPrecond(8, 1, position_channels=2, model_channels=8, channel_mult=[1], num_blocks=1, attn_resolutions=[])
    seen = {}
    model_forward = net.model.forward
    net.model.forward = lambda x, *a, **k: (seen.setdefault("x", x), model_forward(x, *a, **k))[1]
    x, positions = torch.randn(2, 1, 8, 8), torch.randn(2, 2, 8, 8)
    net(x, 3.0, positions=positions)
    c_in = 1 / math.sqrt(3.0**2 + 0.5**2)
    torch.testing.assert_close(seen["x"], torch.cat([c_in * x, positions], dim=1))
    with pytest.raises(ValueError, match="positions of shape"):
        net(x, 3.0)


def test_a_canvas_mismatch_is_refused():
    trained = CanvasGeometry(16, 4)
    with pytest.raises(UserError, match="canvas geometry"):
        trained.check_same(CanvasGeometry(16, 2), "--transfer x.pt")
    stitched = StitchedNetwork(_PixelwiseNet(1), trained, 8)
    stitched.use_seeds([0])
    with pytest.raises(ValueError, match="denoises 16 x 16 images"):
        stitched(torch.zeros(1, 1, 20, 20), 1.0)
    config = {"network": {"class_name": "training.networks.EDMPrecond",
                          "kwargs": {"img_resolution": 16, "in_channels": 1, "position_channels": 2}},
              "dataset": {"kind": "image", "image_shape": [1, 16, 16]},
              "patches": {"image_size": 16, "pad_width": 4, "encoding": "fourier:1", "pad_value": -1.0,
                          "sizes": [8, 16], "probs": [0.5, 0.5], "muls": [1, 1]}}
    with pytest.raises(ConfigError, match="position_channels must be 6"):
        checkpoint.check_snapshot_config(config)
    config["patches"].update(encoding="xy", image_size=32)
    with pytest.raises(ConfigError, match="image size 16"):
        checkpoint.check_snapshot_config(config)
    del config["patches"]
    with pytest.raises(ConfigError, match="patches is missing"):
        checkpoint.check_snapshot_config(config)


# ----------------------------------------------------------------------------------------------------------------------
# The stitched network against closed forms.


class _PixelwiseNet:
    """A 'network' whose output at a pixel depends only on that pixel's value(s), its coordinates and sigma."""

    def __init__(self, out_channels, extra_channels=0, label_dim=0):
        self.in_channels, self.out_channels, self.label_dim = out_channels + extra_channels, out_channels, label_dim
        self.sigma_min, self.sigma_max, self.calls = 0.0, math.inf, []

    def function(self, x, sigma, X, Y):
        image, extra = x[:, : self.out_channels], x[:, self.out_channels :]
        out = image * (1 + 0.3 * X) / (1 + sigma**2) + 0.2 * Y - 0.1 * X * Y
        return out + extra.sum(dim=1, keepdim=True) * 0.5

    def __call__(self, x, sigma, class_labels=None, positions=None):
        self.calls.append(len(x))
        sigma = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1, 1, 1, 1)
        return self.function(x, sigma, positions[:, :1], positions[:, 1:2])


def _image_coordinates(g: CanvasGeometry):
    """X, Y (1, 1, W, W) of the image's pixels on the canvas, written out independently of training/patches.py."""
    index = torch.arange(g.pad_width, g.pad_width + g.image_size, dtype=torch.float64)
    line = (index / (g.canvas - 1) - 0.5) * 2
    return line[None, None, None, :].float(), line[None, None, :, None].float()


@pytest.mark.parametrize("assembly", ["tile", "overlap"])
@pytest.mark.parametrize("W, P, p, extra", [(12, 4, 8, 0), (20, 4, 8, 1), (12, 3, 6, 1), (10, 5, 4, 0), (16, 0, 8, 0)])
def test_stitched_pixelwise_network_equals_it_on_the_whole_image_for_every_shift(W, P, p, extra, assembly):
    g = CanvasGeometry(W, P)
    net = _PixelwiseNet(2, extra)
    stitched = StitchedNetwork(net, g, p, patch_batch=5, assembly=assembly)
    x = torch.randn(3, 2 + extra, W, W)
    sigma = torch.tensor([0.5, 1.0, 2.0]).reshape(-1, 1, 1, 1)
    X, Y = _image_coordinates(g)
    expected = net.function(x, sigma, X, Y)
    low, high = stitched.grid[1:] if assembly == "tile" else (0, 0)
    for a in range(low, high + 1):
        for b in range(low, high + 1):
            shifts = torch.tensor([[a, b]] * 3)
            out = stitched.assemble(x, sigma, None, shifts, torch.randn(3, 2, g.canvas, g.canvas))
            torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    assert max(net.calls) <= 5  # tiles go through in chunks of patch_batch


@pytest.mark.parametrize("W, P, p", [(12, 4, 8), (20, 4, 8), (16, 4, 8), (12, 3, 6), (10, 5, 4), (256, 24, 56),
                                     (16, 0, 4), (20, 6, 16)])
def test_every_central_pixel_is_covered_exactly_once_by_the_tiles(W, P, p):
    """The grid of tile_grid, for every shift it allows, tiles the central W x W region exactly once and stays in
    the canvas; the stitched output of a 'network' that marks each tile with its own number shows those tiles."""
    g = CanvasGeometry(W, P)
    k, low, high = tile_grid(g, p)
    assert W <= k * p <= W + 2 * P
    if (W + P) % p == 0:
        assert (low, high) == (0, P)  # PaDIS's grid: K p = W + P, shifts 0..P
    for a in range(low, high + 1):
        count = torch.zeros(g.canvas, g.canvas)
        for i in range(k):
            for j in range(k):
                assert a + (i + 1) * p <= g.canvas
                count[a + i * p : a + (i + 1) * p, a + j * p : a + (j + 1) * p] += 1
        assert torch.equal(count[P : P + W, P : P + W], torch.ones(W, W))
    if W > 64:
        return

    class TileNumbers(_PixelwiseNet):
        def __call__(self, x, sigma, class_labels=None, positions=None):
            return torch.arange(len(x), dtype=torch.float32).reshape(-1, 1, 1, 1).expand(len(x), 1, p, p)

    stitched = StitchedNetwork(TileNumbers(1), g, p, patch_batch=10_000)
    out = stitched.assemble(torch.zeros(1, 1, W, W), torch.ones(1, 1, 1, 1), None, torch.tensor([[high, low]]),
                            torch.zeros(1, 1, g.canvas, g.canvas))
    for number in out.unique():
        rows, cols = torch.nonzero(out[0, 0] == number, as_tuple=True)
        block = out[0, 0, rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
        assert (block == number).all() and block.shape[0] <= p and block.shape[1] <= p  # one rectangle per tile


def test_overlap_weights_sum_to_one():
    class Constant(_PixelwiseNet):
        def __call__(self, x, sigma, class_labels=None, positions=None):
            return torch.full((len(x), 1, x.shape[-2], x.shape[-1]), 3.25)

    for W, P, p in ((16, 4, 8), (13, 2, 6), (10, 0, 4)):
        g = CanvasGeometry(W, P)
        stitched = StitchedNetwork(Constant(1), g, p, assembly="overlap")
        out = stitched.assemble(torch.zeros(2, 1, W, W), torch.ones(2, 1, 1, 1), None, None,
                                torch.zeros(2, 1, g.canvas, g.canvas))
        assert torch.equal(out, torch.full((2, 1, W, W), 3.25))


class _ProductPrior:
    """Independent pixels N(mu(X, Y), tau^2): the exact patch denoiser D = (tau^2 x + sigma^2 mu) / (tau^2 + sigma^2)
    reading mu from the position channels."""

    tau = 0.3

    def __init__(self):
        self.in_channels = self.out_channels = 1
        self.label_dim, self.sigma_min, self.sigma_max = 0, 0.0, math.inf

    @staticmethod
    def mu(X, Y):
        return 0.6 * torch.sin(math.pi * X) * torch.cos(math.pi * Y / 2) + 0.3 * X - 0.2 * Y

    def denoise(self, x, sigma, X, Y):
        return (self.tau**2 * x + sigma**2 * self.mu(X, Y)) / (self.tau**2 + sigma**2)

    def __call__(self, x, sigma, class_labels=None, positions=None):
        sigma = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1, 1, 1, 1)
        return self.denoise(x, sigma, positions[:, :1], positions[:, 1:2])


class _OffByOne(CanvasGeometry):
    def coordinate_map(self, device="cpu"):
        return super().coordinate_map(device).roll(1, dims=-1)


class _NormalisedByN(CanvasGeometry):
    def coordinate_map(self, device="cpu"):
        line = (torch.arange(self.canvas, dtype=torch.float32) / self.canvas - 0.5) * 2
        return torch.stack([line[None, :].expand(self.canvas, -1), line[:, None].expand(-1, self.canvas)])[None]


def _product_prior_error(geometry_class, W=12, P=4, p=8) -> float:
    prior, g = _ProductPrior(), geometry_class(W, P)
    stitched = StitchedNetwork(prior, g, p, patch_batch=7)
    stitched.use_seeds([3, 4, 5])
    X, Y = _image_coordinates(CanvasGeometry(W, P))
    worst = 0.0
    for sigma in (0.05, 0.3, 2.0):
        x = torch.randn(6, 1, W, W)  # two copies of the three seeds' batch, as the MSM sampler lays them out
        exact = prior.denoise(x, sigma, X, Y)
        worst = max(worst, (stitched(x, sigma) - exact).abs().max().item())
    return worst


def test_stitched_exact_product_prior_is_the_exact_whole_image_denoiser():
    assert _product_prior_error(CanvasGeometry) < 1e-5
    # The same test fails for coordinates off by one pixel or normalised by N instead of N - 1.
    assert _product_prior_error(_OffByOne) > 1e-2
    assert _product_prior_error(_NormalisedByN) > 1e-2


def test_sampling_with_the_stitched_exact_prior_equals_whole_image_sampling_for_any_batch():
    """The shifts come from their own per-seed streams: EDM's sampler draws exactly the noise it would draw with the
    whole-image denoiser, so the samples agree, and a seed's sample does not depend on its batch."""
    prior, g = _ProductPrior(), CanvasGeometry(12, 2)
    X, Y = _image_coordinates(g)
    stitched = StitchedNetwork(prior, g, 4, patch_batch=9)
    options = dict(num_steps=6, sigma_min=0.02, sigma_max=5.0, S_churn=10.0)

    def sample(seeds, denoiser_for):
        gen = SeedGenerators(seeds)
        latents = gen.randn([len(seeds), 1, 12, 12])
        return edm_generate(denoiser_for(seeds), latents, gen, **options)

    def whole(seeds):
        return lambda x, sigma: prior.denoise(x, float(sigma), X.double(), Y.double())

    def patches(seeds):
        stitched.use_seeds(seeds)
        return net_denoiser(stitched)

    reference = sample([1, 2, 3], whole)
    torch.testing.assert_close(sample([1, 2, 3], patches), reference, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(sample([2], patches), reference[1:2], rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------------------------------
# The patch-size law and the kimg accounting.


@pytest.mark.parametrize("sizes, probs, real_p", [([16, 32, 64], None, 0.3), ([8, 16], [0.25, 0.75], None),
                                                   ([4, 8, 16], None, None)])
def test_patch_size_frequencies_match_the_law(sizes, probs, real_p):
    law = PatchLaw.from_options(sizes, probs, real_p, None)
    p = 0.5 if real_p is None else real_p
    expected = probs or [(1 - p) * 2 / 5, (1 - p) * 3 / 5, p]
    steps = 20_000
    counts = {s: 0 for s in sizes}
    for step in range(steps):
        counts[law.step_choice(11, step)[0]] += 1
    for size, p in zip(sizes, expected):
        se = math.sqrt(p * (1 - p) / steps)
        assert abs(counts[size] / steps - p) < 4.5 * se, (size, counts[size] / steps, p)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_phantoms(str(tmp_path_factory.mktemp("data") / "ph.zip"), num=24, resolution=16)


def _train_in_process(outdir, data, images, capsys, extra=()):
    return train_in_process(outdir, data, images, capsys, [*TINY, *extra])


def test_kimg_count_the_patches_actually_trained_on(tmp_path, data, monkeypatch, capsys):
    rows = []
    original = EDMLoss.__call__

    def counting(self, net, batch, generator):
        rows.append(batch["image"].shape[0])
        assert batch["image"].shape[-1] in (4, 8, 16) and net.positions.shape[0] == batch["image"].shape[0]
        return original(self, net, batch, generator)

    monkeypatch.setattr(EDMLoss, "__call__", counting)
    run_dir = _train_in_process(tmp_path / "runs", data, 200, capsys)
    state = checkpoint.load_training_state(checkpoint.latest_file(run_dir, "training-state"))
    assert len(rows) == state["progress"]["data_nimg"] // 8  # one crop batch per step, 8 images each
    assert state["progress"]["cur_nimg"] == sum(rows) >= 200 > sum(rows[:-1])
    stats = [json.loads(line) for line in open(os.path.join(run_dir, "stats.jsonl"))]
    assert round(stats[-1]["kimg"] * 1000) == sum(rows)
    assert len(set(rows)) > 1  # the multipliers were used
    assert "count the patches trained on" in open(os.path.join(run_dir, "log.txt")).read()


# ----------------------------------------------------------------------------------------------------------------------
# End to end.


def _final_state(outdir):
    (run_dir,) = glob.glob(os.path.join(str(outdir), "0*"))
    return checkpoint.load_training_state(checkpoint.latest_file(run_dir, "training-state")), run_dir


@pytest.mark.slow
def test_patch_training_resumes_exactly_after_sigkill(tmp_path, data):
    n = 1024
    outdir = tmp_path / "killed"
    cmd = [sys.executable, "train.py", "--outdir", str(outdir), "--data", data, "--duration", str(n / 1e6), *TINY]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    started = time.monotonic()
    # Killed after a few states, so that steps with several crops per image (data_nimg < cur_nimg) came before it.
    while proc.poll() is None and len(glob.glob(str(outdir / "*" / "training-state-*.pt"))) < 3:
        assert time.monotonic() - started < HANG_GUARD_S, "no training state appeared (hang guard)"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed = _final_state(outdir)[0]["progress"]
    assert killed["cur_nimg"] < n and killed["data_nimg"] < killed["cur_nimg"]
    rerun = run_cli(["train.py", "--outdir", str(outdir), "--data", data, "--duration", str(n / 1e6), *TINY])
    assert "Resuming from" in rerun.stdout
    run_cli(["train.py", "--outdir", str(tmp_path / "ref"), "--data", data, "--duration", str(n / 1e6), *TINY])
    a, b = _final_state(tmp_path / "ref")[0], _final_state(outdir)[0]
    assert a["progress"] == b["progress"]
    for key in ("net", "ema"):
        for name in a[key]:
            torch.testing.assert_close(a[key][name], b[key][name], rtol=1e-5, atol=1e-6, msg=f"{key}.{name}")


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["edm", "msm"])
def test_a_patch_prior_drives_generate_and_reconstruct(tmp_path, data, loss):
    extra = ["--loss", "msm", "--mask", "box", "--p", "0.3"] if loss == "msm" else []
    run_cli(["train.py", "--outdir", str(tmp_path / "runs"), "--data", data, "--duration", "0.0002", *TINY, *extra])
    _, run_dir = _final_state(tmp_path / "runs")
    _, config = checkpoint.load_snapshot(run_dir)
    assert config["patches"]["pad_width"] == 4 and config["network"]["kwargs"]["position_channels"] == 2
    gen = run_cli(["generate.py", "--network", run_dir, "--outdir", str(tmp_path / "gen"), "--seeds", "0-2",
                   "--steps", "3", "--patch-batch", "5"])
    # The default tile: of 4, 8, 16 only 4 px tiles give a grid that can shift (K = 5 covers 20 = W + P).
    assert "patch prior stitched from 4 px tiles (tile, K = 5, shifts 0..4" in gen.stdout
    assert len(glob.glob(str(tmp_path / "gen" / "*.png"))) == 3
    run_cli(["generate.py", "--network", run_dir, "--outdir", str(tmp_path / "gen8"), "--seeds", "0-1",
             "--steps", "3", "--patch-size", "8", "--assembly", "overlap"])
    rec = run_cli(["reconstruct.py", "--network", run_dir, "--data", data, "--task", "box", "--box-size", "6",
                   "--num", "2", "--seeds", "0-1", "--outdir", str(tmp_path / "rec"), "--methods",
                   "msm,dps,pc-dps,zero-filled", "--steps", "4", "--dps-steps", "4", "--levels", "4",
                   "--patch-size", "8"])
    summary = json.load(open(tmp_path / "rec" / "summary.json"))
    assert {"msm", "dps", "pc-dps"} <= set(summary["methods"]) and "example 1 seed 1" in rec.stdout
    assert all(math.isfinite(summary["methods"][m]["psnr_mean"]) for m in ("msm", "dps", "pc-dps"))


# ----------------------------------------------------------------------------------------------------------------------
# Bad input: one sentence, nothing written.


@pytest.fixture(scope="module")
def snapshots(tmp_path_factory, data):
    root = tmp_path_factory.mktemp("snapshots")
    patch = run_cli(["train.py", "--outdir", str(root / "patch"), "--data", data, "--duration", "0.00003", *TINY])
    whole = run_cli(["train.py", "--outdir", str(root / "whole"), "--data", data, "--duration", "0.00003",
                     *BASE])
    assert patch.returncode == whole.returncode == 0
    return {name: glob.glob(str(root / name / "0*"))[0] for name in ("patch", "whole")}


BAD = [
    (train.main, ["--patch-sizes", "8,32", "--pad-width", "4"], ["--patch-sizes 32", "24 px canvas"]),
    (train.main, ["--patch-sizes", "5,16"], ["--patch-sizes 5", "divisible by 2"]),
    (train.main, ["--patch-sizes", "8,16", "--patch-probs", "0.5,0.6"], ["--patch-probs"]),
    (train.main, ["--patch-sizes", "8,16", "--real-p", "0.5"], ["--real-p", "three"]),
    (train.main, ["--pad-width", "4"], ["--pad-width", "--patch-sizes"]),
    (train.main, ["--patch-sizes", "8,16", "--pos-enc", "fourier:x"], ["--pos-enc"]),
    (train.main, ["--patch-sizes", "8,16", "--loss", "ambient"], ["--loss ambient"]),
    (generate.main, ["--patch-size", "14"], ["--patch-size 14", "W <= K p <= W + 2P"]),
    (generate.main, ["--patch-size", "32"], ["--patch-size 32", "24 px canvas"]),
    (generate.main, ["--bridge-source", "{data}"], ["--bridge-source", "deterministic"]),
    (generate.main, ["--whole", "--assembly", "overlap"], ["--assembly", "whole-image"]),
    (reconstruct.main, ["--task", "box", "--patch-size", "14"], ["--patch-size 14"]),
    (reconstruct.main, ["--task", "box", "--whole", "--patch-batch", "4"], ["--patch-batch", "whole-image"]),
]


@pytest.mark.slow
@pytest.mark.parametrize("command, args, words", BAD, ids=[f"{c.name}-{' '.join(a)}" for c, a, _ in BAD])
def test_bad_patch_input_is_refused_in_one_sentence_leaving_nothing(tmp_path, data, snapshots, capsys, command, args,
                                                                     words):
    out = str(tmp_path / "out")
    network = snapshots["whole" if "--whole" in args else "patch"]
    args = [a.format(data=data) for a in args if a != "--whole"]
    if command is train.main:
        args = ["--outdir", out, "--data", data, "--duration", "0.0001", *BASE, *args]
    elif command is generate.main:
        args = ["--network", network, "--outdir", out, "--seeds", "0", "--steps", "2", *args]
    else:
        args = ["--network", network, "--data", data, "--num", "1", "--outdir", out, *args]
    before = file_tree(tmp_path), file_tree(os.path.dirname(network))
    code, err = run_in_process(command, args, capsys)
    assert code == 1, err
    assert err.startswith("Error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for word in words:
        assert word in err, err
    assert (file_tree(tmp_path), file_tree(os.path.dirname(network))) == before


def test_the_default_tile_size_prefers_a_grid_that_can_shift():
    """64 px padded by 8: of the training sizes 16, 24, 32, 64 only 24 (K = 3, shifts 0..8) gives a grid that moves;
    the others tile with one fixed grid. Without any shifting size the largest that tiles is taken."""
    from training.patches import PatchLaw, patch_config, patch_prior

    geometry = CanvasGeometry(64, 8)
    net = EDMPrecond(img_resolution=64, in_channels=1, position_channels=2, model_type="SongUNet", model_channels=8,
                     channel_mult=[1], num_blocks=1, attn_resolutions=[])
    network = {"kwargs": {"channel_mult": [1]}}
    law = PatchLaw([16, 24, 32, 64], [0.25] * 4, [1] * 4)
    stitched = patch_prior(net, {"patches": patch_config(geometry, law), "network": network})
    assert stitched.patch_size == 24 and stitched.grid == (3, 0, 8)
    law = PatchLaw([16, 32, 64], [1 / 3] * 3, [1] * 3)
    assert patch_prior(net, {"patches": patch_config(geometry, law), "network": network}).patch_size == 64
