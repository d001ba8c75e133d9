"""YAML loading that remembers where every key is, so errors can point at a line."""

from __future__ import annotations

from typing import Any

import yaml

from ..errors import MergeError

Path = tuple  # ("models", 1, "parameters", "weight")


def load_yaml(text: str, source: str) -> tuple[Any, dict[Path, tuple[int, int]]]:
    """Parse one YAML document; return the data and a map path → (line, column), 1-based.

    Syntax errors and duplicate keys become a :class:`MergeError` naming the line and column.
    """
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            raise MergeError(f"{source}: the recipe is empty; start with 'merge_method: ...'")
        positions: dict[Path, tuple[int, int]] = {}
        _walk(node, (), positions, source)
        data = loader.construct_document(node)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        problem = e.problem or "invalid YAML"
        context = f" ({e.context})" if e.context else ""
        raise MergeError(f"{where}: YAML syntax error: {problem}{context}") from None
    except yaml.YAMLError as e:
        raise MergeError(f"{source}: YAML syntax error: {e}") from None
    finally:
        loader.dispose()
    return data, positions


def _walk(node: yaml.Node, path: Path, out: dict[Path, tuple[int, int]], source: str) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else str(key_node)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise MergeError(f"{source}:{line}:{key_node.start_mark.column + 1}: duplicate "
                                 f"key '{key}' (first given on line {seen[key]}); YAML keeps "
                                 "only the last one, so remove one of them")
            seen[key] = line
            out[path + (key,)] = (line, key_node.start_mark.column + 1)
            _walk(value_node, path + (key,), out, source)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out[path + (i,)] = (item.start_mark.line + 1, item.start_mark.column + 1)
            _walk(item, path + (i,), out, source)
