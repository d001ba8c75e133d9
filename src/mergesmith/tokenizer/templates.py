"""Chat templates: ``auto`` (the inputs' most common), built-in names, or literal Jinja."""

from __future__ import annotations

import json
import os
from collections import Counter

from ..errors import MergeError

BUILTIN = {
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}"
        "{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
        " + message['content'] | trim + '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
        "{% endif %}"
    ),
    "mistral": (
        "{{ bos_token }}{% set system = namespace(text='') %}"
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{% set system.text = message['content'] + '\\n\\n' %}"
        "{% elif message['role'] == 'user' %}"
        "{{ '[INST] ' + system.text + message['content'] + ' [/INST]' }}"
        "{% set system.text = '' %}"
        "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}"
        "{% endif %}"
        "{% endfor %}"
    ),
    "alpaca": (
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
        "{% elif message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
        "{% elif message['role'] == 'assistant' %}"
        "{{ '### Response:\\n' + message['content'] + eos_token + '\\n\\n' }}"
        "{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
    ),
    "exaone": (
        "{% for message in messages %}"
        "{% if loop.first and message['role'] != 'system' %}{{ '[|system|][|endofturn|]\\n' }}"
        "{% endif %}"
        "{{ '[|' + message['role'] + '|]' + message['content'] }}"
        "{% if message['role'] == 'user' %}{{ '\\n' }}{% else %}{{ '[|endofturn|]\\n' }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '[|assistant|]' }}{% endif %}"
    ),
}


def model_chat_template(folder: str) -> str | None:
    """A model folder's chat template, wherever transformers versions keep it."""
    path = os.path.join(folder, "chat_template.jinja")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    for name, key in (("chat_template.json", "chat_template"),
                      ("tokenizer_config.json", "chat_template")):
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            continue
        try:
            with open(path, encoding="utf-8") as f:
                value = json.load(f).get(key)
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(value, list):  # named templates: take the default one
            value = next((t.get("template") for t in value if t.get("name") == "default"), None)
        if isinstance(value, str):
            return value
    return None


def resolve_chat_template(value: str, templates: list[str | None], where: str) -> str | None:
    """The template text for the recipe's ``chat_template`` (None: keep the donor's);
    ``templates`` are the input models' own, in recipe order."""
    if value == "auto":
        found = [t.strip() for t in templates if t]
        if not found:
            return None
        counts = Counter(found)
        best = max(counts.values())
        return next(t for t in found if counts[t] == best)  # ties: the earliest model
    if value in BUILTIN:
        return BUILTIN[value]
    if len(value) >= 20 and "{" in value:
        return value
    raise MergeError(f"{where}: '{value}' is neither 'auto', a built-in template "
                     f"({', '.join(BUILTIN)}) nor a Jinja template")
