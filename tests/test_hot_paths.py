"""The samplers' hot paths (issue 15): vectorised mask draws, single-precision noise and operators, no host syncs in
the loops of any sampler.

- Same images for the same seeds: checksums of every MSM sampler's output, captured from the code before the hot
  paths changed (commit 764a44d) with one change applied to it by hand, its per-step noise drawn in float32 /
  complex64 instead of float64. Masks are compared with no change at all: the vectorised draws consume the same
  random numbers of the same per-seed streams. The float32 noise itself is tested for its law (Kolmogorov-Smirnov
  against N(0, 1)) and for its per-seed streams; the samplers' output law under it is what the closed-form
  covariance tests of tests/test_msm_sampler.py check.
- The MSM samplers' state is single precision by default now; the double state (precision='double') reproduces the
  checksums, and the single one gives the same samples to float32 rounding.
- No host syncs: every way Python reads a tensor's value (item, float, bool, tolist, ...) is counted while a sampler
  runs; the count must not grow with the number of steps (on a GPU each such read waits for the device).
"""

import math

import numpy as np
import pytest
import scipy.stats
import torch

from tests.sampling.conftest import (
    ald,
    ambient_generate,
    ancestral_generate,
    dps_generate,
    edm_generate,
    msm_generate,
    msm_posterior,
    padis,
    pc,
)
from torch_utils.misc import SeedGenerators
from training.masks import coverage_aware_masks, example_generator, mask_law_from_config
from training.networks import network_kwargs_for
from training.operators import Identity, MultiCoilMRI, PixelMask
from training.sampling import conditioning
from training.sampling.denoisers import MSMAggregate, SubsetDraws, mask_generators, net_partial_denoiser
from training.sampling.solvers import ODE, seed_measurement_randn

SEEDS = [0, 7, 123]
SIGMAS = torch.tensor([40.0, 10.0, 3.0, 1.0, 0.3, 0.05], dtype=torch.float64)
LAWS = {"box": {"kind": "box", "p": 0.4}, "pixel": {"kind": "pixel", "p": 0.3},
        "lines-random": {"kind": "lines-random", "R": 3, "acs": 2},
        "lines-equispaced": {"kind": "lines-equispaced", "R": 2, "acs": 2}, "full": {"kind": "full"}}

# [sum, sum of squares, sum weighted by cos(0.37 i)] of the flattened real view, from the code before the change.
REFERENCE = {
    "masks/box": [115584.0, 14872232.0, -413.31577671961577],
    "masks/pixel": [128905.0, 16602369.0, 1107.9643925982898],
    "masks/lines-random": [1120.0, 18004.0, 18.154109644413406],
    "masks/lines-equispaced": [1875.0, 30475.0, 13.028481749101335],
    "masks/full": [185280.0, 23777600.0, 105.2694592692925],
    "msm/box/batched": [-6.82701093664892, 34.632254051517485, -0.9008004831341885],
    "msm/box/reference": [3.0485013425808796, 44.10610455114049, 1.7662495211585822],
    "msm/pixel/batched": [-7.810480656691818, 35.51824888349671, -0.4950850550085888],
    "msm/pixel/reference": [3.549351858575144, 44.09466933203382, 0.7294720327950177],
    "msm/lines-random/mri": [-2.111996017863736, 164.0302004766849, -5.324933410970278],
    "heun/lines-random/mri": [-35.77363118859296, 1808.8451579019675, -16.10675325187779],
    "msm/lines-equispaced/mri": [-3.7408661275401744, 317.20182026679925, -13.025966042718249],
    "heun/lines-equispaced/mri": [-94.3480439849486, 6982.265028596523, -59.02919156326532],
    "posterior/partial": [-14.782591259946967, 267.83194721742234, -27.42917990753385],
    "aggregate/edm": [-16.90300689145441, 2781.304100981487, -56.4592019372606],
    "ancestral": [-7.810480656691818, 35.51824888349671, -0.4950850550085889],
    "ambient": [55.9794001631782, 1135.231077985133, -42.48624989243128],
}


def checksum(x: torch.Tensor) -> list[float]:
    x = (torch.view_as_real(x) if x.is_complex() else x).to(torch.float64).flatten()
    weights = torch.cos(torch.arange(x.numel(), dtype=torch.float64) * 0.37)
    return [float(x.sum()), float((x * x).sum()), float((x * weights).sum())]


def diagonal_partial_denoiser(variance: torch.Tensor):
    """The exact partial denoiser of independent N(0, variance) entries: P s variance / (variance + sigma^2)."""

    def denoise(s, mask, sigma):
        return mask * s * (variance / (variance + sigma**2)).to(s.real.dtype)

    return denoise


def variances():
    g = torch.Generator().manual_seed(5)
    image = torch.rand(1, 1, 8, 8, generator=g, dtype=torch.float64) + 0.1
    return image, torch.rand(1, 2, 8, 8, generator=g, dtype=torch.float64) + 0.1


def image_latents():
    return SeedGenerators(SEEDS).randn((len(SEEDS), 1, 8, 8), dtype=torch.float64)


def mri_latents():
    like = torch.empty(len(SEEDS), 2, 8, 8, dtype=torch.complex128)
    return seed_measurement_randn(SeedGenerators(SEEDS), like).to(torch.complex128)


def sampler_outputs() -> dict:
    """What REFERENCE holds, computed by the current code."""
    var_image, var_mri = variances()
    out = {}
    for name, config in LAWS.items():
        draws = SubsetDraws(mask_law_from_config(config), (8, 8), SeedGenerators(SEEDS), "cpu")
        masks = torch.cat([draws.next(k) for k in (1, 3, 2, 4)])
        out[f"masks/{name}"] = checksum(masks * torch.arange(1, masks[0].numel() + 1).reshape(masks.shape[1:]))
    for name in ("box", "pixel"):
        for variant in ("batched", "reference"):
            x = msm_generate(diagonal_partial_denoiser(var_image), image_latents(),
                             mask_law_from_config(LAWS[name]), SeedGenerators(SEEDS), num_subsets=3,
                             sigmas=SIGMAS, variant=variant, precision="double")
            out[f"msm/{name}/{variant}"] = checksum(x)
    for name in ("lines-random", "lines-equispaced"):
        law = mask_law_from_config(LAWS[name])
        x = msm_generate(diagonal_partial_denoiser(var_mri), mri_latents(), law, SeedGenerators(SEEDS),
                         num_subsets=2, sigmas=SIGMAS, outer="ddnm", eta=0.5, precision="double")
        out[f"msm/{name}/mri"] = checksum(x)
        x = msm_generate(diagonal_partial_denoiser(var_mri), mri_latents(), law, SeedGenerators(SEEDS),
                         num_subsets=2, num_steps=4, variant="heun")
        out[f"heun/{name}/mri"] = checksum(x)
    observed = (torch.arange(8) % 2 == 0).to(torch.float32).reshape(1, 1, 1, 8)
    x = msm_posterior(diagonal_partial_denoiser(var_mri), mri_latents(),
                      mask_law_from_config(LAWS["lines-random"]), SeedGenerators(SEEDS),
                      mri_latents() * observed, placement="partial", dc_step=0.5, mask=observed,
                      num_subsets=2, sigmas=SIGMAS, precision="double")
    out["posterior/partial"] = checksum(x)
    aggregate = MSMAggregate(diagonal_partial_denoiser(var_image), mask_law_from_config(LAWS["box"]),
                             SeedGenerators(SEEDS), 2, fallback="shrink", operator=Identity())
    x = edm_generate(aggregate, image_latents(), SeedGenerators([s + 1 for s in SEEDS]), num_steps=4,
                     S_churn=2.0)
    out["aggregate/edm"] = checksum(x)
    x = ancestral_generate(lambda z, s: z * (var_image / (var_image + s**2)), image_latents(),
                           SeedGenerators(SEEDS), SIGMAS, precision="double")
    out["ancestral"] = checksum(x)
    x = ambient_generate(lambda s, m, sigma: s * (var_image / (var_image + sigma**2)), image_latents(),
                         mask_law_from_config(LAWS["pixel"]), 0.1, SeedGenerators(SEEDS), num_steps=4)
    out["ambient"] = checksum(x)
    return out


def test_samplers_reproduce_the_outputs_before_the_change():
    # The MSM samplers with the double-precision state they had then (their default state is single precision now:
    # test_single_precision_state_gives_the_same_samples). Masks are bit for bit. Sampler outputs agree to 1e-6: the
    # fused outer update multiplies the float32 noise by its coefficient in the state's precision, where the code of
    # REFERENCE did it in float32 (a rounding of 1e-7 relative on the noise term; any change of law moves the
    # checksums by O(1)).
    outputs = sampler_outputs()
    for name, expected in REFERENCE.items():
        tolerance = 1e-12 if name.startswith("masks/") else 1e-6
        np.testing.assert_allclose(outputs[name], expected, rtol=tolerance, atol=tolerance, err_msg=name)


def test_single_precision_state_gives_the_same_samples():
    """The default single-precision state against the double one, same seeds and exact denoisers (whose outputs are
    cast to the state's dtype, as the network's are): the same samples to float32 rounding over six levels, and the
    single state really is single (so the comparison is not double against double)."""
    var_image, var_mri = variances()
    runs = {
        "box batched": lambda p: msm_generate(
            diagonal_partial_denoiser(var_image), image_latents(), mask_law_from_config(LAWS["box"]),
            SeedGenerators(SEEDS), num_subsets=3, sigmas=SIGMAS, precision=p),
        "pixel reference": lambda p: msm_generate(
            diagonal_partial_denoiser(var_image), image_latents(), mask_law_from_config(LAWS["pixel"]),
            SeedGenerators(SEEDS), num_subsets=3, sigmas=SIGMAS, variant="reference", precision=p),
        "mri ddnm": lambda p: msm_generate(
            diagonal_partial_denoiser(var_mri), mri_latents(), mask_law_from_config(LAWS["lines-random"]),
            SeedGenerators(SEEDS), num_subsets=2, sigmas=SIGMAS, outer="ddnm", eta=0.5, precision=p),
        "ancestral": lambda p: ancestral_generate(
            lambda z, s: z * (var_image / (var_image + s**2)).to(z.dtype), image_latents(), SeedGenerators(SEEDS),
            SIGMAS, precision=p),
    }
    for name, run in runs.items():
        single, double = run("single"), run("double")
        assert single.dtype in (torch.float32, torch.complex64) and double.dtype in (torch.float64, torch.complex128)
        scale = double.abs().max().item()
        error = (single.to(double.dtype) - double).abs().max().item()
        assert error < 1e-5 * scale and error > 0, (name, error, scale)
    with pytest.raises(ValueError, match="precision"):
        msm_generate(diagonal_partial_denoiser(var_image), image_latents(), mask_law_from_config(LAWS["box"]),
                     SeedGenerators(SEEDS), sigmas=SIGMAS, precision="half")


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
def test_single_precision_noise_is_standard_normal_per_seed(dtype):
    seeds = list(range(40))
    like = torch.empty(len(seeds), 3, 16, 16, dtype=dtype)
    noise = seed_measurement_randn(SeedGenerators(seeds), like)
    assert noise.dtype == (torch.complex64 if dtype.is_complex else torch.float32)
    parts = torch.view_as_real(noise) if noise.is_complex() else noise
    # Each real component N(0, 1): the pooled draws pass a KS test, and real / imaginary parts are uncorrelated.
    assert scipy.stats.kstest(parts.flatten().double().numpy(), "norm").pvalue > 1e-3
    if noise.is_complex():
        assert abs(float((noise.real * noise.imag).mean())) < 4 / math.sqrt(noise.numel())
    # Row i depends only on seeds[i].
    alone = seed_measurement_randn(SeedGenerators([seeds[5]]), like[:1])
    torch.testing.assert_close(alone[0], noise[5], rtol=0, atol=0)


@pytest.mark.parametrize("name", list(LAWS))
def test_batched_mask_draws_equal_each_seed_drawn_alone(name):
    """The vectorised draw against its definition: element i runs coverage_aware_masks with its own mask generator
    and its own coverage record, alone."""
    law = mask_law_from_config(LAWS[name])
    seeds, shape = [3, 11, 4, 2**40 + 1], (8, 12)
    draws = SubsetDraws(law, shape, SeedGenerators(seeds), "cpu")
    batched = [draws.next(k) for k in (2, 5, 1)]
    for i, g in enumerate(mask_generators(SeedGenerators(seeds))):
        covered = torch.zeros(law.mask_shape(1, shape), dtype=torch.bool)
        for k, masks in zip((2, 5, 1), batched, strict=True):
            alone, covered = coverage_aware_masks(law, k, shape, covered, g)
            torch.testing.assert_close(masks[:, i], alone[:, 0], rtol=0, atol=0)


@pytest.mark.parametrize("name", list(LAWS))
def test_masks_for_examples_equal_one_draw_per_example(name):
    law = mask_law_from_config(LAWS[name])
    indices = [5, 0, 17, 5]
    batch = law.sample_for_examples(indices, (8, 12), seed=9)
    alone = torch.cat([law.sample(1, (8, 12), example_generator(9, i)) for i in indices])
    torch.testing.assert_close(batch, alone, rtol=0, atol=0)


def test_partial_denoiser_runs_the_operators_in_single_precision():
    """net_partial_denoiser on a complex128 state hands T^H a complex64 input and returns complex128 close to the
    same formula P T D(T^H s) evaluated in double precision."""
    cfg = network_kwargs_for(arch="ddpmpp", precond="edm", img_resolution=8, in_channels=2, out_channels=2,
                             label_dim=0, cbase=8, cres=[1], num_blocks=1, attn_resolutions=[], dropout=0.0)
    from training import snapshot as checkpoint

    torch.manual_seed(0)
    net = checkpoint.build_network(cfg).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    maps = torch.randn(1, 3, 8, 8, 2, generator=g, dtype=torch.float64)
    maps = torch.view_as_complex(maps)
    maps = (maps / (maps.abs() ** 2).sum(dim=1, keepdim=True).sqrt()).to(torch.complex64)
    operator = MultiCoilMRI(maps)
    seen = []
    original_ah = operator.AH
    operator.AH = lambda y: seen.append(y.dtype) or original_ah(y)
    mask = (torch.rand(2, 1, 1, 8, generator=g) < 0.5).to(torch.float32)
    s = torch.view_as_complex(torch.randn(2, 3, 8, 8, 2, generator=g, dtype=torch.float64)) * mask
    with torch.no_grad():
        s_hat = net_partial_denoiser(net, operator)(s, mask, 0.7)
        x0 = net(original_ah(s).to(torch.float32), torch.full((2,), 0.7), None).to(torch.float64)
    expected = torch.fft.fftshift(torch.fft.fft2(torch.fft.ifftshift(
        maps.to(torch.complex128) * torch.complex(x0[:, 0], x0[:, 1])[:, None], dim=(-2, -1)), norm="ortho"),
        dim=(-2, -1)) * mask
    assert seen == [torch.complex64] and s_hat.dtype == torch.complex128
    torch.testing.assert_close(s_hat, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("size", [8, 7], ids=["even-checkerboard", "odd-shifts"])
def test_masked_forward_equals_the_forward_times_the_mask(size):
    """MultiCoilMRI.A(x, mask) folds the mask into the k-space sign (even sizes): it must equal A(x) * mask for line
    and pixel masks, and fall back to the product for odd sizes."""
    g = torch.Generator().manual_seed(3)
    maps = torch.view_as_complex(torch.randn(1, 4, size, size, 2, generator=g))
    operator = MultiCoilMRI(maps)
    x = torch.randn(2, 2, size, size, generator=g)
    for mask in ((torch.rand(2, 1, 1, size, generator=g) < 0.5).float(),
                 (torch.rand(2, 1, size, size, generator=g) < 0.5).float()):
        torch.testing.assert_close(operator.A(x, mask), operator.A(x) * mask, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------
# Host syncs.

_READS = ("item", "tolist", "numpy", "cpu", "__float__", "__int__", "__bool__", "__index__", "__complex__")


def count_host_reads(monkeypatch, run) -> int:
    """How often `run()` reads a tensor's value on the host (each read is a device sync on a GPU)."""
    count = [0]
    for name in _READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            count[0] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    try:
        run()
    finally:
        monkeypatch.undo()
    return count[0]


def _levels(n: int) -> torch.Tensor:
    return torch.logspace(1.5, -1.5, n, dtype=torch.float64)


def _sampler_runs():
    """name -> run(num_steps) of every sampler and solver, on small closed-form problems."""
    var_image, var_mri = variances()
    partial_image, partial_mri = diagonal_partial_denoiser(var_image), diagonal_partial_denoiser(var_mri)

    def denoiser(x, sigma):
        return x * (var_image / (var_image + sigma**2))

    box, lines = mask_law_from_config(LAWS["box"]), mask_law_from_config(LAWS["lines-random"])
    mask = (torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(2)) < 0.6).to(torch.float64)
    y = image_latents() * mask
    observed = (torch.arange(8) % 2 == 0).to(torch.float32).reshape(1, 1, 1, 8)
    sigma_y = torch.full((len(SEEDS), 1, 1, 1), 0.1, dtype=torch.float64)
    gen = lambda: SeedGenerators(SEEDS)  # noqa: E731
    return {
        "edm": lambda n: edm_generate(denoiser, image_latents(), gen(), num_steps=n, S_churn=5.0),
        "ancestral": lambda n: ancestral_generate(denoiser, image_latents(), gen(), _levels(n)),
        "msm batched": lambda n: msm_generate(partial_image, image_latents(), box, gen(), sigmas=_levels(n)),
        "msm reference": lambda n: msm_generate(partial_image, image_latents(), box, gen(),
                                                        sigmas=_levels(n), variant="reference"),
        "msm heun": lambda n: msm_generate(partial_mri, mri_latents(), lines, gen(), num_steps=n, variant="heun"),
        "msm posterior partial": lambda n: msm_posterior(
            partial_mri, mri_latents(), lines, gen(), mri_latents() * observed, placement="partial", dc_step=0.5,
            mask=observed, sigmas=_levels(n)),
        "msm posterior aggregate": lambda n: msm_posterior(
            partial_image, image_latents(), box, gen(), y, placement="aggregate", dc_step=0.5,
            operator=PixelMask(mask), sigmas=_levels(n)),
        "msm aggregate denoiser": lambda n: edm_generate(
            MSMAggregate(partial_image, box, gen(), 2, fallback="shrink", operator=Identity()), image_latents(), gen(),
            num_steps=n),
        "ambient": lambda n: ambient_generate(lambda s, m, sigma: denoiser(s, sigma), image_latents(),
                                                      box, 0.1, gen(), num_steps=n),
        "dps": lambda n: dps_generate(denoiser, image_latents(), gen(), Identity(), y, mask, sigmas=_levels(n)),
        "ald jalal": lambda n: ald(
            denoiser, image_latents(), gen(), _levels(n), torch.full((n,), 1e-3), 2,
            conditioning=conditioning.jalal(Identity(), y, mask, sigma_y=sigma_y)),
        "pc dds": lambda n: pc(denoiser, image_latents() * 30, gen(), _levels(n),
                                                    conditioning=conditioning.dds(Identity(), y, mask)),
        "pc normalized": lambda n: pc(
            denoiser, image_latents() * 30, gen(), _levels(n),
            conditioning=conditioning.jalal_normalized(Identity(), y, mask)),
        "probability flow projection": lambda n: ODE()(
            denoiser, image_latents() * 30, None, _levels(n), conditioning=conditioning.projection(PixelMask(mask), y)),
        "padis": lambda n: padis(denoiser, image_latents(), gen(), _levels(n), Identity(), y, mask,
                                                  zeta=0.1, inner_steps=2),
    }


@pytest.mark.parametrize("name", list(_sampler_runs()))
def test_no_host_reads_inside_sampler_loops(monkeypatch, name):
    run = _sampler_runs()[name]
    with torch.no_grad():
        short = count_host_reads(monkeypatch, lambda: run(3))
        long = count_host_reads(monkeypatch, lambda: run(7))
    assert long == short, f"{name}: {short} host reads with 3 steps, {long} with 7 (some are inside the loop)"
