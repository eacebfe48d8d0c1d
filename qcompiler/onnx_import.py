"""Import ONNX files into the IR, refusing anything malformed, unsafe or unsupported.

The checks run from cheap to expensive, so that each bad input is reported by the
check that understands it best: file → protobuf → model → opsets → graph structure
→ supported ops → external data → initializers → node attributes → shapes.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
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

from . import (
    intops,  # noqa: F401  (registers qcompiler-domain schemas)
    protobuf_diag,
    qstate,
)
from .errors import (
    ModelFormatError,
    NumericsError,
    UnsafeModelError,
    UnsupportedOpError,
)
from .graph import STAGE_KEY, detect_stage, set_stage
from .import_shapes import (
    InputShapes,
    _check_data_dependent_sizes,
    _check_input_shapes,
    _check_value_sizes,
    _first_line,
    _infer_shapes,
    _label,
    _mark_dynamic_dims,
    _numel,
    _pin_input_shapes,
)
from .integer import get_op, is_supported, is_supported_domain
from .opset import MAX_OPSET, MIN_OPSET
from .specialize import needs_specialisation, pin_input_values, specialise

#: Refuse model files larger than protobuf can hold.
MAX_PROTO_BYTES = 2**31 - 1



def load_onnx(
    path: str | os.PathLike | onnx.ModelProto,
    *,
    input_shapes: InputShapes | None = None,
    input_values: Mapping[str, object] | None = None,
    require_static: bool = True,
) -> ir.Model:
    """Load, validate and import an ONNX file (or an in-memory ``ModelProto``).

    ``input_shapes`` pins dynamic input dimensions (``{"input_ids": (1, 128)}``);
    ``input_values`` turns inputs into constants (``{"sr": 16000}``), which decides the
    control flow that depends on them (:mod:`qcompiler.specialize`).
    With ``require_static`` (the default) every model input must end up fully static.
    """
    options = {"input_shapes": input_shapes, "input_values": input_values, "require_static": require_static}
    if isinstance(path, onnx.ModelProto):
        return import_proto(path, **options)
    path = Path(path)
    proto = _read_model_proto(path)
    _load_external_data(proto, path.parent)
    model = _import_owned_proto(proto, source=str(path), **options)
    qstate.attach_companions(model, path)
    return model


def import_proto(
    proto: onnx.ModelProto,
    *,
    input_shapes: InputShapes | None = None,
    input_values: Mapping[str, object] | None = None,
    require_static: bool = True,
    source: str = "model",
) -> ir.Model:
    """Validate an in-memory ModelProto (external data already loaded) and import it.
    The caller's proto is not modified."""
    _check_is_model(proto, source)
    own = onnx.ModelProto()
    own.CopyFrom(proto)
    return _import_owned_proto(own, input_shapes=input_shapes, input_values=input_values,
                               require_static=require_static, source=source)


def _import_owned_proto(
    proto: onnx.ModelProto,
    *,
    input_shapes: InputShapes | None,
    input_values: Mapping[str, object] | None,
    require_static: bool,
    source: str,
) -> ir.Model:
    """:func:`import_proto` on a proto this module may modify in place."""
    _check_is_model(proto, source)
    proto = _normalise_opsets(proto)
    if proto.functions:
        proto = _inline_functions(proto)
    _check_structure(proto.graph)
    _check_supported_ops(proto.graph)
    _check_initializers(proto.graph)
    _check_nodes(proto)
    _mark_dynamic_dims(proto.graph)
    if input_shapes:
        _pin_input_shapes(proto.graph, input_shapes)
    if input_values:
        pin_input_values(proto.graph, input_values)
    _check_input_shapes(proto.graph, require_static)
    _check_model(proto)
    proto = _infer_shapes(proto)
    _check_value_sizes(proto.graph)
    _check_data_dependent_sizes(proto.graph)
    model = ir.from_proto(proto)
    if needs_specialisation(model):
        model = specialise(model, _reinfer_shapes)
    model.graph.sort()
    if STAGE_KEY not in model.metadata_props:
        set_stage(model, detect_stage(model))
    return model


def _reinfer_shapes(model: ir.Model) -> ir.Model:
    """Shape inference again after folding: intermediate and output shapes are inferred
    afresh (the ones recorded before came from fewer constants, or from the exporter, whose
    declared output shapes can be wrong: ddddocr declares ``[1, seqlen]`` for a
    ``(32, 1, 8210)`` output)."""
    proto = ir.to_proto(model)
    del proto.graph.value_info[:]
    for output in proto.graph.output:
        if output.type.HasField("tensor_type"):
            output.type.tensor_type.ClearField("shape")
    proto = _infer_shapes(proto)
    _check_value_sizes(proto.graph)
    return ir.from_proto(proto)


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
        if not is_supported_domain(domain):
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
    if version < 9:
        for node in _all_nodes(proto.graph):
            if node.op_type == "Scan" and node.domain in ("", "ai.onnx"):
                raise UnsupportedOpError(
                    f"node '{node.name or '<unnamed>'}' (Scan): an opset-{version} Scan (batch axis, "
                    "sequence_lens input) has no upgrade to opset 9+; export the model with opset 9 or newer"
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
        if not is_supported(domain, node.op_type):
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
        if get_op(node.domain, node.op_type) is not None:  # checked by its decomposition
            continue
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            continue  # subgraphs read outer names: checked with the whole model (_check_model)
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
