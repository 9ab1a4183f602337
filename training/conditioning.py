# shim for the scripts until methods.py lands
"""The old home of the conditioning terms, for reconstruct.py only: training/sampling/conditioning.py (terms now
take the solver's `Step` instead of sigma)."""

from training.sampling.conditioning import dds, dps, jalal, jalal_normalized, projection  # noqa: F401
