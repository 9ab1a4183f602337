"""Small generic helpers shared by the scripts (no deep-learning code lives here)."""

from .util import (
    ConfigError,
    EasyDict,
    Field,
    UserError,
    atomic_write,
    check_fields,
    check_outdir,
    check_outdir_settings,
    file_sha256,
    run_cli,
    write_outdir_settings,
)

__all__ = ["ConfigError", "EasyDict", "Field", "UserError", "atomic_write", "check_fields", "check_outdir",
           "check_outdir_settings", "file_sha256", "run_cli", "write_outdir_settings"]
