"""``mergesmith eval``: load models with transformers, batch the text, add up the scores.

Text → tokens (the model's tokenizer) → windows of at most ``max_length`` tokens, no
overlap: each document (a text file is one document, a JSONL line is one) is cut into
consecutive windows, and each window is one forward pass. Within a window every token
but the first is predicted from the ones before it; the first token of each window is
not scored (no context). Perplexity is ``exp`` of the mean NLL over all scored tokens.

Parents are compared on the same windows, one parent at a time, **side by side** with the
model: for each batch both models run and only that batch's logits are kept. Memory is
the two models plus one batch of logits. The alternative, caching the model's log-probs
for all tokens and loading parents afterwards, needs ``tokens × vocab × 4`` bytes (10⁵
tokens of a 150k vocabulary: 60 GB) — far more than two small models. The price is one
extra forward pass of the model per parent.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import MergeError
from .cache import EvalCache, model_fingerprint
from .perplexity import Totals, perplexity

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "sentencepiece.bpe.model", "tokenizer.tiktoken")
DEFAULT_MAX_LENGTH = 1024
DEFAULT_BATCH_SIZE = 4


# ------------------------------------------------------------------ results


@dataclass
class Scores:
    """One model's results. ``kl``, ``kl_reverse`` and ``top1`` compare a parent with the
    evaluated model (None for the model itself)."""

    name: str
    folder: str | None
    role: str  # "model" or "parent"
    perplexity: float | None = None
    kl: float | None = None          # KL(parent ‖ model), nats per scored token
    kl_reverse: float | None = None  # KL(model ‖ parent)
    top1: float | None = None        # fraction of scored tokens whose argmax agree
    tasks: dict[str, dict[str, float]] = field(default_factory=dict)
    skipped: str | None = None       # why this parent was not evaluated

    def to_dict(self) -> dict[str, Any]:
        d = {"name": self.name, "folder": self.folder, "role": self.role,
             "perplexity": self.perplexity, "kl": self.kl, "kl_reverse": self.kl_reverse,
             "top1": self.top1, "tasks": self.tasks}
        if self.skipped:
            d["skipped"] = self.skipped
        return d


@dataclass
class TextData:
    """The tokenized evaluation text, cut into windows."""

    source: str
    windows: list[list[int]]
    documents: int
    max_length: int

    @property
    def tokens(self) -> int:
        return sum(len(w) for w in self.windows)

    @property
    def scored(self) -> int:
        return sum(len(w) - 1 for w in self.windows)

    @property
    def digest(self) -> str:
        h = hashlib.sha256()
        for w in self.windows:
            h.update(len(w).to_bytes(4, "little"))
            h.update(torch.tensor(w, dtype=torch.int64).numpy().tobytes())
        return h.hexdigest()

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "documents": self.documents, "windows": len(self.windows),
                "tokens": self.tokens, "scored_tokens": self.scored,
                "max_length": self.max_length}


@dataclass
class EvalReport:
    """Scores of a model and its parents, with what they were computed on."""

    model: Scores
    parents: list[Scores]
    data: TextData | None = None
    tasks: list[str] = field(default_factory=list)
    limit: int | None = None

    @property
    def rows(self) -> list[Scores]:
        return [self.model, *self.parents]

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model.to_dict(), "parents": [p.to_dict() for p in self.parents],
                "text": self.data.to_dict() if self.data else None,
                "tasks": self.tasks, "limit": self.limit}

    def task_columns(self) -> list[tuple[str, str]]:
        cols: dict[tuple[str, str], None] = {}
        for row in self.rows:
            for task, metrics in row.tasks.items():
                for metric in metrics:
                    cols[(task, metric)] = None
        return list(cols)

    def table_rows(self, model_label: str | None = None) -> tuple[list[str], list[list[str]]]:
        header = ["model"]
        if self.data is not None:
            header += ["perplexity"]
            if self.parents:
                header += ["KL(parent‖model)", "top-1 agree"]
        tcols = self.task_columns()
        header += [f"{t} {m}" for t, m in tcols]
        body = []
        for row in self.rows:
            if row.skipped:
                continue
            label = model_label if (row.role == "model" and model_label) else row.name
            cells = [label]
            if self.data is not None:
                cells.append(_num(row.perplexity))
                if self.parents:
                    cells += [_num(row.kl), _pct(row.top1)]
            cells += [_num(row.tasks.get(t, {}).get(m)) for t, m in tcols]
            body.append(cells)
        return header, body

    def table(self) -> str:
        """Plain-text table for the terminal."""
        header, body = self.table_rows()
        widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
                 for r in [header, *body]]
        if self.data is not None:
            d = self.data
            lines.append(f"(perplexity on {d.source}: {d.scored} scored tokens in "
                         f"{len(d.windows)} window(s) of at most {d.max_length}; KL in nats "
                         "per token)")
        for row in self.parents:
            if row.skipped:
                lines.append(f"skipped {row.name}: {row.skipped}")
        return "\n".join(lines)


def _num(x: float | None) -> str:
    if x is None:
        return "—"
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return f"{x:.4g}" if abs(x) < 1e5 else f"{x:.3e}"


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


# ------------------------------------------------------------------ text


def jsonl_field_values(content: str, label: str, field_name: str, option: str
                       ) -> Iterator[tuple[int, Any]]:
    """(line number, value of ``field_name``) for each non-blank JSON Lines row of
    ``content``; a row that is not JSON or lacks the field is a MergeError naming
    ``label:line`` and the ``option`` that chooses the field."""
    for n, line in enumerate(content.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise MergeError(f"{label}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict) or field_name not in obj:
            raise MergeError(f"{label}:{n}: no field '{field_name}' (choose the field with "
                             f"{option})")
        yield n, obj[field_name]


def read_texts(text: str | None = None, jsonl: str | None = None,
               field_name: str = "text") -> tuple[list[str], str]:
    """The documents to evaluate on, and a short description of where they come from."""
    if (text is None) == (jsonl is None):
        raise MergeError("give the evaluation text as exactly one of --text FILE or "
                         "--jsonl FILE")
    path = text if text is not None else jsonl
    assert path is not None
    if not os.path.isfile(path):
        what = "a folder" if os.path.isdir(path) else "not found"
        raise MergeError(f"evaluation text {path}: {what} (give a UTF-8 text file; relative "
                         f"paths are resolved from the current folder, {os.getcwd()})")
    try:
        with open(path, encoding="utf-8") as f:
            content = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise MergeError(f"cannot read evaluation text {path}: {e}") from None
    if text is not None:
        if not content.strip():
            raise MergeError(f"evaluation text {path} is empty")
        return [content], path
    docs = []
    for n, value in jsonl_field_values(content, path, field_name, "--field"):
        if not isinstance(value, str):
            raise MergeError(f"{path}:{n}: field '{field_name}' is "
                             f"{type(value).__name__}, expected a string")
        if value:
            docs.append(value)
    if not docs:
        raise MergeError(f"evaluation text {path} has no non-empty '{field_name}' values")
    return docs, f"{path} (field '{field_name}')"


def make_windows(tokenizer: Any, docs: Sequence[str], source: str, max_length: int,
                 max_tokens: int | None = None) -> TextData:
    """Tokenize each document (the tokenizer's special tokens included, as in training)
    and cut it into windows of at most ``max_length`` tokens; stop after ``max_tokens``."""
    if max_length < 2:
        raise MergeError("--max-length must be at least 2 (one token of context, one to "
                         "predict)")
    windows: list[list[int]] = []
    total = 0
    with _quiet_transformers():
        for doc in docs:
            ids = list(tokenizer(doc, add_special_tokens=True)["input_ids"])
            for i in range(0, len(ids), max_length):
                w = ids[i:i + max_length]
                if max_tokens is not None:
                    w = w[:max_tokens - total]
                if len(w) >= 2:
                    windows.append(w)
                    total += len(w)
                if max_tokens is not None and total >= max_tokens:
                    break
            if max_tokens is not None and total >= max_tokens:
                break
    if not windows:
        raise MergeError(f"evaluation text {source} gives no token to predict (it needs at "
                         "least 2 tokens)")
    return TextData(source, windows, len(docs), max_length)


# ------------------------------------------------------------------ models


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers' info, warnings (too-long sequence, loading reports) and loading bars
    off."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def require_transformers() -> None:
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise MergeError("mergesmith eval needs transformers: pip install "
                         "'mergesmith[hf]'") from None


def model_folder_problem(folder: str) -> str | None:
    """Why ``folder`` is not a local model transformers can load, or None."""
    if not os.path.exists(folder):
        return "not found"
    if not os.path.isdir(folder):
        return "is a file; a model is a folder with config.json and weights"
    names = set(os.listdir(folder))
    if "config.json" not in names:
        if "adapter_config.json" in names:
            return ("is a LoRA adapter, not a full model (merge it into its base first, "
                    "e.g. with a recipe)")
        return "has no config.json"
    if not any(n.endswith((".safetensors", ".bin")) for n in names):
        return "has no weight files (*.safetensors or *.bin)"
    return None


def has_tokenizer(folder: str) -> bool:
    return any(os.path.isfile(os.path.join(folder, n)) for n in TOKENIZER_FILES)


def check_model_folder(folder: str, what: str = "model") -> None:
    problem = model_folder_problem(folder)
    if problem:
        extra = (f" (relative paths are resolved from the current folder, {os.getcwd()})"
                 if problem == "not found" else "")
        raise MergeError(f"{what} {folder}: {problem}{extra}")


def load_tokenizer(model: str, tokenizer: str | None = None) -> Any:
    """The model folder's tokenizer, or the one in ``tokenizer``."""
    from transformers import AutoTokenizer

    path = tokenizer or model
    if tokenizer is not None and not os.path.exists(tokenizer):
        raise MergeError(f"--tokenizer {tokenizer}: not found")
    if not has_tokenizer(path):
        hint = ("" if tokenizer else "; pass --tokenizer PATH (a folder with the "
                "tokenizer the model was trained with)")
        raise MergeError(f"{path} has no tokenizer ({', '.join(TOKENIZER_FILES[:3])}, ...)"
                         f"{hint}")
    try:
        with _quiet_transformers():
            return AutoTokenizer.from_pretrained(path, local_files_only=True,
                                                 trust_remote_code=False)
    except Exception as e:  # transformers raises many types; all mean "cannot load it"
        raise MergeError(f"cannot load the tokenizer of {path}: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    text = (str(e).strip().splitlines() or [""])[0][:300]
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype | str:
    """``auto``: float32 on CPU (exact, and bfloat16 is slow there), the checkpoint's
    dtype on GPUs."""
    if dtype == "auto":
        return torch.float32 if device.type == "cpu" else "auto"
    choices = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in choices:
        raise MergeError(f"--dtype: unknown dtype '{dtype}' (use auto, float32, bfloat16 or "
                         "float16)")
    return choices[dtype]


def load_model(folder: str, device: torch.device, dtype: torch.dtype | str,
               what: str = "model") -> Any:
    """``AutoModelForCausalLM`` from a local folder, in eval mode on ``device``."""
    import transformers
    from transformers import AutoModelForCausalLM

    check_model_folder(folder, what)
    major_minor = tuple(int(x) for x in transformers.__version__.split(".")[:2])
    dtype_kw = "dtype" if major_minor >= (4, 56) else "torch_dtype"
    try:
        with _quiet_transformers():
            model, info = AutoModelForCausalLM.from_pretrained(
                folder, local_files_only=True, trust_remote_code=False,
                output_loading_info=True, **{dtype_kw: dtype})
    except Exception as e:  # transformers raises many types; all mean "cannot load it"
        raise MergeError(f"cannot load {what} {folder} with transformers: "
                         f"{_first_line(e)}") from None
    missing = list(info.get("missing_keys") or [])
    if missing:
        warnings.warn(f"{folder}: {len(missing)} weight(s) not in the checkpoint were "
                      f"initialised at random (first: {sorted(missing)[0]}); its scores "
                      "mean little", stacklevel=2)
    return model.to(device).eval()


def vocab_width(model: Any) -> int:
    return int(model.get_output_embeddings().weight.shape[0])


def _collect() -> None:
    """Give back the memory of a model whose last reference the caller dropped."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ------------------------------------------------------------------ batches


def _batch_logits(model: Any, windows: Sequence[list[int]],
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token logits of every scored position of ``windows`` (right-padded batch), as
    ``[positions, vocab]``, and the targets."""
    longest = max(len(w) for w in windows)
    ids = torch.zeros(len(windows), longest, dtype=torch.long)
    mask = torch.zeros(len(windows), longest, dtype=torch.long)
    for i, w in enumerate(windows):
        ids[i, :len(w)] = torch.tensor(w)
        mask[i, :len(w)] = 1
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
    rows = [logits[i, :len(w) - 1] for i, w in enumerate(windows)]
    targets = torch.tensor([t for w in windows for t in w[1:]], device=logits.device)
    return torch.cat(rows), targets


def _batches(data: TextData, batch_size: int) -> list[list[list[int]]]:
    return [data.windows[i:i + batch_size] for i in range(0, len(data.windows), batch_size)]


def check_same_vocabulary(model_tok: Any, parent_folder: str, model_width: int,
                          parent_width: int, data: TextData, name: str) -> int | None:
    """None when the vocabularies are the same; the shared prefix size when they differ
    only in size (with a warning); MergeError when the ids mean different tokens."""
    shared = min(model_width, parent_width)
    if has_tokenizer(parent_folder):
        parent_tok = load_tokenizer(parent_folder)
        mine = {i: t for t, i in model_tok.get_vocab().items() if i < shared}
        theirs = {i: t for t, i in parent_tok.get_vocab().items() if i < shared}
        if mine != theirs:
            diff = sorted(set(mine.items()) ^ set(theirs.items()))
            first = diff[0][0] if diff else "?"
            raise MergeError(
                f"parent {name}: its tokenizer gives different token ids than the model's "
                f"(id {first}: {mine.get(first)!r} vs {theirs.get(first)!r}); KL and top-1 "
                "need the same vocabulary")
    if model_width == parent_width:
        return None
    top = max(max(w) for w in data.windows)
    if top >= shared:
        raise MergeError(f"parent {name} has a vocabulary of {parent_width} tokens and the "
                         f"model {model_width}; the text uses token id {top}, beyond the "
                         "shared part, so the two cannot be compared on it")
    warnings.warn(f"parent {name}: vocabularies differ in size ({parent_width} vs "
                  f"{model_width} for the model); KL and top-1 compare the {shared} shared "
                  "token ids (both distributions renormalised over them)", stacklevel=2)
    return shared


# ------------------------------------------------------------------ the evaluation


@dataclass
class Parent:
    """A model to compare with: its display name and local folder."""

    name: str
    folder: str


def evaluate(model: str, *, text: str | None = None, jsonl: str | None = None,
             field_name: str = "text", parents: Sequence[Parent | str] = (),
             tokenizer: str | None = None, device: str = "cpu", dtype: str = "auto",
             batch_size: int = DEFAULT_BATCH_SIZE, max_length: int | None = None,
             max_tokens: int | None = None, tasks: Sequence[str] = (),
             limit: int | None = None, include_path: str | None = None,
             cache: EvalCache | None = None, progress: bool = False,
             skip_bad_parents: bool = False, model_name: str | None = None) -> EvalReport:
    """Perplexity of ``model`` on the text; KL and top-1 agreement of each parent against
    it, on the same tokens; lm-eval task scores of all of them. Results are cached."""
    from ..devices import resolve_device

    require_transformers()
    if batch_size < 1:
        raise MergeError("--batch-size must be at least 1")
    if max_tokens is not None and max_tokens < 2:
        raise MergeError("--max-tokens must be at least 2")
    if text is None and jsonl is None and not tasks:
        raise MergeError("nothing to evaluate: give --text FILE or --jsonl FILE (perplexity) "
                         "and/or --tasks (lm-evaluation-harness)")
    check_model_folder(model)
    plist = [p if isinstance(p, Parent) else Parent(p, p) for p in parents]
    for p in plist:
        check_model_folder(p.folder, "parent")
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    cache = cache if cache is not None else EvalCache()
    report = EvalReport(Scores(model_name or model, model, "model"),
                        [Scores(p.name, p.folder, "parent") for p in plist],
                        tasks=list(tasks), limit=limit)
    if tasks:  # fail on a missing lm-eval or unknown task before the long part
        from .lm_eval_tasks import check_tasks

        check_tasks(tasks, include_path)
    if text is not None or jsonl is not None:
        docs, source = read_texts(text, jsonl, field_name)
        tok = load_tokenizer(model, tokenizer)
        if max_length is None:
            max_length = default_max_length(model)
        report.data = make_windows(tok, docs, source, max_length, max_tokens)
        _text_scores(report, model, plist, tok, dev, torch_dtype, batch_size, cache, progress,
                     skip_bad_parents)
    if tasks:
        from .lm_eval_tasks import run_tasks

        for row in report.rows:
            if row.skipped or row.folder is None:
                continue
            row.tasks = run_tasks(row.folder, tasks, limit=limit, include_path=include_path,
                                  device=dev, dtype=torch_dtype, batch_size=batch_size,
                                  cache=cache, tokenizer=_task_tokenizer(row, model, tokenizer),
                                  progress=progress)
    return report


def _task_tokenizer(row: Scores, model: str, tokenizer: str | None) -> str:
    """Each model runs the tasks with its own tokenizer; the model's (or --tokenizer) when
    a folder has none."""
    if row.role == "model":
        return tokenizer or model
    assert row.folder is not None
    return row.folder if has_tokenizer(row.folder) else (tokenizer or model)


def default_max_length(folder: str) -> int:
    """1024, or less when the model's config says it has fewer positions."""
    try:
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return DEFAULT_MAX_LENGTH
    sub = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = config.get(key, sub.get(key))
        if isinstance(value, int) and value >= 2:
            return min(DEFAULT_MAX_LENGTH, value)
    return DEFAULT_MAX_LENGTH


def _dtype_name(dtype: torch.dtype | str) -> str:
    return str(dtype).removeprefix("torch.")


def _text_scores(report: EvalReport, model: str, parents: list[Parent], tok: Any,
                 device: torch.device, dtype: torch.dtype | str, batch_size: int,
                 cache: EvalCache, progress: bool, skip_bad_parents: bool) -> None:
    data = report.data
    assert data is not None
    digest = data.digest
    model_fp = model_fingerprint(model)
    model_key = {"kind": "perplexity", "model": model_fp, "tokens": digest,
                 "dtype": _dtype_name(dtype)}

    def pair_key(parent_fp: str) -> dict[str, Any]:
        return {"kind": "compare", "model": model_fp, "parent": parent_fp, "tokens": digest,
                "dtype": _dtype_name(dtype)}

    found = cache.get(model_key)
    if found is not None:
        report.model.perplexity = found["perplexity"]
    todo = []
    for p, row in zip(parents, report.parents):
        hit = cache.get(pair_key(model_fingerprint(p.folder)))
        if hit is not None:
            row.perplexity, row.kl, row.kl_reverse, row.top1 = (
                hit["perplexity"], hit["kl"], hit["kl_reverse"], hit["top1"])
        else:
            todo.append((p, row))
    if found is not None and not todo:
        return

    batches = _batches(data, batch_size)
    net = load_model(model, device, dtype)
    width = vocab_width(net)
    top = max(max(w) for w in data.windows)
    if top >= width:
        del net
        _collect()
        raise MergeError(f"the tokenizer gives token id {top} but {model} has only {width} "
                         "output logits; pass the model's own tokenizer with --tokenizer")
    bar = _bar(progress, len(batches) * max(1, len(todo)))
    try:
        with torch.inference_mode():
            if not todo:
                totals = Totals()
                bar.set_description("model")
                for batch in batches:
                    logits, targets = _batch_logits(net, batch, device)
                    totals.add(logits, targets)
                    bar.update(1)
                _store_model(report, totals, cache, model_key)
            for p, row in todo:
                try:
                    parent = load_model(p.folder, device, dtype, "parent")
                    shared = check_same_vocabulary(tok, p.folder, width, vocab_width(parent),
                                                   data, p.name)
                except MergeError as e:
                    if not skip_bad_parents:
                        raise
                    row.skipped = str(e).removeprefix(f"parent {p.name}: ")
                    warnings.warn(f"skipping parent {p.name}: {row.skipped}", stacklevel=2)
                    bar.update(len(batches))
                    continue
                totals = Totals()
                bar.set_description(f"vs {os.path.basename(os.path.normpath(p.name))}")
                for batch in batches:
                    logits, targets = _batch_logits(net, batch, device)
                    parent_logits, _ = _batch_logits(parent, batch, device)
                    totals.add(logits, targets, parent_logits, shared)
                    bar.update(1)
                del parent, parent_logits
                _collect()
                n = totals.positions
                row.perplexity = perplexity(totals.parent_nll, n)
                row.kl, row.kl_reverse, row.top1 = (totals.kl / n, totals.kl_reverse / n,
                                                    totals.top1 / n)
                cache.put(pair_key(model_fingerprint(p.folder)),
                          {"perplexity": row.perplexity, "kl": row.kl,
                           "kl_reverse": row.kl_reverse, "top1": row.top1, "positions": n})
                if report.model.perplexity is None:
                    _store_model(report, totals, cache, model_key)
    finally:
        bar.close()
        del net
        _collect()


def _store_model(report: EvalReport, totals: Totals, cache: EvalCache,
                 key: dict[str, Any]) -> None:
    report.model.perplexity = perplexity(totals.nll, totals.positions)
    cache.put(key, {"perplexity": report.model.perplexity, "positions": totals.positions})


def _bar(enabled: bool, total: int) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, unit="batch", disable=not enabled, dynamic_ncols=True,
                leave=False)
