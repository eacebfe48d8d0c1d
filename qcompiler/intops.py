"""Function-style access to the reference semantics of the integer ops.

Each function runs the op's one decomposition (:mod:`qcompiler.integer.ops`) in numpy;
passes use them to measure an integer variant's error before choosing it, and the
``*_constants`` functions give the integer constants an op derives from its scales.
"""

from __future__ import annotations

import numpy as np

from .integer.arith import (
    channel_view, exact_int_matmul, fixed_point, fixed_point_array, int_range, isqrt, rshift_round,
)
from .integer.ops.elementwise import IntAdd, IntMul, Requantize, add_constants
from .integer.ops.gelu import IBERT_ERF, GeluConstants, IntGELU, gelu_constants
from .integer.ops.layernorm import LAYERNORM_FRAC_BITS, IntLayerNorm, layernorm_constants
from .integer.ops.lookup import IntLookup
from .integer.ops.matmul import IntMatMul
from .integer.ops.softmax import (
    IBERT_EXP, LINEAR_FRAC_BITS, LUT_FRAC_BITS, SOFTMAX_FRAC_BITS, IntSoftmax, SoftmaxConstants, exp_table,
    softmax_constants,
)
from .opset import QC_DOMAIN

__all__ = [
    "IBERT_ERF", "IBERT_EXP", "LAYERNORM_FRAC_BITS", "LINEAR_FRAC_BITS", "LUT_FRAC_BITS", "QC_DOMAIN", "SOFTMAX_FRAC_BITS",
    "GeluConstants", "SoftmaxConstants", "add_constants", "channel_view", "exact_int_matmul", "exp_table", "fixed_point",
    "fixed_point_array", "gelu_constants", "int_add", "int_gelu", "int_layernorm", "int_lookup", "int_matmul", "int_mul",
    "int_range", "int_softmax", "isqrt", "layernorm_constants", "requantize", "rshift_round", "softmax_constants",
]


def _bounds(qmin, qmax) -> dict:
    return {k: v for k, v in (("qmin", qmin), ("qmax", qmax)) if v is not None}


def requantize(x, multiplier, shift, zero_point, axis: int = 1, x_zero_point=None, qmin=None, qmax=None) -> np.ndarray:
    arrays = [x, multiplier, shift, zero_point, None if x_zero_point is None else np.asarray(x_zero_point)]
    return Requantize.evaluate(arrays, axis=axis, **_bounds(qmin, qmax))[0]


def int_add(a, a_zp, b, b_zp, y_zp, a_multiplier, b_multiplier, shift, qmin=None, qmax=None) -> np.ndarray:
    arrays = [np.asarray(v) for v in (a, a_zp, b, b_zp, y_zp)]
    return IntAdd.evaluate(arrays, a_multiplier=a_multiplier, b_multiplier=b_multiplier, shift=shift, **_bounds(qmin, qmax))[0]


def int_mul(a, a_zp, b, b_zp, y_zp, multiplier, shift, pre_shift=0, qmin=None, qmax=None) -> np.ndarray:
    arrays = [np.asarray(v) for v in (a, a_zp, b, b_zp, y_zp)]
    return IntMul.evaluate(arrays, multiplier=multiplier, shift=shift, pre_shift=pre_shift, **_bounds(qmin, qmax))[0]


def int_matmul(a, b, a_zp=0, b_zp=0, out_dtype=np.int32) -> np.ndarray:
    a = np.asarray(a)
    b = np.asarray(b)
    arrays = [a, b, np.asarray(a_zp).astype(a.dtype), np.asarray(b_zp).astype(b.dtype)]
    return IntMatMul.evaluate(arrays, acc_type=np.dtype(out_dtype).name)[0]


def int_lookup(x, table) -> np.ndarray:
    return IntLookup.evaluate([np.asarray(x), np.asarray(table)])[0]


def int_softmax(x, x_zp, y_zp, input_scale: float, output_scale: float, axis: int = -1, variant: str = "ibert") -> np.ndarray:
    arrays = [np.asarray(x), np.asarray(x_zp), np.asarray(y_zp)]
    return IntSoftmax.evaluate(arrays, input_scale=input_scale, output_scale=output_scale, axis=axis, variant=variant)[0]


def int_gelu(x, x_zp, y_zp, input_scale: float, output_scale: float) -> np.ndarray:
    return IntGELU.evaluate([np.asarray(x), np.asarray(x_zp), np.asarray(y_zp)], input_scale=input_scale, output_scale=output_scale)[0]


def int_layernorm(x, x_zp, y_zp, multiplier, bias, shift: int, eps_q: int, axis: int = -1) -> np.ndarray:
    arrays = [np.asarray(x), np.asarray(x_zp), np.asarray(y_zp), np.asarray(multiplier, np.int64), np.asarray(bias, np.int64)]
    return IntLayerNorm.evaluate(arrays, shift=shift, eps_q=eps_q, axis=axis)[0]
