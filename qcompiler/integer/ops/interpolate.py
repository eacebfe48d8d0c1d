"""``IntInterpolate``: any element-wise function of a 16-bit tensor, as a table with linear interpolation."""

from __future__ import annotations

import numpy as np

from ..arith import int_range
from ..expr import DecompositionError
from ..registry import Q_TYPES, Attribute, Example, Input, IntegerOp, Output, integer_op

#: Table segments: 2^8 + 1 entries for a 16-bit input (segments of 256 input steps).
SEGMENT_BITS = 8


def interpolation_table(function, x_scale: float, x_zero: int, y_scale: float, y_zero: int, x_dtype, y_dtype,
                        segment_bits: int = SEGMENT_BITS) -> tuple[np.ndarray, int]:
    """``(table, shift)``: ``f`` at the ``2^segment_bits + 1`` knots of the input type's range,
    quantized to the output's parameters; ``shift`` = input bits − ``segment_bits``."""
    lo, hi = int_range(x_dtype)
    shift = (hi - lo + 1).bit_length() - 1 - segment_bits
    knots = lo + (np.arange(2**segment_bits + 1, dtype=np.float64) * 2**shift)
    y = np.round(function((knots - x_zero) * x_scale) / y_scale) + y_zero
    ylo, yhi = int_range(y_dtype)
    return np.clip(y, ylo, yhi).astype(y_dtype), shift


@integer_op
class IntInterpolate(IntegerOp):
    """y = T[i] + rshift_round((T[i + 1] - T[i]) * f, shift) with u = x - min(type(x)), i = u >> shift,
    f = u - (i << shift): an element-wise function of a 16-bit tensor tabulated at 2^(16 - shift) + 1
    knots and interpolated linearly between them (SiLU's sigmoid, tanh, exp on int16 activations,
    where IntLookup's 256-entry table needs 8-bit inputs)."""

    op_type = "IntInterpolate"
    inputs = (
        Input("x", ("tensor(int16)", "tensor(uint16)", "tensor(int8)", "tensor(uint8)"), "input"),
        Input("table", Q_TYPES, "values at the knots; gives the output type", constant=True),
    )
    outputs = (Output("y", Q_TYPES),)
    attributes = (Attribute("shift", 8, "input steps per segment, as a power of two"),)

    @classmethod
    def decompose(cls, b, inputs, attrs):
        x, table = inputs
        shift = int(attrs["shift"])
        low, high = int_range(x.storage)
        segments = (high - low + 1) >> shift
        values = table.value.reshape(-1)
        if shift < 0 or values.size != segments + 1:
            raise DecompositionError(f"the table has {values.size} entries; {x.storage} inputs in segments of "
                                     f"2^{shift} need {segments + 1}")
        u = x - low
        index = u >> shift
        fraction = u - (index << shift)
        stored = values.astype(table.storage)
        left = b.lookup(stored, index)
        right = b.lookup(stored, index + 1)
        y = left + b.rshift_round((right - left) * fraction, shift)
        return [b.clamp_cast(y, table.storage)]

    @classmethod
    def examples(cls, rng):
        x = rng.integers(-32768, 32768, (3, 16)).astype(np.int16)
        x[0, :4] = [-32768, 32767, 0, -1]

        def sigmoid(v):
            return 1.0 / (1.0 + np.exp(-v))

        table, shift = interpolation_table(sigmoid, 8.0 / 32768, 0, 1.0 / 32767, 0, np.int16, np.int16)
        silu_table, _ = interpolation_table(lambda v: v * sigmoid(v), 8.0 / 32768, 0, 8.0 / 32767, 0, np.int16, np.int16)
        return [Example((x, table), {"shift": shift}, name="sigmoid"), Example((x, silu_table), {"shift": shift}, name="silu")]
