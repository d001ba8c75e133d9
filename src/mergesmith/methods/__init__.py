"""Merge methods: pure functions of tensors and parameters, plus their registry."""

from . import linear, passthrough, task_arithmetic  # noqa: F401  (registration)
from .registry import (REQUIRED, BasePolicy, MergeInputs, MethodSpec, Param, Scope,
                       all_methods, get_method, merge_method, register)

__all__ = ["REQUIRED", "BasePolicy", "MergeInputs", "MethodSpec", "Param", "Scope",
           "all_methods", "get_method", "merge_method", "register"]
