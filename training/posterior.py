# shim for the scripts until methods.py lands
"""The old posterior samplers of reconstruct.py, as adapters over training/sampling/ (MSM's data-consistency steps
and DPS in sampling/conditioning.py, the baselines in sampling/baselines.py). Nothing but the scripts may import it."""

from training.samplers import msm_heun_sampler, msm_sampler
from training.sampling.baselines import CS_DEFAULTS, CS_REGULARISERS, cs_app, cs_mri, zero_filled  # noqa: F401
from training.sampling.conditioning import (  # noqa: F401 (re-exported for the scripts)
    DPS_ZETA,
    check_dc_step,
    dps,
    msm_aggregate_step,
    msm_partial_step,
)
from training.sampling.denoisers import net_denoiser
from training.sampling.schedules import ddpm_sigmas, respaced_sigmas  # noqa: F401 (re-exported for the scripts)
from training.sampling.solvers import Ancestral, noise_start


def image_denoiser(net, class_labels=None):
    return net_denoiser(net, class_labels, mask_channel="full")


def msm_posterior_sampler(partial_denoiser, latents, mask_law, generator, y_obs, *, placement: str, dc_step: float,
                          mask=None, operator=None, solver: str = "ancestral", **sampler_kwargs):
    if solver not in ("ancestral", "heun"):
        raise ValueError(f"solver must be 'ancestral' or 'heun', got {solver!r}")
    if placement == "partial":
        if mask is None:
            raise ValueError("the partial data-consistency step needs the measurement mask")
        hooks = {"dc_partial": msm_partial_step(y_obs, mask, dc_step)}
    elif placement == "aggregate":
        hooks = {"dc_aggregate": msm_aggregate_step(operator, y_obs, dc_step)}
    else:
        raise ValueError(f"placement must be 'partial' or 'aggregate', got {placement!r}")
    sampler = msm_heun_sampler if solver == "heun" else msm_sampler
    return sampler(partial_denoiser, latents, mask_law, generator, **hooks, **sampler_kwargs)


def dps_sampler(denoiser, latents, generator, operator, y_obs, mask=None, *, sigmas=None, step_size: float = DPS_ZETA):
    term = dps(operator, y_obs, mask, zeta=step_size, law="ddpm")
    sigmas = ddpm_sigmas() if sigmas is None else sigmas
    return Ancestral(eta=1.0, precision="double", noise="state")(
        denoiser, noise_start(latents, float(sigmas[0])), generator, sigmas, conditioning=term)
