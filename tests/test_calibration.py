"""The ``calibration:`` block and the calibration tokens: schema errors with positions,
windows, seed, fingerprint, JSONL fields, chat templates; bad input (missing file, empty
text, missing field, tokenizer mismatch) exits 2 from ``check``/``stats``/``run`` before
any weight is read."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from conftest import recipe_file  # noqa: E402
from test_evaluate import TEXT, char_tokenizer, tiny_lm  # noqa: E402

import mergesmith  # noqa: E402
from mergesmith.checkpoint.reader import TensorReader  # noqa: E402
from mergesmith.cli import cli  # noqa: E402
from mergesmith.errors import MergeError  # noqa: E402
from mergesmith.statistics.calibration import (  # noqa: E402
    CalibrationSettings,
    load_calibration,
)


@pytest.fixture(autouse=True)
def no_weights(monkeypatch, tmp_path):
    """Nothing here may read a weight."""
    monkeypatch.setenv("MERGESMITH_STATS_CACHE", str(tmp_path / "stats-cache"))

    def refuse(*args, **kwargs):
        raise AssertionError("a weight was read")

    monkeypatch.setattr(TensorReader, "read", refuse)


@pytest.fixture
def lms(tmp_path) -> dict[str, Path]:
    return {"a": tiny_lm(tmp_path / "a", 0), "b": tiny_lm(tmp_path / "b", 1),
            "permuted": tiny_lm(tmp_path / "p", 2, permute=True)}


def load(text: str):
    return mergesmith.recipe.load_recipe(text)


HEAD = "merge_method: linear\nmodels:\n  - model: a\n"


# ------------------------------------------------------------------ the block


def test_block_defaults_and_values():
    r = load(HEAD + "calibration:\n  jsonl: c.jsonl\n  field: body\n  max_tokens: 64\n"
             "  max_length: 16\n  batch_size: 2\n  seed: 3\n")
    c = r.calibration
    assert (c.jsonl, c.field, c.max_tokens, c.max_length, c.batch_size, c.seed) == (
        "c.jsonl", "body", 64, 16, 2, 3)
    d = load(HEAD + "calibration: {text: c.txt}\n").calibration
    assert (d.field, d.max_tokens, d.max_length, d.batch_size, d.seed) == (
        "text", 16384, 512, 8, 0)
    chat = load(HEAD + "calibration: {jsonl: c.jsonl, chat_template: true}\n").calibration
    assert chat.field == "messages"


@pytest.mark.parametrize("block, message", [
    ("  txt: c.txt\n", r"recipe>?:\d+:\d+: unknown key 'txt' in calibration\. Did you mean "
                       r"'text'"),
    ("  text: c.txt\n  jsonl: c.jsonl\n", "exactly one of 'text: FILE' or 'jsonl: FILE'"),
    ("  max_tokens: 64\n", "exactly one of 'text: FILE' or 'jsonl: FILE'"),
    ("  text: c.txt\n  field: body\n", r"calibration\.field \(<recipe>:\d+\): 'field' names"),
    ("  text: c.txt\n  chat_template: true\n", "'chat_template' applies to 'jsonl'"),
    ("  text: c.txt\n  max_length: 1\n", r"calibration\.max_length .*at least 2"),
    ("  text: c.txt\n  batch_size: 0\n", r"calibration\.batch_size .*at least 1"),
    ("  text: c.txt\n  max_tokens: lots\n", "valid integer"),
])
def test_block_errors_name_the_key_and_line(block, message):
    with pytest.raises(MergeError, match=message):
        load(HEAD + "calibration:\n" + block)


# ------------------------------------------------------------------ tokens


def test_windows_mask_seed_and_fingerprint(tmp_path, lms):
    text = tmp_path / "c.txt"
    text.write_text(TEXT * 4)
    block = {"text": str(text), "max_tokens": 100, "max_length": 32}
    t = load_calibration(block, str(lms["a"]))
    assert t.input_ids.shape == (4, 32) and t.tokens == 100
    assert t.attention_mask[:3].all() and t.attention_mask[3].sum() == 4
    tok = char_tokenizer()
    stream = tok(TEXT * 4)["input_ids"]
    windows = [stream[i:i + 32] for i in range(0, len(stream) - 31, 32)]
    assert all(list(row[:int(m.sum())]) in [w[:int(m.sum())] for w in windows]
               for row, m in zip(t.input_ids.tolist(), t.attention_mask))
    again = load_calibration(block, str(lms["a"]))
    assert torch.equal(again.input_ids, t.input_ids) and again.fingerprint == t.fingerprint
    other = load_calibration({**block, "seed": 1}, str(lms["a"]))
    assert not torch.equal(other.input_ids, t.input_ids)
    assert other.fingerprint != t.fingerprint
    assert load_calibration({**block, "max_length": 16}, str(lms["a"])).fingerprint != \
        t.fingerprint
    assert load_calibration(block, str(lms["a"]), batch_size=3).batches()[0] == slice(0, 3)
    # a short text: one shorter window, nothing padded
    text.write_text("a cat")
    short = load_calibration(block, str(lms["a"]))
    assert short.input_ids.shape == (1, 5) and bool(short.attention_mask.all())


def test_jsonl_fields_and_chat_template(tmp_path, lms):
    rows = tmp_path / "c.jsonl"
    rows.write_text("\n".join(json.dumps(r) for r in [
        {"body": "the cat sat", "messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "ok"}]},
        {"body": "a dog ran", "messages": [{"role": "user", "content": "yo"}]}]) + "\n")
    t = load_calibration({"jsonl": str(rows), "field": "body", "max_length": 64},
                         str(lms["a"]))
    tok = char_tokenizer()
    ids = tok("the cat sat")["input_ids"], tok("a dog ran")["input_ids"]
    got = t.input_ids[t.attention_mask.bool()].tolist()
    assert got in (ids[0] + ids[1], ids[1] + ids[0])  # rows packed, in the seed's order
    # windows cut from the packed rows; a partial last window is dropped when others exist
    short = load_calibration({"jsonl": str(rows), "field": "body", "max_length": 8},
                             str(lms["a"]))
    assert short.input_ids.shape == (2, 8) and bool(short.attention_mask.all())
    with pytest.raises(MergeError, match="c.jsonl:1: no field 'text'"):
        load_calibration({"jsonl": str(rows)}, str(lms["a"]))
    with pytest.raises(MergeError, match="has no chat template"):
        load_calibration({"jsonl": str(rows), "chat_template": True}, str(lms["a"]))
    chat = tmp_path / "chat"
    tok.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n"
                         "{% endfor %}")
    tok.save_pretrained(chat)
    t = load_calibration({"jsonl": str(rows), "chat_template": True, "max_length": 64},
                         str(chat))
    text = tok.decode(t.input_ids[t.attention_mask.bool()].tolist())
    assert "user: hi" in text and "assistant: ok" in text and "user: yo" in text


def test_settings_object_and_overrides(tmp_path, lms):
    text = tmp_path / "c.txt"
    text.write_text(TEXT)
    s = CalibrationSettings(text=str(text), max_tokens=40, max_length=20)
    assert load_calibration(s, str(lms["a"])).input_ids.shape == (2, 20)
    assert load_calibration(s, str(lms["a"]), max_length=10).input_ids.shape == (4, 10)


# ------------------------------------------------------------------ check / stats / run


def recipe(tmp_path: Path, models: list[Path], block: str) -> Path:
    lines = "".join(f"  - model: {m}\n" for m in models)
    return recipe_file(tmp_path, f"merge_method: linear\nmodels:\n{lines}"
                                 f"parameters: {{weight: 0.5}}\ncalibration:\n{block}")


def one_line_exit_2(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    err = result.output.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), result.output
    for f in fragments:
        assert f in err[0], err[0]


def test_check_accepts_good_calibration_and_notes_it(tmp_path, lms):
    text = tmp_path / "c.txt"
    text.write_text(TEXT)
    r = CliRunner().invoke(cli, ["check", str(recipe(tmp_path, [lms["a"], lms["b"]],
                                                     f"  text: {text}\n  max_tokens: 64\n"))])
    assert r.exit_code == 0, r.output
    assert "calibration: 64 tokens" in r.output and "ok: the recipe is valid" in r.output


@pytest.mark.parametrize("case", ["missing", "empty", "field", "mismatch", "not-json"])
def test_bad_calibration_exits_2_before_any_weight_is_read(tmp_path, lms, case):
    text = tmp_path / "c.txt"
    text.write_text("" if case == "empty" else TEXT)
    rows = tmp_path / "c.jsonl"
    rows.write_text('{"body": "the cat"}\n' if case != "not-json" else "{oops\n")
    models = [lms["a"], lms["permuted"] if case == "mismatch" else lms["b"]]
    block, fragments, flags = {
        "missing": (f"  text: {tmp_path / 'nope.txt'}\n", ["nope.txt: not found"],
                    ["--text", str(tmp_path / "nope.txt")]),
        "empty": (f"  text: {text}\n", ["c.txt is empty"], ["--text", str(text)]),
        "field": (f"  jsonl: {rows}\n", ["c.jsonl:1: no field 'text'"],
                  ["--jsonl", str(rows)]),
        "not-json": (f"  jsonl: {rows}\n", ["c.jsonl:1: not valid JSON"],
                     ["--jsonl", str(rows)]),
        "mismatch": (f"  text: {text}\n", ["tokenizer mismatch", str(lms["a"]),
                                           str(lms["permuted"])], None),
    }[case]
    path = recipe(tmp_path, models, block)
    one_line_exit_2(CliRunner().invoke(cli, ["check", str(path)]), *fragments)
    one_line_exit_2(CliRunner().invoke(cli, ["run", str(path), str(tmp_path / "out")]),
                    *fragments)
    assert not (tmp_path / "out").exists()
    if flags is not None:  # 'stats' with flags, and with the recipe's block
        one_line_exit_2(CliRunner().invoke(cli, ["stats", str(lms["a"]), *flags]),
                        *fragments[:1])
        one_line_exit_2(CliRunner().invoke(cli, ["stats", str(lms["a"]), "--calibration",
                                                 str(path)]), *fragments[:1])


def test_stats_argument_errors(tmp_path, lms):
    text = tmp_path / "c.txt"
    text.write_text(TEXT)
    one_line_exit_2(CliRunner().invoke(cli, ["stats", str(lms["a"])]),
                    "exactly one of --calibration")
    one_line_exit_2(CliRunner().invoke(cli, ["stats", str(lms["a"]), "--text", str(text),
                                             "--kinds", "hessian"]), "--kinds hessian")
    one_line_exit_2(CliRunner().invoke(cli, ["stats", str(tmp_path / "none"), "--text",
                                             str(text)]), "not found")
    block = recipe_file(tmp_path, "calibration: {text: c.txt, max_lenght: 3}\n", "b.yml")
    one_line_exit_2(CliRunner().invoke(cli, ["stats", str(lms["a"]), "--calibration",
                                             str(block)]), "unknown key 'max_lenght'")
