"""Learning-rate schedules of train.py (--lr-schedule): the rate of the optimizer step taken at training position
cur_nimg, as one pure function of the position and the run's options, so that a resumed run recomputes exactly the
rates an uninterrupted one uses (no scheduler state to save).

Every schedule is multiplied by EDM's linear ramp-up over the first `rampup_kimg` (the factor is 0 at the very first
step, as in EDM).
- constant: the base rate (EDM's schedule; the default).
- isqrt: EDM2's inverse square root decay, base / sqrt(max(nimg / ref_nimg, 1)): flat up to the reference point, then
  halving the rate for every 4x more images.
- cosine: a half cosine from the base rate at the end of the ramp-up down to `final` x base at `total_kimg`
  (--duration), flat at `final` x base beyond it.

A run records its schedule in training_options.json as {'kind': 'isqrt', 'ref_kimg': ...} or {'kind': 'cosine',
'final': ...}; the constant schedule is not recorded, so that runs started before schedules existed still continue.
"""

import math

from dnnlib import UserError

SCHEDULES = ("constant", "isqrt", "cosine")

# --lr-ref's default, in Mimg. EDM2 decays after 70k steps of batch 2048 (about 143 Mimg) in runs of up to ~2 Gimg,
# i.e. over the last ~15x of its reference; 10 kimg puts the quickstart-sized runs here (30-120 kimg) at 3-12x.
DEFAULT_REF_MIMG = 0.01


def learning_rate(cur_nimg: int, base_lr: float, rampup_kimg: float, total_kimg: float,
                  schedule: dict | None = None) -> float:
    """The learning rate of the step taken at training position cur_nimg (images trained on before it)."""
    ramp = min(cur_nimg / max(rampup_kimg * 1000, 1e-8), 1)
    kind = "constant" if schedule is None else schedule["kind"]
    if kind == "constant":
        return base_lr * ramp  # EDM's expression, unchanged, so constant runs keep their numbers bit for bit
    if kind == "isqrt":
        return base_lr / math.sqrt(max(cur_nimg / (schedule["ref_kimg"] * 1000), 1)) * ramp
    if kind == "cosine":
        rampup_nimg, total_nimg = rampup_kimg * 1000, total_kimg * 1000
        progress = min(max((cur_nimg - rampup_nimg) / max(total_nimg - rampup_nimg, 1e-8), 0), 1)
        final = schedule["final"]
        return base_lr * (final + (1 - final) * 0.5 * (1 + math.cos(math.pi * progress))) * ramp
    raise ValueError(f"unknown learning-rate schedule {kind!r}")


def schedule_options(kind: str, ref: float | None, final: float | None, rampup: float, duration: float) -> dict | None:
    """--lr-schedule, --lr-ref (Mimg), --lr-final, --lr-rampup and --duration (Mimg) -> the run's 'lr_schedule'
    entry (None for constant); UserError in one sentence for options that do not fit together."""
    if kind not in SCHEDULES:
        raise UserError(f"--lr-schedule {kind!r:.40} is not one of {', '.join(SCHEDULES)}.")
    if ref is not None and kind != "isqrt":
        raise UserError(f"--lr-ref sets the reference point of --lr-schedule isqrt; it does not apply to {kind}.")
    if final is not None and kind != "cosine":
        raise UserError(f"--lr-final sets the end of --lr-schedule cosine; it does not apply to {kind}.")
    if kind == "constant":
        return None
    if kind == "isqrt":
        return {"kind": "isqrt", "ref_kimg": (DEFAULT_REF_MIMG if ref is None else ref) * 1000}
    final = 0.0 if final is None else final
    if not 0 <= final <= 1:
        raise UserError(f"--lr-final {final:g} must be a fraction of --lr in [0, 1].")
    if rampup >= duration:
        raise UserError(f"--lr-schedule cosine decays after the ramp-up, but --lr-rampup {rampup:g} Mimg is not "
                        f"shorter than --duration {duration:g} Mimg.")
    return {"kind": "cosine", "final": final}

