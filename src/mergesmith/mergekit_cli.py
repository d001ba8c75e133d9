"""``mergesmith mergekit-yaml CONFIG OUT [flags]`` and the console script ``mergesmith-yaml``:
mergekit 0.1.5's ``mergekit-yaml`` command line, run by mergesmith's engine.

Every flag of ``mergekit-yaml`` is accepted, and each is one of three kinds (the table
:data:`MERGEKIT_YAML_FLAGS` is the single list; the help and the tests read it):

* mapped: mergesmith has the feature, and the flag sets it (``--random-seed`` → the seed,
  ``--cuda``/``--device``/``--multi-gpu`` → where the math runs, ``--out-shard-size`` → the
  largest output file ...);
* noted: the flag tunes something a streaming engine does not have (lazy unpickling, a
  LoRA cache, asynchronous writes ...); it is accepted and, when it asks for something,
  one line on stderr says why it has no effect;
* refused: ``--trust-remote-code`` (mergesmith never runs a model repository's code).

The merge itself is ``mergesmith run``'s: same options object, progress bar, output and
exit codes (2 a user error, 1 an I/O failure, 130 interrupted).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import click

from .cli import EPILOG, cli, friendly, merge_and_report, run_console_script
from .errors import MergeError

MAPPED = "mapped"
NOTED = "noted"
REFUSED = "refused"


@dataclass(frozen=True)
class MergekitFlag:
    """One option of mergekit 0.1.5's ``mergekit-yaml`` and what mergesmith does with it."""

    name: str
    """mergekit's field name (``MergeOptions``), also the click parameter name."""
    decls: tuple[str, ...]
    """The spellings, as mergekit declares them (``--x/--no-x`` for its booleans)."""
    kind: str
    """:data:`MAPPED`, :data:`NOTED` or :data:`REFUSED`."""
    help: str
    """What mergesmith does with it (the ``--help`` text)."""
    type: Any = None
    """The click type of an option that takes a value; None: a flag."""
    default: Any = False
    note: str = ""
    """Printed on stderr when the flag is given a value other than its default."""
    count: bool = False
    metavar: str | None = None

    def click_option(self) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        kwargs: dict[str, Any] = {"help": self.help}
        if self.count:
            kwargs["count"] = True
        elif self.type is not None:
            kwargs.update(type=self.type, default=self.default)
            if self.metavar:
                kwargs["metavar"] = self.metavar
        elif "/" in self.decls[0]:
            kwargs["default"] = self.default
        else:
            kwargs["is_flag"] = True
        return click.option(*self.decls, self.name, **kwargs)


_SIZE_HELP = ("Largest output file: a whole number with an optional K, M or B suffix "
              "(thousand, million, billion), or a byte size such as 2GB  [default: 5B]. "
              "mergekit's help says parameters, but mergekit 0.1.5 counts the bytes of each "
              "shard (1B: files of at most 10⁹ bytes), and so does this command: the same "
              "files. 0: a single file.")

MERGEKIT_YAML_FLAGS: tuple[MergekitFlag, ...] = (
    # -- mapped: mergesmith has the feature ------------------------------------------
    MergekitFlag("out_shard_size", ("--out-shard-size",), MAPPED, _SIZE_HELP,
                 type=click.STRING, default="5B", metavar="SIZE"),
    MergekitFlag("random_seed", ("--random-seed",), MAPPED,
                 "Seed for random methods (DARE, DELLA ...); overrides the recipe's 'seed:'.",
                 type=click.INT, default=None),
    MergekitFlag("allow_crimes", ("--allow-crimes/--no-allow-crimes",), MAPPED,
                 "Allow inputs whose config.json architectures differ."),
    MergekitFlag("unsafe_truncate_embeddings",
                 ("--unsafe-truncate-embeddings/--no-unsafe-truncate-embeddings",), MAPPED,
                 "UNSAFE: cut embeddings and LM heads of models with different vocabulary "
                 "sizes to the smallest (prefer a 'tokenizer:' block)."),
    MergekitFlag("cuda", ("--cuda/--no-cuda",), MAPPED,
                 "Do the math on the GPU (--device cuda)."),
    MergekitFlag("device", ("--device",), MAPPED,
                 "Where the math runs: cpu, cuda, cuda:N, mps or auto (overrides --cuda).",
                 type=click.STRING, default=None),
    MergekitFlag("multi_gpu", ("--multi-gpu/--no-multi-gpu",), MAPPED,
                 "Spread the tensors over every visible GPU (as 'mergesmith run --devices "
                 "0,1,...'; CUDA_VISIBLE_DEVICES chooses them)."),
    MergekitFlag("gpu_rich", ("--gpu-rich",), MAPPED,
                 "mergekit's alias for --cuda --low-cpu-memory --read-to-gpu --multi-gpu: "
                 "every visible GPU (the other two parts have no effect).",
                 note="--gpu-rich: the math runs on every visible GPU (--multi-gpu); its "
                      "--low-cpu-memory and --read-to-gpu parts have no effect in a "
                      "streaming merge"),
    MergekitFlag("num_threads", ("--num-threads", "-j"), MAPPED,
                 "Worker threads [default: number of CPU cores]; the output is the same "
                 "for any number.", type=click.IntRange(min=1), default=None),
    MergekitFlag("copy_tokenizer", ("--copy-tokenizer/--no-copy-tokenizer",), MAPPED,
                 "Copy the donor's tokenizer files (and chat template) to the output  "
                 "[default: copy-tokenizer]. A 'tokenizer:' block's tokenizer is always "
                 "written.", default=True),
    MergekitFlag("write_model_card", ("--write-model-card/--no-write-model-card",), MAPPED,
                 "Write README.md, the model card  [default: write-model-card]. The recipe "
                 "is kept as mergesmith_config.yml either way.", default=True),
    MergekitFlag("quiet", ("--quiet/--no-quiet",), MAPPED,
                 "No progress bar and no summary line."),
    MergekitFlag("verbosity", ("-v",), MAPPED,
                 "-v: print the plan (output files, layer map, notes) before merging; "
                 "-vv: also show tracebacks (--debug).", count=True, default=0),
    # -- noted: nothing to tune in a streaming engine ------------------------------------
    MergekitFlag("lazy_unpickle", ("--lazy-unpickle/--no-lazy-unpickle",), NOTED,
                 "No effect: weights are read tensor by tensor (safetensors by byte range, "
                 ".bin with weights_only=True).",
                 note="--lazy-unpickle: no effect; mergesmith reads weights tensor by tensor "
                      "(safetensors by byte range, .bin files with weights_only=True)"),
    MergekitFlag("low_cpu_memory", ("--low-cpu-memory/--no-low-cpu-memory",), NOTED,
                 "No effect: only the tensors being merged are in memory (--memory-limit "
                 "bounds them).",
                 note="--low-cpu-memory: no effect; only the tensors being merged are in "
                      "memory (use --memory-limit to bound them)"),
    MergekitFlag("read_to_gpu", ("--read-to-gpu/--no-read-to-gpu",), NOTED,
                 "No effect: each input is read into host memory and moved to the device "
                 "that computes.",
                 note="--read-to-gpu: no effect; inputs are read into host memory and moved "
                      "to the device that computes (--cuda, --device, --multi-gpu)"),
    MergekitFlag("clone_tensors", ("--clone-tensors/--no-clone-tensors",), NOTED,
                 "No effect: every output tensor is written on its own, repeated layers "
                 "too.",
                 note="--clone-tensors: no effect; every output tensor is written on its "
                      "own, so repeated layers need no clone"),
    MergekitFlag("async_write", ("--async-write/--no-async-write",), NOTED,
                 "No effect: each result is written to its place in the output file as "
                 "soon as it is computed.",
                 note="--async-write: no effect; each result is written to its place in the "
                      "output file as soon as it is computed"),
    MergekitFlag("write_threads", ("--write-threads",), NOTED,
                 "No effect: the worker threads (-j) write their own results.",
                 type=click.INT, default=1,
                 note="--write-threads: no effect; the worker threads (-j) write their own "
                      "results"),
    MergekitFlag("safe_serialization", ("--safe-serialization/--no-safe-serialization",),
                 NOTED, "mergesmith always writes safetensors.", default=True,
                 note="--no-safe-serialization: ignored; mergesmith always writes "
                      "safetensors (never pickled .bin weights)"),
    MergekitFlag("transformers_cache", ("--transformers-cache",), NOTED,
                 "No effect: Hub models come from the huggingface_hub cache (set "
                 "HF_HUB_CACHE=DIR to move it).", type=click.STRING, default=None,
                 note="--transformers-cache: no effect; Hub models come from the "
                      "huggingface_hub cache (set HF_HUB_CACHE=DIR to move it)"),
    MergekitFlag("lora_merge_cache", ("--lora-merge-cache",), NOTED,
                 "No effect: LoRA adapters are applied as the base's rows are read; no "
                 "merged copy is stored.", type=click.STRING, default=None,
                 note="--lora-merge-cache: no effect; LoRA adapters are applied as the "
                      "base's rows are read, and no merged copy is stored"),
    MergekitFlag("lora_merge_dtype", ("--lora-merge-dtype",), NOTED,
                 "No effect: adapters are added in float32 as rows are read, then rounded "
                 "like any input (to the recipe's dtype, if it has one).",
                 type=click.STRING, default=None,
                 note="--lora-merge-dtype: no effect; adapters are added in float32 as rows "
                      "are read, then rounded like any input (to the recipe's 'dtype', if "
                      "it has one)"),
    # -- refused -----------------------------------------------------------------------
    MergekitFlag("trust_remote_code", ("--trust-remote-code/--no-trust-remote-code",),
                 REFUSED,
                 "Refused (exit 2): mergesmith never runs code from a model repository, and "
                 "a merge does not need it (config.json, tokenizer and weight files are "
                 "read as data). --no-trust-remote-code is accepted."),
)
"""Every option of mergekit 0.1.5's ``mergekit-yaml`` (its ``MergeOptions``), in the
order of the help: mapped, noted, refused."""

TRUST_REMOTE_CODE_REFUSED = (
    "--trust-remote-code is refused: mergesmith never runs code from a model repository, "
    "and a merge does not need it (config.json, the tokenizer files and the weights are "
    "read as data, .bin files with weights_only=True); drop the flag")

_KIND_TITLES = {
    MAPPED: "mergekit options mergesmith carries out",
    NOTED: "mergekit options accepted with no effect (a note on stderr says why)",
    REFUSED: "mergekit options refused",
}
_EXTRAS_TITLE = "mergesmith options (not in mergekit)"


class MergekitCommand(click.Command):
    """``--help`` grouped by what mergesmith does with each mergekit flag."""

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        kinds = {f.name: f.kind for f in MERGEKIT_YAML_FLAGS}
        groups: dict[str, list[tuple[str, str]]] = {k: [] for k in (*_KIND_TITLES, "extra")}
        for param in self.get_params(ctx):
            if isinstance(param, click.Argument):
                continue
            record = param.get_help_record(ctx)
            if record is not None:
                groups[kinds.get(param.name or "", "extra")].append(record)
        for kind, title in (*_KIND_TITLES.items(), ("extra", _EXTRAS_TITLE)):
            if groups[kind]:
                with formatter.section(title):
                    formatter.write_dl(groups[kind])


def _flag_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    for flag in reversed(MERGEKIT_YAML_FLAGS):
        fn = flag.click_option()(fn)
    return fn


@click.command("mergekit-yaml", cls=MergekitCommand, epilog=EPILOG,
               context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("config_file", metavar="CONFIG", type=click.Path())
@click.argument("out_path", metavar="OUT", type=click.Path())
@_flag_options
@click.option("--overwrite", is_flag=True,
              help="Replace OUT if it exists (mergesmith builds OUT.partial and renames it).")
@click.option("--resume", is_flag=True,
              help="Continue an interrupted merge from OUT.partial (same recipe and flags).")
@click.option("--memory-limit", default=None, metavar="SIZE",
              help="Keep the whole process under SIZE (e.g. 8GiB).")
@click.option("--compute-dtype", type=click.Choice(["float32", "float64"]), default="float32",
              show_default=True, help="Precision of the arithmetic.")
@click.option("--strict-finite", is_flag=True, help="Stop on NaN or Inf in a merged tensor.")
@click.option("--strict", is_flag=True,
              help="Treat warnings (e.g. recipe keys mergekit ignores) as errors.")
@click.option("--no-evaluate", is_flag=True, help="Skip the recipe's 'evaluate:' block.")
@click.option("--debug", is_flag=True, help="Show tracebacks and warnings in full.")
def mergekit_yaml(config_file: str, out_path: str, **values: Any) -> None:
    """Merge with a mergekit-yaml command line: the recipe CONFIG into the folder OUT.

    Takes every flag of mergekit 0.1.5's mergekit-yaml, and runs the merge with
    mergesmith's engine, as 'mergesmith run' does (streaming, validated before any weight
    is read, written atomically). The options below say what becomes of each flag.

    \b
    Example (LazyMergekit's command line):
      mergesmith-yaml config.yaml merge --copy-tokenizer --allow-crimes \\
          --out-shard-size 1B --lazy-unpickle
    """
    debug = bool(values.pop("debug")) or values["verbosity"] >= 2
    _merge(config_file, out_path, debug=debug, **values)


@friendly
def _merge(config_file: str, out_path: str, *, debug: bool, **values: Any) -> None:
    options, notes = mergekit_options(values)
    for note in notes:
        click.echo(f"note: {note}", err=True)
    before = _print_plan if values["verbosity"] >= 1 else None
    merge_and_report(config_file, out_path, options, quiet=values["quiet"], before=before)


def mergekit_options(values: dict[str, Any]) -> tuple[Any, list[str]]:
    """mergesmith :class:`~mergesmith.options.Options` from mergekit-yaml's flag values
    (and mergesmith's extras), and the notes on flags that have no effect. Raises
    :class:`MergeError` for a refused flag."""
    from .options import Options
    from .units import parse_mergekit_size

    if values.get("trust_remote_code"):
        raise MergeError(TRUST_REMOTE_CODE_REFUSED)
    notes = [f.note for f in MERGEKIT_YAML_FLAGS
             if f.note and f.name in values and values[f.name] != f.default]
    device = values.get("device") or "cpu"
    if values.get("gpu_rich") or values.get("multi_gpu"):
        device = _all_gpus("--gpu-rich" if values.get("gpu_rich") else "--multi-gpu")
    elif values.get("cuda") and not values.get("device"):
        _all_gpus("--cuda")
        device = "cuda"
    options = Options.parse(
        seed=values.get("random_seed"), threads=values.get("num_threads"), device=device,
        out_shard_size=parse_mergekit_size(values.get("out_shard_size") or "5B"),
        allow_crimes=values.get("allow_crimes", False),
        unsafe_truncate_embeddings=values.get("unsafe_truncate_embeddings", False),
        copy_tokenizer=values.get("copy_tokenizer", True),
        write_model_card=values.get("write_model_card", True),
        overwrite=values.get("overwrite", False), resume=values.get("resume", False),
        memory_limit=values.get("memory_limit"), compute_dtype=values.get("compute_dtype"),
        strict_finite=values.get("strict_finite", False), strict=values.get("strict", False),
        evaluate=not values.get("no_evaluate", False),
        eval_progress=not values.get("quiet", False))
    return options, notes


def _all_gpus(flag: str) -> str:
    """Every visible GPU, as a ``--devices`` list (``--multi-gpu``)."""
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n == 0:
        raise MergeError(f"{flag}: no CUDA GPU is visible to this torch build; drop the "
                         "flag to merge on the CPU")
    return ",".join(str(i) for i in range(n))


def _print_plan(plan: Any) -> None:
    """``-v``: what ``mergesmith check`` says about the plan (without the estimates)."""
    from .api import layer_map_lines
    from .units import format_bytes

    lines = [f"plan: {len(plan.tensors)} tensors in {len(plan.shards)} file(s), "
             f"{format_bytes(plan.bytes_read)} to read, {format_bytes(plan.bytes_written)} "
             "to write"]
    lines += [f"  {s.filename}: {len(s.tensors)} tensors, {format_bytes(s.size)}"
              for s in plan.shards]
    for module, layers in plan.layer_maps.items():
        title = "layer map" + ("" if module == "default" else f" of module '{module}'")
        lines.append(f"{title} (output layers ← input layers):")
        lines += [f"  {line}" for line in layer_map_lines(layers)]
    lines += [f"note: {n}" for n in plan.notes]
    for line in lines:
        click.echo(line, err=True)


def main() -> None:
    """The ``mergesmith-yaml`` console script."""
    run_console_script(mergekit_yaml, "mergesmith-yaml")


cli.add_command(mergekit_yaml)
