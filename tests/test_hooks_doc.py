"""docs/hooks.md is checked against the code: a section per hook, headed by the hook's own
signature, with an example implementation."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from tpu_registry import hookspecs

DOC = Path(__file__).resolve().parent.parent / "docs" / "hooks.md"


def _hooks() -> list[str]:
    return [
        n
        for n, f in vars(hookspecs).items()
        if n.startswith("tpu_registry_") and hasattr(f, "tpu_registry_spec")
    ]


def _signature(name: str) -> str:
    sig = inspect.signature(getattr(hookspecs, name))
    params = ", ".join(f"{p.name}: {p.annotation}" for p in sig.parameters.values())
    return f"{name}({params}) -> {sig.return_annotation}"


def check_hooks_doc(doc: str) -> None:
    headings = re.findall(r"^## `(tpu_registry_\w+\(.*\)[^`]*)`$", doc, re.M)
    assert headings, "docs/hooks.md has no hook sections"
    assert sorted(headings) == sorted(_signature(n) for n in _hooks())
    for name in _hooks():
        section = doc.split(f"## `{name}(")[1].split("\n## ")[0]
        assert f"def {name}(" in section, f"{name} has no example in docs/hooks.md"
        assert "@tpu_registry.hookimpl" in section
        spec = getattr(hookspecs, name)
        assert spec.__doc__ and spec.__annotations__.get("return"), (
            f"{name} is not documented and typed"
        )


def test_every_hook_is_documented_with_its_signature_and_an_example():
    check_hooks_doc(DOC.read_text())


def test_the_check_sees_hooks_added_to_the_code(monkeypatch):
    """A hook added to hookspecs but not to the document fails the check above."""

    @hookspecs.hookspec
    def tpu_registry_new_hook() -> None:
        """A new hook."""

    monkeypatch.setattr(hookspecs, "tpu_registry_new_hook", tpu_registry_new_hook, raising=False)
    assert "tpu_registry_new_hook" in _hooks()
    with pytest.raises(AssertionError):
        check_hooks_doc(DOC.read_text())


def test_the_check_sees_a_stale_signature():
    doc = DOC.read_text().replace(
        "detection: Detection, context: TuneContext) -> Layer | None",
        "detection: Detection) -> Layer | None",
    )
    with pytest.raises(AssertionError):
        check_hooks_doc(doc)
