"""bench/denoiser_gap.py: MSM's aggregate denoiser against a network's own error, per noise level."""

import torch

from tests.helpers import make_phantoms, run_cli
from training import snapshot as checkpoint
from training.measurements import MeasurementConfig
from training.networks import network_kwargs_for


def snapshot(path, measurement: dict | None) -> str:
    cfg = network_kwargs_for(arch="ddpmpp", precond="edm", img_resolution=16, in_channels=1, out_channels=1,
                             label_dim=0, cbase=8, cres=[1, 2], num_blocks=1, attn_resolutions=[], dropout=0.0)
    torch.manual_seed(0)  # the same weights in every snapshot
    net = checkpoint.build_network(cfg)
    with torch.no_grad():  # EDM's initial output layer is ~0, which makes D = c_skip x, the fallback: perturb it
        for param in net.parameters():
            param.add_(0.05 * torch.randn_like(param))
    config = {"network": cfg, "dataset": {"kind": "image", "image_shape": [1, 16, 16]}, "measurement": measurement}
    checkpoint.save_snapshot(str(path), config, net)
    return str(path)


def table(stdout: str) -> dict:
    rows = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) > 2 and (cells[1] == "network" or cells[1].startswith("K ")):
            rows[(cells[0], cells[1])] = [float(c) for c in cells[2:]]
    return rows


def test_a_law_that_covers_everything_gives_the_network_and_k_matters_otherwise(tmp_path):
    data = make_phantoms(str(tmp_path / "ph.zip"), num=4, resolution=16)
    oracle = snapshot(tmp_path / "oracle.pt", None)
    full = snapshot(tmp_path / "full.pt", MeasurementConfig("identity", {"kind": "full"}).to_config())
    box = snapshot(tmp_path / "box.pt", MeasurementConfig("identity", {"kind": "box", "p": 0.4}).to_config())
    out = run_cli(["bench/denoiser_gap.py", "--data", data, "--indices", "0-3", "--subsets", "1,8",
                   "--sigmas", "0.1,1", "--snapshot", f"oracle={oracle}", "--snapshot", f"full={full}",
                   "--snapshot", f"box={box}", "--out", str(tmp_path / "gap.md")]).stdout
    rows = table(out)
    assert set(rows) == {("oracle", "network"), ("full", "K 1"), ("full", "K 8"), ("box", "K 1"), ("box", "K 8")}
    # P = I every time: the aggregate is the network itself, whatever K (T = I: nothing lies outside range(T)).
    assert rows["full", "K 1"] == rows["oracle", "network"] == rows["full", "K 8"]
    # A box law leaves cells uncovered at K = 1 (shrunk to the fallback) and covers them with K = 8.
    assert rows["box", "K 1"] != rows["box", "K 8"]
    assert (tmp_path / "gap.md").read_text() == out
    bad = run_cli(["bench/denoiser_gap.py", "--data", data, "--snapshot", oracle], check=False)
    assert bad.returncode != 0 and "NAME=PATH" in bad.stderr
