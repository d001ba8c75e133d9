"""Router weights (one row per expert, hidden-size wide, per layer) as mergekit-moe makes
them, and the small side file that holds them (with zero biases) for the merge."""

from __future__ import annotations

import hashlib
import json
import math
import os

import torch

from ..checkpoint import TensorReader
from ..errors import MergeError
from .config import Expert
from .plan import COMPUTED_FILE, MoEDesign, computed_layout


def _tokenize(tokenizer, prompts: tuple[str, ...]):
    """mergekit: BOS prepended by hand, no other special tokens, left padding."""
    return tokenizer([(tokenizer.bos_token or "") + p for p in prompts],
                     return_tensors="pt", padding=True, add_special_tokens=False)


def _tokenizer(folder: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    # mergekit pads with BOS (a tokenizer's own pad token may lie outside the embedding)
    tok.pad_token = tok.bos_token or tok.pad_token or tok.eos_token
    tok.padding_side = "left"
    return tok


def cheap_embedding(embed: torch.Tensor, tokenized) -> torch.Tensor:
    """Sum of the prompts' token embeddings (padding masked), L2-normalised: [hidden]."""
    h = embed.float()[tokenized["input_ids"]] * tokenized["attention_mask"].unsqueeze(-1)
    s = h.sum(dim=(0, 1))
    return s / s.norm().clamp(min=1e-8)


def _expert_vectors(experts: list[Expert], fn) -> torch.Tensor:
    """[layers, experts, hidden]: positive minus negative, L2-normalised per layer."""
    vecs = []
    for e in experts:
        v = fn(e.positive_prompts)
        if e.negative_prompts:
            v = v - fn(e.negative_prompts)
        vecs.append(v / v.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-8))
    return torch.stack(vecs, dim=1)


def gate_vectors(d: MoEDesign, experts: list[Expert], seed: int | None,
                 device: str = "cpu", salt: str = "") -> torch.Tensor:
    """Router weights [layers, len(experts), hidden] in float32."""
    mode, layers, hidden = d.config.gate_mode, d.layers, d.hidden
    if mode in ("random", "uniform_random"):
        out = []
        for layer in range(layers):
            g = torch.Generator().manual_seed(_seed(seed, f"{salt}router.{layer}"))
            if mode == "random":
                out.append(torch.randn(len(experts), hidden, generator=g))
            else:  # like nn.Linear's init: U(-1/√h, 1/√h)
                bound = 1 / math.sqrt(hidden)
                out.append(torch.rand(len(experts), hidden, generator=g) * 2 * bound - bound)
        return torch.stack(out)
    folder = d.base.ensure_local().folder
    tok = _tokenizer(folder)
    if mode == "cheap_embed":
        name = "model.embed_tokens.weight"
        info = d.base.index.tensors.get(name)
        if info is None:
            raise MergeError(f"{d.base.ref}: gate_mode cheap_embed needs '{name}'")
        with TensorReader() as reader:
            embed = reader.read(info, None)
        return _expert_vectors(experts, lambda ps: cheap_embedding(
            embed, _tokenize(tok, ps)).expand(layers, -1))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).to(device)
    model.eval()

    def hidden_states(prompts: tuple[str, ...]) -> torch.Tensor:
        batch = _tokenize(tok, prompts).to(device)
        with torch.no_grad():
            out = model(**batch, output_hidden_states=True, return_dict=True)
        h = torch.stack(out.hidden_states[:-1]).float()  # [layers, batch, seq, hidden]
        h = h.mean(dim=2) if mode == "hidden_avg" else h[:, :, -1, :]
        return h.mean(dim=1).cpu()

    return _expert_vectors(experts, hidden_states)  # the model is freed on return


def _seed(seed: int | None, name: str) -> int:
    h = hashlib.blake2b(f"{seed or 0}\0{name}".encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little") >> 1


def computed_key(d: MoEDesign, seed: int | None) -> str:
    """Names the computed tensors by what decides them: the config, the seed, the base."""
    files = []
    for f in d.base.index.files:
        try:
            st = os.stat(f)
            files.append([os.path.abspath(f), st.st_size, st.st_mtime_ns])
        except OSError:
            files.append([f])
    data = json.dumps([d.config.text, seed, files, d.out_config], sort_keys=True, default=str)
    return hashlib.sha256(data.encode()).hexdigest()[:24]


def write_computed(d: MoEDesign, folder: str, seed: int | None, device: str = "cpu") -> None:
    """Compute the routers (reading the base model) and write the side file, unless an
    earlier run with the same key already did (its bytes, and so a resume, stay valid)."""
    path = os.path.join(folder, COMPUTED_FILE)
    if os.path.exists(path) or not d.computed:
        return
    os.makedirs(folder, exist_ok=True)
    routers = gate_vectors(d, d.config.experts, seed, device)
    shared = (gate_vectors(d, d.config.shared_experts, seed, device, "shared.")
              if any(t.kind == "shared_router" for t in d.computed) else None)
    header, offsets = computed_layout(d.computed)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(header)
        for t in d.computed:
            if t.kind == "router":
                x = routers[t.layer]
            elif t.kind == "shared_router":
                assert shared is not None
                x = shared[t.layer]
            else:
                x = torch.zeros(t.shape)
            f.write(x.float().contiguous().reshape(t.shape).numpy().tobytes())
    os.replace(tmp, path)
