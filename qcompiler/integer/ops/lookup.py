"""``IntLookup``: any element-wise function of an 8-bit tensor, tabulated at compile time."""

from __future__ import annotations

import numpy as np

from ..arith import int_range
from ..expr import DecompositionError
from ..registry import Q_TYPES, Example, Input, IntegerOp, Output, integer_op


@integer_op
class IntLookup(IntegerOp):
    """y = table[x - min(type(x))]: any elementwise function of an 8-bit tensor, tabulated at compile time."""

    op_type = "IntLookup"
    inputs = (
        Input("x", ("tensor(int8)", "tensor(uint8)"), "8-bit input"),
        Input("table", Q_TYPES, "256 entries", constant=True),
    )
    outputs = (Output("y", Q_TYPES),)

    @classmethod
    def examples(cls, rng):
        x = rng.integers(-128, 128, (3, 16)).astype(np.int8)
        table = np.clip(np.round(np.tanh(np.arange(-128, 128) / 40.0) * 127), -128, 127).astype(np.int8)
        u = rng.integers(0, 256, (3, 16)).astype(np.uint8)
        return [Example((x, table), name="tanh"), Example((u, rng.integers(-32768, 32768, 256).astype(np.int16)), name="uint8-to-int16")]

    @classmethod
    def decompose(cls, b, inputs, attrs):
        x, table = inputs
        low, high = int_range(x.storage)
        if table.value.size != high - low + 1:
            raise DecompositionError(f"the table has {table.value.size} entries for {x.storage} inputs ({high - low + 1} values)")
        return [b.cast(b.lookup(table.value.astype(table.storage), x - low), table.storage)]
