"""Small helpers over the graph IR.

qcompiler's IR is `onnx-ir <https://github.com/onnx/ir-py>`_ (``import onnx_ir as ir``):
one in-memory ONNX graph for every stage (float, fake-quant, integer). This module
adds the few queries passes keep needing; everything else is plain onnx-ir.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import numpy as np
import onnx_ir as ir

from .opset import QC_DOMAIN, QC_DOMAIN_VERSION

#: Model metadata key that records the stage a model is in.
STAGE_KEY = "qcompiler.stage"
#: Node metadata key naming the pass that created the node (provenance).
CREATED_BY_KEY = "qcompiler.created_by"

STAGES = ("float", "fakequant", "integer")


def get_stage(model: ir.Model) -> str:
    return model.metadata_props.get(STAGE_KEY, "float")


def detect_stage(model: ir.Model) -> str:
    """The stage a model without a recorded one is at: ``integer`` if it has integer ops
    (qcompiler's or a plugin's), ``fakequant`` if it has QuantizeLinear/DequantizeLinear
    (a QDQ model from any quantizer), else ``float``."""
    from .integer import get_op

    stage = "float"
    for node in model.graph:
        if get_op(node.domain, node.op_type) is not None:
            return "integer"
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and node.domain in ("", "ai.onnx"):
            stage = "fakequant"
    return stage


def set_stage(model: ir.Model, stage: str) -> None:
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages are {STAGES}")
    model.metadata_props[STAGE_KEY] = stage


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The constant behind ``value`` (initializer or Constant node), else None."""
    if value is None:
        return None
    tensor = value.const_value
    if tensor is None:
        producer = value.producer()
        if producer is None or producer.op_type != "Constant" or producer.domain not in ("", "ai.onnx"):
            return None
        attr = producer.attributes.get("value")
        if attr is None or attr.type != ir.AttributeType.TENSOR:
            return None
        tensor = attr.value
    return tensor.numpy()


def is_initializer(value: ir.Value | None) -> bool:
    return value is not None and value.is_initializer()


def is_graph_input(value: ir.Value) -> bool:
    return value.is_graph_input()


class NameFactory:
    """Fresh, deterministic value/node names that never clash with the graph's."""

    def __init__(self, graph: ir.Graph):
        self._taken = {v.name for v in iter_values(graph) if v.name}
        self._taken |= {n.name for n in graph if n.name}
        self._counters: dict[str, Iterator[int]] = {}

    def __call__(self, base: str) -> str:
        if base not in self._taken:
            self._taken.add(base)
            return base
        counter = self._counters.setdefault(base, itertools.count(1))
        while True:
            name = f"{base}_{next(counter)}"
            if name not in self._taken:
                self._taken.add(name)
                return name


def iter_values(graph: ir.Graph) -> Iterator[ir.Value]:
    """Every value of the graph: inputs, initializers, node outputs."""
    yield from graph.inputs
    yield from graph.initializers.values()
    for node in graph:
        yield from node.outputs


def add_initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """Register ``array`` as an initializer named ``name`` (must be fresh)."""
    array = np.asarray(array)
    value = ir.Value(
        name=name,
        shape=ir.Shape(array.shape),
        type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
        const_value=ir.tensor(array, name=name),
    )
    graph.register_initializer(value)
    return value


def set_initializer_array(value: ir.Value, array: np.ndarray) -> None:
    """Replace the data of an initializer in place, keeping its name and uses."""
    array = np.asarray(array)
    value.const_value = ir.tensor(array, name=value.name)
    value.shape = ir.Shape(array.shape)
    value.type = ir.TensorType(ir.DataType.from_numpy(array.dtype))


def ensure_qc_opset(model: ir.Model) -> None:
    model.graph.opset_imports.setdefault(QC_DOMAIN, QC_DOMAIN_VERSION)


def static_shape(value: ir.Value) -> tuple[int, ...] | None:
    """The value's shape as ints, or None if unknown or symbolic."""
    if value.shape is None:
        return None
    dims = []
    for d in value.shape:
        if not isinstance(d, int):
            return None
        dims.append(d)
    return tuple(dims)


def numpy_dtype(value: ir.Value) -> np.dtype | None:
    if value.type is None or not isinstance(value.type, ir.TensorType):
        return None
    return value.dtype.numpy()


def single_consumer(value: ir.Value) -> ir.Node | None:
    """The only node reading ``value`` (None if several, none, or a graph output)."""
    if value.is_graph_output():
        return None
    users = {use.node for use in value.uses()}
    return users.pop() if len(users) == 1 else None


def node_label(node: ir.Node) -> str:
    """How error messages name a node: ``'name' (OpType)``."""
    op = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
    return f"node '{node.name or '<unnamed>'}' ({op})"


#: Ops an index passes through unchanged on its way from a graph input to a Gather.
_INDEX_PASS_THROUGH = frozenset({"Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity", "Transpose"})


def index_input_ranges(model: ir.Model) -> dict[str, tuple[int, int, str]]:
    """Graph inputs whose values index a Gather axis of known size ``s``: their valid
    range ``[−s, s − 1]`` (the smallest such axis over every use) and the node that sets it.

    An index outside it is an error in ONNX; runners check it before executing, so a
    compiled artifact never sees one."""
    ranges: dict[str, tuple[int, int, str]] = {}
    for value in model.graph.inputs:
        if value.dtype is None or not value.dtype.is_integer():
            continue
        pending, seen = [value], set()
        while pending:
            current = pending.pop()
            if id(current) in seen:
                continue
            seen.add(id(current))
            for node, index in current.uses():
                if node.domain in ("", "ai.onnx") and node.op_type in _INDEX_PASS_THROUGH and index == 0:
                    pending.extend(node.outputs[:1])
                elif node.domain in ("", "ai.onnx") and node.op_type == "Gather" and index == 1:
                    data = node.inputs[0].shape
                    if data is None:
                        continue
                    axis = node.attributes.get_int("axis", 0) % max(len(data), 1)
                    size = data[axis] if len(data) else None
                    if not isinstance(size, int):
                        continue
                    if value.name not in ranges or size < ranges[value.name][1] + 1:  # the smallest axis bounds it
                        ranges[value.name] = (-size, size - 1, f"it indexes an axis of {size} in {node_label(node)}")
    return ranges


def ensure_opset(model: ir.Model, version: int) -> None:
    """Upgrade the default-domain opset to at least ``version`` (no-op if already there)."""
    current = model.graph.opset_imports.get("", 1)
    if current >= version:
        return
    import logging

    import onnxscript.version_converter

    from .errors import UnsupportedOpError

    log = logging.getLogger("onnxscript.version_converter")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        onnxscript.version_converter.convert_version(model, version, fallback=True)
    finally:
        log.setLevel(level)
    if model.graph.opset_imports.get("", 1) < version:
        raise UnsupportedOpError(
            f"cannot upgrade the model from opset {current} to {version} (needed for int4/int16 "
            "quantization or fused ops); export the model at opset 21 or newer"
        )
