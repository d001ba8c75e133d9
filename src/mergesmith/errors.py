"""Errors a user can act on.

Every problem caused by the user's input (recipe, model folders, output path) is raised as a
:class:`MergeError` whose message names the field or file and says how to fix it. The CLI
prints that message as one line and exits with ``exit_code``; internal bugs raise ordinary
exceptions and keep their traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class MergeError(Exception):
    """A user-fixable problem (bad recipe, missing model, existing output...). Exit code 2."""

    exit_code = 2


class MergeIOError(MergeError):
    """Reading or writing failed for a reason outside the recipe (disk full, I/O error). Exit code 1."""

    exit_code = 1


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """Return ``" Did you mean 'x'?"`` for the closest choice, or an empty string."""
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""
