"""The numpy rendering of integer decompositions: the reference semantics of every integer op.

:func:`evaluate` runs a decomposition on arrays; :func:`apply` is one primitive (also
used by the builder to fold constants). Every product whose static interval could
reach 2^62 is checked on the actual values, every ``bound`` and checked ``cast`` too:
a decomposition that breaks its promise raises :class:`OverflowError` instead of
wrapping silently.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from .arith import exact_int_matmul, isqrt
from .dag import reachable

_LIMIT = 2**62


def apply(op: str, args: Sequence[np.ndarray], attrs: Mapping, dtype: str = "int64") -> np.ndarray:
    """One primitive on int64/bool arrays (see :mod:`qcompiler.integer.expr`); ``dtype`` is
    the result type of a ``cast``."""
    if op == "add":
        return np.add(args[0], args[1], dtype=np.int64)
    if op == "sub":
        return np.subtract(args[0], args[1], dtype=np.int64)
    if op == "mul":
        return np.multiply(args[0], args[1], dtype=np.int64)
    if op == "neg":
        return np.negative(args[0])
    if op == "abs":
        return np.abs(args[0])
    if op == "sign":
        return np.sign(args[0]).astype(np.int64)
    if op == "min":
        return np.minimum(args[0], args[1])
    if op == "max":
        return np.maximum(args[0], args[1])
    if op == "shl":
        return np.left_shift(args[0], args[1])
    if op == "shr":
        return np.right_shift(args[0], args[1])
    if op == "floordiv":
        return np.floor_divide(args[0], args[1])
    if op in _COMPARE:
        return _COMPARE[op](args[0], args[1])
    if op == "where":
        return np.where(args[0], args[1], args[2])
    if op == "isqrt":
        return isqrt(args[0])
    if op == "lookup":
        table = attrs["table"]
        return table[np.clip(args[0], 0, table.size - 1)]
    if op == "cast":
        return np.asarray(args[0]).astype(dtype)
    if op == "bound":
        return args[0]
    if op == "sum":
        return np.sum(args[0], axis=attrs["axis"], keepdims=True, dtype=np.int64)
    if op == "rmax":
        return np.max(args[0], axis=attrs["axis"], keepdims=True)
    raise ValueError(f"no numpy form for primitive {op!r}")


_COMPARE = {"lt": np.less, "le": np.less_equal, "gt": np.greater, "ge": np.greater_equal, "eq": np.equal}


def evaluate(outputs: Sequence, feeds: Mapping[int, np.ndarray], *, name: str = "integer op") -> list[np.ndarray]:
    """Values of ``outputs`` (a decomposition's nodes) for input arrays ``feeds`` (by input index)."""
    values: dict[int, np.ndarray] = {}
    for node in reachable(outputs):
        op = node.op
        if op == "input":
            array = np.asarray(feeds[node.attrs["index"]])
            values[id(node)] = array if array.dtype == np.bool_ else array.astype(np.int64)
            continue
        if op == "const":
            values[id(node)] = node.attrs["value"]
            continue
        args = [values[id(a)] for a in node.args]
        if op == "matmul":
            result = _matmul(args[0], args[1], node.attrs["a_zero"], node.attrs["b_zero"])
        elif op == "cast":
            result = _cast(args[0], node, name)
        else:
            result = apply(op, args, node.attrs)
        if op in ("mul", "shl", "add", "sub") and max(abs(node.lo), abs(node.hi)) >= _LIMIT:
            _check_exact(op, args, name)
        if op == "bound" and np.size(result) and (result.min() < node.attrs["lo"] or result.max() > node.attrs["hi"]):
            raise OverflowError(
                f"{name}: a value left its promised range [{node.attrs['lo']}, {node.attrs['hi']}] "
                "(the lowering chose bad constants)"
            )
        values[id(node)] = result
    return [values[id(o)] for o in outputs]


def _cast(value: np.ndarray, node, name: str) -> np.ndarray:
    dtype = np.dtype(node.dtype)
    if node.attrs.get("checked") and np.size(value):
        info = np.iinfo(dtype)
        if value.min() < info.min or value.max() > info.max:
            raise OverflowError(f"{name}: {dtype} accumulator overflow; the lowering should have used a wider type")
    return value.astype(dtype)


def _check_exact(op: str, args: Sequence[np.ndarray], name: str) -> None:
    """Recompute a product (or sum) in float64: a magnitude ≥ 2^62 breaks the int64 promise."""
    a = np.asarray(args[0], np.float64)
    b = np.asarray(args[1], np.float64)
    if op == "mul":
        exact = a * b
    elif op == "shl":
        exact = a * np.exp2(b)
    elif op == "add":
        exact = a + b
    else:
        exact = a - b
    if exact.size and np.max(np.abs(exact)) >= _LIMIT:
        raise OverflowError(f"{name}: intermediate exceeds 2^62; the lowering chose bad constants")


def _matmul(a: np.ndarray, b: np.ndarray, za: np.ndarray, zb: np.ndarray) -> np.ndarray:
    za = np.asarray(za, np.int64)
    if za.ndim == 1 and za.size > 1:  # per row of a
        za = za.reshape(-1, 1)
    zb = np.asarray(zb, np.int64)
    if zb.ndim == 1 and zb.size > 1:  # per column of b
        zb = zb.reshape((1,) * (np.ndim(b) - 1) + (-1,))
    return exact_int_matmul(np.asarray(a, np.int64) - za, np.asarray(b, np.int64) - zb)
