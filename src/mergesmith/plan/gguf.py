"""A GGUF output (``OUT`` ending in ``.gguf``, or ``--out-format gguf``): one file, laid out
before any tensor exists, every output tensor stored as its GGUF tensor.

Each output tensor keeps its Hugging Face name while it is merged (seeds, parameters and
filters see the same names as for a safetensors output) and gets a
:class:`~mergesmith.checkpoint.gguf_export.GGUFRows` encoding: computed in float32, then
transformed as llama.cpp stores it (Q/K rows of Llama-family attention, Gemma's norm
offset) and encoded to its ggml type when written. The type is the recipe's ``out_dtype``
(``q8_0``, ``q4_0``, ``q4_1``, ``q5_0``, ``q5_1``, or a float dtype: f32/f16/bf16), else the
recipe's ``dtype``, else the inputs' dtype; norms and other 1-D tensors stay F32.

Metadata: from a GGUF base model (the donor of config.json) when it has one, with the
block count of the output; else made from the donor's config.json and tokenizer files for
the families ``gguf_export`` supports (Llama, Mistral, Qwen2, Qwen3, Gemma 1/2/3).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any

from .._torch import torch
from ..errors import MergeError
from ..units import GGUF_QUANT_TYPES
from .draft import Draft
from .types import OutputTensor, Shard

FLOAT_TYPES = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}


def check_output_format(d: Draft) -> None:
    """GGUF-only out_dtypes need a GGUF output, and a GGUF output a type it can write."""
    r = d.recipe
    if d.options.out_format != "gguf":
        if r.gguf_type is not None:
            raise MergeError(f"{r.at('out_dtype')}: {r.gguf_type} is a GGUF type; give an "
                             "output path ending in .gguf (or --out-format gguf), or a float "
                             "dtype for a safetensors folder")
        return
    if r.output == "adapter":
        raise MergeError(f"{r.at('output')}: a LoRA adapter cannot be written as GGUF")
    if r.out_dtype is not None and r.out_dtype not in FLOAT_TYPES:
        raise MergeError(f"{r.at('out_dtype')}: a GGUF output is written as f32, f16, bf16, "
                         f"{', '.join(GGUF_QUANT_TYPES)}; not {r.out_dtype}")


def gguf_type(d: Draft) -> str:
    """The output type: ``out_dtype``, else ``dtype``, else the most common output dtype."""
    r = d.recipe
    if r.gguf_type is not None:
        return r.gguf_type
    dtype = r.out_dtype or r.dtype
    if dtype is None:
        floats = Counter(t.dtype for t in d.outputs if t.dtype in FLOAT_TYPES)
        dtype = floats.most_common(1)[0][0] if floats else torch.float16
    if dtype not in FLOAT_TYPES:
        raise MergeError(f"{r.at('dtype')}: a GGUF output cannot be written as {dtype}")
    return FLOAT_TYPES[dtype]


def plan_gguf(d: Draft, donor: int, config: dict[str, Any], ordered: list[OutputTensor],
              filename: str) -> tuple[list[OutputTensor], list[Shard]]:
    """Encodings, metadata and the file layout of a GGUF output (``ordered``: processing
    order, which is also the order of the tensors in the file)."""
    from ..checkpoint import gguf_export

    if d.vocab is not None:
        raise MergeError(f"{d.recipe.at('tokenizer')}: a GGUF output keeps the donor's "
                         "vocabulary; a recipe that builds another vocabulary writes a "
                         "safetensors folder (then convert it with llama.cpp)")
    copied = [t.name for t in ordered if t.copied]
    if copied:
        raise MergeError(f"GGUF output: non-floating tensor '{copied[0]}' has no GGUF form")
    out_type = gguf_type(d)
    gplan = gguf_export.gguf_tensor_plan([(t.name, t.shape) for t in ordered], config, out_type)
    by_name = gplan.by_hf_name
    generated = [g for g in gplan.tensors if g.hf_name is None]
    # generated tensors (llama3's rope_freqs) first: their bytes follow the metadata
    gplan = dataclasses.replace(gplan, tensors=generated + [by_name[t.name] for t in ordered
                                                            if t.name in by_name])
    metadata = _metadata(d, donor, config, gguf_export)
    prefix, offsets, size = gguf_export.file_prefix(gplan, metadata)
    first = min((offsets[by_name[t.name].name] for t in ordered if t.name in by_name),
                default=size)
    header = bytearray(prefix + bytes(first - len(prefix)))
    for g in generated:
        data = gguf_export.constant_bytes(g)
        header[offsets[g.name]:offsets[g.name] + len(data)] = data
    tensors = []
    for t in ordered:
        if t.name not in by_name:  # a tied head llama.cpp does not store
            continue
        encoding = gguf_export.GGUFRows(by_name[t.name])
        parts = tuple(dataclasses.replace(p, offset=offsets[p.name])
                      for p in encoding.parts(t.name, t.shape))
        tensors.append(dataclasses.replace(t, dtype=encoding.value_dtype, encoding=encoding,
                                           parts=parts, file=filename,
                                           offset=parts[0].offset))
    counts = Counter(g.encoding.type_name for g in gplan.tensors)
    source = ("from the GGUF base" if _gguf_donor(d, donor)
              else "made from config.json and the tokenizer")
    d.notes.append(f"output: one GGUF file ({gplan.arch}, {out_type}): "
                   + ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
                   + f"; metadata {source}")
    return tensors, [Shard(filename, bytes(header), size, tuple(tensors))]


def _gguf_donor(d: Draft, donor: int) -> str | None:
    index = d.sources[donor].index
    return index.files[0] if index.format == "gguf" else None


def _metadata(d: Draft, donor: int, config: dict[str, Any], gguf_export: Any) -> dict:
    """The KV section: the GGUF donor's, or made from its config and tokenizer files; the
    output's layer count and the recipe's name and chat template on top."""
    from gguf import GGUFValueType
    from gguf.gguf_writer import GGUFValue

    source = d.sources[donor]
    path = _gguf_donor(d, donor)
    if path is not None:
        metadata = gguf_export.metadata_from_gguf(path)
        arch = gguf_export.gguf_arch(config)
        metadata[f"{arch}.block_count"] = GGUFValue(int(config["num_hidden_layers"]),
                                                    GGUFValueType.UINT32)
    else:
        metadata = gguf_export.metadata_from_hf(source.folder, config,
                                                name=d.recipe.name or None)
    if d.recipe.name:
        metadata["general.name"] = GGUFValue(d.recipe.name, GGUFValueType.STRING)
    if d.chat_template:
        metadata["tokenizer.chat_template"] = GGUFValue(d.chat_template, GGUFValueType.STRING)
    return metadata
