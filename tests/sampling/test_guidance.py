"""Guidance (training/sampling/guidance.py) and probability-flow inversion (training/sampling/solvers.py `encode`,
`decode`) on closed forms.

Data: a mixture of K isotropic Gaussians N(mu_k, s^2 I) with priors pi_k. In EDM's noising x = x0 + sigma n, class k
gives N(mu_k, (s^2 + sigma^2) I), so everything is exact (SEED_METHODS.md section 1.8):
- noisy-class logits l_k = -|x - mu_k|^2 / (2 v) + log pi_k, v = s^2 + sigma^2, and p(k | x) = softmax(l)_k;
- conditional denoiser D_k = mu_k + s^2 / v (x - mu_k); unconditional D_u = sum_k p(k | x) D_k.
"""

import json
import math
import os

import numpy as np
import PIL.Image
import pytest
import torch

from tests.helpers import make_phantoms, run_cli
from tests.sampling.conftest import edm_generate
from torch_utils.misc import SeedGenerators
from training import snapshot as checkpoint
from training.dataset import open_dataset
from training.masks import FullMask
from training.networks import build_network
from training.sampling.denoisers import MSMAggregate
from training.sampling.guidance import (
    GuidanceTerm,
    cfg_coefficient,
    cfg_denoiser,
    correction,
    guided,
    potential,
)
from training.sampling.solvers import Ancestral, decode, encode, noise_start
from training.schedules import bridge_sigmas

SHAPE = (1, 2, 2)  # images of 4 pixels


class GaussianMixture:
    def __init__(self, means: torch.Tensor, s: float, priors=None):
        self.means = means.to(torch.float64)  # (K, d)
        self.s = s
        k = len(means)
        self.log_priors = torch.log(torch.as_tensor(priors if priors is not None else [1 / k] * k,
                                                    dtype=torch.float64))

    def logits(self, x, sigma):
        v = self.s**2 + float(sigma) ** 2
        flat = x.reshape(x.shape[0], -1)
        return -((flat[:, None, :] - self.means[None]) ** 2).sum(-1) / (2 * v) + self.log_priors

    def logit_gradients(self, x, sigma):
        """grad_x l_k = -(x - mu_k) / v, (N, K, d)."""
        v = self.s**2 + float(sigma) ** 2
        return -(x.reshape(x.shape[0], 1, -1) - self.means[None]) / v

    def class_denoisers(self, x, sigma):
        """(N, K, d): D_k(x) for every class."""
        v = self.s**2 + float(sigma) ** 2
        flat = x.reshape(x.shape[0], 1, -1)
        return self.means[None] + self.s**2 / v * (flat - self.means[None])

    def denoiser_for(self, labels):
        """Labelled denoiser family: one-hot rows give D_k, all-zero rows D_u (the 'no label' input)."""

        def denoise(x, sigma):
            per_class = self.class_denoisers(x, sigma)
            weights = torch.where(labels.sum(1, keepdim=True) > 0, labels.to(torch.float64),
                                  torch.softmax(self.logits(x, sigma), dim=1))
            return (weights[:, :, None] * per_class).sum(1).reshape(x.shape)

        return denoise

    def unconditional(self):
        return lambda x, sigma: self.denoiser_for(torch.zeros(x.shape[0], len(self.means)))(x, sigma)


def two_class(separation=1.5, s=0.5, priors=None):
    means = torch.zeros(2, math.prod(SHAPE), dtype=torch.float64)
    means[0, 0], means[1, 0] = -separation / 2, separation / 2
    means[:, 1] = 0.3
    return GaussianMixture(means, s, priors)


def one_hot(indices, k):
    return torch.nn.functional.one_hot(torch.as_tensor(indices), k).to(torch.float64)


def random_images(n, seed, scale=1.0):
    return torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


# ----------------------------------------------------------------------------------------------------------------------
# Classifier guidance and CFG identities.


@pytest.mark.parametrize("sigma", [0.01, 0.3, 2.0, 40.0])
def test_classifier_guidance_at_scale_one_turns_the_unconditional_denoiser_into_the_conditional(sigma):
    gmm = two_class(priors=[0.3, 0.7])
    x = random_images(16, 0, scale=1 + sigma)
    target = torch.tensor([0, 1] * 8)
    term = GuidanceTerm(gmm.logits, "classifier", 1.0, target=target)
    got = guided(gmm.unconditional(), [term])(x, sigma)
    want = gmm.denoiser_for(one_hot(target, 2))(x, sigma)
    assert (got - want).abs().max().item() < 1e-6 * (1 + sigma)


def test_cfg_identities_and_one_batched_call():
    gmm = two_class()
    x, sigma = random_images(6, 1, scale=1.5), 0.8
    labels = one_hot([0, 1, 1, 0, 1, 0], 2)
    d_c, d_u = gmm.denoiser_for(labels)(x, sigma), gmm.unconditional()(x, sigma)
    calls = []

    def counted(labels_in):
        inner = gmm.denoiser_for(labels_in)

        def denoise(x_in, s):
            calls.append(x_in.shape[0])
            return inner(x_in, s)

        return denoise

    for w in (0.0, 0.5, 2.0, -1.0):
        mgdm = cfg_denoiser(counted, labels, w, "mgdm")(x, sigma)
        edm2 = cfg_denoiser(counted, labels, 1 + w, "edm2")(x, sigma)
        closed_form = (1 + w) * d_c - w * d_u
        assert (mgdm - closed_form).abs().max().item() < 1e-12
        assert (edm2 - closed_form).abs().max().item() < 1e-12
    assert (cfg_denoiser(gmm.denoiser_for, labels, 0.0, "mgdm")(x, sigma) - d_c).abs().max().item() == 0
    assert (cfg_denoiser(gmm.denoiser_for, labels, -1.0, "mgdm")(x, sigma) - d_u).abs().max().item() < 1e-12
    assert cfg_coefficient(0.3, "edm2") == 0.3 and cfg_coefficient(0.3, "mgdm") == 1.3
    calls.clear()
    cfg_denoiser(counted, labels, 2.0, "mgdm")(x, sigma)
    assert calls == [12]  # both passes in one call on the doubled batch
    calls.clear()
    cfg_denoiser(counted, labels, 2.0, "mgdm", sigma_range=(1.0, 5.0))(x, sigma)
    assert calls == [6]  # outside the band: the conditional denoiser alone


def test_cfg_of_a_partial_denoiser_layout_matches_separate_passes():
    """The doubled subset-major layout gives (1 + w) s_c - w s_u for every subset, labels lined up per row."""
    gmm = two_class()
    n, k = 3, 2
    labels = one_hot([1, 0, 1], 2)

    def make_partial(labels_in):
        def partial(s, mask, sigma):
            tiled = labels_in.repeat(s.shape[0] // labels_in.shape[0], 1)
            return mask * gmm.denoiser_for(tiled)(s, sigma)

        return partial

    s = random_images(n * k, 2)
    mask = (random_images(n * k, 3) > 0).to(torch.float64)
    w = 1.5
    got = cfg_denoiser(make_partial, labels, w, "mgdm")(s, mask, 0.7)
    want = (1 + w) * make_partial(labels)(s, mask, 0.7) - w * make_partial(torch.zeros_like(labels))(s, mask, 0.7)
    assert (got - want).abs().max().item() < 1e-12


def test_sigma_band_and_several_terms():
    gmm = two_class()
    x = random_images(8, 4)
    target = torch.ones(8, dtype=torch.int64)
    banded = GuidanceTerm(gmm.logits, "classifier", 2.0, target=target, sigma_range=(0.5, 3.0))
    entropy = GuidanceTerm(gmm.logits, "entropy", 0.7)
    base = gmm.unconditional()
    assert torch.equal(guided(base, [banded])(x, 0.2), base(x, 0.2))
    assert torch.equal(guided(base, [banded])(x, 4.0), base(x, 4.0))
    inside = guided(base, [banded, entropy])(x, 1.0)
    separately = base(x, 1.0) + correction([banded], x, 1.0) + correction([entropy], x, 1.0)
    assert (inside - separately).abs().max().item() < 1e-12
    assert (correction([banded], x, 1.0)).abs().max().item() > 0.1


# ----------------------------------------------------------------------------------------------------------------------
# Uncertainty potentials.


def test_two_class_uncertainty_gradients_are_multiples_of_minus_sign_l_grad_l():
    """SEED_METHODS.md 1.4: with l = l_1 - l_0 and p = sigmoid(l), grad H = -l p(1-p) grad l,
    grad(-margin) = -2 sign(l) p(1-p) grad l, grad(-max p) = -sign(l) p(1-p) grad l."""
    gmm = two_class(priors=[0.4, 0.6])
    sigma = 0.6
    x = random_images(32, 5, scale=1.2)
    logits = gmm.logits(x, sigma)
    ell = (logits[:, 1] - logits[:, 0])[:, None]
    p = torch.sigmoid(ell)
    grad_ell = (gmm.logit_gradients(x, sigma)[:, 1] - gmm.logit_gradients(x, sigma)[:, 0])
    common = p * (1 - p) * grad_ell
    expected = {"entropy": -ell * common, "margin": -2 * ell.sign() * common, "leastconf": -ell.sign() * common}
    for kind, want in expected.items():
        got = GuidanceTerm(gmm.logits, kind, 1.0).gradient(x, sigma).reshape(32, -1)
        assert (got - want).abs().max().item() < 1e-12, kind
    # One small guided step of each kind moves every sample towards the boundary.
    for kind in expected:
        moved = x + 1e-3 * GuidanceTerm(gmm.logits, kind, 1.0).gradient(x, sigma)
        new_logits = gmm.logits(moved, sigma)
        assert bool(((new_logits[:, 1] - new_logits[:, 0]).abs() < ell[:, 0].abs()).all()), kind


def test_entropy_gradient_vanishes_on_the_boundary():
    gmm = two_class()  # equal priors: the boundary is the bisecting hyperplane x_0 = 0
    x = random_images(8, 6)
    x[:, 0, 0, 0] = 0.0
    grad = GuidanceTerm(gmm.logits, "entropy", 1.0).gradient(x, 0.5)
    assert grad.abs().max().item() < 1e-14


def test_many_class_gradients_equal_the_chain_rule_of_their_formulas():
    """K = 4: dG/dl_j in closed form (entropy: -p_j (log p_j + H); the top-two gap: p_a (d_aj - p_j) - p_b (d_bj - p_j);
    the max: p_a (d_aj - p_j)) times the exact grad_x l_j."""
    g = torch.Generator().manual_seed(7)
    means = torch.randn(4, math.prod(SHAPE), generator=g, dtype=torch.float64)
    gmm = GaussianMixture(means, 0.7, priors=[0.1, 0.2, 0.3, 0.4])
    sigma = 0.4
    x = random_images(16, 8)
    p = torch.softmax(gmm.logits(x, sigma), dim=1)
    entropy = -(p * p.log()).sum(1, keepdim=True)
    eye = torch.eye(4, dtype=torch.float64)
    order = p.argsort(dim=1, descending=True)
    a, b = order[:, 0], order[:, 1]
    pa, pb = p.gather(1, a[:, None]), p.gather(1, b[:, None])
    d_top = pa * (eye[a] - p)
    d_second = pb * (eye[b] - p)
    dl = {"entropy": -p * (p.log() + entropy), "margin": -(d_top - d_second), "leastconf": -d_top}
    jac = gmm.logit_gradients(x, sigma)  # (N, K, d)
    for kind, d_logits in dl.items():
        want = (d_logits[:, :, None] * jac).sum(1)
        got = GuidanceTerm(gmm.logits, kind, 1.0).gradient(x, sigma).reshape(16, -1)
        assert (got - want).abs().max().item() < 1e-12, kind
    with pytest.raises(ValueError):
        potential(torch.zeros(2, 3), "classifier")


# ----------------------------------------------------------------------------------------------------------------------
# Guided sampling with exact pieces.


def test_classifier_guided_edm_sampler_draws_the_class_component():
    """The unconditional exact denoiser guided by the exact classifier for class 1 samples N(mu_1, s^2 I): mean
    within 5 standard errors, per-coordinate variance within 10 % (about 3 standard errors of a variance estimate
    from 2000 draws). Heun without and with churn, and Euler."""
    gmm = two_class(separation=2.0, s=0.5, priors=[0.7, 0.3])
    n = 2000
    term = GuidanceTerm(gmm.logits, "classifier", 1.0, target=torch.ones(n, dtype=torch.int64))
    for solver, churn, steps in (("heun", 0.0, 32), ("heun", 10.0, 128), ("euler", 0.0, 512)):
        gen = SeedGenerators(range(n))
        samples = edm_generate(guided(gmm.unconditional(), [term]), gen.randn([n, *SHAPE], dtype=torch.float64), gen,
                               num_steps=steps, solver=solver, S_churn=churn).reshape(n, -1)
        mean_error = (samples.mean(0) - gmm.means[1]).abs().max().item()
        var_error = (samples.var(0) / gmm.s**2 - 1).abs().max().item()
        assert mean_error < 5 * gmm.s / math.sqrt(n), (solver, mean_error)
        assert var_error < 0.1, (solver, var_error)


def test_entropy_guidance_raises_the_predictive_entropy_of_samples():
    """Mean predictive entropy (nats, exact clean classifier at sigma = 0) of 1000 samples: unguided 0.166,
    entropy-guided at scale 2 0.470 (measured); required: at least 0.1 nats higher."""
    gmm = two_class(separation=1.5, s=0.5)
    n = 1000

    def mean_entropy(terms):
        gen = SeedGenerators(range(n))
        samples = edm_generate(guided(gmm.unconditional(), terms), gen.randn([n, *SHAPE], dtype=torch.float64), gen,
                               num_steps=32)
        return potential(gmm.logits(samples, 0.0), "entropy").mean().item()

    unguided, entropy_guided = mean_entropy([]), mean_entropy([GuidanceTerm(gmm.logits, "entropy", 2.0)])
    assert entropy_guided > unguided + 0.1, (unguided, entropy_guided)


def test_guided_msm_aggregate_with_full_coverage_equals_the_guided_full_denoiser():
    """With a mask law that always covers everything the MSM aggregate reduces to the full denoiser; guided, the
    ancestral solver on it must give exactly the ancestral solver run on the guided full denoiser."""
    gmm = two_class()
    n = 8
    target = torch.tensor([0, 1] * 4)
    terms = [GuidanceTerm(gmm.logits, "classifier", 1.5, target=target), GuidanceTerm(gmm.logits, "margin", 0.5)]
    sigmas = torch.logspace(1, -2, 20, dtype=torch.float64)
    base = gmm.unconditional()

    def partial(s, mask, sigma):
        return mask * base(s, sigma)

    x = noise_start(SeedGenerators(range(100, 100 + n)).randn([n, *SHAPE], dtype=torch.float64), sigmas[0].item())
    solver = Ancestral(precision="double")
    aggregate = MSMAggregate(partial, FullMask(), SeedGenerators(range(n)), 2)
    msm = solver(guided(aggregate, terms), x, SeedGenerators(range(n)), sigmas)
    ancestral = solver(guided(base, terms), x, SeedGenerators(range(n)), sigmas)
    unguided = solver(base, x, SeedGenerators(range(n)), sigmas)
    assert (msm - ancestral).abs().max().item() < 1e-10
    assert (msm - unguided).abs().max().item() > 0.1


# ----------------------------------------------------------------------------------------------------------------------
# Probability-flow inversion on Gaussian data N(mu, s^2 I): x(sigma) = mu + (x(sigma0) - mu) sqrt(v(sigma) / v(sigma0)).


def gaussian_denoiser(mu, s):
    return lambda x, sigma: mu + s**2 / (s**2 + float(sigma) ** 2) * (x - mu)


def test_encoding_matches_the_closed_form_ode_map_at_second_order():
    mu, s, sigma_min, sigma_max = 0.3, 0.5, 0.002, 80.0
    x = random_images(64, 9, scale=s) + mu
    exact = mu + (x - mu) * math.sqrt((s**2 + sigma_max**2) / (s**2 + sigma_min**2))
    errors = {}
    for steps in (32, 64, 128):
        latents = encode(gaussian_denoiser(mu, s), x, bridge_sigmas(steps))
        errors[steps] = ((latents - exact).abs().max() / (exact - mu).abs().max()).item()
    assert errors[128] < 1e-3  # measured 8.4e-4 (relative to the largest latent deviation)
    for coarse, fine in ((32, 64), (64, 128)):
        assert 3.0 < errors[coarse] / errors[fine] < 5.0, errors  # second order: halving the step divides by 4


def test_decode_of_encode_returns_the_image_at_scale_zero():
    """Max abs round-trip error < 2e-5 with 256 Heun steps each way on data of std 0.5 (measured 6.2e-6; 5.0e-5 at
    128 steps, 4.0e-4 at 64)."""
    mu, s = -0.2, 0.5
    denoiser = gaussian_denoiser(mu, s)
    x = random_images(64, 10, scale=s) + mu
    roundtrip = decode(denoiser, encode(denoiser, x, bridge_sigmas(256)), bridge_sigmas(256))
    assert (roundtrip - x).abs().max().item() < 2e-5


# ----------------------------------------------------------------------------------------------------------------------
# generate.py: guided, labelled, MSM and dual-bridge generation on tiny untrained snapshots, and its bad input.


def _diffusion_snapshot(path, label_dim: int, measurement=None, resolution=16, in_channels=1):
    from training.networks import network_kwargs_for

    cfg = network_kwargs_for(arch="ddpmpp", precond="edm", img_resolution=resolution, in_channels=in_channels,
                             out_channels=1, label_dim=label_dim, cbase=8, cres=[1, 2], num_blocks=1,
                             attn_resolutions=[], dropout=0.0, label_dropout=0.1 if label_dim else 0.0)
    net = build_network(cfg)
    with torch.no_grad():  # a fresh network outputs F = 0; give it a label-dependent output so CFG changes images
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    dataset = {"kind": "image", "path": "data.zip", "image_shape": [1, resolution, resolution],
               "label_dim": label_dim}
    checkpoint.save_snapshot(str(path), {"network": cfg, "dataset": dataset, "measurement": measurement}, net)
    return str(path)


def _classifier_snapshot(path, label_dim=2, resolution=16):
    from training.classifier import classifier_kwargs

    cfg = classifier_kwargs(resolution, 1, label_dim, cbase=8, cres=(1, 2), blocks=1)
    net = build_network(cfg)
    torch.nn.init.normal_(net.head.weight, generator=torch.Generator().manual_seed(0))  # non-zero gradients
    dataset = {"kind": "image", "path": "data.zip", "image_shape": [1, resolution, resolution],
               "label_dim": label_dim}
    checkpoint.save_snapshot(str(path), {"network": cfg, "dataset": dataset}, net)
    return str(path)


@pytest.fixture(scope="module")
def snapshots(tmp_path_factory):
    from tests.test_classifier import write_lesion_zip
    from training.measurements import MeasurementConfig

    root = tmp_path_factory.mktemp("guided")
    box = MeasurementConfig("identity", {"kind": "box", "p": 0.4}).to_config()
    return {"cond": _diffusion_snapshot(root / "cond.pt", 2), "uncond": _diffusion_snapshot(root / "uncond.pt", 0),
            "msm": _diffusion_snapshot(root / "msm.pt", 2, measurement=box),
            "classifier": _classifier_snapshot(root / "cls.pt"),
            "classifier3": _classifier_snapshot(root / "cls3.pt", label_dim=3),
            "classifier32": _classifier_snapshot(root / "cls32.pt", resolution=32),
            "labelled": write_lesion_zip(str(root / "lesions.zip"), 4, seed=0),
            "unlabelled": make_phantoms(str(root / "plain.zip"), num=4, resolution=16)}


def _generate(outdir, network, *args, check=True):
    return run_cli(["generate.py", "--network", network, "--outdir", str(outdir), "--steps", "4", "--device", "cpu",
                    *args], check=check)


def _pixels(folder, names):
    return np.stack([np.asarray(PIL.Image.open(os.path.join(folder, n))) for n in names]).astype(np.int64)


def test_generate_guided_per_class_writes_a_labelled_dataset(tmp_path, snapshots):
    out = tmp_path / "out"
    _generate(out, snapshots["cond"], "--per-class", "2", "--seeds", "10-99", "--classifier", snapshots["classifier"],
              "--guidance", "entropy", "--guidance", "classifier", "--guidance-scale", "3", "--cfg-scale", "2",
              "--guidance-sigma-range", "0.01,50")
    meta = json.load(open(out / "dataset.json"))
    assert meta["labels"] == [["000010.png", 0], ["000011.png", 0], ["000012.png", 1], ["000013.png", 1]]
    assert (tmp_path / "out-grid-class0.png").exists() and (tmp_path / "out-grid-class1.png").exists()
    dataset = open_dataset(str(out), use_labels=True)
    assert len(dataset) == 4 and dataset.label_dim == 2
    plain = tmp_path / "plain"
    _generate(plain, snapshots["cond"], "--per-class", "2", "--seeds", "10-99")
    names = [n for n, _ in meta["labels"]]
    assert np.abs(_pixels(out, names) - _pixels(plain, names)).max() > 0  # guidance changed the images


def test_generate_guided_msm_sampler_on_a_class_conditional_msm_model(tmp_path, snapshots):
    """Guidance with the MSM sampler end to end (tiny model, 200 VP levels, K = 2): CFG in the partial denoisers,
    classifier and margin terms on the aggregate; the images must differ from unguided ones of the same seeds."""
    args = ["--sampler", "msm", "--subsets", "2", "--class", "1", "--seeds", "0-1"]
    _generate(tmp_path / "guided", snapshots["msm"], *args, "--classifier", snapshots["classifier"], "--guidance",
              "margin", "--guidance", "classifier", "--guidance-scale", "2", "--cfg-scale", "1.5")
    _generate(tmp_path / "plain", snapshots["msm"], *args)
    names = ["000000.png", "000001.png"]
    assert np.abs(_pixels(tmp_path / "guided", names) - _pixels(tmp_path / "plain", names)).max() > 0
    assert json.load(open(tmp_path / "guided" / "dataset.json"))["labels"] == [[n, 1] for n in names]


def test_generate_dual_bridge_maps_labels(tmp_path, snapshots):
    out = tmp_path / "bridge"
    _generate(out, snapshots["cond"], "--bridge-source", snapshots["labelled"], "--source-label", "0,1",
              "--target-label", "1,0", "--classifier", snapshots["classifier"], "--guidance", "entropy",
              "--guidance-scale", "0.5")
    meta = json.load(open(out / "dataset.json"))
    assert meta["labels"] == [["000000.png", 1], ["000001.png", 0], ["000002.png", 1], ["000003.png", 0]]


def test_generate_classifier_guidance_of_an_unconditional_model(tmp_path, snapshots):
    _generate(tmp_path / "u", snapshots["uncond"], "--class", "1", "--seeds", "0-1", "--classifier",
              snapshots["classifier"], "--guidance", "classifier")
    assert json.load(open(tmp_path / "u" / "dataset.json"))["labels"] == [["000000.png", 1], ["000001.png", 1]]


def test_generate_bad_guidance_input_one_sentence_and_nothing_written(tmp_path, snapshots):
    cls = ["--classifier", snapshots["classifier"]]
    cases = [
        (snapshots["cond"], ["--guidance", "entropy"], "needs a noise-aware classifier"),
        (snapshots["uncond"], ["--cfg-scale", "1"], "needs a class-conditional model"),
        (snapshots["cond"], ["--classifier", snapshots["classifier32"], "--guidance", "margin"], "resolution 32"),
        (snapshots["cond"], ["--classifier", snapshots["classifier3"], "--guidance", "margin"], "classes 3"),
        (snapshots["cond"], ["--class", "2"], "--class 2 is out of range"),
        (snapshots["cond"], ["--bridge-source", snapshots["labelled"], "--target-label", "0,5"],
         "--target-label 5 is out of range"),
        (snapshots["cond"], ["--bridge-source", snapshots["unlabelled"]], "must be a labelled image dataset"),
        (snapshots["classifier"], [], "is a classifier snapshot"),
        (snapshots["cond"], ["--classifier", snapshots["cond"], "--guidance", "entropy"], "not a classifier"),
        (snapshots["cond"], [*cls], "--classifier was given without --guidance"),
    ]
    for network, args, message in cases:
        out = tmp_path / "never"
        proc = _generate(out, network, *args, check=False)
        lines = [line for line in proc.stderr.strip().splitlines() if line]
        assert proc.returncode != 0 and len(lines) == 1, (args, proc.stderr[-2000:])
        assert message in lines[0], (args, lines[0])
        assert not out.exists() and not list(tmp_path.glob("never*")), args
