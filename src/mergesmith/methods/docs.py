"""Method documentation generated from the declarations (``docs/methods.md``).

``mergesmith methods --markdown > docs/methods.md`` regenerates the file; a test checks that
the committed file matches, so the docs cannot drift from the code.
"""

from __future__ import annotations

from .registry import BasePolicy, MethodSpec, Param, Scope

INTRO = """\
# Merge methods

Generated from the method declarations by `mergesmith methods --markdown`; do not edit by
hand. `mergesmith methods NAME` shows the same in the terminal.

Names, parameters and defaults are mergekit's, so mergekit recipes run unchanged. Rules
that hold for every method:

* **Precision**: inputs are read in their dtype (rounded to the recipe's `dtype` first, as
  mergekit does), upcast to float32 (`--compute-dtype float64` for more), and each result is
  rounded once to the output dtype. mergekit computes most methods in the input dtype, so
  on bfloat16 inputs our results are closer to the exact value.
* **Parameters** are typed: numbers, booleans (`true`, `false`, `1`, `0`, `"false"`; not
  `0.5`) and integers. A gradient of booleans is a step function. Unknown parameters, and
  shared parameters given for one model, are errors.
* **Randomness** (DARE, DELLA): one generator per output tensor, seeded from the recipe's
  `seed:` (or `--seed`, default 0) and the tensor name; models draw in recipe order. The
  same seed gives bit-identical output for any thread count. Masks differ from mergekit's,
  which uses one global generator.
* **Base model**: *required* methods use it as `x₀`; *optional* ones use it when given;
  *ignored* ones treat a configured base as one more input (mergekit adds it to the
  inputs, so it then needs a `weight` where the method has one).
* **Zero weight sums** where a method divides by them are errors naming the tensor, not
  inf/NaN outputs.

Notation: `x₀` the base, `xᵢ` the other inputs in recipe order, `wᵢ` their `weight`,
`δᵢ = xᵢ − x₀` task vectors.
"""

_KIND = {float: "number", bool: "boolean", int: "integer", str: "string"}
_SCOPE = {Scope.SHARED: "per tensor", Scope.INPUT: "per model (base included)",
          Scope.NON_BASE: "per model"}
_BASE = {BasePolicy.REQUIRED: "required", BasePolicy.OPTIONAL: "optional",
         BasePolicy.IGNORED: "ignored (a configured base is one more input)",
         BasePolicy.FORBIDDEN: "not allowed"}


def _default(p: Param) -> str:
    if p.required:
        return "**required**"
    if isinstance(p.default, bool):
        return f"`{str(p.default).lower()}`"
    return "unset" if p.default is None else f"`{p.default:g}`" if isinstance(
        p.default, float) else f"`{p.default}`"


def _inputs(spec: MethodSpec) -> str:
    def span(lo: int, hi: int | None) -> str:
        return f"exactly {lo}" if lo == hi else f"at least {lo}" if hi is None else f"{lo}–{hi}"

    text = f"{span(spec.contract.min_inputs, spec.contract.max_inputs)} (the base included)"
    if spec.contract.min_non_base or spec.contract.max_non_base is not None:
        text += f", {span(spec.contract.min_non_base, spec.contract.max_non_base)} besides the base"
    return text


def render_method(spec: MethodSpec) -> str:
    lines = [f"## `{spec.name}`", "", spec.docs.summary, ""]
    if spec.docs.description:
        lines += [spec.docs.description, ""]
    lines += [f"* Base model: {_BASE[spec.contract.base]}", f"* Inputs: {_inputs(spec)}"]
    shape = ("element-wise (large tensors are processed in row chunks)"
             if spec.scheduling.elementwise
             else "needs whole tensors")
    lines.append(f"* Computation: {shape}{'; random' if spec.scheduling.random else ''}")
    if spec.docs.reference:
        lines.append(f"* Reference: <{spec.docs.reference}>")
    lines.append("")
    if spec.params:
        lines += ["| parameter | type | scope | default | meaning |", "|---|---|---|---|---|"]
        for p in spec.params:
            lines.append(f"| `{p.name}` | {_KIND.get(p.type, p.type.__name__)} | "
                         f"{_SCOPE[p.scope]} | {_default(p)} | {p.doc} |")
        lines.append("")
    if spec.docs.differences:
        lines += [f"**Differences from mergekit 0.1.5:** {spec.docs.differences}", ""]
    return "\n".join(lines)


def render_markdown(specs: list[MethodSpec]) -> str:
    """The whole ``docs/methods.md``."""
    index = ", ".join(f"[`{s.name}`](#{s.name})" for s in specs)
    body = "\n".join(render_method(s) for s in specs)
    return f"{INTRO}\nMethods: {index}.\n\n{body}".rstrip() + "\n"
