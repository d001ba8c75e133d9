"""Tiny dense models and a tokenizer for the mergekit-moe conformance data.

Both the tests (the project's venv) and ``tests/data/moe/make_expected.py`` (a venv with
mergekit 0.1.5) build the inputs with this module, so it uses only torch, transformers
and tokenizers, and every byte it writes is determined by the seeds below: the weights
come from a ``torch.Generator``, not from transformers' random init, and the tokenizer
is a byte-level BPE trained on the fixed ``CORPUS``. ``file_digests`` lists the SHA-256
of every file written, so a test can check that it rebuilt exactly what mergekit saw
(``tests/data/moe/inputs.sha256``).

Model family presets (``FAMILIES``): hidden 64, intermediate 128, 2 layers, 4 heads /
2 KV heads, vocabulary 320, untied embeddings, bfloat16 safetensors.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

VOCAB_SIZE = 320
HIDDEN = 64
INTERMEDIATE = 128
LAYERS = 2
HEADS = 4
KV_HEADS = 2
HEAD_DIM = HIDDEN // HEADS

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Write a Python function that sorts a list of numbers.",
    "def add(a, b): return a + b",
    "Solve for x: 2x + 3 = 11. The answer is x = 4.",
    "Once upon a time a dragon guarded a golden castle.",
    "Explain how photosynthesis turns sunlight into sugar.",
    "The integral of x squared is x cubed over three.",
    "She wrote a short story about a lonely robot.",
    "import numpy as np; print(np.arange(10).sum())",
    "Tell me a joke about cats and computers.",
    "Prove that the square root of two is irrational.",
    "for i in range(3): print('hello world', i)",
]

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]

_COMMON = {
    "hidden_size": HIDDEN,
    "intermediate_size": INTERMEDIATE,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": HEADS,
    "num_key_value_heads": KV_HEADS,
    "vocab_size": VOCAB_SIZE,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": None,
}

FAMILIES = {
    "llama": ("LlamaConfig", {**_COMMON, "rms_norm_eps": 1e-5, "head_dim": HEAD_DIM}),
    "mistral": ("MistralConfig", {**_COMMON, "rms_norm_eps": 1e-5, "head_dim": HEAD_DIM,
                                  "sliding_window": None}),
    "qwen2": ("Qwen2Config", {**_COMMON, "rms_norm_eps": 1e-6, "use_sliding_window": False}),
    "qwen3": ("Qwen3Config", {**_COMMON, "rms_norm_eps": 1e-6, "head_dim": HEAD_DIM,
                              "use_sliding_window": False}),
}

# name -> (family, seed, parent name or None).  A model with a parent is the parent plus
# seeded noise of std EXPERT_NOISE (a "fine-tune"); one without is drawn from scratch.
MODELS = {
    "llama_base": ("llama", 1000, None),
    "llama_e0": ("llama", 1001, "llama_base"),
    "llama_e1": ("llama", 1002, "llama_base"),
    "llama_e2": ("llama", 1003, "llama_base"),
    "llama_e3": ("llama", 1004, "llama_base"),
    "mistral_base": ("mistral", 1100, None),
    "qwen2_base": ("qwen2", 2000, None),
    "qwen2_e0": ("qwen2", 2001, "qwen2_base"),
    "qwen2_e1": ("qwen2", 2002, "qwen2_base"),
    "qwen2_e2": ("qwen2", 2003, "qwen2_base"),
    "qwen3_base": ("qwen3", 3000, None),
    "qwen3_e0": ("qwen3", 3001, "qwen3_base"),
    "qwen3_e1": ("qwen3", 3002, "qwen3_base"),
}

BASE_STD = 0.05
EXPERT_NOISE = 0.02
DTYPE = torch.bfloat16


def build_tokenizer():
    """A byte-level BPE (vocabulary VOCAB_SIZE) as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        model_max_length=256)


def model_config(family: str):
    import transformers

    cls_name, kwargs = FAMILIES[family]
    return getattr(transformers, cls_name)(**kwargs)


def param_shapes(family: str) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of a family's CausalLM, from a meta-device instance."""
    from transformers import AutoModelForCausalLM

    cfg = model_config(family)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return {name: tuple(p.shape) for name, p in model.state_dict().items()}


def _draw(shapes: dict[str, tuple[int, ...]], seed: int,
          parent: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in sorted(shapes):
        noise = torch.randn(shapes[name], generator=g, dtype=torch.float32)
        if parent is not None:
            out[name] = parent[name] + EXPERT_NOISE * noise
        elif name.endswith("norm.weight"):
            out[name] = 1.0 + BASE_STD * noise
        else:
            out[name] = BASE_STD * noise
    return out


def model_tensors(name: str, _cache: dict | None = None) -> dict[str, torch.Tensor]:
    """float32 tensors of model ``name`` (before the cast to DTYPE)."""
    cache = {} if _cache is None else _cache
    if name in cache:
        return cache[name]
    family, seed, parent = MODELS[name]
    parent_tensors = model_tensors(parent, cache) if parent else None
    cache[name] = _draw(param_shapes(family), seed, parent_tensors)
    return cache[name]


def write_model(name: str, folder: Path, _cache: dict | None = None,
                dtype: torch.dtype = DTYPE) -> Path:
    """Write model ``name`` (config, bfloat16 safetensors or ``dtype``, tokenizer) into
    ``folder``."""
    family = MODELS[name][0]
    folder.mkdir(parents=True, exist_ok=True)
    cfg = model_config(family)
    cfg.architectures = [type(cfg).__name__.replace("Config", "ForCausalLM")]
    cfg.dtype = str(dtype).removeprefix("torch.")
    cfg.save_pretrained(folder)
    tensors = {k: v.to(dtype).contiguous() for k, v in model_tensors(name, _cache).items()}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    build_tokenizer().save_pretrained(folder)
    return folder


def write_all(root: Path, names=None, dtype: torch.dtype = DTYPE) -> dict[str, Path]:
    """Write every model of MODELS (or ``names``) under ``root/<name>``."""
    cache: dict = {}
    return {n: write_model(n, Path(root) / n, cache, dtype) for n in (names or MODELS)}


VERSION_STAMPED = ("config.json", "generation_config.json")
"""Files transformers stamps with its own version: hashed without that stamp, so the
digests hold for every transformers release that writes the same configuration."""


def file_digests(root: Path) -> dict[str, str]:
    """SHA-256 of every file under ``root`` (relative POSIX paths, sorted); a
    ``VERSION_STAMPED`` file's digest is of its JSON without ``transformers_version``,
    keys sorted."""
    root = Path(root)
    return {p.relative_to(root).as_posix(): hashlib.sha256(_content(p)).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _content(path: Path) -> bytes:
    if path.name not in VERSION_STAMPED:
        return path.read_bytes()
    data = json.loads(path.read_text())
    data.pop("transformers_version", None)
    return json.dumps(data, sort_keys=True, indent=2).encode()


if __name__ == "__main__":  # pragma: no cover - manual use
    import sys

    out = Path(sys.argv[1])
    write_all(out)
    print(json.dumps(file_digests(out), indent=1))
