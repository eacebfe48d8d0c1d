"""Does any float computation remain in a graph a target declares integer-only?"""

from __future__ import annotations

import onnx_ir as ir

from .graph import get_stage, node_label
from .specialize import CONTROL_FLOW, control_flow_hint

_FLOAT_TYPES = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE}


def _is_output_dequantize(node: ir.Node) -> bool:
    """A DequantizeLinear whose result only leaves the graph (the final dequantize)."""
    if node.op_type != "DequantizeLinear":
        return False
    out = node.outputs[0]
    return out.is_graph_output() and not out.uses()


def first_float_compute(model: ir.Model) -> str | None:
    """Describe the first node computing a float tensor (other than final dequantizes), or None."""
    stage = get_stage(model)
    # Control flow first: the float values its branches capture are a consequence of it.
    for node in model.graph:
        if node.op_type in CONTROL_FLOW and node.domain in ("", "ai.onnx"):
            return control_flow_hint(node)
    for node in model.graph:
        if _is_output_dequantize(node):
            continue
        for out in node.outputs:
            if out.dtype in _FLOAT_TYPES:
                if stage != "integer":
                    return (
                        f"the model is at the {stage} stage ({node_label(node)} computes in float): "
                        "integer targets need calibrated integer activations; pass --calib DATA "
                        "(presets w8a8/w4a8)"
                    )
                return _float_island(node, out)
    return None


def _float_island(node: ir.Node, out: ir.Value) -> str:
    """Name the op that stayed in float rather than the DequantizeLinear feeding it."""
    if node.op_type == "DequantizeLinear":
        readers = [use.node for use in out.uses() if use.node.op_type not in ("QuantizeLinear", "DequantizeLinear")]
        if readers:
            reader = readers[0]
            why = reader.metadata_props.get("qcompiler.kept_float")
            because = f": {why}" if why else ""
            return (f"{node_label(reader)} has no integer form here and stays in float{because} (it reads the "
                    f"dequantized '{out.name}'; the report's integer_lowering.kept_float lists every such node)")
    return f"{node_label(node)} computes the float tensor '{out.name}'"
