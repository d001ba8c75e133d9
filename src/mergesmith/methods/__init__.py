"""Merge methods: pure functions of tensors and parameters, plus their registry."""

from . import (  # noqa: F401  (importing a module registers its methods)
    arcee_fusion,
    consensus,
    fisher,
    linear,
    model_stock,
    moe_parts,
    nearswap,
    passthrough,
    ram,
    regmean,
    sce,
    spectral,
    spherical,
    svc,
    task_arithmetic,
)
from .contract import BoundMethod
from .in_memory import merge_state_dicts, merge_tensors
from .registry import (
    LINES,
    REQUIRED,
    SVC,
    BasePolicy,
    Extension,
    MergeInputs,
    MethodSpec,
    Param,
    Scope,
    all_methods,
    get_method,
    merge_method,
    register,
)
from .seeding import tensor_generator

__all__ = ["LINES", "REQUIRED", "SVC", "BasePolicy", "BoundMethod", "Extension", "MergeInputs",
           "MethodSpec", "Param", "Scope", "all_methods", "get_method", "merge_method",
           "merge_state_dicts", "merge_tensors", "register", "tensor_generator"]
