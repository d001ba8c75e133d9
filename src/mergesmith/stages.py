"""Multi-stage recipes (mergekit-multi's format): several YAML documents in one file, the
intermediate ones named; later stages name earlier ones as a model, base or slice source.

Execution is fused: an intermediate stage is planned like any recipe, and becomes a
*computed model source* for the stages that read it. Its tensor table is its plan's output
tensors (names, shapes, output dtypes); its side files (config.json, tokenizer, generation
config) are what its own run would write, put in a small folder. Reading rows of one of its
tensors computes that output tensor of the earlier stage — with exactly the work items its
own run would use, rows chunks included, recursively through earlier stages — rounded to
that stage's output dtype as its run would write it. Nothing is written unless a stage
cannot be computed this way (``written_reason``): then it is merged into
``OUT.partial/.stages/NAME`` first and read back like any model folder.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import weakref
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from ._torch import torch
from .checkpoint import CheckpointIndex, ModelSource, TensorInfo, TokenizerSource
from .errors import MergeError
from .recipe import ModelReference, Recipe
from .recipe.schema import parse_recipe
from .recipe.yaml_positions import load_yaml

if TYPE_CHECKING:
    from .options import Options
    from .plan import OutputTensor, Plan

STAGES_DIR = ".stages"
"""Folder of ``OUT.partial`` where stages that cannot be fused are written first."""


# ------------------------------------------------------------------ the stages of a file


@dataclass
class Stage:
    """One YAML document of a multi-stage recipe."""

    name: str | None  # None: the final, unnamed stage
    recipe: Recipe
    document: int  # 1-based
    reads: list[str] = field(default_factory=list)  # stage names it refers to, in order

    @property
    def label(self) -> str:
        return self.name if self.name is not None else f"(final, document {self.document})"


@dataclass
class StageGraph:
    stages: list[Stage]
    text: str
    source: str

    def named(self) -> dict[str, Stage]:
        return {s.name: s for s in self.stages if s.name is not None}

    def target(self, name: str | None) -> Stage:
        """The stage to build: ``name``, else the unnamed one, else the only stage no
        other stage reads."""
        named = self.named()
        if name is not None:
            if name not in named:
                listed = ", ".join(named) or "none"
                raise MergeError(f"--stage '{name}': {self.source} has no stage of that name "
                                 f"(named stages: {listed})")
            return named[name]
        unnamed = [s for s in self.stages if s.name is None]
        if unnamed:
            return unnamed[0]
        read = {r for s in self.stages for r in s.reads}
        sinks = [s for s in self.stages if s.name not in read]
        if len(sinks) == 1:
            return sinks[0]
        raise MergeError(f"{self.source}: every stage is named and several are read by no "
                         f"other stage ({', '.join(str(s.name) for s in sinks)}); choose the "
                         "one to build with --stage NAME")

    def order(self, target: Stage) -> list[Stage]:
        """The stages ``target`` needs, each after those it reads, ``target`` last."""
        named = self.named()
        out: list[Stage] = []
        state: dict[int, int] = {}  # document → 1 visiting, 2 done

        def visit(s: Stage, path: list[str]) -> None:
            if state.get(s.document) == 2:
                return
            if state.get(s.document) == 1:
                start = path.index(s.label)
                cycle = " → ".join([*path[start:], s.label])
                raise MergeError(f"{self.source}: the stages form a cycle: {cycle}")
            state[s.document] = 1
            for r in s.reads:
                visit(named[r], [*path, s.label])
            state[s.document] = 2
            out.append(s)

        visit(target, [])
        return out


def read_stages(source: Any) -> StageGraph | None:
    """The stages of a multi-document recipe (a file path, YAML text or a list of
    mappings); None for a recipe of one document (planned as today)."""
    if isinstance(source, (list, tuple)):
        import yaml

        if len(source) < 2:
            return None
        text = "\n---\n".join(yaml.safe_dump(d, sort_keys=False) for d in source)
        return _graph(text, "<recipe>")
    if not isinstance(source, (str, os.PathLike)):
        return None
    text_or_path = os.fspath(source)
    inline = text_or_path.lstrip().startswith("merge_method")
    if "\n" not in text_or_path and not inline:
        path = os.path.expanduser(text_or_path)
        if not os.path.isfile(path):
            return None  # load_recipe says what is wrong
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError):
            return None
        name = text_or_path
    else:
        text, name = text_or_path, "<recipe>"
    if "---" not in text:
        return None
    return _graph(text, name)


def _documents(text: str, source: str) -> list[tuple[str, int]]:
    """Each non-empty document's text, padded with newlines so that line numbers in
    messages are the file's, and its first line."""
    import yaml

    try:
        nodes = list(yaml.compose_all(text, Loader=yaml.SafeLoader))
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        raise MergeError(f"{where}: YAML syntax error: {e.problem or 'invalid YAML'}") from None
    except yaml.YAMLError as e:
        raise MergeError(f"{source}: YAML syntax error: {e}") from None
    out = []
    for node in nodes:
        if node is None:
            continue
        start, end = node.start_mark, node.end_mark
        body = text[start.index:end.index]
        out.append(("\n" * start.line + " " * start.column + body, start.line + 1))
    return out


def _graph(text: str, source: str) -> StageGraph | None:
    docs = _documents(text, source)
    if len(docs) < 2:
        return None
    stages: list[Stage] = []
    for k, (doc, line) in enumerate(docs, 1):
        data, positions = load_yaml(doc, source)
        recipe = parse_recipe(data, doc.strip("\n") + "\n", source, positions)
        stages.append(Stage(recipe.name, recipe, k))
    seen: dict[str, Stage] = {}
    for s in stages:
        if s.name is None:
            continue
        if not isinstance(s.name, str) or not s.name.strip():
            raise MergeError(f"{s.recipe.at('name')}: a stage name must be a non-empty string")
        if s.name in seen:
            raise MergeError(f"{source}: documents {seen[s.name].document} and {s.document} "
                             f"are both named '{s.name}'; give each stage its own name")
        seen[s.name] = s
    unnamed = [s for s in stages if s.name is None]
    if len(unnamed) > 1:
        docs_list = ", ".join(str(s.document) for s in unnamed)
        raise MergeError(f"{source}: documents {docs_list} have no 'name:'; only the final "
                         "stage may be unnamed (name the intermediate stages, and refer to "
                         "them by name in later stages)")
    from .plan import referenced_models

    for s in stages:
        refs = [r for r, _ in referenced_models(s.recipe)]
        vocab = s.recipe.tokenizer.source if s.recipe.tokenizer is not None else None
        if isinstance(vocab, ModelReference):
            refs.append(vocab)
        for ref in refs:
            name = ref.model.path
            if name not in seen or ref.model.revision is not None:
                continue
            if ref.lora is not None:
                raise MergeError(f"{source}: stage {s.label} reads stage '{name}' with a LoRA "
                                 f"adapter ('{ref}'); merge the adapter in that stage instead")
            if name not in s.reads:
                s.reads.append(name)
    return StageGraph(stages, text, source)


# ------------------------------------------------------------------ planning


@dataclass(frozen=True, eq=False)
class StageTensor:
    """How a tensor of an intermediate stage is obtained: computed from ``plan``'s output
    tensor ``tensor`` (the ``quant`` of its :class:`TensorInfo`, read by the ``stage``
    source of the reader)."""

    stage: str
    plan: Plan
    tensor: OutputTensor
    position: int
    decode_seconds: float = 0.0  # the stage's work per 10⁹ elements (for estimates)
    format = "stage"
    _memory: dict = field(default_factory=dict, repr=False)

    @property
    def stored_offset(self) -> int:
        return self.position  # later stages read in the earlier stage's order

    @property
    def whole(self) -> bool:
        """Computed as a whole tensor (its method needs whole tensors)."""
        t = self.tensor
        return not (t.elementwise or t.expert_parts or t.stack)


def is_stage(info: TensorInfo) -> bool:
    return info.quant is not None and getattr(info.quant, "format", None) == "stage"


@dataclass(frozen=True)
class StageInfo:
    """A stage as ``check`` shows it."""

    name: str | None
    document: int
    reads: tuple[str, ...]  # every model it reads, stages by name
    method: str
    written: str | None  # why it is written instead of fused; None: fused
    plan: Any = None  # its Plan (the final stage's is the run's plan itself)


def written_reason(p: Plan) -> str | None:
    """Why an intermediate stage's tensors cannot be computed where they are read."""
    if p.recipe.output == "adapter":
        return "it writes a LoRA adapter"
    if p.options.out_format == "gguf" or p.recipe.gguf_type:
        return "its output is GGUF"
    for t in p.tensors:
        if t.reindex:
            return "its vocabulary is rebuilt (tokenizer), which needs whole embeddings"
        if t.stack or t.expert_parts:
            return "it merges MoE experts"
        if t.encoding is not None:
            return f"its output is encoded ({t.encoding.describe()})"
    return None


def plan_stages(graph: StageGraph, options: Options, target_name: str | None,
                resolve_model: Any, resolve_tok: Any) -> Plan:
    """Plan the stages the target needs, in order; return the target's plan, whose
    ``stages`` lists them all (itself last) and whose models include the intermediate
    stages as computed sources."""
    from .plan import make_plan, referenced_models
    from .plan.recipe_view import external_tokenizer

    target = graph.target(target_name)
    order = graph.order(target)
    workdir: list[str] = []  # made when a stage's side files differ from its donor's
    try:
        sources: dict[str, ModelSource] = {}
        infos: list[StageInfo] = []
        plan = None
        for stage in order:
            final = stage is target
            recipe = stage.recipe
            if final:
                recipe = dataclasses.replace(recipe, text=graph.text)
            stage_options = options if final else options.replace(out_format="safetensors")
            models: dict = {}
            for ref, where in referenced_models(recipe):
                if ref.model.path in sources and ref.model.revision is None:
                    models[ref] = _renamed(sources[ref.model.path], ref)
                else:
                    models[ref] = resolve_model(ref, where)
            external = external_tokenizer(recipe)
            tokenizer = None
            if external is not None:
                ref, where = external
                if ref.model.path in sources:
                    tokenizer = TokenizerSource(ref, sources[ref.model.path].folder)
                else:
                    tokenizer = resolve_tok(ref, where)
            plan = make_plan(recipe, models, stage_options, tokenizer)
            plan = _whole_where_needed(plan)
            reason = None if final else written_reason(plan)
            if not final and recipe.output == "adapter":
                raise MergeError(f"{graph.source}: stage '{stage.name}' writes a LoRA adapter, "
                                 "which a later stage cannot read as a model")
            infos.append(StageInfo(stage.name, stage.document,
                                   tuple(str(r) for r in models), recipe.merge_method,
                                   reason, plan))
            if not final:
                assert stage.name is not None
                sources[stage.name] = computed_source(stage.name, plan, workdir)
        assert plan is not None
        plan = dataclasses.replace(plan, stages=tuple(infos))
    except BaseException:
        for folder in workdir:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    for folder in workdir:
        weakref.finalize(plan, shutil.rmtree, folder, True)
    return plan


def _renamed(source: ModelSource, ref: ModelReference) -> ModelSource:
    return source if source.ref == ref else dataclasses.replace(source, ref=ref)


def computed_source(name: str, p: Plan, workdir: list[str]) -> ModelSource:
    """An intermediate stage as a model: its output tensors, computed when read; its
    config is its plan's. Its side files (what its run writes besides the weights) are its
    donor's, read from the donor's folder; only a stage that changes them (a new
    tokenizer, a chat template, a patched generation config) has them written to a small
    temporary folder (``workdir``, removed with the plan)."""
    from .api import tensor_work
    from .output import write_side_files

    new_tokenizer = p.vocab is not None and p.vocab.tokenizer is not None
    if new_tokenizer or p.chat_template is not None or p.generation_config is not None:
        if not workdir:
            workdir.append(tempfile.mkdtemp(prefix="mergesmith-stages-"))
        folder = os.path.join(workdir[0], f"{len(os.listdir(workdir[0])):03d}")
        os.makedirs(folder)
        write_side_files(dataclasses.replace(
            p, options=p.options.replace(write_model_card=False)), folder)
    else:
        folder = p.models[p.donor].folder
    work = tensor_work(p)
    pseudo = f"<stage {name}>"
    tensors: dict[str, TensorInfo] = {}
    for k, t in enumerate(p.tensors):
        numel = max(1, t.nbytes // max(1, t.dtype.itemsize))
        how = StageTensor(name, p, t, k, work.get(t.name, 0.0) * 1e9 / numel)
        tensors[t.name] = TensorInfo(t.name, pseudo, t.dtype, t.shape, None, t.nbytes, how)
    index = CheckpointIndex(folder, tensors, [pseudo], p.config, "stage")
    return ModelSource(ModelReference(_path(name)), index, stage=p)


def _path(name: str):
    from .recipe import ModelPath

    return ModelPath(name)


def _whole_where_needed(p: Plan) -> Plan:
    """An element-wise tensor that reads a tensor its stage computes whole is merged whole
    too (else every row chunk would recompute the whole input). Not for random methods:
    their draws depend on the chunks, and the result must equal the separate runs' (no
    built-in random method is element-wise; a plugin's would recompute per chunk: correct,
    slower)."""
    changed: dict[int, OutputTensor] = {}
    for t in p.tensors:
        if not t.elementwise or t.copied:
            continue
        if not any(is_stage(p.input_info(i)) and p.input_info(i).quant.whole
                   for i in t.inputs):
            continue
        if p.bound(t).spec.scheduling.random:
            continue
        changed[id(t)] = dataclasses.replace(t, elementwise=False)
    if not changed:
        return p
    tensors = tuple(changed.get(id(t), t) for t in p.tensors)
    shards = tuple(dataclasses.replace(s, tensors=tuple(changed.get(id(t), t)
                                                        for t in s.tensors))
                   for s in p.shards)
    return dataclasses.replace(p, tensors=tensors, shards=shards)


# ------------------------------------------------------------------ what check shows


def stage_lines(p: Plan) -> list[str]:
    if not p.stages:
        return []
    fused = sum(s.written is None for s in p.stages[:-1])
    lines = [f"stages:        {len(p.stages)} in order ({fused} intermediate stage(s) fused: "
             "computed tensor by tensor where they are read, never written)"]
    for k, s in enumerate(p.stages, 1):
        last = k == len(p.stages)
        name = s.name if s.name is not None else "(unnamed)"
        how = ("the output" if last else
               "fused" if s.written is None else f"written first to OUT.partial/{STAGES_DIR}/"
               f"{s.name} because {s.written}")
        lines.append(f"  {k}. {name} (document {s.document}, {s.method}): reads "
                     f"{', '.join(s.reads)} → {how}")
    return lines


def intermediate_plans(p: Plan) -> list[tuple[str, Plan, str | None]]:
    """(name, plan, written reason) of every intermediate stage, in order."""
    return [(s.name, s.plan, s.written) for s in p.stages[:-1]]


# ------------------------------------------------------------------ reading computed tensors


class StageSource:
    """The reader's source of computed tensors: each read runs the earlier stage's work
    items for the rows asked (its own chunks, so random methods draw as in its own run)
    and returns them rounded to its output dtype. Memory is that of the items in flight."""

    def __init__(self, reader: Any, devices: list[torch.device], chunk_elements: int | None,
                 strict_finite: bool) -> None:
        import threading

        self.reader, self.devices = reader, devices
        self.chunk_elements, self.strict_finite = chunk_elements, strict_finite
        self._jobs: dict[int, tuple[Any, _Capture, dict[str, list]]] = {}
        self._lock = threading.Lock()
        self.warnings: list[str] = []
        self._names: dict[int, str] = {}

    def _job(self, how: StageTensor) -> tuple[Any, _Capture, dict[str, list]]:
        key = id(how.plan)
        with self._lock:
            found = self._jobs.get(key)
            if found is None:
                from .execute import _Job, work_items

                capture = _Capture()
                indexes = [m.ensure_local() for m in how.plan.models]
                job = _Job(how.plan, indexes, self.reader, capture, self.devices,
                           self.strict_finite)
                spans: dict[str, list] = {}
                for item in work_items(how.plan, self.chunk_elements):
                    spans.setdefault(item.tensor.name, []).append(item.rows)
                found = self._jobs[key] = (job, capture, spans)
                self._names[key] = how.stage
            return found

    def read(self, info: TensorInfo, rows: tuple[int, int] | None = None,
             round_to: torch.dtype | None = None) -> torch.Tensor:
        from .execute import WorkItem

        how: StageTensor = info.quant
        job, capture, spans = self._job(how)
        t = how.tensor
        pieces = []
        for span in spans[t.name]:
            if rows is not None and span is not None and (span[1] <= rows[0]
                                                          or span[0] >= rows[1]):
                continue
            job._compute(WorkItem(t, span))
            x = capture.take()
            lo, hi = (0, t.shape[0] if t.shape else 1) if span is None else span
            if rows is not None and (rows[0] > lo or rows[1] < hi):
                x = x[max(rows[0], lo) - lo:min(rows[1], hi) - lo].clone()
            pieces.append(x)
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def close(self) -> None:
        for key, (job, _, _) in self._jobs.items():
            self.warnings += [f"stage '{self._names[key]}': {w}" for w in job.warnings]
        self._jobs.clear()


class _Capture:
    """The sink of a computed stage: keeps the result (rounded to the stage's output
    dtype, as its writer would) for the thread that asked."""

    digests: dict[str, str] = {}

    def __init__(self) -> None:
        import threading

        self._local = threading.local()

    def write(self, t: OutputTensor, rows: tuple[int, int] | None, data: torch.Tensor,
              crc: int = 0) -> int:
        self._local.value = data.to(dtype=t.dtype, memory_format=torch.contiguous_format)
        return 0

    def take(self) -> torch.Tensor:
        value, self._local.value = self._local.value, None
        return value

    def finished(self, t: OutputTensor, rows: tuple[int, int] | None) -> None:
        pass

    def close(self, sync: bool = True) -> None:
        pass


def stage_memory(p: Plan, item: Any) -> int:
    """Bytes the computation of ``item``'s computed inputs adds at its peak: the largest
    of them (they are read one after another), the pieces a whole read is made of."""
    from .execute import WorkItem, item_memory, work_items

    extra = 0
    t = item.tensor
    for i in t.inputs:
        info = p.input_info(i)
        if not is_stage(info):
            continue
        how: StageTensor = info.quant
        key = (item.rows[1] - item.rows[0]) if item.rows is not None else None
        need = how._memory.get(key)
        if need is None:
            one = SimpleNamespace(tensors=(how.tensor,))  # its chunks only
            span = None if how.whole else next(work_items(one)).rows  # type: ignore[arg-type]
            if span is not None and key is not None:
                span = (span[0], span[0] + min(key, span[1] - span[0]))
            need = item_memory(how.plan, WorkItem(how.tensor, span))
            if span is not None and key != span[1] - span[0]:
                need += info.nbytes if key is None else 0  # pieces of a whole read
            how._memory[key] = need
        extra = max(extra, need)
    return extra


# ------------------------------------------------------------------ running


def check_keep(p: Plan, keep: str | None) -> None:
    """``--keep-intermediates DIR``: the folders it will write are free (or --overwrite)."""
    from .output import check_output

    if keep is None:
        return
    if not p.stages:
        raise MergeError("--keep-intermediates: the recipe has a single stage, so there are "
                         "no intermediate models to keep")
    for name, _, _ in intermediate_plans(p):
        check_output(os.path.join(keep, name), p.options.overwrite)


def write_stages(p: Plan, partial: str, keep: str | None,
                 merge: Any) -> None:
    """Before the fused merge: write the stages that cannot be fused into
    ``partial/.stages/NAME`` (kept there for --resume), and with ``keep`` every intermediate
    stage into ``keep/NAME``; later stages then read those folders. ``merge(plan, out)``
    is the single-stage merge."""
    from .checkpoint import index_folder

    for name, stage_plan, reason in intermediate_plans(p):
        if keep is not None:
            target = os.path.join(keep, name)
        elif reason is not None:
            target = os.path.join(partial, STAGES_DIR, name)
        else:
            continue
        if not (reason is not None and keep is None and p.options.resume
                and os.path.exists(os.path.join(target, "config.json"))):
            os.makedirs(os.path.dirname(target), exist_ok=True)
            merge(stage_plan, target)
        index = index_folder(target)
        for s in p.stages:
            for m in s.plan.models if s.plan is not None else ():
                if m.stage is stage_plan:
                    m.index = index
        for m in p.models:
            if m.stage is stage_plan:
                m.index = index


def remove_written(partial: str) -> None:
    shutil.rmtree(os.path.join(partial, STAGES_DIR), ignore_errors=True)
