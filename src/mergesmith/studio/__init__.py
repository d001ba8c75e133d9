"""mergesmith studio: a local web app to write recipes, check and plan them, merge, inspect
and compare (``mergesmith studio``; needs ``pip install 'mergesmith[studio]'``).

A small Starlette (ASGI) app served by uvicorn, with static HTML/CSS/JS shipped in the
package (no CDN: it works offline). Merges run one at a time in a worker subprocess
(``python -m mergesmith.studio.worker``) whose progress is streamed to the page with
Server-Sent Events; Cancel interrupts it like Ctrl-C, so nothing is published and the
finished tensors stay in ``OUT.partial`` for Resume.
"""

from __future__ import annotations

from .security import StudioConfig

__all__ = ["StudioConfig", "create_app"]


def create_app(config: StudioConfig):  # noqa: ANN201 - Starlette is imported lazily
    from .app import create_app as _create

    return _create(config)
