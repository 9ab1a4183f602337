"""bench/downstream.py: its metrics against independent computations, and the whole benchmark in --quick mode."""

import json
import os

import numpy as np
import pytest
import scipy.stats

from bench.downstream import METRICS, SETS, binary_metrics
from tests.helpers import run_cli


def test_binary_metrics_against_hand_counts_and_scipy():
    labels = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1, 1])
    scores = np.array([0.1, 0.2, 0.7, 0.3, 0.4, 0.4, 0.9, 0.4, 0.6, 0.8])
    m = binary_metrics(labels, scores)
    # Predictions: class 0 gets 5 of 6 right, class 1 gets 3 of 4 right.
    assert m["accuracy"] == pytest.approx(0.8)
    assert m["balanced_accuracy"] == pytest.approx((5 / 6 + 3 / 4) / 2)
    f1_0 = 2 * 5 / (6 + 6)  # tp 5; 6 actual, 6 predicted
    f1_1 = 2 * 3 / (4 + 4)  # tp 3; 4 actual, 4 predicted
    assert m["macro_f1"] == pytest.approx((f1_0 + f1_1) / 2)
    u = scipy.stats.mannwhitneyu(scores[labels == 1], scores[labels == 0], alternative="greater").statistic
    assert m["auc"] == pytest.approx(u / (4 * 6))  # ties (0.4 vs 0.4) count one half in both


def test_binary_metrics_on_random_scores_match_scipy_auc():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    scores = np.round(rng.random(300) + 0.3 * labels, 2)  # rounding makes ties
    u = scipy.stats.mannwhitneyu(scores[labels == 1], scores[labels == 0]).statistic
    assert binary_metrics(labels, scores)["auc"] == pytest.approx(u / (labels.sum() * (300 - labels.sum())))


@pytest.mark.slow
def test_quick_benchmark_writes_table_results_and_plot(tmp_path):
    out = tmp_path / "bench"
    run_cli(["bench/downstream.py", "--out", str(out), "--quick"])
    table = (out / "table.md").read_text().splitlines()
    assert len(table) == 2 + len(SETS) and all(name in "\n".join(table) for name in SETS)
    results = json.load(open(out / "results.json"))
    assert set(results["per_seed"]) == {"0", "1"}
    for name in SETS:
        for metric in METRICS:
            mean, std = results["summary"][name][metric]
            assert 0 <= mean <= 1 and std >= 0
    assert os.path.getsize(out / "downstream.png") > 1000
    labels = json.load(open(out / "seed0" / "real-bridge-entropy" / "dataset.json"))["labels"]
    assert len(labels) == 12 and {k for _, k in labels} == {0, 1}
