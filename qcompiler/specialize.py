"""Import-time specialisation: inputs pinned to values, shape arithmetic folded, control
flow whose condition is then known, recurrent ops unrolled.

- ``--input-value NAME=VALUE`` (``input_values=`` in the API) turns a model input into a
  constant. Exporters route configuration through inputs (Silero VAD's sample rate ``sr``),
  and every ``If`` on such a value is decided at compile time.
- ``If`` nodes whose condition is constant are replaced by the branch taken (the constant
  folder evaluates what the condition depends on, then inlines the branch), repeatedly, so
  that nested control flow resolves too. ``If``/``Loop``/``Scan`` that remain run on the
  reference interpreter; :func:`control_flow_hint` says which inputs would remove them.
- ``LSTM``/``GRU``/``RNN`` are unrolled into MatMul and gate ops (:mod:`qcompiler.recurrent`).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper, numpy_helper
from onnx_ir.passes import common as ir_common

from .errors import InputError
from .folding import fold_constants
from .graph import node_label, static_shape
from .recurrent import RECURRENT_OPS, unroll_recurrent

CONTROL_FLOW = frozenset({"If", "Loop", "Scan"})
#: Constant folding during specialisation reads and makes tensors up to this size.
_FOLD_LIMIT = 1 << 22


def parse_input_value(text: str) -> tuple[str, list[float]]:
    """``NAME=V`` or ``NAME=V1,V2,...`` from the command line."""
    name, sep, values = text.partition("=")
    try:
        if not sep or not name:
            raise ValueError
        numbers = [float(v) for v in values.split(",")]
    except ValueError:
        raise InputError(f"--input-value '{text}': expected NAME=VALUE or NAME=V1,V2,... (numbers)") from None
    return name, numbers


def pin_input_values(graph: onnx.GraphProto, values: Mapping[str, object]) -> None:
    """Replace the named graph inputs by constants holding ``values`` (a number fills the
    input's whole shape; a list or array must have the input's element count)."""
    initializers = {t.name for t in graph.initializer}
    inputs = {vi.name: vi for vi in graph.input if vi.name not in initializers}
    for name, value in values.items():
        vi = inputs.get(name)
        if vi is None:
            raise InputError(f"--input-value names '{name}', which is not a model input; inputs are {sorted(inputs)}")
        tensor_type = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim]
        given = np.asarray(value).reshape(-1)
        if None in dims:
            shape_text = "x".join("N" if d is None else str(d) for d in dims)
            raise InputError(f"--input-value {name}: the input's shape [{shape_text}] is not static; pin it with --input-shape first")
        dtype = helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
        count = int(np.prod(dims)) if dims else 1
        if given.size == 1:
            array = np.full(dims, given[0])
        elif given.size == count:
            array = given.reshape(dims)
        else:
            raise InputError(f"--input-value {name}: {given.size} values for an input of {count} elements")
        if np.issubdtype(dtype, np.integer) and np.any(array != np.round(array)):
            raise InputError(f"--input-value {name}: the input is {np.dtype(dtype).name}, got a fraction")
        graph.input.remove(vi)
        graph.initializer.append(numpy_helper.from_array(array.astype(dtype), name))


def needs_specialisation(model: ir.Model) -> bool:
    return any(node.op_type in CONTROL_FLOW | RECURRENT_OPS for node in model.graph) or _unshaped(model) > 0


def _unshaped(model: ir.Model) -> int:
    """Node outputs without an inferred shape: most often behind shape arithmetic that
    exporters write out (``Reshape(x, Concat(Cast(Slice(Shape(y)))))``), which folds.
    Graphs with a ``Loop``/``Scan`` are left alone: the folder rewrites loop bodies in ways
    that change their scan outputs' shapes (ONNX's expanded ``Range`` tests)."""
    if any(node.op_type in ("Loop", "Scan") for node in model.graph):
        return 0
    return sum(1 for node in model.graph for value in node.outputs if value.shape is None and value.uses())


def specialise(model: ir.Model, infer) -> ir.Model:
    """Fold shape arithmetic until every shape is known, inline ``If`` branches decided by
    constants and unroll recurrent ops. ``infer`` runs shape inference on a model and
    returns it (folded reshapes, inlined branches and unrolled steps need shapes)."""
    def state():
        undecided = sum(1 for node in model.graph if node.op_type == "If")
        unshaped = sum(1 for node in model.graph if node.op_type in RECURRENT_OPS and static_shape(node.inputs[0]) is None)
        return undecided + unshaped + _unshaped(model), sum(1 for _ in model.graph)

    # Each round folds what the last one's shapes made constant (Shape of an inlined
    # branch's values, the conditions of the Ifs nested in it, a legacy export's shape
    # arithmetic before a recurrent op), then infers shapes again.
    for _ in range(16):
        before = state()
        if not before[0]:
            break
        fold_constants(model, _FOLD_LIMIT)
        model = infer(model)
        if state() == before:
            break
    if unroll_recurrent(model):
        ir_common.RemoveUnusedNodesPass()(model)
        model = infer(model)
    return model


def control_flow_hint(node: ir.Node) -> str:
    """``node 'n' (If) is control flow on input 'sr': ...`` with the pin that would remove it."""
    inputs = _input_ancestors(node.inputs[0]) if node.op_type == "If" and node.inputs else set()
    if node.op_type == "Loop":
        inputs = set().union(*(_input_ancestors(v) for v in node.inputs[:2] if v is not None))
    what = f"{node_label(node)} is control flow"
    if not inputs:
        return f"{what} that depends on computed values"
    pins = " ".join(f"--input-value {name}=VALUE" for name in sorted(inputs))
    return f"{what} decided by input {', '.join(map(repr, sorted(inputs)))}; pin it ({pins}) to compile the branch taken"


def _input_ancestors(value: ir.Value | None) -> set[str]:
    found, stack, seen = set(), [value], set()
    while stack:
        v = stack.pop()
        if v is None or id(v) in seen:
            continue
        seen.add(id(v))
        if v.is_graph_input():
            found.add(v.name)
        producer = v.producer()
        if producer is not None:
            stack.extend(producer.inputs)
    return found
