"""Mask laws: fractions, structure, ACS, effective acceleration, seeding, configs, coverage-aware draws."""

import pytest
import torch

from dnnlib import UserError
from training.masks import (
    BoxMaskLaw,
    EquispacedLineMaskLaw,
    FullMask,
    PixelMaskLaw,
    RandomLineMaskLaw,
    coverage_aware_masks,
    empty_coverage,
    mask_config,
    mask_law_from_config,
)

LAWS = [
    (BoxMaskLaw(0.4), (64, 64)),
    (BoxMaskLaw(0.25), (30, 22)),  # sizes not divisible by 4
    (PixelMaskLaw(0.4), (32, 32)),
    (RandomLineMaskLaw(4, 20), (256, 256)),
    (RandomLineMaskLaw(3, 5), (63, 63)),
    (EquispacedLineMaskLaw(4, 8), (64, 64)),
    (FullMask(), (16, 16)),
]


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("law,shape", LAWS, ids=[f"{law.kind}-{shape[0]}" for law, shape in LAWS])
def test_masks_are_binary_and_follow_their_expected_mask(law, shape):
    masks = law.sample(4000, shape, _gen(1))
    assert masks.shape == law.mask_shape(4000, shape) and masks.dtype == torch.float32
    assert bool(((masks == 0) | (masks == 1)).all())
    torch.testing.assert_close(masks * masks, masks, rtol=0, atol=0)  # P^2 = P
    # Per-entry observation frequency within 5 binomial standard deviations of the analytic E[P].
    expected = law.expected_mask(shape)[0]
    tolerance = 5 * (expected * (1 - expected) / 4000).sqrt() + 1e-6
    assert bool(((masks.mean(dim=0) - expected).abs() <= tolerance).all())
    assert abs(masks.mean().item() - law.observed_fraction(shape)) < 0.01


def test_box_law_structure_and_fraction():
    law = BoxMaskLaw(0.4)
    assert law.observed_fraction((64, 64)) == 0.625  # 6 of 16 cells dropped
    masks = law.sample(20, (64, 64), _gen(2))
    assert bool((masks.mean(dim=(1, 2, 3)) == 0.625).all())
    for mask in masks[:, 0]:
        # Some roll in 0..15 per axis makes the mask constant on the 16x16 blocks of a 4x4 grid.
        found = False
        for shift_rows in range(16):
            rows = mask.roll(-shift_rows, 0)
            if not bool((rows == rows[::16].repeat_interleave(16, 0)).all()):
                continue
            for shift_cols in range(16):
                unrolled = rows.roll(-shift_cols, 1)
                blocks = unrolled[::16, ::16]
                if bool((unrolled == blocks.repeat_interleave(16, 0).repeat_interleave(16, 1)).all()):
                    found = blocks.sum().item() == 10
        assert found
    assert masks.flatten(1).unique(dim=0).shape[0] == 20  # random cells and rolls


def test_line_laws_keep_acs_and_report_effective_acceleration():
    law = RandomLineMaskLaw(4, 20)
    masks = law.sample(500, (256, 256), _gen(3))[:, 0, 0]
    assert bool((masks[:, 128 - 10 : 128 + 10] == 1).all())  # ACS around the zero frequency column W // 2
    assert bool((masks.sum(dim=1) == 64).all())  # exactly round(W / R) lines per mask
    print(f"\nlines-random R=4 acs=20 W=256: effective R = {law.effective_acceleration(256):.3f}")
    assert law.effective_acceleration(256) == 4.0
    odd = RandomLineMaskLaw(3, 5).sample(50, (63, 63), _gen(4))[:, 0, 0]
    assert bool((odd[:, 29:34] == 1).all()) and abs(RandomLineMaskLaw(3, 5).effective_acceleration(63) - 3) < 1e-9
    assert RandomLineMaskLaw(8, 40).effective_acceleration(256) == pytest.approx(256 / 40)  # ACS dominate

    equi = EquispacedLineMaskLaw(4, 8)
    masks = equi.sample(200, (1, 64), _gen(5))[:, 0, 0]
    assert bool((masks[:, 28:36] == 1).all())
    outside_acs = masks.clone()
    outside_acs[:, 28:36] = 0
    for row in outside_acs:
        kept = row.nonzero()[:, 0]
        assert len(kept) == 14 and bool((kept % 4 == kept[0] % 4).all())  # one residue class mod R
    print(f"lines-equispaced R=4 acs=8 W=64: effective R = {equi.effective_acceleration(64):.3f}")
    assert equi.effective_acceleration(64) == pytest.approx(64 / 22)  # 16 equispaced + 8 ACS - 2 shared


def test_same_seed_same_mask_different_seeds_different_masks():
    for law, shape in LAWS[:-1]:
        torch.testing.assert_close(law.sample(8, shape, _gen(7)), law.sample(8, shape, _gen(7)), rtol=0, atol=0)
        assert not torch.equal(law.sample(8, shape, _gen(7)), law.sample(8, shape, _gen(8)))
        # `fixed` protocol: example i's mask depends only on (seed, i), not on the batch it is drawn in.
        batch = law.sample_for_examples([5, 9, 2], shape, seed=3)
        torch.testing.assert_close(batch[1:2], law.sample_for_examples(torch.tensor([9]), shape, seed=3))
        assert not torch.equal(batch[0], batch[1]) and not torch.equal(batch, law.sample_for_examples([5, 9, 2],
                                                                                                       shape, seed=4))


def test_configs_round_trip_and_bad_parameters_are_rejected():
    for law, shape in LAWS:
        rebuilt = mask_law_from_config(law.to_config())
        assert type(rebuilt) is type(law) and rebuilt.to_config() == law.to_config()
        torch.testing.assert_close(rebuilt.sample(3, shape, _gen(9)), law.sample(3, shape, _gen(9)))
    bad = [{"kind": "box", "p": 1.0}, {"kind": "pixel", "p": -0.1}, {"kind": "lines-random", "R": 0.5, "acs": 4},
           {"kind": "lines-equispaced", "R": 2.5, "acs": 4}, {"kind": "lines-random", "R": 4, "acs": -1},
           {"kind": "circle"}, {"kind": "box", "q": 0.4}, "box"]
    for config in bad:
        with pytest.raises(UserError):
            mask_law_from_config(config)
    with pytest.raises(UserError):
        RandomLineMaskLaw(4, 40).sample(1, (32, 32), _gen())  # more ACS lines than columns
    with pytest.raises(UserError):
        BoxMaskLaw(0.4).sample(1, (3, 8), _gen())


def test_mask_config_fills_in_the_defaults_of_every_tool():
    """The values are the documented defaults (README, train.py and dataset_tool.py help): R 4, fastMRI's 8% centre,
    p 0.4, ACS min(20, W // 8); what is given (not None) is kept."""
    assert mask_config("lines-random", 64) == {"kind": "lines-random", "R": 4.0, "acs": 8}
    assert mask_config("lines-equispaced", 256, {"R": 8, "acs": None}) == {"kind": "lines-equispaced", "R": 8,
                                                                           "acs": 20}
    assert mask_config("fastmri-random", 64, {"acs": 3}) == {"kind": "fastmri-random", "R": 4.0,
                                                             "center_fraction": 0.08}
    assert mask_config("pixel", 32, {"p": 0.2}) == {"kind": "pixel", "p": 0.2}
    assert mask_config("box", 32) == {"kind": "box", "p": 0.4} and mask_config("full", 32) == {"kind": "full"}
    for kind in ("box", "pixel", "lines-random", "lines-equispaced", "fastmri-random", "fastmri-equispaced", "full"):
        mask_law_from_config(mask_config(kind, 64))  # every default config is a valid law


@pytest.mark.parametrize("law,shape", LAWS[:-1], ids=[f"{law.kind}-{shape[0]}" for law, shape in LAWS[:-1]])
def test_coverage_aware_draws_cover_more_with_the_laws_density(law, shape):
    n, k = 300, 3
    covered = empty_coverage(law, n, shape)
    masks, record = coverage_aware_masks(law, k, shape, covered, _gen(10))
    assert masks.shape == (k, *law.mask_shape(n, shape)) and not covered.any()  # caller's record untouched
    independent = law.sample(k * n, shape, _gen(11)).reshape(masks.shape)
    aware_cover, independent_cover = masks.amax(dim=0).mean().item(), independent.amax(dim=0).mean().item()
    print(f"\n{law.kind} {shape}: K={k} coverage-aware {aware_cover:.4f} vs independent {independent_cover:.4f}; "
          f"density per mask {masks.mean().item():.4f} (law {law.observed_fraction(shape):.4f})")
    assert aware_cover > independent_cover
    if isinstance(law, (RandomLineMaskLaw, EquispacedLineMaskLaw)):
        # While uncovered lines remain, successive masks share no line outside the ACS: the best K masks can do.
        acs = law.expected_mask(shape)[0, 0, 0] == 1
        overlap = (masks.sum(dim=0) - masks.amax(dim=0))[..., ~acs]
        assert overlap.sum() == 0
    else:
        assert 1 - aware_cover <= 0.5 * (1 - independent_cover)  # at most half the entries missed
    assert abs(masks.mean().item() - law.observed_fraction(shape)) < 0.01  # the training law's density
    if isinstance(law, RandomLineMaskLaw):
        assert bool((masks.sum(dim=-1) == law.num_lines(shape[-1])).all())
    if isinstance(law, BoxMaskLaw) and shape == (64, 64):
        assert bool((masks.mean(dim=(2, 3, 4)) == 0.625).all())
        assert aware_cover > 0.99  # the second mask's dropped cells lie mostly in already covered area
    # The last mask is in the record, unless it completed the coverage and the record was reset to empty.
    kept = record.flatten(1).any(dim=1)
    assert bool((record | ~masks[-1].bool())[kept].all())


def test_coverage_record_resets_once_everything_is_covered():
    law, shape = PixelMaskLaw(0.4), (8, 8)
    covered = empty_coverage(law, 5, shape)
    masks, record = coverage_aware_masks(law, 1, shape, covered, _gen(12))
    torch.testing.assert_close(record, masks[0].bool())  # first mask: an ordinary draw, recorded
    first = record
    masks, record = coverage_aware_masks(law, 1, shape, first, _gen(13))
    union = first | masks[0].bool()
    complete = union.flatten(1).all(dim=1)
    # Each mask keeps ~60% of the entries, so the second one takes all the remaining ~40%: complete, record reset.
    assert bool(complete.all())
    assert not record.any()
    with pytest.raises(UserError):
        coverage_aware_masks(law, 1, shape, torch.zeros(5, 1, 8, 8), _gen())
