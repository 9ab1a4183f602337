"""Small generic helpers shared by the scripts (no deep-learning code lives here)."""

from .util import ConfigError, EasyDict, Field, UserError, check_fields, check_outdir, run_cli

__all__ = ["ConfigError", "EasyDict", "Field", "UserError", "check_fields", "check_outdir", "run_cli"]
