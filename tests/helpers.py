"""Shared helpers for the tests: running the CLIs in subprocesses, small datasets."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(args: list[str], torchrun: int = 0, check: bool = True, timeout: float = 600, env_extra=None):
    """Run `python <script> args...` (or under torchrun with that many ranks) in the repo; returns CompletedProcess."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    if torchrun:
        env["OMP_NUM_THREADS"] = "1"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}", *args]
    else:
        cmd = [sys.executable, *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        tail = f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{tail}")
    return proc


def make_phantoms(path: str, num: int = 32, resolution: int = 16, seed: int = 0) -> str:
    run_cli(["dataset_tool.py", "phantoms", "--dest", path, "--num", str(num), "--resolution", str(resolution),
             "--seed", str(seed)])
    return path
