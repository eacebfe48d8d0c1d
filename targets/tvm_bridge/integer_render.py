"""The Relax rendering of integer-op decompositions (:mod:`qcompiler.integer`).

Every primitive becomes one Relax op on int64 tensors (compile-time scalars as ``(1,)``
constants, see :meth:`Lowerer.c64`); Relax's fusion then merges the element-wise chains
into kernels (and into the epilogues of the int8 matmul kernels). Two primitives get
forms of their own: ``floordiv`` goes through float64 where the operands' intervals
make that exact (integer division does not vectorise), and ``lookup`` is an
element-wise TE kernel reading the table at a computed index (Relax's ``take`` is
opaque to fusion).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir

from qcompiler.errors import TargetError
from qcompiler.graph import node_label
from qcompiler.integer import DecompositionError, Expr, IntegerOp, TensorInfo, reachable

from .common import ELEMENT_WISE, LOOKUP_BLOCK, extents, relax_dtype

_BINARY = {"add": "add", "sub": "subtract", "mul": "multiply", "min": "minimum", "max": "maximum"}
_COMPARE = {"lt": "less", "le": "less_equal", "gt": "greater", "ge": "greater_equal", "eq": "equal"}


def trace_node(lo, node: ir.Node, op: type[IntegerOp]) -> list[Expr]:
    """The decomposition of ``node`` for the shapes, types and constants the lowering sees."""
    infos: list[TensorInfo | None] = []
    for value in node.inputs:
        if value is None or not value.name:
            infos.append(None)
            continue
        constant = lo.const(value)
        if value.name in lo.env:
            expr = lo.env[value.name]
            infos.append(TensorInfo(lo.shape(expr), np.dtype(lo.dtype(expr)), constant))
        elif constant is not None:
            infos.append(TensorInfo(constant.shape, constant.dtype, constant))
        else:
            raise TargetError(f"value '{value.name}' is used before it is computed")
    attrs = {name: attr.value for name, attr in node.attributes.items()}
    try:
        _, outputs = op.trace(infos, attrs)
    except DecompositionError as exc:
        raise TargetError(f"{node_label(node)}: {exc}") from None
    return outputs


def render_integer_op(lo, node: ir.Node, op: type[IntegerOp]):
    outputs = trace_node(lo, node, op)
    inputs = [None if v is None or not v.name else lo.expr(v) for v in node.inputs]
    results = RelaxRenderer(lo, inputs).render(outputs)
    for value, result in zip(node.outputs, results):
        if value.dtype is not None and lo.dtype(result) != relax_dtype(value.dtype):
            raise TargetError(
                f"{node_label(node)}: the decomposition gives {lo.dtype(result)} for '{value.name}', "
                f"the graph says {relax_dtype(value.dtype)}"
            )
    return results


class RelaxRenderer:
    """Emits one Relax binding per primitive (memoised: shared sub-expressions once)."""

    def __init__(self, lo, inputs: list):
        self.lo = lo
        self.R = lo.R
        self.inputs = inputs
        self.values: dict[int, Any] = {}
        self.wide: dict[int, Any] = {}

    def render(self, outputs: list[Expr]) -> list:
        for node in reachable(outputs):
            self.values[id(node)] = self._emit(node)
        return [self.values[id(o)] for o in outputs]

    def i64(self, node: Expr):
        """The node's value as int64 (converted once)."""
        value = self.values[id(node)]
        if self.lo.dtype(value) == "int64":
            return value
        if id(node) not in self.wide:
            self.wide[id(node)] = self.lo.emit(self.R.astype(value, "int64"))
        return self.wide[id(node)]

    def _emit(self, node: Expr):
        lo, R, op = self.lo, self.R, node.op
        args = node.args
        if op == "input":
            return self.inputs[node.attrs["index"]]
        if op == "const":
            value = node.attrs["value"]
            if value.dtype == np.bool_:
                return lo.relax.const(value.reshape(1) if value.ndim == 0 else value, "bool")
            return lo.c64(value)
        if op in _BINARY:
            return lo.emit(getattr(R, _BINARY[op])(self.i64(args[0]), self.i64(args[1])))
        if op in _COMPARE:
            return lo.emit(getattr(R, _COMPARE[op])(self.i64(args[0]), self.i64(args[1])))
        if op == "neg":
            return lo.emit(R.negative(self.i64(args[0])))
        if op == "abs":
            return lo.emit(R.abs(self.i64(args[0])))
        if op == "sign":
            return lo.emit(R.sign(self.i64(args[0])))
        if op == "shl":
            return lo.emit(R.left_shift(self.i64(args[0]), self.i64(args[1])))
        if op == "shr":
            return lo.emit(R.right_shift(self.i64(args[0]), self.i64(args[1])))
        if op == "floordiv":
            a, b = args
            return lo.floor_div(self.i64(a), self.i64(b), max(abs(a.lo), abs(a.hi)), b.hi)
        if op == "where":
            c, a, b = args
            if a.dtype == b.dtype == "bool":
                return lo.emit(R.where(self.values[id(c)], self.values[id(a)], self.values[id(b)]))
            return lo.emit(R.where(self.values[id(c)], self.i64(a), self.i64(b)))
        if op == "isqrt":
            return lo.isqrt(self.i64(args[0]))
        if op == "lookup":
            return self._lookup(node)
        if op == "sum":
            return lo.emit(R.sum(self.i64(args[0]), axis=[node.attrs["axis"]], keepdims=True))
        if op == "rmax":
            return lo.emit(R.max(self.i64(args[0]), axis=[node.attrs["axis"]], keepdims=True))
        if op == "cast":
            value = self.values[id(args[0])]
            return value if lo.dtype(value) == node.dtype else lo.emit(R.astype(value, node.dtype))
        if op == "bound":
            return self.values[id(args[0])]
        if op == "matmul":
            from .kernels.matmul import matmul_acc

            a, b = args
            b_const = b.attrs["value"] if b.op == "const" else None
            b_expr = self.values[id(b)] if b.op != "const" else lo.const_expr(b_const.astype(np.int64))
            return matmul_acc(lo, self.values[id(a)], b_expr, node.attrs["a_zero"], node.attrs["b_zero"], "int64", b_const)
        raise TargetError(f"{lo.node_name}: no Relax form for the integer primitive '{op}'")

    def _lookup(self, node: Expr):
        """``table[clamp(i, 0, n − 1)]`` as an element-wise kernel. An index that is an input
        minus a constant (``IntLookup``'s ``x − min(type)``) is computed inside the kernel
        from the input itself, in int32."""
        from tvm import te, tirx

        lo = self.lo
        table = node.attrs["table"].astype(node.attrs["storage"])
        index = node.args[0]
        offset = 0
        source = index
        if index.op in ("sub", "add") and index.args[0].op == "input" and index.args[1].is_scalar_const():
            constant = int(index.args[1].attrs["value"].reshape(-1)[0])
            offset = -constant if index.op == "sub" else constant
            source = index.args[0]
        x = self.values[id(source)] if source is not index else self.i64(index)
        shape = extents(*lo.shape(x))
        n = len(table)
        v = te.placeholder(shape, lo.dtype(x), name="x")
        t = te.placeholder(extents(n), str(table.dtype), name="table")
        kind = "int32" if source is not index else "int64"

        def read(*i):
            position = v[i].astype(kind) + tirx.const(offset, kind) if offset else v[i].astype(kind)
            return t[tirx.max(tirx.min(position, tirx.const(n - 1, kind)), tirx.const(0, kind))]

        y = te.compute(shape, read, name=LOOKUP_BLOCK)
        func = te.create_prim_func([v, t, y]).without_attr("global_symbol").with_attr(ELEMENT_WISE, True)
        kernel = lo.bb.add_func(func, "lookup")
        out = lo.relax.TensorType(lo.shape(x), str(table.dtype))
        return lo.emit(lo.relax.call_tir(kernel, [x, lo.const_expr(table)], out))
