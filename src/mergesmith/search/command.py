"""The ``mergesmith search SPACE OUT`` command."""

from __future__ import annotations

import sys

import click

from ..cli import EPILOG, cli, friendly


@cli.command(epilog=EPILOG)
@click.argument("space", type=click.Path())
@click.argument("out", type=click.Path())
@click.option("--resume", is_flag=True,
              help="Continue a stopped search in OUT (also after a kill): recorded trials "
                   "are not run again.")
@click.option("--ray", "ray_address", is_flag=False, flag_value="local", default=None,
              metavar="[ADDRESS]",
              help="Run each trial (merge and evaluation) as a Ray task: the cluster's "
                   "ADDRESS, 'auto', or no value to start Ray here. Inputs must be on "
                   "storage every node shares.")
@click.option("--workers", type=int, default=None,
              help="Trials merged and scored at once (overrides search.workers). The trials "
                   "are the same for any number of workers.")
@click.option("--budget", type=int, default=None,
              help="Number of evaluations (overrides search.budget).")
@click.option("--seed", type=int, default=None, help="Sampler seed (overrides search.seed).")
@click.option("--threads", type=int, default=None,
              help="Merge threads per trial (default: the CPUs divided among the workers).")
@click.option("--quiet", "-q", is_flag=True, help="No progress line.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@friendly
def search(space: str, out: str, resume: bool, ray_address: str | None, workers: int | None,
           budget: int | None, seed: int | None, threads: int | None, quiet: bool,
           debug: bool) -> None:
    """Search the recipe space SPACE for the best-scoring recipe; write that model to OUT.

    SPACE is a recipe whose parameters may be ranges — {range: [lo, hi]}, {range: [lo, hi],
    log: true}, {choices: [...]} — with a 'search:' block (objective, direction, budget,
    algorithm, seed, workers). Every trial is recorded in OUT/search/trials.jsonl; the
    best model, its recipe (mergesmith_config.yml), a model card and plots land in OUT.

    \b
    Example:
      mergesmith search space.yml ./best --budget 40 --workers 2
    """
    from .loop import search as run_search

    tty = sys.stderr.isatty()
    width = [0]

    def echo(line: str, final: bool) -> None:
        if quiet:
            return
        if line.startswith("note: ") or not tty:
            click.echo(line, err=True)
            return
        pad = " " * max(0, width[0] - len(line))
        width[0] = len(line)
        click.echo("\r" + line + pad, err=True, nl=final)

    try:
        result = run_search(space, out, resume=resume, ray=ray_address, workers=workers,
                            budget=budget, seed=seed, threads=threads, echo=echo)
    except KeyboardInterrupt:
        click.echo(f"\ninterrupted: the finished trials are in {out}/search/trials.jsonl; the "
                   "same command with --resume continues without running them again", err=True)
        sys.exit(130)
    if not quiet:
        best = result.best
        params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in best["params"].items())
        click.echo(f"best: trial {best['trial']}, score {best['score']:.6g} ({params})")
        click.echo(f"wrote {out}: the best model, mergesmith_config.yml, README.md; "
                   f"{out}/search/: trials.jsonl, progress.png, parameters.png")
        for note in result.notes:
            click.echo(f"note: {note}", err=True)
