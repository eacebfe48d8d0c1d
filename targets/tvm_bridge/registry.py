"""The registry of op lowerings: ``(domain, op_type) → lowering(lowerer, node)``.

Built-in lowerings register when the package is imported (:mod:`qcompiler.targets.tvm_bridge`
imports its kernel modules); a plugin registers its own with :func:`lowers` when its module
is imported (for instance the module of an integer op that ships a hand-tuned kernel).
"""

from __future__ import annotations

from collections.abc import Callable

#: ``(domain, op_type) → lowering(lowerer, node) -> Relax expr or list of them``.
LOWERINGS: dict[tuple[str, str], Callable] = {}


def lowers(*op_types: str, domain: str = ""):
    """Decorator: make ``fn(lowerer, node)`` the lowering of ``op_types`` in ``domain``.

    For an integer op this overrides the rendering of its decomposition (a hand-tuned
    kernel); tests check such overrides bit-exactly against the decomposition."""

    def register(fn: Callable) -> Callable:
        for op in op_types:
            LOWERINGS[(domain, op)] = fn
        return fn

    return register
