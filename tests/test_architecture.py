"""The house: one package per stage, each importing only the stages below it (docs/architecture.md).

Read from the code itself (every ``import`` and ``from ... import``, function-level and ``TYPE_CHECKING``
ones included), so a change that makes an import run back up the layers fails here."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "bnfold"

LAYERS: list[set[str]] = [
    {"_version", "errors", "overrides", "environment", "messages"},  # the floor
    {"io"},
    {"ir"},
    {"folding"},
    {"check"},
    {"timing"},
    {"report"},
    {"torch"},
    {"run"},
    {"pipeline_torch"},
    {"pipeline"},
    {"cli"},
    {"__init__", "__main__"},
]
"""Bottom to top. A module may import its own stage and any stage on a lower line."""

LEVEL = {name: i for i, names in enumerate(LAYERS) for name in names}


def _stage(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "bnfold":
        return None
    return parts[1] if len(parts) > 1 else "__init__"


def _modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        out.append((rel.parts[0].removesuffix(".py"), path))
    return out


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def test_every_stage_has_a_layer() -> None:
    assert {stage for stage, _ in _modules()} <= set(LEVEL), {stage for stage, _ in _modules()} - set(LEVEL)


@pytest.mark.parametrize(("stage", "path"), _modules(), ids=lambda v: str(v).rsplit("bnfold/", 1)[-1])
def test_imports_only_run_down(stage: str, path: Path) -> None:
    up = sorted(
        f"{m} ({_stage(m)})" for m in _imports(path)
        if (s := _stage(m)) is not None and s != stage and LEVEL.get(s, -1) > LEVEL[stage]
    )
    assert not up, f"{path.relative_to(PACKAGE.parent)} imports from a stage above it: {up}"


def test_each_stage_package_says_what_enters_and_what_leaves() -> None:
    for init in sorted(PACKAGE.glob("*/__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert ("Enters:" in doc and "Leaves:" in doc) or init.parent.name == "cli", init
