"""``mergesmith studio``: serve the app with uvicorn and print its address (and token)."""

from __future__ import annotations

import os
import sys
import threading
import webbrowser

from .security import StudioConfig, is_local


def serve(config: StudioConfig, *, open_browser: bool = True, echo=print) -> None:
    import uvicorn

    from .app import create_app

    os.makedirs(config.workdir, exist_ok=True)
    os.chdir(config.workdir)  # relative paths in recipes are relative to the workdir
    app = create_app(config)
    shown = "localhost" if is_local(config.host) else config.host
    url = f"http://{shown}:{config.port}/"
    if config.token is not None:
        url += f"?token={config.token}"
    echo(f"mergesmith studio: {url}")
    echo(f"  workdir {config.workdir} (runs, history, reports); readable roots: "
         f"{', '.join(config.roots)}")
    if config.token is not None:
        echo(f"  token (required, --host {config.host} is not local): {config.token}")
    echo("  Ctrl-C stops the studio (a running merge is interrupted; Resume continues it)")
    if open_browser:
        threading.Timer(1.0, lambda: webbrowser.open(url)).start()
    uvicorn.run(app, host=config.host, port=config.port, log_level="warning",
                timeout_graceful_shutdown=3)
    sys.stdout.flush()
