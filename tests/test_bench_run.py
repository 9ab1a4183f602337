"""torch_utils/plot.py (PNG size, refusals, where a known point lands) and bench/run.py (its measuring helpers, bad
input, and --quick end to end, slow)."""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch

from torch_utils import plot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_run():
    spec = importlib.util.spec_from_file_location("bench_run_under_test", os.path.join(ROOT, "bench", "run.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------------------------------
# torch_utils/plot.py


def test_line_plot_writes_png_of_the_stated_size(tmp_path):
    path = tmp_path / "p.png"
    axes = plot.line_plot(str(path), "title", "x", "y", {"a": [(1, 2.0), (2, 3.0)], "b": [(1, 1.0), (3, 4.0)]},
                          hlines={"ref": 2.5})
    with PIL.Image.open(path) as img:
        assert img.format == "PNG" and img.size == (plot.WIDTH, plot.HEIGHT) == (axes.width, axes.height)
    assert os.listdir(tmp_path) == ["p.png"]  # no temporary file left beside it


@pytest.mark.parametrize("series, message", [({}, "is empty"), ({"a": []}, "has no points"),
                                             ({"a": [(1, float("nan"))]}, "not a finite")])
def test_line_plot_refuses_bad_series_and_writes_nothing(tmp_path, series, message):
    path = tmp_path / "p.png"
    with pytest.raises(ValueError, match=message):
        plot.line_plot(str(path), "t", "x", "y", series)
    assert os.listdir(tmp_path) == []


def test_line_plot_refuses_non_positive_values_on_a_log_axis(tmp_path):
    with pytest.raises(ValueError, match="log axis needs positive values"):
        plot.line_plot(str(tmp_path / "p.png"), "t", "x", "y", {"a": [(0, 1.0), (1, 2.0)]}, log_x=True)


def _colour_near(img, px, py, colour, radius=1):
    """Whether `colour` is drawn within `radius` pixels of (px, py) (the dot is 7 pixels wide)."""
    a = np.asarray(img)
    x, y = round(px), round(py)
    patch = a[y - radius:y + radius + 1, x - radius:x + radius + 1].reshape(-1, 3)
    return any(tuple(int(c) for c in p) == colour for p in patch)


def test_a_known_point_lands_where_the_linear_axes_map_it(tmp_path):
    """x in [0, 10], y in [0, 20] with 5% room either side: the point (10, 0) is 0.5 / 11 of the plot width from the
    right edge and 1 / 22 of its height above the bottom edge, computed here from the stated margins alone."""
    path = str(tmp_path / "p.png")
    axes = plot.line_plot(path, "t", "x", "y", {"a": [(0, 20.0), (10, 0.0)]})
    inner_w = plot.WIDTH - plot.LEFT - plot.RIGHT
    inner_h = plot.HEIGHT - plot.TOP - plot.BOTTOM
    expected = (plot.LEFT + 10.5 / 11 * inner_w, plot.HEIGHT - plot.BOTTOM - 1 / 22 * inner_h)
    assert axes.pixel(10, 0.0) == pytest.approx(expected)
    with PIL.Image.open(path) as img:
        assert _colour_near(img.convert("RGB"), *expected, plot.PALETTE[0])
        assert not _colour_near(img.convert("RGB"), expected[0], expected[1] - 40, plot.PALETTE[0], radius=3)


def test_a_known_point_lands_where_the_log_axes_map_it(tmp_path):
    """Log axes spanning 1 to 100 cover whole decades [1, 100]: 10 sits in the middle of the plot area."""
    path = str(tmp_path / "p.png")
    axes = plot.line_plot(path, "t", "x", "y", {"a": [(1, 1.0), (10, 10.0), (100, 100.0)]}, log_x=True, log_y=True)
    middle = ((plot.LEFT + plot.WIDTH - plot.RIGHT) / 2, (plot.TOP + plot.HEIGHT - plot.BOTTOM) / 2)
    assert axes.pixel(10, 10.0) == pytest.approx(middle)
    assert axes.x.ticks()[0] == 1 and axes.x.ticks()[-1] == 100
    with PIL.Image.open(path) as img:
        assert _colour_near(img.convert("RGB"), *middle, plot.PALETTE[0])


def test_series_and_reference_lines_get_distinct_colours(tmp_path):
    path = str(tmp_path / "p.png")
    series = {f"s{i}": [(0, float(i)), (1, float(i))] for i in range(4)}
    axes = plot.line_plot(path, "t", "x", "y", series, hlines={"ref": 4.0})
    with PIL.Image.open(path) as img:
        rgb = img.convert("RGB")
        for i in range(4):
            assert _colour_near(rgb, *axes.pixel(0.5, float(i)), plot.PALETTE[i])
        assert len(set(plot.PALETTE[:5])) == 5


# ---------------------------------------------------------------------------------------------------------------------
# bench/run.py helpers


def test_interleaved_calls_every_item_once_per_round_in_shuffled_orders():
    run = load_run()
    calls = []
    items = {name: (lambda n=name: calls.append(n) or len(calls)) for name in "abcdef"}
    values, peaks = run.interleaved(items, rounds=4, warmup=True)
    assert calls[:6] == list("abcdef")  # the warm-up, in order
    rounds = [calls[6 + 6 * r: 12 + 6 * r] for r in range(4)]
    assert all(sorted(r) == list("abcdef") for r in rounds)
    assert len({tuple(r) for r in rounds}) > 1  # the order changes between rounds
    assert all(len(v) == 4 for v in values.values()) and peaks == {}
    _, peaks = run.interleaved(items, rounds=1, warmup=False, memory={"f": "F", "a": "A"}, device=torch.device("cpu"))
    assert list(peaks) == ["F", "A"]  # in the order asked, whatever order the round ran them in


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's /proc/self/clear_refs")
def test_peak_memory_sees_a_temporary_allocation_and_not_a_no_op():
    run = load_run()
    cpu = torch.device("cpu")

    def allocate():
        a = np.ones(64 * 2**20 // 8)  # 64 MiB, touched, then freed
        return float(a.sum())

    assert run.peak_memory_mib(allocate, cpu) >= 60
    assert run.peak_memory_mib(lambda: None, cpu) < 8


def test_acceptance_checks_the_issue_targets_at_batch_8():
    run = load_run()

    def row(case, batch, k, ratio, stub):
        return {"case": case, "batch": batch, "K": k, "msm_over_floor": {"median": ratio}, "stub_estimate": stub}

    rows = [row("gray64", 1, 1, 1.5, 1.2), row("gray64", 8, 1, 1.01, 1.02), row("rgb64", 8, 2, 1.04, 1.005),
            row("mri64", 8, 1, 1.049, 1.06), row("mri64", 8, 2, 1.3, 1.0),
            row("mri64", 64, 1, 2.0, 2.0)]  # batch 64 (CUDA runs) is not the issue's batch
    a = run.acceptance(rows)
    assert a["batch"] == 8
    assert a["mri_K1"]["ratio"] == 1.049 and a["mri_K1"]["met"]
    assert a["mri_K1"]["stub_estimate"] == 1.06 and not a["mri_K1"]["stub_met"]
    assert a["images_worst"]["case"] == "rgb64" and not a["images_worst"]["met"]
    assert a["images_worst"]["stub_case"] == "gray64" and a["images_worst"]["stub_met"]


def test_bad_options_get_one_line_and_write_nothing(tmp_path):
    out = tmp_path / "bench"
    result = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "run.py"), "--out", str(out), "--sections",
                             "sampler,nonsense"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "Error: --sections must be a comma list of sampler, training, loader, edm, got 'sampler,nonsense'."]
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------------------------
# End to end


@pytest.mark.slow
def test_quick_run_writes_json_tables_and_plots(tmp_path):
    out = tmp_path / "bench"
    subprocess.run([sys.executable, os.path.join(ROOT, "bench", "run.py"), "--quick", "--out", str(out)], check=True,
                   cwd=ROOT, timeout=600)
    results = json.loads((out / "results.json").read_text())
    assert {"machine", "settings", "sampler", "training", "loader", "edm_sampler", "plots"} <= set(results)
    assert {"cpu", "logical_cpus", "torch_threads", "torch", "device"} <= set(results["machine"])
    rows = results["sampler"]["rows"]
    assert {(r["case"], r["batch"], r["K"]) for r in rows} == {(c, b, k) for c in ("gray32", "mri64") for b in (1, 2)
                                                               for k in (1, 2)}
    assert all(r["msm_over_floor"]["min"] <= r["msm_over_floor"]["median"] <= r["msm_over_floor"]["max"]
               for r in rows)
    assert all(r["outside_ms_per_step"] > 0 and r["stub_estimate"] > 1 for r in rows)
    assert {"mri_K1", "images_worst"} <= set(results["sampler"]["acceptance"])
    assert {r["loss"] for r in results["training"]["rows"]} == {"EDM (clean)", "MSM eta=0", "MSM eta=0.01 (SURE)",
                                                                "Ambient"}
    assert any(r["path"].startswith("MSM training") for r in results["loader"]["rows"])
    assert all(r["nfe"] == 2 * r["steps"] - 1 for r in results["edm_sampler"]["rows"])  # Heun, the last step Euler
    text = (out / "results.md").read_text()
    for header in ("| case | batch | K | MSM step (ms) |", "| data | loss | images/s | vs EDM |",
                   "| path | images/s | x training |", "| batch | steps (network calls) |",
                   "| workload | peak memory above start (MiB) |"):
        assert header in text
    assert len(results["plots"]) == 4
    for path in results["plots"]:
        with PIL.Image.open(out / os.path.basename(path)) as img:
            assert img.size == (plot.WIDTH, plot.HEIGHT)
    assert sorted(os.listdir(tmp_path)) == ["bench"]  # no staging folder left behind


@pytest.mark.slow
def test_accelerator_section_runs_on_cpu_with_the_eager_compile_backend():
    """The CUDA-only section, exercised on the CPU (no GPU here): bf16 autocast, channels_last and torch.compile with
    the 'eager' backend (dynamo tracing without code generation); its figures mean nothing on a CPU."""
    run = load_run()
    p = dict(run.QUICK, rounds=1)
    result = run.bench_accelerator(p, torch.device("cpu"), log=lambda msg: None, compile_backend="eager")
    assert "error" not in result["training"], result["training"]
    assert "error" not in result["compile"], result["compile"]
    assert {r["configuration"] for r in result["training"]["rows"]} == {"fp32", "fp32 + channels_last", "bf16",
                                                                        "bf16 + channels_last"}
    assert "| what | eager (ms) | compiled (ms) |" in "\n".join(run._accelerator_markdown(result))
