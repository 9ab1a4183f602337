"""bench/data_consistency.py: the ground truth explains its measurements at the noise level (ratio about 1, for CT and
for masked multi-coil MRI with complex noise), FBP from few views does not, and folders of other measurement sets are
refused."""

import json
import re

import pytest

from tests.helpers import make_phantoms, run_cli


def ratios(output: str) -> dict:
    return {m: float(v) for m, v in re.findall(r"^\| ([\w-]+) \| ([\d.]+) \+-", output, flags=re.M)}


@pytest.mark.parametrize("task", ["ct", "mri"])
def test_reference_scores_one_and_other_sets_are_refused(tmp_path, task):
    phantoms = make_phantoms(str(tmp_path / "ph.zip"), num=3, resolution=16)
    data = phantoms
    options = ["--task", "ct", "--views", "8", "--methods", "fbp"]
    if task == "mri":
        data = str(tmp_path / "mri")
        run_cli(["dataset_tool.py", "simulate-mri", "--source", phantoms, "--dest", data, "--coils", "4"])
        options = ["--task", "mri", "--accel", "2", "--sigma-y", "0.05", "--methods", "zero-filled"]
    meas, out = str(tmp_path / "meas"), str(tmp_path / "out")
    run_cli(["reconstruct.py", "--data", data, *options, "--num", "3", "--save-measurements", meas, "--outdir", out])
    result = run_cli(["bench/data_consistency.py", "--measurements", meas, out])
    found = ratios(result.stdout)
    assert abs(found["reference"] - 1) < 0.15, result.stdout  # a few hundred noise entries: std about 0.03
    if task == "ct":  # FBP from 8 views does not explain its data (streaks, no prior)
        assert found["fbp"] > 1.3, result.stdout
    else:
        assert "zero-filled" in found, result.stdout

    # Another measurement set (other noise) is refused by its hash.
    other, other_out = str(tmp_path / "meas2"), str(tmp_path / "out2")
    run_cli(["reconstruct.py", "--data", data, *options, "--num", "3", "--mask-seed", "7", "--save-measurements",
             other, "--outdir", other_out])
    refused = run_cli(["bench/data_consistency.py", "--measurements", meas, other_out], check=False)
    assert refused.returncode != 0 and "reconstructed other measurements" in refused.stderr
    with open(f"{out}/summary.json") as f:
        assert json.load(f)["measurements"]["hash"]
