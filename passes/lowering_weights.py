"""The integer weights of a linear op (MatMul, Gemm, Conv) for ``lower-integer``.

A quantized weight arrives as ``DequantizeLinear(q, s, z)`` over a constant ``q``. The
lowering needs it as integers ``w`` with one scale and zero point per *output channel*,
``W ≈ (w − z)·s``:

* **symmetric** (``z = 0``) and **asymmetric** weights (``z ≠ 0``, per tensor or per
  channel) keep their integers; the zero point goes to the integer matmul/convolution,
  which subtracts it exactly as it does the activation's. ``uint8`` weights are moved to
  ``int8`` (``w − 128``, ``z − 128``: the same differences).
* **per-group** weights (``block_size``: one scale per block of the accumulation axis,
  int4 groups of 32/64/128) cannot be summed on one integer grid as they are. They are
  re-expressed per output channel on a finer grid,
  ``w' = round(W / s'),  s' = max|W[:, n]| / (2^(b−1) − 1)``, with the widest ``b ≤ 16``
  whose accumulator bound still fits int32 (at least 10 bits): the added error,
  ``≤ s'/2`` per weight, is ``2^(b−1)/7`` times below the int4 grid's own ``s_g/2``.
  The report's ``decisions`` records the width and the error.
* a per-channel axis that is not the output channel (a MatMul weight scaled along its
  rows) has no per-channel integer form: refused by name.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from qcompiler.graph import const_array
from qcompiler.qdq import constant_value, qdq_source

from .lowering_common import Refuse


@dataclasses.dataclass
class IntegerWeight:
    """``W ≈ (data − zero)·scale`` along the output channel ``axis`` of ``data``."""

    data: np.ndarray
    scale: np.ndarray  # 1-D: one per output channel, or one for all
    zero: np.ndarray  # same shape as scale, data's dtype
    axis: int
    regrid: dict | None = None  # how per-group weights were re-expressed

    @property
    def asymmetric(self) -> bool:
        return bool(np.any(self.zero != 0))

    def centred(self) -> np.ndarray:
        """``data − zero`` in int64, zero broadcast along ``axis``."""
        shape = [1] * self.data.ndim
        shape[self.axis] = -1
        return self.data.astype(np.int64) - self.zero.astype(np.int64).reshape(shape if self.zero.size > 1 else ())


def output_channel_axis(node: ir.Node) -> int:
    """The axis of the weight that indexes output channels."""
    if node.op_type == "Gemm":
        trans_b = node.attributes.get("transB")
        return 0 if trans_b is not None and trans_b.as_int() else 1
    if node.op_type == "ConvTranspose":
        return 1
    if node.op_type == "Conv":
        return 0
    return -1  # MatMul: [..., K, N]


def integer_weight(node: ir.Node, x_range: float) -> IntegerWeight:
    """The weight of ``node`` as integers per output channel (see the module docstring)."""
    value = node.inputs[1]
    source = qdq_source(value)
    data = const_array(source[0]) if source is not None else None
    if data is None:
        raise Refuse("linear op without a constant quantized weight")
    _, scale, zero, dq = source
    axis = output_channel_axis(node) % data.ndim
    if "block_size" in dq.attributes and dq.attributes["block_size"].as_int() > 0:
        return _regrid(node, constant_value(value), axis, x_range)
    scale = np.asarray(scale, np.float64).reshape(-1)
    zero = np.asarray(zero).reshape(-1)
    if scale.size > 1:
        dq_axis = dq.attributes["axis"].as_int() if "axis" in dq.attributes else 1
        if dq_axis % data.ndim != axis:
            raise Refuse(f"weight scales along axis {dq_axis}, not the output channels (axis {axis})")
    if data.dtype == np.uint8:
        data = (data.astype(np.int16) - 128).astype(np.int8)
        zero = (zero.astype(np.int16) - 128).astype(np.int8)
    if data.dtype.kind not in "iu" and data.dtype.name != "int4":
        raise Refuse(f"weights of type {data.dtype.name}")
    return IntegerWeight(data, scale, zero.astype(data.dtype), axis)


def _regrid(node: ir.Node, weight: np.ndarray, axis: int, x_range: float) -> IntegerWeight:
    if node.op_type not in ("MatMul", "Gemm") or weight is None or weight.ndim != 2:
        raise Refuse("per-group (blocked) weights lower only for 2-D MatMul/Gemm weights")
    rows = np.moveaxis(weight, axis, 0)  # [channels, K]
    peak = np.max(np.abs(rows), axis=1)
    for bits in range(16, 9, -1):
        top = 2 ** (bits - 1) - 1
        scale = np.where(peak > 0, peak / top, 1.0)
        data = np.clip(np.round(rows / scale[:, None]), -top, top)
        if x_range * float(np.abs(data).sum(axis=1).max(initial=0)) < 2**31:
            break
    error = float(np.max(np.abs(data * scale[:, None] - rows), initial=0.0))
    regrid = {"bits": bits, "max_abs_error": error, "relative_to_peak": error / float(peak.max(initial=0) or 1.0)}
    data = np.moveaxis(data, 0, axis).astype(np.int16)
    return IntegerWeight(data, scale, np.zeros_like(data, shape=scale.shape), axis, regrid)
