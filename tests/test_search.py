"""`mergesmith search`: spaces, validation, the trial loop, determinism, resume, Ray."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import LLAMA, random_tensors, recipe_file, run_cli, write_model
from safetensors.torch import save_file

pytest.importorskip("optuna")
pytest.importorskip("cmaes")

from mergesmith.errors import MergeError  # noqa: E402
from mergesmith.search import parse_space, search  # noqa: E402

HIDDEN = (0.3, 0.7)

OBJECTIVE = '''
import os, time
from pathlib import Path
import torch
from safetensors.torch import load_file

TARGET = load_file(str(Path(__file__).with_name("target.safetensors")))

def closeness(folder):
    hold = os.environ.get("SEARCH_TEST_HOLD")  # the resume test: block after N calls
    if hold:
        counter = Path(hold)
        n = int(counter.read_text()) if counter.exists() else 0
        counter.write_text(str(n + 1))
        if n >= int(os.environ["SEARCH_TEST_HOLD_AFTER"]):
            while True:
                time.sleep(1)
    merged = load_file(os.path.join(folder, "model.safetensors"))
    return -sum(float((merged[k] - TARGET[k]).pow(2).sum()) for k in TARGET) ** 0.5

def broken(folder):
    raise ValueError("this objective always fails")

def flaky(folder):
    import yaml
    recipe = yaml.safe_load(open(os.path.join(folder, "mergesmith_config.yml")))
    if recipe["models"][0]["parameters"]["weight"] > 0.5:
        raise RuntimeError("too big")
    return closeness(folder)
'''


@pytest.fixture
def setup(tmp_path: Path) -> dict[str, Path]:
    """A base, two fine-tunes, the task-arithmetic merge with the hidden weights as the
    target, and an objective file that scores closeness to it."""
    base = random_tensors(LLAMA, 0)
    a, b = random_tensors(LLAMA, 1, base), random_tensors(LLAMA, 2, base)
    paths = {"base": write_model(tmp_path / "base", base),
             "ft_a": write_model(tmp_path / "ft_a", a),
             "ft_b": write_model(tmp_path / "ft_b", b)}
    target = {k: base[k] + HIDDEN[0] * (a[k] - base[k]) + HIDDEN[1] * (b[k] - base[k])
              for k in base}
    save_file(target, str(tmp_path / "target.safetensors"))
    (tmp_path / "objective.py").write_text(OBJECTIVE)
    paths["objective"] = tmp_path / "objective.py"
    return paths


def space_text(p: dict[str, Path], *, function: str = "closeness", budget: int = 12,
               extra: str = "", weight_a: str = "{range: [0, 1]}",
               weight_b: str = "{range: [0, 1]}") -> str:
    return f"""
merge_method: task_arithmetic
base_model: {p['base']}
models:
  - model: {p['ft_a']}
    parameters: {{weight: {weight_a}}}
  - model: {p['ft_b']}
    parameters: {{weight: {weight_b}}}
dtype: float32
search:
  objective: {{python: {p['objective']}:{function}}}
  direction: maximize
  budget: {budget}
{extra}"""


def trials(out: Path) -> list[dict]:
    lines = (out / "search" / "trials.jsonl").read_text().splitlines()
    return sorted((json.loads(line) for line in lines), key=lambda r: r["trial"])


def same(records: list[dict]) -> list[tuple]:
    """What must not depend on workers, resume or timing."""
    return [(r["trial"], r["params"], r["state"], r["score"]) for r in records]


# ------------------------------------------------------------------ the space


def test_space_ranges_everywhere_a_number_stands():
    space = parse_space("""
merge_method: slerp
base_model: a
models: [{model: a}, {model: b}]
parameters:
  t: [0, {range: [0, 1]}, 1]
  lambda: {range: [0.01, 1], log: true}
  normalize: {choices: [true, false]}
  density:
    - {filter: self_attn, value: {range: [0.1, 0.9], name: d}}
    - {value: {range: [0.1, 0.9], name: d}}
search: {objective: {python: tests/conftest.py:x}, budget: 3}
""")
    names = {d.name: d for d in space.dimensions}
    assert set(names) == {"parameters.t[1]", "parameters.lambda", "parameters.normalize", "d"}
    assert len(names["d"].places) == 2 and names["parameters.lambda"].log
    filled = space.fill({"parameters.t[1]": 0.25, "parameters.lambda": 0.1,
                         "parameters.normalize": False, "d": 0.5})[0]
    assert filled["parameters"]["t"] == [0, 0.25, 1]
    assert filled["parameters"]["density"] == [{"filter": "self_attn", "value": 0.5},
                                               {"value": 0.5}]
    assert "search" not in filled
    assert space.algorithm == "cmaes" and space.batch == 4 + 4  # 4 + ⌊3 ln 4⌋
    assert space.midpoint()["parameters.lambda"] == pytest.approx(0.1)
    places = space.places({"parameters.t[1]": 0.25, "parameters.lambda": 0.1,
                           "parameters.normalize": False, "d": 0.5})
    assert places["parameters.density[0].value"] == places["parameters.density[1].value"] == 0.5
    assert space.corner(True)["parameters.normalize"] is False


def test_space_documents_are_filled_one_by_one():
    space = parse_space("""
name: first
merge_method: linear
models: [{model: a, parameters: {weight: {range: [0, 1]}}}, {model: b}]
---
merge_method: slerp
base_model: first
models: [{model: first}, {model: c}]
parameters: {t: {range: [0, 1]}}
search: {objective: {python: tests/conftest.py:x}, budget: 2, algorithm: random}
""")
    assert [d.name for d in space.dimensions] == ["first:models[0].parameters.weight",
                                                  "document2:parameters.t"]
    text = space.recipe_text({"first:models[0].parameters.weight": 0.5,
                              "document2:parameters.t": 0.25})
    assert text.count("---") == 1 and "weight: 0.5" in text and "t: 0.25" in text


def test_every_choice_end_is_checked(setup, tmp_path):
    """The recipe is checked at the middle and at both ends of every range, so a bad last
    choice fails before the first merge too."""
    text = space_text(setup).replace("dtype: float32", "dtype: float32\n"
                                     "parameters: {normalize: {choices: [true, maybe]}}")
    r = run_cli("search", str(recipe_file(tmp_path, text, "space.yml")), str(tmp_path / "out"))
    assert r.returncode == 2 and "high end" in r.stderr and "normalize" in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("change, message", [
    ("weight_a={range: [0.9, 0.1]}", "lo 0.9 is greater than hi 0.1"),
    ("weight_a={range: [0, 1], log: true}", "'log: true' needs lo > 0"),
    ("weight_a={range: [0, 1], lg: true}", "unknown key 'lg'"),
    ("extra=  budgett: 3", "search.budgett: unknown key"),
    ("extra=  algorithm: cma", "search.algorithm"),
    ("budget=0", "search.budget: must be a whole number of at least 1"),
    ("extra=  batch: 3", "search.batch: must be a whole number of at least 4"),
    ("function=missing", "has no function 'missing'"),
])
def test_bad_spaces_exit_2_before_any_merge(setup, tmp_path, change, message):
    key, _, value = change.partition("=")
    kwargs = {key: int(value) if key == "budget" else value}
    space = recipe_file(tmp_path, space_text(setup, **kwargs), "space.yml")
    r = run_cli("search", str(space), str(tmp_path / "out"))
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "out").exists()


def test_bad_spaces_non_numeric_and_missing_file(setup, tmp_path):
    cases = {
        "merge_method: {choices: [linear, ties]}": "'merge_method' is not a numeric parameter",
        "dtype: {choices: [float32, bfloat16]}": "'dtype' is not a numeric parameter",
        f"base_model: {{choices: [{setup['base']}, {setup['ft_a']}]}}":
            "'base_model' is not a numeric parameter",
    }
    base_text = space_text(setup)
    for line, message in cases.items():
        key = line.split(":")[0]
        text = "\n".join(line if x.startswith(key + ":") else x for x in base_text.splitlines())
        space = recipe_file(tmp_path, text, "space.yml")
        r = run_cli("search", str(space), str(tmp_path / "out"))
        assert r.returncode == 2 and message in r.stderr, (line, r.stderr)
    text = base_text.replace(str(setup["objective"]), str(tmp_path / "nope.py"))
    r = run_cli("search", str(recipe_file(tmp_path, text, "space.yml")), str(tmp_path / "out"))
    assert r.returncode == 2 and "search.objective.python: no file" in r.stderr, r.stderr
    # the filled recipe is checked too: a typo in a parameter name fails before a merge
    text = base_text.replace("parameters: {weight:", "parameters: {wieght:", 1)
    r = run_cli("search", str(recipe_file(tmp_path, text, "space.yml")), str(tmp_path / "out"))
    assert r.returncode == 2 and "wieght" in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ the search


def test_search_recovers_hidden_weights(setup, tmp_path):
    space = recipe_file(tmp_path, space_text(setup, budget=60, extra="  seed: 1"), "space.yml")
    result = search(space, tmp_path / "out", threads=1)
    best = result.best["params"]
    w = (best["models[0].parameters.weight"], best["models[1].parameters.weight"])
    assert abs(w[0] - HIDDEN[0]) <= 0.05 and abs(w[1] - HIDDEN[1]) <= 0.05, w
    records = trials(tmp_path / "out")
    assert len(records) == 60 and all(r["state"] == "complete" for r in records)
    assert records[0]["values"] == {"models[0].parameters.weight": records[0]["params"][
        "models[0].parameters.weight"], "models[1].parameters.weight": records[0]["params"][
        "models[1].parameters.weight"]}
    out = tmp_path / "out"
    config = (out / "mergesmith_config.yml").read_text()
    assert "search:" not in config and f"weight: {w[0]}" in config
    card = (out / "README.md").read_text()
    assert "## How this recipe was found" in card and "(budget 60; cmaes, seed 1" in card
    for png in ("progress.png", "parameters.png"):
        assert (out / "search" / png).read_bytes()[:4] == b"\x89PNG"
    assert not (out / "search" / "tmp").exists() and not (out / "search" / "best").exists()
    print(f"best {w} score {result.best['score']:.4g} in {len(records)} evaluations")


def test_same_seed_same_trials_and_workers_do_not_matter(setup, tmp_path):
    space = recipe_file(tmp_path, space_text(setup, budget=10), "space.yml")
    one = search(space, tmp_path / "one", threads=1)
    two = search(space, tmp_path / "two", workers=3, threads=1)
    assert same(two.records) == same(one.records)
    assert same(trials(tmp_path / "one")) == same(trials(tmp_path / "two"))
    assert same(one.records) == same(trials(tmp_path / "one"))
    other = search(space, tmp_path / "other", seed=5, threads=1)
    assert [r["params"] for r in other.records] != [r["params"] for r in one.records]


@pytest.mark.parametrize("algorithm", ["random", "tpe"])
def test_other_algorithms(setup, tmp_path, algorithm):
    space = recipe_file(tmp_path, space_text(setup, budget=6, extra=f"  algorithm: {algorithm}"
                                             "\n  batch: 3"), "space.yml")
    a = search(space, tmp_path / "a", threads=1)
    b = search(space, tmp_path / "b", threads=1, workers=2)
    assert len(a.records) == 6 and same(a.records) == same(b.records)


def test_raising_objective_is_a_recorded_failure(setup, tmp_path):
    space = recipe_file(tmp_path, space_text(setup, function="flaky", budget=8,
                                             weight_a="{range: [0, 1]}",
                                             weight_b="{range: [0, 1]}"), "space.yml")
    result = search(space, tmp_path / "out", threads=1)
    records = trials(tmp_path / "out")
    assert len(records) == 8
    failed = [r for r in records if r["state"] == "failed"]
    assert records == sorted(records, key=lambda r: r["trial"])
    assert all(r["score"] is None and "too big" in r["error"] for r in failed)
    assert result.best["state"] == "complete"
    # always failing: every trial recorded, then a one-line error (exit 2)
    space = recipe_file(tmp_path, space_text(setup, function="broken", budget=3), "space.yml")
    r = run_cli("search", str(space), str(tmp_path / "broken"), "--quiet")
    assert r.returncode == 2 and "every trial failed (3)" in r.stderr, r.stderr
    assert "always fails" in r.stderr
    records = trials(tmp_path / "broken")
    assert [r["state"] for r in records] == ["failed"] * 3
    assert "ValueError: this objective always fails" in records[0]["error"]


def test_cli_output_and_existing_out(setup, tmp_path):
    space = recipe_file(tmp_path, space_text(setup, budget=4), "space.yml")
    r = run_cli("search", str(space), str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    assert "best: trial" in r.stdout and "trial 4/4" in r.stderr
    r = run_cli("search", str(space), str(tmp_path / "out"))
    assert r.returncode == 2 and "holds a search; add --resume" in r.stderr
    r = run_cli("search", str(space), str(tmp_path / "out"), "--resume", "--budget", "6",
                "--quiet")
    assert r.returncode == 0, r.stderr
    assert [x["trial"] for x in trials(tmp_path / "out")] == list(range(6))
    r = run_cli("search", str(space), str(tmp_path / "out"), "--resume", "--seed", "3")
    assert r.returncode == 2 and "another seed" in r.stderr


def _wait_for_lines(path: Path, n: int, proc: subprocess.Popen, deadline: float = 240) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    raise AssertionError(f"{path} never had {n} lines")


def test_resume_after_sigkill(setup, tmp_path):
    space = recipe_file(tmp_path, space_text(setup, budget=14), "space.yml")
    reference = search(space, tmp_path / "reference", threads=1)
    out = tmp_path / "out"
    env = {**os.environ, "SEARCH_TEST_HOLD": str(tmp_path / "calls"),
           "SEARCH_TEST_HOLD_AFTER": "9"}  # trials 0–8 finish, the 10th objective call hangs
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1] / "src"),
                                         env.get("PYTHONPATH", "")])
    proc = subprocess.Popen([sys.executable, "-m", "mergesmith", "search", str(space), str(out),
                             "--quiet", "--threads", "1"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait_for_lines(out / "search" / "trials.jsonl", 9, proc)
        while int((tmp_path / "calls").read_text() or 0) < 10:  # the 10th call is hanging
            assert proc.poll() is None
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    before = trials(out)
    assert len(before) == 9 and not (out / "model.safetensors").exists()
    result = search(space, out, resume=True, threads=1)
    assert result.new_trials == 5  # 9..13: the finished ones were not run again
    after = trials(out)
    assert [r["trial"] for r in after] == list(range(14))  # each once
    assert same(after) == same(reference.records)
    assert result.best["params"] == reference.best["params"]
    assert (out / "model.safetensors").exists()


def test_two_ray_workers_same_trials_as_one(setup, tmp_path):
    ray = pytest.importorskip("ray")
    space = recipe_file(tmp_path, space_text(setup, budget=8), "space.yml")
    local = search(space, tmp_path / "local", threads=1)
    from ray import cluster_utils

    cluster = cluster_utils.Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "object_store_memory": 80 << 20})
    cluster.add_node(num_cpus=1, object_store_memory=80 << 20)
    try:
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        remote = search(space, tmp_path / "ray", ray="auto", workers=2, threads=1)
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert same(remote.records) == same(local.records)
    assert same(trials(tmp_path / "ray")) == same(local.records)


def test_objective_returning_nan_is_a_failure(setup, tmp_path):
    (tmp_path / "nan.py").write_text("def f(folder):\n    return float('nan')\n")
    text = space_text(setup, budget=2).replace(f"{setup['objective']}:closeness",
                                               f"{tmp_path / 'nan.py'}:f")
    with pytest.raises(MergeError, match="every trial failed"):
        search(recipe_file(tmp_path, text, "space.yml"), tmp_path / "out", threads=1)
    assert all("returned nan" in r["error"] for r in trials(tmp_path / "out"))


def test_kl_objective(setup, tmp_path):
    pytest.importorskip("transformers")
    from test_evaluate import char_tokenizer

    for name in ("base", "ft_a", "ft_b"):
        char_tokenizer().save_pretrained(setup[name])
    (tmp_path / "eval.txt").write_text("hello world, a few words to score. " * 10)
    text = space_text(setup, budget=3).replace(
        f"objective: {{python: {setup['objective']}:closeness}}\n  direction: maximize",
        f"objective: {{text: {tmp_path / 'eval.txt'}, metric: kl, max_length: 16}}\n"
        "  algorithm: random")
    result = search(recipe_file(tmp_path, text, "space.yml"), tmp_path / "out", threads=1)
    assert result.space.objective.direction == "minimize"
    assert all(r["state"] == "complete" for r in result.records), result.records
    assert torch.isfinite(torch.tensor(result.best["score"])) and result.best["score"] >= 0


def test_tasks_objective_mean_of_the_metric_and_lm_eval_args(monkeypatch):
    from mergesmith.evaluate import lm_eval_tasks
    from mergesmith.search.trial import score_model

    seen = {}

    def fake(folder, tasks, **kwargs):
        seen.update(kwargs)
        return {"a": {"acc": 0.5, "acc_norm": 0.25}, "b": {"acc": 0.75}}

    monkeypatch.setattr(lm_eval_tasks, "evaluate_with_lm_eval", fake)
    spec = {"tasks": ["a", "b"], "metric": "acc", "limit": 10,
            "lm_eval_args": {"num_fewshot": 5}}
    assert score_model("folder", "tasks", spec, []) == pytest.approx(0.625)
    assert seen["extra"] == {"num_fewshot": 5} and seen["limit"] == 10
    with pytest.raises(MergeError, match="task b has no metric 'acc_norm'"):
        score_model("folder", "tasks", {**spec, "metric": "acc_norm"}, [])


def test_tasks_objective_without_lm_eval_exits_2(setup, tmp_path):
    pytest.importorskip("transformers")
    try:
        import lm_eval  # noqa: F401
        pytest.skip("lm-eval is installed")
    except ImportError:
        pass
    text = space_text(setup).replace(
        f"objective: {{python: {setup['objective']}:closeness}}",
        "objective: {tasks: [arc_easy], metric: acc_norm, lm_eval_args: {num_fewshot: 5}}")
    r = run_cli("search", str(recipe_file(tmp_path, text, "space.yml")), str(tmp_path / "out"))
    assert r.returncode == 2 and "lm-eval" in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


def test_multi_stage_space(setup, tmp_path):
    """Each YAML document is filled on its own; the stages run as one recipe (skipped
    where multi-stage recipes are not supported yet)."""
    pytest.importorskip("mergesmith.stages")
    text = f"""
name: mix
merge_method: linear
models:
  - model: {setup['ft_a']}
    parameters: {{weight: {{range: [0.1, 1]}}}}
  - model: {setup['ft_b']}
    parameters: {{weight: 1.0}}
dtype: float32
---
merge_method: task_arithmetic
base_model: {setup['base']}
models:
  - model: mix
    parameters: {{weight: {{range: [0, 1]}}}}
dtype: float32
search:
  objective: {{python: {setup['objective']}:closeness}}
  budget: 6
  algorithm: random
"""
    result = search(recipe_file(tmp_path, text, "space.yml"), tmp_path / "out", threads=1)
    assert [d.name for d in result.space.dimensions] == [
        "mix:models[0].parameters.weight", "document2:models[0].parameters.weight"]
    assert all(r["state"] == "complete" for r in result.records), result.records
    assert len({r["score"] for r in result.records}) == 6
    config = (tmp_path / "out" / "mergesmith_config.yml").read_text()
    assert "name: mix" in config and "---" in config
