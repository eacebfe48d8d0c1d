"""Integer arithmetic shared by every integer op: fixed-point constants, exact rounding
shifts, exact integer matmuls.

Rounding convention: ``rshift_round(v, k) = floor((v + 2^(k-1)) / 2^k)`` (halves round
towards +inf; ``k = 0`` is exact). Compile-time constants (multipliers, shifts) are
derived from float scales by :func:`fixed_point`; at run time everything is integer.
"""

from __future__ import annotations

import math

import numpy as np


#: Sub-byte integer types (ml_dtypes) and their ranges.
NARROW_RANGES = {"int4": (-8, 7), "uint4": (0, 15), "int2": (-2, 1), "uint2": (0, 3)}


def is_integer_dtype(dtype) -> bool:
    """Integer or bool numpy dtype, the sub-byte ``int4``/``uint4`` ones included."""
    dtype = np.dtype(dtype)
    return dtype.kind in "iub" or dtype.name in NARROW_RANGES


def int_range(dtype) -> tuple[int, int]:
    """``(min, max)`` of an integer (or bool, or int4/uint4) numpy dtype."""
    dtype = np.dtype(dtype)
    if dtype.name in NARROW_RANGES:
        return NARROW_RANGES[dtype.name]
    if dtype == np.bool_:
        return 0, 1
    info = np.iinfo(dtype)
    return int(info.min), int(info.max)


def rshift_round(v, k) -> np.ndarray:
    """``floor((v + 2^(k-1)) / 2^k)`` in int64 (numpy): halves round up; ``k = 0`` is exact."""
    v = np.asarray(v, dtype=np.int64)
    k = np.asarray(k, dtype=np.int64)
    half = np.where(k > 0, np.left_shift(np.int64(1), np.maximum(k - 1, 0)), 0)
    return np.right_shift(v + half, k)


def channel_view(param, ndim: int, axis: int) -> np.ndarray:
    """Broadcast a scalar or 1-D per-channel parameter along ``axis`` of an ``ndim`` tensor."""
    param = np.asarray(param)
    if param.size == 1:
        return param.reshape(())
    shape = [1] * ndim
    shape[axis % ndim] = param.size
    return param.reshape(shape)


def fixed_point(real: float, max_bits: int = 31) -> tuple[int, int]:
    """``(M, k)`` with ``M / 2^k ≈ real``, ``|M| < 2^max_bits`` and the most precision.

    ``real = 0`` gives ``(0, 0)``. ``k`` is in [0, 62]; a ``real`` too large for that
    range (|real| ≥ 2^max_bits) or not finite raises ValueError.
    """
    if real == 0.0:
        return 0, 0
    if not math.isfinite(real):
        raise ValueError(f"cannot represent {real} in fixed point")
    _, exponent = math.frexp(abs(real))  # |real| = mantissa · 2^exponent, mantissa in [0.5, 1)
    k = min(max(max_bits - 1 - exponent, 0), 62)
    m = round(abs(real) * 2.0**k)
    if m >= 2**max_bits:  # rounding overflowed the mantissa
        k -= 1
        m = round(abs(real) * 2.0**k)
    if m >= 2**max_bits or k < 0:
        raise ValueError(f"{real} is too large for a {max_bits}-bit fixed-point multiplier")
    return (-m if real < 0 else m), k


def fixed_point_array(reals, max_bits: int = 31) -> tuple[np.ndarray, np.ndarray]:
    """:func:`fixed_point` elementwise: int32 multipliers and shifts of ``reals``' shape."""
    pairs = [fixed_point(float(r), max_bits) for r in np.ravel(reals)]
    m = np.array([p[0] for p in pairs], dtype=np.int64).reshape(np.shape(reals))
    k = np.array([p[1] for p in pairs], dtype=np.int64).reshape(np.shape(reals))
    return m.astype(np.int32), k.astype(np.int32)


def exact_int_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Exact integer matmul in int64, through float64 BLAS when every partial sum stays below 2^53.

    Each product and partial sum is then an integer below 2^53, which float64 represents
    exactly whatever the summation order, so the result equals the int64 matmul.
    """
    a64 = np.asarray(a).astype(np.int64)
    b64 = np.asarray(b).astype(np.int64)
    k = a64.shape[-1] if a64.ndim else 1
    bound = float(np.max(np.abs(a64), initial=0)) * float(np.max(np.abs(b64), initial=0)) * k
    if bound < 2.0**53:
        return np.matmul(a64.astype(np.float64), b64.astype(np.float64)).astype(np.int64)
    return np.matmul(a64, b64)


def isqrt(n) -> np.ndarray:
    """``floor(sqrt(n))`` for int64 ``0 ≤ n < 2^62``: a float64 estimate (within one of the
    root), then two exact integer corrections."""
    n = np.asarray(n, dtype=np.int64)
    r = np.floor(np.sqrt(n.astype(np.float64))).astype(np.int64)
    r = np.where(r * r > n, r - 1, r)
    return np.where((r + 1) * (r + 1) <= n, r + 1, r)


def signed_bits(lo: int, hi: int) -> int:
    """Bits of the smallest two's-complement type holding ``[lo, hi]``."""
    need = max(-int(lo), int(hi) + 1, 1)
    return (need - 1).bit_length() + 1
