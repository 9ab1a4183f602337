"""Random-ellipse phantoms (Shepp-Logan-like): the embedded default dataset, generated in seconds."""

import numpy as np


def random_ellipse_phantom(resolution: int, rng: np.random.Generator) -> np.ndarray:
    """One grayscale phantom in [0, 1], float32 (resolution, resolution).

    An outer skull ellipse of high intensity, a brain-matter ellipse inside it, and 3-8 smaller interior ellipses of
    varied contrast, all with random centres, axes and rotation: the structure of the Shepp-Logan head phantom with
    enough variety for a generative model to learn a distribution rather than one image.
    """
    coords = (np.arange(resolution) + 0.5) / resolution * 2 - 1
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    img = np.zeros((resolution, resolution), dtype=np.float64)

    def add(cx, cy, a, b, theta, value):
        c, s = np.cos(theta), np.sin(theta)
        u = (xx - cx) * c + (yy - cy) * s
        v = -(xx - cx) * s + (yy - cy) * c
        img[(u / a) ** 2 + (v / b) ** 2 <= 1] += value

    # Head: skull then brain (a slightly smaller ellipse that subtracts to leave a bright rim).
    a = rng.uniform(0.62, 0.80)
    b = rng.uniform(0.78, 0.92)
    theta = rng.uniform(-0.25, 0.25)
    cx, cy = rng.uniform(-0.05, 0.05, size=2)
    add(cx, cy, a, b, theta, 1.0)
    rim = rng.uniform(0.05, 0.09)
    add(cx, cy, a - rim, b - rim, theta, -rng.uniform(0.55, 0.75))

    # Interior structures, kept inside the brain.
    for _ in range(rng.integers(3, 9)):
        r = rng.uniform(0.0, 0.55)
        phi = rng.uniform(0, 2 * np.pi)
        ex = cx + r * (a - rim) * np.cos(phi) * 0.8
        ey = cy + r * (b - rim) * np.sin(phi) * 0.8
        ea = rng.uniform(0.05, 0.25)
        eb = rng.uniform(0.05, 0.30)
        add(ex, ey, ea, eb, rng.uniform(0, np.pi), rng.uniform(-0.2, 0.35))
    return np.clip(img, 0, 1).astype(np.float32)


def random_ellipse_phantoms(num: int, resolution: int, seed: int) -> np.ndarray:
    """`num` phantoms, float32 (num, resolution, resolution) in [0, 1]; phantom i depends only on (seed, i)."""
    out = np.empty((num, resolution, resolution), dtype=np.float32)
    for i in range(num):
        out[i] = random_ellipse_phantom(resolution, np.random.default_rng([seed, i]))
    return out


def lesion_phantoms(num: int, resolution: int, seed: int, contrast: float = 0.1, radius: float = 0.1,
                    ) -> tuple[np.ndarray, np.ndarray]:
    """A two-class task: phantom i (as `random_ellipse_phantoms`) with label i % 2, where class 1 carries a small
    low-contrast lesion, a disc of the given radius (in units of the half field of view) that adds `contrast` to the
    intensity, at a random position well inside the brain. Returns (float32 (num, R, R) in [0, 1], int64 (num,)).
    The lesion draws come from their own stream, so image i of either class shares its anatomy with the plain
    phantom i."""
    images = random_ellipse_phantoms(num, resolution, seed)
    labels = np.arange(num, dtype=np.int64) % 2
    coords = (np.arange(resolution) + 0.5) / resolution * 2 - 1
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    for i in np.flatnonzero(labels):
        rng = np.random.default_rng([seed, i, 1])
        r, phi = rng.uniform(0, 0.35), rng.uniform(0, 2 * np.pi)
        disc = (xx - r * np.cos(phi)) ** 2 + (yy - r * np.sin(phi)) ** 2 <= radius**2
        images[i] = np.clip(images[i] + contrast * disc, 0, 1)
    return images, labels
