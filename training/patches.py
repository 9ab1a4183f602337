"""Patch priors (Patch-Diffusion training, PaDIS inference; SEED_METHODS.md section 4): a network trained on random
patches of a padded canvas with positional channels, and the whole-image network stitched from it.

- `CanvasGeometry`: the canvas the positions refer to. A W x W image padded by P on every side with `pad_value`
  gives the N x N canvas, N = W + 2P. Position channels over the canvas: channel 0 the column, channel 1 the row,
  X = (j / (N - 1) - 1/2) 2, so the corners are +-1 (`crop_coordinates` for a crop, `coordinate_map` for the whole
  canvas; both give the same numbers). 'fourier:F' appends sin / cos(2^k pi X) and sin / cos(2^k pi Y), k < F.
  The geometry is stored in the snapshot config (section 'patches'), so inference never guesses it (PaDIS's README
  trains on a 64-pixel pad and infers with 24: every position shifts).
- `PatchLaw`: which patch size a training step uses (`--patch-sizes` with `--patch-probs`, or Patch-Diffusion's
  `--real-p` rule ((1-p) 2/5, (1-p) 3/5, p) for three sizes) and the per-size batch multiplier (`--patch-muls`: crops
  per image). One size per optimizer step, drawn from (seed, step), so every rank and a resumed run agree without
  communicating. The kimg of a run count the patches trained on (batch x multiplier per step).
- `crop_batch`: the training batch of one step: every image (EDM loss) or measurement and its mask together (MSM loss,
  image-space masks: a patch sees a partial measurement of itself) padded to the canvas and cropped `mul` times at
  uniform random corners drawn from the run's generator, with the crops' coordinates.
- `StitchedNetwork`: a whole-image network made of the patch network (PaDIS, denoise_padding.py): pad the W x W input
  to the canvas, cut it into a K x K grid of non-overlapping p x p tiles shifted by a fresh random offset per call and
  per row, run all tiles with their coordinate crops in chunks of `patch_batch`, and put the tile outputs back on the
  central W x W region. Overlap mode instead averages a fixed grid of stride p // 2 (weights 1 / count sum to one).
  Every solver, conditioning and guidance term drives it through the usual denoiser wrappers.

Cover condition (`tile_grid`): tile origins {0, p, ..., (K - 1) p} + a per axis must cover the central region
[P, P + W) and stay inside the canvas [0, N): a <= P and a + K p >= P + W, a >= 0 and a + K p <= N. Some a exists
exactly when W <= K p <= W + 2P; then a is uniform over [max(0, W + P - K p), min(P, W + 2P - K p)], and K is chosen
(among those allowed) to make that range widest: K p = W + P, a in [0, P] when p divides W + P (PaDIS's W = 256,
p = 56, P = 24: K = 5).

The pad ring. Training pads the clean canvas before the loss adds noise, so the network has seen the ring as
`pad_value` plus the step's noise; the stitched network therefore fills the ring with pad_value + sigma n (n from the
seed's own stream) at every call and never returns it: the state of a solver is the W x W image, so the ring is reset
at every call by construction (PaDIS resets it to its noiseless value, which training never showed).
"""

import math
import re

import numpy as np
import torch
import torch.nn.functional as F

from dnnlib import ConfigError, Field, UserError, check_fields
from training.networks import image_and_sigma

ASSEMBLIES = ("tile", "overlap")
_SHIFT_STREAM_SALT = 0x9A7C  # keeps the per-seed shift streams apart from the seeds' noise and mask streams
_SIZE_STREAM_SALT = 0x51CE  # the per-step patch-size draws of training


def position_channels(encoding: str) -> int:
    """'xy' -> 2; 'fourier:F' -> 2 + 4F (X, Y and sin / cos of 2^k pi X and Y for k < F)."""
    m = re.fullmatch(r"xy|fourier:(\d+)", str(encoding))
    if m is None or (m.group(1) is not None and not 1 <= int(m.group(1)) <= 8):
        raise UserError(f"--pos-enc must be xy or fourier:F with F in 1..8, got {encoding!r}.")
    return 2 + 4 * int(m.group(1) or 0)


class CanvasGeometry:
    """The padded canvas of a patch prior: image_size W, pad_width P, canvas N = W + 2P, the position encoding and
    the value the pad holds (module docstring)."""

    def __init__(self, image_size: int, pad_width: int = 0, encoding: str = "xy", pad_value: float = 0.0):
        if not (isinstance(image_size, int) and image_size >= 1):
            raise UserError(f"The image size of a patch prior must be an integer >= 1, got {image_size!r}.")
        if not (isinstance(pad_width, int) and pad_width >= 0):
            raise UserError(f"--pad-width must be an integer >= 0, got {pad_width!r}.")
        if image_size + 2 * pad_width < 2:
            raise UserError("A 1-pixel canvas has no coordinates (they are normalised by N - 1); use --pad-width 1.")
        if not math.isfinite(pad_value):
            raise UserError(f"The pad value must be finite, got {pad_value!r}.")
        self.position_channels = position_channels(encoding)
        self.image_size, self.pad_width, self.encoding = image_size, pad_width, encoding
        self.pad_value = float(pad_value)
        self.canvas = image_size + 2 * pad_width

    def to_config(self) -> dict:
        return {"image_size": self.image_size, "pad_width": self.pad_width, "encoding": self.encoding,
                "pad_value": self.pad_value}

    def __eq__(self, other) -> bool:
        return isinstance(other, CanvasGeometry) and self.to_config() == other.to_config()

    def describe(self) -> str:
        return (f"{self.image_size} px images padded by {self.pad_width} (canvas {self.canvas}, pad value "
                f"{self.pad_value:g}), positions {self.encoding}")

    def check_same(self, other: "CanvasGeometry", what: str):
        """Refuse `other` (what the caller was given, named by `what`) unless it is this geometry."""
        if other != self:
            raise UserError(f"{what} has the canvas geometry {other.describe()}, but the patch prior was trained "
                            f"on {self.describe()}; positions would not mean what they meant in training.")

    def encode(self, xy: torch.Tensor) -> torch.Tensor:
        """Raw coordinates (N, 2, h, w) -> the network's position channels (N, position_channels, h, w)."""
        frequencies = (self.position_channels - 2) // 4
        if frequencies == 0:
            return xy
        angles = torch.cat([xy * (math.pi * 2**k) for k in range(frequencies)], dim=1)
        return torch.cat([xy, angles.sin(), angles.cos()], dim=1)

    def crop_coordinates(self, top: torch.Tensor, left: torch.Tensor, size: int) -> torch.Tensor:
        """Position channels (n, position_channels, size, size) of the crops with corners (top[i], left[i]) of the
        canvas, from the formula X = ((left + col) / (N - 1) - 1/2) 2 (channel 0), Y likewise with top + row."""
        offsets = torch.arange(size, device=top.device, dtype=torch.float64)
        cols = (left.to(torch.float64)[:, None] + offsets) / (self.canvas - 1)  # (n, size)
        rows = (top.to(torch.float64)[:, None] + offsets) / (self.canvas - 1)
        x = ((cols - 0.5) * 2)[:, None, :].expand(-1, size, -1)
        y = ((rows - 0.5) * 2)[:, :, None].expand(-1, -1, size)
        return self.encode(torch.stack([x, y], dim=1).to(torch.float32))

    def coordinate_map(self, device="cpu") -> torch.Tensor:
        """The position channels of the whole canvas (1, position_channels, N, N): linspace(-1, 1, N) along columns
        (channel 0) and rows (channel 1)."""
        line = torch.linspace(-1, 1, self.canvas, dtype=torch.float64, device=device)
        xy = torch.stack([line[None, :].expand(self.canvas, -1), line[:, None].expand(-1, self.canvas)])
        return self.encode(xy[None].to(torch.float32))

    def pad(self, x: torch.Tensor, value: float | None = None) -> torch.Tensor:
        """(n, C, W, W) -> (n, C, N, N) with the ring set to `value` (default: the pad value)."""
        p = self.pad_width
        return F.pad(x, (p, p, p, p), value=self.pad_value if value is None else value)


class PatchLaw:
    """Training patch sizes, the probability of each, and the per-size batch multiplier (crops per image)."""

    def __init__(self, sizes, probs, muls):
        sizes, probs, muls = list(sizes), [float(p) for p in probs], list(muls)
        if not sizes or len(set(sizes)) != len(sizes):
            raise UserError(f"--patch-sizes must list distinct sizes, got {sizes}.")
        if len(probs) != len(sizes) or len(muls) != len(sizes):
            raise UserError(f"--patch-probs and --patch-muls need one value per patch size ({len(sizes)}), got "
                            f"{len(probs)} and {len(muls)}.")
        if not all(isinstance(m, int) and m >= 1 for m in muls):
            raise UserError(f"--patch-muls must be integers >= 1, got {muls}.")
        if not all(math.isfinite(p) and p >= 0 for p in probs) or abs(sum(probs) - 1) > 1e-6:
            raise UserError(f"--patch-probs must be probabilities that sum to 1, got {probs}.")
        self.sizes, self.probs, self.muls = sizes, probs, muls

    @classmethod
    def from_options(cls, sizes: list[int], probs: list[float] | None, real_p: float | None,
                     muls: list[int] | None) -> "PatchLaw":
        """--patch-sizes with --patch-probs, or --real-p (three sizes, Patch-Diffusion's rule; the default 0.5 for
        three sizes), or uniform probabilities for another number of sizes."""
        if probs is not None and real_p is not None:
            raise UserError("Give either --patch-probs or --real-p, not both.")
        if probs is None:
            if len(sizes) == 3:
                p = 0.5 if real_p is None else real_p
                if not 0 <= p <= 1:
                    raise UserError(f"--real-p must lie in [0, 1], got {p}.")
                probs = [(1 - p) * 2 / 5, (1 - p) * 3 / 5, p]
            elif real_p is not None:
                raise UserError(f"--real-p is Patch-Diffusion's rule for three patch sizes, but --patch-sizes lists "
                                f"{len(sizes)}; give --patch-probs.")
            else:
                probs = [1 / len(sizes)] * len(sizes)
        return cls(sizes, probs, muls if muls is not None else [1] * len(sizes))

    def to_config(self) -> dict:
        return {"sizes": self.sizes, "probs": self.probs, "muls": self.muls}

    def step_choice(self, seed: int, step: int) -> tuple[int, int]:
        """(patch size, multiplier) of optimizer step `step` of a run with this seed: a pure function of both."""
        state = np.random.SeedSequence([seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF, step, _SIZE_STREAM_SALT])
        u = np.random.default_rng(state).random()
        index = min(int(np.searchsorted(np.cumsum(self.probs), u, side="right")), len(self.sizes) - 1)
        while self.probs[index] == 0:  # u at a cumulative boundary of a zero-probability size
            index -= 1
        return self.sizes[index], self.muls[index]

    def mean_multiplier(self) -> float:
        return sum(p * m for p, m in zip(self.probs, self.muls))


_PATCH_FIELDS = {"image_size": Field("int", 1, 65536, required=True), "pad_width": Field("int", 0, 65536),
                 "encoding": Field("str"), "pad_value": Field("float"), "sizes": Field("ints", 1, 65536),
                 "probs": Field("json"), "muls": Field("ints", 1, 65536)}


def patch_config(geometry: CanvasGeometry, law: PatchLaw) -> dict:
    """The 'patches' section of training_options.json and of snapshot configs."""
    return {**geometry.to_config(), **law.to_config()}


def from_patch_config(config: dict, where: str = "patches") -> tuple[CanvasGeometry, PatchLaw]:
    """Inverse of `patch_config`, every field checked (ConfigError naming it); sizes must fit the canvas."""
    check_fields(config, _PATCH_FIELDS, where)
    for name in ("sizes", "probs", "muls"):
        if name not in config:
            raise ConfigError(f"{where}.{name}", "is missing")
    probs = config["probs"]
    if not (isinstance(probs, list) and all(isinstance(p, (int, float)) and not isinstance(p, bool) for p in probs)):
        raise ConfigError(f"{where}.probs", "must be a list of numbers")
    try:
        geometry = CanvasGeometry(config["image_size"], config.get("pad_width", 0), config.get("encoding", "xy"),
                                  config.get("pad_value", 0.0))
        law = PatchLaw(config["sizes"], probs, config["muls"])
        check_sizes(law.sizes, geometry)
    except UserError as e:
        raise ConfigError(where, f"is not valid ({str(e).rstrip('.')})") from e
    return geometry, law


def check_sizes(sizes: list[int], geometry: CanvasGeometry, divisor: int = 1):
    """Training patch sizes must fit the canvas and be halvable by every level of the UNet (`divisor`)."""
    for p in sizes:
        if not 1 <= p <= geometry.canvas:
            raise UserError(f"--patch-sizes {p} does not fit the canvas: {geometry.image_size} px images padded by "
                            f"{geometry.pad_width} give a {geometry.canvas} px canvas.")
        if p % divisor:
            raise UserError(f"--patch-sizes {p} is not divisible by {divisor}, which the network's levels need "
                            f"(2^(levels - 1) for --cres with {int(math.log2(divisor)) + 1} entries).")


# ----------------------------------------------------------------------------------------------------------------------
# Training crops.


def _crop(canvas: torch.Tensor, top: torch.Tensor, left: torch.Tensor, size: int) -> torch.Tensor:
    """(n, C, N, N) canvases and corners (n,) -> (n, C, size, size) crops."""
    offsets = torch.arange(size, device=canvas.device)
    rows = (top.to(canvas.device)[:, None] + offsets)[:, :, None]  # (n, size, 1)
    cols = (left.to(canvas.device)[:, None] + offsets)[:, None, :]  # (n, 1, size)
    index = torch.arange(len(canvas), device=canvas.device)[:, None, None]
    return canvas.permute(0, 2, 3, 1)[index, rows, cols].permute(0, 3, 1, 2)


def crop_batch(batch: dict, geometry: CanvasGeometry, size: int, mul: int,
               generator: torch.Generator) -> tuple[dict, torch.Tensor]:
    """A step's training batch -> (the batch of patches, their position channels (mul n, C_pos, size, size)).

    Every example is padded to the canvas and cropped `mul` times at corners uniform over [0, N - size]^2 from
    `generator`; row k n + i of the result is crop k of example i. Keys: 'image' (EDM loss) or 'y' with its image-space
    'mask' (MSM loss; both cropped at the same place, the ring counted as observed: its pad value is known exactly),
    'label' repeated; other entries are dropped (no loss needs them on patches)."""
    key = "image" if "image" in batch else "y"
    data = batch[key]
    n = data.shape[0]
    if data.is_complex() or data.shape[-2:] != (geometry.image_size, geometry.image_size):
        raise ValueError(f"patch training needs real images of {geometry.image_size} px, got {tuple(data.shape)} "
                         f"{data.dtype}")
    top, left = torch.randint(0, geometry.canvas - size + 1, (2, mul * n), generator=generator,
                              device=generator.device).to(data.device)
    out = {key: _crop(geometry.pad(data).repeat(mul, 1, 1, 1), top, left, size)}
    if key == "y":
        mask = batch["mask"].expand(n, -1, -1, -1).to(data.dtype)
        out["mask"] = _crop(geometry.pad(mask, 1.0).repeat(mul, 1, 1, 1), top, left, size)
    if batch.get("label") is not None:
        out["label"] = batch["label"].repeat(mul, 1)
    return out, geometry.crop_coordinates(top, left, size).to(data.device)


class WithPositions:
    """The training network seen by a loss on patches: calls net(x, sigma, labels, positions=...) with the crops'
    position channels; every attribute (in_channels, ...) is the network's."""

    def __init__(self, net, positions: torch.Tensor):
        self.net, self.positions = net, positions

    def __call__(self, x, sigma, class_labels=None):
        return self.net(x, sigma, class_labels, positions=self.positions)

    def __getattr__(self, name):
        return getattr(self.net, name)


# ----------------------------------------------------------------------------------------------------------------------
# The stitched whole-image network.


def tile_grid(geometry: CanvasGeometry, patch_size: int) -> tuple[int, int, int]:
    """(K, lowest shift, highest shift) of the non-overlapping grid of p x p tiles (module docstring); refuses a
    patch size for which no grid covers the image inside the canvas."""
    W, P, p = geometry.image_size, geometry.pad_width, patch_size
    best = None
    for k in range(max(1, -(-W // p)), (W + 2 * P) // p + 1):
        low, high = max(0, W + P - k * p), min(P, W + 2 * P - k * p)
        if best is None or high - low > best[2] - best[1]:
            best = (k, low, high)
    if best is None:
        raise UserError(f"--patch-size {p} cannot tile {W} px images padded by {P}: non-overlapping tiles need an "
                        f"integer K with W <= K p <= W + 2P ({W} <= K {p} <= {W + 2 * P}).")
    return best


def overlap_origins(geometry: CanvasGeometry, patch_size: int) -> list[int]:
    """Tile origins per axis of overlap mode: stride p // 2 from 0, the last tile flush with the canvas edge."""
    stride, last = max(patch_size // 2, 1), geometry.canvas - patch_size
    return sorted(set(range(0, last, stride)) | {last})


class StitchedNetwork:
    """A whole-image network assembled from a patch network (module docstring). Call it as the preconditioned
    network it wraps: net(x (n, in_channels, W, W), sigma, class_labels) -> (n, out_channels, W, W) float32.

    Randomness: `use_seeds(seeds, device)` before a sampling run gives every seed its own shift stream (derived from
    the seed with a salt, so the solver's noise streams stay as they would be with a whole-image network). A call of n
    rows with B seeds needs n = m B: rows are m copies of the batch one after another (row r belongs to seed r % B),
    as the MSM sampler's K subsets and classifier-free guidance's two passes lay them out; each copy draws its own
    shift (a, b) and ring noise, in row order, so a row depends only on its seed and the calls so far.
    """

    def __init__(self, net, geometry: CanvasGeometry, patch_size: int, patch_batch: int = 256,
                 assembly: str = "tile"):
        if assembly not in ASSEMBLIES:
            raise UserError(f"--assembly must be one of {', '.join(ASSEMBLIES)}, got {assembly!r}.")
        if not (isinstance(patch_batch, int) and patch_batch >= 1):
            raise UserError(f"--patch-batch must be an integer >= 1, got {patch_batch!r}.")
        if not 1 <= patch_size <= geometry.canvas:
            raise UserError(f"--patch-size {patch_size} does not fit the {geometry.canvas} px canvas of this patch "
                            f"prior ({geometry.describe()}).")
        self.grid = tile_grid(geometry, patch_size) if assembly == "tile" else None
        self.net, self.geometry, self.patch_size = net, geometry, patch_size
        self.patch_batch, self.assembly = patch_batch, assembly
        self.in_channels, self.out_channels, self.label_dim = net.in_channels, net.out_channels, net.label_dim
        self.sigma_min, self.sigma_max = net.sigma_min, net.sigma_max
        self.img_resolution = geometry.image_size
        self._streams = None

    def __getattr__(self, name):  # anything else a caller reads (round_sigma, sigma_data, ...) is the network's
        if name == "net":
            raise AttributeError(name)
        return getattr(self.net, name)

    def describe(self) -> str:
        return (f"patch prior stitched from {self.patch_size} px tiles ({self.assembly}"
                + (f", K = {self.grid[0]}, shifts {self.grid[1]}..{self.grid[2]}" if self.grid else "")
                + f", {self.patch_batch} tiles per network call) on {self.geometry.describe()}")

    def use_seeds(self, seeds, device="cpu"):
        self._streams = []
        for seed in seeds:
            state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(seed) >> 32, _SHIFT_STREAM_SALT])
            words = state.generate_state(2)
            self._streams.append(torch.Generator(device).manual_seed(int(words[0]) << 31 | int(words[1]) >> 1))

    def _draws(self, n: int, channels: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row: the grid shift (n, 2) and standard normal ring noise (n, channels, N, N)."""
        if self._streams is None:
            raise RuntimeError("StitchedNetwork.use_seeds(seeds) must be called before sampling")
        b = len(self._streams)
        if n % b:
            raise ValueError(f"a call of {n} rows does not consist of copies of the {b} seeds' batch")
        low, high = self.grid[1:] if self.grid else (0, 0)
        shifts, noise = [None] * n, [None] * n
        for copy in range(n // b):
            for i, g in enumerate(self._streams):
                shifts[copy * b + i] = torch.randint(low, high + 1, (2,), generator=g, device=g.device)
                noise[copy * b + i] = torch.randn((channels, self.geometry.canvas, self.geometry.canvas),
                                                  generator=g, device=g.device)
        return torch.stack(shifts).cpu(), torch.stack(noise).to(device)

    def __call__(self, x, sigma, class_labels=None):
        x, sigma = image_and_sigma(x, sigma, self.in_channels)
        W = self.geometry.image_size
        if x.shape[-2:] != (W, W):
            raise ValueError(f"this patch prior denoises {W} x {W} images (its canvas geometry: "
                             f"{self.geometry.describe()}), got {tuple(x.shape[-2:])}")
        shifts, noise = self._draws(len(x), self.out_channels, x.device)
        return self.assemble(x, sigma, class_labels, shifts, noise)

    def assemble(self, x: torch.Tensor, sigma: torch.Tensor, class_labels, shifts: torch.Tensor,
                 noise: torch.Tensor) -> torch.Tensor:
        """The stitched output for given per-row grid shifts (n, 2) (ignored in overlap mode) and ring noise
        (n, out_channels, N, N): tests call this with every shift."""
        g, c_out, p = self.geometry, self.out_channels, self.patch_size
        lo, hi = g.pad_width, g.pad_width + g.image_size  # the image inside the canvas
        # The canvas: image channels padded with pad_value + sigma n, extra (mask) channels with 1 (observed).
        ring = g.pad(torch.zeros_like(x[:1, :1]), 1.0)  # 1 on the ring, 0 on the image
        image = g.pad(x[:, :c_out]) + ring * sigma * noise
        canvas = torch.cat([image, g.pad(x[:, c_out:], 1.0)], dim=1)
        positions = g.coordinate_map(x.device)
        if self.grid is not None:
            k, span = self.grid[0], self.grid[0] * p
            tiles, tile_positions = [], []
            for (a, b), row in zip(shifts.tolist(), canvas):
                tiles.append(_grid_tiles(row[:, a : a + span, b : b + span], k, p))
                tile_positions.append(_grid_tiles(positions[0, :, a : a + span, b : b + span], k, p))
            out = self._run(torch.cat(tiles), sigma, class_labels, torch.cat(tile_positions), k * k)
            out = out.reshape(len(x), k, k, c_out, p, p).permute(0, 3, 1, 4, 2, 5).reshape(len(x), c_out, span, span)
            return torch.stack([row[:, lo - a : hi - a, lo - b : hi - b] for (a, b), row in zip(shifts.tolist(), out)])
        origins = [(i, j) for i in overlap_origins(g, p) for j in overlap_origins(g, p)]
        tiles = torch.stack([canvas[:, :, i : i + p, j : j + p] for i, j in origins], dim=1).flatten(0, 1)
        tile_positions = torch.cat([positions[:, :, i : i + p, j : j + p] for i, j in origins]).repeat(len(x), 1, 1, 1)
        out = self._run(tiles, sigma, class_labels, tile_positions, len(origins))
        out = out.reshape(len(x), len(origins), c_out, p, p)
        total = torch.zeros(len(x), c_out, g.canvas, g.canvas, device=x.device, dtype=out.dtype)
        count = torch.zeros(1, 1, g.canvas, g.canvas, device=x.device, dtype=out.dtype)
        for t, (i, j) in enumerate(origins):
            total[:, :, i : i + p, j : j + p] += out[:, t]
            count[:, :, i : i + p, j : j + p] += 1
        return (total / count)[:, :, lo:hi, lo:hi]

    def _run(self, tiles, sigma, class_labels, positions, per_row: int) -> torch.Tensor:
        """The patch network on all tiles (rows' tiles consecutive), in chunks of patch_batch."""
        sigma = sigma.repeat_interleave(per_row, dim=0)
        labels = class_labels.repeat_interleave(per_row, dim=0) if class_labels is not None else None
        outs = []
        for s in range(0, len(tiles), self.patch_batch):
            e = s + self.patch_batch
            outs.append(self.net(tiles[s:e], sigma[s:e], None if labels is None else labels[s:e],
                                 positions=positions[s:e]).to(torch.float32))
        return torch.cat(outs)


def _grid_tiles(region: torch.Tensor, k: int, p: int) -> torch.Tensor:
    """(C, K p, K p) -> (K^2, C, p, p), row-major over the grid."""
    c = region.shape[0]
    return region.reshape(c, k, p, k, p).permute(1, 3, 0, 2, 4).reshape(k * k, c, p, p)


def unet_divisor(network_config: dict) -> int:
    """2^(levels - 1): what every side of a network input must be divisible by."""
    return 2 ** (len(network_config["kwargs"].get("channel_mult", [1])) - 1)


def patch_prior(net, config: dict, patch_size: int | None = None, patch_batch: int | None = None,
                assembly: str | None = None):
    """The network of a snapshot as a whole-image network: a StitchedNetwork for a patch prior (config section
    'patches'; patch_size None: the largest training size whose tile grid can shift, else the largest that tiles),
    the network itself otherwise (refusing the patch options, which would then do nothing)."""
    if config.get("patches") is None:
        given = [flag for flag, value in (("--patch-size", patch_size), ("--patch-batch", patch_batch),
                                          ("--assembly", assembly)) if value is not None]
        if given:
            raise UserError(f"{', '.join(given)} apply to patch priors, but this snapshot is a whole-image model.")
        return net
    geometry, law = from_patch_config(config["patches"])
    divisor = unet_divisor(config["network"])
    assembly = assembly or "tile"
    if patch_size is None:
        usable = [p for p in sorted(law.sizes, reverse=True) if _tiles(geometry, p, assembly)]
        if not usable:
            raise UserError(f"None of the training patch sizes {law.sizes} tiles {geometry.describe()} "
                            "(non-overlapping tiles need W <= K p <= W + 2P for an integer K); give --patch-size.")
        # Prefer a size whose grid can shift: a fixed grid puts every seam at the same place at every call, which is
        # what the random shift exists to avoid (PaDIS).
        shifting = [p for p in usable if assembly == "overlap" or _shift_range(geometry, p) > 0]
        patch_size = (shifting or usable)[0]
    elif patch_size % divisor:
        raise UserError(f"--patch-size {patch_size} is not divisible by {divisor}, which the network's levels need.")
    return StitchedNetwork(net, geometry, patch_size, 256 if patch_batch is None else patch_batch, assembly)


def _shift_range(geometry: CanvasGeometry, p: int) -> int:
    _, low, high = tile_grid(geometry, p)
    return high - low


def _tiles(geometry: CanvasGeometry, p: int, assembly: str) -> bool:
    if assembly == "overlap":
        return True
    try:
        tile_grid(geometry, p)
        return True
    except UserError:
        return False


def use_seeds(net, seeds, device="cpu"):
    """Give a stitched network (possibly inside a CountingNetwork, which passes attributes on) the seeds of the coming
    sampling run; any other network draws nothing."""
    seeder = getattr(net, "use_seeds", None)
    if seeder is not None:
        seeder(seeds, device)


def training_patch_config(sizes: list[int], probs: list[float] | None, real_p: float | None, muls: list[int] | None,
                          pad_width: int | None, encoding: str | None, image_size: int, kind: str,
                          divisor: int) -> dict:
    """train.py's patch options -> the run's 'patches' config (`patch_config`); `divisor` = 2^(levels - 1) of the
    UNet. The pad value is the data's zero: 0 for complex MRI images, -1 (black) for images in [-1, 1], as PaDIS pads
    its [0, 1] data with 0."""
    geometry = CanvasGeometry(image_size, 0 if pad_width is None else pad_width, encoding or "xy",
                              0.0 if kind == "mri" else -1.0)
    law = PatchLaw.from_options(sizes, probs, real_p, muls)
    check_sizes(law.sizes, geometry, divisor)
    return patch_config(geometry, law)
