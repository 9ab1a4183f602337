# shim for the scripts until methods.py lands
"""The old home of guidance, for generate.py only: training/sampling/guidance.py (one CFG helper for full and
partial denoisers: `cfg_denoiser`)."""

from training.sampling.guidance import (  # noqa: F401
    CFG_CONVENTIONS,
    POTENTIALS,
    GuidanceTerm,
    cfg_coefficient,
    cfg_denoiser,
    check_sigma_range,
    correction,
    guided,
)

cfg_partial_denoiser = cfg_denoiser
