"""Small generic helpers shared by the scripts (no deep-learning code lives here)."""

from .util import EasyDict, UserError, construct_class_by_name, get_obj_by_name, run_cli

__all__ = ["EasyDict", "UserError", "construct_class_by_name", "get_obj_by_name", "run_cli"]
