"""Tests of training/networks.py: building blocks against definitions and reference ops, preconditioning against the
formulas of EDM Table 1 (VP's sigma(t) against numerical integration of its beta schedule), and the UNets' shapes,
conditioning, mixed precision, memory format and rebuild-from-config behaviour on tiny CPU configurations."""

import dataclasses
import io
import json
import math

import numpy as np
import pytest
import scipy.integrate
import scipy.optimize
import torch
import torch.nn.functional as F

import dnnlib
from training import networks
from training.networks import (
    Conv2d,
    DhariwalUNet,
    EDMPrecond,
    FourierEmbedding,
    GroupNorm,
    PositionalEmbedding,
    Resample2x,
    SelfAttention,
    SongUNet,
    VEPrecond,
    VPPrecond,
    init_tensor,
    network_kwargs_for,
)

# Tiny widths so that every configuration runs in milliseconds; attention lives at 16 px.
TINY = dict(model_channels=8, channel_mult=[1, 2, 2], num_blocks=1, attn_resolutions=[16], dropout=0.0)
ARCHS = {
    "ddpmpp": {**networks.ARCH_PRESETS["ddpmpp"], **TINY},
    "ncsnpp": {**networks.ARCH_PRESETS["ncsnpp"], **TINY},
    "adm": {**networks.ARCH_PRESETS["adm"], **TINY},
}


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """The networks here are tiny: one thread is fastest, and it avoids thread spinning on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def generator(seed=0):
    return torch.Generator().manual_seed(seed)


@torch.no_grad()
def randomise_(module, seed=1):
    """Replace the (partly zero) initial weights by generic random ones, so outputs depend on every layer."""
    g = generator(seed)
    for p in module.parameters():
        if p.ndim >= 2:
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
        else:
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return module


def build(arch, precond=EDMPrecond, img_resolution=32, in_channels=3, **overrides):
    kwargs = {**ARCHS[arch], **overrides}
    return precond(img_resolution=img_resolution, in_channels=in_channels, **kwargs)


# ----------------------------------------------------------------------------------------------------------------------
# Building blocks.


@pytest.mark.parametrize("mode", networks.INIT_MODES)
def test_init_tensor_variance_matches_definition(mode):
    fan_in, fan_out = 300, 500
    w = init_tensor((fan_out, fan_in), mode, fan_in, fan_out, generator(0))
    expected_std = math.sqrt(2 / (fan_in + fan_out)) if mode.startswith("xavier") else math.sqrt(1 / fan_in)
    assert abs(w.std().item() / expected_std - 1) < 0.02
    assert abs(w.mean().item()) < 0.02 * expected_std * 10
    if mode.endswith("uniform"):
        bound = math.sqrt(3) * expected_std
        assert w.abs().max().item() <= bound
        assert w.abs().max().item() > 0.99 * bound


def test_building_networks_leaves_global_rng_alone_and_init_seed_decides_weights():
    state = torch.get_rng_state()
    a = SongUNet(16, 1, 1, model_channels=8, channel_mult=[1, 2], num_blocks=1, embedding_type="fourier",
                 channel_mult_noise=2, init_seed=3)
    b = SongUNet(16, 1, 1, model_channels=8, channel_mult=[1, 2], num_blocks=1, embedding_type="fourier",
                 channel_mult_noise=2, init_seed=3)
    c = SongUNet(16, 1, 1, model_channels=8, channel_mult=[1, 2], num_blocks=1, embedding_type="fourier",
                 channel_mult_noise=2, init_seed=4)
    assert torch.equal(state, torch.get_rng_state())
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert torch.equal(sa["noise_embedding.freqs"], sb["noise_embedding.freqs"])
    assert not torch.equal(sa["input_conv.weight"], sc["input_conv.weight"])
    assert not torch.equal(sa["noise_embedding.freqs"], sc["noise_embedding.freqs"])


def test_fir_resampling_with_box_filter_is_average_pooling_and_nearest_upsampling():
    x = torch.randn(2, 3, 8, 10, generator=generator())
    assert torch.allclose(Resample2x("down", [1, 1])(x), F.avg_pool2d(x, 2), atol=1e-6)
    assert torch.allclose(Resample2x("up", [1, 1])(x), F.interpolate(x, scale_factor=2, mode="nearest"), atol=1e-6)


@pytest.mark.parametrize("taps", [[1, 1], [1, 3, 3, 1]])
def test_fir_upsampling_is_four_times_the_adjoint_of_downsampling(taps):
    x = torch.randn(2, 3, 12, 8, generator=generator(1), dtype=torch.float64)
    y = torch.randn(2, 3, 6, 4, generator=generator(2), dtype=torch.float64)
    down, up = Resample2x("down", taps).double(), Resample2x("up", taps).double()
    lhs = (down(x) * y).sum()
    rhs = (x * up(y)).sum() / 4
    assert torch.allclose(lhs, rhs, rtol=1e-12)


@pytest.mark.parametrize("taps", [[1, 1], [1, 3, 3, 1]])
def test_fir_resampling_is_centred(taps):
    """On a linear ramp, coarse pixel i sits at fine position 2i + 1/2 (interior pixels, away from zero padding)."""
    fine = torch.arange(16, dtype=torch.float64).expand(1, 1, 8, 16)
    coarse = Resample2x("down", taps).double()(fine)[0, 0, 1, 1:-1]
    assert torch.allclose(coarse, 2 * torch.arange(1, 7, dtype=torch.float64) + 0.5)
    ramp = torch.arange(8, dtype=torch.float64).expand(1, 1, 8, 8)
    upsampled = Resample2x("up", taps).double()(ramp)[0, 0, 8, 2:-2]
    positions = torch.arange(2, 14, dtype=torch.float64)
    expected = (positions - 0.5) / 2 if len(taps) == 4 else torch.div(positions, 2, rounding_mode="floor")
    assert torch.allclose(upsampled, expected)


@pytest.mark.parametrize("taps,kernel", [([1, 1], 3), ([1, 3, 3, 1], 3), ([1, 3, 3, 1], 1)])
def test_fused_down_conv_equals_conv_then_filtered_decimation(taps, kernel):
    """Away from the border (input zero there) one strided conv with the composed kernel equals the two steps."""
    fused = Conv2d(3, 5, kernel, generator=generator(0), bias=False, resample="down", resample_filter=taps,
                   fused=True).double()
    plain = Conv2d(3, 5, kernel, generator=generator(0), bias=False).double()
    x = torch.zeros(2, 3, 16, 16, dtype=torch.float64)
    x[:, :, 4:-4, 4:-4] = torch.randn(2, 3, 8, 8, generator=generator(1), dtype=torch.float64)
    two_steps = Resample2x("down", taps).double()(plain(x))
    assert fused(x).shape == (2, 5, 8, 8)
    assert torch.allclose(fused(x), two_steps, atol=1e-12)


def test_resampling_conv_shapes():
    x = torch.randn(1, 4, 8, 8)
    g = generator()
    assert Conv2d(4, 6, 3, generator=g, resample="up", resample_filter=[1, 3, 3, 1])(x).shape == (1, 6, 16, 16)
    assert Conv2d(4, 6, 1, generator=g, resample="down")(x).shape == (1, 6, 4, 4)
    with pytest.raises(ValueError):
        Conv2d(4, 6, 3, generator=g, resample="up", fused=True)
    with pytest.raises(ValueError):
        Resample2x("down", [1, 2])


@pytest.mark.parametrize("channels,groups", [(8, 2), (48, 12), (192, 32), (6, 1), (100, 25)])
def test_group_norm_matches_torch_and_picks_dividing_group_count(channels, groups):
    norm = randomise_(GroupNorm(channels, eps=1e-6))
    assert norm.num_groups == groups
    reference = torch.nn.GroupNorm(groups, channels, eps=1e-6)
    reference.load_state_dict(norm.state_dict())
    x = torch.randn(2, channels, 5, 3, generator=generator())
    assert torch.allclose(norm(x), reference(x), atol=1e-5)


def test_self_attention_matches_explicit_multi_head_softmax():
    style = dataclasses.replace(networks._adm_style(), channels_per_head=4)
    attention = randomise_(SelfAttention(16, style, generator=generator()))
    assert attention.num_heads == 4
    x = torch.randn(2, 16, 3, 5, generator=generator(3), dtype=torch.float64)
    attention.double()
    h = attention.norm(x).reshape(2, 16, 15)
    qkv = torch.einsum("oc,ncp->nop", attention.qkv.weight[:, :, 0, 0], h) + attention.qkv.bias[None, :, None]
    q, k, v = qkv.reshape(2, 3, 4, 4, 15).unbind(1)  # (n, head, channel, position)
    weights = torch.softmax(torch.einsum("nhcp,nhcq->nhpq", q, k) / math.sqrt(4), dim=-1)
    attended = torch.einsum("nhpq,nhcq->nhcp", weights, v).reshape(2, 16, 15)
    out = torch.einsum("oc,ncp->nop", attention.proj.weight[:, :, 0, 0], attended) + attention.proj.bias[None, :, None]
    expected = x + out.reshape(2, 16, 3, 5)
    assert torch.allclose(attention(x), expected, atol=1e-10)


@pytest.mark.parametrize("endpoint", [True, False])
def test_positional_embedding_frequencies_and_shift_invariance(endpoint):
    emb = PositionalEmbedding(16, max_positions=10000, endpoint=endpoint)
    freqs = emb.freqs.double()
    assert freqs[0] == 1
    last = 1e-4 if endpoint else 1e-4 ** (7 / 8)
    assert math.isclose(freqs[-1].item(), last, rel_tol=1e-5)
    assert torch.allclose(freqs[1:] / freqs[:-1], (freqs[1] / freqs[0]).expand(7))  # geometric spacing
    a, b = torch.tensor([0.3, -1.7]), torch.tensor([2.1, 0.4])
    # <e(a), e(b)> = sum_k cos(a w_k) cos(b w_k) + sin sin = sum_k cos((a - b) w_k)
    inner = (emb(a) * emb(b)).sum(1).double()
    assert torch.allclose(inner, torch.cos(torch.outer(a - b, freqs).double()).sum(1), atol=1e-5)


def test_fourier_embedding_definition():
    emb = FourierEmbedding(4096, generator=generator(), scale=16)
    assert abs(emb.freqs.std().item() / 16 - 1) < 0.05
    x = torch.tensor([0.25, -0.1])
    angles = 2 * np.pi * np.outer(x.numpy().astype(np.float64), emb.freqs.numpy().astype(np.float64))
    expected = np.concatenate([np.cos(angles), np.sin(angles)], axis=1)
    assert np.allclose(emb(x).numpy(), expected, atol=1e-4)  # float32 angles of size up to ~100


# ----------------------------------------------------------------------------------------------------------------------
# Preconditioning.


class KnownModel(torch.nn.Module):
    """Stands in for the UNet: records its inputs and returns a fixed, known function F(x_in, c_noise)."""

    def __init__(self, out_channels):
        super().__init__()
        self.out_channels = out_channels
        self.calls = []

    def forward(self, x, noise_labels, class_labels=None):
        self.calls.append((x.detach().clone(), noise_labels.detach().clone(), class_labels))
        return torch.cos(3 * x[:, : self.out_channels]) + noise_labels.reshape(-1, 1, 1, 1)


def expected_coefficients(kind, sigma, net):
    """EDM Table 1 in float64; VP's t(sigma) by root finding on sigma(t)^2 = exp(int_0^t beta) - 1."""
    s = np.asarray(sigma, dtype=np.float64)
    if kind == "edm":
        sd = 0.5
        return sd**2 / (s**2 + sd**2), s * sd / np.sqrt(s**2 + sd**2), 1 / np.sqrt(s**2 + sd**2), np.log(s) / 4
    if kind == "ve":
        return np.ones_like(s), s, np.ones_like(s), np.log(s / 2)

    def vp_sigma(t):
        integral, _ = scipy.integrate.quad(lambda u: net.beta_min + net.beta_d * u, 0, t)
        return math.sqrt(math.expm1(integral))

    t = np.array([scipy.optimize.brentq(lambda t, si=si: vp_sigma(t) - si, 1e-9, 2, xtol=1e-14) for si in s])
    return np.ones_like(s), -s, 1 / np.sqrt(s**2 + 1), 999 * t


@pytest.mark.parametrize("kind,cls", [("edm", EDMPrecond), ("vp", VPPrecond), ("ve", VEPrecond)])
def test_preconditioning_matches_formulas(kind, cls):
    net = cls(img_resolution=16, in_channels=3, out_channels=2, **{**ARCHS["ddpmpp"], "channel_mult": [1]})
    net.model = KnownModel(2)
    sigma = torch.tensor([0.002, 0.3, 1.0, 25.0, 80.0])
    x = torch.randn(5, 3, 4, 4, generator=generator(), dtype=torch.float64)
    d = net(x, sigma)
    c_skip, c_out, c_in, c_noise = (np.reshape(c, (-1, 1, 1, 1)) for c in expected_coefficients(kind, sigma, net))
    x_in, noise_labels, _ = net.model.calls[-1]
    assert np.allclose(x_in.numpy(), c_in * x.numpy(), rtol=1e-6)
    assert np.allclose(noise_labels.numpy(), c_noise.reshape(-1), rtol=1e-5, atol=1e-6)
    f = np.cos(3 * c_in * x.numpy()[:, :2]) + c_noise
    expected = c_skip * x.numpy()[:, :2] + c_out * f
    assert d.dtype == torch.float32 and d.shape == (5, 2, 4, 4)
    assert np.allclose(d.numpy(), expected, rtol=1e-4, atol=1e-4 * np.abs(c_out).max())


def test_vp_sigma_schedule_round_trip_and_range():
    net = VPPrecond(img_resolution=16, in_channels=1, **{**ARCHS["ddpmpp"], "channel_mult": [1]})
    t = torch.linspace(1e-5, 1, 101, dtype=torch.float64)
    assert torch.allclose(net.sigma_inv(net.sigma(t)), t, rtol=1e-9)
    sigma = torch.logspace(-3, 2, 50, dtype=torch.float64)
    assert torch.allclose(net.sigma(net.sigma_inv(sigma)), sigma, rtol=1e-9)
    for t_value, attribute in ((1e-5, net.sigma_min), (1.0, net.sigma_max)):
        integral = 0.5 * net.beta_d * t_value**2 + net.beta_min * t_value
        assert math.isclose(attribute, math.sqrt(math.expm1(integral)), rel_tol=1e-12)
    quad, _ = scipy.integrate.quad(lambda u: 0.1 + 19.9 * u, 0, 0.37)
    assert math.isclose(float(net.sigma(0.37)), math.sqrt(math.expm1(quad)), rel_tol=1e-6)
    assert isinstance(net.round_sigma(0.5), torch.Tensor)


def test_precond_attributes_and_channel_rules():
    net = EDMPrecond(img_resolution=16, in_channels=3, out_channels=2, label_dim=0, sigma_data=0.7,
                     **{**ARCHS["ddpmpp"], "channel_mult": [1]})
    assert (net.img_resolution, net.in_channels, net.out_channels, net.label_dim) == (16, 3, 2, 0)
    assert (net.sigma_min, net.sigma_max, net.sigma_data) == (0.0, math.inf, 0.7)
    ve = VEPrecond(img_resolution=16, in_channels=1, **{**ARCHS["ddpmpp"], "channel_mult": [1]})
    assert (ve.out_channels, ve.sigma_min, ve.sigma_max) == (1, 0.02, 100.0)
    with pytest.raises(ValueError, match="out_channels"):
        EDMPrecond(img_resolution=16, in_channels=2, out_channels=3)
    with pytest.raises(ValueError, match="model_type"):
        EDMPrecond(img_resolution=16, in_channels=2, model_type="Transformer")
    with pytest.raises(ValueError, match="divisible"):
        EDMPrecond(img_resolution=20, in_channels=2, channel_mult=[1, 1, 1, 1])
    with pytest.raises(ValueError, match="encoder_type"):
        EDMPrecond(img_resolution=16, in_channels=2, encoder_type="pyramid")


def test_sigma_forms_and_input_dtypes_agree():
    net = randomise_(build("ddpmpp", img_resolution=16, in_channels=2)).eval()
    x = torch.randn(3, 2, 16, 16, generator=generator())
    reference = net(x, torch.full((3,), 0.8))
    for sigma in (0.8, torch.tensor(0.8), torch.full((3, 1, 1, 1), 0.8), torch.tensor([0.8], dtype=torch.float64)):
        assert torch.allclose(net(x, sigma), reference, atol=1e-6)
    out64 = net(x.double(), 0.8)
    assert out64.dtype == torch.float32 and torch.allclose(out64, reference, atol=1e-6)
    per_example = net(x, torch.tensor([0.1, 0.8, 5.0]))
    assert torch.allclose(per_example[1], reference[1], atol=1e-6)
    assert not torch.allclose(per_example[0], reference[0], atol=1e-3)
    with pytest.raises(ValueError, match="sigma"):
        net(x, torch.ones(2))
    with pytest.raises(ValueError, match="shape"):
        net(x[:, :1], 0.8)


# ----------------------------------------------------------------------------------------------------------------------
# UNets.


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("resolution", [32, 64])
def test_output_shapes(arch, channels, resolution):
    net = build(arch, img_resolution=resolution, in_channels=channels)
    x = torch.randn(2, channels, resolution, resolution, generator=generator())
    out = net(x, torch.tensor([0.5, 2.0]))
    assert out.shape == x.shape and out.dtype == torch.float32 and torch.isfinite(out).all()


@pytest.mark.parametrize("arch", list(ARCHS))
def test_fresh_network_is_the_skip_only_denoiser(arch):
    """The output layers start at zero, so a new network returns D = c_skip x (EDM) before any training."""
    net = build(arch, img_resolution=16, in_channels=2, channel_mult=[1, 2])
    x = torch.randn(2, 2, 16, 16, generator=generator())
    sigma = torch.tensor([0.3, 4.0]).reshape(-1, 1, 1, 1)
    assert torch.allclose(net(x, sigma), 0.25 / (sigma**2 + 0.25) * x, atol=1e-6)


@pytest.mark.parametrize("in_channels,out_channels,options", [
    (4, 2, dict(arch="ddpmpp")),
    (3, 2, dict(arch="adm")),
    (3, 2, dict(arch="ncsnpp", encoder_type="skip", decoder_type="skip")),
    (2, 2, dict(arch="ncsnpp", decoder_type="skip")),
])
def test_separate_input_and_output_channels(in_channels, out_channels, options):
    options = dict(options)
    net = randomise_(build(options.pop("arch"), img_resolution=32, in_channels=in_channels, out_channels=out_channels,
                           **options))
    x = torch.randn(2, in_channels, 32, 32, generator=generator())
    out = net(x, 1.0)
    assert out.shape == (2, out_channels, 32, 32) and torch.isfinite(out).all()
    if in_channels > out_channels:  # the extra input channels are conditioning: they reach the output
        x_changed = x.clone()
        x_changed[:, out_channels:] += 1
        assert not torch.allclose(net(x_changed, 1.0), out, atol=1e-4)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_class_labels_condition_and_label_dropout(arch):
    net = randomise_(build(arch, img_resolution=16, in_channels=1, channel_mult=[1, 2], label_dim=3,
                           label_dropout=1.0)).eval()
    x = torch.randn(2, 1, 16, 16, generator=generator())
    labels = torch.eye(3)[[0, 2]]
    out = net(x, 1.0, labels)
    assert not torch.allclose(out, net(x, 1.0, torch.eye(3)[[1, 1]]), atol=1e-4)
    no_label = net(x, 1.0, None)
    assert torch.allclose(no_label, net(x, 1.0, torch.zeros(2, 3)))
    assert not torch.allclose(out, no_label, atol=1e-4)
    net.train()  # label_dropout = 1 drops every label (dropout is 0, so training mode changes nothing else)
    assert torch.allclose(net(x, 1.0, labels), no_label, atol=1e-6)
    with pytest.raises(ValueError, match="class labels"):
        net(x, 1.0, torch.eye(3))


def test_dropout_acts_in_training_mode_only():
    net = randomise_(build("ddpmpp", img_resolution=16, in_channels=1, channel_mult=[1, 2], dropout=0.5))
    x = torch.randn(2, 1, 16, 16, generator=generator())
    net.eval()
    assert torch.equal(net(x, 1.0), net(x, 1.0))
    net.train()
    assert not torch.allclose(net(x, 1.0), net(x, 1.0))


@pytest.mark.parametrize("arch", list(ARCHS))
def test_bf16_autocast_gives_finite_float32_close_to_float32(arch):
    net = randomise_(build(arch, img_resolution=32, in_channels=2)).eval()
    x = torch.randn(2, 2, 32, 32, generator=generator())
    reference = net(x, torch.tensor([0.2, 3.0]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x, torch.tensor([0.2, 3.0]))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert (out - reference).norm() / reference.norm() < 0.05


@pytest.mark.parametrize("arch", list(ARCHS))
def test_channels_last_gives_the_same_output(arch):
    net = randomise_(build(arch, img_resolution=32, in_channels=3)).eval()
    x = torch.randn(2, 3, 32, 32, generator=generator())
    reference = net(x, 1.5)
    net.to(memory_format=torch.channels_last)
    out = net(x.contiguous(memory_format=torch.channels_last), 1.5)
    assert torch.allclose(out, reference, atol=1e-5)


@pytest.mark.parametrize("arch,options", [("ddpmpp", {}), ("ncsnpp", dict(encoder_type="skip", decoder_type="skip")),
                                          ("ncsnpp", {}), ("adm", dict(label_dim=2))])
def test_every_parameter_gets_a_gradient(arch, options):
    """DistributedDataParallel without find_unused_parameters needs every parameter in the graph."""
    net = randomise_(build(arch, img_resolution=16, in_channels=2, channel_mult=[1, 2], **options))
    labels = torch.eye(2) if options.get("label_dim") else None
    net(torch.randn(2, 2, 16, 16, generator=generator()), 1.0, labels).square().sum().backward()
    missing = [name for name, p in net.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing


def test_network_rebuilt_from_config_and_state_dict_gives_identical_output():
    config = network_kwargs_for("ncsnpp", "vp", cbase=8, cres=[1, 2], dropout=0.0, img_resolution=16, in_channels=2,
                                num_blocks=1, attn_resolutions=[8], label_dim=2)
    config = json.loads(json.dumps(config))  # what a snapshot stores
    net = randomise_(networks.build_network(config)).eval()
    buffer = io.BytesIO()
    torch.save(net.state_dict(), buffer)
    buffer.seek(0)
    rebuilt = networks.build_network(config).eval()
    rebuilt.load_state_dict(torch.load(buffer, weights_only=True))
    x = torch.randn(2, 2, 16, 16, generator=generator())
    labels = torch.eye(2)
    assert isinstance(rebuilt, VPPrecond)
    assert torch.equal(net(x, 0.7, labels), rebuilt(x, 0.7, labels))


# ----------------------------------------------------------------------------------------------------------------------
# Presets for train.py.


def test_network_kwargs_for_presets_and_overrides():
    config = network_kwargs_for("ddpmpp", "edm", cbase=32, cres=[1, 2, 2], dropout=0.13, img_resolution=32,
                                in_channels=1, num_blocks=2)
    assert config["class_name"] == "training.networks.EDMPrecond"
    kwargs = config["kwargs"]
    assert kwargs["model_channels"] == 32 and kwargs["channel_mult"] == [1, 2, 2] and kwargs["dropout"] == 0.13
    assert kwargs["embedding_type"] == "positional" and kwargs["resample_filter"] == [1, 1]
    assert json.loads(json.dumps(kwargs)) == kwargs
    net = networks.build_network(config)
    assert isinstance(net.model, SongUNet) and net.model.encoder_type == "standard"
    n_params = sum(p.numel() for p in net.parameters())
    assert 1e6 < n_params < 2e6  # the small CPU configuration the brief asks for
    adm = network_kwargs_for("adm", "ve", img_resolution=32, in_channels=1)
    assert adm["class_name"] == "training.networks.VEPrecond" and adm["kwargs"]["model_type"] == "DhariwalUNet"
    ncsnpp = network_kwargs_for("ncsnpp", "vp", cbase=8, cres=[1, 2], img_resolution=16, in_channels=1)["kwargs"]
    assert ncsnpp["embedding_type"] == "fourier" and ncsnpp["encoder_type"] == "residual"
    assert "dropout" not in ncsnpp and networks.ARCH_PRESETS["ncsnpp"]["model_channels"] == 128  # presets untouched


def test_network_kwargs_for_refuses_bad_options():
    for kwargs in (dict(arch="unet", precond="edm"), dict(arch="adm", precond="flow"),
                   dict(arch="adm", precond="edm", cbase=0), dict(arch="adm", precond="edm", dropout=1.5),
                   dict(arch="adm", precond="edm", widht=3),
                   dict(arch="ddpmpp", precond="edm", cres=[1, 2, 2, 2], img_resolution=36),
                   dict(arch="ddpmpp", precond="edm", sigma_max=math.inf)):
        with pytest.raises(dnnlib.UserError):
            network_kwargs_for(**kwargs)


def test_dhariwal_unet_heads_follow_channels_per_head():
    net = DhariwalUNet(16, 1, 1, model_channels=64, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8])
    heads = {m.num_heads for m in net.modules() if isinstance(m, SelfAttention)}
    assert heads == {2}  # 128 channels at 8 px, 64 per head
