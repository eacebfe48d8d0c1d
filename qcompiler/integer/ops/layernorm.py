"""``IntLayerNorm``: integer mean, variance and square root, per-channel fixed-point affine."""

from __future__ import annotations

import math

import numpy as np

from ..arith import fixed_point, int_range
from ..expr import DecompositionError
from ..registry import Q_TYPES, Attribute, Example, Input, IntegerOp, Output, integer_op

#: Fraction bits of the normalised value (x − μ)/σ.
LAYERNORM_FRAC_BITS = 15


def layernorm_constants(gamma, beta, input_scale: float, output_scale: float, epsilon: float):
    """Per-channel ``(Γ, B, k)`` and ``eps_q`` of IntLayerNorm (see :class:`IntLayerNorm`)."""
    gamma = np.asarray(gamma, np.float64)
    beta = np.asarray(beta, np.float64)
    scale = gamma / (2.0**LAYERNORM_FRAC_BITS * float(output_scale))
    _, k = fixed_point(float(np.max(np.abs(scale))) or 1.0, 31)
    k = min(k, 62 - 24)  # leave room: |n| < 2^24 after normalisation
    mult = np.round(scale * 2.0**k).astype(np.int64)
    bias = np.round(beta / float(output_scale) * 2.0**k).astype(np.int64)
    eps_q = int(round(float(epsilon) / float(input_scale) ** 2))
    return mult, bias, int(k), eps_q


def centred_spread(b, x, axis: int):
    """``(x − μ, Σ(x − μ)²)`` along ``axis`` with ``μ = round(Σx / N)`` (halves up), exact.

    Where ``4·N·max|x|² < 2^62`` the spread is ``Σx² − 2μΣx + Nμ²`` from two sums of ``x``
    itself (the same integer; backends need not keep ``x − μ`` between two passes)."""
    n = x.shape[axis]
    total = b.sum(x, axis)
    mean = b.floordiv(2 * total + n, 2 * n)
    centred = x - mean
    if 4 * n * max(x.lo * x.lo, x.hi * x.hi) < 2**62:
        squares = b.sum(x * x, axis)
        spread = squares - 2 * mean * total + n * (mean * mean)
        spread = b.bound(spread, 0, n * (x.hi - x.lo) ** 2)
    else:
        spread = b.sum(centred * centred, axis)
    return centred, spread


@integer_op
class IntLayerNorm(IntegerOp):
    """Integer LayerNorm over the last axis: c = N*x - sum(x) (= N(x - mu), exact);
    sigma = isqrt(N*sum(x^2) - sum(x)^2 + eps_q*N^2) (= N*sqrt(var + eps)); n = floor(c * 2^15 / sigma);
    y = clamp(rshift_round(n * G_j + B_j, shift) + y_zero_point) with G_j / 2^k = gamma_j / (2^15 s_y)
    and B_j = round(beta_j / s_y * 2^k). The input zero point cancels. Where N*max|x| >= 2^30
    (int64 would not hold N*sum(x^2)) the mean is rounded instead: mu = round(sum(x) / N),
    c = x - mu, sigma = isqrt(floor(sum(c^2) / N) + eps_q)."""

    op_type = "IntLayerNorm"
    inputs = (
        Input("x", Q_TYPES), Input("x_zero_point", Q_TYPES, constant=True),
        Input("y_zero_point", Q_TYPES, "gives the output type", constant=True),
        Input("multiplier", ("tensor(int64)",), "per-channel G", constant=True),
        Input("bias", ("tensor(int64)",), "per-channel B", constant=True),
    )
    outputs = (Output("y", Q_TYPES),)
    attributes = (Attribute("shift", 0, "k"), Attribute("eps_q", 0, "epsilon / s_x^2, rounded"), Attribute("axis", -1, ""))

    @classmethod
    def examples(cls, rng):
        x = rng.integers(-128, 128, (2, 5, 16)).astype(np.int8)
        x[0, 0] = 7  # a row without spread
        m, bias, k, eps = layernorm_constants(rng.normal(1, 0.3, 16), rng.normal(0, 0.2, 16), 0.05, 0.03, 1e-5)
        x16 = rng.integers(-32768, 32768, (3, 16)).astype(np.int16)
        return [
            Example((x, np.int8(0), np.int8(0), m, bias), {"shift": k, "eps_q": eps}, name="int8"),
            Example((x16, np.int16(0), np.int16(0), m, bias), {"shift": k, "eps_q": eps}, name="int16"),
        ]

    @classmethod
    def decompose(cls, b, inputs, attrs):
        x, _, zy, mult, bias = inputs
        rank = len(x.shape)
        if rank == 0 or int(attrs["axis"]) not in (-1, rank - 1):
            raise DecompositionError("IntLayerNorm normalises the last axis only")
        n = x.shape[-1]
        eps_q = int(attrs["eps_q"])
        if n * max(abs(x.lo), abs(x.hi)) < 2**30:
            # Exact mean: c' = N·x − Σx = N(x − μ) and N·Σx² − (Σx)² = N²·var, both integers,
            # so neither the mean nor σ is rounded to a whole input step (σ of a few steps
            # would otherwise lose up to 1/σ in isqrt).
            total = b.sum(x, -1)
            spread = b.bound(n * b.sum(x * x, -1) - total * total, 0, n * n * (x.hi - x.lo) ** 2 // 4 + 1)
            centred = n * x - total
            sigma = b.maximum(b.isqrt(spread + eps_q * n * n), 1)
        else:
            centred, spread = centred_spread(b, x, -1)
            sigma = b.maximum(b.isqrt(b.floordiv(spread, n) + eps_q), 1)
        # |x_i − μ| ≤ √(N−1)·σ and isqrt(v) > √v / 2 for v ≥ 1: |c/σ| < 2√N.
        limit = 2 ** (LAYERNORM_FRAC_BITS + 1) * (math.isqrt(n) + 1) + 1
        normed = b.bound(b.floordiv(centred << LAYERNORM_FRAC_BITS, sigma), -limit, limit)
        value = normed * b.channel(mult.value, rank, -1) + b.channel(bias.value, rank, -1)
        y = b.rshift_round(value, int(attrs["shift"])) + zy
        return [b.clamp_cast(y, zy.storage)]


__all__ = ["IntLayerNorm", "LAYERNORM_FRAC_BITS", "centred_spread", "int_range", "layernorm_constants"]
