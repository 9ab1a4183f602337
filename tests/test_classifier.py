"""The noise-aware classifier (training/classifier.py): network, snapshots, and training through train.py --kind
classifier (accuracy on lesion phantoms, exact resume after SIGKILL, two gloo ranks, class-balanced sampling)."""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from dnnlib import UserError
from tests.helpers import HANG_GUARD_S, REPO, make_phantoms, run_cli
from training import snapshot as checkpoint
from training.classifier import NoiseAwareClassifier, classifier_kwargs, classifier_logits
from training.data_tools import ZipDatasetWriter
from training.networks import build_network, network_kwargs_for
from training.phantoms import lesion_phantoms
from training.training_loop import StreamSampler

# 400 steps of batch 32 on 16x16 phantoms; ticks of 3.2 kimg with a state at each.
TINY = ["--kind", "classifier", "--cbase", "16", "--cres", "1,2", "--blocks", "1", "--dropout", "0", "--batch", "32",
        "--lr", "2e-3", "--lr-rampup", "0.00002", "--ema", "0.0005", "--tick", "3.2", "--snap", "1", "--dump", "1",
        "--workers", "0", "--seed", "3"]


def write_lesion_zip(path: str, num: int, seed: int, resolution: int = 16, contrast: float = 0.5,
                     radius: float = 0.2) -> str:
    images, labels = lesion_phantoms(num, resolution, seed, contrast=contrast, radius=radius)
    with ZipDatasetWriter(path) as writer:
        for image, label in zip(images, labels):
            writer.add_image(np.rint(image * 255).astype(np.uint8)[:, :, None], int(label))
        writer.finish()
    return path


@pytest.fixture(scope="module")
def lesion_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lesions")
    return write_lesion_zip(str(folder / "train.zip"), 384, seed=0), write_lesion_zip(str(folder / "val.zip"), 128,
                                                                                     seed=1)


def train(outdir, data, kimg, extra=(), **kw):
    return run_cli(["train.py", "--outdir", str(outdir), "--data", data, "--duration", str(kimg / 1000), *TINY,
                    *extra], **kw)


def test_fresh_classifier_is_uniform_and_takes_sigma_zero():
    net = build_network(classifier_kwargs(16, 1, 3, cbase=8, cres=(1, 2), blocks=1))
    assert isinstance(net, NoiseAwareClassifier)
    x = torch.randn(5, 1, 16, 16)
    for sigma in (0.0, torch.tensor([0.0, 0.1, 1.0, 10.0, 80.0])):
        logits = net(x, sigma)
        assert logits.shape == (5, 3) and torch.equal(logits, torch.zeros(5, 3))
    # Once trained away from zero the logits depend on the noise level and are differentiable in x (guidance).
    torch.nn.init.normal_(net.head.weight)
    x64 = torch.randn(2, 1, 16, 16, dtype=torch.float64, requires_grad=True)
    logits = classifier_logits(net)(x64, 0.5)
    (grad,) = torch.autograd.grad(logits[:, 0].sum(), x64)
    assert logits.dtype == torch.float64 and grad.abs().sum() > 0
    assert not torch.equal(net(x, 0.1), net(x, 5.0))


def test_snapshot_says_it_is_a_classifier(tmp_path):
    net = build_network(classifier_kwargs(16, 1, 2, cbase=8, cres=(1, 2), blocks=1))
    dataset = {"kind": "image", "path": "x.zip", "image_shape": [1, 16, 16], "label_dim": 2}
    checkpoint.save_snapshot(str(tmp_path / "cls.pt"), {"network": classifier_kwargs(16, 1, 2, cbase=8, cres=(1, 2),
                                                                                      blocks=1),
                                                        "dataset": dataset,
                                                        "loss": {"class_name": "training.loss.ClassifierLoss",
                                                                 "clean": False}}, net)
    loaded, config = checkpoint.load_classifier(str(tmp_path / "cls.pt"))
    assert isinstance(loaded, NoiseAwareClassifier) and config["network"]["kwargs"]["label_dim"] == 2
    diffusion = network_kwargs_for("ddpmpp", "edm", cbase=8, cres=[1], img_resolution=16, in_channels=1,
                                   num_blocks=1, attn_resolutions=[])
    checkpoint.save_snapshot(str(tmp_path / "edm.pt"), {"network": diffusion, "dataset": dataset},
                             build_network(diffusion))
    with pytest.raises(UserError, match="is a diffusion-model snapshot .* not a classifier"):
        checkpoint.load_classifier(str(tmp_path / "edm.pt"))


def test_balanced_sampler_draws_classes_equally_and_depends_only_on_position():
    class_of = [0] * 90 + [1] * 10
    sampler = StreamSampler(100, 0, 1, 10, 1, seed=5, class_of=class_of)
    drawn = [i for _, i in zip(range(20000), iter(sampler))]
    share = np.mean([class_of[i] for i in drawn])
    assert abs(share - 0.5) < 0.02  # 20000 draws: standard error 0.0035
    later = StreamSampler(100, 0, 1, 10, 1, seed=5, class_of=class_of, start_pos=1230)
    assert [i for _, i in zip(range(500), iter(later))] == drawn[1230:1730]


def test_bad_classifier_options_one_sentence_and_nothing_written(tmp_path, lesion_data):
    unlabelled = make_phantoms(str(tmp_path / "plain.zip"), num=8, resolution=16)
    outdir = tmp_path / "runs"
    cases = [
        (["--data", unlabelled, "--kind", "classifier"], "has no dataset.json|no labels"),
        (["--data", lesion_data[0], "--val-data", lesion_data[1]], "--val-data applies to --kind classifier only"),
        (["--data", unlabelled, "--balanced"], "--balanced needs labelled images"),
        (["--data", lesion_data[0], "--kind", "classifier", "--loss", "msm"], "do not apply to --kind classifier"),
    ]
    for args, message in cases:
        proc = run_cli(["train.py", "--outdir", str(outdir), "--duration", "0.0001", *args], check=False)
        lines = [line for line in proc.stderr.strip().splitlines() if line]
        assert proc.returncode != 0 and len(lines) == 1, proc.stderr
        assert any(m in lines[0] for m in message.split("|")), lines[0]
        assert not outdir.exists()


@pytest.mark.slow
def test_classifier_training_beats_chance_on_lesion_phantoms(tmp_path, lesion_data):
    """12.8 kimg (400 steps of 32, class-balanced) on 384 16x16 lesion phantoms (contrast 0.5, radius 0.2): held-out
    accuracy (128 images) of the EMA classifier at sigma = 0 and 0.1 must be >= 0.7 (chance 0.5; measured 0.789 and
    0.805); bf16 autocast must train too."""
    train(tmp_path / "run", lesion_data[0], 12.8, ["--val-data", lesion_data[1], "--balanced"])
    (run_dir,) = glob.glob(str(tmp_path / "run" / "0*"))
    stats = [json.loads(line) for line in open(os.path.join(run_dir, "stats.jsonl"))]
    assert stats[-1]["val_acc_sigma0"] >= 0.7 and stats[-1]["val_acc_sigma0.1"] >= 0.7, stats[-1]
    assert "val_acc_sigma0" in open(os.path.join(run_dir, "log.txt")).read()
    bf16 = train(tmp_path / "bf16", lesion_data[0], 0.064, ["--precision", "bf16"])
    assert "Done" in bf16.stdout


@pytest.mark.slow
def test_classifier_resumes_exactly_after_sigkill(tmp_path, lesion_data):
    kimg = 6.4  # 200 steps, a state every 3.2 kimg: killed after the first state
    outdir = tmp_path / "killed"
    args = ["train.py", "--outdir", str(outdir), "--data", lesion_data[0], "--duration", str(kimg / 1000), *TINY,
            "--tick", "0.32"]
    proc = subprocess.Popen([sys.executable, *args], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    started = time.monotonic()  # wait for an event (the first two states on disk), not for a time
    while proc.poll() is None and len(glob.glob(str(outdir / "*" / "training-state-*.pt"))) < 2:
        assert time.monotonic() - started < HANG_GUARD_S, "no training state appeared (hang guard)"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    (run_dir,) = glob.glob(str(outdir / "0*"))
    killed_at = checkpoint.load_training_state(checkpoint.latest_file(run_dir, "training-state"))["progress"]
    assert 0 < killed_at["cur_nimg"] < kimg * 1000
    rerun = run_cli(args)
    assert "Resuming from" in rerun.stdout
    run_cli(["train.py", "--outdir", str(tmp_path / "ref"), *args[3:]])
    (ref_dir,) = glob.glob(str(tmp_path / "ref" / "0*"))
    a = checkpoint.load_training_state(checkpoint.latest_file(run_dir, "training-state"))
    b = checkpoint.load_training_state(checkpoint.latest_file(ref_dir, "training-state"))
    assert a["progress"]["cur_nimg"] == b["progress"]["cur_nimg"] == kimg * 1000
    for key in ("net", "ema"):
        for name in a[key]:
            torch.testing.assert_close(a[key][name], b[key][name], rtol=1e-5, atol=1e-6, msg=f"{key}.{name}")


@pytest.mark.slow
def test_classifier_torchrun_two_ranks_hold_identical_parameters(tmp_path, lesion_data):
    proc = train(tmp_path / "dist", lesion_data[0], 0.128, ["--tick", "0.064"], torchrun=2)
    assert "All 2 ranks hold identical parameters" in proc.stdout
