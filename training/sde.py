# shim for the scripts until methods.py lands
"""The old score-based solvers of reconstruct.py, as adapters over training/sampling/solvers.py. Nothing but the
scripts may import it."""

from training.sampling.conditioning import dps
from training.sampling.schedules import geometric_ladder, padis_sigmas  # noqa: F401 (re-exported for the scripts)
from training.sampling.solvers import (  # noqa: F401 (re-exported for the scripts)
    ALD_INITS,
    PADIS_INITS,
    Langevin,
    PredictorCorrector,
    ald_initial_state,
    ald_step_sizes,
    auto_eps,
    noise_start,
    padis_initial_state,
    padis_solver,
    warm_start,
)


def annealed_langevin(denoiser, x, generator, sigmas, step_sizes, steps_each: int, *, noise_boost: float = 1.0,
                      sigma_offset: int = 0, conditioning=None, final_denoise: bool = False):
    solver = Langevin(step_sizes, steps_each, noise_boost, sigma_offset, final_denoise=final_denoise)
    return solver(denoiser, x, generator, sigmas, conditioning=conditioning)


def predictor_corrector(denoiser, x, generator, sigmas, *, predictor: str = "em", corrector_steps: int = 1,
                        snr: float = 0.16, sde: str = "ve", conditioning=None, final_denoise: bool = False):
    solver = PredictorCorrector(predictor, corrector_steps, snr, sde, final_denoise)
    return solver(denoiser, x, generator, sigmas, conditioning=conditioning)


def check_padis_options(zeta: float, inner_steps: int, alpha_factor: float):
    dps(None, None, zeta=zeta, law="state")
    padis_solver(padis_sigmas(2), inner_steps, alpha_factor)


def padis_dps_langevin(denoiser, x, generator, sigmas, operator, y, mask=None, *, zeta: float, inner_steps: int = 10,
                       alpha_factor: float = 0.5):
    term = dps(operator, y, mask, zeta=zeta, law="state")
    return padis_solver(sigmas, inner_steps, alpha_factor)(denoiser, x, generator, sigmas, conditioning=term)
