"""What ``mergesmith methods`` prints, without importing torch.

The registry lives in modules that import torch (≈ 1 s of start-up). The listing of the
built-in methods is generated from the registry into ``method_catalogue.json`` next to this file
(``python -m mergesmith.method_catalogue`` rewrites it; a test fails when it is stale, as
for docs/methods.md). The command reads it when no plugin adds methods through the
``mergesmith.methods`` entry-point group; with plugins it asks the registry itself.

This module (outside ``mergesmith.methods``, whose package imports every method) must not
import torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

FILE = Path(__file__).with_name("method_catalogue.json")


def entries_from_registry() -> list[dict[str, Any]]:
    """The listing of every registered method (imports the registry, hence torch)."""
    from .methods import all_methods

    return [entry(spec) for spec in all_methods().values()]


def entry(spec: Any) -> dict[str, Any]:
    return {"name": spec.name, "base": spec.contract.base.value,
            "summary": spec.docs.summary or "",
            "params": [f"{p.describe()}{': ' + p.doc if p.doc else ''}" for p in spec.params]}


def lines(entries: list[dict[str, Any]]) -> list[str]:
    """The command's text for ``entries``."""
    out: list[str] = []
    for e in entries:
        out.append(f"{e['name']}  (base: {e['base']})")
        if e["summary"]:
            out.append(f"  {e['summary']}")
        out += [f"    {p}" for p in e["params"]]
        out.append("")
    return out


def has_plugins() -> bool:
    from importlib.metadata import entry_points

    return any(True for _ in entry_points(group="mergesmith.methods"))


def load() -> list[dict[str, Any]] | None:
    """The built-in methods' listing, or None when plugins add methods (or the generated
    file is missing): then the registry must be asked."""
    if has_plugins() or not FILE.exists():
        return None
    return json.loads(FILE.read_text(encoding="utf-8"))


def text() -> str:
    return json.dumps(entries_from_registry(), indent=1, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    FILE.write_text(text(), encoding="utf-8")
    print(f"wrote {FILE}")
