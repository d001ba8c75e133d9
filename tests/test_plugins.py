"""The method-authoring API: a decorated function is a method; plugins arrive by entry point."""

from __future__ import annotations

import importlib.metadata
import sys
import textwrap

import torch
from conftest import LLAMA, load_model, random_tensors, recipe_file, write_model

import mergesmith
from mergesmith.methods import registry


def test_decorated_function_runs_in_a_recipe(tmp_path, monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    @registry.merge_method("elementwise_max", params=[
        registry.Param("floor", float, 0.0, doc="values below are raised to it")],
        elementwise=True)
    def elementwise_max(m):
        """Element-wise maximum of the inputs, raised to `floor`."""
        out = m.tensors[0]
        for x in m.tensors[1:]:
            out = torch.maximum(out, x)
        return out.clamp_(min=m.params["floor"])

    a, b = random_tensors(LLAMA, 1), random_tensors(LLAMA, 2)
    pa, pb = write_model(tmp_path / "a", a), write_model(tmp_path / "b", b)
    recipe = recipe_file(tmp_path, f"""merge_method: elementwise_max
models:
  - model: {pa}
  - model: {pb}
parameters: {{floor: -0.01}}
""")
    mergesmith.run(recipe, tmp_path / "out")
    out = load_model(tmp_path / "out")
    for name in a:
        assert torch.equal(out[name], torch.maximum(a[name], b[name]).clamp(min=-0.01))


def test_entry_point_plugin_is_listed_and_usable(tmp_path, monkeypatch):
    (tmp_path / "my_plugin.py").write_text(textwrap.dedent('''
        from mergesmith.methods import BasePolicy, Param, merge_method

        @merge_method("negate", base=BasePolicy.FORBIDDEN, max_inputs=1)
        def negate(m):
            """Multiply the single input by -1."""
            return -m.tensors[0]
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_ENTRY_POINTS_LOADED", False)
    ep = importlib.metadata.EntryPoint("negate", "my_plugin", "mergesmith.methods")
    real = importlib.metadata.entry_points
    monkeypatch.setattr(importlib.metadata, "entry_points",
                        lambda **kw: [ep] if kw.get("group") == "mergesmith.methods" else real(**kw))
    assert "negate" in mergesmith.methods.all_methods()
    x = torch.randn(3)
    assert torch.equal(mergesmith.merge_tensors([x], "negate"), -x)
    sys.modules.pop("my_plugin", None)


def test_broken_plugin_warns_and_builtins_still_work(monkeypatch):
    monkeypatch.setattr(registry, "_ENTRY_POINTS_LOADED", False)
    ep = importlib.metadata.EntryPoint("broken", "no_such_module_xyz", "mergesmith.methods")
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda **kw: [ep])
    import pytest

    with pytest.warns(UserWarning, match="could not load merge method plugin 'broken'"):
        methods = mergesmith.methods.all_methods()
    assert "linear" in methods
