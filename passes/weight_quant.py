"""Data-free weight quantization: ``W`` → ``DequantizeLinear(q(W), s, z)``."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as ir_common

from qcompiler.gptq import gptq_for_node
from qcompiler.graph import NameFactory, add_initializer, const_array, ensure_opset
from qcompiler.instruments import sqnr_db
from qcompiler.pipeline import Pass, option
from qcompiler.quant import QFormat, QuantizedTensor, pow2_quantize_weight, quantize_weight, second_moment_scaled


def weight_slots(node: ir.Node) -> list[tuple[int, int, int]]:
    """``(input index, channel axis, reduce axis)`` of the constant weights of ``node``.

    Channel axis = output channels (per-channel scales); reduce axis = the
    accumulation axis (per-group blocks).
    """
    op = node.op_type
    if node.domain not in ("", "ai.onnx"):
        return []
    if op == "MatMul":
        w = node.inputs[1]
        if const_array(w) is not None and w.shape is not None and len(w.shape) >= 2:
            return [(1, -1, -2)]
    elif op == "Gemm":
        trans_b = node.attributes.get("transB")
        trans_b = trans_b.as_int() if trans_b is not None else 0
        if const_array(node.inputs[1]) is not None:
            return [(1, 0, 1) if trans_b else (1, 1, 0)]
    elif op == "Conv":
        if const_array(node.inputs[1]) is not None:
            return [(1, 0, 1)]
    elif op == "ConvTranspose":
        group = node.attributes.get("group")
        if const_array(node.inputs[1]) is not None and (group is None or group.as_int() == 1):
            return [(1, 1, 0)]
    elif op == "Gather":
        if const_array(node.inputs[0]) is not None and const_array(node.inputs[0]).ndim == 2:
            return [(0, 0, 1)]
    return []


def dequantize_node(
    graph: ir.Graph, names: NameFactory, base: str, qt: QuantizedTensor
) -> ir.Node:
    """A DequantizeLinear node reading ``qt`` from new initializers."""
    q = add_initializer(graph, names(f"{base}_q"), qt.data)
    s = add_initializer(graph, names(f"{base}_scale"), np.asarray(qt.scale, np.float32))
    z = add_initializer(graph, names(f"{base}_zero_point"), np.asarray(qt.zero_point))
    attributes = {}
    if qt.axis is not None:
        attributes["axis"] = qt.axis
    if qt.block_size:
        attributes["block_size"] = qt.block_size
    node = ir.node("DequantizeLinear", [q, s, z], attributes, name=names(f"{base}_dequantize"))
    node.outputs[0].name = names(f"{base}_dq")
    node.outputs[0].dtype = ir.DataType.FLOAT
    node.outputs[0].shape = ir.Shape(qt.data.shape)
    return node


def quantize_weights(
    model: ir.Model, ctx, fmt: QFormat, ops: tuple[str, ...], keep_float: tuple[str, ...],
    only: set[str] | None = None,
    hessians: dict | None = None,
    method: str = "mse",
    second_moment: bool = False,
) -> int:
    """Replace the float weights of ``ops`` nodes by DequantizeLinear of integers; returns count.

    ``keep_float`` are node-name globs to skip; ``only`` restricts to these node names.
    ``method``: ``mse`` (clipping search), ``gptq`` (with ``hessians``), ``pow2`` (power-of-two
    values, :func:`~qcompiler.quant.pow2_quantize_weight`). ``second_moment``: scale each
    channel by γ (:func:`~qcompiler.quant.second_moment_scaled`).
    """
    if fmt.bits != 8 or fmt.granularity == "per-group" or not fmt.signed:
        ensure_opset(model, 21)  # int4/int16/uint weights and block_size need opset 21
    graph = model.graph
    names = NameFactory(graph)
    done: dict[int, ir.Value] = {}
    rows = ctx.report.setdefault("weights", [])
    count = 0
    for node in list(graph):
        if node.op_type not in ops or any(fnmatch.fnmatchcase(node.name or "", p) for p in keep_float):
            continue
        if only is not None and node.name not in only:
            continue
        for index, channel_axis, reduce_axis in weight_slots(node):
            weight = node.inputs[index]
            if id(weight) not in done:
                array = const_array(weight)
                if array.dtype != np.float32 or array.size < 2:
                    continue
                qt = gptq_for_node(node, array, hessians, fmt) if hessians else None
                if qt is None and method == "pow2":
                    qt = pow2_quantize_weight(array, fmt, channel_axis)
                if qt is None:
                    qt = quantize_weight(array, fmt, channel_axis, reduce_axis)
                if second_moment:
                    qt = second_moment_scaled(qt, array)
                dq = dequantize_node(graph, names, weight.name or node.name, qt)
                graph.insert_before(node, dq)  # graph order: this is the first user among `ops`
                done[id(weight)] = dq.outputs[0]
                rows.append({
                    "weight": weight.name,
                    "node": node.name,
                    "op": node.op_type,
                    "format": str(fmt) + (":pow2" if method == "pow2" else "") + (":γ" if second_moment else ""),
                    "sqnr_db": round(sqnr_db(array, qt.dequantize()), 2),
                })
            node.replace_input_with(index, done[id(weight)])
            count += 1
    return count


@dataclass(frozen=True)
class QuantizeWeights(Pass):
    """Quantize constant weights without data (float activations): W → DequantizeLinear(q(W))."""

    name = "quantize-weights"
    stages = ("float", "fakequant")
    produces = "fakequant"
    preserves_numerics = False

    format: str = option("int8:per-channel", "weight format, e.g. int8:per-channel, int4:per-group:32")
    ops: tuple[str, ...] = option(("MatMul", "Gemm", "Conv", "ConvTranspose"), "op types whose weights are quantized")
    keep_float: tuple[str, ...] = option((), "node-name patterns (fnmatch) to leave in float")
    method: Literal["mse", "pow2"] = option("mse", "mse: clipping search; pow2: power-of-two values (products are shifts)")
    second_moment: bool = option(False, "scale each channel by γ = sqrt(E[W²]/E[Q(W)²]) (seed 003 eq. 18)")

    def __post_init__(self):
        QFormat.parse(self.format)  # raises ValueError -> PipelineError on bad text

    def run(self, model: ir.Model, ctx) -> bool:
        count = quantize_weights(model, ctx, QFormat.parse(self.format), self.ops, self.keep_float,
                                 method=self.method, second_moment=self.second_moment)
        ctx.log(f"quantize-weights: {count} weights as {self.format}")
        ir_common.RemoveUnusedNodesPass()(model)
        return count > 0
