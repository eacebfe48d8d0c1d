"""Import ONNX files into the IR, refusing anything malformed, unsafe or unsupported.

The checks run from cheap to expensive, so that each bad input is reported by the
check that understands it best: file → protobuf → model → opsets → graph structure
→ supported ops → external data → initializers → node attributes → shapes.
"""

from __future__ import annotations

import math
import numbers
import os
import re
import warnings
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
from onnx.reference import ReferenceEvaluator

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
        proto = _inline_functions(proto)
    _check_structure(proto.graph)
    _check_supported_ops(proto.graph)
    _check_initializers(proto.graph)
    _check_nodes(proto)
    if input_shapes:
        _pin_input_shapes(proto.graph, input_shapes)
    _check_input_shapes(proto.graph, require_static)
    _check_model(proto)
    proto = _infer_shapes(proto)
    _check_value_sizes(proto.graph)
    _check_data_dependent_sizes(proto.graph)
    model = ir.from_proto(proto)
    model.graph.sort()
    return model


# -- file and protobuf ---------------------------------------------------------------


def _read_model_proto(path: Path) -> onnx.ModelProto:
    try:
        if not path.exists():
            raise ModelFormatError(f"{path}: no such file")
        if path.is_dir():
            raise ModelFormatError(f"{path}: is a folder, not an ONNX file")
        if not path.is_file():  # a FIFO or a device would block or never end
            raise ModelFormatError(f"{path}: is not a regular file")
        size = path.stat().st_size
    except (OSError, ValueError) as exc:
        raise ModelFormatError(f"{path}: cannot read: {getattr(exc, 'strerror', None) or exc}") from None
    if size == 0:
        raise ModelFormatError(f"{path}: file is empty")
    if size > MAX_PROTO_BYTES:
        raise ModelFormatError(
            f"{path}: {size} bytes is more than one protobuf can hold; "
            "store the weights as external data"
        )
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise UnsafeModelError(f"{path}: {PICKLE_REFUSAL}")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelFormatError(f"{path}: cannot read: {exc.strerror}") from None
    _refuse_pickles(path, data)
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as exc:
        where = protobuf_diag.diagnose(data) or _first_line(str(exc))
        # every ONNX writer puts ir_version first
        hint = "" if data.startswith(b"\x08") else "; the file does not start like an ONNX model"
        raise ModelFormatError(f"{path}: not a valid ONNX protobuf ({where}){hint}") from None
    if not proto.HasField("graph"):
        return proto  # _check_is_model says it is not a model, which is the real problem
    damage = protobuf_diag.diagnose(data)
    if damage:  # parsed leniently, but the wire data is still broken
        raise ModelFormatError(f"{path}: damaged ONNX protobuf ({damage})")
    return proto


#: Suffixes of PyTorch checkpoints and pickles, refused without being opened.
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".bin")
PICKLE_REFUSAL = (
    "PyTorch/pickle files are not loaded (unsafe); export to ONNX, "
    "or use qcompiler.from_torch() in Python"
)


def _refuse_pickles(path: Path, data: bytes) -> None:
    """Refuse PyTorch checkpoints and pickles whatever their name (never unpickled)."""
    if data[:4] == b"PK\x03\x04":
        raise UnsafeModelError(
            f"{path}: is a zip archive (a PyTorch checkpoint?), not ONNX; {PICKLE_REFUSAL}"
        )
    if len(data) >= 2 and data[0] == 0x80 and 2 <= data[1] <= 5:
        raise UnsafeModelError(f"{path}: is a Python pickle, not ONNX; {PICKLE_REFUSAL}")


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


def _inline_functions(proto: onnx.ModelProto) -> onnx.ModelProto:
    seen = set()
    for function in proto.functions:
        key = (function.domain, function.name, function.overload)
        if key in seen:
            raise ModelFormatError(f"local function '{function.domain}::{function.name}' is defined twice")
        seen.add(key)
    try:
        return onnx.inliner.inline_local_functions(proto)
    except (onnx.checker.ValidationError, RuntimeError, ValueError) as exc:  # C++ assertions
        why = _CPP_ASSERTION.sub("", _first_line(str(exc)))
        raise ModelFormatError(f"cannot inline the model's local functions: {why}") from None


#: "/path/file.cc:224: Function: Assertion `...` failed: " in front of ONNX's C++ messages.
_CPP_ASSERTION = re.compile(r"^\S+\.(cc|cpp|h):\d+: .*? failed: ")


# -- graph structure ----------------------------------------------------------------------


def _check_structure(graph: onnx.GraphProto) -> None:
    """Unique value names, every input produced, no cycles; sorts nodes if needed."""
    producer: dict[str, str] = {}
    for vi in graph.input:
        if vi.name in producer:
            raise ModelFormatError(f"graph input '{vi.name}' is declared twice")
        producer[vi.name] = f"graph input '{vi.name}'"
    outputs: set[str] = set()
    for vi in graph.output:
        if vi.name in outputs:
            raise ModelFormatError(f"graph output '{vi.name}' is declared twice")
        outputs.add(vi.name)
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


#: The keys ONNX defines for external data (anything else is damage, not a hint to ignore).
_EXTERNAL_KEYS = frozenset({"location", "offset", "length", "checksum", "basepath"})


def _load_external_data(proto: onnx.ModelProto, base_dir: Path) -> None:
    """Check every external-data reference stays inside ``base_dir``, then load it."""
    base = base_dir.resolve()
    external = [t for t in _all_tensors(proto.graph) if t.data_location == onnx.TensorProto.EXTERNAL]
    for tensor in external:
        info: dict[str, str] = {}
        for entry in tensor.external_data:
            if entry.key not in _EXTERNAL_KEYS:
                raise ModelFormatError(
                    f"tensor '{tensor.name}': unknown external data key {entry.key!r} "
                    f"(known: {', '.join(sorted(_EXTERNAL_KEYS))})"
                )
            if entry.key in info:
                raise ModelFormatError(f"tensor '{tensor.name}': external data key '{entry.key}' is given twice")
            info[entry.key] = entry.value
        location = info.get("location", "")
        what = f"tensor '{tensor.name}': external data location '{location}'"
        if not location:
            raise ModelFormatError(f"tensor '{tensor.name}': external data without a location")
        if os.path.isabs(location) or Path(location).drive:
            raise UnsafeModelError(f"{what} is an absolute path; only paths inside the model's folder are allowed")
        if "\x00" in location:
            raise UnsafeModelError(f"{what} holds a NUL byte")
        try:
            target = (base / location).resolve()
            if not target.is_relative_to(base):
                raise UnsafeModelError(f"{what} resolves outside the model's folder")
            if not target.is_file():
                raise ModelFormatError(f"{what}: file not found")
            file_size = target.stat().st_size
        except (OSError, RuntimeError) as exc:  # too long, symlink loop, no permission
            reason = getattr(exc, "strerror", None) or _first_line(str(exc))
            raise ModelFormatError(f"{what}: cannot be read ({reason})") from None
        try:
            offset = int(info.get("offset", 0))
            length = int(info["length"]) if "length" in info else None
        except ValueError:
            raise ModelFormatError(f"{what}: offset/length are not integers") from None
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


def _check_data_type(tensor: onnx.TensorProto) -> None:
    if tensor.data_type == onnx.TensorProto.UNDEFINED:
        raise ModelFormatError(f"tensor '{tensor.name}' has no data type")
    if tensor.data_type not in _KNOWN_TYPES:
        raise ModelFormatError(f"tensor '{tensor.name}' has an unknown data type ({tensor.data_type})")


_KNOWN_TYPES = frozenset(
    value for value in onnx.TensorProto.DataType.values() if value != onnx.TensorProto.UNDEFINED
)


def _expected_nbytes(tensor: onnx.TensorProto) -> int | None:
    count = _numel(tensor.dims, tensor.name)
    _check_data_type(tensor)
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
    _check_data_type(tensor)
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
#: Constant inputs of arithmetic ops: NaN there is garbage, infinity may be a mask.
_NAN_FREE_INPUTS = {"Add": (0, 1), "Sub": (0, 1), "Mul": (0, 1), "Div": (0, 1)}
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
        weights = _WEIGHT_INPUTS.get(node.op_type, ())
        for slot in weights + _NAN_FREE_INPUTS.get(node.op_type, ()):
            if slot >= len(node.input) or node.input[slot] not in constants:
                continue
            tensor, what = constants[node.input[slot]]
            if tensor.data_type not in _FLOAT_TYPES:
                continue
            array = numpy_helper.to_array(tensor)
            nans = int(np.isnan(array).sum())
            infs = int(np.isinf(array).sum()) if slot in weights else 0
            if nans or infs:
                role = "a weight" if slot in weights else "an input"
                raise NumericsError(
                    f"{what}, {role} of {_label(node, index)}, holds {nans} NaN and {infs} "
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
