"""Fuzzing the two parsers that read untrusted input: recipes and safetensors headers.

Every input must either parse or raise MergeError (one clear message); anything else is a
bug. CI runs a bounded number of examples; set MERGESMITH_FUZZ_EXAMPLES for a longer run
(see tests/README.md).
"""

from __future__ import annotations

import json
import os
import struct

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mergesmith import MergeError
from mergesmith.checkpoint.safetensors_format import read_header
from mergesmith.recipe import load_recipe

EXAMPLES = int(os.environ.get("MERGESMITH_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

KEYS = ["merge_method", "base_model", "models", "slices", "modules", "parameters", "dtype",
        "out_dtype", "tokenizer", "tokenizer_source", "chat_template", "name", "seed", "model",
        "layer_range", "sources", "weight", "density", "filter", "value", "source", "tokens",
        "kind", "token", "token_id", "force", "pad_to_multiple_of", "path", "revision", "lora",
        "t", "lambda", "normalize", "residual_weight", "text_decoder", "wieght", "moddels"]

scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 2**40), st.floats(allow_nan=True),
                    st.text(max_size=12), st.sampled_from(["linear", "ties", "union", "base",
                                                           "./m", "a/b@c", "bf16", "re:(("]))
values = st.recursive(
    scalars,
    lambda children: st.one_of(st.lists(children, max_size=4),
                               st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=6),
                                               children, max_size=5)),
    max_leaves=25)
recipes = st.dictionaries(st.sampled_from(KEYS), values, max_size=7)


def _parses_or_explains(text: str) -> None:
    try:
        load_recipe(text)
    except MergeError as e:
        message = str(e)
        assert message and "\n" not in message.strip("\n") or "YAML" in message, message


@FUZZ
@given(recipes)
def test_recipe_structures(data):
    _parses_or_explains(yaml.safe_dump(data, sort_keys=False) + "\n# end\n")


@FUZZ
@given(st.text(alphabet=st.sampled_from(list("abc:-[]{}#'\"\n\t &*!|>%@`,?0129.")),
               max_size=200))
def test_recipe_raw_text(text):
    if text.strip() and "\n" not in text and not text.lstrip().startswith("merge_method"):
        text = "merge_method: x\n" + text  # keep it YAML text, not a file path
    _parses_or_explains(text + "\n")


def _header_file(tmp_path, payload: bytes) -> str:
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(payload)
    return str(path)


entries = st.dictionaries(
    st.text(max_size=8),
    st.one_of(values, st.fixed_dictionaries({
        "dtype": st.sampled_from(["F32", "BF16", "I64", "F16", "BOOL", "Q4", 3, None]),
        "shape": st.lists(st.integers(-2, 6), max_size=3) | values,
        "data_offsets": st.lists(st.integers(-4, 400), min_size=0, max_size=3) | values})),
    max_size=4)


@FUZZ
@given(header=entries, data_len=st.integers(0, 500), length_delta=st.integers(-10, 10))
def test_safetensors_headers(tmp_path_factory, header, data_len, length_delta):
    tmp = tmp_path_factory.mktemp("h")
    body = json.dumps(header).encode()
    payload = struct.pack("<Q", max(0, len(body) + length_delta)) + body + b"\0" * data_len
    try:
        parsed, _ = read_header(_header_file(tmp, payload))
    except MergeError:
        return
    for e in parsed:  # a header we accept describes bytes that exist, without overlaps
        assert e.offset + e.nbytes <= len(payload)


@FUZZ
@given(st.binary(max_size=300))
def test_safetensors_raw_bytes(tmp_path_factory, payload):
    tmp = tmp_path_factory.mktemp("b")
    try:
        read_header(_header_file(tmp, payload))
    except MergeError:
        pass


@pytest.mark.parametrize("payload", [
    struct.pack("<Q", 51) + b'{"w":{"dtype":[1],"shape":[],"data_offsets":[0,0]}}',
    struct.pack("<Q", 2) + b"[]",
    struct.pack("<Q", 2) + b"{}",
    struct.pack("<Q", 13) + b'{"__metadata__":5}'[:13],
    struct.pack("<Q", 4) + b"\xff\xfe{}",
])
def test_header_regressions_found_by_fuzzing(tmp_path, payload):
    try:
        read_header(_header_file(tmp_path, payload))
    except MergeError:
        pass


@pytest.mark.parametrize("text", [
    '"merge_method\\nlinear": 1\n',            # a key with a newline: still a one-line message
    "models:\n  - model: {path: x, 1: 2}\n",  # non-string keys next to string keys
    'merge_method: linear\nmodules:\n  "\\n": {merge_method: x}\n',  # a module named "\n"
    "models:\n  - model: ./m\n    parameters:\n      weight:\n        - {filter: a, 3: b}\n",
])
def test_recipe_regressions_found_by_fuzzing(text):
    _parses_or_explains(text)
