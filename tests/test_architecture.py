"""Structure rules: no import cycles (module-level or deferred), modules of a readable size,
a declared public API."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

import qcompiler

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"qcompiler": ROOT / "qcompiler", "qcompiler.passes": ROOT / "passes", "qcompiler.targets": ROOT / "targets"}
#: A module over this many lines says at its top why it is not split.
MAX_LINES = 600


def _modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            found[".".join([package, *parts])] = path
    return found


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    if path.name != "__init__.py":
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _runtime_nodes(tree: ast.AST):
    """Every node but those under ``if TYPE_CHECKING:`` (imports for annotations only)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and isinstance(child.test, ast.Name) and child.test.id == "TYPE_CHECKING":
                continue
            stack.append(child)


def import_graph() -> nx.DiGraph:
    """Every import between qcompiler's modules, including those inside functions."""
    modules = _modules()
    graph = nx.DiGraph()
    graph.add_nodes_from(modules)
    for module, path in modules.items():
        for node in _runtime_nodes(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(module, path, node)
                targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != module and not module.startswith(target + "."):
                    graph.add_edge(module, target)
    return graph


def test_no_import_cycles():
    cycles = [sorted(c) for c in nx.strongly_connected_components(import_graph()) if len(c) > 1]
    assert not cycles, f"import cycles: {cycles}"


def test_modules_are_small_or_say_why():
    long = []
    for module, path in _modules().items():
        lines = path.read_text().splitlines()
        if len(lines) > MAX_LINES:
            head = "\n".join(lines[:40]).lower()
            if "why this module is long" not in head:
                long.append(f"{module} ({len(lines)} lines)")
    assert not long, f"modules over {MAX_LINES} lines without a reason at their top: {long}"


def test_public_api_is_declared_and_importable():
    assert qcompiler.__all__ == sorted(qcompiler.__all__)
    for name in qcompiler.__all__:
        assert getattr(qcompiler, name) is not None, name
    for name in ("compile", "compile_model", "load", "load_onnx", "from_torch", "Pass", "Target", "IntegerOp"):
        assert name in qcompiler.__all__
