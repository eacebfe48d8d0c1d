"""Integer ops: one class per op holds its schema and its decomposition into primitives.

An op is written once::

    @integer_op
    class IntAbsDiff(IntegerOp):
        "y = clamp(|a − b|) in a's type."
        op_type = "IntAbsDiff"
        inputs = (Input("a", Q_TYPES), Input("b", Q_TYPES))
        outputs = (Output("y", Q_TYPES),)

        @classmethod
        def decompose(cls, b, inputs, attrs):
            x, y = inputs
            return [b.clamp_cast(abs(x - y), x.storage)]

and from that single definition it has an ONNX schema (``onnx.defs``), a reference
kernel (the decomposition run in numpy, used by the reference interpreter), a lowering
on every target (each backend renders the primitives) and a cost on the cost models.
Built-in ops are in :mod:`qcompiler.integer.ops`; plugins register more through the
``qcompiler.integer_ops`` entry-point group (``name = "package.module:OpClass"``).
Backends may register hand-tuned kernels for an op as *overrides*; the generic
rendering of the decomposition stays the specification they are tested against.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from importlib.metadata import entry_points
from typing import Any, ClassVar

import numpy as np
import onnx
import onnx.defs
from onnx.defs import OpSchema

from ..opset import QC_DOMAIN, QC_DOMAIN_VERSION, SUPPORTED_OPS
from . import numpy_backend
from .expr import Builder, DecompositionError, Expr

#: Entry-point group through which plugins add integer ops.
ENTRY_POINT_GROUP = "qcompiler.integer_ops"

Q_TYPES = ("tensor(int8)", "tensor(uint8)", "tensor(int16)", "tensor(uint16)")
ACC_TYPES = ("tensor(int32)", "tensor(int64)")
ANY_INT = tuple(sorted(set(Q_TYPES + ACC_TYPES)))


@dataclasses.dataclass(frozen=True)
class Input:
    """A formal input: ``constant`` inputs (zero points, multipliers, tables) must be known
    at compile time; their values shape the decomposition."""

    name: str
    types: tuple[str, ...]
    doc: str = ""
    optional: bool = False
    constant: bool = False


@dataclasses.dataclass(frozen=True)
class Output:
    name: str
    types: tuple[str, ...]
    doc: str = ""


@dataclasses.dataclass(frozen=True)
class Attribute:
    name: str
    default: Any
    doc: str = ""


@dataclasses.dataclass(frozen=True)
class Example:
    """Inputs and attributes an op is tested with on every target (see :meth:`IntegerOp.examples`).

    Inputs the schema declares ``constant`` are compile-time constants of the test model;
    ``weights`` names other inputs to hold as constants too (a matmul's weights)."""

    inputs: tuple
    attrs: dict = dataclasses.field(default_factory=dict)
    weights: tuple[int, ...] = ()
    name: str = ""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """What a decomposition knows of one input: shape, type, and its value if constant."""

    shape: tuple[int, ...]
    dtype: np.dtype
    value: np.ndarray | None = None


class IntegerOp:
    """Base class of integer ops (see the module docstring)."""

    domain: ClassVar[str] = QC_DOMAIN
    op_type: ClassVar[str] = ""
    inputs: ClassVar[tuple[Input, ...]] = ()
    outputs: ClassVar[tuple[Output, ...]] = ()
    attributes: ClassVar[tuple[Attribute, ...]] = ()

    @classmethod
    def decompose(cls, b: Builder, inputs: list[Expr | None], attrs: dict[str, Any]) -> list[Expr]:  # pragma: no cover
        """The outputs as primitives of ``inputs`` (``None`` for an absent optional input)."""
        raise NotImplementedError

    @classmethod
    def examples(cls, rng: np.random.Generator) -> list[Example]:
        """Representative inputs: the op × target coverage test compiles each for every
        integer target and compares bit for bit with the reference. Every op defines some."""
        return []

    # -- derived from the definition -----------------------------------------------------------

    @classmethod
    def key(cls) -> tuple[str, str]:
        return cls.domain, cls.op_type

    @classmethod
    def label(cls) -> str:
        return f"{cls.domain}.{cls.op_type}" if cls.domain else cls.op_type

    @classmethod
    def attribute_values(cls, given: Mapping[str, Any]) -> dict[str, Any]:
        """The op's attributes: ``given`` (bytes decoded) over the declared defaults."""
        values = {a.name: a.default for a in cls.attributes}
        for name, value in given.items():
            if value is None:
                continue
            values[name] = value.decode() if isinstance(value, bytes) else value
        return values

    @classmethod
    def trace(cls, infos: Sequence[TensorInfo | None], attrs: Mapping[str, Any]) -> tuple[Builder, list[Expr]]:
        """Build the decomposition for inputs described by ``infos`` (raises
        :class:`DecompositionError` with a one-line reason when it cannot)."""
        b = Builder()
        args: list[Expr | None] = []
        for index, spec in enumerate(cls.inputs):
            info = infos[index] if index < len(infos) else None
            if info is None:
                if not spec.optional:
                    raise DecompositionError(f"input '{spec.name}' is missing")
                args.append(None)
                continue
            if spec.constant:
                if info.value is None:
                    raise DecompositionError(f"input '{spec.name}' must be a compile-time constant")
                args.append(b.const(info.value, storage=np.asarray(info.value).dtype))
            else:
                args.append(b.input(index, info.shape, info.dtype))
        outputs = cls.decompose(b, args, cls.attribute_values(attrs))
        return b, list(outputs)

    @classmethod
    def evaluate(cls, arrays: Sequence[np.ndarray | None], **attrs) -> list[np.ndarray]:
        """The reference semantics: the decomposition run in numpy on ``arrays``."""
        infos = [None if a is None else TensorInfo(np.shape(a), np.asarray(a).dtype, np.asarray(a)) for a in arrays]
        _, outputs = cls.trace(infos, attrs)
        feeds = {i: a for i, a in enumerate(arrays) if a is not None}
        return numpy_backend.evaluate(outputs, feeds, name=cls.op_type)

    @classmethod
    def schema(cls) -> OpSchema:
        params = []
        constraints = []
        for i, spec in enumerate(cls.inputs):
            option = OpSchema.FormalParameterOption.Optional if spec.optional else OpSchema.FormalParameterOption.Single
            params.append(OpSchema.FormalParameter(spec.name, f"TI{i}", spec.doc, param_option=option))
            constraints.append((f"TI{i}", list(spec.types), spec.name))
        outputs = []
        for i, spec in enumerate(cls.outputs):
            outputs.append(OpSchema.FormalParameter(spec.name, f"TO{i}", spec.doc))
            constraints.append((f"TO{i}", list(spec.types), spec.name))
        attributes = [
            OpSchema.Attribute(a.name, onnx.helper.make_attribute(a.name, a.default), a.doc) for a in cls.attributes
        ]
        doc = (cls.__doc__ or cls.op_type).strip()
        schema = OpSchema(cls.op_type, cls.domain, QC_DOMAIN_VERSION, doc, inputs=params, outputs=outputs,
                          type_constraints=constraints, attributes=attributes)
        schema.set_type_and_shape_inference_function(cls._infer_types)
        return schema

    @classmethod
    def _infer_types(cls, ctx) -> None:
        """ONNX shape inference: output types and shapes from a trace of the decomposition
        (constant inputs must be initializers; otherwise nothing is inferred)."""
        from onnx import numpy_helper

        try:
            infos: list[TensorInfo | None] = []
            for i in range(ctx.get_num_inputs()):
                if not ctx.has_input(i):
                    infos.append(None)
                    continue
                tensor_type = ctx.get_input_type(i).tensor_type
                dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim]
                data = ctx.get_input_data(i)
                value = numpy_helper.to_array(data) if data is not None else None
                if any(d is None for d in dims) or not tensor_type.HasField("shape"):
                    return
                infos.append(TensorInfo(tuple(dims), onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type), value))
            attrs = {}
            for spec in cls.attributes:
                attr = ctx.get_attribute(spec.name)
                if attr is not None:
                    attrs[spec.name] = onnx.helper.get_attribute_value(attr)
            _, outputs = cls.trace(infos, attrs)
        except Exception:  # noqa: BLE001 - unknown shapes or constants: leave the outputs to the caller
            return
        for i, out in enumerate(outputs[: ctx.get_num_outputs()]):
            dtype = np.dtype("bool" if out.dtype == "bool" else out.dtype)
            ctx.set_output_type(i, onnx.helper.make_tensor_type_proto(onnx.helper.np_dtype_to_tensor_dtype(dtype), list(out.shape)))


_OPS: dict[tuple[str, str], type[IntegerOp]] = {}


def integer_op(cls: type[IntegerOp]) -> type[IntegerOp]:
    """Class decorator: register an integer op (its schema with ``onnx.defs`` too)."""
    if not cls.op_type:
        raise TypeError(f"{cls.__name__} has no op_type")
    key = cls.key()
    if key in _OPS and _OPS[key] is not cls:
        raise ValueError(f"integer op {cls.label()} is defined twice ({_OPS[key].__module__} and {cls.__module__})")
    _OPS[key] = cls
    if not onnx.defs.has(cls.op_type, cls.domain):
        onnx.defs.register_schema(cls.schema())
    return cls


@functools.cache
def _load_all() -> None:
    """Register every plugin's ops (a plugin that fails to load is an error). The built-in
    ops register when :mod:`qcompiler.integer` is imported (it imports :mod:`.ops`)."""
    from ..errors import UserError

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            cls = ep.load()
        except Exception as exc:
            raise UserError(f"integer op entry point '{ep.name} = {ep.value}' failed to load: {type(exc).__name__}: {exc}") from exc
        if not (isinstance(cls, type) and issubclass(cls, IntegerOp)):
            raise UserError(f"integer op entry point '{ep.name} = {ep.value}' is not an IntegerOp subclass")
        integer_op(cls)


def get_op(domain: str, op_type: str) -> type[IntegerOp] | None:
    """The integer op of ``domain``/``op_type`` (``""``/``ai.onnx`` are never integer ops), or None."""
    if domain in ("", "ai.onnx"):
        return None
    _load_all()
    return _OPS.get((domain, op_type))


def registered_ops() -> list[type[IntegerOp]]:
    _load_all()
    return sorted(_OPS.values(), key=lambda c: c.key())


def domains() -> set[str]:
    return {domain for domain, _ in (c.key() for c in registered_ops())}


def is_supported(domain: str, op_type: str) -> bool:
    """Whether the importer accepts ``op_type`` of ``domain``: a standard op qcompiler
    implements (:data:`qcompiler.opset.SUPPORTED_OPS`) or a registered integer op."""
    domain = "" if domain == "ai.onnx" else domain
    if domain == "":
        return op_type in SUPPORTED_OPS[""]
    return get_op(domain, op_type) is not None


def is_supported_domain(domain: str) -> bool:
    return domain in ("", "ai.onnx") or domain in domains()


_KERNELS: dict[type[IntegerOp], type] = {}


def reference_kernels() -> list[type]:
    """``onnx.reference`` kernels running each op's decomposition in numpy."""
    from onnx.reference.op_run import OpRun

    kernels = []
    for cls in registered_ops():
        if cls not in _KERNELS:
            def _run(self, *arrays, _op=cls, **attrs):
                return tuple(_op.evaluate(list(arrays), **attrs))

            _KERNELS[cls] = type(cls.op_type, (OpRun,), {"op_domain": cls.domain, "_run": _run})
        kernels.append(_KERNELS[cls])
    return kernels
