"""Stored encodings of the output: ``out_dtype: float8_e4m3fn`` writes linear weights as
block-scaled FP8 (the DeepSeek-V3 layout transformers' FineGrainedFP8 loads) and every
other floating tensor in bfloat16.

Which weights: the ones an FP8 input quantizes (an output tensor with a quantized input),
with that input's block size; without FP8 inputs, the 2-D weights of linear layers, but
not embeddings, output heads, norms, MoE routers and gates, or vision and audio towers
(kept in bfloat16, as FP8 checkpoints do). The block is ``--fp8-block-size``, else the
inputs', else 128×128."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from .._torch import torch
from .. import arch
from ..checkpoint.quantized import BlockFP8 as BlockFP8Input
from ..encodings import FP8, BlockFP8
from ..errors import MergeError
from ..options import parse_block_size
from .draft import Draft
from .types import OutputTensor

DEFAULT_BLOCK = (128, 128)

_NOT_LINEAR = re.compile(r"(^|\.)([^.]*(embed|norm|router)[^.]*|[^.]*gate|"
                         r"(vision|visual|audio)[^.]*)\.")
"""Path components of 2-D weights that are not linear layers worth quantizing: embeddings,
norms, routers and gates of MoE (``mlp.gate``, ``shared_expert_gate``; not ``gate_proj``),
vision and audio towers."""


def plan_encodings(d: Draft, donor: int) -> None:
    """Give the outputs their stored encodings, and ``d.quantization_config`` for
    config.json (None: the output is not quantized)."""
    if d.recipe.out_dtype != FP8:
        if d.options.fp8_block_size is not None:
            d.warnings.append("--fp8-block-size has no effect: the recipe's out_dtype is not "
                              "float8_e4m3fn")
        return
    if d.recipe.output == "adapter":
        raise MergeError(f"{d.recipe.at('out_dtype')}: float8_e4m3fn is a format of merged "
                         "models; 'output: adapter' writes a LoRA adapter")
    quantized_inputs = any(info.quant is not None and info.format != "stage"
                           for s in d.sources for info in s.index.tensors.values())
    block = _block_size(d, donor)
    encoding = BlockFP8(block)
    for k, t in enumerate(d.outputs):
        if t.dtype != FP8:  # buffers copied as they are
            continue
        if _quantized(d, t, quantized_inputs):
            d.outputs[k] = dataclasses.replace(t, dtype=encoding.value_dtype, encoding=encoding,
                                               parts=encoding.parts(t.name, t.shape))
        else:
            d.outputs[k] = dataclasses.replace(t, dtype=torch.bfloat16)
    d.quantization_config = _quantization_config(d.outputs, block)
    count = sum(t.encoding is not None for t in d.outputs)
    d.notes.append(f"output: {encoding.describe()}, {count} tensors quantized (each with a "
                   "float32 _scale_inv), the others in bfloat16")


def _block_size(d: Draft, donor: int) -> tuple[int, int]:
    """The option's, else the block-FP8 inputs' (the donor's first), else 128×128."""
    if d.options.fp8_block_size is not None:
        return parse_block_size(d.options.fp8_block_size)
    order = sorted(range(len(d.sources)), key=lambda m: m != donor)
    blocks = list(dict.fromkeys(
        info.quant.block for m in order for info in d.sources[m].index.tensors.values()
        if isinstance(info.quant, BlockFP8Input)))
    if len(blocks) > 1:
        d.notes.append(f"the FP8 inputs have blocks {', '.join(map(str, blocks))}; the output "
                       f"uses {blocks[0]} (--fp8-block-size sets another)")
    return blocks[0] if blocks else DEFAULT_BLOCK


def _quantized(d: Draft, t: OutputTensor, quantized_inputs: bool) -> bool:
    if len(t.shape) != 2 or t.reindex:
        return False
    if quantized_inputs:
        return any(d.sources[i.model].index.tensors[i.name].quant is not None
                   and d.sources[i.model].index.tensors[i.name].format != "stage"
                   for i in t.inputs)
    return (t.name.endswith(".weight") and not arch.is_vocab_tensor(t.name)
            and not _NOT_LINEAR.search(t.name))


def _quantization_config(outputs: list[OutputTensor], block: tuple[int, int]
                         ) -> dict[str, Any]:
    """What transformers' FineGrainedFP8 reads. Its default skip list (the LM head) is
    replaced by an explicit one: the modules of every matrix left unquantized."""
    kept = {t.name.rsplit(".", 1)[0] for t in outputs
            if t.encoding is None and len(t.shape) >= 2 and t.dtype.is_floating_point}
    return {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
            "weight_block_size": list(block),
            "modules_to_not_convert": sorted(kept | {"lm_head"})}
