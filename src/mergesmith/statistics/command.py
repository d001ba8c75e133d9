"""The ``mergesmith stats MODEL`` command: compute (or find in the cache) a model's
statistics on calibration data."""

from __future__ import annotations

import os
import sys
from typing import Any

import click

from ..cli import EPILOG, cli, friendly
from ..errors import MergeError


def resolve_model(model: str, where: str = "MODEL") -> Any:
    """A model folder (or ``base+adapter``, a GGUF, a cached Hub id) as a ModelSource,
    without reading weights."""
    from ..checkpoint import resolve
    from ..recipe.refs import parse_model_reference

    source = resolve(parse_model_reference(model, where), where)
    if source.config is None:
        raise MergeError(f"{where} {model}: has no config.json (the statistics pass builds "
                         "the model from it)")
    return source


def calibration_settings(calibration: str | None, text: str | None, jsonl: str | None,
                         **overrides: Any) -> Any:
    """Settings from ``--calibration FILE.yml`` (a recipe with a ``calibration:`` block,
    or a YAML mapping of the block) or from ``--text``/``--jsonl``; flags override."""
    from ..recipe.schema import parse_calibration_block, read_yaml_document
    from .calibration import settings_from

    given = [n for n, v in (("--calibration", calibration), ("--text", text),
                            ("--jsonl", jsonl)) if v is not None]
    if len(given) != 1:
        raise MergeError("give the calibration data as exactly one of --calibration "
                         "FILE.yml, --text FILE or --jsonl FILE"
                         + (f" (got {' and '.join(given)})" if given else ""))
    if calibration is not None:
        data, _, name, _ = read_yaml_document(calibration, "calibration")
        if isinstance(data, dict) and "merge_method" in data:
            data = data.get("calibration")
            if data is None:
                raise MergeError(f"{name}: the recipe has no 'calibration:' block")
        block = parse_calibration_block(data, f"{name}: calibration")
    else:
        block = parse_calibration_block({"text": text} if text is not None
                                        else {"jsonl": jsonl}, "calibration")
    return settings_from(block, **overrides)


@cli.command("stats", epilog=EPILOG)
@click.argument("model", type=click.Path())
@click.option("--calibration", type=click.Path(), default=None, metavar="FILE.yml",
              help="A recipe with a 'calibration:' block, or a YAML file of the block.")
@click.option("--text", type=click.Path(), default=None, metavar="FILE",
              help="Calibration text (one document).")
@click.option("--jsonl", type=click.Path(), default=None, metavar="FILE",
              help="Calibration JSONL, one document per line.")
@click.option("--field", "field_name", default=None,
              help="The key of --jsonl lines [default: text].")
@click.option("--chat-template", is_flag=True, default=None,
              help="--jsonl rows hold 'messages' lists, rendered by the chat template.")
@click.option("--max-tokens", type=click.IntRange(min=2), default=None,
              help="Calibration tokens in all [default: 16384].")
@click.option("--max-length", type=click.IntRange(min=2), default=None,
              help="Tokens per sequence [default: 512].")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Sequences per batch (one Fisher gradient each) [default: 8].")
@click.option("--seed", type=click.IntRange(min=0), default=None,
              help="Which documents and windows are taken [default: 0].")
@click.option("--kinds", default="gram", show_default=True, metavar="gram,fisher",
              help="gram (RegMean), fisher (Fisher merging), or both.")
@click.option("--tokenizer", type=click.Path(), default=None, metavar="PATH",
              help="Tokenizer folder [default: MODEL's own].")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--out", type=click.Path(), default=None, metavar="PATH",
              help="Write the artefact folder to PATH instead of the cache "
                   "(~/.cache/mergesmith/stats or $MERGESMITH_STATS_CACHE).")
@click.option("--no-cache", is_flag=True, help="Recompute even when cached.")
@click.option("--quiet", "-q", is_flag=True, help="No progress lines.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@friendly
def stats(model: str, calibration: str | None, text: str | None, jsonl: str | None,
          field_name: str | None, chat_template: bool | None, max_tokens: int | None,
          max_length: int | None, batch_size: int | None, seed: int | None, kinds: str,
          tokenizer: str | None, device: str, out: str | None, no_cache: bool, quiet: bool,
          debug: bool) -> None:
    """Compute MODEL's statistics on calibration data, layer by layer: the Gram matrix of
    every linear layer's inputs (RegMean) and/or the diagonal Fisher (Fisher merging).

    The data is checked and tokenized before any weight is read. Results are cached by
    model content, tokens and settings; the command prints where the artefact is.

    \b
    Example:
      mergesmith stats ./ft_math --text calib.txt --max-tokens 4096 --kinds gram,fisher
    """
    from .calibration import load_tokenizer, tokenize
    from .collect import KINDS, compute_statistics

    kind_set = {k.strip() for k in kinds.split(",") if k.strip()}
    if not kind_set or kind_set - set(KINDS):
        raise MergeError(f"--kinds {kinds}: use gram, fisher or gram,fisher")
    s = calibration_settings(calibration, text, jsonl, field_name=field_name,
                             chat_template=chat_template, max_tokens=max_tokens,
                             max_length=max_length, batch_size=batch_size, seed=seed)
    from .calibration import read_documents

    docs = read_documents(s)  # before the model: a bad file is the first error
    source = resolve_model(model)
    folder = tokenizer or source.folder
    if tokenizer is not None and not os.path.exists(tokenizer):
        raise MergeError(f"--tokenizer {tokenizer}: not found")
    tokens = tokenize(s, load_tokenizer(folder, "calibration"), folder, docs)
    source.ensure_local()

    def progress(line: str) -> None:
        if not quiet:
            click.echo(f"  {line}", err=True)

    result = compute_statistics(source, tokens, kind_set, device=device,
                                cache=not no_cache, out=out, progress=progress)
    where = getattr(result, "folder", None)
    grams = result.names("gram")
    fishers = result.names("fisher")
    what = []
    if "gram" in kind_set:
        what.append(f"Gram matrices of {len(grams)} linear layers")
    if "fisher" in kind_set:
        what.append(f"diagonal Fisher of {len(fishers)} tensors")
    click.echo(f"statistics of {model}: {' and '.join(what)} on {tokens.tokens} tokens "
               f"({tokens.input_ids.shape[0]} sequences of up to {tokens.input_ids.shape[1]})")
    click.echo(f"in {where}" + (" (from the cache)" if getattr(result, "cached", False)
                                else ""))
    sys.stdout.flush()
