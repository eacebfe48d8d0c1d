"""Relax fusion and the default CPU schedule of every fused kernel without one of its own.

Schedules never change results (loop order within a reduction is untouched); a kernel
that a schedule cannot handle keeps a simpler one, and every such fallback is recorded
(:class:`Fallbacks`: the manifest's ``schedule_fallbacks`` and the report list them).
"""

from __future__ import annotations

import dataclasses

from . import adapter
from .common import ELEMENT_WISE, SCHEDULED, tvm


@dataclasses.dataclass
class Fallbacks:
    """Kernels that got a simpler schedule than planned: ``(kernel, planned, used, reason)``."""

    entries: list[dict] = dataclasses.field(default_factory=list)

    def add(self, kernel: str, planned: str, used: str, reason: str) -> None:
        entry = {"kernel": kernel, "planned": planned, "used": used, "reason": reason}
        if entry not in self.entries:
            self.entries.append(entry)

    def __bool__(self) -> bool:
        return bool(self.entries)


def _reason(exc: BaseException) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[-1][:200] if lines else ''}".strip()


def fuse(mod):
    """Relax's kernel fusion (the ``zero`` pipeline: legalize, annotate op patterns, fold
    constants, fuse), with :data:`ELEMENT_WISE` kernels marked element-wise, then the
    kernels fused away dropped."""
    tvm_, relax = tvm()

    @tvm_.transform.module_pass(opt_level=0, name="MarkElementWise")
    def mark_element_wise(mod, _ctx):
        for gvar, func in list(mod.functions.items()):
            if isinstance(func, tvm_.tirx.PrimFunc) and func.attrs and ELEMENT_WISE in func.attrs:
                mod[gvar] = func.with_attr("op_pattern", 0)  # kElemWise
        return mod

    return tvm_.transform.Sequential([
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),  # an op_pattern of 0 reads as unset: re-marked below
        mark_element_wise,
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
        relax.transform.DeadCodeElimination(["main"]),
    ])(mod)


#: Below this many output elements a kernel runs on one thread (fork/join costs more).
_PARALLEL_MIN_ELEMENTS = 4096


def schedule_cpu(mod, *, vectorize: bool = True, fallbacks: Fallbacks | None = None):
    """Schedule every fused kernel that has no schedule of its own for a multi-core CPU:
    inline the element-wise producers into their consumers (no intermediate buffers),
    then run the fused spatial loop in parallel and the innermost spatial chunk as SIMD.
    Loop order within a reduction is untouched, so results are bit-identical. A kernel
    this schedule cannot handle keeps TVM's default loops (recorded in ``fallbacks``)."""
    tvm_, _ = tvm()
    mod = mod.clone()
    for gvar, func in list(mod.functions.items()):
        if isinstance(func, tvm_.tirx.PrimFunc) and not (func.attrs and SCHEDULED in func.attrs):
            problem: list[str] = []
            scheduled = cpu_kernel_schedule(func, vectorize, problem)
            if scheduled is not None:
                mod[gvar] = scheduled
            elif problem and fallbacks is not None:
                fallbacks.add(gvar.name_hint, "CPU schedule", "TVM's default loops", problem[0])
    return mod


def cpu_kernel_schedule(func, vectorize: bool = True, problem: list[str] | None = None):
    """The default CPU schedule of one kernel; None (and the reason in ``problem``) if it
    cannot be applied."""
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    try:
        infos = adapter.normalize_prim_func(sch)
        if infos is None:
            if problem is not None:
                problem.append("dlight cannot normalise the kernel")
            return None
        infos = _inline_without_recomputing(sch, infos)
        for info in infos:
            block = info.block_rv
            loops = sch.get_loops(block)
            kinds = info.dom_kind()
            if len(loops) != len(kinds):
                continue
            spatial = [l for l, k in zip(loops, kinds) if k == "S"]
            rest = [l for l, k in zip(loops, kinds) if k != "S"]
            if not spatial:
                continue
            sch.reorder(*spatial, *rest)
            fused = sch.fuse(*spatial) if len(spatial) > 1 else spatial[0]
            extent = getattr(sch.get(fused).extent, "value", None)  # None: a symbolic extent
            if extent is None or extent < _PARALLEL_MIN_ELEMENTS // 64:
                continue
            if rest:  # reductions: whole rows per thread
                sch.parallel(fused)
                continue
            lanes = next((v for v in (16, 8, 4) if extent % v == 0 and extent >= 4 * v), None) if vectorize else None
            if lanes is None:
                sch.parallel(fused)
                continue
            outer, inner = sch.split(fused, [None, lanes])
            if extent >= _PARALLEL_MIN_ELEMENTS:
                sch.parallel(outer)
            sch.vectorize(inner)
    except Exception as exc:  # noqa: BLE001 - an unschedulable kernel keeps TVM's default loops
        if problem is not None:
            problem.append(_reason(exc))
        return None
    return sch.mod["main"].with_attr(SCHEDULED, True)


#: A block whose printed body is longer than this is not inlined into a consumer that reads
#: it at two different indices (the consumer would compute it twice): e.g. a GELU chain
#: feeding both the high-byte and the low-byte rows of an int16 split. (Several reads at
#: the same index are fine: LLVM computes the common expression once.)
_RECOMPUTE_MAX_CHARS = 400


def _domain_size(sch, block) -> int:
    """Points a block iterates over (a symbolic extent counts as 2^30)."""
    size = 1
    for iter_var in sch.get(block).iter_vars:
        size *= int(getattr(iter_var.dom.extent, "value", 1 << 30))
    return size


def _feeds_larger(sch, block) -> bool:
    """Whether every consumer of ``block`` iterates over at least ``_BROADCAST_RATIO`` times
    more points: ``block`` is a per-row statistic (a LayerNorm's mean, variance and σ) that
    its consumers broadcast; inlined, they would recompute it (a division, a square root)
    for every element of the row."""
    consumers = sch.get_consumers(block)
    own = _domain_size(sch, block)
    return bool(consumers) and all(_domain_size(sch, c) >= _BROADCAST_RATIO * own for c in consumers)


#: A block is computed once, not inlined, when its consumers are at least this much larger.
_BROADCAST_RATIO = 8


def _inline_without_recomputing(sch, infos):
    """Inline element-wise blocks into their consumers, as dlight's ``try_inline`` does,
    except expensive blocks a consumer reads at several indices and per-row statistics
    that a larger consumer broadcasts: those are computed once.

    Whether a block is kept depends on its own body and on its consumers; after an inline
    only the blocks around it are looked at again (printing every body after every inline
    made a kernel's schedule quadratic in its block count)."""
    import re

    def name(block) -> str:
        return sch.get(block).name_hint

    def recomputed(block) -> bool:
        stmt = sch.get(block)
        if len(str(stmt.body)) <= _RECOMPUTE_MAX_CHARS or not stmt.writes:
            return False
        source = stmt.writes[0].source
        pattern = re.escape(getattr(source, "name", None) or str(source)) + r"\[[^\]]*\]"
        consumers = sch.get_consumers(block)  # several: wait until they have merged, then look again
        return len(consumers) > 1 or any(len(set(re.findall(pattern, str(sch.get(c).body)))) > 1 for c in consumers)

    kept_cache: dict[str, bool] = {}
    stuck: set[str] = set()  # blocks no inline applied to since their surroundings last changed
    names = [name(info.block_rv) for info in infos]  # parallel to infos; a block keeps its name
    by_name = dict(zip(names, infos))

    def is_kept(key: str) -> bool:
        if key not in kept_cache:
            block = by_name[key].block_rv
            kept_cache[key] = recomputed(block) or _feeds_larger(sch, block)
        return kept_cache[key]

    def forget_around(around: set[str]) -> None:
        """Drop what is known of the named blocks and of their producers (and let their
        consumers try to inline again)."""
        for key in around:
            info = by_name.get(key)
            if info is None:
                continue
            kept_cache.pop(key, None)
            stuck.discard(key)
            for producer in sch.get_producers(info.block_rv):
                kept_cache.pop(name(producer), None)
                stuck.discard(name(producer))
            for consumer in sch.get_consumers(info.block_rv):
                stuck.discard(name(consumer))

    def inline_one() -> bool:
        kept = {key for key in names if is_kept(key)}
        for index, (own, info) in enumerate(zip(names, infos)):
            if own in kept or own in stuck:
                continue
            block = info.block_rv
            producers = sch.get_producers(block)
            ways = [sch.compute_inline]
            if not any(name(p) in kept for p in producers):
                ways.append(sch.reverse_compute_inline)  # not into a block kept to be computed once
            neighbours = {name(b) for b in (*producers, *sch.get_consumers(block))}
            for inline in ways:
                try:
                    inline(block)
                except Exception:  # noqa: BLE001 - not inlinable this way
                    continue
                infos.pop(index)
                names.pop(index)
                del by_name[own]
                kept_cache.pop(own, None)
                forget_around(neighbours)
                return True
            stuck.add(own)
        return False

    while True:  # until a scan with nothing cached inlines nothing: the fixpoint of a full rescan
        while inline_one():
            pass
        stuck.clear()
        kept_cache.clear()
        if not inline_one():
            return infos
