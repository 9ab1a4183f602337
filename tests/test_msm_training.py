"""MSM training end to end: a learning test with a closed-form answer (Gaussian data), CLI runs on phantoms and on
simulated multi-coil MRI (single process and torchrun), what the run records, and bad input."""

import glob
import json
import math
import os

import pytest
import torch

from dnnlib import EasyDict, UserError
from tests.gaussian import exact_samples, random_covariance
from tests.helpers import assert_same_training_state, cli_defaults, make_phantoms, run_cli
from training import snapshot as checkpoint
from training import training_loop
from training.loss import MSMLoss
from training.masks import BoxMaskLaw
from training.measurements import partial_denoise
from training.operators import Identity

# ----------------------------------------------------------------------------------------------------------------------
# Learning test: z ~ N(0, C) on 1x8x8 images, box law p = 0.4; the exact partial denoiser is a Gaussian conditional.

SHAPE = (1, 8, 8)
DIM = 64


class TinyPrecondMLP(torch.nn.Module):
    """EDM-preconditioned MLP on the zero-filled image and its mask (in_channels 2 -> out 1): D = c_skip u +
    c_out F(c_in u, mask, ln(sigma) / 4). Enough to represent mask- and sigma-dependent linear shrinkage."""

    in_channels, out_channels, sigma_data = 2, 1, 0.5

    def __init__(self, hidden: int = 256, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.layers = torch.nn.ModuleList()
        sizes = [2 * DIM + 8, hidden, hidden, DIM]
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
            layer = torch.nn.Linear(fan_in, fan_out)
            with torch.no_grad():
                layer.weight.copy_(torch.randn(fan_out, fan_in, generator=g) / math.sqrt(fan_in))
                layer.bias.zero_()
            self.layers.append(layer)

    def forward(self, x, sigma, class_labels=None):
        sigma = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1, 1).expand(len(x), 1)
        u, mask = x[:, :1].flatten(1), x[:, 1:].flatten(1)
        sd2 = self.sigma_data**2
        c_skip, c_out, c_in = sd2 / (sigma**2 + sd2), sigma * self.sigma_data / (sigma**2 + sd2).sqrt(), \
            1 / (sigma**2 + sd2).sqrt()
        freqs = torch.arange(1, 5, dtype=torch.float32)
        embed = torch.cat([torch.sin(freqs * sigma.log() / 4), torch.cos(freqs * sigma.log() / 4)], dim=1)
        h = torch.cat([c_in * u, mask, embed], dim=1)
        for layer in self.layers[:-1]:
            h = torch.nn.functional.silu(layer(h))
        out = c_skip * u + c_out * self.layers[-1](h)
        return out.reshape(len(x), *SHAPE)


def exact_partial_denoiser(cov, s, mask, sigma):
    """E[P z | s, P] for z ~ N(0, C), s = P (z + sigma n): C_oo (C_oo + sigma^2 I)^{-1} s_o on the observed set o."""
    out = torch.zeros(s.shape[0], DIM, dtype=torch.float64)
    flat_s, flat_m = s.reshape(len(s), -1).double(), mask.reshape(len(s), -1).bool()
    for i in range(len(s)):
        o = flat_m[i]
        c_oo = cov[o][:, o]
        out[i, o] = torch.linalg.solve(c_oo + sigma**2 * torch.eye(len(c_oo), dtype=torch.float64), c_oo) @ flat_s[i, o]
    return out.reshape(s.shape)


def learning_errors(steps: int, batch: int, seed: int = 0):
    cov = random_covariance(DIM, rank=4, seed=seed, diag=0.005)
    law = BoxMaskLaw(0.4)
    data = exact_samples(cov, 4096, seed=seed + 1).float().reshape(-1, *SHAPE)
    masks = law.sample(len(data), SHAPE[1:], torch.Generator().manual_seed(seed + 2))  # the fixed protocol
    measured = data * masks
    net = TinyPrecondMLP(seed=seed)
    loss_fn = MSMLoss({"operator": "identity", "mask": law.to_config()})
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed + 3)
    for step in range(steps):
        pick = torch.randint(0, len(data), (batch,), generator=gen)
        batch_dict = {"y": measured[pick], "mask": masks[pick], "label": torch.zeros(batch, 0), "index": pick}
        loss = loss_fn(net=net, batch=batch_dict, generator=gen).mean() / DIM
        optimizer.zero_grad()
        loss.backward()
        for group in optimizer.param_groups:
            group["lr"] = 1e-3 * min(1, 2 * (1 - step / steps))
        optimizer.step()

    # Fresh test data and masks: per-entry errors against P z, averaged over observed entries.
    test = exact_samples(cov, 1024, seed=seed + 4).float().reshape(-1, *SHAPE)
    test_masks = law.sample(len(test), SHAPE[1:], torch.Generator().manual_seed(seed + 5))
    rows = []
    for sigma in (0.1, 0.3, 1.0, 3.0):
        noise = torch.randn(test.shape, generator=gen)
        s = test_masks * (test + sigma * noise)
        with torch.no_grad():
            s_hat, _ = partial_denoise(net, Identity(), test_masks, s, sigma)
        exact = exact_partial_denoiser(cov, s, test_masks, sigma)
        target = (test_masks * test).double()
        m = test_masks.sum()
        rows.append((sigma, ((s_hat.double() - target) ** 2).sum().item() / m, ((exact - target) ** 2).sum().item() / m,
                     ((s.double() - target) ** 2).sum().item() / m, ((s_hat.double() - exact) ** 2).sum().item() / m))
    print("\nsigma  net-MSE   exact-MSE  trivial-MSE  |net - exact|^2   (per observed entry)")
    for row in rows:
        print("{:5.2f}  {:.5f}   {:.5f}    {:.5f}      {:.5f}".format(*row))
    return rows


def check_learning(rows, margin):
    for sigma, net_err, exact_err, trivial_err, _gap in rows:
        # Clearly better than s_hat = s: the net removes most of the noise the exact denoiser removes.
        assert net_err - exact_err < margin * (trivial_err - exact_err), (sigma, net_err, exact_err, trivial_err)
        assert exact_err <= net_err * 1.001


@pytest.fixture
def one_thread():
    """Tiny matrices run fastest on one thread (and do not fight other processes for cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_msm_learns_the_exact_gaussian_partial_denoiser_fast(one_thread):
    check_learning(learning_errors(steps=1000, batch=128), margin=0.35)


@pytest.mark.slow
def test_msm_learns_the_exact_gaussian_partial_denoiser_long(one_thread):
    check_learning(learning_errors(steps=8000, batch=512), margin=0.15)


# ----------------------------------------------------------------------------------------------------------------------
# End to end through train.py.

TINY = ["--arch", "ddpmpp", "--cbase", "8", "--cres", "1,2", "--blocks", "1", "--attn", "", "--batch", "8",
        "--lr", "2e-3", "--lr-rampup", "0", "--ema", "0.00005", "--dropout", "0", "--snap", "4", "--dump", "4",
        "--workers", "0", "--seed", "1"]


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    return make_phantoms(str(tmp_path_factory.mktemp("ph") / "ph.zip"), num=32, resolution=16)


@pytest.fixture(scope="module")
def mri8(tmp_path_factory, phantoms):
    dest = str(tmp_path_factory.mktemp("mri") / "mri8")
    run_cli(["dataset_tool.py", "simulate-mri", "--source", phantoms, "--dest", dest, "--coils", "8"])
    return dest


# Short runs (16 steps) must beat the trivial shrinkage denoiser, which is what the untrained network computes (loss
# ratio 1.000): measured 0.71 on phantoms and 0.94 on MRI (whose loss has a large irreducible part: the
# coil-inconsistent share of the zero-filled input), against bounds of 0.85 and 0.97.
SHORT_IMAGES, RATIO_PHANTOMS, RATIO_MRI = 128, 0.85, 0.97


def train(outdir, data, images, extra=(), tick_images=16, **kw):
    return run_cli(["train.py", "--outdir", str(outdir), "--data", data, "--duration", str(images / 1e6),
                    "--tick", str(tick_images / 1000), *TINY, *extra], **kw)


def run_record(outdir):
    (run_dir,) = glob.glob(os.path.join(str(outdir), "0*"))
    with open(os.path.join(run_dir, "training_options.json")) as f:
        options = json.load(f)
    stats = [json.loads(line) for line in open(os.path.join(run_dir, "stats.jsonl"))]
    _, config = checkpoint.load_snapshot(checkpoint.latest_file(run_dir, "network-snapshot"))
    return options, stats, config


def check_recorded(options, config, operator, mask_kind):
    assert options["measurement"] == config["measurement"]
    assert config["measurement"]["operator"] == operator and config["measurement"]["mask"]["kind"] == mask_kind
    assert config["loss"]["class_name"] == "training.loss.MSMLoss" and config["loss"]["sigma_dist"] == "lognormal"
    assert config["dataset"]["measurement"] == config["measurement"]


def loss_falls(stats):
    losses = [s["loss"] for s in stats]
    third = max(len(losses) // 3, 1)
    first, last = sum(losses[:third]) / third, sum(losses[-third:]) / third
    print(f"\nloss over {len(losses)} ticks: first third {first:.2f}, last third {last:.2f}")
    return first, last


class ShrinkageDenoiser(torch.nn.Module):
    """The trivial denoiser an untrained EDM network starts as (its last layer is initialised near zero):
    D(x; sigma) = c_skip(sigma) x = sigma_data^2 / (sigma^2 + sigma_data^2) x, the best linear denoiser for zero-mean
    data of std sigma_data. Channel layout of the run's network (a mask channel, if any, is ignored)."""

    sigma_data = 0.5

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels

    def forward(self, x, sigma, class_labels=None):
        sigma = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1, 1, 1)
        return self.sigma_data**2 / (sigma**2 + self.sigma_data**2) * x[:, : self.out_channels]


def loss_on_training_data(net, run_dir, repeats=16, seed=0) -> float:
    """The run's own loss on all its training measurements, averaged over `repeats` draws of sigma and noise from a
    fixed generator: two networks compared this way see exactly the same draws."""
    with open(os.path.join(run_dir, "training_options.json")) as f:
        options = json.load(f)
    dataset = training_loop.build(options["dataset_kwargs"], training_loop.DATASETS)
    loss_fn = training_loop.build(options["loss_kwargs"], training_loop.LOSSES)
    batch = torch.utils.data.default_collate([dataset[i] for i in range(len(dataset))])
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return torch.cat([loss_fn(net=net, batch=batch, generator=gen) for _ in range(repeats)]).mean().item()


def trained_over_trivial(outdir) -> float:
    """Loss of the run's final EMA network / loss of the trivial shrinkage denoiser, on the same draws."""
    (run_dir,) = glob.glob(os.path.join(str(outdir), "0*"))
    net, config = checkpoint.load_snapshot(run_dir)
    k = config["network"]["kwargs"]
    trivial = ShrinkageDenoiser(k["in_channels"], k["out_channels"])
    ratio = loss_on_training_data(net, run_dir) / loss_on_training_data(trivial, run_dir)
    print(f"\ntrained / trivial loss: {ratio:.3f}")
    return ratio


def test_msm_phantoms_box_short(tmp_path, phantoms):
    train(tmp_path, phantoms, SHORT_IMAGES, ["--loss", "msm", "--mask", "box", "--p", "0.4"], tick_images=64)
    options, stats, config = run_record(tmp_path)
    check_recorded(options, config, "identity", "box")
    assert config["measurement"]["mask"]["p"] == 0.4 and config["measurement"]["protocol"] == "fixed"
    assert config["network"]["kwargs"]["in_channels"] == 1
    assert trained_over_trivial(tmp_path) < RATIO_PHANTOMS


def test_msm_mri_8coil_R4_short_noisy(tmp_path, mri8):
    """The noisy MSM loss (SURE on the pseudo-clean target) on multi-coil MRI: it trains, and beats the trivial."""
    train(tmp_path, mri8, SHORT_IMAGES, ["--loss", "msm", "--accel", "4", "--sigma-y", "0.01"], tick_images=64)
    options, stats, config = run_record(tmp_path)
    check_recorded(options, config, "mri", "lines-random")
    assert config["measurement"]["mask"]["R"] == 4 and config["measurement"]["sigma_y"] == 0.01
    assert config["dataset"]["kind"] == "mri" and config["dataset"]["path"] == mri8
    assert config["network"]["kwargs"]["in_channels"] == 2 and config["network"]["kwargs"]["out_channels"] == 2
    assert trained_over_trivial(tmp_path) < RATIO_MRI


@pytest.mark.parametrize("data, extra", [
    ("phantoms", ["--loss", "msm", "--mask", "pixel", "--p", "0.3"]),
    ("phantoms", ["--loss", "msm", "--sigma-y", "0.05", "--sure-tau", "0.01"]),  # noisy MSM: the SURE term
    ("phantoms", ["--loss", "msm", "--protocol", "resample"]),
    ("phantoms", ["--loss", "ambient"]),
    ("mri8", ["--loss", "msm", "--accel", "4", "--sigma-y", "0.01"]),
], ids=["msm", "sure", "resample", "ambient", "mri-noisy"])
def test_resume_is_exact(tmp_path, request, data, extra):
    """Train N images, stop, continue to N + M == train N + M at once (network, EMA, optimizer state)."""
    data = request.getfixturevalue(data)
    extra = [*extra, "--dropout", "0.1", "--dump", "1"]  # dropout on: its RNG state must travel with the state
    train(tmp_path / "full", data, 48, extra)
    train(tmp_path / "split", data, 16, extra)
    proc = train(tmp_path / "split", data, 48, extra)
    assert "Resuming from" in proc.stdout
    states = []
    for outdir in ("full", "split"):
        (run_dir,) = glob.glob(str(tmp_path / outdir / "0*"))
        states.append(checkpoint.load_training_state(checkpoint.latest_file(run_dir, "training-state")))
    assert states[0]["progress"]["cur_nimg"] == 48
    assert_same_training_state(*states)


def test_msm_and_ambient_under_torchrun_two_ranks(tmp_path, phantoms, mri8):
    proc = train(tmp_path / "img", phantoms, 32, ["--loss", "ambient", "--dump", "1"], torchrun=2)
    assert "All 2 ranks hold identical parameters" in proc.stdout
    options, _, config = run_record(tmp_path / "img")
    assert config["network"]["kwargs"]["in_channels"] == 2 and options["loss_kwargs"]["delta"] == 0.1
    # Noisy MSM: three network evaluations per example feed one backward pass through DistributedDataParallel; two
    # accumulation rounds per step (the first without gradient reduction).
    proc = train(tmp_path / "mri", mri8, 16, ["--loss", "msm", "--sigma-y", "0.01", "--batch-gpu", "2", "--dump", "1"],
                 torchrun=2)
    assert "All 2 ranks hold identical parameters" in proc.stdout and "2 accumulation round(s)" in proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["phantoms", "mri"])
def test_msm_training_loss_falls(tmp_path, phantoms, mri8, kind):
    extra = ["--lr", "5e-3", "--batch", "16"]
    if kind == "phantoms":
        train(tmp_path, phantoms, 4096, [*extra, "--loss", "msm", "--mask", "box", "--p", "0.4"], tick_images=256)
    else:
        # MRI needs longer: at small sigma the coil-inconsistent part of the zero-filled input (about 11% of s at
        # R = 4) is an irreducible, 1/sigma^2-weighted term of the loss, so the per-tick means are noisy early on.
        train(tmp_path, mri8, 8192, [*extra, "--loss", "msm", "--accel", "4"], tick_images=512)
    options, stats, config = run_record(tmp_path)
    first, last = loss_falls(stats)
    assert last < 0.7 * first


def build(data, **overrides):
    """train.py's options dict for these options (train.py's defaults for every option not given)."""
    import train as train_module

    opts = EasyDict(cli_defaults(train_module.main))
    opts.update(data=data, cbase=8, cres="1", blocks=1, attn="", dropout=0.0, lr=1e-3, duration=0.001, batch=4,
                ema=0.0, ema_rampup=0.0, lr_rampup=0.0, tick=1, snap=1, dump=1, workers=0, loss="msm")
    opts.update(overrides)
    return train_module.build_options(opts, world_size=1)


@pytest.mark.parametrize("loss, desc, ending", [("msm", "msm", "-fp32-msm"), ("msm", "msm-long", "-fp32-msm-long"),
                                                ("msm", "r4", "-fp32-msm-r4"), ("edm", "oracle", "-fp32-oracle")])
def test_run_name_holds_each_word_once(phantoms, loss, desc, ending):
    assert build(phantoms, loss=loss, desc=desc).desc.endswith(f"ph-uncond-ddpmpp-edm-gpus1-batch4{ending}")


def test_vp_port_options(phantoms):
    c = build(phantoms, precond="vp", sigma_dist="vp200")
    assert c.network["class_name"] == "training.networks.DiscreteVPPrecond"
    assert c.loss_kwargs["weighting"] == "inverse-variance" and c.loss_kwargs["sigma_dist"] == "vp200"
    assert build(phantoms).loss_kwargs["weighting"] == "edm"
    # The grid rule is recorded for vp200 (the reference's 'ddim' by default), and only there, so that lognormal runs
    # started before the option existed still continue.
    assert c.loss_kwargs["vp_grid"] == "ddim"
    assert build(phantoms, precond="vp", sigma_dist="vp200", vp_grid="section").loss_kwargs["vp_grid"] == "section"
    assert "vp_grid" not in build(phantoms).loss_kwargs
    with pytest.raises(UserError, match="--vp-grid chooses the levels of --sigma-dist vp200"):
        build(phantoms, vp_grid="section")


def test_a_vp200_run_from_before_the_grid_rule_continues_on_the_section_grid(phantoms, tmp_path):
    """Options and snapshots that record no rule were trained on the section rule: they read back as such, so the
    command continuing such a run is the one with --vp-grid section (and the plain command starts a new run), and
    the sampling defaults follow the snapshot."""
    from training import snapshot as checkpoint
    from training import training_options
    from training.schedules import training_sigma_max, vp_grid_of

    new = build(phantoms, precond="vp", sigma_dist="vp200")
    legacy = json.loads(json.dumps(build(phantoms, precond="vp", sigma_dist="vp200", vp_grid="section")))
    del legacy["loss_kwargs"]["vp_grid"]
    path = tmp_path / "training_options.json"
    path.write_text(json.dumps(legacy))
    old = training_options.read_run_options(str(path))
    assert old["loss_kwargs"]["vp_grid"] == "section"
    assert training_options.differing_options(old, new) == ["loss_kwargs"]
    section = build(phantoms, precond="vp", sigma_dist="vp200", vp_grid="section")
    assert training_options.differing_options(old, json.loads(json.dumps(section))) == []
    net = checkpoint.build_network(new.network)
    snapshot = str(tmp_path / "network-snapshot-000000.pt")
    config = {"network": new.network, "dataset": {"kind": "image", "image_shape": [1, 16, 16]},
              "loss": legacy["loss_kwargs"], "measurement": new.measurement}
    checkpoint.save_snapshot(snapshot, config, net)
    _, loaded = checkpoint.load_snapshot(snapshot)
    assert vp_grid_of(loaded["loss"]) == "section" and abs(training_sigma_max(loaded["loss"])[0] - 157.41) < 0.01
    assert vp_grid_of(new.loss_kwargs) == "ddim" and abs(training_sigma_max(new.loss_kwargs)[0] - 151.18) < 0.01
    assert vp_grid_of({"class_name": "training.loss.MSMLoss", "sigma_dist": "lognormal"}) == "ddim"


@pytest.mark.parametrize("overrides, message", [
    (dict(mask="lines-random"), "needs an MRI dataset"),
    (dict(sigma_y=-0.1), "--sigma-y must be >= 0"),
    (dict(p=1.0), "p must be a number in [0, 1)"),
    (dict(p=-0.2, mask="pixel"), "p must be a number in [0, 1)"),
    (dict(loss="edm", p=0.3), "only apply to --loss msm or ambient"),
    (dict(loss="ambient", sigma_y=0.1), "assumes noiseless measurements"),
    (dict(accel=4), "do not apply to --mask box"),
    (dict(sure_tau=0.0), "--sure-tau must be > 0"),
])
def test_bad_image_options_one_sentence(phantoms, overrides, message):
    with pytest.raises(UserError, match=None) as info:
        build(phantoms, **overrides)
    assert message in str(info.value) and str(info.value).count(". ") == 0


@pytest.mark.parametrize("overrides, message", [
    (dict(mask="box"), "is for images"),
    (dict(accel=0.5), "R must be a number >= 1"),
    (dict(acs=40), "exceed the 16 columns"),
    (dict(mask_channel=True), "--mask-channel needs an image-space mask"),
])
def test_bad_mri_options_one_sentence(mri8, overrides, message):
    with pytest.raises(UserError) as info:
        build(mri8, **overrides)
    assert message in str(info.value)


def test_bad_input_through_the_cli_writes_nothing(tmp_path, phantoms):
    proc = run_cli(["train.py", "--outdir", str(tmp_path / "runs"), "--data", phantoms, *TINY, "--loss", "msm",
                    "--mask", "lines-random"], check=False)
    assert proc.returncode != 0 and "needs an MRI dataset" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "runs").exists()


def test_stored_undersampled_mri_uses_its_own_masks_and_refuses_edm(tmp_path, phantoms):
    from training.data_tools import simulate_mri
    from training.masks import RandomLineMaskLaw

    dest = str(tmp_path / "undersampled")
    simulate_mri(phantoms, dest, num_coils=4, max_images=4, mask_law=RandomLineMaskLaw(4, 2))
    with pytest.raises(UserError, match="needs fully sampled data"):
        build(dest, loss="edm")
    c = build(dest)
    assert c.measurement["protocol"] == "stored" and c.measurement["mask"] == {"kind": "lines-random", "R": 4, "acs": 2}
