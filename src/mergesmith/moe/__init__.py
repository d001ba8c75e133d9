"""``mergesmith moe``: a mixture-of-experts model from dense models (mergekit-moe's YAML).

Validated and planned from metadata; the routers are computed first (the only step that
reads the base model as a whole: ``hidden`` gates load it once with transformers), then the
plan runs on the streaming engine like any merge (resume, verify, checksums)."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..options import Options
from ..plan.types import Plan
from .config import MoEConfig, load_moe_config
from .plan import CLASSES, MoEDesign, design, plan_moe


def cache_root() -> str:
    """``$MERGESMITH_MOE_CACHE``, else ``$XDG_CACHE_HOME/mergesmith/moe``."""
    env = os.environ.get("MERGESMITH_MOE_CACHE")
    if env:
        return os.path.expanduser(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "mergesmith", "moe")


@dataclass
class MoECheck:
    design: MoEDesign
    plan: Plan
    peak_memory: int
    seconds: float

    def summary(self) -> str:
        from ..units import format_bytes as fb

        d, p = self.design, self.plan
        c = d.config
        router = {"hidden": "hidden states of the base model on the prompts (last token)",
                  "hidden_last": "hidden states of the base model on the prompts (last token)",
                  "hidden_avg": "hidden states of the base model on the prompts (mean)",
                  "cheap_embed": "token embeddings of the base model on the prompts",
                  "random": "random normal (seeded)",
                  "uniform_random": "random uniform (seeded)"}[c.gate_mode]
        lines = [f"config:        {c.source}",
                 f"output:        {CLASSES[d.architecture]} ({d.architecture}), "
                 f"{d.layers} layers, {len(c.experts)} experts per layer, "
                 f"{c.experts_per_token} per token"
                 + (f", {len(c.shared_experts)} shared expert(s)" if c.shared_experts else ""),
                 f"base:          {d.base.ref} (attention, norms, embeddings, tokenizer)"]
        lines += [f"expert {i}:      {e.model}" for i, e in enumerate(c.experts)]
        lines += [f"shared {i}:      {e.model}" for i, e in enumerate(c.shared_experts)]
        lines += [f"routers:       {router}",
                  f"dtype:         {str(d.out_dtype).removeprefix('torch.')}",
                  f"tensors:       {len(p.tensors)} in {len(p.shards)} file(s)",
                  f"bytes to read: {fb(p.bytes_read)}",
                  f"bytes to write: {fb(p.bytes_written)}",
                  f"peak memory:   about {fb(self.peak_memory)} of tensor data in flight"
                  + (" (plus the base model in bfloat16 while the hidden-state routers are "
                     "computed)" if c.gate_mode.startswith("hidden") else ""),
                  f"time:          about {self.seconds:.0f} s"]
        return "\n".join(lines)


def _prepare(config: Any, options: Options | None, values: dict[str, Any]
             ) -> tuple[MoEConfig, MoEDesign, Options]:
    from ..api import _options

    options = _options(options, values).replace(out_format="safetensors")
    c = load_moe_config(config)
    d = design(c)
    return c, d, options


def _folder(d: MoEDesign, options: Options) -> str:
    from .gates import computed_key

    return os.path.join(cache_root(), computed_key(d, options.seed))


def check_moe(config: Any, options: Options | None = None, **option_values: Any) -> MoECheck:
    """Validate an MoE config and plan the model without reading any weights."""
    from ..api import estimate_peak_memory, estimate_seconds
    from ..execute import chunk_elements_for

    _, d, options = _prepare(config, options, option_values)
    p = plan_moe(d, options, _folder(d, options))
    n = max(1, options.threads or os.cpu_count() or 1)
    return MoECheck(d, p, estimate_peak_memory(p, n, chunk_elements_for(options.memory_limit)),
                    estimate_seconds(p, n))


def run_moe(config: Any, out: str | os.PathLike, options: Options | None = None, *,
            progress: Callable[[Plan], Callable[[int, bool], None]] | None = None,
            **option_values: Any) -> Plan:
    """Build the MoE model of ``config`` into ``out`` (atomically, via ``OUT.partial``;
    ``resume=True`` continues an interrupted run). Returns the plan it carried out."""
    from .. import memory
    from ..api import _merge
    from ..devices import resolve_devices
    from ..output import check_output
    from .gates import write_computed

    out = os.fspath(out)
    _, d, options = _prepare(config, options, option_values)
    options = options.replace(write_model_card=False)
    device = str(resolve_devices(options.device)[0])
    folder = _folder(d, options)
    p = plan_moe(d, options, folder)
    check_output(out, options.overwrite)
    memory.data_budget(options.memory_limit)
    write_computed(d, folder, options.seed, device)
    for w in p.warnings:
        warnings.warn(w, stacklevel=2)
    _merge(p, out, progress(p) if progress else None)
    return p


__all__ = ["MoECheck", "MoEConfig", "check_moe", "load_moe_config", "run_moe"]
