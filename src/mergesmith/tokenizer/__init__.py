"""Vocabularies and tokenizers: union/base/model vocabularies, embedding re-indexing, chat
templates, and the output's tokenizer files."""

from .templates import BUILTIN as BUILTIN_CHAT_TEMPLATES
from .templates import model_chat_template, resolve_chat_template
from .vocab import (ModelVocab, VocabPlan, build_vocab_plan, load_vocab, remap_special_ids,
                    truncation_plan)

__all__ = ["BUILTIN_CHAT_TEMPLATES", "ModelVocab", "VocabPlan", "build_vocab_plan", "load_vocab",
           "model_chat_template", "remap_special_ids", "resolve_chat_template", "truncation_plan"]
