"""One merge of the studio, in its own process: ``python -m mergesmith.studio.worker
RECIPE OUT [--resume] [--moe]``. Prints one JSON object per line on stdout (``plan``,
``progress``, ``done``, ``error``); SIGINT (the studio's Cancel) stops it like Ctrl-C:
nothing is published and the finished tensors stay in ``OUT.partial`` for ``--resume``."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from typing import Any


def emit(**event: Any) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def main(argv: list[str]) -> int:
    recipe, out = argv[0], argv[1]
    resume, moe = "--resume" in argv, "--moe" in argv
    # Cancel is SIGINT: handled even when the studio was started with SIGINT ignored (a
    # background job of a shell), which a child inherits; TERM stops it the same way
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    delay = float(os.environ.get("MERGESMITH_STUDIO_ITEM_DELAY", "0") or 0)  # tests: slow down
    import warnings

    from ..errors import MergeError
    from ..options import Options

    warnings.simplefilter("ignore")
    state = {"bytes": 0, "tensors": 0, "last": 0.0}

    def progress(plan: Any):
        emit(event="plan", total_bytes=plan.bytes_written, total_tensors=len(plan.tensors))

        def update(nbytes: int, finished: bool) -> None:
            state["bytes"] += nbytes
            state["tensors"] += bool(finished)
            now = time.monotonic()
            if now - state["last"] > 0.1 or state["tensors"] == len(plan.tensors):
                state["last"] = now
                emit(event="progress", bytes=state["bytes"], tensors=state["tensors"])
            if delay:
                time.sleep(delay)

        return update

    try:
        options = Options.parse(resume=resume, threads=1 if delay else None)
        if moe:
            from ..moe import run_moe

            run_moe(recipe, out, options, progress=progress)
        else:
            from ..api import run

            run(recipe, out, options, progress=progress)
    except KeyboardInterrupt:
        emit(event="cancelled")
        return 130
    except MergeError as e:
        emit(event="error", message=str(e).replace("\n", " "))
        return e.exit_code
    except Exception as e:  # noqa: BLE001 - a bug: still one line for the page
        emit(event="error", message=f"{type(e).__name__}: {e}".replace("\n", " "))
        return 1
    emit(event="progress", bytes=state["bytes"], tensors=state["tensors"])
    emit(event="done")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
