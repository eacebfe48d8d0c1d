"""Scheduled int8 matmul kernels for aarch64: 4×4 dot products with ``sdot`` (Armv8.2
dotprod) or ``smull + saddlp + addp`` (Armv8.0 NEON), weights pre-packed at compile time."""

from __future__ import annotations

from ..common import SCHEDULED
from .intrinsics import dot_intrinsic


def dense_kernel(m: int, n: int, k: int, dot: str):
    """``C[m, n] = Σ_k A[m, k] · W[n/4, k/4, n%4, k%4]`` (int8 → int32), 4×4 dot-product tensorized."""
    from tvm import te

    a = te.placeholder((m, k), "int8", name="A")
    w = te.placeholder((n // 4, k // 4, 4, 4), "int8", name="W")
    r = te.reduce_axis((0, k), name="k")
    c = te.compute(
        (m, n), lambda i, j: te.sum(a[i, r].astype("int32") * w[j // 4, r // 4, j % 4, r % 4].astype("int32"), axis=r),
        name="C",
    )
    return _schedule_dot(te.create_prim_func([a, w, c]), dot)


def bmm_kernel(batch: int, m: int, n: int, k: int, dot: str):
    """``C[b, m, n] = Σ_k A[b, m, k] · B[b, k, n]`` (int8 → int32): B is packed to
    [b, n/4, k/4, 4, 4] in the kernel, then the product is 4×4 dot-product tensorized."""
    from tvm import te

    a = te.placeholder((batch, m, k), "int8", name="A")
    b = te.placeholder((batch, k, n), "int8", name="B")
    packed = te.compute(
        (batch, n // 4, k // 4, 4, 4), lambda q, jo, ro, ji, ri: b[q, ro * 4 + ri, jo * 4 + ji], name="B_packed"
    )
    r = te.reduce_axis((0, k), name="k")
    c = te.compute(
        (batch, m, n),
        lambda q, i, j: te.sum(a[q, i, r].astype("int32") * packed[q, j // 4, r // 4, j % 4, r % 4].astype("int32"), axis=r),
        name="C",
    )
    return _schedule_dot(te.create_prim_func([a, b, c]), dot)


def _schedule_dot(func, dot: str):
    """Tile rows by 4 and column groups by 4×4 (16 accumulators), tensorize the inner 4×4 dot."""
    import tvm

    intrinsic = dot_intrinsic(dot)
    sch = tvm.s_tir.Schedule(func)
    block = sch.get_sblock("C")
    loops = sch.get_loops(block)
    outer, (i, j, r) = loops[:-3], loops[-3:]
    rows = sch.get_sref(i).stmt.extent
    cols = sch.get_sref(j).stmt.extent // 4
    jo, ji = sch.split(j, [None, 4])
    ro, ri = sch.split(r, [None, 4])
    io, ii = sch.split(i, [None, 4]) if int(rows) % 4 == 0 else (i, None)
    joo, joi = sch.split(jo, [None, 4]) if int(cols) % 4 == 0 else (jo, None)
    order = [x for x in (*outer, io, joo, ro, ii, joi, ji, ri) if x is not None]
    sch.reorder(*order)
    sch.decompose_reduction(block, ro)
    sch.tensorize(ji, intrinsic)
    return sch.mod["main"].with_attr("op_pattern", 8).with_attr(SCHEDULED, True)  # opaque: kept out of fusion
