"""The house by layer: every import inside sessionmig points down, never up.

sessionmig's packages are floors (see README, "What is in the box"): ``rules`` (pure) →
``sqlite`` (the backup side) → ``postgres`` (the target side) → ``engines`` → ``reports`` →
``runbook`` → ``command`` and ``cli`` at the top. The root's ``errors``, ``defaults`` and
``store`` are the ground every floor stands on. A module may import its own floor and those
below it; an import of a higher floor (even inside a function or under ``TYPE_CHECKING``) is
a back edge, and this test names each one as (module, imported module).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "scripts" / "sessionmig"

FLOORS = {
    "sessionmig.errors": 0,
    "sessionmig.defaults": 0,
    "sessionmig.store": 0,
    "sessionmig._version": 0,
    "sessionmig.rules": 1,
    "sessionmig.sqlite": 2,
    "sessionmig.postgres": 3,
    "sessionmig.engines": 4,
    "sessionmig.reports": 5,
    "sessionmig.runbook": 6,
    "sessionmig.command": 7,
    "sessionmig.cli": 8,
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def floor(module: str) -> int | None:
    """The floor of a module of sessionmig: its package's, or its own at the root."""
    for prefix in sorted(FLOORS, key=len, reverse=True):
        if module == prefix or module.startswith(prefix + "."):
            return FLOORS[prefix]
    return None


def imports(path: Path, name: str) -> set[str]:
    """Every sessionmig module (or package) ``path`` imports, wherever the import stands."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "sessionmig")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            if target.split(".")[0] != "sessionmig":
                continue
            for alias in node.names:  # `from sessionmig import errors` imports a module
                candidate = f"{target}.{alias.name}"
                found.add(candidate if floor(candidate) != floor(target) else target)
    return found


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports(p, module_name(p)) for p in sorted(PACKAGE.rglob("*.py"))}


def back_edges(edges: dict[str, set[str]]) -> list[tuple[str, str]]:
    """(module, imported) pairs whose import points to a higher floor."""
    wrong = []
    for module, targets in sorted(edges.items()):
        here = floor(module)
        if here is None:  # the package's own __init__: it imports nothing
            assert not targets, (module, targets)
            continue
        for target in sorted(targets):
            there = floor(target)
            if there is None or there > here:
                wrong.append((module, target))
    return wrong


def test_every_module_has_a_floor() -> None:
    assert [m for m in graph() if m != "sessionmig" and floor(m) is None] == []


def test_every_import_points_down() -> None:
    assert back_edges(graph()) == []


def test_a_back_edge_is_named() -> None:
    """The check itself: an engine importing the runbook is reported, by module and import."""
    edges = {"sessionmig.engines.catchup": {"sessionmig.runbook.settings", "sessionmig.errors"}}
    assert back_edges(edges) == [("sessionmig.engines.catchup", "sessionmig.runbook.settings")]
