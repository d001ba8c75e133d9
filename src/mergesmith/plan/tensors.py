"""Planning one output tensor: its inputs, shape, dtype, and the method bound to them with
resolved parameters."""

from __future__ import annotations

from collections.abc import Iterable

from .._torch import torch
from .. import arch
from ..checkpoint import TensorInfo
from ..errors import MergeError
from ..methods.contract import BoundMethod
from ..recipe import ModelReference
from ..tokenizer import truncation_plan
from .draft import Draft
from .parameters import RecipeLookup
from .recipe_view import Slice, Source
from .types import COPY, InputTensor, OutputTensor


def bind(d: Draft, sl: Slice) -> BoundMethod:
    """The method bound to a slice's inputs: each input once, and the method's contract."""
    r = d.recipe
    seen: set[ModelReference] = set()
    for src in sl.sources:
        if src.ref in seen:
            raise MergeError(f"{r.at(*src.path)}: model '{src.ref}' is listed twice in the "
                             "same merge; list each input once")
        seen.add(src.ref)
    base_pos = next((i for i, s in enumerate(sl.sources) if s.ref == sl.base), None)
    where = r.at(*sl.path) if sl.path else r.at("models")
    return BoundMethod.bind(d.spec, len(sl.sources), base_pos, base_named=sl.base is not None,
                            where=where, base_hint=": add 'base_model: <the model the others "
                            "were fine-tuned from>'")


def find_input(d: Draft, src: Source, name: str, out_name: str) -> InputTensor:
    m = d.model_of(src.ref)
    tensors = d.sources[m].index.tensors
    if name in tensors:
        return InputTensor(m, name)
    if arch.is_output_head(name):
        embed = arch.input_embedding_name(tensors)
        if embed is not None:  # tied embeddings: the head is the embedding
            return InputTensor(m, embed)
    raise MergeError(f"model '{src.ref}' has no tensor '{name}' (needed for output "
                     f"tensor '{out_name}'); it is not the same architecture as the "
                     "others, or its checkpoint is incomplete")


def depth_of(name: str, position: float) -> float:
    """Where a tensor sits, 0 (embeddings) to 1 (head): layers at their position."""
    if arch.split_layer(name) is not None:
        return position
    return 0.0 if arch.is_pre_layer(name) else 1.0


def add_output(d: Draft, out_name: str, sl: Slice, bound: BoundMethod, in_names: list[str],
               position: float) -> None:
    """Plan output tensor ``out_name`` merging ``in_names`` of the slice's sources;
    ``position`` (0 to 1) is the layer's place for gradients."""
    r = d.recipe
    inputs = [find_input(d, src, n, out_name) for src, n in zip(sl.sources, in_names)]
    infos = [d.sources[i.model].index.tensors[i.name] for i in inputs]
    shape, reindex = output_shape(d, out_name, sl, inputs, infos)
    floating = [info.dtype.is_floating_point for info in infos]
    if any(floating) and not all(floating):
        listing = ", ".join(f"{src.ref}: {str(info.dtype).removeprefix('torch.')}"
                            for src, info in zip(sl.sources, infos))
        raise MergeError(f"tensor '{out_name}' is floating-point in some models and not in "
                         f"others ({listing}); quantized or integer weights cannot be "
                         "merged with floating-point ones — use unquantized checkpoints")
    if not any(floating):
        d.outputs.append(OutputTensor(out_name, shape, infos[0].dtype, COPY, tuple(inputs),
                                      None, {}, tuple({} for _ in inputs), True))
        return
    lookup = RecipeLookup(r, d.spec, sl, [i.name for i in inputs], out_name, position)
    resolved = bound.resolve(lookup, len(inputs), out_name, depth_of(out_name, position))
    dtype = r.out_dtype or r.dtype or _promote(info.dtype for info in infos)
    elementwise = not reindex and not bound.whole_tensors(resolved.params, shape)
    parts = 0 if elementwise or reindex else _expert_parts(d, inputs[0], shape)
    d.outputs.append(OutputTensor(out_name, shape, dtype, d.spec.name, tuple(inputs),
                                  bound.base_index, resolved.params, resolved.model_params,
                                  elementwise, reindex=reindex, expert_parts=parts))


def _expert_parts(d: Draft, inp: InputTensor, shape: tuple[int, ...]) -> int:
    """Pieces per expert of a fused expert tensor (see :func:`arch.expert_parts`): a
    whole-tensor method then merges each expert as a per-expert checkpoint stores it."""
    tensors = d.sources[inp.model].index.tensors
    down = arch.down_proj_sibling(inp.name)
    down_shape = tuple(tensors[down].shape) if down in tensors else None
    return arch.expert_parts(inp.name, tuple(shape), down_shape)


def output_shape(d: Draft, out_name: str, sl: Slice, inputs: list[InputTensor],
                 infos: list[TensorInfo]) -> tuple[tuple[int, ...], bool]:
    """Shape of an output tensor, and whether its rows are re-indexed to the output
    vocabulary. Vocabulary-size mismatches without a tokenizer block are errors."""
    shapes = {info.shape for info in infos}
    vocab_like = arch.is_vocab_tensor(out_name) and all(
        info.shape and info.shape[0] == d.rows.get(i.model) for i, info in zip(inputs, infos))
    if vocab_like and len({s[1:] for s in shapes}) == 1:
        rest = infos[0].shape[1:]
        if d.vocab is not None:
            return (d.vocab.size, *rest), True
        if len(shapes) > 1 and d.options.unsafe_truncate_embeddings:
            d.vocab = truncation_plan(min(d.rows.values()))
            d.notes.append(f"UNSAFE: vocabulary tensors cut to the smallest vocabulary "
                           f"({d.vocab.size} rows); token ids above it are invalid")
            return (d.vocab.size, *rest), True
        if len(shapes) > 1:
            listing = ", ".join(f"{src.ref}: {info.shape[0]}"
                                for src, info in zip(sl.sources, infos))
            raise MergeError(f"tensor '{out_name}': the models have different vocabulary "
                             f"sizes ({listing}). Add 'tokenizer: {{source: union}}' (all "
                             "tokens) or 'tokenizer: {source: base}' (the base's tokens) to "
                             "the recipe to align them, or pass "
                             "--unsafe-truncate-embeddings if the ids agree up to the "
                             "smallest size")
    if len(shapes) > 1:
        listing = ", ".join(f"{src.ref}: {list(info.shape)}"
                            for src, info in zip(sl.sources, infos))
        raise MergeError(f"tensor '{out_name}' has different shapes in the inputs "
                         f"({listing})")
    return infos[0].shape, False


def carry(d: Draft, names: list[str], donor: int, why: str) -> None:
    """Copy donor tensors unchanged (cast to the recipe's output dtype if it has one)."""
    r = d.recipe
    for name in names:
        info = d.sources[donor].index.tensors[name]
        inp = (InputTensor(donor, name),)
        if info.dtype.is_floating_point:
            dtype = r.out_dtype or r.dtype or info.dtype
            d.outputs.append(OutputTensor(name, info.shape, dtype, "passthrough", inp,
                                          None, {}, ({"scale": None},), True))
        else:
            d.outputs.append(OutputTensor(name, info.shape, info.dtype, COPY, inp,
                                          None, {}, ({},), True))
    if names:
        d.notes.append(why)


def _promote(dtypes: Iterable[torch.dtype]) -> torch.dtype:
    out = None
    for dt in dtypes:
        out = dt if out is None else torch.promote_types(out, dt)
    assert out is not None
    return out
