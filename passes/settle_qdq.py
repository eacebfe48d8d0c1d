"""``settle-qdq``: quantize/dequantize pairs on both sides of data movement, as lowering expects.

``lower-integer`` lowers an op when its inputs are dequantized integers and its output is
read by one ``QuantizeLinear``. ``insert-fake-quant`` places pairs that way; a QDQ model
made elsewhere (onnxruntime's ``quantize_static``, PT2E) often does not: it quantizes
where the next *quantized* op reads, so a pair sits after a ``Reshape`` rather than
before it (``Gelu → Reshape → Q``), or a dequantized tensor is reshaped before a float op
reads it (``DQ → Reshape → Gelu``). The op on the far side then has a float input or a
float output, and stays float.

Data movement ``M`` (reshape, transpose, slice, gather, ...) commutes with per-tensor
quantization, ``Q(M(x)) = M(Q(x))``, and a pair re-quantizing a value already on its grid
changes nothing, ``Q(DQ(q)) = q``. So both rewrites are exact::

    M(x) → Q                    ⇒  M(DQ(Q(x))) → Q          (same scale, zero point)
    DQ(q) → M → float reader    ⇒  DQ(q) → M → Q → DQ → float reader

They repeat until nothing changes (chains of movement). Pairs are only added next to a
per-tensor pair (per-channel parameters do not commute with a transpose), and only where
the moved value has no other reader.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from qcompiler.graph import NameFactory, const_array
from qcompiler.pipeline import Pass
from qcompiler.qdq import insert_qdq, is_float, moves_values, only_user, qdq_source


def _per_tensor_params(node: ir.Node) -> tuple[float, np.ndarray] | None:
    """``(scale, zero point)`` of a per-tensor QuantizeLinear/DequantizeLinear with constant parameters."""
    scale = const_array(node.inputs[1])
    zero = const_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
    if scale is None or scale.size != 1 or zero is None or zero.size != 1:
        return None
    if "block_size" in node.attributes and node.attributes["block_size"].as_int() > 0:
        return None
    return float(scale.reshape(-1)[0]), np.asarray(zero).reshape(())


def _movement(node: ir.Node | None) -> bool:
    """One-output data movement whose other inputs are constants (shapes, indices, pads)."""
    return (
        node is not None and node.domain in ("", "ai.onnx") and len(node.outputs) == 1
        and moves_values(node) and is_float(node.inputs[0])
        and all(v is None or const_array(v) is not None for v in node.inputs[1:])
    )


def _quantize_before(model: ir.Model, names: NameFactory) -> int:
    """``M(x) → Q``: quantize ``x`` with Q's parameters before ``M``."""
    count = 0
    for q in list(model.graph):
        if q.op_type != "QuantizeLinear" or q.graph is None:
            continue
        moved = q.inputs[0]
        mover = moved.producer()
        params = _per_tensor_params(q)
        if params is None or not _movement(mover) or only_user(moved) is not q:
            continue
        source = mover.inputs[0]
        if qdq_source(source) is not None or source.producer() is None and not source.is_graph_input():
            continue  # already dequantized, or a constant
        scale, zero = params
        insert_qdq(model.graph, names, source, scale, zero, after=source.producer(), readers=[mover])
        count += 1
    return count


def _quantize_after(model: ir.Model, names: NameFactory) -> int:
    """``DQ(q) → M → float reader``: quantize ``M``'s output with DQ's parameters."""
    count = 0
    for mover in list(model.graph):
        if not _movement(mover) or mover.graph is None:
            continue
        source = qdq_source(mover.inputs[0])
        out = mover.outputs[0]
        if source is None or out.is_graph_output() or not out.uses():
            continue
        if all(u.node.op_type == "QuantizeLinear" for u in out.uses()):
            continue  # already quantized
        params = _per_tensor_params(source[3])
        if params is None:
            continue
        scale, zero = params
        insert_qdq(model.graph, names, out, scale, zero, after=mover)
        count += 1
    return count


@dataclass(frozen=True)
class SettleQdq(Pass):
    """Quantize/dequantize pairs moved across data movement so that lowering sees them (exact)."""

    name = "settle-qdq"
    stages = ("fakequant",)

    def run(self, model: ir.Model, ctx) -> bool:
        names = NameFactory(model.graph)
        total = 0
        while True:
            added = _quantize_before(model, names) + _quantize_after(model, names)
            if not added:
                break
            total += added
        if total:
            ctx.log(f"settle-qdq: {total} quantize/dequantize pair(s) added next to data movement")
            ctx.report["settle_qdq"] = {"pairs_added": total}
        return bool(total)
