"""Output vocabularies (``tokenizer:`` blocks) and how every model's rows map onto them.

A :class:`VocabPlan` is decided at plan time from ``tokenizer.json`` files only: the output
tokens, and for every input model a permutation ``new id → old row`` (−1 where the model
lacks the token) plus the default rows for tokens a model lacks (or that are forced).
Applying it to an embedding-like tensor is one vectorised gather per model
(:meth:`VocabPlan.rows`), never a loop over tokens.

Union keeps ordinary text tokenizing as the base does: tokens of other models that the
base lacks join the base model's vocabulary without merges (BPE) or with a negligible
score (Unigram), so the base's segmentation never produces them; added and special tokens
of every model stay added tokens, matched before the model as in their source.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .._torch import torch
from ..errors import MergeError

_SPECIAL_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id",
                    "decoder_start_token_id", "sep_token_id", "cls_token_id", "mask_token_id")


@dataclass
class ModelVocab:
    """A model's tokenizer, as far as merging needs it."""

    folder: str
    data: dict[str, Any]  # tokenizer.json
    ids: dict[str, int]  # token → id, ids below the model's embedding rows only
    added: dict[str, dict[str, Any]]  # content → added-token entry
    rows: int

    @property
    def kind(self) -> str:
        return self.data.get("model", {}).get("type", "")

    def token_of(self) -> dict[int, str]:
        return {i: t for t, i in self.ids.items()}


def load_vocab(folder: str, rows: int, who: str) -> ModelVocab:
    """Read ``tokenizer.json`` (converting a SentencePiece ``tokenizer.model`` through
    transformers when that is all there is)."""
    path = os.path.join(folder, "tokenizer.json")
    if os.path.exists(path):
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError) as e:
            raise MergeError(f"{path}: cannot read the tokenizer ({e})") from None
    else:
        data = _convert_slow_tokenizer(folder, who)
    model = data.get("model") or {}
    vocab = model.get("vocab")
    if isinstance(vocab, list):  # Unigram: [[piece, score], ...], id = position
        ids = {piece[0]: i for i, piece in enumerate(vocab)}
    elif isinstance(vocab, dict):
        ids = dict(vocab)
    else:
        raise MergeError(f"{path}: tokenizer model {model.get('type')!r} has no vocabulary that "
                         "mergesmith can read")
    added = {}
    for tok in data.get("added_tokens", []):
        ids[tok["content"]] = tok["id"]
        added[tok["content"]] = tok
    ids = {t: i for t, i in ids.items() if i < rows}  # tokens without an embedding row
    return ModelVocab(folder, data, ids, added, rows)


def _convert_slow_tokenizer(folder: str, who: str) -> dict[str, Any]:
    if not os.path.exists(os.path.join(folder, "tokenizer.model")):
        raise MergeError(f"{who} has no tokenizer.json (nor tokenizer.model) in {folder}; a "
                         "tokenizer block needs the tokenizers of the models")
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise MergeError(f"{who} has only a SentencePiece tokenizer.model; install transformers "
                         "(pip install 'mergesmith[hf]') to convert it for vocabulary merging"
                         ) from None
    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    if not hasattr(tok, "backend_tokenizer"):
        raise MergeError(f"{who}: its tokenizer cannot be converted to a fast tokenizer")
    return json.loads(tok.backend_tokenizer.to_str())


# ------------------------------------------------------------------ the plan


@dataclass
class ModelMapping:
    """How one model's rows become the output's rows."""

    perm: torch.Tensor  # (V,) old row per output token (0 where a default is used)
    default_tokens: torch.Tensor  # output ids whose row is a default (missing or forced)
    default_slots: torch.Tensor  # their positions in VocabPlan.default_tokens


@dataclass
class VocabPlan:
    """The output vocabulary and every model's mapping onto it.

    Defaults (rows for tokens a model lacks, or forced ones) are the mean of listed rows of
    listed models (one row: a copy; none: zero); only tokens some model needs are computed.
    """

    tokens: list[str]  # output id → token
    size: int  # rows written (tokens padded to pad_to_multiple_of)
    mappings: dict[int, ModelMapping]  # plan model index → mapping
    default_tokens: torch.Tensor  # (K,) output ids that need a default row
    default_sources: dict[int, tuple[torch.Tensor, torch.Tensor]]  # model → (slots, rows)
    tokenizer: dict[str, Any] | None  # output tokenizer.json (None: copy the donor's)
    source_folder: str | None  # tokenizer_config.json etc. come from here
    notes: list[str] = field(default_factory=list)
    truncate: bool = False  # --unsafe-truncate-embeddings: rows cut, no tokenizer work

    @property
    def vocab(self) -> int:
        return len(self.tokens)

    def defaults(self, inputs: list[tuple[int, torch.Tensor]],
                 prepare: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The default rows (K of them) for raw inputs ``(plan model, tensor)``."""
        first = prepare(inputs[0][1][:1])
        k = len(self.default_tokens)
        defaults = torch.zeros((k, *first.shape[1:]), dtype=first.dtype, device=first.device)
        counts = torch.zeros(k, dtype=first.dtype, device=first.device)
        for model, x in inputs:
            if model in self.default_sources:
                slots, rows = self.default_sources[model]
                defaults.index_add_(0, slots.to(first.device), prepare(x.index_select(0, rows)))
                counts.index_add_(0, slots.to(first.device),
                                  torch.ones(len(slots), dtype=counts.dtype, device=first.device))
        return defaults.div_(counts.clamp(min=1).view((-1,) + (1,) * (first.dim() - 1)))

    def rows(self, model: int, x: torch.Tensor, defaults: torch.Tensor, start: int, end: int,
             prepare: Callable[[torch.Tensor], torch.Tensor],
             padding: torch.Tensor | None = None) -> torch.Tensor:
        """Output rows ``[start, end)`` of one model: a gather of its own rows, defaults
        where it has none (or the token is forced), ``padding`` rows past the vocabulary."""
        if self.truncate:
            return prepare(x[start:end])
        m = self.mappings[model]
        real_end = min(end, self.vocab)
        out = defaults.new_empty((end - start, *x.shape[1:]))
        if real_end > start:
            out[:real_end - start].copy_(x.index_select(0, m.perm[start:real_end].to(x.device)))
            lo, hi = torch.searchsorted(m.default_tokens, torch.tensor([start, real_end]))
            if hi > lo:
                out.index_copy_(0, (m.default_tokens[lo:hi] - start).to(out.device),
                                defaults.index_select(0, m.default_slots[lo:hi].to(out.device)))
        if end > self.vocab:
            assert padding is not None
            out[max(0, self.vocab - start):] = padding
        return out

    def padding_row(self, model: int, x: torch.Tensor, defaults: torch.Tensor,
                    prepare: Callable[[torch.Tensor], torch.Tensor], chunk: int) -> torch.Tensor:
        """Mean of a model's real output rows (pad_to_multiple_of rows get it)."""
        total = None
        for start in range(0, self.vocab, chunk):
            part = self.rows(model, x, defaults, start, min(start + chunk, self.vocab), prepare)
            s = part.sum(0, dtype=torch.float64)
            total = s if total is None else total + s
        assert total is not None
        return (total / self.vocab).to(defaults.dtype)


def build_vocab_plan(recipe_tokenizer, vocabs: dict[int, ModelVocab], base: int | None,
                     model_of: Any, names: dict[int, str],
                     external: ModelVocab | None = None) -> VocabPlan:
    """Decide the output vocabulary of a ``tokenizer:`` block.

    ``vocabs``: plan model index → its vocabulary (models with vocabulary tensors);
    ``base``: plan index of the base model (or None); ``model_of(ref)`` → plan index;
    ``external``: the vocabulary of a source model that is not merged (its tokens become
    the output's; the merged models give their rows for the tokens they have).
    """
    order = list(vocabs)
    source = recipe_tokenizer.source
    where = recipe_tokenizer.where
    anchor = base if base is not None else order[0]
    notes: list[str] = []
    if source == "union":
        tokens, data = _union(vocabs, anchor, order, notes)
        folder = vocabs[anchor].folder
    else:
        if external is not None:
            v, who = external, str(source)
        else:
            chosen = anchor if source == "base" else model_of(source, f"{where}.source")
            if chosen not in vocabs:
                raise MergeError(f"{where}: tokenizer source '{source}' is not one of the "
                                 "merged models")
            v, who = vocabs[chosen], names[chosen]
        tokens = [t for t, _ in sorted(v.ids.items(), key=lambda kv: kv[1])]
        if [v.ids[t] for t in tokens] != list(range(len(tokens))):
            raise MergeError(f"{where}: the tokenizer of '{who}' has gaps in its ids; "
                             "use 'source: union'")
        data = _strip(copy.deepcopy(v.data), v.rows)
        folder = v.folder
    for token, override in recipe_tokenizer.tokens.items():
        if token not in set(tokens):
            tokens.append(token)
            _add_token(data, token, len(tokens) - 1, special=False)
            notes.append(f"token {token!r} added to the vocabulary (id {len(tokens) - 1})")
    vocab = len(tokens)
    pad = recipe_tokenizer.pad_to_multiple_of
    size = -(-vocab // pad) * pad if pad else vocab
    index = {t: i for i, t in enumerate(tokens)}

    defaults: dict[int, list[tuple[int, int]]] = {}
    zeros: list[int] = []
    forced = torch.zeros(vocab, dtype=torch.bool)
    for token, override in recipe_tokenizer.tokens.items():
        i = index[token]
        forced[i] = override.force
        if override.source is None:
            continue
        if hasattr(override.source, "model"):  # ModelRow
            m = model_of(override.source.model, f"{where}.tokens.{token}.source")
            v = vocabs.get(m)
            if v is None:
                raise MergeError(f"{where}.tokens.{token}: '{override.source.model}' is not one "
                                 "of the merged models")
            if override.source.token_id is not None:
                row = override.source.token_id
                if row >= v.rows:
                    raise MergeError(f"{where}.tokens.{token}: token_id {row} is beyond the "
                                     f"{v.rows} rows of '{names[m]}'")
            else:
                wanted = override.source.token if override.source.token is not None else token
                if wanted not in v.ids:
                    raise MergeError(f"{where}.tokens.{token}: '{names[m]}' has no token "
                                     f"{wanted!r}")
                row = v.ids[wanted]
            defaults[i] = [(m, row)]
        else:
            zeros.append(i)
    for token, i in index.items():  # the usual rules for the rest
        if i in defaults or i in zeros:
            continue
        having = [m for m in order if token in vocabs[m].ids]
        if base is not None and base in having:
            defaults[i] = [(base, vocabs[base].ids[token])]
        elif len(having) == 1:
            defaults[i] = [(having[0], vocabs[having[0]].ids[token])]
        elif having:
            defaults[i] = [(m, vocabs[m].ids[token]) for m in having]
        else:
            zeros.append(i)
            notes.append(f"token {token!r} is in no model: its embedding rows are zero")

    use_default = {m: [i for i, t in enumerate(tokens) if forced[i] or t not in vocabs[m].ids]
                   for m in order}
    needed = sorted({i for ids in use_default.values() for i in ids})
    slot = {i: k for k, i in enumerate(needed)}
    sources: dict[int, list[tuple[int, int]]] = {}
    for i in needed:
        for m, row in defaults.get(i, []):
            sources.setdefault(m, []).append((slot[i], row))
    default_sources = {m: (torch.tensor([s for s, _ in pairs], dtype=torch.long),
                           torch.tensor([r for _, r in pairs], dtype=torch.long))
                       for m, pairs in sources.items()}
    mappings = {}
    for m in order:
        perm = torch.tensor([vocabs[m].ids.get(t, 0) for t in tokens], dtype=torch.long)
        ids = use_default[m]
        mappings[m] = ModelMapping(perm, torch.tensor(ids, dtype=torch.long),
                                   torch.tensor([slot[i] for i in ids], dtype=torch.long))
    return VocabPlan(tokens, size, mappings, torch.tensor(needed, dtype=torch.long),
                     default_sources, data, folder, notes)


def _strip(data: dict[str, Any], rows: int) -> dict[str, Any]:
    """Drop tokens whose id has no embedding row (mergekit strips them from the base)."""
    model = data.get("model", {})
    vocab = model.get("vocab")
    if isinstance(vocab, dict):
        model["vocab"] = {t: i for t, i in vocab.items() if i < rows}
    elif isinstance(vocab, list):
        model["vocab"] = vocab[:rows]
    data["added_tokens"] = [t for t in data.get("added_tokens", []) if t["id"] < rows]
    return data


def _compatible(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Same model type and text processing: ordinary tokens mean the same bytes."""
    keys = ("normalizer", "pre_tokenizer", "decoder")
    return a.get("model", {}).get("type") == b.get("model", {}).get("type") and all(
        a.get(k) == b.get(k) for k in keys)


def _add_token(data: dict[str, Any], token: str, token_id: int, special: bool,
               template: dict[str, Any] | None = None) -> None:
    entry = dict(template) if template else {
        "single_word": False, "lstrip": False, "rstrip": False, "normalized": not special}
    entry.update({"id": token_id, "content": token, "special": special})
    data.setdefault("added_tokens", []).append(entry)


def _add_to_model(data: dict[str, Any], token: str, token_id: int) -> bool:
    """Add an ordinary token to the tokenizer model without changing segmentation."""
    model = data.get("model", {})
    vocab = model.get("vocab")
    kind = model.get("type")
    if kind == "BPE" and isinstance(vocab, dict):
        vocab[token] = token_id  # no merge produces it: unreachable from ordinary text
        return True
    if kind == "Unigram" and isinstance(vocab, list) and len(vocab) == token_id:
        lowest = min((score for _, score in vocab), default=0.0)
        vocab.append([token, lowest - 100.0])  # never the likeliest segmentation
        return True
    return False


def _union(vocabs: dict[int, ModelVocab], anchor: int, order: list[int],
           notes: list[str]) -> tuple[list[str], dict[str, Any]]:
    base = vocabs[anchor]
    tokens = [t for t, _ in sorted(base.ids.items(), key=lambda kv: kv[1])]
    data = _strip(copy.deepcopy(base.data), base.rows)
    present = set(tokens)
    if [base.ids[t] for t in tokens] != list(range(len(tokens))):
        # ids with gaps (rare): renumber densely, keeping the order
        notes.append("the base tokenizer's ids have gaps; the union renumbers them densely")
        data = _renumber(data, tokens)
    changed_segmentation = []
    for m in order:
        if m == anchor:
            continue
        v = vocabs[m]
        same_family = _compatible(base.data, v.data)
        for token, _ in sorted(v.ids.items(), key=lambda kv: kv[1]):
            if token in present:
                continue
            new_id = len(tokens)
            tokens.append(token)
            present.add(token)
            if token in v.added:
                _add_token(data, token, new_id, v.added[token].get("special", False),
                           v.added[token])
            elif not (same_family and _add_to_model(data, token, new_id)):
                _add_token(data, token, new_id, special=False)
                changed_segmentation.append(token)
    if changed_segmentation:
        notes.append(f"{len(changed_segmentation)} ordinary token(s) of other tokenizers could "
                     "only be added as added tokens, which the tokenizer matches in text "
                     f"(e.g. {changed_segmentation[:3]})")
    return tokens, data


def _renumber(data: dict[str, Any], tokens: list[str]) -> dict[str, Any]:
    index = {t: i for i, t in enumerate(tokens)}
    model = data.get("model", {})
    if isinstance(model.get("vocab"), dict):
        model["vocab"] = {t: index[t] for t in model["vocab"] if t in index}
    for tok in data.get("added_tokens", []):
        tok["id"] = index[tok["content"]]
    return data


def remap_special_ids(config: dict[str, Any], old: dict[int, str], new: dict[str, int],
                      notes: list[str], where: str) -> None:
    """Point ``bos/eos/pad_token_id`` (also nested, also lists) at the output's ids."""

    def fix(value: Any) -> Any:
        if isinstance(value, list):
            return [fix(v) for v in value]
        if isinstance(value, int) and not isinstance(value, bool) and value in old:
            token = old[value]
            if token in new and new[token] != value:
                notes.append(f"{where}: id of {token!r} {value} → {new[token]}")
                return new[token]
        return value

    for key, value in list(config.items()):
        if key in _SPECIAL_ID_KEYS:
            config[key] = fix(value)
        elif isinstance(value, dict):
            remap_special_ids(value, old, new, notes, where)


def truncation_plan(size: int) -> VocabPlan:
    """``--unsafe-truncate-embeddings``: keep the first ``size`` rows of every model."""
    return VocabPlan([], size, {}, torch.zeros(0, dtype=torch.long), {}, None, None,
                     truncate=True)
