#!/usr/bin/env python3
"""A small, real skill benchmark for merge methods, on the CPU in about 15 minutes.

1. Pretrain a tiny Llama-shaped causal LM (character vocabulary) on a mixed corpus of four
   tasks — next letter, reversal, sorting, copying — mostly with short words (1–4 letters)
   and a few (5 %) long ones (5–6 letters): the base is partly competent at length 5–6.
2. Fine-tune four copies, each on one skill at length 5–6 (400 steps, lr 1e-4), with 30 %
   of the batches replayed from the pretraining mix, as careful fine-tunes do: the
   specialists.
3. Merge the four specialists onto the base with every method (a small grid over λ /
   density where it matters), through ``mergesmith.run`` like any recipe.
4. Report per-skill exact-match accuracy (greedy decoding, held-out length-5–6 examples)
   of the base, the specialists and every merge. Each method's setting is chosen on a
   validation set (200 examples per skill) and reported on a separate test set (500 per
   skill), with the share of the specialists' gains over the base that the merge keeps.

    .venv/bin/python bench/skills/run.py --workdir /tmp/msbench/skills [--quick]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import mergesmith
from mergesmith.methods import get_method

CHARS = list("0123456789abcdefgh+=>") + ["N", "R", "S", "C", " "]
PAD, EOS = len(CHARS), len(CHARS) + 1
VOCAB = len(CHARS) + 2
INDEX = {c: i for i, c in enumerate(CHARS)}
SKILLS = {"N": "next-letter", "R": "reversal", "S": "sorting", "C": "copying"}
PRETRAIN, PRETRAIN_LENGTHS = "NRSC", (1, 4)


def example(tag: str, rng: random.Random, lo: int, hi: int,
            long_share: float = 0.0, long: tuple[int, int] = (5, 6)) -> tuple[str, str]:
    """(prompt, answer) of one task instance with operands of length lo..hi (or, with
    probability ``long_share``, of the evaluation lengths ``long``)."""
    n = rng.randint(*long) if rng.random() < long_share else rng.randint(lo, hi)
    word = "".join(rng.choice("abcdefgh") for _ in range(n))
    shifted = "".join("abcdefgh"[("abcdefgh".index(c) + 1) % 8] for c in word)
    answer = {"N": shifted, "R": word[::-1], "S": "".join(sorted(word)), "C": word}[tag]
    return f"{tag} {word}>", answer


def encode(prompt: str, answer: str) -> tuple[list[int], int]:
    ids = [INDEX[c] for c in prompt + answer] + [EOS]
    return ids, len(prompt)


def batch(pairs: list[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and labels (loss on the answer and EOS only), right-padded."""
    enc = [encode(p, a) for p, a in pairs]
    width = max(len(ids) for ids, _ in enc)
    x = torch.full((len(enc), width), PAD)
    y = torch.full((len(enc), width), -100)
    for row, (ids, start) in enumerate(enc):
        x[row, :len(ids)] = torch.tensor(ids)
        y[row, start:len(ids)] = torch.tensor(ids[start:])
    return x, y


def train(model, tags: str, steps: int, lo: int, hi: int, seed: int, lr: float,
          long_share: float = 0.0, replay: float = 0.0, replay_long: float = 0.0) -> None:
    """AdamW with linear decay on batches of 64; with probability ``replay`` an example is
    drawn from the pretraining mix instead (keeps a fine-tune from forgetting the rest;
    ``replay_long`` is that mix's share of long words)."""
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for step in range(steps):
        x, y = batch([example(rng.choice(PRETRAIN), rng, *PRETRAIN_LENGTHS, replay_long)
                      if rng.random() < replay else
                      example(rng.choice(tags), rng, lo, hi, long_share) for _ in range(64)])
        loss = model(input_ids=x, labels=y).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        for group in opt.param_groups:  # linear decay
            group["lr"] = lr * (1 - (step + 1) / steps)


@torch.no_grad()
def accuracy(model, tag: str, lo: int, hi: int, n: int = 200, seed: int = 12345) -> float:
    """Exact-match rate of greedy answers on held-out examples."""
    rng = random.Random(seed + ord(tag))
    pairs = [example(tag, rng, lo, hi) for _ in range(n)]
    model.eval()
    correct = 0
    groups: dict[int, list[tuple[str, str]]] = {}
    for p, a in pairs:
        groups.setdefault(len(p), []).append((p, a))
    for plen, group in groups.items():
        ids = torch.tensor([[INDEX[c] for c in p] for p, _ in group])
        out = []
        for _ in range(max(len(a) for _, a in group) + 1):
            nxt = model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], 1)
            out.append(nxt)
        gen = torch.cat(out, 1)
        for row, (_, a) in enumerate(group):
            want = [INDEX[c] for c in a] + [EOS]
            correct += gen[row, :len(want)].tolist() == want
    return correct / n


VALIDATION_SEED, TEST_SEED = 777, 12345


def evaluate(folder: Path, n_val: int, n_test: int) -> dict[str, dict[str, float]]:
    """Accuracy per skill at length 5–6 on a validation set (to choose a method's setting)
    and a disjointly seeded test set (reported)."""
    model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return {split: {SKILLS[t]: accuracy(model, t, 5, 6, n, seed) for t in SKILLS}
            for split, n, seed in (("val", n_val, VALIDATION_SEED), ("test", n_test, TEST_SEED))}


def retained(scores: dict[str, float], base: dict[str, float],
             specialists: dict[str, float]) -> float:
    """Mean over skills of the share of the specialist's gain over the base that a merge
    keeps: (merge − base) / (specialist − base); 1 = every specialist's skill, 0 = the
    base, negative = worse than the base."""
    shares = [(scores[s] - base[s]) / (specialists[s] - base[s]) for s in SKILLS.values()
              if specialists[s] > base[s]]
    return sum(shares) / len(shares) if shares else float("nan")


GRID = {
    "task_arithmetic": [{"lambda": v} for v in (0.3, 0.5, 0.7)],
    "ties": [{"density": d, "lambda": v} for d in (0.3, 0.7) for v in (0.5, 1.0)],
    "dare_ties": [{"density": d, "lambda": v} for d in (0.3, 0.7) for v in (0.5, 1.0)],
    "magmax": [{"lambda": v} for v in (0.5, 1.0)],
    "consensus_ta": [{"lambda": v, "k": 2} for v in (0.5, 0.7)],
    "consensus_ties": [{"lambda": v, "density": 0.7, "k": 2} for v in (0.5, 1.0)],
    "iso_c": [{"lambda": v} for v in (0.3, 0.5, 1.0)],
    "iso_cts": [{"lambda": v} for v in (0.5, 1.0)],
    "tsv_m": [{"lambda": v} for v in (0.5, 1.0)],
    "star": [{"lambda": v, "normalize": True} for v in (1.0, 2.0)],
    "cart": [{"lambda": v, "rank_fraction": 0.25} for v in (0.5, 1.0)],
    "wudi": [{"lambda": v} for v in (0.5, 1.0)],
    "pcb": [{"lambda": v, "ratio": 0.3} for v in (0.5, 1.0)],
    "svc_ta": [{"lambda": v} for v in (0.5, 1.0)],
    # LiNeS: λ grows with depth from lines_alpha (first layer) to lines_alpha + lines_beta
    "task_arithmetic+lines": [{"lambda": 1.0, "lines_alpha": a, "lines_beta": b}
                              for a, b in ((0.3, 0.4), (0.2, 0.6), (0.4, 0.3))],
    # data-aware: statistics of each specialist on calibration data of its own skill
    # (λ scales the merged task vector from the base: 1 is the papers' methods)
    "regmean": [{"alpha": a, "lambda": v} for a in (0.5, 0.9, 1.0) for v in (1.0, 1.5)],
    "fisher": [{"fisher_normalize": n, "lambda": v} for n in (True, False) for v in (1.0, 1.5)],
    # RegMean++ needs the same calibration tokens through every model (a calibration:
    # block, MIXED_CALIBRATION); "regmean@mixed" is RegMean on those same tokens, to compare
    "regmean_plusplus": [{"alpha": a, "lambda": v} for a in (0.5, 0.9, 1.0) for v in (1.0, 1.5)],
    "regmean@mixed": [{"alpha": a, "lambda": v} for a in (0.5, 0.9, 1.0) for v in (1.0, 1.5)],
}

MIXED = {"regmean_plusplus", "regmean@mixed"}
"""Methods run with the recipe's ``calibration:`` block on a mixed set: 256 examples of each
skill (the calibration seeds below), one JSON line each, every model sees the same tokens."""

STATISTICS = {"regmean": "gram", "regmean_plusplus": "gram", "fisher": "fisher"}
"""Methods that read statistics, and which kind (``statistics: PATH`` per model)."""

CALIBRATION_SEED = 555
"""Seed of the calibration examples: the specialists' training distribution (their skill
at length 5–6), disjoint from the validation (777) and test (12345) seeds."""


def collect_statistics(folder: Path, tag: str, kind: str, out: Path, n: int = 256) -> Path:
    """The statistics artefact of one specialist on ``n`` calibration examples of its own
    skill (what RegMean and Fisher merging assume: each model's data): ``gram`` — Σ x xᵀ of
    the input of every ``nn.Linear`` at the non-padding positions (forward hooks on the
    whole model, float64); ``fisher`` — the empirical diagonal Fisher, mean over examples
    of the squared gradient of the answer's loss (one backward pass per example)."""
    from mergesmith.statistics.store import StatisticsWriter

    if out.exists():
        return out
    model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.eval()
    rng = random.Random(CALIBRATION_SEED + ord(tag))
    pairs = [example(tag, rng, 5, 6) for _ in range(n)]
    writer = StatisticsWriter()
    if kind == "gram":
        grams: dict[str, torch.Tensor] = {}
        tokens: dict[str, int] = {}
        keep: list[torch.Tensor] = []  # the batch's non-padding positions

        def hook(name: str):
            def collect(module, args, output):
                x = args[0].reshape(-1, args[0].shape[-1])[keep[0]].double()
                grams[name] = grams.get(name, 0) + x.T @ x
                tokens[name] = tokens.get(name, 0) + x.shape[0]
            return collect

        handles = [m.register_forward_hook(hook(name + ".weight"))
                   for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
        with torch.no_grad():
            for start in range(0, n, 64):
                x, _ = batch(pairs[start:start + 64])
                keep[:] = [(x != PAD).reshape(-1)]
                model(input_ids=x)
        for h in handles:
            h.remove()
        for name, gram in grams.items():
            writer.add_gram(name, gram, tokens[name])
    else:
        fisher = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
        for pair in pairs:
            x, y = batch([pair])
            model.zero_grad()
            model(input_ids=x, labels=y).loss.backward()
            for name, p in model.named_parameters():
                if p.grad is not None:
                    fisher[name].add_(p.grad.detach() ** 2)
        for name, f in fisher.items():
            writer.add_fisher(name, f / n)
    writer.save(out, {"calibration": f"skill {tag}, {n} examples, seed {CALIBRATION_SEED}"})
    return out


def save_tokenizer(folder: Path) -> None:
    """The character vocabulary as a tokenizer (ids of ``CHARS``, pad, EOS appended after
    each document as in training), so a ``calibration:`` block can tokenize text."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(CHARS)} | {"<pad>": PAD, "</s>": EOS}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>",
                                                       special_tokens=[("</s>", EOS)])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                            unk_token="<pad>").save_pretrained(folder)


def mixed_calibration(work: Path, n: int = 256) -> dict:
    """The ``calibration:`` block of the MIXED methods (writes the JSON Lines file once)."""
    path = work / "calibration.jsonl"
    if not path.exists():
        rows = []
        for tag in SKILLS:
            rng = random.Random(CALIBRATION_SEED + ord(tag))
            rows += [json.dumps({"text": p + a}) for p, a in
                     (example(tag, rng, 5, 6) for _ in range(n))]
        path.write_text("\n".join(rows) + "\n")
    return {"jsonl": str(path), "field": "text", "max_tokens": 16384, "max_length": 64,
            "batch_size": 16, "seed": 0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/mergesmith-skills"))
    ap.add_argument("--quick", action="store_true", help="fewer steps (a smoke test)")
    ap.add_argument("--scale", type=float, default=1.0,
                    help="multiply the training steps (default 1: 1200 + 4 × 400)")
    ap.add_argument("--long-share", type=float, default=0.05,
                    help="share of length-5–6 examples in pretraining (the base's competence)")
    ap.add_argument("--ft-steps", type=int, default=400, help="fine-tuning steps per skill")
    ap.add_argument("--seed", type=int, default=0, help="seed of initialisation and data")
    ap.add_argument("--methods", default=",".join(GRID))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    scale = 0.2 if args.quick else args.scale
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=384,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=64, tie_word_embeddings=False,
                         pad_token_id=PAD, eos_token_id=EOS, bos_token_id=EOS)
    base_dir = work / "base"
    if not (base_dir / "model.safetensors").exists():
        torch.manual_seed(args.seed)
        model = LlamaForCausalLM(config)
        train(model, PRETRAIN, int(1200 * scale), *PRETRAIN_LENGTHS, seed=1 + args.seed,
              lr=3e-3, long_share=args.long_share)
        model.save_pretrained(base_dir)
    print(f"base ready ({time.time() - t0:.0f}s)", flush=True)
    for tag in SKILLS:
        folder = work / f"ft_{SKILLS[tag]}"
        if not (folder / "model.safetensors").exists():
            torch.manual_seed(1 + args.seed)
            model = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
            train(model, tag, int(args.ft_steps * scale), 5, 6, seed=10 + ord(tag) + args.seed,
                  lr=1e-4, replay=0.3, replay_long=args.long_share)
            model.save_pretrained(folder)
        print(f"{folder.name} ready ({time.time() - t0:.0f}s)", flush=True)
    n_val, n_test = (50, 100) if args.quick else (200, 500)
    results = [{"model": "base", "settings": "", **evaluate(base_dir, n_val, n_test)}]
    for tag in SKILLS:
        results.append({"model": f"specialist: {SKILLS[tag]}", "settings": "",
                        **evaluate(work / f"ft_{SKILLS[tag]}", n_val, n_test)})
    from mergesmith.methods import all_methods

    for method in args.methods.split(","):
        if method.split("+")[0].split("@")[0] not in all_methods():
            print(f"{method}: not a registered method here, skipped", flush=True)
            continue
        calibration = None
        if method in MIXED:
            for folder in [base_dir, *(work / f"ft_{SKILLS[t]}" for t in SKILLS)]:
                save_tokenizer(folder)
            calibration = mixed_calibration(work)
        kind = None if calibration else STATISTICS.get(method)
        stats = {t: collect_statistics(work / f"ft_{SKILLS[t]}", t, kind,
                                       work / "statistics" / f"{kind}_{SKILLS[t]}.safetensors")
                 for t in SKILLS} if kind else {}
        for settings in GRID[method]:
            per_model = {k: v for k, v in settings.items() if k in ("density",)}
            shared = {k: v for k, v in settings.items() if k not in per_model}
            spec = get_method(method.split("+")[0].split("@")[0])
            weight = {"weight": 1.0} if spec.param("weight") is not None else {}
            models = [{"model": str(work / f"ft_{SKILLS[t]}")} for t in SKILLS]
            for t, m in zip(SKILLS, models):
                if weight or per_model or stats:
                    m["parameters"] = {**weight, **per_model}
                if stats:
                    m["parameters"]["statistics"] = str(stats[t])
            recipe = {"merge_method": spec.name, "base_model": str(base_dir), "models": models,
                      "parameters": shared, "seed": 0}
            if calibration:
                recipe["calibration"] = calibration
            out = work / "merged"
            shutil.rmtree(out, ignore_errors=True)
            mergesmith.run(recipe, out, threads=args.threads)
            row = {"model": method, "settings": json.dumps(settings),
                   **evaluate(out, n_val, n_test)}
            results.append(row)
            print(json.dumps(row), flush=True)
    for r in results:
        for split in ("val", "test"):
            r[split]["mean"] = sum(r[split][s] for s in SKILLS.values()) / len(SKILLS)
    base = results[0]["test"]
    own = {SKILLS[t]: results[1 + i]["test"][SKILLS[t]] for i, t in enumerate(SKILLS)}
    for r in results:
        r["test"]["retained"] = retained(r["test"], base, own)
    (work / "results.json").write_text(json.dumps(results, indent=1))
    best: dict[str, dict] = {}  # chosen on the validation set, reported on the test set
    for r in results:
        key = r["model"]
        if key not in best or r["val"]["mean"] > best[key]["val"]["mean"]:
            best[key] = r
    lines = ["| model | setting (chosen on validation) | " + " | ".join(SKILLS.values())
             + " | mean | gain kept |",
             "|---|---|" + "---:|" * (len(SKILLS) + 2)]
    for r in sorted(best.values(), key=lambda r: (not r["model"].startswith(("base", "spec")),
                                                  -r["test"]["retained"])):
        t = r["test"]
        kept = "" if r["model"].startswith(("base", "spec")) else f"{100 * t['retained']:.0f} %"
        lines.append(f"| {r['model']} | {r['settings']} | "
                     + " | ".join(f"{t[s]:.2f}" for s in SKILLS.values())
                     + f" | {t['mean']:.3f} | {kept} |")
    table = "\n".join(lines)
    (work / "results.md").write_text(table + "\n")
    print("\n" + table)
    print(f"\ntotal {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
