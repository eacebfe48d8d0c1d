"""A QDQ model evaluated many times with changing quantization parameters, in one session.

Passes that search quantization choices (``allocate-bits`` tries every activation group at
8 and 16 bits, every weight layer at 4 and 8) used to serialize the model and create an
onnxruntime session per try — seconds each for a 100 M-parameter model. :class:`QDQEmulator`
builds one float model instead, in which

* every activation ``DequantizeLinear(QuantizeLinear(x, s, z))`` is
  ``(Clip(Round(x / s) + z, lo, hi) − z) · s`` with ``s, z, lo, hi`` graph inputs (``Round``
  is half-to-even and ``Clip`` saturates, as ``QuantizeLinear``);
* every ``DequantizeLinear`` of a constant (weights, biases) is a float graph input;

and :meth:`QDQEmulator.run` reads the parameters the model holds *now* (the passes keep
editing its initializers in place), so trying a bit width is a new feed, not a new session.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper

from .graph import const_array


def _dequantize(q: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, axis: int, block: int) -> np.ndarray:
    """``(q − z) · s`` in float32 (per tensor, per axis or in blocks along ``axis``)."""
    q = np.asarray(q).astype(np.float32)
    scale = np.asarray(scale, np.float32)
    zero = np.zeros_like(scale) if zero is None else np.asarray(zero).astype(np.float32)
    if scale.size > 1:
        axis %= q.ndim
        if block:
            scale = np.repeat(scale, block, axis=axis)[tuple(slice(0, d) for d in q.shape)]
            zero = np.repeat(zero, block, axis=axis)[tuple(slice(0, d) for d in q.shape)]
        else:
            shape = [1] * q.ndim
            shape[axis] = scale.size
            scale, zero = scale.reshape(shape), zero.reshape(shape)
    return ((q - zero) * scale).astype(np.float32)


class QDQEmulator:
    """One onnxruntime session for a QDQ model whose Q/DQ parameters change between runs."""

    def __init__(self, model: ir.Model):
        self.model = model
        self._activations: list[tuple[ir.Node, str]] = []  # (QuantizeLinear node, input prefix)
        self._constants: list[tuple[ir.Node, str]] = []  # (DequantizeLinear of a constant, input name)
        self._cache: dict[str, tuple[tuple, np.ndarray]] = {}
        self._session = self._build()

    def _build(self):
        import onnxruntime as ort

        proto = ir.to_proto(self.model)
        nodes_by_name = {n.name: n for n in self.model.graph}
        inputs = list(proto.graph.input)
        new_nodes: list[onnx.NodeProto] = []
        dq_replaced: dict[str, str] = {}  # DQ output → emulated value
        count = 0
        initializers = {t.name for t in proto.graph.initializer}
        for node in proto.graph.node:
            if node.op_type == "QuantizeLinear" and node.domain in ("", "ai.onnx") and node.input[0] not in initializers:
                prefix = f"qc_emu_{count}"
                count += 1
                self._activations.append((nodes_by_name[node.name], prefix))
                for what in ("scale", "zero", "lo", "hi"):
                    inputs.append(helper.make_tensor_value_info(f"{prefix}_{what}", onnx.TensorProto.FLOAT, []))
                x = node.input[0]
                steps = [
                    ("Div", [x, f"{prefix}_scale"], f"{prefix}_ratio"),
                    ("Round", [f"{prefix}_ratio"], f"{prefix}_rounded"),
                    ("Add", [f"{prefix}_rounded", f"{prefix}_zero"], f"{prefix}_shifted"),
                    ("Clip", [f"{prefix}_shifted", f"{prefix}_lo", f"{prefix}_hi"], f"{prefix}_q"),
                    ("Sub", [f"{prefix}_q", f"{prefix}_zero"], f"{prefix}_centred"),
                    ("Mul", [f"{prefix}_centred", f"{prefix}_scale"], f"{prefix}_dq"),
                ]
                new_nodes += [helper.make_node(op, ins, [out], name=out) for op, ins, out in steps]
                for consumer in proto.graph.node:
                    if consumer.op_type == "DequantizeLinear" and consumer.input[0] == node.output[0]:
                        dq_replaced[consumer.output[0]] = f"{prefix}_dq"
        for node in proto.graph.node:
            if node.op_type == "DequantizeLinear" and node.input[0] in initializers:
                name = f"qc_emu_const_{len(self._constants)}"
                self._constants.append((nodes_by_name[node.name], name))
                shape = list(next(t for t in proto.graph.initializer if t.name == node.input[0]).dims)
                inputs.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, shape))
                dq_replaced[node.output[0]] = name
        kept = []
        for node in proto.graph.node:
            if node.op_type == "DequantizeLinear" and node.output[0] in dq_replaced:
                continue
            if node.op_type == "QuantizeLinear" and node.input[0] not in initializers:
                continue
            for i, name in enumerate(node.input):
                if name in dq_replaced:
                    node.input[i] = dq_replaced[name]
            kept.append(node)
        for output in proto.graph.output:
            if output.name in dq_replaced:  # an output computed by a replaced DQ: keep its name
                kept.append(helper.make_node("Identity", [dq_replaced[output.name]], [output.name]))
        graph = helper.make_graph(new_nodes + kept, proto.graph.name, inputs, list(proto.graph.output),
                                  [t for t in proto.graph.initializer])
        emulation = helper.make_model(graph, opset_imports=list(proto.opset_import), ir_version=proto.ir_version)
        emulation = _sorted(emulation)
        self.emulation_bytes = emulation.SerializeToString()
        return ort.InferenceSession(self.emulation_bytes, session_options(), providers=["CPUExecutionProvider"])

    def _parameters(self) -> dict[str, np.ndarray]:
        feeds: dict[str, np.ndarray] = {}
        for q, prefix in self._activations:
            scale = const_array(q.inputs[1])
            zero = const_array(q.inputs[2]) if len(q.inputs) > 2 and q.inputs[2] is not None else np.zeros((), np.uint8)
            dtype = q.outputs[0].dtype.numpy() if q.outputs[0].dtype is not None else np.asarray(zero).dtype
            info = np.iinfo(dtype)
            feeds[f"{prefix}_scale"] = np.asarray(scale, np.float32).reshape(())
            feeds[f"{prefix}_zero"] = np.asarray(zero, np.float32).reshape(())
            feeds[f"{prefix}_lo"] = np.array(info.min, np.float32)
            feeds[f"{prefix}_hi"] = np.array(info.max, np.float32)
        for dq, name in self._constants:
            values = [dq.inputs[i].const_value if i < len(dq.inputs) and dq.inputs[i] is not None else None for i in range(3)]
            key = tuple(id(v) for v in values)
            cached = self._cache.get(name)
            if cached is None or cached[0] != key:
                axis = dq.attributes["axis"].as_int() if "axis" in dq.attributes else 1
                block = dq.attributes["block_size"].as_int() if "block_size" in dq.attributes else 0
                zero = const_array(dq.inputs[2]) if len(dq.inputs) > 2 and dq.inputs[2] is not None else None
                array = _dequantize(const_array(dq.inputs[0]), const_array(dq.inputs[1]), zero, axis, block)
                cached = (key, array)
                self._cache[name] = cached
            feeds[name] = cached[1]
        return feeds

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """The model's outputs for ``feeds`` with the quantization parameters it holds now."""
        return self._session.run(None, {**self._parameters(), **feeds})


def session_options():
    """onnxruntime options of an emulation session (the same in every process of a cluster,
    so a variant scores the same wherever it runs)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    return options


def _sorted(model: onnx.ModelProto) -> onnx.ModelProto:
    """Nodes in topological order (the emulation nodes were added in front of their readers)."""
    import onnx_ir as _ir

    ir_model = _ir.from_proto(model)
    ir_model.graph.sort()
    return _ir.to_proto(ir_model)


__all__ = ["QDQEmulator", "session_options"]
