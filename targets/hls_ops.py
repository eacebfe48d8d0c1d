"""C emitters of the standard ops and the integer matmul (fpga-sim).

One function per op type fills a :class:`~hls_c.Layer`: the loop nests of the node's
C function and its cost (multipliers, LUT logic, tables, cycles). Each emitter
reproduces the reference interpreter's kernel exactly: int64 intermediates,
arithmetic right shifts, floor divisions, C casts that wrap like numpy's ``astype``
(gcc, ``-fwrapv``). The integer ops are rendered from their decompositions
(:mod:`hls_render`); ``IntMatMul`` keeps the matmul emitter here as its override.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable

import numpy as np

from qcompiler.opset import QC_DOMAIN

from .fpga_resources import signed_bits
from .hls_c import Layer, Tensor, View, affine, broadcast_strides, c_float, c_int, ctype, int_bounds, minus, strides

#: C helpers shared by all layers (the integer primitives' semantics in C).
HELPERS = r"""/* ---- integer helpers: the semantics of the integer primitives (qcompiler/integer) ---- */
/* rshift_round(v, k) = floor((v + 2^(k-1)) / 2^k); k = 0 is exact (>> is arithmetic) */
static inline int64_t qc_rshift_round(int64_t v, int64_t k)
{
    return k > 0 ? (v + ((int64_t)1 << (k - 1))) >> k : v;
}

/* floor(a / b) (C division truncates) */
static inline int64_t qc_floordiv(int64_t a, int64_t b)
{
    int64_t q = a / b;
    return (q * b != a && ((a < 0) != (b < 0))) ? q - 1 : q;
}

/* numpy.clip order: max with lo first, then min with hi */
static inline int64_t qc_clamp(int64_t v, int64_t lo, int64_t hi)
{
    v = v < lo ? lo : v;
    return v > hi ? hi : v;
}

/* index normalisation of Gather*: negative counts from the end; out of range is clamped */
static inline int64_t qc_index(int64_t i, int64_t n)
{
    if (i < 0)
        i += n;
    return i < 0 ? 0 : (i >= n ? n - 1 : i);
}

/* floor(sqrt(n)) for 0 <= n < 2^62, digit by digit: 32 fixed iterations (one per result bit) */
static inline int64_t qc_isqrt(int64_t n)
{
    uint64_t x = (uint64_t)n, r = 0, bit = (uint64_t)1 << 62;
    for (int i = 0; i < 32; i++) {
#pragma HLS PIPELINE II=1
        if (x >= r + bit) {
            x -= r + bit;
            r = (r >> 1) + bit;
        } else {
            r >>= 1;
        }
        bit >>= 2;
    }
    return (int64_t)r;
}

/* saturating quantisation, as the reference kernel: rounded ratio r (NaN counts as 0) + zero point,
   clamped to [lo, hi] in double precision (r + z is an integer, so the final cast is exact) */
static inline int64_t qc_quantize(double r, double z, int64_t lo, int64_t hi)
{
    double v = (r != r ? 0.0 : r) + z;
    return v <= (double)lo ? lo : (v >= (double)hi ? hi : (int64_t)v);
}
"""

EMITTERS: dict[tuple[str, str], Callable[[Layer], None]] = {}


def emitter(*ops: str, domain: str = ""):
    def register(fn):
        for op in ops:
            EMITTERS[(domain, op)] = fn
        return fn

    return register


QC = QC_DOMAIN

# -- shared pieces -----------------------------------------------------------------------------


def _bits(tensor: Tensor, zero_point: int = 0) -> int:
    """Signed width of ``x − zero_point`` for a tensor of this type."""
    lo, hi = int_bounds(tensor.dtype) if tensor.bits >= 8 else (-(2 ** (tensor.bits - 1)), 2 ** (tensor.bits - 1) - 1)
    return signed_bits(lo - zero_point, hi - zero_point)


def _operand(layer: Layer, tensor: Tensor, out_shape) -> tuple[str, View | None]:
    """A literal for a constant scalar, else a broadcasting view."""
    if tensor.is_const and tensor.size == 1:
        return c_int(int(tensor.const.reshape(-1)[0])), None
    return "", View(layer.ref(tensor), broadcast_strides(tensor.shape, out_shape))


def elementwise(
    layer: Layer, operands: list[Tensor], expression: Callable[[list[str]], str], *, depth: int = 3, out: Tensor | None = None
) -> None:
    """``out[i] = expression(operand values at i)`` with numpy broadcasting, one pipelined nest."""
    out = out or layer.output()
    literals, views = [], [View(layer.ref(out), strides(out.shape))]
    for tensor in operands:
        literal, view = _operand(layer, tensor, out.shape)
        literals.append(literal or None)
        if view is not None:
            views.append(view)

    def body(idx: list[str]) -> None:
        values, k = [], 1
        for literal in literals:
            if literal is not None:
                values.append(f"(int64_t){literal}")
            else:
                values.append(f"(int64_t){views[k].array}[{idx[k]}]")
                k += 1
        layer.line(f"{views[0].array}[{idx[0]}] = ({out.ctype})({expression(values)});")

    layer.nest(out.shape, views, body, depth=depth)


def _zero_point(layer: Layer, i: int) -> int:
    return layer.scalar(i, 0, "zero point")


def _axis(axis: int, rank: int, layer: Layer) -> int:
    if not -rank <= axis < max(rank, 1):
        raise layer.fail(f"axis {axis} is out of range for rank {rank}")
    return axis % max(rank, 1)


# -- boundary ops ----------------------------------------------------------------------------------


def _float_operand(layer: Layer, array: np.ndarray, shape, axis: int, compute: np.dtype, hint: str):
    """A per-tensor literal or a per-axis constant view of a float/int quantization parameter."""
    flat = np.asarray(array).reshape(-1)
    if flat.size == 1:
        value = flat[0]
        literal = c_float(value, compute) if flat.dtype.kind == "f" else c_int(int(value))
        return f"(({ctype(compute)}){literal})", None
    view_shape = [1] * len(shape)
    view_shape[axis] = flat.size
    name = layer.table(hint, flat, flat.dtype.itemsize * 8)
    return None, View(name, broadcast_strides(view_shape, shape))


@emitter("QuantizeLinear")
def quantize_linear(layer: Layer) -> None:
    """``y = clamp(rint(x / s) + z)`` with the division in the input's float type, ties-to-even,
    NaN as 0 and saturation (the reference interpreter's kernel)."""
    x, out = layer.input(0), layer.output()
    if layer.attr("block_size", 0):
        raise layer.fail("blocked quantization is not supported")
    scale = layer.const(1, "scale")
    zp = layer.const(2, "zero point")
    compute = np.result_type(x.dtype, scale.dtype)
    if x.dtype.kind != "f" or compute not in (np.float32, np.float64):
        raise layer.fail(f"quantizes {x.dtype} with a {scale.dtype} scale; float32/float64 only")
    axis = _axis(layer.attr("axis", 1), len(x.shape), layer)
    c = ctype(compute)
    s_lit, s_view = _float_operand(layer, scale, out.shape, axis, compute, "scale")
    z_lit, z_view = ("0", None) if zp is None else _float_operand(layer, zp.astype(np.int64), out.shape, axis, np.int64, "zp")
    views = [View("out0", strides(out.shape)), View("in0", strides(x.shape))]
    views += [v for v in (s_view, z_view) if v is not None]
    lo, hi = int_bounds(out.dtype)
    rint = "rintf" if compute == np.float32 else "rint"

    def body(idx):
        k = 2
        s = s_lit
        if s_view is not None:
            s, k = f"({c}){s_view.array}[{idx[k]}]", k + 1
        z = z_lit if z_view is None else f"{z_view.array}[{idx[k]}]"
        layer.line(f"{c} v = {rint}(({c})in0[{idx[1]}] / {s});")
        layer.line(f"out0[{idx[0]}] = ({out.ctype})qc_quantize((double)v, (double){z}, {c_int(lo)}, {c_int(hi)});")
        layer.cost.divider(24, layer.lanes)  # float32 mantissa divider, pipelined, in LUTs
        layer.luts(3 * 32)  # rounding, float-to-int, clamp

    layer.nest(out.shape, views, body, depth=12)


@emitter("DequantizeLinear")
def dequantize_linear(layer: Layer) -> None:
    """``y = (float(x) − z) · s`` in numpy's promoted float type (float32 for 8/16-bit types)."""
    x, out = layer.input(0), layer.output()
    if layer.attr("block_size", 0):
        raise layer.fail("blocked quantization is not supported")
    scale = layer.const(1, "scale")
    zp = layer.const(2, "zero point")
    if out.dtype not in (np.float32, np.float64):
        raise layer.fail(f"dequantizes to {out.dtype}; float32/float64 only")
    sub_type = np.result_type(np.float32, zp.dtype) if zp is not None else np.dtype(np.float32)
    mul_type = np.result_type(sub_type, scale.dtype)
    axis = _axis(layer.attr("axis", 1), len(x.shape), layer)
    s_lit, s_view = _float_operand(layer, scale, x.shape, axis, mul_type, "scale")
    if zp is None:
        z_lit, z_view = f"(({ctype(sub_type)})0)", None
    else:
        z_lit, z_view = _float_operand(layer, zp, x.shape, axis, sub_type, "zp")
    views = [View("out0", strides(out.shape)), View("in0", strides(x.shape))]
    views += [v for v in (s_view, z_view) if v is not None]
    st, mt = ctype(sub_type), ctype(mul_type)

    def body(idx):
        k = 2
        s = s_lit
        if s_view is not None:
            s, k = f"({mt}){s_view.array}[{idx[k]}]", k + 1
        z = z_lit if z_view is None else f"({st}){z_view.array}[{idx[k]}]"
        cast = f"({st})(float)" if st != "float" else "(float)"
        layer.line(f"{st} dx = {cast}in0[{idx[1]}]" + ("" if z_view is None and zp is None else f" - {z}") + ";")
        layer.line(f"out0[{idx[0]}] = ({out.ctype})(({mt})dx * {s});")
        layer.mul(24, 24)  # float32 mantissa product
        layer.luts(3 * 32)  # int-to-float, subtract, normalise

    layer.nest(out.shape, views, body, depth=8)


# -- integer matmul / conv ----------------------------------------------------------------------------


def _matmul(layer: Layer, acc_dtype: np.dtype) -> None:
    """``out = (a − za) @ (b − zb)`` with numpy matmul broadcasting, exact in int64.

    ``za`` is a scalar or per row of ``a``; ``zb`` a scalar or per column of ``b``.
    A constant ``b`` is stored transposed (``N × K``) with ``zb`` folded in, so the
    reduction reads both operands contiguously (cyclic partition by the lanes).
    """
    a, b, out = layer.input(0), layer.input(1), layer.output()
    za = layer.const(2, "a zero point")
    zb = layer.const(3, "b zero point")
    za = np.zeros((), np.int64) if za is None else za.astype(np.int64).reshape(-1)
    zb = np.zeros((), np.int64) if zb is None else zb.astype(np.int64).reshape(-1)
    a_full = a.shape if len(a.shape) >= 2 else (1,) + a.shape
    b_full = b.shape if len(b.shape) >= 2 else b.shape + (1,)
    m, k = a_full[-2], a_full[-1]
    n = b_full[-1]
    batch = tuple(np.broadcast_shapes(a_full[:-2], b_full[:-2]))
    outer = batch + (m, n)
    sa = broadcast_strides(a_full, batch + (m, k))
    a_outer, a_inner = sa[:-2] + [sa[-2], 0], sa[-1]
    if b.is_const:
        values = b.const.astype(np.int64).reshape(b_full)
        if zb.size > 1 and zb.size != n:
            raise layer.fail(f"b zero point has {zb.size} entries for {n} columns")
        folded = bool(zb.any())
        values = values - (zb if zb.size > 1 else zb.reshape(()))
        lo, hi = (int(values.min()), int(values.max())) if values.size else (0, 0)
        need = signed_bits(lo, hi)
        store = np.int8 if need <= 8 else np.int16 if need <= 16 else np.int32 if need <= 32 else np.int64
        b_bits = b.bits + (1 if folded or b.dtype.kind == "u" else 0)
        transposed = np.ascontiguousarray(np.swapaxes(values, -1, -2)).astype(store)
        key = f"{b.name}_T" + (f"_zb{zlib.crc32(zb.tobytes()):08x}" if folded else "")
        b_name = layer.program.const_array(key, transposed, b_bits)
        layer.own(b_name, transposed.size, b_bits)
        sb = broadcast_strides(transposed.shape, batch + (n, k))
        b_outer, b_inner = sb[:-2] + [0, sb[-2]], sb[-1]
        zb_expr = None
    else:
        b_name = layer.ref(b)
        sb = broadcast_strides(b_full, batch + (k, n))
        b_outer, b_inner = sb[:-2] + [0, sb[-1]], sb[-2]
        b_bits = _bits(b, int(zb.max()) if zb.size else 0)
        zb_expr = zb
    views = [View(layer.ref(out), strides(outer)), View(layer.ref(a), a_outer), View(b_name, b_outer)]
    za_view = zb_view = None
    if za.size > 1:
        za_view = View(layer.table("za", za.astype(np.int32), 32), [0] * len(batch) + [1, 0])
        views.append(za_view)
    if zb_expr is not None and zb.size > 1:
        zb_view = View(layer.table("zb", zb.astype(np.int32), 32), [0] * len(batch) + [0, 1])
        views.append(zb_view)
    a_bits = _bits(a, int(np.abs(za).max()) if za.size else 0)
    acc_bits = min(np.dtype(acc_dtype).itemsize * 8, a_bits + b_bits + max(1, k - 1).bit_length())
    lanes = max(1, min(layer.unroll, k))
    if b.is_const:
        layer.partition(b_name, math.ceil(lanes / 2))
    layer.cost.macs += math.prod(outer) * k

    def row(idx):
        za_expr = f"{za_view.array}[{idx[3]}]" if za_view is not None else c_int(int(za.reshape(-1)[0]))
        zb_pos = 3 + (za_view is not None)
        if zb_view is not None:
            zb_text = f"{zb_view.array}[{idx[zb_pos]}]"
        elif zb_expr is not None:
            zb_text = c_int(int(zb_expr.reshape(-1)[0]))
        else:
            zb_text = "0"
        layer.line("int64_t acc = 0;")

        def mac(inner):
            av = f"(int64_t){views[1].array}[{inner[0]}]"
            bv = f"(int64_t){views[2].array}[{inner[1]}]"
            if za_expr != "0":
                av = minus(av, int(za_expr)) if za_view is None else f"({av} - {za_expr})"
            if zb_text != "0":
                bv = minus(bv, int(zb_text)) if zb_view is None else f"({bv} - {zb_text})"
            layer.line(f"acc += {av} * {bv};")
            layer.mul(a_bits, b_bits)
            layer.luts(acc_bits)

        layer.nest(
            (k,), [View(views[1].array, [a_inner], idx[1]), View(views[2].array, [b_inner], idx[2])], mac,
            depth=3 + max(0, lanes - 1).bit_length(),
        )
        layer.line(f"{views[0].array}[{idx[0]}] = ({out.ctype})acc;")

    layer.nest(outer, views, row, pipeline=False)


@emitter("MatMulInteger")
def matmul_integer(layer: Layer) -> None:
    _matmul(layer, np.dtype(np.int32))


@emitter("IntMatMul", domain=QC)
def int_matmul(layer: Layer) -> None:
    _matmul(layer, layer.output().dtype)


def conv_pads(x_shape, kernel, strides_, dilations, pads, auto_pad: str) -> list[int]:
    """Begin pads of ConvInteger as ``onnx.reference`` computes them (``kernel`` dilated)."""
    rank = len(kernel)
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        heads = []
        for i in range(rank):
            d = x_shape[2 + i]
            effective = (kernel[i] - 1) * dilations[i] + 1
            target = (d + strides_[i] - 1) // strides_[i]
            needed = max(0, (target - 1) * strides_[i] + effective - d)
            heads.append((needed + 1) // 2 if auto_pad == "SAME_LOWER" else needed // 2)
        return heads
    if auto_pad == "VALID" or pads is None:
        return [0] * rank
    return list(pads[:rank])


@emitter("ConvInteger")
def conv_integer(layer: Layer) -> None:
    """``y[n,m,o] = Σ_{c,k} (x[n, g·Cg + c, o·s − p + k·d] − zx) · (w[m,c,k] − zw)``.

    Padding contributes zero (ONNX pads ``x − zx`` with zeros). The reduction over
    ``(c, k…)`` is one flat loop (pipelined, unrolled by the lanes) that reads the
    channel and kernel offsets of step ``r`` from small ROM tables.
    """
    x, w, out = layer.input(0), layer.input(1), layer.output()
    if not w.is_const:
        raise layer.fail("weights must be a compile-time constant")
    zx = _zero_point(layer, 2)
    zw = layer.const(3, "weight zero point")
    rank = len(x.shape) - 2
    n_batch, channels = x.shape[:2]
    m_out = w.shape[0]
    kernel = list(w.shape[2:])
    group = int(layer.attr("group", 1))
    strides_ = list(layer.attr("strides", [1] * rank))
    dilations = list(layer.attr("dilations", [1] * rank))
    auto_pad = layer.attr("auto_pad", "NOTSET")
    pads = conv_pads(x.shape, kernel, strides_, dilations, layer.attr("pads"), auto_pad)
    if rank < 1 or channels % group or m_out % group or w.shape[1] * group != channels:
        raise layer.fail(f"inconsistent shapes x{list(x.shape)}, w{list(w.shape)}, group={group}")
    o_dims = list(out.shape[2:])
    cg, mg = channels // group, m_out // group
    kprod = math.prod(kernel)
    reduction = cg * kprod
    weights = w.const.astype(np.int64)
    if zw is not None:
        zw = zw.astype(np.int64).reshape(-1)
        weights = weights - (zw.reshape((-1,) + (1,) * (weights.ndim - 1)) if zw.size > 1 else zw[0])
    lo, hi = (int(weights.min()), int(weights.max())) if weights.size else (0, 0)
    need = signed_bits(lo, hi)
    store = np.int8 if need <= 8 else np.int16 if need <= 16 else np.int32
    w_bits = w.bits + (1 if (zw is not None and zw.any()) or w.dtype.kind == "u" else 0)
    w_name = layer.program.const_array(f"{w.name}_zw{zlib.crc32(zw.tobytes()):08x}" if zw is not None else w.name, weights.astype(store).reshape(-1), w_bits)
    layer.own(w_name, weights.size, w_bits)
    r = np.arange(reduction)
    positions = np.unravel_index(r % kprod, kernel) if kernel else ()
    tables = [layer.table("kc", (r // kprod).astype(np.int32), 16)]
    tables += [layer.table(f"k{s}", (positions[s] * dilations[s]).astype(np.int32), 16) for s in range(rank)]
    spatial = list(x.shape[2:])
    sx = strides(x.shape)
    # outer loops: n, g, mg, o_0 … o_{rank-1}
    outer = [n_batch, group, mg] + o_dims
    out_strides = strides(out.shape)
    o_view = View("out0", [out_strides[0], mg * out_strides[1], out_strides[1]] + out_strides[2:])
    x_view = View(layer.ref(x), [sx[0], cg * sx[1], 0] + [0] * rank)
    w_view = View(w_name, [0, mg * reduction, reduction] + [0] * rank)
    needs_check = any(
        pads[s] > 0 or (o_dims[s] - 1) * strides_[s] + (kernel[s] - 1) * dilations[s] - pads[s] >= spatial[s]
        for s in range(rank)
    )
    lanes = max(1, min(layer.unroll, reduction))
    layer.partition(w_name, math.ceil(lanes / 2))
    x_bits = _bits(x, zx)
    layer.cost.macs += n_batch * m_out * math.prod(o_dims) * reduction

    def pixel(idx):
        o_vars = layer.loop_vars[3:]
        layer.line("int64_t acc = 0;")

        def mac(inner):
            rv = layer.loop_vars[0]
            for s in range(rank):
                layer.line(f"int p{s} = {affine(o_vars[s], strides_[s], -pads[s])} + {tables[1 + s]}[{rv}];")
            offset = " + ".join([f"{tables[0]}[{rv}]*{sx[1]}"] + [affine(f"p{s}", sx[2 + s]) for s in range(rank)])
            xv = minus(f"(int64_t){x_view.array}[{inner[0]} + {offset}]", zx)
            stmt = f"acc += {xv} * (int64_t){w_view.array}[{inner[1]}];"
            if needs_check:
                cond = " && ".join(f"p{s} >= 0 && p{s} < {spatial[s]}" for s in range(rank))
                layer.line(f"if ({cond})")
                layer.line("    " + stmt)
            else:
                layer.line(stmt)
            layer.mul(x_bits, w_bits)
            layer.luts(32 + rank * 3 * 16)  # accumulator, position adders and range compares

        layer.nest(
            (reduction,), [View(x_view.array, [0], idx[1]), View(w_view.array, [1], idx[2])], mac,
            depth=4 + max(0, lanes - 1).bit_length(), merge=False,
        )
        layer.line(f"out0[{idx[0]}] = (int32_t)acc;")

    layer.nest(outer, [o_view, x_view, w_view], pixel, pipeline=False, merge=False)


# -- elementwise integer ops ---------------------------------------------------------------------------


@emitter("Add", "Sub", "Mul")
def arithmetic(layer: Layer) -> None:
    """Integer ``a ± b`` / ``a · b`` with numpy broadcasting, wrapping to the output type."""
    a, b, out = layer.input(0), layer.input(1), layer.output()
    if out.dtype.kind not in "iu":
        raise layer.fail(f"computes {out.dtype}; integer tensors only")
    op = {"Add": "+", "Sub": "-", "Mul": "*"}[layer.node.op_type]

    def expression(v):
        if op == "*":
            layer.mul(a.bits, b.bits)
        else:
            layer.luts(out.bits)
        return f"{v[0]} {op} {v[1]}"

    elementwise(layer, [a, b], expression, depth=2)


@emitter("Cast")
def cast(layer: Layer) -> None:
    """Integer/bool conversions: C casts wrap like numpy's ``astype``; ``bool(x) = x ≠ 0``."""
    x, out = layer.input(0), layer.output()
    if x.dtype.kind == "f" or out.dtype.kind == "f":
        raise layer.fail(f"casts {x.dtype} to {out.dtype}; integer and bool casts only")
    if out.dtype == np.bool_:
        elementwise(layer, [x], lambda v: f"{v[0]} != 0", depth=1)
    else:
        elementwise(layer, [x], lambda v: v[0], depth=1)


_COMPARE = {"Equal": "==", "Less": "<", "Greater": ">", "LessOrEqual": "<=", "GreaterOrEqual": ">="}
_LOGIC = {"And": "&&", "Or": "||", "Xor": "!="}


@emitter(*_COMPARE, *_LOGIC, "Not")
def boolean(layer: Layer) -> None:
    """Comparisons (to bool) and logic on bools (stored as 0/1 bytes)."""
    op = layer.node.op_type
    if op == "Not":
        elementwise(layer, [layer.input(0)], lambda v: f"!{v[0]}", depth=1)
        return
    a, b = layer.input(0), layer.input(1)
    if a.dtype.kind == "f":
        raise layer.fail("compares float tensors")
    symbol = _COMPARE.get(op) or _LOGIC[op]

    def expression(v):
        layer.luts(max(a.bits, b.bits))  # one comparator or gate
        if op in _LOGIC:
            return f"({v[0]} != 0) {symbol} ({v[1]} != 0)"
        return f"{v[0]} {symbol} {v[1]}"

    elementwise(layer, [a, b], expression, depth=1)


@emitter("Where")
def where(layer: Layer) -> None:
    def expression(v):
        layer.luts(layer.output().bits)  # a 2:1 mux
        return f"{v[0]} ? {v[1]} : {v[2]}"

    elementwise(layer, [layer.input(0), layer.input(1), layer.input(2)], expression, depth=1)

