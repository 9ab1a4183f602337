"""Acquired (undersampled) fastMRI data end to end (issue 25): synthetic files in fastMRI's layout (k-space, mask,
ISMRMRD header XML, attributes), the k-space phase-encode crop, the identity between a slice stored from an
undersampled file and the same slice undersampled retrospectively, bad files, the noise estimate, fastMRI's mask
functions, and MSM trained on acquired masks."""

import json
import os

import h5py
import numpy as np
import pytest
import torch

from dnnlib import UserError
from tests.helpers import run_cli
from training.data_tools import birdcage_maps, convert_fastmri, noise_std_estimate
from training.masks import (
    AcquiredMaskLaw,
    FastMRIEquispacedMaskLaw,
    FastMRIRandomMaskLaw,
    coverage_aware_masks,
    empty_coverage,
    mask_law_from_config,
)
from training.mri import MRIDataset
from training.phantoms import random_ellipse_phantoms

HEADER = """<?xml version="1.0" encoding="utf-8"?>
<ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">
  <encoding>
    <encodedSpace><matrixSize><x>{h}</x><y>{w}</y><z>1</z></matrixSize></encodedSpace>
    <reconSpace><matrixSize><x>{r}</x><y>{r}</y><z>1</z></matrixSize></reconSpace>
    <encodingLimits>
      <kspace_encoding_step_1><minimum>0</minimum><maximum>{wmax}</maximum><center>{wc}</center></kspace_encoding_step_1>
    </encodingLimits>
  </encoding>
</ismrmrdHeader>"""


def _np_fft2c(x):
    return np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(x, axes=(-2, -1)), norm="ortho"), axes=(-2, -1))


def fully_sampled_kspace(num_slices, coils, height, width, noise_std, seed=0):
    """(slices, coils, H, W) complex64: a phantom in the central half of the readout rows (2x oversampled, as
    fastMRI), birdcage coils, plus white complex noise of std `noise_std` per real component."""
    rng = np.random.default_rng(seed)
    kspace = np.zeros((num_slices, coils, height, width), np.complex64)
    for s, phantom in enumerate(random_ellipse_phantoms(num_slices, width, seed)):
        image = np.zeros((height, width), np.complex64)
        top = (height - width) // 2
        image[top : top + width] = phantom * np.exp(1j * rng.uniform(0, 0.5))
        kspace[s] = _np_fft2c(birdcage_maps(coils, height, width, rotation=0.4 * s) * image)
        kspace[s] += noise_std * (rng.standard_normal(kspace[s].shape) + 1j * rng.standard_normal(kspace[s].shape))
    return kspace


def write_fastmri_file(path, kspace, mask=None, num_low=None, header=True, acceleration=4):
    """fastMRI's multi-coil layout: `kspace`, the `ismrmrd_header` XML, attributes; undersampled files (mask given)
    also `mask` (W,) and the attributes `acceleration` and `num_low_frequency`, with k-space zero off the mask."""
    height, width = kspace.shape[-2:]
    with h5py.File(path, "w") as f:
        masked = mask is not None and len(mask) == width
        f.create_dataset("kspace", data=kspace * (mask > 0) if masked else kspace)
        if header:
            f.create_dataset("ismrmrd_header", data=np.bytes_(HEADER.format(h=height, w=width, r=height // 2,
                                                                              wmax=width - 1, wc=width // 2).encode()))
        f.attrs.update({"acquisition": "AXT2", "max": 1.0, "norm": 1.0, "patient_id": "synthetic"})
        if mask is not None:
            f.create_dataset("mask", data=mask.astype(np.float32))
            f.attrs.update({"acceleration": acceleration, "num_low_frequency": num_low})
    return str(path)


def fastmri_mask(width, seed, R=4, center_fraction=0.08):
    """A fastMRI RandomMaskFunc mask (W,) bool, as the challenge files hold."""
    law = FastMRIRandomMaskLaw(R, center_fraction)
    return law.sample(1, (1, width), torch.Generator().manual_seed(seed)).reshape(-1).numpy() > 0, \
        law.centre_lines(width)


def records(path):
    data = MRIDataset(path)
    return data, [data[i] for i in range(len(data))]


def test_acquired_slice_equals_the_retrospectively_undersampled_one(tmp_path):
    """640 x 320, 4 coils, R = 4 with fastMRI's 8% centre (26 lines), cropped to 256: the phase-encode window keeps
    every acquired line inside it and no other; k-space, maps and scale equal those of the fully sampled slice
    stored with the same crop and undersampled with the same mask (ESPIRiT and the scale read only the ACS lines)."""
    height, width, res = 640, 320, 256
    full_kspace = fully_sampled_kspace(1, 4, height, width, noise_std=2e-3)
    mask, num_low = fastmri_mask(width, seed=3)
    full_dir, acq_dir = tmp_path / "full", tmp_path / "acquired"
    full_dir.mkdir(), acq_dir.mkdir()
    write_fastmri_file(full_dir / "file_brain_AXT2_000.h5", full_kspace)
    write_fastmri_file(acq_dir / "file_brain_AXT2_000.h5", full_kspace, mask, num_low)
    convert_fastmri(str(acq_dir), str(tmp_path / "acq"), resolution=res)
    convert_fastmri(str(full_dir), str(tmp_path / "full-k"), resolution=res, acs=num_low, phase_crop="kspace")
    acquired, acquired_items = records(str(tmp_path / "acq"))
    full, full_items = records(str(tmp_path / "full-k"))
    meta = acquired.meta
    window = mask[width // 2 - res // 2 : width // 2 + res // 2]
    assert not acquired.fully_sampled and meta["normalisation"]["acs"] == num_low == 26
    assert meta["source"]["acquired"] and meta["source"]["files"][0]["num_low_frequency"] == num_low
    assert meta["mask_law"]["kind"] == "acquired"
    assert meta["mask_law"]["masks"] == ["".join("01"[int(v)] for v in window)]
    for i, (a, f) in enumerate(zip(acquired_items, full_items)):
        stored = a["mask"].reshape(-1).numpy() > 0
        np.testing.assert_array_equal(stored, window)  # every acquired line of the window, and no other
        nonzero = a["kspace"].abs().amax(dim=(0, 1)).numpy() > 0
        np.testing.assert_array_equal(nonzero, window)
        entry, full_entry = meta["slices"][i], full.meta["slices"][i]
        assert entry["source"] == "file_brain_AXT2_000.h5" and entry["slice"] == i
        assert entry["acquired_lines"] == window.sum() and entry["acquired_lines_outside_window"] == mask.sum() - \
            window.sum()
        assert entry["scale"] == pytest.approx(full_entry["scale"], rel=1e-5)
        torch.testing.assert_close(a["maps"], f["maps"], atol=1e-4, rtol=0)
        peak = f["kspace"].abs().max()
        torch.testing.assert_close(a["kspace"], f["kspace"] * a["mask"], atol=1e-5 * peak, rtol=0)
    # The window itself against numpy: readout cropped in image space (1-D, rows only), columns cut in k-space.
    rows = np.fft.fftshift(np.fft.ifft(np.fft.ifftshift(full_kspace[0], axes=-2), axis=-2, norm="ortho"), axes=-2)
    rows = rows[:, (height - res) // 2 : (height + res) // 2]
    expected = np.fft.fftshift(np.fft.fft(np.fft.ifftshift(rows, axes=-2), axis=-2, norm="ortho"), axes=-2)
    expected = expected[..., width // 2 - res // 2 : width // 2 + res // 2] * full.meta["slices"][0]["scale"]
    np.testing.assert_allclose(full_items[0]["kspace"].numpy(), expected, atol=1e-5 * np.abs(expected).max())


def test_noise_estimate_recovers_known_noise(tmp_path):
    """White noise of known std on a 640 x 320 8-coil slice: the readout-oversampling estimate is within 3% on
    fully sampled and on 4x undersampled data, and the dataset records it per slice in stored units."""
    sigma = 3e-3
    kspace = fully_sampled_kspace(1, 8, 640, 320, noise_std=sigma, seed=1)
    mask, num_low = fastmri_mask(320, seed=0)
    assert noise_std_estimate(kspace[0], None) == pytest.approx(sigma, rel=0.03)
    assert noise_std_estimate(kspace[0] * mask, mask) == pytest.approx(sigma, rel=0.03)
    assert noise_std_estimate(kspace[0], None) > 10 * noise_std_estimate(fully_sampled_kspace(1, 8, 640, 320, 0)[0],
                                                                          None)
    source = tmp_path / "src"
    source.mkdir()
    write_fastmri_file(source / "a.h5", kspace[:, :4], mask, num_low)
    convert_fastmri(str(source), str(tmp_path / "out"), resolution=320)
    meta = json.load(open(tmp_path / "out" / "dataset.json"))
    entry = meta["slices"][0]
    assert entry["noise_std"] / entry["scale"] == pytest.approx(sigma, rel=0.03)
    assert meta["noise"]["median"] == entry["noise_std"]


def test_malformed_undersampled_files_are_refused_and_write_nothing(tmp_path):
    kspace = fully_sampled_kspace(1, 4, 64, 32, noise_std=1e-3)
    mask, num_low = fastmri_mask(32, seed=0, center_fraction=0.25 * 0.9)
    no_acs = mask.copy()
    no_acs[16] = False
    cases = {
        "expected a mask of shape \\(32,\\)": dict(mask=np.ones(30, bool), num_low=num_low),
        "does not contain the 7 centre lines": dict(mask=no_acs, num_low=num_low),
        "has no 'ismrmrd_header'": dict(mask=mask, num_low=num_low, header=False),
        "no integer attribute 'num_low_frequency'": dict(mask=mask, num_low=2.5),
    }
    for message, kwargs in cases.items():
        source = tmp_path / "src"
        source.mkdir()
        write_fastmri_file(source / "a.h5", kspace, **kwargs)
        dest = tmp_path / "out"
        with pytest.raises(UserError, match=message) as error:
            convert_fastmri(str(source), str(dest), resolution=32)
        assert str(error.value).count(". ") == 0  # one sentence
        assert not dest.exists() and not [n for n in os.listdir(tmp_path) if ".tmp-" in n]
        os.remove(source / "a.h5")
        os.rmdir(source)
    source = tmp_path / "src"
    source.mkdir()
    write_fastmri_file(source / "a.h5", kspace, mask, num_low)
    others = {"too few for ESPIRiT's --kernel-width 8": dict(kernel_width=8),
              "--mask-kind must be none": dict(mask_law=FastMRIRandomMaskLaw(4, 0.08)),
              "--acs 12 exceeds the 7 centre lines": dict(acs=12),
              "--phase-crop must be image or kspace \\(kspace for undersampled": dict(phase_crop="image")}
    for message, kwargs in others.items():
        with pytest.raises(UserError, match=message):
            convert_fastmri(str(source), str(tmp_path / "out"), resolution=32, **kwargs)
        assert not (tmp_path / "out").exists()
    write_fastmri_file(source / "b.h5", kspace)
    with pytest.raises(UserError, match="mixes undersampled files"):
        convert_fastmri(str(source), str(tmp_path / "out"), resolution=32)


# fastMRI's subsample.py (RandomMaskFunc, EquispacedMaskFunc) run out of tree on masks of 320 and 368 columns gives
# these numbers (num_low_freqs; line counts of the equispaced masks for offsets 0, 1, ...; E[lines] of the random
# masks = W / R exactly), and these columns for the 8x equispaced mask with offset 0 at W = 320.
FASTMRI_COUNTS = {
    (320, 4, 0.08): (26, [80, 80, 80, 80, 80], 80.0),
    (320, 8, 0.04): (13, [41, 40, 40, 40, 40, 40, 39, 39, 40, 40, 40], 40.0),
    (368, 4, 0.08): (29, [93, 93, 92, 91, 91], 92.0),
    (368, 8, 0.04): (15, [47, 47, 47, 46, 46, 46, 45, 45, 45, 45, 46], 46.0),
}
FASTMRI_EQUISPACED_320_8X_OFFSET_0 = [0, 11, 23, 34, 45, 57, 68, 80, 91, 102, 114, 125, 136, 148, *range(154, 167),
                                      171, 182, 193, 205, 216, 227, 239, 250, 262, 273, 284, 296, 307, 318]


@pytest.mark.parametrize("width,R,center_fraction", list(FASTMRI_COUNTS))
def test_fastmri_mask_laws_reproduce_fastmri_line_counts(width, R, center_fraction):
    num_low, equispaced_counts, expected_lines = FASTMRI_COUNTS[(width, R, center_fraction)]
    equispaced = mask_law_from_config({"kind": "fastmri-equispaced", "R": R, "center_fraction": center_fraction})
    random = mask_law_from_config({"kind": "fastmri-random", "R": R, "center_fraction": center_fraction})
    assert isinstance(equispaced, FastMRIEquispacedMaskLaw) and equispaced.centre_lines(width) == num_low
    assert equispaced._groups(width).sum(dim=1).tolist() == equispaced_counts
    assert random.expected_mask((1, width)).sum().item() == pytest.approx(expected_lines, abs=1e-9)
    masks = random.sample(4000, (1, width), torch.Generator().manual_seed(0)).reshape(4000, width)
    start = (width - num_low + 1) // 2  # fastMRI's centre block, kept by every mask
    assert masks[:, start : start + num_low].all() and masks.sum(dim=1).float().mean() == pytest.approx(
        expected_lines, rel=0.01)
    drawn = equispaced.sample(200, (1, width), torch.Generator().manual_seed(0)).reshape(200, width).sum(dim=1)
    assert set(drawn.long().tolist()) == set(equispaced_counts)
    if (width, R) == (320, 8):
        assert torch.nonzero(equispaced._groups(width)[0]).reshape(-1).tolist() == FASTMRI_EQUISPACED_320_8X_OFFSET_0


def test_acquired_law_draws_from_the_acquired_masks():
    masks = np.stack([fastmri_mask(64, seed=s, R=4, center_fraction=0.125)[0] for s in range(3)] * 2
                     + [fastmri_mask(64, seed=9, R=4, center_fraction=0.125)[0]])
    by_frequency = AcquiredMaskLaw.from_masks(masks, acs=8)
    config = by_frequency.to_config()
    assert sorted(config["counts"]) == [1, 2, 2, 2] and config["draw"] == "frequencies"
    torch.testing.assert_close(mask_law_from_config(json.loads(json.dumps(config))).expected_mask((1, 64)),
                               torch.from_numpy(masks.mean(axis=0)).reshape(1, 1, 1, 64))
    drawn = by_frequency.sample(20000, (1, 64), torch.Generator().manual_seed(1)).reshape(20000, 64)
    np.testing.assert_allclose(drawn.mean(dim=0).numpy(), masks.mean(axis=0), atol=0.015)
    by_mask = mask_law_from_config({**config, "draw": "masks"})
    drawn = by_mask.sample(7000, (1, 64), torch.Generator().manual_seed(2)).reshape(7000, 64).numpy() > 0
    distinct = {m.tobytes(): (masks == m).all(axis=1).mean() for m in masks}
    for pattern, share in distinct.items():  # each acquired mask, as often as the data hold it
        assert (drawn == np.frombuffer(pattern, bool)).all(axis=1).mean() == pytest.approx(share, abs=0.02)
    covered = empty_coverage(by_frequency, 4, (1, 64))
    chosen, covered = coverage_aware_masks(by_frequency, 3, (1, 64), covered, torch.Generator().manual_seed(3))
    assert (chosen.reshape(3, 4, 64)[..., masks.max(axis=0) == 0] == 0).all()  # never a line no record acquired
    with pytest.raises(UserError, match="holds masks of 64 columns"):
        by_frequency.sample(1, (1, 32), None)
    with pytest.raises(UserError, match="not every mask keeps the 8 centre lines"):
        AcquiredMaskLaw.from_masks(np.eye(64, dtype=bool)[:2], acs=8)


@pytest.mark.slow  # four subprocesses: about 60 s on an idle 2-core machine, 200 s on a loaded one
def test_msm_trains_generates_and_reconstructs_from_acquired_masks(tmp_path):
    """Tiny end to end: two undersampled files (different masks per volume, as fastMRI's) -> dataset_tool.py
    fastmri -> MSM training (noisy, sigma_y = the dataset's noise estimate) on each slice's own acquired mask ->
    generation and reconstruction of the acquired slices, whose snapshot law is 'acquired'."""
    source = tmp_path / "acquired"
    source.mkdir()
    for v in range(2):
        mask = np.zeros(32, bool)
        mask[10:22] = True  # 12 acquired centre lines
        mask[np.random.default_rng(v).choice([c for c in range(32) if not 10 <= c < 22], 6, replace=False)] = True
        write_fastmri_file(source / f"file_brain_AXT2_{v:03d}.h5", fully_sampled_kspace(2, 4, 64, 32, 1e-3, seed=v),
                           mask, num_low=12, acceleration=2)
    data = str(tmp_path / "data")
    run_cli(["dataset_tool.py", "fastmri", "--source", str(source), "--dest", data, "--resolution", "32",
             "--kernel-width", "4"])
    meta = json.load(open(os.path.join(data, "dataset.json")))
    assert meta["mask_law"]["kind"] == "acquired" and len(meta["mask_law"]["masks"]) == 2
    sigma_y = f"{meta['noise']['median']:.6g}"
    run_cli(["train.py", "--outdir", str(tmp_path / "runs"), "--data", data, "--loss", "msm", "--sigma-y", sigma_y,
             "--duration", str(8 / 1e6), "--tick", str(4 / 1000), "--arch", "ddpmpp", "--cbase", "8", "--cres", "1,2",
             "--blocks", "1", "--attn", "", "--batch", "4", "--snap", "1", "--dump", "1", "--workers", "0"])
    (run_dir,) = [os.path.join(tmp_path / "runs", d) for d in os.listdir(tmp_path / "runs")]
    options = json.load(open(os.path.join(run_dir, "training_options.json")))
    assert options["measurement"]["protocol"] == "stored" and options["measurement"]["mask"]["kind"] == "acquired"
    assert options["measurement"]["sigma_y"] == float(sigma_y)
    run_cli(["generate.py", "--network", run_dir, "--outdir", str(tmp_path / "samples"), "--seeds", "0-1",
             "--sampler", "msm", "--subsets", "2", "--steps", "3", "--acquired-draw", "masks"])
    assert len([n for n in os.listdir(tmp_path / "samples") if n.endswith(".png")]) >= 2
    run_cli(["reconstruct.py", "--network", run_dir, "--data", data, "--task", "mri", "--num", "2", "--steps", "2",
             "--methods", "msm,zero-filled", "--outdir", str(tmp_path / "recon")])
    assert sorted(os.listdir(tmp_path / "recon" / "panels")) == ["00000-000000.png", "00001-000000.png"]


def test_fastmri_volume_metrics_match_scikit_image():
    """fastMRI's evaluate.py on a 3-slice test volume, computed with scikit-image: PSNR over the volume with its
    maximum as data range, SSIM per slice (7x7 window, K1 0.01, K2 0.03) with the volume maximum, averaged."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    from training.metrics import center_crop, fastmri_volume_metrics, minmax_normalise

    rng = np.random.default_rng(0)
    reference = np.stack([p * (1 + s) for s, p in enumerate(random_ellipse_phantoms(3, 40, 0))]).astype(np.float64)
    estimate = reference + 0.05 * rng.standard_normal(reference.shape)
    got = fastmri_volume_metrics(torch.from_numpy(reference), torch.from_numpy(estimate))
    maximum = reference.max()
    assert got["psnr"] == pytest.approx(peak_signal_noise_ratio(reference, estimate, data_range=maximum), abs=1e-9)
    expected_ssim = np.mean([structural_similarity(r, e, data_range=maximum, win_size=7, K1=0.01, K2=0.03)
                             for r, e in zip(reference, estimate)])
    assert got["ssim"] == pytest.approx(expected_ssim, abs=1e-9)
    assert got["nmse"] == pytest.approx(np.sum((reference - estimate) ** 2) / np.sum(reference**2), rel=1e-12)
    assert center_crop(torch.zeros(2, 400, 330), 320).shape == (2, 320, 320)
    assert center_crop(torch.zeros(2, 256, 256), 320).shape == (2, 256, 256)
    normalised = minmax_normalise(torch.from_numpy(estimate))
    assert normalised.flatten(1).amin(dim=1).abs().max() == 0 and (normalised.flatten(1).amax(dim=1) == 1).all()


def test_reconstruct_writes_fastmri_and_msm_conventions(tmp_path):
    """reconstruct.py --metric-convention on fully sampled fastMRI-converted slices (two volumes of two slices),
    zero-filled with fastMRI's equispaced 4x masks: the fastMRI volume rows and the MSM per-image rows recomputed
    with scikit-image from the saved reconstructions and the records."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    source = tmp_path / "full"
    source.mkdir()
    for v in range(2):
        write_fastmri_file(source / f"file_brain_AXT2_{v:03d}.h5", fully_sampled_kspace(2, 4, 64, 32, 1e-3, seed=v))
    data = str(tmp_path / "data")
    convert_fastmri(str(source), data, resolution=32, acs=8, kernel_width=4, phase_crop="kspace")
    outputs = {}
    for convention in ("fastmri", "msm"):
        outdir = tmp_path / convention
        run_cli(["reconstruct.py", "--data", data, "--task", "mri", "--methods", "zero-filled", "--mask-kind",
                 "fastmri-equispaced", "--accel", "4", "--center-fraction", "0.08", "--metric-convention", convention,
                 "--outdir", str(outdir)])
        outputs[convention] = outdir
    records = MRIDataset(data)
    zero_filled = [np.load(outputs["msm"] / "reconstructions" / f"{i:05d}-000000.npz")["zero-filled"]
                   for i in range(4)]
    references = [records[i]["image"].numpy() for i in range(4)]
    rss = [np.sqrt((np.abs(records[i]["maps"].numpy()) ** 2).sum(axis=0)) for i in range(4)]

    def magnitude(image):
        return np.hypot(image[0].astype(np.float64), image[1].astype(np.float64))

    with open(outputs["fastmri"] / "volumes.csv") as f:
        volumes = [line.strip().split(",") for line in f if not line.startswith("#")][1:]
    assert [row[:2] for row in volumes] == [["file_brain_AXT2_000.h5", "2"], ["file_brain_AXT2_001.h5", "2"]]
    for v, row in enumerate(volumes):
        reference = np.stack([magnitude(references[i]) * rss[i] for i in (2 * v, 2 * v + 1)])
        estimate = np.stack([magnitude(zero_filled[i]) * rss[i] for i in (2 * v, 2 * v + 1)])
        maximum = reference.max()
        assert float(row[4]) == pytest.approx(peak_signal_noise_ratio(reference, estimate, data_range=maximum),
                                              abs=1e-4)
        assert float(row[5]) == pytest.approx(np.mean([structural_similarity(r, e, data_range=maximum)
                                                       for r, e in zip(reference, estimate)]), abs=1e-5)
    with open(outputs["msm"] / "metrics.csv") as f:
        lines = f.readlines()
    assert any("convention 'msm'" in line for line in lines)
    rows = [line.strip().split(",") for line in lines if not line.startswith("#")][1:]
    for i, row in enumerate(rows):
        reference, estimate = magnitude(references[i]), magnitude(zero_filled[i])
        reference = (reference - reference.min()) / (reference.max() - reference.min())
        estimate = (estimate - estimate.min()) / (estimate.max() - estimate.min())
        assert float(row[3]) == pytest.approx(peak_signal_noise_ratio(reference, estimate, data_range=1), abs=1e-4)
        assert float(row[4]) == pytest.approx(structural_similarity(reference, estimate, data_range=1), abs=1e-5)


def test_train_refuses_masks_narrower_than_the_normalisation(tmp_path):
    """Fully sampled records normalised on 8 centre lines: a training mask that keeps fewer (--acs 4, or fastMRI's
    8% of 32 columns = 3 lines) is refused in one sentence; --acs 8 and a wide enough centre fraction are accepted."""
    import train as train_module
    from dnnlib import EasyDict

    def build(data, **options):  # train.py's options dict, parsed by its own command line
        args = ["--outdir", str(tmp_path / "runs"), "--data", data, "--loss", "msm", "--cbase", "8", "--cres", "1"]
        args += [str(a) for name, value in options.items() for a in (f"--{name.replace('_', '-')}", value)]
        return train_module.build_options(EasyDict(train_module.main.make_context("train.py", args).params), 1)

    source = tmp_path / "full"
    source.mkdir()
    write_fastmri_file(source / "a.h5", fully_sampled_kspace(1, 4, 64, 32, 1e-3))
    data = str(tmp_path / "data")
    convert_fastmri(str(source), data, resolution=32, acs=8, kernel_width=4)
    for overrides, kept in ((dict(mask="lines-random", acs=4), 4), (dict(mask="fastmri-random"), 3)):
        with pytest.raises(UserError, match=f"keeps {kept} centre lines, fewer than the 8 that the intensity "
                                            "normalisation"):
            build(data, **overrides)
    assert build(data, mask="lines-random", acs=8).measurement["mask"]["acs"] == 8
    config = build(data, mask="fastmri-equispaced", accel=3, center_fraction=0.25).measurement["mask"]
    assert config == {"kind": "fastmri-equispaced", "R": 3, "center_fraction": 0.25}
