"""Merge methods: pure functions of tensors and parameters, plus their registry."""

from . import (  # noqa: F401  (importing a module registers its methods)
    arcee_fusion,
    consensus,
    linear,
    model_stock,
    nearswap,
    passthrough,
    ram,
    sce,
    spectral,
    spherical,
    svc,
    task_arithmetic,
)
from .apply import merge_state_dicts, merge_tensors, tensor_generator
from .registry import (REQUIRED, BasePolicy, MergeInputs, MethodSpec, Param, Scope,
                       all_methods, get_method, merge_method, register)

__all__ = ["REQUIRED", "BasePolicy", "MergeInputs", "MethodSpec", "Param", "Scope",
           "all_methods", "get_method", "merge_method", "merge_state_dicts", "merge_tensors",
           "register", "tensor_generator"]
