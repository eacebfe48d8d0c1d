"""``exact-masks``: attention masks as selects that the integer softmax honours exactly.

An attention mask reaches a softmax as an additive term ``s + M`` (``M`` 0 where a
position takes part, a huge negative value — ``−inf``, ``finfo.min``, ``−1e4``, ... —
where it does not), or as a select ``Where(c, s, NEG)`` (``masked_fill``). Quantized with
one scale, such a mask saturates to the bottom of the score range and masked positions
keep some probability; a huge constant even breaks the fixed-point arithmetic. This pass
rewrites every form into one canonical select::

    Softmax(s + M)             →  Softmax(Where(keep, s, NEG))
    Softmax(Where(c, NEG, s))  →  Softmax(Where(Not(c), s, NEG))

with ``keep`` a bool tensor: a constant where ``M`` is one (a causal mask folded for a
fixed window), else rebuilt from the bool condition ``M`` was made from, through the
same data movement (``Where(c, 0, NEG)``, ``(1 − m)·NEG``, ``Cast(¬c)·NEG``; moved by
``Unsqueeze``, ``Expand``, ``Reshape``, ``Slice``, ``Transpose``, ``Squeeze``).
``insert-fake-quant`` leaves the select unquantized, and ``lower-integer`` turns it into
``IntSoftmax(s, mask=keep)``: masked positions get probability exactly 0, out of the
row's max and sum, whatever the calibrated score range. Float results are unchanged
(``s + NEG`` and ``NEG`` are the same float once ``|NEG| ≫ |s|``, which the pass checks:
``|NEG| ≥ 1e4``). Masks that are not pure 0/NEG (ALiBi, relative biases) are left alone.

The pass also runs on a model quantized elsewhere (a QDQ model from onnxruntime's
``quantize_static`` or PT2E): there the mask and the masked sum each sit behind a
``QuantizeLinear → DequantizeLinear`` pair whose scale spans the mask value (~1e36 for
``finfo.min``), which no fixed-point multiplier represents. The pass looks through those
pairs (``Softmax(DQ(Q(s + DQ(Q(M)))))``) and writes the same select over the quantized
scores, dropping the two pairs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from qcompiler.graph import NameFactory, add_initializer, const_array, node_label
from qcompiler.pipeline import Pass

#: A mask value at or below this is "masked" (and |s| is negligible beside it).
MASKED = -1e4
#: Ops that move data without changing it (applied to the keep tensor as to the mask).
MOVEMENT = frozenset({"Unsqueeze", "Expand", "Reshape", "Slice", "Transpose", "Squeeze", "Identity"})


def masked_value(array: np.ndarray) -> float | None:
    """The single masked value of a pure 0/NEG mask array (None if it is not one)."""
    values = np.unique(np.asarray(array, np.float64))
    masked = values[values <= MASKED]
    if masked.size != 1 or not np.all((values == 0) | (values <= MASKED)):
        return None
    return float(masked[0])


def _through_qdq(value: ir.Value, *, sole_reader: bool = True) -> ir.Value:
    """The float value behind ``DequantizeLinear(QuantizeLinear(x))`` (else ``value``); with
    ``sole_reader`` only where the pair and ``value`` have one reader each."""
    dq = value.producer()
    if dq is None or dq.op_type != "DequantizeLinear" or (sole_reader and len(value.uses()) != 1):
        return value
    q = dq.inputs[0].producer()
    if q is None or q.op_type != "QuantizeLinear" or (sole_reader and len(dq.inputs[0].uses()) != 1):
        return value
    return q.inputs[0]


def is_mask_select(node: ir.Node) -> bool:
    """``Where(keep, s, NEG)`` feeding only softmaxes: the canonical form of this pass."""
    if node.op_type != "Where" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 3:
        return False
    neg = const_array(node.inputs[2])
    users = [u.node for u in node.outputs[0].uses()]
    return (
        neg is not None and neg.size == 1 and float(neg.reshape(-1)[0]) <= MASKED
        and node.inputs[0].dtype == ir.DataType.BOOL and bool(users)
        and all(u.op_type == "Softmax" for u in users) and not node.outputs[0].is_graph_output()
    )


class _Builder:
    def __init__(self, model: ir.Model, anchor: ir.Node):
        self.graph = model.graph
        self.names = NameFactory(model.graph)
        self.anchor = anchor

    def node(self, op: str, inputs, attrs=None, *, dtype=ir.DataType.BOOL, shape=None, base="mask") -> ir.Value:
        node = ir.node(op, inputs, attrs or {}, name=self.names(f"{base}_{op.lower()}"))
        out = node.outputs[0]
        out.name = self.names(f"{base}_keep")
        out.dtype = dtype
        out.shape = shape
        self.graph.insert_before(self.anchor, node)
        return out


def _keep_of(model: ir.Model, mask: ir.Value, b: _Builder) -> tuple[ir.Value, float] | None:
    """``(keep, NEG)`` for an additive mask value, or None if it is not a recognised mask."""
    constant = const_array(mask)
    if constant is not None:
        neg = masked_value(constant)
        if neg is None:
            return None
        keep = add_initializer(model.graph, b.names(f"{mask.name or 'mask'}_keep"), np.asarray(constant) > MASKED)
        return keep, neg
    chain: list[ir.Node] = []
    value = mask
    while (producer := value.producer()) is not None and producer.op_type in MOVEMENT and producer.domain in ("", "ai.onnx"):
        chain.append(producer)
        value = producer.inputs[0]
    found = _source(value, b)
    if found is None:
        return None
    keep, neg = found
    for node in reversed(chain):  # the same movement, on the bool tensor
        attrs = {k: a.value for k, a in node.attributes.items()}
        keep = b.node(node.op_type, [keep, *node.inputs[1:]], attrs, shape=node.outputs[0].shape)
    return keep, neg


def _source(value: ir.Value, b: _Builder) -> tuple[ir.Value, float] | None:
    node = value.producer()
    if node is None or node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type == "Cast" and value.dtype in (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE):
        return _source(node.inputs[0], b) if node.inputs[0].dtype in (
            ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE) else None
    if node.op_type == "Where":
        cond, a, c = node.inputs
        a_value, c_value = const_array(a), const_array(c)
        if cond.dtype != ir.DataType.BOOL or a_value is None or c_value is None or a_value.size != 1 or c_value.size != 1:
            return None
        a_f, c_f = float(a_value.reshape(-1)[0]), float(c_value.reshape(-1)[0])
        if a_f == 0 and c_f <= MASKED:
            return cond, c_f
        if c_f == 0 and a_f <= MASKED:
            return b.node("Not", [cond], shape=cond.shape), a_f
        return None
    if node.op_type == "Mul":  # (1 − m)·NEG or Cast(not_keep)·NEG
        for scale_value, other in ((node.inputs[1], node.inputs[0]), (node.inputs[0], node.inputs[1])):
            scale = const_array(scale_value)
            if scale is None or scale.size != 1 or float(scale.reshape(-1)[0]) > MASKED:
                continue
            neg = float(scale.reshape(-1)[0])
            dropped = _dropped(other, b)
            if dropped is not None:
                return b.node("Not", [dropped], shape=dropped.shape), neg
    return None


def _dropped(value: ir.Value, b: _Builder) -> ir.Value | None:
    """A bool tensor true where ``value`` (a 0/1 float) is 1: ``1 − Cast(m)`` → ``m == 0``;
    ``Cast(d)`` with ``d`` bool → ``d``."""
    node = value.producer()
    if node is None:
        return None
    if node.op_type == "Cast" and node.inputs[0].dtype == ir.DataType.BOOL:
        return node.inputs[0]
    if node.op_type == "Sub":
        one = const_array(node.inputs[0])
        cast = node.inputs[1].producer()
        if one is not None and one.size == 1 and float(one.reshape(-1)[0]) == 1.0 and cast is not None and cast.op_type == "Cast":
            m = cast.inputs[0]
            if m.dtype == ir.DataType.BOOL:
                return b.node("Not", [m], shape=m.shape)
            if m.dtype is not None and m.dtype.is_integer():
                zero = add_initializer(b.graph, b.names("mask_zero"), np.zeros((), m.dtype.numpy()))
                return b.node("Equal", [m, zero], shape=m.shape)
    return None


@dataclass(frozen=True)
class ExactMasks(Pass):
    """Attention masks as selects the integer softmax honours exactly (masked: probability 0)."""

    name = "exact-masks"
    stages = ("float", "fakequant")

    def run(self, model: ir.Model, ctx) -> bool:
        rewritten = []
        for softmax in [n for n in model.graph if n.op_type == "Softmax" and n.domain in ("", "ai.onnx")]:
            summed = _through_qdq(softmax.inputs[0])
            producer = summed.producer()
            if producer is None or len(summed.uses()) != 1 or len(softmax.inputs[0].uses()) != 1:
                continue
            b = _Builder(model, softmax)
            select = None
            if producer.op_type == "Add":
                for mask, scores in ((producer.inputs[1], producer.inputs[0]), (producer.inputs[0], producer.inputs[1])):
                    found = _keep_of(model, _through_qdq(mask, sole_reader=False), b)
                    if found is not None:
                        keep, neg = found
                        select = (keep, scores, neg)
                        break
            elif producer.op_type == "Where":
                neg = const_array(producer.inputs[1])
                if neg is not None and neg.size == 1 and float(neg.reshape(-1)[0]) <= MASKED:  # masked_fill(c, NEG)
                    cond = producer.inputs[0]
                    select = (b.node("Not", [cond], shape=cond.shape), producer.inputs[2], float(neg.reshape(-1)[0]))
            if select is None:
                continue
            keep, scores, neg = select
            neg_value = add_initializer(model.graph, b.names("mask_value"), np.array(neg, scores.dtype.numpy()))
            out = b.node("Where", [keep, scores, neg_value], dtype=scores.dtype, shape=softmax.inputs[0].shape, base="masked")
            softmax.replace_input_with(0, out)
            rewritten.append(node_label(softmax))
        if rewritten:
            import onnx_ir.passes.common as ir_common

            ir_common.RemoveUnusedNodesPass()(model)
            ctx.report.setdefault("exact_masks", []).extend(rewritten)
            ctx.log(f"exact-masks: {len(rewritten)} attention mask(s) made exact")
        return bool(rewritten)
