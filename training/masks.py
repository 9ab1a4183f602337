"""Mask laws (MSM.md section 5): random binary masks P on measurement entries, drawn with an explicit
`torch.Generator`, plus the coverage-aware draw used at sampling time.

Shapes: `shape` is the spatial size (H, W) of the measurement. Image laws ('box', 'pixel', 'full') return float
masks (n, 1, H, W), shared by the channels; line laws ('lines-random', 'lines-equispaced') return (n, 1, 1, W),
shared by coils and rows (phase-encode columns of a centred k-space, zero frequency at column W // 2).

Every law draws a mask in the same way: it splits the entries into units (box cells, pixels, columns, or groups of
equispaced columns), decides how many units to keep, and keeps the units of highest priority. The priority is a
uniform random number, so a plain draw keeps a uniformly random set of units; the coverage-aware draw adds to it the
fraction of each unit not yet covered, so it keeps uncovered units first and still follows the law's structure and
density (`coverage_aware_masks`).

Configs are JSON-able dicts ({'kind': 'box', 'p': 0.4}, {'kind': 'lines-random', 'R': 4, 'acs': 20}); snapshots record
them and `mask_law_from_config` rebuilds the law.
"""

import math

import numpy as np
import torch

from dnnlib import ConfigError, Field, UserError, check_fields

# Random tie-breaking weight: small enough that coverage always dominates, large enough to stay above float rounding.
_TIE_BREAK = 1e-3


def _select_top(priority: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Bool (n, U): for each row, the `count[row]` units of highest priority."""
    order = torch.argsort(priority, dim=1, descending=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(priority.shape[1], device=priority.device).expand_as(order))
    return rank < count[:, None]


def example_generator(seed: int, index: int) -> torch.Generator:
    """A CPU generator that depends only on (seed, index): the `fixed` protocol's per-example mask seed, identical
    across epochs, batch compositions and ranks. SeedSequence mixes the pair so nearby seeds give unrelated streams."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(index)]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)


class MaskLaw:
    """Base class. Subclasses set `kind` and implement `mask_shape(n, shape)`, `expected_mask(shape)` (E[P] per
    entry, float64 of the mask shape with n = 1: MSM's weights W = 1 / E[P] need it), `to_config()`, and a draw in
    two parts: `_randoms(n, shape, generator, device)`, every random number of n masks (a tuple of tensors with n
    rows), and `_select(randoms, shape, uncovered)`, the masks those numbers give (uncovered: float mask-shaped, 1
    where not yet covered). The split lets a batch whose rows have their own generators (one per seed or example)
    draw the few random numbers row by row (`row_randoms`) and select all masks in one vectorised call
    (`from_randoms`, `coverage_aware_select`), with the masks each row would get alone."""

    kind = ""
    is_line_law = False  # masks (n, 1, 1, W) of phase-encode columns, for k-space (MRI) measurements

    def centre_lines(self, width: int) -> int:
        """How many centre columns (`acs_columns(width, .)`) every mask keeps: what the intensity normalisation and
        ESPIRiT may read. 0 for laws without guaranteed centre lines."""
        return 0

    def sample(self, n: int, shape: tuple[int, int], generator: torch.Generator | None) -> torch.Tensor:
        """n independent masks from the law, float32 {0, 1} on the generator's device."""
        device = generator.device if generator is not None else None
        return self.from_randoms(self._randoms(n, shape, generator, device), shape)

    def row_randoms(self, shape: tuple[int, int], generators) -> tuple:
        """The random numbers of one mask per generator (row i from generators[i], as `sample(1, ...)` draws them),
        on the CPU."""
        return tuple(torch.cat(parts) for parts in zip(*(self._randoms(1, shape, g) for g in generators)))

    def from_randoms(self, randoms: tuple, shape: tuple[int, int]) -> torch.Tensor:
        """The masks (float32 {0, 1}) that random numbers from `_randoms` or `row_randoms` give, no coverage."""
        uncovered = torch.zeros(self.mask_shape(len(randoms[0]), shape), device=randoms[0].device)
        return self._select(randoms, shape, uncovered)

    def sample_for_examples(self, indices, shape: tuple[int, int], seed: int) -> torch.Tensor:
        """One mask per example index for the `fixed` protocol (CPU): mask i depends only on (seed, indices[i])."""
        indices = [int(i) for i in (indices.tolist() if torch.is_tensor(indices) else indices)]
        return self.from_randoms(self.row_randoms(shape, [example_generator(seed, i) for i in indices]), shape)

    def observed_fraction(self, shape: tuple[int, int]) -> float:
        """Expected fraction of observed entries, analytic."""
        return float(self.expected_mask(shape).mean())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.to_config()})"


class FullMask(MaskLaw):
    """Everything observed (P = I): oracle training, or a sanity check of the MSM sampler."""

    kind = "full"

    def mask_shape(self, n, shape):
        return (n, 1, *shape)

    def expected_mask(self, shape):
        return torch.ones(self.mask_shape(1, shape), dtype=torch.float64)

    def to_config(self):
        return {"kind": self.kind}

    def _randoms(self, n, shape, generator, device=None):
        return (torch.empty(n, 0, device=device),)  # no random numbers, one (empty) row per mask

    def _select(self, randoms, shape, uncovered):
        return torch.ones_like(uncovered)


def _check_drop_probability(name: str, p: float):
    if not (isinstance(p, (int, float)) and 0 <= p < 1):
        raise UserError(f"Mask law '{name}': p must be a number in [0, 1), got {p!r}.")


class BoxMaskLaw(MaskLaw):
    """Reference `random_box`: a 4x4 grid of cells, int(16 p) of them dropped (p = 0.4 drops 6, so 62.5% is observed),
    the whole mask rolled circularly by a random shift in 0..H/4-1 rows and 0..W/4-1 columns (a shift by a whole cell
    gives the same law, so this is the full range). When H or W is not divisible by 4, cell i spans rows
    [ceil(i H / 4), ceil((i+1) H / 4)), so cells differ by at most one row/column; every pixel still lies in exactly
    one cell, so each pixel is observed with probability exactly 1 - int(16 p) / 16."""

    kind = "box"
    grid = 4

    def __init__(self, p: float):
        _check_drop_probability(self.kind, p)
        self.p = float(p)
        self.num_dropped = int(self.grid**2 * self.p)

    def mask_shape(self, n, shape):
        return (n, 1, *shape)

    def expected_mask(self, shape):
        return torch.full(self.mask_shape(1, shape), 1 - self.num_dropped / self.grid**2, dtype=torch.float64)

    def to_config(self):
        return {"kind": self.kind, "p": self.p}

    def _randoms(self, n, shape, generator, device=None):
        height, width = shape
        if height < self.grid or width < self.grid:
            raise UserError(f"Mask law 'box' needs images of at least {self.grid}x{self.grid}, got {height}x{width}.")
        shift_rows = torch.randint(0, height // self.grid, (n, 1), generator=generator, device=device)
        shift_cols = torch.randint(0, width // self.grid, (n, 1), generator=generator, device=device)
        return shift_rows, shift_cols, torch.rand(n, self.grid**2, generator=generator, device=device)

    def _select(self, randoms, shape, uncovered):
        height, width = shape
        shift_rows, shift_cols, uniform = randoms
        n, device = len(uniform), uncovered.device
        priority = uniform * _TIE_BREAK
        # Cell of every pixel after the roll: rolling by s puts the pixel at h where pixel h - s was.
        rows = (torch.arange(height, device=device) - shift_rows) % height  # (n, H)
        cols = (torch.arange(width, device=device) - shift_cols) % width  # (n, W)
        cell = ((rows * self.grid) // height)[:, :, None] * self.grid + ((cols * self.grid) // width)[:, None, :]
        cell = cell.reshape(n, -1)
        uncovered_count = torch.zeros(n, self.grid**2, device=device).scatter_add_(1, cell, uncovered.reshape(n, -1))
        cell_size = torch.bincount(cell[0], minlength=self.grid**2)  # a roll permutes pixels, not cell sizes
        priority = priority + uncovered_count / cell_size
        count = torch.full((n,), self.grid**2 - self.num_dropped, device=device)
        keep = _select_top(priority, count)
        return keep.gather(1, cell).reshape(n, 1, height, width).to(torch.float32)


class PixelMaskLaw(MaskLaw):
    """Ambient-style dust: each entry dropped independently with probability p, shared across channels. Drawn as a
    Binomial(H W, 1 - p) count of entries kept, chosen uniformly (the same law as independent coin flips), so the
    coverage-aware draw can keep the count and choose uncovered entries first."""

    kind = "pixel"

    def __init__(self, p: float):
        _check_drop_probability(self.kind, p)
        self.p = float(p)

    def mask_shape(self, n, shape):
        return (n, 1, *shape)

    def expected_mask(self, shape):
        return torch.full(self.mask_shape(1, shape), 1 - self.p, dtype=torch.float64)

    def to_config(self):
        return {"kind": self.kind, "p": self.p}

    def _randoms(self, n, shape, generator, device=None):
        coins = torch.rand(n, shape[0] * shape[1], generator=generator, device=device)
        return coins, torch.rand(n, shape[0] * shape[1], generator=generator, device=device)

    def _select(self, randoms, shape, uncovered):
        coins, uniform = randoms
        count = (coins >= self.p).sum(dim=1)
        priority = uniform * _TIE_BREAK + uncovered.reshape(len(uniform), -1)
        return _select_top(priority, count).reshape(uncovered.shape).to(torch.float32)


# The defaults of the mask-law parameters: the one place train.py (its measurement), dataset_tool.py (undersampling)
# and reconstruct.py (the MRI task) take them from. The ACS width depends on the image width: `default_acs`.
DEFAULT_LAW = {"image": "box", "mri": "lines-random"}  # the law of each data kind when none is named
MASK_DEFAULTS = {
    "R": 4.0,  # acceleration of the line laws: fastMRI's standard 4x
    "center_fraction": 0.08,  # fastMRI laws: 8% of the columns at the centre, fastMRI's pair with 4x
    "p": 0.4,  # drop probability of the box and pixel laws
}
ACS_RULE = "min(20, W // 8)"  # `default_acs` in words, for help texts


def default_acs(width: int) -> int:
    """The default number of always-kept centre lines: min(20, W // 8) (20 at 256, as fastMRI's 4x masks; fewer for
    small test data)."""
    return min(20, width // 8)


def mask_config(kind: str, width: int, given: dict | None = None) -> dict:
    """The config of mask law `kind` (any but 'acquired') for images `width` columns wide: each parameter of the law
    as `given` ({name: value}, None or absent = not given), else at its default (MASK_DEFAULTS, `default_acs`)."""
    given = given or {}
    defaults = {**MASK_DEFAULTS, "acs": default_acs(width)}
    return {"kind": kind, **{name: defaults[name] if given.get(name) is None else given[name]
                             for name in _PARAMETERS[kind]}}


def acs_columns(width: int, acs: int, device=None) -> torch.Tensor:
    """Bool (W,): the `acs` centre columns [W//2 - acs//2, W//2 - acs//2 + acs), around the zero frequency of
    the centred FFT (column W // 2, for odd W too)."""
    start = width // 2 - acs // 2
    columns = torch.arange(width, device=device)
    return (columns >= start) & (columns < start + acs)


class _LineMaskLaw(MaskLaw):
    """Cartesian phase-encode lines with `acs` always-kept centre columns at nominal acceleration R."""

    is_line_law = True

    def __init__(self, R: float, acs: int):
        if not (isinstance(R, (int, float)) and R >= 1):
            raise UserError(f"Mask law '{self.kind}': the acceleration R must be a number >= 1, got {R!r}.")
        if int(acs) != acs or acs < 0:
            raise UserError(f"Mask law '{self.kind}': acs must be a non-negative integer, got {acs!r}.")
        self.R, self.acs = R, int(acs)

    def _check_width(self, width: int):
        if self.acs > width:
            raise UserError(f"Mask law '{self.kind}': acs = {self.acs} centre lines exceed the {width} columns.")

    def mask_shape(self, n, shape):
        return (n, 1, 1, shape[-1])

    def centre_lines(self, width: int) -> int:
        return self.acs

    def to_config(self):
        return {"kind": self.kind, "R": self.R, "acs": self.acs}

    def effective_acceleration(self, width: int) -> float:
        """W / expected number of kept columns: the acceleration the masks really have."""
        return 1 / self.observed_fraction((1, width))


class RandomLineMaskLaw(_LineMaskLaw):
    """`acs` centre columns plus max(round(W / R) - acs, 0) further columns drawn uniformly without replacement, so
    every mask has exactly max(round(W / R), acs) lines and the effective acceleration is W / that (close to R,
    unlike the reference's 1/R extra lines on top of the ACS)."""

    kind = "lines-random"

    def num_lines(self, width: int) -> int:
        self._check_width(width)
        return max(math.floor(width / self.R + 0.5), self.acs)

    def expected_mask(self, shape):
        width = shape[-1]
        acs = acs_columns(width, self.acs)
        extra = (self.num_lines(width) - self.acs) / max(width - self.acs, 1)
        expected = torch.full((width,), extra, dtype=torch.float64)
        expected[acs] = 1.0
        return expected.reshape(1, 1, 1, width)

    def _randoms(self, n, shape, generator, device=None):
        return (torch.rand(n, shape[-1], generator=generator, device=device),)

    def _select(self, randoms, shape, uncovered):
        (uniform,) = randoms
        width, device, n = shape[-1], uncovered.device, len(uniform)
        count = torch.full((n,), self.num_lines(width), device=device)
        priority = uniform * _TIE_BREAK + uncovered.reshape(n, width)
        priority = priority + 2 * acs_columns(width, self.acs, device)  # ACS first, always
        return _select_top(priority, count).reshape(n, 1, 1, width).to(torch.float32)


class EquispacedLineMaskLaw(_LineMaskLaw):
    """Every R-th column from a random offset o in 0..R-1 (columns w with w % R == o), plus the `acs` centre
    columns. R must be an integer no larger than W."""

    kind = "lines-equispaced"

    def __init__(self, R: float, acs: int):
        super().__init__(R, acs)
        if int(self.R) != self.R:
            raise UserError(f"Mask law '{self.kind}': R must be an integer, got {R!r}.")
        self.R = int(self.R)

    def _groups(self, width: int, device=None) -> torch.Tensor:
        """Bool (R, W): the columns kept with each offset, ACS included."""
        self._check_width(width)
        if self.R > width:
            raise UserError(f"Mask law '{self.kind}': R = {self.R} exceeds the {width} columns.")
        columns = torch.arange(width, device=device)
        offsets = torch.arange(self.R, device=device)
        return (columns[None, :] % self.R == offsets[:, None]) | acs_columns(width, self.acs, device)

    def expected_mask(self, shape):
        return self._groups(shape[-1]).to(torch.float64).mean(dim=0).reshape(1, 1, 1, -1)

    def _randoms(self, n, shape, generator, device=None):
        return (torch.rand(n, len(self._groups(shape[-1])), generator=generator, device=device),)

    def _select(self, randoms, shape, uncovered):
        (uniform,) = randoms
        width, device, n = shape[-1], uncovered.device, len(uniform)
        groups = self._groups(width, device).to(torch.float32)  # (R, W)
        uncovered_fraction = uncovered.reshape(n, width) @ groups.T / groups.sum(dim=1)  # (n, R)
        priority = uniform * _TIE_BREAK + uncovered_fraction
        offset = priority.argmax(dim=1)
        return groups[offset].reshape(n, 1, 1, width)


# ----------------------------------------------------------------------------
# fastMRI's retrospective mask functions (facebookresearch/fastMRI fastmri/data/subsample.py, RandomMaskFunc and
# EquispacedMaskFunc) as laws, so results on fully sampled data compare with published fastMRI numbers. Their centre
# block is n = round(W * center_fraction) columns starting at (W - n + 1) // 2, which is `acs_columns(W, n)` for
# even W (fastMRI's widths: 320, 368, 372, ...); odd widths are refused rather than shifted by one.


def fastmri_centre_lines(width: int, center_fraction: float) -> int:
    """fastMRI's num_low_freqs: round(W * center_fraction) (Python's round, as fastMRI)."""
    return int(round(width * center_fraction))


class _FastMRILaw:
    """What fastMRI's two mask functions share: (center_fraction, R) checked, the centre block, the config."""

    is_line_law = True

    def __init__(self, R: float, center_fraction: float):
        if not (isinstance(R, (int, float)) and R > 1):
            raise UserError(f"Mask law '{self.kind}': the acceleration R must be a number > 1, got {R!r}.")
        if not (isinstance(center_fraction, (int, float)) and 0 < center_fraction < 1 / R):
            raise UserError(f"Mask law '{self.kind}': center_fraction must lie in (0, 1 / R) = (0, {1 / R:g}) so that "
                            f"R = {R:g} leaves lines to draw, got {center_fraction!r}.")
        self.R, self.center_fraction = float(R), float(center_fraction)

    def centre_lines(self, width: int) -> int:
        if width % 2:
            raise UserError(f"Mask law '{self.kind}' is defined here for an even number of columns, got {width}.")
        return fastmri_centre_lines(width, self.center_fraction)

    def mask_shape(self, n, shape):
        return (n, 1, 1, shape[-1])

    def to_config(self):
        return {"kind": self.kind, "R": self.R, "center_fraction": self.center_fraction}


class _IndependentLineLaw(MaskLaw):
    """Columns kept independently with probabilities `frequencies(width)` (1 = always kept). A plain draw keeps
    exactly the columns whose uniform coin falls below their frequency; the coverage-aware draw keeps as many columns
    (same count law) but takes uncovered columns of nonzero frequency first, never a column of frequency 0."""

    is_line_law = True

    def mask_shape(self, n, shape):
        return (n, 1, 1, shape[-1])

    def expected_mask(self, shape):
        return self.frequencies(shape[-1]).reshape(1, 1, 1, -1)

    def _randoms(self, n, shape, generator, device=None):
        self.frequencies(shape[-1])  # refuses a width the law does not fit
        return (torch.rand(n, shape[-1], generator=generator, device=device),
                torch.rand(n, shape[-1], generator=generator, device=device))

    def _select(self, randoms, shape, uncovered):
        coins, uniform = randoms
        width, n = shape[-1], len(coins)
        frequencies = self.frequencies(width).to(device=coins.device, dtype=torch.float32)
        hits = (coins < frequencies).to(torch.float32)
        possible = (frequencies > 0).to(torch.float32)
        # Without coverage the top `count` priorities are exactly the hits (always-kept 5.5, hits 1.5, others <= 0.5);
        # uncovered possible columns (>= 2.5) come before the other hits when there is coverage to gain.
        priority = (4 * (frequencies >= 1) + 2 * uncovered.reshape(n, width) * possible + hits + 0.5 * possible
                    + uniform * _TIE_BREAK)
        return _select_top(priority, hits.sum(dim=1)).reshape(n, 1, 1, width).to(torch.float32)


class FastMRIRandomMaskLaw(_FastMRILaw, _IndependentLineLaw):
    """fastMRI's RandomMaskFunc with one (center_fraction, acceleration): the n centre columns, and every other column
    independently with probability (W / R - n) / (W - n), so E[lines] = W / R exactly (the count varies)."""

    kind = "fastmri-random"

    def frequencies(self, width: int) -> torch.Tensor:
        n = self.centre_lines(width)
        frequencies = torch.full((width,), (width / self.R - n) / (width - n), dtype=torch.float64)
        frequencies[acs_columns(width, n)] = 1.0
        return frequencies


class FastMRIEquispacedMaskLaw(_FastMRILaw, EquispacedLineMaskLaw):
    """fastMRI's EquispacedMaskFunc: the n centre columns, plus the columns round(offset + k a) < W - 1 for the
    adjusted spacing a = R (n - W) / (n R - W), with the offset uniform in 0..round(a) - 1; a is not an integer,
    so the lines are only nearly equispaced and their count depends on the offset (fastMRI keeps this to match the
    public multi-coil data). One group per offset, as `EquispacedLineMaskLaw`."""

    kind = "fastmri-equispaced"

    def _groups(self, width, device=None):
        n = self.centre_lines(width)
        spacing = self.R * (n - width) / (n * self.R - width)
        groups = torch.zeros(round(spacing), width, dtype=torch.bool)
        for offset in range(len(groups)):
            groups[offset, np.around(np.arange(offset, width - 1, spacing)).astype(np.int64)] = True
        return (groups | acs_columns(width, n)).to(device)


# ----------------------------------------------------------------------------
# Acquired masks: the law of real undersampled data, recorded by the fastMRI converter from the masks it stored.

MAX_ACQUIRED_WIDTH = 8192
MAX_ACQUIRED_MASKS = 100_000


class AcquiredMaskLaw(_IndependentLineLaw):
    """The empirical law of a dataset's acquired line masks, for sampling (training uses each record's own mask).

    frequencies: the fraction of records that acquired each column (E[P] of the data, which MSM's weights
    W = 1 / E[P] need); acs: the centre columns every record acquired; masks / counts: the distinct acquired masks
    as '0'/'1' strings and how many records have each. draw 'frequencies' (default) keeps each column independently
    with its frequency (the same E[P], not the same joint law: the line count varies); draw 'masks' picks one of the
    acquired masks, with probability proportional to its count (the data's joint law exactly; the coverage-aware
    draw picks the one that covers most uncovered columns)."""

    kind = "acquired"
    DRAWS = ("frequencies", "masks")

    def __init__(self, frequencies: list, acs: int, masks: list, counts: list, draw: str = "frequencies"):
        if not (isinstance(frequencies, list) and 1 <= len(frequencies) <= MAX_ACQUIRED_WIDTH
                and all(isinstance(f, (int, float)) and not isinstance(f, bool) and 0 <= f <= 1 for f in frequencies)):
            raise UserError(f"Mask law 'acquired': frequencies must be a list of 1 to {MAX_ACQUIRED_WIDTH} numbers in "
                            "[0, 1].")
        width = len(frequencies)
        if not (isinstance(masks, list) and isinstance(counts, list) and 1 <= len(masks) == len(counts)
                <= MAX_ACQUIRED_MASKS and all(isinstance(m, str) and len(m) == width and set(m) <= {"0", "1"}
                                              for m in masks)
                and all(isinstance(c, int) and not isinstance(c, bool) and c >= 1 for c in counts)):
            raise UserError(f"Mask law 'acquired': masks must be 1 to {MAX_ACQUIRED_MASKS} strings of {width} '0'/'1' "
                            "characters with as many positive integer counts.")
        if draw not in self.DRAWS:
            raise UserError(f"Mask law 'acquired': draw must be one of {', '.join(self.DRAWS)}, got {draw!r:.40}.")
        if not (isinstance(acs, int) and 0 <= acs <= width):
            raise UserError(f"Mask law 'acquired': acs must be an integer in [0, {width}], got {acs!r:.40}.")
        self._frequencies = torch.tensor(frequencies, dtype=torch.float64)
        self._masks = torch.tensor([[c == "1" for c in m] for m in masks], dtype=torch.bool)
        self._counts = torch.tensor(counts, dtype=torch.float64)
        self._config = {"frequencies": list(frequencies), "acs": acs, "masks": list(masks), "counts": list(counts),
                        "draw": draw}
        self.acs, self.draw = acs, draw
        if not self._masks[:, acs_columns(width, acs)].all():
            raise UserError(f"Mask law 'acquired': not every mask keeps the {acs} centre lines (acs).")

    @classmethod
    def from_masks(cls, masks: np.ndarray, acs: int, draw: str = "frequencies") -> "AcquiredMaskLaw":
        """The law of the acquired masks (N, W) {0, 1} of a dataset's records."""
        masks = np.asarray(masks) > 0
        distinct, counts = np.unique(masks, axis=0, return_counts=True)
        return cls([float(f) for f in masks.mean(axis=0)], int(acs),
                   ["".join("1" if v else "0" for v in m) for m in distinct], [int(c) for c in counts], draw)

    def _check_width(self, width: int):
        if width != len(self._frequencies):
            raise UserError(f"Mask law 'acquired' holds masks of {len(self._frequencies)} columns; the data have "
                            f"{width}.")

    def frequencies(self, width: int) -> torch.Tensor:
        self._check_width(width)
        return self._frequencies

    def centre_lines(self, width: int) -> int:
        return self.acs

    def to_config(self):
        return {"kind": self.kind, **self._config}

    def _randoms(self, n, shape, generator, device=None):
        if self.draw == "frequencies":
            return super()._randoms(n, shape, generator, device)
        self._check_width(shape[-1])
        return (torch.rand(n, len(self._masks), generator=generator, device=device),)

    def _select(self, randoms, shape, uncovered):
        if self.draw == "frequencies":
            return super()._select(randoms, shape, uncovered)
        (uniform,) = randoms
        n, device = len(uniform), uniform.device
        masks = self._masks.to(device=device, dtype=torch.float32)  # (M, W)
        uncovered_fraction = uncovered.reshape(n, -1) @ masks.T / masks.sum(dim=1).clamp(min=1)  # (n, M)
        # u ** (1 / count) is largest for mask m with probability count_m / sum(counts) (Efraimidis-Spirakis).
        weighted = uniform.to(torch.float64) ** (1 / self._counts.to(device))
        offset = (weighted.to(torch.float32) * _TIE_BREAK + uncovered_fraction).argmax(dim=1)
        return masks[offset].reshape(n, 1, 1, -1)


_LAWS = {law.kind: law for law in (FullMask, BoxMaskLaw, PixelMaskLaw, RandomLineMaskLaw, EquispacedLineMaskLaw,
                                      FastMRIRandomMaskLaw, FastMRIEquispacedMaskLaw, AcquiredMaskLaw)}
MASK_KINDS = tuple(_LAWS)


# The parameters of each law and their JSON types; the laws' constructors check the ranges.
_PARAMETERS = {
    "full": {},
    "box": {"p": Field("float", required=True)},
    "pixel": {"p": Field("float", required=True)},
    "lines-random": {"R": Field("float", required=True), "acs": Field("int", required=True)},
    "lines-equispaced": {"R": Field("float", required=True), "acs": Field("int", required=True)},
    "fastmri-random": {"R": Field("float", required=True), "center_fraction": Field("float", required=True)},
    "fastmri-equispaced": {"R": Field("float", required=True), "center_fraction": Field("float", required=True)},
    # Lists the constructor checks element by element (sizes bounded there, before any tensor is built).
    "acquired": {"frequencies": Field("json", required=True), "acs": Field("int", required=True),
                 "masks": Field("json", required=True), "counts": Field("json", required=True),
                 "draw": Field("str", choices=AcquiredMaskLaw.DRAWS)},
}


def mask_law_from_config(config: dict, where: str = "mask") -> MaskLaw:
    """Inverse of `MaskLaw.to_config`, from an explicit table of laws and their parameters (types and ranges checked
    before anything is built); raises UserError naming the bad kind or parameter (ConfigError with the field at
    dotted place `where` for a config that is not a dict of known keys and types)."""
    kind = config.get("kind") if isinstance(config, dict) else None
    if kind not in _LAWS:
        shown = kind if isinstance(config, dict) else config
        raise ConfigError(f"{where}.kind", f"names an unknown mask law {shown!r:.60}; expected one of "
                          f"{', '.join(MASK_KINDS)}")
    check_fields(config, {"kind": Field("str", required=True), **_PARAMETERS[kind]}, where)
    return _LAWS[kind](**{key: value for key, value in config.items() if key != "kind"})


def with_acquired_draw(law: MaskLaw, draw: str | None, where: str = "--acquired-draw") -> MaskLaw:
    """The law with its draw switched ('frequencies' or 'masks', AcquiredMaskLaw), for sampling; `law` itself when
    draw is None. Only an acquired law has draws to choose between."""
    if draw is None:
        return law
    if law.kind != "acquired":
        raise UserError(f"{where} applies to models trained on acquired masks (mask law 'acquired'), not {law.kind}.")
    return AcquiredMaskLaw(**{**{k: v for k, v in law.to_config().items() if k != "kind"}, "draw": draw})


# ----------------------------------------------------------------------------
# Coverage-aware draws for sampling (MSM.md section 5).


def empty_coverage(law: MaskLaw, n: int, shape: tuple[int, int], device=None) -> torch.Tensor:
    """A fresh coverage record: bool, the law's mask shape, nothing covered."""
    return torch.zeros(law.mask_shape(n, shape), dtype=torch.bool, device=device)


def coverage_aware_masks(
    law: MaskLaw, k: int, shape: tuple[int, int], covered: torch.Tensor, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """k successive masks per batch element, each preferring entries not yet covered.

    covered: bool record of the law's mask shape (n, 1, H, W) or (n, 1, 1, W), held by the caller across calls
    (start with `empty_coverage`). Each mask has the law's structure and size (the same cells, pixel count, lines,
    ACS and roll law as a plain draw) but keeps the units with the most uncovered entries first, ties broken at
    random. After each mask the record is updated, and an element whose record becomes complete starts again from
    an empty record. Returns (masks (k, n, ...) float32, updated record); the input record is not modified.
    The random numbers of the k masks are drawn in turn from `generator` (`coverage_aware_select` then picks them).
    """
    randoms = [law._randoms(covered.shape[0], shape, generator, covered.device) for _ in range(k)]
    return coverage_aware_select(law, randoms, shape, covered)


def coverage_aware_select(law: MaskLaw, randoms: list[tuple], shape: tuple[int, int],
                          covered: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`coverage_aware_masks` from the random numbers of its k masks, drawn beforehand: randoms[j] is
    `law._randoms(n, ...)` of mask j, whose row i may come from element i's own generator (the MSM samplers draw
    them per seed), so this selection is a few tensor operations on the whole batch whatever its generators."""
    if covered.dtype != torch.bool or tuple(covered.shape[1:]) != law.mask_shape(1, shape)[1:]:
        raise UserError(f"coverage_aware_masks: the record must be bool of shape {law.mask_shape('n', shape)}, "
                        f"got {covered.dtype} {tuple(covered.shape)}.")
    masks = []
    for mask_randoms in randoms:
        mask = law._select(mask_randoms, shape, (~covered).to(torch.float32))
        covered = covered | mask.bool()
        complete = covered.flatten(1).all(dim=1).reshape(-1, *([1] * (covered.ndim - 1)))
        covered = covered & ~complete
        masks.append(mask)
    return torch.stack(masks), covered
