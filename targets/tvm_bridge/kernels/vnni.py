"""Scheduled int8 matmul kernels for x86 AVX-512 VNNI (``vpdpbusd``, u8 × s8 → s32) with
fused epilogues: the TE kernels are emitted unscheduled and out-element-wise fusable, Relax
fuses the element-wise chain after a product (bias, requantize, residual add, GELU,
lookups) into the kernel, and :func:`schedule_dot_kernels` writes it tile by tile from
the accumulators. (The Relax-level emitters are in :mod:`.matmul`.)"""

from __future__ import annotations

from ..common import DOT_BLOCK, LOOKUP_BLOCK, SCHEDULED, extents
from ..schedules import Fallbacks, _reason
from .intrinsics import dot_intrinsic


#: Register tile of the VNNI kernels: up to this many rows × 16-column groups of int32
#: accumulators (at most 4 × 4 zmm registers), each updated by one ``vpdpbusd`` per 4 of K.
_VNNI_ROWS = (4, 3, 2, 1)


_VNNI_GROUPS = (4, 3, 2, 1)


#: Vector registers of AVX-512. The largest tile is taken whose ``rows × groups``
#: accumulators, ``groups`` weight vectors, ``rows`` broadcasts and the epilogue's scalar
#: constants (LLVM hoists their broadcasts out of all loops) fit: otherwise LLVM spills
#: accumulators to the stack inside the K loop (a fused integer GELU: 413 → 225 µs).
_ZMM_REGISTERS = 32


def vnni_dense_kernel(lead: tuple[int, ...], n: int, k: int, kind: str):
    """``D[..., n] = Σ_k A[..., k] · W[n/16, k/4, n%16, k%4] − corr[n]`` (u8 × s8 → int32);
    ``dense_i16*``: ``A`` int16, ``D = 256·C_hi + C_lo − corr`` over its two uint8 halves.
    Unscheduled, and marked out-element-wise fusable: see :func:`schedule_dot_kernels`."""
    from tvm import te

    wide = kind != "dense"
    acc = "int64" if kind.endswith("acc64") else "int32"
    a = te.placeholder(extents(*lead, k), "int16" if wide else "uint8", name="A")
    w = te.placeholder(extents(n // 16, k // 4, 16, 4), "int8", name="W")
    corr = te.placeholder(extents(n), acc, name="corr")
    r = te.reduce_axis(extents(0, k), name="k")

    def weight(j):
        return w[j // 16, r // 4, j % 16, r % 4].astype("int32")

    if not wide:
        c = te.compute(
            extents(*lead, n), lambda *ij: te.sum(a[(*ij[:-1], r)].astype("int32") * weight(ij[-1]), axis=r),
            name="C", attrs={DOT_BLOCK: kind},
        )
        d = te.compute(extents(*lead, n), lambda *ij: c[ij] - corr[ij[-1]], name="D")
    else:  # row 2i holds h + 128 of row i, row 2i + 1 its l (both uint8): a tile has both halves
        *batch, rows = lead
        halves = te.compute(
            extents(*batch, 2 * rows, k),
            lambda *qk: te.if_then_else(
                qk[-2] % 2 == 0,
                ((a[(*qk[:-2], qk[-2] // 2, qk[-1])] >> 8) + 128).astype("uint8"),
                (a[(*qk[:-2], qk[-2] // 2, qk[-1])] & 255).astype("uint8"),
            ),
            name="A_halves",
        )
        c = te.compute(
            extents(*batch, 2 * rows, n),
            lambda *qj: te.sum(halves[(*qj[:-1], r)].astype("int32") * weight(qj[-1]), axis=r),
            name="C", attrs={DOT_BLOCK: kind},
        )
        d = te.compute(
            extents(*lead, n),
            lambda *ij: (c[(*ij[:-2], 2 * ij[-2], ij[-1])].astype(acc) << 8)
            + c[(*ij[:-2], 2 * ij[-2] + 1, ij[-1])].astype(acc) - corr[ij[-1]],
            name="D",
        )
    return te.create_prim_func([a, w, corr, d]).with_attr("op_pattern", 4)  # kOutEWiseFusable


def vnni_bmm_kernel(batch: tuple[int, ...], m: int, n: int, k: int, zero_points: str = ""):
    """``D[..., i, j] = Σ_k A[..., i, k] · B[..., k, j] − zb·rows[..., i] − za·cols[..., j]
    + K·za·zb`` (u8 × s8 → int32; ``z = [za, zb, K·za·zb]``; the terms that ``zero_points``
    names, ``_za`` and/or ``_zb``, with the sums ``rows = Σ_k A``, ``cols = Σ_k B`` as
    inputs): each batch's B is packed to [n/16, k/4, 16, 4] next to its products.
    Unscheduled and out-element-wise fusable, like :func:`vnni_dense_kernel`."""
    from tvm import te

    a = te.placeholder(extents(*batch, m, k), "uint8", name="A")
    b = te.placeholder(extents(*batch, k, n), "int8", name="B")
    packed = te.compute(
        extents(*batch, n // 16, k // 4, 16, 4),
        lambda *q: b[(*q[:-4], q[-3] * 4 + q[-1], q[-4] * 16 + q[-2])], name="B_packed",
    )
    r = te.reduce_axis(extents(0, k), name="k")
    c = te.compute(
        extents(*batch, m, n),
        lambda *qij: te.sum(
            a[(*qij[:-1], r)].astype("int32")
            * packed[(*qij[:-2], qij[-1] // 16, r // 4, qij[-1] % 16, r % 4)].astype("int32"),
            axis=r,
        ),
        name="C", attrs={DOT_BLOCK: "bmm"},
    )
    params = [a, b]
    rows = te.placeholder(extents(*batch, m), "int32", name="rows") if "_zb" in zero_points else None
    cols = te.placeholder(extents(*batch, n), "int32", name="cols") if "_za" in zero_points else None
    params += [t for t in (rows, cols) if t is not None]
    z = te.placeholder(extents(3), "int32", name="z") if zero_points else None
    params += [z] if z is not None else []

    def corrected(*qij):
        v = c[qij]
        if rows is not None:
            v = v - z[1] * rows[qij[:-1]]
        if cols is not None:
            v = v - z[0] * cols[(*qij[:-2], qij[-1])]
        return v + z[2] if rows is not None and cols is not None else v

    d = te.compute(extents(*batch, m, n), corrected, name="D")
    return te.create_prim_func([*params, d]).with_attr("op_pattern", 4)  # kOutEWiseFusable


def _dot_block(sch):
    """The block annotated :data:`DOT_BLOCK` in a kernel (None if there is none)."""
    root = sch.get_sblock("root")
    stack = list(sch.get_child_blocks(root))
    while stack:
        block = stack.pop()
        if DOT_BLOCK in sch.get(block).annotations:
            return block
        stack.extend(sch.get_child_blocks(block))
    return None


def has_dot_block(func) -> bool:
    import tvm

    return _dot_block(tvm.s_tir.Schedule(func)) is not None


def schedule_dot_kernels(mod, fallbacks: Fallbacks | None = None):
    """Schedule every kernel of a fused Relax module that holds a VNNI dense product (the
    product, and whatever element-wise consumers Relax fused into it as its epilogue). An
    epilogue this schedule does not foresee leaves the kernel to the generic CPU schedule
    (slower, still exact), recorded in ``fallbacks``."""
    import tvm

    mod = mod.clone()
    for gvar, func in list(mod.functions.items()):
        if isinstance(func, tvm.tirx.PrimFunc) and not (func.attrs and SCHEDULED in func.attrs):
            if has_dot_block(func):
                try:
                    mod[gvar] = _schedule_vnni(func)
                except Exception as exc:  # noqa: BLE001
                    if fallbacks is not None:
                        fallbacks.add(gvar.name_hint, "VNNI kernel schedule", "generic CPU schedule", _reason(exc))
    return mod


def _fold_epilogue(sch, keep, stay=frozenset()) -> list:
    """Inline every block but ``keep`` and ``stay`` into its consumers, so that what Relax
    fused after the product (bias, requantize, a residual add and its other operand's chain,
    ...) collapses into the kernel's output blocks; returns the blocks left that read the
    product (``stay`` among them)."""
    root = sch.get_sblock("root")
    progress = True
    while progress:
        progress = False
        for block in sch.get_child_blocks(root):
            if sch.get(block).name_hint in {*keep, *stay}:
                continue
            try:
                sch.compute_inline(block)
            except Exception:  # noqa: BLE001 - an output block, or not element-wise
                continue
            progress = True
            break
    return [b for b in sch.get_child_blocks(root) if sch.get(b).name_hint not in keep]


def _lookup_indices(sch) -> set[str]:
    """Names of the blocks that compute the indices of a kernel's ``IntLookup`` tables."""
    root = sch.get_sblock("root")
    return {
        sch.get(producer).name_hint
        for block in sch.get_child_blocks(root) if sch.get(block).name_hint.startswith(LOOKUP_BLOCK)
        for producer in sch.get_producers(block)
    }


def _scalar_operands(sch, blocks) -> int:
    """How many distinct one-element buffers (a requantize's multiplier, a GELU's constants)
    ``blocks`` read: LLVM keeps each broadcast in a vector register across the whole kernel."""
    names = set()
    for block in blocks:
        for region in sch.get(block).reads:
            if all(int(getattr(d, "value", 2)) == 1 for d in region.source.shape):
                names.add(region.source.name)
    return len(names)


def _vectorize_innermost(sch, block, lanes: int) -> None:
    """Vectorise a block's innermost loop in chunks of ``lanes`` (a whole long row as one
    LLVM vector is split back into bytes and spilled)."""
    loop = sch.get_loops(block)[-1]
    extent = int(sch.get(loop).extent)
    if extent > lanes and extent % lanes == 0:
        loop = sch.split(loop, [None, lanes])[1]
    sch.vectorize(loop)


def _schedule_vnni(func):
    """Tile ``rows × groups`` of 16 columns (int32 accumulators kept in a local tile, as large
    as the registers left by the epilogue's constants allow: see ``_ZMM_REGISTERS``), reduce
    over K in steps of 4 with the 16×4 ``vpdpbusd`` intrinsic, write the tile back through
    the vectorised epilogue ``D`` (with the element-wise consumers fused into the kernel
    folded into it: no pass over int32 accumulators in memory); the outermost loop runs in
    parallel. ``dense_i16*``: each tile holds both halves' accumulators, and the uint8 halves
    of the tile's rows are made next to it."""
    import tvm

    intrinsic = dot_intrinsic("vnni")
    sch = tvm.s_tir.Schedule(func)
    block = _dot_block(sch)
    kind = str(sch.get(block).annotations[DOT_BLOCK])
    loops = sch.get_loops(block)
    producers = [sch.get(p).name_hint for p in sch.get_producers(block)]
    keep = {sch.get(block).name_hint, *producers}
    indices = _lookup_indices(sch) - keep
    epilogues = _fold_epilogue(sch, keep, indices)
    outer, (i, j, r) = loops[:-3], loops[-3:]  # batch (bmm) or leading axes (dense)
    n_rows = int(sch.get_sref(i).stmt.extent)
    groups = int(sch.get_sref(j).stmt.extent) // 16
    halves = kind.startswith("dense_i16")  # rows come in (high, low) pairs: a tile takes both
    scalars = _scalar_operands(sch, epilogues)
    mr, nr = max(
        ((x, y) for x in _VNNI_ROWS for y in _VNNI_GROUPS
         if n_rows % x == 0 and (x % 2 == 0 or not halves) and groups % y == 0
         and x * y + x + y + scalars <= _ZMM_REGISTERS),
        key=lambda tile: (tile[0] * tile[1], tile[0]), default=(1, 1) if not halves else (2, 1),
    )
    jo, ji = sch.split(j, [None, 16])
    ro, ri = sch.split(r, [None, 4])
    io, ii = sch.split(i, [None, mr])
    joo, joi = sch.split(jo, [None, nr])
    sch.reorder(*outer, io, joo, ro, ii, joi, ji, ri)
    tiled = []  # written tile by tile, from the accumulators
    for epilogue in epilogues:
        try:
            sch.reverse_compute_at(epilogue, joo)
        except Exception:  # noqa: BLE001 - not element-wise over the product: runs after it
            continue
        tiled.append(epilogue)
    sch.set_scope(block, 0, "local")
    if kind == "bmm":  # pack this batch's B once, next to its products
        batch = sch.fuse(*outer) if len(outer) > 1 else outer[0]
        packed = sch.get_sblock("B_packed")
        sch.compute_at(packed, batch)
        sch.vectorize(sch.get_loops(packed)[-1])
        sch.parallel(batch)
    else:
        if halves:  # this row tile's halves, made by the thread that uses them
            split = sch.get_producers(block)[0]
            sch.compute_at(split, io)
            _vectorize_innermost(sch, split, 64)
        sch.parallel(sch.fuse(*outer, io) if outer else io)
    sch.unroll(ii)
    sch.unroll(joi)
    init = sch.decompose_reduction(block, ro)
    sch.tensorize(ji, intrinsic)
    sch.vectorize(sch.get_loops(init)[-1])
    for epilogue in tiled:
        if indices and sch.get(epilogue).name_hint not in indices:
            # it reads a table at computed indices: a vector gather would be built lane by
            # lane (a serial chain of inserts); scalar loads from the indices are faster
            sch.unroll(sch.get_loops(epilogue)[-1])
        else:
            _vectorize_innermost(sch, epilogue, 16)
    for rest in epilogues:
        if rest not in tiled:
            rest_loops = sch.get_loops(rest)
            if rest_loops:
                sch.parallel(rest_loops[0])
    return sch.mod["main"].with_attr(SCHEDULED, True)
