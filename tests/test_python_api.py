"""The Python example of docs/python-api.md runs as written against two tiny snapshots made here: an EDM oracle
(built, not trained) and an MSM model trained for a few images on box-masked phantoms. To keep the test fast, the two
noise-level grids the example uses (VP-200 and DDPM's) are thinned to every 25th level; every line of the
example still runs unchanged."""

import os
import re

import torch

import training.schedules
from tests.helpers import make_phantoms, train_in_process
from training import snapshot as checkpoint
from training.networks import network_kwargs_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RES = 16


def _example() -> str:
    with open(os.path.join(ROOT, "docs", "python-api.md"), encoding="utf-8") as f:
        (code,) = re.findall(r"^```python\n(.*?)^```", f.read(), flags=re.M | re.S)
    return code


def test_python_example_runs(tmp_path, capsys, monkeypatch):
    data = make_phantoms(str(tmp_path / "phantoms.zip"), num=16, resolution=RES)
    msm_run = train_in_process(tmp_path / "runs", data, 8, capsys,
                               ["--loss", "msm", "--mask", "box", "--p", "0.4", "--cbase", "8", "--cres", "1,2",
                                "--blocks", "1", "--batch", "8"])
    cfg = network_kwargs_for(arch="ddpmpp", precond="edm", img_resolution=RES, in_channels=1, out_channels=1,
                             label_dim=0, cbase=8, cres=[1, 2], num_blocks=1, attn_resolutions=[], dropout=0.0)
    oracle = str(tmp_path / "oracle" / "network-snapshot-000000.pt")
    os.makedirs(os.path.dirname(oracle))
    checkpoint.save_snapshot(oracle, {"network": cfg, "dataset": {"kind": "image", "image_shape": [1, RES, RES]}},
                             checkpoint.build_network(cfg))
    code = _example()
    for name, path in (("oracle_snapshot", oracle), ("msm_snapshot", msm_run)):
        code, count = re.subn(rf"^{name} = .*$", f"{name} = {path!r}", code, flags=re.M)
        assert count == 1, name
    schedules = training.schedules
    vp200, ddpm = schedules.vp200_sigmas, schedules.ddpm_sigmas
    monkeypatch.setattr(schedules, "vp200_sigmas", lambda device="cpu": vp200(device)[::25])
    monkeypatch.setattr(schedules, "ddpm_sigmas", lambda num_steps=1000: ddpm(max(2, num_steps // 25)))
    monkeypatch.chdir(tmp_path)
    namespace, threads = {}, torch.get_num_threads()
    torch.set_num_threads(1)  # tiny networks: a second thread only adds synchronisation
    try:
        exec(compile(code, "docs/python-api.md", "exec"), namespace)
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    for name in ("zero-filled", "dps", "msm", "guided-dds"):
        assert re.search(rf"^{name} PSNR -?\d", printed, flags=re.M), printed
    assert namespace["samples"].shape == (4, 1, RES, RES) and namespace["msm_samples"].shape == (4, 1, RES, RES)
    for key in ("samples", "dps", "msm_samples", "msm_recon", "guided_dds"):
        assert torch.isfinite(namespace[key]).all(), key
    # The measurement is honoured where it observes: zero filling equals it there, by construction of A = M.
    observed = namespace["operator"].mask.bool().expand_as(namespace["y"])
    torch.testing.assert_close(namespace["zero_filled"](namespace["operator"], namespace["y"])[observed],
                               namespace["y"][observed])
