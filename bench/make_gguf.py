#!/usr/bin/env python3
"""Turn a model folder of bench/make_models.py into one GGUF file, with mergesmith itself.

    python bench/make_gguf.py SRC DST.gguf [--type q8_0]

The bench models have no tokenizer, and a GGUF needs one: a byte-level BPE vocabulary of
the model's size (the 256 byte symbols, then made-up tokens; one merge) is written next to
symbolic links to SRC's files, and a ``linear`` recipe of that folder at weight 1 writes
DST (Q/K rows permuted, norms F32, linear weights in ``--type``) as ``mergesmith run``
writes any GGUF output.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path


def byte_level_tokenizer(vocab_size: int) -> dict:
    """tokenizer.json of a byte-level BPE with ``vocab_size`` tokens and one merge."""
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<|endoftext|>": 0}
    for ch in alphabet:
        vocab.setdefault(ch, len(vocab))
    vocab.setdefault("to", len(vocab))  # one merge: GGUF readers expect some
    i = 0
    while len(vocab) < vocab_size:
        vocab.setdefault(f"tok{i}", len(vocab))
        i += 1
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": 0, "content": "<|endoftext|>", "single_word": False,
                          "lstrip": False, "rstrip": False, "normalized": False,
                          "special": True}],
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                          "use_regex": True},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                    "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": [["t", "o"]]},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src")
    parser.add_argument("dst")
    parser.add_argument("--type", default="q8_0")
    args = parser.parse_args()

    import mergesmith

    src = Path(args.src).resolve()
    config = json.loads((src / "config.json").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp, "model")
        folder.mkdir()
        for f in src.iterdir():
            os.symlink(f, folder / f.name)
        (folder / "tokenizer.json").write_text(
            json.dumps(byte_level_tokenizer(int(config["vocab_size"]))))
        (folder / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>"}))
        recipe = Path(tmp, "recipe.yml")
        recipe.write_text(f"merge_method: linear\nmodels:\n  - model: {folder}\n"
                          f"    parameters: {{weight: 1.0}}\nout_dtype: {args.type}\n")
        mergesmith.run(str(recipe), args.dst, overwrite=True)
    print(f"[make_gguf] wrote {args.dst} ({os.path.getsize(args.dst) / 1e9:.2f} GB)")


if __name__ == "__main__":
    main()
