"""``IntSoftmax``: integer softmax with an I-BERT, linear (HyQ-style) or table exponent."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..arith import fixed_point
from ..expr import DecompositionError
from ..registry import Q_TYPES, Attribute, Example, Input, IntegerOp, Output, integer_op

#: I-BERT's second-order polynomial for exp on (−ln2, 0]: a·(p + b)² + c.
IBERT_EXP = (0.3585, 1.353, 0.344)
#: Fraction bits of the normalised probability before requantization.
SOFTMAX_FRAC_BITS = 16
#: Fraction bits of the base-2 exponent in the linear (shift + linear interpolation) variant.
LINEAR_FRAC_BITS = 16
#: Fraction bits of the tabulated exponent (variant ``lut``).
LUT_FRAC_BITS = 22
VARIANTS = ("ibert", "linear", "lut")


@dataclass(frozen=True)
class SoftmaxConstants:
    q_ln2: int
    q_b: int
    q_c: int
    log2e_multiplier: int
    log2e_shift: int
    out_multiplier: int
    out_shift: int


def softmax_constants(input_scale: float, output_scale: float) -> SoftmaxConstants:
    """Integer constants of IntSoftmax, derived from the scales (see :class:`IntSoftmax`)."""
    a, b, c = IBERT_EXP
    s = float(input_scale)
    q_ln2 = max(1, math.floor(math.log(2.0) / s))
    q_b = math.floor(b / s)
    q_c = math.floor(c / (a * s * s))
    m_l2e, k_l2e = fixed_point(s * math.log2(math.e) * 2.0**LINEAR_FRAC_BITS, 31)
    m_out, k_out = fixed_point(2.0**-SOFTMAX_FRAC_BITS / float(output_scale), 31)
    return SoftmaxConstants(q_ln2, q_b, q_c, m_l2e, k_l2e, m_out, k_out)


def exp_table(input_scale: float) -> np.ndarray:
    """The ``lut`` variant's exponent: ``round(exp(d·s) · 2^22)`` for ``d`` in [−255, 0]."""
    return np.round(np.exp(np.arange(-255, 1) * float(input_scale)) * 2.0**LUT_FRAC_BITS).astype(np.int64)


def exponent(b, d, variant: str, c: SoftmaxConstants, input_scale: float):
    """``e ≈ exp(d · s) · 2^F`` of ``d ≤ 0`` by the variant's integer formula."""
    if variant == "ibert":  # shift by z = ⌊−d / q_ln2⌋, polynomial on the rest
        z = b.minimum(b.floordiv(-d, c.q_ln2), 62)
        p = d + z * c.q_ln2 + c.q_b
        return b.maximum(p * p + c.q_c, 0) >> z
    if variant == "linear":  # 2^t ≈ 2^⌊t⌋ · (1 + frac t), t = d·s·log2 e
        t = b.rshift_round(d * c.log2e_multiplier, c.log2e_shift)
        whole = t >> LINEAR_FRAC_BITS
        mantissa = t - (whole << LINEAR_FRAC_BITS) + (1 << LINEAR_FRAC_BITS)
        return mantissa >> b.minimum(-whole, 62)
    if variant == "lut":
        return b.lookup(exp_table(input_scale), d + 255)
    raise DecompositionError(f"unknown IntSoftmax variant '{variant}' (variants: {', '.join(VARIANTS)})")


@integer_op
class IntSoftmax(IntegerOp):
    """Integer softmax along 'axis': d = x - max(x) (the zero point cancels); e = iexp(d) by
    I-BERT's shift + second-order polynomial ('ibert'), by shift + linear interpolation ('linear',
    HyQ-style) or by a 256-entry table for 8-bit inputs ('lut'); P = floor(e * 2^16 / sum(e))
    (probability with 16 fraction bits); y = clamp(rshift_round(P * M, k) + y_zero_point) with
    M / 2^k = 2^-16 / output_scale. With a mask (bool, broadcast to x), positions where it is
    false take no part in the max and the sum and get probability exactly 0 (y = y_zero_point),
    whatever their scores: an exact attention mask."""

    op_type = "IntSoftmax"
    inputs = (
        Input("x", Q_TYPES), Input("x_zero_point", Q_TYPES, constant=True),
        Input("y_zero_point", Q_TYPES, "gives the output type", constant=True),
        Input("mask", ("tensor(bool)",), "true where a position takes part (optional)", optional=True),
    )
    outputs = (Output("y", Q_TYPES),)
    attributes = (
        Attribute("input_scale", 1.0, "scale of x (compile-time; integer constants derive from it)"),
        Attribute("output_scale", 1.0, "scale of y (compile-time)"),
        Attribute("axis", -1, ""),
        Attribute("variant", "ibert", "ibert | linear | lut"),
    )

    @classmethod
    def examples(cls, rng):
        x8 = rng.integers(-128, 128, (2, 3, 12)).astype(np.int8)
        causal = np.tril(np.ones((3, 12), bool), k=8)  # [query, key]: the first row sees 9 keys, ...
        causal[2, :] = False  # a row with nothing to attend to: all zeros
        x16 = rng.integers(-4000, 4000, (2, 12)).astype(np.int16)
        return [
            *(Example((x8, np.int8(0), np.uint8(0)), {"input_scale": 0.06, "output_scale": 1 / 256, "variant": v}, name=v)
              for v in VARIANTS),
            Example((x16, np.int16(0), np.int16(0)), {"input_scale": 0.002, "output_scale": 1 / 32767, "variant": "linear"},
                    name="int16"),
            Example((x8, np.int8(0), np.int8(-128)), {"input_scale": 0.06, "output_scale": 1 / 256, "axis": 1}, name="middle-axis"),
            *(Example((x8, np.int8(0), np.uint8(0), causal), {"input_scale": 0.06, "output_scale": 1 / 256, "variant": v},
                      name=f"causal-{v}") for v in VARIANTS),
        ]

    @classmethod
    def decompose(cls, b, inputs, attrs):
        x, _, zy, keep = inputs
        variant = attrs["variant"]
        if variant == "lut" and x.storage.itemsize != 1:
            raise DecompositionError("variant 'lut' needs 8-bit inputs")
        if zy.value.size != 1:
            raise DecompositionError(f"y_zero_point must be per-tensor, it has {zy.value.size} values")
        axis = int(attrs["axis"]) % max(len(x.shape), 1)
        c = softmax_constants(attrs["input_scale"], attrs["output_scale"])
        if keep is None:
            d = b.bound(x - b.rmax(x, axis), x.lo - x.hi, 0)  # x − max x ≤ 0
            e = exponent(b, d, variant, c, attrs["input_scale"])
        else:  # masked positions: out of the max, e = 0
            if keep.dtype != "bool":
                raise DecompositionError("the mask must be a bool tensor")
            top = b.rmax(b.where(keep, x, x.lo), axis)
            d = b.bound(b.where(keep, x - top, x.lo - x.hi), x.lo - x.hi, 0)
            e = b.where(keep, exponent(b, d, variant, c, attrs["input_scale"]), 0)
        total = b.maximum(b.sum(e, axis), 1)
        prob = b.bound(b.floordiv(e << SOFTMAX_FRAC_BITS, total), 0, 1 << SOFTMAX_FRAC_BITS)
        y = b.rshift_round(prob * c.out_multiplier, c.out_shift) + zy
        return [b.clamp_cast(y, zy.storage)]
