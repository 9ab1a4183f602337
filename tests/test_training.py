"""End-to-end training through the CLI on a tiny network: exact resume, SIGKILL continuation, torchrun, bad input."""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.helpers import REPO, make_phantoms, run_cli
from torch_utils import checkpoint

# 16 steps of batch 8 = 128 images; a tick every 2 steps; a state at every tick.
TINY = ["--arch", "ddpmpp", "--cbase", "8", "--cres", "1,2", "--blocks", "1", "--attn", "", "--batch", "8",
        "--lr", "2e-3", "--lr-rampup", "0.00002", "--ema", "0.00005", "--dropout", "0.1", "--tick", "0.016",
        "--snap", "2", "--dump", "1", "--workers", "0", "--seed", "7"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_phantoms(str(tmp_path_factory.mktemp("data") / "ph.zip"), num=24, resolution=16)


def train(outdir, data, duration_images, extra=(), **kw):
    return run_cli(["train.py", "--outdir", str(outdir), "--data", data, "--duration", str(duration_images / 1e6),
                    *TINY, *extra], **kw)


def final_state(outdir):
    (run_dir,) = glob.glob(os.path.join(str(outdir), "0*"))
    return checkpoint.load_training_state(checkpoint.latest_file(run_dir, "training-state")), run_dir


def assert_same_state(a, b):
    assert a["progress"]["cur_nimg"] == b["progress"]["cur_nimg"]
    for key in ("net", "ema"):
        for name in a[key]:
            torch.testing.assert_close(a[key][name], b[key][name], rtol=1e-5, atol=1e-6, msg=f"{key}.{name}")
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for k in sa[i]:
            torch.testing.assert_close(sa[i][k], sb[i][k], rtol=1e-5, atol=1e-6)


def test_resume_is_exact(tmp_path, data):
    train(tmp_path / "full", data, 128)
    train(tmp_path / "split", data, 64)
    proc = train(tmp_path / "split", data, 128)  # the same command, longer: continues the unfinished run
    assert "Resuming from" in proc.stdout
    full, _ = final_state(tmp_path / "full")
    split, run_dir = final_state(tmp_path / "split")
    assert_same_state(full, split)
    # Dropout is on (0.1), so equality also proves the global RNG state travelled with the checkpoint.
    stats = [json.loads(line) for line in open(os.path.join(run_dir, "stats.jsonl"))]
    assert stats[-1]["kimg"] == pytest.approx(0.128)
    snapshot = checkpoint.latest_file(run_dir, "network-snapshot")
    net, config = checkpoint.load_snapshot(snapshot)
    assert config["dataset"]["image_shape"] == [1, 16, 16] and config["network"]["kwargs"]["img_resolution"] == 16


def test_sigkill_then_same_command_continues(tmp_path, data):
    n = 1024  # 128 steps: long enough to be killed in the middle
    outdir = tmp_path / "killed"
    cmd = [sys.executable, "train.py", "--outdir", str(outdir), "--data", data, "--duration", str(n / 1e6), *TINY]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(glob.glob(str(outdir / "*" / "training-state-*.pt"))) < 2:
        time.sleep(0.02)
    state_files = glob.glob(str(outdir / "*" / "training-state-*.pt"))
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert state_files, "no training state was written before the kill"
    killed_at = checkpoint.load_training_state(checkpoint.latest_file(os.path.dirname(state_files[0]),
                                                                       "training-state"))["progress"]["cur_nimg"]
    assert killed_at < n, "the run finished before it could be killed; make it longer"
    rerun = train(outdir, data, n)
    assert "Resuming from" in rerun.stdout and len(glob.glob(str(outdir / "0*"))) == 1
    train(tmp_path / "ref", data, n)
    assert_same_state(final_state(tmp_path / "ref")[0], final_state(outdir)[0])


def test_torchrun_two_ranks_hold_identical_parameters(tmp_path, data):
    proc = train(tmp_path / "dist", data, 64, ["--channels-last"], torchrun=2)
    assert "All 2 ranks hold identical parameters" in proc.stdout
    state, _ = final_state(tmp_path / "dist")
    assert len(state["rng"]) == 2 and state["progress"]["cur_nimg"] == 64


def test_bad_input_one_sentence_and_no_run_directory(tmp_path, data):
    outdir = tmp_path / "runs"

    def rejected(args, expect):
        proc = run_cli(["train.py", "--outdir", str(outdir), *args], check=False)
        assert proc.returncode != 0, proc.stdout
        assert expect in proc.stderr, proc.stderr
        assert not outdir.exists() or not glob.glob(str(outdir / "0*")), "a run directory was left behind"
        return proc

    rejected([*TINY], "Missing option '--data'")
    corrupt = tmp_path / "corrupt.zip"
    corrupt.write_bytes(b"PK\x03\x04garbage")
    rejected(["--data", str(corrupt), "--duration", "0.001", *TINY], "not a valid zip")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    import PIL.Image

    PIL.Image.new("L", (16, 16)).save(mixed / "a.png")
    PIL.Image.new("L", (8, 8)).save(mixed / "b.png")
    rejected(["--data", str(mixed), "--duration", "0.001", *TINY], "mixes image shapes")
    rejected(["--data", data, "--duration", "0.001", *TINY, "--batch-gpu", "3"], "not divisible")

    # Resuming with other options names them.
    train(tmp_path / "ok", data, 16)
    (run_dir,) = glob.glob(str(tmp_path / "ok" / "0*"))
    proc = run_cli(["train.py", "--outdir", str(tmp_path / "ok"), "--data", data, "--duration", "0.0001", *TINY,
                    "--lr", "1e-3", "--resume", run_dir], check=False)
    assert proc.returncode != 0 and "optimizer_kwargs" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1

    # A snapshot file that is not ours.
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    proc = run_cli(["generate.py", "--network", str(foreign), "--outdir", str(tmp_path / "gen")], check=False)
    assert proc.returncode != 0 and "not a network snapshot of this project" in proc.stderr
    assert not (tmp_path / "gen").exists()
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    proc = run_cli(["generate.py", "--network", str(junk), "--outdir", str(tmp_path / "gen")], check=False)
    assert proc.returncode != 0 and "not a network snapshot of this project" in proc.stderr
