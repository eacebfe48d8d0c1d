"""Operators of the ``qcompiler`` domain: schemas and bit-exact reference kernels.

These are the integer-stage ops ONNX lacks. Each has one schema (registered with
``onnx.defs``), one numpy kernel here — the semantics every target reproduces bit
for bit — and one lowering per target. Runtime arithmetic is integer only, in
int64; float attributes (scales) are compile-time information from which the
integer constants are derived by the ``*_constants`` functions below, which every
lowering calls too, so constants agree everywhere.

Rounding convention: ``rshift_round(v, k) = floor((v + 2^(k-1)) / 2^k)`` (halves
round towards +inf; ``k = 0`` is exact).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx
import onnx.defs
from onnx.defs import OpSchema
from onnx.reference.op_run import OpRun

from .interpreter import register_kernel
from .opset import QC_DOMAIN, QC_DOMAIN_VERSION

_Q_TYPES = ["tensor(int8)", "tensor(uint8)", "tensor(int16)", "tensor(uint16)"]
_ACC_TYPES = ["tensor(int32)", "tensor(int64)"]
_ANY_INT = sorted(set(_Q_TYPES + _ACC_TYPES))

# -- helpers --------------------------------------------------------------------------


def _register(name: str, doc: str, inputs, outputs, constraints, attributes=()) -> None:
    if onnx.defs.has(name, QC_DOMAIN):
        return
    params = []
    for entry in inputs:
        name_, type_, doc_ = entry[:3]
        option = OpSchema.FormalParameterOption.Optional if len(entry) > 3 else OpSchema.FormalParameterOption.Single
        params.append(OpSchema.FormalParameter(name_, type_, doc_, param_option=option))
    schema = OpSchema(
        name, QC_DOMAIN, QC_DOMAIN_VERSION, doc,
        inputs=params,
        outputs=[OpSchema.FormalParameter(n, t, d) for n, t, d in outputs],
        type_constraints=constraints,
        attributes=list(attributes),
    )
    onnx.defs.register_schema(schema)


def _attr(name: str, default, doc: str) -> OpSchema.Attribute:
    return OpSchema.Attribute(name, onnx.helper.make_attribute(name, default), doc)


def int_range(dtype: np.dtype) -> tuple[int, int]:
    info = np.iinfo(dtype)
    return int(info.min), int(info.max)


def rshift_round(v: np.ndarray, k) -> np.ndarray:
    """``floor((v + 2^(k-1)) / 2^k)`` in int64: halves round up; ``k = 0`` is exact."""
    v = np.asarray(v, dtype=np.int64)
    k = np.asarray(k, dtype=np.int64)
    half = np.where(k > 0, np.left_shift(np.int64(1), np.maximum(k - 1, 0)), 0)
    return np.right_shift(v + half, k)


# Kept for readers of older code and docs.
rounding_right_shift = rshift_round


def channel_view(param: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    """Broadcast a scalar or 1-D per-channel parameter along ``axis`` of an ``ndim`` tensor."""
    param = np.asarray(param)
    if param.size == 1:
        return param.reshape(())
    shape = [1] * ndim
    shape[axis % ndim] = param.size
    return param.reshape(shape)


def _clamp(v: np.ndarray, dtype, qmin=None, qmax=None) -> np.ndarray:
    lo, hi = int_range(dtype)
    lo = lo if qmin is None else max(lo, int(qmin))
    hi = hi if qmax is None else min(hi, int(qmax))
    return np.clip(v, lo, hi).astype(dtype)


def _check_int64(v: np.ndarray, what: str) -> None:
    """The semantics promise no int64 overflow; check the promise in the reference."""
    if v.size and np.max(np.abs(v.astype(np.float64))) >= 2.0**62:
        raise OverflowError(f"{what}: intermediate exceeds 2^62; the lowering chose bad constants")


def fixed_point(real: float, max_bits: int = 31) -> tuple[int, int]:
    """``(M, k)`` with ``M / 2^k ≈ real``, ``|M| < 2^max_bits`` and the most precision.

    ``real = 0`` gives ``(0, 0)``. ``k`` is in [0, 62]; a ``real`` too large for that
    range (|real| ≥ 2^max_bits) raises ValueError.
    """
    if real == 0.0 or not math.isfinite(real):
        if real == 0.0:
            return 0, 0
        raise ValueError(f"cannot represent {real} in fixed point")
    mantissa, exponent = math.frexp(abs(real))  # |real| = mantissa · 2^exponent, mantissa in [0.5, 1)
    k = max_bits - 1 - exponent
    k = min(max(k, 0), 62)
    m = round(abs(real) * 2.0**k)
    if m >= 2**max_bits:  # rounding overflowed the mantissa
        k -= 1
        m = round(abs(real) * 2.0**k)
    if m >= 2**max_bits or k < 0:
        raise ValueError(f"{real} is too large for a {max_bits}-bit fixed-point multiplier")
    return (-m if real < 0 else m), k


def fixed_point_array(reals: np.ndarray, max_bits: int = 31) -> tuple[np.ndarray, np.ndarray]:
    pairs = [fixed_point(float(r), max_bits) for r in np.ravel(reals)]
    m = np.array([p[0] for p in pairs], dtype=np.int64).reshape(np.shape(reals))
    k = np.array([p[1] for p in pairs], dtype=np.int64).reshape(np.shape(reals))
    return m.astype(np.int32), k.astype(np.int32)


# -- Requantize -----------------------------------------------------------------------


def requantize(x, multiplier, shift, zero_point, axis: int = 1, x_zero_point=None, qmin=None, qmax=None) -> np.ndarray:
    """``y = clamp(rshift_round((x − x_zp)·M, k) + z, qmin, qmax)``; see the schema."""
    x = np.asarray(x).astype(np.int64)
    out_dtype = np.asarray(zero_point).dtype
    if x_zero_point is not None:
        x = x - np.asarray(x_zero_point, np.int64)
    m = channel_view(multiplier, x.ndim, axis).astype(np.int64)
    k = channel_view(shift, x.ndim, axis).astype(np.int64)
    product = x * m
    _check_int64(product, "Requantize")
    y = rshift_round(product, k) + np.asarray(zero_point, np.int64)
    return _clamp(y, out_dtype, qmin, qmax)


_BOUNDS_ATTRS = [
    _attr("qmin", -(2**31), "lower clamp (intersected with the output type's range); fuses ReLU"),
    _attr("qmax", 2**31 - 1, "upper clamp (intersected with the output type's range); fuses ReLU6"),
]

_register(
    "Requantize",
    "y = clamp(rshift_round((x - x_zero_point) * multiplier, shift) + zero_point, qmin, qmax), "
    "exact in int64 (|multiplier| < 2^31, 0 <= shift <= 62). multiplier/shift are scalars or 1-D "
    "along 'axis'. The output type is zero_point's.",
    inputs=[
        ("x", "T1", "integer accumulator or quantized tensor"),
        ("multiplier", "tensor(int32)", "fixed-point multiplier M"),
        ("shift", "tensor(int32)", "right shift k"),
        ("zero_point", "T2", "output zero point (scalar)"),
        ("x_zero_point", "T3", "input zero point (scalar), default 0", "optional"),
    ],
    outputs=[("y", "T2", "requantized tensor")],
    constraints=[("T1", _ANY_INT, "input"), ("T2", _Q_TYPES, "quantized"), ("T3", _ANY_INT, "input zero point")],
    attributes=[_attr("axis", 1, "channel axis of per-channel multiplier/shift"), *_BOUNDS_ATTRS],
)


@register_kernel
class Requantize(OpRun):
    op_domain = QC_DOMAIN

    def _run(self, x, multiplier, shift, zero_point, x_zero_point=None, axis=1, qmin=None, qmax=None):
        return (requantize(x, multiplier, shift, zero_point, axis, x_zero_point, qmin, qmax),)


# -- elementwise add / mul -------------------------------------------------------------


def int_add(a, a_zp, b, b_zp, y_zp, a_multiplier, b_multiplier, shift, qmin=None, qmax=None) -> np.ndarray:
    """``y = clamp(rshift_round((a−za)·Ma + (b−zb)·Mb, k) + zy)`` with numpy broadcasting."""
    a = np.asarray(a).astype(np.int64) - np.int64(np.asarray(a_zp))
    b = np.asarray(b).astype(np.int64) - np.int64(np.asarray(b_zp))
    total = a * np.int64(a_multiplier) + b * np.int64(b_multiplier)
    _check_int64(total, "IntAdd")
    y = rshift_round(total, shift) + np.int64(np.asarray(y_zp))
    return _clamp(y, np.asarray(y_zp).dtype, qmin, qmax)


def add_constants(s_a: float, s_b: float, s_y: float, max_bits: int = 30) -> tuple[int, int, int]:
    """``(Ma, Mb, k)`` with ``Ma/2^k ≈ s_a/s_y`` and ``Mb/2^k ≈ s_b/s_y`` on a common shift."""
    big = max(s_a, s_b) / s_y
    _, k = fixed_point(big, max_bits)
    return round(s_a / s_y * 2.0**k), round(s_b / s_y * 2.0**k), k


_register(
    "IntAdd",
    "y = clamp(rshift_round((a - a_zero_point) * a_multiplier + (b - b_zero_point) * b_multiplier, "
    "shift) + y_zero_point, qmin, qmax): a residual/elementwise add of two quantized tensors with "
    "different scales, aligned on one fixed-point grid. Numpy broadcasting.",
    inputs=[
        ("a", "T1", "quantized a"), ("a_zero_point", "T1", "scalar"),
        ("b", "T2", "quantized b (or int32 constant)"), ("b_zero_point", "T2", "scalar"),
        ("y_zero_point", "T3", "output zero point (scalar); gives the output type"),
    ],
    outputs=[("y", "T3", "quantized sum")],
    constraints=[("T1", _ANY_INT, ""), ("T2", _ANY_INT, ""), ("T3", _Q_TYPES, "")],
    attributes=[
        _attr("a_multiplier", 1, "Ma"), _attr("b_multiplier", 1, "Mb"), _attr("shift", 0, "k"), *_BOUNDS_ATTRS,
    ],
)


@register_kernel
class IntAdd(OpRun):
    op_domain = QC_DOMAIN

    def _run(self, a, a_zero_point, b, b_zero_point, y_zero_point, a_multiplier=1, b_multiplier=1, shift=0, qmin=None, qmax=None):
        return (int_add(a, a_zero_point, b, b_zero_point, y_zero_point, a_multiplier, b_multiplier, shift, qmin, qmax),)


def int_mul(a, a_zp, b, b_zp, y_zp, multiplier, shift, pre_shift=0, qmin=None, qmax=None) -> np.ndarray:
    """``y = clamp(rshift_round(rshift_round((a−za)(b−zb), p)·M, k) + zy)``."""
    a = np.asarray(a).astype(np.int64) - np.int64(np.asarray(a_zp))
    b = np.asarray(b).astype(np.int64) - np.int64(np.asarray(b_zp))
    product = rshift_round(a * b, pre_shift) * np.int64(multiplier)
    _check_int64(product, "IntMul")
    y = rshift_round(product, shift) + np.int64(np.asarray(y_zp))
    return _clamp(y, np.asarray(y_zp).dtype, qmin, qmax)


_register(
    "IntMul",
    "y = clamp(rshift_round(rshift_round((a - a_zero_point) * (b - b_zero_point), pre_shift) * "
    "multiplier, shift) + y_zero_point, qmin, qmax). Numpy broadcasting.",
    inputs=[
        ("a", "T1", ""), ("a_zero_point", "T1", ""), ("b", "T2", ""), ("b_zero_point", "T2", ""),
        ("y_zero_point", "T3", "gives the output type"),
    ],
    outputs=[("y", "T3", "")],
    constraints=[("T1", _ANY_INT, ""), ("T2", _ANY_INT, ""), ("T3", _Q_TYPES, "")],
    attributes=[_attr("multiplier", 1, "M"), _attr("shift", 0, "k"), _attr("pre_shift", 0, "p"), *_BOUNDS_ATTRS],
)


@register_kernel
class IntMul(OpRun):
    op_domain = QC_DOMAIN

    def _run(self, a, a_zero_point, b, b_zero_point, y_zero_point, multiplier=1, shift=0, pre_shift=0, qmin=None, qmax=None):
        return (int_mul(a, a_zero_point, b, b_zero_point, y_zero_point, multiplier, shift, pre_shift, qmin, qmax),)


# -- integer matmul with any integer inputs ----------------------------------------------


def exact_int_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Exact integer matmul in int64 via float64 BLAS when every partial sum stays below 2^53.

    Each product and partial sum is an integer below 2^53, which float64 represents
    exactly whatever the summation order, so the result equals the int64 matmul.
    """
    a64 = a.astype(np.int64)
    b64 = b.astype(np.int64)
    k = a.shape[-1]
    bound = float(np.max(np.abs(a64), initial=0)) * float(np.max(np.abs(b64), initial=0)) * k
    if bound < 2.0**53:
        return np.matmul(a64.astype(np.float64), b64.astype(np.float64)).astype(np.int64)
    return np.matmul(a64, b64)


def int_matmul(a, b, a_zp=0, b_zp=0, out_dtype=np.int32) -> np.ndarray:
    """``(a − za) @ (b − zb)`` exactly; ``za`` scalar or per-row, ``zb`` scalar or per-column."""
    a_zp = np.asarray(a_zp).astype(np.int64)
    if a_zp.ndim == 1 and np.ndim(a) >= 2:  # per-row zero point
        a_zp = a_zp.reshape(-1, 1)
    a = np.asarray(a).astype(np.int64) - a_zp
    b_zp = np.asarray(b_zp).astype(np.int64)
    if b_zp.ndim == 1:  # per-column zero point
        b_zp = b_zp.reshape((1,) * (np.ndim(b) - 1) + (-1,))
    b = np.asarray(b).astype(np.int64) - b_zp
    acc = exact_int_matmul(a, b)
    if out_dtype == np.int32 and acc.size and (acc.max() > 2**31 - 1 or acc.min() < -(2**31)):
        raise OverflowError("IntMatMul: int32 accumulator overflow; use acc_type=int64")
    return acc.astype(out_dtype)


_register(
    "IntMatMul",
    "y = (a - a_zero_point) @ (b - b_zero_point) accumulated exactly in int64 and returned as "
    "acc_type (int32 or int64); for int16 activations where MatMulInteger (8-bit only) does not apply. "
    "The int32 form promises no overflow (the compiler checks the bound).",
    inputs=[
        ("a", "T1", ""), ("b", "T2", ""),
        ("a_zero_point", "T1", "scalar", "optional"), ("b_zero_point", "T2", "scalar or per-column", "optional"),
    ],
    outputs=[("y", "T3", "accumulator")],
    constraints=[("T1", _Q_TYPES, ""), ("T2", _Q_TYPES + ["tensor(int4)"], ""), ("T3", _ACC_TYPES, "")],
    attributes=[_attr("acc_type", "int32", "int32 or int64")],
)


@register_kernel
class IntMatMul(OpRun):
    op_domain = QC_DOMAIN

    def _run(self, a, b, a_zero_point=None, b_zero_point=None, acc_type="int32"):
        zb = 0 if b_zero_point is None else b_zero_point
        za = 0 if a_zero_point is None else a_zero_point
        return (int_matmul(a, b, za, zb, np.dtype(acc_type).type),)


# -- lookup table ----------------------------------------------------------------------


def int_lookup(x, table) -> np.ndarray:
    lo, _ = int_range(np.asarray(x).dtype)
    return np.asarray(table)[np.asarray(x).astype(np.int64) - lo]


_register(
    "IntLookup",
    "y = table[x - min(type(x))]: any elementwise function of an 8-bit tensor, tabulated at compile time.",
    inputs=[("x", "T1", "8-bit input"), ("table", "T2", "256 entries")],
    outputs=[("y", "T2", "")],
    constraints=[("T1", ["tensor(int8)", "tensor(uint8)"], ""), ("T2", _Q_TYPES, "")],
)


@register_kernel
class IntLookup(OpRun):
    op_domain = QC_DOMAIN

    def _run(self, x, table):
        return (int_lookup(x, table),)


# -- softmax -----------------------------------------------------------------------------

#: I-BERT's second-order polynomial for exp on (−ln2, 0]: a·(p + b)² + c.
IBERT_EXP = (0.3585, 1.353, 0.344)
#: Fraction bits of the normalised probability before requantization.
SOFTMAX_FRAC_BITS = 16
#: Fraction bits of the base-2 exponent in the linear (shift + linear interpolation) variant.
LINEAR_FRAC_BITS = 16


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
    """Integer constants of IntSoftmax, derived from the scales (see :func:`int_softmax`)."""
    a, b, c = IBERT_EXP
    s = float(input_scale)
    q_ln2 = max(1, math.floor(math.log(2.0) / s))
    q_b = math.floor(b / s)
    q_c = math.floor(c / (a * s * s))
    m_l2e, k_l2e = fixed_point(s * math.log2(math.e) * 2.0**LINEAR_FRAC_BITS, 31)
    m_out, k_out = fixed_point(2.0**-SOFTMAX_FRAC_BITS / float(output_scale), 31)
    return SoftmaxConstants(q_ln2, q_b, q_c, m_l2e, k_l2e, m_out, k_out)


def _exp_ibert(d: np.ndarray, c: SoftmaxConstants) -> np.ndarray:
    """I-BERT i-exp of ``d ≤ 0``: shift by ``z = ⌊−d / q_ln2⌋``, polynomial on the rest."""
    z = np.minimum((-d) // c.q_ln2, 62)
    p = d + z * c.q_ln2
    poly = (p + c.q_b) ** 2 + c.q_c
    return np.right_shift(np.maximum(poly, 0), z)


def _exp_linear(d: np.ndarray, c: SoftmaxConstants) -> np.ndarray:
    """Base-2 exp with linear interpolation: ``2^t ≈ 2^⌊t⌋ · (1 + frac(t))``, ``t = d·s·log2 e``."""
    t = rshift_round(d * c.log2e_multiplier, c.log2e_shift)  # t · 2^F, ≤ 0
    whole = np.right_shift(t, LINEAR_FRAC_BITS)  # floor, ≤ 0
    frac = t - np.left_shift(whole, LINEAR_FRAC_BITS)  # [0, 2^F)
    mantissa = (np.int64(1) << LINEAR_FRAC_BITS) + frac  # (1 + frac) · 2^F
    return np.right_shift(mantissa, np.minimum(-whole, 62))


def _exp_lut(d: np.ndarray, s: float) -> np.ndarray:
    """Tabulated exp for 8-bit inputs: ``round(exp(d·s) · 2^22)``, ``d`` in [−255, 0]."""
    table = np.round(np.exp(np.arange(-255, 1) * s) * 2.0**22).astype(np.int64)
    return table[d + 255]


def int_softmax(x, x_zp, y_zp, input_scale: float, output_scale: float, axis: int = -1, variant: str = "ibert") -> np.ndarray:
    """Integer softmax.

    ``d = x − max(x)`` (the zero point cancels); ``e = iexp(d)`` by the variant;
    ``P = ⌊e · 2^16 / Σe⌋`` (probability with 16 fraction bits);
    ``y = clamp(rshift_round(P · M, k) + zy)`` with ``M / 2^k ≈ 2^−16 / s_y``.
    """
    del x_zp  # cancels in x − max(x)
    x = np.asarray(x).astype(np.int64)
    c = softmax_constants(input_scale, output_scale)
    d = x - np.max(x, axis=axis, keepdims=True)
    if variant == "ibert":
        e = _exp_ibert(d, c)
    elif variant == "linear":
        e = _exp_linear(d, c)
    elif variant == "lut":
        if np.min(d, initial=0) < -255:
            raise ValueError("IntSoftmax variant 'lut' needs 8-bit inputs")
        e = _exp_lut(d, input_scale)
    else:
        raise ValueError(f"unknown IntSoftmax variant {variant!r}")
    total = np.sum(e, axis=axis, keepdims=True)
    prob = np.left_shift(e, SOFTMAX_FRAC_BITS) // np.maximum(total, 1)
    _check_int64(prob * c.out_multiplier, "IntSoftmax")
    y = rshift_round(prob * c.out_multiplier, c.out_shift) + np.int64(np.asarray(y_zp))
    return _clamp(y, np.asarray(y_zp).dtype)


_SCALE_ATTRS = [
    _attr("input_scale", 1.0, "scale of x (compile-time; integer constants derive from it)"),
    _attr("output_scale", 1.0, "scale of y (compile-time)"),
]

_register(
    "IntSoftmax",
    "Integer softmax along 'axis' (see qcompiler.intops.int_softmax): exp by I-BERT's shift + "
    "second-order polynomial ('ibert'), by shift + linear interpolation ('linear', HyQ-style), or "
    "by a 256-entry table for 8-bit inputs ('lut'); normalised with 16 fraction bits, requantized "
    "to y's scale and zero point.",
    inputs=[("x", "T1", ""), ("x_zero_point", "T1", ""), ("y_zero_point", "T2", "gives the output type")],
    outputs=[("y", "T2", "")],
    constraints=[("T1", _Q_TYPES, ""), ("T2", _Q_TYPES, "")],
    attributes=[*_SCALE_ATTRS, _attr("axis", -1, ""), _attr("variant", "ibert", "ibert | linear | lut")],
)


@register_kernel
class IntSoftmax(OpRun):
    op_domain = QC_DOMAIN

    def _run(self, x, x_zero_point, y_zero_point, input_scale=1.0, output_scale=1.0, axis=-1, variant="ibert"):
        if isinstance(variant, bytes):
            variant = variant.decode()
        return (int_softmax(x, x_zero_point, y_zero_point, input_scale, output_scale, axis, variant),)


# -- GELU --------------------------------------------------------------------------------

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
    """Integer constants of IntGELU (see :func:`int_gelu`)."""
    a, b = IBERT_ERF
    s_erf = float(input_scale) / math.sqrt(2.0)
    q_b = math.floor(b / s_erf)  # negative
    s_l = a * s_erf * s_erf  # negative
    q_c = math.floor(1.0 / s_l)
    q_one = math.floor(1.0 / s_l)
    # Bound |x_c · (L + q_one)| to choose a pre-shift that keeps the product below 2^62.
    max_x = 2 ** input_bits
    max_l = q_b * q_b + abs(q_c)
    bound = max_x * (max_l + abs(q_one))
    pre_shift = max(0, bound.bit_length() - 31)
    real = float(input_scale) * s_l / 2.0 * 2.0**pre_shift / float(output_scale)
    multiplier, shift = fixed_point(real, 31)
    return GeluConstants(q_b, q_c, q_one, pre_shift, multiplier, shift)


def int_gelu(x, x_zp, y_zp, input_scale: float, output_scale: float) -> np.ndarray:
    """I-BERT integer GELU: ``GELU(x) = x·½·(1 + erf(x/√2))``.

    ``q = x − zx`` (scale ``s/√2`` as the erf argument);
    ``L = sign(q)·((min(|q|, −q_b) + q_b)² + q_c)`` (erf, scale ``s_L = a·(s/√2)²``);
    ``G = q·(L + q_one)`` with ``q_one = ⌊1/s_L⌋`` (scale ``s·s_L/2``);
    ``y = clamp(rshift_round(rshift_round(G, p)·M, k) + zy)`` with ``M/2^k ≈ s·s_L·2^p/(2·s_y)``.
    """
    x = np.asarray(x)
    bits = np.iinfo(x.dtype).bits
    c = gelu_constants(input_scale, output_scale, bits)
    q = x.astype(np.int64) - np.int64(np.asarray(x_zp))
    clipped = np.minimum(np.abs(q), -c.q_b)
    erf = np.sign(q) * ((clipped + c.q_b) ** 2 + c.q_c)
    g = rshift_round(q * (erf + c.q_one), c.pre_shift)
    product = g * np.int64(c.multiplier)
    _check_int64(product, "IntGELU")
    y = rshift_round(product, c.shift) + np.int64(np.asarray(y_zp))
    return _clamp(y, np.asarray(y_zp).dtype)


_register(
    "IntGELU",
    "I-BERT integer GELU (see qcompiler.intops.int_gelu); exact erf GELU semantics approximated by "
    "a second-order polynomial; requantized to y's scale and zero point. (The 'lut' variant lowers "
    "to IntLookup instead.)",
    inputs=[("x", "T1", ""), ("x_zero_point", "T1", ""), ("y_zero_point", "T2", "gives the output type")],
    outputs=[("y", "T2", "")],
    constraints=[("T1", _Q_TYPES, ""), ("T2", _Q_TYPES, "")],
    attributes=_SCALE_ATTRS,
)


@register_kernel
class IntGELU(OpRun):
    op_domain = QC_DOMAIN

    def _run(self, x, x_zero_point, y_zero_point, input_scale=1.0, output_scale=1.0):
        return (int_gelu(x, x_zero_point, y_zero_point, input_scale, output_scale),)


# -- LayerNorm ---------------------------------------------------------------------------

#: Fraction bits of the normalised value (x − μ)/σ.
LAYERNORM_FRAC_BITS = 15


def isqrt(n: np.ndarray) -> np.ndarray:
    """``floor(sqrt(n))`` for int64 ``n ≥ 0`` (float estimate, then exact integer correction;
    targets use Newton's iteration, which gives the same floor)."""
    n = np.asarray(n, dtype=np.int64)
    r = np.floor(np.sqrt(n.astype(np.float64))).astype(np.int64)
    r = np.where(r * r > n, r - 1, r)
    r = np.where((r + 1) * (r + 1) <= n, r + 1, r)
    return r


def layernorm_constants(gamma: np.ndarray, beta: np.ndarray, input_scale: float, output_scale: float, epsilon: float):
    """Per-channel ``(Γ, B, k)`` and ``eps_q`` of IntLayerNorm (see :func:`int_layernorm`)."""
    gamma = np.asarray(gamma, np.float64)
    beta = np.asarray(beta, np.float64)
    scale = gamma / (2.0**LAYERNORM_FRAC_BITS * float(output_scale))
    _, k = fixed_point(float(np.max(np.abs(scale))) or 1.0, 31)
    k = min(k, 62 - 24)  # leave room: |n| < 2^24 after normalisation
    mult = np.round(scale * 2.0**k).astype(np.int64)
    bias = np.round(beta / float(output_scale) * 2.0**k).astype(np.int64)
    eps_q = int(round(float(epsilon) / float(input_scale) ** 2))
    return mult, bias, int(k), eps_q


def int_layernorm(x, x_zp, y_zp, multiplier, bias, shift: int, eps_q: int, axis: int = -1) -> np.ndarray:
    """Integer LayerNorm over the last axis.

    ``μ = round(Σx / N)``; ``c = x − μ``; ``σ = isqrt(⌊Σc² / N⌋ + eps_q)``;
    ``n = ⌊c · 2^15 / σ⌋``; ``y = clamp(rshift_round(n·Γ_j + B_j, k) + zy)``
    with ``Γ_j / 2^k ≈ γ_j / (2^15 · s_y)`` and ``B_j = round(β_j / s_y · 2^k)``.
    The input zero point cancels.
    """
    del x_zp
    if axis not in (-1, np.ndim(x) - 1):
        raise ValueError("IntLayerNorm normalises the last axis only")
    x = np.asarray(x).astype(np.int64)
    n_ch = x.shape[-1]
    total = np.sum(x, axis=-1, keepdims=True)
    mean = (2 * total + n_ch) // (2 * n_ch)
    centred = x - mean
    var = np.sum(centred * centred, axis=-1, keepdims=True) // n_ch
    sigma = np.maximum(isqrt(var + eps_q), 1)
    normed = np.left_shift(centred, LAYERNORM_FRAC_BITS) // sigma
    value = normed * np.asarray(multiplier, np.int64) + np.asarray(bias, np.int64)
    _check_int64(value, "IntLayerNorm")
    y = rshift_round(value, shift) + np.int64(np.asarray(y_zp))
    return _clamp(y, np.asarray(y_zp).dtype)


_register(
    "IntLayerNorm",
    "Integer LayerNorm over the last axis (see qcompiler.intops.int_layernorm): integer mean and "
    "variance, integer square root, per-channel fixed-point affine.",
    inputs=[
        ("x", "T1", ""), ("x_zero_point", "T1", ""), ("y_zero_point", "T2", "gives the output type"),
        ("multiplier", "tensor(int64)", "per-channel Γ"), ("bias", "tensor(int64)", "per-channel B"),
    ],
    outputs=[("y", "T2", "")],
    constraints=[("T1", _Q_TYPES, ""), ("T2", _Q_TYPES, "")],
    attributes=[_attr("shift", 0, "k"), _attr("eps_q", 0, "epsilon / s_x^2, rounded"), _attr("axis", -1, "")],
)


@register_kernel
class IntLayerNorm(OpRun):
    op_domain = QC_DOMAIN

    def _run(self, x, x_zero_point, y_zero_point, multiplier, bias, shift=0, eps_q=0, axis=-1):
        return (int_layernorm(x, x_zero_point, y_zero_point, multiplier, bias, shift, eps_q, axis),)


# -- exact fast kernels for the standard integer ops ---------------------------------------


@register_kernel
class MatMulInteger(OpRun):
    """Exact, BLAS-speed MatMulInteger (see :func:`exact_int_matmul`)."""

    def _run(self, a, b, a_zero_point=None, b_zero_point=None):
        za = 0 if a_zero_point is None else a_zero_point
        zb = 0 if b_zero_point is None else b_zero_point
        return (int_matmul(a, b, za, zb, np.int64).astype(np.int32),)
