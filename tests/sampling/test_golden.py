"""Every sampling method of generate.py and reconstruct.py reproduces its golden output (tests/sampling/golden.py,
written by `python -m tests.sampling.golden --write` before the samplers move into one package) to 1e-5 of each
output's norm, with the network-call count it reported and the calls counted then."""

import glob
import os

import numpy as np
import pytest

from tests.sampling.golden import CASES, DATA, Workspace, file_of, run_case

RTOL = 1e-5


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return Workspace(str(tmp_path_factory.mktemp("golden")))


def test_every_golden_file_belongs_to_a_case():
    stale = sorted(set(glob.glob(os.path.join(DATA, "*.npz"))) - {file_of(name) for name in CASES})
    assert not stale, f"golden files without a case in tests/sampling/golden.py: {stale}"


@pytest.mark.parametrize("name", list(CASES))
def test_golden(name, workspace):
    path = file_of(name)
    assert os.path.isfile(path), f"golden case {name}: no {path} (python -m tests.sampling.golden --write {name})"
    with np.load(path) as golden:
        expected, reported, counted = golden["output"], int(golden["reported"]), int(golden["counted"])
    result = run_case(name, workspace)
    assert result.output.shape == expected.shape, \
        f"golden case {name}: output shape {result.output.shape}, golden {expected.shape}"
    # The networks compute in float32, so the thread count alone moves outputs by up to 2e-6 of their norm (1 against
    # 2 threads, measured on every case); 1e-5 of the norm holds on any machine and still catches any change of method.
    error = np.linalg.norm(result.output.astype(np.float64) - expected) / max(np.linalg.norm(expected), 1e-300)
    assert error <= RTOL, f"golden case {name}: output changed by {error:.2e} of its norm (tolerance {RTOL:g})"
    assert (-1 if result.reported is None else result.reported) == reported, \
        f"golden case {name}: reports {result.reported} network calls, golden {reported} (-1: none)"
    assert result.counted == counted, f"golden case {name}: {result.counted} network calls, golden {counted}"
    assert result.reported in (None, result.counted), \
        f"golden case {name}: reports {result.reported} network calls, {result.counted} counted"
