"""Where quantize/dequantize pairs go, shared by fake-quant insertion and integer lowering.

* A *linear group* is ``MatMul|Gemm|Conv`` with its constant bias ``Add`` and a fused
  ``Relu``/``Clip(0, c)``: only the group's last output is quantized, as integer
  hardware computes it (int32 accumulation, bias in int32, activation in the
  requantization clamp).
* *Transparent* ops move data without changing values: their output shares the
  input's scale and zero point, so they become integer data movement.
* *Bounded* ops have a known output range (softmax, sigmoid, tanh).
* *Input-derived* tensors depend only on integer/bool graph inputs and constants
  (attention masks, embedding lookups): they are quantized where they meet the
  activations, and lowered to integer lookups/selects.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from .graph import NameFactory, add_initializer, const_array

LINEAR_OPS = {"MatMul", "Gemm", "Conv", "ConvTranspose"}
TRANSPARENT_OPS = {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Slice", "Split", "Expand",
                   "MaxPool", "Identity", "Gather", "GatherElements", "GatherND", "Tile", "DepthToSpace",
                   "SpaceToDepth"}
BOUNDED_RANGES = {"Softmax": (0.0, 1.0), "Sigmoid": (0.0, 1.0), "HardSigmoid": (0.0, 1.0), "Tanh": (-1.0, 1.0)}
FLOAT_TYPES = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE, ir.DataType.BFLOAT16}


def is_nearest_resize(node: ir.Node) -> bool:
    """A nearest-neighbour ``Resize``: it moves values, like the :data:`TRANSPARENT_OPS`."""
    if node.op_type != "Resize":
        return False
    mode = node.attributes.get("mode")
    return mode is not None and mode.as_string() == "nearest"


def moves_values(node: ir.Node) -> bool:
    """Whether ``node``'s first output only rearranges values of its first input (a Pad
    that adds zeros counts: 0 is in every quantized range)."""
    return node.op_type in TRANSPARENT_OPS or is_nearest_resize(node) or _pads_with_zero(node)


def _pads_with_zero(node: ir.Node) -> bool:
    if node.op_type != "Pad":
        return False
    mode = node.attributes.get("mode")
    if mode is not None and mode.as_string() != "constant":
        return True
    if len(node.inputs) < 3 or node.inputs[2] is None:
        return True
    value = node.inputs[2].const_value
    return value is not None and bool(np.all(value.numpy() == 0))


def is_float(value: ir.Value | None) -> bool:
    return value is not None and value.dtype in FLOAT_TYPES


def only_user(value: ir.Value) -> ir.Node | None:
    if value.is_graph_output():
        return None
    users = {id(u.node): u.node for u in value.uses()}
    return next(iter(users.values())) if len(users) == 1 else None


def constant_value(value: ir.Value | None) -> np.ndarray | None:
    """A float constant, or the dequantized value of ``DequantizeLinear(constant)`` (float64),
    possibly reshaped (a quantized ``(1, C, 1, 1)`` conv bias is ``Reshape(DQ(int32))``)."""
    c = const_array(value)
    if c is not None:
        return c.astype(np.float64)
    producer = value.producer() if value is not None else None
    if producer is not None and producer.op_type == "Reshape" and len(producer.inputs) > 1:
        inner, shape = constant_value(producer.inputs[0]), const_array(producer.inputs[1])
        if inner is None or shape is None:
            return None
        target = [inner.shape[i] if d == 0 else int(d) for i, d in enumerate(shape.tolist())]
        return inner.reshape(target)
    source = qdq_source(value)
    if source is None:
        return None
    q, scale, zero, dq = source
    data = const_array(q)
    if data is None:
        return None
    axis = dq.attributes["axis"].as_int() if "axis" in dq.attributes else 1
    block = dq.attributes["block_size"].as_int() if "block_size" in dq.attributes else 0
    scale = np.asarray(scale, np.float64)
    zero = np.asarray(zero).astype(np.float64)
    if block:
        axis %= data.ndim
        scale = np.repeat(scale, block, axis=axis).take(np.arange(data.shape[axis]), axis=axis)
        zero = np.repeat(zero, block, axis=axis).take(np.arange(data.shape[axis]), axis=axis)
    elif scale.size > 1:
        shape = [1] * data.ndim
        shape[axis % data.ndim] = -1
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    return (data.astype(np.float64) - zero) * scale


def bias_add_of(node: ir.Node) -> ir.Node | None:
    """The ``Add(out, const)`` that adds a per-output-channel bias to a MatMul/Conv output."""
    if node.op_type not in ("MatMul", "Conv", "ConvTranspose"):
        return None
    out = node.outputs[0]
    add = only_user(out)
    if add is None or add.op_type != "Add":
        return None
    other = add.inputs[1] if add.inputs[0] is out else add.inputs[0]
    bias = constant_value(other)
    if bias is None or out.shape is None:
        return None
    rank = len(out.shape)
    channel_axis = rank - 1 if node.op_type == "MatMul" else 1
    channels = out.shape[channel_axis]
    shape = list(bias.shape)
    if not isinstance(channels, int) or len(shape) > rank:
        return None
    shape = [1] * (rank - len(shape)) + shape
    if any(d != 1 for i, d in enumerate(shape) if i != channel_axis) or shape[channel_axis] not in (1, channels):
        return None
    return add


def activation_of(value: ir.Value) -> ir.Node | None:
    """A ``Relu`` or ``Clip(min=0)`` that is the only reader of ``value`` (fusable into requantize)."""
    user = only_user(value)
    if user is None:
        return None
    if user.op_type == "Relu":
        return user
    if user.op_type == "Clip":
        lo = constant_value(user.inputs[1]) if len(user.inputs) > 1 and user.inputs[1] is not None else None
        if lo is not None and float(lo) == 0.0:
            return user
    return None


@dataclasses.dataclass
class LinearGroup:
    """``linear → [bias Add] → [Relu/Clip]``; ``output`` is the value that gets quantized."""

    linear: ir.Node
    bias_add: ir.Node | None
    activation: ir.Node | None

    @property
    def output(self) -> ir.Value:
        last = self.activation or self.bias_add or self.linear
        return last.outputs[0]

    @property
    def internal(self) -> list[ir.Value]:
        nodes = [n for n in (self.linear, self.bias_add, self.activation) if n is not None]
        return [n.outputs[0] for n in nodes[:-1]]


def linear_group(node: ir.Node) -> LinearGroup | None:
    """The group around a linear op with a constant (possibly quantized) weight."""
    if node.op_type not in LINEAR_OPS or node.domain not in ("", "ai.onnx"):
        return None
    if len(node.inputs) < 2 or constant_value(node.inputs[1]) is None:
        return None
    bias = bias_add_of(node)
    last = (bias or node).outputs[0]
    return LinearGroup(node, bias, activation_of(last))


def input_derived(model: ir.Model) -> set[int]:
    """ids of values computed only from integer/bool graph inputs and constants (mask
    arithmetic). An embedding lookup (a float table gathered by token ids) starts a
    region of activations instead: its rows are quantized like any activation."""
    derived: set[int] = set()
    for value in model.graph.inputs:
        if not is_float(value):
            derived.add(id(value))
    for node in model.graph:
        if node.op_type == "Gather" and node.inputs and is_float(node.inputs[0]) and node.inputs[0].const_value is not None:
            continue
        inputs = [v for v in node.inputs if v is not None]
        if inputs and all(id(v) in derived or const_array(v) is not None for v in inputs) and any(id(v) in derived for v in inputs):
            derived.update(id(v) for v in node.outputs)
    return derived


def insert_qdq(graph: ir.Graph, names: NameFactory, value: ir.Value, scale: float, zero_point: np.ndarray,
               after: ir.Node | None, readers: list[ir.Node] | None = None) -> ir.Node:
    """Route every reader of ``value`` (or only ``readers``) through
    ``DequantizeLinear(QuantizeLinear(value))``.

    A graph output keeps its name: the dequantized value takes it over (not when only some
    ``readers`` are routed). Returns the DQ node.
    """
    base = value.name or "v"
    users = [(u.node, u.idx) for u in value.uses() if readers is None or u.node in readers]
    s = add_initializer(graph, names(f"{base}_scale"), np.array(scale, np.float32))
    z = add_initializer(graph, names(f"{base}_zero_point"), np.asarray(zero_point).reshape(()))
    q = ir.node("QuantizeLinear", [value, s, z], name=names(f"{base}_quantize"))
    dq = ir.node("DequantizeLinear", [q.outputs[0], s, z], name=names(f"{base}_dequantize"))
    q.outputs[0].name = names(f"{base}_q")
    q.outputs[0].dtype = ir.DataType.from_numpy(np.asarray(zero_point).dtype)
    q.outputs[0].shape = value.shape
    out = dq.outputs[0]
    out.dtype, out.shape = value.dtype, value.shape
    was_output = value.is_graph_output() and readers is None
    if after is None:
        graph.insert_before(next(iter(graph)), [q, dq])
    else:
        graph.insert_after(after, [q, dq])
    for node, index in users:
        node.replace_input_with(index, out)
    if was_output:
        original = value.name
        value.name = names(f"{original}_float")
        out.name = original
        for i, output in enumerate(graph.outputs):
            if output is value:
                graph.outputs[i] = out
    else:
        out.name = names(f"{base}_dq")
    return dq


def qdq_source(value: ir.Value | None):
    """If ``value`` is ``DequantizeLinear(q, s, z)``: ``(q, scale, zero_point, dq_node)``, else None."""
    if value is None:
        return None
    node = value.producer()
    if node is None or node.op_type != "DequantizeLinear":
        return None
    scale = const_array(node.inputs[1])
    zero = const_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
    if scale is None:
        return None
    if zero is None:
        zero = np.zeros(scale.shape, np.uint8)
    return node.inputs[0], scale, zero, node
