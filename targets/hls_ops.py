"""C emitters for the integer-stage ops (fpga-sim).

One function per op type fills a :class:`~hls_c.Layer`: the loop nests of the
node's C function and its cost (multipliers, LUT logic, tables, cycles). Each
emitter reproduces the reference kernel exactly (``qcompiler/intops.py``, the
``onnx.reference`` ops): int64 intermediates, arithmetic right shifts,
``rshift_round(v, k) = (v + 2^(k−1)) >> k``, floor divisions, C casts that wrap
like numpy's ``astype`` (gcc, ``-fwrapv``). Integer constants come from the
``*_constants`` functions of :mod:`qcompiler.intops`, so they agree bit for bit.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable

import numpy as np

from qcompiler import intops

from .fpga_resources import signed_bits
from .hls_c import Layer, Tensor, View, affine, broadcast_strides, c_float, c_int, ctype, int_bounds, minus, strides

#: C helpers shared by all layers (the semantics of intops.py in C).
HELPERS = r"""/* ---- integer helpers: the semantics of qcompiler/intops.py ---- */
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


QC = intops.QC_DOMAIN

# -- shared pieces -----------------------------------------------------------------------------


def _bits(tensor: Tensor, zero_point: int = 0) -> int:
    """Signed width of ``x − zero_point`` for a tensor of this type."""
    lo, hi = int_bounds(tensor.dtype) if tensor.bits >= 8 else (-(2 ** (tensor.bits - 1)), 2 ** (tensor.bits - 1) - 1)
    return signed_bits(lo - zero_point, hi - zero_point)


def _clamp_bounds(layer: Layer, out: Tensor) -> tuple[int, int]:
    """Output type range intersected with the ``qmin``/``qmax`` attributes (ReLU/ReLU6 fusion)."""
    lo, hi = int_bounds(out.dtype)
    qmin, qmax = layer.attr("qmin"), layer.attr("qmax")
    return (lo if qmin is None else max(lo, int(qmin))), (hi if qmax is None else min(hi, int(qmax)))


def _clamp(layer: Layer, expr: str, lo: int, hi: int, bits: int = 64) -> str:
    layer.luts(2 * bits)  # two comparators + two muxes on the output width
    return f"qc_clamp({expr}, {c_int(lo)}, {c_int(hi)})"


def _rshift(layer: Layer, expr: str, shift: int | str, bits: int = 64, max_shift: int = 62) -> str:
    """``rshift_round`` with a literal shift folded (``k = 0`` exact, else add half and shift)."""
    if isinstance(shift, str):
        layer.luts(bits)
        layer.cost.shifter(bits, max_shift, layer.lanes)
        return f"qc_rshift_round({expr}, {shift})"
    if shift == 0:
        return f"({expr})"
    layer.luts(bits)  # the rounding adder; a constant shift is wiring
    return f"((({expr}) + {c_int(1 << (shift - 1))}) >> {shift})"


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


@emitter("Requantize", domain=QC)
def requantize(layer: Layer) -> None:
    """``y = clamp(rshift_round((x − zx)·M, k) + zy, qmin, qmax)``; ``M``, ``k`` per tensor or per channel."""
    x, out = layer.input(0), layer.output()
    mult = layer.const(1, "multiplier").astype(np.int64).reshape(-1)
    shift = layer.const(2, "shift").astype(np.int64).reshape(-1)
    zy = _zero_point(layer, 3)
    zx = _zero_point(layer, 4)
    lo, hi = _clamp_bounds(layer, out)
    axis = _axis(layer.attr("axis", 1), len(x.shape), layer)
    views = [View("out0", strides(out.shape)), View(layer.ref(x), strides(x.shape))]

    def per_channel(values: np.ndarray, hint: str, bits: int) -> str | None:
        if values.size == 1:
            return None
        if len(x.shape) == 0 or values.size != x.shape[axis]:
            raise layer.fail(f"{hint} has {values.size} entries, axis {axis} has {x.shape[axis] if x.shape else 0}")
        shape = [1] * len(x.shape)
        shape[axis] = values.size
        views.append(View(layer.table(hint, values.astype(np.int32), bits), broadcast_strides(shape, x.shape)))
        return views[-1].array

    m_name = per_channel(mult, "multiplier", 32)
    k_name = per_channel(shift, "shift", 6)
    x_bits = _bits(x, zx)
    m_bits = signed_bits(int(mult.min()), int(mult.max()))
    power_of_two = m_name is None and mult[0] > 0 and (int(mult[0]) & (int(mult[0]) - 1)) == 0

    def body(idx):
        k = 2
        xv = minus(f"(int64_t){views[1].array}[{idx[1]}]", zx)
        if m_name is not None:
            m_expr, k = f"(int64_t){m_name}[{idx[k]}]", k + 1
        else:
            m_expr = c_int(int(mult[0]))
        shift_expr = f"(int64_t){k_name}[{idx[k]}]" if k_name is not None else int(shift[0])
        layer.line(f"int64_t p = {xv} * {m_expr};")
        rounded = _rshift(layer, "p", shift_expr, x_bits + m_bits, int(shift.max()))
        value = minus(rounded, -zy)
        layer.line(f"out0[{idx[0]}] = ({out.ctype}){_clamp(layer, value, lo, hi, out.bits + 2)};")
        if not power_of_two:
            layer.mul(x_bits, m_bits)

    layer.nest(out.shape, views, body, depth=6)


def _scaled(layer: Layer, value: str, multiplier: int, bits: int) -> str:
    """``value · M`` for a compile-time ``M`` (a shift when ``M`` is a power of two)."""
    if multiplier == 1:
        return value
    if not (multiplier > 0 and multiplier & (multiplier - 1) == 0):
        layer.mul(bits, signed_bits(min(multiplier, 0), max(multiplier, 0)))
    return f"{value} * {c_int(multiplier)}"


@emitter("IntAdd", domain=QC)
def int_add(layer: Layer) -> None:
    """``y = clamp(rshift_round((a − za)·Ma + (b − zb)·Mb, k) + zy)`` with broadcasting."""
    a, b, out = layer.input(0), layer.input(2), layer.output()
    za, zb, zy = _zero_point(layer, 1), _zero_point(layer, 3), _zero_point(layer, 4)
    ma, mb, shift = int(layer.attr("a_multiplier", 1)), int(layer.attr("b_multiplier", 1)), int(layer.attr("shift", 0))
    lo, hi = _clamp_bounds(layer, out)
    a_bits, b_bits = _bits(a, za), _bits(b, zb)

    def expression(v):
        pa = _scaled(layer, minus(v[0], za), ma, a_bits)
        pb = _scaled(layer, minus(v[1], zb), mb, b_bits)
        layer.luts(3 * 48)
        rounded = _rshift(layer, f"{pa} + {pb}", shift, 48)
        return _clamp(layer, minus(rounded, -zy), lo, hi, out.bits + 2)

    elementwise(layer, [a, b], expression, depth=6)


@emitter("IntMul", domain=QC)
def int_mul(layer: Layer) -> None:
    """``y = clamp(rshift_round(rshift_round((a − za)(b − zb), p)·M, k) + zy)``."""
    a, b, out = layer.input(0), layer.input(2), layer.output()
    za, zb, zy = _zero_point(layer, 1), _zero_point(layer, 3), _zero_point(layer, 4)
    mult, shift, pre = int(layer.attr("multiplier", 1)), int(layer.attr("shift", 0)), int(layer.attr("pre_shift", 0))
    lo, hi = _clamp_bounds(layer, out)
    a_bits, b_bits = _bits(a, za), _bits(b, zb)

    def expression(v):
        layer.mul(a_bits, b_bits)
        product = _rshift(layer, f"{minus(v[0], za)} * {minus(v[1], zb)}", pre, a_bits + b_bits)
        scaled = _scaled(layer, product, mult, max(2, a_bits + b_bits - pre))
        rounded = _rshift(layer, scaled, shift, 48)
        return _clamp(layer, minus(rounded, -zy), lo, hi, out.bits + 2)

    elementwise(layer, [a, b], expression, depth=7)


@emitter("IntLookup", domain=QC)
def int_lookup(layer: Layer) -> None:
    """``y = table[x − min(type(x))]``: a 256-entry ROM per two lanes."""
    x, out = layer.input(0), layer.output()
    table = layer.const(1, "table")
    if x.dtype not in (np.int8, np.uint8) or table.size != 256:
        raise layer.fail(f"needs an 8-bit input and a 256-entry table (got {x.dtype}, {table.size} entries)")
    lo = int_bounds(x.dtype)[0]
    name = layer.table("lut", table.reshape(-1), out.bits, lanes=layer.unroll)
    views = [View("out0", strides(out.shape)), View(layer.ref(x), strides(x.shape))]
    offset = f" + {-lo}" if lo else ""
    layer.nest(out.shape, views, lambda idx: layer.line(f"out0[{idx[0]}] = {name}[(int)in0[{idx[1]}]{offset}];"), depth=2)


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


# -- transformer ops ------------------------------------------------------------------------------------


@emitter("IntSoftmax", domain=QC)
def int_softmax(layer: Layer) -> None:
    """Integer softmax along ``axis`` (see :func:`qcompiler.intops.int_softmax`).

    Per row: ``d = x − max x``; ``e = iexp(d)`` (``ibert``: ``z = ⌊−d/q_ln2⌋``,
    ``e = ((p + q_b)² + q_c) >> z`` with ``p = d + z·q_ln2``; ``linear``:
    ``t = rshift_round(d·M, k)``, ``e = (2^16 + frac t) >> −⌊t⌋``; ``lut``: a
    256-entry ROM); ``P = ⌊e·2^16 / max(Σe, 1)⌋``; ``y = clamp(rshift_round(P·M, k) + zy)``.
    Three pipelined passes per row; ``e`` waits in a row buffer.
    """
    x, out = layer.input(0), layer.output()
    zy = _zero_point(layer, 2)
    variant = layer.attr("variant", "ibert")
    s_in, s_out = float(layer.attr("input_scale", 1.0)), float(layer.attr("output_scale", 1.0))
    if variant not in ("ibert", "linear", "lut"):
        raise layer.fail(f"unknown IntSoftmax variant '{variant}'")
    if variant == "lut" and x.dtype not in (np.int8, np.uint8):
        raise layer.fail("variant 'lut' needs 8-bit inputs")
    c = intops.softmax_constants(s_in, s_out)
    axis = _axis(layer.attr("axis", -1), len(x.shape), layer)
    outer, length, inner = math.prod(x.shape[:axis]), x.shape[axis], math.prod(x.shape[axis + 1 :])
    lo, hi = int_bounds(out.dtype)
    frac = intops.SOFTMAX_FRAC_BITS
    lut = None
    if variant == "lut":
        table = intops._exp_lut(np.arange(-255, 1), s_in)  # the reference's own table
        lut = layer.table("exp", table.astype(np.int64), 24, lanes=layer.unroll)
    ebuf = f"e{layer.index}"
    layer.local(f"static int64_t {ebuf}[{length}];")
    layer.cost.rom(ebuf, length, 40, max(1, math.ceil(layer.unroll / 2)), kind="buffer")
    layer.partition(ebuf, max(1, math.ceil(min(layer.unroll, length) / 2)))
    x_name = layer.ref(x)
    x_bits = x.bits + 1

    def row(idx):
        read = lambda j: f"(int64_t){x_name}[{idx[1]} + {j}*{inner}]" if inner > 1 else f"(int64_t){x_name}[{idx[1]} + {j}]"
        layer.line(f"int64_t mx = (int64_t){x_name}[{idx[1]}];")

        def find_max(_):
            j = layer.loop_vars[0]
            layer.line(f"int64_t v = {read(j)};")
            layer.line("mx = v > mx ? v : mx;")
            layer.luts(2 * x_bits)

        layer.nest((length,), [], find_max, depth=2, merge=False)
        layer.line("int64_t total = 0;")

        def exponent(_):
            j = layer.loop_vars[0]
            layer.line(f"int64_t d = {read(j)} - mx;")
            if variant == "ibert":
                layer.line(f"int64_t z = (-d) / {c_int(c.q_ln2)};")
                layer.line("if (z > 62) z = 62;")
                layer.line(f"int64_t p = d + z * {c_int(c.q_ln2)} + {c_int(c.q_b)};")
                layer.line(f"int64_t poly = p * p + {c_int(c.q_c)};")
                layer.line("int64_t e = (poly > 0 ? poly : 0) >> z;")
                p_bits = signed_bits(-c.q_ln2 + c.q_b, c.q_b)
                layer.mul(x_bits, 18)  # division by the constant q_ln2 as a reciprocal multiply
                layer.mul(p_bits, p_bits)
                layer.cost.shifter(2 * p_bits, 62, layer.lanes)
            elif variant == "linear":
                t = _rshift(layer, f"d * {c_int(c.log2e_multiplier)}", c.log2e_shift, 64)
                layer.line(f"int64_t t = {t};")
                layer.line(f"int64_t whole = t >> {intops.LINEAR_FRAC_BITS};")
                layer.line(f"int64_t mant = ((int64_t)1 << {intops.LINEAR_FRAC_BITS}) + (t - whole * {1 << intops.LINEAR_FRAC_BITS});")
                layer.line("int64_t sh = -whole > 62 ? 62 : -whole;")
                layer.line("int64_t e = mant >> sh;")
                layer.mul(x_bits, signed_bits(0, c.log2e_multiplier))
                layer.cost.shifter(frac + 1, 62, layer.lanes)
            else:
                layer.line(f"int64_t e = {lut}[d + 255];")
            layer.line(f"{ebuf}[{j}] = e;")
            layer.line("total += e;")
            layer.luts(3 * 32 + 48)

        layer.nest((length,), [], exponent, depth=8, merge=False)
        layer.line("if (total < 1) total = 1;")

        def normalise(_):
            j = layer.loop_vars[0]
            layer.line(f"int64_t prob = ({ebuf}[{j}] << {frac}) / total;")
            rounded = _rshift(layer, f"prob * {c_int(c.out_multiplier)}", c.out_shift, 48)
            value = minus(rounded, -zy)
            target = f"{idx[0]} + {j}*{inner}" if inner > 1 else f"{idx[0]} + {j}"
            layer.line(f"out0[{target}] = ({out.ctype})qc_clamp({value}, {lo}, {hi});")
            layer.cost.divider(frac + 24, layer.lanes)
            layer.mul(frac + 1, signed_bits(0, c.out_multiplier))
            layer.luts(2 * (out.bits + 2))

        layer.nest((length,), [], normalise, depth=frac + 30, merge=False)

    views = [View("out0", [length * inner, 1]), View(x_name, [length * inner, 1])]
    layer.nest((outer, inner), views, row, pipeline=False)


@emitter("IntGELU", domain=QC)
def int_gelu(layer: Layer) -> None:
    """I-BERT GELU (see :func:`qcompiler.intops.int_gelu`):
    ``q = x − zx``; ``L = sign(q)·((min(|q|, −q_b) + q_b)² + q_c)``;
    ``y = clamp(rshift_round(rshift_round(q·(L + q_one), p)·M, k) + zy)``."""
    x, out = layer.input(0), layer.output()
    zx, zy = _zero_point(layer, 1), _zero_point(layer, 2)
    bits = np.iinfo(x.dtype).bits
    c = intops.gelu_constants(float(layer.attr("input_scale", 1.0)), float(layer.attr("output_scale", 1.0)), bits)
    lo, hi = int_bounds(out.dtype)
    views = [View("out0", strides(out.shape)), View(layer.ref(x), strides(x.shape))]
    q_bits = _bits(x, zx)

    def body(idx):
        layer.line(f"int64_t q = {minus(f'(int64_t){views[1].array}[{idx[1]}]', zx)};")
        layer.line("int64_t aq = q < 0 ? -q : q;")
        layer.line(f"int64_t cl = (aq < {c_int(-c.q_b)} ? aq : {c_int(-c.q_b)}) + {c_int(c.q_b)};")
        layer.line(f"int64_t sq = cl * cl + {c_int(c.q_c)};")
        layer.line("int64_t erf = q > 0 ? sq : (q < 0 ? -sq : 0);")
        g = _rshift(layer, f"q * (erf + {c_int(c.q_one)})", c.pre_shift, 64)
        layer.line(f"int64_t g = {g};")
        rounded = _rshift(layer, f"g * {c_int(c.multiplier)}", c.shift, 64)
        value = minus(rounded, -zy)
        layer.line(f"out0[{idx[0]}] = ({out.ctype})qc_clamp({value}, {lo}, {hi});")
        cl_bits = signed_bits(c.q_b, 0)
        l_bits = signed_bits(-(c.q_b * c.q_b + abs(c.q_c) + abs(c.q_one)), c.q_b * c.q_b + abs(c.q_c) + abs(c.q_one))
        layer.mul(cl_bits, cl_bits)
        layer.mul(q_bits, l_bits)
        layer.mul(max(2, q_bits + l_bits - c.pre_shift), signed_bits(0, abs(c.multiplier)))
        layer.luts(6 * 32 + 2 * (out.bits + 2))

    layer.nest(out.shape, views, body, depth=10)


@emitter("IntLayerNorm", domain=QC)
def int_layernorm(layer: Layer) -> None:
    """Integer LayerNorm over the last axis (see :func:`qcompiler.intops.int_layernorm`):
    ``μ = ⌊(2Σx + N) / 2N⌋``; ``σ = max(isqrt(⌊Σ(x−μ)² / N⌋ + eps_q), 1)``;
    ``n = ⌊(x−μ)·2^15 / σ⌋``; ``y = clamp(rshift_round(n·Γ_j + B_j, k) + zy)``."""
    x, out = layer.input(0), layer.output()
    zy = _zero_point(layer, 2)
    gamma = layer.const(3, "multiplier").astype(np.int64).reshape(-1)
    beta = layer.const(4, "bias").astype(np.int64).reshape(-1)
    shift, eps_q = int(layer.attr("shift", 0)), int(layer.attr("eps_q", 0))
    axis = layer.attr("axis", -1)
    if axis not in (-1, len(x.shape) - 1):
        raise layer.fail("IntLayerNorm normalises the last axis only")
    n = x.shape[-1]
    rows = x.size // max(n, 1)
    lo, hi = int_bounds(out.dtype)
    x_name = layer.ref(x)
    frac = intops.LAYERNORM_FRAC_BITS

    def param(values: np.ndarray, hint: str, j: str) -> str:
        if values.size == 1:
            return c_int(int(values[0]))
        if values.size != n:
            raise layer.fail(f"{hint} has {values.size} entries for {n} channels")
        return f"{layer.table(hint, values, 40, lanes=layer.unroll)}[{j}]"

    g_bits = signed_bits(int(gamma.min()), int(gamma.max()))
    c_bits = x.bits + 2

    def row(idx):
        base = idx[0]
        layer.line("int64_t total = 0;")

        def summe(_):
            layer.line(f"total += (int64_t){x_name}[{base} + {layer.loop_vars[0]}];")
            layer.luts(32)

        layer.nest((n,), [], summe, depth=2, merge=False)
        layer.line(f"int64_t mean = qc_floordiv(2 * total + {n}, {2 * n});")
        layer.line("int64_t squares = 0;")

        def variance(_):
            layer.line(f"int64_t c = (int64_t){x_name}[{base} + {layer.loop_vars[0]}] - mean;")
            layer.line("squares += c * c;")
            layer.mul(c_bits, c_bits)
            layer.luts(48 + c_bits)

        layer.nest((n,), [], variance, depth=4, merge=False)
        layer.line(f"int64_t sigma = qc_isqrt(squares / {n} + {c_int(eps_q)});")
        layer.line("if (sigma < 1) sigma = 1;")
        layer.cycles(32 + 48)  # isqrt (one bit per cycle) and the division by N
        layer.cost.divider(48)
        layer.luts(64 * 4)

        def normalise(_):
            j = layer.loop_vars[0]
            layer.line(f"int64_t c = (int64_t){x_name}[{base} + {j}] - mean;")
            layer.line(f"int64_t nv = qc_floordiv(c * {1 << frac}, sigma);")
            value = f"nv * {param(gamma, 'gamma', j)} + {param(beta, 'beta', j)}"
            rounded = _rshift(layer, value, shift, 64)
            full = minus(rounded, -zy)
            layer.line(f"out0[{base} + {j}] = ({out.ctype})qc_clamp({full}, {lo}, {hi});")
            layer.cost.divider(c_bits + frac, layer.lanes)
            layer.mul(frac + 2, g_bits)
            layer.luts(2 * 48 + 2 * (out.bits + 2))

        layer.nest((n,), [], normalise, depth=c_bits + frac + 8, merge=False)

    layer.nest((rows,), [View("out0", [n])], row, pipeline=False)


# -- reductions and pooling ----------------------------------------------------------------------------


@emitter("ReduceSum")
def reduce_sum(layer: Layer) -> None:
    """``y = Σ_axes x`` accumulated in int64 and wrapped to the type (numpy ``sum(dtype=x.dtype)``)."""
    x, out = layer.input(0), layer.output()
    axes = layer.const(1, "axes")
    axes = list(axes.reshape(-1)) if axes is not None else list(layer.attr("axes", []) or [])
    rank = len(x.shape)
    if not axes:
        if layer.attr("noop_with_empty_axes", 0):
            elementwise(layer, [x], lambda v: v[0], depth=1)
            return
        axes = list(range(rank))
    axes = sorted({_axis(int(a), rank, layer) for a in axes})
    kept = [d for d in range(rank) if d not in axes]
    sx = strides(x.shape)
    kept_shape = [x.shape[d] for d in kept]
    red_shape = [x.shape[d] for d in axes]
    x_name = layer.ref(x)
    acc_bits = min(out.bits, x.bits + max(1, math.prod(red_shape) - 1).bit_length())
    lanes = max(1, min(layer.unroll, red_shape[-1] if red_shape else 1))

    def row(idx):
        layer.line("int64_t acc = 0;")

        def add(inner):
            layer.line(f"acc += (int64_t){x_name}[{inner[0]}];")
            layer.luts(acc_bits)

        layer.nest(red_shape, [View(x_name, [sx[d] for d in axes], idx[1])], add, depth=2 + max(0, lanes - 1).bit_length())
        layer.line(f"out0[{idx[0]}] = ({out.ctype})acc;")

    layer.nest(kept_shape, [View("out0", strides(kept_shape)), View(x_name, [sx[d] for d in kept])], row, pipeline=False)


def maxpool_geometry(x_shape, attrs: dict) -> tuple[list[int], list[int]]:
    """``(output spatial dims, begin pads)`` of MaxPool as ``onnx.reference`` computes them."""
    kernel = list(attrs["kernel_shape"])
    rank = len(kernel)
    strides_ = list(attrs.get("strides") or [1] * rank)
    dilations = list(attrs.get("dilations") or [1] * rank)
    pads = list(attrs.get("pads") or [0] * (2 * rank))
    auto_pad = attrs.get("auto_pad", "NOTSET") or "NOTSET"
    if isinstance(auto_pad, bytes):
        auto_pad = auto_pad.decode()
    ceil_mode = int(attrs.get("ceil_mode", 0) or 0)
    spatial = list(x_shape[2:])
    out, heads = [], []
    for i in range(rank):
        effective = (kernel[i] - 1) * dilations[i] + 1
        total = spatial[i] + pads[i] + pads[i + rank] - effective
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            o = -(-spatial[i] // strides_[i]) if auto_pad == "SAME_UPPER" else spatial[i] // strides_[i]
            heads.append(((o - 1) * strides_[i] + effective - spatial[i]) // 2)
        elif auto_pad == "VALID":
            o = -(-(spatial[i] - effective + 1) // strides_[i])
            heads.append(0)
        else:
            if ceil_mode:
                o = -(-total // strides_[i]) + 1
                if (o - 1) * strides_[i] >= spatial[i] + pads[i]:
                    o -= 1
            else:
                o = total // strides_[i] + 1
            heads.append(pads[i])
        out.append(o)
    return out, heads


@emitter("MaxPool")
def max_pool(layer: Layer) -> None:
    """``y = max`` over the window's positions inside the input (padding never wins; a
    window with none gives 0, as ``onnx.reference`` does). The output-pixel loop is
    pipelined; the window loops unroll into a comparator tree."""
    x, out = layer.input(0), layer.output()
    if len(layer.node.outputs) > 1 and layer.node.outputs[1].name:
        raise layer.fail("the Indices output of MaxPool is not supported")
    attrs = {name: layer.attr(name) for name in ("kernel_shape", "strides", "dilations", "pads", "auto_pad", "ceil_mode")}
    attrs = {k: v for k, v in attrs.items() if v is not None}
    _, heads = maxpool_geometry(x.shape, attrs)
    kernel = list(attrs["kernel_shape"])
    rank = len(kernel)
    strides_ = list(attrs.get("strides") or [1] * rank)
    dilations = list(attrs.get("dilations") or [1] * rank)
    spatial, o_dims = list(x.shape[2:]), list(out.shape[2:])
    sx = strides(x.shape)
    nc = x.shape[0] * x.shape[1]
    x_name = layer.ref(x)
    views = [View("out0", [math.prod(o_dims)] + strides(o_dims)), View(x_name, [sx[1]] + [0] * rank)]

    def pixel(idx):
        o_vars = layer.loop_vars[1:]
        layer.line("int64_t best = 0;")
        layer.line("int found = 0;")
        for s in range(rank):
            layer.body.open(f"for (int k{s} = 0; k{s} < {kernel[s]}; k{s}++) {{")
            layer.line(f"int p{s} = {affine(o_vars[s], strides_[s], -heads[s])} + {affine(f'k{s}', dilations[s])};")
        cond = " && ".join(f"p{s} >= 0 && p{s} < {spatial[s]}" for s in range(rank))
        offset = " + ".join(affine(f"p{s}", sx[2 + s]) for s in range(rank))
        layer.body.open(f"if ({cond}) {{")
        layer.line(f"int64_t v = (int64_t){x_name}[{idx[1]} + {offset}];")
        layer.line("if (!found || v > best) best = v;")
        layer.line("found = 1;")
        layer.body.close()
        for _ in range(rank):
            layer.body.close()
        layer.line(f"out0[{idx[0]}] = ({out.ctype})(found ? best : 0);")
        layer.luts(math.prod(kernel) * (2 * x.bits + rank * 2 * 16))

    layer.nest([nc] + o_dims, views, pixel, depth=3 + math.prod(kernel).bit_length(), merge=False)


# -- data movement -------------------------------------------------------------------------------------


def _copy(layer: Layer, shape, dst: View, src: View) -> None:
    """A strided copy: one pipelined nest (address generation only)."""
    layer.nest(shape, [dst, src], lambda idx: layer.line(f"{dst.array}[{idx[0]}] = {src.array}[{idx[1]}];"), depth=2)


@emitter("Transpose")
def transpose(layer: Layer) -> None:
    x, out = layer.input(0), layer.output()
    perm = layer.attr("perm") or list(range(len(x.shape)))[::-1]
    sx = strides(x.shape)
    _copy(layer, out.shape, View("out0", strides(out.shape)), View(layer.ref(x), [sx[p] for p in perm]))


@emitter("Expand")
def expand(layer: Layer) -> None:
    x, out = layer.input(0), layer.output()
    _copy(layer, out.shape, View("out0", strides(out.shape)), View(layer.ref(x), broadcast_strides(x.shape, out.shape)))


@emitter("Concat")
def concat(layer: Layer) -> None:
    out = layer.output()
    axis = _axis(layer.attr("axis", 0), len(out.shape), layer)
    so = strides(out.shape)
    offset = 0
    for value in layer.node.inputs:
        part = layer.program.tensors[value.name]
        if part.size:
            _copy(layer, part.shape, View("out0", so, offset * so[axis]), View(layer.ref(part), strides(part.shape)))
        offset += part.shape[axis]


@emitter("Split")
def split(layer: Layer) -> None:
    x = layer.input(0)
    axis = _axis(layer.attr("axis", 0), len(x.shape), layer)
    sx = strides(x.shape)
    offset = 0
    for k, value in enumerate(layer.node.outputs):
        part = layer.program.tensors[value.name]
        if part.size:
            _copy(layer, part.shape, View(f"out{k}", strides(part.shape)), View(layer.ref(x), sx, offset * sx[axis]))
        offset += part.shape[axis]


@emitter("Slice")
def slice_(layer: Layer) -> None:
    """Strided copy: per axis ``(start, stop, step) = slice(s, e, st).indices(dim)`` (numpy's clamping)."""
    x, out = layer.input(0), layer.output()
    rank = len(x.shape)
    starts = list(layer.const(1, "starts").reshape(-1))
    ends = list(layer.const(2, "ends").reshape(-1))
    axes = layer.const(3, "axes")
    axes = list(range(len(starts))) if axes is None else [int(a) for a in axes.reshape(-1)]
    steps = layer.const(4, "steps")
    steps = [1] * len(starts) if steps is None else [int(s) for s in steps.reshape(-1)]
    sx = strides(x.shape)
    base, view_strides = 0, list(sx)
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis = _axis(axis, rank, layer)
        first, _, step = slice(int(start), int(end), step).indices(x.shape[axis])
        base += first * sx[axis]
        view_strides[axis] = step * sx[axis]
    _copy(layer, out.shape, View("out0", strides(out.shape)), View(layer.ref(x), view_strides, base))


@emitter("Gather")
def gather(layer: Layer) -> None:
    """``y[o, j, i] = data[o, index(ind[j]), i]`` (embedding lookups with run-time ids)."""
    data, ind = layer.input(0), layer.input(1)
    axis = _axis(layer.attr("axis", 0), len(data.shape), layer)
    outer, dim, inner = math.prod(data.shape[:axis]), data.shape[axis], math.prod(data.shape[axis + 1 :])
    count = ind.size
    shape = (outer, count, inner)
    views = [
        View("out0", [count * inner, inner, 1]),
        View(layer.ref(data), [dim * inner, 0, 1]),
        View(layer.ref(ind), [0, 1, 0]),
    ]

    def body(idx):
        layer.line(f"out0[{idx[0]}] = {views[1].array}[{idx[1]} + qc_index({views[2].array}[{idx[2]}], {dim})*{inner}];")
        layer.luts(64)

    layer.nest(shape, views, body, depth=3)


@emitter("GatherElements")
def gather_elements(layer: Layer) -> None:
    """``y[i] = data[i with i_axis ← index(ind[i])]``."""
    data, ind, out = layer.input(0), layer.input(1), layer.output()
    axis = _axis(layer.attr("axis", 0), len(data.shape), layer)
    sd = strides(data.shape)
    # indices read with broadcasting: the reference (take_along_axis) broadcasts them against the data
    ind_view = broadcast_strides(ind.shape, out.shape)
    data_view = [0 if d == axis else s for d, s in enumerate(broadcast_strides(data.shape, out.shape))]
    views = [View("out0", strides(out.shape)), View(layer.ref(data), data_view), View(layer.ref(ind), ind_view)]

    def body(idx):
        layer.line(
            f"out0[{idx[0]}] = {views[1].array}[{idx[1]} + qc_index({views[2].array}[{idx[2]}], {data.shape[axis]})*{sd[axis]}];"
        )
        layer.luts(64)

    layer.nest(out.shape, views, body, depth=3)


@emitter("GatherND")
def gather_nd(layer: Layer) -> None:
    """``y[b, p, :] = data[b, ind[b, p, 0], …, ind[b, p, r−1], :]`` with ``batch_dims = len(b)``."""
    data, ind = layer.input(0), layer.input(1)
    batch = int(layer.attr("batch_dims", 0))
    r = ind.shape[-1]
    sd, si = strides(data.shape), strides(ind.shape)
    slice_size = math.prod(data.shape[batch + r :])
    lead = list(ind.shape[:-1])
    shape = lead + [slice_size]
    data_view = [sd[d] if d < batch else 0 for d in range(len(lead))] + [1]
    views = [View("out0", strides(shape)), View(layer.ref(data), data_view), View(layer.ref(ind), si[:-1] + [0])]

    def body(idx):
        terms = [
            f"qc_index({views[2].array}[{idx[2]} + {j}], {data.shape[batch + j]})*{sd[batch + j]}" for j in range(r)
        ]
        layer.line(f"out0[{idx[0]}] = {views[1].array}[{' + '.join([idx[1]] + terms)}];")
        layer.luts(64 * r)

    layer.nest(shape, views, body, depth=3)


@emitter("Pad")
def pad(layer: Layer) -> None:
    """Per-axis source-index tables (``−1`` for a constant-filled position), one pipelined copy."""
    x, out = layer.input(0), layer.output()
    rank = len(x.shape)
    mode = layer.attr("mode", "constant")
    pads = layer.const(1, "pads")
    pads = [int(p) for p in (pads.reshape(-1) if pads is not None else layer.attr("pads", []))]
    value = layer.const(2, "constant value")
    fill = 0 if value is None or value.size == 0 else int(value.reshape(-1)[0])
    axes = layer.const(3, "axes")
    axes = list(range(rank)) if axes is None else [_axis(int(a), rank, layer) for a in axes.reshape(-1)]
    begin, end = [0] * rank, [0] * rank
    for k, axis in enumerate(axes):
        begin[axis], end[axis] = pads[k], pads[k + len(axes)]
    sx = strides(x.shape)
    maps = []
    for d in range(rank):
        dim, size = x.shape[d], out.shape[d]
        src = np.arange(size) - begin[d]
        if begin[d] == 0 and end[d] == 0:
            maps.append(None)
            continue
        if mode == "constant":
            src = np.where((src >= 0) & (src < dim), src, -1)
        elif mode == "edge":
            src = np.clip(src, 0, dim - 1)
        elif mode in ("reflect", "wrap") and begin[d] >= 0 and end[d] >= 0:
            src = np.pad(np.arange(dim), (begin[d], end[d]), mode=mode)
        else:
            raise layer.fail(f"mode '{mode}' with pads {pads} is not supported")
        maps.append(layer.table(f"pad{d}", src.astype(np.int32), 16))
    x_name = layer.ref(x)

    def body(idx):
        loop_vars = layer.loop_vars
        coords, checks = [], []
        for d in range(rank):
            if maps[d] is None:
                coords.append(affine(loop_vars[d], sx[d]))
                continue
            layer.line(f"int s{d} = {maps[d]}[{loop_vars[d]}];")
            coords.append(affine(f"s{d}", sx[d]))
            if mode == "constant":
                checks.append(f"s{d} >= 0")
        source = f"{x_name}[{' + '.join(coords) or '0'}]"
        if checks:
            layer.line(f"out0[{idx[0]}] = {' && '.join(checks)} ? {source} : ({out.ctype}){c_int(fill)};")
        else:
            layer.line(f"out0[{idx[0]}] = {source};")
        layer.luts(16 * rank + out.bits)

    layer.nest(out.shape, [View("out0", strides(out.shape))], body, depth=3, merge=False)
