"""Architecture facts inferred from tensor names and config.json — no per-model tables.

Layers are found from names of the form ``<prefix>.<index>.<rest>`` (the first numeric
component), the layer-count keys of ``config.json`` by name and value.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

_LAYER = re.compile(r"^(?P<prefix>.+?)\.(?P<index>\d+)\.(?P<rest>.+)$")
_EMBEDDING = re.compile(r"(^|\.)(embed_tokens|wte|wpe|word_embeddings|tok_embeddings|embed_in|"
                        r"embeddings|position_embeddings|token_type_embeddings|embedding)(\.|$)")
_INPUT_EMBEDDING = re.compile(r"(^|\.)(embed_tokens|wte|word_embeddings|tok_embeddings|embed_in)"
                              r"\.weight$")
_OUTPUT_HEAD = re.compile(r"(^|\.)(lm_head|embed_out|output)\.weight$")

LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
NESTED_CONFIGS = ("text_config", "llm_config", "language_config", "decoder")


@dataclass(frozen=True)
class LayerName:
    prefix: str
    index: int
    rest: str

    def with_index(self, index: int) -> str:
        return f"{self.prefix}.{index}.{self.rest}"


def split_layer(name: str) -> LayerName | None:
    """``model.layers.3.mlp.up_proj.weight`` → (``model.layers``, 3, ``mlp.up_proj.weight``)."""
    m = _LAYER.match(name)
    return LayerName(m["prefix"], int(m["index"]), m["rest"]) if m else None


def layer_stacks(names: Iterable[str]) -> dict[str, int]:
    """Layer prefixes and their layer counts (max index + 1)."""
    counts: dict[str, int] = defaultdict(int)
    for name in names:
        layer = split_layer(name)
        if layer:
            counts[layer.prefix] = max(counts[layer.prefix], layer.index + 1)
    return dict(counts)


def gradient_position(name: str, stacks: dict[str, int]) -> float:
    """``t`` of a tensor in a whole-model merge: layer i of n → i/(n−1); non-layer → 0."""
    layer = split_layer(name)
    if layer is None or layer.prefix not in stacks:
        return 0.0
    n = stacks[layer.prefix]
    return 1.0 if n <= 1 else layer.index / (n - 1)


def is_pre_layer(name: str) -> bool:
    """Embedding-like tensors come before the layers; other non-layer tensors after them."""
    return bool(_EMBEDDING.search(name))


def is_output_head(name: str) -> bool:
    return bool(_OUTPUT_HEAD.search(name))


def input_embedding_name(names: Iterable[str]) -> str | None:
    """The token embedding among a model's tensor names (the tied fallback of an LM head)."""
    return next((n for n in names if _INPUT_EMBEDDING.search(n)), None)


def layer_count_keys(config: dict[str, Any], count: int) -> list[tuple[str, ...]]:
    """Config paths (top level or nested text configs) holding this layer count."""
    paths: list[tuple[str, ...]] = []
    for key in LAYER_COUNT_KEYS:
        if config.get(key) == count:
            paths.append((key,))
    for sub in NESTED_CONFIGS:
        nested = config.get(sub)
        if isinstance(nested, dict):
            paths.extend((sub, *p) for p in layer_count_keys(nested, count))
    return paths


def per_layer_lists(config: dict[str, Any], count: int) -> list[tuple[str, ...]]:
    """Config lists with one entry per layer (``layer_types``, sliding-window patterns...)."""
    paths: list[tuple[str, ...]] = []
    for key, value in config.items():
        if (isinstance(value, list) and len(value) == count and count > 1
                and ("layer" in key or key.endswith("_types"))):
            paths.append((key,))
        elif key in NESTED_CONFIGS and isinstance(value, dict):
            paths.extend((key, *p) for p in per_layer_lists(value, count))
    return paths


def get_path(config: dict[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        config = config[key]
    return config


def set_path(config: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        config = config[key]
    config[path[-1]] = value
