"""Shared helpers for the tests: running the CLIs in subprocesses, small datasets."""

import glob
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The only wall-time bound the tests use: a guard against hangs, far above what any test needs even on a loaded
# machine (a test must never fail because the machine is slow).
HANG_GUARD_S = 3600


def run_cli(args: list[str], torchrun: int = 0, check: bool = True, timeout: float = HANG_GUARD_S,
            env_extra=None):
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


def cli_defaults(command) -> dict:
    """A click command's options at their defaults, resolved the way click resolves them for a real invocation
    (through a context), so flags read False and not what the Option object stores as its default (a sentinel in
    click >= 8.2.2)."""
    with command.make_context(command.name or "cli", [], resilient_parsing=True) as ctx:
        return dict(ctx.params)


def make_phantoms(path: str, num: int = 32, resolution: int = 16, seed: int = 0) -> str:
    run_cli(["dataset_tool.py", "phantoms", "--dest", path, "--num", str(num), "--resolution", str(resolution),
             "--seed", str(seed)])
    return path


def run_in_process(command, args: list, capsys) -> tuple[int, str]:
    """Run a click command of a script in this process the way its `__main__` does (dnnlib.util.run_cli) ->
    (exit status, stderr). Fast enough to try many bad inputs; the same refusal path as the command line."""
    from dnnlib.util import run_cli as run_command

    capsys.readouterr()
    try:
        run_command(command, [str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def assert_refused_leaving_nothing(command, args: list, words: list, capsys, roots: list) -> str:
    """Run a script's click command in this process and check the refusal every bad input must get: exit 1, one
    'Error: ' line naming each of `words`, no traceback, and no file or folder under `roots` created or touched."""
    before = [file_tree(root) for root in roots]
    code, err = run_in_process(command, args, capsys)
    assert code == 1, err
    assert err.startswith("Error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for word in words:
        assert word in err, err
    assert [file_tree(root) for root in roots] == before
    return err


def file_tree(root) -> dict:
    """{relative path: (size, mtime_ns)} of every file and folder under root: compare before and after a command to
    see that it wrote nothing."""
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            stat = os.stat(path)
            out[os.path.relpath(path, root)] = (stat.st_size if name in files else 0, stat.st_mtime_ns)
    return out


def write_mri_records(path: str, records: list[dict], fully_sampled: bool = True) -> str:
    """An MRI record folder in training/mri.py's layout from given arrays, written plainly (no normalisation or
    checks) so that tests can make malformed records: records[i] = {'kspace': ..., 'maps': ..., ['mask': ...]}."""
    import json

    import numpy as np

    from training.mri import FORMAT_VERSION

    os.makedirs(os.path.join(path, "slices"))
    slices = []
    for i, arrays in enumerate(records):
        name = f"slices/{i:06d}.npz"
        np.savez(os.path.join(path, name), **arrays)
        slices.append({"file": name, "scale": 1.0})
    num_coils, height, width = records[0]["kspace"].shape
    meta = {"kind": "mri", "format_version": FORMAT_VERSION, "num_slices": len(slices), "num_coils": num_coils,
            "shape": [height, width], "normalisation": {"kind": "test"}, "fully_sampled": fully_sampled,
            "maps": {"kind": "test"}, "slices": slices}
    if not fully_sampled:
        meta["mask_law"] = {"kind": "lines-random", "R": 2.0, "acs": 2}
    with open(os.path.join(path, "dataset.json"), "w") as f:
        json.dump(meta, f)
    return path


def assert_same_training_state(a: dict, b: dict, rtol: float = 1e-5, atol: float = 1e-6):
    """Two training states at the same position hold the same network, EMA and optimizer state (float tolerance)."""
    import torch

    assert a["progress"]["cur_nimg"] == b["progress"]["cur_nimg"]
    for key in ("net", "ema"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            torch.testing.assert_close(a[key][name], b[key][name], rtol=rtol, atol=atol, msg=f"{key}.{name}")
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for k in sa[i]:
            torch.testing.assert_close(sa[i][k], sb[i][k], rtol=rtol, atol=atol)


def train_in_process(outdir, data: str, images: int, capsys, options) -> str:
    """train.py in this process for `images` images with the given options; returns the run directory."""
    import train

    code, err = run_in_process(train.main, ["--outdir", str(outdir), "--data", data, "--duration", images / 1e6,
                                            *options], capsys)
    assert code == 0, err
    (run_dir,) = glob.glob(os.path.join(str(outdir), "0*"))
    return run_dir
