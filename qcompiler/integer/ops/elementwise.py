"""``Requantize``, ``IntAdd``, ``IntMul``: fixed-point rescaling, scale-aligned adds and products."""

from __future__ import annotations

import numpy as np

from ..arith import channel_view, fixed_point, fixed_point_array
from ..registry import ACC_TYPES, ANY_INT, Q_TYPES, Attribute, Example, Input, IntegerOp, Output, integer_op

_BOUNDS = (
    Attribute("qmin", -(2**31), "lower clamp (intersected with the output type's range); fuses ReLU"),
    Attribute("qmax", 2**31 - 1, "upper clamp (intersected with the output type's range); fuses ReLU6"),
)


@integer_op
class Requantize(IntegerOp):
    """y = clamp(rshift_round((x - x_zero_point) * multiplier, shift) + zero_point, qmin, qmax), exact
    in int64 (|multiplier| < 2^31, 0 <= shift <= 62). multiplier/shift are scalars or 1-D along
    'axis'. The output type is zero_point's."""

    op_type = "Requantize"
    inputs = (
        Input("x", ANY_INT, "integer accumulator or quantized tensor"),
        Input("multiplier", ("tensor(int32)",), "fixed-point multiplier M", constant=True),
        Input("shift", ("tensor(int32)",), "right shift k", constant=True),
        Input("zero_point", Q_TYPES, "output zero point (scalar)", constant=True),
        Input("x_zero_point", ANY_INT, "input zero point (scalar), default 0", optional=True, constant=True),
    )
    outputs = (Output("y", Q_TYPES, "requantized tensor"),)
    attributes = (Attribute("axis", 1, "channel axis of per-channel multiplier/shift"), *_BOUNDS)

    @classmethod
    def examples(cls, rng):
        acc = rng.integers(-(2**20), 2**20, (2, 3, 8)).astype(np.int32)
        m, k = fixed_point_array(rng.uniform(1e-5, 1e-3, 8))
        x8 = rng.integers(-128, 128, (4, 8)).astype(np.int8)
        return [
            Example((acc, m, k, np.int8(-3)), {"axis": 2}, name="per-channel"),
            Example((acc, np.int32(1 << 29), np.int32(40), np.uint8(7), np.int32(5)), {"qmin": 7}, name="relu"),
            Example((x8, np.int32(3 << 28), np.int32(29), np.int16(0), np.int8(1)), name="int8-to-int16"),
        ]

    @classmethod
    def decompose(cls, b, inputs, attrs):
        x, m, k, zp, x_zp = inputs
        rank = max(len(x.shape), 1)
        v = x - x_zp if x_zp is not None else x
        product = v * b.channel(m.value, rank, attrs["axis"])
        y = b.rshift_round(product, channel_view(k.value, rank, attrs["axis"])) + zp
        return [b.clamp_cast(y, zp.storage, attrs["qmin"], attrs["qmax"])]


def add_constants(s_a: float, s_b: float, s_y: float, max_bits: int = 30) -> tuple[int, int, int]:
    """``(Ma, Mb, k)`` with ``Ma/2^k ≈ s_a/s_y`` and ``Mb/2^k ≈ s_b/s_y`` on a common shift."""
    big = max(s_a, s_b) / s_y
    _, k = fixed_point(big, max_bits)
    return round(s_a / s_y * 2.0**k), round(s_b / s_y * 2.0**k), k


@integer_op
class IntAdd(IntegerOp):
    """y = clamp(rshift_round((a - a_zero_point) * a_multiplier + (b - b_zero_point) * b_multiplier,
    shift) + y_zero_point, qmin, qmax): a residual/elementwise add of two quantized tensors with
    different scales, aligned on one fixed-point grid. Numpy broadcasting."""

    op_type = "IntAdd"
    inputs = (
        Input("a", ANY_INT, "quantized a"), Input("a_zero_point", ANY_INT, "scalar", constant=True),
        Input("b", ANY_INT, "quantized b (or int32 constant)"), Input("b_zero_point", ANY_INT, "scalar", constant=True),
        Input("y_zero_point", Q_TYPES, "output zero point (scalar); gives the output type", constant=True),
    )
    outputs = (Output("y", Q_TYPES, "quantized sum"),)
    attributes = (Attribute("a_multiplier", 1, "Ma"), Attribute("b_multiplier", 1, "Mb"), Attribute("shift", 0, "k"), *_BOUNDS)

    @classmethod
    def examples(cls, rng):
        a = rng.integers(-128, 128, (2, 4, 8)).astype(np.int8)
        b = rng.integers(0, 256, (1, 4, 8)).astype(np.uint8)
        ma, mb, k = add_constants(0.03, 0.02, 0.04)
        return [Example((a, np.int8(2), b, np.uint8(128), np.int8(-1)), {"a_multiplier": ma, "b_multiplier": mb, "shift": k})]

    @classmethod
    def decompose(cls, b, inputs, attrs):
        a, za, x, zb, zy = inputs
        total = (a - za) * int(attrs["a_multiplier"]) + (x - zb) * int(attrs["b_multiplier"])
        y = b.rshift_round(total, int(attrs["shift"])) + zy
        return [b.clamp_cast(y, zy.storage, attrs["qmin"], attrs["qmax"])]


@integer_op
class IntMul(IntegerOp):
    """y = clamp(rshift_round(rshift_round((a - a_zero_point) * (b - b_zero_point), pre_shift) *
    multiplier, shift) + y_zero_point, qmin, qmax). Numpy broadcasting."""

    op_type = "IntMul"
    inputs = (
        Input("a", ANY_INT), Input("a_zero_point", ANY_INT, constant=True),
        Input("b", ANY_INT), Input("b_zero_point", ANY_INT, constant=True),
        Input("y_zero_point", Q_TYPES, "gives the output type", constant=True),
    )
    outputs = (Output("y", Q_TYPES),)
    attributes = (Attribute("multiplier", 1, "M"), Attribute("shift", 0, "k"), Attribute("pre_shift", 0, "p"), *_BOUNDS)

    @classmethod
    def examples(cls, rng):
        a = rng.integers(-128, 128, (2, 8)).astype(np.int8)
        b = rng.integers(-32768, 32768, (2, 8)).astype(np.int16)
        m, k = fixed_point(0.02 * 0.001 * 2**9 / 0.05)
        return [Example((a, np.int8(0), b, np.int16(0), np.int8(0)), {"multiplier": m, "shift": k, "pre_shift": 9})]

    @classmethod
    def decompose(cls, b, inputs, attrs):
        a, za, x, zb, zy = inputs
        product = b.rshift_round((a - za) * (x - zb), int(attrs["pre_shift"])) * int(attrs["multiplier"])
        y = b.rshift_round(product, int(attrs["shift"])) + zy
        return [b.clamp_cast(y, zy.storage, attrs["qmin"], attrs["qmax"])]


__all__ = ["ACC_TYPES", "IntAdd", "IntMul", "Requantize", "add_constants"]
