"""Structural verification of the IR (run by the verify-after-each instrument)."""

from __future__ import annotations

import onnx
import onnx_ir as ir

from .graph import node_label
from .integer import is_supported


class VerificationError(Exception):
    """The IR broke an invariant; always a bug in the pass that ran last."""


def verify(model: ir.Model, *, check_schemas: bool = True) -> None:
    """Raise :class:`VerificationError` unless ``model`` is well formed.

    Checks: nodes are in topological order, every input is defined, value names are
    unique, graph outputs are produced, every op is supported, and (with
    ``check_schemas``) the ONNX checker accepts each node.
    """
    graph = model.graph
    defined: dict[str, str] = {}
    for value in list(graph.inputs) + list(graph.initializers.values()):
        if value.name in defined and value.name not in graph.initializers:
            raise VerificationError(f"value name '{value.name}' is defined twice")
        defined[value.name] = "graph"
    seen_nodes = set()
    for node in graph:
        seen_nodes.add(id(node))
        if not is_supported(node.domain, node.op_type):
            raise VerificationError(f"{node_label(node)}: unsupported op")
        for value in node.inputs:
            if value is None:
                continue
            if value.name not in defined:
                producer = value.producer()
                if producer is not None and id(producer) not in seen_nodes:
                    raise VerificationError(
                        f"{node_label(node)} reads '{value.name}' before {node_label(producer)} produces it"
                    )
                raise VerificationError(f"{node_label(node)} reads undefined value '{value.name}'")
        for value in node.outputs:
            if value.name in defined:
                raise VerificationError(f"value name '{value.name}' is defined twice ({node_label(node)})")
            defined[value.name] = node.name
    for value in graph.outputs:
        if value.name not in defined:
            raise VerificationError(f"graph output '{value.name}' is never produced")
    if check_schemas:
        ctx = onnx.checker.C.CheckerContext()
        ctx.ir_version = model.ir_version
        ctx.opset_imports = dict(graph.opset_imports)
        for node in graph:
            try:
                onnx.checker.check_node(ir.serde.serialize_node(node), ctx)
            except onnx.checker.ValidationError as exc:
                first = str(exc).strip().splitlines()[0]
                raise VerificationError(f"{node_label(node)}: {first}") from None
