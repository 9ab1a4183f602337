# shim for the scripts until methods.py lands
"""The dual bridge of generate.py, as an adapter over training/sampling/solvers.py `ODE` (`dual_bridge` there)."""

from training.sampling.solvers import dual_bridge  # noqa: F401
