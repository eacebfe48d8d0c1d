"""The integer primitives that every integer op decomposes into, and the builder of their DAGs.

An op's decomposition (see :mod:`qcompiler.integer.registry`) is written once with a
:class:`Builder` and Python operators on :class:`Expr`; each backend renders the same
DAG: numpy (the reference semantics, :mod:`qcompiler.integer.numpy_backend`), Relax/TE
for the TVM targets, C for fpga-sim; the cost models walk it too.

Values are mathematical integers held in int64 (``bool`` for comparisons); a
decomposition promises that no intermediate reaches 2^62 (the reference checks every
product whose static interval allows it). The primitives:

=============  ===================================================================
``input``      input ``i`` of the op, read as int64 (bool stays bool)
``const``      a compile-time int64/bool array, broadcast like numpy
``add`` ``sub`` ``mul`` ``neg`` ``abs`` ``sign`` ``min`` ``max``   int64 arithmetic
``shl``        ``a · 2^k`` for a compile-time ``k ≥ 0``
``shr``        ``⌊a / 2^k⌋`` (arithmetic right shift), ``0 ≤ k ≤ 63`` (``k`` may be a tensor)
``floordiv``   ``⌊a / b⌋`` for ``b ≥ 1``
``lt`` ``le`` ``gt`` ``ge`` ``eq``   comparisons → bool
``where``      ``c ? a : b``
``isqrt``      ``⌊√n⌋`` for ``0 ≤ n < 2^62``
``lookup``     ``table[clamp(i, 0, len − 1)]`` of a compile-time 1-D table
``sum`` ``rmax``   reductions along one axis (keepdims)
``cast``       wrap to a narrower integer type (two's complement, like numpy's astype);
               ``checked`` casts promise the value fits (the reference checks it)
``bound``      the identity, promising ``lo ≤ a ≤ hi`` (the reference checks it)
``matmul``     ``(a − za) @ (b − zb)`` exactly, numpy matmul broadcasting
=============  ===================================================================

Every node carries its static shape and a value interval ``[lo, hi]`` computed from its
arguments (inputs: their type's range); backends use the intervals to pick exact fast
forms (a float64 division where it is exact), bit widths (fpga-sim multipliers) and
to skip clamps that cannot bind.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import numpy_backend
from .arith import int_range, is_integer_dtype
from .dag import reachable, users  # noqa: F401 - part of this module's API

#: Magnitude every intermediate stays below (the decomposition's promise).
LIMIT = 2**62

#: Primitives computed element by element (broadcasting), the reductions, and the rest.
ELEMENTWISE = frozenset({
    "add", "sub", "mul", "neg", "abs", "sign", "min", "max", "shl", "shr", "floordiv",
    "lt", "le", "gt", "ge", "eq", "where", "isqrt", "lookup", "cast", "bound",
})
REDUCTIONS = frozenset({"sum", "rmax"})
PRIMITIVES = ELEMENTWISE | REDUCTIONS | {"input", "const", "matmul"}


class DecompositionError(ValueError):
    """A decomposition cannot be built for these inputs (the message says why)."""


class Expr:
    """One node of a decomposition: a primitive applied to other nodes."""

    __slots__ = ("op", "args", "shape", "dtype", "lo", "hi", "attrs", "builder", "index")

    def __init__(self, builder: Builder, op: str, args: tuple, shape: tuple, dtype: str, lo: int, hi: int, attrs: dict):
        self.builder = builder
        self.op = op
        self.args = args
        self.shape = tuple(int(d) for d in shape)
        self.dtype = dtype
        self.lo = int(lo)
        self.hi = int(hi)
        self.attrs = attrs
        self.index = len(builder.nodes)

    def __repr__(self) -> str:
        return f"%{self.index} = {self.op}({', '.join(f'%{a.index}' for a in self.args)}) {list(self.shape)} {self.dtype} [{self.lo}, {self.hi}]"

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def value(self) -> np.ndarray | None:
        """The compile-time array of a ``const`` node (None otherwise)."""
        return self.attrs["value"] if self.op == "const" else None

    @property
    def storage(self) -> np.dtype:
        """The type the op's input arrives in (inputs and constants made from inputs); else the value type."""
        return np.dtype(self.attrs.get("storage", self.dtype))

    def is_scalar_const(self, value: int | None = None) -> bool:
        if self.op != "const" or self.attrs["value"].size != 1:
            return False
        return value is None or int(self.attrs["value"].reshape(-1)[0]) == value

    def all_equal(self, value: int) -> bool:
        """A constant whose every element equals ``value``."""
        return self.op == "const" and self.attrs["value"].size > 0 and bool(np.all(self.attrs["value"] == value))

    # -- operators ----------------------------------------------------------------------

    def __add__(self, other):
        return self.builder.add(self, other)

    def __radd__(self, other):
        return self.builder.add(other, self)

    def __sub__(self, other):
        return self.builder.sub(self, other)

    def __rsub__(self, other):
        return self.builder.sub(other, self)

    def __mul__(self, other):
        return self.builder.mul(self, other)

    def __rmul__(self, other):
        return self.builder.mul(other, self)

    def __neg__(self):
        return self.builder.neg(self)

    def __abs__(self):
        return self.builder.abs(self)

    def __lshift__(self, k):
        return self.builder.shl(self, k)

    def __rshift__(self, k):
        return self.builder.shr(self, k)

    def __floordiv__(self, other):
        return self.builder.floordiv(self, other)

    def __lt__(self, other):
        return self.builder.compare("lt", self, other)

    def __le__(self, other):
        return self.builder.compare("le", self, other)

    def __gt__(self, other):
        return self.builder.compare("gt", self, other)

    def __ge__(self, other):
        return self.builder.compare("ge", self, other)

    __hash__ = object.__hash__


def _interval(values: np.ndarray) -> tuple[int, int]:
    if values.size == 0:
        return 0, 0
    if values.dtype == np.bool_:
        return int(values.min()), int(values.max())
    return int(values.min()), int(values.max())


def _shift_range(k: Expr) -> tuple[int, int]:
    return max(k.lo, 0), min(k.hi, 63)


class Builder:
    """Creates :class:`Expr` nodes with shapes, intervals, constant folding and the
    simplifications that keep every backend's code small (``x + 0``, ``x · 1``, a clamp
    that cannot bind ...). ``nodes`` is in creation order, which is topological."""

    def __init__(self):
        self.nodes: list[Expr] = []

    # -- leaves ---------------------------------------------------------------------------

    def input(self, index: int, shape: Sequence[int], dtype, lo: int | None = None, hi: int | None = None) -> Expr:
        """Input ``index`` of the op (values of ``dtype``'s range unless ``lo``/``hi`` narrow it)."""
        storage = np.dtype(dtype)
        if not is_integer_dtype(storage):
            raise DecompositionError(f"input {index} is {storage}; integer ops take integer tensors")
        tlo, thi = int_range(storage)
        value_type = "bool" if storage == np.bool_ else "int64"
        return self._node("input", (), tuple(shape), value_type, tlo if lo is None else lo, thi if hi is None else hi,
                          {"index": index, "storage": storage.name})

    def const(self, value, storage=None) -> Expr:
        """A compile-time constant (kept as int64, or bool)."""
        array = np.asarray(value)
        if not is_integer_dtype(array.dtype):
            raise DecompositionError(f"constant of type {array.dtype}; integer constants only")
        kept = array.astype(np.bool_ if array.dtype == np.bool_ else np.int64)
        lo, hi = _interval(kept)
        attrs = {"value": kept, "storage": np.dtype(storage if storage is not None else array.dtype).name}
        return self._node("const", (), kept.shape, "bool" if kept.dtype == np.bool_ else "int64", lo, hi, attrs)

    def wrap(self, x) -> Expr:
        return x if isinstance(x, Expr) else self.const(x)

    # -- element-wise primitives ------------------------------------------------------------

    def add(self, a, b) -> Expr:
        a, b = self.wrap(a), self.wrap(b)
        shape = _broadcast(a, b)
        if b.all_equal(0) and a.shape == shape:
            return a
        if a.all_equal(0) and b.shape == shape:
            return b
        return self._binary("add", a, b, a.lo + b.lo, a.hi + b.hi)

    def sub(self, a, b) -> Expr:
        a, b = self.wrap(a), self.wrap(b)
        if b.all_equal(0) and a.shape == _broadcast(a, b):
            return a
        return self._binary("sub", a, b, a.lo - b.hi, a.hi - b.lo)

    def mul(self, a, b) -> Expr:
        a, b = self.wrap(a), self.wrap(b)
        shape = _broadcast(a, b)
        if b.all_equal(1) and a.shape == shape:
            return a
        if a.all_equal(1) and b.shape == shape:
            return b
        products = [a.lo * b.lo, a.lo * b.hi, a.hi * b.lo, a.hi * b.hi]
        lo = min(products)
        if a is b:  # a square
            lo = 0 if a.lo <= 0 <= a.hi else min(a.lo * a.lo, a.hi * a.hi)
        return self._binary("mul", a, b, lo, max(products))

    def neg(self, a) -> Expr:
        a = self.wrap(a)
        return self._unary("neg", a, -a.hi, -a.lo)

    def abs(self, a) -> Expr:
        a = self.wrap(a)
        if a.lo >= 0:
            return a
        lo = 0 if a.hi >= 0 else -a.hi
        return self._unary("abs", a, lo, max(-a.lo, a.hi))

    def sign(self, a) -> Expr:
        a = self.wrap(a)
        return self._unary("sign", a, int(np.sign(a.lo)), int(np.sign(a.hi)))

    def minimum(self, a, b) -> Expr:
        a, b = self.wrap(a), self.wrap(b)
        shape = _broadcast(a, b)
        if b.op == "const" and b.lo >= a.hi and a.shape == shape:
            return a  # the bound cannot bind
        if a.op == "const" and a.lo >= b.hi and b.shape == shape:
            return b
        return self._binary("min", a, b, min(a.lo, b.lo), min(a.hi, b.hi))

    def maximum(self, a, b) -> Expr:
        a, b = self.wrap(a), self.wrap(b)
        shape = _broadcast(a, b)
        if b.op == "const" and b.hi <= a.lo and a.shape == shape:
            return a
        if a.op == "const" and a.hi <= b.lo and b.shape == shape:
            return b
        return self._binary("max", a, b, max(a.lo, b.lo), max(a.hi, b.hi))

    def shl(self, a, k) -> Expr:
        """``a · 2^k``; ``k`` a compile-time non-negative integer (or array)."""
        a, k = self.wrap(a), self.wrap(k)
        if k.op != "const" or k.lo < 0 or k.hi > 62:
            raise DecompositionError("shl takes a compile-time shift in [0, 62]")
        if k.all_equal(0) and a.shape == _broadcast(a, k):
            return a
        lo = a.lo << (k.hi if a.lo < 0 else k.lo)
        hi = a.hi << (k.hi if a.hi > 0 else k.lo)
        return self._binary("shl", a, k, lo, hi)

    def shr(self, a, k) -> Expr:
        """``⌊a / 2^k⌋`` (arithmetic shift), ``0 ≤ k ≤ 63``."""
        a, k = self.wrap(a), self.wrap(k)
        if k.lo < 0 or k.hi > 63:
            raise DecompositionError(f"shr by [{k.lo}, {k.hi}]: shifts must lie in [0, 63]")
        if k.all_equal(0) and a.shape == _broadcast(a, k):
            return a
        k0, k1 = _shift_range(k)
        ends = [a.lo >> k0, a.lo >> k1, a.hi >> k0, a.hi >> k1]
        return self._binary("shr", a, k, min(ends), max(ends))

    def floordiv(self, a, b) -> Expr:
        """``⌊a / b⌋`` for ``b ≥ 1``."""
        a, b = self.wrap(a), self.wrap(b)
        if b.lo < 1:
            raise DecompositionError(f"floordiv by a divisor in [{b.lo}, {b.hi}]: divisors must be ≥ 1")
        if b.all_equal(1) and a.shape == _broadcast(a, b):
            return a
        ends = [a.lo // b.lo, a.lo // b.hi, a.hi // b.lo, a.hi // b.hi]
        return self._binary("floordiv", a, b, min(ends), max(ends))

    def compare(self, op: str, a, b) -> Expr:
        a, b = self.wrap(a), self.wrap(b)
        return self._binary(op, a, b, 0, 1, dtype="bool")

    def eq(self, a, b) -> Expr:
        return self.compare("eq", a, b)

    def where(self, condition, a, b) -> Expr:
        c, a, b = self.wrap(condition), self.wrap(a), self.wrap(b)
        if c.dtype != "bool":
            raise DecompositionError("where needs a bool condition")
        shape = tuple(np.broadcast_shapes(c.shape, a.shape, b.shape))
        dtype = "bool" if a.dtype == b.dtype == "bool" else "int64"
        return self._node("where", (c, a, b), shape, dtype, min(a.lo, b.lo), max(a.hi, b.hi), {})

    def isqrt(self, n) -> Expr:
        n = self.wrap(n)
        if n.lo < 0:
            raise DecompositionError(f"isqrt of [{n.lo}, {n.hi}]: needs n ≥ 0")
        return self._unary("isqrt", n, math.isqrt(n.lo), math.isqrt(min(n.hi, LIMIT - 1)))

    def lookup(self, table, index) -> Expr:
        """``table[clamp(index, 0, len − 1)]``; ``table`` a compile-time 1-D array."""
        array = np.asarray(table).reshape(-1)
        if array.dtype.kind not in "iu" or array.size == 0:
            raise DecompositionError("lookup needs a non-empty integer table")
        index = self.wrap(index)
        lo, hi = _interval(array.astype(np.int64))
        attrs = {"table": array.astype(np.int64), "storage": array.dtype.name}
        return self._node("lookup", (index,), index.shape, "int64", lo, hi, attrs)

    def cast(self, a, dtype, checked: bool = False) -> Expr:
        """``a`` in ``dtype``: wraps like numpy's astype (``checked``: promises it fits)."""
        a = self.wrap(a)
        dtype = np.dtype(dtype)
        lo, hi = int_range(dtype)
        if a.lo >= lo and a.hi <= hi:
            lo, hi = a.lo, a.hi
        return self._node("cast", (a,), a.shape, dtype.name, lo, hi, {"checked": bool(checked)})

    def bound(self, a, lo: int, hi: int) -> Expr:
        """The identity, promising ``lo ≤ a ≤ hi`` (a fact the interval arithmetic cannot see)."""
        a = self.wrap(a)
        if a.lo >= lo and a.hi <= hi:
            return a
        return self._node("bound", (a,), a.shape, a.dtype, max(a.lo, lo), min(a.hi, hi), {"lo": int(lo), "hi": int(hi)})

    # -- reductions and products ----------------------------------------------------------------

    def reduce(self, kind: str, x, axis: int) -> Expr:
        """``sum`` or ``rmax`` of ``x`` along ``axis``, keeping the axis (length 1)."""
        x = self.wrap(x)
        if not x.shape:
            raise DecompositionError("cannot reduce a scalar")
        axis %= len(x.shape)
        n = x.shape[axis]
        shape = tuple(1 if i == axis else d for i, d in enumerate(x.shape))
        if kind == "sum":
            lo, hi = min(n * x.lo, x.lo), max(n * x.hi, x.hi)
        elif kind == "rmax":
            if n == 0:
                raise DecompositionError("max over an empty axis")
            lo, hi = x.lo, x.hi
        else:
            raise DecompositionError(f"unknown reduction {kind!r}")
        return self._node(kind, (x,), shape, "int64", lo, hi, {"axis": axis})

    def sum(self, x, axis: int) -> Expr:
        return self.reduce("sum", x, axis)

    def rmax(self, x, axis: int) -> Expr:
        return self.reduce("rmax", x, axis)

    def matmul(self, a: Expr, b: Expr, a_zero=0, b_zero=0) -> Expr:
        """``(a − za) @ (b − zb)`` exactly; ``za`` scalar or per row of ``a``, ``zb`` scalar or
        per column of ``b`` (compile-time)."""
        za = np.asarray(a_zero, np.int64)
        zb = np.asarray(b_zero, np.int64)
        if len(a.shape) < 1 or len(b.shape) < 1:
            raise DecompositionError("matmul of a scalar")
        a_full = a.shape if len(a.shape) >= 2 else (1,) + a.shape
        b_full = b.shape if len(b.shape) >= 2 else b.shape + (1,)
        if a_full[-1] != b_full[-2]:
            raise DecompositionError(f"matmul of shapes {list(a.shape)} and {list(b.shape)}")
        batch = tuple(np.broadcast_shapes(a_full[:-2], b_full[:-2]))
        shape = batch + (a_full[-2], b_full[-1])
        if len(a.shape) == 1:
            shape = shape[:-2] + shape[-1:]
        if len(b.shape) == 1:
            shape = shape[:-1]
        a_span = max(abs(a.lo - int(za.min(initial=0))), abs(a.hi - int(za.min(initial=0))),
                     abs(a.lo - int(za.max(initial=0))), abs(a.hi - int(za.max(initial=0))))
        if b.op == "const":
            w = b.attrs["value"].reshape(b_full) - (zb.reshape((1,) * (len(b_full) - 1) + (-1,)) if zb.size > 1 else zb)
            bound = a_span * int(np.abs(w).sum(axis=-2).max(initial=0))
        else:
            b_span = max(abs(b.lo - int(zb.min(initial=0))), abs(b.hi - int(zb.max(initial=0))),
                         abs(b.lo - int(zb.max(initial=0))), abs(b.hi - int(zb.min(initial=0))))
            bound = a_span * b_span * a_full[-1]
        return self._node("matmul", (a, b), shape, "int64", -bound, bound, {"a_zero": za, "b_zero": zb})

    # -- sugar -----------------------------------------------------------------------------------

    def rshift_round(self, v, k) -> Expr:
        """``⌊(v + 2^(k−1)) / 2^k⌋`` (halves round up); ``k`` compile-time (scalar or array), ``k = 0`` exact."""
        k = np.asarray(k, np.int64)
        if not np.any(k):
            return self.wrap(v)
        half = np.where(k > 0, np.left_shift(np.int64(1), np.maximum(k - 1, 0)), 0).astype(np.int64)
        return self.shr(self.add(v, half), k)

    def clamp(self, v, lo: int | None, hi: int | None) -> Expr:
        v = self.wrap(v)
        if lo is not None:
            v = self.maximum(v, int(lo))
        if hi is not None:
            v = self.minimum(v, int(hi))
        return v

    def clamp_cast(self, v, dtype, qmin: int | None = None, qmax: int | None = None) -> Expr:
        """Clamp to ``dtype``'s range intersected with ``[qmin, qmax]``, then cast (exact)."""
        lo, hi = int_range(np.dtype(dtype))
        lo = lo if qmin is None else max(lo, int(qmin))
        hi = hi if qmax is None else min(hi, int(qmax))
        return self.cast(self.clamp(v, lo, hi), dtype)

    def channel(self, param, rank: int, axis: int) -> Expr:
        """A scalar or 1-D per-channel constant broadcast along ``axis`` of a rank-``rank`` tensor."""
        array = np.asarray(param)
        if array.size == 1:
            return self.const(array.reshape(()))
        shape = [1] * rank
        shape[axis % rank] = array.size
        return self.const(array.reshape(shape))

    # -- internals ---------------------------------------------------------------------------------

    def _unary(self, op: str, a: Expr, lo: int, hi: int) -> Expr:
        return self._node(op, (a,), a.shape, "int64", lo, hi, {})

    def _binary(self, op: str, a: Expr, b: Expr, lo: int, hi: int, dtype: str = "int64") -> Expr:
        return self._node(op, (a, b), _broadcast(a, b), dtype, lo, hi, {})

    def _node(self, op: str, args: tuple, shape, dtype: str, lo: int, hi: int, attrs: dict) -> Expr:
        if op in ELEMENTWISE and args and all(a.op == "const" for a in args):
            folded = numpy_backend.apply(op, [a.attrs["value"] for a in args], attrs, dtype)
            if dtype not in ("int64", "bool"):
                folded = folded.astype(np.int64)  # a constant stays int64; the cast is its value
            return self.const(folded, storage=dtype if dtype not in ("int64",) else None)
        node = Expr(self, op, args, shape, dtype, lo, hi, attrs)
        self.nodes.append(node)
        return node


def _broadcast(*exprs: Expr) -> tuple[int, ...]:
    try:
        return tuple(np.broadcast_shapes(*(e.shape for e in exprs)))
    except ValueError:
        raise DecompositionError(
            "shapes " + " and ".join(str(list(e.shape)) for e in exprs) + " do not broadcast"
        ) from None


def count_ops(outputs: Sequence[Expr]) -> dict[str, Any]:
    """Primitive operations of a decomposition, per output element and per reduced row:
    ``{"element": n, "row": n, "reduce": n, "lookups": n, "macs": n, "rows": r}`` (what
    the cost models charge)."""
    nodes = [n for n in reachable(outputs) if n.op not in ("input", "const", "bound")]
    rows = 1
    element = row = reduce = lookups = macs = 0
    out_size = max((math.prod(o.shape) for o in outputs), default=1)
    for node in nodes:
        size = math.prod(node.shape)
        if node.op in REDUCTIONS:
            reduce += math.prod(node.args[0].shape)
            rows = max(rows, size)
        elif node.op == "matmul":
            k = node.args[0].shape[-1]
            macs += size * k
        elif size >= out_size:
            element += 1
            lookups += node.op == "lookup"
        else:
            row += 1
    return {"element": element, "row": row, "reduce": reduce, "lookups": lookups, "macs": macs, "rows": rows}
