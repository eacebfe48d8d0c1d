"""``IntRMSNorm``: integer RMSNorm (LLaMA-style: no mean, no bias), the RMS with fraction bits."""

from __future__ import annotations


import numpy as np

from ..arith import fixed_point
from ..expr import DecompositionError
from ..registry import Q_TYPES, Attribute, Example, Input, IntegerOp, Output, integer_op

#: Fraction bits of the normalised value x / rms(x).
RMSNORM_FRAC_BITS = 15
#: Most fraction bits of the RMS itself (fewer where N·max|x|² leaves no room in int64).
MAX_SIGMA_FRAC_BITS = 8


def sigma_frac_bits(channels: int, input_bits: int) -> int:
    """Fraction bits ``G`` of the RMS such that ``Σq² · 4^G`` stays below 2^62 for
    ``channels`` values of ``input_bits``-bit inputs (``|q| ≤ 2^input_bits``)."""
    headroom = 62 - (2 * input_bits + max(channels, 1).bit_length())
    return max(0, min(MAX_SIGMA_FRAC_BITS, headroom // 2))


def rmsnorm_constants(gamma, input_scale: float, output_scale: float, epsilon: float, frac_bits: int):
    """Per-channel ``Γ``, the shift ``k`` and ``eps_q`` of IntRMSNorm: ``Γ_j / 2^k ≈ γ_j / (2^15 s_y)``,
    ``eps_q = round(ε · 4^G / s_x²)`` (ε in the units of ``Σq² · 4^G / N``)."""
    gamma = np.asarray(gamma, np.float64).reshape(-1)
    scale = gamma / (2.0**RMSNORM_FRAC_BITS * float(output_scale))
    _, k = fixed_point(float(np.max(np.abs(scale))) or 1.0, 31)
    k = min(k, 62 - 26)  # leave room: |n| < 2^26 after normalisation
    mult = np.round(scale * 2.0**k).astype(np.int64)
    eps_q = int(round(float(epsilon) * 4.0**frac_bits / float(input_scale) ** 2))
    return mult, int(k), eps_q


@integer_op
class IntRMSNorm(IntegerOp):
    """Integer RMSNorm over the last axis (y = x / sqrt(mean(x^2) + eps) * gamma): q = x - x_zero_point;
    r = isqrt(floor(sum(q^2) * 4^G / N) + eps_q), the RMS with G fraction bits (sigma_frac_bits);
    n = floor(q * 2^(15+G) / max(r, 1)); y = clamp(rshift_round(n * G_j, shift) + y_zero_point)
    with G_j / 2^shift = gamma_j / (2^15 s_y)."""

    op_type = "IntRMSNorm"
    inputs = (
        Input("x", Q_TYPES), Input("x_zero_point", Q_TYPES, constant=True),
        Input("y_zero_point", Q_TYPES, "gives the output type", constant=True),
        Input("multiplier", ("tensor(int64)",), "per-channel G", constant=True),
    )
    outputs = (Output("y", Q_TYPES),)
    attributes = (
        Attribute("shift", 0, "k"),
        Attribute("eps_q", 0, "epsilon * 4^G / s_x^2, rounded"),
        Attribute("sigma_frac_bits", 0, "G: fraction bits of the RMS"),
        Attribute("axis", -1, ""),
    )

    @classmethod
    def decompose(cls, b, inputs, attrs):
        x, zx, zy, mult = inputs
        rank = len(x.shape)
        if rank == 0 or int(attrs["axis"]) not in (-1, rank - 1):
            raise DecompositionError("IntRMSNorm normalises the last axis only")
        n = x.shape[-1]
        g = int(attrs["sigma_frac_bits"])
        q = x - zx
        squares = b.sum(q * q, -1)
        if g:
            squares = squares << (2 * g)
        mean_square = b.floordiv(squares, n) + int(attrs["eps_q"])
        rms = b.maximum(b.isqrt(mean_square), 1)
        normed = b.floordiv(q << (RMSNORM_FRAC_BITS + g), rms)
        value = normed * b.channel(mult.value, rank, -1)
        y = b.rshift_round(value, int(attrs["shift"])) + zy
        return [b.clamp_cast(y, zy.storage)]

    @classmethod
    def examples(cls, rng):
        gamma = rng.normal(1.0, 0.3, 24)
        out = []
        for dtype, scale in ((np.int8, 0.05), (np.int16, 4e-4)):
            info = np.iinfo(dtype)
            x = rng.integers(info.min, info.max, (2, 3, 24), endpoint=True).astype(dtype)
            x[0, 0] = 0  # a row of zeros: the RMS is ε alone
            g = sigma_frac_bits(24, info.bits)
            mult, k, eps = rmsnorm_constants(gamma, scale, 0.02, 1e-6, g)
            out.append(Example((x, dtype(0), np.int8(0), mult), {"shift": k, "eps_q": eps, "sigma_frac_bits": g},
                               name=np.dtype(dtype).name))
        return out


def rmsnorm_reference(x: np.ndarray, gamma, epsilon: float) -> np.ndarray:
    """Float RMSNorm (what the integer op approximates)."""
    return x / np.sqrt(np.mean(np.square(x), axis=-1, keepdims=True) + epsilon) * np.asarray(gamma)


__all__ = ["IntRMSNorm", "RMSNORM_FRAC_BITS", "rmsnorm_constants", "rmsnorm_reference", "sigma_frac_bits"]
