"""``mergesmith eval`` and recipes' ``evaluate:``: the numbers against a direct computation
with transformers, batching, caching, lm-eval local tasks, the model card, the CLI."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner
from conftest import LLAMA, random_tensors, recipe_file, write_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

transformers = pytest.importorskip("transformers")

import mergesmith  # noqa: E402
from mergesmith.cli import cli  # noqa: E402
from mergesmith.errors import MergeError  # noqa: E402
from mergesmith.evaluate import EvalCache, model_fingerprint  # noqa: E402
from mergesmith.evaluate import runner  # noqa: E402
from mergesmith.evaluate.after_merge import recipe_parents  # noqa: E402
from mergesmith.evaluate.perplexity import Totals, kl_sum, nll_sum, top1_matches  # noqa: E402
from mergesmith.evaluate.runner import evaluate, make_windows  # noqa: E402

CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789 .,:?!'-\n")
SPECIAL = ["<unk>", "<s>", "</s>", "<pad>"]
TEXT = ("the cat sat on the mat. a dog ran to the park with a red ball, and the cat "
        "watched it go. then it rained: 12 drops, 34 drops! who knows?\n") * 3


def char_tokenizer(permute: bool = False):
    """A character-level tokenizer that works offline (50 ids, fits LLAMA's 64)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    chars = CHARS[::-1] if permute else CHARS
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(SPECIAL + chars)},
                                     unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        pad_token="<pad>")


def tiny_lm(folder: Path, seed: int, vocab: int = 64, permute: bool = False,
            base: dict | None = None, scale: float = 0.01) -> Path:
    """A Llama-shaped model (conftest's config) with the char tokenizer."""
    config = dict(LLAMA, vocab_size=vocab)
    write_model(folder, random_tensors(config, seed, base, scale=scale), config)
    char_tokenizer(permute).save_pretrained(folder)
    return folder


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """A fresh result cache per test; one torch thread (the CI cores are shared, and
    tiny models gain nothing from two)."""
    monkeypatch.setenv("MERGESMITH_EVAL_CACHE", str(tmp_path / "eval-cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def lms(tmp_path) -> dict[str, Path]:
    base = random_tensors(LLAMA, 0)
    return {"a": tiny_lm(tmp_path / "a", 0),
            "b": tiny_lm(tmp_path / "b", 1, base=base, scale=0.05),
            "c": tiny_lm(tmp_path / "c", 2)}


@pytest.fixture
def text(tmp_path) -> Path:
    path = tmp_path / "eval.txt"
    path.write_text(TEXT)
    return path


def no_cache() -> EvalCache:
    return EvalCache(enabled=False)


# ------------------------------------------------------------------ the math


def direct(model_dir: Path, parent_dir: Path, text: str, max_length: int) -> dict:
    """Perplexity, KL(parent ‖ model) and top-1 written out with transformers: each window
    run alone (no padding), torch.nn.functional for the divergence."""
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    ids = tok(text)["input_ids"]
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    parent = transformers.AutoModelForCausalLM.from_pretrained(parent_dir, dtype=torch.float32)
    nll_m = nll_p = kl = 0.0
    agree = n = 0
    with torch.no_grad():
        for start in range(0, len(ids), max_length):
            w = torch.tensor(ids[start:start + max_length])
            if len(w) < 2:
                continue
            lm = torch.log_softmax(model(w[None]).logits[0, :-1].double(), -1)
            lp = torch.log_softmax(parent(w[None]).logits[0, :-1].double(), -1)
            target = w[1:]
            nll_m -= lm[torch.arange(len(target)), target].sum().item()
            nll_p -= lp[torch.arange(len(target)), target].sum().item()
            kl += torch.nn.functional.kl_div(lm, lp, log_target=True, reduction="sum").item()
            agree += (lm.argmax(-1) == lp.argmax(-1)).sum().item()
            n += len(target)
    return {"perplexity": torch.tensor(nll_m / n).exp().item(),
            "parent_perplexity": torch.tensor(nll_p / n).exp().item(),
            "kl": kl / n, "top1": agree / n, "n": n}


def test_perplexity_kl_top1_equal_a_direct_computation(lms, text):
    want = direct(lms["a"], lms["b"], TEXT, max_length=37)
    report = evaluate(str(lms["a"]), text=str(text), parents=[str(lms["b"])], max_length=37,
                      batch_size=3, cache=no_cache())
    assert report.data.scored == want["n"]
    assert report.model.perplexity == pytest.approx(want["perplexity"], rel=1e-5)
    parent = report.parents[0]
    assert parent.perplexity == pytest.approx(want["parent_perplexity"], rel=1e-5)
    assert parent.kl == pytest.approx(want["kl"], rel=1e-4, abs=1e-7)
    assert parent.kl > 0 and parent.kl_reverse > 0
    assert parent.top1 == pytest.approx(want["top1"])


def test_a_model_against_itself_has_kl_zero_and_full_agreement(lms, text):
    report = evaluate(str(lms["a"]), text=str(text), parents=[str(lms["a"])], max_length=50,
                      cache=no_cache())
    p = report.parents[0]
    assert p.kl == pytest.approx(0, abs=1e-7) and p.kl_reverse == pytest.approx(0, abs=1e-7)
    assert p.top1 == 1.0
    assert p.perplexity == pytest.approx(report.model.perplexity, rel=1e-6)


def test_batch_size_does_not_change_the_results(lms, tmp_path):
    docs = tmp_path / "docs.jsonl"  # documents of different lengths: padded batches
    docs.write_text("".join(json.dumps({"body": TEXT[:n]}) + "\n" for n in (7, 150, 33, 90, 2)))
    results = []
    for bs in (1, 2, 5):
        r = evaluate(str(lms["a"]), jsonl=str(docs), field_name="body",
                     parents=[str(lms["b"])], max_length=40, batch_size=bs, cache=no_cache())
        p = r.parents[0]
        results.append((r.model.perplexity, p.perplexity, p.kl, p.kl_reverse, p.top1))
    for other in results[1:]:
        assert other == pytest.approx(results[0], rel=1e-5, abs=1e-8)


def test_math_functions_on_small_tensors():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    targets = torch.tensor([0, 2])
    lp = torch.log_softmax(logits.double(), -1)
    assert nll_sum(logits, targets) == pytest.approx(-(lp[0, 0] + lp[1, 2]).item())
    assert kl_sum(logits, logits) == pytest.approx(0, abs=1e-12)
    other = torch.tensor([[0.0, 2.0, -1.0], [0.0, 0.0, float("-inf")]])
    lq = torch.log_softmax(other.double(), -1)
    # p has a token q cannot produce: KL(q‖p) is finite, KL(p‖q) infinite
    assert kl_sum(other, logits) == pytest.approx(
        (lq.exp() * (lq - lp)).nan_to_num(0.0).sum().item())
    assert kl_sum(logits, other) == float("inf")
    assert top1_matches(logits, other) == 1  # row 2: all ties → argmax 0 in both
    t = Totals()
    t.add(logits, targets, logits)
    assert (t.positions, t.top1, t.kl) == (2, 2, pytest.approx(0, abs=1e-12))


def test_windows_do_not_overlap_and_max_tokens_cuts(lms):
    tok = runner.load_tokenizer(str(lms["a"]))
    ids = tok(TEXT)["input_ids"]
    data = make_windows(tok, [TEXT], "t", max_length=50)
    assert [t for w in data.windows for t in w] == ids
    assert data.scored == len(ids) - len(data.windows)
    cut = make_windows(tok, [TEXT], "t", max_length=50, max_tokens=120)
    assert cut.tokens == 120 and [len(w) for w in cut.windows] == [50, 50, 20]


# ------------------------------------------------------------------ vocabularies


def test_larger_parent_vocabulary_compares_the_shared_ids_with_a_warning(lms, tmp_path, text):
    big = tiny_lm(tmp_path / "big", 5, vocab=72)
    with pytest.warns(UserWarning, match="compare the 64 shared token ids"):
        r = evaluate(str(lms["a"]), text=str(text), parents=[str(big)], max_length=50,
                     cache=no_cache())
    assert 0 < r.parents[0].kl < 10


def test_parent_with_other_token_ids_is_an_error(lms, tmp_path, text):
    other = tiny_lm(tmp_path / "other", 5, permute=True)
    with pytest.raises(MergeError, match="different token ids"):
        evaluate(str(lms["a"]), text=str(text), parents=[str(other)], cache=no_cache())


# ------------------------------------------------------------------ cache


def test_second_evaluation_is_read_from_the_cache(lms, text, monkeypatch):
    first = evaluate(str(lms["a"]), text=str(text), parents=[str(lms["b"])], max_length=50)

    def no_loading(*args, **kwargs):
        raise AssertionError("a cached evaluation loaded a model")

    monkeypatch.setattr(runner, "load_model", no_loading)
    again = evaluate(str(lms["a"]), text=str(text), parents=[str(lms["b"])], max_length=50)
    assert again.to_dict() == first.to_dict()
    os.utime(lms["b"] / "model.safetensors", ns=(1, 1))  # the parent changed: recomputed
    with pytest.raises(AssertionError, match="loaded a model"):
        evaluate(str(lms["a"]), text=str(text), parents=[str(lms["b"])], max_length=50)


def test_fingerprint_uses_recorded_checksums(lms, tmp_path):
    folder = lms["c"]
    before = model_fingerprint(folder)
    os.utime(folder / "model.safetensors", ns=(5, 5))
    assert model_fingerprint(folder) != before  # no checksums: size and mtime
    size = (folder / "model.safetensors").stat().st_size
    (folder / "mergesmith_checksums.json").write_text(json.dumps(
        {"files": {"model.safetensors": {"size": size, "sha256": "ab" * 32}}}))
    recorded = model_fingerprint(folder)
    os.utime(folder / "model.safetensors", ns=(7, 7))
    assert model_fingerprint(folder) == recorded  # the content is what counts
    (folder / "config.json").write_text((folder / "config.json").read_text() + " ")
    assert model_fingerprint(folder) != recorded


# ------------------------------------------------------------------ lm-eval


TASK_YAML = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "question: {{{{q}}}}\\nanswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""
TASK_ROWS = [("one plus one", ["two", "three"], 0), ("color of the sky", ["green", "blue"], 1),
             ("capital of france", ["paris", "rome"], 0), ("opposite of hot", ["cold", "big"], 0),
             ("after two", ["one", "three"], 1)]


def local_task(tmp_path: Path) -> Path:
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    data = tasks / "tiny_mc.jsonl"
    data.write_text("".join(json.dumps({"q": q, "choices": c, "label": y}) + "\n"
                            for q, c, y in TASK_ROWS))
    (tasks / "tiny_mc.yaml").write_text(TASK_YAML.format(data=data))
    return tasks


def test_local_lm_eval_task_runs_offline_and_is_cached(lms, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    from mergesmith.evaluate import lm_eval_tasks

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    tasks = local_task(tmp_path)
    r = evaluate(str(lms["a"]), tasks=["tiny_mc"], include_path=str(tasks), limit=4)
    acc = r.model.tasks["tiny_mc"]["acc"]
    assert acc in (0.0, 0.25, 0.5, 0.75, 1.0)

    def not_again(*args, **kwargs):
        raise AssertionError("lm-eval ran again")

    monkeypatch.setattr(lm_eval_tasks, "evaluate_with_lm_eval", not_again)
    again = evaluate(str(lms["a"]), tasks=["tiny_mc"], include_path=str(tasks), limit=4)
    assert again.model.tasks == r.model.tasks
    with pytest.raises(AssertionError, match="ran again"):  # another limit: another key
        evaluate(str(lms["a"]), tasks=["tiny_mc"], include_path=str(tasks), limit=3)
    # a name not in include_path makes lm-eval index its built-in tasks (~20 s): not here
    monkeypatch.setattr(lm_eval_tasks, "task_manager",
                        lambda names, path: SimpleNamespace(all_tasks=["tiny_mc", "arc_easy"]))
    with pytest.raises(MergeError, match="unknown task 'tiny_mx'.*Did you mean 'tiny_mc'"):
        evaluate(str(lms["a"]), tasks=["tiny_mx"], include_path=str(tasks))


def test_tasks_without_lm_eval_say_how_to_install(lms, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval → ImportError
    result = CliRunner().invoke(cli, ["eval", str(lms["a"]), "--tasks", "hellaswag"])
    assert_one_line_error(result, "pip install 'mergesmith[eval]'")


# ------------------------------------------------------------------ recipes


def merge_inputs(tmp_path: Path) -> dict[str, Path]:
    base = random_tensors(LLAMA, 0)
    out = {"base": write_model(tmp_path / "base", base),
           "ft": write_model(tmp_path / "ft", random_tensors(LLAMA, 1, base, scale=0.05))}
    for folder in out.values():
        char_tokenizer().save_pretrained(folder)
    return out


def eval_recipe(tmp_path: Path, models: dict[str, Path], evaluate_block: str) -> Path:
    return recipe_file(tmp_path, f"""merge_method: task_arithmetic
base_model: {models['base']}
models:
  - model: {models['ft']}
    parameters: {{weight: 0.5}}
evaluate:
{evaluate_block}""")


def test_recipe_evaluate_unknown_key_names_the_field(tmp_path):
    with pytest.raises(MergeError, match=r"unknown key 'txt' in evaluate\. Did you mean 'text'"):
        mergesmith.recipe.load_recipe(
            "merge_method: linear\nmodels:\n  - model: a\nevaluate:\n  txt: e.txt\n")
    with pytest.raises(MergeError, match="evaluate.limit.*applies to 'tasks'"):
        mergesmith.recipe.load_recipe(
            "merge_method: linear\nmodels:\n  - model: a\nevaluate: {text: e.txt, limit: 3}\n")


def test_merge_with_evaluate_writes_the_table_and_reuses_the_cache(tmp_path, text, monkeypatch):
    models = merge_inputs(tmp_path)
    recipe = eval_recipe(tmp_path, models, f"  text: {text}\n  max_length: 48\n")
    report = mergesmith.check(recipe)
    assert any("after the merge: perplexity on" in n for n in report.plan.notes)
    plan = mergesmith.run(recipe, tmp_path / "out")
    ev = plan.evaluation
    assert [p.name for p in ev.parents] == [str(models["base"]), str(models["ft"])]
    card = (tmp_path / "out" / "README.md").read_text()
    assert "## Evaluation" in card and card.index("## Evaluation") < card.index("## Recipe")
    table = [line for line in card.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| model | perplexity | KL(parent‖model) | top-1 agree")
    assert table[1].startswith(f"| **this model** | {runner._num(ev.model.perplexity)} | — |")
    for row, p in zip(table[2:], ev.parents):
        assert row.startswith(f"| `{p.name}` | {runner._num(p.perplexity)} | "
                              f"{runner._num(p.kl)} | {runner._pct(p.top1)} |")
        assert p.kl > 0
    # the merge lies between its inputs: closer to each than they are to each other
    direct_kl = evaluate(str(models["ft"]), text=str(text), parents=[str(models["base"])],
                         max_length=48, cache=no_cache()).parents[0].kl
    assert max(p.kl for p in ev.parents) < direct_kl

    def no_loading(*args, **kwargs):
        raise AssertionError("the second run evaluated again")

    monkeypatch.setattr(runner, "load_model", no_loading)  # same merge → all cached
    again = mergesmith.run(recipe, tmp_path / "out2")
    assert again.evaluation.to_dict()["parents"] == ev.to_dict()["parents"]
    assert (tmp_path / "out2" / "README.md").read_text().replace("out2", "out") == card


def test_run_no_evaluate_and_check_errors(tmp_path, text):
    models = merge_inputs(tmp_path)
    recipe = eval_recipe(tmp_path, models, f"  text: {text}\n")
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["run", str(recipe), str(out), "--no-evaluate", "-q"])
    assert result.exit_code == 0, result.output
    assert "## Evaluation" not in (out / "README.md").read_text()
    missing = eval_recipe(tmp_path, models, "  text: nowhere.txt\n")
    assert_one_line_error(CliRunner().invoke(cli, ["check", str(missing)]),
                          "nowhere.txt", "not found")
    result = CliRunner().invoke(cli, ["run", str(missing), str(tmp_path / "o2")])
    assert_one_line_error(result, "nowhere.txt")
    assert not (tmp_path / "o2").exists()  # checked before merging


def test_check_wants_lm_eval_for_tasks(tmp_path, text, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval → ImportError
    models = merge_inputs(tmp_path)
    recipe = eval_recipe(tmp_path, models, f"  text: {text}\n  tasks: [arc_easy]\n")
    assert_one_line_error(CliRunner().invoke(cli, ["check", str(recipe)]),
                          "pip install 'mergesmith[eval]'")


def test_only_local_full_models_are_compared(lms):
    plan = SimpleNamespace(models=[
        SimpleNamespace(ref="a", lora=None, repo_id=None, folder=str(lms["a"])),
        SimpleNamespace(ref="a+lora", lora=object(), repo_id=None, folder=str(lms["a"])),
        SimpleNamespace(ref="org/model", lora=None, repo_id="org/model", folder="/hub/x"),
    ])
    parents, skipped = recipe_parents(plan)
    assert [p.name for p in parents] == ["a"]
    assert [(s.name, "LoRA" in s.skipped or "Hub" in s.skipped) for s in skipped] == [
        ("a+lora", True), ("org/model", True)]


# ------------------------------------------------------------------ CLI


def assert_one_line_error(result, *fragments: str) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    text = result.stderr.strip()
    assert text.startswith("error: ") and len(text.splitlines()) == 1, text
    assert "Traceback" not in result.output
    for f in fragments:
        assert f in text, text
    return text


def test_cli_json_and_table(lms, text):
    args = ["eval", str(lms["a"]), "--text", str(text), "--parents", str(lms["b"]),
            str(lms["a"]), "--max-length", "40", "-q"]
    result = CliRunner().invoke(cli, [*args, "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [p["folder"] for p in data["parents"]] == [str(lms["b"]), str(lms["a"])]
    assert data["parents"][1]["top1"] == 1.0 and data["text"]["max_length"] == 40
    table = CliRunner().invoke(cli, args)
    assert table.exit_code == 0
    assert table.stdout.splitlines()[0].split() == ["model", "perplexity",
                                                    "KL(parent‖model)", "top-1", "agree"]


def test_cli_errors_are_one_line(lms, tmp_path, text):
    def run(*args):
        return CliRunner().invoke(cli, ["eval", *args])

    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    bare = write_model(tmp_path / "bare", random_tensors(LLAMA, 0))  # no tokenizer
    broken = tiny_lm(tmp_path / "broken", 0)
    (broken / "config.json").write_text(json.dumps({"model_type": "no_such_arch"}))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    a = str(lms["a"])
    assert_one_line_error(run(str(tmp_path / "nope"), "--text", str(text)), "not found")
    assert_one_line_error(run(a, "--text", str(empty)), "is empty")
    assert_one_line_error(run(a, "--text", str(tmp_path / "none.txt")), "not found")
    assert_one_line_error(run(a), "nothing to evaluate")
    assert_one_line_error(run(str(bare), "--text", str(text)), "has no tokenizer",
                          "--tokenizer")
    assert_one_line_error(run(str(broken), "--text", str(text)), "cannot load model")
    assert_one_line_error(run(a, "--text", str(text), "--parents", str(adapter)),
                          "LoRA adapter")
    # --tokenizer makes the bare folder usable
    ok = run(str(bare), "--text", str(text), "--tokenizer", a, "--max-tokens", "60", "-q")
    assert ok.exit_code == 0, ok.output
