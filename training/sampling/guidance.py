"""Guidance as denoiser wrappers (MGDM, SEED_METHODS.md section 1): `D(x; sigma) <- D(x; sigma) + sigma^2 * scale *
grad_x G(x; sigma)` for a log-potential G, and classifier-free guidance of a conditional network.

Guidance knows nothing of solvers: `guided(denoiser, terms)` is again a denoiser `D(x, sigma) -> x0_hat` (float64 in
and out), so every solver of training/sampling/solvers.py takes it as is, and so does the MSM aggregate
(training/sampling/denoisers.py `MSMAggregate`, a denoiser like any other). Only MSM's reference write-back loop,
which builds its aggregate inside its own loop, adds `correction` itself.

Potentials of a classifier's probabilities p = softmax(f(x; sigma)) (SEED_METHODS.md section 1.4), all ascended:
- 'classifier': log p_y for a target class y (ordinary classifier guidance);
- 'entropy': H(p) = -sum_k p_k log p_k;
- 'margin': -(p_(1) - p_(2)), minus the gap between the two largest probabilities;
- 'leastconf': -max_k p_k.
The last three push samples towards the classifier's decision boundary ("hard" examples).

Classifier-free guidance combines the conditional and the unconditional (all-zero label vector, networks.py) outputs
of one network, both from one batched call (`cfg_denoiser`, for full and for MSM partial denoisers). Denoisers are
affine in the noise prediction (D = x - sigma eps), so the combination of denoisers equals that of the eps predictions:
- 'mgdm' (MGDM, guided-diffusion): D = D_c + w (D_c - D_u), so w = 0 is the conditional model;
- 'edm2' (EDM2, Patch-Diffusion): D = D_u + w (D_c - D_u), so w = 1 is the conditional model; w_edm2 = 1 + w_mgdm.
"""

import dataclasses
import math

import torch

from dnnlib import UserError

POTENTIALS = ("classifier", "entropy", "margin", "leastconf")
CFG_CONVENTIONS = ("mgdm", "edm2")


def potential(logits: torch.Tensor, kind: str, target: torch.Tensor | None = None) -> torch.Tensor:
    """G per example from logits (N, K): one of POTENTIALS (module docstring); target (N,) class indices for
    'classifier'. Returns (N,) in the logits' dtype."""
    log_p = torch.log_softmax(logits, dim=1)
    p = log_p.exp()
    if kind == "classifier":
        if target is None:
            raise ValueError("classifier guidance needs target class indices")
        return log_p.gather(1, target.to(device=logits.device, dtype=torch.int64).reshape(-1, 1))[:, 0]
    if kind == "entropy":
        return -(p * log_p).sum(dim=1)
    if kind == "margin":
        top2 = p.topk(2, dim=1).values
        return -(top2[:, 0] - top2[:, 1])
    if kind == "leastconf":
        return -p.max(dim=1).values
    raise ValueError(f"guidance kind must be one of {', '.join(POTENTIALS)}, got {kind!r}")


def check_sigma_range(sigma_range) -> tuple[float, float]:
    """(lo, hi) with 0 <= lo <= hi, hi may be inf; None means every noise level."""
    if sigma_range is None:
        return 0.0, math.inf
    lo, hi = (float(v) for v in sigma_range)
    if not 0 <= lo <= hi:
        raise UserError(f"--guidance-sigma-range must be two noise levels 0 <= LO <= HI, got {lo},{hi}.")
    return lo, hi


@dataclasses.dataclass
class GuidanceTerm:
    """One term scale * grad_x G(x; sigma) of a classifier potential, active for sigma in [lo, hi].

    classifier(x, sigma) -> logits (N, K): differentiable in x (float64 x, python float sigma), e.g.
        `training.classifier.classifier_logits(net)` or an exact closed form in the tests.
    kind: one of POTENTIALS. target: (N,) class indices, for 'classifier' only. sigma_range: (lo, hi) or None.
    """

    classifier: object
    kind: str
    scale: float
    target: torch.Tensor | None = None
    sigma_range: tuple | None = None

    def __post_init__(self):
        if self.kind not in POTENTIALS:
            raise UserError(f"--guidance must be one of {', '.join(POTENTIALS)}, got {self.kind!r}.")
        if (self.kind == "classifier") != (self.target is not None):
            raise ValueError("target class indices are needed for, and only for, 'classifier' guidance")
        self.sigma_range = check_sigma_range(self.sigma_range)

    def active(self, sigma: float) -> bool:
        return self.scale != 0 and self.sigma_range[0] <= float(sigma) <= self.sigma_range[1]

    def gradient(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        """grad_x G(x; sigma), per example (the sum over the batch is differentiated), in x's dtype."""
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            value = potential(self.classifier(x_in, sigma), self.kind, self.target).sum()
            (grad,) = torch.autograd.grad(value, x_in)
        return grad.to(x.dtype)


def correction(terms, x: torch.Tensor, sigma: float) -> torch.Tensor:
    """sigma^2 * sum over the active terms of scale * grad_x G(x; sigma); zeros when none is active."""
    total = torch.zeros_like(x)
    for term in terms:
        if term.active(sigma):
            total = total + term.scale * term.gradient(x, sigma)
    return float(sigma) ** 2 * total


def guided(denoiser, terms):
    """The guided denoiser D(x; sigma) + correction(terms, x, sigma); `denoiser` itself when there are no terms."""
    terms = list(terms)
    if not terms:
        return denoiser

    def denoise(x, sigma):
        return denoiser(x, sigma) + correction(terms, x, sigma)

    return denoise


# ----------------------------------------------------------------------------------------------------------------------
# Classifier-free guidance.


def cfg_coefficient(scale: float, convention: str) -> float:
    """The weight a of D = D_u + a (D_c - D_u) for --cfg-scale in the given convention (module docstring)."""
    if convention not in CFG_CONVENTIONS:
        raise UserError(f"--cfg-convention must be one of {', '.join(CFG_CONVENTIONS)}, got {convention!r}.")
    return 1.0 + float(scale) if convention == "mgdm" else float(scale)


def cfg_denoiser(make_denoiser, class_labels: torch.Tensor, scale: float, convention: str = "mgdm",
                 sigma_range=None):
    """Classifier-free guidance of a labelled denoiser family, full `D(x, sigma)` or MSM partial
    `partial(s, mask, sigma)` alike: every tensor argument before sigma is doubled the same way.

    make_denoiser(labels) -> a denoiser for per-example one-hot labels (N, K), the all-zero row meaning "no label"
    (e.g. `lambda labels: net_denoiser(net, labels)` or `lambda labels: net_partial_denoiser(net, operator, labels)`).
    class_labels (N, K) one-hot. Inside sigma_range the conditional and unconditional passes are one call on a
    doubled batch; outside it (and at the conditional weight a = 1) the plain conditional denoiser is used.

    The wrapped denoiser may be called on any multiple of N rows: the MSM aggregate calls a partial denoiser on K * N
    rows, subset-major (rows j N .. j N + N - 1 are subset j), and the denoiser tiles labels of N rows to match. The
    doubled batch is laid out as 2K blocks of N rows, block 2j the conditional and block 2j + 1 the unconditional
    copy of block j, so that the tiling of the 2N labels [y; 0] (and of per-example coil maps) lines up with it; for
    N rows (K = 1) that is [x; x].
    """
    coefficient = cfg_coefficient(scale, convention)
    lo, hi = check_sigma_range(sigma_range)
    n_labels = class_labels.shape[0]
    conditional = make_denoiser(class_labels)
    both = make_denoiser(torch.cat([class_labels, torch.zeros_like(class_labels)]))

    def doubled(t):
        blocks = t.reshape(-1, n_labels, *t.shape[1:])
        return torch.stack([blocks, blocks], dim=1).flatten(0, 2)

    def denoise(*args):
        *tensors, sigma = args
        if coefficient == 1.0 or not lo <= float(sigma) <= hi:
            return conditional(*args)
        out = both(*(doubled(t) for t in tensors), sigma).reshape(-1, 2, n_labels, *tensors[0].shape[1:])
        return (out[:, 1] + coefficient * (out[:, 0] - out[:, 1])).flatten(0, 1)

    return denoise
