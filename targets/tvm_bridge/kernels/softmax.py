"""The fused integer softmax: an override of ``IntSoftmax``'s decomposition as one TE kernel.

The decomposition rendered op by op makes four kernels (each reduction ends a fused
group); this kernel computes the row max, the exponent, the row sum and the normalised,
requantized output as four stages of one kernel, with the same integer formulas
(:mod:`qcompiler.integer.ops.softmax`) and exact fast divisions. Tests compare it with
the rendered decomposition bit for bit.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from qcompiler import intops
from qcompiler.errors import TargetError
from qcompiler.graph import node_label
from qcompiler.opset import QC_DOMAIN

from ..common import const_divisor, extents, float64_division_exact, node_attr, out_dtype_of_zp
from ..registry import lowers

if TYPE_CHECKING:
    from ..lowering import Lowerer


@lowers("IntSoftmax", domain=QC_DOMAIN)
def int_softmax(lo: Lowerer, node: ir.Node):
    """IntSoftmax as one kernel of four stages over the rows (the softmax axis): the row's
    max, ``e = exp(x − max)`` by the variant's integer formula, the row's sum, and the
    normalised, requantized output; marked out-element-wise fusable, so that Relax fuses
    the element-wise ops that follow (a requantize, the next matmul's sign flip) into it.
    (As Relax ops it made four kernels: each reduction ends a fused group.) A mask input
    (bool, broadcast to x) keeps masked positions out of the max and the sum; they get
    probability 0, as the decomposition says."""
    from tvm import te, tirx

    x = lo.expr(node.inputs[0])
    shape = lo.shape(x)
    y_zero_point = np.asarray(lo.need_const(node, 2, "y_zero_point"))
    if y_zero_point.size != 1:
        raise TargetError(f"{node_label(node)}: IntSoftmax needs a per-tensor y_zero_point, got {y_zero_point.size} values")
    y_zp, out_dtype = int(y_zero_point.reshape(-1)[0]), out_dtype_of_zp(y_zero_point)
    s_in = float(node_attr(node, "input_scale", 1.0))
    s_out = float(node_attr(node, "output_scale", 1.0))
    variant = node_attr(node, "variant", "ibert")
    axis = node_attr(node, "axis", -1) % len(shape)
    c = intops.softmax_constants(s_in, s_out)
    in_min, in_max = intops.int_range(np.dtype(lo.dtype(x)))
    span = int(in_max) - int(in_min)  # bound of −d
    n = shape[axis]

    def i64(v):
        return tirx.const(int(v), "int64")

    def full(row, j):  # a row index with the softmax axis put back
        return (*row[:axis], j, *row[axis:])

    def row_of(index):
        return (*index[:axis], *index[axis + 1:])

    xs = te.placeholder(extents(*shape), lo.dtype(x), name="x")
    params, args = [xs], [x]
    if variant == "ibert":
        divisor = const_divisor(c.q_ln2, span)

        def exp_of(d):
            z = tirx.min(_te_floor_div_const(-d, c.q_ln2, divisor), i64(62))
            pb = d + z * i64(c.q_ln2) + i64(c.q_b)
            return tirx.max(pb * pb + i64(c.q_c), i64(0)) >> z
    elif variant == "linear":
        def exp_of(d):
            t = _te_rshift_round(d * i64(c.log2e_multiplier), c.log2e_shift)
            whole = t >> i64(intops.LINEAR_FRAC_BITS)
            mantissa = t - (whole << i64(intops.LINEAR_FRAC_BITS)) + i64(1 << intops.LINEAR_FRAC_BITS)
            return mantissa >> tirx.min(-whole, i64(62))
    elif variant == "lut":
        if np.dtype(lo.dtype(x)).itemsize != 1:
            raise TargetError(f"{node_label(node)}: IntSoftmax variant 'lut' needs 8-bit inputs")
        table = intops.exp_table(s_in)
        ts = te.placeholder(extents(len(table)), "int64", name="exp_table")
        params.append(ts)
        args.append(lo.const_expr(table))

        def exp_of(d):
            return ts[tirx.max(tirx.min(d + i64(255), i64(255)), i64(0))]
    else:
        raise TargetError(f"{node_label(node)}: unknown IntSoftmax variant {variant!r}")
    e_max = _softmax_exp_bound(variant, c, span)
    keep = None
    if len(node.inputs) > 3 and node.inputs[3] is not None:
        mask = lo.expr(node.inputs[3])
        mask_shape = lo.shape(mask)
        if lo.dtype(mask) != "bool" or len(mask_shape) > len(shape):
            raise TargetError(f"{node_label(node)}: the mask must be a bool tensor broadcast to the scores")
        ms = te.placeholder(extents(*mask_shape), "bool", name="mask")
        params.append(ms)
        args.append(mask)
        pad = len(shape) - len(mask_shape)

        def keep(index):  # numpy broadcasting: size-1 mask axes read index 0
            return ms[tuple(tirx.const(0, "int64") if d == 1 else index[pad + a] for a, d in enumerate(mask_shape))]

    def score(index):  # masked scores are the type's minimum: out of the max
        value = xs[index].astype("int64")
        return value if keep is None else tirx.if_then_else(keep(index), value, i64(in_min))

    def exponent(*i):
        value = exp_of(tirx.min(xs[i].astype("int64") - row_max[row_of(i)], i64(0)) if keep is not None
                       else xs[i].astype("int64") - row_max[row_of(i)])
        return value if keep is None else tirx.if_then_else(keep(i), value, i64(0))

    rows = extents(*shape[:axis], *shape[axis + 1:])
    k = te.reduce_axis((tirx.const(0, "int64"), tirx.const(n, "int64")), name="k")
    row_max = te.compute(rows, lambda *r: te.max(score(full(r, k)), axis=k), name="row_max")
    e = te.compute(extents(*shape), exponent, name="row_exp")
    k2 = te.reduce_axis((tirx.const(0, "int64"), tirx.const(n, "int64")), name="k2")
    row_sum = te.compute(rows, lambda *r: te.sum(e[full(r, k2)], axis=k2), name="row_sum")

    def output(*i):
        total = tirx.max(row_sum[row_of(i)], i64(1))
        prob = _te_floor_div(e[i] << i64(intops.SOFTMAX_FRAC_BITS), total,
                             e_max << intops.SOFTMAX_FRAC_BITS, max(e_max * n, 1))
        v = _te_rshift_round(prob * i64(c.out_multiplier), c.out_shift) + i64(y_zp)
        low, high = intops.int_range(np.dtype(out_dtype))
        return tirx.min(tirx.max(v, i64(low)), i64(high)).astype(out_dtype)

    y = te.compute(extents(*shape), output, name="softmax")
    func = te.create_prim_func([*params, y]).without_attr("global_symbol").with_attr("op_pattern", 4)  # kOutEWiseFusable
    kernel = lo.bb.add_func(func, "int_softmax")
    return lo.emit(lo.relax.call_tir(kernel, args, lo.relax.TensorType(shape, out_dtype)))


def _te_rshift_round(v, k: int):
    """``⌊(v + 2^(k−1)) / 2^k⌋`` (TE), as :meth:`Lowerer.rshift_round`."""
    from tvm import tirx

    k = int(k)
    return v if k <= 0 else (v + tirx.const(1 << (k - 1), "int64")) >> tirx.const(k, "int64")


def _te_floor_div(a, b, a_bound: int, b_bound: int):
    """``⌊a / b⌋`` (TE) for ``|a| ≤ a_bound``, ``1 ≤ b ≤ b_bound``: through float64 where
    exact (see :meth:`Lowerer.floor_div`), else integer division."""
    from tvm import tirx

    if not float64_division_exact(a_bound, b_bound):
        return tirx.floordiv(a, b)
    return tirx.floor(a.astype("float64") / b.astype("float64")).astype("int64")


def _te_floor_div_const(a, divisor: int, multiply_shift):
    """``⌊a / divisor⌋`` (TE) by the multiply and shift :func:`_const_divisor` found."""
    from tvm import tirx

    if multiply_shift is None:
        return tirx.floordiv(a, tirx.const(divisor, "int64"))
    multiplier, shift = multiply_shift
    return (a * tirx.const(multiplier, "int64")) >> tirx.const(shift, "int64")


def _softmax_exp_bound(variant: str, c, span: int) -> int:
    """An upper bound of IntSoftmax's ``e`` (to pick an exact fast division); huge if unknown."""
    if variant == "ibert":  # (p + q_b)² + q_c, convex in p over (−q_ln2, 0]; ≤ 2 once z is capped at 62
        ends = (c.q_b, c.q_b - c.q_ln2 + 1)
        return max(max(v * v for v in ends) + c.q_c, 2)
    if variant == "linear":
        return 1 << (intops.LINEAR_FRAC_BITS + 1)
    if variant == "lut":
        return 1 << 23
    return 2**62
