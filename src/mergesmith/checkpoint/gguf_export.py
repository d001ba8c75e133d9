"""Writing a merged model as one GGUF file, streaming: the layout first, then rows at offsets.

The engine produces each output tensor row chunk by row chunk and never holds a whole model, so
the GGUF file is laid out before any tensor data exists: :func:`gguf_tensor_plan` names every
tensor, its ggml type and its byte size; :class:`GGUFFileWriter` has ``gguf.GGUFWriter`` write
the header, the metadata and the tensor infos (the library's own serialisation), learns where
the data starts, and then places each chunk with ``pwrite`` at its offset, in any order.

What is written follows llama.cpp's ``convert_hf_to_gguf.py`` (so llama.cpp and transformers
read the file back as they read its output):

* names through ``gguf.get_tensor_name_map`` of the architecture the config's ``model_type``
  names; a tied ``lm_head`` and ``rotary_emb.inv_freq`` buffers are not written;
* Llama/Mistral Q and K projections get llama.cpp's row permutation (per head, so chunks must
  hold whole heads: ``row_alignment``); Gemma, Gemma2 and Gemma3 norm weights are stored as
  ``w + 1``; Qwen2 and Qwen3 tensors are written as they are;
* 1-D tensors and norm weights stay F32; a 2-D tensor whose last dim is not a multiple of the
  quantization block falls back to F16 (llama.cpp does the same);
* Llama's ``rope_type: llama3`` scaling becomes the ``rope_freqs.weight`` tensor llama.cpp
  generates (its values come from the config, not from a checkpoint).

Metadata (the KV section) comes either from a GGUF base model (:func:`metadata_from_gguf`:
every field but the ones describing the file itself) or from a Hugging Face model folder
(:func:`metadata_from_hf`: hyperparameters plus a byte-level BPE (``gpt2``) or a
sentencepiece-style byte-fallback BPE (``llama``) tokenizer from ``tokenizer.json``).
"""

from __future__ import annotations

import json
import math
import os
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import MergeError

try:  # gguf is an optional dependency: only GGUF output needs it
    import gguf
except ImportError:  # pragma: no cover - exercised where gguf is not installed
    gguf = None


def _require_gguf() -> Any:
    """The ``gguf`` module, or a MergeError saying how to get it."""
    if gguf is None:
        raise MergeError("writing GGUF needs the 'gguf' package: pip install 'mergesmith[gguf]'")
    return gguf


# HF model_type -> (gguf MODEL_ARCH member name, transform family)
_ARCHS: dict[str, tuple[str, str]] = {
    "llama": ("LLAMA", "llama"),
    "mistral": ("LLAMA", "llama"),  # llama.cpp writes Mistral as the llama architecture
    "qwen2": ("QWEN2", "plain"),
    "qwen3": ("QWEN3", "plain"),
    "gemma": ("GEMMA", "gemma"),
    "gemma2": ("GEMMA2", "gemma"),
    "gemma3_text": ("GEMMA3", "gemma"),
}
SUPPORTED_MODEL_TYPES = tuple(sorted(_ARCHS))

# output type name -> (ggml type name, llama.cpp file type name)
OUTPUT_TYPES: dict[str, tuple[str, str]] = {
    "f32": ("F32", "ALL_F32"),
    "f16": ("F16", "MOSTLY_F16"),
    "bf16": ("BF16", "MOSTLY_BF16"),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0"),
    "q4_0": ("Q4_0", "MOSTLY_Q4_0"),
    "q4_1": ("Q4_1", "MOSTLY_Q4_1"),
    "q5_0": ("Q5_0", "MOSTLY_Q5_0"),
    "q5_1": ("Q5_1", "MOSTLY_Q5_1"),
}

# keys describing a file, not the model: never copied from a base GGUF
_FILE_KEYS = ("general.file_type", "general.quantization_version", "general.alignment")
_SKIPPED_HF_SUFFIXES = ("rotary_emb.inv_freq",)


def _model_type(hf_config: Mapping[str, Any]) -> str:
    """The config's model_type, checked against the families this writer supports."""
    model_type = str(hf_config.get("model_type", ""))
    if model_type not in _ARCHS:
        archs = hf_config.get("architectures") or []
        raise MergeError(
            f"GGUF output does not support model_type {model_type!r} "
            f"(architectures {list(archs)}); supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    return model_type


def gguf_arch(hf_config: Mapping[str, Any]) -> str:
    """The GGUF ``general.architecture`` name for this HF config (raises if unsupported)."""
    g = _require_gguf()
    return g.MODEL_ARCH_NAMES[getattr(g.MODEL_ARCH, _ARCHS[_model_type(hf_config)][0])]


# ---------------------------------------------------------------------------- tensor encodings


@dataclass(frozen=True)
class GGUFEncoding:
    """How one tensor is stored: ggml type, logical shape, byte sizes, and the row encoder."""

    type_name: str  # ggml type, e.g. "Q8_0"
    shape: tuple[int, ...]  # logical shape, rows first (numpy order)
    n_rows: int
    row_bytes: int

    @property
    def nbytes(self) -> int:
        return self.n_rows * self.row_bytes

    @property
    def qtype(self) -> Any:
        return _require_gguf().GGMLQuantizationType[self.type_name]

    @property
    def byte_shape(self) -> tuple[int, ...]:
        """The stored shape in bytes, as ``gguf.quant_shape_to_byte_shape`` gives it."""
        return tuple(_require_gguf().quant_shape_to_byte_shape(self.shape, self.qtype))

    def encode(self, rows: torch.Tensor) -> bytes:
        """Encode float rows (``(k, last_dim)``, or the whole 1-D tensor) into stored bytes."""
        return self.encode_array(rows).tobytes()

    def encode_array(self, rows: torch.Tensor) -> np.ndarray:
        """The stored bytes of float rows as a contiguous uint8 array (no copy to ``bytes``)."""
        g = _require_gguf()
        data = rows.detach().to(torch.float32).cpu().contiguous().numpy()
        out = np.ascontiguousarray(g.quants.quantize(data, self.qtype))
        if out.nbytes != (data.size // self.shape[-1]) * self.row_bytes:
            raise ValueError(f"encoded {out.nbytes} bytes for {data.shape} as {self.type_name}")
        return out.reshape(-1).view(np.uint8)


def tensor_encoding(gguf_name: str, shape: tuple[int, ...], out_type: str) -> GGUFEncoding:
    """The ggml type and sizes of one tensor for an output type, with llama.cpp's exceptions.

    1-D tensors and ``*_norm.weight`` stay F32 (llama.cpp's kernels expect that); a quantized
    type whose block does not divide the last dim falls back to F16, as llama.cpp does.
    """
    g = _require_gguf()
    if out_type not in OUTPUT_TYPES:
        raise MergeError(f"unknown GGUF output type {out_type!r}; "
                         f"choose one of: {', '.join(OUTPUT_TYPES)}")
    type_name = OUTPUT_TYPES[out_type][0]
    if len(shape) <= 1 or gguf_name.endswith("_norm.weight"):
        type_name = "F32"
    block, type_size = g.GGML_QUANT_SIZES[g.GGMLQuantizationType[type_name]]
    if shape[-1] % block:
        type_name = "F16"
        block, type_size = g.GGML_QUANT_SIZES[g.GGMLQuantizationType.F16]
    n_rows = math.prod(shape[:-1]) if len(shape) > 1 else 1
    return GGUFEncoding(type_name, tuple(shape), n_rows, shape[-1] // block * type_size)


# ---------------------------------------------------------------------------- tensor plan


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of the output file: where it comes from, its GGUF name, transform and type.

    ``transform`` is applied to HF rows before encoding: ``"permute_heads"`` (llama.cpp's Q/K
    row order within each head of ``head_rows`` rows), ``"add_one"`` (Gemma norms) or
    ``"none"``. A chunk handed to the writer must start at a multiple of ``row_alignment`` and
    end at one or at the last row; a 1-D tensor is one row, written whole. ``constant`` holds
    the values of a tensor llama.cpp generates from the config (``hf_name`` is then None).
    """

    hf_name: str | None
    name: str
    encoding: GGUFEncoding
    transform: str = "none"
    head_rows: int = 0
    constant: tuple[float, ...] | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return self.encoding.shape

    @property
    def n_rows(self) -> int:
        return self.encoding.n_rows

    @property
    def row_alignment(self) -> int:
        """Chunks of a permuted 2-D tensor hold whole heads; other rows are independent."""
        return self.head_rows if self.head_rows and len(self.shape) > 1 else 1

    def apply(self, rows: torch.Tensor) -> torch.Tensor:
        """The transform on a chunk of whole heads (rows) of the HF tensor, in float32."""
        rows = rows.to(torch.float32)
        if self.transform == "permute_heads":
            k, cols = rows.shape[0] // self.head_rows, rows.shape[1:]
            half = self.head_rows // 2
            return rows.reshape(k, 2, half, *cols).swapaxes(1, 2).reshape(rows.shape)
        if self.transform == "add_one":
            return rows + 1.0
        return rows


@dataclass(frozen=True)
class GGUFRows:
    """One GGUF tensor as an output encoding of the engine (``mergesmith.encodings``): the
    engine computes float32 rows, this transforms and encodes them into the tensor's stored
    bytes (one part, placed by the plan's GGUF layout)."""

    tensor: GGUFTensor
    value_dtype = torch.float32

    @property
    def row_align(self) -> int:
        shape = self.tensor.shape
        return self.tensor.row_alignment if len(shape) > 1 else max(1, shape[0])

    def parts(self, name: str, shape: tuple[int, ...]) -> tuple[Any, ...]:
        from ..encodings import Stored

        return (Stored(self.tensor.name, torch.uint8, self.tensor.encoding.byte_shape),)

    def encode(self, rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
        data = self.tensor.encoding.encode_array(self.tensor.apply(rows))
        return (torch.from_numpy(data),)

    def describe(self) -> str:
        return f"GGUF {self.tensor.encoding.type_name}"

    @property
    def encode_seconds(self) -> float:
        """The gguf package's numpy quantizers: about 200 M elements/s per core for block
        types, twice that for floats (plus the transform)."""
        return 1.2 if self.tensor.encoding.type_name in ("F32", "F16", "BF16") else 3.0


@dataclass
class GGUFPlan:
    """The output file's tensors in file order, and the architecture they are written for."""

    arch: str
    out_type: str
    tensors: list[GGUFTensor]
    by_hf_name: dict[str, GGUFTensor] = field(init=False)

    def __post_init__(self) -> None:
        self.by_hf_name = {t.hf_name: t for t in self.tensors if t.hf_name is not None}


def _head_counts(hf_config: Mapping[str, Any]) -> tuple[int, int]:
    n_head = int(hf_config["num_attention_heads"])
    return n_head, int(hf_config.get("num_key_value_heads") or n_head)


def _rope_parameters(hf_config: Mapping[str, Any]) -> dict[str, Any]:
    """Rope settings from either the older (``rope_theta`` + ``rope_scaling``) or the newer
    (``rope_parameters``) config spelling; for per-layer-type dicts, the full-attention one."""
    params = dict(hf_config.get("rope_scaling") or {})
    newer = hf_config.get("rope_parameters") or {}
    if "full_attention" in newer:
        newer = newer["full_attention"]
    params.update(newer)
    if "rope_theta" in hf_config:
        params.setdefault("rope_theta", hf_config["rope_theta"])
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params["type"]
    return params


def _llama3_rope_factors(hf_config: Mapping[str, Any]) -> tuple[float, ...] | None:
    """llama.cpp's ``rope_freqs`` values for ``rope_type: llama3`` (None for other ropes)."""
    rope = _rope_parameters(hf_config)
    if str(rope.get("rope_type", "")).lower() != "llama3":
        return None
    n_head, _ = _head_counts(hf_config)
    dim = int(hf_config.get("head_dim") or hf_config["hidden_size"] // n_head)
    base = float(rope.get("rope_theta", 10000.0))
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = float(rope.get("factor", 8.0))
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    old_ctx = float(rope.get("original_max_position_embeddings", 8192))
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old_ctx / high:
            factors.append(1.0)
        elif wavelen > old_ctx / low:
            factors.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            factors.append(1.0 / ((1 - smooth) / factor + smooth))
    return tuple(factors)


def gguf_tensor_plan(hf_names_shapes: Mapping[str, Iterable[int]] | Iterable[tuple[str, Any]],
                     hf_config: Mapping[str, Any], out_type: str = "f16") -> GGUFPlan:
    """Map every HF tensor to its GGUF name, transform and encoding, in file order.

    Raises MergeError for an unsupported architecture or a tensor the architecture's GGUF name
    map does not know (so nothing is silently dropped).
    """
    g = _require_gguf()
    model_type = _model_type(hf_config)
    arch_member, family = _ARCHS[model_type]
    arch = getattr(g.MODEL_ARCH, arch_member)
    n_blocks = int(hf_config["num_hidden_layers"])
    name_map = g.get_tensor_name_map(arch, n_blocks)
    items = hf_names_shapes.items() if isinstance(hf_names_shapes, Mapping) else hf_names_shapes
    tied = bool(hf_config.get("tie_word_embeddings", family == "gemma"))
    n_head, n_head_kv = _head_counts(hf_config)

    tensors: list[GGUFTensor] = []
    unknown: list[str] = []
    for hf_name, shape in items:
        shape = tuple(int(d) for d in shape)
        if hf_name.endswith(_SKIPPED_HF_SUFFIXES) or (tied and hf_name == "lm_head.weight"):
            continue
        name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            unknown.append(hf_name)
            continue
        transform, head_rows = "none", 0
        if family == "llama" and name.split(".")[-2] in ("attn_q", "attn_k"):
            # weights and biases alike, as llama.cpp permutes both
            heads = n_head if name.split(".")[-2] == "attn_q" else n_head_kv
            transform, head_rows = "permute_heads", shape[0] // heads
            if shape[0] % heads or head_rows % 2:
                raise MergeError(f"{hf_name}: {shape[0]} rows do not split into {heads} heads "
                                 "of an even size, as the GGUF Q/K permutation needs")
        elif family == "gemma" and name.endswith("norm.weight"):
            transform = "add_one"
        tensors.append(GGUFTensor(hf_name, name, tensor_encoding(name, shape, out_type),
                                  transform, head_rows))
    if unknown:
        raise MergeError(f"GGUF output ({g.MODEL_ARCH_NAMES[arch]}) has no name for "
                         f"{len(unknown)} tensor(s): {', '.join(unknown[:5])}")
    if family == "llama" and (factors := _llama3_rope_factors(hf_config)) is not None:
        name = g.TENSOR_NAMES[g.MODEL_TENSOR.ROPE_FREQS] + ".weight"
        enc = tensor_encoding(name, (len(factors),), out_type)
        tensors.append(GGUFTensor(None, name, enc, constant=factors))
    return GGUFPlan(g.MODEL_ARCH_NAMES[arch], out_type, tensors)


# ---------------------------------------------------------------------------- metadata
#
# Metadata is a ``dict[str, gguf.gguf_writer.GGUFValue]``: the key/value records exactly as
# ``gguf.GGUFWriter`` keeps and serialises them, so both sources below and the writer share it.


def metadata_from_gguf(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Every KV field of a GGUF file except those describing the file itself.

    ``GGUF.*`` (counts), ``split.*``, ``general.file_type``, ``general.quantization_version``
    and ``general.alignment`` are left out: the writer sets them for the new file. Strings are
    kept as raw bytes, so a vocabulary that is not valid UTF-8 is copied unchanged.
    """
    g = _require_gguf()
    from gguf.gguf_writer import GGUFValue

    reader = g.GGUFReader(str(path))
    vt = g.GGUFValueType
    out: dict[str, Any] = {}
    for key, fld in reader.fields.items():
        if key.startswith(("GGUF.", "split.")) or key in _FILE_KEYS:
            continue
        main = fld.types[0]
        if main == vt.ARRAY:
            if len(fld.types) != 2:
                raise MergeError(f"{path}: metadata field {key!r} is a nested array, "
                                 "which GGUF output cannot copy")
            sub = fld.types[1]
            if sub == vt.STRING:
                value: Any = [bytes(fld.parts[i]) for i in fld.data]
            else:
                value = [v for i in fld.data for v in fld.parts[i].tolist()]
            out[key] = GGUFValue(value, main, sub)
        elif main == vt.STRING:
            out[key] = GGUFValue(bytes(fld.parts[fld.data[0]]), main)
        else:
            out[key] = GGUFValue(fld.parts[fld.data[0]].tolist()[0], main)
    return out


# tokenizer.json Split regexes -> llama.cpp's tokenizer.ggml.pre name for them
_SPLIT_PRE_NAMES = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+"
    r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
    r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "qwen2",
}


def _bpe_pre_name(tokenizer_json: Mapping[str, Any]) -> str:
    """llama.cpp's name for a byte-level tokenizer's pre-tokenizer (its split regex).

    llama.cpp recognises a pre-tokenizer by hashing its output; here the few shapes whose
    llama.cpp name is known are recognised from tokenizer.json. Others need ``tokenizer_pre``.
    """
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if (kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits")
            and steps[1].get("use_regex", True)):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        regex = (steps[0].get("pattern") or {}).get("Regex")
        if regex in _SPLIT_PRE_NAMES:
            return _SPLIT_PRE_NAMES[regex]
    raise MergeError(
        f"GGUF output does not recognise this tokenizer's pre-tokenizer ({kinds}); known: "
        "GPT-2 byte-level, SmolLM, Llama-3 and Qwen2 splits. Pass tokenizer_pre= with "
        "llama.cpp's name for it")


def _space_prefix(tokenizer_json: Mapping[str, Any]) -> bool:
    """Whether a sentencepiece-style tokenizer prepends '▁' to the text (add_space_prefix)."""
    def walk(node: Any) -> Iterable[Mapping[str, Any]]:
        if isinstance(node, Mapping):
            yield node
            for key in ("normalizers", "pretokenizers"):
                for child in node.get(key) or []:
                    yield from walk(child)
    for node in walk(tokenizer_json.get("normalizer")):
        if node.get("type") == "Prepend" and node.get("prepend") == "\u2581":
            return True
    for node in walk(tokenizer_json.get("pre_tokenizer")):
        if node.get("type") == "Metaspace":
            return node.get("prepend_scheme", "always") != "never"
    return False


def _add_tokenizer(w: Any, folder: Path, vocab_size: int, tokenizer_pre: str | None) -> None:
    """Vocabulary, token types, merges or scores, special ids and chat template of a folder.

    Byte-level BPE (``model.type == "BPE"`` without byte fallback) becomes llama.cpp's
    ``gpt2`` tokenizer with merges; BPE with byte fallback (Llama-2, Mistral, Gemma style)
    becomes its sentencepiece ``llama`` tokenizer, scored by merge rank. Tokens missing from
    a vocabulary shorter than the embedding matrix are ``[PAD{i}]`` (UNUSED), as llama.cpp does.
    """
    g = _require_gguf()
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise MergeError(f"{folder}: GGUF output needs the tokenizer as tokenizer.json "
                         "(a fast tokenizer); none was found")
    tj = json.loads(path.read_text(encoding="utf-8"))
    model = tj.get("model") or {}
    if model.get("type") != "BPE":
        raise MergeError(f"{path}: GGUF output supports BPE tokenizers (byte-level or byte "
                         f"fallback), not {model.get('type')!r}")
    added = {int(a["id"]): a for a in tj.get("added_tokens") or []}
    reverse = {int(i): t for t, i in model["vocab"].items()}
    reverse.update({i: a["content"] for i, a in added.items()})
    vocab_size = max(vocab_size, len(reverse))
    spm = bool(model.get("byte_fallback"))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    rank: dict[str, int] = {}
    for r, m in enumerate(merges):
        rank.setdefault(m.replace(" ", ""), r)

    tt = g.TokenType
    tokens: list[str] = []
    types: list[int] = []
    scores: list[float] = []
    for i in range(vocab_size):
        tok = reverse.get(i)
        if tok is None:
            tokens.append(f"[PAD{i}]")
            types.append(tt.UNUSED)
        elif spm and len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">"):
            tokens.append(tok)
            types.append(tt.BYTE)
        elif spm and tok == model.get("unk_token"):
            tokens.append(tok)
            types.append(tt.UNKNOWN)
        elif i in added:
            tokens.append(tok)
            types.append(tt.CONTROL if added[i].get("special") else tt.USER_DEFINED)
        else:
            tokens.append(tok)
            types.append(tt.NORMAL)
        scores.append(-float(rank[tok]) if tok in rank else 0.0)

    if spm:
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_add_space_prefix(_space_prefix(tj))
    else:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(tokenizer_pre or _bpe_pre_name(tj))
        w.add_token_list(tokens)
        w.add_token_types(types)
    special = g.SpecialVocab(folder, load_merges=not spm, n_vocab=vocab_size)
    special.add_to_gguf(w, quiet=True)


def metadata_from_hf(folder: str | os.PathLike[str], hf_config: Mapping[str, Any] | None = None,
                     name: str | None = None, tokenizer_pre: str | None = None) -> dict[str, Any]:
    """GGUF metadata for a Hugging Face model folder (config.json and tokenizer files).

    Writes what llama.cpp's converter writes for Llama/Mistral, Qwen2/Qwen3 and Gemma 1/2/3:
    the hyperparameters transformers and llama.cpp read back, the tokenizer, ``general.name``.
    Not carried: Mistral's sliding window and Qwen's ``use_sliding_window`` (llama.cpp ignores
    them for these architectures) and rope scalings other than linear, YaRN and llama3.
    """
    g = _require_gguf()
    folder = Path(folder)
    if hf_config is None:
        hf_config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    c = hf_config
    model_type = _model_type(c)
    family = _ARCHS[model_type][1]
    w = g.GGUFWriter(None, gguf_arch(c))
    w.add_name(name or folder.name)
    n_head, n_head_kv = _head_counts(c)
    w.add_context_length(int(c["max_position_embeddings"]))
    w.add_embedding_length(int(c["hidden_size"]))
    w.add_block_count(int(c["num_hidden_layers"]))
    w.add_feed_forward_length(int(c["intermediate_size"]))
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_layer_norm_rms_eps(float(c.get("rms_norm_eps", 1e-6)))
    rope = _rope_parameters(c)
    if "rope_theta" in rope:
        w.add_rope_freq_base(float(rope["rope_theta"]))
    if c.get("head_dim") is not None:
        w.add_key_length(int(c["head_dim"]))
        w.add_value_length(int(c["head_dim"]))
    rope_type = str(rope.get("rope_type", "default")).lower()
    if rope_type == "linear":
        w.add_rope_scaling_type(g.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
    elif rope_type == "yarn":
        w.add_rope_scaling_type(g.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(rope["factor"]))
        if "original_max_position_embeddings" in rope:
            w.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
    elif rope_type not in ("default", "llama3"):
        raise MergeError(f"GGUF output does not support rope scaling {rope_type!r}")
    if family == "llama":
        w.add_vocab_size(int(c["vocab_size"]))
        w.add_rope_dimension_count(int(c.get("head_dim") or c["hidden_size"] // n_head))
    if model_type == "gemma2":
        w.add_attn_logit_softcapping(float(c.get("attn_logit_softcapping") or 50.0))
        w.add_final_logit_softcapping(float(c.get("final_logit_softcapping") or 30.0))
    if model_type in ("gemma2", "gemma3_text") and c.get("sliding_window"):
        w.add_sliding_window(int(c["sliding_window"]))
    _add_tokenizer(w, folder, int(c["vocab_size"]), tokenizer_pre)
    return dict(w.kv_data[0])


# ---------------------------------------------------------------------------- the file writer


def file_prefix(plan: GGUFPlan, metadata: Mapping[str, Any]
                ) -> tuple[bytes, dict[str, int], int]:
    """The start of the file, made by ``gguf.GGUFWriter`` (the library's serialisation):
    header, metadata and tensor infos, padded to the data; and every tensor's absolute
    offset (GGUF name → byte) and the file's size. Decided from names, shapes and types
    alone."""
    import tempfile

    g = _require_gguf()
    w = g.GGUFWriter(None, plan.arch)
    given = metadata.get(g.Keys.General.ARCHITECTURE)
    if given is not None and _as_str(given.value) != plan.arch:
        raise MergeError(f"metadata is for architecture {_as_str(given.value)!r}, "
                         f"the tensors for {plan.arch!r}")
    for key, value in metadata.items():
        if key not in _FILE_KEYS and not key.startswith(("GGUF.", "split.")):
            w.kv_data[0][key] = value
    w.add_file_type(int(g.LlamaFileType[OUTPUT_TYPES[plan.out_type][1]]))
    w.add_quantization_version(g.GGML_QUANT_VERSION)
    for t in plan.tensors:
        enc = t.encoding
        w.add_tensor_info(t.name, enc.shape, np.dtype(np.float32), enc.nbytes,
                          raw_dtype=enc.qtype)
    align = w.data_alignment
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "header.gguf")
        w.write_header_to_file(path)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        w.close()
        header = path.read_bytes()
    data_start = g.GGUFWriter.ggml_pad(len(header), align)
    offsets: dict[str, int] = {}
    offset = data_start
    for t in plan.tensors:
        offsets[t.name] = offset
        offset += g.GGUFWriter.ggml_pad(t.encoding.nbytes, align)
    return header + bytes(data_start - len(header)), offsets, offset


def constant_bytes(t: GGUFTensor) -> bytes:
    """The stored bytes of a tensor llama.cpp generates from the config (``rope_freqs``)."""
    assert t.constant is not None
    return t.encoding.encode(t.apply(torch.tensor(t.constant, dtype=torch.float32)))


class GGUFFileWriter:
    """One GGUF file laid out up front and filled by row chunks, in any order, from any thread.

    The constructor has ``gguf.GGUFWriter`` write header, metadata and tensor infos to
    ``tmp_path`` (default: ``path`` + ``.partial``), then sizes the file to its final length.
    :meth:`write_rows` transforms, encodes and ``pwrite``s a chunk at its offset;
    :meth:`finish` checks every row was written exactly once, syncs, and (with ``publish``)
    renames the file onto ``path`` atomically. :meth:`abort` removes the partial file.
    """

    def __init__(self, path: str | os.PathLike[str], plan: GGUFPlan,
                 metadata: Mapping[str, Any], tmp_path: str | os.PathLike[str] | None = None):
        _require_gguf()
        self.path = Path(path)
        self.tmp_path = Path(tmp_path) if tmp_path is not None else Path(f"{self.path}.partial")
        self.plan = plan
        self._by_name = {t.name: t for t in plan.tensors}
        self._done: dict[str, list[tuple[int, int]]] = {t.name: [] for t in plan.tensors}
        self._lock = threading.Lock()
        self._fd: int | None = None

        prefix, self.offsets, self.size = file_prefix(plan, metadata)
        self.data_start = 0  # offsets are absolute
        try:
            with open(self.tmp_path, "wb") as f:
                f.write(prefix)
            self._fd = os.open(self.tmp_path, os.O_RDWR)
            os.ftruncate(self._fd, self.size)  # padding and unwritten rows read as zeros
        except OSError as err:
            self.abort()
            raise MergeError(f"cannot write {self.tmp_path}: {err.strerror or err}") from err
        for t in plan.tensors:
            if t.constant is not None:
                self.write_rows(t.name, 0, torch.tensor(t.constant, dtype=torch.float32))

    def tensor(self, name: str) -> GGUFTensor:
        """A planned tensor by GGUF name or by HF name."""
        t = self._by_name.get(name) or self.plan.by_hf_name.get(name)
        if t is None:
            raise KeyError(f"{name!r} is not a tensor of this GGUF file")
        return t

    def write_rows(self, name: str, row_start: int, rows: torch.Tensor) -> None:
        """Transform and encode HF rows ``[row_start, row_start + len(rows))`` of a tensor
        (GGUF or HF name) and write them at their offset. A 1-D tensor is written whole."""
        t = self.tensor(name)
        n = rows.shape[0] if len(t.shape) > 1 else 1
        if len(t.shape) > 1 and tuple(rows.shape[1:]) != t.shape[1:]:
            raise ValueError(f"{t.name}: rows of shape {tuple(rows.shape)}, tensor {t.shape}")
        if len(t.shape) == 1 and (row_start or tuple(rows.shape) != t.shape):
            raise ValueError(f"{t.name}: a 1-D tensor is written whole ({t.shape})")
        end = row_start + n
        a = t.row_alignment
        if row_start < 0 or end > t.n_rows or row_start % a or (end % a and end != t.n_rows):
            raise ValueError(f"{t.name}: rows [{row_start}, {end}) are outside [0, {t.n_rows}) "
                             f"or not aligned to {a} rows")
        data = t.encoding.encode(t.apply(rows))
        self.write_encoded(t.name, row_start, data)

    def write_encoded(self, name: str, row_start: int, data: bytes) -> None:
        """Write already-transformed, already-encoded whole rows of a tensor at their offset."""
        t = self.tensor(name)
        row_bytes = t.encoding.row_bytes
        if len(data) % row_bytes:
            raise ValueError(f"{t.name}: {len(data)} bytes are not whole rows of {row_bytes}")
        end = row_start + len(data) // row_bytes
        if row_start < 0 or end > t.n_rows:
            raise ValueError(f"{t.name}: rows [{row_start}, {end}) outside [0, {t.n_rows})")
        if self._fd is None:
            raise ValueError(f"{self.tmp_path} is closed")
        pos = self.data_start + self.offsets[t.name] + row_start * row_bytes
        view = memoryview(data)
        try:
            while view:
                written = os.pwrite(self._fd, view, pos)
                view, pos = view[written:], pos + written
        except OSError as err:
            raise MergeError(f"cannot write {self.tmp_path}: {err.strerror or err}") from err
        with self._lock:
            self._done[t.name].append((row_start, end))

    def missing(self) -> list[str]:
        """Tensors whose rows were not all written exactly once (empty when complete)."""
        bad = []
        with self._lock:
            for t in self.plan.tensors:
                pos = 0
                for start, end in sorted(self._done[t.name]):
                    if start != pos:
                        break
                    pos = end
                if pos != t.n_rows or len(set(self._done[t.name])) != len(self._done[t.name]):
                    bad.append(t.name)
        return bad

    def finish(self, publish: bool = True) -> Path:
        """Check completeness, sync and close; rename onto ``path`` when ``publish``.

        Returns where the complete file now is (``path``, or ``tmp_path`` for the engine's own
        publish step).
        """
        if missing := self.missing():
            raise ValueError(f"{self.tmp_path}: {len(missing)} tensor(s) incomplete or written "
                             f"twice: {', '.join(missing[:5])}")
        assert self._fd is not None
        try:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None
            if not publish:
                return self.tmp_path
            os.replace(self.tmp_path, self.path)
        except OSError as err:
            raise MergeError(f"cannot finish {self.path}: {err.strerror or err}") from err
        return self.path

    def abort(self) -> None:
        """Close and delete the partial file (safe to call more than once)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self.tmp_path.unlink(missing_ok=True)

    def __enter__(self) -> GGUFFileWriter:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is not None or self._fd is not None:
            self.abort()


def _as_str(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)
