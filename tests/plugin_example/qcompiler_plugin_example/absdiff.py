"""``IntAbsDiff``: an integer op defined once, in one file, outside qcompiler.

``y = clamp(rshift_round(|(a − za) − (b − zb)| · M, k) + zy)``: the absolute difference of
two quantized tensors on one grid, requantized to the output's scale. The decomposition
below is all qcompiler needs: the reference interpreter runs it in numpy, the TVM
targets render it to Relax, fpga-sim to C, and the NPU cost model counts it.
"""

from __future__ import annotations

import numpy as np

from qcompiler.integer import Attribute, Example, Input, IntegerOp, Output, Q_TYPES, fixed_point


class IntAbsDiff(IntegerOp):
    """y = clamp(rshift_round(|(a - a_zero_point) - (b - b_zero_point)| * multiplier, shift) + y_zero_point)."""

    domain = "qcompiler_plugin_example"
    op_type = "IntAbsDiff"
    inputs = (
        Input("a", Q_TYPES), Input("a_zero_point", Q_TYPES, constant=True),
        Input("b", Q_TYPES), Input("b_zero_point", Q_TYPES, constant=True),
        Input("y_zero_point", Q_TYPES, "gives the output type", constant=True),
    )
    outputs = (Output("y", Q_TYPES),)
    attributes = (Attribute("multiplier", 1, "M"), Attribute("shift", 0, "k"))

    @classmethod
    def decompose(cls, b, inputs, attrs):
        a, za, x, zb, zy = inputs
        distance = abs((a - za) - (x - zb))
        y = b.rshift_round(distance * int(attrs["multiplier"]), int(attrs["shift"])) + zy
        return [b.clamp_cast(y, zy.storage)]

    @classmethod
    def examples(cls, rng):
        a = rng.integers(-128, 128, (2, 8)).astype(np.int8)
        x = rng.integers(-128, 128, (1, 8)).astype(np.int8)
        m, k = fixed_point(0.6)
        return [Example((a, np.int8(3), x, np.int8(-2), np.uint8(0)), {"multiplier": m, "shift": k})]
