"""bench/tune_methods.py's search on a synthetic validation score (no reconstruct.py runs): it extends a grid past a
winning edge, stops where the range ends or a value inside wins, and ranks a diverged run below every other."""

import math
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
import tune_methods  # noqa: E402


def tune_with(monkeypatch, method, psnr_of):
    calls = []

    def fake_run(method_name, values, *args):
        calls.append(dict(values))
        return {"values": values, "psnr": psnr_of(values), "psnr_std": 0.0, "ssim": 0.5, "residual": 1.0, "nfe": 1000}

    monkeypatch.setattr(tune_methods, "run_value", fake_run)
    return tune_methods.tune(method, "net", "meas", "out", "0", "cpu", lambda line: None), calls


def test_a_winning_edge_is_extended_until_a_value_inside_wins(monkeypatch):
    # DPS's grid is 0.01, 0.02, 0.04; the score peaks at 0.1, so the grid grows by factors of 2 up to 0.16.
    result, calls = tune_with(monkeypatch, "dps", lambda v: -abs(math.log(v["dps_step"] / 0.1)))
    assert [c["dps_step"] for c in calls] == pytest.approx([0.01, 0.02, 0.04, 0.08, 0.16])
    assert result["chosen"]["dps_step"] == pytest.approx(0.08)


def test_extension_stops_at_the_range_and_at_the_limit(monkeypatch):
    # pc-projection's corrector step must stay below 2: from 0.2, 0.4, 0.8 the next is 1.6, then 3.2 is refused.
    result, calls = tune_with(monkeypatch, "pc-projection", lambda v: v["corrector_step"])
    assert [c["corrector_step"] for c in calls] == pytest.approx([0.2, 0.4, 0.8, 1.6])
    # An ever-growing score stops after EXTEND extensions, at the edge.
    result, calls = tune_with(monkeypatch, "dds", lambda v: v["dds_gamma"])
    assert len(calls) == 4 + tune_methods.EXTEND and result["chosen"] == calls[-1]


def test_the_boost_search_doubles_the_likelihood_weight_and_skips_diverged_runs(monkeypatch):
    # The strongest boost wins, so it doubles at the same step; the doubled one diverges (NaN) and loses.
    def psnr(v):
        return math.nan if v["dc_boost"] > 20 else v["dc_boost"]

    result, calls = tune_with(monkeypatch, "ald", psnr)
    assert calls[-1] == {"ald_step": 0.1, "dc_boost": 30.0} and len(calls) == len(tune_methods.BOOSTED) + 1
    assert result["chosen"] == {"ald_step": 0.1, "dc_boost": 15.0}


def test_each_variant_grid_is_searched_on_its_own_and_the_best_overall_chosen(monkeypatch):
    # pc-dps has one grid per law: the state law's score peaks inside its grid (0.04), the score law's keeps growing
    # past its edge; each is extended on its own (the law carried into the new values) and the best of all wins.
    def psnr(v):
        if v["pc_dps_law"] == "state":
            return 20 - abs(math.log(v["pc_dps_step"] / 0.04))
        return 15 + math.log(v["pc_dps_step"])

    result, calls = tune_with(monkeypatch, "pc-dps", psnr)
    state = [c["pc_dps_step"] for c in calls if c["pc_dps_law"] == "state"]
    score = [c["pc_dps_step"] for c in calls if c["pc_dps_law"] == "score"]
    assert state == pytest.approx([0.01, 0.02, 0.04, 0.08, 0.16])
    assert score == pytest.approx([3, 10, 30, 90, 270, 810])  # EXTEND extensions past the edge
    assert result["chosen"] == {"pc_dps_law": "score", "pc_dps_step": pytest.approx(810)}
    assert [r["values"]["pc_dps_law"] for r in result["grid"]] == ["state"] * 5 + ["score"] * 6
    assert tune_methods.label(calls[0]) == "pc_dps_lawstate-pc_dps_step0.01"


def test_a_tempered_likelihood_must_win_clearly(monkeypatch):
    # The strongest boost wins by less than TEMPER_MARGIN: the best value at dc_boost 1 (the posterior) is chosen.
    def psnr(v):
        return 20.0 + (0.2 if v["dc_boost"] == 15 else 0.0) - (0.1 if v["ald_step"] == 0.8 else 0.0)

    result, _ = tune_with(monkeypatch, "ald", lambda v: math.nan if v["dc_boost"] > 20 else psnr(v))
    assert result["chosen"] == {"ald_step": 0.4, "dc_boost": 1.0}
    result, _ = tune_with(monkeypatch, "ald", lambda v: math.nan if v["dc_boost"] > 20 else psnr(v) + (
        1.0 if v["dc_boost"] == 15 else 0.0))
    assert result["chosen"] == {"ald_step": 0.1, "dc_boost": 15.0}
