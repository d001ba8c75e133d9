"""The output folder: side files, config, model card, verification and the atomic publish.

A merge is built in ``OUT.partial/`` and renamed to ``OUT`` only once every file is written
and the shard headers have been read back and checked against the plan, so a folder named
``OUT`` is always complete.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
import warnings
from typing import Any

from . import __version__
from .checkpoint.safetensors_format import read_header
from .errors import MergeError, MergeIOError
from .hashing import file_sha256
from .plan import Plan
from .units import dtype_name

_NOT_COPIED_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5",
                        ".msgpack", ".onnx", ".pkl", ".index.json")
_NOT_COPIED = {"config.json", "README.md", "mergekit_config.yml", "mergesmith_config.yml",
               "mergesmith_manifest.json"}


def partial_path(out: str) -> str:
    return os.path.normpath(out) + ".partial"


def check_output(out: str, overwrite: bool, file: bool = False) -> None:
    """The output path must be a new folder (a new file, for ``file`` outputs such as GGUF)
    or ``--overwrite``, in a writable place."""
    out = os.path.normpath(out)
    if file:
        if os.path.isdir(out):
            raise MergeError(f"output path {out} is a folder; a GGUF output is one file "
                             "(give a name ending in .gguf)")
        if os.path.exists(out) and not overwrite:
            raise MergeError(f"output file {out} already exists; pass --overwrite to replace "
                             "it or choose another name")
    elif os.path.exists(out) and not os.path.isdir(out):
        raise MergeError(f"output path {out} is a file; give a folder name")
    if os.path.isdir(out) and not overwrite:
        raise MergeError(f"output folder {out} already exists; pass --overwrite to replace it "
                         "or choose another name")
    parent = os.path.dirname(os.path.abspath(out))
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise MergeError(f"cannot create the folder {parent} for the output: {e.strerror}") from None
    if not os.access(parent, os.W_OK):
        raise MergeError(f"no permission to write in {parent}; choose an output folder you "
                         "can write to")


def prepare_partial(out: str, keep: bool) -> str:
    """Create ``OUT.partial/`` (fresh, unless ``keep``ing an interrupted run's); return it."""
    partial = partial_path(out)
    if os.path.exists(partial) and not keep:
        shutil.rmtree(partial)
    try:
        os.makedirs(partial, exist_ok=keep)
    except OSError as e:
        raise MergeError(f"cannot create {partial}: {e.strerror} (check the permissions of "
                         f"{os.path.dirname(os.path.abspath(partial))})") from None
    return partial


def write_side_files(plan: Plan, folder: str) -> None:
    """Index, config.json, donor's tokenizer and other side files, model card, the recipe."""
    if len(plan.shards) > 1:
        index = {
            "metadata": {"total_size": plan.bytes_written, "mergesmith_version": __version__},
            "weight_map": dict(sorted((p.name, t.file) for t in plan.tensors
                                      for p in t.stored)),
        }
        _write_json(os.path.join(folder, "model.safetensors.index.json"), index)
    donor = plan.models[plan.donor].folder
    new_tokenizer = plan.vocab is not None and plan.vocab.tokenizer is not None
    skip = set(_NOT_COPIED)
    if new_tokenizer or not plan.options.copy_tokenizer:
        skip |= TOKENIZER_FILES
    chat_template = plan.chat_template
    if chat_template is not None and not new_tokenizer and not plan.options.copy_tokenizer:
        warnings.warn("the recipe's chat_template is not written: --no-copy-tokenizer leaves "
                      "out the tokenizer it belongs to", stacklevel=2)
        chat_template = None
    if chat_template is not None or not plan.options.copy_tokenizer:
        skip |= CHAT_TEMPLATE_FILES
    if plan.generation_config is not None:
        skip.add("generation_config.json")
    for name in sorted(os.listdir(donor)):
        src = os.path.join(donor, name)
        if (name in skip or name.startswith(".") or name.endswith(_NOT_COPIED_SUFFIXES)
                or not os.path.isfile(src)):
            continue
        try:
            shutil.copyfile(src, os.path.join(folder, name))
        except OSError as e:
            raise MergeIOError(f"cannot copy {src} to the output: {e.strerror}") from None
    if new_tokenizer:
        write_tokenizer(plan, folder)
    if plan.generation_config is not None:
        _write_json(os.path.join(folder, "generation_config.json"), plan.generation_config)
    if chat_template is not None:
        write_text(os.path.join(folder, "chat_template.jinja"), chat_template)
        _drop_key(os.path.join(folder, "tokenizer_config.json"), "chat_template")
    _write_json(os.path.join(folder, "config.json"), plan.config)
    write_text(os.path.join(folder, "mergesmith_config.yml"), plan.recipe.text)
    if plan.options.write_model_card:
        write_text(os.path.join(folder, "README.md"), model_card(plan, os.path.basename(folder)))


TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json", "vocab.txt",
                   "spiece.model", "sentencepiece.bpe.model"}
CHAT_TEMPLATE_FILES = {"chat_template.jinja", "chat_template.json"}


def write_tokenizer(plan: Plan, folder: str) -> None:
    """tokenizer.json of the output vocabulary, and the source's tokenizer_config.json and
    special_tokens_map.json made consistent with it."""
    vocab = plan.vocab
    assert vocab is not None and vocab.tokenizer is not None and vocab.source_folder
    _write_json(os.path.join(folder, "tokenizer.json"), vocab.tokenizer)
    src = os.path.join(vocab.source_folder, "tokenizer_config.json")
    config = _read_json(src) or {}
    present = set(vocab.tokens)
    added = {t["content"]: t for t in vocab.tokenizer.get("added_tokens", [])}
    if "added_tokens_decoder" in config:
        config["added_tokens_decoder"] = {
            str(t["id"]): {k: t[k] for k in ("content", "lstrip", "normalized", "rstrip",
                                             "single_word", "special") if k in t}
            for t in added.values()}
    for key in ("extra_special_tokens", "additional_special_tokens"):
        lists = [(_read_json(os.path.join(m.folder, "tokenizer_config.json")) or {}).get(key)
                 for m in plan.models]
        merged = [t for lst in lists if isinstance(lst, list) for t in lst
                  if isinstance(t, str) and t in present]
        if key in config or merged:
            config[key] = list(dict.fromkeys(merged))
    _write_json(os.path.join(folder, "tokenizer_config.json"), config)
    special = os.path.join(vocab.source_folder, "special_tokens_map.json")
    if os.path.exists(special):
        shutil.copyfile(special, os.path.join(folder, "special_tokens_map.json"))


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _drop_key(path: str, key: str) -> None:
    data = _read_json(path)
    if isinstance(data, dict) and key in data:
        del data[key]
        _write_json(path, data)


def _write_json(path: str, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def write_text(path: str, text: str) -> None:
    """Write ``text`` as UTF-8; a failure is a :class:`MergeIOError` naming the file."""
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    except OSError as e:
        raise MergeIOError(f"cannot write {path}: {e.strerror}") from None


def model_card(plan: Plan, folder_name: str, evaluation: str | None = None) -> str:
    """README.md with Hub front matter: method, inputs, precision and the recipe; and the
    recipe's ``evaluate:`` results (markdown) when given."""
    name = plan.recipe.name or folder_name.removesuffix(".partial")
    hub_models = [m.repo_id for m in plan.models if m.repo_id]
    front = ["---"]
    front.append("base_model:" + ("" if hub_models else " []"))
    front += [f"- {r}" for r in dict.fromkeys(hub_models)]
    front += ["library_name: transformers", "tags:", "- merge", "- mergesmith", "---", ""]
    spec = plan.method
    method = f"[{spec.name}]({spec.docs.reference})" if spec.docs.reference else f"`{spec.name}`"
    base = plan.recipe.base_model
    using = f" with `{base}` as the base" if base is not None else ""
    inputs = "\n".join(f"* `{m.ref}`" for m in plan.models)
    out_dtypes = sorted({dtype_name(t.dtype) for t in plan.tensors if t.encoding is None})
    encodings = sorted({t.encoding.describe() for t in plan.tensors if t.encoding})
    quantized = "".join(f", or quantized once to {e}" for e in encodings)
    section = "" if evaluation is None else f"\n## Evaluation\n\n{evaluation}"
    read = (f"Inputs were first rounded to {dtype_name(plan.read_dtype)} (the recipe's "
            "`dtype`), then " if plan.read_dtype else "Inputs were ")
    body = f"""# {name}

This model is a merge of pre-trained language models made with
[mergesmith](https://github.com/mergesmith/mergesmith) {__version__}.

## Method

Merged with {method}{using}. {spec.docs.summary}

## Inputs

{inputs}

## Precision

{read}upcast to {dtype_name(plan.options.compute_dtype)} for the arithmetic; each result
was rounded once to the output dtype ({', '.join(out_dtypes)}){quantized}.
{section}
## Recipe

```yaml
{plan.recipe.text.rstrip()}
```
"""
    return "\n".join(front) + body


CHECKSUMS = "mergesmith_checksums.json"


def write_checksums(plan: Plan, folder: str, known: dict[str, str] | None = None) -> None:
    """sha256 and size of every shard, so ``mergesmith verify`` can re-check the folder.
    ``known`` digests (computed while writing) are used as they are."""
    from concurrent.futures import ThreadPoolExecutor

    def digest(name: str) -> tuple[str, dict[str, Any]]:
        path = os.path.join(folder, name)
        sha256 = known[name] if known and name in known else file_sha256(path)
        return name, {"size": os.path.getsize(path), "sha256": sha256}

    names = [s.filename for s in plan.shards]
    with ThreadPoolExecutor(min(4, len(names))) as pool:  # hashlib releases the GIL
        files = dict(pool.map(digest, names))
    _write_json(os.path.join(folder, CHECKSUMS), {
        "format": 1, "mergesmith_version": __version__, "files": files,
        "tensors": len(plan.tensors)})


def verify_folder(folder: str) -> list[str]:
    """Re-check a merged folder: recorded checksums and sizes, shard headers, the index.

    Returns the problems found (empty: the folder is intact)."""
    problems: list[str] = []
    if not os.path.isdir(folder):
        return [f"{folder} is not a folder"]
    record = _read_json(os.path.join(folder, CHECKSUMS))
    index = _read_json(os.path.join(folder, "model.safetensors.index.json"))
    if index is not None:
        shard_names = sorted(set(index.get("weight_map", {}).values()))
    elif os.path.exists(os.path.join(folder, "model.safetensors")):
        shard_names = ["model.safetensors"]
    else:
        return [f"{folder} has no model.safetensors and no model.safetensors.index.json"]
    names_in_shards: dict[str, str] = {}
    total = 0
    for name in shard_names:
        if os.path.basename(name) != name:
            problems.append(f"the index names a shard outside the folder: {name!r}")
            continue
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            problems.append(f"{name} is missing")
            continue
        try:
            entries, _ = read_header(path)
        except MergeError as e:
            problems.append(str(e))
            continue
        for e in entries:
            names_in_shards[e.name] = name
            total += e.nbytes
    if index is not None:
        for tensor, shard in index.get("weight_map", {}).items():
            if names_in_shards.get(tensor) != shard:
                problems.append(f"index: tensor '{tensor}' is not in {shard}")
        size = index.get("metadata", {}).get("total_size")
        if size is not None and size != total:
            problems.append(f"index: total_size {size} but the shards hold {total} bytes")
    if record is None:
        problems.append(f"no {CHECKSUMS} (not written by mergesmith): checked headers only")
        return problems
    for name, info in record.get("files", {}).items():
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            problems.append(f"{name} is missing")
            continue
        if os.path.getsize(path) != info.get("size"):
            problems.append(f"{name}: size {os.path.getsize(path)}, recorded {info.get('size')}")
            continue
        if file_sha256(path) != info.get("sha256"):
            problems.append(f"{name}: sha256 differs from the recorded one (the file changed)")
    return problems


def verify(plan: Plan, folder: str) -> None:
    """Read every written header back and check it holds exactly the planned tensors."""
    for shard in plan.shards:
        path = os.path.join(folder, shard.filename)
        if os.path.getsize(path) != shard.size:
            raise MergeIOError(f"{path} has {os.path.getsize(path)} bytes, expected "
                               f"{shard.size}; the disk may be failing")
        entries, _ = read_header(path)
        got = {e.name: (e.dtype, e.shape, e.offset) for e in entries}
        want = {p.name: (p.dtype, p.shape, p.offset) for t in shard.tensors for p in t.stored}
        if got != want:
            raise MergeIOError(f"{path} does not hold the planned tensors after writing")


def verify_gguf(plan: Plan, folder: str) -> None:
    """Read the written GGUF file back (with the ``gguf`` package) and check it holds exactly
    the planned tensors, types and places."""
    import gguf

    shard = plan.shards[0]
    path = os.path.join(folder, shard.filename)
    if os.path.getsize(path) != shard.size:
        raise MergeIOError(f"{path} has {os.path.getsize(path)} bytes, expected {shard.size}; "
                           "the disk may be failing")
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError) as e:
        raise MergeIOError(f"{path} cannot be read back as GGUF: {e}") from None
    got = {t.name: (t.tensor_type.name, int(t.data_offset), int(t.n_bytes))
           for t in reader.tensors}
    want = {p.name: (t.encoding.tensor.encoding.type_name, p.offset, p.nbytes)
            for t in shard.tensors for p in t.stored}
    if any(got.get(name) != spec for name, spec in want.items()):
        raise MergeIOError(f"{path} does not hold the planned tensors after writing")


def publish_file(partial: str, filename: str, out: str) -> None:
    """Move the finished file ``OUT.partial/filename`` to ``OUT`` (atomically replacing an
    old ``OUT``) and remove the partial folder."""
    os.replace(os.path.join(partial, filename), os.path.normpath(out))
    shutil.rmtree(partial, ignore_errors=True)


def publish(partial: str, out: str) -> None:
    """Rename the finished ``OUT.partial`` to ``OUT`` (replacing an old ``OUT``)."""
    out = os.path.normpath(out)
    old = None
    if os.path.exists(out):
        old = f"{out}.old-{uuid.uuid4().hex[:8]}"
        os.rename(out, old)
    os.rename(partial, out)
    if old:
        shutil.rmtree(old, ignore_errors=True)
