"""Lowerings of the standard ops whose integer semantics matter: QuantizeLinear,
DequantizeLinear, Cast and Gather (the reference interpreter's exact semantics, not TVM's
frontend converters)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from .common import node_attr, relax_dtype
from .registry import lowers

if TYPE_CHECKING:
    from .lowering import Lowerer


@lowers("QuantizeLinear")
def quantize_linear(lo: Lowerer, node: ir.Node):
    R = lo.R
    x = lo.expr(node.inputs[0])
    scale = lo.need_const(node, 1, "y_scale")
    zp = lo.const(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
    out = relax_dtype(node.outputs[0].dtype)
    if zp is None:
        zp = np.zeros((), out)
    ndim = len(lo.shape(x))
    axis = node_attr(node, "axis", 1)
    block = node_attr(node, "block_size", 0)
    scale = _per_axis(scale, ndim, axis, block, lo.shape(x))
    zp = _per_axis(zp, ndim, axis, block, lo.shape(x))
    ftype = lo.dtype(x)
    v = lo.emit(R.divide(x, lo.relax.const(scale.astype(ftype), ftype)))
    zero = lo.relax.const(np.asarray(0, ftype), ftype)
    v = lo.emit(R.where(lo.emit(R.isnan(v)), zero, v))  # NaN quantizes to the zero point
    v = lo.emit(R.clip(v, -(2.0**30), 2.0**30))
    whole = lo.emit(R.floor(v))
    frac = lo.emit(R.subtract(v, whole))
    iw = lo.emit(R.astype(whole, "int32"))
    odd = lo.emit(R.equal(lo.emit(R.bitwise_and(iw, lo.relax.const(np.int32(1), "int32"))), lo.relax.const(np.int32(1), "int32")))
    half = lo.relax.const(np.asarray(0.5, ftype), ftype)
    up = lo.emit(R.logical_or(lo.emit(R.greater(frac, half)), lo.emit(R.logical_and(lo.emit(R.equal(frac, half)), odd))))
    r = lo.emit(R.add(iw, lo.emit(R.astype(up, "int32"))))  # round half to even, like np.rint
    r = lo.emit(R.add(r, lo.relax.const(zp.astype(np.int32), "int32")))
    return lo.clamp_cast(lo.i64(r), out)


@lowers("DequantizeLinear")
def dequantize_linear(lo: Lowerer, node: ir.Node):
    R = lo.R
    x = lo.expr(node.inputs[0])
    scale = lo.need_const(node, 1, "x_scale")
    zp = lo.const(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
    ndim = len(lo.shape(x))
    axis = node_attr(node, "axis", 1)
    block = node_attr(node, "block_size", 0)
    ftype = str(scale.dtype)
    out = relax_dtype(node.outputs[0].dtype) if node.outputs[0].dtype is not None else ftype
    v = lo.emit(R.astype(x, "float32"))
    if zp is not None and np.any(zp):
        zp = _per_axis(zp, ndim, axis, block, lo.shape(x)).astype(np.float32)
        v = lo.emit(R.subtract(v, lo.relax.const(zp, "float32")))
    scale = _per_axis(scale, ndim, axis, block, lo.shape(x))
    if ftype != "float32":
        v = lo.emit(R.astype(v, ftype))
    v = lo.emit(R.multiply(v, lo.relax.const(scale, ftype)))
    return v if out == ftype else lo.emit(R.astype(v, out))


def _per_axis(param: np.ndarray, ndim: int, axis: int, block: int, shape) -> np.ndarray:
    """A scale/zero point shaped to broadcast against the input (per-tensor, per-axis or blocked)."""
    param = np.asarray(param)
    if param.size == 1 and param.ndim <= 1:
        return param.reshape(())
    axis %= ndim
    if block:
        return np.repeat(param, block, axis=axis)[tuple(slice(0, s) for s in shape)]
    view = [1] * ndim
    view[axis] = param.size
    return param.reshape(view)


@lowers("Cast")
def cast(lo: Lowerer, node: ir.Node):
    """``astype``: float → int truncates toward zero like ONNX; int4 targets are held in int8."""
    x = lo.expr(node.inputs[0])
    to = relax_dtype(ir.DataType(node_attr(node, "to", 1)))
    return x if to == lo.dtype(x) else lo.emit(lo.R.astype(x, to))


@lowers("Gather")
def gather(lo: Lowerer, node: ir.Node):
    """ONNX ``Gather``: a negative index counts from the end of the axis. Out-of-range
    indices are clamped, so the compiled code never reads outside the table (TVM's
    default ``take`` would); runners refuse out-of-range index inputs before the call."""
    R = lo.R
    data, idx = lo.expr(node.inputs[0]), lo.expr(node.inputs[1])
    shape = lo.shape(data)
    axis = node_attr(node, "axis", 0) % len(shape)
    itype = lo.dtype(idx)
    if itype not in ("int32", "int64"):
        idx, itype = lo.emit(R.astype(idx, "int64")), "int64"
    size = lo.relax.const(np.array(shape[axis], itype), itype)
    zero = lo.relax.const(np.array(0, itype), itype)
    wrapped = lo.emit(R.where(lo.emit(R.less(idx, zero)), lo.emit(R.add(idx, size)), idx))
    return lo.emit(R.take(data, wrapped, axis=axis, mode="clip"))
