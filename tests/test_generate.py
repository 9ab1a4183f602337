"""generate.py: images depend only on their seeds (not on --batch or the number of ranks)."""

import os

import numpy as np
import PIL.Image
import pytest
import torch

from tests.helpers import make_phantoms, run_cli
from training import snapshot as checkpoint
from training.data_tools import simulate_mri
from training.measurements import MeasurementConfig
from training.mri import MRIDataset
from training.networks import network_kwargs_for


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    """An untrained but deterministic network: what matters here is the sampler plumbing, not image quality."""
    cfg = network_kwargs_for(arch="ddpmpp", precond="edm", img_resolution=16, in_channels=1, out_channels=1,
                             label_dim=0, cbase=8, cres=[1, 2], num_blocks=1, attn_resolutions=[], dropout=0.0)
    torch.manual_seed(0)
    net = checkpoint.build_network(cfg)
    path = str(tmp_path_factory.mktemp("snap") / "network-snapshot-000000.pt")
    checkpoint.save_snapshot(path, {"network": cfg, "dataset": {"kind": "image", "image_shape": [1, 16, 16]}}, net)
    return path


def load_images(outdir, seeds):
    return np.stack([np.asarray(PIL.Image.open(os.path.join(outdir, f"{s:06d}.png"))) for s in seeds])


def test_same_seeds_same_images_for_any_batch_and_rank_count(tmp_path, snapshot):
    seeds = list(range(10))
    common = ["generate.py", "--network", snapshot, "--seeds", "0-9", "--steps", "6", "--S-churn", "5"]
    run_cli([*common, "--outdir", str(tmp_path / "b1"), "--batch", "1"])
    run_cli([*common, "--outdir", str(tmp_path / "b8"), "--batch", "8"])
    run_cli([*common, "--outdir", str(tmp_path / "r2"), "--batch", "3"], torchrun=2)
    b1, b8, r2 = (load_images(tmp_path / d, seeds) for d in ("b1", "b8", "r2"))
    assert np.array_equal(b1, b8)
    assert np.array_equal(b1, r2)
    assert len({img.tobytes() for img in b1}) == len(seeds)  # different seeds, different images
    assert os.path.isfile(str(tmp_path / "b1") + "-grid.png")
    grid = np.asarray(PIL.Image.open(str(tmp_path / "b1") + "-grid.png"))
    assert grid.shape == (3 * 16, 4 * 16)  # 10 images, 4 columns


def test_generate_bad_input(tmp_path, snapshot):
    proc = run_cli(["generate.py", "--network", snapshot, "--outdir", str(tmp_path / "o"), "--class", "3"],
                   check=False)
    assert proc.returncode != 0 and "--class 3" in proc.stderr
    proc = run_cli(["generate.py", "--network", str(tmp_path / "missing.pt"), "--outdir", str(tmp_path / "o")],
                   check=False)
    assert proc.returncode != 0 and "does not exist" in proc.stderr and not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def ambient_snapshots(tmp_path_factory):
    """Untrained Ambient snapshots as train.py --loss ambient records them: grayscale and RGB image networks with one
    mask input channel (pixel law p = 0.4, delta 0.2), and an MRI network (line law, no mask channel)."""
    root = tmp_path_factory.mktemp("ambient")
    records = str(root / "mri")
    simulate_mri(make_phantoms(str(root / "ph.zip"), num=3, resolution=16), records, num_coils=3)
    paths = {}
    for kind, channels, mask in (("gray", 1, {"kind": "pixel", "p": 0.4}), ("rgb", 3, {"kind": "pixel", "p": 0.4}),
                                 ("mri", 2, {"kind": "lines-random", "R": 2, "acs": 2})):
        is_mri = kind == "mri"
        measurement = MeasurementConfig("mri" if is_mri else "identity", mask).to_config()
        cfg = network_kwargs_for(arch="ddpmpp", precond="edm", img_resolution=16,
                                 in_channels=channels + (0 if is_mri else 1), out_channels=channels, label_dim=0,
                                 cbase=8, cres=[1, 2], num_blocks=1, attn_resolutions=[], dropout=0.0)
        torch.manual_seed(0)
        dataset = MRIDataset(records).describe() if is_mri else {"kind": "image", "image_shape": [channels, 16, 16]}
        loss = {"class_name": "training.loss.AmbientLoss", "measurement": measurement, "delta": 0.2}
        paths[kind] = str(root / f"{kind}.pt")
        checkpoint.save_snapshot(paths[kind], {"network": cfg, "dataset": dataset, "loss": loss,
                                               "measurement": measurement}, checkpoint.build_network(cfg))
    return paths


@pytest.mark.parametrize("kind", ["gray", "rgb", "mri"])
def test_ambient_snapshots_are_sampled_as_ambient(tmp_path, ambient_snapshots, kind):
    """The default sampler of an Ambient snapshot is the Ambient sampler; it writes 1-channel (grayscale, MRI
    magnitude) or 3-channel PNGs, one image per seed whatever the batch."""
    common = ["generate.py", "--network", ambient_snapshots[kind], "--seeds", "0-4", "--steps", "3"]
    proc = run_cli([*common, "--outdir", str(tmp_path / "b2"), "--batch", "2"])
    assert "ambient: edm heun, 3 steps" in proc.stdout and "extra drop 0.2 (mean survival 0." in proc.stdout
    images = load_images(tmp_path / "b2", range(5))
    assert images.shape == ((5, 16, 16, 3) if kind == "rgb" else (5, 16, 16))
    assert len({img.tobytes() for img in images}) == 5
    if kind == "gray":
        run_cli([*common, "--outdir", str(tmp_path / "b5"), "--batch", "5"])
        assert np.array_equal(load_images(tmp_path / "b5", range(5)), images)


def test_samplers_that_would_feed_the_noisy_image_to_a_mask_channel_are_refused(tmp_path, ambient_snapshots,
                                                                                  snapshot):
    out = tmp_path / "o"
    proc = run_cli(["generate.py", "--network", ambient_snapshots["gray"], "--outdir", str(out), "--sampler", "edm"],
                   check=False)
    assert proc.returncode != 0 and "--sampler edm would feed the noisy image into this network's mask input" \
        in proc.stderr and "use --sampler ambient" in proc.stderr
    proc = run_cli(["generate.py", "--network", snapshot, "--outdir", str(out), "--sampler", "ambient"], check=False)
    assert proc.returncode != 0 and "--sampler ambient needs a snapshot trained on measurements" in proc.stderr
    assert not out.exists()
