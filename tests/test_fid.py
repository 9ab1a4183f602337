"""FID: Frechet distance against scipy and closed forms, float64 feature statistics against numpy, the Inception-v3
layout against published facts, detector verification (weights only: no detector file's code runs), and `fid.py
ref`/`calc` end to end (one process and two ranks under torchrun) with a small network in place of Inception-v3
(`tiny_layout`), since the standard weights cannot be downloaded and 2048-d statistics are slow.
"""

import io
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import scipy.linalg
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import fid  # noqa: E402
from dnnlib import UserError, file_sha256  # noqa: E402
from dnnlib.util import open_url  # noqa: E402
from tests.helpers import HANG_GUARD_S  # noqa: E402
from training import inception  # noqa: E402
from training.dataset import ImageFolderDataset  # noqa: E402
from training.inception import (  # noqa: E402
    FID_INCEPTION_SHA256,
    FID_INCEPTION_URL,
    ConvBN,
    InceptionV3FID,
    load_detector,
)
from training.metrics import FeatureStats, dataset_feature_stats, frechet_distance, load_reference_stats  # noqa: E402

# ----------------------------------------------------------------------------------------------------------------------
# Helpers


def random_gaussian_stats(rng, dim, num):
    """Mean and covariance of `num` correlated random vectors: full rank when num > dim, singular otherwise."""
    mixing = rng.standard_normal((dim, dim))
    samples = rng.standard_normal((num, dim)) @ mixing + rng.standard_normal(dim)
    return samples.mean(axis=0), np.atleast_2d(np.cov(samples, rowvar=False))


def scipy_frechet_distance(mu1, sigma1, mu2, sigma2):
    """The textbook formula with scipy's general matrix square root (what EDM computes)."""
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2).real
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


class TinyDetector(nn.Module):
    """A small random conv net with the detector contract: uint8 (N, 3, H, W) -> features (N, 16). The fixture
    `tiny_layout` puts it in place of InceptionV3FID, so detector files of its weights go through the real loading
    code."""

    feature_dim = 16

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, stride=2)
        self.conv2 = nn.Conv2d(8, 16, 3)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(torch.float32) / 127.5 - 1
        return self.conv2(torch.relu(self.conv1(x))).mean(dim=(2, 3))


def make_tiny_detector(path: Path) -> Path:
    net = TinyDetector()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in net.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture
def tiny_layout(monkeypatch):
    monkeypatch.setattr(inception, "InceptionV3FID", TinyDetector)


class _Holder(nn.Module):
    """A module that only holds submodules (TorchScript compiles no forward for it)."""


def _scriptable_tree(module: nn.Module) -> nn.Module:
    """The module tree of `module` with the same parameter names, made of scriptable leaves (ConvBN, Linear)."""
    if isinstance(module, (ConvBN, nn.Linear)):
        return module
    holder = _Holder()
    for name, child in module.named_children():
        holder.add_module(name, _scriptable_tree(child))
    return holder


class CanaryInception(nn.Module):
    """The issue's attack: a TorchScript detector whose forward creates (or overwrites) `target` with
    torch.from_file(target, shared=True); with `inception`, it carries that network's weights under its names."""

    def __init__(self, target: str, inception: nn.Module | None = None):
        super().__init__()
        self.target = target
        for name, child in (inception.named_children() if inception is not None else ()):
            self.add_module(name, _scriptable_tree(child))
        if inception is None:
            self.conv = nn.Conv2d(3, 16, 3)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        torch.from_file(self.target, True, 16).fill_(65)
        return images.to(torch.float32).mean(dim=(2, 3))


def make_canary_detector(path: Path, target: Path, inception: nn.Module | None = None) -> Path:
    torch.jit.script(CanaryInception(str(target), inception)).save(str(path))
    return path


def write_images(folder: Path, pixels: np.ndarray) -> Path:
    """uint8 (N, H, W, C) -> folder of {i:06d}.png (as generate.py names them); C = 1 is saved as grayscale."""
    folder.mkdir(parents=True)
    for i, image in enumerate(pixels):
        PIL.Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image).save(folder / f"{i:06d}.png")
    return folder


def run_fid(capsys, *args):
    """Run `fid.py ARGS` in this process -> (exit code, stdout, stderr)."""
    argv = sys.argv
    sys.argv = ["fid.py", *map(str, args)]
    try:
        fid.main()
        code = 0
    except SystemExit as e:
        code = e.code
    finally:
        sys.argv = argv
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny detector and three 16x16 image sets: 13 RGB, 20 RGB, and 11 grayscale with an RGB-replicated twin."""
    root = tmp_path_factory.mktemp("fid")
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (11, 16, 16, 1), dtype=np.uint8)
    return {
        "detector": make_tiny_detector(root / "tiny.pt"),
        "a": write_images(root / "a", rng.integers(0, 256, (13, 16, 16, 3), dtype=np.uint8)),
        "b": write_images(root / "b", rng.integers(0, 120, (20, 16, 16, 3), dtype=np.uint8)),
        "gray": write_images(root / "gray", gray),
        "gray_as_rgb": write_images(root / "gray_as_rgb", np.repeat(gray, 3, axis=3)),
        "root": root,
    }


# ----------------------------------------------------------------------------------------------------------------------
# Frechet distance


def test_frechet_distance_matches_scipy_and_is_symmetric():
    rng = np.random.default_rng(0)
    for dim in (1, 5, 32):
        mu1, sigma1 = random_gaussian_stats(rng, dim, 200)
        mu2, sigma2 = random_gaussian_stats(rng, dim, 300)
        ours = frechet_distance(mu1, sigma1, mu2, sigma2)
        assert ours == pytest.approx(scipy_frechet_distance(mu1, sigma1, mu2, sigma2), rel=1e-9)
        assert frechet_distance(mu2, sigma2, mu1, sigma1) == pytest.approx(ours, rel=1e-9)
        assert abs(frechet_distance(mu1, sigma1, mu1, sigma1)) < 1e-9 * np.trace(sigma1)


def test_frechet_distance_closed_form_for_singular_commuting_covariances():
    # Diagonal covariances commute, so d = |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2, zeros (singular) included.
    a = np.array([0.0, 1.0, 4.0, 0.0, 2.5])
    b = np.array([1.0, 0.0, 9.0, 0.0, 0.5])
    mu1, mu2 = np.arange(5.0), np.arange(5.0)[::-1]
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)
    # A random rotation of both leaves the distance unchanged, and the products no longer look diagonal.
    rotation, _ = np.linalg.qr(np.random.default_rng(1).standard_normal((5, 5)))
    rotated = frechet_distance(rotation @ mu1, rotation @ np.diag(a) @ rotation.T, rotation @ mu2,
                               rotation @ np.diag(b) @ rotation.T)
    assert rotated == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_rejects_mismatched_dimensions():
    with pytest.raises(ValueError):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# ----------------------------------------------------------------------------------------------------------------------
# Feature statistics


def test_feature_stats_match_numpy_and_ignore_masked_rows():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(50, 7, generator=generator, dtype=torch.float64) * 3 + 5
    stats = FeatureStats(7)
    for chunk in features.split(12):
        padded = torch.cat([chunk, torch.full((3, 7), 1e6, dtype=torch.float64)])  # garbage rows, masked out
        stats.update(padded.to(torch.float32), mask=torch.arange(len(padded)) < len(chunk))
    expected = features.to(torch.float32).to(torch.float64).numpy()
    assert stats.num == 50
    np.testing.assert_allclose(stats.mean(), expected.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(stats.cov(), np.cov(expected, rowvar=False), rtol=1e-9, atol=1e-12)


def test_dataset_feature_stats_equal_direct_features_with_padded_batches(workspace, tiny_layout):
    dataset = ImageFolderDataset(str(workspace["gray"]))
    net, _ = load_detector(str(workspace["detector"]), sha256=file_sha256(workspace["detector"]))
    stats = dataset_feature_stats(dataset, net, 16, batch_size=4, num_workers=0, progress=False)  # 11 = 4 + 4 + 3
    pixels = np.stack([np.asarray(PIL.Image.open(workspace["gray"] / f"{i:06d}.png")) for i in range(11)])
    with torch.inference_mode():
        direct = net(torch.from_numpy(pixels)[:, None].expand(-1, 3, -1, -1).contiguous()).double().numpy()
    assert stats.num == 11
    np.testing.assert_allclose(stats.mean(), direct.mean(axis=0), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(stats.cov(), np.cov(direct, rowvar=False), rtol=1e-5, atol=1e-9)


# ----------------------------------------------------------------------------------------------------------------------
# Inception-v3 layout and detector loading

# Facts of the published pytorch-fid state dict (torchvision's Inception3 names, 1008 classes, no auxiliary head).
PUBLISHED_SHAPES = {
    "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
    "Conv2d_1a_3x3.bn.running_var": (32,),
    "Conv2d_4a_3x3.conv.weight": (192, 80, 3, 3),
    "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
    "Mixed_5d.branch5x5_2.conv.weight": (64, 48, 5, 5),
    "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
    "Mixed_6b.branch7x7_2.conv.weight": (128, 128, 1, 7),
    "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
    "Mixed_7a.branch3x3_2.conv.weight": (320, 192, 3, 3),
    "Mixed_7b.branch3x3_2b.conv.weight": (384, 384, 3, 1),
    "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1),
    "fc.weight": (1008, 2048),
    "fc.bias": (1008,),
}


def random_inception_state_dict(seed=0, drop_step_counters=False):
    """Random tensors of the published layout (BatchNorm variances positive, so the network is well defined)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, value in InceptionV3FID().state_dict().items():
        if name.endswith("num_batches_tracked"):
            if not drop_step_counters:
                state[name] = torch.tensor(0)
        elif name.endswith("running_var"):
            state[name] = torch.rand(value.shape, generator=generator) + 0.5
        else:
            state[name] = torch.randn(value.shape, generator=generator) * 0.05
    return state


def test_inception_architecture_matches_published_layout():
    net = InceptionV3FID()
    # torchvision documents 27,161,264 parameters for Inception3 with 1000 classes and its auxiliary head (3,326,696
    # parameters: 768->128 1x1 conv, 128->768 5x5 conv, their BatchNorm affine terms, 768->1000 linear). The FID
    # network has no auxiliary head and 1008 classes: 8 more rows of 2048 weights + 1 bias.
    assert sum(p.numel() for p in net.parameters()) == 27_161_264 - 3_326_696 + 8 * 2049
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    for name, shape in PUBLISHED_SHAPES.items():
        assert shapes[name] == shape, name
    assert not any(k.startswith("AuxLogits") for k in shapes)


def test_inception_loads_state_dict_file_and_gives_pool_features(tmp_path):
    path = tmp_path / "inception-random.pth"
    torch.save(random_inception_state_dict(drop_step_counters=True), path)  # as files from old PyTorch versions
    net, info = load_detector(str(path), sha256=file_sha256(path))
    assert info.detector_format == "state_dict" and info.detector_sha256 == file_sha256(path)
    assert isinstance(net, InceptionV3FID) and not net.training
    loaded = net.state_dict()
    for name, value in random_inception_state_dict().items():
        if not name.endswith("num_batches_tracked"):
            assert torch.equal(loaded[name], value), name
    images = torch.randint(0, 256, (3, 3, 32, 32), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    with torch.inference_mode():
        features = net(images)
        alone = net(images[1:2])
    assert features.shape == (3, 2048)
    assert torch.isfinite(features).all() and (features >= 0).all()  # spatial mean of ReLU outputs
    torch.testing.assert_close(alone[0], features[1], rtol=1e-4, atol=1e-5)  # eval mode: no batch coupling


@pytest.mark.parametrize("corruption", ["missing", "unexpected", "shape"])
def test_inception_state_dict_of_wrong_layout_is_refused(tmp_path, corruption):
    state = random_inception_state_dict()
    if corruption == "missing":
        del state["Mixed_6c.branch7x7_3.bn.running_mean"]
    elif corruption == "unexpected":
        state["AuxLogits.fc.weight"] = torch.zeros(1008, 768)
    else:
        state["fc.weight"] = torch.zeros(1000, 2048)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(UserError, match="not a state dict of the FID Inception-v3 layout"):
        load_detector(str(tmp_path / "bad.pth"), sha256=file_sha256(tmp_path / "bad.pth"))


def test_detector_hash_is_verified(workspace, tmp_path, tiny_layout):
    detector = workspace["detector"]
    digest = file_sha256(detector)
    load_detector(str(detector), sha256=digest.upper())  # full hash, any case
    with pytest.raises(UserError, match="--detector-sha256 expects 0{64}"):
        load_detector(str(detector), sha256="0" * 64)
    with pytest.raises(UserError, match="not a SHA-256"):
        load_detector(str(detector), sha256="abc")
    # Without --detector-sha256 only the standard file passes: an 8-digit hash prefix in the name (torch.hub's
    # convention, which the file's own name may carry correctly) is not enough.
    named_right = tmp_path / f"tiny-{digest[:8]}.pt"
    named_right.write_bytes(detector.read_bytes())
    with pytest.raises(UserError, match=f"not the standard FID Inception file's {FID_INCEPTION_SHA256}"):
        load_detector(str(named_right))
    assert FID_INCEPTION_SHA256.startswith("6726825d") and len(FID_INCEPTION_SHA256) == 64


def test_torchscript_detector_gives_its_weights_only_and_its_code_never_runs(tmp_path, capsys):
    """A TorchScript file with the Inception layout: its weights load into InceptionV3FID, its forward (the canary)
    never runs, neither when loaded nor when `fid.py ref` computes features with it; another layout is refused, also
    unrun."""
    canary = tmp_path / "canary"
    net = InceptionV3FID()
    net.load_state_dict(random_inception_state_dict(seed=3))
    path = make_canary_detector(tmp_path / "canary-inception.pt", canary, net)
    loaded, info = load_detector(str(path), sha256=file_sha256(path))
    assert isinstance(loaded, InceptionV3FID) and info.detector_format == "torchscript"
    for name, value in net.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    images = write_images(tmp_path / "images", np.zeros((2, 8, 8, 3), dtype=np.uint8))
    code, out, err = run_fid(capsys, "ref", "--data", images, "--dest", tmp_path / "ref.npz", "--detector", path,
                             "--detector-sha256", file_sha256(path), "--workers", 0, "--device", "cpu")
    assert code == 0, err
    assert load_reference_stats(str(tmp_path / "ref.npz"))["mu"].shape == (2048,)
    other = make_canary_detector(tmp_path / "canary-other.pt", canary)
    with pytest.raises(UserError, match="not the FID Inception-v3 layout; only the weights"):
        load_detector(str(other), sha256=file_sha256(other))
    assert not canary.exists()


class _TouchOnUnpickle:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_detector_file_with_pickled_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "code-ran"
    torch.save({"fc.weight": _TouchOnUnpickle(str(marker))}, tmp_path / "evil.pth")
    with pytest.raises(UserError, match="refers to __builtin__.getattr, which a weights file never holds"):
        load_detector(str(tmp_path / "evil.pth"), sha256=file_sha256(tmp_path / "evil.pth"))
    assert not marker.exists()


def test_missing_detector_without_network_says_how_to_provide_it(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setenv("MSM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    with pytest.raises(UserError) as error:
        load_detector(FID_INCEPTION_URL)
    message = str(error.value)
    assert FID_INCEPTION_URL in message and "--detector PATH" in message
    assert str(tmp_path / "cache" / "pt_inception-2015-12-05-6726825d.pth") in message
    assert not (tmp_path / "cache" / "pt_inception-2015-12-05-6726825d.pth").exists()
    with pytest.raises(UserError, match="neither a readable file nor"):
        load_detector(str(tmp_path / "no-such-file.pt"))


def test_open_url_downloads_once_into_the_cache(tmp_path, monkeypatch):
    calls = []

    def fake_urlopen(url, timeout):
        calls.append(url)
        return io.BytesIO(b"payload")

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    url = "https://example.org/files/weights-1234abcd.pth"
    path = open_url(url, cache_dir=str(tmp_path))
    assert path == str(tmp_path / "weights-1234abcd.pth") and Path(path).read_bytes() == b"payload"
    assert open_url(url, cache_dir=str(tmp_path)) == path and len(calls) == 1
    assert sorted(os.listdir(tmp_path)) == ["weights-1234abcd.pth"]  # no temporary file left


# ----------------------------------------------------------------------------------------------------------------------
# fid.py end to end


def test_ref_and_calc_end_to_end(workspace, capsys, tiny_layout):
    root, detector = workspace["root"], workspace["detector"]
    common = ["--detector", detector, "--detector-sha256", file_sha256(detector), "--batch", 4, "--workers", 0]
    assert run_fid(capsys, "ref", "--data", workspace["b"], "--dest", root / "b.npz", *common)[0] == 0
    assert run_fid(capsys, "ref", "--data", workspace["a"], "--dest", root / "a.npz", *common)[0] == 0
    ref_b, ref_a = load_reference_stats(str(root / "b.npz")), load_reference_stats(str(root / "a.npz"))
    sidecar = json.loads((root / "b.json").read_text())
    assert ref_b["num"] == 20 and sidecar["num"] == 20 and sidecar["feature_dim"] == 16
    assert ref_b["detector_sha256"] == sidecar["detector_sha256"] == file_sha256(detector)
    assert sidecar["stats_sha256"] == file_sha256(root / "b.npz")

    # calc on all 13 images of `a` against `b`: the Frechet distance of the two `ref` results.
    code, out, _ = run_fid(capsys, "calc", "--images", workspace["a"], "--ref", root / "b.npz", "--num", 13, *common)
    assert code == 0
    record = json.loads((root / "a-fid.json").read_text())  # default: beside the images
    expected = frechet_distance(ref_a["mu"], ref_a["sigma"], ref_b["mu"], ref_b["sigma"])
    assert record["fid"] == pytest.approx(expected, rel=1e-9) and expected > 0.1
    assert f"FID {record['fid']:g}" in out
    assert record["num"] == 13 and record["seed"] == 0 and record["feature_dim"] == 16
    assert record["ref_sha256"] == file_sha256(root / "b.npz") and record["ref_num"] == 20
    assert record["detector_sha256"] == file_sha256(detector) and record["detector_format"] == "state_dict"

    # A dataset as --ref gives the same number as its statistics file; a set against itself scores zero.
    run_fid(capsys, "calc", "--images", workspace["a"], "--ref", workspace["b"], "--num", 13,
            "--out", root / "via-dataset.json", *common)
    assert json.loads((root / "via-dataset.json").read_text())["fid"] == pytest.approx(record["fid"], rel=1e-9)
    run_fid(capsys, "calc", "--images", workspace["a"], "--ref", root / "a.npz", "--num", 13,
            "--out", root / "self.json", *common)
    assert abs(json.loads((root / "self.json").read_text())["fid"]) < 1e-9

    # --num below the number of images: the subset is chosen by --seed, reproducibly.
    fids = {}
    for name, seed in [("s0", 0), ("s0-again", 0), ("s1", 1)]:
        run_fid(capsys, "calc", "--images", workspace["a"], "--ref", root / "b.npz", "--num", 7, "--seed", seed,
                "--out", root / f"{name}.json", *common)
        fids[name] = json.loads((root / f"{name}.json").read_text())["fid"]
    assert fids["s0"] == fids["s0-again"] and fids["s0"] != fids["s1"]


def test_grayscale_images_are_replicated_to_three_channels(workspace, capsys, tiny_layout):
    detector = workspace["detector"]
    root = workspace["root"]
    common = ["--detector", detector, "--detector-sha256", file_sha256(detector), "--workers", 0]
    for name in ("gray", "gray_as_rgb"):
        assert run_fid(capsys, "ref", "--data", workspace[name], "--dest", root / f"{name}.npz", *common)[0] == 0
    gray, rgb = load_reference_stats(str(root / "gray.npz")), load_reference_stats(str(root / "gray_as_rgb.npz"))
    np.testing.assert_array_equal(gray["mu"], rgb["mu"])
    np.testing.assert_array_equal(gray["sigma"], rgb["sigma"])


def test_bad_input_gets_one_sentence_and_writes_nothing(workspace, capsys, tmp_path, tiny_layout):
    detector = workspace["detector"]
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not an npz file")
    wrong_dim = tmp_path / "wrong-dim.npz"
    np.savez(wrong_dim, mu=np.zeros(8), sigma=np.eye(8))
    other_detector = tmp_path / "other.npz"
    np.savez(other_detector, mu=np.zeros(16), sigma=np.eye(16), detector_sha256=np.str_("f" * 64))
    cases = [
        (["--images", workspace["a"], "--ref", wrong_dim, "--num", 14], "holds 13 images, fewer than --num 14"),
        (["--images", workspace["a"], "--ref", garbage, "--num", 13], "cannot be read as an .npz file"),
        (["--images", workspace["a"], "--ref", tmp_path / "missing.npz", "--num", 13], "cannot be opened"),
        (["--images", workspace["a"], "--ref", wrong_dim, "--num", 13], "holds 8-d statistics, but the detector "
                                                                         "gives 16-d features"),
        (["--images", workspace["a"], "--ref", other_detector, "--num", 13], "use the same detector for both"),
    ]
    for args, message in cases:
        out_path = tmp_path / "record.json"
        code, _, err = run_fid(capsys, "calc", *args, "--detector", detector, "--detector-sha256",
                               file_sha256(detector), "--workers", 0, "--out", out_path)
        assert code == 1, message
        assert err.startswith("Error: ") and message in err and err.count("\n") == 1, err
        assert not out_path.exists()
    code, _, err = run_fid(capsys, "ref", "--data", workspace["a"], "--dest", tmp_path / "stats.txt")
    assert code == 1 and "must end in .npz" in err and not (tmp_path / "stats.txt").exists()


def torchrun(*args, timeout=HANG_GUARD_S):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    # `--` stops torchrun's own parser, which would otherwise take `--num` for an abbreviation of `--numa-binding`.
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--",
               "tests/fid_tiny_detector.py"]
    return subprocess.run([*command, *map(str, args)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_two_rank_statistics_equal_single_process(workspace, capsys, tmp_path, tiny_layout):
    # 13 images over 2 ranks with batch 4: shares of 7 and 6, two batches each, padding on both ranks.
    detector = workspace["detector"]
    common = ["--detector", detector, "--detector-sha256", file_sha256(detector), "--batch", 4, "--workers", 0]
    assert run_fid(capsys, "ref", "--data", workspace["a"], "--dest", tmp_path / "one.npz", *common)[0] == 0
    result = torchrun("ref", "--data", workspace["a"], "--dest", tmp_path / "two.npz", *common)
    assert result.returncode == 0, result.stderr
    one, two = load_reference_stats(str(tmp_path / "one.npz")), load_reference_stats(str(tmp_path / "two.npz"))
    assert one["num"] == two["num"] == 13
    np.testing.assert_allclose(two["mu"], one["mu"], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(two["sigma"], one["sigma"], rtol=1e-10, atol=1e-12)
    assert json.loads((tmp_path / "two.json").read_text())["world_size"] == 2

    # Rejected input under torchrun: every rank stops with the message, none waits for the others.
    result = torchrun("calc", "--images", workspace["a"], "--ref", tmp_path / "one.npz", "--num", 50, *common)
    assert result.returncode != 0 and "holds 13 images, fewer than --num 50" in result.stderr
