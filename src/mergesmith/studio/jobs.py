"""The merge queue: one merge at a time in a worker subprocess, the rest wait their turn.

Each run lives in ``WORKDIR/runs/<id>/`` (``recipe.yml``, the output ``merged/``, and
while unfinished ``merged.partial/``); ``WORKDIR/studio/history.jsonl`` keeps one line per
finished run (its recipe, status, output, error)."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

TERMINAL = {"done", "failed", "cancelled"}
OUTPUT_NAME = "merged"


@dataclass
class Job:
    id: str
    recipe: str
    folder: str
    moe: bool = False
    status: str = "queued"  # queued, running, done, failed, cancelled
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    total_bytes: int = 0
    total_tensors: int = 0
    bytes: int = 0
    tensors: int = 0
    error: str | None = None
    resumes: int = 0
    resume_next: bool = False  # the next start continues OUT.partial
    version: int = 0  # bumped on every change (the event stream sends changes)

    @property
    def out(self) -> str:
        return os.path.join(self.folder, OUTPUT_NAME)

    def eta(self) -> float | None:
        if self.status != "running" or not self.started or not self.bytes or \
                not self.total_bytes:
            return None
        elapsed = time.time() - self.started
        return max(0.0, elapsed * (self.total_bytes - self.bytes) / self.bytes)

    def to_dict(self, full: bool = False) -> dict[str, Any]:
        d = asdict(self)
        d.update(out=self.out, eta=self.eta(), published=os.path.isdir(self.out),
                 partial=os.path.isdir(self.out + ".partial"))
        m = re.search(r"^merge_method:\s*(\S+)", self.recipe, re.M)
        d["method"] = m.group(1) if m else ("moe" if self.moe else None)
        if not full:
            d.pop("recipe")
        if full and self.status == "done":
            d["checksums"] = _read(os.path.join(self.out, "mergesmith_checksums.json"))
            d["model_card"] = _read(os.path.join(self.out, "README.md"))
            d["files"] = sorted(os.listdir(self.out)) if os.path.isdir(self.out) else []
        return d


def _read(path: str, limit: int = 200_000) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read(limit)
    except OSError:
        return None


class JobManager:
    """A FIFO of jobs and one worker thread that runs them as subprocesses."""

    def __init__(self, workdir: str) -> None:
        self.workdir = workdir
        self.runs = os.path.join(workdir, "runs")
        self.history_path = os.path.join(workdir, "studio", "history.jsonl")
        os.makedirs(self.runs, exist_ok=True)
        os.makedirs(os.path.dirname(self.history_path), exist_ok=True)
        self.jobs: dict[str, Job] = {}
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self.queue: queue.Queue[str | None] = queue.Queue()
        self.proc: subprocess.Popen | None = None
        self.current: str | None = None
        self._cancel: set[str] = set()
        self._load_history()
        self.thread = threading.Thread(target=self._loop, name="studio-merges", daemon=True)
        self.thread.start()

    # ------------------------------------------------------------------ public

    def submit(self, recipe: str, moe: bool = False) -> Job:
        job_id = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
        folder = os.path.join(self.runs, job_id)
        os.makedirs(folder)
        with open(os.path.join(folder, "recipe.yml"), "w", encoding="utf-8") as f:
            f.write(recipe)
        job = Job(job_id, recipe, folder, moe=moe)
        with self.lock:
            self.jobs[job_id] = job
        self.queue.put(job_id)
        return job

    def cancel(self, job_id: str) -> Job:
        with self.lock:
            job = self.jobs[job_id]
            if job.status == "queued":
                self._finish(job, "cancelled")
            elif job.status == "running":
                self._cancel.add(job_id)
                if self.proc is not None and self.current == job_id:
                    try:
                        self.proc.send_signal(signal.SIGINT)
                    except ProcessLookupError:
                        pass
            return job

    def resume(self, job_id: str) -> Job:
        with self.lock:
            job = self.jobs[job_id]
            if job.status not in ("cancelled", "failed"):
                raise ValueError(f"run {job_id} is {job.status}: only a cancelled or failed "
                                 "run can be resumed")
            job.status, job.error, job.finished = "queued", None, None
            job.resumes += 1
            job.resume_next = True
            self._bump(job)
        self.queue.put(job_id)
        return job

    def get(self, job_id: str) -> Job | None:
        return self.jobs.get(job_id)

    def wait_change(self, job_id: str, version: int, timeout: float) -> Job | None:
        with self.changed:
            job = self.jobs.get(job_id)
            if job is not None and job.version == version and job.status not in TERMINAL:
                self.changed.wait(timeout)
            return self.jobs.get(job_id)

    def list(self) -> list[Job]:
        return sorted(self.jobs.values(), key=lambda j: j.created, reverse=True)

    def shutdown(self) -> None:
        with self.lock:
            for job in self.jobs.values():
                if job.status == "running":
                    self._cancel.add(job.id)
            if self.proc is not None:
                try:
                    self.proc.send_signal(signal.SIGINT)
                except ProcessLookupError:
                    pass
        self.queue.put(None)

    # ------------------------------------------------------------------ worker

    def _bump(self, job: Job) -> None:
        job.version += 1
        self.changed.notify_all()

    def _finish(self, job: Job, status: str, error: str | None = None) -> None:
        job.status, job.error, job.finished = status, error, time.time()
        self._bump(job)
        try:
            with open(self.history_path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"id": job.id, "status": status, "error": error,
                                    "recipe": job.recipe, "out": job.out, "moe": job.moe,
                                    "created": job.created, "finished": job.finished,
                                    "total_bytes": job.total_bytes,
                                    "total_tensors": job.total_tensors}) + "\n")
        except OSError:
            pass

    def _load_history(self) -> None:
        """Earlier sessions' runs (the last line of each id wins)."""
        try:
            with open(self.history_path, encoding="utf-8") as f:
                lines = f.readlines()
        except OSError:
            return
        for line in lines:
            try:
                h = json.loads(line)
                job = Job(h["id"], h["recipe"], os.path.join(self.runs, h["id"]),
                          moe=h.get("moe", False), status=h["status"],
                          created=h.get("created", 0), finished=h.get("finished"),
                          error=h.get("error"), total_bytes=h.get("total_bytes", 0),
                          total_tensors=h.get("total_tensors", 0))
            except (ValueError, KeyError, TypeError):
                continue
            self.jobs[job.id] = job

    def _loop(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            with self.lock:
                job = self.jobs.get(item)
                if job is None or job.status != "queued":
                    continue  # cancelled while queued, or already run (queued twice)
                resume, job.resume_next = job.resume_next, False
                job.status, job.started = "running", time.time()
                job.bytes = job.tensors = 0
                self._bump(job)
            self._run(job, resume)

    def _run(self, job: Job, resume: bool) -> None:
        cmd = [sys.executable, "-m", "mergesmith.studio.worker",
               os.path.join(job.folder, "recipe.yml"), job.out]
        if resume:
            cmd.append("--resume")
        if job.moe:
            cmd.append("--moe")
        error = None
        cancelled_seen = False
        # the worker imports this very mergesmith, wherever the studio was imported from
        package_root = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
        path = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)
        try:
            proc = subprocess.Popen(cmd, cwd=self.workdir, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, bufsize=1,
                                    env={**os.environ, "PYTHONUNBUFFERED": "1",
                                         "PYTHONPATH": path})
        except OSError as e:
            with self.lock:
                self._finish(job, "failed", f"cannot start the merge: {e}")
            return
        with self.lock:
            self.proc, self.current = proc, job.id
            if job.id in self._cancel:
                proc.send_signal(signal.SIGINT)
        assert proc.stdout is not None
        for line in proc.stdout:
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            with self.lock:
                kind = event.get("event")
                if kind == "plan":
                    job.total_bytes = event["total_bytes"]
                    job.total_tensors = event["total_tensors"]
                elif kind == "progress":
                    job.bytes, job.tensors = event["bytes"], event["tensors"]
                elif kind == "error":
                    error = event["message"]
                elif kind == "cancelled":
                    cancelled_seen = True
                self._bump(job)
        stderr = proc.stderr.read() if proc.stderr else ""
        rc = proc.wait()
        with self.lock:
            self.proc = self.current = None
            cancelled = job.id in self._cancel or cancelled_seen
            self._cancel.discard(job.id)
            if rc == 0:  # finished before the cancel reached it: the output is published
                self._finish(job, "done")
            elif cancelled:
                self._finish(job, "cancelled", "cancelled: nothing was published; the "
                             "finished tensors are kept for Resume")
            else:
                last = [ln for ln in stderr.strip().splitlines() if ln.strip()]
                self._finish(job, "failed", error or (last[-1] if last else f"exit code {rc}"))
