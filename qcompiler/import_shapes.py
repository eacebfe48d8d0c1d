"""Import checks of shapes and sizes: pinning dynamic input dimensions, strict shape
inference, and refusing tensors (declared or data-dependent) above 2^31 elements before
anything is allocated. Also the message helpers the importer's checks share."""

from __future__ import annotations

import math
import numbers
import re
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
import onnx.shape_inference
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator

from .errors import ModelFormatError, ShapeError, UnsupportedOpError

#: Refuse any tensor with more elements than this before allocating it.
MAX_ELEMENTS = 2**31 - 1

InputShapes = Mapping[str, Sequence[int]]


def _numel(dims: Sequence[int], name: str, what: str | None = None) -> int:
    """The element count of ``dims``, refusing negative or absurd shapes (nothing allocated)."""
    label = what or f"tensor '{name}'"
    if any(d < 0 for d in dims):
        raise ShapeError(f"{label} has a negative dimension: {_dims_text(dims)}")
    if 0 in dims:
        return 0
    count = 1
    for d in dims:
        count *= d
        if count > 1 << 128:  # keep the arithmetic small for hostile ranks and sizes
            break
    if count > MAX_ELEMENTS:
        amount = f"{count} elements" if count <= 1 << 128 else "more than 2^128 elements"
        raise ShapeError(f"{label} has {amount} (shape {_dims_text(dims)}), more than 2^31")
    return count


def _dims_text(dims: Sequence[int]) -> str:
    dims = list(dims)
    return str(dims) if len(dims) <= 8 else f"[{', '.join(map(str, dims[:8]))}, ... ({len(dims)} dims)]"



# -- shapes --------------------------------------------------------------------------------


def _graph_inputs(graph: onnx.GraphProto) -> list[onnx.ValueInfoProto]:
    initializers = {t.name for t in graph.initializer}
    return [vi for vi in graph.input if vi.name not in initializers]


def _mark_dynamic_dims(graph: onnx.GraphProto) -> None:
    """Some exporters write a dynamic dimension as ``dim_value: -1`` (paddle2onnx) or ``0``
    (older converters) instead of a ``dim_param``: make those dimensions dynamic, on the
    graph's inputs and outputs (other negative sizes stay errors)."""
    for vi in list(_graph_inputs(graph)) + list(graph.output):
        if not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
            continue
        for dim in vi.type.tensor_type.shape.dim:
            if dim.HasField("dim_value") and dim.dim_value in (-1, 0):
                dim.ClearField("dim_value")


def _pin_input_shapes(graph: onnx.GraphProto, input_shapes: InputShapes) -> None:
    inputs = {vi.name: vi for vi in _graph_inputs(graph)}
    for name, dims in input_shapes.items():
        if name not in inputs:
            raise ShapeError(f"--input-shape names '{name}', which is not a model input; inputs are {sorted(inputs)}")
        if not inputs[name].type.HasField("tensor_type"):
            raise UnsupportedOpError(f"input '{name}' is not a tensor; only tensor inputs are supported")
        tensor_type = inputs[name].type.tensor_type
        current = tensor_type.shape.dim
        if tensor_type.HasField("shape") and len(current) != len(dims):
            raise ShapeError(
                f"input '{name}' has rank {len(current)}, --input-shape gives {len(dims)} dimensions"
            )
        for axis, dim in enumerate(dims):
            if not isinstance(dim, numbers.Integral) or isinstance(dim, bool):
                raise ShapeError(f"input '{name}': dimension {axis} must be an integer, got {dim!r}")
            if dim <= 0:
                raise ShapeError(f"input '{name}': dimension {axis} must be positive, got {dim}")
        for axis, dim in enumerate(current):
            if dim.HasField("dim_value") and dim.dim_value != dims[axis]:
                raise ShapeError(
                    f"input '{name}' has static dimension {axis} = {dim.dim_value}, "
                    f"--input-shape asks for {dims[axis]}"
                )
        _numel(list(dims), name, f"input '{name}'")
        tensor_type.shape.ClearField("dim")
        for dim in dims:
            tensor_type.shape.dim.add().dim_value = int(dim)


def _check_input_shapes(graph: onnx.GraphProto, require_static: bool) -> None:
    for vi in _graph_inputs(graph):
        if not vi.type.HasField("tensor_type"):
            raise UnsupportedOpError(f"input '{vi.name}' is not a tensor; only tensor inputs are supported")
        tensor_type = vi.type.tensor_type
        if not tensor_type.HasField("shape"):
            if require_static:
                raise ShapeError(f"input '{vi.name}' has no shape; give one with --input-shape {vi.name}=DIMS")
            continue
        dims = []
        for axis, dim in enumerate(tensor_type.shape.dim):
            if dim.HasField("dim_value"):
                if dim.dim_value < 0:
                    raise ShapeError(f"input '{vi.name}' has a negative dimension {axis}")
                dims.append(dim.dim_value)
            elif require_static:
                label = f"'{dim.dim_param}'" if dim.dim_param else "unknown"
                example = "x".join(str(d.dim_value) if d.HasField("dim_value") else "N" for d in tensor_type.shape.dim)
                raise ShapeError(
                    f"input '{vi.name}' has dynamic dimension {axis} ({label}); pin it with "
                    f"--input-shape {vi.name}={example}"
                )
        _numel(dims, vi.name, f"input '{vi.name}'")


def _infer_shapes(proto: onnx.ModelProto) -> onnx.ModelProto:
    del proto.graph.value_info[:]
    try:
        return onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True, data_prop=True)
    except onnx.shape_inference.InferenceError as exc:
        raise ShapeError(_inference_message(str(exc))) from None
    except ValueError as exc:
        raise ModelFormatError(f"invalid model: {_first_line(str(exc))}") from None


_INFERENCE_WHERE = re.compile(r"\(op_type:([^,()]*), node name: ([^()]*)\):\s*")
_INFERENCE_TAG = re.compile(r"\[\w*InferenceError\]\s*|Inference error\(s\):\s*")


def _inference_message(text: str) -> str:
    """ONNX's inference errors, reworded as ``node 'n' (Op): shape inference failed: why``."""
    line = _first_line(text)
    match = _INFERENCE_WHERE.search(line)
    if match:
        op, name = match.group(1).strip(), match.group(2).strip()
        why = _INFERENCE_TAG.sub("", line[match.end():]).strip()
        return f"node '{name or '<unnamed>'}' ({op}): shape inference failed: {why or 'no details'}"
    return f"shape inference failed: {_INFERENCE_TAG.sub('', line).strip()}"


def _check_value_sizes(graph: onnx.GraphProto) -> None:
    """Refuse any value that shape inference says would be absurdly large (nothing is allocated)."""
    made_by = {out: _label(node, i) for i, node in enumerate(graph.node) for out in node.output if out}
    for vi in list(graph.value_info) + list(graph.output):
        if not vi.type.HasField("tensor_type"):
            continue
        dims = [d.dim_value for d in vi.type.tensor_type.shape.dim if d.HasField("dim_value")]
        producer = made_by.get(vi.name)
        _numel(dims, vi.name, f"value '{vi.name}' (output of {producer})" if producer else None)


#: Ops whose output size comes from the *values* of some inputs (indices): shape
#: inference leaves the size unknown when those values are computed, and constant
#: folding would then allocate whatever they ask for.
_SIZE_FROM_VALUES = {
    "Range": (0, 1, 2), "ConstantOfShape": (0,), "Expand": (1,), "Tile": (1,),
    "Resize": (2, 3), "Pad": (1,),
}
#: Cheap ops whose output is no bigger than their (small) inputs' broadcast: evaluated
#: on small constants to find the values above.
_EVALUATED = frozenset(
    "Abs Add And Cast CastLike Ceil Clip Concat Constant Div Equal Flatten Floor Gather "
    "Greater Identity Less Max Min Mod Mul Neg Not Or ReduceMax ReduceMin ReduceProd "
    "ReduceSum Reshape Round Sign Slice Squeeze Sub Sum Unsqueeze Where".split()
)
#: Constants with more elements than this are not evaluated (sizes are tiny vectors).
_SMALL = 256


def _check_data_dependent_sizes(graph: onnx.GraphProto) -> None:
    """Refuse Range/ConstantOfShape/Expand/Tile/Resize/Pad nodes whose constant inputs ask for
    more than MAX_ELEMENTS elements, even where shape inference could not say (bounded work)."""
    static: dict[str, list[int]] = {}
    for vi in list(graph.input) + list(graph.value_info) + list(graph.output):
        dims = vi.type.tensor_type.shape.dim if vi.type.HasField("tensor_type") else ()
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape") and all(
            d.HasField("dim_value") for d in dims
        ):
            static[vi.name] = [d.dim_value for d in dims]
    values: dict[str, np.ndarray] = {}
    for tensor in graph.initializer:
        static[tensor.name] = list(tensor.dims)
        if _numel(tensor.dims, tensor.name) <= _SMALL and tensor.data_location != onnx.TensorProto.EXTERNAL:
            try:
                values[tensor.name] = numpy_helper.to_array(tensor)
            except Exception:  # noqa: BLE001 - best effort: an unreadable value is unknown
                pass
    for index, node in enumerate(graph.node):
        if node.domain not in ("", "ai.onnx"):
            continue
        known = [values.get(name) if name else None for name in node.input]
        if node.op_type in _SIZE_FROM_VALUES and node.output:
            if node.output[0] in static:  # inference sized it; _check_value_sizes checked it
                count = _numel(static[node.output[0]], node.output[0])
            else:
                count = _requested_elements(node, known, [static.get(name) for name in node.input])
            if count is not None and count > MAX_ELEMENTS:
                raise ShapeError(
                    f"{_label(node, index)} would produce {count} elements (more than 2^31) "
                    "from the values of its constant inputs"
                )
            if count is None or count > _SMALL:
                continue
        elif node.op_type == "Shape" and node.input and node.input[0] in static:
            dims = np.array(static[node.input[0]], dtype=np.int64)
            attrs = {a.name: a.i for a in node.attribute}
            values[node.output[0]] = dims[attrs.get("start", 0) : attrs.get("end", len(dims))]
            continue
        elif node.op_type not in _EVALUATED:
            continue
        if any(v is None for v, name in zip(known, node.input) if name) or any(
            v.size > _SMALL for v in known if v is not None
        ):
            continue
        try:
            feeds = {name: v for name, v in zip(node.input, known) if name}
            with warnings.catch_warnings(), np.errstate(all="ignore"):
                warnings.simplefilter("ignore")
                outputs = ReferenceEvaluator(node).run(None, feeds)
        except Exception:  # noqa: BLE001 - best effort: what cannot be evaluated stays unknown
            continue
        for name, value in zip(node.output, outputs):
            if name and isinstance(value, np.ndarray) and value.size <= _SMALL:
                values[name] = value


def _requested_elements(node: onnx.NodeProto, known: list, shapes: list) -> int | None:
    """How many elements ``node`` would produce, from its constant inputs (or None: unknown)."""

    def ints(slot: int) -> list[int] | None:
        value = known[slot] if slot < len(known) else None
        if value is None or value.dtype.kind not in "iuf" or not np.isfinite(value).all():
            return None
        return [int(v) for v in value.reshape(-1)]

    def product(dims) -> int:
        total = 1
        for d in dims:
            total *= max(int(d), 0)
            if total > 1 << 128:
                break
        return total

    op = node.op_type
    if op == "Range":
        scalars = [known[i] if i < len(known) else None for i in range(3)]
        if any(v is None or v.size != 1 or v.dtype.kind not in "iuf" for v in scalars):
            return None
        start, limit, delta = (v.reshape(-1)[0].item() for v in scalars)
        if delta == 0 or not all(np.isfinite([start, limit, delta])):
            return None
        if all(isinstance(v, int) for v in (start, limit, delta)):
            return max(-(-(limit - start) // delta), 0)
        return max(math.ceil((limit - start) / delta), 0)
    if op in ("ConstantOfShape", "Expand", "Tile"):
        dims = ints(0 if op == "ConstantOfShape" else 1)
        if dims is None:
            return None
        if op == "Tile" and shapes and shapes[0] is not None and len(shapes[0]) == len(dims):
            return product(a * b for a, b in zip(shapes[0], dims))
        return product(dims)  # Expand and Tile produce at least this many
    if op == "Pad":
        pads = ints(1)
        if pads is None or not shapes or shapes[0] is None or len(pads) != 2 * len(shapes[0]):
            return None
        rank = len(shapes[0])
        return product(d + pads[i] + pads[i + rank] for i, d in enumerate(shapes[0]))
    if op == "Resize":
        sizes = ints(3)
        if sizes is not None:
            return product(sizes)
        scales = known[2] if len(known) > 2 else None
        if scales is None or not shapes or shapes[0] is None or scales.size != len(shapes[0]):
            return None
        if not np.isfinite(scales).all():
            return None
        return product(int(d * float(f)) for d, f in zip(shapes[0], scales.reshape(-1)))
    return None


# -- messages ------------------------------------------------------------------------------


def _label(node: onnx.NodeProto, index: int) -> str:
    name = node.name or f"#{index}"
    op = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
    return f"node '{name}' ({op})"


def _first_line(message: str) -> str:
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    if not lines:
        return "unknown error"
    text = lines[0]
    context = next((line for line in lines[1:] if "Context:" in line or "node" in line.lower()), None)
    if context and context not in text:
        text = f"{text} ({context.replace('==> Context:', '').strip()})"
    return text
