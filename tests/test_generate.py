"""generate.py: images depend only on their seeds (not on --batch or the number of ranks)."""

import os

import numpy as np
import PIL.Image
import pytest
import torch

from tests.helpers import run_cli
from torch_utils import checkpoint
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
