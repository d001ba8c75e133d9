"""Check every NNN.yml here against mergekit-moe 0.1.5's own config schema -> schema.tsv.

Run with a venv holding mergekit 0.1.5 (see tests/data/moe/make_expected.py):

    /tmp/mkvenv/bin/python tests/data/real_moe_configs/classify.py

Columns: file; yaml (ok / the YAML error); schema (accepted / rejected by
``MoEMergeConfig.model_validate``); checks (``is_bad_config``: ok, or the errors it
logs, with allow_all_same False); ignored_keys (top-level or expert keys the schema does
not know, which pydantic silently drops); error (first line of the validation error).
"""

from __future__ import annotations

import logging
from pathlib import Path

import yaml
from mergekit.moe.config import Expert, MoEMergeConfig, is_bad_config

HERE = Path(__file__).resolve().parent


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def unknown_keys(data) -> list[str]:
    if not isinstance(data, dict):
        return []
    out = [k for k in data if k not in MoEMergeConfig.model_fields]
    for field in ("experts", "shared_experts"):
        for i, e in enumerate(data.get(field) or []):
            if isinstance(e, dict):
                out += [f"{field}[{i}].{k}" for k in e if k not in Expert.model_fields]
    return out


def clean(text: str) -> str:
    return " ".join(str(text).split())[:300]


def classify(path: Path) -> list[str]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        return [path.name, "error: " + clean(e), "-", "-", "", ""]
    try:
        cfg = MoEMergeConfig.model_validate(data)
    except Exception as e:  # pydantic.ValidationError and anything odd
        first = str(e).splitlines()
        return [path.name, "ok", "rejected", "-", ",".join(unknown_keys(data)),
                clean(" | ".join(first[:3]))]
    handler = _Collect()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        bad = is_bad_config(cfg, allow_all_same=False)
    finally:
        root.removeHandler(handler)
    checks = "ok" if not bad else "bad: " + clean(" / ".join(handler.messages))
    return [path.name, "ok", "accepted", checks, ",".join(unknown_keys(data)), ""]


def main():
    rows = [["file", "yaml", "schema", "checks", "ignored_keys", "error"]]
    for path in sorted(HERE.glob("[0-9][0-9][0-9].yml")):
        rows.append(classify(path))
    text = "".join("\t".join(r) + "\n" for r in rows)
    (HERE / "schema.tsv").write_text(text)
    print(text, end="")


if __name__ == "__main__":
    main()
