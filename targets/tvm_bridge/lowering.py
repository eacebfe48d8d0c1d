"""IR → Relax: the :class:`Lowerer` and the registry of op lowerings.

:func:`lower` walks the graph in order and emits Relax bindings with a ``BlockBuilder``.
Each node goes to, in this order:

1. a lowering registered with :func:`lowers` for its ``(domain, op_type)`` (the standard
   ops with integer semantics, the hand-tuned integer kernels that override an integer
   op's decomposition, and whatever a plugin registers);
2. for an integer op (:mod:`qcompiler.integer`), the generic rendering of its
   decomposition into Relax ops (:mod:`.integer_render`);
3. for other standard ops, the converter of TVM's Relax ONNX frontend.

``main`` takes the graph inputs in order and always returns a tuple of the outputs.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import onnx_ir as ir

from qcompiler.errors import TargetError
from qcompiler.graph import const_array, node_label, static_shape
from qcompiler.integer import get_op, int_range
from qcompiler.specialize import CONTROL_FLOW, control_flow_hint

from . import adapter
from .registry import LOWERINGS
from .common import constant_node_value, float64_division_exact, host_array, relax_dtype, sanitize, tvm

#: ``int8_dot`` choices: scheduled int8 matmul kernels tensorized with these instructions.
INT8_DOT = {
    "sdot": "aarch64 sdot (Armv8.2 dotprod)",
    "neon": "aarch64 smull + saddlp + addp (Armv8.0 NEON)",
    "vnni": "x86 AVX-512 VNNI vpdpbusd (u8 × s8, 16 × 4 per instruction)",
}

#: Ops whose constant inputs are kept as they are (not folded at compile time).
_NO_FOLD = frozenset({
    "DequantizeLinear", "MatMul", "Gemm", "Conv", "MatMulInteger", "ConvInteger", "ConvTranspose",
})
_PASS_THROUGH = frozenset({"Identity", "Dropout"})


def lower(model: ir.Model, *, int8_dot: str | None = None, overrides: bool = True):
    """Relax ``IRModule`` with one function ``main(*inputs) -> (outputs...)``.

    ``int8_dot`` (aarch64: ``"sdot"`` or ``"neon"``; x86 with AVX-512 VNNI: ``"vnni"``):
    every int8 × int8 → int32 matmul (and group-1 ``ConvInteger``, as im2col + dense)
    becomes a scheduled kernel ``qc_int8_*`` tensorized with that dot-product instruction.
    ``overrides=False`` renders every integer op from its decomposition (no hand-tuned
    kernels): the specification the overrides are tested against.
    """
    return lower_with_report(model, int8_dot=int8_dot, overrides=overrides)[0]


def lower_with_report(model: ir.Model, *, int8_dot: str | None = None, overrides: bool = True):
    """``(IRModule, report)``; ``report["int8_matmul_kernels"]`` maps each scheduled int8
    kernel's name to the nodes it computes (int8 convs included), ``report["int8_matmul_fallback"]``
    lists int8 matmuls and convs that could not use one (per-row zero points, weights that
    leave int8 after subtracting their zero points, operands without matching batch
    dimensions, grouped convs)."""
    if int8_dot is not None and int8_dot not in INT8_DOT:
        raise TargetError(f"unknown int8 dot-product kernel kind {int8_dot!r} (choices: {', '.join(INT8_DOT)})")
    lowerer = Lowerer(model, int8_dot, overrides=overrides)
    mod = lowerer.run()
    report = {
        "int8_matmul_kernels": {k: sorted(v) for k, v in sorted(lowerer.int8_kernels.items())},
        "int8_matmul_fallback": sorted(lowerer.int8_fallback),
    }
    return mod, report


class Lowerer:
    """State of one lowering: the block builder, Relax values and compile-time constants."""

    def __init__(self, model: ir.Model, int8_dot: str | None = None, *, overrides: bool = True):
        _, self.relax = tvm()
        self.R = self.relax.op
        self.int8_dot = int8_dot
        self.overrides = overrides
        self.int8_kernels: dict[str, list[str]] = {}  # scheduled kernel -> nodes
        self.int8_fallback: list[str] = []
        self.kernel_vars: dict[tuple, Any] = {}
        self.node_name = ""
        self.model = model
        self.graph = model.graph
        self.opset = self.graph.opset_imports.get("", 17)
        self.bb = self.relax.BlockBuilder()
        self.env: dict[str, Any] = {}  # value name -> Relax expr
        self.consts: dict[str, np.ndarray] = {}  # value name -> compile-time array

    # ---- driver ----

    def run(self):
        relax = self.relax
        for node in self.graph:  # refused before the builder opens a function
            if node.domain in ("", "ai.onnx") and node.op_type in CONTROL_FLOW:
                raise TargetError(f"{control_flow_hint(node)} (the TVM targets compile straight-line graphs)")
        params = []
        for value in self.graph.inputs:
            if value.const_value is not None:
                continue
            shape = static_shape(value)
            if shape is None:
                raise TargetError(f"graph input '{value.name}' needs a static shape (pass --input-shape)")
            var = relax.Var(sanitize(value.name, len(params)), relax.TensorType(shape, relax_dtype(value.dtype)))
            self.env[value.name] = var
            params.append(var)
        for value in self.graph.initializers.values():
            self.set_const(value.name, value.const_value.numpy())
        with self.bb.function("main", params):
            with self.bb.dataflow():
                for node in self.graph:
                    self.lower_node(node)
                outs = []
                for value in self.graph.outputs:
                    if value.name in self.env:
                        outs.append(self.env[value.name])
                    elif value.name in self.consts:
                        outs.append(self.const_expr(self.consts[value.name]))
                    else:  # pragma: no cover - a malformed graph
                        raise TargetError(f"graph output '{value.name}' is never computed")
                result = self.bb.emit_output(relax.Tuple(outs))
            self.bb.emit_func_output(result)
        return self.bb.get()

    def lower_node(self, node: ir.Node) -> None:
        domain = "" if node.domain in ("", "ai.onnx") else node.domain
        self.node_name = node.name or node.op_type
        try:
            if domain == "" and node.op_type == "Constant":
                self.set_const(node.outputs[0].name, constant_node_value(node))
                return
            if domain == "" and node.op_type in _PASS_THROUGH:
                self.alias(node.outputs[0], node.inputs[0])
                if len(node.outputs) > 1 and node.outputs[1].uses():
                    raise TargetError(f"{node_label(node)}: the mask output is not supported")
                return
            if domain == "" and node.op_type == "Shape":
                self._lower_shape(node)
                return
            if domain == "" and node.op_type not in _NO_FOLD and self._all_const(node):
                self._fold(node)
                return
            outs = self._dispatch(domain, node)
        except TargetError:
            raise
        except Exception as exc:  # a converter or Relax's type inference refused
            message = str(exc).strip().splitlines()
            detail = message[-1] if message else type(exc).__name__
            raise TargetError(f"{node_label(node)}: cannot lower to TVM: {detail[:300]}") from exc
        if not isinstance(outs, (list, tuple)):
            outs = [outs]
        for value, expr in zip(node.outputs, outs):
            if value.name:
                if value.shape is not None and len(value.shape) == 0 and self.shape(expr) == (1,):
                    expr = self.emit(self.R.reshape(expr, ()))  # a scalar broadcast against a (1,) constant
                self.env[value.name] = expr

    def _dispatch(self, domain: str, node: ir.Node):
        integer_op = get_op(domain, node.op_type)
        handler = LOWERINGS.get((domain, node.op_type))
        if handler is not None and (self.overrides or integer_op is None):
            return handler(self, node)
        if integer_op is not None:
            from .integer_render import render_integer_op

            return render_integer_op(self, node, integer_op)
        if domain == "":
            return self._frontend(node)
        raise TargetError(f"{node_label(node)}: op not supported by the TVM targets")

    # ---- values and constants ----

    def set_const(self, name: str, array: np.ndarray) -> None:
        self.consts[name] = host_array(array)

    def alias(self, dst: ir.Value, src: ir.Value) -> None:
        if src.name in self.consts:
            self.consts[dst.name] = self.consts[src.name]
        else:
            self.env[dst.name] = self.env[src.name]

    def _all_const(self, node: ir.Node) -> bool:
        ins = [v for v in node.inputs if v is not None]
        return bool(ins) and all(v.name in self.consts for v in ins)

    def const(self, value: ir.Value | None) -> np.ndarray | None:
        """The compile-time array behind ``value`` (None if it is computed at run time)."""
        if value is None:
            return None
        if value.name in self.consts:
            return self.consts[value.name]
        array = const_array(value)
        return None if array is None else host_array(array)

    def need_const(self, node: ir.Node, index: int, what: str) -> np.ndarray:
        array = self.const(node.inputs[index] if index < len(node.inputs) else None)
        if array is None:
            raise TargetError(f"{node_label(node)}: {what} must be a compile-time constant")
        return array

    def expr(self, value: ir.Value):
        if value.name in self.env:
            return self.env[value.name]
        if value.name in self.consts:
            return self.const_expr(self.consts[value.name])
        raise TargetError(f"value '{value.name}' is used before it is computed")

    def const_expr(self, array: np.ndarray):
        array = host_array(array)
        return self.relax.const(array, str(array.dtype))

    def c64(self, value) -> Any:
        """An int64 constant; scalars are held as shape ``(1,)`` tensors, not 0-d ones, so they
        stay kernel arguments instead of being folded into the code as immediates: layers
        that differ only in their constants then share one kernel (far fewer kernels to
        compile). :meth:`lower_node` restores 0-d results."""
        array = np.asarray(value, np.int64)
        if array.ndim == 0:
            array = array.reshape(1)
        return self.relax.const(array, "int64")

    def emit(self, expr):
        return self.bb.emit(expr)

    def emit_te(self, func, *args):
        return self.bb.emit_te(func, *args)

    @staticmethod
    def dtype(expr) -> str:
        return str(expr.ty.dtype)

    @staticmethod
    def shape(expr) -> tuple[int, ...]:
        return tuple(int(d) for d in expr.ty.shape)

    def i64(self, expr):
        return expr if self.dtype(expr) == "int64" else self.emit(self.R.astype(expr, "int64"))

    # ---- integer building blocks ----

    def sub_zp(self, x, zp: np.ndarray | None):
        """``int64(x) - zp``, skipping a zero zero point."""
        x = self.i64(x)
        if zp is None or not np.any(zp):
            return x
        return self.emit(self.R.subtract(x, self.c64(zp)))

    def floor_div(self, a, b, a_bound: int, b_bound: int):
        """``⌊a / b⌋`` for int64 ``a``, ``b`` with ``|a| ≤ a_bound`` and ``1 ≤ b ≤ b_bound``,
        through float64 (integer division does not vectorise).

        Exact below ``2^53``: ``a`` and ``b`` are exact doubles; if ``a / b`` is not an
        integer it lies at least ``1/b`` from one, while the correctly rounded quotient is
        within ``|a/b|·2^−53 < 1/b`` of it, so flooring the rounded quotient never crosses
        an integer. Larger bounds keep ``floor_divide``."""
        R = self.R
        if not float64_division_exact(a_bound, b_bound):
            return self.emit(R.floor_divide(a, b))
        quotient = self.emit(R.divide(self.emit(R.astype(a, "float64")), self.emit(R.astype(b, "float64"))))
        return self.emit(R.astype(self.emit(R.floor(quotient)), "int64"))

    def clamp_cast(self, v, dtype: str, qmin=None, qmax=None):
        """Clamp int64 ``v`` to the range of ``dtype`` intersected with [qmin, qmax], then cast."""
        lo, hi = int_range(np.dtype(dtype))
        lo = lo if qmin is None else max(lo, int(qmin))
        hi = hi if qmax is None else min(hi, int(qmax))
        v = self.emit(self.R.maximum(v, self.c64(lo)))
        v = self.emit(self.R.minimum(v, self.c64(hi)))
        return self.emit(self.R.astype(v, dtype))

    def isqrt(self, n):
        """``floor(sqrt(n))`` for int64 ``0 <= n < 2^62``, as :func:`qcompiler.integer.isqrt`.

        A float64 estimate is within one of the root; two integer corrections make it exact.
        (A bit-serial loop would be integer-only, but its unrolled chain grows exponentially
        when GPU schedules inline it.)
        """
        R = self.R
        r = self.emit(R.astype(R.floor(R.sqrt(R.astype(n, "float64"))), "int64"))
        too_big = self.emit(R.greater(self.emit(R.multiply(r, r)), n))
        r = self.emit(R.subtract(r, self.emit(R.astype(too_big, "int64"))))
        up = self.emit(R.add(r, self.c64(1)))
        fits = self.emit(R.less_equal(self.emit(R.multiply(up, up)), n))
        return self.emit(R.add(r, self.emit(R.astype(fits, "int64"))))

    # ---- frontend fallback ----

    def _frontend(self, node: ir.Node):
        if adapter.frontend_converter(node.op_type, self.opset) is None:
            raise TargetError(f"{node_label(node)}: op not supported by the TVM targets")
        proto = ir.serde.serialize_node(node)
        inputs = [None if value is None else self.expr(value) for value in node.inputs]
        result = adapter.convert_node(self.bb, proto, inputs, self.env, self.opset)
        relax = self.relax
        if isinstance(result, relax.Tuple):
            return [self.emit(item) for item in result.fields]
        result = self.emit(result)
        if isinstance(result.ty, relax.TupleType):
            return [self.emit(relax.TupleGetItem(result, i)) for i in range(len(result.ty.fields))]
        return result

    def _lower_shape(self, node: ir.Node) -> None:
        value = node.inputs[0]
        shape = static_shape(value)
        if value.name in self.env:
            shape = self.shape(self.env[value.name])
        elif value.name in self.consts:
            shape = self.consts[value.name].shape
        if shape is None:
            raise TargetError(f"{node_label(node)}: needs a static input shape")
        start = node.attributes.get_int("start", 0)
        end = node.attributes.get_int("end", len(shape))
        self.set_const(node.outputs[0].name, np.array(shape[start:end] if end else shape[start:], np.int64))

    def _fold(self, node: ir.Node) -> None:
        """Evaluate a node whose inputs are all constants with the reference interpreter."""
        import onnx

        from qcompiler.interpreter import ReferenceInterpreter

        proto = ir.serde.serialize_node(node)
        names = [v.name for v in node.inputs if v is not None]
        inits = [onnx.numpy_helper.from_array(self.consts[n], n) for n in dict.fromkeys(names)]
        outs = [onnx.helper.make_empty_tensor_value_info(v.name) for v in node.outputs if v.name]
        graph = onnx.helper.make_graph([proto], "fold", [], outs, inits)
        opsets = [onnx.helper.make_opsetid(d, v) for d, v in self.graph.opset_imports.items()]
        folded = ReferenceInterpreter(onnx.helper.make_model(graph, opset_imports=opsets)).run({})
        for name, array in folded.items():
            self.set_const(name, np.asarray(array))


def flat_rows(lo: Lowerer, x):
    """``x`` reshaped to 2-D ``[rows, last]`` (itself if already 2-D)."""
    shape = lo.shape(x)
    return x if len(shape) == 2 else lo.emit(lo.R.reshape(x, (math.prod(shape[:-1]), shape[-1])))
