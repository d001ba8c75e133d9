"""Reading input checkpoints without holding them: indexes from headers, reads by byte range."""

from .index import CheckpointIndex, TensorInfo, index_folder, read_config
from .reader import TensorReader, TensorSource
from .resolve import ModelSource, TokenizerSource, resolve, resolve_tokenizer

__all__ = ["CheckpointIndex", "ModelSource", "TensorInfo", "TensorReader", "TensorSource",
           "TokenizerSource", "index_folder", "read_config", "resolve", "resolve_tokenizer"]
