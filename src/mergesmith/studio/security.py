"""The studio's safety rules: local binding, the token, allowed origins and path confinement.

* Every file the studio reads or serves must lie (after resolving symlinks) under the
  workdir or a folder given with ``--allow``: :meth:`StudioConfig.confine`.
* Requests whose ``Origin`` (or ``Sec-Fetch-Site``) says they come from another site are
  refused, and so are requests naming a ``Host`` that is not this server (DNS rebinding).
* A non-local ``--host`` requires a token: a ``?token=`` query (which sets a cookie for the
  page), an ``Authorization: Bearer`` header, or the cookie itself.
"""

from __future__ import annotations

import hmac
import os
import secrets
from dataclasses import dataclass, field

LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})
TOKEN_COOKIE = "mergesmith_studio_token"


class PathRefused(Exception):
    """A path outside the allowed roots or not a path at all (HTTP 403), or a path inside
    them that does not exist (404)."""

    def __init__(self, message: str, status: int = 403) -> None:
        super().__init__(message)
        self.status = status


def is_local(host: str) -> bool:
    return host in LOCAL_HOSTS or host.startswith("127.")


@dataclass
class StudioConfig:
    """What the app serves: ``workdir`` (runs, history, reports) and the extra ``allow``
    roots (model folders), where it listens, and the token (None: no token needed)."""

    workdir: str
    allow: list[str] = field(default_factory=list)
    host: str = "127.0.0.1"
    port: int = 7860
    token: str | None = None
    extra_hosts: list[str] = field(default_factory=list)
    """More names the ``Host`` header may carry (tests, reverse proxies)."""

    def __post_init__(self) -> None:
        self.workdir = os.path.realpath(os.path.expanduser(self.workdir))
        self.allow = [os.path.realpath(os.path.expanduser(a)) for a in self.allow]
        if self.token is None and not is_local(self.host):
            self.token = secrets.token_urlsafe(24)

    @property
    def roots(self) -> list[str]:
        return [self.workdir, *[a for a in self.allow if a != self.workdir]]

    def confine(self, path: str, *, must_exist: bool = True) -> str:
        """The real path of ``path`` (relative paths: to the workdir) if it lies under a
        root; else :class:`PathRefused`. Symlinks are resolved before the test, so a link
        inside a root that points outside is refused."""
        if not isinstance(path, str) or not path or "\x00" in path:
            raise PathRefused("give a path")
        full = os.path.expanduser(path)
        if not os.path.isabs(full):
            full = os.path.join(self.workdir, full)
        real = os.path.realpath(full)
        if not any(real == r or real.startswith(r.rstrip(os.sep) + os.sep) for r in self.roots):
            raise PathRefused(f"{path}: outside the folders the studio may read "
                              f"(--workdir and --allow: {', '.join(self.roots)})")
        if must_exist and not os.path.exists(real):
            raise PathRefused(f"{path}: not found", 404)
        return real

    def allowed(self, path: str) -> bool:
        try:
            self.confine(path, must_exist=False)
        except PathRefused:
            return False
        return True

    def host_allowed(self, host_header: str) -> bool:
        """The ``Host`` header names this server (refuses DNS-rebinding requests)."""
        if not host_header:
            return False
        name = host_header.rsplit(":", 1)[0] if not host_header.endswith("]") else host_header
        name = name.strip("[]") if name.startswith("[") else name
        if not is_local(self.host):
            return True  # bound to a public name: the token protects it
        return is_local(name) or name in self.extra_hosts

    def token_ok(self, supplied: str | None) -> bool:
        if self.token is None:
            return True
        return supplied is not None and hmac.compare_digest(supplied, self.token)
