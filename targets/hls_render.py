"""The C rendering of integer-op decompositions for fpga-sim, with their resource cost.

An op's decomposition (:mod:`qcompiler.integer`) becomes the body of its layer function:

* without reductions, one pipelined loop nest over the output (broadcast operands are
  strided views), one ``int64_t`` statement per primitive;
* with reductions (all along one axis), a loop over the rows and, per row, one
  pipelined pass per group of reductions that can be computed together, then a final
  pass writing the outputs. Row statistics (a maximum, a sum, a square root) are
  scalars between passes; a reduced value that a later pass needs again (softmax's
  exponent) waits in a row buffer, anything else is recomputed.

C semantics follow the primitives exactly: int64 arithmetic (gcc ``-fwrapv``), ``>>``
arithmetic, ``qc_floordiv``, ``qc_isqrt``, shifts left as multiplications (a negative
left shift is undefined in C), casts that wrap like numpy's. The cost of each primitive
comes from the operands' value intervals: a multiplier of the needed widths (none for a
power of two), adders and comparators as LUTs, dividers, shifters, ROM tables.
"""

from __future__ import annotations

import math

import numpy as np

from qcompiler.integer import DecompositionError, Expr, IntegerOp, TensorInfo, reachable, signed_bits
from qcompiler.integer.expr import REDUCTIONS

from .hls_c import Layer, View, broadcast_strides, c_int, ctype, strides

#: Pipeline stages a primitive adds to a pass's depth (the rest: 1).
_STAGES = {"mul": 3, "isqrt": 34, "lookup": 2, "floordiv": 20}
_COMPARE = {"lt": "<", "le": "<=", "gt": ">", "ge": ">=", "eq": "=="}


def render_integer_op(layer: Layer, op: type[IntegerOp]) -> None:
    """Write ``layer``'s C body from ``op``'s decomposition (raises the layer's TargetError)."""
    infos = []
    for i in range(len(layer.node.inputs)):
        tensor = layer.input(i)
        infos.append(None if tensor is None else TensorInfo(tensor.shape, np.dtype(tensor.dtype), tensor.const))
    attrs = {name: attr.value for name, attr in layer.node.attributes.items()}
    try:
        _, outputs = op.trace(infos, attrs)
    except DecompositionError as exc:
        raise layer.fail(str(exc)) from None
    CRenderer(layer, outputs).emit()


def _bits(node: Expr) -> int:
    return signed_bits(min(node.lo, 0), max(node.hi, 0))


def _power_of_two(node: Expr) -> bool:
    """A constant multiplier that is wiring: every entry 0, ±1 or a power of two."""
    if node.op != "const":
        return False
    values = np.abs(node.attrs["value"].astype(np.int64).reshape(-1))
    return bool(np.all((values & (values - 1)) == 0))


class CRenderer:
    def __init__(self, layer: Layer, outputs: list[Expr]):
        self.layer = layer
        self.outputs = outputs
        self.nodes = reachable(outputs)
        if any(n.op == "matmul" for n in self.nodes):
            raise layer.fail("the C rendering has no matmul primitive (integer matmuls have their own emitter)")
        self.full = tuple(np.broadcast_shapes(*(n.shape for n in self.nodes if n.op not in REDUCTIONS)))
        axes = {n.attrs["axis"] + len(self.full) - len(n.args[0].shape) for n in self.nodes if n.op in REDUCTIONS}
        if len(axes) > 1:
            raise layer.fail(f"reductions along several axes {sorted(axes)}: not supported by the C rendering")
        self.axis = axes.pop() if axes else None
        self.names: dict[int, str] = {}
        self.views: dict[str, tuple[str, list[int]]] = {}  # array -> (C name, strides over the full shape)
        self.buffered: dict[int, str] = {}

    # -- operands ---------------------------------------------------------------------------------

    def _operand_arrays(self) -> None:
        """Views of the runtime inputs, the constant arrays and the outputs over the full shape."""
        layer = self.layer
        for node in self.nodes:
            if node.op == "input":
                tensor = layer.input(node.attrs["index"])
                self.views[f"n{node.index}"] = (layer.ref(tensor), broadcast_strides(node.shape, self.full))
            elif node.op == "const" and node.attrs["value"].size > 1:
                values = node.attrs["value"]
                store = values.astype(_narrowest(values))
                name = layer.table(f"c{node.index}", store.reshape(-1), _bits(node), lanes=layer.unroll)
                self.views[f"n{node.index}"] = (name, broadcast_strides(node.shape, self.full))
        for k, out in enumerate(self.outputs):
            self.views[f"out{k}"] = (layer.ref(layer.output(k)), broadcast_strides(out.shape, self.full))

    # -- classification ---------------------------------------------------------------------------

    def _is_row(self, node: Expr) -> bool:
        """A per-row value (constant along the reduction axis) that is not a leaf array."""
        if self.axis is None:
            return False
        offset = len(self.full) - len(node.shape)
        along = node.shape[self.axis - offset] if self.axis - offset >= 0 else 1
        return along == 1 and self.full[self.axis] != 1

    def _passes(self) -> list[list[Expr]]:
        """Reductions grouped into passes: a reduction joins the first pass after every
        reduction its argument depends on."""
        level: dict[int, int] = {}
        for r in (n for n in self.nodes if n.op in REDUCTIONS):  # topological order
            deps = [level[id(x)] for x in reachable([r.args[0]]) if x.op in REDUCTIONS]
            level[id(r)] = 1 + max(deps, default=-1)
        groups: list[list[Expr]] = [[] for _ in range(max(level.values(), default=-1) + 1)]
        for r in (n for n in self.nodes if n.op in REDUCTIONS):
            groups[level[id(r)]].append(r)
        return groups

    # -- code -------------------------------------------------------------------------------------

    def emit(self) -> None:
        self._operand_arrays()
        if self.axis is None:
            self._elementwise()
        else:
            self._rows()

    def _elementwise(self) -> None:
        layer = self.layer
        keys = list(self.views)
        views = [View(self.views[k][0], self.views[k][1]) for k in keys]
        depth = self._depth(self.nodes)

        def body(idx):
            index = dict(zip(keys, idx))
            self.names = {}
            for node in self.nodes:
                self._statement(node, index, lanes=True)
            self._store(index)

        layer.nest(self.full, views, body, depth=depth)

    def _rows(self) -> None:
        layer = self.layer
        axis, n = self.axis, self.full[self.axis]
        row_shape = tuple(1 if i == axis else d for i, d in enumerate(self.full))
        keys = list(self.views)
        views = [View(self.views[k][0], self.views[k][1]) for k in keys]
        passes = self._passes()
        roots = [[r.args[0] for r in group] for group in passes] + [list(self.outputs)]
        reach = [{id(x) for x in self._collect(r, set(), set())} for r in roots]
        for p, group in enumerate(passes):  # a reduced value a later pass needs again waits in a row buffer
            for r in group:
                value = r.args[0]
                if value.op not in ("input", "const") and id(value) not in self.buffered and any(
                    id(value) in reach[q] for q in range(p + 1, len(reach))
                ):
                    name = f"rb{layer.index}_{len(self.buffered)}"
                    layer.local(f"static int64_t {name}[{n}];")
                    layer.cost.rom(name, n, _bits(value), max(1, math.ceil(layer.unroll / 2)), kind="buffer")
                    layer.partition(name, max(1, math.ceil(min(layer.unroll, n) / 2)))
                    self.buffered[id(value)] = name
        row_outputs = [k for k, out in enumerate(self.outputs) if self._is_row(out)]

        def row(idx):
            bases = dict(zip(keys, idx))
            self.names = {}
            done: set[int] = set()
            written: set[int] = set()
            for p, group_roots in enumerate(roots):
                group = passes[p] if p < len(passes) else []
                nodes = self._collect(group_roots, done, written)
                for x in nodes:
                    if self._is_row(x) and id(x) not in written:
                        self._statement(x, bases, lanes=False)
                        done.add(id(x))
                        self.layer.cycles(_STAGES.get(x.op, 1) if x.op not in ("input", "const", "bound", "cast") else 0)
                element_nodes = [x for x in nodes if not self._is_row(x)]
                final = p == len(passes)
                if final:
                    for k in row_outputs:
                        out = self.outputs[k]
                        self.layer.line(f"{self.views[f'out{k}'][0]}[{bases[f'out{k}']}] = "
                                        f"({ctype(np.dtype(out.dtype))}){self.names[id(out)]};")
                    if len(row_outputs) == len(self.outputs):
                        break
                for r in group:
                    init = c_int(-(2**63)) if r.op == "rmax" else "0"
                    self.layer.line(f"int64_t v{r.index} = {init};")
                self._pass(element_nodes, group, written, bases, final, row_outputs)
                written.update(id(x) for x in element_nodes if id(x) in self.buffered)
                for r in group:
                    self.names[id(r)] = f"v{r.index}"
                    done.add(id(r))

        layer.nest(row_shape, views, row, pipeline=False)

    def _pass(self, nodes: list[Expr], group: list[Expr], written: set[int], bases: dict, final: bool, row_outputs) -> None:
        """One pipelined loop along the reduction axis: ``nodes`` per element, then the
        reductions of ``group`` accumulate (the final pass stores the element outputs)."""
        axis = self.axis

        def element(_):
            j = self.layer.loop_vars[0]
            index = {k: f"{b} + {j}*{self.views[k][1][axis]}" if self.views[k][1][axis] else b for k, b in bases.items()}
            saved = dict(self.names)
            for x in nodes:
                if id(x) in written:
                    self.names[id(x)] = f"{self.buffered[id(x)]}[{j}]"
                    continue
                self._statement(x, index, lanes=True)
                if id(x) in self.buffered:
                    self.layer.line(f"{self.buffered[id(x)]}[{j}] = {self.names[id(x)]};")
            for r in group:
                value = self.names[id(r.args[0])]
                if r.op == "sum":
                    self.layer.line(f"v{r.index} += {value};")
                else:
                    self.layer.line(f"v{r.index} = {value} > v{r.index} ? {value} : v{r.index};")
                self.layer.luts(_bits(r))
            if final:
                self._store(index, skip=set(row_outputs))
            self.names = saved

        depth = self._depth([x for x in nodes if id(x) not in written])
        self.layer.nest((self.full[axis],), [], element, depth=depth, merge=False)

    def _collect(self, roots, done: set[int], written: set[int]) -> list[Expr]:
        """The nodes ``roots`` need that are not computed yet, in topological order: the walk
        stops at finished reductions and row values (``done``) and at buffered values
        (``written``, read back from their row buffer)."""
        seen: dict[int, Expr] = {}
        stack = list(roots)
        while stack:
            node = stack.pop()
            if id(node) in seen or id(node) in done:
                continue
            seen[id(node)] = node
            if node.op in REDUCTIONS or id(node) in written:
                continue
            stack.extend(node.args)
        return sorted((x for x in seen.values() if x.op not in REDUCTIONS), key=lambda x: x.index)

    def _store(self, index: dict[str, str], skip: set[int] = frozenset()) -> None:
        for k, out in enumerate(self.outputs):
            if k in skip:
                continue
            array = self.views[f"out{k}"][0]
            self.layer.line(f"{array}[{index[f'out{k}']}] = ({ctype(np.dtype(out.dtype))}){self.names[id(out)]};")

    # -- one primitive ----------------------------------------------------------------------------

    def _value(self, node: Expr) -> str:
        if id(node) in self.names:
            return self.names[id(node)]
        if node.op == "const" and node.attrs["value"].size == 1:
            return f"(int64_t){c_int(int(node.attrs['value'].reshape(-1)[0]))}"
        raise self.layer.fail(f"internal: value %{node.index} ({node.op}) used before it is computed")

    def _statement(self, node: Expr, index: dict[str, str], *, lanes: bool) -> None:
        """``int64_t vK = ...;`` for ``node`` (leaves become names, not statements)."""
        layer = self.layer
        key = f"n{node.index}"
        if node.op == "input" or (node.op == "const" and key in self.views):
            self.names[id(node)] = f"(int64_t){self.views[key][0]}[{index[key]}]"
            return
        if node.op == "const" or node.op == "bound":
            self.names[id(node)] = self._value(node.args[0]) if node.op == "bound" else self._value(node)
            return
        args = [self._value(a) for a in node.args]
        expr = self._expression(node, args, lanes)
        layer.line(f"int64_t v{node.index} = {expr};")
        self.names[id(node)] = f"v{node.index}"

    def _expression(self, node: Expr, v: list[str], lanes: bool) -> str:
        layer, op, args = self.layer, node.op, node.args
        count = None if lanes else 1
        if op in ("add", "sub"):
            layer.luts(_bits(node), count)
            return f"{v[0]} {'+' if op == 'add' else '-'} {v[1]}"
        if op == "mul":
            if not (_power_of_two(args[0]) or _power_of_two(args[1])):
                layer.mul(_bits(args[0]), _bits(args[1]), count)
            return f"{v[0]} * {v[1]}"
        if op == "neg":
            layer.luts(_bits(node), count)
            return f"-{v[0]}"
        if op == "abs":
            layer.luts(_bits(node), count)
            return f"{v[0]} < 0 ? -{v[0]} : {v[0]}"
        if op == "sign":
            return f"(int64_t)(({v[0]} > 0) - ({v[0]} < 0))"
        if op in ("min", "max"):
            layer.luts(2 * _bits(node), count)
            return f"{v[0]} {'<' if op == 'min' else '>'} {v[1]} ? {v[0]} : {v[1]}"
        if op == "shl":
            if args[1].attrs["value"].size != 1:
                raise layer.fail("a per-channel left shift is not supported by the C rendering")
            return f"{v[0]} * {c_int(1 << int(args[1].attrs['value'].reshape(-1)[0]))}"
        if op == "shr":
            if args[1].op != "const":
                layer.cost.shifter(_bits(args[0]), min(args[1].hi, 63), layer.lanes if lanes else 1)
            return f"{v[0]} >> {v[1]}"
        if op == "floordiv":
            if args[1].op == "const":
                layer.mul(_bits(args[0]), 18, count)  # a reciprocal multiply
            else:
                layer.cost.divider(_bits(args[0]), layer.lanes if lanes else 1)
            if args[0].lo >= 0:
                return f"{v[0]} / {v[1]}"  # C truncation is the floor here
            return f"qc_floordiv({v[0]}, {v[1]})"
        if op in _COMPARE:
            layer.luts(max(_bits(args[0]), _bits(args[1])), count)
            return f"(int64_t)({v[0]} {_COMPARE[op]} {v[1]})"
        if op == "where":
            layer.luts(_bits(node), count)
            return f"{v[0]} ? {v[1]} : {v[2]}"
        if op == "isqrt":
            layer.luts(64 * 4, count)
            return f"qc_isqrt({v[0]})"
        if op == "lookup":
            table = node.attrs["table"].astype(node.attrs["storage"])
            name = layer.table(f"lut{node.index}", table, _bits(node), lanes=layer.unroll)
            index = v[0]
            if args[0].lo < 0 or args[0].hi > table.size - 1:
                layer.luts(2 * _bits(args[0]), count)
                index = f"qc_clamp({v[0]}, 0, {table.size - 1})"
            return f"(int64_t){name}[{index}]"
        if op == "cast":
            return f"(int64_t)({ctype(np.dtype(node.dtype))}){v[0]}"
        raise layer.fail(f"no C form for the integer primitive '{op}'")

    def _depth(self, nodes) -> int:
        """Pipeline depth of a pass: the longest chain of primitive stages."""
        depth: dict[int, int] = {}
        for node in nodes:
            own = _STAGES.get(node.op, 1) if node.op not in ("input", "const", "bound", "cast") else 0
            depth[id(node)] = own + max((depth.get(id(a), 0) for a in node.args), default=0)
        return 2 + max(depth.values(), default=0)


def _narrowest(values: np.ndarray) -> np.dtype:
    for dtype in (np.int8, np.int16, np.int32):
        info = np.iinfo(dtype)
        if values.size == 0 or (values.min() >= info.min and values.max() <= info.max):
            return np.dtype(dtype)
    return np.dtype(np.int64)


__all__ = ["CRenderer", "render_integer_op", "strides"]
