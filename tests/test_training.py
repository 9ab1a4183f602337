"""End-to-end training through the CLI on a tiny network: exact resume, SIGKILL continuation, shorter and longer
durations, snapshot names, torchrun (DDP, fp16 overflow on one rank, a hung rank), bad input."""

import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.helpers import HANG_GUARD_S, REPO, make_phantoms, run_cli
from training import snapshot as checkpoint
from training.training_loop import cpu_bf16_support

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


def positions(run_dir, prefix):
    """Training positions (images) of the checkpoint files, read from their names: 000001.pt = 1000, 000000.512.pt
    = 512."""
    out = []
    for path in glob.glob(os.path.join(run_dir, f"{prefix}-*.pt")):
        kimg, rest = re.fullmatch(rf"{prefix}-(\d{{6}})(?:\.(\d{{3}}))?\.pt", os.path.basename(path)).groups()
        out.append(int(kimg) * 1000 + int(rest or 0))
    return sorted(out)


def read_stats(run_dir):
    return [json.loads(line) for line in open(os.path.join(run_dir, "stats.jsonl"))]


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
    stats = read_stats(run_dir)
    assert stats[-1]["kimg"] == pytest.approx(0.128)
    # Every snapshot tick (--snap 2, and the last) has its own file, although all lie below 1 kimg.
    snapshot_ticks = [s for s in stats if s["tick"] % 2 == 0 or s is stats[-1]]
    assert positions(run_dir, "network-snapshot") == [round(s["kimg"] * 1000) for s in snapshot_ticks]
    assert len(snapshot_ticks) == 5
    snapshot = checkpoint.latest_file(run_dir, "network-snapshot")
    assert snapshot.endswith("network-snapshot-000000.128.pt")
    net, config = checkpoint.load_snapshot(snapshot)
    assert config["dataset"]["image_shape"] == [1, 16, 16] and config["network"]["kwargs"]["img_resolution"] == 16


def test_sigkill_then_same_command_continues(tmp_path, data):
    n = 1024  # 128 steps: the kill comes right after the first state is written, long before the end
    outdir = tmp_path / "killed"
    cmd = [sys.executable, "train.py", "--outdir", str(outdir), "--data", data, "--duration", str(n / 1e6), *TINY]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # Wait for an event, not for a time: the first training state on disk (written atomically, so complete).
    started = time.monotonic()
    while proc.poll() is None and not glob.glob(str(outdir / "*" / "training-state-*.pt")):
        assert time.monotonic() - started < HANG_GUARD_S, "no training state appeared (hang guard)"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    state_files = glob.glob(str(outdir / "*" / "training-state-*.pt"))
    assert state_files, "no training state was written before the kill"
    killed_at = checkpoint.load_training_state(checkpoint.latest_file(os.path.dirname(state_files[0]),
                                                                       "training-state"))["progress"]["cur_nimg"]
    assert killed_at < n, "the run finished before it could be killed; make it longer"
    rerun = train(outdir, data, n)
    assert "Resuming from" in rerun.stdout and len(glob.glob(str(outdir / "0*"))) == 1
    train(tmp_path / "ref", data, n)
    assert_same_state(final_state(tmp_path / "ref")[0], final_state(outdir)[0])


def test_resume_drops_redone_stats_lines_and_stale_temp_files(tmp_path, data):
    """A run killed after some ticks' stats lines but before their training state, and in the middle of a checkpoint
    write: the resumed run leaves one stats line per tick and no temp file."""
    train(tmp_path / "ref", data, 64)
    _, ref_dir = final_state(tmp_path / "ref")
    shutil.copytree(tmp_path / "ref", tmp_path / "killed")
    _, run_dir = final_state(tmp_path / "killed")
    for nimg in (40, 56, 64):  # ticks at 8, 24, 40, 56, 64 images: the states and snapshots the kill prevented
        for prefix in ("training-state", "network-snapshot"):
            path = os.path.join(run_dir, checkpoint.progress_file_name(prefix, nimg))
            if os.path.exists(path):
                os.remove(path)
    torn = os.path.join(run_dir, checkpoint.progress_file_name("training-state", 40) + ".tmp-4194304")
    with open(torn, "wb") as f:
        f.write(b"half a checkpoint")
    with open(os.path.join(run_dir, "stats.jsonl"), "a") as f:
        f.write('{"kimg": 0.07')  # a line torn by the kill
    proc = train(tmp_path / "killed", data, 64)
    assert "Resuming from" in proc.stdout and "at 0.024 kimg" in proc.stdout
    assert not glob.glob(os.path.join(run_dir, "*.tmp-*"))
    stats, ref_stats = read_stats(run_dir), read_stats(ref_dir)
    assert [s["kimg"] for s in stats] == [s["kimg"] for s in ref_stats] == [0.008, 0.024, 0.04, 0.056, 0.064]
    assert [s["loss"] for s in stats] == pytest.approx([s["loss"] for s in ref_stats], rel=1e-5)


def test_shorter_duration_ends_the_run_instead_of_starting_another(tmp_path, data):
    train(tmp_path, data, 64)
    state, run_dir = final_state(tmp_path)
    os.remove(checkpoint.latest_file(run_dir, "network-snapshot"))  # e.g. killed between its state and snapshot
    proc = train(tmp_path, data, 48)
    assert len(glob.glob(str(tmp_path / "0*"))) == 1, "a new run was started"
    assert "The duration changed from 0.064 to 0.048 kimg" in proc.stdout
    assert "already at 0.064 kimg, at or past --duration (0.048 kimg): nothing to train" in proc.stdout
    assert positions(run_dir, "network-snapshot")[-1] == 64 and positions(run_dir, "training-state")[-1] == 64
    assert_same_state(state, final_state(tmp_path)[0])
    # The same command once more does nothing either; a longer one trains on in the same run.
    train(tmp_path, data, 64)
    proc = train(tmp_path, data, 80)
    assert len(glob.glob(str(tmp_path / "0*"))) == 1 and "Resuming from" in proc.stdout
    assert final_state(tmp_path)[0]["progress"]["cur_nimg"] == 80


def test_snapshot_of_a_run_directory_is_the_one_furthest_into_training(tmp_path):
    for name in ("000000.512", "000001", "000001.256", "000000.999"):
        (tmp_path / f"network-snapshot-{name}.pt").write_bytes(b"")
    (tmp_path / "network-snapshot-000002.pt.tmp-123").write_bytes(b"")
    assert checkpoint.progress_file_name("network-snapshot", 1256) == "network-snapshot-000001.256.pt"
    assert checkpoint.progress_file_name("network-snapshot", 2000) == "network-snapshot-000002.pt"
    assert checkpoint.resolve_snapshot_path(str(tmp_path)) == str(tmp_path / "network-snapshot-000001.256.pt")


@pytest.mark.parametrize("flags, native", [("fpu sse avx2 fma", False), ("avx2 avx512f avx512_bf16", True),
                                           ("avx2 amx_bf16 amx_tile", True)])
def test_bf16_support_is_read_from_the_cpu_flags(tmp_path, flags, native):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
    found, description = cpu_bf16_support(str(cpuinfo))
    assert found is native
    assert ("without avx512_bf16 or amx_bf16" in description) is not native


def test_torchrun_two_ranks_hold_identical_parameters(tmp_path, data):
    proc = train(tmp_path / "dist", data, 64, ["--channels-last"], torchrun=2)
    assert "All 2 ranks hold identical parameters" in proc.stdout
    state, _ = final_state(tmp_path / "dist")
    assert len(state["rng"]) == 2 and state["progress"]["cur_nimg"] == 64


def test_fp16_overflow_on_one_rank_is_skipped_on_every_rank(tmp_path, data):
    """Rank 1's third loss is inf (tests/training_worker.py): the GradScaler must see the reduced gradients, so both
    ranks skip that step (the parameters stay as they were, and stay identical: the loop checks their hash at every
    state) and take every other one."""
    proc = run_cli(["-m", "tests.training_worker", "overflow", "--outdir", str(tmp_path), "--data", data,
                    "--duration", str(48 / 1e6), *TINY, "--tick", "0.008"], torchrun=2)
    hashes = re.findall(r"All 2 ranks hold identical parameters \(sha256 (\w+)\)", proc.stdout)
    assert len(hashes) == 6 and hashes[1] == hashes[2] and len(set(hashes)) == 5  # step 3 skipped, others taken
    state, _ = final_state(tmp_path)
    assert state["scaler"]["scale"] == 2.0**15  # one overflow halved the initial 2^16
    assert {int(s["step"]) for s in state["optimizer"]["state"].values()} == {5}  # 6 steps, 1 skipped


def test_hung_rank_is_named_within_the_timeout(tmp_path, data):
    """Rank 1 sleeps in its third loss (tests/training_worker.py): rank 0 gives up after --dist-timeout seconds and
    says which rank did not arrive, in the error and in log.txt."""
    proc = run_cli(["-m", "tests.training_worker", "hang", "--outdir", str(tmp_path), "--data", data,
                    "--duration", str(48 / 1e6), *TINY, "--tick", "0.008", "--dist-timeout", "10"], torchrun=2,
                   check=False)
    assert proc.returncode != 0
    message = "Rank 0 waited 10 s (the --dist-timeout) at the gradient reduction of the step at 0.016 kimg: rank(s) " \
              "1 did not arrive"
    assert message in proc.stderr
    (run_dir,) = glob.glob(str(tmp_path / "0*"))
    assert message in open(os.path.join(run_dir, "log.txt")).read()


TEARDOWN_WORKER = """
import glob, sys
sys.path.insert(0, {repo!r})
from torch_utils import distributed as dist
dist.init("cpu")
import torch._dynamo  # what torch itself imports lazily in reconstruct.py's snapshot loading, after the group exists
dist.barrier()
rank = dist.get_rank()
dist.destroy()
left = sorted(open(f).read().strip() for f in glob.glob("/proc/self/task/*/comm"))
print(f"rank {{rank}} threads after destroy: {{[t for t in left if 'gloo' in t]}}")
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="thread names are read from /proc")
def test_destroy_ends_gloo_threads_even_after_a_late_dynamo_import(tmp_path):
    """A process group that outlives destroy() keeps gloo's threads until interpreter exit, whose teardown sometimes
    aborted a rank after all its work was done (twice in this suite's torchrun reconstruct.py test)."""
    script = tmp_path / "teardown.py"
    script.write_text(TEARDOWN_WORKER.format(repo=REPO))
    proc = run_cli([str(script)], torchrun=2)
    for rank in (0, 1):
        assert f"rank {rank} threads after destroy: []" in proc.stdout


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
