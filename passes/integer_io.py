"""``integer-io``: graph inputs and outputs that cross the artifact boundary as int8.

State a model carries from one call to the next (the KV cache of a decoder step, the
hidden state of a recurrent cell) should leave as integers and come back as the same
integers: dequantizing to float32 between calls costs 4× the memory and traffic, and
re-quantizing with another scale rounds the state again at every step.

For each ``NAME:MIN:MAX`` the pass fixes the int8 (asymmetric, per tensor) parameters of
``[MIN, MAX]`` and

* an **input** ``NAME`` read by ``QuantizeLinear → DequantizeLinear``: the input becomes
  int8 with those parameters and the ``DequantizeLinear`` reads it directly;
* an **output** ``NAME = DequantizeLinear(QuantizeLinear(v))``: the pair takes those
  parameters, and so does every pair met walking back from ``v`` through data movement
  (a ``Slice`` of a ``Concat``: the concatenated cache), so that state read from an input
  with the same parameters passes through unchanged; the output becomes the int8 tensor.

The parameters go to the model's metadata (``qcompiler.integer_io``: name → scale, zero
point, dtype), to the artifact manifest, and to the verification's sample inputs (float
samples are quantized with them). Give an input and the output that feeds it the same
range and the integers round-trip exactly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from qcompiler.errors import PipelineError
from qcompiler.graph import NameFactory, add_initializer
from qcompiler.io_quantization import INTEGER_IO_KEY, integer_io
from qcompiler.pipeline import Pass, option
from qcompiler.qdq import moves_values, qdq_source
from qcompiler.quant import QFormat, qparams

_FORMAT = QFormat.parse("int8:per-tensor:asym")


def parse_entry(text: str) -> tuple[str, float, float]:
    name, _, rest = text.rpartition(":")
    name, _, low = name.rpartition(":")
    try:
        lo, hi = float(low), float(rest)
    except ValueError:
        raise PipelineError(f"integer-io: {text!r} is not NAME:MIN:MAX") from None
    if not name or not lo <= hi:
        raise PipelineError(f"integer-io: {text!r} is not NAME:MIN:MAX with MIN ≤ MAX")
    return name, lo, hi


def _set_params(node: ir.Node, scale: np.ndarray, zero: np.ndarray, names: NameFactory, graph: ir.Graph) -> None:
    base = node.name or "io"
    node.replace_input_with(1, add_initializer(graph, names(f"{base}_scale"), scale))
    node.replace_input_with(2, add_initializer(graph, names(f"{base}_zero_point"), zero))


def _pin_pair(dq: ir.Node, scale, zero, names, graph) -> None:
    """Give a ``QuantizeLinear → DequantizeLinear`` pair (``dq`` and its producer) new parameters."""
    _set_params(dq, scale, zero, names, graph)
    q = dq.inputs[0].producer()
    if q is not None and q.op_type == "QuantizeLinear":
        _set_params(q, scale, zero, names, graph)
        q.outputs[0].dtype = ir.DataType.INT8
    dq.inputs[0].dtype = ir.DataType.INT8


def _integer_input(model: ir.Model, value: ir.Value, scale, zero, names) -> None:
    readers = [u.node for u in value.uses()]
    if not readers or any(r.op_type != "QuantizeLinear" for r in readers):
        raise PipelineError(f"integer-io: input '{value.name}' is not read by QuantizeLinear only (is the model quantized?)")
    for q in readers:
        q_out = q.outputs[0]
        for use in list(q_out.uses()):
            dq = use.node
            if dq.op_type != "DequantizeLinear":
                raise PipelineError(f"integer-io: input '{value.name}' is quantized for {dq.op_type}, not dequantized")
            _set_params(dq, scale, zero, names, model.graph)
            dq.replace_input_with(0, value)
    value.dtype = ir.DataType.INT8


def _integer_output(model: ir.Model, value: ir.Value, scale, zero, names) -> None:
    dq = value.producer()
    source = qdq_source(value)
    if source is None or dq.inputs[0].producer() is None or dq.inputs[0].producer().op_type != "QuantizeLinear":
        raise PipelineError(f"integer-io: output '{value.name}' is not DequantizeLinear(QuantizeLinear(...))")
    _pin_pair(dq, scale, zero, names, model.graph)
    inner = dq.inputs[0].producer().inputs[0]
    while (mover := inner.producer()) is not None and moves_values(mover):
        inner = mover.inputs[0]
        pair = inner.producer()
        if pair is not None and pair.op_type == "DequantizeLinear":
            _pin_pair(pair, scale, zero, names, model.graph)
            q = pair.inputs[0].producer()
            inner = q.inputs[0] if q is not None and q.op_type == "QuantizeLinear" else pair.inputs[0]
    q_out = dq.inputs[0]
    index = [i for i, out in enumerate(model.graph.outputs) if out is value]
    name = value.name
    value.name = names(f"{name}_float")
    q_out.name = name
    for i in index:
        model.graph.outputs[i] = q_out


@dataclass(frozen=True)
class IntegerIO(Pass):
    """Inputs/outputs that cross the artifact boundary as int8 with fixed ranges (model state)."""

    name = "integer-io"
    stages = ("fakequant",)

    tensors: tuple[str, ...] = option((), "NAME:MIN:MAX of each graph input/output to make int8 (asymmetric, per tensor)")

    def __post_init__(self):
        for entry in self.tensors:
            parse_entry(entry)

    def run(self, model: ir.Model, ctx) -> bool:
        names = NameFactory(model.graph)
        inputs = {v.name: v for v in model.graph.inputs}
        outputs = {v.name: v for v in model.graph.outputs}
        record = integer_io(model)
        for entry in self.tensors:
            name, lo, hi = parse_entry(entry)
            scale, zero = qparams(np.array(lo), np.array(hi), _FORMAT)
            scale, zero = np.asarray(scale, np.float32).reshape(()), np.asarray(zero, np.int8).reshape(())
            if name in inputs:
                _integer_input(model, inputs[name], scale, zero, names)
            elif name in outputs:
                _integer_output(model, outputs[name], scale, zero, names)
            else:
                raise PipelineError(f"integer-io: '{name}' is neither a graph input nor a graph output")
            record[name] = {"scale": float(scale), "zero_point": int(zero), "dtype": "int8"}
        if record:
            model.metadata_props[INTEGER_IO_KEY] = json.dumps(record, sort_keys=True)
            ctx.report["integer_io"] = record
        return bool(self.tensors)


__all__ = ["IntegerIO"]
