"""Operators of the ``qcompiler`` domain: schemas and bit-exact reference kernels.

These are the integer-stage ops that ONNX lacks. Each op has one schema (registered
with ``onnx.defs`` so the checker and tools know it), one numpy kernel here (the
semantics every target must reproduce bit for bit), and one lowering per target.
All arithmetic is exact integer arithmetic in int64.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx.defs
from onnx.defs import OpSchema
from onnx.reference.op_run import OpRun

from .interpreter import register_kernel
from .opset import QC_DOMAIN, QC_DOMAIN_VERSION

_INT_TYPES = ["tensor(int8)", "tensor(uint8)", "tensor(int16)", "tensor(uint16)"]
_ACC_TYPES = ["tensor(int32)", "tensor(int64)"]


def _register(name: str, doc: str, inputs, outputs, constraints, attributes=()) -> None:
    if onnx.defs.has(name, QC_DOMAIN):
        return
    schema = OpSchema(
        name,
        QC_DOMAIN,
        QC_DOMAIN_VERSION,
        doc,
        inputs=[OpSchema.FormalParameter(n, t, d) for n, t, d in inputs],
        outputs=[OpSchema.FormalParameter(n, t, d) for n, t, d in outputs],
        type_constraints=constraints,
        attributes=list(attributes),
    )
    onnx.defs.register_schema(schema)


def _attr(name: str, default, doc: str) -> OpSchema.Attribute:
    return OpSchema.Attribute(name, onnx.helper.make_attribute(name, default), doc)


def int_range(dtype: np.dtype) -> tuple[int, int]:
    info = np.iinfo(dtype)
    return int(info.min), int(info.max)


def rounding_right_shift(x: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """``floor((x + 2^(shift-1)) / 2^shift)`` in int64: round half up; ``shift = 0`` is exact."""
    x = x.astype(np.int64)
    shift = np.asarray(shift, dtype=np.int64)
    half = np.where(shift > 0, np.left_shift(np.int64(1), np.maximum(shift - 1, 0)), 0)
    return np.right_shift(x + half, shift)


def channel_view(param: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    """Broadcast a scalar or 1-D per-channel parameter along ``axis`` of an ``ndim`` tensor."""
    param = np.asarray(param)
    if param.ndim == 0 or param.size == 1:
        return param.reshape(())
    shape = [1] * ndim
    shape[axis % ndim] = param.size
    return param.reshape(shape)


def requantize(acc, multiplier, shift, zero_point, axis: int = 1) -> np.ndarray:
    """``y = clamp(((acc·M + 2^(k-1)) >> k) + z, qmin, qmax)``; see :class:`Requantize`."""
    acc = np.asarray(acc)
    out_dtype = np.asarray(zero_point).dtype
    m = channel_view(multiplier, acc.ndim, axis).astype(np.int64)
    k = channel_view(shift, acc.ndim, axis).astype(np.int64)
    y = rounding_right_shift(acc.astype(np.int64) * m, k) + np.asarray(zero_point, np.int64)
    lo, hi = int_range(out_dtype)
    return np.clip(y, lo, hi).astype(out_dtype)


_register(
    "Requantize",
    "y = clamp(((x * multiplier + 2^(shift-1)) >> shift) + zero_point, qmin, qmax), exact in int64. "
    "The product uses 0 <= multiplier < 2^31 and 0 <= shift <= 62 so it never overflows int64; "
    "'>>' is an arithmetic shift (floor), so halves round towards +inf. multiplier and shift are "
    "scalars or 1-D along 'axis'; the output type is zero_point's.",
    inputs=[
        ("x", "T1", "integer accumulator"),
        ("multiplier", "tensor(int32)", "fixed-point multiplier M"),
        ("shift", "tensor(int32)", "right shift k"),
        ("zero_point", "T2", "output zero point (scalar)"),
    ],
    outputs=[("y", "T2", "requantized tensor")],
    constraints=[("T1", _ACC_TYPES, "accumulator"), ("T2", _INT_TYPES, "quantized")],
    attributes=[_attr("axis", 1, "channel axis of per-channel multiplier/shift")],
)


@register_kernel
class Requantize(OpRun):
    op_domain = QC_DOMAIN

    def _run(self, x, multiplier, shift, zero_point, axis=1):
        return (requantize(x, multiplier, shift, zero_point, axis),)
