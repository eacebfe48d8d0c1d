"""The reference interpreter: runs a model at any stage in numpy.

Standard ONNX ops run with ``onnx.reference`` (the ONNX project's own executable
specification); a few kernels are replaced where that implementation is wrong or
where qcompiler compiles for inference (see :data:`KERNELS`), and the integer ops
(``qcompiler`` domain and plugins) run their decompositions in numpy
(:mod:`qcompiler.integer`). Every target is checked bit-exactly against this interpreter.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun
from onnx.reference.ops.op_batch_normalization import BatchNormalization_14 as _TrainingBatchNorm
from onnx.reference.ops.op_dequantize_linear import DequantizeLinear_25
from onnx.reference.ops.op_loop import Loop as _OnnxLoop
from onnx.reference.ops.op_max_pool import MaxPool as _OnnxMaxPool
from onnx.reference.ops.op_quantize_linear import QuantizeLinear_25, _reshape_input

from .errors import InputError
from .integer import exact_int_matmul, reference_kernels
from .reference_conv import Conv, ConvInteger

#: (domain, op_type) -> OpRun class; overrides ``onnx.reference`` for that op.
KERNELS: dict[tuple[str, str], type[OpRun]] = {}


def register_kernel(cls: type[OpRun]) -> type[OpRun]:
    """Class decorator: make ``cls`` the reference kernel of its op.

    The op type is the class name; the domain is ``cls.op_domain`` (default
    domain if unset). Plugins use this to give their custom ops semantics.
    """
    domain = getattr(cls, "op_domain", "")
    KERNELS[(domain, cls.__name__)] = cls
    return cls


register_kernel(Conv)  # onnx.reference's im2col in Python: minutes per CNN image
register_kernel(ConvInteger)


@register_kernel
class GatherElements(OpRun):
    """``onnx.reference``'s GatherElements fails for rank > 1 indices; use take_along_axis."""

    def _run(self, data, indices, axis=None):
        axis = 0 if axis is None else int(axis) % data.ndim
        indices = np.where(indices < 0, indices + data.shape[axis], indices)
        # The output has the indices' shape: other axes of data may be longer.
        window = tuple(slice(None) if i == axis else slice(0, n) for i, n in enumerate(indices.shape))
        return (np.take_along_axis(data[window], indices, axis=axis),)


@register_kernel
class MaxPool(_OnnxMaxPool):
    """``onnx.reference``'s MaxPool fails on integer tensors (it pads with NaN); integer
    inputs run in float64 (exact for every value below 2^53) and are cast back."""

    def _run(self, x, *args, **kwargs):
        if np.issubdtype(x.dtype, np.integer):
            results = super()._run(x.astype(np.float64), *args, **kwargs)
            return (results[0].astype(x.dtype),) + tuple(results[1:])
        return super()._run(x, *args, **kwargs)


@register_kernel
class Dropout(OpRun):
    """qcompiler compiles for inference: Dropout is the identity whatever ``training_mode`` says."""

    def _run(self, x, *_, seed=None):
        if len(self.onnx_node.output) > 1:
            return x, np.ones(x.shape, dtype=bool)
        return (x,)


@register_kernel
class BatchNormalization(OpRun):
    """Inference BatchNormalization (running statistics) unless ``training_mode=1`` asks
    for the batch's own: ``onnx.reference`` also switches to batch statistics when an
    opset-9 ``momentum`` attribute is merely present, which no inference runtime does."""

    def _run(self, x, scale, bias, mean, var, epsilon=1e-5, momentum=None, training_mode=None, is_test=None, spatial=None):
        if training_mode:
            return _TrainingBatchNorm.eval(x, scale, bias, mean, var, epsilon=epsilon, momentum=momentum,
                                           training_mode=training_mode)
        shape = (-1,) + (1,) * (x.ndim - 2)
        eps = np.float32(1e-5 if epsilon is None else epsilon)
        y = scale.reshape(shape) * (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + eps) + bias.reshape(shape)
        extra = (mean, var)[: len(self.onnx_node.output) - 1]
        return (y.astype(x.dtype), *extra)


@register_kernel
class Loop(_OnnxLoop):
    """``Loop`` whose scan outputs stack the per-iteration values along a new first axis
    (``onnx.reference`` uses ``vstack``: scalars come out ``(N, 1)``, matrices concatenated)."""

    def _run(self, M, cond, *args, context=None, body=None, attributes=None, bindings=None):
        names_in = self.body.input_names
        carried = dict(zip(names_in[2:], args))
        for name, value in (context or {}).items():
            carried.setdefault(name, value)
        state = [args[i] for i in range(self.N)]
        scans: list[list[np.ndarray]] = [[] for _ in range(self.K)]
        step = 0
        while (cond is None or bool(cond)) and (M is None or step < int(M)):
            feeds = dict(carried)
            if names_in[0]:
                feeds[names_in[0]] = np.array(step, dtype=np.int64 if M is None else M.dtype)
            if names_in[1]:
                feeds[names_in[1]] = np.asarray(True if cond is None else cond)
            feeds.update(zip(names_in[2:], state))
            outputs = self._run_body(feeds, attributes=attributes, bindings=bindings)
            cond = outputs[0]
            state = list(outputs[1 : 1 + self.N])
            for k in range(self.K):
                scans[k].append(np.asarray(outputs[1 + self.N + k]))
            step += 1
        stacked = [np.stack(values) if values else np.empty((0,), np.float32) for values in scans]
        return self._check_and_fix_outputs(tuple(state) + tuple(stacked))


@register_kernel
class GlobalMaxPool(OpRun):
    """Max over every spatial axis (``onnx.reference`` reduces the wrong axes unless the
    input is 4-D)."""

    def _run(self, x):
        return (np.max(x, axis=tuple(range(2, x.ndim)), keepdims=True),)


@register_kernel
class DequantizeLinear(DequantizeLinear_25):
    """``onnx.reference`` lacks DequantizeLinear before opset 19; the newest version is a
    superset of the older ones (per-tensor, per-axis; plus blocks and int4/int16)."""


@register_kernel
class QuantizeLinear(QuantizeLinear_25):
    """Saturating QuantizeLinear for integer outputs: ``onnx.reference`` adds the zero
    point in int32 after casting, so values beyond int32 (a −3.4e38 attention mask)
    wrap around to the wrong end. Here: ``clamp(rint(x / s) + z)`` in float64."""

    def _run(self, x, y_scale, zero_point=None, axis=1, saturate=True, block_size=None, output_dtype=None, precision=None):
        dtype = zero_point.dtype if zero_point is not None else None
        if dtype is None and output_dtype:
            dtype = onnx.helper.tensor_dtype_to_np_dtype(output_dtype)
        dtype = np.dtype(dtype or np.uint8)
        if dtype.kind not in "iu":  # float8/float4/int4: onnx.reference is right
            args = (x, y_scale) if zero_point is None else (x, y_scale, zero_point)
            return super()._run(*args, axis=axis, saturate=saturate, block_size=block_size,
                                output_dtype=output_dtype, precision=precision)
        scale = _reshape_input(y_scale, x.shape, axis, block_size)
        ratio = (x / scale).astype(np.float64)
        if precision:
            ratio = x.astype(onnx.helper.tensor_dtype_to_np_dtype(precision)) / scale
        ratio = np.nan_to_num(np.rint(ratio), nan=0.0)
        if zero_point is not None:
            ratio = ratio + _reshape_input(zero_point, x.shape, axis, block_size).astype(np.float64)
        info = np.iinfo(dtype)
        return (np.clip(ratio, info.min, info.max).astype(dtype),)


def kernels() -> list[type[OpRun]]:
    """Every kernel the interpreter adds to ``onnx.reference``: the overrides of
    :data:`KERNELS` and the integer ops' decompositions."""
    return list(KERNELS.values()) + reference_kernels()


def _to_proto(model: ir.Model | onnx.ModelProto) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    return ir.to_proto(model)


@register_kernel
class MatMulInteger(OpRun):
    """Exact, BLAS-speed MatMulInteger (see :func:`qcompiler.integer.exact_int_matmul`)."""

    def _run(self, a, b, a_zero_point=None, b_zero_point=None):
        za = np.zeros((), np.int64) if a_zero_point is None else np.asarray(a_zero_point, np.int64)
        zb = np.zeros((), np.int64) if b_zero_point is None else np.asarray(b_zero_point, np.int64)
        if za.ndim == 1 and za.size > 1:  # per row
            za = za.reshape(-1, 1)
        if zb.ndim == 1 and zb.size > 1:  # per column
            zb = zb.reshape((1,) * (np.ndim(b) - 1) + (-1,))
        acc = exact_int_matmul(np.asarray(a, np.int64) - za, np.asarray(b, np.int64) - zb)
        return (acc.astype(np.int32),)


class ReferenceInterpreter:
    """Executes a model with numpy.

    >>> outputs = ReferenceInterpreter(model).run({"x": x})
    """

    def __init__(self, model: ir.Model | onnx.ModelProto):
        proto = _to_proto(model)
        self._graph = proto.graph
        initializers = {init.name for init in proto.graph.initializer}
        self.inputs = {
            vi.name: vi for vi in proto.graph.input if vi.name not in initializers
        }
        self.output_names = [vi.name for vi in proto.graph.output]
        self._evaluator = ReferenceEvaluator(proto, new_ops=kernels())

    @property
    def input_names(self) -> list[str]:
        return list(self.inputs)

    def run(
        self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        """Run the model; returns ``{name: array}`` for ``outputs`` (default: graph outputs).

        ``outputs`` may name any intermediate value.
        """
        feeds = self._check_feeds(feeds)
        names = list(outputs) if outputs is not None else self.output_names
        if set(names) <= set(self.output_names):
            results = self._evaluator.run(names, feeds)
            return dict(zip(names, results))
        everything = self._evaluator.run(None, feeds, intermediate=True)
        missing = [n for n in names if n not in everything]
        if missing:
            raise KeyError(f"no value named {missing[0]!r} in the model")
        return {n: everything[n] for n in names}

    def run_all(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Every value the model computes (inputs, initializers and node outputs)."""
        return dict(self._evaluator.run(None, self._check_feeds(feeds), intermediate=True))

    def _check_feeds(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return check_feeds(self.inputs.values(), feeds)


def check_feeds(
    inputs: Iterable[onnx.ValueInfoProto], feeds: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Validate ``feeds`` against the graph inputs; raise :class:`InputError` naming the problem."""
    inputs = list(inputs)
    expected = {vi.name for vi in inputs}
    unknown = sorted(set(feeds) - expected)
    if unknown:
        raise InputError(f"unknown input {unknown[0]!r}; the model's inputs are {sorted(expected)}")
    checked = {}
    for vi in inputs:
        if vi.name not in feeds:
            raise InputError(f"missing input {vi.name!r}")
        array = np.asarray(feeds[vi.name])
        tensor_type = vi.type.tensor_type
        want_dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
        if array.dtype != want_dtype:
            raise InputError(
                f"input {vi.name!r} has dtype {array.dtype}, the model expects {np.dtype(want_dtype)}"
            )
        if tensor_type.HasField("shape"):
            dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim]
            if len(dims) != array.ndim or any(
                d is not None and d != s for d, s in zip(dims, array.shape)
            ):
                shown = "x".join("?" if d is None else str(d) for d in dims)
                raise InputError(
                    f"input {vi.name!r} has shape {'x'.join(map(str, array.shape)) or 'scalar'}, "
                    f"the model expects {shown or 'scalar'}"
                )
        checked[vi.name] = array
    return checked
