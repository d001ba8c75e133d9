"""Model references: ``path-or-hub-id[@revision][+lora[@revision]]`` or the mapping form."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import MergeError


@dataclass(frozen=True)
class ModelPath:
    """A local folder or Hugging Face Hub repository id, with an optional revision."""

    path: str
    revision: str | None = None

    def __str__(self) -> str:
        return f"{self.path}@{self.revision}" if self.revision else self.path


@dataclass(frozen=True)
class ModelReference:
    """One input model as the recipe names it. Identity is the whole reference."""

    model: ModelPath
    lora: ModelPath | None = None
    override_architecture: str | None = None

    def __str__(self) -> str:
        return f"{self.model}+{self.lora}" if self.lora else str(self.model)


def _parse_path(text: str, where: str) -> ModelPath:
    parts = text.split("@")
    if len(parts) > 2:
        raise MergeError(f"{where}: model reference '{text}' has more than one '@' "
                         "(write path@revision)")
    path = parts[0].strip()
    if not path:
        raise MergeError(f"{where}: empty model path in '{text}'")
    revision = parts[1].strip() if len(parts) == 2 else None
    if len(parts) == 2 and not revision:
        raise MergeError(f"{where}: empty revision after '@' in '{text}'")
    return ModelPath(path, revision)


def _path_from_any(value: Any, where: str) -> ModelPath:
    if isinstance(value, str):
        return _parse_path(value, where)
    if isinstance(value, dict):
        unknown = set(value) - {"path", "revision"}
        if unknown:
            raise MergeError(f"{where}: unknown key {sorted(map(repr, map(str, unknown)))[0]} in model path "
                             "(allowed: path, revision)")
        if not isinstance(value.get("path"), str) or not value["path"]:
            raise MergeError(f"{where}: model path mapping needs a 'path' string")
        rev = value.get("revision")
        if rev is not None and not isinstance(rev, str):
            raise MergeError(f"{where}: 'revision' must be a string")
        return ModelPath(value["path"], rev)
    raise MergeError(f"{where}: expected a model path (string), got {type(value).__name__}")


def parse_model_reference(value: Any, where: str = "model") -> ModelReference:
    """Parse the string or mapping form of a model reference (mergekit's syntax)."""
    if isinstance(value, ModelReference):
        return value
    if isinstance(value, str):
        chunks = value.split("+")
        if len(chunks) > 2:
            raise MergeError(f"{where}: cannot parse model reference '{value}': at most one '+' "
                             "(model+lora) is allowed; use the mapping form "
                             "{model: {path: ...}, lora: {path: ...}} for paths containing '+'")
        model = _parse_path(chunks[0], where)
        lora = _parse_path(chunks[1], where) if len(chunks) == 2 else None
        return ModelReference(model, lora)
    if isinstance(value, dict):
        unknown = set(value) - {"model", "lora", "override_architecture"}
        if unknown:
            raise MergeError(f"{where}: unknown key {sorted(map(repr, map(str, unknown)))[0]} in model reference "
                             "(allowed: model, lora, override_architecture)")
        if "model" not in value:
            raise MergeError(f"{where}: model reference mapping needs a 'model' key")
        model = _path_from_any(value["model"], f"{where}.model")
        lora = _path_from_any(value["lora"], f"{where}.lora") if value.get("lora") else None
        arch = value.get("override_architecture")
        if arch is not None and not isinstance(arch, str):
            raise MergeError(f"{where}.override_architecture: expected a string")
        return ModelReference(model, lora, arch)
    raise MergeError(f"{where}: expected a model reference (string like 'org/name' or "
                     f"'./folder'), got {type(value).__name__}")
