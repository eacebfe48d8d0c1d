"""Integer matmuls on the TVM targets: MatMulInteger and the IntMatMul override.

The dispatcher :func:`matmul_acc` picks, for ``(a − za) @ (b − zb)``: the scheduled int8
kernels (VNNI on x86, sdot/NEON on aarch64: :mod:`.vnni`, :mod:`.dot`), an int16 × int8
product split into two int8 products, or TVM's generic dense/batch-matmul kernels. Every
form is exact: int32 wraps like the exact sum, which fits by contract.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import math

import numpy as np
import onnx_ir as ir

from qcompiler.errors import TargetError
from qcompiler.graph import node_label
from qcompiler.opset import QC_DOMAIN

from ..common import column_view, narrowest, node_attr
from ..registry import lowers

if TYPE_CHECKING:
    from ..lowering import Lowerer
from .dot import bmm_kernel, dense_kernel
from .vnni import vnni_bmm_kernel, vnni_dense_kernel


@lowers("MatMulInteger")
@lowers("IntMatMul", domain=QC_DOMAIN)
def int_matmul(lo: Lowerer, node: ir.Node):
    a = lo.expr(node.inputs[0])
    b = lo.expr(node.inputs[1])
    za = lo.const(node.inputs[2]) if len(node.inputs) > 2 else None
    zb = lo.const(node.inputs[3]) if len(node.inputs) > 3 else None
    for i in (2, 3):
        if len(node.inputs) > i and node.inputs[i] is not None and lo.const(node.inputs[i]) is None:
            raise TargetError(f"{node_label(node)}: zero points must be compile-time constants")
    acc = node_attr(node, "acc_type", "int32") if node.op_type == "IntMatMul" else "int32"
    return matmul_acc(lo, a, b, za, zb, acc, lo.const(node.inputs[1]))


def matmul_acc(lo: Lowerer, a, b, za, zb, acc: str, b_const: np.ndarray | None):
    """``(a − za) @ (b − zb)`` accumulated in ``acc``.

    int32 products are written as dot products over a contiguous reduction axis
    (``[N, K]`` weights, TVM's ``dense``/``batch_matmul``), the form LLVM vectorises
    into ``sdot`` (LLVM alone does not reach ``vpdpbusd``); with ``int8_dot`` int8
    products use the scheduled kernels of :func:`_int8_dense`/:func:`_int8_batch_matmul`
    (``vnni``: :func:`_vnni_dense`, :func:`_vnni_bmm_kernel`). int32 wraps like the
    exact sum, which fits by contract.
    """
    from tvm import topi

    R = lo.R
    a_shape, b_shape = lo.shape(a), lo.shape(b)
    if lo.dtype(a) == "int16" and b_const is not None and len(b_shape) == 2 and np.size(za if za is not None else 0) <= 1:
        split = _int16_by_int8(lo, a, b_const, za, zb, acc)
        if split is not None:
            return split
    if lo.int8_dot == "vnni" and acc == "int32" and b_const is not None and len(b_shape) == 2:
        w_nk = _weights_nk(b_const, zb)  # any leading axes: the kernel keeps them (see _vnni_dense)
        if lo.dtype(a) in ("int8", "uint8") and w_nk.dtype == np.int8 and np.size(za if za is not None else 0) <= 1:
            return _vnni_dense(lo, a, w_nk, za)
    if acc == "int64":
        return lo.emit(R.matmul(lo.sub_zp(a, za), lo.sub_zp(b, zb), out_dtype="int64"))
    if za is not None and np.size(za) > 1:  # per-row activation zero point: plain widened matmul
        za = np.asarray(za).reshape(-1, 1)
        zb = None if zb is None else column_view(zb, len(b_shape))
        return lo.emit(R.matmul(_sub_narrow(lo, a, za), _sub_narrow(lo, b, zb), out_dtype="int32"))
    if b_const is not None and len(b_shape) == 2:
        w_nk = _weights_nk(b_const, zb)
        w = w_nk.T.astype(np.int64)
        flat = a if len(a_shape) == 2 else lo.emit(R.reshape(a, (math.prod(a_shape[:-1]), a_shape[-1])))
        scheduled = _int8_dense(lo, flat, w_nk, za) if lo.int8_dot else None
        if scheduled is not None:
            y = scheduled
        else:
            y = lo.emit_te(topi.nn.dense, flat, lo.const_expr(w_nk), None, "int32")
            if za is not None and np.any(za):  # (a − za)·W = a·W − za·colsum(W)
                colsum = (int(np.asarray(za).reshape(())) * w.sum(axis=0)).astype(np.int32)
                y = lo.emit(R.subtract(y, lo.relax.const(colsum, "int32")))
        if len(a_shape) != 2:
            y = lo.emit(R.reshape(y, (*a_shape[:-1], b_shape[-1])))
        return y
    if lo.int8_dot:
        scheduled = _int8_batch_matmul(lo, a, b, za, zb)
        if scheduled is not None:
            return scheduled
    a = _sub_narrow(lo, a, za)
    b = _sub_narrow(lo, b, None if zb is None else column_view(zb, len(b_shape)))
    if len(a_shape) >= 3 and len(b_shape) == len(a_shape) and a_shape[:-2] == b_shape[:-2]:
        batch = math.prod(a_shape[:-2])
        a3 = lo.emit(R.reshape(a, (batch, *a_shape[-2:])))
        b3 = lo.emit(R.permute_dims(lo.emit(R.reshape(b, (batch, *b_shape[-2:]))), [0, 2, 1]))
        y = lo.emit_te(topi.nn.batch_matmul, a3, b3, None, "int32")
        return lo.emit(R.reshape(y, (*a_shape[:-1], b_shape[-1])))
    if len(b_shape) == 2:
        flat = a if len(a_shape) == 2 else lo.emit(R.reshape(a, (math.prod(a_shape[:-1]), a_shape[-1])))
        y = lo.emit_te(topi.nn.dense, flat, lo.emit(R.permute_dims(b, [1, 0])), None, "int32")
        return y if len(a_shape) == 2 else lo.emit(R.reshape(y, (*a_shape[:-1], b_shape[-1])))
    return lo.emit(R.matmul(a, b, out_dtype="int32"))


def _weights_nk(b_const: np.ndarray, zb) -> np.ndarray:
    """``(W − zb)ᵀ`` [N, K] of constant [K, N] weights, in the narrowest integer type that holds it."""
    w = b_const.astype(np.int64)
    if zb is not None and np.any(zb):
        w = w - column_view(zb, 2).astype(np.int64)
    return np.ascontiguousarray(w.T).astype(narrowest(w))


def _int16_by_int8(lo: Lowerer, a, b_const: np.ndarray, za, zb, acc: str):
    """``(a − za) @ W`` for int16 ``a`` and an int8 constant ``W`` as one int8 matmul of twice
    the rows: ``a = 256·hi + lo`` with ``hi = a >> 8`` and ``lo − 128`` both int8, so
    ``(a − za)·W = 256·(hi·W) + (lo − 128)·W + (128 − za)·colsum(W)``. Each int8 product
    fits int32; the combination is done in ``acc`` (int64, or int32 where the result
    fits by contract). None if W does not fit int8."""
    R = lo.R
    w = b_const.astype(np.int64)
    if zb is not None and np.any(zb):
        w = w - column_view(zb, 2).astype(np.int64)
    if w.size == 0 or w.min() < -128 or w.max() > 127:
        return None
    if lo.int8_dot == "vnni":  # the kernel splits the rows itself, next to its products
        return _vnni_dense(lo, a, np.ascontiguousarray(w.T).astype(np.int8), za, acc)
    a_shape = lo.shape(a)
    rows, k, n = math.prod(a_shape[:-1]), a_shape[-1], w.shape[1]
    flat = lo.emit(R.reshape(a, (rows, k)))
    hi = lo.emit(R.astype(lo.emit(R.right_shift(flat, lo.relax.const(np.int16([8]), "int16"))), "int8"))
    low = lo.emit(R.bitwise_and(flat, lo.relax.const(np.int16([255]), "int16")))
    low = lo.emit(R.astype(lo.emit(R.subtract(low, lo.relax.const(np.int16([128]), "int16"))), "int8"))
    both = lo.emit(R.concat([hi, low], axis=0))
    y = matmul_acc(lo, both, lo.const_expr(w.astype(np.int8)), None, None, "int32", w.astype(np.int8))
    y_hi = lo.emit(R.strided_slice(y, axes=[0], begin=[0], end=[rows]))
    y_lo = lo.emit(R.strided_slice(y, axes=[0], begin=[rows], end=[2 * rows]))
    z = 0 if za is None else int(np.asarray(za).reshape(()))
    colsum = (128 - z) * w.sum(axis=0)
    if acc == "int64":
        y_hi, y_lo = lo.emit(R.astype(y_hi, "int64")), lo.emit(R.astype(y_lo, "int64"))
        out = lo.emit(R.add(lo.emit(R.multiply(y_hi, lo.c64(256))), y_lo))
        out = lo.emit(R.add(out, lo.relax.const(colsum.astype(np.int64), "int64")))
    else:  # int32 wraps like the exact sum, which fits by contract
        out = lo.emit(R.add(lo.emit(R.left_shift(y_hi, lo.relax.const(np.int32([8]), "int32"))), y_lo))
        out = lo.emit(R.add(out, lo.relax.const(colsum.astype(np.int64).astype(np.int32), "int32")))
    return lo.emit(R.reshape(out, (*a_shape[:-1], n)))


def _signed8(lo: Lowerer, x, zp):
    """An int8 view of an 8-bit tensor and its zero point: uint8 ``x`` becomes ``x − 128``
    (so ``x − zp = (x − 128) − (zp − 128)``); None for wider types."""
    dtype = lo.dtype(x)
    zp = 0 if zp is None else int(np.asarray(zp).reshape(()))
    if dtype == "int8":
        return x, zp
    if dtype != "uint8":
        return None
    R = lo.R
    shifted = lo.emit(R.subtract(lo.emit(R.astype(x, "int16")), lo.relax.const(np.int16(128), "int16")))
    return lo.emit(R.astype(shifted, "int8")), zp - 128


def _unsigned8(lo: Lowerer, x, zp):
    """A uint8 view of an 8-bit tensor and its zero point: int8 ``x`` becomes ``x + 128``
    (flipping the sign bit), so ``x − zp = (x + 128) − (zp + 128)``; None for wider types."""
    dtype = lo.dtype(x)
    zp = 0 if zp is None else int(np.asarray(zp).reshape(()))
    if dtype == "uint8":
        return x, zp
    if dtype != "int8":
        return None
    R = lo.R
    flipped = lo.emit(R.bitwise_xor(x, lo.relax.const(np.array([-128], np.int8), "int8")))
    return lo.emit(R.astype(flipped, "uint8")), zp + 128


def _sub_narrow(lo: Lowerer, x, zp):
    """``x − zp`` in the narrowest type that holds it (the input type when zp is 0)."""
    if zp is None or not np.any(zp):
        return x
    dtype = lo.dtype(x)
    wide = "int16" if np.dtype(dtype).itemsize == 1 else "int32"
    x = lo.emit(lo.R.astype(x, wide))
    zp = np.asarray(zp).astype(wide)
    return lo.emit(lo.R.subtract(x, lo.relax.const(zp.reshape(1) if zp.ndim == 0 else zp, wide)))


def _int8_dense(lo: Lowerer, a, w_nk: np.ndarray, za):
    """``(a − za) · w_nkᵀ`` for int8/uint8 ``a`` [M, K] and int8 constant ``w_nk`` [N, K] with a
    scheduled dot-product kernel (weights pre-packed to [N/4, K/4, 4, 4]); None if it does not apply."""
    R = lo.R
    if lo.dtype(a) not in ("int8", "uint8"):
        return None
    if w_nk.dtype != np.int8 or (za is not None and np.size(za) > 1):
        lo.int8_fallback.append(lo.node_name)
        return None
    if lo.int8_dot == "vnni":
        return _vnni_dense(lo, a, w_nk, za)
    a, z = _signed8(lo, a, za)
    m, k = lo.shape(a)
    n = w_nk.shape[0]
    n4, k4 = -(-n // 4) * 4, -(-k // 4) * 4
    if k4 != k:
        a = lo.emit(R.nn.pad(a, [0, 0, 0, k4 - k]))
    padded = np.zeros((n4, k4), np.int8)
    padded[:n, :k] = w_nk
    packed = np.ascontiguousarray(padded.reshape(n4 // 4, 4, k4 // 4, 4).transpose(0, 2, 1, 3))
    kernel = _int8_kernel(lo, "dense", (m, n4, k4))
    y = lo.emit(lo.relax.call_tir(kernel, [a, lo.const_expr(packed)], lo.relax.TensorType((m, n4), "int32")))
    if n4 != n:
        y = lo.emit(R.strided_slice(y, axes=[1], begin=[0], end=[n]))
    if z:
        colsum = (z * w_nk.astype(np.int64).sum(axis=1)).astype(np.int32)
        y = lo.emit(R.subtract(y, lo.relax.const(colsum, "int32")))
    return y


def _int8_batch_matmul(lo: Lowerer, a, b, za, zb):
    """``(a − za) @ (b − zb)`` for 8-bit activations ``a`` [..., M, K], ``b`` [..., K, N] with
    scalar zero points: the scheduled kernel (K and N zero-padded to multiples of 4) plus
    row/column-sum corrections; None if it does not apply."""
    R = lo.R
    a_shape, b_shape = lo.shape(a), lo.shape(b)
    if lo.dtype(a) not in ("int8", "uint8") or lo.dtype(b) not in ("int8", "uint8"):
        return None
    if (
        np.size(za if za is not None else 0) > 1 or np.size(zb if zb is not None else 0) > 1
        or len(a_shape) < 2 or len(a_shape) != len(b_shape) or a_shape[:-2] != b_shape[:-2]
    ):
        lo.int8_fallback.append(lo.node_name)
        return None
    if lo.int8_dot == "vnni":
        (a, za), (b, zb) = _unsigned8(lo, a, za), _signed8(lo, b, zb)
        return _vnni_batch_matmul(lo, a, b, za, zb)
    (a, za), (b, zb) = _signed8(lo, a, za), _signed8(lo, b, zb)
    batch = math.prod(a_shape[:-2])
    m, k = a_shape[-2:]
    n = b_shape[-1]
    a3 = lo.emit(R.reshape(a, (batch, m, k)))
    b3 = lo.emit(R.reshape(b, (batch, k, n)))
    k4, n4 = -(-k // 4) * 4, -(-n // 4) * 4
    a_in = lo.emit(R.nn.pad(a3, [0, 0, 0, 0, 0, k4 - k])) if k4 != k else a3  # zero products
    b_in = lo.emit(R.nn.pad(b3, [0, 0, 0, k4 - k, 0, n4 - n])) if (k4, n4) != (k, n) else b3
    kernel = _int8_kernel(lo, "bmm", (batch, m, n4, k4))
    y = lo.emit(lo.relax.call_tir(kernel, [a_in, b_in], lo.relax.TensorType((batch, m, n4), "int32")))
    if n4 != n:
        y = lo.emit(R.strided_slice(y, axes=[2], begin=[0], end=[n]))
    def i32(value):  # (1,)-shaped: a kernel argument, not an immediate (see Lowerer.c64)
        return lo.relax.const(np.array([value], np.int32), "int32")

    if zb:  # − zb·Σ_k a
        rows = lo.emit(R.sum(lo.emit(R.astype(a3, "int32")), axis=[2], keepdims=True))
        y = lo.emit(R.subtract(y, lo.emit(R.multiply(rows, i32(zb)))))
    if za:  # − za·Σ_k b
        cols = lo.emit(R.sum(lo.emit(R.astype(b3, "int32")), axis=[1], keepdims=True))
        y = lo.emit(R.subtract(y, lo.emit(R.multiply(cols, i32(za)))))
    if za and zb:
        y = lo.emit(R.add(y, i32(k * za * zb)))
    return lo.emit(R.reshape(y, (*a_shape[:-1], n)))


def _int8_kernel(lo: Lowerer, kind: str, shape: tuple[int, ...]):
    """The GlobalVar of a scheduled int8 kernel (built once per kind and shape)."""
    key = (kind, shape, lo.int8_dot)
    gvar = lo.kernel_vars.get(key)
    if gvar is None:
        name = f"qc_int8_{kind}_{'x'.join(map(str, shape))}_{lo.int8_dot}"
        if lo.int8_dot == "vnni":
            if kind.startswith("bmm"):
                func = vnni_bmm_kernel(shape[:-3], *shape[-3:], zero_points=kind[len("bmm"):])
            else:
                func = vnni_dense_kernel(shape[:-2], shape[-2], shape[-1], kind)
        else:
            func = dense_kernel(*shape, lo.int8_dot) if kind == "dense" else bmm_kernel(*shape, lo.int8_dot)
        if lo.int8_dot != "vnni":  # opaque, scheduled: a symbol of its own
            func = func.with_attr("global_symbol", name)
        else:
            func = func.without_attr("global_symbol")
        gvar = lo.bb.add_func(func, name)  # the dense ones: private, fused with their epilogues
        lo.kernel_vars[key] = gvar
        lo.int8_kernels[name] = []
    lo.int8_kernels[gvar.name_hint].append(lo.node_name)
    return gvar


def _vnni_dense(lo: Lowerer, a, w_nk: np.ndarray, za, acc: str = "int32"):
    """``(a − za) · w_nkᵀ`` over the last axis of ``a`` [..., K] with the VNNI kernel, the
    result shaped [..., N] (no reshape between the kernel and its consumers, so Relax fuses
    the following element-wise chain, e.g. bias and requantize, into the kernel's epilogue).

    8-bit ``a`` is read as uint8 (``a + 128`` for int8); int16 ``a`` is split inside the
    kernel into two uint8 halves ``a = 256·(h + 128) + l − 32768`` (``h = a >> 8``,
    ``l = a & 255``), two products of the same packed weights. The weights (minus their zero
    points) are pre-packed to [N/16, K/4, 16, 4] (N, K zero-padded) and the zero-point
    correction ``z'·colsum(W)`` (``z' = za + 128`` for int8, ``za + 32768`` for int16) is
    subtracted in the epilogue. ``acc`` int64 (int16 only): the halves are combined in int64."""
    R = lo.R
    wide = lo.dtype(a) == "int16"
    if wide:
        z = 0 if za is None else int(np.asarray(za).reshape(()))
        z += 32768
    else:
        a, z = _unsigned8(lo, a, za)
        acc = "int32"
    shape = lo.shape(a)
    lead, k = shape[:-1], shape[-1]
    n = w_nk.shape[0]
    n16, k4 = -(-n // 16) * 16, -(-k // 4) * 4
    if k4 != k:  # zero columns meet zero weights (and an int16 zero's halves meet zero weights too)
        a = lo.emit(R.nn.pad(a, [0, 0] * len(lead) + [0, k4 - k]))
    padded = np.zeros((n16, k4), np.int8)
    padded[:n, :k] = w_nk
    packed = np.ascontiguousarray(padded.reshape(n16 // 16, 16, k4 // 4, 4).transpose(0, 2, 1, 3))
    corr = np.zeros(n16, np.int64)
    corr[:n] = z * w_nk.astype(np.int64).sum(axis=1)
    kind = "dense" if not wide else ("dense_i16" if acc == "int32" else "dense_i16_acc64")
    kernel = _int8_kernel(lo, kind, (*lead, n16, k4))
    args = [a, lo.const_expr(packed), lo.relax.const(corr.astype(acc), acc)]  # int32: wraps like the exact sum
    y = lo.emit(lo.relax.call_tir(kernel, args, lo.relax.TensorType((*lead, n16), acc)))
    if n16 != n:
        y = lo.emit(R.strided_slice(y, axes=[len(lead)], begin=[0], end=[n]))
    return y


def _vnni_batch_matmul(lo: Lowerer, a, b, za: int, zb: int):
    """``(a − za) @ (b − zb)`` for uint8 ``a`` [..., M, K] and int8 ``b`` [..., K, N] (both
    activations) with the VNNI batch kernel, shaped [..., M, N] so that Relax fuses what
    follows into it; the zero-point corrections ``− zb·Σ_k a − za·Σ_k b + K·za·zb`` are
    applied in its epilogue (the sums are small reductions of their own). ``K``/``N`` are
    zero-padded to multiples of 4/16: zero products, and the sums see only zeros there."""
    R = lo.R
    a_shape, b_shape = lo.shape(a), lo.shape(b)
    *batch, m, k = a_shape
    n = b_shape[-1]
    k4, n16 = -(-k // 4) * 4, -(-n // 16) * 16
    unpadded = [0, 0] * (len(a_shape) - 1)
    a_in = lo.emit(R.nn.pad(a, [*unpadded, 0, k4 - k])) if k4 != k else a
    b_in = lo.emit(R.nn.pad(b, [*unpadded[:-2], 0, k4 - k, 0, n16 - n])) if (k4, n16) != (k, n) else b
    kind = "bmm" + ("_za" if za else "") + ("_zb" if zb else "")
    args = [a_in, b_in]
    if zb:
        args.append(lo.emit(R.sum(lo.emit(R.astype(a, "int32")), axis=[-1])))  # [..., M]
    if za:
        args.append(lo.emit(R.sum(lo.emit(R.astype(b_in, "int32")), axis=[-2])))  # [..., N16]
    if za or zb:
        args.append(lo.relax.const(np.array([za, zb, k * za * zb], np.int64).astype(np.int32), "int32"))
    kernel = _int8_kernel(lo, kind, (*batch, m, n16, k4))
    y = lo.emit(lo.relax.call_tir(kernel, args, lo.relax.TensorType((*batch, m, n16), "int32")))
    if n16 != n:
        y = lo.emit(R.strided_slice(y, axes=[len(batch) + 1], begin=[0], end=[n]))
    return y
