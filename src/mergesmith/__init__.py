"""mergesmith: merge large language models from mergekit-style YAML recipes.

Python API::

    import mergesmith
    report = mergesmith.check("recipe.yml")      # validate + plan, no tensor data read
    print(report.summary())
    mergesmith.run("recipe.yml", "merged-model")  # write the merged model atomically
"""

__version__ = "0.1.0"

from .api import CheckReport, RunResult, check, plan, run, verify  # noqa: E402
from .errors import MergeError, MergeIOError  # noqa: E402
from .methods import merge_state_dicts, merge_tensors  # noqa: E402
from .options import Options  # noqa: E402

__all__ = ["CheckReport", "MergeError", "MergeIOError", "Options", "RunResult", "__version__",
           "check", "merge_state_dicts", "merge_tensors", "plan", "run", "verify"]
