"""``IntGELU``: I-BERT's integer GELU (second-order polynomial erf)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..arith import fixed_point
from ..registry import Q_TYPES, Attribute, Example, Input, IntegerOp, Output, integer_op

#: I-BERT's erf polynomial: sign(x)·[a·(min(|x|, −b) + b)² + 1].
IBERT_ERF = (-0.2888, -1.769)


@dataclass(frozen=True)
class GeluConstants:
    q_b: int
    q_c: int
    q_one: int
    pre_shift: int
    multiplier: int
    shift: int


def gelu_constants(input_scale: float, output_scale: float, input_bits: int) -> GeluConstants:
    """Integer constants of IntGELU (see :class:`IntGELU`)."""
    a, b = IBERT_ERF
    s_erf = float(input_scale) / math.sqrt(2.0)
    q_b = math.floor(b / s_erf)  # negative
    s_l = a * s_erf * s_erf  # negative
    q_c = math.floor(1.0 / s_l)
    q_one = math.floor(1.0 / s_l)
    # Bound |x_c · (L + q_one)| to choose a pre-shift that keeps the product below 2^62.
    max_x = 2**input_bits
    max_l = q_b * q_b + abs(q_c)
    bound = max_x * (max_l + abs(q_one))
    pre_shift = max(0, bound.bit_length() - 31)
    real = float(input_scale) * s_l / 2.0 * 2.0**pre_shift / float(output_scale)
    multiplier, shift = fixed_point(real, 31)
    return GeluConstants(q_b, q_c, q_one, pre_shift, multiplier, shift)


@integer_op
class IntGELU(IntegerOp):
    """I-BERT integer GELU, GELU(x) = x * (1 + erf(x / sqrt 2)) / 2: q = x - x_zero_point;
    L = sign(q) * ((min(|q|, -q_b) + q_b)^2 + q_c) (erf at scale s_L = a * (s / sqrt 2)^2);
    G = q * (L + q_one) with q_one = floor(1 / s_L); y = clamp(rshift_round(rshift_round(G, p) * M,
    k) + y_zero_point) with M / 2^k = s * s_L * 2^p / (2 * s_y). (The 'lut' variant lowers to
    IntLookup instead.)"""

    op_type = "IntGELU"
    inputs = (
        Input("x", Q_TYPES), Input("x_zero_point", Q_TYPES, constant=True),
        Input("y_zero_point", Q_TYPES, "gives the output type", constant=True),
    )
    outputs = (Output("y", Q_TYPES),)
    attributes = (
        Attribute("input_scale", 1.0, "scale of x (compile-time; integer constants derive from it)"),
        Attribute("output_scale", 1.0, "scale of y (compile-time)"),
    )

    @classmethod
    def examples(cls, rng):
        x8 = rng.integers(-128, 128, (2, 16)).astype(np.int8)
        x16 = rng.integers(-32768, 32768, (2, 16)).astype(np.int16)
        return [
            Example((x8, np.int8(3), np.int8(-20)), {"input_scale": 0.04, "output_scale": 0.03}, name="int8"),
            Example((x16, np.int16(0), np.int16(0)), {"input_scale": 3e-4, "output_scale": 3e-4}, name="int16"),
        ]

    @classmethod
    def decompose(cls, b, inputs, attrs):
        x, zx, zy = inputs
        c = gelu_constants(attrs["input_scale"], attrs["output_scale"], x.storage.itemsize * 8)
        q = x - zx
        clipped = b.minimum(abs(q), -c.q_b) + c.q_b
        erf = b.sign(q) * (clipped * clipped + c.q_c)
        g = b.rshift_round(q * (erf + c.q_one), c.pre_shift)
        y = b.rshift_round(g * c.multiplier, c.shift) + zy
        return [b.clamp_cast(y, zy.storage)]
