"""Invariants of the measurement losses (MSM.md sections 3-4, 10) and of the measurement protocols: zero loss for a
perfect predictor, blindness to the null space of P T, no gradient on unobserved entries, scale equal to EDM's at
P = I, the VP port equal to the reference's epsilon formulation, SURE against the true error, fixed vs resample
masks, and no clean image anywhere in the training batch."""

import math

import numpy as np
import pytest
import torch

from dnnlib import EasyDict
from tests.helpers import cli_defaults, make_phantoms
from training.data_tools import birdcage_maps, simulate_mri
from training.dataset import open_dataset
from training.loss import AmbientLoss, EDMLoss, MSMLoss
from training.masks import BoxMaskLaw, RandomLineMaskLaw
from training.measurements import partial_denoise
from training.networks import DiscreteVPPrecond
from training.operators import Identity, MultiCoilMRI, measurement_randn
from training.schedules import linear_beta_alphas_cumprod, respaced_timesteps, vp_grid_sigmas
from training.training_loop import StreamSampler

IMAGE_MEASUREMENT = {"operator": "identity", "mask": {"kind": "box", "p": 0.4}}


def mri_measurement(R=4, acs=2, sigma_y=0.0):
    return {"operator": "mri", "mask": {"kind": "lines-random", "R": R, "acs": acs}, "sigma_y": sigma_y}


class ConvNet(torch.nn.Module):
    """A small fixed random network D(x; sigma) = x[:, :out] + conv(x) / (1 + sigma) + offset, with a learnable
    offset (zero unless set): enough to depend on its input and to carry gradients."""

    def __init__(self, in_channels, out_channels, shape, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.weight = torch.nn.Parameter(torch.randn(out_channels, in_channels, 3, 3, generator=g) * 0.1)
        self.offset = torch.nn.Parameter(torch.zeros(1, out_channels, *shape))

    def forward(self, x, sigma, class_labels=None):
        sigma = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1, 1, 1, 1)
        conv = torch.nn.functional.conv2d(x.float(), self.weight, padding=1)
        return x[:, : self.out_channels].float() + conv / (1 + sigma) + self.offset


class ConstantNet(torch.nn.Module):
    """Predicts the same image whatever its input: x0_hat = x_star (a parameter, so gradients can be inspected)."""

    def __init__(self, x_star, in_channels=None):
        super().__init__()
        self.x_star = torch.nn.Parameter(x_star.clone())
        self.in_channels = in_channels or x_star.shape[1]

    def forward(self, x, sigma, class_labels=None):
        return self.x_star + 0 * x[:, : self.x_star.shape[1]]


def image_batch(n=6, size=16, channels=3, seed=0, law=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, channels, size, size, generator=g) * 2 - 1
    mask = (law or BoxMaskLaw(0.4)).sample(n, (size, size), g)
    return x, {"y": x * mask, "mask": mask, "label": torch.zeros(n, 0), "index": torch.arange(n)}


def mri_batch(n=4, size=8, coils=4, seed=0, R=4, acs=2):
    g = torch.Generator().manual_seed(seed)
    maps = torch.stack([torch.from_numpy(birdcage_maps(coils, size, size, rotation=float(i))) for i in range(n)])
    x = torch.randn(n, 2, size, size, generator=g)
    mask = RandomLineMaskLaw(R, acs).sample(n, (size, size), g)
    y = MultiCoilMRI(maps).A(x) * mask
    return x, {"y": y, "mask": mask, "maps": maps, "label": torch.zeros(n, 0), "index": torch.arange(n)}


def evaluate(loss_fn, net, batch, seed=1):
    return loss_fn(net=net, batch=batch, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------------------------------
# Noiseless invariants.


@pytest.mark.parametrize("kind", ["image", "mri"])
def test_loss_is_zero_for_a_perfect_predictor(kind):
    x, batch = image_batch() if kind == "image" else mri_batch()
    measurement = IMAGE_MEASUREMENT if kind == "image" else mri_measurement()
    perfect = ConstantNet(x)
    for loss_fn in (MSMLoss(measurement), AmbientLoss(measurement, delta=0.3),
                    MSMLoss(measurement, sigma_dist="vp200", weighting="inverse-variance")):
        loss = evaluate(loss_fn, perfect, batch)
        assert loss.shape == (len(x),) and loss.abs().max() < 1e-6, loss
    wrong = ConstantNet(x + 0.1)
    assert evaluate(MSMLoss(measurement), wrong, batch).min() > 1e-3


def null_space_of_PT(operator, mask, image_shape):
    """An orthonormal basis (k, 2*H*W) of {v: P T v = 0}, from the explicit matrix of P T (one example)."""
    dim = math.prod(image_shape)
    columns = [torch.view_as_real((operator.A(e.reshape(1, *image_shape)) * mask).flatten(1).to(torch.complex64))
               .flatten() for e in torch.eye(dim)]
    matrix = torch.stack(columns, dim=1).double()  # (real measurement entries, image entries)
    _, singular, vh = torch.linalg.svd(matrix)
    rank = int((singular > 1e-5 * singular[0]).sum())
    return vh[rank:].float()


@pytest.mark.parametrize("kind", ["image", "mri"])
def test_loss_is_blind_to_the_null_space_of_PT_and_to_unobserved_entries(kind):
    if kind == "image":
        x, batch = image_batch(n=1, size=8, channels=1)
        operator, measurement = Identity(), IMAGE_MEASUREMENT
    else:
        x, batch = mri_batch(n=1, size=8, coils=2, R=4, acs=0)  # 2 coils x 2 lines: a large null space
        operator, measurement = MultiCoilMRI(batch["maps"]), mri_measurement(acs=0)
    basis = null_space_of_PT(operator, batch["mask"], x.shape[1:])
    assert len(basis) >= x[0].numel() // 3
    v = (torch.randn(len(basis), generator=torch.Generator().manual_seed(3)) @ basis).reshape(x.shape)
    assert (operator.A(v) * batch["mask"]).abs().max() < 1e-4 * v.abs().max()
    loss_fn = MSMLoss(measurement)
    net = ConvNet(x.shape[1], x.shape[1], x.shape[-2:])
    reference = evaluate(loss_fn, net, batch)
    with torch.no_grad():
        net.offset.copy_(5 * v)
    torch.testing.assert_close(evaluate(loss_fn, net, batch), reference, rtol=1e-4, atol=1e-5)
    # Garbage in the unobserved entries of y changes nothing either (the loss masks every residual).
    garbage = {**batch, "y": batch["y"] + (1 - batch["mask"]) * 7.0}
    net.offset.data.zero_()
    torch.testing.assert_close(evaluate(loss_fn, net, garbage), reference, rtol=1e-5, atol=1e-6)


def test_no_gradient_reaches_unobserved_entries():
    x, batch = image_batch(n=3, size=8)
    net = ConstantNet(torch.zeros_like(x))
    for loss_fn in (MSMLoss(IMAGE_MEASUREMENT), AmbientLoss(IMAGE_MEASUREMENT, delta=0.2)):
        net.zero_grad()
        evaluate(loss_fn, net, batch).sum().backward()
        grad, observed = net.x_star.grad, batch["mask"].expand_as(x).bool()
        assert grad[~observed].abs().max() == 0 and grad[observed].abs().min() > 0
    # MRI: the gradient on the predicted image is orthogonal to the null space of P T.
    x, batch = mri_batch(n=1, size=8, coils=2, R=4, acs=0)
    net = ConstantNet(torch.zeros_like(x))
    evaluate(MSMLoss(mri_measurement(acs=0)), net, batch).sum().backward()
    basis = null_space_of_PT(MultiCoilMRI(batch["maps"]), batch["mask"], x.shape[1:])
    grad = net.x_star.grad.flatten()
    assert (basis @ grad).abs().max() < 1e-5 * grad.norm()


def test_scale_matches_edm_at_full_mask():
    # Images, P = I: MSMLoss draws exactly what EDMLoss draws and must return the same numbers.
    x, batch = image_batch(law=BoxMaskLaw(0.0))
    net = ConvNet(3, 3, x.shape[-2:])
    msm = evaluate(MSMLoss({"operator": "identity", "mask": {"kind": "full"}}), net, batch)
    edm = evaluate(EDMLoss(), net, {"image": x, "label": batch["label"]})
    torch.testing.assert_close(msm, edm, rtol=1e-5, atol=1e-5)
    # MRI, P = I, sum_c |S_c|^2 = 1: ||T (x0 - x)||^2 = ||x0 - x||^2, so a fixed prediction scores as under EDMLoss.
    x, batch = mri_batch(R=1, acs=0)
    guess = ConstantNet(x + torch.randn(x.shape, generator=torch.Generator().manual_seed(5)) * 0.3)
    msm = evaluate(MSMLoss({"operator": "mri", "mask": {"kind": "full"}}), guess, {**batch, "mask": torch.ones(1)})
    edm = evaluate(EDMLoss(), guess, {"image": x, "label": batch["label"]})
    torch.testing.assert_close(msm, edm, rtol=1e-4, atol=1e-4)
    # The image-space noise T^H n of white k-space noise (std 1 on re and im) is white with std 1 per channel.
    maps = torch.from_numpy(birdcage_maps(8, 32, 32))[None].expand(64, -1, -1, -1)
    kspace_noise = measurement_randn(torch.zeros(64, 8, 32, 32, dtype=torch.complex64),
                                     torch.Generator().manual_seed(0))
    image_noise = MultiCoilMRI(maps).AH(kspace_noise)
    assert abs(image_noise.std().item() - 1) < 0.01
    # ... and white: its covariance is T^H T, which is the identity for these maps.
    v = torch.randn(2, 2, 32, 32, generator=torch.Generator().manual_seed(1))
    operator = MultiCoilMRI(maps[:2])
    torch.testing.assert_close(operator.AH(operator.A(v)), v, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------------------------------
# The reference's VP formulation.


@pytest.mark.parametrize("rule", ["ddim", "section"])
def test_vp200_grid_and_discrete_timesteps(rule):
    steps = respaced_timesteps(rule=rule)
    last = 995 if rule == "ddim" else 999  # the reference's 'ddim200' stops one stride short of the last step
    assert len(steps) == 200 and steps[0] == 0 and steps[-1] == last and (steps.diff() > 0).all()
    sigmas = vp_grid_sigmas(rule=rule)
    abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    np.testing.assert_allclose(sigmas.numpy(), np.sqrt(1 / abar[steps.numpy()] - 1), rtol=1e-12)
    top = 151.183 if rule == "ddim" else 157.407
    assert abs(sigmas[0] - 0.0100005) < 1e-6 and abs(sigmas[-1] - top) < 1e-2
    net = DiscreteVPPrecond(8, 1, model_type="SongUNet", model_channels=8, channel_mult=[1], num_blocks=1,
                            attn_resolutions=[])
    assert torch.equal(net.timestep(sigmas.float()), steps.float())
    halfway = net.timestep(((sigmas[:-1] ** 2 + sigmas[1:] ** 2) / 2).sqrt().float())
    assert ((halfway > steps[:-1]) & (halfway < steps[1:])).all()
    assert abs(net.sigma_min - 0.0100005) < 1e-6 and abs(net.sigma_max - 157.407) < 1e-2


def test_vp200_grid_is_guided_diffusions_ddim200_respacing():
    # guided-diffusion's `space_timesteps` documents two rules. A respacing string 'ddimN' uses "the fixed striding
    # from the DDIM paper": one integer stride s for the whole chain, the kept steps being 0, s, 2 s, ... below the
    # number of steps, with s the stride that yields exactly N of them (the smallest, where several would). A plain
    # count 'N' instead spreads N steps over the chain with a fractional stride, first and last step included. The
    # MSM reference trains and samples with 'ddim200'; derived here by hand, not by the code under test:
    # 1000 steps, N = 200: ceil(1000 / s) = 200 first holds at s = 5, so t = 0, 5, ..., 995.
    expected = [5 * k for k in range(200)]
    assert respaced_timesteps().tolist() == expected
    assert respaced_timesteps(1000, 200, "ddim").tolist() == expected
    # The rule itself, for other counts: N = 100 -> stride 10; N = 250 -> 4; N = 334 -> 3 (0 .. 999); N = 300 has no
    # integer stride (ceil(1000 / 3) = 334, ceil(1000 / 4) = 250) and is refused, as guided-diffusion refuses it.
    assert respaced_timesteps(1000, 100).tolist() == list(range(0, 1000, 10))
    assert respaced_timesteps(1000, 250).tolist() == list(range(0, 1000, 4))
    assert respaced_timesteps(1000, 334).tolist() == list(range(0, 1000, 3))
    with pytest.raises(ValueError, match="no integer stride"):
        respaced_timesteps(1000, 300)
    # The section rule ('200') keeps both ends: round(i 999 / 199). It differs from the reference's grid in 175 of
    # the 200 levels, by 1 to 4 steps, and so in sigma by up to 4.1 % (157.41 against 151.18 at the top).
    section = respaced_timesteps(rule="section")
    assert section.tolist()[:6] == [0, 5, 10, 15, 20, 25] and section[-1] == 999
    differ = (section != respaced_timesteps()).nonzero().flatten()
    assert len(differ) == 175 and set((section - respaced_timesteps())[differ].tolist()) == {1, 2, 3, 4}
    ratio = vp_grid_sigmas(rule="section") / vp_grid_sigmas()
    assert 0.040 < float(ratio.max() - 1) < 0.042
    # Every level of the reference's grid is a multiple of 5, the only timesteps its MSM networks were trained on.
    net = DiscreteVPPrecond(8, 1, model_type="SongUNet", model_channels=8, channel_mult=[1], num_blocks=1,
                            attn_resolutions=[])
    assert (net.timestep(vp_grid_sigmas().float()) % 5 == 0).all()


@pytest.mark.parametrize("kind", ["image", "mri"])
def test_vp_msm_equals_the_reference_epsilon_formulation(kind):
    x, batch = image_batch(n=5, size=8, channels=1) if kind == "image" else mri_batch(n=5)
    measurement = {**IMAGE_MEASUREMENT} if kind == "image" else mri_measurement()
    operator = Identity() if kind == "image" else MultiCoilMRI(batch["maps"])
    channels = x.shape[1]
    net = DiscreteVPPrecond(8, channels, model_type="SongUNet", model_channels=8, channel_mult=[1], num_blocks=1,
                            attn_resolutions=[], dropout=0.0)
    seen = []
    original_forward = net.model.forward
    net.model.forward = lambda x_in, noise_labels, labels=None: seen.append(noise_labels) or original_forward(
        x_in, noise_labels, labels)
    loss = evaluate(MSMLoss(measurement, sigma_dist="vp200", weighting="inverse-variance"), net, batch, seed=11)

    # The reference, written out: level k uniform on the grid, timestep t_k, x_t = sqrt(abar) T^H P (y + sigma n),
    # eps_hat = F(x_t, t_k), x0 = x_t / sqrt(abar) - sqrt(1 / abar - 1) eps_hat, loss ||P T x0 - y||^2 / sigma^2.
    g = torch.Generator().manual_seed(11)
    level = torch.randint(0, 200, (len(x),), generator=g)
    noise = measurement_randn(batch["y"], g)
    t = respaced_timesteps()[level]
    abar = linear_beta_alphas_cumprod()[t].float().reshape(-1, 1, 1, 1)
    sigma = (1 / abar - 1).sqrt()
    assert torch.equal(seen[0], t.float())
    mask = batch["mask"]
    x_t = abar.sqrt() * operator.AH(mask * (batch["y"] + sigma * noise))
    with torch.no_grad():
        eps_hat = original_forward(x_t, t.float(), None)
    x0 = x_t / abar.sqrt() - (1 / abar - 1).sqrt() * eps_hat
    residual = torch.view_as_real(mask * (operator.A(x0) - batch["y"])) if kind == "mri" else mask * (x0 - batch["y"])
    entries = batch["y"][0].numel()
    observed = mask.expand(batch["y"].shape).flatten(1).sum(1)
    reference = residual.square().flatten(1).sum(1) / sigma.flatten() ** 2 * entries / observed
    torch.testing.assert_close(loss.detach(), reference, rtol=2e-4, atol=1e-4)
    if kind == "image":  # ... which for T = I is the epsilon MSE on observed entries.
        eps_mse = (mask * (noise - eps_hat)).square().flatten(1).sum(1) * entries / observed
        torch.testing.assert_close(loss.detach(), eps_mse, rtol=2e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------------------------------
# Noisy MSM: SURE and the two regimes.


class LinearDenoiser(torch.nn.Module):
    """D(u; sigma) = W u on flattened images (W fixed), a linear denoiser whose true error is known."""

    def __init__(self, weight, shape):
        super().__init__()
        self.weight, self.shape, self.in_channels = weight, shape, shape[0]

    def forward(self, x, sigma, class_labels=None):
        return (x.flatten(1).double() @ self.weight.T).float().reshape(len(x), *self.shape)


def test_sure_matches_the_true_error_of_a_linear_denoiser():
    shape, dim, eta = (1, 6, 6), 36, 0.3
    g = torch.Generator().manual_seed(0)
    basis = torch.randn(dim, 5, generator=g, dtype=torch.float64)
    cov = basis @ basis.T / 5 * 0.25 + 0.01 * torch.eye(dim, dtype=torch.float64)
    # A Wiener filter for the wrong noise level: deliberately not optimal.
    weight = cov @ torch.linalg.inv(cov + 0.5 * eta**2 * torch.eye(dim, dtype=torch.float64))
    net = LinearDenoiser(weight, shape)
    n = 20000
    z = torch.randn(n, dim, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(cov).T
    z = z.float().reshape(n, *shape)
    mask = BoxMaskLaw(0.4).sample(n, shape[1:], g)
    y = mask * (z + eta * torch.randn(z.shape, generator=g))
    loss_fn = MSMLoss({**IMAGE_MEASUREMENT, "sigma_y": eta}, sure_tau=0.005)
    observed = mask.expand(y.shape).flatten(1).sum(1)
    with torch.no_grad():
        y1, sure = loss_fn.sure(net, Identity(), mask, y, None, torch.Generator().manual_seed(1), observed)
    true_error = ((y1 - mask * z) ** 2).flatten(1).sum(1) / observed
    difference = (sure - true_error).double()
    standard_error = difference.std().item() / math.sqrt(n)
    naive = (((y1 - y) ** 2).flatten(1).sum(1) / observed).mean()
    print(f"\nSURE {sure.mean():.5f} vs true error {true_error.mean():.5f} (difference {difference.mean():.2e}, "
          f"MC standard error {standard_error:.1e}); naive ||y1 - y||^2 / m = {naive:.5f}")
    assert abs(difference.mean().item()) < 4 * standard_error
    assert abs(sure.mean() - true_error.mean()) < 0.02 * true_error.mean()


def test_noisy_msm_branches_follow_msm_md():
    """The two regimes and the SURE term, recomputed by hand from the same draws (sigma set per example)."""
    eta, tau, w = 0.2, 0.01, 0.3
    x, batch = image_batch(n=4, size=8, channels=1)
    batch["y"] = batch["mask"] * (x + eta * torch.randn(x.shape, generator=torch.Generator().manual_seed(9)))
    loss_fn = MSMLoss({**IMAGE_MEASUREMENT, "sigma_y": eta}, sure_tau=tau, sure_weight=w)
    sigma = torch.tensor([0.05, 0.15, 0.5, 3.0]).reshape(-1, 1, 1, 1)
    loss_fn.sample_sigma = lambda n, generator, device: sigma
    net = ConvNet(1, 1, (8, 8))
    loss = evaluate(loss_fn, net, batch, seed=4)

    g = torch.Generator().manual_seed(4)
    y, mask = batch["y"], batch["mask"]
    noise, probe = torch.randn(y.shape, generator=g), mask * torch.randn(y.shape, generator=g)
    op = Identity()
    m = mask.expand(y.shape).flatten(1).sum(1)
    with torch.no_grad():
        y1 = partial_denoise(net, op, mask, y, eta)[0]
        y2 = partial_denoise(net, op, mask, y + tau * probe, eta)[0]
        divergence = (probe * (y2 - y1)).flatten(1).sum(1) / tau
        sure = ((y1 - y) ** 2).flatten(1).sum(1) / m - eta**2 + 2 * eta**2 * divergence / m
        expected = []
        for i, s_i in enumerate(sigma.flatten().tolist()):
            sl = slice(i, i + 1)
            if s_i > eta:  # MSM.md: y_hat = P T [c D + (1 - c) T^H s], target y
                s = mask[sl] * (y[sl] + math.sqrt(s_i**2 - eta**2) * noise[sl])
                c = (s_i**2 - eta**2) / s_i**2
                x0 = net(s, s_i)
                residual, target = mask[sl] * (c * x0 + (1 - c) * s), y[sl]
            else:
                s = mask[sl] * (y1[sl] + s_i * noise[sl])
                residual, target = mask[sl] * net(s, s_i), y1[sl]
            weight = (s_i**2 + 0.25) / (s_i * 0.5) ** 2
            expected.append(weight * ((residual - target) ** 2).sum() * 64 / m[i]
                            + w * (eta**2 + 0.25) / (eta * 0.5) ** 2 * 64 * sure[i])
    torch.testing.assert_close(loss.detach(), torch.stack(expected), rtol=1e-4, atol=1e-4)


class GradientSpy(ConvNet):
    """Records the sigma of every call whose output receives a non-zero gradient."""

    def __init__(self, *args):
        super().__init__(*args)
        self.calls = []

    def forward(self, x_in, sigma, class_labels=None):
        out = super().forward(x_in, sigma, class_labels)
        level = round(float(torch.as_tensor(sigma).flatten()[0]), 6)
        out.register_hook(lambda grad: self.calls.append(level) if grad.abs().max() > 0 else None)
        return out


def test_pseudo_clean_gradient_choice():
    """Detached by default: the sigma <= eta branch trains only the network call at sigma, not the one making y1."""
    eta = 0.5
    x, batch = image_batch(n=2, size=8, channels=1)
    for flows in (False, True):
        loss_fn = MSMLoss({**IMAGE_MEASUREMENT, "sigma_y": eta}, sure_weight=0.0, pseudo_clean_grad=flows)
        loss_fn.sample_sigma = lambda n, generator, device: torch.full((n, 1, 1, 1), 0.1)
        net = GradientSpy(1, 1, (8, 8))
        evaluate(loss_fn, net, batch).sum().backward()
        assert (eta in net.calls) == flows and 0.1 in net.calls


# ----------------------------------------------------------------------------------------------------------------------
# Measurement protocols and the absence of clean data.


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    return make_phantoms(str(tmp_path_factory.mktemp("ph") / "ph.zip"), num=8, resolution=16)


@pytest.fixture(scope="module")
def mri_data(tmp_path_factory, phantoms):
    dest = str(tmp_path_factory.mktemp("mri") / "mri")
    simulate_mri(phantoms, dest, num_coils=4)
    return dest


def masks_seen_by_ranks(dataset, world=2, epochs=3):
    """{index: [mask, ...]} over every draw of `epochs` epochs by `world` ranks reading through StreamSampler."""
    seen = {}
    for rank in range(world):
        sampler = iter(StreamSampler(len(dataset), rank, world, batch_gpu=2, rounds=1, seed=3, with_position=True))
        for _ in range(epochs * len(dataset) // world):
            item = dataset[next(sampler)]
            seen.setdefault(item["index"], []).append((item["mask"], item["y"]))
    return seen


@pytest.mark.parametrize("kind", ["image", "mri"])
def test_fixed_protocol_is_identical_across_epochs_and_ranks_and_resample_changes(kind, phantoms, mri_data):
    path = phantoms if kind == "image" else mri_data
    mask = {"kind": "box", "p": 0.4} if kind == "image" else {"kind": "lines-random", "R": 4, "acs": 2}
    operator = "identity" if kind == "image" else "mri"
    for protocol in ("fixed", "resample"):
        measurement = {"operator": operator, "mask": mask, "sigma_y": 0.05, "protocol": protocol, "seed": 0}
        dataset = open_dataset(path, measurement=measurement)
        seen = masks_seen_by_ranks(dataset)
        assert len(seen) == len(dataset) and all(len(v) >= 2 for v in seen.values())
        for draws in seen.values():
            same = all(torch.equal(m, draws[0][0]) and torch.equal(y, draws[0][1]) for m, y in draws)
            assert same == (protocol == "fixed") or (protocol == "resample" and not same)
        if protocol == "resample":  # a fresh mask nearly every time
            changed = sum(not torch.equal(a[0], b[0]) for v in seen.values() for a, b in zip(v, v[1:]))
            assert changed >= 0.8 * sum(len(v) - 1 for v in seen.values())


class MeasurementOnlyBatch(dict):
    """A batch that fails the test on any attempt to look up a key other than the measurement's."""

    ALLOWED = {"y", "mask", "maps", "label", "index"}

    def __getitem__(self, key):
        assert key in self.ALLOWED, f"the loss read batch[{key!r}]"
        return super().__getitem__(key)

    def get(self, key, default=None):
        assert key in self.ALLOWED, f"the loss read batch.get({key!r})"
        return super().get(key, default)


@pytest.mark.parametrize("kind", ["image", "mri"])
def test_training_batches_hold_no_clean_image_and_losses_read_none(kind, phantoms, mri_data):
    import train

    # Every option at its CLI default (so new options need no edit here), then the few this test sets.
    opts = EasyDict(cli_defaults(train.main))
    opts.update(data=phantoms if kind == "image" else mri_data, cbase=8, cres="1", blocks=1, attn="", duration=0.001,
                batch=4, ema=0.0, lr_rampup=0.0, tick=1, snap=1, dump=1, workers=0, loss="msm", sigma_y=0.05)
    c = train.build_options(opts, world_size=1)
    from training.training_loop import DATASETS, LOSSES, build

    dataset = build(c.dataset_kwargs, DATASETS)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4)
    batch = next(iter(loader))
    expected = {"y", "mask", "label", "index"} | ({"maps"} if kind == "mri" else set())
    assert set(batch) == expected
    net = ConvNet(*(1, 1) if kind == "image" else (2, 2), batch["y"].shape[-2:])
    for loss_fn in (build(c.loss_kwargs, LOSSES),
                    AmbientLoss(c.measurement | {"sigma_y": 0.0})):
        loss = evaluate(loss_fn, net, MeasurementOnlyBatch(batch))
        assert torch.isfinite(loss).all() and loss.shape == (4,)
