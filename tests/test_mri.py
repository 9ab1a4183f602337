"""MRI data: birdcage simulation, ESPIRiT maps, the fastMRI converter against numpy, MRIDataset, bad input."""

import json
import os
import shlex

import h5py
import numpy as np
import pytest
import torch

from dataset_tool import cli
from dnnlib import UserError
from tests.helpers import REPO
from training.data_tools import (
    MRIDatasetWriter,
    ZipDatasetWriter,
    birdcage_maps,
    convert_fastmri,
    espirit_maps,
    simulate_mri,
)
from training.masks import RandomLineMaskLaw, default_acs
from training.mri import MRIDataset
from training.operators import MultiCoilMRI, channels_to_complex
from training.phantoms import random_ellipse_phantoms


def _np_fft2c(x):
    return np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(x, axes=(-2, -1)), norm="ortho"), axes=(-2, -1))


def _np_ifft2c(k):
    return np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(k, axes=(-2, -1)), norm="ortho"), axes=(-2, -1))


def _phantom_zip(path, num, resolution):
    with ZipDatasetWriter(str(path)) as writer:
        for img in random_ellipse_phantoms(num, resolution, 0):
            writer.add_image(np.rint(img * 255).astype(np.uint8)[:, :, None])
        writer.finish()
    return str(path)


def _write_fastmri_file(path, num_slices=4, coils=6, height=80, width=56, seed=0):
    """A multi-coil file in the real fastMRI layout: `kspace` complex64 (slices, coils, H, W) with the readout
    (H) oversampled 2x, `reconstruction_rss`, `ismrmrd_header` and the usual attributes."""
    rng = np.random.default_rng(seed)
    kspace = np.zeros((num_slices, coils, height, width), np.complex64)
    for s, phantom in enumerate(random_ellipse_phantoms(num_slices, width, seed)):
        image = np.zeros((height, width), np.complex64)
        image[(height - width) // 2 : (height - width) // 2 + width] = phantom * np.exp(1j * rng.uniform(0, 0.5))
        maps = birdcage_maps(coils, height, width, rotation=0.4 * s)
        kspace[s] = _np_fft2c(maps * image) + 1e-4 * (rng.standard_normal(kspace[s].shape)
                                                      + 1j * rng.standard_normal(kspace[s].shape))
    with h5py.File(path, "w") as f:
        f.create_dataset("kspace", data=kspace)
        f.create_dataset("reconstruction_rss", data=np.abs(kspace[:, 0, : width, :]).astype(np.float32))
        f.create_dataset("ismrmrd_header", data=np.bytes_(b"<ismrmrdHeader></ismrmrdHeader>"))
        f.attrs.update({"acquisition": "AXT2", "max": 1.0, "norm": 1.0, "patient_id": "test"})
    return kspace


def _no_leftovers(tmp_path, dest):
    assert not os.path.exists(dest)
    assert not [name for name in os.listdir(tmp_path) if ".tmp-" in name]


def test_birdcage_maps_are_normalised_and_smooth():
    maps = birdcage_maps(8, 33, 32, rotation=0.7)
    np.testing.assert_allclose((np.abs(maps) ** 2).sum(axis=0), 1, atol=1e-5)
    # Smooth: each map's energy lies almost entirely in the central 9x9 of its centred k-space.
    energy = np.abs(_np_fft2c(maps)) ** 2
    assert (energy[:, 12:21, 12:21].sum(axis=(1, 2)) / energy.sum(axis=(1, 2))).min() > 0.95
    assert np.abs(maps[0] - maps[4]).mean() > 0.1  # coils see the object differently


def test_espirit_recovers_true_maps_inside_the_object():
    phantom = random_ellipse_phantoms(1, 64, 3)[0]
    true_maps = birdcage_maps(8, 64, 64, rotation=0.3)
    image = phantom * np.exp(1j * np.linspace(0, 1, 64))[None, :]
    kspace = _np_fft2c(true_maps * image).astype(np.complex64)
    maps = espirit_maps(kspace, calib_width=24, kernel_width=6, thresh=0.02, crop=0.95)
    inside = phantom > 0.05
    cosine = np.abs((np.conj(maps) * true_maps).sum(0)) / (
        np.linalg.norm(maps, axis=0) * np.linalg.norm(true_maps, axis=0) + 1e-12)
    print(f"\nESPIRiT vs true maps inside the object: min |cos| {cosine[inside].min():.5f}, "
          f"mean {cosine[inside].mean():.5f}")
    assert cosine[inside].min() >= 0.99
    with pytest.raises(UserError, match="all-zero"):  # sigpy returns zero maps for this calibration silently
        espirit_maps(kspace, calib_width=8, kernel_width=6, thresh=0.02, crop=0.95)


def _acs_only(kspace, acs):
    """k-space (..., W) with every column outside the `acs` centre columns [W//2 - acs//2, ...) set to zero."""
    out = np.zeros_like(kspace)
    start = kspace.shape[-1] // 2 - acs // 2
    out[..., start : start + acs] = kspace[..., start : start + acs]
    return out


def test_fastmri_converter_matches_numpy(tmp_path):
    raw = _write_fastmri_file(tmp_path / "file_brain_AXT2_000.h5")
    res, acs = 48, 16
    full, under = str(tmp_path / "full"), str(tmp_path / "under")
    cli.main(["fastmri", "--source", str(tmp_path), "--dest", full, "--resolution", str(res), "--acs", str(acs),
              "--kernel-width", "4", "--skip-edge-slices", "1"], standalone_mode=False)
    law = RandomLineMaskLaw(3, acs)
    convert_fastmri(str(tmp_path), under, resolution=res, kernel_width=4, skip_edge_slices=1, mask_law=law,
                    mask_seed=5)

    full_data, under_data = MRIDataset(full), MRIDataset(under)
    assert full_data.fully_sampled and not under_data.fully_sampled and len(full_data) == len(under_data) == 2
    meta, under_meta = (json.load(open(os.path.join(d, "dataset.json"))) for d in (full, under))
    # One width for calibration and normalisation, by default the ACS width, on both storage paths.
    assert meta["maps"]["calib_width"] == under_meta["maps"]["calib_width"] == acs and meta["maps"]["kernel_width"] == 4
    assert meta["normalisation"] == under_meta["normalisation"] and meta["normalisation"]["acs"] == acs
    assert [entry["slice"] for entry in meta["slices"]] == [1, 2]
    for i, s in enumerate([1, 2]):
        # Direct numpy: coil images, image-space centre crop, back to k-space.
        coil_images = _np_ifft2c(raw[s])
        top, left = (raw.shape[2] - res) // 2, (raw.shape[3] - res) // 2
        cropped = _np_fft2c(coil_images[:, top : top + res, left : left + res])

        item = full_data[i]
        maps = item["maps"].numpy()
        assert np.abs(maps).max() > 0.5
        combined = (np.conj(maps) * _np_ifft2c(cropped)).sum(axis=0)
        scale = 1 / np.percentile(np.abs((np.conj(maps) * _np_ifft2c(_acs_only(cropped, acs))).sum(axis=0)), 99)
        assert meta["slices"][i]["scale"] == pytest.approx(scale, rel=1e-4)
        assert under_meta["slices"][i]["scale"] == meta["slices"][i]["scale"]  # the same slice, the same scale
        np.testing.assert_allclose(item["kspace"].numpy(), cropped * scale, atol=1e-4 * np.abs(cropped * scale).max())
        image = item["image"][0].numpy() + 1j * item["image"][1].numpy()
        np.testing.assert_allclose(image, combined * scale, atol=1e-4)  # fully sampled reconstruction

        item = under_data[i]
        mask = item["mask"].numpy()
        np.testing.assert_array_equal(mask, law.sample_for_examples([i], (res, res), 5)[0].numpy())
        assert mask.shape == (1, 1, res) and mask[0, 0, res // 2 - acs // 2 : res // 2 + acs // 2].all()
        zero_filled = (np.conj(item["maps"].numpy()) * _np_ifft2c(cropped * mask)).sum(axis=0)
        np.testing.assert_allclose(item["kspace"].numpy(), cropped * mask * scale, atol=1e-4)
        ours = channels_to_complex(MultiCoilMRI(item["maps"][None]).AH(item["kspace"][None]))[0].numpy()
        np.testing.assert_allclose(ours, zero_filled * scale, atol=1e-4)  # zero-filled reconstruction
        # Maps come from the ACS region only, which undersampling leaves intact.
        np.testing.assert_array_equal(item["maps"].numpy(), maps)
        np.testing.assert_array_equal(item["kspace"].numpy(), full_data[i]["kspace"].numpy() * mask)


def test_readme_fastmri_example_runs_with_the_default_widths(tmp_path):
    """The documented fastMRI command (docs/methods.md), as written, fully sampled and with its `--mask-kind
    lines-random --accel 4`, on a file in the fastMRI layout at its resolution: both run (the old defaults,
    --calib-width 24 > --acs 20, refused the second), calibrate ESPIRiT on the ACS lines the masks keep, and agree
    on every slice's scale."""
    readme = open(os.path.join(REPO, "docs", "methods.md")).read()
    undersampling = "--mask-kind lines-random --accel 4"
    assert f"`{undersampling}`" in readme
    lines = readme.split("python dataset_tool.py fastmri ", 1)[1].split("\n```", 1)[0]
    args = shlex.split(lines.replace("\\\n", " ").split("\n")[0])
    resolution = int(args[args.index("--resolution") + 1])
    skip = int(args[args.index("--skip-edge-slices") + 1])
    source = tmp_path / "multicoil_train"
    source.mkdir()
    _write_fastmri_file(source / "file_brain_AXT2_000.h5", num_slices=2 * skip + 1, coils=4, height=2 * resolution,
                        width=resolution)
    dests = {}
    for name, extra in (("full", []), ("under", undersampling.split())):
        dests[name] = str(tmp_path / name)
        command = list(args)
        command[command.index("--source") + 1], command[command.index("--dest") + 1] = str(source), dests[name]
        cli.main(["fastmri", *command, *extra], standalone_mode=False)
    full, under = (json.load(open(os.path.join(dests[n], "dataset.json"))) for n in ("full", "under"))
    acs = default_acs(resolution)
    assert full["maps"]["calib_width"] == under["maps"]["calib_width"] == under["mask_law"]["acs"] == acs
    assert full["normalisation"]["acs"] == acs and len(full["slices"]) == len(under["slices"]) == 1
    assert full["slices"][0]["scale"] == under["slices"][0]["scale"]


def test_fastmri_bad_input_is_rejected_and_nothing_is_written(tmp_path):
    dest = str(tmp_path / "out")
    no_kspace = tmp_path / "no_kspace.h5"
    with h5py.File(no_kspace, "w") as f:
        f.create_dataset("image", data=np.zeros((2, 8, 8), np.float32))
    single = tmp_path / "single.h5"
    with h5py.File(single, "w") as f:
        f.create_dataset("kspace", data=np.zeros((2, 32, 32), np.complex64))
    good = tmp_path / "good"
    good.mkdir()
    _write_fastmri_file(good / "a.h5", num_slices=2, coils=4, height=48, width=32)
    cases = [
        (dict(source=str(no_kspace)), "no 'kspace'"),
        (dict(source=str(single)), "single-coil"),
        (dict(source=str(good), resolution=64), "smaller than --resolution"),
        (dict(source=str(good), calib_width=24, mask_law=RandomLineMaskLaw(4, 8)), "--calib-width \\(24\\) <= --acs"),
        (dict(source=str(good), calib_width=4, kernel_width=6), "--kernel-width \\(6\\) <= --calib-width"),
        (dict(source=str(good), acs=12, mask_law=RandomLineMaskLaw(4, 8)), "keeps 8 centre lines, fewer than the 12"),
        (dict(source=str(good), acs=40), "need 1 <= acs <= 32"),
        (dict(source=str(good)), "all-zero"),  # fails mid-way
        (dict(source=str(good), resolution=32, skip_edge_slices=1), "no slices"),
        (dict(source=str(tmp_path / "missing.h5")), "does not exist"),
    ]
    for kwargs, message in cases:
        with pytest.raises(UserError, match=message):
            convert_fastmri(dest=dest, **{"resolution": 32, "acs": 8, **kwargs})
        _no_leftovers(tmp_path, dest)


def test_simulate_mri_is_deterministic_and_consistent(tmp_path):
    source = _phantom_zip(tmp_path / "phantoms.zip", 3, 32)
    a, b, c = (str(tmp_path / name) for name in ("a", "b", "c"))
    cli.main(["simulate-mri", "--source", source, "--dest", a, "--coils", "4", "--seed", "1"], standalone_mode=False)
    simulate_mri(source, b, num_coils=4, seed=1)
    simulate_mri(source, c, num_coils=4, seed=2, max_images=2)
    data_a, data_b, data_c = MRIDataset(a), MRIDataset(b), MRIDataset(c)
    assert len(data_a) == 3 and len(data_c) == 2 and data_a.num_coils == 4 and data_a.resolution == 32
    phantoms = random_ellipse_phantoms(3, 32, 0)
    for i in range(2):
        torch.testing.assert_close(data_a[i]["kspace"], data_b[i]["kspace"], rtol=0, atol=0)
        assert not torch.equal(data_a[i]["kspace"], data_c[i]["kspace"])
        maps = data_a[i]["maps"].numpy()
        np.testing.assert_allclose((np.abs(maps) ** 2).sum(axis=0), 1, atol=1e-5)
        # The coil-combined image has the source magnitude (8-bit PNG) times the slice's normalisation scale, which
        # brings the 99th percentile of the ACS image's magnitude (default ACS width 32 // 8 = 4) to 1.
        scale = data_a.meta["slices"][i]["scale"]
        magnitude = data_a[i]["image"].norm(dim=0).numpy() / scale
        np.testing.assert_allclose(magnitude, np.rint(phantoms[i] * 255) / 255, atol=1e-4)
        acs_image = (np.conj(maps) * _np_ifft2c(_acs_only(data_a[i]["kspace"].numpy(), 4))).sum(axis=0)
        assert data_a.meta["normalisation"]["acs"] == 4
        assert np.percentile(np.abs(acs_image), 99) == pytest.approx(1, rel=1e-4)
    assert data_a.describe()["kind"] == "mri" and json.dumps(data_a.describe())


@pytest.mark.parametrize("mask_kind", ["lines-random", "lines-equispaced"])
def test_same_slice_same_scale_fully_sampled_or_undersampled(tmp_path, mask_kind):
    """The same slices stored fully sampled and undersampled (dataset_tool.py simulate-mri, default --acs) get
    exactly the same scale, so the stored undersampled k-space is exactly the fully sampled one times its mask. The
    old rule (99th percentile of the stored image: zero-filled when undersampled) gave scales about 1.4x apart."""
    source = _phantom_zip(tmp_path / "phantoms.zip", 6, 32)
    full, under = str(tmp_path / "full"), str(tmp_path / "under")
    cli.main(["simulate-mri", "--source", source, "--dest", full, "--coils", "4"], standalone_mode=False)
    cli.main(["simulate-mri", "--source", source, "--dest", under, "--coils", "4", "--mask-kind", mask_kind],
             standalone_mode=False)
    full_data, under_data = MRIDataset(full), MRIDataset(under)
    assert full_data.meta["normalisation"] == under_data.meta["normalisation"]
    assert full_data.meta["normalisation"]["acs"] == under_data.meta["mask_law"]["acs"] == default_acs(32)
    for i in range(6):
        assert under_data.meta["slices"][i]["scale"] == full_data.meta["slices"][i]["scale"]
        mask = under_data[i]["mask"]
        torch.testing.assert_close(under_data[i]["kspace"], full_data[i]["kspace"] * mask, rtol=0, atol=0)
        assert 0 < mask.mean() < 0.5


def test_scale_reads_only_the_acs_lines(tmp_path):
    """Perturbing the k-space outside the ACS centre lines leaves the recorded scale unchanged; inside, it moves."""
    rng = np.random.default_rng(0)
    height, width, acs = 24, 32, 6
    maps = birdcage_maps(4, height, width, rotation=0.3)
    image = random_ellipse_phantoms(1, width, 1)[0][(width - height) // 2 : (width + height) // 2]
    kspace = _np_fft2c(maps * image).astype(np.complex64)
    noise = (rng.standard_normal(kspace.shape) + 1j * rng.standard_normal(kspace.shape)).astype(np.complex64)
    outside, inside = noise - _acs_only(noise, acs), _acs_only(noise, acs)
    scales = []
    for name, k in (("a", kspace), ("outside", kspace + 10 * outside), ("inside", kspace + 0.5 * inside)):
        with MRIDatasetWriter(str(tmp_path / name), acs=acs) as writer:
            writer.add(k, maps)
            writer.finish({"fully_sampled": True, "maps": {"kind": "birdcage"}})
        scales.append(MRIDataset(str(tmp_path / name)).meta["slices"][0]["scale"])
    assert scales[1] == scales[0] and abs(scales[2] / scales[0] - 1) > 0.01
    # Independent of the project's operators: 1 / (99th percentile of the numpy ACS image's magnitude).
    reference = np.percentile(np.abs((np.conj(maps) * _np_ifft2c(_acs_only(kspace, acs))).sum(axis=0)), 99)
    assert scales[0] == pytest.approx(1 / reference, rel=1e-5)


def test_mri_dataset_collates_and_rejects_bad_records(tmp_path):
    source = _phantom_zip(tmp_path / "phantoms.zip", 4, 16)
    dest = str(tmp_path / "under")
    law = RandomLineMaskLaw(2, 4)
    simulate_mri(source, dest, num_coils=3, mask_law=law, mask_seed=1)
    batch = next(iter(torch.utils.data.DataLoader(MRIDataset(dest), batch_size=4, num_workers=0)))
    assert batch["kspace"].shape == (4, 3, 16, 16) and batch["kspace"].dtype == torch.complex64
    assert batch["mask"].shape == (4, 1, 1, 16) and batch["label"].shape == (4, 0) and "image" not in batch
    assert bool((batch["kspace"] * (1 - batch["mask"]) == 0).all())

    # A record whose maps and k-space disagree in shape.
    record = os.path.join(dest, "slices", "000001.npz")
    np.savez(record, kspace=np.zeros((3, 16, 16), np.complex64), maps=np.zeros((3, 16, 15), np.complex64),
             mask=np.ones((1, 1, 16), np.float32))
    with pytest.raises(UserError, match="maps"):
        MRIDataset(dest)[1]
    with pytest.raises(UserError):
        MRIDataset(str(tmp_path))  # no dataset.json
    writer_dest = str(tmp_path / "w")
    with pytest.raises(UserError, match="same shape"):
        with MRIDatasetWriter(writer_dest, acs=2) as writer:
            writer.add(np.zeros((3, 8, 8), np.complex64), np.zeros((2, 8, 8), np.complex64))
    _no_leftovers(tmp_path, writer_dest)
    with pytest.raises(UserError, match="exceed"):  # more ACS lines than columns, rejected before writing
        simulate_mri(source, str(tmp_path / "x"), mask_law=RandomLineMaskLaw(2, 20))
    _no_leftovers(tmp_path, str(tmp_path / "x"))
    with pytest.raises(UserError, match="already exists"):
        simulate_mri(source, dest)
