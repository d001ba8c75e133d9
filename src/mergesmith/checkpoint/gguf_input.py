"""GGUF files (llama.cpp's format) as input models.

A reference may name a ``.gguf`` file, a split set by its first part
(``name-00001-of-0000N.gguf``), or a folder holding one of either. Its tensors are indexed
under the names ``transformers`` gives them when it loads the file (``gguf_file=``), read
rows at a time and dequantized with the ``gguf`` package, and undo what llama.cpp's
converter did to them exactly as transformers does (the Q/K row permutation of Llama-family
attention; Gemma 2/3 norms stored as ``w + 1``). The engine only sees float tensors.

Side files — config.json, tokenizer, chat template, generation config — are rebuilt from the
GGUF metadata by transformers once per file and kept in a cache folder (keyed by the files'
path, size and modification time, and the library versions): ``ModelSource.folder`` is that
folder, while the tensors point into the ``.gguf``. Everything that can be wrong with an
input (not a GGUF, a missing split part, an architecture or a tensor type that cannot be
read) is found from the headers, before any weight data is read.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any

from .._torch import torch
from ..errors import MergeError
from .index import CheckpointIndex, TensorInfo, read_config

CACHE_ENV = "MERGESMITH_GGUF_CACHE"
CACHE_FORMAT = 2  # bump when what the cache folder holds changes
MAP_FILE = ".mergesmith_gguf.json"  # a dot file: never copied to a merge's output
HEADER_FILE = ".mergesmith_gguf_header.json"  # the tensor table, so later runs skip parsing

# GGUF architectures whose tensors are checked equal to transformers' own GGUF load, and
# the transform llama.cpp's converter applied (undone on read). Others are refused: a
# wrong guess would merge silently wrong weights.
ARCHITECTURES = {"llama": "unpermute-qk", "qwen2": None, "qwen3": None,
                 "gemma2": "norm-minus-one", "gemma3": "norm-minus-one"}

# The transformers tensor processor each transform stands for.
_PROCESSORS = {"unpermute-qk": "LlamaTensorProcessor", "norm-minus-one": "Gemma2TensorProcessor",
               None: "TensorProcessor"}
_SPLIT = re.compile(r"^(?P<stem>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
_FLOAT_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def import_gguf() -> Any:
    """The ``gguf`` package, imported only when a GGUF is referenced."""
    try:
        import gguf
        import gguf.quants  # noqa: F401
    except ImportError:
        raise MergeError("reading GGUF models needs the gguf package: "
                         "pip install 'mergesmith[gguf]'") from None
    return gguf


@dataclass(frozen=True)
class GGUFTensor:
    """How one tensor is stored in a GGUF file. ``raw`` is the stored data as a tensor the
    safetensors reader can read rows of (blocks of a row never cross rows)."""

    raw: TensorInfo
    ggml_type: str  # e.g. "Q4_K", "F16"
    gguf_name: str
    transform: str | None = None  # "unpermute-qk" or "norm-minus-one"
    head_rows: int = 0  # rows per attention head ("unpermute-qk")
    format = "gguf"
    decode_seconds = 2.0
    """Seconds per 10⁹ elements dequantized, on the reference machine (2 cores)."""

    @property
    def stored_offset(self) -> int:
        """Where its data starts in the file (inputs are read in file order)."""
        return self.raw.offset or 0


def gguf_files(path: str) -> list[str] | None:
    """The ``.gguf`` files a local reference names (a file, a split set by its first part,
    or a folder holding one model and no safetensors/.bin weights), else None."""
    if os.path.isdir(path):
        names = sorted(os.listdir(path))
        if any(n.endswith(".safetensors") or (n.startswith("pytorch_model") and n.endswith(".bin"))
               for n in names):
            return None
        found = [n for n in names if n.endswith(".gguf")]
        if not found:
            return None
        firsts = [n for n in found if not _SPLIT.match(n) or _SPLIT.match(n)["no"] == "00001"]
        if len(firsts) > 1:
            raise MergeError(f"{path} holds several GGUF models ({', '.join(firsts[:4])}); "
                             "name the .gguf file to use")
        return _split_set(os.path.join(path, firsts[0] if firsts else found[0]))
    if path.endswith(".gguf") and os.path.isfile(path):
        return _split_set(path)
    return None


def _split_set(path: str) -> list[str]:
    """All parts of a split set given by its first part (or ``[path]`` for one file)."""
    m = _SPLIT.match(os.path.basename(path))
    if m is None:
        return [path]
    folder, count = os.path.dirname(path), int(m["count"])
    if m["no"] != "00001":
        raise MergeError(f"{path} is part {int(m['no'])} of a split GGUF; name its first part "
                         f"({m['stem']}-00001-of-{m['count']}.gguf)")
    parts = [os.path.join(folder, f"{m['stem']}-{i:05d}-of-{m['count']}.gguf")
             for i in range(1, count + 1)]
    missing = [os.path.basename(p) for p in parts if not os.path.isfile(p)]
    if missing:
        raise MergeError(f"{path}: split GGUF of {count} parts is missing "
                         f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
    return parts


def _check_magic(path: str) -> None:
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise MergeError(f"cannot read {path}: {e.strerror}") from None
    if magic != b"GGUF":
        raise MergeError(f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF')")


def _field(reader: Any, key: str) -> Any:
    f = reader.fields.get(key)
    return None if f is None else f.contents()


@dataclass(frozen=True)
class StoredTensor:
    """One tensor info of a GGUF header (GGUF name, ggml type, numpy-order shape, where)."""

    file: str
    name: str
    type_name: str
    shape: tuple[int, ...]  # rows first, as transformers and torch see it
    offset: int
    nbytes: int


def index_gguf(files: list[str]) -> CheckpointIndex:
    """Index a GGUF model from its headers: HF tensor names, dequantized shapes and dtypes.

    The gguf package's reader parses every metadata string (seconds for a large vocabulary),
    so the tensor table is kept with the side files of the file's cache folder and read
    from there while the file is unchanged."""
    for path in files:
        _check_magic(path)
    gguf = import_gguf()
    folder = cache_folder(files)
    header = _cached_header(folder)
    if header is None:
        header = _parse_headers(files, gguf)
    arch, count, stored = header
    first = files[0]
    _check_architecture(gguf, arch, first)
    if count is not None and int(count) != len(files):
        raise MergeError(f"{first} says it is one of {count} split parts, but {len(files)} "
                         "file(s) were found; name the split set by its first part")
    _check_types(gguf, stored)
    side_files(files, folder, arch, stored)
    with open(os.path.join(folder, MAP_FILE), encoding="utf-8") as f:
        mapping = json.load(f)
    tensors: dict[str, TensorInfo] = {}
    for t in stored:
        name = mapping["names"].get(t.name)
        if name is None:  # transformers leaves it out too (e.g. llama.cpp's rope_freqs)
            continue
        if name in tensors:
            raise MergeError(f"{first}: tensor '{t.name}' maps to '{name}' twice")
        tensors[name] = _tensor_info(name, t, arch, mapping)
    return CheckpointIndex(folder, tensors, list(files), read_config(folder), "gguf")


def _parse_headers(files: list[str], gguf: Any
                   ) -> tuple[Any, Any, list[StoredTensor]]:
    """(architecture, split count, tensor table) with the gguf package's reader."""
    readers = []
    for path in files:
        try:
            readers.append(gguf.GGUFReader(path))
        except Exception as e:  # a damaged header surfaces as any of numpy's errors
            raise MergeError(f"cannot read the GGUF header of {path}: "
                             f"{type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
    stored = [StoredTensor(path, t.name, t.tensor_type.name,
                           tuple(int(d) for d in reversed(t.shape.tolist())),
                           int(t.data_offset), int(t.n_bytes))
              for path, r in zip(files, readers) for t in r.tensors]
    return (_field(readers[0], "general.architecture"), _field(readers[0], "split.count"),
            stored)


def _cached_header(folder: str) -> tuple[Any, Any, list[StoredTensor]] | None:
    try:
        with open(os.path.join(folder, HEADER_FILE), encoding="utf-8") as f:
            data = json.load(f)
        return (data["arch"], data["split_count"],
                [StoredTensor(p, n, k, tuple(s), o, b) for p, n, k, s, o, b in data["tensors"]])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _check_architecture(gguf: Any, arch: Any, path: str) -> None:
    if not isinstance(arch, str):
        raise MergeError(f"{path}: the GGUF has no general.architecture; it is not a model")
    if arch not in set(gguf.MODEL_ARCH_NAMES.values()):
        raise MergeError(f"{path}: GGUF architecture '{arch}' is unknown to the gguf package "
                         f"{getattr(gguf, '__version__', '')}".rstrip() + "; upgrade it "
                         "(pip install -U gguf) if the file is newer")
    if arch not in ARCHITECTURES:
        raise MergeError(f"{path}: GGUF architecture '{arch}' is not supported as an input "
                         f"(mergesmith reads {', '.join(sorted(ARCHITECTURES))}); convert it "
                         "to safetensors first")


def _check_types(gguf: Any, stored: list[StoredTensor]) -> None:
    """Every tensor type must be one the gguf package can dequantize (probed on one block)."""
    import numpy as np

    checked: dict[str, bool] = {}
    for t in stored:
        if t.type_name not in checked:
            qtype = getattr(gguf.GGMLQuantizationType, t.type_name, None)
            try:
                _, size = gguf.GGML_QUANT_SIZES[qtype]
                gguf.quants.dequantize(np.zeros((1, size), dtype=np.uint8), qtype)
                checked[t.type_name] = True
            except (NotImplementedError, ValueError, KeyError):
                checked[t.type_name] = False
        if not checked[t.type_name]:
            raise MergeError(f"{t.file}: tensor '{t.name}' is stored as {t.type_name}, which "
                             "the gguf package cannot dequantize")


def _tensor_info(name: str, t: StoredTensor, arch: str, mapping: dict) -> TensorInfo:
    shape, kind, path = t.shape, t.type_name, t.file
    float_dtype = _FLOAT_TYPES.get(kind)
    if float_dtype is not None:
        raw = TensorInfo(t.name, path, float_dtype, shape, t.offset, t.nbytes)
    elif len(shape) > 1:
        raw = TensorInfo(t.name, path, torch.uint8, (shape[0], t.nbytes // shape[0]),
                         t.offset, t.nbytes)
    else:  # a quantized vector: one row of blocks
        raw = TensorInfo(t.name, path, torch.uint8, (1, t.nbytes), t.offset, t.nbytes)
    transform, head_rows = _transform(t.name, shape, arch, mapping)
    dtype = torch.float32 if float_dtype is None or transform == "norm-minus-one" \
        else float_dtype
    quant = GGUFTensor(raw, kind, t.name, transform, head_rows)
    return TensorInfo(name, path, dtype, shape, t.offset, t.nbytes, quant)


def _transform(gguf_name: str, shape: tuple[int, ...], arch: str,
               mapping: dict) -> tuple[str | None, int]:
    """What transformers' tensor processor for ``arch`` does to this tensor (the same tests
    on the GGUF name), as a transform that works on row ranges."""
    kind = ARCHITECTURES[arch]
    if kind == "unpermute-qk" and (".attn_q." in gguf_name or ".attn_k." in gguf_name):
        heads = mapping["heads"]
        if heads is None:  # the processor leaves it as stored when a head count is missing
            return None, 0
        n = heads[0] if ".attn_q." in gguf_name else heads[1]
        if shape[0] % (2 * n):
            raise MergeError(f"'{gguf_name}' has {shape[0]} rows, not a whole number of "
                             f"{n} attention heads")
        return kind, shape[0] // n
    if kind == "norm-minus-one" and "norm.weight" in gguf_name:
        return kind, 0
    return None, 0


# Side files ---------------------------------------------------------------------------------

def cache_root() -> str:
    """``$MERGESMITH_GGUF_CACHE``, else ``$XDG_CACHE_HOME/mergesmith/gguf`` (like the
    evaluation cache)."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return os.path.expanduser(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "mergesmith", "gguf")


def cache_folder(files: list[str]) -> str:
    """The cache folder of a GGUF model: named by the files' paths, sizes and times and the
    versions of the libraries that rebuild its side files."""
    from importlib.metadata import PackageNotFoundError, version

    ident: list[Any] = [CACHE_FORMAT]
    for package in ("transformers", "gguf"):
        try:
            ident.append(version(package))
        except PackageNotFoundError:
            ident.append(None)
    for path in files:
        st = os.stat(path)
        ident.append([os.path.abspath(path), st.st_size, st.st_mtime_ns])
    key = hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:20]
    stem = os.path.basename(files[0]).removesuffix(".gguf")
    return os.path.join(cache_root(), f"{stem}-{key}")


def side_files(files: list[str], folder: str, arch: str, stored: list[StoredTensor]) -> str:
    """The folder of side files rebuilt from a GGUF's metadata (built on first use), with
    the tensor table of its headers."""
    if os.path.exists(os.path.join(folder, MAP_FILE)) and \
            os.path.exists(os.path.join(folder, HEADER_FILE)):
        return folder
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise MergeError("reading GGUF models needs transformers (for config.json and the "
                         "tokenizer): pip install 'mergesmith[gguf]'") from None
    os.makedirs(cache_root(), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".building-", dir=cache_root())
    try:
        _write_side_files(files, arch, [t.name for t in stored], tmp)
        with open(os.path.join(tmp, HEADER_FILE), "w", encoding="utf-8") as f:
            count = None if len(files) == 1 else len(files)
            json.dump({"arch": arch, "split_count": count,
                       "tensors": [[t.file, t.name, t.type_name, list(t.shape), t.offset,
                                    t.nbytes] for t in stored]}, f)
        try:
            os.rename(tmp, folder)
        except OSError:  # another process built it first
            if not os.path.exists(os.path.join(folder, MAP_FILE)):
                raise
    except MergeError:
        raise
    except Exception as e:
        raise MergeError(f"{files[0]}: transformers cannot rebuild config and tokenizer from "
                         f"the GGUF metadata ({type(e).__name__}: "
                         f"{(str(e).splitlines() or [''])[0][:200]})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _write_side_files(files: list[str], arch: str, tensor_names: list[str], out: str) -> None:
    """config.json, tokenizer, generation config and the GGUF → HF name map, all through
    transformers' own GGUF conversion (what ``from_pretrained(gguf_file=)`` uses)."""
    import transformers
    from transformers import (
        CONFIG_MAPPING,
        AutoModelForCausalLM,
        AutoTokenizer,
        GenerationConfig,
    )
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        load_gguf_checkpoint,
    )

    folder, name = os.path.split(os.path.abspath(files[0]))
    parsed = load_gguf_checkpoint(files[0], return_tensors=False)["config"]
    # What AutoConfig.from_pretrained(folder, gguf_file=name) builds, without parsing again.
    config = CONFIG_MAPPING[parsed["model_type"]].from_dict(parsed)
    # Split sets: the first part alone does not say whether output.weight exists.
    config.tie_word_embeddings = "output.weight" not in tensor_names
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    config.architectures = [type(model).__name__]
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor).__name__
    if processor != _PROCESSORS[ARCHITECTURES[arch]]:  # a transformers that loads differently
        raise MergeError(f"{files[0]}: transformers {transformers.__version__} loads '{arch}' "
                         f"GGUF tensors with {processor}, which mergesmith does not follow")
    names = _gguf_to_hf_names(model, arch, config.num_hidden_layers)
    heads = (parsed.get("num_attention_heads"), parsed.get("num_key_value_heads"))
    config.save_pretrained(out)
    AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(out)
    generation = GenerationConfig.from_model_config(config)
    generation.save_pretrained(out)
    with open(os.path.join(out, MAP_FILE), "w", encoding="utf-8") as f:
        json.dump({"gguf": [os.path.abspath(p) for p in files], "names": names,
                   "heads": None if None in heads else list(heads)}, f, indent=1)


def _gguf_to_hf_names(model: Any, arch: str, n_layers: int) -> dict[str, str]:
    """GGUF name → HF name: every parameter name of the model through the gguf package's
    name map of the file's architecture. This is transformers' ``get_gguf_hf_weights_map``
    for decoder-only models (which rebuilds the map for each of hundreds of submodules), and
    the file's own architecture names its tensors (a "mistral" config is a llama GGUF)."""
    gguf = import_gguf()
    key = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    name_map = gguf.get_tensor_name_map(key, n_layers)
    names = {}
    for hf_name in model.state_dict():
        stem, suffix = hf_name, ""
        if hf_name.endswith((".weight", ".bias")):
            stem, suffix = hf_name.rsplit(".", 1)
            suffix = "." + suffix
        gguf_name = name_map.get_name(stem)
        if gguf_name is not None:
            names[gguf_name + suffix] = hf_name
    return names


# Reading ------------------------------------------------------------------------------------

class GGUFSource:
    """Reads rows of GGUF tensors: the stored rows they need (whole heads where the Q/K
    permutation applies), dequantized with the gguf package, transformed like transformers'
    GGUF loader does."""

    def __init__(self, raw: Any) -> None:
        self.raw = raw  # reads stored bytes by row (a SafetensorsSource)

    def read(self, info: TensorInfo, rows: tuple[int, int] | None = None,
             round_to: torch.dtype | None = None) -> torch.Tensor:
        q: GGUFTensor = info.quant
        n = info.shape[0] if info.shape else 1
        r0, r1 = rows if rows is not None else (0, n)
        s0, s1 = r0, r1
        if q.transform == "unpermute-qk":  # whole heads
            s0, s1 = r0 // q.head_rows * q.head_rows, -(-r1 // q.head_rows) * q.head_rows
        if q.raw.dtype == torch.uint8 and len(info.shape) < 2:
            s0, s1 = 0, n  # a quantized vector is one row of blocks
        # rounded while decoded when nothing after it needs float32 (half the memory)
        target = round_to if round_to in (torch.bfloat16, torch.float16) and \
            q.transform != "norm-minus-one" else None
        values = self._decode(info, s0, s1, target)
        if q.transform == "unpermute-qk":
            h = q.head_rows
            values = values.reshape((s1 - s0) // h, h // 2, 2, *info.shape[1:]).transpose(1, 2) \
                .reshape(values.shape)
        elif q.transform == "norm-minus-one":
            values = values.to(torch.float32) - 1
        if (s0, s1) != (r0, r1):
            values = values[r0 - s0:r1 - s0]
        if round_to is not None and values.dtype != round_to:
            values = values.to(round_to)
        return values

    def _decode(self, info: TensorInfo, s0: int, s1: int,
                target: torch.dtype | None) -> torch.Tensor:
        """Rows ``[s0, s1)`` as stored (float types) or dequantized (block types), the latter
        a few hundred thousand elements at a time into the result (in ``target``, else
        float32): the temporaries of the decoder stay small."""
        q: GGUFTensor = info.quant
        if q.raw.dtype != torch.uint8:
            return self.raw.read(q.raw, (s0, s1) if q.raw.shape else None)
        gguf = import_gguf()
        qtype = gguf.GGMLQuantizationType[q.ggml_type]
        if len(info.shape) < 2:  # a quantized vector: one row of blocks
            data = self.raw.read(q.raw, None).numpy()
            return torch.from_numpy(gguf.quants.dequantize(data, qtype).reshape(info.shape))
        out = torch.empty((s1 - s0, *info.shape[1:]), dtype=target or torch.float32)
        flat = out.view(s1 - s0, -1)
        step = max(1, DECODE_ELEMENTS // max(1, flat.shape[1]))
        for start in range(s0, s1, step):
            end = min(s1, start + step)
            data = self.raw.read(q.raw, (start, end))
            flat[start - s0:end - s0].copy_(_dequantize(data, qtype, gguf).view(end - start, -1))
        return out

    def close(self) -> None:
        pass  # the raw source is closed by its owner


DECODE_ELEMENTS = 256 * 1024
"""Block types are dequantized in pieces of about this many elements (whole rows)."""


def _dequantize(data: torch.Tensor, qtype: Any, gguf: Any) -> torch.Tensor:
    """Stored blocks (uint8) → float32 values. Q8_0, the usual type of high-precision
    GGUFs, in torch (the gguf package's formula, ``d · q`` with d float16, in float32:
    the same numbers, several times faster); every other type by the gguf package."""
    if qtype == gguf.GGMLQuantizationType.Q8_0:
        blocks = data.view(-1, 34)
        d = blocks[:, :2].contiguous().view(torch.float16).to(torch.float32)
        return blocks[:, 2:].view(torch.int8).to(torch.float32).mul_(d)
    return torch.from_numpy(gguf.quants.dequantize(data.numpy(), qtype))


    def close(self) -> None:
        pass  # the raw source is closed by its owner


def describe(index: CheckpointIndex) -> str | None:
    """``gguf (Q4_K, F32)``: the stored types of a GGUF model, for ``check``."""
    types = sorted({t.quant.ggml_type for t in index.tensors.values()
                    if isinstance(t.quant, GGUFTensor)})
    return f"gguf ({', '.join(types)})" if types else None

