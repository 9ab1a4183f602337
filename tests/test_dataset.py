import json
import os
import zipfile

import numpy as np
import PIL.Image
import pytest

from dnnlib import UserError
from tests.helpers import make_phantoms, run_cli
from training.dataset import ImageFolderDataset
from training.phantoms import random_ellipse_phantoms


def _write_images(folder, arrays, names):
    for arr, name in zip(arrays, names):
        path = os.path.join(folder, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        PIL.Image.fromarray(arr).save(path)


def test_convert_round_trip_rgb_with_class_folders(tmp_path):
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (20, 24, 3), dtype=np.uint8) for _ in range(6)]
    names = [f"{i % 3}/img{i}.png" for i in range(6)]
    _write_images(tmp_path / "src", arrays, names)
    dest = str(tmp_path / "out.zip")
    run_cli(["dataset_tool.py", "convert", "--source", str(tmp_path / "src"), "--dest", dest])
    ds = ImageFolderDataset(dest, use_labels=True)
    assert len(ds) == 6 and ds.image_shape == [3, 20, 20] and ds.label_dim == 3
    # Files are listed in sorted order: class folder 0 first. Centre crop of 20x24 keeps columns 2..21.
    order = sorted(range(6), key=lambda i: names[i])
    for k, i in enumerate(order):
        item = ds[k]
        expected = arrays[i][:, 2:22].transpose(2, 0, 1).astype(np.float32) / 127.5 - 1
        assert np.allclose(item["image"].numpy(), expected, atol=1e-6)
        assert item["label"].argmax().item() == i % 3 and item["index"] == k


def test_convert_grayscale_resize_and_max_images(tmp_path):
    arrays = [np.full((32, 32), 10 * i, dtype=np.uint8) for i in range(5)]
    _write_images(tmp_path / "src", arrays, [f"a{i}.png" for i in range(5)])
    dest = str(tmp_path / "g.zip")
    run_cli(["dataset_tool.py", "convert", "--source", str(tmp_path / "src"), "--dest", dest, "--resolution", "16",
             "--max-images", "3"])
    ds = ImageFolderDataset(dest)
    assert len(ds) == 3 and ds.image_shape == [1, 16, 16] and ds.label_dim == 0
    assert np.allclose(ds[2]["image"].numpy(), 20 / 127.5 - 1, atol=1e-6)
    with zipfile.ZipFile(dest) as zf:
        assert json.loads(zf.read("dataset.json"))["labels"] is None


def test_phantoms_are_deterministic_and_round_trip(tmp_path):
    a = random_ellipse_phantoms(4, 32, seed=3)
    assert np.array_equal(a, random_ellipse_phantoms(4, 32, seed=3))
    assert not np.array_equal(a, random_ellipse_phantoms(4, 32, seed=4))
    assert np.array_equal(a[2], random_ellipse_phantoms(3, 32, seed=3)[2])  # phantom i depends only on (seed, i)
    assert a.min() >= 0 and a.max() <= 1 and (a > 0.5).mean() > 0.02  # bright skull rim present
    dest = make_phantoms(str(tmp_path / "p.zip"), num=4, resolution=32, seed=3)
    ds = ImageFolderDataset(dest)
    for i in range(4):
        assert np.abs((ds[i]["image"][0].numpy() + 1) / 2 - a[i]).max() <= 0.5 / 255 + 1e-6


def test_xflip_and_max_size(tmp_path):
    dest = make_phantoms(str(tmp_path / "p.zip"), num=10, resolution=16)
    ds = ImageFolderDataset(dest, xflip=True, max_size=4, random_seed=1)
    assert len(ds) == 8
    assert np.array_equal(ds[5]["image"].numpy(), ds[1]["image"].numpy()[:, :, ::-1])
    assert ds[5]["index"] == ds[1]["index"]
    assert [ds[i]["index"] for i in range(4)] == [ImageFolderDataset(dest, max_size=4, random_seed=1)[i]["index"]
                                                  for i in range(4)]


def test_bad_datasets_are_rejected_with_one_sentence(tmp_path):
    corrupt = tmp_path / "bad.zip"
    corrupt.write_bytes(b"PK\x03\x04 this is not really a zip")
    with pytest.raises(UserError, match="zip"):
        ImageFolderDataset(str(corrupt))
    _write_images(tmp_path / "mixed", [np.zeros((8, 8), np.uint8), np.zeros((16, 16), np.uint8)], ["a.png", "b.png"])
    with pytest.raises(UserError, match="mixes image shapes"):
        ImageFolderDataset(str(tmp_path / "mixed"))
    with pytest.raises(UserError, match="does not exist"):
        ImageFolderDataset(str(tmp_path / "nothing-here"))
    # The CLI reports the same in one line and leaves no output behind.
    proc = run_cli(["dataset_tool.py", "convert", "--source", str(tmp_path / "mixed"), "--dest",
                    str(tmp_path / "o.zip")], check=False)
    assert proc.returncode != 0 and "different sizes" in proc.stderr and not os.path.exists(tmp_path / "o.zip")
    assert len(proc.stderr.strip().splitlines()) == 1
