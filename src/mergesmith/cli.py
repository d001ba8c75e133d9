"""Command line: arguments → API calls; user errors become one line and an exit code."""

from __future__ import annotations

import functools
import gc
import os
import sys
import warnings
from collections.abc import Callable
from typing import Any

import click

from . import __version__
from .errors import MergeError


def skip_last_collection() -> None:
    """Freeze every live object, so the interpreter's last garbage collection at exit does
    not walk them: after a merge that walk covers all of torch's objects and took ~0.4 s
    (a tenth of a 2 GB linear merge). Outputs are closed and synced by then; reference
    counting and the atexit handlers still run as usual."""
    gc.freeze()


def run_console_script(command: click.Command, prog_name: str) -> None:
    """Run ``command`` as a console script: a process of our own, so torch's objects are
    frozen once it is imported (``_torch.FREEZE_AFTER_IMPORT``) and the last garbage
    collection at exit is skipped (:func:`skip_last_collection`)."""
    from . import _torch

    _torch.FREEZE_AFTER_IMPORT = True
    try:
        command(prog_name=prog_name)
    finally:
        skip_last_collection()


EPILOG = """\b
Exit codes: 0 success, 1 I/O failure (disk full, unreadable file), 2 bad input
(recipe, model folder, output path), 130 interrupted.
"""


def _one_line_warnings() -> None:
    def show(message: Any, category: Any, filename: str, lineno: int, file: Any = None,
             line: Any = None) -> None:
        click.echo(f"warning: {message}", err=True)

    warnings.showwarning = show  # type: ignore[assignment]


def friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Print MergeError as one line and exit with its code; --debug shows the traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = kwargs.get("debug", False)
        if not debug:
            _one_line_warnings()
        try:
            return fn(*args, **kwargs)
        except MergeError as e:
            if debug:
                raise
            click.echo("error: " + str(e).replace("\n", "\\n"), err=True)  # always one line
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("\ninterrupted: stopped cleanly. The output folder was not written; "
                       "finished tensors are kept in OUT.partial, and running the same "
                       "command with --resume continues from them", err=True)
            sys.exit(130)

    return wrapper


@click.group(epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mergesmith")
def cli() -> None:
    """Merge language models from a mergekit-style YAML recipe.

    \b
    Start here:
      mergesmith demo                 build tiny models, merge them, verify the result
      mergesmith check recipe.yml     validate a recipe and show the plan (reads no weights)
      mergesmith run recipe.yml OUT   merge into the folder OUT
      mergesmith eval OUT --text FILE perplexity; with --parents A B: KL and top-1 vs them
      mergesmith methods              list merge methods and their parameters
      mergesmith verify OUT           re-check a merged folder against its checksums
      mergesmith inspect BASE A B     compare task vectors, suggest merge methods
      mergesmith studio               a local web app: edit, check, merge, inspect
      mergesmith mergekit-yaml CONFIG OUT [mergekit flags]
                                      a mergekit-yaml command line, unchanged
    """


def _common_plan_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--out-shard-size", default="5GB", show_default=True, metavar="SIZE",
                     help="Largest output file in bytes: a plain number, or with a decimal "
                          "suffix (500M, 2GB, 1.5G) or a binary one (4GiB). mergekit's '1B' "
                          "(a billion) is refused: write 1GB."),
        click.option("--compute-dtype", type=click.Choice(["float32", "float64"]),
                     default="float32", show_default=True,
                     help="Precision of the arithmetic; results are rounded once to the "
                          "output dtype."),
        click.option("--fp8-block-size", default=None, metavar="RxC",
                     help="Block of a recipe's 'out_dtype: float8_e4m3fn' (e.g. 128x128) "
                          "[default: the FP8 inputs', else 128x128]."),
        click.option("--out-format", type=click.Choice(["safetensors", "gguf"]), default=None,
                     help="safetensors: a model folder; gguf: one GGUF file (its type from "
                          "out_dtype: q8_0, q4_0, q4_1, q5_0, q5_1, f32, f16, bf16) "
                          "[default: gguf for an OUT ending in .gguf, else safetensors]."),
        click.option("--allow-crimes", is_flag=True,
                     help="Allow inputs whose config.json architectures differ."),
        click.option("--unsafe-truncate-embeddings", is_flag=True,
                     help="UNSAFE: cut embeddings and LM heads of models with different "
                          "vocabulary sizes to the smallest (assumes the ids agree up to it; "
                          "prefer a 'tokenizer:' block)."),
        click.option("--threads", type=click.IntRange(min=1), default=None,
                     help="Worker threads [default: number of CPU cores]."),
        click.option("--memory-limit", default=None, metavar="SIZE",
                     help="Keep the whole process under SIZE (e.g. 512M, 8GiB): tensors are "
                          "processed in smaller pieces and fewer at a time. Methods that need "
                          "whole tensors can exceed it; 'check' says which."),
        click.option("--strict", is_flag=True,
                     help="Treat warnings as errors (exit 2): recipe keys and parameters "
                          "that have no effect, tensors that are not merged, ..."),
        click.option("--debug", is_flag=True, help="Show tracebacks and warnings in full."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


@cli.command(epilog=EPILOG)
@click.argument("recipe", type=click.Path())
@click.argument("out", type=click.Path())
@click.option("--seed", type=int, default=None,
              help="Seed for random methods (overrides the recipe's 'seed:').")
@click.option("--device", default="cpu", show_default=True,
              help="Where the math runs: cpu, cuda, cuda:N, mps or auto.")
@click.option("--devices", default=None, metavar="LIST",
              help="Spread the math over several GPUs, e.g. 0,1,2,3 (or device names); "
                   "one worker thread per device at least. Overrides --device.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--resume", is_flag=True,
              help="Continue an interrupted merge from OUT.partial (same recipe and inputs).")
@click.option("--strict-finite", is_flag=True,
              help="Stop on NaN or Inf in the merged tensors (default: a warning).")
@click.option("--no-evaluate", is_flag=True,
              help="Skip the recipe's 'evaluate:' block (run it later with 'mergesmith eval').")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option("--ray", "ray_address", is_flag=False, flag_value="local", default=None,
              metavar="[ADDRESS]",
              help="Run on a Ray cluster: its ADDRESS, 'auto' (RAY_ADDRESS), or no value to "
                   "start Ray here. Inputs and OUT must be on storage every node shares.")
@click.option("--stage", default=None, metavar="NAME",
              help="Multi-stage recipe: build the stage named NAME (and the stages it "
                   "reads) instead of the unnamed final stage.")
@click.option("--keep-intermediates", default=None, metavar="DIR", type=click.Path(),
              help="Multi-stage recipe: also write every intermediate stage as a model "
                   "folder DIR/NAME (by default they are computed as they are read and "
                   "never written).")
@_common_plan_options
@friendly
def run(recipe: str, out: str, seed: int | None, device: str, devices: str | None,
        overwrite: bool, resume: bool, ray_address: str | None, stage: str | None,
        keep_intermediates: str | None,
        strict_finite: bool, no_evaluate: bool, quiet: bool,
        out_shard_size: str, compute_dtype: str, fp8_block_size: str | None,
        out_format: str | None, allow_crimes: bool, unsafe_truncate_embeddings: bool,
        threads: int | None,
        memory_limit: str | None, strict: bool, debug: bool) -> None:
    """Merge the models of RECIPE into the folder OUT (or, for OUT ending in .gguf, the
    GGUF file OUT).

    The whole recipe is validated and planned before any weights are read. The model is
    built in OUT.partial/ and renamed to OUT only when complete and verified; if the merge
    is interrupted, --resume continues it.

    A multi-stage recipe (mergekit-multi's format: YAML documents separated by '---', the
    intermediate ones with 'name:', later ones using those names as models) builds its
    unnamed final stage, or --stage NAME. The stages are fused: each output tensor is
    computed through them in memory, so intermediate models are never written unless
    --keep-intermediates asks (or a stage needs it: 'check' says which).

    \b
    Example:
      mergesmith run recipe.yml ./merged --threads 4
      mergesmith run stages.yml ./merged --keep-intermediates ./stages
    """
    from .ray_executor import session

    with session(ray_address):  # before torch is imported here: the nodes warm up meanwhile
        from .options import Options

        merge_and_report(recipe, out, stage=stage, keep_intermediates=keep_intermediates,
                         options=Options.parse(
            seed=seed, threads=threads, device=devices or device, out_shard_size=out_shard_size,
            overwrite=overwrite, compute_dtype=compute_dtype, fp8_block_size=fp8_block_size,
            out_format=out_format, allow_crimes=allow_crimes,
            unsafe_truncate_embeddings=unsafe_truncate_embeddings, strict_finite=strict_finite,
            resume=resume, memory_limit=memory_limit, evaluate=not no_evaluate,
            eval_progress=not quiet, strict=strict, ray=ray_address), quiet=quiet)


def merge_and_report(recipe: str, out: str, options: Any, *, quiet: bool,
                     before: Callable[[Any], None] | None = None, stage: str | None = None,
                     keep_intermediates: str | None = None) -> None:
    """Run the merge with a progress bar (unless ``quiet``) and print what was written:
    the engine of ``run`` and ``mergekit-yaml``. ``before`` sees the plan first."""
    from .api import run as api_run

    bar = None

    def progress(plan: Any) -> Callable[[int, bool], None]:
        nonlocal bar
        if before is not None:
            before(plan)
        if quiet:
            return lambda nbytes, finished: None
        from tqdm import tqdm

        total = len(plan.tensors)
        bar = tqdm(total=plan.bytes_written, unit="B", unit_scale=True, unit_divisor=1000,
                   desc="merging", dynamic_ncols=True, postfix=f"0/{total} tensors")
        done = 0

        def update(nbytes: int, finished: bool) -> None:
            nonlocal done
            done += finished
            if finished:
                bar.set_postfix_str(f"{done}/{total} tensors", refresh=False)
            bar.update(nbytes)
            if done == total:
                bar.close()  # before the recipe's evaluation shows its own bars

        def tasks(finished: int, count: int, busy: int) -> None:  # with --ray
            bar.set_postfix_str(f"{done}/{total} tensors, {finished}/{count} tasks, "
                                f"{busy} node(s) busy", refresh=False)

        update.tasks = tasks  # type: ignore[attr-defined]
        return update

    try:
        result = api_run(recipe, out, options, progress=progress, stage=stage,
                         keep_intermediates=keep_intermediates)
    finally:
        if bar is not None:
            bar.close()
    plan = result.plan
    if result.adapter_result is not None:
        click.echo(result.adapter_result.summary())
    elif not quiet:
        from .units import format_bytes

        stages = ""
        if plan.stages:
            written = sum(s.written is not None for s in plan.stages[:-1])
            stages = (f" (the last of {len(plan.stages)} stages; " + (
                f"the others also written to {keep_intermediates}/NAME" if keep_intermediates
                else f"{written} written first, then removed" if written
                else "the others computed as they were read, never written") + ")")
        click.echo(f"wrote {out}: {len(plan.tensors)} tensors, "
                   f"{format_bytes(plan.bytes_written)} in {len(plan.shards)} file(s){stages}")
        for line in result.cluster:
            click.echo(line)
    if result.evaluation is not None:
        click.echo(result.evaluation.table())
        if options.write_model_card:
            click.echo(f"(in the model card {os.path.join(out, 'README.md')})")


@cli.command(epilog=EPILOG)
@click.argument("recipe", type=click.Path())
@click.option("--ray", "ray_address", is_flag=False, flag_value="local", default=None,
              metavar="[ADDRESS]",
              help="Estimate for a Ray cluster: its ADDRESS, 'auto' (RAY_ADDRESS), or no "
                   "value to start Ray here.")
@click.option("--nodes", type=click.IntRange(min=1), default=None, metavar="N",
              help="Also estimate the wall time on 1, 2, 4 ... N nodes of a cluster, "
                   "each output file one task.")
@click.option("--node-bandwidth", default="1GB", show_default=True, metavar="SIZE",
              help="Bytes per second one node reads and writes (with --nodes).")
@click.option("--stage", default=None, metavar="NAME",
              help="Multi-stage recipe: build the stage named NAME (and the stages it "
                   "reads) instead of the unnamed final stage.")
@_common_plan_options
@friendly
def check(recipe: str, nodes: int | None, node_bandwidth: str, stage: str | None,
          out_shard_size: str, compute_dtype: str, fp8_block_size: str | None,
          out_format: str | None, allow_crimes: bool, unsafe_truncate_embeddings: bool,
          threads: int | None, ray_address: str | None,
          memory_limit: str | None, strict: bool, debug: bool) -> None:
    """Validate RECIPE and print the merge plan, without reading any weights.

    Checks every key, parameter, model folder, tensor name and shape; prints the output
    tensor count, bytes to read and write, and the estimated peak memory. For a
    multi-stage recipe it first prints the stage graph: the stages in order, what each
    reads, and whether it is fused (computed as it is read) or written first.
    """
    from . import _torch

    stand_in = (sys.argv[1:2] == ["check"]  # the command line, so it can run again
                and ray_address is None and not os.environ.get(_CHECK_WITH_TORCH)
                and _torch.use_stand_in())  # plans without importing torch (0.8 s)
    recorded: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=stand_in) as caught:
            try:
                report, bandwidth = _check_report(
                    recipe, node_bandwidth, stage, out_shard_size, compute_dtype,
                    fp8_block_size, out_format, allow_crimes, unsafe_truncate_embeddings,
                    threads, memory_limit, strict)
            except _torch.TorchNeeded:  # this recipe's plan needs torch: again, with it
                sys.stdout.flush()
                os.execve(sys.executable, [sys.executable, "-m", "mergesmith", *sys.argv[1:]],
                          {**os.environ, _CHECK_WITH_TORCH: "1"})
            finally:
                recorded = list(caught or ())
    finally:  # warnings are shown once the plan is known not to need torch
        for w in recorded:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    click.echo(report.summary())
    if ray_address is not None:
        from .ray_executor import cluster_estimate

        for line in cluster_estimate(report, ray_address):
            click.echo(line)
    if nodes is not None:
        from .api import cluster_lines

        click.echo("\n".join(cluster_lines(report, nodes, bandwidth)))
    click.echo("ok: the recipe is valid")


_CHECK_WITH_TORCH = "MERGESMITH_CHECK_WITH_TORCH"
"""Set when ``check`` runs again because its plan needed torch (see ``_torch``)."""


def _check_report(recipe: str, node_bandwidth: str, stage: str | None, out_shard_size: str,
                  compute_dtype: str, fp8_block_size: str | None, out_format: str | None,
                  allow_crimes: bool, unsafe_truncate_embeddings: bool, threads: int | None,
                  memory_limit: str | None, strict: bool) -> tuple[Any, int]:
    """The plan's report and the node bandwidth in bytes per second."""
    from .api import check as api_check
    from .options import Options
    from .units import parse_size

    bandwidth = parse_size(node_bandwidth, "--node-bandwidth")
    if bandwidth <= 0:
        raise click.BadParameter("must be positive", param_hint="--node-bandwidth")
    report = api_check(recipe, Options.parse(
        threads=threads, memory_limit=memory_limit, out_shard_size=out_shard_size,
        compute_dtype=compute_dtype, fp8_block_size=fp8_block_size, out_format=out_format,
        allow_crimes=allow_crimes,
        unsafe_truncate_embeddings=unsafe_truncate_embeddings, strict=strict), stage=stage)
    return report, bandwidth


@cli.command("moe", epilog=EPILOG)
@click.argument("config", type=click.Path())
@click.argument("out", type=click.Path(), required=False)
@click.option("--check", "check_only", is_flag=True,
              help="Validate CONFIG and print the MoE plan without reading any weights.")
@click.option("--seed", type=int, default=None, help="Seed of random routers and noise.")
@click.option("--device", default="cpu", show_default=True,
              help="Where the hidden-state routers and the copies run.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="Worker threads [default: number of CPU cores].")
@click.option("--out-shard-size", default="5GB", show_default=True, metavar="SIZE",
              help="Largest output file.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--resume", is_flag=True, help="Continue an interrupted build from OUT.partial.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@friendly
def moe(config: str, out: str | None, check_only: bool, seed: int | None, device: str,
        threads: int | None, out_shard_size: str, overwrite: bool, resume: bool,
        quiet: bool, debug: bool) -> None:
    """Build a mixture-of-experts model from dense models into OUT (mergekit-moe's YAML:
    base_model, experts with prompts, gate_mode, shared_experts, architecture).

    Everything is validated before any weights are read; the routers are computed, then
    the expert tensors are copied one expert at a time.

    \b
    Example:
      mergesmith moe moe.yml ./my-moe
      mergesmith moe moe.yml --check
    """
    from .moe import check_moe, run_moe
    from .options import Options

    options = Options.parse(seed=seed, threads=threads, device=device, overwrite=overwrite,
                            resume=resume, out_shard_size=out_shard_size)
    if check_only:
        click.echo(check_moe(config, options).summary())
        click.echo("ok: the MoE config is valid")
        return
    if out is None:
        raise click.UsageError("give OUT (or --check)")
    bar = None

    def progress(plan: Any) -> Callable[[int, bool], None]:
        nonlocal bar
        if quiet:
            return lambda nbytes, finished: None
        from tqdm import tqdm

        bar = tqdm(total=plan.bytes_written, unit="B", unit_scale=True, desc="building",
                   dynamic_ncols=True)
        return lambda nbytes, finished: bar.update(nbytes)

    try:
        plan = run_moe(config, out, options, progress=progress)
    finally:
        if bar is not None:
            bar.close()
    if not quiet:
        from .units import format_bytes

        click.echo(f"wrote {out}: {len(plan.tensors)} tensors, "
                   f"{format_bytes(plan.bytes_written)} in {len(plan.shards)} file(s)")


@cli.command("extract-lora", epilog=EPILOG)
@click.option("--model", "model", required=True, type=click.Path(),
              help="The fine-tuned model folder.")
@click.option("--base", required=True, type=click.Path(), help="The model it was tuned from.")
@click.option("--out", required=True, type=click.Path(), help="Adapter folder to write.")
@click.option("--rank", type=int, default=None, help="Rank of every matrix.")
@click.option("--energy", type=float, default=None,
              help="Instead of --rank: per matrix, the smallest rank keeping this fraction "
                   "of the task vector's squared norm (e.g. 0.99).")
@click.option("--include", default=None, metavar="REGEX", help="Only tensors matching REGEX.")
@click.option("--exclude", default=None, metavar="REGEX", help="Skip tensors matching REGEX.")
@click.option("--embeddings", type=click.Choice(["lora", "full", "skip"]), default="lora",
              show_default=True, help="Token embeddings as an embedding LoRA, saved whole "
                                      "(modules_to_save), or left out.")
@click.option("--randomized", is_flag=True,
              help="Randomized SVD (faster for small --rank; slightly less exact).")
@click.option("--device", default="cpu", show_default=True, help="Where the SVDs run.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--quiet", "-q", is_flag=True, help="No progress output.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@friendly
def extract_lora(model: str, base: str, out: str, rank: int | None, energy: float | None,
                 include: str | None, exclude: str | None, embeddings: str, randomized: bool,
                 device: str, overwrite: bool, quiet: bool, debug: bool) -> None:
    """Extract a LoRA adapter (PEFT format) from a fine-tune: SVD of MODEL − BASE.

    Writes adapter_config.json, adapter_model.safetensors and extract_report.json (the
    relative error of every matrix). Load it with PeftModel.from_pretrained, or use it in a
    recipe as BASE+OUT.

    \b
    Example:
      mergesmith extract-lora --model ./ft --base ./base --out ./ft-lora --rank 32
    """
    from .devices import resolve_device
    from .tools.extract_lora import extract_lora as run_extract

    resolve_device(device)
    result = run_extract(model, base, out, rank=rank, energy=energy, include=include,
                         exclude=exclude, embeddings=embeddings, randomized=randomized,
                         device=device, overwrite=overwrite,
                         progress=None if quiet else lambda n: click.echo(f"  {n}", err=True))
    click.echo(result.summary())


@cli.command("inspect", epilog=EPILOG)
@click.argument("base")
@click.argument("models", nargs=-1, required=True, metavar="MODEL...")
@click.option("--out", default=None, type=click.Path(), metavar="DIR",
              help="Write DIR/index.html, DIR/*.png heatmaps and DIR/inspect.json.")
@click.option("--json", "as_json", is_flag=True,
              help="Print all numbers as JSON on stdout instead of the summary.")
@click.option("--rtol", type=float, default=1e-5, show_default=True,
              help="A delta is near zero when |model − base| ≤ atol + rtol·|base|: "
                   "it counts towards sparsity, and sign conflicts ignore it.")
@click.option("--atol", type=float, default=1e-8, show_default=True,
              help="Absolute part of the near-zero tolerance.")
@click.option("--no-rank", is_flag=True, help="Skip effective ranks (no SVDs; fastest).")
@click.option("--rank-max-dim", type=click.IntRange(min=1), default=2048, show_default=True,
              metavar="N", help="Effective rank only for matrices whose smaller side is at "
                                "most N (cost grows with N³).")
@click.option("--device", default="cpu", show_default=True,
              help="Where the math runs (cuda speeds up effective ranks).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@friendly
def inspect_command(base: str, models: tuple[str, ...], out: str | None, as_json: bool,
                    rtol: float, atol: float, no_rank: bool, rank_max_dim: int, device: str,
                    quiet: bool, debug: bool) -> None:
    """Compare the task vectors MODEL − BASE and suggest merge methods.

    Per tensor, per layer and for the whole model: norms (absolute and relative to the
    base), cosine similarity between models, sign conflicts, sparsity (near-zero deltas)
    and effective rank; then simple rules turn the numbers into method suggestions
    (ties for sign conflicts, model_stock for near-identical deltas, ...). Models are
    read one tensor at a time, like a merge. Models may be folders, Hub ids or
    BASE+ADAPTER references. Effective ranks are the slow part: limit them with
    --rank-max-dim, or skip them with --no-rank.

    \b
    Example:
      mergesmith inspect ./base ./ft_math ./ft_code --out report/
      mergesmith inspect ./base ./ft_math ./ft_code --json > numbers.json
    """
    from .devices import resolve_device
    from .tools.inspect_models import inspect_models

    device = str(resolve_device(device))
    if out is not None:
        from .tools.report import check_report_folder

        check_report_folder(out)
    bar = None

    def progress(done: int, total: int, name: str) -> None:
        nonlocal bar
        if bar is None:
            from tqdm import tqdm

            bar = tqdm(total=total, unit="tensor", desc="inspecting", dynamic_ncols=True,
                       file=sys.stderr)
        bar.update(1)

    try:
        result = inspect_models(base, list(models), rtol=rtol, atol=atol, rank=not no_rank,
                                rank_max_dim=rank_max_dim, device=device,
                                progress=None if quiet else progress)
    except KeyboardInterrupt:
        click.echo("\ninterrupted: nothing was written", err=True)
        sys.exit(130)
    finally:
        if bar is not None:
            bar.close()
    files = None
    if out is not None:
        from .tools.report import write_report

        files = write_report(result, out)
    if as_json:
        click.echo(result.to_json())
    else:
        click.echo(result.summary())
    if files is not None:
        pngs = f", {len(files.pngs)} PNG plot(s)" if files.pngs else ""
        click.echo(f"report: {files.html}{pngs}, {files.json}", err=as_json)
        if files.note:
            click.echo(f"note: {files.note}", err=True)


@cli.command()
@click.argument("folder", type=click.Path())
@friendly
def verify(folder: str) -> None:
    """Re-check a merged model folder: shard checksums, headers and the index.

    Exits with 1 if anything differs from what was written.
    """
    from .api import verify as api_verify

    problems = api_verify(folder)
    only_note = len(problems) == 1 and "checked headers only" in problems[0]
    for p in problems:
        click.echo(("note: " if only_note else "problem: ") + p, err=not only_note)
    if problems and not only_note:
        sys.exit(1)
    click.echo(f"ok: {folder} is intact")


@cli.command()
@click.argument("directory", default="mergesmith-demo", type=click.Path())
@click.option("--overwrite", is_flag=True, help="Rebuild DIRECTORY if it exists.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@friendly
def demo(directory: str, overwrite: bool, debug: bool) -> None:
    """Build a tiny base model and two fine-tunes in DIRECTORY, merge them with task
    arithmetic, and verify the result (no downloads)."""
    from .demo import run_demo

    run_demo(directory, overwrite=overwrite, echo=click.echo)


@cli.command()
@click.argument("name", required=False)
@click.option("--markdown", is_flag=True, help="Print the documentation page (docs/methods.md).")
@friendly
def methods(name: str | None, markdown: bool) -> None:
    """List merge methods and their parameters (or show one method)."""
    from . import method_catalogue as catalogue

    entries = None if markdown else catalogue.load()  # built-ins: no torch import
    if entries is not None and (name is None or any(e["name"] == name for e in entries)):
        chosen = [e for e in entries if name is None or e["name"] == name]
        click.echo("\n".join(catalogue.lines(chosen)))
        return
    from .methods import all_methods, get_method

    specs = [get_method(name)] if name else list(all_methods().values())
    if markdown:
        from .methods.docs import render_markdown

        click.echo(render_markdown(specs), nl=False)
        return
    click.echo("\n".join(catalogue.lines([catalogue.entry(s) for s in specs])))


class _GreedyParents(click.Command):
    """``--parents A B C``: the arguments after ``--parents`` up to the next option."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        out: list[str] = []
        i = 0
        while i < len(args):
            if args[i] == "--":
                out += args[i:]
                break
            if args[i] != "--parents":
                out.append(args[i])
                i += 1
                continue
            i += 1
            start = i
            while i < len(args) and not args[i].startswith("-"):
                out += ["--parents", args[i]]
                i += 1
            if i == start:
                out.append("--parents")  # click reports the missing value
        return super().parse_args(ctx, out)


@cli.command("eval", cls=_GreedyParents, epilog=EPILOG)
@click.argument("model", type=click.Path())
@click.option("--text", type=click.Path(), metavar="FILE",
              help="UTF-8 text to compute perplexity on (the file is one document).")
@click.option("--jsonl", type=click.Path(), metavar="FILE",
              help="Instead of --text: one JSON object per line, each a document.")
@click.option("--field", "field_name", default="text", show_default=True,
              help="The key of --jsonl lines that holds the text.")
@click.option("--parents", multiple=True, metavar="A B ...",
              help="Model folders to compare with on the same tokens (e.g. the inputs of "
                   "a merge): their perplexity, KL(parent‖MODEL) and top-1 agreement. Each "
                   "runs side by side with MODEL, one at a time.")
@click.option("--tokenizer", type=click.Path(), default=None, metavar="PATH",
              help="Tokenizer folder [default: MODEL's own].")
@click.option("--tasks", default=None, metavar="T1,T2",
              help="lm-evaluation-harness tasks (pip install 'mergesmith[eval]').")
@click.option("--limit", type=click.IntRange(min=1), default=None, metavar="N",
              help="At most N examples per task.")
@click.option("--include-path", type=click.Path(), default=None, metavar="DIR",
              help="Folder of your own lm-eval task YAMLs ('dataset_path: json' with "
                   "'data_files' reads local JSONL: works offline).")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
              default="auto", show_default=True,
              help="auto: float32 on CPU, the checkpoint's dtype on a GPU.")
@click.option("--batch-size", type=click.IntRange(min=1), default=4, show_default=True,
              help="Windows per forward pass (logits take batch × length × vocab × 4 bytes).")
@click.option("--max-length", type=click.IntRange(min=2), default=None, metavar="N",
              help="Tokens per window; windows do not overlap [default: 1024, or the "
                   "model's context if shorter].")
@click.option("--max-tokens", type=click.IntRange(min=2), default=None, metavar="N",
              help="Evaluate only the first N tokens of the text.")
@click.option("--no-cache", is_flag=True,
              help="Recompute everything. Results are cached by model content in "
                   "~/.cache/mergesmith/eval (or $MERGESMITH_EVAL_CACHE).")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@friendly
def evaluate_command(model: str, text: str | None, jsonl: str | None, field_name: str,
                     parents: tuple[str, ...], tokenizer: str | None, tasks: str | None,
                     limit: int | None, include_path: str | None, device: str, dtype: str,
                     batch_size: int, max_length: int | None, max_tokens: int | None,
                     no_cache: bool, as_json: bool, quiet: bool, debug: bool) -> None:
    """Evaluate MODEL: perplexity on a text, agreement with other models, lm-eval tasks.

    Perplexity: the text is tokenized with MODEL's tokenizer and cut into windows of
    --max-length tokens (no overlap); every token but each window's first is predicted.
    With --parents, each parent is scored on the same tokens: its perplexity, the mean
    KL(parent‖MODEL) per token in nats (0: same predictions) and the fraction of
    positions where both predict the same most likely token.

    \b
    Example:
      mergesmith eval ./merged --text eval.txt --parents ./base ./ft_math ./ft_code
      mergesmith eval ./merged --tasks my_task --include-path tasks/ --limit 100 --json
    """
    import json as json_module

    from .evaluate import EvalCache
    from .evaluate.runner import evaluate

    task_list = [t.strip() for t in (tasks or "").split(",") if t.strip()]
    if tasks is not None and not task_list:
        raise MergeError("--tasks: give task names separated by commas")
    if limit is not None and not task_list:
        raise MergeError("--limit applies to --tasks")
    report = evaluate(model, text=text, jsonl=jsonl, field_name=field_name,
                      parents=list(parents), tokenizer=tokenizer, device=device, dtype=dtype,
                      batch_size=batch_size, max_length=max_length, max_tokens=max_tokens,
                      tasks=task_list, limit=limit, include_path=include_path,
                      cache=EvalCache(enabled=not no_cache), progress=not quiet)
    if as_json:
        click.echo(json_module.dumps(report.to_dict(), indent=2))
    else:
        click.echo(report.table())


@cli.command(epilog=EPILOG)
@click.option("--port", type=click.IntRange(0, 65535), default=7860, show_default=True,
              help="Port to listen on.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind. Anything but a local address requires a token, "
                   "printed at start (open the printed URL).")
@click.option("--no-browser", is_flag=True, help="Do not open a browser tab.")
@click.option("--workdir", default="studio-work", show_default=True, type=click.Path(),
              help="Folder of the runs (WORKDIR/runs/ID/merged), the history and reports; "
                   "also readable, and relative recipe paths start there.")
@click.option("--allow", multiple=True, type=click.Path(exists=True, file_okay=False),
              metavar="DIR", help="Another folder the studio may read (model roots); repeat "
                                  "for several. Nothing outside these and --workdir is read.")
@click.option("--token", default=None, metavar="TEXT",
              help="The token to require [default: none on a local --host, a random one "
                   "otherwise].")
@click.option("--online", is_flag=True,
              help="Let recipes name Hub models that are not in the cache (downloaded when "
                   "merged) [default: offline, HF_HUB_OFFLINE=1: cached Hub models only].")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@friendly
def studio(port: int, host: str, no_browser: bool, workdir: str, allow: tuple[str, ...],
           token: str | None, online: bool, debug: bool) -> None:
    """A local web app: write recipes (templates, live checking, method docs), see the
    plan and layer map, merge with live progress (Cancel, Resume), inspect models and
    compare the merge with its parents.

    Served on 127.0.0.1 by default and offline (every asset ships with the package).
    Files are read only under --workdir and the --allow folders; requests from other
    web sites are refused. Needs the extra: pip install 'mergesmith[studio]'.

    \b
    Example:
      mergesmith studio --allow ./models
      mergesmith studio --host 0.0.0.0 --port 8080 --no-browser   # prints a token
    """
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise MergeError(f"the studio needs {e.name}: pip install 'mergesmith[studio]'") \
            from None
    if not online:  # before huggingface_hub is imported: it reads this once
        os.environ["HF_HUB_OFFLINE"] = "1"
    from .studio.command import serve
    from .studio.security import StudioConfig

    serve(StudioConfig(workdir=workdir, allow=list(allow), host=host, port=port, token=token),
          open_browser=not no_browser, echo=click.echo)


# the mergekit-yaml subcommand: its module uses the helpers above and registers itself
from . import mergekit_cli  # noqa: E402,F401
from .search import command as search_command  # noqa: E402,F401
from .statistics import command as stats_command  # noqa: E402,F401


def main() -> None:
    run_console_script(cli, "mergesmith")


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
