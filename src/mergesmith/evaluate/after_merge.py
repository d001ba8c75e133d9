"""A recipe's ``evaluate:`` block: checked with the recipe, run once the merge is written,
and reported in the model card."""

from __future__ import annotations

import os
from typing import Any

from ..errors import MergeError
from .runner import (DEFAULT_BATCH_SIZE, EvalReport, Parent, Scores, evaluate, has_tokenizer,
                     model_folder_problem, read_texts, require_transformers)


def recipe_parents(plan: Any) -> tuple[list[Parent], list[Scores]]:
    """The recipe's input models that are local full model folders, and the others
    (LoRA references, Hub models, folders transformers cannot load) with the reason."""
    parents, skipped = [], []
    for m in plan.models:
        name = str(m.ref)
        if m.lora is not None:
            reason = "a LoRA reference (base+adapter): only full model folders are evaluated"
        elif getattr(m, "stage", None) is not None:
            reason = ("an intermediate stage, computed as it was read and not written "
                      "(--keep-intermediates writes it; evaluate it with 'mergesmith eval')")
        elif m.repo_id:
            reason = "a Hugging Face Hub id: only local model folders are evaluated"
        else:
            reason = model_folder_problem(m.folder)
        if reason:
            skipped.append(Scores(name, None, "parent", skipped=reason))
        else:
            parents.append(Parent(name, m.folder))
    return parents, skipped


def check_evaluation(plan: Any) -> list[str]:
    """Validate the ``evaluate:`` block without running it; return notes for ``check``."""
    e = plan.recipe.evaluate
    if e is None:
        return []
    if plan.recipe.output == "adapter":
        return [f"{e.where}: not run, the output is a LoRA adapter (evaluate it merged into "
                "its base with 'mergesmith eval')"]
    require_transformers()
    what = []
    if e.text is not None or e.jsonl is not None:
        try:
            read_texts(e.text, e.jsonl, e.field_name)
        except MergeError as err:
            raise MergeError(f"{e.where}: {err}") from None
        what.append(f"perplexity on {e.text or e.jsonl}")
    if e.tasks:
        from .lm_eval_tasks import check_tasks

        check_tasks(e.tasks, e.include_path, where=f"{e.where}: tasks")
        what.append(f"lm-eval tasks {', '.join(e.tasks)}"
                    + (f" (limit {e.limit})" if e.limit else ""))
    donor = plan.models[plan.donor].folder
    new_vocab = plan.vocab is not None and plan.vocab.tokenizer is not None
    if not new_vocab and not has_tokenizer(donor):
        raise MergeError(f"{e.where}: the merged model will have no tokenizer (it comes from "
                         f"{donor}, which has none); add tokenizer files there or remove "
                         "'evaluate'")
    notes = [f"after the merge: {' and '.join(what)}"]
    if e.parents:
        parents, skipped = recipe_parents(plan)
        if parents:
            notes.append("compared with the inputs " + ", ".join(p.name for p in parents))
        notes += [f"not evaluated: {s.name} — {s.skipped}" for s in skipped]
    return notes


def evaluate_merge(plan: Any, out: str, *, device: str = "cpu",
                   progress: bool = False) -> EvalReport:
    """Run the recipe's ``evaluate:`` block on the merged folder ``out`` and put the results
    in its model card."""
    from ..output import model_card, write_text

    e = plan.recipe.evaluate
    assert e is not None
    parents, skipped = recipe_parents(plan) if e.parents else ([], [])
    try:
        report = evaluate(out, text=e.text, jsonl=e.jsonl, field_name=e.field_name,
                          parents=parents, device=device,
                          batch_size=e.batch_size or DEFAULT_BATCH_SIZE,
                          max_length=e.max_length, max_tokens=e.max_tokens, tasks=e.tasks,
                          limit=e.limit, include_path=e.include_path, progress=progress,
                          skip_bad_parents=True, model_name=os.path.basename(
                              os.path.normpath(out)))
    except MergeError as err:
        raise MergeError(f"the merge is complete in {out}, but its evaluation failed: {err} "
                         "(fix it and run 'mergesmith eval', or pass --no-evaluate)") from None
    report.parents += skipped
    if plan.options.write_model_card:
        card = model_card(plan, os.path.basename(os.path.normpath(out)),
                          evaluation=card_markdown(report))
        write_text(os.path.join(out, "README.md"), card)
    return report


def card_markdown(report: EvalReport) -> str:
    """The model card's evaluation section (without its heading)."""
    header, body = report.table_rows(model_label="**this model**")
    for row in body[1:]:
        row[0] = f"`{row[0]}`"
    lines = []
    d = report.data
    if d is not None:
        lines.append(
            f"Perplexity on `{d.source}` ({d.scored:,} predicted tokens in {len(d.windows)} "
            f"window(s) of at most {d.max_length} tokens, no overlap)"
            + ("; for each input model, on the same tokens: its perplexity, KL(input ‖ this "
               "model) in nats per token, and how often its most likely next token is this "
               "model's." if report.parents else "."))
    if report.tasks:
        limit = f", at most {report.limit} examples per task" if report.limit else ""
        lines.append(f"Task scores from lm-evaluation-harness{limit}.")
    lines.append("")
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    skipped = [p for p in report.parents if p.skipped]
    if skipped:
        lines.append("")
        lines += [f"Not evaluated: `{p.name}` — {p.skipped}." for p in skipped]
    return "\n".join(lines) + "\n"
