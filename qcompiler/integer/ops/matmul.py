"""``IntMatMul``: an exact integer matmul for operands MatMulInteger (8-bit only) does not take."""

from __future__ import annotations

import numpy as np

from ..registry import ACC_TYPES, Q_TYPES, Attribute, Example, Input, IntegerOp, Output, integer_op


@integer_op
class IntMatMul(IntegerOp):
    """y = (a - a_zero_point) @ (b - b_zero_point) accumulated exactly and returned as acc_type
    (int32 or int64); for int16 activations where MatMulInteger (8-bit only) does not apply. The
    int32 form promises no overflow (the compiler checks the bound)."""

    op_type = "IntMatMul"
    inputs = (
        Input("a", Q_TYPES), Input("b", Q_TYPES + ("tensor(int4)",)),
        Input("a_zero_point", Q_TYPES, "scalar or per row", optional=True, constant=True),
        Input("b_zero_point", Q_TYPES + ("tensor(int4)",), "scalar or per column", optional=True, constant=True),
    )
    outputs = (Output("y", ACC_TYPES, "accumulator"),)
    attributes = (Attribute("acc_type", "int32", "int32 or int64"),)

    @classmethod
    def examples(cls, rng):
        a16 = rng.integers(-32768, 32768, (2, 4, 16)).astype(np.int16)
        w = rng.integers(-127, 128, (16, 8)).astype(np.int8)
        a8 = rng.integers(-128, 128, (3, 16)).astype(np.int8)
        b8 = rng.integers(-128, 128, (16, 5)).astype(np.int8)
        return [
            Example((a16, w, np.int16(3)), {"acc_type": "int32"}, weights=(1,), name="int16-activations"),
            Example((a8, b8, np.int8(1), np.int8(-2)), {"acc_type": "int32"}, name="two-activations"),
        ]

    @classmethod
    def decompose(cls, b, inputs, attrs):
        a, x, za, zb = inputs
        za = np.zeros((), np.int64) if za is None else za.value
        zb = np.zeros((), np.int64) if zb is None else zb.value
        return [b.cast(b.matmul(a, x, za, zb), np.dtype(attrs["acc_type"]), checked=True)]
