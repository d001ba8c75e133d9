"""Calibration data: a recipe's ``calibration:`` block (or the same settings from the command
line) → the token ids every data-aware method runs through its models.

The documents (a text file: one document; a JSONL file: one per line, its ``field``; with
``chat_template: true`` the ``messages`` lists rendered by the model's chat template) are
shuffled by ``seed``, tokenized (special tokens included, as in training), concatenated
and cut into windows of ``max_length`` tokens; ``seed`` also picks which windows are used
when there are more than ``max_tokens`` needs. The last window may be shorter: it is
padded on the right and masked (``attention_mask`` 0), so padding never changes a real
token's inputs (attention is causal) and no statistic counts it.

RegMean needs the *same* tokens through every model: :func:`check_calibration` tokenizes
with every input model's tokenizer and refuses models whose ids differ.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import MergeError

DEFAULT_MAX_TOKENS = 16384
DEFAULT_MAX_LENGTH = 512
DEFAULT_BATCH_SIZE = 8
_READ_FACTOR = 8  # tokenize at most this many times max_tokens (the windows seed samples)


@dataclass
class CalibrationSettings:
    """What ``calibration:`` says (paths as written; resolved from the current folder,
    like model paths)."""

    text: str | None = None
    jsonl: str | None = None
    field_name: str | None = None  # default 'text' ('messages' with chat_template)
    chat_template: bool = False
    max_tokens: int = DEFAULT_MAX_TOKENS
    max_length: int = DEFAULT_MAX_LENGTH
    batch_size: int = DEFAULT_BATCH_SIZE
    seed: int = 0
    where: str = "calibration"

    @property
    def path(self) -> str:
        return os.path.expanduser(self.text if self.text is not None else self.jsonl or "")

    @property
    def field(self) -> str:
        return self.field_name or ("messages" if self.chat_template else "text")

    def key(self) -> dict[str, Any]:
        """The settings that change the tokens (for fingerprints)."""
        return {"kind": "text" if self.text is not None else "jsonl", "field": self.field,
                "chat_template": self.chat_template, "max_tokens": self.max_tokens,
                "max_length": self.max_length, "seed": self.seed}


@dataclass
class CalibrationTokens:
    """``input_ids`` and ``attention_mask``, both ``[n_seq, length]`` int64;
    ``batch_size`` sequences go through a model at once."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    batch_size: int = DEFAULT_BATCH_SIZE
    settings: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    @property
    def tokens(self) -> int:
        return int(self.attention_mask.sum())

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the token ids, the mask and the settings (the cache key's part)."""
        h = hashlib.sha256()
        h.update(json.dumps({**self.settings, "batch_size": self.batch_size,
                             "shape": list(self.input_ids.shape)}, sort_keys=True).encode())
        h.update(self.input_ids.to(torch.int64).contiguous().numpy().tobytes())
        h.update(self.attention_mask.to(torch.int64).contiguous().numpy().tobytes())
        return h.hexdigest()

    def batches(self) -> list[slice]:
        n = self.input_ids.shape[0]
        return [slice(i, min(i + self.batch_size, n)) for i in range(0, n, self.batch_size)]


def settings_from(block: Any, **overrides: Any) -> CalibrationSettings:
    """A :class:`CalibrationSettings` from a Recipe, its ``calibration`` block, a mapping
    (the YAML block), or a settings object; ``overrides`` that are not None win."""
    from ..recipe.schema import Recipe

    if isinstance(block, Recipe):
        if block.calibration is None:
            raise MergeError(f"{block.source}: the recipe has no 'calibration:' block")
        block = block.calibration
    if isinstance(block, dict):
        from ..recipe.schema import parse_calibration_block

        block = parse_calibration_block(block)
    if not isinstance(block, CalibrationSettings):
        raise TypeError(f"not calibration settings: {type(block).__name__}")
    values = {k: v for k, v in overrides.items() if v is not None}
    if values:
        block = CalibrationSettings(**{**block.__dict__, **values})
    return block


# ------------------------------------------------------------------ documents


def read_documents(s: CalibrationSettings) -> list[Any]:
    """The documents (strings; lists of messages with ``chat_template``); MergeError for a
    missing, unreadable or empty file and for rows without the field."""
    path = s.path
    shown = s.text if s.text is not None else s.jsonl
    if not path:
        raise MergeError(f"{s.where}: give 'text: FILE' or 'jsonl: FILE'")
    if not os.path.isfile(path):
        what = "a folder" if os.path.isdir(path) else "not found"
        raise MergeError(f"{s.where}: calibration file {shown}: {what} (relative paths are "
                         f"resolved from the current folder, {os.getcwd()})")
    try:
        with open(path, encoding="utf-8") as f:
            content = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise MergeError(f"{s.where}: cannot read calibration file {shown}: {e}") from None
    if s.text is not None:
        if s.chat_template:
            raise MergeError(f"{s.where}: 'chat_template' needs 'jsonl' rows with messages")
        if not content.strip():
            raise MergeError(f"{s.where}: calibration file {shown} is empty")
        return [content]
    from ..evaluate.runner import jsonl_field_values

    docs: list[Any] = []
    name = s.field
    for n, value in jsonl_field_values(content, f"{s.where}: {shown}", name, "'field:'"):
        if s.chat_template:
            if not (isinstance(value, list) and value and all(
                    isinstance(m, dict) and "role" in m and "content" in m for m in value)):
                raise MergeError(f"{s.where}: {shown}:{n}: field '{name}' is not a list of "
                                 "messages ({'role': ..., 'content': ...})")
            docs.append(value)
            continue
        if not isinstance(value, str):
            raise MergeError(f"{s.where}: {shown}:{n}: field '{name}' is "
                             f"{type(value).__name__}, expected a string")
        if value.strip():
            docs.append(value)
    if not docs:
        raise MergeError(f"{s.where}: calibration file {shown} has no non-empty '{name}' "
                         "values")
    return docs


# ------------------------------------------------------------------ tokens


def load_tokenizer(folder: str, where: str = "calibration") -> Any:
    from ..evaluate.runner import _quiet_transformers, has_tokenizer

    if not has_tokenizer(folder):
        raise MergeError(f"{where}: {folder} has no tokenizer (tokenizer.json, "
                         "tokenizer.model, ...); calibration tokens need one")
    from transformers import AutoTokenizer

    try:
        with _quiet_transformers():
            return AutoTokenizer.from_pretrained(folder, local_files_only=True,
                                                 trust_remote_code=False)
    except Exception as e:  # transformers raises many types; all mean "cannot load it"
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise MergeError(f"{where}: cannot load the tokenizer of {folder}: "
                         f"{type(e).__name__}: {first}") from None


def _token_stream(s: CalibrationSettings, docs: list[Any], tokenizer: Any,
                  folder: str) -> list[int]:
    from ..evaluate.runner import _quiet_transformers

    order = list(range(len(docs)))
    random.Random(s.seed).shuffle(order)
    limit = s.max_tokens * _READ_FACTOR
    stream: list[int] = []
    with _quiet_transformers():
        for i in order:
            doc = docs[i]
            try:
                if s.chat_template:
                    if not getattr(tokenizer, "chat_template", None):
                        raise MergeError(f"{s.where}: {folder} has no chat template "
                                         "('chat_template: true' needs one)")
                    text = tokenizer.apply_chat_template(doc, tokenize=False)
                    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
                else:
                    ids = tokenizer(doc, add_special_tokens=True)["input_ids"]
            except MergeError:
                raise
            except Exception as e:
                raise MergeError(f"{s.where}: the tokenizer of {folder} fails on the "
                                 f"calibration data: {type(e).__name__}: {e}") from None
            stream.extend(int(t) for t in ids)
            if len(stream) >= limit:
                break
    if not stream:
        raise MergeError(f"{s.where}: the calibration data gives no tokens with the "
                         f"tokenizer of {folder}")
    return stream


def tokenize(s: CalibrationSettings, tokenizer: Any, folder: str = "",
             docs: list[Any] | None = None) -> CalibrationTokens:
    """Token windows for one tokenizer (see the module docstring)."""
    docs = read_documents(s) if docs is None else docs
    stream = _token_stream(s, docs, tokenizer, folder)
    length = s.max_length
    windows = [stream[i:i + length] for i in range(0, len(stream), length)]
    if len(windows) > 1 and len(windows[-1]) < length:
        windows.pop()  # a partial tail only when it is all there is
    need = -(-s.max_tokens // length)
    if len(windows) > need:
        chosen = sorted(random.Random(s.seed + 1).sample(range(len(windows)), need))
        windows = [windows[i] for i in chosen]
    total = 0
    out = []
    for w in windows:
        w = w[:s.max_tokens - total]
        if w:
            out.append(w)
            total += len(w)
    width = max(len(w) for w in out)
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = pad if pad is not None else (getattr(tokenizer, "eos_token_id", None) or 0)
    ids = torch.full((len(out), width), int(pad), dtype=torch.int64)
    mask = torch.zeros((len(out), width), dtype=torch.int64)
    for i, w in enumerate(out):
        ids[i, :len(w)] = torch.tensor(w, dtype=torch.int64)
        mask[i, :len(w)] = 1
    return CalibrationTokens(ids, mask, s.batch_size, s.key(), s.text or s.jsonl or "")


def load_calibration(recipe_or_block: Any, tokenizer_folder: str,
                     **overrides: Any) -> CalibrationTokens:
    """The calibration tokens of ``recipe_or_block`` (a Recipe with ``calibration:``, the
    block, or its YAML mapping) tokenized with the tokenizer in ``tokenizer_folder``.
    ``.input_ids``/``.attention_mask`` are ``[n_seq, max_length]``; ``.fingerprint``
    identifies tokens and settings."""
    s = settings_from(recipe_or_block, **overrides)
    return tokenize(s, load_tokenizer(tokenizer_folder, s.where), tokenizer_folder)


def common_tokens(s: CalibrationSettings, folders: list[tuple[str, str]]) -> CalibrationTokens:
    """Tokenize with every model's tokenizer (``folders``: (name, folder) pairs) and return
    the tokens, which must be the same for all: a *tokenizer mismatch* is a MergeError
    naming the two models. Models without tokenizer files use the first one's (noted by
    :func:`check_calibration`)."""
    docs = read_documents(s)
    first: tuple[str, CalibrationTokens] | None = None
    from ..evaluate.runner import has_tokenizer

    with_tok = [(n, f) for n, f in folders if has_tokenizer(f)]
    if not with_tok:
        names = ", ".join(n for n, _ in folders)
        raise MergeError(f"{s.where}: no input model has a tokenizer ({names}); calibration "
                         "tokens need one")
    seen: dict[str, CalibrationTokens] = {}
    for name, folder in with_tok:
        key = os.path.realpath(folder)
        if key not in seen:
            seen[key] = tokenize(s, load_tokenizer(folder, s.where), folder, docs)
        tokens = seen[key]
        if first is None:
            first = (name, tokens)
            continue
        other = first[1]
        if (tokens.input_ids.shape != other.input_ids.shape
                or not torch.equal(tokens.input_ids * tokens.attention_mask,
                                   other.input_ids * other.attention_mask)
                or not torch.equal(tokens.attention_mask, other.attention_mask)):
            raise MergeError(f"{s.where}: tokenizer mismatch: {first[0]} and {name} give "
                             "different token ids for the calibration data (data-aware "
                             "methods need the same tokens through every model)")
    assert first is not None
    return first[1]


def check_calibration(plan: Any) -> list[str]:
    """Validate a plan's ``calibration:`` block without reading weights; notes for
    ``check``."""
    s = plan.recipe.calibration
    if s is None:
        return []
    folders = []
    for m in plan.models:
        if getattr(m, "stage", None) is not None:
            continue
        folders.append((str(m.ref), m.folder))
    tokens = common_tokens(s, folders)
    from ..evaluate.runner import has_tokenizer

    notes = [f"calibration: {tokens.tokens} tokens of {s.text or s.jsonl} in "
             f"{tokens.input_ids.shape[0]} sequence(s) of up to {tokens.input_ids.shape[1]}, "
             f"the same ids with every model's tokenizer"]
    bare = [n for n, f in folders if not has_tokenizer(f)]
    if bare:
        notes.append("calibration: no tokenizer in " + ", ".join(bare)
                     + " (assumed to be the others')")
    return notes
