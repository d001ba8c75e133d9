"""torch for the package's modules, or — for ``mergesmith check`` — a stand-in with only
torch's dtypes.

Planning a merge needs dtypes (names, sizes, promotion), never tensors, and importing
torch takes about 0.8 s: most of what ``check`` took. Modules of the package write
``from ._torch import torch``; that is torch itself unless :func:`use_stand_in` ran first
(the ``check`` command does, before importing anything else). With the stand-in, whatever
else is asked of torch, and any ``import torch`` (ours or a library's), raises
:class:`TorchNeeded`: the command then runs again in a new process with torch, so stand-in
dtypes and real ones never meet.
"""

from __future__ import annotations

import gc
import importlib.abc
import sys
from typing import Any

_stand_in = False

FREEZE_AFTER_IMPORT = False
"""Set by the command line (a process of its own): once torch is imported, its objects go
to the garbage collector's permanent generation, so that the collections of the imports
and work that follow do not walk them again and again (≈ 0.2 s of every command's
start-up). A library user's process keeps the collector as it was."""


class TorchNeeded(BaseException):
    """Planning asked the stand-in for something only torch has (a BaseException, so no
    ``except Exception`` on the way turns it into a user error)."""


RESIDENT_BYTES = 200 * 1024 * 1024
"""Resident memory that importing torch adds (CPU build of torch 2.13: 197 MB with the
package's modules), which ``check`` adds to its own when it planned with the stand-in."""


def stand_in_active() -> bool:
    """Whether this process plans with the stand-in (so torch's memory is not in its own)."""
    return _stand_in


def use_stand_in() -> bool:
    """Plan with the stand-in from now on; False (nothing changes) where torch or a module
    of the package that uses it is already imported."""
    global _stand_in
    if "torch" in sys.modules or "torch" in globals():
        return False
    _stand_in = True
    sys.meta_path.insert(0, _BlockTorch())
    return True


def __getattr__(name: str) -> Any:
    if name != "torch":
        raise AttributeError(name)
    module: Any = _STAND_IN if _stand_in else _import_torch()
    globals()["torch"] = module
    return module


def _import_torch() -> Any:
    """``import torch`` with the garbage collector paused: the import creates hundreds of
    thousands of objects that live as long as the process, and no garbage."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        import torch
    finally:
        if FREEZE_AFTER_IMPORT:
            gc.freeze()
        if enabled:
            gc.enable()
    return torch


class _BlockTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Any, target: Any = None) -> None:
        if fullname == "torch" or fullname.startswith("torch."):
            raise TorchNeeded(f"import {fullname}")
        return None


class DType:
    """A dtype of the stand-in: its name, size and kind, printed as torch prints its own."""

    __slots__ = ("name", "itemsize", "is_floating_point", "is_signed")

    def __init__(self, name: str, itemsize: int, floating: bool, signed: bool) -> None:
        self.name, self.itemsize = name, itemsize
        self.is_floating_point, self.is_signed = floating, signed

    @property
    def is_complex(self) -> bool:
        return False

    def __repr__(self) -> str:
        return f"torch.{self.name}"

    def __reduce__(self) -> tuple:
        raise TorchNeeded(f"pickling torch.{self.name}")


class _StandIn:
    """What ``check`` may ask of torch: dtypes and their promotion."""

    dtype = DType

    def __init__(self) -> None:
        floats = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2,
                  "float8_e4m3fn": 1, "float8_e5m2": 1}
        ints = {"int64": 8, "int32": 4, "int16": 2, "int8": 1, "uint64": 8, "uint32": 4,
                "uint16": 2, "uint8": 1, "bool": 1}
        for name, size in floats.items():
            setattr(self, name, DType(name, size, True, True))
        for name, size in ints.items():
            setattr(self, name, DType(name, size, False, name[0] == "i"))
        for alias, name in (("float", "float32"), ("double", "float64"), ("half", "float16"),
                            ("long", "int64"), ("int", "int32"), ("short", "int16")):
            setattr(self, alias, getattr(self, name))

    def promote_types(self, a: DType, b: DType) -> DType:
        """torch.promote_types for the dtypes planning meets (floats of one kind or two)."""
        if a is b:
            return a
        if not (a.is_floating_point and b.is_floating_point) or a.itemsize == 1 \
                or b.itemsize == 1:
            raise TorchNeeded(f"promote_types({a}, {b})")
        if a.itemsize != b.itemsize:
            return a if a.itemsize > b.itemsize else b
        return self.float32  # float16 with bfloat16

    def __getattr__(self, name: str) -> Any:
        raise TorchNeeded(f"torch.{name}")


_STAND_IN = _StandIn()
