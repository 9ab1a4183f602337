"""Small tensor utilities shared by the scripts."""

import re

import numpy as np
import PIL.Image
import torch

from dnnlib import UserError


class SeedGenerators:
    """One torch.Generator per seed, stacked along the batch: row i of every draw depends only on seeds[i].

    This makes generated images independent of the batch size and of the number of ranks (each seed's stream is the
    same whichever batch it lands in). Draws happen on `device` so CPU and GPU runs each stay reproducible.
    """

    def __init__(self, seeds, device="cpu"):
        self.device = torch.device(device)
        self.generators = [torch.Generator(self.device).manual_seed(int(s) % (1 << 63)) for s in seeds]

    def __len__(self):
        return len(self.generators)

    def randn(self, shape, dtype=torch.float32):
        return torch.stack([torch.randn(shape[1:], generator=g, device=self.device, dtype=dtype)
                            for g in self.generators])

    def randn_like(self, x):
        return self.randn(x.shape, dtype=x.dtype if x.dtype.is_floating_point else torch.float32).to(x.device)

    def rand(self, shape, dtype=torch.float32):
        return torch.stack([torch.rand(shape[1:], generator=g, device=self.device, dtype=dtype)
                            for g in self.generators])

    def randint(self, low, high, shape):
        return torch.stack([torch.randint(low, high, shape[1:], generator=g, device=self.device)
                            for g in self.generators])


MAX_LIST_LENGTH = 10_000_000  # longer integer lists are typing mistakes (and would not fit in memory at 2^32)


def parse_int_list(text: str, option: str, minimum: int = 0, maximum: int = 2**32 - 1) -> list[int]:
    """'1,2,2' -> [1, 2, 2]; '4-6' -> [4, 5, 6] (increasing ranges, both ends included). Anything else, values
    outside [minimum, maximum] and lists longer than MAX_LIST_LENGTH are refused with one sentence naming `option`."""
    out = []
    for part in str(text).split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if m is None:
            raise UserError(f"{option} {text!r} is not a list of integers and ranges such as 1,5,9-11.")
        low, high = int(m.group(1)), int(m.group(2) or m.group(1))
        if high < low:
            raise UserError(f"{option} {text!r} holds the decreasing range {low}-{high}; write it as {high}-{low}.")
        if low < minimum or high > maximum:
            raise UserError(f"{option} {text!r} holds {low if low < minimum else high}, but values must lie in "
                            f"[{minimum}, {maximum}].")
        if len(out) + high - low + 1 > MAX_LIST_LENGTH:
            raise UserError(f"{option} {text!r} holds more than {MAX_LIST_LENGTH} values.")
        out.extend(range(low, high + 1))
    return out


def parse_seeds(text: str, option: str = "--seeds") -> list[int]:
    """'0-63' -> [0..63]; '1,5,9-11' -> [1, 5, 9, 10, 11]; seeds are integers in [0, 2^32)."""
    return parse_int_list(text, option)


def to_uint8_images(x: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) float in [-1, 1] -> uint8 (N, H, W, C), rounded and clipped."""
    return (x.float() * 127.5 + 128).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def save_image(arr: np.ndarray, path: str):
    """uint8 (H, W, 1|3) -> PNG."""
    PIL.Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr).save(path)


def image_grid(images: np.ndarray, cols: int | None = None) -> np.ndarray:
    """uint8 (N, H, W, C) -> one uint8 (rows*H, cols*W, C) tile, row-major, blank cells black."""
    n, h, w, c = images.shape
    cols = cols or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    grid = np.zeros((rows * h, cols * w, c), dtype=np.uint8)
    for i, img in enumerate(images):
        grid[(i // cols) * h : (i // cols + 1) * h, (i % cols) * w : (i % cols + 1) * w] = img
    return grid
