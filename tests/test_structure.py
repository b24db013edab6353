"""The code's shape as a contract: the layering (import-linter, configured in
pyproject.toml), no private name imported across modules, modules of a few hundred lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "modelgrow"
ROOT = PACKAGE.parent
MAX_LINES = 400


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_layers_contract_holds():
    from importlinter.cli import lint_imports

    assert lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True) == 0


def test_the_layers_contract_names_every_module():
    """A new module must be placed in a layer, or it escapes the contract."""
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    layers = {name.strip() for c in config["contracts"] for layer in c.get("layers", [])
              for name in layer.replace(":", "|").split("|")}
    code = [p for p in modules() if p.read_text().strip()]  # data/ and layouts/ hold no code
    top = {p.relative_to(PACKAGE).parts[0].removesuffix(".py") for p in code} - {"__init__", "__main__"}
    placed = {name.removeprefix("modelgrow.") for name in layers}
    assert top <= placed, sorted(top - placed)


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_private_name_is_imported_across_modules(path):
    tree = ast.parse(path.read_text(), str(path))
    bad = [f"line {node.lineno}: {alias.name}" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
           for alias in node.names if alias.name.startswith("_") and not alias.name.startswith("__")]
    # A private attribute of one of our modules reached through its name is as private.
    ours = {alias.asname or alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
            and (node.level > 0 or (node.module or "").startswith("modelgrow")) for alias in node.names}
    bad += [f"line {node.lineno}: {ast.unparse(node)}" for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
            and isinstance(node.value, ast.Name) and node.value.id in ours]
    assert not bad, bad


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_modules_stay_short(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(ROOT)} has {lines} lines; split it by job"


def test_no_import_cycles_between_modules():
    """Within a layer siblings may import each other, but never in a circle."""
    import grimp

    graph = grimp.build_graph("modelgrow", cache_dir=None)
    for package in ("modelgrow.engine", "modelgrow.operators", "modelgrow.checkpoint", "modelgrow.architectures"):
        graph.squash_module(package)
    nodes = {m for m in graph.modules if m.count(".") == 1}
    edges = {m: {i for i in graph.find_modules_directly_imported_by(m) if i in nodes and i != m} for m in nodes}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            assert state.get(nxt) != 1, " -> ".join(path[path.index(nxt):] + [node, nxt]) if nxt in path else nxt
            if nxt not in state:
                visit(nxt, path + [node])
        state[node] = 2

    for node in sorted(nodes):
        if node not in state:
            visit(node, [])
