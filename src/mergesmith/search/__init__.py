"""``mergesmith search``: find the best recipe in a space of recipes automatically.

* :mod:`.space` — the space file: ranges in a recipe, the ``search:`` block, validation;
* :mod:`.loop` — samplers (optuna: CMA-ES, TPE, random), batches, resume, Ray;
* :mod:`.trial` — one trial: merge into a temporary folder, score, clean up;
* :mod:`.report` — the best model, its model card and the plots;
* :mod:`.command` — the click command (registered on ``mergesmith``'s group).

Python API::

    from mergesmith.search import search
    result = search("space.yml", "best-model", budget=40, seed=0)
    print(result.best["score"], result.best["params"])
"""

from .loop import SearchResult, search
from .space import Space, load_space, parse_space

__all__ = ["SearchResult", "Space", "load_space", "parse_space", "search"]
