"""Static shapes, dtypes and compile-time values of every tensor, for code generation.

Every node is evaluated once with the reference interpreter's own kernels on stand-in
values (zeros for run-time tensors, the real data for constants). That gives each
output's exact shape and dtype (qcompiler-domain ops carry no ONNX shape inference),
and folds every node whose inputs are all constants (``Shape``/``Size`` count as
constant: they depend on static shapes only): the C program holds such results as
tables instead of computing them.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx.reference import ReferenceEvaluator

from qcompiler.errors import TargetError
from qcompiler.graph import node_label, static_shape
from qcompiler.integer import DecompositionError
from qcompiler.interpreter import kernels

from .hls_c import CTYPES, Tensor

#: Ops that only reinterpret a flat buffer: their output shares the input's storage.
ALIAS_OPS = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity"})
#: Ops whose result depends on static shapes only, so they fold even on run-time tensors.
SHAPE_OPS = frozenset({"Shape", "Size"})

_NARROW = {"int4": (np.int8, 4), "uint4": (np.uint8, 4), "int2": (np.int8, 2), "uint2": (np.uint8, 2)}


def _fail(message: str) -> TargetError:
    return TargetError(f"target 'fpga-sim': {message}")


def storage(array: np.ndarray, what: str) -> tuple[np.ndarray, int]:
    """``(array in its C storage dtype, logical bit width)``."""
    array = np.asarray(array)
    if array.dtype.name in _NARROW:
        dtype, bits = _NARROW[array.dtype.name]
        return array.astype(dtype), bits
    if array.dtype not in CTYPES:
        raise _fail(f"{what} has dtype {array.dtype}, which the C simulation does not support")
    bits = 1 if array.dtype == np.bool_ else array.dtype.itemsize * 8
    return array, bits


def _evaluate(node: ir.Node, feeds: dict[str, np.ndarray], opsets: dict[str, int]) -> list[np.ndarray]:
    proto = ir.serde.serialize_node(node)
    evaluator = ReferenceEvaluator(proto, opsets=opsets, new_ops=kernels())
    return evaluator.run(None, {name: feeds[name] for name in evaluator.input_names if name})


def analyse(model: ir.Model) -> dict[str, Tensor]:
    """Tensor descriptions of every graph input, initializer and node output."""
    opsets = dict(model.graph.opset_imports)
    opsets.setdefault("", 13)
    tensors: dict[str, Tensor] = {}
    values: dict[str, np.ndarray] = {}
    for name, value in model.graph.initializers.items():
        if value.const_value is None:
            raise _fail(f"initializer '{name}' has no data")
        array, bits = storage(value.const_value.numpy(), f"initializer '{name}'")
        values[name] = value.const_value.numpy()
        tensors[name] = Tensor(name, array.dtype, tuple(array.shape), bits, array)
    for value in model.graph.inputs:
        if value.name in tensors:
            continue
        shape = static_shape(value)
        if shape is None:
            raise _fail(f"input '{value.name}' needs a static shape (pin it with --input-shape)")
        dtype = value.dtype.numpy()
        if dtype.name in _NARROW:
            raise _fail(f"input '{value.name}' has dtype {dtype}; pass it as int8")
        zeros = np.zeros(shape, dtype)
        _, bits = storage(zeros, f"input '{value.name}'")
        values[value.name] = zeros
        tensors[value.name] = Tensor(value.name, zeros.dtype, shape, bits)
    for node in model.graph:
        if any(attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for attr in node.attributes.values()):
            raise _fail(f"{node_label(node)} has a subgraph; control flow is not supported")
        names = [v.name for v in node.inputs if v is not None and v.name]
        feeds = {name: values[name] for name in names}
        constant = node.op_type in SHAPE_OPS or all(tensors[name].is_const for name in names)
        try:
            results = _evaluate(node, feeds, opsets)
        except DecompositionError as exc:  # an integer op that cannot exist with these inputs
            raise _fail(f"{node_label(node)}: {exc}") from None
        except Exception as exc:  # the reference cannot run it on stand-ins: try a shape rule
            results = _fallback(node, feeds)
            if results is None or constant:
                raise _fail(
                    f"{node_label(node)}: the reference interpreter cannot evaluate it "
                    f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]})"
                ) from None
        for value, result in zip(node.outputs, results):
            if not value.name:
                continue
            array, bits = storage(np.asarray(result), f"{node_label(node)} output '{value.name}'")
            values[value.name] = np.asarray(result)
            tensors[value.name] = Tensor(value.name, array.dtype, tuple(array.shape), bits, array if constant else None)
    return tensors


def _fallback(node: ir.Node, feeds: dict[str, np.ndarray]) -> list[np.ndarray] | None:
    """Stand-in outputs where the reference kernel fails (integer MaxPool with stride 1)."""
    if node.op_type != "MaxPool" or node.domain not in ("", "ai.onnx"):
        return None
    from .hls_movement import maxpool_geometry

    x = feeds[node.inputs[0].name]
    attrs = {name: attr.value for name, attr in node.attributes.items()}
    out_dims, _ = maxpool_geometry(x.shape, attrs)
    return [np.zeros(tuple(x.shape[:2]) + tuple(out_dims), x.dtype)]
