"""Regenerate the mergekit-moe reference outputs in tests/data/moe/ (not used by the tests).

Run with the python of a venv holding mergekit 0.1.5 (and torch 2.13.0):

    python3.11 -m venv /tmp/mkvenv
    /tmp/mkvenv/bin/pip install torch==2.13.0
    echo torch==2.13.0 > /tmp/c.txt && /tmp/mkvenv/bin/pip install -c /tmp/c.txt mergekit==0.1.5
    /tmp/mkvenv/bin/python tests/data/moe/make_expected.py

It builds the tiny inputs with tests/moe_inputs.py into a scratch folder, writes each
case's config.yml, runs ``mergekit-moe config.yml out --device cpu [--random-seed N]`` in
a working directory that holds ``inputs/<model>``, and stores per case (see README.md):
config.yml, cli.txt, config.json, tokenizer_config.json, tensors.json (every output
tensor: shape, dtype, SHA-256 of its raw bytes), expected.safetensors (routers and the
layer-0 expert tensors), log.txt; for refused configs error.txt.  It also replays the
gate computations outside mergekit (checks.json) to confirm the semantics described in
the README.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # tests/ (for moe_inputs)
import moe_inputs  # noqa: E402

MOE = str(Path(sys.executable).with_name("mergekit-moe"))

P_CODE = ["Write a Python function that sorts a list.", "def add(a, b): return a + b"]
P_MATH = ["Solve for x: 2x + 3 = 11.", "The integral of x squared"]
P_STORY = ["Once upon a time a dragon", "She wrote a short story"]
P_CHAT = ["Tell me a joke about cats.", "Explain how photosynthesis works."]
P_GENERAL = ["The quick brown fox jumps over the lazy dog."]


def expert(model, pos=None, neg=None, **extra):
    e = {"source_model": f"inputs/{model}"}
    if pos is not None:
        e["positive_prompts"] = pos
    if neg is not None:
        e["negative_prompts"] = neg
    e.update(extra)
    return e


def llama_experts(n=4, neg=True):
    prompts = [P_CODE, P_MATH, P_STORY, P_CHAT]
    out = []
    for i in range(n):
        negs = prompts[(i + 1) % 4] if (neg and i == 0) else None
        out.append(expert(f"llama_e{i}", prompts[i], negs))
    return out


def mixtral(gate_mode, n=4, **extra):
    cfg = {"base_model": "inputs/llama_base", "gate_mode": gate_mode, "dtype": "bfloat16",
           "experts_per_token": 2, "experts": llama_experts(n)}
    cfg.update(extra)
    return cfg


# case -> (config dict, extra CLI args, note)
CASES = {
    "mixtral_cheap_embed": (mixtral("cheap_embed"), [], "4 Llama experts, cheap_embed"),
    "mixtral_hidden": (mixtral("hidden"), [], "4 Llama experts, hidden (last token)"),
    "mixtral_hidden_avg": (mixtral("hidden_avg"), [], "hidden_avg: mean over positions"),
    "mixtral_random": (
        {"base_model": "inputs/llama_base", "gate_mode": "random", "dtype": "bfloat16",
         "experts": [expert(f"llama_e{i}") for i in range(3)]},
        ["--random-seed", "42"], "3 experts without prompts, random gates, seed 42"),
    "mixtral_uniform_random": (mixtral("uniform_random", n=4),
                               ["--random-seed", "42"], "uniform_random, seed 42"),
    "mixtral_scales_top1": (
        {"base_model": "inputs/llama_base", "gate_mode": "cheap_embed", "dtype": "float32",
         "experts_per_token": 1,
         "experts": [expert("llama_e0", P_CODE, residual_scale=0.5),
                     expert("llama_e1", P_MATH, noise_scale=0.01),
                     expert("llama_e2", P_STORY, noise_scale=0.02, residual_scale=2.0),
                     expert("llama_e3", P_CHAT)]},
        ["--random-seed", "7"], "experts_per_token 1, residual_scale/noise_scale, float32"),
    "mixtral_default_dtype": (
        {"base_model": "inputs/llama_base", "gate_mode": "cheap_embed",
         "experts": [expert("llama_e0", P_CODE), expert("llama_e1", P_MATH)]},
        [], "no dtype: falls back to the base config's dtype (bfloat16)"),
    "qwen2_moe_shared": (
        {"base_model": "inputs/qwen2_base", "gate_mode": "hidden", "dtype": "bfloat16",
         "experts": [expert("qwen2_e0", P_CODE), expert("qwen2_e1", P_MATH, P_STORY),
                     expert("qwen2_e2", P_CHAT)],
         "shared_experts": [expert("qwen2_base", P_GENERAL, residual_scale=0.1)]},
        [], "3 Qwen2 experts + the base as gated shared expert (residual_scale 0.1)"),
    "qwen2_moe_from_llama": (
        {"base_model": "inputs/llama_base", "gate_mode": "cheap_embed", "dtype": "bfloat16",
         "architecture": "qwen",
         "experts": [expert("llama_e0", P_CODE), expert("llama_e1", P_MATH)],
         "shared_experts": [expert("llama_e0", P_GENERAL)]},
        [], "Llama inputs forced to Qwen MoE: zero q/k/v biases; shared = expert 0"),
    "qwen3_moe": (
        {"base_model": "inputs/qwen3_base", "gate_mode": "hidden", "dtype": "bfloat16",
         "experts": [expert("qwen3_e0", P_CODE), expert("qwen3_e1", P_MATH)]},
        [], "Qwen3 experts -> Qwen3MoeForCausalLM"),
    "deepseek_shared": (
        {"base_model": "inputs/llama_base", "gate_mode": "cheap_embed", "dtype": "bfloat16",
         "experts": [expert("llama_e0", P_CODE), expert("llama_e1", P_MATH),
                     expert("llama_e2", P_STORY)],
         "shared_experts": [expert("llama_base", residual_scale=0.5)]},
        [], "Llama experts + the base as ungated shared expert -> DeepSeek MoE"),
    # ---- configs mergekit refuses (or crashes on) ----
    "error_shared_expert_not_loaded": (
        {"base_model": "inputs/qwen2_base", "gate_mode": "cheap_embed", "dtype": "bfloat16",
         "experts": [expert("qwen2_e0", P_CODE), expert("qwen2_e1", P_MATH)],
         "shared_experts": [expert("qwen2_e2", P_GENERAL)]},
        [], "bug: a shared expert that is neither the base nor an expert has no loader"),
    "error_deepseek_shared_not_loaded": (
        {"base_model": "inputs/llama_base", "gate_mode": "cheap_embed",
         "experts": [expert("llama_e0", P_CODE), expert("llama_e1", P_MATH)],
         "shared_experts": [expert("llama_e3")]},
        [], "same bug on the DeepSeek path"),
    "error_two_shared_experts": (
        {"base_model": "inputs/llama_base", "gate_mode": "cheap_embed",
         "experts": [expert("llama_e0", P_CODE), expert("llama_e1", P_MATH)],
         "shared_experts": [expert("llama_e2"), expert("llama_e3")]},
        [], "several shared experts: no output architecture accepts it"),
    "error_mixed_llama_mistral": (
        {"base_model": "inputs/mistral_base", "gate_mode": "cheap_embed",
         "experts": [expert("llama_e0", P_CODE), expert("llama_e1", P_MATH)]},
        [], "Mistral base + Llama experts: model_type differs"),
    "error_qwen3_shared": (
        {"base_model": "inputs/qwen3_base", "gate_mode": "cheap_embed",
         "experts": [expert("qwen3_e0", P_CODE), expert("qwen3_e1", P_MATH)],
         "shared_experts": [expert("qwen3_e0", P_GENERAL)]},
        [], "Qwen3 inputs with a shared expert"),
    "error_identical_prompts": (
        {"base_model": "inputs/llama_base", "gate_mode": "hidden",
         "experts": [expert("llama_e0", P_CODE), expert("llama_e1", P_CODE)]},
        [], "all experts with identical prompts"),
    "error_same_models": (
        {"base_model": "inputs/llama_base", "gate_mode": "cheap_embed",
         "experts": [expert("llama_e0", P_CODE), expert("llama_e0", P_MATH)]},
        [], "all experts the same model, without the flag"),
    "error_uniform_random_no_prompts": (
        {"base_model": "inputs/llama_base", "gate_mode": "uniform_random",
         "experts": [expert("llama_e0"), expert("llama_e1")]},
        ["--random-seed", "1"], "uniform_random still requires prompts"),
    "error_too_few_experts": (
        {"base_model": "inputs/llama_base", "gate_mode": "random", "experts_per_token": 3,
         "experts": [expert("llama_e0"), expert("llama_e1")]},
        [], "experts_per_token > number of experts"),
    "error_qwen_shared_no_prompts": (
        {"base_model": "inputs/qwen2_base", "gate_mode": "cheap_embed",
         "experts": [expert("qwen2_e0", P_CODE), expert("qwen2_e1", P_MATH)],
         "shared_experts": [expert("qwen2_e2")]},
        [], "Qwen2 inputs, shared expert without prompts"),
}


def sha(t: torch.Tensor) -> str:
    t = t.contiguous()
    raw = t.view(torch.uint8) if t.dtype != torch.uint8 else t
    return hashlib.sha256(raw.numpy().tobytes()).hexdigest()


def load_out(out: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for f in sorted(out.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                tensors[k] = h.get_tensor(k)
    return tensors


def run_moe(work: Path, cfg_path: Path, out: Path, args: list[str]):
    cmd = [MOE, str(cfg_path.relative_to(work)), str(out.relative_to(work)),
           "--device", "cpu", *args]
    env = dict(os.environ, PYTHONHASHSEED="0", CUDA_VISIBLE_DEVICES="")
    p = subprocess.run(cmd, cwd=work, capture_output=True, text=True, env=env)
    return cmd, p


def clean_log(text: str, work: Path) -> str:
    lines = [ln for ln in text.replace(str(work), "<work>").splitlines()
             if "%|" not in ln and "it/s]" not in ln and ln.strip()]
    return "\n".join(lines) + "\n"


def keep_tensor(name: str) -> bool:
    return (name.endswith("mlp.gate.weight") or "shared_expert_gate" in name
            or ".layers.0.mlp." in name)


def write_case(name, cfg, args, note, work: Path, dest: Path):
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.iterdir():
        old.unlink()
    cfg_path = work / f"{name}.yml"
    text = yaml.safe_dump(cfg, sort_keys=False, width=100)
    cfg_path.write_text(text)
    (dest / "config.yml").write_text(text)
    out = work / "out" / name
    cmd, p = run_moe(work, cfg_path, out, args)
    cli = "mergekit-moe config.yml OUT " + " ".join(cmd[5:])
    (dest / "cli.txt").write_text(cli.strip() + "\n")
    summary = {"case": name, "note": note, "cli": cli.strip(), "returncode": p.returncode}
    log = clean_log(p.stderr + p.stdout, work)
    if p.returncode != 0 or not (out / "config.json").exists():
        (dest / "error.txt").write_text(f"exit code {p.returncode}\n" + log)
        return summary
    (dest / "log.txt").write_text(log)
    shutil.copy(out / "config.json", dest / "config.json")
    if (out / "tokenizer_config.json").exists():
        shutil.copy(out / "tokenizer_config.json", dest / "tokenizer_config.json")
    tensors = load_out(out)
    manifest = {
        "files": sorted(p.name for p in out.iterdir()),
        "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch."),
                        "sha256": sha(v)} for k, v in sorted(tensors.items())},
    }
    (dest / "tensors.json").write_text(json.dumps(manifest, indent=1) + "\n")
    kept = {k: v.contiguous() for k, v in tensors.items() if keep_tensor(k)}
    save_file(kept, str(dest / "expected.safetensors"), metadata={"format": "pt"})
    summary["tensors"] = len(tensors)
    summary["stored"] = sorted(kept)
    return summary


# ---------------------------------------------------------------- replays of the gates
def tokenize(tok, prompts):
    return tok([(tok.bos_token or "") + p for p in prompts], return_tensors="pt",
               padding=True, add_special_tokens=False)


def hidden_gate(model, tok, pos, neg, average=False):
    def states(prompts):
        with torch.no_grad():
            o = model(**tokenize(tok, prompts), output_hidden_states=True)
        h = torch.stack(o.hidden_states[:-1])
        h = h.sum(dim=2) / h.shape[2] if average else h[:, :, -1, :]
        return h.sum(dim=1) / h.shape[1]
    h = states(pos)
    if neg:
        h -= states(neg)
    return h / h.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-8)


def cheap_gate(embed, tok, pos, neg, layers):
    def emb(prompts):
        t = tokenize(tok, prompts)
        h = torch.nn.functional.one_hot(t["input_ids"], embed.shape[0]).float() @ embed.float()
        e = (h * t["attention_mask"].unsqueeze(-1)).sum(dim=1).sum(dim=0, keepdim=True)
        return (e / e.norm(dim=-1, keepdim=True).clamp(min=1e-8)).repeat(layers, 1)
    h = emb(pos)
    if neg:
        h -= emb(neg)
    return h / h.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-8)


def replay_checks(work: Path) -> dict:
    """Recompute gates/noise outside mergekit and compare with its outputs."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    res = {}
    tok = AutoTokenizer.from_pretrained(work / "inputs/llama_base")
    tok.padding_side = "left"
    tok.pad_token_id = tok.bos_token_id
    L = moe_inputs.LAYERS

    def routers(case):
        t = load_out(work / "out" / case)
        return torch.stack([t[f"model.layers.{i}.mlp.gate.weight"] for i in range(L)])

    def diff(a, b):
        return float((a.float() - b.float()).abs().max())

    def gates(fn):
        return torch.stack([fn(e) for e in CASES["mixtral_hidden"][0]["experts"]]).permute(1, 0, 2)

    for dtype, label in ((torch.bfloat16, "bf16_forward"), (torch.float32, "fp32_forward")):
        model = AutoModelForCausalLM.from_pretrained(work / "inputs/llama_base", dtype=dtype)
        for case, avg in (("mixtral_hidden", False), ("mixtral_hidden_avg", True)):
            g = gates(lambda e: hidden_gate(model, tok, e.get("positive_prompts"),
                                            e.get("negative_prompts"), average=avg))
            mk = routers(case)
            res[f"{case}.{label}.max_abs_diff"] = diff(g.to(torch.bfloat16), mk)
            res[f"{case}.{label}.exact"] = bool(torch.equal(g.to(torch.bfloat16), mk))
    embed = load_out(work / "inputs/llama_base")["model.embed_tokens.weight"]
    g = gates(lambda e: cheap_gate(embed, tok, e.get("positive_prompts"),
                                   e.get("negative_prompts"), L))
    res["mixtral_cheap_embed.replay_exact"] = bool(
        torch.equal(g.to(torch.bfloat16), routers("mixtral_cheap_embed")))
    torch.manual_seed(42)
    g = torch.randn((L, 3, moe_inputs.HIDDEN))
    res["mixtral_random.manual_seed42_randn_exact"] = bool(
        torch.equal(g.to(torch.bfloat16), routers("mixtral_random")))
    torch.manual_seed(42)
    s = math.sqrt(1.0 / moe_inputs.HIDDEN)
    g = torch.rand((L, 4, moe_inputs.HIDDEN)) * 2 * s - s
    res["mixtral_uniform_random.manual_seed42_rand_exact"] = bool(
        torch.equal(g.to(torch.bfloat16), routers("mixtral_uniform_random")))
    # noise: seed 7, then (cheap_embed uses no RNG) per layer, per expert, gate/down/up
    out = load_out(work / "out/mixtral_scales_top1")
    exps = CASES["mixtral_scales_top1"][0]["experts"]
    torch.manual_seed(7)
    ok = True
    for layer in range(L):
        gu, dn = [], []
        for e in exps:
            src = load_out(work / e["source_model"])
            parts = {}
            for p in ("gate_proj", "down_proj", "up_proj"):
                t = src[f"model.layers.{layer}.mlp.{p}.weight"]
                if e.get("noise_scale") is not None:
                    t = t + torch.randn_like(t) * e["noise_scale"]
                if p == "down_proj" and e.get("residual_scale") is not None:
                    t = t * e["residual_scale"]
                parts[p] = t
            gu.append(torch.cat([parts["gate_proj"], parts["up_proj"]], dim=0))
            dn.append(parts["down_proj"])
        pre = f"model.layers.{layer}.mlp.experts."
        ok &= torch.equal(torch.stack(gu).float(), out[pre + "gate_up_proj"])
        ok &= torch.equal(torch.stack(dn).float(), out[pre + "down_proj"])
    res["mixtral_scales_top1.noise_replay_exact"] = bool(ok)
    return res


def random_reproducibility(work: Path) -> dict:
    cfg_path = work / "mixtral_random.yml"
    res = {}
    runs = {"seed42_a": ["--random-seed", "42"], "seed42_b": ["--random-seed", "42"],
            "seed43": ["--random-seed", "43"], "noseed_a": [], "noseed_b": []}
    hashes = {}
    for label, args in runs.items():
        out = work / "out" / f"rand_{label}"
        _, p = run_moe(work, cfg_path, out, args)
        t = load_out(out)
        hashes[label] = sha(torch.stack([t[f"model.layers.{i}.mlp.gate.weight"]
                                         for i in range(moe_inputs.LAYERS)]))
    res["same_seed_identical"] = hashes["seed42_a"] == hashes["seed42_b"]
    res["different_seed_differs"] = hashes["seed42_a"] != hashes["seed43"]
    res["no_seed_runs_identical"] = hashes["noseed_a"] == hashes["noseed_b"]
    res["router_sha256"] = hashes
    return res


def main():
    import mergekit

    only = sys.argv[1].split(",") if len(sys.argv) > 1 else None
    work = Path(tempfile.mkdtemp(prefix="moe_expected_"))
    moe_inputs.write_all(work / "inputs")
    if only:  # quick iteration: just these cases, no cases.json
        for name in only:
            print(name, write_case(name, *CASES[name], work, HERE / name)["returncode"])
        shutil.rmtree(work)
        return
    digests = moe_inputs.file_digests(work / "inputs")
    (HERE / "inputs.sha256").write_text(
        "".join(f"{h}  {n}\n" for n, h in digests.items()))
    summaries = []
    for name, (cfg, args, note) in CASES.items():
        s = write_case(name, cfg, args, note, work, HERE / name)
        print(name, s["returncode"], flush=True)
        summaries.append(s)
    checks = replay_checks(work)
    checks["random_reproducibility"] = random_reproducibility(work)
    import tokenizers
    import transformers

    meta = {"mergekit": mergekit.__version__ if hasattr(mergekit, "__version__") else "0.1.5",
            "torch": torch.__version__, "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__, "python": sys.version.split()[0]}
    (HERE / "cases.json").write_text(json.dumps(
        {"versions": meta, "cases": summaries, "checks": checks}, indent=1) + "\n")
    print(json.dumps(checks, indent=1))
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
