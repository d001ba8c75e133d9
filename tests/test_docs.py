"""Generated documentation stays in step with the method declarations."""

from __future__ import annotations

from pathlib import Path

from mergesmith.methods import all_methods
from mergesmith.methods.docs import render_markdown

DOCS = Path(__file__).resolve().parents[1] / "docs" / "methods.md"


def test_docs_methods_md_is_up_to_date():
    expected = render_markdown(list(all_methods().values()))
    assert DOCS.read_text() == expected, (
        "docs/methods.md is stale: run `mergesmith methods --markdown > docs/methods.md`")


def test_every_method_is_documented_with_its_parameters():
    text = DOCS.read_text()
    for name, spec in all_methods().items():
        assert f"## `{name}`" in text
        for p in spec.params:
            assert f"| `{p.name}` |" in text
