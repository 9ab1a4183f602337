"""Every noise-level grid the samplers and the losses use, and the clipping of a grid to a network's training range.

Grids are float64 tensors of EDM's VE noise levels sigma (x_sigma = x_0 + sigma n):
- `rho_schedule` (EDM's time steps, ending in 0), `bridge_sigmas` and `padis_sigmas` (the same without the 0);
- the discrete VP (DDPM) schedule: `linear_beta_alphas_cumprod`, its respacings `respaced_timesteps` and their levels
  `vp_grid_sigmas` (increasing: training draws from it), `vp200_sigmas` / `respaced_sigmas` (the MSM reference's
  200 levels and evenly spaced subsets of them, decreasing) and `ddpm_sigmas` (DPS's grid);
- `geometric_ladder` (NCSNv2 / ALD);
- `training_sigma_max`, `sigmas_in_training_range`: where a snapshot's network stops having seen noise;
- `check_sigmas`: the one validation of a sampling grid.
Nothing here knows networks; training/networks.py and training/loss.py import the VP grid from here.
"""

import math

import torch

from dnnlib import UserError

# ----------------------------------------------------------------------------
# EDM's rho schedule and the grids built on it.


def rho_schedule(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                 device="cpu") -> torch.Tensor:
    """EDM's time steps: sigma_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, then 0.

    Returns float64 (num_steps + 1,), decreasing, ending in 0.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    i = torch.arange(num_steps, dtype=torch.float64, device=device)
    frac = i / max(num_steps - 1, 1)
    t = (sigma_max ** (1 / rho) + frac * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([t, torch.zeros(1, dtype=torch.float64, device=device)])


def bridge_sigmas(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                  device="cpu") -> torch.Tensor:
    """EDM's rho schedule without its final 0: float64 (num_steps + 1,), decreasing from sigma_max to sigma_min, so
    that num_steps ODE steps join them (the dual bridge's encode and decode paths)."""
    return rho_schedule(num_steps + 1, sigma_min, sigma_max, rho, device=device)[:-1]


def padis_sigmas(num_steps: int = 100, sigma_min: float = 0.003, sigma_max: float = 10.0, rho: float = 7.0):
    """EDM's rho schedule without its trailing 0: PaDIS's levels, float64 (num_steps,). The defaults are PaDIS's
    README (100 steps from 10 to 0.003, rho 7)."""
    if not (isinstance(num_steps, int) and num_steps >= 2):
        raise UserError(f"--padis-steps must be an integer >= 2, got {num_steps!r}.")
    if not 0 < sigma_min < sigma_max:
        raise UserError(f"PaDIS's schedule needs 0 < --padis-sigma-min < --padis-sigma-max, got {sigma_min} and "
                        f"{sigma_max}.")
    return rho_schedule(num_steps, sigma_min, sigma_max, rho)[:-1]


def geometric_ladder(sigma_max: float, sigma_min: float, levels: int) -> torch.Tensor:
    """sigma_i = sigma_max r^i, i = 0..levels-1, with r = (sigma_min / sigma_max)^(1 / (levels - 1)): float64,
    decreasing from sigma_max to sigma_min (NCSNv2's geometric ladder, independent of the training sigmas)."""
    if not (isinstance(levels, int) and levels >= 2):
        raise UserError(f"--levels must be an integer >= 2, got {levels!r}.")
    if not 0 < sigma_min < sigma_max:
        raise UserError(f"The sigma ladder needs 0 < --sigma-min < --sigma-max, got {sigma_min} and {sigma_max}.")
    rate = (sigma_min / sigma_max) ** (1 / (levels - 1))
    sigmas = sigma_max * rate ** torch.arange(levels, dtype=torch.float64)
    sigmas[-1] = sigma_min  # exact ends (the power rounds in the last bits)
    return sigmas


# ----------------------------------------------------------------------------
# The discrete VP (DDPM) schedule and its respacings.


def linear_beta_alphas_cumprod(num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """abar_t = prod_{i<=t} (1 - beta_i), t = 0..num_steps-1, for DDPM's linear betas (float64, (num_steps,))."""
    # On the CPU even under `torch.device("meta")`, where training.snapshot lays out weights without memory: a
    # schedule is computed with, not stored as a weight.
    betas = torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64, device="cpu")
    return torch.cumprod(1 - betas, dim=0)


VP_GRID_RULES = ("ddim", "section")


def respaced_timesteps(num_steps: int = 1000, num_levels: int = 200, rule: str = "ddim") -> torch.Tensor:
    """The timesteps guided-diffusion keeps when it respaces a num_steps schedule to num_levels levels (its
    `space_timesteps`), increasing int64 (num_levels,):

    'ddim' (the respacing string 'ddimN', the MSM reference's 'ddim200'): the multiples of the smallest integer
        stride s with ceil(num_steps / s) = num_levels, t = 0, s, 2 s, ... (1000 -> 200: s = 5, t = 0 .. 995); counts
        that no integer stride gives are refused.
    'section' (the string 'N', one section): round(i (num_steps - 1) / (num_levels - 1)), i = 0..num_levels-1, so
        the first and the last step are kept (1000 -> 200: t = 0, 5, ..., 120, 126, 131, ..., 999); Python's
        round, and no value falls on a .5 tie for 1000 -> 200. DPS samples on this rule.
    """
    if rule not in VP_GRID_RULES:
        raise ValueError(f"the grid rule must be one of {', '.join(VP_GRID_RULES)}, got {rule!r}")
    if not 2 <= num_levels <= num_steps:
        raise ValueError(f"cannot respace {num_steps} steps to {num_levels} levels")
    if rule == "ddim":
        stride = next((s for s in range(1, num_steps) if -(-num_steps // s) == num_levels), None)
        if stride is None:
            raise ValueError(f"no integer stride respaces {num_steps} steps to exactly {num_levels} levels")
        return torch.arange(0, num_steps, stride, dtype=torch.int64)
    stride = (num_steps - 1) / (num_levels - 1)
    return torch.tensor([round(i * stride) for i in range(num_levels)], dtype=torch.int64)


def vp_grid_sigmas(num_levels: int = 200, num_steps: int = 1000, beta_start: float = 1e-4,
                   beta_end: float = 0.02, rule: str = "ddim") -> torch.Tensor:
    """The MSM reference's noise levels: sigma_k = sqrt(1 / abar_{t_k} - 1) at the respaced timesteps t_k
    (`respaced_timesteps`, by `rule`) of the linear-beta schedule (float64, increasing; for the defaults 0.0100 to
    151.18 by the reference's 'ddim' rule, to 157.41 by the 'section' rule). Respacing keeps abar at the kept steps,
    so these are the levels the reference trains and samples on."""
    alphas_cumprod = linear_beta_alphas_cumprod(num_steps, beta_start, beta_end)
    return (1 / alphas_cumprod[respaced_timesteps(num_steps, num_levels, rule)] - 1).sqrt()


def vp200_sigmas(device="cpu", rule: str = "ddim") -> torch.Tensor:
    """The MSM reference's 200 noise levels, float64 (200,), decreasing from about 151.2 to about 0.0100: the levels
    of `vp_grid_sigmas` (1000 linear betas in [1e-4, 0.02] respaced to 200 steps, 'ddim' the reference's ddim200
    rule t = 0, 5, ..., 995; 'section' the respacing string '200', t_i = round(i * 999 / 199), from 157.4, which this
    project used before the rule was recorded, `vp_grid_of`) in decreasing order."""
    return vp_grid_sigmas(rule=rule).flip(0).to(device)


def respaced_sigmas(num_steps: int | None = None, rule: str = "ddim") -> torch.Tensor:
    """`num_steps` levels of the VP-200 grid (`vp200_sigmas` by `rule`) at evenly spaced indices, first and last
    kept; None or 200 gives the grid itself. float64 (num_steps,), decreasing."""
    grid = vp200_sigmas(rule=rule)
    if num_steps is None or num_steps == len(grid):
        return grid
    if not (isinstance(num_steps, int) and 1 <= num_steps <= len(grid)):
        raise UserError(f"--steps must be an integer in 1..{len(grid)} (levels of the VP-200 grid), got {num_steps}.")
    return grid[torch.linspace(0, len(grid) - 1, num_steps, dtype=torch.float64).round().long()]


def ddpm_sigmas(num_steps: int = 1000) -> torch.Tensor:
    """DDPM's 1000-step linear-beta grid (beta 1e-4 .. 0.02, the schedule DPS samples on) in EDM's sigma form,
    sigma_t = sqrt(1 / abar_t - 1), respaced to `num_steps` levels as guided-diffusion's `space_timesteps` does for
    DPS's plain step count (its section rule: first and last step kept; `respaced_timesteps`). float64
    (num_steps,), decreasing from about 157.4 to 0.0100."""
    if not (isinstance(num_steps, int) and 2 <= num_steps <= 1000):
        raise UserError(f"--steps for DPS must be an integer in 2..1000 (levels of DDPM's 1000-step grid), "
                        f"got {num_steps}.")
    return vp_grid_sigmas(num_levels=num_steps, rule="section").flip(0)


def vp_grid_of(loss_config: dict | None) -> str:
    """The rule of the 200-level VP grid (VP_GRID_RULES) a snapshot is sampled on by default: the one its loss
    records ('vp_grid'; train.py records it for --sigma-dist vp200, converted reference models record 'ddim');
    otherwise the reference's 'ddim'. A loss config of --sigma-dist vp200 written before the rule was recorded is
    read as 'section' (`training.loss.with_recorded_vp_grid`, applied when a snapshot or training state is loaded):
    its network was trained on that grid."""
    loss = loss_config or {}
    if "vp_grid" in loss:
        return loss["vp_grid"]
    return "section" if loss.get("sigma_dist") == "vp200" else "ddim"


# ----------------------------------------------------------------------------
# The training range of a snapshot and the validation of a grid.

EDM_SIGMA_MAX = 80.0  # EDM's sampling sigma_max for networks trained with its log-normal sigma
LOGNORMAL_TAIL_Z = 4.753  # the standard normal's 1 - 1e-6 quantile


def training_sigma_max(loss_config: dict | None) -> tuple[float, str]:
    """The highest noise level a network was trained on, from its snapshot's loss config ('loss': class_name and
    kwargs), and the reason, for the log:
      log-normal sigma (EDMLoss; MSM and Ambient losses with sigma_dist 'lognormal'): min(80, exp(P_mean + 4.753
        P_std)), the 1 - 1e-6 quantile capped at EDM's sigma_max 80 (the level EDM samples these networks from;
        80 for the defaults P_mean -1.2, P_std 1.2, whose quantile is 90);
      sigma_dist 'vp200' (the reference's grid): its top, sigma_max of `vp_grid_sigmas` by the rule of `vp_grid_of`
        (151.2 for 'ddim', 157.4 for 'section');
      VPLoss: sigma_vp(1) = sqrt(exp(beta_d / 2 + beta_min) - 1) (152.3); VELoss: its sigma_max (100);
      anything else (no loss in the config): inf, nothing to clip to."""
    loss = dict(loss_config or {})
    name = str(loss.get("class_name", "")).rsplit(".", 1)[-1]
    if name == "VPLoss":
        top = math.sqrt(math.exp(0.5 * loss.get("beta_d", 19.9) + loss.get("beta_min", 0.1)) - 1)
        return top, f"trained with VP sigma up to {top:.1f}"
    if name == "VELoss":
        top = float(loss.get("sigma_max", 100.0))
        return top, f"trained with VE sigma up to {top:g}"
    if loss.get("sigma_dist") == "vp200":
        rule = vp_grid_of(loss)
        top = float(vp_grid_sigmas(rule=rule)[-1])
        return top, f"trained on the VP-200 grid ({rule} rule) up to {top:.1f}"
    if name == "EDMLoss" or loss.get("sigma_dist") == "lognormal":
        p_mean, p_std = loss.get("P_mean", -1.2), loss.get("P_std", 1.2)
        top = min(EDM_SIGMA_MAX, math.exp(p_mean + LOGNORMAL_TAIL_Z * p_std))
        return top, (f"trained with log-normal sigma (P_mean {p_mean}, P_std {p_std}); starting at most at "
                     f"min(EDM's 80, its 1 - 1e-6 quantile) = {top:.1f}")
    return math.inf, "the snapshot does not say which noise levels it was trained on"


def sigmas_in_training_range(sigmas: torch.Tensor, loss_config: dict | None) -> tuple[torch.Tensor, str]:
    """The levels of a decreasing grid at or below `training_sigma_max` (at least the last one), and one sentence
    for the log saying where sampling starts and why."""
    top, reason = training_sigma_max(loss_config)
    kept = sigmas[sigmas <= top * (1 + 1e-9)]
    kept = kept if len(kept) else sigmas[-1:]
    dropped = len(sigmas) - len(kept)
    where = f"{len(kept)} levels from sigma {kept[0].item():.3g}"
    return kept, (f"{where} ({reason}; {dropped} higher levels of the grid dropped)" if dropped else
                  f"{where} ({reason})")


def check_sigmas(sigmas: torch.Tensor) -> torch.Tensor:
    """A sampling grid as float64: 1-D, positive, strictly decreasing (the solvers' one check)."""
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
    decreasing = bool((sigmas[1:] < sigmas[:-1]).all()) if sigmas.ndim == 1 else False
    if sigmas.ndim != 1 or len(sigmas) < 1 or not bool((sigmas > 0).all()) or not decreasing:
        raise ValueError("sigmas must be a 1-D tensor of positive, strictly decreasing noise levels "
                         "(drop the trailing 0 of rho_schedule)")
    return sigmas
