"""Walking a decomposition's DAG (shared by the builder and every backend)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .expr import Expr


def reachable(outputs: Iterable[Expr]) -> list[Expr]:
    """The nodes the outputs depend on, in topological (creation) order."""
    seen: dict[int, Expr] = {}
    stack = list(outputs)
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen[id(node)] = node
        stack.extend(node.args)
    return sorted(seen.values(), key=lambda n: n.index)


def users(nodes: Sequence[Expr]) -> dict[int, list[Expr]]:
    """``id(node) -> nodes reading it`` within ``nodes``."""
    out: dict[int, list[Expr]] = {id(n): [] for n in nodes}
    for node in nodes:
        for arg in node.args:
            out.setdefault(id(arg), []).append(node)
    return out
