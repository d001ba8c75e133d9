"""The studio's ASGI app (Starlette): JSON endpoints under ``/api``, the page and its
static assets, and the safety middleware (see :mod:`mergesmith.studio.security`)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
import time
import uuid
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from . import files
from .jobs import TERMINAL, JobManager
from .security import TOKEN_COOKIE, PathRefused, StudioConfig
from .templates import render as render_templates

STATIC = os.path.join(os.path.dirname(__file__), "static")
PLAN_LOCK = threading.Lock()  # planning is cheap; one at a time keeps memory flat


def error(message: str, status: int = 400, **extra: Any) -> JSONResponse:
    return JSONResponse({"ok": False, "error": message, **extra}, status_code=status)


# ------------------------------------------------------------------ safety middleware


class Guard:
    """Refuses requests from other origins, for other hosts, or without the token."""

    def __init__(self, app: ASGIApp, config: StudioConfig) -> None:
        self.app, self.config = app, config

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        headers = request.headers
        host = headers.get("host", "")
        problem = None
        if not self.config.host_allowed(host):
            problem = (421, f"host '{host}' refused: the studio answers only requests "
                            "addressed to it (open it at the address it printed)")
        origin = headers.get("origin")
        if problem is None and origin is not None and origin != "null":
            if origin.split("://", 1)[-1] != host:
                problem = (403, f"origin {origin} refused: the studio accepts requests only "
                                "from its own page")
        elif problem is None and origin == "null":
            problem = (403, "origin null refused")
        if problem is None and headers.get("sec-fetch-site") in ("cross-site", "same-site"):
            # same-site: another port of this host is another origin (another app)
            problem = (403, f"{headers['sec-fetch-site']} request refused")
        set_cookie = False
        if problem is None and self.config.token is not None:
            supplied = request.query_params.get("token") or request.cookies.get(TOKEN_COOKIE)
            auth = headers.get("authorization", "")
            if auth.lower().startswith("bearer "):
                supplied = auth[7:].strip()
            if not self.config.token_ok(supplied):
                problem = (401, "a token is required: open the address with ?token=... "
                                "that 'mergesmith studio' printed at start")
            set_cookie = request.query_params.get("token") is not None
        if problem is not None:
            response: Response = JSONResponse({"ok": False, "error": problem[1]},
                                              status_code=problem[0])
            await response(scope, receive, send)
            return

        async def send_with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                extra = [(b"x-content-type-options", b"nosniff"),
                         (b"x-frame-options", b"DENY"),
                         (b"referrer-policy", b"no-referrer"),
                         (b"content-security-policy",
                          b"default-src 'self'; img-src 'self' data:; style-src 'self' "
                          b"'unsafe-inline'; connect-src 'self'")]
                if set_cookie:
                    extra.append((b"set-cookie", (
                        f"{TOKEN_COOKIE}={self.config.token}; HttpOnly; SameSite=Strict; "
                        "Path=/").encode()))
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


# ------------------------------------------------------------------ check


LINE = re.compile(r"<recipe>:(\d+)(?::(\d+))?")
FIELD_AT = re.compile(r"([A-Za-z_][\w-]*(?:\[\d+\]|\.[\w-]+)*) \(<recipe>:\d+\)")
FIELD_AFTER = re.compile(r"<recipe>:\d+(?::\d+)?: ([A-Za-z_][\w-]*(?:\[\d+\]|\.[\w-]+)*)[:\s]")
UNKNOWN_KEY = re.compile(r"unknown key '([^']+)' in ([\w.\[\]-]+|the top level)")
DID_YOU_MEAN = re.compile(r"Did you mean '([^']+)'\?")


def locate(message: str) -> dict[str, Any]:
    """Line, column, field and a fix, from a one-line error message (best effort)."""
    out: dict[str, Any] = {"line": None, "column": None, "field": None, "fix": None}
    cause = message.split("Perhaps because of:", 1)
    if len(cause) == 2 and LINE.search(cause[1]):
        message = cause[1]  # the typo that made a value missing: point at the typo
    m = LINE.search(message)
    if m:
        out["line"] = int(m.group(1))
        out["column"] = int(m.group(2)) if m.group(2) else None
    m = UNKNOWN_KEY.search(message)
    if m:
        parent = "" if m.group(2) == "the top level" else m.group(2) + "."
        out["field"] = parent + m.group(1)
    else:
        m = FIELD_AT.search(message) or FIELD_AFTER.search(message)
        if m:
            out["field"] = m.group(1)
    m = DID_YOU_MEAN.search(message)
    if m:
        out["fix"] = f"did you mean '{m.group(1)}'?"
    return out


def is_moe(text: str) -> bool:
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        return False
    return isinstance(data, dict) and "experts" in data and "merge_method" not in data


def plan_json(report: Any) -> dict[str, Any]:
    from ..api import layer_map_lines

    p = report.plan
    layer_maps = []
    for module, layers in p.layer_maps.items():
        layer_maps.append({
            "module": module, "lines": layer_map_lines(layers),
            "layers": [{"output": layer.output,
                        "inputs": [[str(m), i] for m, i in layer.inputs]} for layer in layers]})
    return {
        "method": p.method.name,
        "tensors": len(p.tensors),
        "copied": sum(1 for t in p.tensors if t.copied),
        "shards": len(p.shards),
        "bytes_read": p.bytes_read,
        "bytes_written": p.bytes_written,
        "peak_memory": report.peak_memory + report.baseline,
        "seconds": report.seconds,
        "threads": report.threads,
        "models": [{"ref": str(m.ref), "tensors": len(m.index.tensors),
                    "bytes": m.index.total_bytes} for m in p.models],
        "layer_maps": layer_maps,
        "warnings": list(p.warnings),
        "notes": list(p.notes),
    }


def check_recipe(config: StudioConfig, text: str) -> tuple[int, dict[str, Any]]:
    from ..errors import MergeError

    if not text.strip():
        return 200, {"ok": False, "error": "the recipe is empty; start with 'merge_method: "
                     "...' or pick a template", **locate("")}
    if "\n" not in text:
        text += "\n"  # the API reads a single line as a file path
    try:
        files.check_recipe_paths(config, text)
    except PathRefused as e:
        return 403, {"ok": False, "error": str(e), **locate("")}
    try:
        with PLAN_LOCK:
            if is_moe(text):
                from ..moe import check_moe

                report = check_moe(text)
                return 200, {"ok": True, "kind": "moe", "summary": report.summary(),
                             "plan": None}
            from ..api import check

            report = check(text)
            summary = report.summary()
            for m in report.plan.models:
                if m.stage is None and not m.repo_id and not config.allowed(m.folder):
                    return 403, {"ok": False, "error": f"{m.ref}: outside the folders the "
                                 "studio may read (--workdir and --allow)", **locate("")}
    except MergeError as e:
        message = str(e).replace("\n", " ")
        return 200, {"ok": False, "error": message, **locate(message)}
    return 200, {"ok": True, "kind": "recipe", "summary": summary, "plan": plan_json(report)}


# ------------------------------------------------------------------ the app


def create_app(config: StudioConfig) -> Starlette:
    jobs = JobManager(config.workdir)
    reports = os.path.join(config.workdir, "studio", "inspect")

    async def body(request: Request) -> dict[str, Any]:
        try:
            data = await request.json()
        except (ValueError, UnicodeDecodeError):
            raise BadRequest("the body must be a JSON object") from None
        if not isinstance(data, dict):
            raise BadRequest("the body must be a JSON object")
        return data

    async def index(request: Request) -> Response:
        return FileResponse(os.path.join(STATIC, "index.html"),
                            headers={"cache-control": "no-store"})

    async def info(request: Request) -> Response:
        from .. import __version__

        return JSONResponse({"version": __version__, "workdir": config.workdir,
                             "roots": config.roots, "token_required": config.token is not None})

    async def methods(request: Request) -> Response:
        from ..methods import all_methods

        out = []
        for spec in all_methods().values():
            out.append({"name": spec.name, "base": spec.contract.base.value,
                        "summary": spec.docs.summary, "description": spec.docs.description,
                        "reference": spec.docs.reference,
                        "params": [{"name": p.name, "describe": p.describe(), "doc": p.doc,
                                    "required": p.required, "per_model": p.per_model}
                                   for p in spec.params]})
        return JSONResponse({"methods": out})

    async def templates(request: Request) -> Response:
        found = await run_in_threadpool(files.local_models, config)
        paths = [m["path"] for m in found if not m["path"].startswith(jobs.runs)]
        return JSONResponse({"templates": render_templates(paths)})

    async def check_endpoint(request: Request) -> Response:
        data = await body(request)
        text = data.get("recipe")
        if not isinstance(text, str):
            return error("give the recipe as 'recipe': YAML text")
        status, result = await run_in_threadpool(check_recipe, config, text)
        return JSONResponse(result, status_code=status)

    async def models(request: Request) -> Response:
        local = await run_in_threadpool(files.local_models, config)
        hub = await run_in_threadpool(files.hub_models)
        return JSONResponse({"models": local + hub, "roots": config.roots})

    async def model_summary(request: Request) -> Response:
        ref = request.query_params.get("ref", "")
        try:
            return JSONResponse(await run_in_threadpool(files.model_summary, config, ref))
        except PathRefused as e:
            return error(str(e), e.status)

    async def list_dir(request: Request) -> Response:
        path = request.query_params.get("path") or config.workdir
        try:
            real = config.confine(path)
        except PathRefused as e:
            return error(str(e), e.status)
        if not os.path.isdir(real):
            return error(f"{path}: not a folder", 400)
        entries = []
        for name in sorted(os.listdir(real)):
            full = os.path.join(real, name)
            entries.append({"name": name, "path": full, "dir": os.path.isdir(full),
                            "allowed": config.allowed(full),
                            "model": os.path.isdir(full) and files.looks_like_model(full)})
        return JSONResponse({"path": real, "entries": entries})

    async def get_file(request: Request) -> Response:
        path = request.query_params.get("path", "")
        try:
            real = config.confine(path)
        except PathRefused as e:
            return error(str(e), e.status)
        if not os.path.isfile(real):
            return error(f"{path}: not a file", 400)
        return FileResponse(real)

    async def submit(request: Request) -> Response:
        data = await body(request)
        text = data.get("recipe")
        if not isinstance(text, str) or not text.strip():
            return error("give the recipe as 'recipe': YAML text")
        if "\n" not in text:
            text += "\n"
        status, checked = await run_in_threadpool(check_recipe, config, text)
        if not checked["ok"]:
            return JSONResponse(checked, status_code=400 if status == 200 else status)
        job = jobs.submit(text, moe=checked["kind"] == "moe")
        return JSONResponse({"ok": True, "run": job.to_dict()}, status_code=202)

    def job_or_404(request: Request):
        job = jobs.get(request.path_params["id"])
        if job is None:
            raise NotFound(f"no run {request.path_params['id']}")
        return job

    async def list_runs(request: Request) -> Response:
        return JSONResponse({"runs": [j.to_dict() for j in jobs.list()]})

    async def get_run(request: Request) -> Response:
        return JSONResponse(job_or_404(request).to_dict(full=True))

    async def cancel(request: Request) -> Response:
        job = job_or_404(request)
        if job.status in TERMINAL:
            return error(f"run {job.id} is already {job.status}", 409)
        jobs.cancel(job.id)
        return JSONResponse({"ok": True, "run": job.to_dict()})

    async def resume(request: Request) -> Response:
        job = job_or_404(request)
        try:
            jobs.resume(job.id)
        except ValueError as e:
            return error(str(e), 409)
        return JSONResponse({"ok": True, "run": job.to_dict()}, status_code=202)

    async def events(request: Request) -> Response:
        job = job_or_404(request)

        async def stream():
            version = -1
            while True:
                current = jobs.get(job.id)
                if current is None:
                    return
                if current.version != version:
                    version = current.version
                    d = current.to_dict(full=current.status in TERMINAL)
                    yield f"event: progress\ndata: {json.dumps(d)}\n\n"
                    if current.status in TERMINAL:
                        yield "event: end\ndata: {}\n\n"
                        return
                if await request.is_disconnected():
                    return
                await run_in_threadpool(jobs.wait_change, job.id, version, 0.5)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"cache-control": "no-store"})

    async def inspect_endpoint(request: Request) -> Response:
        data = await body(request)
        base, others = data.get("base"), data.get("models")
        if not isinstance(base, str) or not isinstance(others, list) or not others \
                or not all(isinstance(m, str) for m in others):
            return error("give 'base' (a model) and 'models' (a list of models)")
        try:
            refs = [_model_ref(config, m) for m in [base, *others]]
        except PathRefused as e:
            return error(str(e), e.status)

        def work() -> dict[str, Any]:
            from ..tools.inspect_models import inspect_models
            from ..tools.report import write_report

            result = inspect_models(refs[0], refs[1:], rank=bool(data.get("rank", False)))
            folder = os.path.join(reports, time.strftime("%Y%m%d-%H%M%S-")
                                  + uuid.uuid4().hex[:6])
            written = write_report(result, folder)
            return {"ok": True, "folder": folder, "summary": result.summary(),
                    "data": result.to_dict(), "pngs": written.pngs, "html": written.html,
                    "recommendations": [r.line() for r in result.recommendations]}

        from ..errors import MergeError

        try:
            return JSONResponse(await run_in_threadpool(work))
        except MergeError as e:
            return error(str(e).replace("\n", " "))

    async def evaluate_run(request: Request) -> Response:
        job = job_or_404(request)
        if job.status != "done":
            return error(f"run {job.id} is {job.status}: evaluate a finished run", 409)
        data = await body(request)
        text = data.get("text")
        if not isinstance(text, str):
            return error("give 'text': a UTF-8 text file (under the allowed roots)")
        try:
            text_path = config.confine(text)
            parents = [_model_ref(config, p) for p in data.get("parents", [])]
        except PathRefused as e:
            return error(str(e), e.status)

        def work() -> dict[str, Any]:
            from ..evaluate.runner import evaluate

            report = evaluate(job.out, text=text_path, parents=parents,
                              max_tokens=int(data.get("max_tokens", 2048)))
            result = {"ok": True, "report": report.to_dict(), "table": report.table()}
            with open(os.path.join(job.folder, "eval.json"), "w", encoding="utf-8") as f:
                json.dump(result, f)
            return result

        from ..errors import MergeError

        try:
            return JSONResponse(await run_in_threadpool(work))
        except MergeError as e:
            return error(str(e).replace("\n", " "))

    async def trials(request: Request) -> Response:
        path = request.query_params.get("path", "")
        try:
            real = config.confine(path)
        except PathRefused as e:
            return error(str(e), e.status)
        if os.path.isdir(real):
            candidate = os.path.join(real, "search", "trials.jsonl")
            real = candidate if os.path.exists(candidate) else os.path.join(real, "trials.jsonl")
        if not os.path.isfile(real):
            return error(f"{path}: no search/trials.jsonl there (run 'mergesmith search')",
                         404)
        return JSONResponse({"path": real, "trials": files.read_jsonl(real)})

    async def on_error(request: Request, exc: Exception) -> Response:
        status = 404 if isinstance(exc, NotFound) else 400
        return error(str(exc), status)

    routes = [
        Route("/", index),
        Route("/api/info", info),
        Route("/api/methods", methods),
        Route("/api/templates", templates),
        Route("/api/check", check_endpoint, methods=["POST"]),
        Route("/api/models", models),
        Route("/api/models/summary", model_summary),
        Route("/api/files", list_dir),
        Route("/api/file", get_file),
        Route("/api/runs", list_runs),
        Route("/api/runs", submit, methods=["POST"]),
        Route("/api/runs/{id}", get_run),
        Route("/api/runs/{id}/events", events),
        Route("/api/runs/{id}/cancel", cancel, methods=["POST"]),
        Route("/api/runs/{id}/resume", resume, methods=["POST"]),
        Route("/api/runs/{id}/eval", evaluate_run, methods=["POST"]),
        Route("/api/inspect", inspect_endpoint, methods=["POST"]),
        Route("/api/trials", trials),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        yield
        jobs.shutdown()

    app = Starlette(routes=routes, middleware=[Middleware(Guard, config=config)],
                    exception_handlers={BadRequest: on_error, NotFound: on_error},
                    lifespan=lifespan)
    app.state.config, app.state.jobs = config, jobs
    return app


class BadRequest(Exception):
    pass


class NotFound(Exception):
    pass


def _model_ref(config: StudioConfig, ref: str) -> str:
    """A model for inspect/eval: a folder under the roots, or a Hub id in the cache."""
    if os.path.isabs(ref) or ref.startswith((".", "~")) or \
            os.path.lexists(os.path.join(config.workdir, ref)):
        return config.confine(ref)
    folder = files.hub_snapshot(ref)
    if folder is None:
        raise PathRefused(f"{ref}: not a folder under the allowed roots, nor a model in the "
                          "Hugging Face cache", 404)
    return folder
