"""EDM2's power-function EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion
Models", section 3 and appendix C): EMA profiles tracked during training (train.py --ema-profiles) and the post-hoc
reconstruction of any other profile from their stored snapshots (posthoc_ema.py).

A power-function EMA with exponent gamma averages the weights theta_1, theta_2, ... after each optimizer step with
beta(t) = (1 - 1/t)^(gamma + 1) at step t (counted from 1): ema_t = beta(t) ema_{t-1} + (1 - beta(t)) theta_t. Unrolled,
ema_t = sum_{i<=t} w_i theta_i with the closed form w_i = (i/t)^(gamma+1) - ((i-1)/t)^(gamma+1) (the products of the
betas telescope), a discretised power function t^gamma whose width relative to the training so far does not change:
its relative standard deviation is sigma_rel = (gamma+1)^0.5 (gamma+2)^-1 (gamma+3)^-0.5, the length a user picks.

Post-hoc reconstruction: each stored snapshot is such an average with known (gamma, t), so its weight sequence over
the training steps is known exactly. The target profile's weight sequence is fitted, in least squares over the
discrete steps, by a linear combination of the stored ones; the same combination of the stored networks is the
reconstructed EMA. The inner products are sums over the actual steps (not EDM2's continuous integrals), so a stored
profile is reproduced exactly, up to the conditioning of the fit.
"""

import copy
import glob
import json
import math
import os

import numpy as np
import torch

from dnnlib import UserError

# sigma_rel(gamma) rises from 0 at gamma = -1 to its maximum at gamma = (sqrt 5 - 3) / 2, then falls to 0 as gamma
# grows: the profiles are the falling branch, gamma > GAMMA_MIN, one gamma per sigma_rel in (0, SIGMA_REL_MAX).
GAMMA_MIN = (math.sqrt(5) - 3) / 2


def sigma_rel_of(gamma: float) -> float:
    """The relative standard deviation of the power-function profile with exponent gamma (EDM2's eq. for sigma_rel)."""
    return (gamma + 1) ** 0.5 / ((gamma + 2) * (gamma + 3) ** 0.5)


SIGMA_REL_MAX = sigma_rel_of(GAMMA_MIN)  # 0.3003
MAX_PROFILES = 16  # each profile is one more copy of the weights in memory and in every training state


def check_sigma_rel(sigma_rel: float, what: str):
    """Refuse (UserError naming `what`) a sigma_rel that no power-function profile has."""
    if not (isinstance(sigma_rel, (int, float)) and 0 < sigma_rel < SIGMA_REL_MAX):
        raise UserError(f"{what} {sigma_rel!r:.20} is not a relative EMA length in (0, {SIGMA_REL_MAX:.4f}) (EDM2's "
                        "sigma_rel, e.g. 0.05 to 0.2).")


def gamma_of(sigma_rel: float) -> float:
    """The exponent gamma > GAMMA_MIN of the profile with relative length sigma_rel, by bisection on the falling branch
    of sigma_rel_of (monotone there), to float64 precision."""
    check_sigma_rel(sigma_rel, "sigma_rel")
    low, high = GAMMA_MIN, 1.0
    while sigma_rel_of(high) > sigma_rel:  # sigma_rel ~ 1/gamma for large gamma: a few doublings
        low, high = high, 2 * high
    for _ in range(200):
        mid = 0.5 * (low + high)
        if mid in (low, high):
            break
        low, high = (mid, high) if sigma_rel_of(mid) > sigma_rel else (low, mid)
    return 0.5 * (low + high)


def parse_profiles(text: str, option: str) -> list[float]:
    """'0.05,0.1' -> [0.05, 0.1]: distinct sigma_rel values, refused in one sentence naming `option` otherwise."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError as e:
        raise UserError(f"{option} must be a comma list of relative EMA lengths, e.g. 0.05,0.1, got {text!r}.") from e
    for v in values:
        check_sigma_rel(v, f"{option}: sigma_rel")
    if len(values) > MAX_PROFILES:
        raise UserError(f"{option} lists {len(values)} relative EMA lengths; at most {MAX_PROFILES} are tracked.")
    if len({f"{v:g}" for v in values}) < len(values):
        raise UserError(f"{option} {text} names a relative EMA length twice.")
    return values


def weights(gamma: float, t: int, steps: np.ndarray) -> np.ndarray:
    """w_i of the profile gamma at step t for the given steps i >= 1 (0 for i > t): the part of theta_i in ema_t.
    Written as (i/t)^(gamma+1) (1 - (1 - 1/i)^(gamma+1)) so that nothing overflows or cancels for large gamma or t."""
    i = np.asarray(steps, dtype=np.float64)
    with np.errstate(divide="ignore"):  # log1p(-1) = -inf at i = 1: then the bracket is exactly 1
        bracket = -np.expm1((gamma + 1) * np.log1p(-1 / i))
    return np.where(i <= t, np.exp((gamma + 1) * np.log(np.minimum(i, t) / t)) * bracket, 0.0)


# Steps per block when the inner products are summed: memory len(profiles) x 8 bytes per step of a block.
_BLOCK_BYTES = 64 * 2**20


def fit(stored: list[tuple[float, int]], target: tuple[float, int]) -> tuple[np.ndarray, float]:
    """Coefficients x of the stored profiles [(gamma, t), ...] whose combination sum_j x_j w^(j) best fits the
    target profile's weights w (least squares over the steps 1..max t) -> (x, the fit's relative error
    ||sum_j x_j w^(j) - w|| / ||w||). Solved from the Gram matrix of the weight sequences, summed block by block."""
    k, last = len(stored), max([t for _, t in stored] + [target[1]])
    gram, rhs, target_sq = np.zeros((k, k)), np.zeros(k), 0.0
    block = max(_BLOCK_BYTES // (8 * (k + 1)), 1)
    for start in range(1, last + 1, block):
        steps = np.arange(start, min(start + block, last + 1))
        w = np.stack([weights(g, t, steps) for g, t in stored])
        w_target = weights(*target, steps)
        gram += w @ w.T
        rhs += w @ w_target
        target_sq += w_target @ w_target
    x = np.linalg.lstsq(gram, rhs, rcond=None)[0]
    residual_sq = max(x @ gram @ x - 2 * x @ rhs + target_sq, 0.0)  # ||W^T x - w||^2 from the same sums
    return x, math.sqrt(residual_sq / target_sq)


class PowerEMA:
    """One power-function EMA of a network per sigma_rel, updated after every optimizer step (`update(net, t)` with
    the step count t >= 1). Buffers are copied from the network, as for the main EMA."""

    def __init__(self, net: torch.nn.Module, sigma_rels: list[float]):
        self.sigma_rels = list(sigma_rels)
        self.gammas = [gamma_of(s) for s in self.sigma_rels]
        self.emas = [copy.deepcopy(net).eval().requires_grad_(False) for _ in self.sigma_rels]

    @torch.no_grad()
    def update(self, net: torch.nn.Module, step: int):
        for gamma, ema in zip(self.gammas, self.emas):
            beta = (1 - 1 / step) ** (gamma + 1)  # 0 at step 1: the average starts at the first step's weights
            for p_ema, p_net in zip(ema.parameters(), net.parameters()):
                p_ema.lerp_(p_net.detach(), 1 - beta)
            for b_ema, b_net in zip(ema.buffers(), net.buffers()):
                b_ema.copy_(b_net)

    def state_dicts(self) -> list[dict]:
        return [ema.state_dict() for ema in self.emas]

    def load_state_dicts(self, states: list[dict]):
        for ema, state in zip(self.emas, states, strict=True):
            ema.load_state_dict(state)


PROFILE_PATTERN = "power-ema-*.pt"
MAX_STEPS = 10**8  # the fit sums over every step (minutes at this count); EDM2's longest runs take ~10^6 steps


def reconstruct(run_dir: str, sigma_rels: list[float], max_nimg: int | None = None) -> list[dict]:
    """Post-hoc EMAs of a run trained with --ema-profiles: for each sigma_rel, the power-function EMA at the last
    stored optimizer step (of the profile snapshots at training positions <= max_nimg, when given), fitted from all
    the run's profile snapshots up to there -> [{'sigma_rel', 'net' (eval mode), 'config', 'fit_error', 'nimg'}].

    The files are read twice (once for their profiles, once to combine their weights), so that only one of them
    is in memory at a time. Parameters are combined in float64; buffers are those of the last step's snapshot."""
    from training import snapshot as checkpoint

    if not os.path.isdir(run_dir):
        raise UserError(f"--run {run_dir} is not a directory.")
    paths = sorted(glob.glob(os.path.join(glob.escape(run_dir), PROFILE_PATTERN)))
    if not paths:
        raise UserError(f"--run {run_dir} holds no {PROFILE_PATTERN} snapshots; train the run with --ema-profiles.")
    records, configs, reference = [], {}, None
    for path in paths:
        _, config = checkpoint.load_power_ema(path)
        profile = config.pop("power_ema")
        configs[path] = config
        # A run continued with another --duration records the new one: the only part that may differ.
        same_run = json.dumps({**config, "training": {**config.get("training", {}), "total_kimg": None}},
                              sort_keys=True)
        reference = reference or same_run
        if same_run != reference:
            raise UserError(f"--run {run_dir} mixes the profile snapshots of different runs: {path} has another "
                            f"config than {paths[0]}.")
        records.append((profile["sigma_rel"], profile["step"], profile["nimg"], path))
    if max_nimg is not None:
        first = min(r[2] for r in records)
        records = [r for r in records if r[2] <= max_nimg]
        if not records:
            raise UserError(f"--kimg {max_nimg / 1000:g}: --run {run_dir} holds no profile snapshot that early (the "
                            f"first is at {first / 1000:g} kimg).")
    seen = {}
    for sigma_rel, step, _, path in records:
        if (f"{sigma_rel:g}", step) in seen:
            raise UserError(f"--run {run_dir} holds two snapshots of profile {sigma_rel:g} at step {step}: "
                            f"{seen[f'{sigma_rel:g}', step]} and {path}.")
        seen[f"{sigma_rel:g}", step] = path
    last_step = max(r[1] for r in records)
    if last_step > MAX_STEPS:
        raise UserError(f"--run {run_dir} holds a profile snapshot at optimizer step {last_step}, more than the "
                        f"{MAX_STEPS:.0e} whose weights the fit sums over.")
    _, _, last_nimg, last_path = max((r for r in records if r[1] == last_step), key=lambda r: r[2])
    base = configs[last_path]
    stored = [(gamma_of(sigma_rel), step) for sigma_rel, step, _, _ in records]
    fits = [fit(stored, (gamma_of(s), last_step)) for s in sigma_rels]

    layout = checkpoint.network_shapes(base["network"])
    names = {name for name, _ in layout.named_parameters()}
    sums = [{} for _ in sigma_rels]
    buffers = None
    for j, (_, step, _, path) in enumerate(records):
        state, _ = checkpoint.load_power_ema(path)
        for total, (x, _) in zip(sums, fits):
            for name in names:
                total[name] = total.get(name, 0) + x[j] * state[name].double()
        if step == last_step and buffers is None:
            buffers = {k: v for k, v in state.items() if k not in names}
    results = []
    for sigma_rel, total, (_, error) in zip(sigma_rels, sums, fits):
        net = checkpoint.build_network(base["network"])
        dtypes = {name: p.dtype for name, p in net.named_parameters()}
        net.load_state_dict({**buffers, **{k: v.to(dtypes[k]) for k, v in total.items()}})
        config = {**base, "source": {"kind": "post-hoc EMA", "sigma_rel": sigma_rel, "gamma": gamma_of(sigma_rel),
                                     "step": last_step, "nimg": last_nimg, "snapshots": len(records),
                                     "profiles": sorted({r[0] for r in records}), "fit_error": error}}
        results.append({"sigma_rel": sigma_rel, "net": net.eval().requires_grad_(False), "config": config,
                        "fit_error": error, "nimg": last_nimg})
    return results
