"""bench/msm_vs_oracle.py end to end at a tiny budget: data, measurements, three trainings, evaluations at two
budgets on test and validation, the NFE and dc-step sweeps, the table and the plots."""

import json
import os

import pytest

from tests.helpers import run_cli


@pytest.mark.slow
def test_msm_vs_oracle_quick(tmp_path):
    out = tmp_path / "mvo"
    run_cli(["bench/msm_vs_oracle.py", "--out", str(out), "--quick"], timeout=1800)
    with open(out / "results.json") as f:
        results = json.load(f)
    rows = {(r["split"], r["model"], r["kimg"]) for r in results["rows"]}
    assert rows == {(s, m, k) for s in ("test", "val") for m in ("msm-image", "msm-measurement", "oracle")
                    for k in (0.064, 0.128)}
    for split in ("test", "val"):  # every row of a split saw the same measurements
        assert len({r["hash"] for r in results["rows"] if r["split"] == split}) == 1
        assert set(results["baselines"][split]) == {"zero-filled", "cs-tv", "cs-l1"}
    assert {r["model"] for r in results["nfe"]} >= {"oracle"} and len(results["nfe"]) == 2 * 2 + 2
    heun = {r["model"]: r for r in results["heun"]}  # one Heun point per model: N = 2, so 3 evaluations of K subsets
    assert len(results["heun"]) == 2 and heun["oracle"]["nfe"] == 3 and heun["oracle"]["settings"]["solver"] == "heun"
    assert [r["nfe"] for m, r in heun.items() if m != "oracle"] == [3 * 3]
    assert [r["settings"]["skip_space"] for r in results["rows"] if r["model"] == "msm-measurement"] == \
        ["measurement"] * 4
    for name in ("results.md", "psnr_vs_kimg_test.png", "psnr_vs_kimg_val.png", "psnr_vs_nfe.png"):
        assert os.path.getsize(out / name) > 0
    # A second call finds everything done and runs nothing heavy again.
    before = len(results["commands"])
    run_cli(["bench/msm_vs_oracle.py", "--out", str(out), "--quick"], timeout=600)
    with open(out / "results.json") as f:
        assert json.load(f)["commands"] == [] and before > 0


def test_snapshots_are_found_at_whole_and_fractional_kimg(tmp_path):
    """Training writes -000060.pt at a whole number of kimg (EDM's names) and -000010.112.pt otherwise: the bench
    must find both (it once matched only the second form and missed the end of every run at a whole kimg)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("msm_vs_oracle", os.path.join("bench", "msm_vs_oracle.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    for name in ("network-snapshot-000010.112.pt", "network-snapshot-000060.pt", "training-state-000060.pt",
                 "network-snapshot-final.pt"):
        (tmp_path / name).write_bytes(b"")
    assert sorted(bench.snapshots(str(tmp_path))) == [10.112, 60.0]
    assert bench.snapshot_for(str(tmp_path), 10, 2.0).endswith("-000010.112.pt")
    assert bench.snapshot_for(str(tmp_path), 60, 2.0).endswith("-000060.pt")
    assert bench.snapshot_for(str(tmp_path), 30, 2.0) is None


@pytest.mark.slow
def test_msm_vs_oracle_box_task_quick(tmp_path):
    """The image task: phantom images, MSM trained on box-masked images with and without the mask channel, the
    posterior filling a centred hole; zero-filled is the only baseline."""
    out = tmp_path / "mvo-box"
    run_cli(["bench/msm_vs_oracle.py", "--out", str(out), "--quick", "--task", "box", "--kimg", "0.064", "--no-nfe"],
            timeout=1800)
    with open(out / "results.json") as f:
        results = json.load(f)
    assert {(r["split"], r["model"]) for r in results["rows"]} == {
        (s, m) for s in ("test", "val") for m in ("msm", "msm-mask-channel", "oracle")}
    assert set(results["baselines"]["test"]) == {"zero-filled"}
    settings = {r["model"]: r["settings"] for r in results["rows"] if r["split"] == "test"}
    assert settings["msm"]["K"] == 2 and settings["msm"]["dc_step"] == 1.75 and settings["oracle"]["K"] == 1
    assert any(run.endswith("-box-mc") for run in results["runs"].values())
    assert os.path.getsize(out / "psnr_vs_kimg_test.png") > 0


@pytest.mark.slow
def test_msm_vs_oracle_edm2_recipe_quick(tmp_path):
    """--recipe edm2: both models trained with the inverse square root schedule and EMA profiles; at each budget
    every post-hoc EMA length is evaluated on validation and the test row uses validation's choice; --compare draws
    another recipe's curves beside these."""
    out = tmp_path / "mvo-edm2"
    args = ["bench/msm_vs_oracle.py", "--out", str(out), "--quick", "--models", "msm-image,oracle", "--recipe", "edm2",
            "--no-nfe"]
    run_cli(args, timeout=1800)
    with open(out / "results.json") as f:
        results = json.load(f)
    assert results["recipe"] == "edm2"
    assert results["runs"]["msm-image"].endswith("-r4-edm2") and results["runs"]["oracle"].endswith("-oracle-edm2")
    for run in results["runs"].values():
        with open(os.path.join(run, "training_options.json")) as f:
            assert json.load(f)["lr_schedule"]["kind"] == "isqrt"
    rows = {(r["split"], r["model"], r["kimg"]): r for r in results["rows"]}
    assert len(rows) == 2 * 2 * 2
    for (_, model, kimg), r in rows.items():
        sweep = {e["sigma_rel"]: e["psnr"] for e in r["ema_sweep"]}
        assert set(sweep) == {0.05, 0.1} and sweep[r["ema"]] == max(sweep.values())
        assert all(0 <= e["fit_error"] < 1e-6 for e in r["ema_sweep"])  # the tracked profiles themselves
        assert r["ema"] == rows["val", model, kimg]["ema"]  # the test row uses validation's choice
        assert "posthoc-ema-" in os.path.basename(r["snapshot"])
    assert rows["val", "oracle", 0.128]["psnr"] == max(e["psnr"] for e in rows["val", "oracle", 0.128]["ema_sweep"])
    with open(out / "results.md") as f:
        assert "post-hoc EMA sigma_rel" in f.read()
    # Another recipe's results beside these: everything is cached, so only the table and plots are redone.
    others = []
    for name in ("edm", "isqrt-b16"):
        others += ["--compare", str(tmp_path / f"mvo-{name}")]
        os.makedirs(others[-1])
        with open(os.path.join(others[-1], "results.json"), "w") as f:
            json.dump({"recipe": name, "models": ["oracle"], "rows": [
                {"split": s, "model": "oracle", "kimg": k, "psnr": 10.0 + k} for s in ("test", "val")
                for k in (0.064, 0.128)]}, f)
    (out / "psnr_vs_kimg_test.png").unlink()
    run_cli([*args, *others], timeout=600)
    with open(out / "results.json") as f:
        assert json.load(f)["commands"] == []
    assert os.path.getsize(out / "psnr_vs_kimg_test.png") > 0
