"""The output vocabulary (``tokenizer:`` / ``tokenizer_source:``) and chat template, planned
before any tensor so that embeddings and heads know their rows."""

from __future__ import annotations

from ..errors import MergeError
from ..recipe import ModelReference
from ..tokenizer import build_vocab_plan, resolve_chat_template
from .draft import Draft


def plan_vocabulary(d: Draft, donor: int) -> None:
    r = d.recipe
    if r.tokenizer is None:
        return
    d.vocabs = {m: d.sources[m].vocabulary(rows) for m, rows in d.rows.items()}
    if not d.vocabs:
        raise MergeError(f"{r.tokenizer.where}: the models have no token embeddings to align")
    base = d.model_index.get(r.base_model) if r.base_model is not None else None
    if base is None:
        base = donor

    def model_of(ref: ModelReference, where: str) -> int:
        if ref not in d.model_index:
            raise MergeError(f"{where}: '{ref}' is not one of the merged models")
        return d.model_index[ref]

    external = d.external_tokenizer.vocabulary() if d.external_tokenizer is not None else None
    d.vocab = build_vocab_plan(r.tokenizer, d.vocabs, base, model_of,
                               {i: str(ref) for i, ref in enumerate(d.refs)}, external)
    if external is not None:
        d.notes.append(f"vocabulary of '{d.external_tokenizer.ref}' (not merged: its "
                       "tokenizer only)")
    d.notes.extend(d.vocab.notes)
    d.notes.append(f"output vocabulary: {d.vocab.vocab} tokens"
                   + (f", padded to {d.vocab.size} rows" if d.vocab.size > d.vocab.vocab else ""))


def plan_chat_template(d: Draft) -> None:
    r = d.recipe
    if r.chat_template is None:
        return
    template = resolve_chat_template(r.chat_template, [s.chat_template for s in d.sources],
                                     r.at("chat_template"))
    if template is None:
        d.warnings.append("chat_template: auto: no input model has a chat template; "
                          "the base model's tokenizer files are kept as they are")
    d.chat_template = template
