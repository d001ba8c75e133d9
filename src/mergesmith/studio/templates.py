"""Recipe templates for the editor, filled with model folders found under the roots."""

from __future__ import annotations

TEMPLATES = {
    "task_arithmetic": ("Task arithmetic (the demo's recipe)", """\
# base + 1.0·(a − base) + 0.3·(b − base), tensor by tensor
merge_method: task_arithmetic
base_model: {base}
models:
  - model: {a}
    parameters: {{weight: 1.0}}
  - model: {b}
    parameters: {{weight: 0.3}}
"""),
    "ties": ("TIES (trim, elect sign, merge)", """\
merge_method: ties
base_model: {base}
models:
  - model: {a}
    parameters: {{weight: 1.0, density: 0.5}}
  - model: {b}
    parameters: {{weight: 0.5, density: 0.5}}
parameters:
  normalize: true
"""),
    "slerp": ("SLERP (spherical interpolation of two models)", """\
merge_method: slerp
base_model: {a}
models:
  - model: {a}
  - model: {b}
parameters:
  t:
    - filter: self_attn
      value: [0.0, 0.5, 1.0]
    - value: 0.5
"""),
    "frankenmerge": ("Frankenmerge (passthrough slices)", """\
# layers 0-1 of a, then layers 1-2 of b: a deeper model
merge_method: passthrough
slices:
  - sources: [{{model: {a}, layer_range: [0, 2]}}]
  - sources: [{{model: {b}, layer_range: [1, 3]}}]
"""),
    "moe": ("Mixture of experts (mergekit-moe)", """\
# mergekit-moe's format: dense models become the experts of one MoE model
base_model: {base}
gate_mode: random
experts:
  - source_model: {a}
    positive_prompts: ["math"]
  - source_model: {b}
    positive_prompts: ["code"]
"""),
}


def render(models: list[str]) -> list[dict[str, str]]:
    names = (models + ["./models/base", "./models/ft_a", "./models/ft_b"])[:3] \
        if len(models) < 3 else models[:3]
    fill = {"base": names[0], "a": names[1], "b": names[2]}
    return [{"id": key, "title": title, "text": text.format(**fill)}
            for key, (title, text) in TEMPLATES.items()]
