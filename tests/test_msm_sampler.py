"""MSM stochastic partial-score sampler (training/sampling/: the ancestral solver on `MSMAggregate`, and the
reference write-back loop `msm_reference`) against exact Gaussian partial denoisers.

For zero-mean Gaussian data z ~ N(0, C) every quantity of the method has a closed form:
- the partial denoiser of a mask P is the Gaussian conditional E[z_O | z_O + sigma n_O] = C_OO (C_OO + sigma^2)^-1 s_O
  on the observed entries O (`gaussian_partial_denoiser`);
- the K = infinity denoiser E_P[P s_hat(P z)] / E[P] is a linear map M(sigma) z, computed here by averaging over
  EVERY mask of a small box law (`box_law_masks` enumerates all drop patterns and rolls);
- a sampler whose denoiser is linear is a linear recursion in z, so its output covariance is computed exactly, with no
  Monte-Carlo error (`linear_sampler_covariance`).
The sample covariance of the stochastic sampler is compared with C and with that exact K = infinity covariance.
"""

import concurrent.futures
import itertools
import math
import multiprocessing
import os

import numpy as np
import PIL.Image
import pytest
import torch

from dnnlib import UserError
from generate import MRI_DISPLAY_MAX, mri_magnitude_images
from tests.gaussian import exact_samples, gaussian_denoiser, random_covariance, relative_cov_error
from tests.helpers import make_phantoms, run_cli
from tests.sampling.conftest import ancestral_generate, msm_generate
from torch_utils.misc import SeedGenerators
from training import snapshot as checkpoint
from training.data_tools import simulate_mri
from training.masks import BoxMaskLaw, FullMask
from training.measurements import MeasurementConfig
from training.mri import MRIDataset
from training.networks import network_kwargs_for
from training.sampling.denoisers import MSMAggregate, aggregate_partial_estimates
from training.schedules import vp200_sigmas


def gaussian_partial_denoiser(cov: torch.Tensor):
    """partial_denoiser(s, mask, sigma) for z ~ N(0, cov) (cov over the flattened measurement): per row, solve
    (P C P + sigma^2 I) x = s, whose observed block is (C_OO + sigma^2)^-1 s_O and whose unobserved block is 0
    because s is 0 there; then P C x is C_OO (C_OO + sigma^2)^-1 s_O on O and 0 elsewhere."""
    dim = cov.shape[0]
    eye = torch.eye(dim, dtype=torch.float64)

    def denoise(s, mask, sigma):
        p = mask.expand(s.shape).reshape(len(s), dim).to(torch.float64)
        flat = s.reshape(len(s), dim).to(torch.float64)
        system = p[:, :, None] * cov * p[:, None, :] + sigma**2 * eye
        x = torch.linalg.solve(system, flat)
        return (p * (x @ cov)).reshape(s.shape)

    return denoise


def box_law_masks(law: BoxMaskLaw, shape: tuple[int, int]) -> torch.Tensor:
    """Every mask of the box law on `shape` (H, W divisible by 4), one per (kept-cell set, roll) pair, i.e. each with
    its probability under the law: float64 (M, H * W)."""
    height, width = shape
    grid = law.grid
    kept_sets = list(itertools.combinations(range(grid**2), grid**2 - law.num_dropped))
    keep = torch.zeros(len(kept_sets), grid**2, dtype=torch.bool)
    for row, cells in enumerate(kept_sets):
        keep[row, list(cells)] = True
    masks = []
    for shift_rows in range(height // grid):
        for shift_cols in range(width // grid):
            rows = (torch.arange(height) - shift_rows) % height
            cols = (torch.arange(width) - shift_cols) % width
            cell = ((rows * grid) // height)[:, None] * grid + ((cols * grid) // width)[None, :]
            masks.append(keep[:, cell.reshape(-1)])
    return torch.cat(masks).to(torch.float64)


def infinite_k_denoiser_matrices(cov: torch.Tensor, masks: torch.Tensor, sigmas: torch.Tensor,
                                 chunk: int = 4096) -> list[torch.Tensor]:
    """The K = infinity MSM denoiser z_hat = M(sigma) z for every level: M = diag(1 / E[P]) E_P[E_O C_OO
    (C_OO + sigma^2)^-1 E_O^T], the expectation an exact average over `masks` (all with the same number m of observed
    entries, as in the box law). Each block is diagonalised once, C_OO = V diag(l) V^T, so that for every sigma the
    average is one matrix product sum_r l_r / (l_r + sigma^2) u_r u_r^T over the embedded eigenvectors u_r."""
    dim = cov.shape[0]
    observed = masks.sum(dim=1)
    assert bool((observed == observed[0]).all())
    totals = torch.zeros(len(sigmas), dim, dim, dtype=torch.float64)
    sigma_sq = sigmas.to(torch.float64)[:, None] ** 2
    for start in range(0, len(masks), chunk):
        part = masks[start : start + chunk]
        index = part.nonzero()[:, 1].reshape(len(part), -1)  # (M, m) observed entries, ascending
        blocks = cov[index[:, :, None], index[:, None, :]]
        evals, evecs = torch.linalg.eigh(blocks)
        embedded = torch.zeros(len(part), dim, index.shape[1], dtype=torch.float64)
        embedded.scatter_(1, index[:, :, None].expand_as(evecs), evecs)
        vectors = embedded.permute(1, 0, 2).reshape(dim, -1)  # (dim, M m): the u_r
        evals = evals.reshape(-1)
        for k in range(len(sigmas)):
            totals[k] += (vectors * (evals / (evals + sigma_sq[k]))) @ vectors.T
    expected_mask = masks.mean(dim=0)
    return [total / len(masks) / expected_mask[:, None] for total in totals]


def full_denoiser_matrices(cov: torch.Tensor, sigmas: torch.Tensor) -> list[torch.Tensor]:
    eye = torch.eye(cov.shape[0], dtype=torch.float64)
    return [cov @ torch.linalg.inv(cov + s**2 * eye) for s in sigmas.tolist()]


def linear_sampler_covariance(matrices: list[torch.Tensor], sigmas: torch.Tensor, eta: float = 1.0) -> torch.Tensor:
    """Exact output covariance of `ancestral_sampler` (ddim outer update) with the linear denoiser z_hat = M_k z at
    level k: z_0 = sigma_0 n; z <- (c I + (1 - c) M_k) z + sigma_up n with c = sqrt(s1^2 - sigma_up^2) / s0;
    output M_last z."""
    dim = matrices[0].shape[0]
    eye = torch.eye(dim, dtype=torch.float64)
    s = sigmas.tolist()
    state = s[0] ** 2 * eye
    for k in range(len(s) - 1):
        sigma_up = eta * math.sqrt(s[k + 1] ** 2 * (s[k] ** 2 - s[k + 1] ** 2) / s[k] ** 2)
        c = math.sqrt(s[k + 1] ** 2 - sigma_up**2) / s[k]
        step = c * eye + (1 - c) * matrices[k]
        state = step @ state @ step.T + sigma_up**2 * eye
    return matrices[-1] @ state @ matrices[-1].T


def diagonal_covariance(dim: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.diag(0.05 + 0.4 * torch.rand(dim, generator=g, dtype=torch.float64))


def _msm_samples_chunk(cov, shape, law, seeds, sigmas, num_subsets, variant):
    torch.set_num_threads(1)
    gen = SeedGenerators(seeds)
    latents = gen.randn([len(seeds), *shape], dtype=torch.float64)
    out = msm_generate(gaussian_partial_denoiser(cov), latents, law, gen, num_subsets=num_subsets, sigmas=sigmas,
                       variant=variant, precision="double")  # exact identities below compare to 1e-12
    return out.reshape(len(seeds), -1)


def msm_samples(cov, shape, law, seeds, sigmas, num_subsets, variant="batched", workers=1):
    """Samples of the MSM sampler with exact partial denoisers, (len(seeds), dim). Per-seed streams make the result
    independent of how the seeds are split, so `workers` processes may share the seeds (mask draws, a few tiny torch
    ops per seed, subset and level, dominate the cost)."""
    seeds = list(seeds)
    if workers <= 1:
        return _msm_samples_chunk(cov, shape, law, seeds, sigmas, num_subsets, variant)
    chunks = [seeds[i::workers] for i in range(workers)]
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        parts = list(pool.map(_msm_samples_chunk, *zip(*[(cov, shape, law, c, sigmas, num_subsets, variant)
                                                          for c in chunks])))
    order = torch.tensor([s for c in chunks for s in c]).argsort()
    return torch.cat(parts)[order]


def ancestral_samples(cov, shape, seeds, sigmas):
    seeds = list(seeds)
    gen = SeedGenerators(seeds)
    latents = gen.randn([len(seeds), *shape], dtype=torch.float64)
    return ancestral_generate(gaussian_denoiser(cov, shape), latents, gen, sigmas,
                              precision="double").reshape(len(seeds), -1)


def covariance_table(cov, shape, law, num_samples, sigmas, ks=(1, 2, 4, 8), variants=("reference", "batched"),
                     workers=1):
    """Distances (relative Frobenius error of the sample covariance) to C and to the exact K = infinity covariance,
    plus the Monte-Carlo floors (exact samples of each target) and the full-score sampler; prints a table."""
    seeds = range(num_samples)
    cov_inf = linear_sampler_covariance(infinite_k_denoiser_matrices(cov, box_law_masks(law, shape[-2:]), sigmas),
                                        sigmas)
    cov_full = linear_sampler_covariance(full_denoiser_matrices(cov, sigmas), sigmas)
    floor_c = sum(relative_cov_error(exact_samples(cov, num_samples, s), cov) for s in range(5)) / 5
    floor_inf = sum(relative_cov_error(exact_samples(cov_inf, num_samples, s), cov_inf) for s in range(5)) / 5
    full = ancestral_samples(cov, shape, seeds, sigmas)
    rows = {"full": (relative_cov_error(full, cov), relative_cov_error(full, cov_inf))}
    for variant in variants:
        for k in ks:
            out = msm_samples(cov, shape, law, seeds, sigmas, k, variant, workers)
            rows[variant, k] = (relative_cov_error(out, cov), relative_cov_error(out, cov_inf))
    print(f"\n{num_samples} samples, {len(sigmas)} levels, {tuple(shape)} data, box law p = {law.p}")
    print(f"exact K = inf sampler: |C_inf - C| / |C| = {((cov_inf - cov).norm() / cov.norm()).item():.3f}; "
          f"full-score sampler (analytic): |C_full - C| / |C| = {((cov_full - cov).norm() / cov.norm()).item():.3f}")
    print(f"Monte-Carlo floor: to C {floor_c:.3f}, to C_inf {floor_inf:.3f}")
    print(f"{'sampler':>16} {'to C':>7} {'to C_inf':>9}")
    for key, (to_c, to_inf) in rows.items():
        name = key if isinstance(key, str) else f"{key[0]} K={key[1]}"
        print(f"{name:>16} {to_c:7.3f} {to_inf:9.3f}")
    return rows, floor_c, floor_inf


# ----------------------------------------------------------------------------
# Tests.


@pytest.mark.parametrize("law", [FullMask(), BoxMaskLaw(0.0)], ids=["full", "box-p0"])
def test_full_coverage_reduces_to_the_ancestral_sampler(law):
    cov = random_covariance(64, rank=8, seed=0)
    shape, seeds, sigmas = (1, 8, 8), range(6), _grid(10)
    for num_subsets in (1, 3):
        for outer, eta in (("ddim", 1.0), ("ddim", 0.5), ("ddnm", 0.85)):
            gen = SeedGenerators(seeds)
            latents = gen.randn([6, *shape], dtype=torch.float64)
            expected = ancestral_generate(gaussian_denoiser(cov, shape), latents, gen, sigmas, eta=eta, outer=outer,
                                          precision="double")
            gen = SeedGenerators(seeds)
            out = msm_generate(gaussian_partial_denoiser(cov), gen.randn([6, *shape], dtype=torch.float64), law, gen,
                               num_subsets=num_subsets, sigmas=sigmas, eta=eta, outer=outer, precision="double")
            assert (out - expected).abs().max() < 1e-12, (num_subsets, outer)


def test_aggregation_returns_z_star_where_covered_and_the_previous_estimate_elsewhere():
    g = torch.Generator().manual_seed(0)
    z_star, previous = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    masks = BoxMaskLaw(0.6).sample(2 * 4, (8, 8), g).reshape(2, 4, 1, 8, 8)
    out = aggregate_partial_estimates(masks * z_star, masks, previous)
    covered = masks.sum(dim=0).expand_as(z_star) > 0
    assert 0 < covered.float().mean() < 1
    assert torch.allclose(out[covered], z_star[covered], rtol=0, atol=1e-6)
    assert torch.equal(out[~covered], previous[~covered])

    # In the sampler (K = 2, so entries are covered twice): a partial denoiser that always returns P z* gives z* on
    # every entry covered at this level or an earlier one and 0 (the documented start) on entries never covered yet.
    z_star = z_star.to(torch.float64)
    seen = []

    def partial_denoiser(s, mask, sigma):
        seen.append(mask.reshape(2, 4, 1, 8, 8))
        return mask * z_star.repeat(2, 1, 1, 1)

    trajectory = []
    msm_generate(partial_denoiser, torch.zeros(4, 3, 8, 8), BoxMaskLaw(0.6), SeedGenerators(range(4)), num_subsets=2,
                 sigmas=vp200_sigmas()[::50], callback=lambda sigma, z_hat: trajectory.append(z_hat))
    ever_covered = torch.zeros(4, 3, 8, 8, dtype=torch.bool)
    uncovered_per_level = []
    for masks, z_hat in zip(seen, trajectory, strict=True):
        ever_covered |= masks.sum(dim=0).expand_as(z_hat) > 0
        assert torch.equal(z_hat[ever_covered], z_star[ever_covered])
        assert bool((z_hat[~ever_covered] == 0).all())
        uncovered_per_level.append((~ever_covered).float().mean().item())
    assert uncovered_per_level[0] > 0 and uncovered_per_level[-1] == 0, uncovered_per_level


def _grid(step: int) -> torch.Tensor:
    """Every step-th VP level, ending at the smallest one (a shorter run of the same sampler)."""
    sigmas = vp200_sigmas()
    return torch.cat([sigmas[:-1:step], sigmas[-1:]])


def test_independent_entries_msm_score_is_exact():
    """Diagonal C: the partial denoiser of an entry is the full denoiser's, so wherever a step's masks cover
    everything the MSM sampler IS the full-score sampler. On 4x4 data the box law has 1x1 cells and no roll, and the
    coverage-aware second mask takes the 6 cells the first one left: from K = 2 on, every step covers everything and
    the samples equal the full-score sampler's for the same seeds; K = 1 leaves 6/16 of the entries stale per step."""
    cov, shape, law, seeds, sigmas = diagonal_covariance(16, seed=0), (1, 4, 4), BoxMaskLaw(0.4), range(400), _grid(10)
    full = ancestral_samples(cov, shape, seeds, sigmas)
    errors = {"full": relative_cov_error(full, cov)}
    for k in (1, 2):
        out = msm_samples(cov, shape, law, seeds, sigmas, k)
        errors[k] = relative_cov_error(out, cov)
        if k == 2:
            assert (out - full).abs().max() < 1e-12
        else:
            assert (out - full).abs().max() > 1e-3
    floor = sum(relative_cov_error(exact_samples(cov, len(seeds), s), cov) for s in range(5)) / 5
    print(f"\ndiagonal C, 400 samples, 21 levels: covariance error {errors}, exact-sample floor {floor:.3f}")


def test_correlated_entries_msm_follows_the_infinite_k_sampler_not_the_data():
    """Correlated C: the MSM score is a product of partial experts, so the exact K = infinity sampler is far from C,
    and the batched sampler approaches it as K grows (400 samples: distances within 1.5x the Monte-Carlo floor at
    K = 8; the 4000-sample table with the reference variant is the slow test below)."""
    cov, shape, law, sigmas = random_covariance(16, rank=2, seed=3), (1, 4, 4), BoxMaskLaw(0.4), _grid(10)
    rows, floor_c, floor_inf = covariance_table(cov, shape, law, 400, sigmas, ks=(1, 8), variants=("batched",))
    cov_inf = linear_sampler_covariance(infinite_k_denoiser_matrices(cov, box_law_masks(law, (4, 4)), sigmas), sigmas)
    assert ((cov_inf - cov).norm() / cov.norm()).item() > 5 * floor_c
    assert all(to_c > 5 * floor_c for key, (to_c, _) in rows.items() if key != "full")
    assert rows["batched", 8][1] < 1.5 * floor_inf
    assert rows["batched", 1][1] > rows["batched", 8][1] + floor_inf / 2


def test_box_law_enumeration_holds_every_mask_the_law_draws():
    law = BoxMaskLaw(0.4)
    masks = box_law_masks(law, (8, 8))
    assert masks.shape == (4 * 8008, 64)
    assert torch.allclose(masks.mean(dim=0), law.expected_mask((8, 8)).reshape(-1))
    drawn = law.sample(200, (8, 8), torch.Generator().manual_seed(0)).reshape(200, 64).to(torch.float64)
    assert bool(((drawn @ masks.T) == 40).any(dim=1).all())  # each draw equals an enumerated mask (40 kept pixels)


def test_infinite_k_matrices_and_linear_covariance_reduce_to_the_full_denoiser():
    """With the single mask P = I the K = infinity denoiser is C (C + sigma^2)^-1, and the exact covariance of the
    full-score ancestral sampler agrees with the sample covariance of `ancestral_sampler` within Monte-Carlo error."""
    cov, sigmas = random_covariance(16, rank=4, seed=5), _grid(20)
    single = infinite_k_denoiser_matrices(cov, torch.ones(1, 16, dtype=torch.float64), sigmas)
    full = full_denoiser_matrices(cov, sigmas)
    assert max((a - b).abs().max().item() for a, b in zip(single, full)) < 1e-12
    exact = linear_sampler_covariance(full, sigmas)
    samples = ancestral_samples(cov, (1, 4, 4), range(4000), sigmas)
    floor = sum(relative_cov_error(exact_samples(exact, 4000, s), exact) for s in range(5)) / 5
    assert relative_cov_error(samples, exact) < 1.5 * floor


def test_partial_denoiser_is_the_gaussian_conditional():
    """Against a direct formula on the observed block, for one mask."""
    cov = random_covariance(16, rank=4, seed=6)
    mask = BoxMaskLaw(0.4).sample(1, (4, 4), torch.Generator().manual_seed(1)).to(torch.float64)
    s = mask * torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    observed = mask.reshape(-1).bool()
    block = cov[observed][:, observed]
    expected = torch.zeros(16, dtype=torch.float64)
    expected[observed] = block @ torch.linalg.solve(block + 0.7**2 * torch.eye(len(block), dtype=torch.float64),
                                                    s.reshape(-1)[observed])
    out = gaussian_partial_denoiser(cov)(s, mask, 0.7)
    assert torch.allclose(out.reshape(-1), expected, atol=1e-12)


@pytest.mark.slow
def test_covariance_table_8x8_4000_samples():
    """The table of the issue: 8x8 data, box law p = 0.4, 4000 samples, the 200 VP levels (mask draws dominate: run
    with many cores). The batched variant approaches the K = infinity sampler as K grows; the reference one does
    not get closer beyond K = 2."""
    cov, shape, law = random_covariance(64, rank=8, seed=3), (1, 8, 8), BoxMaskLaw(0.4)
    rows, _, floor_inf = covariance_table(cov, shape, law, 4000, vp200_sigmas(), workers=os.cpu_count())
    assert rows["batched", 8][1] < 1.5 * floor_inf
    assert rows["batched", 8][1] < rows["reference", 8][1]
    diag = diagonal_covariance(64, seed=0)
    covariance_table(diag, shape, law, 4000, vp200_sigmas(), variants=("batched",), workers=os.cpu_count())


# ----------------------------------------------------------------------------
# generate.py --sampler msm.


def _write_snapshot(path, in_channels, out_channels, dataset: dict, measurement: dict | None):
    """An untrained but deterministic network with a measurement config, as train.py records it."""
    cfg = network_kwargs_for(arch="ddpmpp", precond="edm", img_resolution=16, in_channels=in_channels,
                             out_channels=out_channels, label_dim=0, cbase=8, cres=[1, 2], num_blocks=1,
                             attn_resolutions=[], dropout=0.0)
    net = checkpoint.build_network(cfg)
    checkpoint.save_snapshot(str(path), {"network": cfg, "dataset": dataset, "measurement": measurement}, net)
    return str(path)


@pytest.fixture(scope="module")
def image_snapshots(tmp_path_factory):
    root = tmp_path_factory.mktemp("msm-snap")
    dataset = {"kind": "image", "image_shape": [1, 16, 16]}
    measurement = MeasurementConfig("identity", {"kind": "box", "p": 0.4}).to_config()
    return (_write_snapshot(root / "msm.pt", 1, 1, dataset, measurement),
            _write_snapshot(root / "clean.pt", 1, 1, dataset, None))


@pytest.fixture(scope="module")
def mri_snapshot(tmp_path_factory):
    root = tmp_path_factory.mktemp("mri-snap")
    simulate_mri(make_phantoms(str(root / "ph.zip"), num=3, resolution=16), str(root / "mri"), num_coils=3)
    dataset = MRIDataset(str(root / "mri")).describe()
    measurement = MeasurementConfig("mri", {"kind": "lines-random", "R": 2, "acs": 4}).to_config()
    return _write_snapshot(root / "msm-mri.pt", 2, 2, dataset, measurement), str(root / "mri")


def load_pngs(outdir, seeds):
    return np.stack([np.asarray(PIL.Image.open(os.path.join(outdir, f"{s:06d}.png"))) for s in seeds])


def test_generate_msm_images_depend_only_on_the_seeds(tmp_path, image_snapshots):
    msm_path, _ = image_snapshots
    # Few rho levels keep this fast (the default is the 200 VP levels); the sampler itself defaults to msm.
    common = ["generate.py", "--network", msm_path, "--seeds", "0-8", "--subsets", "2", "--schedule", "rho",
              "--steps", "5"]
    run_cli([*common, "--outdir", str(tmp_path / "b1"), "--batch", "1"])
    proc = run_cli([*common, "--outdir", str(tmp_path / "b8"), "--batch", "8"])
    assert "msm batched, K = 2, rho schedule" in proc.stdout
    b1, b8 = load_pngs(tmp_path / "b1", range(9)), load_pngs(tmp_path / "b8", range(9))
    assert np.array_equal(b1, b8) and len({img.tobytes() for img in b1}) == 9
    for variant in ("reference", "heun"):  # batch independence of the variants: the library test below
        run_cli([*common, "--outdir", str(tmp_path / variant), "--batch", "4", "--variant", variant])
        assert not np.array_equal(load_pngs(tmp_path / variant, range(9)), b1)


@pytest.mark.parametrize("variant", ["batched", "reference", "heun"])
def test_samples_depend_only_on_their_seeds(variant):
    cov, law, sigmas = random_covariance(16, rank=4, seed=7), BoxMaskLaw(0.4), _grid(20)

    def run(seeds):
        gen = SeedGenerators(seeds)
        latents = gen.randn([len(seeds), 1, 4, 4], dtype=torch.float64)
        if variant == "heun":
            return msm_generate(gaussian_partial_denoiser(cov), latents, law, gen, num_subsets=2, variant="heun",
                                num_steps=6)
        return msm_generate(gaussian_partial_denoiser(cov), latents, law, gen, num_subsets=2, sigmas=sigmas,
                            variant=variant)

    together = run([3, 4, 5, 6])
    apart = torch.cat([run([3]), run([4, 5]), run([6])])
    assert (together - apart).abs().max() < 1e-12 and (together[0] - together[1]).abs().max() > 1e-3


def test_generate_mri_magnitudes(tmp_path, mri_snapshot):
    snapshot, records = mri_snapshot
    common = ["generate.py", "--network", snapshot, "--seeds", "0-3", "--schedule", "rho", "--steps", "4"]
    run_cli([*common, "--outdir", str(tmp_path / "b1"), "--batch", "1"])
    run_cli([*common, "--outdir", str(tmp_path / "b3"), "--batch", "3"])
    b1, b3 = load_pngs(tmp_path / "b1", range(4)), load_pngs(tmp_path / "b3", range(4))
    assert b1.shape == (4, 16, 16) and np.array_equal(b1, b3)  # grayscale magnitudes
    assert np.asarray(PIL.Image.open(str(tmp_path / "b1") + "-grid.png")).shape == (32, 32)
    # Explicit maps: those of record 1 for every seed reproduce seed 1 (whose default record is 1 mod 3).
    np.save(tmp_path / "maps.npy", MRIDataset(records)[1]["maps"].numpy())
    run_cli([*common, "--outdir", str(tmp_path / "maps"), "--maps", str(tmp_path / "maps.npy")])
    with_maps = load_pngs(tmp_path / "maps", range(4))
    assert np.array_equal(with_maps[1], b1[1]) and not np.array_equal(with_maps[0], b1[0])
    # The EDM sampler on a 2-channel MRI network also writes magnitudes.
    run_cli([*common, "--outdir", str(tmp_path / "edm"), "--sampler", "edm"])
    assert load_pngs(tmp_path / "edm", range(4)).shape == (4, 16, 16)


def test_mri_magnitude_scale_is_fixed():
    image = torch.zeros(2, 2, 4, 4)
    image[0, 0] = 1.0  # magnitude 1: the normalisation's 99th percentile
    image[1, 0], image[1, 1] = 0.6, 0.8  # also magnitude 1, complex phase
    image[1, 0, 0, 0] = 5.0  # bright outlier: clipped, the rest of image 1 unchanged
    pixels = mri_magnitude_images(image)
    assert pixels.shape == (2, 4, 4, 1)
    assert (pixels[0] == round(255 / MRI_DISPLAY_MAX)).all() and pixels[1, 0, 0, 0] == 255
    assert (pixels[1].reshape(-1)[1:] == round(255 / MRI_DISPLAY_MAX)).all()


def test_generate_bad_input(tmp_path, image_snapshots):
    msm_path, clean_path = image_snapshots
    out = tmp_path / "o"
    proc = run_cli(["generate.py", "--network", msm_path, "--outdir", str(out), "--subsets", "0"], check=False)
    assert proc.returncode != 0 and "--subsets K must be an integer >= 1, got 0." in proc.stderr
    proc = run_cli(["generate.py", "--network", clean_path, "--outdir", str(out), "--sampler", "msm"], check=False)
    assert proc.returncode != 0 and "has no measurement process" in proc.stderr
    proc = run_cli(["generate.py", "--network", msm_path, "--outdir", str(out), "--maps", "x.npy"], check=False)
    assert proc.returncode != 0 and "--maps applies only" in proc.stderr
    assert not out.exists()
    with pytest.raises(UserError, match="K must be an integer >= 1"):
        MSMAggregate(None, FullMask(), SeedGenerators([0]), 0)
