"""Import ONNX files into the IR, refusing anything malformed, unsafe or unsupported.

The checks run from cheap to expensive, so that each bad input is reported by the
check that understands it best: file → protobuf → model → opsets → graph structure
→ supported ops → external data → initializers → node attributes → shapes.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import networkx as nx
import numpy as np
import onnx
import onnx.checker
import onnx.inliner
import onnx.shape_inference
import onnx.version_converter
import onnx_ir as ir
from google.protobuf.message import DecodeError
from onnx import numpy_helper

from . import protobuf_diag
from .errors import (
    ModelFormatError,
    NumericsError,
    ShapeError,
    UnsafeModelError,
    UnsupportedOpError,
)
from . import intops  # noqa: F401  (registers qcompiler-domain schemas)
from .opset import MAX_OPSET, MIN_OPSET, QC_DOMAIN, SUPPORTED_OPS

#: Refuse any tensor with more elements than this before allocating it.
MAX_ELEMENTS = 2**31 - 1
#: Refuse model files larger than protobuf can hold.
MAX_PROTO_BYTES = 2**31 - 1

InputShapes = Mapping[str, Sequence[int]]


def load_onnx(
    path: str | os.PathLike,
    *,
    input_shapes: InputShapes | None = None,
    require_static: bool = True,
) -> ir.Model:
    """Load, validate and import an ONNX file.

    ``input_shapes`` pins dynamic input dimensions (``{"input_ids": (1, 128)}``).
    With ``require_static`` (the default) every model input must end up fully static.
    """
    path = Path(path)
    proto = _read_model_proto(path)
    _load_external_data(proto, path.parent)
    return import_proto(
        proto, input_shapes=input_shapes, require_static=require_static, source=str(path)
    )


def import_proto(
    proto: onnx.ModelProto,
    *,
    input_shapes: InputShapes | None = None,
    require_static: bool = True,
    source: str = "model",
) -> ir.Model:
    """Validate an in-memory ModelProto (external data already loaded) and import it."""
    _check_is_model(proto, source)
    proto = _normalise_opsets(proto)
    if proto.functions:
        proto = onnx.inliner.inline_local_functions(proto)
    _check_structure(proto.graph)
    _check_supported_ops(proto.graph)
    _check_initializers(proto.graph)
    _check_nodes(proto)
    _check_model(proto)
    if input_shapes:
        _pin_input_shapes(proto.graph, input_shapes)
    _check_input_shapes(proto.graph, require_static)
    proto = _infer_shapes(proto)
    _check_value_sizes(proto.graph)
    model = ir.from_proto(proto)
    model.graph.sort()
    return model


# -- file and protobuf ---------------------------------------------------------------


def _read_model_proto(path: Path) -> onnx.ModelProto:
    if not path.exists():
        raise ModelFormatError(f"{path}: no such file")
    if path.is_dir():
        raise ModelFormatError(f"{path}: is a folder, not an ONNX file")
    size = path.stat().st_size
    if size == 0:
        raise ModelFormatError(f"{path}: file is empty")
    if size > MAX_PROTO_BYTES:
        raise ModelFormatError(
            f"{path}: {size} bytes is more than one protobuf can hold; "
            "store the weights as external data"
        )
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelFormatError(f"{path}: cannot read: {exc.strerror}") from None
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as exc:
        where = protobuf_diag.diagnose(data) or str(exc)
        raise ModelFormatError(f"{path}: not a valid ONNX protobuf ({where})") from None
    damage = protobuf_diag.diagnose(data)
    if damage:  # parsed leniently, but the wire data is still broken
        raise ModelFormatError(f"{path}: damaged ONNX protobuf ({damage})")
    return proto


def _check_is_model(proto: onnx.ModelProto, source: str) -> None:
    if not proto.HasField("graph") or proto.ir_version <= 0:
        raise ModelFormatError(
            f"{source}: not an ONNX model (protobuf without "
            f"{'a graph' if not proto.HasField('graph') else 'an ir_version'})"
        )
    if not proto.graph.output:
        raise ModelFormatError(f"{source}: the graph has no outputs")
    if proto.ir_version > onnx.IR_VERSION:
        raise UnsupportedOpError(
            f"{source}: IR version {proto.ir_version} is newer than this qcompiler "
            f"understands ({onnx.IR_VERSION})"
        )


# -- opsets ----------------------------------------------------------------------------


def _normalise_opsets(proto: onnx.ModelProto) -> onnx.ModelProto:
    opsets = {}
    for entry in proto.opset_import:
        domain = "" if entry.domain == "ai.onnx" else entry.domain
        opsets[domain] = entry.version
    local_functions = {(f.domain, f.name) for f in proto.functions}
    for node in _all_nodes(proto.graph):
        domain = "" if node.domain == "ai.onnx" else node.domain
        if (node.domain, node.op_type) in local_functions:
            continue
        if domain not in SUPPORTED_OPS:
            raise UnsupportedOpError(
                f"node '{node.name or '<unnamed>'}' ({node.op_type}) is in domain "
                f"'{node.domain}', which qcompiler does not support"
            )
        if domain not in opsets:
            raise ModelFormatError(
                f"node '{node.name or '<unnamed>'}' ({node.op_type}) uses domain "
                f"'{node.domain or 'ai.onnx'}', which the model does not import"
            )
    version = opsets.get("", MIN_OPSET)
    if version > MAX_OPSET:
        raise UnsupportedOpError(
            f"opset {version} is newer than the newest this qcompiler supports ({MAX_OPSET})"
        )
    if version < MIN_OPSET:
        try:
            proto = onnx.version_converter.convert_version(proto, MIN_OPSET)
        except Exception as exc:  # the converter raises bare RuntimeErrors
            raise UnsupportedOpError(
                f"cannot upgrade the model from opset {version} to {MIN_OPSET}: "
                f"{_first_line(str(exc))}"
            ) from None
    return proto


# -- graph structure ----------------------------------------------------------------------


def _check_structure(graph: onnx.GraphProto) -> None:
    """Unique value names, every input produced, no cycles; sorts nodes if needed."""
    producer: dict[str, str] = {}
    for vi in graph.input:
        producer[vi.name] = f"graph input '{vi.name}'"
    for init in graph.initializer:
        if init.name in producer and not any(vi.name == init.name for vi in graph.input):
            raise ModelFormatError(f"initializer '{init.name}' is defined twice")
        producer.setdefault(init.name, f"initializer '{init.name}'")
    for index, node in enumerate(graph.node):
        for out in node.output:
            if not out:
                continue
            if out in producer:
                raise ModelFormatError(
                    f"value '{out}' is produced twice: by {producer[out]} and by "
                    f"{_label(node, index)}"
                )
            producer[out] = _label(node, index)
    for index, node in enumerate(graph.node):
        for name in _node_reads(node):
            if name and name not in producer:
                raise ModelFormatError(
                    f"{_label(node, index)} reads '{name}', which no node, input or "
                    "initializer produces"
                )
    for vi in graph.output:
        if vi.name not in producer:
            raise ModelFormatError(f"graph output '{vi.name}' is never produced")

    produced_by = {out: i for i, node in enumerate(graph.node) for out in node.output if out}
    dag = nx.DiGraph()
    dag.add_nodes_from(range(len(graph.node)))
    for index, node in enumerate(graph.node):
        for name in _node_reads(node):
            if name in produced_by:
                dag.add_edge(produced_by[name], index)
    try:
        cycle = nx.find_cycle(dag)
    except nx.NetworkXNoCycle:
        cycle = None
    if cycle:
        names = [_label(graph.node[a], a) for a, _ in cycle]
        raise ModelFormatError("the graph has a cycle: " + " -> ".join(names + names[:1]))
    order = list(nx.lexicographical_topological_sort(dag))
    if order != list(range(len(graph.node))):
        nodes = [graph.node[i] for i in order]
        del graph.node[:]
        graph.node.extend(nodes)


def _node_reads(node: onnx.NodeProto) -> Iterator[str]:
    """Names a node reads, including values its subgraphs capture from the outer scope."""
    yield from (name for name in node.input if name)
    for attr in node.attribute:
        for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
            local = {vi.name for vi in sub.input} | {i.name for i in sub.initializer}
            local |= {o for n in sub.node for o in n.output}
            for inner in sub.node:
                yield from (name for name in _node_reads(inner) if name not in local)


def _all_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from _all_nodes(sub)


def _check_supported_ops(graph: onnx.GraphProto) -> None:
    for node in _all_nodes(graph):
        domain = "" if node.domain == "ai.onnx" else node.domain
        if node.op_type not in SUPPORTED_OPS.get(domain, ()):
            op = node.op_type if not domain else f"{domain}.{node.op_type}"
            raise UnsupportedOpError(
                f"node '{node.name or '<unnamed>'}': op type {op} is not supported by qcompiler"
            )


# -- external data and initializers ----------------------------------------------------


def _all_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
            elif attr.type == onnx.AttributeProto.TENSORS:
                yield from attr.tensors
            elif attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_tensors(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from _all_tensors(sub)


def _load_external_data(proto: onnx.ModelProto, base_dir: Path) -> None:
    """Check every external-data reference stays inside ``base_dir``, then load it."""
    base = base_dir.resolve()
    external = [t for t in _all_tensors(proto.graph) if t.data_location == onnx.TensorProto.EXTERNAL]
    for tensor in external:
        info = {entry.key: entry.value for entry in tensor.external_data}
        location = info.get("location", "")
        what = f"tensor '{tensor.name}': external data location '{location}'"
        if not location:
            raise ModelFormatError(f"tensor '{tensor.name}': external data without a location")
        if os.path.isabs(location) or Path(location).drive:
            raise UnsafeModelError(f"{what} is an absolute path; only paths inside the model's folder are allowed")
        target = (base / location).resolve()
        if not target.is_relative_to(base):
            raise UnsafeModelError(f"{what} resolves outside the model's folder")
        if not target.is_file():
            raise ModelFormatError(f"{what}: file not found")
        try:
            offset = int(info.get("offset", 0))
            length = int(info["length"]) if "length" in info else None
        except ValueError:
            raise ModelFormatError(f"{what}: offset/length are not integers") from None
        file_size = target.stat().st_size
        expected = _expected_nbytes(tensor)
        if length is None:
            length = file_size - offset
        if offset < 0 or length < 0 or offset + length > file_size:
            raise ModelFormatError(
                f"{what}: bytes {offset}..{offset + length} lie beyond the end of the file "
                f"({file_size} bytes)"
            )
        if expected is not None and expected != length:
            raise ModelFormatError(
                f"tensor '{tensor.name}': shape {list(tensor.dims)} needs {expected} bytes, "
                f"the external data holds {length}"
            )
    if external:
        onnx.external_data_helper.load_external_data_for_model(proto, str(base))


def _numel(dims: Sequence[int], name: str) -> int:
    if any(d < 0 for d in dims):
        raise ShapeError(f"tensor '{name}' has a negative dimension: {list(dims)}")
    count = math.prod(dims)
    if count > MAX_ELEMENTS:
        raise ShapeError(f"tensor '{name}' has {count} elements (shape {list(dims)}), more than 2^31")
    return count


def _expected_nbytes(tensor: onnx.TensorProto) -> int | None:
    count = _numel(tensor.dims, tensor.name)
    if tensor.data_type == onnx.TensorProto.STRING:
        return None
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
    bits = 4 if tensor.data_type in _FOUR_BIT_TYPES else np.dtype(dtype).itemsize * 8
    return (count * bits + 7) // 8


_FOUR_BIT_TYPES = {
    getattr(onnx.TensorProto, name)
    for name in ("INT4", "UINT4", "FLOAT4E2M1")
    if hasattr(onnx.TensorProto, name)
}

_TYPED_FIELDS = ("float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data")


def _check_tensor_data(tensor: onnx.TensorProto) -> None:
    count = _numel(tensor.dims, tensor.name)
    if tensor.data_type == onnx.TensorProto.UNDEFINED:
        raise ModelFormatError(f"tensor '{tensor.name}' has no data type")
    if tensor.HasField("raw_data"):
        expected = _expected_nbytes(tensor)
        if expected is not None and len(tensor.raw_data) != expected:
            raise ModelFormatError(
                f"tensor '{tensor.name}': shape {list(tensor.dims)} needs {expected} bytes of data, "
                f"it holds {len(tensor.raw_data)}"
            )
        return
    stored = sum(len(getattr(tensor, field)) for field in _TYPED_FIELDS)
    if tensor.data_type in _FOUR_BIT_TYPES:
        count = (count + 1) // 2
    elif tensor.data_type in (onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128):
        count *= 2
    if stored != count:
        raise ModelFormatError(
            f"tensor '{tensor.name}': shape {list(tensor.dims)} needs {count} values, it holds {stored}"
        )


#: Inputs that hold weights (op type -> input indices): checked for NaN/Inf at import.
#: Other constants may legitimately hold infinities (attention masks).
_WEIGHT_INPUTS = {
    "MatMul": (0, 1), "Gemm": (0, 1, 2), "Conv": (1, 2), "ConvTranspose": (1, 2),
    "LayerNormalization": (1, 2), "BatchNormalization": (1, 2, 3, 4),
    "InstanceNormalization": (1, 2), "GroupNormalization": (1, 2),
    "RMSNormalization": (1,), "Gather": (0,), "PRelu": (1,),
}
_FLOAT_TYPES = (
    onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE,
    onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16,
)


def _check_initializers(graph: onnx.GraphProto) -> None:
    for tensor in _all_tensors(graph):
        _check_tensor_data(tensor)
    constants = {t.name: (t, f"initializer '{t.name}'") for t in graph.initializer}
    for index, node in enumerate(graph.node):
        if node.op_type == "Constant" and node.output:
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is not None:
                constants[node.output[0]] = (value, f"constant {_label(node, index)}")
    for index, node in enumerate(graph.node):
        for slot in _WEIGHT_INPUTS.get(node.op_type, ()):
            if slot >= len(node.input) or node.input[slot] not in constants:
                continue
            tensor, what = constants[node.input[slot]]
            if tensor.data_type not in _FLOAT_TYPES:
                continue
            array = numpy_helper.to_array(tensor).astype(np.float32)
            nans = int(np.isnan(array).sum())
            infs = int(np.isinf(array).sum())
            if nans or infs:
                raise NumericsError(
                    f"{what}, a weight of {_label(node, index)}, holds {nans} NaN and {infs} "
                    "infinite values; fix the weights before compiling"
                )


# -- node and model checks -----------------------------------------------------------------


def _check_nodes(proto: onnx.ModelProto) -> None:
    ctx = onnx.checker.C.CheckerContext()
    ctx.ir_version = proto.ir_version
    ctx.opset_imports = {entry.domain: entry.version for entry in proto.opset_import}
    for index, node in enumerate(proto.graph.node):
        if node.domain == QC_DOMAIN:
            continue
        try:
            onnx.checker.check_node(node, ctx)
        except onnx.checker.ValidationError as exc:
            raise ModelFormatError(f"{_label(node, index)}: {_first_line(str(exc))}") from None


def _check_model(proto: onnx.ModelProto) -> None:
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as exc:
        raise ModelFormatError(f"invalid model: {_first_line(str(exc))}") from None
    except ValueError as exc:  # e.g. protobuf size limits
        raise ModelFormatError(f"invalid model: {_first_line(str(exc))}") from None


# -- shapes --------------------------------------------------------------------------------


def _graph_inputs(graph: onnx.GraphProto) -> list[onnx.ValueInfoProto]:
    initializers = {t.name for t in graph.initializer}
    return [vi for vi in graph.input if vi.name not in initializers]


def _pin_input_shapes(graph: onnx.GraphProto, input_shapes: InputShapes) -> None:
    inputs = {vi.name: vi for vi in _graph_inputs(graph)}
    for name, dims in input_shapes.items():
        if name not in inputs:
            raise ShapeError(f"--input-shape names '{name}', which is not a model input; inputs are {sorted(inputs)}")
        tensor_type = inputs[name].type.tensor_type
        current = tensor_type.shape.dim
        if tensor_type.HasField("shape") and len(current) != len(dims):
            raise ShapeError(
                f"input '{name}' has rank {len(current)}, --input-shape gives {len(dims)} dimensions"
            )
        for axis, dim in enumerate(dims):
            if dim <= 0:
                raise ShapeError(f"input '{name}': dimension {axis} must be positive, got {dim}")
        for axis, dim in enumerate(current):
            if dim.HasField("dim_value") and dim.dim_value != dims[axis]:
                raise ShapeError(
                    f"input '{name}' has static dimension {axis} = {dim.dim_value}, "
                    f"--input-shape asks for {dims[axis]}"
                )
        tensor_type.shape.ClearField("dim")
        for dim in dims:
            tensor_type.shape.dim.add().dim_value = int(dim)
        _numel(list(dims), name)


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
        _numel(dims, vi.name)


def _infer_shapes(proto: onnx.ModelProto) -> onnx.ModelProto:
    del proto.graph.value_info[:]
    try:
        return onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True, data_prop=True)
    except onnx.shape_inference.InferenceError as exc:
        raise ShapeError(f"shape inference failed: {_first_line(str(exc))}") from None
    except ValueError as exc:
        raise ModelFormatError(f"invalid model: {_first_line(str(exc))}") from None


def _check_value_sizes(graph: onnx.GraphProto) -> None:
    for vi in list(graph.value_info) + list(graph.output):
        if not vi.type.HasField("tensor_type"):
            continue
        dims = [d.dim_value for d in vi.type.tensor_type.shape.dim if d.HasField("dim_value")]
        _numel(dims, vi.name)


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
