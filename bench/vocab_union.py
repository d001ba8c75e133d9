"""Benchmark: union of two large vocabularies (150k tokens, 2048 wide).

Builds two synthetic one-layer Llama checkpoints (bfloat16) whose tokenizers share 150,000
tokens and differ in 2,000 added tokens of the second model, then times
``mergesmith run`` (and ``mergekit-yaml`` when given) on a linear merge with
``tokenizer: {source: union}``, each as a whole process under ``/usr/bin/time -v``.

    .venv/bin/python bench/vocab_union.py --workdir /tmp/vocab-bench [--mergekit CMD]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

HIDDEN, VOCAB, EXTRA = 2048, 150_000, 2_000


def tokenizer_json(n: int, extra: int) -> dict:
    """A byte-level BPE tokenizer with n vocabulary entries (no merges) + extra added tokens."""
    alphabet = [chr(c) for c in range(33, 127)]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for ch in alphabet:
        vocab[ch] = len(vocab)
    i = 0
    while len(vocab) < n:
        vocab[f"tok{i}"] = len(vocab)
        i += 1
    added = [{"id": k, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for t, k in list(vocab.items())[:3]]
    added += [{"id": n + j, "content": f"<|extra_{j}|>", "single_word": False, "lstrip": False,
               "rstrip": False, "normalized": False, "special": True} for j in range(extra)]
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
            "normalizer": None, "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False,
                                                  "trim_offsets": True, "use_regex": True},
            "post_processor": None, "decoder": {"type": "ByteLevel", "add_prefix_space": True,
                                                "trim_offsets": True, "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None,
                      "continuing_subword_prefix": None, "end_of_word_suffix": None,
                      "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                      "vocab": vocab, "merges": []}}


def make_model(folder: Path, extra: int, seed: int) -> None:
    if (folder / "done").exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    rows = VOCAB + extra
    g = torch.Generator().manual_seed(seed)
    inter = 64
    t = {
        "model.embed_tokens.weight": torch.randn(rows, HIDDEN, generator=g) * 0.02,
        "lm_head.weight": torch.randn(rows, HIDDEN, generator=g) * 0.02,
        "model.norm.weight": torch.ones(HIDDEN),
        "model.layers.0.input_layernorm.weight": torch.ones(HIDDEN),
        "model.layers.0.post_attention_layernorm.weight": torch.ones(HIDDEN),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(HIDDEN, HIDDEN, generator=g) * 0.02,
        "model.layers.0.self_attn.k_proj.weight": torch.randn(128, HIDDEN, generator=g) * 0.02,
        "model.layers.0.self_attn.v_proj.weight": torch.randn(128, HIDDEN, generator=g) * 0.02,
        "model.layers.0.self_attn.o_proj.weight": torch.randn(HIDDEN, HIDDEN, generator=g) * 0.02,
        "model.layers.0.mlp.gate_proj.weight": torch.randn(inter, HIDDEN, generator=g) * 0.02,
        "model.layers.0.mlp.up_proj.weight": torch.randn(inter, HIDDEN, generator=g) * 0.02,
        "model.layers.0.mlp.down_proj.weight": torch.randn(HIDDEN, inter, generator=g) * 0.02,
    }
    save_file({k: v.to(torch.bfloat16) for k, v in t.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
              "intermediate_size": inter, "num_hidden_layers": 1, "num_attention_heads": 16,
              "num_key_value_heads": 1, "head_dim": 128, "vocab_size": rows,
              "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
              "bos_token_id": 1, "eos_token_id": 2, "max_position_embeddings": 4096}
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer_json(VOCAB, extra)))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>"}))
    (folder / "done").write_text("ok")


def timed(cmd: list[str], out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    start = time.time()
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.time() - start
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    return {"ok": proc.returncode == 0, "wall_s": round(wall, 2),
            "max_rss_mb": round(int(rss.group(1)) / 1024) if rss else None,
            "tail": proc.stderr.strip().splitlines()[-3:] if proc.returncode else []}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default="/tmp/vocab-bench")
    ap.add_argument("--mergesmith", default=str(Path(__file__).resolve().parents[1]
                                                / ".venv/bin/mergesmith"))
    ap.add_argument("--mergekit", default=None, help="mergekit-yaml command (optional)")
    args = ap.parse_args()
    work = Path(args.workdir)
    make_model(work / "a", 0, 0)
    make_model(work / "b", EXTRA, 1)
    recipe = work / "recipe.yml"
    recipe.write_text(f"""merge_method: linear
base_model: {work / 'a'}
models:
  - model: {work / 'a'}
    parameters: {{weight: 0.5}}
  - model: {work / 'b'}
    parameters: {{weight: 0.5}}
tokenizer:
  source: union
""")
    results = {"mergesmith": timed([args.mergesmith, "run", str(recipe), str(work / "out"),
                                    "--quiet"], work / "out")}
    if args.mergekit:
        results["mergekit"] = timed([args.mergekit, str(recipe), str(work / "out-mk"), "--quiet"],
                                    work / "out-mk")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
