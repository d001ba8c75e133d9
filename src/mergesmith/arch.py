"""Architecture facts inferred from tensor names and config.json — no per-model tables.

* Layers: names of the form ``<prefix>.<index>.<rest>`` (the first numeric component);
  each distinct prefix is a *stack* of layers (``model.layers``, ``transformer.h``,
  ``encoder.block`` ...).
* Modules: a model with several stacks (encoder-decoder, vision-language) is split into
  modules, one per stack, named by the shortest name prefix that tells the stacks apart
  (``encoder``, ``decoder``, ``language_model``, ``vision_tower`` ...); tensors outside
  every stack's prefix form modules of their own (``multi_modal_projector``, ``shared``),
  except output heads, which belong to the text/decoder module.
* Pre/post tensors: embedding-like tensors come before a module's layers, the rest after.
* Mixture of experts: routed experts (per expert or fused ``[E, ...]``), shared experts and
  routers by name components (:func:`moe_role`), for the recipe filter keywords and for
  merging fused experts one expert at a time (:func:`expert_parts`).
* Config keys: layer counts and per-layer lists are found by name *and* value, also in
  nested configs (``text_config``, ``vision_config`` ...).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

_LAYER = re.compile(r"^(?P<prefix>.+?)\.(?P<index>\d+)\.(?P<rest>.+)$")
_EMBEDDING = re.compile(r"(^|\.)(embed_tokens|wte|wpe|word_embeddings|tok_embeddings|embed_in|"
                        r"embeddings|position_embeddings|token_type_embeddings|embedding|"
                        r"patch_embed|pos_embed|shared)(\.|$)")
_INPUT_EMBEDDING = re.compile(r"(^|\.)(embed_tokens|wte|word_embeddings|tok_embeddings|embed_in|"
                              r"shared)\.weight$")
_OUTPUT_HEAD = re.compile(r"(^|\.)(lm_head|embed_out|output)\.weight$")
_HEAD_BIAS = re.compile(r"(^|\.)(lm_head|embed_out|output|predictions|vocab_projector)"
                        r"(\.decoder)?\.bias$")
_LAYER_COUNT_KEY = re.compile(r"^(num_(hidden_|decoder_|encoder_)?layers|n_layers?|"
                              r"(encoder|decoder)_layers|depth)$")

DEFAULT_MODULE = "default"
MODULE_ALIASES = {  # mergekit's module names → words our inferred names contain
    "text_decoder": ("language_model", "text_model", "llm", "text"),
    "vision_tower": ("vision", "visual"),
    "vision_model": ("vision", "visual"),
}
_HINTS = ("vision", "visual", "audio", "encoder", "decoder", "text", "language")


@dataclass(frozen=True)
class LayerName:
    prefix: str
    index: int
    rest: str


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


def is_vocab_tensor(name: str) -> bool:
    """Tensors indexed by token id along dim 0: token embeddings, LM heads, head biases."""
    return bool(_INPUT_EMBEDDING.search(name) or _OUTPUT_HEAD.search(name)
                or _HEAD_BIAS.search(name) or name.endswith("predictions.decoder.weight"))


def vocab_rows(tensors: dict[str, Any]) -> int | None:
    """Embedding rows of a model (its vocabulary size), from the token embedding or head."""
    name = input_embedding_name(tensors) or next((n for n in tensors if is_output_head(n)), None)
    return tensors[name].shape[0] if name else None


def input_embedding_name(names: Iterable[str]) -> str | None:
    """The token embedding among a model's tensor names (the tied fallback of an LM head)."""
    return next((n for n in names if _INPUT_EMBEDDING.search(n)), None)


# ------------------------------------------------------------------ modules


@dataclass
class Module:
    """Part of a model with at most one stack of layers."""

    name: str
    root: str  # name prefix of its tensors ("" for the single module of a plain model)
    stack: str | None  # layer prefix, e.g. "model.language_model.layers"
    layers: int
    tensors: list[str] = field(default_factory=list)  # in the model's order

    def layer_tensors(self, names: Iterable[str], index: int) -> list[str]:
        """``rest`` of every tensor of layer ``index`` of this module's stack in ``names``."""
        return [layer.rest for n in names
                if (layer := split_layer(n)) and layer.prefix == self.stack
                and layer.index == index]

    def loose(self) -> list[str]:
        """Tensors outside the stack, in order."""
        return [n for n in self.tensors if (l := split_layer(n)) is None or l.prefix != self.stack]


def infer_modules(names: list[str]) -> dict[str, Module]:
    """Split a model's tensor names into modules (see the module docstring)."""
    stacks = layer_stacks(names)
    if len(stacks) <= 1:
        stack = next(iter(stacks), None)
        return {DEFAULT_MODULE: Module(DEFAULT_MODULE, "", stack, stacks.get(stack, 0),
                                       list(names))}
    roots = _distinct_roots(list(stacks))
    modules: dict[str, Module] = {}
    for stack, root in roots.items():
        name = root.rstrip(".").split(".")[-1]
        modules[name] = Module(name, root, stack, stacks[stack])
    common = _common_prefix(list(roots.values()))
    by_root = sorted(modules.values(), key=lambda m: -len(m.root))
    text = _text_module(modules)
    for n in names:
        owner = next((m for m in by_root if n.startswith(m.root)), None)
        if owner is None and is_output_head(n) and text is not None:
            owner = text
        if owner is None:
            parts = n.split(".")
            start = len(common) if parts[:len(common)] == common else 0
            key = parts[start] if len(parts) > start + 1 else parts[0]
            owner = modules.setdefault(key, Module(key, ".".join(parts[:start + 1]) + ".",
                                                   None, 0))
        owner.tensors.append(n)
    return modules


def _distinct_roots(stacks: list[str]) -> dict[str, str]:
    """Shortest name prefix of each stack that no other stack shares."""
    parts = {s: s.split(".") for s in stacks}
    roots = {}
    for s, comps in parts.items():
        for k in range(1, len(comps) + 1):
            head = comps[:k]
            if not any(o != s and other[:k] == head for o, other in parts.items()):
                roots[s] = ".".join(head) + "."
                break
        else:
            roots[s] = s + "."
    return roots


def _common_prefix(roots: list[str]) -> list[str]:
    """Leading name components shared by all roots (``["model"]`` for model.x. / model.y.)."""
    lists = [r.rstrip(".").split(".") for r in roots]
    n = 0
    while all(len(x) > n + 1 and x[n] == lists[0][n] for x in lists):
        n += 1
    return lists[0][:n]


def _text_module(modules: dict[str, Module]) -> Module | None:
    """The module a model's output head belongs to: the language/text/decoder stack."""
    for words in (("language", "text", "llm"), ("decoder",)):
        for m in modules.values():
            if any(w in m.name for w in words):
                return m
    non_vision = [m for m in modules.values() if not any(w in m.name for w in ("vision", "visual"))]
    return non_vision[-1] if non_vision else None


def find_module(modules: dict[str, Module], name: str) -> Module | None:
    """A module by our name or by mergekit's (``text_decoder`` ↔ ``language_model`` ...)."""
    if name in modules:
        return modules[name]
    if name == DEFAULT_MODULE and len(modules) == 1:
        return next(iter(modules.values()))
    for word in MODULE_ALIASES.get(name, ()):
        found = [m for m in modules.values() if word in m.name]
        if len(found) == 1:
            return found[0]
    return None


# ------------------------------------------------------------------ config keys


def walk_config(config: dict[str, Any],
                path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """Every ``(path, value)`` of a config, nested dicts included (depth first):
    ``(("text_config",), {...})`` then ``(("text_config", "num_hidden_layers"), 32)``."""
    for key, value in config.items():
        yield (*path, key), value
        if isinstance(value, dict):
            yield from walk_config(value, (*path, key))


def layer_count_keys(config: dict[str, Any], count: int,
                     module: str | None = None) -> list[tuple[str, ...]]:
    """Config paths holding this module's layer count (``num_hidden_layers``, ``n_layer``,
    ``text_config.num_hidden_layers``, ``num_decoder_layers`` ...).

    With several modules, keys whose path names the module (``vision_config...`` for the
    vision tower, ``num_decoder_layers`` for the decoder) win over the others.
    """
    found = [p for p, v in walk_config(config) if _LAYER_COUNT_KEY.match(p[-1]) and v == count
             and not isinstance(v, bool)]
    if not found:
        return []
    scored = [(_hint_score(p, module), p) for p in found]
    best = max(s for s, _ in scored)
    return [p for s, p in scored if s == best]


def _hint_score(path: tuple[str, ...], module: str | None) -> int:
    """How well a config path matches a module name (+ its words, − other modules' words)."""
    text = ".".join(path).lower()
    mine = [w for w in _HINTS if module and w in module.lower()]
    if module and module.lower() in ("language_model", "text_decoder", "llm", DEFAULT_MODULE):
        mine += ["text", "language"]
    score = sum(2 for w in mine if w in text)
    score -= sum(2 for w in _HINTS if w not in mine and w in text)
    return score


def per_layer_lists(config: dict[str, Any], count: int,
                    parent: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Lists with one entry per layer (``layer_types``, sliding-window patterns...) in the
    config dict at ``parent`` (where the module's layer count lives)."""
    scope = get_path(config, parent) if parent else config
    return [(*parent, k) for k, v in scope.items()
            if isinstance(v, list) and len(v) == count and count > 1
            and ("layer" in k or k.endswith("_types"))]


def get_path(config: dict[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        config = config[key]
    return config


def set_path(config: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        config = config[key]
    config[path[-1]] = value


# ------------------------------------------------------------------ mixture of experts

_SHARED_EXPERT = re.compile(r"(^|\.)(shared_experts?|shared_expert_gate|shared_mlp)(\.|$)")
_ROUTED_EXPERT = re.compile(r"(^|\.)experts\.")
_ROUTER = re.compile(r"(^|\.)(router|gate)\.|(^|\.)e_score_correction_bias$")
_FUSED_EXPERT = re.compile(r"(^|\.)experts\.(?!\d+\.)(?!expert_\d+\.)[^.]+(\.weight)?$")
_GATE_UP = re.compile(r"(^|\.)experts\.gate_up_proj(\.weight)?$")

MOE_ROLES = ("experts", "router", "shared_expert")
"""Parts of a mixture-of-experts layer that recipe filters name as keywords."""


def moe_role(name: str) -> str | None:
    """``experts`` (routed experts, one tensor per expert or fused), ``shared_expert``
    (always-on experts and their gate) or ``router`` (the gate that picks experts, its
    bias and DeepSeek's ``e_score_correction_bias``); None for every other tensor.

    Recognised by name components: ``experts.<n>.*`` and ``experts.<proj>`` (fused),
    ``shared_expert(s)``/``shared_expert_gate``, a module named ``router`` or ``gate``
    (``gate_proj`` is a projection, not a router)."""
    if _SHARED_EXPERT.search(name):
        return "shared_expert"
    if _ROUTED_EXPERT.search(name):
        return "experts"
    if _ROUTER.search(name):
        return "router"
    return None


def is_fused_experts(name: str, shape: tuple[int, ...]) -> bool:
    """All routed experts of a layer in one tensor, experts along dim 0: the ``[E, ...]``
    matrices (``experts.gate_up_proj``, ``experts.down_proj``) and their ``[E, n]`` biases
    (``experts.down_proj_bias``). A 2-D fused weight (DBRX's ``[E·I, H]``) has no expert
    dim to split on and is not one."""
    if moe_role(name) != "experts" or not _FUSED_EXPERT.search(name):
        return False
    return len(shape) == 3 or (len(shape) == 2 and name.endswith("_bias"))


def expert_parts(name: str, shape: tuple[int, ...], down: tuple[int, ...] | None) -> int:
    """Pieces a fused expert tensor is merged in, per expert, so that a whole-tensor method
    (SLERP, TIES...) sees the matrices a per-expert checkpoint stores: 0 (not fused), 1 (the
    expert's matrix) or 2 (``gate_up_proj`` stored as gate and up halves, ``[E, 2I, H]``,
    recognised by its ``down_proj`` ``[E, H, I]``; gpt-oss interleaves ``[E, H, 2I]``)."""
    if not is_fused_experts(name, shape):
        return 0
    if (_GATE_UP.search(name) and down is not None and len(down) == 3
            and shape[1] == 2 * down[2] and down[1] == shape[2]):
        return 2
    return 1


def down_proj_sibling(name: str) -> str | None:
    """The ``down_proj`` next to a fused ``gate_up_proj`` (tells its layout)."""
    return _GATE_UP.sub(lambda m: m.group(0).replace("gate_up_proj", "down_proj"), name) \
        if _GATE_UP.search(name) else None
