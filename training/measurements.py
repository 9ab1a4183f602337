"""The measurement process of a run, and the partial denoiser: the one place where data, operator, mask and noise
meet (MSM.md sections 1-3; ARCHITECTURE.md "Measurement = operator + mask + noise").

- `MeasurementConfig`: what the training data are: the full operator family T ('identity' for images, 'mri' for
  multi-coil k-space with per-slice coil maps), the mask law, the noise std eta (`sigma_y`), the protocol and its seed.
  JSON-able; train.py records it in training_options.json and in every snapshot, so generate.py and reconstruct.py
  know T and the mask law without flags.
- `MeasuredDataset`: wraps a clean (or stored-undersampled) dataset and hands out ONLY measurements
  {'y', 'mask', 'maps' (MRI), 'label', 'index'}. The clean image is dropped inside `__getitem__`, i.e. inside the data
  worker, so nothing downstream (loss, training loop) can read it.
- `partial_denoise`: s_hat = P T D(T^H s; sigma), the network's partial measurement denoiser, shared by the MSM loss
  and every MSM sampler, with the skip term in image space (the reference) or in measurement space (consistent for
  multi-coil MRI; `aggregate_projection` is the samplers' matching step).

Protocols (ARCHITECTURE.md "Data"):
- 'fixed' (default): example i is measured once, with mask and noise drawn from a generator seeded by (seed, i):
  identical across epochs, batch compositions and ranks. The realistic "no clean data" setting.
- 'resample': a fresh mask and noise at every draw, seeded by (seed, global stream position), so a resumed run draws
  exactly what an uninterrupted one would. An ablation (as the reference code trains): over many epochs it reveals
  every entry.
- 'stored': the dataset holds acquired undersampled data with its own masks (real data); no simulation at all.
"""

import torch

from dnnlib import Field, UserError, check_fields
from training.masks import MaskLaw, example_generator, mask_law_from_config
from training.operators import Identity, MultiCoilMRI, check_noise_std, measure

PROTOCOLS = ("fixed", "resample", "stored")
OPERATORS = ("identity", "mri")
_RESAMPLE_SALT = 0x5EED  # keeps the resample streams apart from the fixed protocol's per-example streams


class MeasurementConfig:
    """operator in OPERATORS, mask a mask-law config dict, sigma_y >= 0, protocol in PROTOCOLS, seed an int."""

    def __init__(self, operator: str, mask: dict, sigma_y: float = 0.0, protocol: str = "fixed", seed: int = 0):
        if operator not in OPERATORS:
            raise UserError(f"Measurement operator must be one of {', '.join(OPERATORS)}, got {operator!r}.")
        if protocol not in PROTOCOLS:
            raise UserError(f"--protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}.")
        check_noise_std(sigma_y)
        self.law: MaskLaw = mask_law_from_config(mask)
        if operator == "identity" and self.law.is_line_law:
            raise UserError(f"Mask law {self.law.kind!r} samples k-space lines and needs an MRI dataset; this dataset "
                            "holds images (use --mask box or pixel).")
        if operator == "mri" and self.law.kind in ("box", "pixel"):
            raise UserError(f"Mask law {self.law.kind!r} is for images; an MRI dataset needs a line law (lines-random, "
                            "lines-equispaced, fastmri-random, fastmri-equispaced).")
        self.operator, self.sigma_y, self.protocol, self.seed = operator, float(sigma_y), protocol, int(seed)

    def to_config(self) -> dict:
        return {"operator": self.operator, "mask": self.law.to_config(), "sigma_y": self.sigma_y,
                "protocol": self.protocol, "seed": self.seed}

    @classmethod
    def from_config(cls, config: dict, where: str = "measurement") -> "MeasurementConfig":
        """Inverse of `to_config`; every key and type is checked first (ConfigError naming the field at dotted place
        `where`), so a stored config can only choose among the operators, protocols and mask laws known here; the
        constructors then check the ranges (UserError)."""
        check_fields(config, {"operator": Field("str", choices=OPERATORS, required=True),
                              "mask": Field("json", required=True), "sigma_y": Field("float"),
                              "protocol": Field("str", choices=PROTOCOLS), "seed": Field("int", -(2**63), 2**63 - 1)},
                     where)
        mask_law_from_config(config["mask"], where=f"{where}.mask")
        return cls(**config)

    def full_operator(self, maps: torch.Tensor | None = None):
        """T for a batch: Identity for images, MultiCoilMRI(maps) for MRI (maps complex (N or 1, C, H, W))."""
        if self.operator == "identity":
            return Identity()
        if maps is None:
            raise ValueError("the MRI operator needs the batch's coil maps")
        return MultiCoilMRI(maps)


def measurement_config_for(dataset, mask: dict, sigma_y: float, protocol: str, seed: int) -> MeasurementConfig:
    """Check the measurement options against a dataset and build the config (train.py's entry point)."""
    desc = dataset.describe()
    operator = "mri" if desc["kind"] == "mri" else "identity"
    stored = desc["kind"] == "mri" and not desc.get("fully_sampled", True)
    if stored and protocol != "stored":
        protocol = "stored"  # undersampled data carry their own masks: nothing to simulate
    if protocol == "stored" and not stored:
        raise UserError(f"--protocol stored needs a dataset of stored undersampled measurements; {desc['path']} holds "
                        "fully sampled data (use fixed or resample).")
    if stored:
        mask = desc.get("mask_law", mask)  # real data: the law its masks were drawn from, as the converter recorded
    return MeasurementConfig(operator, mask, sigma_y=sigma_y, protocol=protocol, seed=seed)


class MeasuredDataset(torch.utils.data.Dataset):
    """Measurements of a base dataset (module docstring). Keys are example indices, or (index, stream position)
    pairs from the training loop's StreamSampler (needed by the 'resample' protocol; see `uses_stream_position`).

    Items: {'y': measurement (C, H, W) real for images / complex k-space for MRI, zero where unobserved,
            'mask': float {0,1} broadcastable to y, 'maps': coil maps (MRI only), 'label', 'index'}.
    x-flip (images only) mirrors the measurement and its mask together, after measuring, so a flipped copy reveals
    nothing the original measurement did not.
    """

    uses_stream_position = True

    def __init__(self, base: torch.utils.data.Dataset, config: MeasurementConfig, xflip: bool = False):
        self.base, self.config = base, config
        desc = base.describe()
        if xflip and config.operator == "mri":
            raise UserError("--xflip is not supported for MRI data (a flip is not a plain k-space flip).")
        if config.protocol == "stored" and "mri" != desc["kind"]:
            raise UserError("The stored protocol needs an MRI dataset of undersampled records.")
        self.xflip = xflip
        self.shape = tuple(desc["shape"] if desc["kind"] == "mri" else desc["image_shape"][1:])

    def __len__(self) -> int:
        return len(self.base) * (2 if self.xflip else 1)

    def _generator(self, raw_index: int, position: int | None) -> torch.Generator:
        if self.config.protocol == "resample":
            if position is None:
                raise ValueError("the resample protocol needs the stream position (use StreamSampler)")
            return example_generator(self.config.seed ^ _RESAMPLE_SALT, position)
        return example_generator(self.config.seed, raw_index)

    def __getitem__(self, key) -> dict:
        idx, position = key if isinstance(key, tuple) else (key, None)
        flip = idx >= len(self.base)
        record = self.base[idx - len(self.base) if flip else idx]
        item = {"label": record["label"], "index": record["index"]}
        if self.config.operator == "mri":
            item["maps"] = record["maps"]
        if self.config.protocol == "stored":
            y, mask = record["kspace"], record["mask"]
        else:
            # Simulate the acquisition from the clean record: z = T x (images: z = x; MRI: the full k-space).
            z = record["kspace"] if self.config.operator == "mri" else record["image"]
            g = self._generator(record["index"], position)
            mask = self.config.law.sample(1, self.shape, g)[0]
            y = measure(Identity(), z, mask, self.config.sigma_y, g)
        if flip:
            y, mask = y.flip(-1), mask.flip(-1)
        item["y"], item["mask"] = y, mask
        return item

    def describe(self) -> dict:
        return {**self.base.describe(), "measurement": self.config.to_config()}


def network_input(u: torch.Tensor, mask: torch.Tensor | None, in_channels: int) -> torch.Tensor:
    """The network's input image: u, plus the mask as an extra channel when the network was built with one more
    input channel than output channels (Ambient-style; MSM's default has none). Image-space masks only."""
    extra = in_channels - u.shape[1]
    if extra == 0:
        return u
    if mask is None or mask.shape[-2:] != u.shape[-2:]:
        raise ValueError("this network takes a mask channel, which needs an image-space mask")
    return torch.cat([u, mask.expand(u.shape[0], extra, *u.shape[-2:]).to(u.dtype)], dim=1)


SKIP_SPACES = ("image", "measurement")


def skip_space_of(loss_config: dict | None) -> str:
    """The skip space a snapshot's network was trained with (its loss config's 'skip_space'); 'image' for snapshots
    written before the option existed, which is how they were trained."""
    return (loss_config or {}).get("skip_space", "image")


def skip_coefficient(net, sigma) -> torch.Tensor:
    """c_skip(sigma) of the network's preconditioning (training/networks.py `coefficients`), float32 (N, 1, 1, 1) or
    (1, 1, 1, 1); the network may be wrapped (DistributedDataParallel's `module`, torch.compile's `_orig_mod`)."""
    while not hasattr(net, "coefficients") and (hasattr(net, "module") or hasattr(net, "_orig_mod")):
        net = getattr(net, "module", None) or net._orig_mod
    sigma = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1, 1, 1, 1)
    return net.coefficients(sigma)[0]


def partial_denoise(net, operator, mask: torch.Tensor, s: torch.Tensor, sigma, class_labels=None,
                    skip_space: str = "image"):
    """The partial denoiser s_hat ~ E[P z | s] and the network's image output D: (s_hat, x0_hat).

    `s` is a noisy partial measurement (zero off the mask), `mask` P broadcastable to it, `sigma` a float or a
    per-example tensor (N,) / (N,1,1,1). Works for any operator with A(x, mask) / AH (Identity, MultiCoilMRI). With
    A = P T (the partial operator), u = T^H s = A^H s (s = P s) and D(u) = c_skip u + c_out F(c_in u) the network:

    skip_space 'image' (the reference's): s_hat = A D(u) = c_skip A A^H s + c_out A F.
    skip_space 'measurement': s_hat = A D(u) + c_skip (s - A A^H s) = c_skip s + c_out A F, i.e. EDM's
        preconditioning written in measurement space: the skip term is c_skip times the measurement itself.

    Why the image-space skip is not measurement-consistent. The data give s = A x0 + sigma P n. As sigma -> 0,
    E[P z | s] -> s (on range(A)), but the image-space skip tends to A A^H s, and A A^H = P T T^H P is the identity
    on range(A) only if T^H P T = A^H A is a projector (T = I: A^H A = P; single-coil T = F S with |S| = 1:
    F^H P F). For multi-coil MRI, T^H P T is not (coil images are correlated), so A A^H s != s: on the quickstart's
    8-coil phantoms at R = 4, |s - A A^H s| / |s| = 0.11 (tests/test_consistent_precond.py). F must then make
    up c_skip (s - A A^H s) / c_out, which grows like 1 / sigma and depends on the mask (which an MRI network never
    sees), while the EDM weighting lambda = 1 / c_out^2 counts every error of F at full weight: a part of the loss
    the network cannot fit, largest at the smallest noise levels. With the measurement-space skip the residual
    F has to fit is (E[P z | s] - c_skip s) / c_out on range(A), O(1) at every sigma, as in EDM.

    What happens outside range(A). s - A A^H s is not in range(A): write s = Pi_A s + (I - Pi_A) s, Pi_A the
    orthogonal projector onto range(A). The data term A x0 lies in range(A), so (I - Pi_A) s = sigma (I - Pi_A) P n
    is pure noise, and s_hat = [c_skip Pi_A s + c_out A F] + c_skip (I - Pi_A) s. The bracket is what the network
    controls and what can equal E[P z | s] (which lies in range(A)); the rest does not depend on the network, so
    (a) the loss ||s_hat - y||^2 (y in range(A)) splits into ||bracket - y||^2 plus c_skip^2 ||(I - Pi_A) s||^2, a
    term without gradient: training the measurement-space skip is training s_hat = c_skip Pi_A s + c_out A F (the
    logged loss carries that constant, about (m - rank A) c_skip^2 lambda sigma^2 per example), without ever
    computing Pi_A (a conjugate-gradient solve with T^H P T); and (b) a sampler must not use that noise as part of
    its estimate. It lies outside range(T): T^H (I - Pi_A) s = A^H (I - Pi_A) s = 0. So the MSM samplers project
    every aggregate onto range(T) (`aggregate_projection`), which can only bring it closer to z0 = T x0, and
    image estimates T^+ z_hat discard it by themselves.

    Reduction: where A A^H = P on the observed entries (T T^H = I: Identity, single-coil unit maps) the added term
    c_skip (s - P s) is exactly 0, so both skip spaces give the same s_hat.
    """
    if skip_space not in SKIP_SPACES:
        raise UserError(f"The skip space must be one of {', '.join(SKIP_SPACES)}, got {skip_space!r}.")
    u = operator.AH(s)
    x0_hat = net(network_input(u.to(torch.float32), mask, net.in_channels), sigma, class_labels)
    s_hat = operator.A(x0_hat.to(u.dtype), mask)  # P T x0_hat: MultiCoilMRI folds P into its k-space sign
    if skip_space == "measurement":
        c_skip = skip_coefficient(net, sigma).to(device=s.device, dtype=u.dtype)
        s_hat = s_hat + c_skip * (s - operator.A(u, mask))
    return s_hat, x0_hat


def aggregate_projection(skip_space: str, operator):
    """The map the MSM samplers apply to every aggregate z_hat of a network with this skip space (`partial_denoise`):
    None (nothing to do) for the image-space skip or T = I; for the measurement-space skip the orthogonal projection
    onto range(T), z -> T T^+ z (MultiCoilMRI: T^+ = (T^H T)^+ T^H exactly, T^H T being diagonal), which removes the
    noise the skip term leaves outside range(T)."""
    if skip_space not in SKIP_SPACES:
        raise UserError(f"The skip space must be one of {', '.join(SKIP_SPACES)}, got {skip_space!r}.")
    if skip_space == "image" or isinstance(operator, Identity):
        return None

    def project(z_hat: torch.Tensor) -> torch.Tensor:
        return operator.A(operator.pinv(z_hat)).to(z_hat.dtype)

    return project
