"""Model references → tensor indexes: local folders, GGUF files, or Hugging Face Hub
repositories.

A reference that exists on disk is a local folder, or a ``.gguf`` file (or a folder holding
one; see :mod:`.gguf_input`). Anything else that looks like a Hub id
(``org/name``) is resolved through ``huggingface_hub``, which honours its cache
(``HF_HUB_CACHE``/``HF_HOME``) and ``HF_HUB_OFFLINE``. When a Hub model is not in the
cache, planning needs only its metadata (``config.json`` and safetensors headers, fetched
without the weights); the weights are downloaded after the whole recipe has been checked.
"""

from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any

from ..errors import MergeError
from ..recipe.refs import ModelPath, ModelReference
from .gguf_input import gguf_files, index_gguf
from .index import WEIGHT_SUFFIXES, CheckpointIndex, TensorInfo, index_folder, read_config
from .lora import LoraAdapter, load_adapter
from .safetensors_format import ST_TO_TORCH

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")
# Everything but weight formats we do not read: side files (tokenizer, chat template,
# generation config, processor configs ...) travel with the model.
_IGNORE_WITH_SAFETENSORS = ["*.bin", "*.pt", "*.pth", "*.ckpt", "*.gguf", "*.h5", "*.msgpack",
                            "*.onnx", "*.ot", "*.tflite", "*.pkl", "original/*", "onnx/*"]
_IGNORE_WITH_BIN = [p for p in _IGNORE_WITH_SAFETENSORS if p != "*.bin"]


@dataclass
class ModelSource:
    """A resolved input model: its tensor index, and where its files are (or will be)."""

    ref: ModelReference
    index: CheckpointIndex
    repo_id: str | None = None  # set for Hub models
    pending_download: bool = False
    lora: LoraAdapter | None = None  # applied to the weights as they are read
    _ignore: list[str] = field(default_factory=list, repr=False)
    stage: Any = None
    """The plan of the earlier stage this model is computed from (multi-stage recipes);
    None for a model on disk."""

    @property
    def folder(self) -> str:
        return self.index.folder

    @property
    def config(self) -> dict | None:
        return self.index.config

    # Side files, read here so that planning stays a pure function of what it is given.

    @functools.cached_property
    def generation_config(self) -> dict | None:
        """``generation_config.json``, or None when the model has none."""
        path = os.path.join(self.folder, "generation_config.json")
        if not os.path.exists(path):
            return None
        try:
            with open(path, encoding="utf-8") as f:
                return json.load(f)
        except (OSError, ValueError) as e:
            raise MergeError(f"{path}: cannot read ({e})") from None

    @functools.cached_property
    def chat_template(self) -> str | None:
        """The model's own chat template (tokenizer files), if any."""
        from ..tokenizer import model_chat_template

        return model_chat_template(self.folder)

    def vocabulary(self, rows: int):
        """The model's tokens (``tokenizer.json``) for an embedding of ``rows`` rows."""
        from ..tokenizer import load_vocab

        return load_vocab(self.folder, rows, str(self.ref))

    def ensure_local(self) -> CheckpointIndex:
        """Download the weights of a Hub model if needed; return an index with file offsets."""
        if not self.pending_download:
            return self.index
        planned = self.index
        folder = _snapshot(self.repo_id or "", self.ref.model.revision, self._ignore,
                           local_only=False)
        local = index_folder(folder)
        for name, info in planned.tensors.items():
            got = local.tensors.get(name)
            if got is None or got.shape != info.shape or got.dtype != info.dtype:
                raise MergeError(f"{self.ref}: downloaded files differ from the metadata used "
                                 f"for planning (tensor '{name}'); run the merge again")
        self.index, self.pending_download = local, False
        return local


@dataclass
class TokenizerSource:
    """A model named only as the source of the output vocabulary: its tokenizer files are
    read, its weights (if any) are not."""

    ref: ModelReference
    folder: str

    def vocabulary(self):
        from ..tokenizer import load_vocab

        return load_vocab(self.folder, 1 << 62, str(self.ref))  # every token: no rows to cut


def resolve_tokenizer(ref: ModelReference, where: str) -> TokenizerSource:
    """A local folder with tokenizer files, or a Hub model (tokenizer files only)."""
    path = os.path.expanduser(ref.model.path)
    files = gguf_files(path) if os.path.exists(path) else None
    if files is not None:  # the tokenizer rebuilt from the GGUF's metadata
        return TokenizerSource(ref, index_gguf(files).folder)
    if os.path.isdir(path):
        return TokenizerSource(ref, path)
    if looks_like_path(ref.model.path) or not _HUB_ID.match(ref.model.path):
        raise MergeError(f"{where}: tokenizer source folder '{ref.model.path}' does not exist")
    patterns = ["tokenizer*", "special_tokens_map.json", "*.model", "vocab*", "merges.txt",
                "added_tokens.json", "chat_template*"]
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(ref.model.path, revision=ref.model.revision,
                                   allow_patterns=patterns, local_files_only=_offline())
    except Exception as e:
        raise MergeError(f"{where}: {_hub_message(ref.model.path, e)}") from None
    return TokenizerSource(ref, folder)


def looks_like_path(path: str) -> bool:
    """True for references that can only be meant as local paths."""
    return (path.startswith(("/", "./", "../", "~", ".\\", "..\\")) or path in (".", "..")
            or os.sep + os.sep in path or (os.name == "nt" and ":" in path))


def resolve(ref: ModelReference, where: str) -> ModelSource:
    """Resolve one reference without reading tensor data (may fetch Hub metadata)."""
    if ref.lora is not None:
        source = resolve(ModelReference(ref.model, None, ref.override_architecture), where)
        adapter = load_adapter(_adapter_folder(ref.lora, where), f"{where}: adapter '{ref.lora}'")
        adapter.check_against(source.index.tensors, f"{where}: adapter '{ref.lora}'")
        source.ref, source.lora = ref, adapter
        return source
    path = os.path.expanduser(ref.model.path)
    if os.path.exists(path):
        files = gguf_files(path)
        if files is not None:
            try:
                return ModelSource(ref, index_gguf(files))
            except MergeError as e:
                raise MergeError(f"{where}: {e}") from None
        if not os.path.isdir(path):
            raise MergeError(f"{where}: '{ref.model.path}' is a file; a model is a folder with "
                             "config.json and weight files, or a .gguf file")
        return ModelSource(ref, index_folder(path))
    if path.endswith(".gguf"):
        raise MergeError(f"{where}: GGUF file not found: {ref.model.path}")
    if looks_like_path(ref.model.path) or not _HUB_ID.match(ref.model.path):
        raise MergeError(f"{where}: model folder not found: {ref.model.path} (relative paths "
                         f"are resolved from the current folder, {os.getcwd()})")
    return _resolve_hub(ref, where)


def _adapter_folder(path: ModelPath, where: str) -> str:
    """A LoRA adapter: a local folder, or a Hub repository (small: fetched whole)."""
    local = os.path.expanduser(path.path)
    if os.path.isdir(local):
        return local
    if looks_like_path(path.path) or not _HUB_ID.match(path.path):
        raise MergeError(f"{where}: adapter folder not found: {path.path}")
    try:
        return _snapshot(path.path, path.revision, [], local_only=_offline())
    except MergeError as e:
        raise MergeError(f"{where}: adapter '{path}': {e}") from None


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _resolve_hub(ref: ModelReference, where: str) -> ModelSource:
    repo, revision = ref.model.path, ref.model.revision
    # 1. Complete in the local cache? Then it is a local folder.
    try:
        folder = _snapshot(repo, revision, _IGNORE_WITH_SAFETENSORS, local_only=True)
        return ModelSource(ref, index_folder(folder), repo_id=repo)
    except MergeError as cached_error:
        if _offline():
            reason = str(cached_error)
            detail = "" if reason.startswith("cannot get") else f" ({reason})"
            raise MergeError(f"{where}: '{repo}' is not a local folder and is not complete in "
                             f"the Hugging Face cache{detail}, and HF_HUB_OFFLINE is set. "
                             f"Download it first (hf download {repo}) or give a local path."
                             ) from None
    # 2. Online: plan from metadata, download weights after validation.
    return _remote_metadata(ref, where)


def _snapshot(repo: str, revision: str | None, ignore: list[str], local_only: bool) -> str:
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(repo, revision=revision, ignore_patterns=ignore,
                                   local_files_only=local_only)
    except Exception as e:  # huggingface_hub raises many types; all mean "cannot get it"
        raise MergeError(_hub_message(repo, e)) from None
    return folder


def _remote_metadata(ref: ModelReference, where: str) -> ModelSource:
    from huggingface_hub import HfApi, get_safetensors_metadata, hf_hub_download

    repo, revision = ref.model.path, ref.model.revision
    try:
        info = HfApi().model_info(repo, revision=revision)
        files = [s.rfilename for s in (info.siblings or [])]
        has_safetensors = any(f.endswith(".safetensors") for f in files)
        ignore = _IGNORE_WITH_SAFETENSORS if has_safetensors else _IGNORE_WITH_BIN
        if not has_safetensors:
            # .bin checkpoints have no remote header: fetch them now (still before planning).
            folder = _snapshot(repo, revision, ignore, local_only=False)
            return ModelSource(ref, index_folder(folder), repo_id=repo)
        small = [f for f in files if not f.endswith(WEIGHT_SUFFIXES) and "/" not in f]
        folder = None
        for name in small:
            folder = os.path.dirname(hf_hub_download(repo, name, revision=revision))
        meta = get_safetensors_metadata(repo, revision=revision)
    except MergeError:
        raise
    except Exception as e:
        raise MergeError(f"{where}: {_hub_message(repo, e)}") from None
    folder = folder or ""
    tensors: dict[str, TensorInfo] = {}
    shard_files = []
    for filename, fmeta in meta.files_metadata.items():
        path = os.path.join(folder, filename)
        shard_files.append(path)
        for name, t in fmeta.tensors.items():
            dtype = ST_TO_TORCH.get(t.dtype)
            if dtype is None:
                raise MergeError(f"{where}: tensor '{name}' of {repo} has dtype {t.dtype}, "
                                 "which mergesmith cannot read")
            begin, end = t.data_offsets
            tensors[name] = TensorInfo(name, path, dtype, tuple(t.shape), None, end - begin)
    config = read_config(folder) if folder else None
    from .quantized import fold_quantized  # quantized weights planned as what they stand for

    index = CheckpointIndex(folder, fold_quantized(tensors, config, repo), shard_files, config,
                            "safetensors")
    return ModelSource(ref, index, repo_id=repo, pending_download=True, _ignore=ignore)


def _hub_message(repo: str, e: Exception) -> str:
    kind = type(e).__name__
    first = (str(e).strip().splitlines() or [""])[0][:200]
    if "RepositoryNotFound" in kind or "404" in first:
        hint = "check the spelling, or log in (huggingface-cli login) if it is private or gated"
    elif "RevisionNotFound" in kind:
        hint = "check the revision after '@'"
    elif "Gated" in kind:
        hint = "accept the model's licence on the Hub and log in"
    elif "LocalEntryNotFound" in kind or "Offline" in kind:
        hint = "it is not in the local cache"
    else:
        hint = "check your network connection or use a local folder"
    return f"cannot get '{repo}' from the Hugging Face Hub: {kind}: {first} ({hint})"
