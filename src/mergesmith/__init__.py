"""mergesmith: merge large language models from mergekit-style YAML recipes.

Python API::

    import mergesmith
    report = mergesmith.check("recipe.yml")      # validate + plan, no tensor data read
    print(report.summary())
    mergesmith.run("recipe.yml", "merged-model")  # write the merged model atomically

The names below are imported on first use, so that importing the package (the command
line's ``--help``, a Ray worker unpickling a task) does not import torch.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {"CheckReport": "api", "RunResult": "api", "check": "api", "plan": "api",
         "run": "api", "verify": "api", "MergeError": "errors", "MergeIOError": "errors",
         "merge_state_dicts": "methods", "merge_tensors": "methods", "Options": "options"}

__all__ = ["CheckReport", "MergeError", "MergeIOError", "Options", "RunResult", "__version__",
           "check", "merge_state_dicts", "merge_tensors", "plan", "run", "verify"]

if TYPE_CHECKING:
    from .api import CheckReport, RunResult, check, plan, run, verify
    from .errors import MergeError, MergeIOError
    from .methods import merge_state_dicts, merge_tensors
    from .options import Options


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'mergesmith' has no attribute {name!r}")
    imported = importlib.import_module(f".{module}", __name__)
    for other, where in _LAZY.items():  # next time plain attributes
        if where == module:
            globals()[other] = getattr(imported, other)
    return globals()[name]


class _Package(types.ModuleType):
    """``mergesmith.plan`` is the API function, as it always was, although a subpackage
    of that name exists: importing the subpackage does not rebind the attribute."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "plan" and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
