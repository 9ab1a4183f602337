"""Crafted snapshots: a file can only choose values the code expects, and is refused in one sentence, with nothing
written anywhere, when it tries anything else (issue 17: wrong class names, callables from training.*, wrong types,
unknown arguments, foreign measurement configs, data paths outside the run directory)."""

import json
import os

import numpy as np
import PIL.Image
import pytest
import torch

import generate
from dnnlib import UserError
from tests.helpers import file_tree, run_in_process, write_mri_records
from training import snapshot as checkpoint
from training.mri import MRIDataset
from training.networks import network_kwargs_for
from training.snapshot import build_network

RES = 8


def small_network(in_channels: int = 1) -> dict:
    return network_kwargs_for(arch="ddpmpp", precond="edm", img_resolution=RES, in_channels=in_channels,
                              out_channels=in_channels, label_dim=0, cbase=4, cres=[1], num_blocks=1,
                              attn_resolutions=[], dropout=0.0)


def image_config(network: dict | None = None) -> dict:
    return {"network": network or small_network(), "dataset": {"kind": "image", "image_shape": [1, RES, RES]}}


def write_crafted(path, config, weights=None, raw_config: str | None = None) -> str:
    """A weights-only snapshot file whose config is `config` (or the text `raw_config`), with the weights of the
    honest small network unless given: torch.load(weights_only=True) reads it, so only the config can attack."""
    if weights is None:
        weights = {k: v.clone() for k, v in build_network(small_network()).state_dict().items()}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    text = raw_config if raw_config is not None else json.dumps(config)
    torch.save({"format": checkpoint.SNAPSHOT_FORMAT, "config": text, "ema": weights}, path)
    return str(path)


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """A run directory for crafted snapshots, a small image folder an attacker's arguments can point at, and a
    separate current directory, so writes relative to it would show up in the tree too."""
    images = tmp_path / "images"
    images.mkdir()
    for i in range(2):
        PIL.Image.fromarray(np.full((RES, RES), 40 * i, dtype=np.uint8)).save(images / f"{i}.png")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return tmp_path


def assert_refused(path, workspace, *fields, check=checkpoint.load_snapshot):
    """Loading `path` raises one UserError sentence naming the file and the fields, and writes nothing."""
    before = file_tree(workspace)
    with pytest.raises(UserError) as error:
        check(path)
    message = str(error.value)
    assert "\n" not in message and message.endswith("."), message
    assert str(path) in message, message
    for field in fields:
        assert field in message, message
    assert file_tree(workspace) == before


def test_callable_from_training_is_never_called(workspace):
    """The issue's attack: the config names training.mri.simulate_mri with a dest chosen by the file. The old loader
    called it (writing a dataset there); now the class name is refused before anything runs."""
    target = workspace / "written-by-the-snapshot"
    config = image_config({"class_name": "training.mri.simulate_mri",
                           "kwargs": {"source": str(workspace / "images"), "dest": str(target)}})
    path = write_crafted(workspace / "run" / "network-snapshot-000000.pt", config)
    assert_refused(path, workspace, "network.class_name", "training.mri.simulate_mri")
    assert not target.exists()


@pytest.mark.parametrize("class_name", ["training.networks.SongUNet", "training.dataset.open_dataset",
                                        "torch.nn.Linear", "training.networks.EDMPrecond.__init__"])
def test_names_outside_the_registry_are_refused(workspace, class_name):
    """SongUNet is a real class of training.networks, but not a network a snapshot may name on its own."""
    kwargs = {k: v for k, v in small_network()["kwargs"].items() if k != "model_type"}
    path = write_crafted(workspace / "run" / "snap.pt", image_config({"class_name": class_name, "kwargs": kwargs}))
    assert_refused(path, workspace, "network.class_name")


@pytest.mark.parametrize("field, value", [
    ("model_channels", "4"),  # a string where an integer belongs
    ("channel_mult", [1.5]),
    ("img_resolution", True),
    ("dropout", {"class_name": "training.mri.simulate_mri"}),
    ("model_type", "training.mri.simulate_mri"),
    ("init_seed", -1),  # out of range
    ("dropout", float("nan")),  # JSON's NaN
    ("label_dim", 10**30),
    ("resample_filter", [1] * 40),  # too many taps
])
def test_wrong_types_and_ranges_are_refused(workspace, field, value):
    network = small_network()
    network["kwargs"][field] = value
    path = write_crafted(workspace / "run" / "snap.pt", image_config(network))
    assert_refused(path, workspace, f"network.kwargs.{field}")


def test_settings_that_do_not_fit_together_are_refused_naming_the_file(workspace):
    network = small_network()
    network["kwargs"].update(img_resolution=6, channel_mult=[1, 2, 2])  # 6 cannot be halved twice
    path = write_crafted(workspace / "run" / "snap.pt", image_config(network))
    assert_refused(path, workspace, "network.kwargs", "img_resolution 6")


def test_unknown_keyword_arguments_are_refused(workspace):
    network = small_network()
    network["kwargs"]["dest"] = str(workspace / "elsewhere")
    path = write_crafted(workspace / "run" / "snap.pt", image_config(network))
    assert_refused(path, workspace, "network.kwargs.dest", "not a known field")


@pytest.mark.parametrize("section, value, field", [
    ("measurement", {"operator": "identity", "mask": {"kind": "box", "p": 0.4}, "sigma_y": 0.0,
                     "class_name": "training.mri.simulate_mri"}, "measurement.class_name"),
    ("measurement", {"operator": "identity", "mask": {"kind": "box", "p": "0.4"}}, "measurement.mask.p"),
    ("measurement", {"operator": "identity", "mask": {"kind": "training.mri.simulate_mri"}}, "measurement.mask.kind"),
    ("measurement", {"operator": "mri", "mask": {"kind": "lines-random", "R": 4, "acs": "2"}}, "measurement.mask.acs"),
    ("measurement", {"operator": "shell", "mask": {"kind": "full"}}, "measurement.operator"),
    ("measurement", {"operator": "identity", "mask": {"kind": "box", "p": 7.0}}, "p must be a number in [0, 1)"),
    ("loss", {"class_name": "training.mri.simulate_mri"}, "loss.class_name"),
    ("dataset", {"kind": "image", "image_shape": [1, RES, RES], "path": 7}, "dataset.path"),
    ("dataset", {"kind": "image", "image_shape": "1,8,8"}, "dataset.image_shape"),
    ("extra", {"anything": 1}, "config.extra"),
    ("power_ema", {"sigma_rel": 0, "step": 1, "nimg": 8}, "power_ema.sigma_rel must lie in (0, 0.3003)"),
    ("power_ema", {"sigma_rel": 0.31, "step": 1, "nimg": 8}, "power_ema.sigma_rel"),
    ("power_ema", {"sigma_rel": 0.1, "step": 0, "nimg": 8}, "power_ema.step"),
    ("power_ema", {"sigma_rel": 0.1, "step": 1}, "power_ema.nimg is missing"),
    ("power_ema", {"sigma_rel": 0.1, "step": 9, "nimg": 8}, "power_ema.step 9 exceeds the 8 examples"),
])
def test_every_other_config_field_is_validated(workspace, section, value, field):
    config = image_config()
    config[section] = value
    path = write_crafted(workspace / "run" / "snap.pt", config)
    assert_refused(path, workspace, field)


def test_config_that_is_not_json_and_weights_that_do_not_fit_are_refused(workspace):
    path = write_crafted(workspace / "run" / "a.pt", None, raw_config="{'network': not json")
    assert_refused(path, workspace, "not JSON")
    weights = {k: v.clone() for k, v in build_network(small_network(in_channels=2)).state_dict().items()}
    path = write_crafted(workspace / "run" / "b.pt", image_config(), weights=weights)
    assert_refused(path, workspace, "does not fit the network of its config")


def test_relative_data_path_is_resolved_against_the_run_directory(workspace):
    """A stored relative path means 'beside the snapshot', never 'wherever the user runs the command from'."""
    config = image_config()
    config["dataset"]["path"] = "data/train"
    path = write_crafted(workspace / "run" / "snap.pt", config)
    _, loaded = checkpoint.load_snapshot(path)
    assert loaded["dataset"]["path"] == str(workspace / "run" / "data" / "train")


def mri_snapshot(workspace, data_path: str) -> str:
    config = {"network": small_network(in_channels=2),
              "dataset": {"kind": "mri", "path": data_path, "num_coils": 2, "shape": [RES, RES]},
              "measurement": {"operator": "mri", "mask": {"kind": "lines-random", "R": 2.0, "acs": 2},
                              "sigma_y": 0.0, "protocol": "fixed", "seed": 0}}
    weights = {k: v.clone() for k, v in build_network(small_network(in_channels=2)).state_dict().items()}
    return write_crafted(workspace / "run" / "network-snapshot-000000.pt", config, weights=weights)


def test_data_path_outside_the_run_directory_that_holds_no_records_is_refused_naming_maps(workspace, capsys):
    """generate.py on an MRI snapshot whose coil-map records point elsewhere: one sentence naming the resolved path
    and --maps, and no output folder."""
    snapshot = mri_snapshot(workspace, "../../../elsewhere/records")
    before = file_tree(workspace)
    code, err = run_in_process(generate.main, ["--network", snapshot, "--outdir", workspace / "out", "--seeds", "0",
                                               "--device", "cpu"], capsys)
    assert code == 1 and err.count("\n") == 1 and err.startswith("Error: "), err
    assert "--maps" in err and os.path.normpath(workspace / "run" / "../../../elsewhere/records") in err, err
    assert file_tree(workspace) == before


def test_record_files_outside_the_dataset_folder_are_refused(workspace):
    """dataset.json is data too: a slice entry may not point outside its folder (here at a real record elsewhere)."""
    arrays = {"kspace": np.ones((2, RES, RES), np.complex64), "maps": np.ones((2, RES, RES), np.complex64)}
    write_mri_records(str(workspace / "other"), [arrays])
    records = write_mri_records(str(workspace / "records"), [arrays])
    meta_path = os.path.join(records, "dataset.json")
    with open(meta_path) as f:
        meta = json.load(f)
    meta["slices"][0]["file"] = "../other/slices/000000.npz"
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    assert_refused(records, workspace, "slice 0 must name an .npz file inside the dataset folder", check=MRIDataset)
