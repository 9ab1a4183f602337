"""Hostile state files, tampered sets and mixed outputs (issue 29 section 4): every case of TABLE exits with status 1
and one sentence naming the file or option, no traceback, and leaves every folder of the test exactly as it was:
training states of another run or with impossible progress, optimizer or RNG contents; broken run options; NaN
weights and coil maps; tampered measurement sets whose hash was recomputed; bad labels; truncated images; record
files outside their folder; output folders that hold another run's results; unwritable output folders.

Each case's input is crafted in the test from one tiny trained run and a few 8x8 images (a few KB on disk), and runs
in this process through the scripts' own entry point (dnnlib.util.run_cli), as tests/test_bad_input.py does.
"""

import dataclasses
import json
import os
import pathlib
import shutil

import numpy as np
import PIL.Image
import pytest
import torch

import generate
import reconstruct
import train
from tests.helpers import assert_refused_leaving_nothing, file_tree, run_in_process, train_in_process, write_mri_records
from tests.test_security import mri_snapshot, small_network
from training import snapshot as checkpoint
from training import tasks

RES = 8
TRAIN = ["--cbase", "4", "--cres", "1", "--blocks", "1", "--attn", "", "--batch", "2", "--workers", "0", "--device",
         "cpu", "--dump", "1", "--seed", "0"]
NAN = float("nan")


def _images(folder, num: int = 4, labels=None) -> str:
    os.makedirs(folder)
    for i in range(num):
        PIL.Image.fromarray(np.full((RES, RES), 30 * i + 10, dtype=np.uint8)).save(os.path.join(folder, f"{i}.png"))
    if labels is not None:
        with open(os.path.join(folder, "dataset.json"), "w") as f:
            json.dump({"labels": [[f"{i}.png", label] for i, label in enumerate(labels)]}, f)
    return str(folder)


def _mri_arrays(coils: int = 2, dtype=np.complex64) -> dict:
    rng = np.random.default_rng(0)
    shape = (coils, RES, RES)
    return {"kspace": (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(dtype),
            "maps": np.full(shape, 1 / np.sqrt(coils), dtype)}


@pytest.fixture(scope="module")
def fx(tmp_path_factory, capsys_module):
    """One tiny run (2 steps of 2 images, a training state at every tick), its image folder, MRI records, and two
    honest measurement sets (images: sr x2; MRI), from which the cases craft their inputs."""
    root = tmp_path_factory.mktemp("fx")
    images = _images(root / "images")
    run_dir = train_in_process(root / "runs", images, 4, capsys_module, TRAIN)
    mri = write_mri_records(str(root / "mri"), [_mri_arrays(), _mri_arrays()])
    for name, args in (("set-sr", ["--data", images, "--task", "sr", "--sr-factor", "2"]),
                       ("set-mri", ["--data", mri, "--task", "mri", "--accel", "2", "--acs", "2"])):
        code, err = run_in_process(reconstruct.main, [*args, "--methods", "zero-filled", "--device", "cpu",
                                                      "--outdir", root / f"out-{name}", "--save-measurements",
                                                      root / name], capsys_module)
        assert code == 0, err
    return {"root": root, "images": images, "run": run_dir, "mri": mri, "set-sr": str(root / "set-sr"),
            "set-mri": str(root / "set-mri"),
            "state": checkpoint.latest_file(run_dir, "training-state"),
            "snapshot": checkpoint.latest_file(run_dir, "network-snapshot")}


@pytest.fixture(scope="module")
def capsys_module():
    """run_in_process reads output through a capsys-like object; module fixtures get this minimal stand-in."""

    class Capture:
        def readouterr(self):
            return type("Out", (), {"out": "", "err": ""})()

    return Capture()


# ----------------------------------------------------------------------------
# Setups: (fx, inp) -> (command, arguments); inp is an empty folder of the case for its crafted inputs.


def train_args(fx, outdir, *extra) -> list:
    return ["--outdir", outdir, "--data", fx["images"], *TRAIN, "--duration", 8e-6, *extra]


def copied_run(fx, inp) -> tuple[str, str]:
    """A copy of the trained run's outdir under inp -> (outdir, path of its latest training state)."""
    outdir = os.path.join(inp, "runs")
    shutil.copytree(os.path.dirname(fx["run"]), outdir)
    state = checkpoint.latest_file(os.path.join(outdir, os.path.basename(fx["run"])), "training-state")
    return outdir, state


def state_case(mutate, resume: bool = False):
    """Continue a copy of the run (implicitly, or with --resume STATE) whose latest state `mutate` changed in place."""

    def setup(fx, inp):
        outdir, path = copied_run(fx, inp)
        state = torch.load(path, weights_only=True)
        mutate(state)
        torch.save(state, path)
        return train.main, train_args(fx, outdir, *(["--resume", path] if resume else []))

    return setup


def progress(**changes):
    return state_case(lambda s: s["progress"].update(changes))


def config_change(section, key, value):
    def mutate(s):
        config = json.loads(s["config"])
        (config[section] if key else config)[key or section] = value
        s["config"] = json.dumps(config)

    return state_case(mutate)


def first_tensor(s, *keys) -> torch.Tensor:
    d = s
    for k in keys:
        d = d[k]
    return next(iter(d.values())) if isinstance(d, dict) else d


def adam(change):
    return state_case(lambda s: change(s["optimizer"]["state"][0], s["optimizer"]["param_groups"][0]))


def rng(change):
    return state_case(lambda s: change(s["rng"][0]))


def options_file(text):
    def setup(fx, inp):
        outdir, state = copied_run(fx, inp)
        with open(os.path.join(os.path.dirname(state), "training_options.json"), "w") as f:
            f.write(text)
        return train.main, train_args(fx, outdir)

    return setup


def labelled(labels):
    def setup(fx, inp):
        images = _images(os.path.join(inp, "img"), labels=labels)
        return train.main, ["--outdir", os.path.join(inp, "runs"), "--data", images, *TRAIN, "--duration", 8e-6,
                            "--cond"]

    return setup


def truncated_state(fx, inp):
    outdir, path = copied_run(fx, inp)
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    return train.main, train_args(fx, outdir)


def truncated_png(fx, inp):
    folder = _images(os.path.join(inp, "img"))
    noise = np.random.default_rng(0).integers(0, 256, (RES, RES), dtype=np.uint8)  # incompressible pixels
    PIL.Image.fromarray(noise).save(os.path.join(folder, "3.png"))
    data = open(os.path.join(folder, "3.png"), "rb").read()
    open(os.path.join(folder, "3.png"), "wb").write(data[: len(data) - 30])  # header intact, pixels cut
    return train.main, ["--outdir", os.path.join(inp, "runs"), "--data", folder, *TRAIN, "--duration", 8e-6]


def linked_png(fx, inp):
    folder = _images(os.path.join(inp, "img"))
    os.replace(os.path.join(folder, "3.png"), os.path.join(inp, "elsewhere.png"))
    os.symlink(os.path.join(inp, "elsewhere.png"), os.path.join(folder, "3.png"))
    return train.main, ["--outdir", os.path.join(inp, "runs"), "--data", folder, *TRAIN, "--duration", 8e-6]


def oversized_transfer(fx, inp):
    """A snapshot whose weights fit the run's network but whose own config describes another, larger one: it used to
    pass --transfer's check and be refused by the training loop, after the run folder existed."""
    data = torch.load(fx["snapshot"], weights_only=True)
    config = json.loads(data["config"])
    config["network"]["kwargs"]["model_channels"] = 64
    path = os.path.join(inp, "big", "network-snapshot-000000.pt")
    os.makedirs(os.path.dirname(path))
    torch.save({**data, "config": json.dumps(config)}, path)
    return train.main, train_args(fx, os.path.join(inp, "runs"), "--transfer", path)


GENERATE = ["--seeds", "0", "--steps", "2", "--device", "cpu"]


def nan_snapshot(fx, inp):
    data = torch.load(fx["snapshot"], weights_only=True)
    first_tensor(data, "ema").view(-1)[0] = NAN
    path = os.path.join(inp, "network-snapshot-000000.pt")
    torch.save(data, path)
    return generate.main, ["--network", path, "--outdir", os.path.join(inp, "out"), *GENERATE]


def maps_case(value, dtype=np.complex64):
    def setup(fx, inp):
        snapshot = mri_snapshot(pathlib.Path(inp), "no-records-needed-with-maps")
        maps = np.full((2, RES, RES), 0.5, dtype)
        maps[1, 2, 3] = value
        np.save(os.path.join(inp, "maps.npy"), maps)
        return generate.main, ["--network", snapshot, "--maps", os.path.join(inp, "maps.npy"), "--outdir",
                               os.path.join(inp, "out"), *GENERATE]

    return setup


def earlier_outputs(command, settings):
    """An --outdir holding an earlier run's output (and its settings.json, unless settings is None)."""

    def setup(fx, inp):
        out = os.path.join(inp, "out")
        os.makedirs(out)
        PIL.Image.fromarray(np.zeros((RES, RES), np.uint8)).save(os.path.join(out, "000000.png"))
        if settings is not None:
            with open(os.path.join(out, "settings.json"), "w") as f:
                f.write(settings if isinstance(settings, str) else json.dumps(settings))
        if command is generate.main:
            return command, ["--network", fx["snapshot"], "--outdir", out, *GENERATE]
        return command, ["--measurements", fx["set-sr"], "--methods", "zero-filled", "--device", "cpu", "--outdir", out]

    return setup


def tampered_set(name, task=None, arrays=None):
    """A copy of measurement set `name` with its task options and/or example arrays changed, and its hash
    recomputed, as a careful tamperer would."""

    def setup(fx, inp):
        path = os.path.join(inp, "set")
        shutil.copytree(fx[name], path)
        with open(os.path.join(path, "measurements.json")) as f:
            meta = json.load(f)
        meta["task"].update(task or {})
        examples = {}
        for index in meta["indices"]:
            file = os.path.join(path, "examples", f"{index:06d}.npz")
            with np.load(file) as z:
                stored = {k: z[k] for k in z.files}
            if arrays is not None:
                arrays(index, stored)
            np.savez(file, **stored)
            fields = {k: torch.from_numpy(stored[k])[None] if k in stored else None for k in tasks.EXAMPLE_FIELDS}
            examples[index] = tasks.Example(index, **fields)
        if set(meta["task"]) <= {f.name for f in dataclasses.fields(tasks.TaskOptions)}:
            meta["hash"] = tasks.MeasurementSet(tasks.TaskOptions(**meta["task"]), examples, "").hash()
        with open(os.path.join(path, "measurements.json"), "w") as f:
            json.dump(meta, f)
        return reconstruct.main, ["--measurements", path, "--methods", "zero-filled", "--device", "cpu", "--outdir",
                                  os.path.join(inp, "out")]

    return setup


def set_value(key, value, index=1):
    def change(i, stored):
        if i == index:
            stored[key] = np.asarray(stored[key]).copy()
            stored[key].reshape(-1)[0] = value

    return change


def replace_array(key, make, index=1):
    def change(i, stored):
        if i == index:
            stored[key] = make(stored[key])

    return change


def mri_records(records, link_outside=False):
    def setup(fx, inp):
        path = write_mri_records(os.path.join(inp, "mri"), records)
        if link_outside:  # slice 1 a symlink to a record outside the dataset folder
            outside = os.path.join(inp, "outside.npz")
            os.replace(os.path.join(path, "slices", "000001.npz"), outside)
            os.symlink(outside, os.path.join(path, "slices", "000001.npz"))
        return reconstruct.main, ["--data", path, "--task", "mri", "--methods", "zero-filled", "--device", "cpu",
                                  "--outdir", os.path.join(inp, "out")]

    return setup


def unwritable(command):
    def setup(fx, inp):
        out = "/proc/msm-hostile-state-test/out"
        if command is train.main:
            return command, train_args(fx, out)
        if command is generate.main:
            return command, ["--network", fx["snapshot"], "--outdir", out, "--grid", os.path.join(inp, "g.png"),
                             *GENERATE]
        return command, ["--measurements", fx["set-sr"], "--methods", "zero-filled", "--device", "cpu", "--outdir", out]

    return setup


def huge_complex128():
    big = _mri_arrays(dtype=np.complex128)
    big["kspace"][0, 1, 1] = 1e300  # finite in complex128, Inf in complex64
    return [_mri_arrays(), big]


# (id, setup, words the sentence must hold)
TABLE = [
    # Training states: progress.
    ("state-cur-nimg-negative-huge", progress(cur_nimg=-1e15), ["progress.cur_nimg"]),
    ("state-cur-nimg-huge", progress(cur_nimg=10**15), ["progress.cur_nimg"]),
    ("state-cur-nimg-text", progress(cur_nimg="4"), ["progress.cur_nimg"]),
    ("state-cur-nimg-not-its-name", progress(cur_nimg=2, data_nimg=2), ["file name"]),
    ("state-cur-tick-negative", progress(cur_tick=-1), ["progress.cur_tick"]),
    ("state-cur-tick-beyond-steps", progress(cur_tick=1000), ["cur_tick 1000"]),
    ("state-total-kimg-nan", progress(total_kimg=NAN), ["progress.total_kimg"]),
    ("state-data-nimg-beyond", progress(data_nimg=6), ["data_nimg 6"]),
    ("state-progress-extra-key", progress(evil=1), ["progress.evil"]),
    ("state-progress-missing", state_case(lambda s: s.pop("progress")), ["progress"]),
    # Training states: network, EMA, optimizer, scaler.
    ("state-net-nan", state_case(lambda s: first_tensor(s, "net").view(-1).__setitem__(0, NAN)), ["(net)", "NaN"]),
    ("state-ema-wrong-shape", state_case(lambda s: s["ema"].update({k: torch.zeros(3) for k in list(s["ema"])[:1]})),
     ["(ema)", "does not fit"]),
    ("state-adam-exp-avg-nan", adam(lambda st, g: st["exp_avg"].view(-1).__setitem__(0, NAN)), ["exp_avg"]),
    ("state-adam-exp-avg-shape", adam(lambda st, g: st.update(exp_avg=torch.zeros(7))), ["exp_avg"]),
    ("state-adam-exp-avg-sq-negative", adam(lambda st, g: st["exp_avg_sq"].view(-1).__setitem__(0, -1.0)),
     ["exp_avg_sq"]),
    ("state-adam-step-negative", adam(lambda st, g: st.update(step=torch.tensor(-5.0))), ["step count"]),
    ("state-adam-step-huge", adam(lambda st, g: st.update(step=torch.tensor(1e9))), ["step count"]),
    ("state-adam-lr-negative", adam(lambda st, g: g.update(lr=-1e20)), ["optimizer's lr"]),
    ("state-adam-betas", adam(lambda st, g: g.update(betas=(0.0, 0.0))), ["optimizer's betas"]),
    ("state-adam-maximize", adam(lambda st, g: g.update(maximize=True)), ["optimizer's maximize"]),
    ("state-adam-no-groups", state_case(lambda s: s["optimizer"].pop("param_groups")), ["optimizer state"]),
    ("state-scaler-negative", state_case(lambda s: s.update(scaler={"scale": -1.0})), ["gradient scaler"]),
    # Training states: RNG.
    ("state-rng-int64", rng(lambda r: r.update(torch=r["torch"].to(torch.int64))), ["rng[0].torch"]),
    ("state-rng-short", rng(lambda r: r.update(loss=r["loss"][:100])), ["rng[0].loss"]),
    ("state-rng-garbage", rng(lambda r: r.update(torch=torch.full_like(r["torch"], 7))), ["rng[0].torch"]),
    ("state-rng-missing-loss", rng(lambda r: r.pop("loss")), ["rng[0]"]),
    ("state-rng-not-a-list", state_case(lambda s: s.update(rng={"torch": 1})), ["rng"]),
    ("state-rng-explicit-resume", state_case(lambda s: s["rng"][0].update(torch=torch.zeros(5, dtype=torch.uint8)),
                                             resume=True), ["rng[0].torch"]),
    # Training states of another run or configuration; broken files.
    ("state-other-network", config_change("network", None, small_network(in_channels=2)), ["network"]),
    ("state-other-seed", config_change("training", "seed", 99), ["seed"]),
    ("state-other-loss", config_change("loss", None, {"class_name": "training.loss.VPLoss"}), ["loss_kwargs"]),
    ("state-truncated", truncated_state, ["training-state-000000.004.pt", "is not a training state of this project"]),
    ("options-not-json", options_file("{\"network\": "), ["training_options.json"]),
    ("options-not-an-object", options_file("[1, 2]"), ["training_options.json"]),
    # Inputs checked before any run folder exists.
    ("transfer-other-own-config", oversized_transfer, ["--transfer", "does not fit"]),
    ("png-truncated", truncated_png, ["3.png", "not a readable image"]),
    ("png-symlinked-outside", linked_png, ["3.png", "outside the dataset folder"]),
    ("labels-negative", labelled([0, 1, -1, 0]), ["dataset.json", "-1"]),
    ("labels-fraction", labelled([0, 1.5, 1, 0]), ["dataset.json", "1.5"]),
    ("labels-bool", labelled([0, True, 1, 0]), ["dataset.json", "True"]),
    ("labels-text", labelled([0, "1", 1, 0]), ["dataset.json", "'1'"]),
    ("labels-huge", labelled([0, 10**9, 1, 0]), ["dataset.json", "1000000000"]),
    ("train-outdir-under-proc", unwritable(train.main), ["--outdir", "cannot be written"]),
    # generate.py.
    ("generate-nan-weights", nan_snapshot, ["NaN", "network-snapshot-000000.pt"]),
    ("generate-nan-maps", maps_case(NAN), ["--maps", "NaN"]),
    ("generate-maps-overflow-complex64", maps_case(1e300, np.complex128), ["--maps", "Inf"]),
    ("generate-outdir-other-settings", earlier_outputs(generate.main, {"seeds": "0-63"}), ["--outdir", "seeds"]),
    ("generate-outdir-unrecorded-files", earlier_outputs(generate.main, None), ["--outdir", "settings.json"]),
    ("generate-outdir-broken-record", earlier_outputs(generate.main, "{"), ["--outdir", "settings.json"]),
    ("generate-outdir-under-proc", unwritable(generate.main), ["--outdir", "cannot be written"]),
    # reconstruct.py: tampered measurement sets (hash recomputed), records, output folders.
    ("set-y-nan", tampered_set("set-sr", arrays=set_value("y", NAN)), ["example 1", "NaN", "y"]),
    ("set-reference-inf", tampered_set("set-sr", arrays=set_value("reference", np.inf)), ["example 1", "reference"]),
    ("set-y-float64", tampered_set("set-sr", arrays=replace_array("y", lambda a: a.astype(np.float64))),
     ["example 1", "float64"]),
    ("set-sigma-y-negative", tampered_set("set-sr", arrays=set_value("sigma_y", -1.0)), ["sigma_y"]),
    ("set-sr-factor-text", tampered_set("set-sr", task={"sr_factor": "x"}), ["task.sr_factor"]),
    ("set-sr-factor-not-dividing", tampered_set("set-sr", task={"sr_factor": 3}), ["--sr-factor 3"]),
    ("set-unknown-task-option", tampered_set("set-sr", task={"evil": 1}), ["task.evil"]),
    ("set-y-of-other-shape", tampered_set("set-sr", arrays=replace_array("y", lambda a: a[:, :2])), ["example 1"]),
    ("set-mri-maps-mismatched", tampered_set("set-mri", arrays=replace_array("maps", lambda a: a[:1])),
     ["example 1", "maps"]),
    ("set-mri-y-not-fitting-maps", tampered_set("set-mri", arrays=replace_array("y", lambda a: a[:1])),
     ["example 1", "y"]),
    ("set-mri-mask-missing", tampered_set("set-mri", arrays=lambda i, s: s.pop("mask") if i == 0 else None),
     ["example 0", "mask"]),
    ("set-mri-law-text", tampered_set("set-mri", task={"mri_mask": {"kind": "lines-random", "R": "x", "acs": 2}}),
     ["task.mri_mask.R"]),
    ("records-complex128-overflow", mri_records(huge_complex128()), ["000001.npz", "Inf"]),
    ("records-slice-symlinked-outside", mri_records([_mri_arrays(), _mri_arrays()], link_outside=True),
     ["slice 1", "inside the dataset folder"]),
    ("reconstruct-outdir-other-settings", earlier_outputs(reconstruct.main, {"methods": "cs-tv"}),
     ["--outdir", "methods"]),
    ("reconstruct-outdir-unrecorded-files", earlier_outputs(reconstruct.main, None), ["--outdir", "settings.json"]),
    ("reconstruct-outdir-under-proc", unwritable(reconstruct.main), ["--outdir", "cannot be written"]),
]


@pytest.mark.parametrize("name, setup, words", TABLE, ids=[case[0] for case in TABLE])
def test_hostile_input_is_refused_in_one_sentence_leaving_nothing(fx, tmp_path, monkeypatch, capsys, name, setup,
                                                                   words):
    inp = tmp_path / "inp"
    inp.mkdir()
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # a write relative to the current folder would show up in the tree too
    command, args = setup(fx, str(inp))
    assert_refused_leaving_nothing(command, args, words, capsys, [tmp_path, fx["root"]])


# ----------------------------------------------------------------------------
# What the checks must still let through.


def test_an_honest_copy_of_a_run_continues_implicitly_and_with_resume(fx, tmp_path, capsys):
    """The state checks accept what the loop writes: the copied run trains on from its state, by rerunning the
    command and by --resume STATE, to the same network."""
    results = []
    for name, resume in (("implicit", False), ("explicit", True)):
        outdir, state = copied_run(fx, str(tmp_path / name))
        code, err = run_in_process(train.main, train_args(fx, outdir, *(["--resume", state] if resume else [])),
                                   capsys)
        assert code == 0, err
        final = checkpoint.latest_file(os.path.dirname(state), "training-state")
        assert checkpoint.progress_of(final, "training-state") == 8
        results.append(checkpoint.load_training_state(final))
    for key in results[0]["net"]:
        torch.testing.assert_close(results[0]["net"][key], results[1]["net"][key], rtol=0, atol=0)


def test_a_rerun_may_overwrite_its_own_outputs_but_not_mix_in_another_runs(fx, tmp_path, capsys):
    out = str(tmp_path / "out")
    command = ["--network", fx["snapshot"], "--outdir", out, *GENERATE]
    for _ in range(2):  # the same command twice: the second overwrites the first's outputs
        code, err = run_in_process(generate.main, command, capsys)
        assert code == 0, err
    with open(os.path.join(out, "settings.json")) as f:
        assert json.load(f)["network_path"] == os.path.abspath(fx["snapshot"])
    before = file_tree(tmp_path)
    code, err = run_in_process(generate.main, [*command, "--seeds", "1"], capsys)
    assert code == 1 and "seeds" in err and "give a new --outdir" in err, err
    assert file_tree(tmp_path) == before
    recon = ["--measurements", fx["set-sr"], "--methods", "zero-filled", "--device", "cpu", "--outdir",
             str(tmp_path / "recon")]
    for _ in range(2):
        code, err = run_in_process(reconstruct.main, recon, capsys)
        assert code == 0, err


def test_symlinks_that_stay_inside_the_dataset_folder_are_read(tmp_path):
    """The confinement rule (docs/security.md) is about where a record resolves, not about symlinks as such: a
    slice linked to another file of the folder, and a dataset folder that is itself a link, are fine."""
    from training.mri import MRIDataset

    path = write_mri_records(str(tmp_path / "real"), [_mri_arrays(), _mri_arrays()])
    os.replace(os.path.join(path, "slices", "000001.npz"), os.path.join(path, "kept.npz"))
    os.symlink(os.path.join(path, "kept.npz"), os.path.join(path, "slices", "000001.npz"))
    os.symlink(path, tmp_path / "linked")
    assert len(MRIDataset(str(tmp_path / "linked"))) == 2


def test_a_snapshot_may_name_records_outside_its_run_folder_for_reading_only(fx, tmp_path, capsys):
    """A snapshot's dataset.path (coil maps for generate.py) may point anywhere, relative paths from the snapshot's
    folder: train.py records the absolute path of the training data, which lies outside the run folder. It is only
    ever opened as an MRI record folder (checked as any dataset), and nothing is written there."""
    records = write_mri_records(str(tmp_path / "data" / "records"), [_mri_arrays(), _mri_arrays()])
    snapshot = mri_snapshot(tmp_path / "runs", "../../data/records")
    before = file_tree(records)
    code, err = run_in_process(generate.main, ["--network", snapshot, "--outdir", tmp_path / "out", "--schedule",
                                               "rho", *GENERATE], capsys)
    assert code == 0, err
    assert os.path.isfile(tmp_path / "out" / "000000.png") and file_tree(records) == before
