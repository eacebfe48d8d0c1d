"""The TVM bridge: lower a qcompiler IR model to Relax, compile it, load what was built.

This is the only module that imports ``tvm`` (lazily: ``import qcompiler`` stays fast).

* :func:`lower` walks the graph in order and emits one Relax binding per op with a
  ``BlockBuilder``. The ``qcompiler`` integer ops and the standard ops whose integer
  semantics matter (``MatMulInteger``, ``ConvInteger``, ``QuantizeLinear``,
  ``DequantizeLinear``, ``Cast``) are lowered here, calling the ``*_constants``
  functions of :mod:`qcompiler.intops` so every constant agrees with the reference.
  Other standard ops go through the converters of TVM's Relax ONNX frontend.
* :func:`compile` runs ``tvm.compile`` (with dlight GPU schedules when asked) and
  :func:`export` writes the shared library.
* :class:`VMModule` loads a library into the Relax VM and runs it on numpy arrays.

``main`` takes the graph inputs in order and always returns a tuple of the outputs.
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from qcompiler import intops
from qcompiler.errors import TargetError
from qcompiler.graph import const_array, node_label, static_shape
from qcompiler.opset import QC_DOMAIN

#: Ops whose constant inputs are kept as they are (not folded at compile time).
_NO_FOLD = frozenset({
    "DequantizeLinear", "MatMul", "Gemm", "Conv", "MatMulInteger", "ConvInteger", "ConvTranspose",
})
_PASS_THROUGH = frozenset({"Identity", "Dropout"})


def _tvm():
    import tvm
    from tvm import relax

    return tvm, relax


@contextlib.contextmanager
def _fast_tvmscript():
    """Make TVMScript parsing fast while TVM defines its tensor intrinsics.

    Every ``@T.prim_func`` calls ``inspect.stack()``, whose ``getmodule`` scans all of
    ``sys.modules`` for each frame without a source file (the import machinery's);
    importing ``tvm.s_tir.tensor_intrin`` (dlight's GPU matmul rule does) parses ~250
    functions and took 30-130 s. This swaps in a stack walk that reads the same
    ``FrameInfo`` fields (frame, file, line, code context) straight from the frames.
    """
    import inspect
    import linecache

    def stack(context: int = 1):
        frames, frame = [], sys._getframe(1)
        while frame is not None:
            code = frame.f_code
            line = linecache.getline(code.co_filename, frame.f_lineno)
            frames.append(inspect.FrameInfo(frame, code.co_filename, frame.f_lineno, code.co_name, [line] if line else None, 0))
            frame = frame.f_back
        return frames

    original = inspect.stack
    inspect.stack = stack
    try:
        yield
    finally:
        inspect.stack = original


def relax_dtype(dtype: ir.DataType) -> str:
    """The Relax dtype holding an IR type (int4/uint4 are held unpacked in 8 bits)."""
    if dtype == ir.DataType.INT4:
        return "int8"
    if dtype == ir.DataType.UINT4:
        return "uint8"
    if dtype == ir.DataType.BOOL:
        return "bool"
    return str(dtype.numpy())


def host_array(array: np.ndarray) -> np.ndarray:
    """A numpy array TVM can hold (int4/uint4 widened to 8 bits)."""
    array = np.asarray(array)
    name = array.dtype.name
    if name == "int4":
        return array.astype(np.int8)
    if name == "uint4":
        return array.astype(np.uint8)
    return array


# -- lowering ---------------------------------------------------------------------------


#: ``int8_dot`` choices: scheduled int8 matmul kernels tensorized with these instructions.
INT8_DOT = {
    "sdot": "aarch64 sdot (Armv8.2 dotprod)",
    "neon": "aarch64 smull + saddlp + addp (Armv8.0 NEON)",
    "vnni": "x86 AVX-512 VNNI vpdpbusd (u8 × s8, 16 × 4 per instruction)",
}


def lower(model: ir.Model, *, int8_dot: str | None = None):
    """Relax ``IRModule`` with one function ``main(*inputs) -> (outputs...)``.

    ``int8_dot`` (aarch64: ``"sdot"`` or ``"neon"``; x86 with AVX-512 VNNI: ``"vnni"``):
    every int8 × int8 → int32 matmul (and group-1 ``ConvInteger``, as im2col + dense)
    becomes a scheduled kernel ``qc_int8_*`` tensorized with that dot-product instruction
    (see :func:`lower_with_report`).
    """
    return lower_with_report(model, int8_dot=int8_dot)[0]


def lower_with_report(model: ir.Model, *, int8_dot: str | None = None):
    """``(IRModule, report)``; ``report["int8_matmul_kernels"]`` maps each scheduled int8
    kernel's name to the nodes it computes (int8 convs included: :func:`_int8_conv`),
    ``report["int8_matmul_fallback"]`` lists int8 matmuls and convs that could not use one
    (per-row zero points, weights that leave int8 after subtracting their zero points,
    operands without matching batch dimensions, grouped convs)."""
    if int8_dot is not None and int8_dot not in INT8_DOT:
        raise TargetError(f"unknown int8 dot-product kernel kind {int8_dot!r} (choices: {', '.join(INT8_DOT)})")
    lowerer = _Lowerer(model, int8_dot)
    mod = lowerer.run()
    report = {
        "int8_matmul_kernels": {k: sorted(v) for k, v in sorted(lowerer.int8_kernels.items())},
        "int8_matmul_fallback": sorted(lowerer.int8_fallback),
    }
    return mod, report


class _Lowerer:
    def __init__(self, model: ir.Model, int8_dot: str | None = None):
        _, self.relax = _tvm()
        self.R = self.relax.op
        self.int8_dot = int8_dot
        self.int8_kernels: dict[str, list[str]] = {}  # scheduled kernel -> nodes
        self.int8_fallback: list[str] = []
        self._kernel_vars: dict[tuple, Any] = {}
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
        params = []
        for value in self.graph.inputs:
            if value.const_value is not None:
                continue
            shape = static_shape(value)
            if shape is None:
                raise TargetError(f"graph input '{value.name}' needs a static shape (pass --input-shape)")
            var = relax.Var(_sanitize(value.name, len(params)), relax.TensorType(shape, relax_dtype(value.dtype)))
            self.env[value.name] = var
            params.append(var)
        for value in self.graph.initializers.values():
            self._set_const(value.name, value.const_value.numpy())
        with self.bb.function("main", params):
            with self.bb.dataflow():
                for node in self.graph:
                    self._lower_node(node)
                outs = []
                for value in self.graph.outputs:
                    if value.name in self.env:
                        outs.append(self.env[value.name])
                    elif value.name in self.consts:
                        outs.append(self._const(self.consts[value.name]))
                    else:  # pragma: no cover - a malformed graph
                        raise TargetError(f"graph output '{value.name}' is never computed")
                result = self.bb.emit_output(relax.Tuple(outs))
            self.bb.emit_func_output(result)
        return self.bb.get()

    def _lower_node(self, node: ir.Node) -> None:
        domain = "" if node.domain in ("", "ai.onnx") else node.domain
        self.node_name = node.name or node.op_type
        try:
            if domain == "" and node.op_type == "Constant":
                self._set_const(node.outputs[0].name, _constant_node_value(node))
                return
            if domain == "" and node.op_type in _PASS_THROUGH:
                self._alias(node.outputs[0], node.inputs[0])
                if len(node.outputs) > 1 and node.outputs[1].uses():
                    raise TargetError(f"{node_label(node)}: the mask output is not supported")
                return
            if domain == "" and node.op_type == "Shape":
                self._lower_shape(node)
                return
            if domain == "" and node.op_type not in _NO_FOLD and self._all_const(node):
                self._fold(node)
                return
            handler = _HANDLERS.get((domain, node.op_type))
            if handler is not None:
                outs = handler(self, node)
            elif domain == "":
                outs = self._frontend(node)
            else:
                raise TargetError(f"{node_label(node)}: op not supported by the TVM targets")
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

    # ---- values and constants ----

    def _set_const(self, name: str, array: np.ndarray) -> None:
        self.consts[name] = host_array(array)

    def _alias(self, dst: ir.Value, src: ir.Value) -> None:
        if src.name in self.consts:
            self.consts[dst.name] = self.consts[src.name]
        else:
            self.env[dst.name] = self.env[src.name]

    def _all_const(self, node: ir.Node) -> bool:
        ins = [v for v in node.inputs if v is not None]
        return bool(ins) and all(v.name in self.consts for v in ins)

    def const(self, value: ir.Value | None) -> np.ndarray | None:
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
            return self._const(self.consts[value.name])
        raise TargetError(f"value '{value.name}' is used before it is computed")

    def _const(self, array: np.ndarray):
        array = host_array(array)
        return self.relax.const(array, str(array.dtype))

    def c64(self, value) -> Any:
        """An int64 constant; scalars are held as shape ``(1,)`` tensors, not 0-d ones, so they
        stay kernel arguments instead of being folded into the code as immediates: layers
        that differ only in their constants then share one kernel (far fewer kernels to
        compile). :meth:`_lower_node` restores 0-d results."""
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

    # ---- integer building blocks (mirror qcompiler.intops) ----

    def sub_zp(self, x, zp: np.ndarray | None):
        """``int64(x) - zp``, skipping a zero zero point."""
        x = self.i64(x)
        if zp is None or not np.any(zp):
            return x
        return self.emit(self.R.subtract(x, self.c64(zp)))

    def rshift_round(self, v, k):
        """``floor((v + 2^(k-1)) / 2^k)`` for int64 ``v``; ``k`` scalar or broadcastable array."""
        k = np.asarray(k, np.int64)
        if not np.any(k):
            return v
        half = np.where(k > 0, np.left_shift(np.int64(1), np.maximum(k - 1, 0)), 0).astype(np.int64)
        return self.emit(self.R.right_shift(self.emit(self.R.add(v, self.c64(half))), self.c64(k)))

    def floor_div(self, a, b, a_bound: int, b_bound: int):
        """``⌊a / b⌋`` for int64 ``a``, ``b`` with ``|a| ≤ a_bound`` and ``1 ≤ b ≤ b_bound``,
        through float64 (integer division does not vectorise).

        Exact below ``2^53``: ``a`` and ``b`` are exact doubles; if ``a / b`` is not an
        integer it lies at least ``1/b`` from one, while the correctly rounded quotient is
        within ``|a/b|·2^−53 < 1/b`` of it, so flooring the rounded quotient never crosses
        an integer. Larger bounds keep ``floor_divide``."""
        R = self.R
        if not _float64_division_exact(a_bound, b_bound):
            return self.emit(R.floor_divide(a, b))
        quotient = self.emit(R.divide(self.emit(R.astype(a, "float64")), self.emit(R.astype(b, "float64"))))
        return self.emit(R.astype(self.emit(R.floor(quotient)), "int64"))

    def clamp_cast(self, v, dtype: str, qmin=None, qmax=None):
        """Clamp int64 ``v`` to the range of ``dtype`` intersected with [qmin, qmax], then cast."""
        lo, hi = intops.int_range(np.dtype(dtype))
        lo = lo if qmin is None else max(lo, int(qmin))
        hi = hi if qmax is None else min(hi, int(qmax))
        v = self.emit(self.R.maximum(v, self.c64(lo)))
        v = self.emit(self.R.minimum(v, self.c64(hi)))
        return self.emit(self.R.astype(v, dtype))

    def isqrt(self, n):
        """``floor(sqrt(n))`` for int64 ``0 <= n < 2^62``, as :func:`qcompiler.intops.isqrt`.

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
        from tvm.relax.frontend.onnx import onnx_frontend as fe

        converter = fe._get_convert_map().get(node.op_type)
        if converter is None:
            raise TargetError(f"{node_label(node)}: op not supported by the TVM targets")
        proto = ir.serde.serialize_node(node)
        attrs = fe.ONNXGraphImporter._parse_attr(None, proto.attribute)
        attrs["tvm_custom"] = {"name": node.name, "num_outputs": len(node.outputs)}
        inputs = fe.onnx_input()
        for value in node.inputs:
            inputs.append(None if value is None else self.expr(value))
        result = converter.get_converter(self.opset)(self.bb, inputs, attrs, [dict(self.env), {}])
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
        self._set_const(node.outputs[0].name, np.array(shape[start:end] if end else shape[start:], np.int64))

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
            self._set_const(name, np.asarray(array))


def _float64_division_exact(a_bound: int, b_bound: int) -> bool:
    """Whether ``⌊float64(a) / float64(b)⌋ = ⌊a / b⌋`` for ``|a| ≤ a_bound``, ``1 ≤ b ≤ b_bound``
    (see :meth:`_Lowerer.floor_div`)."""
    return a_bound < 2**53 and b_bound < 2**53


def _const_divisor(divisor: int, a_max: int) -> tuple[int, int] | None:
    """``(M, S)`` with ``⌊a·M / 2^S⌋ = ⌊a / divisor⌋`` for every ``0 ≤ a ≤ a_max``
    (``M = ⌈2^S / divisor⌉``, checked exhaustively at compile time, ``a·M < 2^62``); None if
    the range is too large to check or no such pair is exact."""
    if not (0 <= a_max <= 1 << 20 and divisor >= 1):
        return None
    span = np.arange(a_max + 1, dtype=np.int64)
    shift = a_max.bit_length() + (divisor - 1).bit_length()
    multiplier = -(-(1 << shift) // divisor)
    if a_max * multiplier < 2**62 and np.array_equal((span * multiplier) >> shift, span // divisor):
        return multiplier, shift
    return None


def _sanitize(name: str, index: int) -> str:
    clean = "".join(ch if ch.isalnum() or ch == "_" else "_" for ch in name)
    return clean if clean and (clean[0].isalpha() or clean[0] == "_") else f"input_{index}_{clean}"


def _constant_node_value(node: ir.Node) -> np.ndarray:
    for key, attr in node.attributes.items():
        if key in ("value", "sparse_value"):
            return attr.value.numpy()
        if key in ("value_float", "value_int"):
            return np.array(attr.value, np.float32 if key == "value_float" else np.int64)
        if key in ("value_floats", "value_ints"):
            return np.array(list(attr.value), np.float32 if key == "value_floats" else np.int64)
    raise TargetError(f"{node_label(node)}: unsupported Constant attribute")


def _attr(node: ir.Node, name: str, default):
    attr = node.attributes.get(name)
    if attr is None:
        return default
    value = attr.value
    return value.decode() if isinstance(value, bytes) else value


def _out_dtype_of_zp(zp: np.ndarray) -> str:
    return str(np.asarray(zp).dtype)


def _channel(param: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    return np.asarray(intops.channel_view(np.asarray(param).astype(np.int64), ndim, axis))


# -- qcompiler-domain ops ----------------------------------------------------------------


def _requantize(lo: _Lowerer, node: ir.Node):
    x = lo.expr(node.inputs[0])
    m = lo.need_const(node, 1, "multiplier")
    k = lo.need_const(node, 2, "shift")
    zp = lo.need_const(node, 3, "zero_point")
    x_zp = lo.const(node.inputs[4]) if len(node.inputs) > 4 else None
    if len(node.inputs) > 4 and node.inputs[4] is not None and x_zp is None:
        raise TargetError(f"{node_label(node)}: x_zero_point must be a compile-time constant")
    axis = _attr(node, "axis", 1)
    ndim = len(lo.shape(x))
    v = lo.sub_zp(x, x_zp)
    v = lo.emit(lo.R.multiply(v, lo.c64(_channel(m, ndim, axis))))
    v = lo.rshift_round(v, _channel(k, ndim, axis))
    if np.any(zp):
        v = lo.emit(lo.R.add(v, lo.c64(zp)))
    return lo.clamp_cast(v, _out_dtype_of_zp(zp), _attr(node, "qmin", None), _attr(node, "qmax", None))


def _int_add(lo: _Lowerer, node: ir.Node):
    a = lo.sub_zp(lo.expr(node.inputs[0]), lo.need_const(node, 1, "a_zero_point"))
    b = lo.sub_zp(lo.expr(node.inputs[2]), lo.need_const(node, 3, "b_zero_point"))
    y_zp = lo.need_const(node, 4, "y_zero_point")
    a = lo.emit(lo.R.multiply(a, lo.c64(_attr(node, "a_multiplier", 1))))
    b = lo.emit(lo.R.multiply(b, lo.c64(_attr(node, "b_multiplier", 1))))
    v = lo.rshift_round(lo.emit(lo.R.add(a, b)), _attr(node, "shift", 0))
    v = lo.emit(lo.R.add(v, lo.c64(y_zp)))
    return lo.clamp_cast(v, _out_dtype_of_zp(y_zp), _attr(node, "qmin", None), _attr(node, "qmax", None))


def _int_mul(lo: _Lowerer, node: ir.Node):
    a = lo.sub_zp(lo.expr(node.inputs[0]), lo.need_const(node, 1, "a_zero_point"))
    b = lo.sub_zp(lo.expr(node.inputs[2]), lo.need_const(node, 3, "b_zero_point"))
    y_zp = lo.need_const(node, 4, "y_zero_point")
    v = lo.rshift_round(lo.emit(lo.R.multiply(a, b)), _attr(node, "pre_shift", 0))
    v = lo.emit(lo.R.multiply(v, lo.c64(_attr(node, "multiplier", 1))))
    v = lo.rshift_round(v, _attr(node, "shift", 0))
    v = lo.emit(lo.R.add(v, lo.c64(y_zp)))
    return lo.clamp_cast(v, _out_dtype_of_zp(y_zp), _attr(node, "qmin", None), _attr(node, "qmax", None))


def _extents(*dims) -> tuple:
    """int64 extents for TE kernels, as Relax's legalized kernels use: FuseTIR matches the
    buffers of fused kernels exactly, extent types included."""
    from tvm import tirx

    return tuple(tirx.const(d, "int64") for d in dims)


def _int_lookup(lo: _Lowerer, node: ir.Node):
    """``y = table[x − min(x's type)]`` (index clamped into the table) as an element-wise kernel
    (Relax's ``take`` is opaque to fusion: its int64 indices would go through memory)."""
    from tvm import te, tirx

    x = lo.expr(node.inputs[0])
    table = lo.need_const(node, 1, "table")
    low, _ = intops.int_range(np.dtype(lo.dtype(x)))
    shape = _extents(*lo.shape(x))
    v = te.placeholder(shape, lo.dtype(x), name="x")
    t = te.placeholder(_extents(len(table)), str(table.dtype), name="table")
    y = te.compute(shape, lambda *i: t[tirx.max(tirx.min(v[i].astype("int32") - low, len(table) - 1), 0)], name=LOOKUP_BLOCK)
    func = te.create_prim_func([v, t, y]).without_attr("global_symbol").with_attr(ELEMENT_WISE, True)
    kernel = lo.bb.add_func(func, "lookup")
    out = lo.relax.TensorType(lo.shape(x), str(table.dtype))
    return lo.emit(lo.relax.call_tir(kernel, [x, lo._const(table)], out))


def _int_matmul(lo: _Lowerer, node: ir.Node):
    a = lo.expr(node.inputs[0])
    b = lo.expr(node.inputs[1])
    za = lo.const(node.inputs[2]) if len(node.inputs) > 2 else None
    zb = lo.const(node.inputs[3]) if len(node.inputs) > 3 else None
    for i in (2, 3):
        if len(node.inputs) > i and node.inputs[i] is not None and lo.const(node.inputs[i]) is None:
            raise TargetError(f"{node_label(node)}: zero points must be compile-time constants")
    acc = _attr(node, "acc_type", "int32") if node.op_type == "IntMatMul" else "int32"
    return _matmul_acc(lo, a, b, za, zb, acc, lo.const(node.inputs[1]))


def _matmul_acc(lo: _Lowerer, a, b, za, zb, acc: str, b_const: np.ndarray | None):
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
        zb = None if zb is None else _column_view(zb, len(b_shape))
        return lo.emit(R.matmul(_sub_narrow(lo, a, za), _sub_narrow(lo, b, zb), out_dtype="int32"))
    if b_const is not None and len(b_shape) == 2:
        w_nk = _weights_nk(b_const, zb)
        w = w_nk.T.astype(np.int64)
        flat = a if len(a_shape) == 2 else lo.emit(R.reshape(a, (math.prod(a_shape[:-1]), a_shape[-1])))
        scheduled = _int8_dense(lo, flat, w_nk, za) if lo.int8_dot else None
        if scheduled is not None:
            y = scheduled
        else:
            y = lo.emit_te(topi.nn.dense, flat, lo._const(w_nk), None, "int32")
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
    b = _sub_narrow(lo, b, None if zb is None else _column_view(zb, len(b_shape)))
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
        w = w - _column_view(zb, 2).astype(np.int64)
    return np.ascontiguousarray(w.T).astype(_narrowest(w))


def _int16_by_int8(lo: _Lowerer, a, b_const: np.ndarray, za, zb, acc: str):
    """``(a − za) @ W`` for int16 ``a`` and an int8 constant ``W`` as one int8 matmul of twice
    the rows: ``a = 256·hi + lo`` with ``hi = a >> 8`` and ``lo − 128`` both int8, so
    ``(a − za)·W = 256·(hi·W) + (lo − 128)·W + (128 − za)·colsum(W)``. Each int8 product
    fits int32; the combination is done in ``acc`` (int64, or int32 where the result
    fits by contract). None if W does not fit int8."""
    R = lo.R
    w = b_const.astype(np.int64)
    if zb is not None and np.any(zb):
        w = w - _column_view(zb, 2).astype(np.int64)
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
    y = _matmul_acc(lo, both, lo._const(w.astype(np.int8)), None, None, "int32", w.astype(np.int8))
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


# -- scheduled int8 matmul kernels (aarch64 dot product; the x86 VNNI ones below) -----------

_DOT_INTRINSICS: dict[str, str] = {}


def _dot_intrinsics() -> dict[str, str]:
    """Register the 4×4 int8 dot-product tensor intrinsics (``C[i] += Σ_k A[k]·B[i, k]``):
    TVM's ``ARM_DOT_4x4_i8_{SDOT,NEON}_INTRIN``, written out here because importing
    ``tvm.s_tir.tensor_intrin`` registers every intrinsic of every target (~30 s)."""
    if _DOT_INTRINSICS:
        return _DOT_INTRINSICS
    import tvm
    from tvm.script import tirx as T

    with _fast_tvmscript():
        _define_dot_intrinsics(tvm, T)
    return _DOT_INTRINSICS


def _define_dot_intrinsics(tvm, T) -> None:
    @T.prim_func(s_tir=True)
    def desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (4,), "int8", offset_factor=1)
        B = T.match_buffer(b, (4, 4), "int8", offset_factor=1)
        C = T.match_buffer(c, (4,), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:4], A[0:4], B[0:4, 0:4])
            T.writes(C[0:4])
            for i in T.serial(0, 4):
                for k in T.serial(0, 4):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")

    @T.prim_func(s_tir=True)
    def sdot(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (4,), "int8", offset_factor=1)
        B = T.match_buffer(b, (4, 4), "int8", offset_factor=1)
        C = T.match_buffer(c, (4,), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:4], A[0:4], B[0:4, 0:4])
            T.writes(C[0:4])
            a4 = T.reinterpret(A.vload([0], "int8x4"), dtype="int32")
            va = T.reinterpret(T.broadcast(a4, 4), dtype="int8x16")
            C[T.ramp(T.int32(0), 1, 4)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.sdot.v4i32.v16i8"),
                C.vload([0], dtype="int32x4"), va, B.vload([0, 0], dtype="int8x16"), dtype="int32x4",
            )

    @T.prim_func(s_tir=True)
    def neon(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (4,), "int8", offset_factor=1)
        B = T.match_buffer(b, (4, 4), "int8", offset_factor=1)
        C = T.match_buffer(c, (4,), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:4], A[0:4], B[0:4, 0:4])
            T.writes(C[0:4])
            a4 = T.reinterpret(A.vload([0], "int8x4"), dtype="int32")
            va = T.reinterpret(T.broadcast(a4, 2), dtype="int8x8")
            vb = B.vload([0, 0], dtype="int8x16")
            low = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.saddlp.v4i32.v8i16"),
                T.call_llvm_pure_intrin(
                    T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.smull.v8i16"), va, T.vectorlow(vb, dtype="int8x8"),
                    dtype="int16x8",
                ),
                dtype="int32x4",
            )
            high = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.saddlp.v4i32.v8i16"),
                T.call_llvm_pure_intrin(
                    T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.smull.v8i16"), va, T.vectorhigh(vb, dtype="int8x8"),
                    dtype="int16x8",
                ),
                dtype="int32x4",
            )
            C[T.ramp(T.int32(0), 1, 4)] += T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.addp.v4i32"), low, high, dtype="int32x4"
            )

    for kind, impl in (("sdot", sdot), ("neon", neon)):
        name = f"qcompiler_dot_4x4_i8i8s32_{kind}"
        tvm.s_tir.TensorIntrin.register(name, desc, impl, override=True)
        _DOT_INTRINSICS[kind] = name

    def vnni_pair(scope: str):
        @T.prim_func(s_tir=True)
        def vnni_desc(a: T.handle, b: T.handle, c: T.handle) -> None:
            A = T.match_buffer(a, (4,), "uint8", offset_factor=1)
            B = T.match_buffer(b, (16, 4), "int8", offset_factor=1)
            C = T.match_buffer(c, (16,), "int32", offset_factor=1, scope=scope)
            with T.sblock("root"):
                T.reads(C[0:16], A[0:4], B[0:16, 0:4])
                T.writes(C[0:16])
                for i in T.serial(0, 16):
                    for k in T.serial(0, 4):
                        with T.sblock("update"):
                            vi, vk = T.axis.remap("SR", [i, k])
                            C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")

        @T.prim_func(s_tir=True)
        def vnni(a: T.handle, b: T.handle, c: T.handle) -> None:
            # LLVM 22: <16 x i32> vpdpbusd.512(<16 x i32> acc, <64 x i8> u8, <64 x i8> s8)
            A = T.match_buffer(a, (4,), "uint8", offset_factor=1)
            B = T.match_buffer(b, (16, 4), "int8", offset_factor=1)
            C = T.match_buffer(c, (16,), "int32", offset_factor=1, scope=scope)
            with T.sblock("root"):
                T.reads(C[0:16], A[0:4], B[0:16, 0:4])
                T.writes(C[0:16])
                a4 = T.reinterpret(A.vload([0], "uint8x4"), dtype="int32")
                va = T.reinterpret(T.broadcast(a4, 16), dtype="int8x64")
                C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
                    T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
                    C.vload([0], dtype="int32x16"), va, B.vload([0, 0], dtype="int8x64"), dtype="int32x16",
                )

        return vnni_desc, vnni

    # the accumulators live in a "local" tile (a tensor intrinsic matches one buffer scope)
    name = "qcompiler_dot_16x4_u8i8s32_vnni"
    tvm.s_tir.TensorIntrin.register(name, *vnni_pair("local"), override=True)
    _DOT_INTRINSICS["vnni"] = name



def _signed8(lo: _Lowerer, x, zp):
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


def _int8_dense(lo: _Lowerer, a, w_nk: np.ndarray, za):
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
    y = lo.emit(lo.relax.call_tir(kernel, [a, lo._const(packed)], lo.relax.TensorType((m, n4), "int32")))
    if n4 != n:
        y = lo.emit(R.strided_slice(y, axes=[1], begin=[0], end=[n]))
    if z:
        colsum = (z * w_nk.astype(np.int64).sum(axis=1)).astype(np.int32)
        y = lo.emit(R.subtract(y, lo.relax.const(colsum, "int32")))
    return y


def _int8_batch_matmul(lo: _Lowerer, a, b, za, zb):
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
    def i32(value):  # (1,)-shaped: a kernel argument, not an immediate (see _Lowerer.c64)
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


def _int8_kernel(lo: _Lowerer, kind: str, shape: tuple[int, ...]):
    """The GlobalVar of a scheduled int8 kernel (built once per kind and shape)."""
    key = (kind, shape, lo.int8_dot)
    gvar = lo._kernel_vars.get(key)
    if gvar is None:
        name = f"qc_int8_{kind}_{'x'.join(map(str, shape))}_{lo.int8_dot}"
        if lo.int8_dot == "vnni":
            if kind.startswith("bmm"):
                func = _vnni_bmm_kernel(shape[:-3], *shape[-3:], zero_points=kind[len("bmm"):])
            else:
                func = _vnni_dense_kernel(shape[:-2], shape[-2], shape[-1], kind)
        else:
            func = _dense_kernel(*shape, lo.int8_dot) if kind == "dense" else _bmm_kernel(*shape, lo.int8_dot)
        if lo.int8_dot != "vnni":  # opaque, scheduled: a symbol of its own
            func = func.with_attr("global_symbol", name)
        else:
            func = func.without_attr("global_symbol")
        gvar = lo.bb.add_func(func, name)  # the dense ones: private, fused with their epilogues
        lo._kernel_vars[key] = gvar
        lo.int8_kernels[name] = []
    lo.int8_kernels[gvar.name_hint].append(lo.node_name)
    return gvar


def _dense_kernel(m: int, n: int, k: int, dot: str):
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


def _bmm_kernel(batch: int, m: int, n: int, k: int, dot: str):
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

    intrinsic = _dot_intrinsics()[dot]
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


# -- scheduled int8 matmul kernels (x86 AVX-512 VNNI) ------------------------------------------

#: Register tile of the VNNI kernels: up to this many rows × 16-column groups of int32
#: accumulators (at most 4 × 4 zmm registers), each updated by one ``vpdpbusd`` per 4 of K.
_VNNI_ROWS = (4, 3, 2, 1)
_VNNI_GROUPS = (4, 3, 2, 1)
#: Vector registers of AVX-512. The largest tile is taken whose ``rows × groups``
#: accumulators, ``groups`` weight vectors, ``rows`` broadcasts and the epilogue's scalar
#: constants (LLVM hoists their broadcasts out of all loops) fit: otherwise LLVM spills
#: accumulators to the stack inside the K loop (a fused integer GELU: 413 → 225 µs).
_ZMM_REGISTERS = 32


def _unsigned8(lo: _Lowerer, x, zp):
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


def _vnni_dense(lo: _Lowerer, a, w_nk: np.ndarray, za, acc: str = "int32"):
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
    args = [a, lo._const(packed), lo.relax.const(corr.astype(acc), acc)]  # int32: wraps like the exact sum
    y = lo.emit(lo.relax.call_tir(kernel, args, lo.relax.TensorType((*lead, n16), acc)))
    if n16 != n:
        y = lo.emit(R.strided_slice(y, axes=[len(lead)], begin=[0], end=[n]))
    return y


#: Block annotation naming the int8 product a fused kernel's schedule tensorizes (its value:
#: the kernel kind); set on the reduction block of the VNNI dense kernels, which are
#: scheduled after Relax has fused their element-wise consumers into them.
DOT_BLOCK = "qcompiler.dot"
#: Name of the block of an ``IntLookup`` kernel (FuseTIR keeps it; the schedules look for it).
LOOKUP_BLOCK = "lookup"


def _vnni_dense_kernel(lead: tuple[int, ...], n: int, k: int, kind: str):
    """``D[..., n] = Σ_k A[..., k] · W[n/16, k/4, n%16, k%4] − corr[n]`` (u8 × s8 → int32);
    ``dense_i16*``: ``A`` int16, ``D = 256·C_hi + C_lo − corr`` over its two uint8 halves.
    Unscheduled, and marked out-element-wise fusable: see :func:`schedule_dot_kernels`."""
    from tvm import te

    wide = kind != "dense"
    acc = "int64" if kind.endswith("acc64") else "int32"
    a = te.placeholder(_extents(*lead, k), "int16" if wide else "uint8", name="A")
    w = te.placeholder(_extents(n // 16, k // 4, 16, 4), "int8", name="W")
    corr = te.placeholder(_extents(n), acc, name="corr")
    r = te.reduce_axis(_extents(0, k), name="k")

    def weight(j):
        return w[j // 16, r // 4, j % 16, r % 4].astype("int32")

    if not wide:
        c = te.compute(
            _extents(*lead, n), lambda *ij: te.sum(a[(*ij[:-1], r)].astype("int32") * weight(ij[-1]), axis=r),
            name="C", attrs={DOT_BLOCK: kind},
        )
        d = te.compute(_extents(*lead, n), lambda *ij: c[ij] - corr[ij[-1]], name="D")
    else:  # row 2i holds h + 128 of row i, row 2i + 1 its l (both uint8): a tile has both halves
        *batch, rows = lead
        halves = te.compute(
            _extents(*batch, 2 * rows, k),
            lambda *qk: te.if_then_else(
                qk[-2] % 2 == 0,
                ((a[(*qk[:-2], qk[-2] // 2, qk[-1])] >> 8) + 128).astype("uint8"),
                (a[(*qk[:-2], qk[-2] // 2, qk[-1])] & 255).astype("uint8"),
            ),
            name="A_halves",
        )
        c = te.compute(
            _extents(*batch, 2 * rows, n),
            lambda *qj: te.sum(halves[(*qj[:-1], r)].astype("int32") * weight(qj[-1]), axis=r),
            name="C", attrs={DOT_BLOCK: kind},
        )
        d = te.compute(
            _extents(*lead, n),
            lambda *ij: (c[(*ij[:-2], 2 * ij[-2], ij[-1])].astype(acc) << 8)
            + c[(*ij[:-2], 2 * ij[-2] + 1, ij[-1])].astype(acc) - corr[ij[-1]],
            name="D",
        )
    return te.create_prim_func([a, w, corr, d]).with_attr("op_pattern", 4)  # kOutEWiseFusable


def _vnni_batch_matmul(lo: _Lowerer, a, b, za: int, zb: int):
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


def _vnni_bmm_kernel(batch: tuple[int, ...], m: int, n: int, k: int, zero_points: str = ""):
    """``D[..., i, j] = Σ_k A[..., i, k] · B[..., k, j] − zb·rows[..., i] − za·cols[..., j]
    + K·za·zb`` (u8 × s8 → int32; ``z = [za, zb, K·za·zb]``; the terms that ``zero_points``
    names, ``_za`` and/or ``_zb``, with the sums ``rows = Σ_k A``, ``cols = Σ_k B`` as
    inputs): each batch's B is packed to [n/16, k/4, 16, 4] next to its products.
    Unscheduled and out-element-wise fusable, like :func:`_vnni_dense_kernel`."""
    from tvm import te

    a = te.placeholder(_extents(*batch, m, k), "uint8", name="A")
    b = te.placeholder(_extents(*batch, k, n), "int8", name="B")
    packed = te.compute(
        _extents(*batch, n // 16, k // 4, 16, 4),
        lambda *q: b[(*q[:-4], q[-3] * 4 + q[-1], q[-4] * 16 + q[-2])], name="B_packed",
    )
    r = te.reduce_axis(_extents(0, k), name="k")
    c = te.compute(
        _extents(*batch, m, n),
        lambda *qij: te.sum(
            a[(*qij[:-1], r)].astype("int32")
            * packed[(*qij[:-2], qij[-1] // 16, r // 4, qij[-1] % 16, r % 4)].astype("int32"),
            axis=r,
        ),
        name="C", attrs={DOT_BLOCK: "bmm"},
    )
    params = [a, b]
    rows = te.placeholder(_extents(*batch, m), "int32", name="rows") if "_zb" in zero_points else None
    cols = te.placeholder(_extents(*batch, n), "int32", name="cols") if "_za" in zero_points else None
    params += [t for t in (rows, cols) if t is not None]
    z = te.placeholder(_extents(3), "int32", name="z") if zero_points else None
    params += [z] if z is not None else []

    def corrected(*qij):
        v = c[qij]
        if rows is not None:
            v = v - z[1] * rows[qij[:-1]]
        if cols is not None:
            v = v - z[0] * cols[(*qij[:-2], qij[-1])]
        return v + z[2] if rows is not None and cols is not None else v

    d = te.compute(_extents(*batch, m, n), corrected, name="D")
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


def schedule_dot_kernels(mod):
    """Schedule every kernel of a fused Relax module that holds a VNNI dense product (the
    product, and whatever element-wise consumers Relax fused into it as its epilogue)."""
    import tvm

    mod = mod.clone()
    for gvar, func in list(mod.functions.items()):
        if isinstance(func, tvm.tirx.PrimFunc) and not (func.attrs and SCHEDULED in func.attrs):
            if has_dot_block(func):
                try:
                    mod[gvar] = _schedule_vnni(func)
                except Exception:  # noqa: BLE001 - an epilogue this schedule does not foresee:
                    continue  # the generic CPU schedule runs it (slower, still exact)
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

    intrinsic = _dot_intrinsics()["vnni"]
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


def _column_view(zp, ndim: int) -> np.ndarray:
    zp = np.asarray(zp)
    return zp.reshape((1,) * (ndim - 1) + (-1,)) if zp.size > 1 else zp.reshape(())


def _narrowest(array: np.ndarray) -> np.dtype:
    for dtype in (np.int8, np.int16, np.int32):
        info = np.iinfo(dtype)
        if array.size == 0 or (array.min() >= info.min and array.max() <= info.max):
            return np.dtype(dtype)
    return np.dtype(np.int64)


def _sub_narrow(lo: _Lowerer, x, zp):
    """``x − zp`` in the narrowest type that holds it (the input type when zp is 0)."""
    if zp is None or not np.any(zp):
        return x
    dtype = lo.dtype(x)
    wide = "int16" if np.dtype(dtype).itemsize == 1 else "int32"
    x = lo.emit(lo.R.astype(x, wide))
    zp = np.asarray(zp).astype(wide)
    return lo.emit(lo.R.subtract(x, lo.relax.const(zp.reshape(1) if zp.ndim == 0 else zp, wide)))


def _int_softmax(lo: _Lowerer, node: ir.Node):
    """IntSoftmax as one kernel of four stages over the rows (the softmax axis): the row's
    max, ``e = exp(x − max)`` by the variant's integer formula, the row's sum, and the
    normalised, requantized output; marked out-element-wise fusable, so that Relax fuses
    the element-wise ops that follow (a requantize, the next matmul's sign flip) into it.
    (As Relax ops it made four kernels: each reduction ends a fused group.)"""
    from tvm import te, tirx

    x = lo.expr(node.inputs[0])
    shape = lo.shape(x)
    y_zero_point = np.asarray(lo.need_const(node, 2, "y_zero_point"))
    if y_zero_point.size != 1:
        raise TargetError(f"{node_label(node)}: IntSoftmax needs a per-tensor y_zero_point, got {y_zero_point.size} values")
    y_zp, out_dtype = int(y_zero_point.reshape(-1)[0]), _out_dtype_of_zp(y_zero_point)
    s_in = float(_attr(node, "input_scale", 1.0))
    s_out = float(_attr(node, "output_scale", 1.0))
    variant = _attr(node, "variant", "ibert")
    axis = _attr(node, "axis", -1) % len(shape)
    c = intops.softmax_constants(s_in, s_out)
    in_min, in_max = intops.int_range(np.dtype(lo.dtype(x)))
    span = int(in_max) - int(in_min)  # bound of −d
    n = shape[axis]

    def i64(v):
        return tirx.const(int(v), "int64")

    def full(row, j):  # a row index with the softmax axis put back
        return (*row[:axis], j, *row[axis:])

    def row_of(index):
        return (*index[:axis], *index[axis + 1:])

    xs = te.placeholder(_extents(*shape), lo.dtype(x), name="x")
    params, args = [xs], [x]
    if variant == "ibert":
        divisor = _const_divisor(c.q_ln2, span)

        def exp_of(d):
            z = tirx.min(_te_floor_div_const(-d, c.q_ln2, divisor), i64(62))
            pb = d + z * i64(c.q_ln2) + i64(c.q_b)
            return tirx.max(pb * pb + i64(c.q_c), i64(0)) >> z
    elif variant == "linear":
        def exp_of(d):
            t = _te_rshift_round(d * i64(c.log2e_multiplier), c.log2e_shift)
            whole = t >> i64(intops.LINEAR_FRAC_BITS)
            mantissa = t - (whole << i64(intops.LINEAR_FRAC_BITS)) + i64(1 << intops.LINEAR_FRAC_BITS)
            return mantissa >> tirx.min(-whole, i64(62))
    elif variant == "lut":
        if np.dtype(lo.dtype(x)).itemsize != 1:
            raise TargetError(f"{node_label(node)}: IntSoftmax variant 'lut' needs 8-bit inputs")
        table = intops._exp_lut(np.arange(-255, 1, dtype=np.int64), s_in)
        ts = te.placeholder(_extents(len(table)), "int64", name="exp_table")
        params.append(ts)
        args.append(lo._const(table))

        def exp_of(d):
            return ts[tirx.max(tirx.min(d + i64(255), i64(255)), i64(0))]
    else:
        raise TargetError(f"{node_label(node)}: unknown IntSoftmax variant {variant!r}")
    e_max = _softmax_exp_bound(variant, c, span)
    rows = _extents(*shape[:axis], *shape[axis + 1:])
    k = te.reduce_axis((tirx.const(0, "int64"), tirx.const(n, "int64")), name="k")
    row_max = te.compute(rows, lambda *r: te.max(xs[full(r, k)].astype("int64"), axis=k), name="row_max")
    e = te.compute(_extents(*shape), lambda *i: exp_of(xs[i].astype("int64") - row_max[row_of(i)]), name="row_exp")
    k2 = te.reduce_axis((tirx.const(0, "int64"), tirx.const(n, "int64")), name="k2")
    row_sum = te.compute(rows, lambda *r: te.sum(e[full(r, k2)], axis=k2), name="row_sum")

    def output(*i):
        total = tirx.max(row_sum[row_of(i)], i64(1))
        prob = _te_floor_div(e[i] << i64(intops.SOFTMAX_FRAC_BITS), total,
                             e_max << intops.SOFTMAX_FRAC_BITS, max(e_max * n, 1))
        v = _te_rshift_round(prob * i64(c.out_multiplier), c.out_shift) + i64(y_zp)
        low, high = intops.int_range(np.dtype(out_dtype))
        return tirx.min(tirx.max(v, i64(low)), i64(high)).astype(out_dtype)

    y = te.compute(_extents(*shape), output, name="softmax")
    func = te.create_prim_func([*params, y]).without_attr("global_symbol").with_attr("op_pattern", 4)  # kOutEWiseFusable
    kernel = lo.bb.add_func(func, "int_softmax")
    return lo.emit(lo.relax.call_tir(kernel, args, lo.relax.TensorType(shape, out_dtype)))


def _te_rshift_round(v, k: int):
    """``⌊(v + 2^(k−1)) / 2^k⌋`` (TE), as :meth:`_Lowerer.rshift_round`."""
    from tvm import tirx

    k = int(k)
    return v if k <= 0 else (v + tirx.const(1 << (k - 1), "int64")) >> tirx.const(k, "int64")


def _te_floor_div(a, b, a_bound: int, b_bound: int):
    """``⌊a / b⌋`` (TE) for ``|a| ≤ a_bound``, ``1 ≤ b ≤ b_bound``: through float64 where
    exact (see :meth:`_Lowerer.floor_div`), else integer division."""
    from tvm import tirx

    if not _float64_division_exact(a_bound, b_bound):
        return tirx.floordiv(a, b)
    return tirx.floor(a.astype("float64") / b.astype("float64")).astype("int64")


def _te_floor_div_const(a, divisor: int, multiply_shift):
    """``⌊a / divisor⌋`` (TE) by the multiply and shift :func:`_const_divisor` found."""
    from tvm import tirx

    if multiply_shift is None:
        return tirx.floordiv(a, tirx.const(divisor, "int64"))
    multiplier, shift = multiply_shift
    return (a * tirx.const(multiplier, "int64")) >> tirx.const(shift, "int64")


def _softmax_exp_bound(variant: str, c, span: int) -> int:
    """An upper bound of IntSoftmax's ``e`` (to pick an exact fast division); huge if unknown."""
    if variant == "ibert":  # (p + q_b)² + q_c, convex in p over (−q_ln2, 0]; ≤ 2 once z is capped at 62
        ends = (c.q_b, c.q_b - c.q_ln2 + 1)
        return max(max(v * v for v in ends) + c.q_c, 2)
    if variant == "linear":
        return 1 << (intops.LINEAR_FRAC_BITS + 1)
    if variant == "lut":
        return 1 << 23
    return 2**62


def _int_gelu(lo: _Lowerer, node: ir.Node):
    R = lo.R
    x = lo.expr(node.inputs[0])
    bits = np.iinfo(np.dtype(lo.dtype(x))).bits
    x_zp = lo.need_const(node, 1, "x_zero_point")
    y_zp = lo.need_const(node, 2, "y_zero_point")
    c = intops.gelu_constants(float(_attr(node, "input_scale", 1.0)), float(_attr(node, "output_scale", 1.0)), bits)
    q = lo.sub_zp(x, x_zp)
    clipped = lo.emit(R.minimum(lo.emit(R.abs(q)), lo.c64(-c.q_b)))
    cb = lo.emit(R.add(clipped, lo.c64(c.q_b)))
    poly = lo.emit(R.add(lo.emit(R.multiply(cb, cb)), lo.c64(c.q_c)))
    erf = lo.emit(R.multiply(lo.emit(R.sign(q)), poly))
    g = lo.emit(R.multiply(q, lo.emit(R.add(erf, lo.c64(c.q_one)))))
    g = lo.rshift_round(g, c.pre_shift)
    v = lo.rshift_round(lo.emit(R.multiply(g, lo.c64(c.multiplier))), c.shift)
    v = lo.emit(R.add(v, lo.c64(y_zp)))
    return lo.clamp_cast(v, _out_dtype_of_zp(y_zp))


def _int_layernorm(lo: _Lowerer, node: ir.Node):
    R = lo.R
    x = lo.i64(lo.expr(node.inputs[0]))
    shape = lo.shape(x)
    if _attr(node, "axis", -1) not in (-1, len(shape) - 1):
        raise TargetError(f"{node_label(node)}: IntLayerNorm normalises the last axis only")
    y_zp = lo.need_const(node, 2, "y_zero_point")
    mult = lo.need_const(node, 3, "multiplier").astype(np.int64)
    bias = lo.need_const(node, 4, "bias").astype(np.int64)
    n = shape[-1]
    in_min, in_max = intops.int_range(np.dtype(relax_dtype(node.inputs[0].dtype)))
    total = lo.emit(R.sum(x, axis=[-1], keepdims=True))
    mean = lo.emit(R.floor_divide(lo.emit(R.add(lo.emit(R.multiply(total, lo.c64(2))), lo.c64(n))), lo.c64(2 * n)))
    centred = lo.emit(R.subtract(x, mean))
    if 4 * n * max(int(in_min) ** 2, int(in_max) ** 2) < 2**62:
        # Σ(x − mean)² = Σx² − 2·mean·Σx + n·mean², exact in int64 at these bounds: both sums
        # read x itself, so x − mean is never written out (the normalise kernel recomputes it)
        squares = lo.emit(R.sum(lo.emit(R.multiply(x, x)), axis=[-1], keepdims=True))
        cross = lo.emit(R.multiply(lo.emit(R.multiply(mean, lo.c64(2))), total))
        spread = lo.emit(R.add(lo.emit(R.subtract(squares, cross)), lo.emit(R.multiply(lo.emit(R.multiply(mean, mean)), lo.c64(n)))))
    else:
        spread = lo.emit(R.sum(lo.emit(R.multiply(centred, centred)), axis=[-1], keepdims=True))
    var = lo.emit(R.floor_divide(spread, lo.c64(n)))
    var = lo.emit(R.add(var, lo.c64(_attr(node, "eps_q", 0))))
    sigma = lo.emit(R.maximum(lo.isqrt(var), lo.c64(1)))
    span = int(in_max) - int(in_min)  # bound of |x − mean|
    sigma_max = math.isqrt(span * span + max(int(_attr(node, "eps_q", 0)), 0)) + 1
    normed = lo.floor_div(lo.emit(R.left_shift(centred, lo.c64(intops.LAYERNORM_FRAC_BITS))), sigma,
                          span << intops.LAYERNORM_FRAC_BITS, sigma_max)
    value = lo.emit(R.add(lo.emit(R.multiply(normed, lo.c64(mult))), lo.c64(bias)))
    v = lo.rshift_round(value, _attr(node, "shift", 0))
    v = lo.emit(R.add(v, lo.c64(y_zp)))
    return lo.clamp_cast(v, _out_dtype_of_zp(y_zp))


# -- standard ops with integer semantics ----------------------------------------------------


def _conv_integer(lo: _Lowerer, node: ir.Node):
    R = lo.R
    x = lo.expr(node.inputs[0])
    w = lo.expr(node.inputs[1])
    za = lo.const(node.inputs[2]) if len(node.inputs) > 2 else None
    zw = lo.const(node.inputs[3]) if len(node.inputs) > 3 else None
    for i in (2, 3):
        if len(node.inputs) > i and node.inputs[i] is not None and lo.const(node.inputs[i]) is None:
            raise TargetError(f"{node_label(node)}: zero points must be compile-time constants")
    spatial = len(lo.shape(x)) - 2
    if spatial not in (1, 2):
        raise TargetError(f"{node_label(node)}: only 1-D and 2-D ConvInteger are supported")
    if lo.int8_dot and lo.dtype(x) in ("int8", "uint8"):
        scheduled = _int8_conv(lo, node, x, lo.const(node.inputs[1]), za, zw)
        if scheduled is not None:
            return scheduled
        lo.int8_fallback.append(lo.node_name)
    if zw is not None and np.ndim(zw) == 1 and zw.size > 1:
        zw = zw.reshape((-1,) + (1,) * (spatial + 1))
    x = _sub_narrow(lo, x, za)  # subtract first: padding is the real zero
    w = _sub_narrow(lo, w, zw)
    if lo.dtype(x) != lo.dtype(w):
        common = "int32" if "int32" in (lo.dtype(x), lo.dtype(w)) else "int16"
        x = lo.emit(R.astype(x, common)) if lo.dtype(x) != common else x
        w = lo.emit(R.astype(w, common)) if lo.dtype(w) != common else w
    conv = _conv_attrs(node, lo.shape(x), lo.shape(w))
    if spatial == 1:
        return lo.emit(R.nn.conv1d(x, w, out_dtype="int32", **conv))
    return lo.emit(R.nn.conv2d(x, w, out_dtype="int32", **conv))


def _int8_conv(lo: _Lowerer, node: ir.Node, x, w: np.ndarray | None, za, zw):
    """A 1-D/2-D ``ConvInteger`` (group 1, 8-bit input, scalar input zero point, constant
    weights that fit int8 once their zero points are subtracted) as im2col + the scheduled
    int8 dense kernel of :func:`_int8_dense`: the input is gathered into patches
    [N·OH·OW, C·KH·KW] (padded taps hold the input zero point, so they contribute exactly
    zero after the zero-point correction, as the reference's zero padding of ``x − za``),
    multiplied by the weights [OC, C·KH·KW] pre-packed at compile time, and laid back out
    as NCHW int32. None where it does not apply (the caller falls back to ``conv2d``)."""
    R = lo.R
    x_shape = lo.shape(x)
    if w is None or w.ndim != len(x_shape) or (za is not None and np.size(za) > 1):
        return None
    conv = _conv_attrs(node, x_shape, w.shape)
    if conv["groups"] != 1 or w.shape[1] != x_shape[1]:
        return None
    wk = w.astype(np.int64)
    if zw is not None and np.any(zw):
        zw = np.asarray(zw).astype(np.int64)
        wk = wk - (zw.reshape((-1,) + (1,) * (w.ndim - 1)) if zw.size > 1 else zw.reshape(()))
    if wk.size == 0 or wk.min() < -128 or wk.max() > 127:
        return None
    if len(x_shape) == 3:  # 1-D: a 2-D conv of height 1
        x = lo.emit(R.reshape(x, (x_shape[0], x_shape[1], 1, x_shape[2])))
        wk = wk[:, :, None, :]
        conv = {
            "strides": [1, *conv["strides"]], "dilation": [1, *conv["dilation"]],
            "padding": [0, conv["padding"][0], 0, conv["padding"][1]], "groups": 1,
        }
    view = (_unsigned8 if lo.int8_dot == "vnni" else _signed8)(lo, x, za)
    if view is None:
        return None
    x, z = view
    n, c, h, wd = lo.shape(x)
    oc, _, kh, kw = wk.shape
    (sh, sw), (dh, dw) = conv["strides"], conv["dilation"]
    top, left, bottom, right = conv["padding"]
    oh = (h + top + bottom - dh * (kh - 1) - 1) // sh + 1
    ow = (wd + left + right - dw * (kw - 1) - 1) // sw + 1
    if oh <= 0 or ow <= 0:
        return None
    k = c * kh * kw
    k4 = -(-k // 4) * 4  # the dense kernel's K; the extra columns meet zero weights
    patches = lo.emit_te(_im2col_te(n, c, h, wd, oh, ow, kh, kw, sh, sw, dh, dw, top, left, k4, z), x)
    w_nk = np.zeros((oc, k4), np.int8)
    w_nk[:, :k] = wk.reshape(oc, k)
    y = _int8_dense(lo, patches, w_nk, z)
    if y is None:  # pragma: no cover - the checks above cover _int8_dense's
        return None
    y = lo.emit(R.permute_dims(lo.emit(R.reshape(y, (n, oh, ow, oc))), [0, 3, 1, 2]))
    return lo.emit(R.reshape(y, (n, oc, ow))) if len(x_shape) == 3 else y


def _im2col_te(n, c, h, w, oh, ow, kh, kw, sh, sw, dh, dw, top, left, k4, pad_value):
    """TE patches of an NCHW 8-bit tensor: ``P[(b, i, j), (ch, p, q)] = x[b, ch, i·sh + p·dh − top,
    j·sw + q·dw − left]``, ``pad_value`` outside the input and in the columns past C·KH·KW."""
    from tvm import te, tirx

    k = c * kh * kw

    def im2col(x):  # the kernel's name: not "conv" (the arm-neon manifest's "other matmul" test)
        def patch(row, col):
            b, rest = row // (oh * ow), row % (oh * ow)
            ch, tap = col // (kh * kw), col % (kh * kw)
            y = rest // ow * sh + tap // kw * dh - top
            xx = rest % ow * sw + tap % kw * dw - left
            inside = tirx.all(col < k, y >= 0, y < h, xx >= 0, xx < w)
            value = x[b, tirx.min(ch, c - 1), tirx.max(tirx.min(y, h - 1), 0), tirx.max(tirx.min(xx, w - 1), 0)]
            return tirx.if_then_else(inside, value, tirx.const(pad_value, x.dtype))

        return te.compute((n * oh * ow, k4), patch, name="im2col")

    return im2col


def _conv_attrs(node: ir.Node, x_shape, w_shape) -> dict:
    spatial = len(x_shape) - 2
    kernel = list(_attr(node, "kernel_shape", w_shape[2:]))
    strides = list(_attr(node, "strides", [1] * spatial))
    dilations = list(_attr(node, "dilations", [1] * spatial))
    pads = list(_attr(node, "pads", [0] * (2 * spatial)))
    auto_pad = _attr(node, "auto_pad", "NOTSET")
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pads = [0] * (2 * spatial)
        for i in range(spatial):
            out = -(-x_shape[2 + i] // strides[i])
            total = max(0, (out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - x_shape[2 + i])
            small, big = total // 2, total - total // 2
            pads[i], pads[i + spatial] = (small, big) if auto_pad == "SAME_UPPER" else (big, small)
    elif auto_pad == "VALID":
        pads = [0] * (2 * spatial)
    return {"strides": strides, "padding": pads, "dilation": dilations, "groups": int(_attr(node, "group", 1))}


def _quantize_linear(lo: _Lowerer, node: ir.Node):
    R = lo.R
    x = lo.expr(node.inputs[0])
    scale = lo.need_const(node, 1, "y_scale")
    zp = lo.const(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
    out = relax_dtype(node.outputs[0].dtype)
    if zp is None:
        zp = np.zeros((), out)
    ndim = len(lo.shape(x))
    axis = _attr(node, "axis", 1)
    block = _attr(node, "block_size", 0)
    scale = _per_axis(scale, ndim, axis, block, lo.shape(x))
    zp = _per_axis(zp, ndim, axis, block, lo.shape(x))
    ftype = lo.dtype(x)
    v = lo.emit(R.divide(x, lo.relax.const(scale.astype(ftype), ftype)))
    zero = lo.relax.const(np.asarray(0, ftype), ftype)
    v = lo.emit(R.where(lo.emit(R.isnan(v)), zero, v))  # NaN quantizes to the zero point
    v = lo.emit(R.clip(v, -(2.0**30), 2.0**30))
    whole = lo.emit(R.floor(v))
    frac = lo.emit(R.subtract(v, whole))
    iw = lo.emit(R.astype(whole, "int32"))
    odd = lo.emit(R.equal(lo.emit(R.bitwise_and(iw, lo.relax.const(np.int32(1), "int32"))), lo.relax.const(np.int32(1), "int32")))
    half = lo.relax.const(np.asarray(0.5, ftype), ftype)
    up = lo.emit(R.logical_or(lo.emit(R.greater(frac, half)), lo.emit(R.logical_and(lo.emit(R.equal(frac, half)), odd))))
    r = lo.emit(R.add(iw, lo.emit(R.astype(up, "int32"))))  # round half to even, like np.rint
    r = lo.emit(R.add(r, lo.relax.const(zp.astype(np.int32), "int32")))
    return lo.clamp_cast(lo.i64(r), out)


def _dequantize_linear(lo: _Lowerer, node: ir.Node):
    R = lo.R
    x = lo.expr(node.inputs[0])
    scale = lo.need_const(node, 1, "x_scale")
    zp = lo.const(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
    ndim = len(lo.shape(x))
    axis = _attr(node, "axis", 1)
    block = _attr(node, "block_size", 0)
    ftype = str(scale.dtype)
    out = relax_dtype(node.outputs[0].dtype) if node.outputs[0].dtype is not None else ftype
    v = lo.emit(R.astype(x, "float32"))
    if zp is not None and np.any(zp):
        zp = _per_axis(zp, ndim, axis, block, lo.shape(x)).astype(np.float32)
        v = lo.emit(R.subtract(v, lo.relax.const(zp, "float32")))
    scale = _per_axis(scale, ndim, axis, block, lo.shape(x))
    if ftype != "float32":
        v = lo.emit(R.astype(v, ftype))
    v = lo.emit(R.multiply(v, lo.relax.const(scale, ftype)))
    return v if out == ftype else lo.emit(R.astype(v, out))


def _per_axis(param: np.ndarray, ndim: int, axis: int, block: int, shape) -> np.ndarray:
    """A scale/zero point shaped to broadcast against the input (per-tensor, per-axis or blocked)."""
    param = np.asarray(param)
    if param.size == 1 and param.ndim <= 1:
        return param.reshape(())
    axis %= ndim
    if block:
        return np.repeat(param, block, axis=axis)[tuple(slice(0, s) for s in shape)]
    view = [1] * ndim
    view[axis] = param.size
    return param.reshape(view)


def _cast(lo: _Lowerer, node: ir.Node):
    """``astype``: float → int truncates toward zero like ONNX; int4 targets are held in int8."""
    x = lo.expr(node.inputs[0])
    to = relax_dtype(ir.DataType(_attr(node, "to", 1)))
    return x if to == lo.dtype(x) else lo.emit(lo.R.astype(x, to))


def _gather(lo: _Lowerer, node: ir.Node):
    """ONNX ``Gather``: a negative index counts from the end of the axis. Out-of-range
    indices are clamped, so the compiled code never reads outside the table (TVM's
    default ``take`` would); runners refuse out-of-range index inputs before the call."""
    R = lo.R
    data, idx = lo.expr(node.inputs[0]), lo.expr(node.inputs[1])
    shape = lo.shape(data)
    axis = _attr(node, "axis", 0) % len(shape)
    itype = lo.dtype(idx)
    if itype not in ("int32", "int64"):
        idx, itype = lo.emit(R.astype(idx, "int64")), "int64"
    size = lo.relax.const(np.array(shape[axis], itype), itype)
    zero = lo.relax.const(np.array(0, itype), itype)
    wrapped = lo.emit(R.where(lo.emit(R.less(idx, zero)), lo.emit(R.add(idx, size)), idx))
    return lo.emit(R.take(data, wrapped, axis=axis, mode="clip"))


_HANDLERS = {
    (QC_DOMAIN, "Requantize"): _requantize,
    (QC_DOMAIN, "IntAdd"): _int_add,
    (QC_DOMAIN, "IntMul"): _int_mul,
    (QC_DOMAIN, "IntLookup"): _int_lookup,
    (QC_DOMAIN, "IntMatMul"): _int_matmul,
    (QC_DOMAIN, "IntSoftmax"): _int_softmax,
    (QC_DOMAIN, "IntGELU"): _int_gelu,
    (QC_DOMAIN, "IntLayerNorm"): _int_layernorm,
    ("", "MatMulInteger"): _int_matmul,
    ("", "ConvInteger"): _conv_integer,
    ("", "QuantizeLinear"): _quantize_linear,
    ("", "DequantizeLinear"): _dequantize_linear,
    ("", "Cast"): _cast,
    ("", "Gather"): _gather,
}

#: Op types lowered by this module itself (the rest of the standard ops use TVM's ONNX frontend).
NATIVE_OPS = frozenset(f"{d}.{op}" if d else op for d, op in _HANDLERS)


# -- compiling and loading --------------------------------------------------------------


def make_target(spec: Mapping[str, Any]):
    tvm, _ = _tvm()
    return tvm.target.Target(dict(spec))


def host_cpu() -> str:
    """LLVM's name for this machine's CPU (e.g. ``sapphirerapids``)."""
    from tvm.target import codegen

    return str(codegen.llvm_get_system_cpu())


def llvm_has_feature(target: Mapping[str, Any], feature: str) -> bool:
    """Whether an LLVM target dict's CPU (``mcpu`` and ``mattr``) has ``feature`` (e.g. ``avx512vnni``)."""
    from tvm.target import codegen

    try:
        return bool(codegen.target_has_features(feature, make_target(target)))
    except Exception:  # an LLVM without that architecture
        return False


def host_triple() -> str:
    from tvm.target import codegen

    return str(codegen.llvm_get_system_triple())


#: LLVM optimisation level for CPU kernels unless the target dict sets ``opt-level``: on MiniLM
#: -O3 took 2-3× longer to compile (mostly the int64 elementwise kernels) for no measured speed-up.
LLVM_OPT_LEVEL = 2


def compile(mod, target: Mapping[str, Any], *, gpu_schedules: bool = False, disable_assert: bool = False, tune=None):
    """``tvm.compile`` a lowered module for ``target`` (a JSON-style target dict).

    ``tune`` (CPU only): a callable ``(fused_module, tvm_target) -> fused_module``, e.g. a
    :class:`targets.tvm_bridge.tuning.Tuner`, run after fusion and before the default CPU schedule
    (which leaves the kernels it marks ``SCHEDULED`` alone)."""
    tvm, relax = _tvm()
    target = dict(target)
    if target.get("kind") == "llvm":
        target.setdefault("opt-level", LLVM_OPT_LEVEL)
    tgt = make_target(target)
    config = {"tirx.disable_assert": True} if disable_assert else {}
    with tvm.transform.PassContext(opt_level=3, config=config):
        mod = fuse(mod)
        if target.get("kind") == "llvm":
            with tgt, _fast_tvmscript():
                mod = schedule_dot_kernels(mod)  # the int8 products, with their fused epilogues
        if tune is not None and target.get("kind") == "llvm" and not gpu_schedules:
            mod = tune(mod, tgt)
        if gpu_schedules:
            from tvm.s_tir import dlight as dl

            for gvar, func in list(mod.functions.items()):
                if isinstance(func, tvm.tirx.PrimFunc):  # dlight's int8 tensor-core rule fails to build
                    mod[gvar] = func.with_attr("dlight.do_not_tensorize", True)
            with tgt, _fast_tvmscript():
                mod = dl.ApplyDefaultSchedule(
                    dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback(),
                )(mod)
            return tvm.compile(mod, target=tgt)
        if target.get("kind") != "llvm":
            return tvm.compile(mod, target=tgt)
        # CPU: scheduled kernels; LLVM code generation rejects a few vectorised forms
        # (e.g. some boolean vector selects), so fall back to scalar inner loops, then
        # to TVM's default loops, rather than fail the build.
        for vectorize in (True, False):
            with tgt, _fast_tvmscript():
                scheduled = _schedule_cpu(mod, vectorize=vectorize)
            try:
                return tvm.compile(scheduled, target=tgt)
            except Exception:  # noqa: BLE001 - retried with a simpler schedule below
                continue
        return tvm.compile(mod, target=tgt)


#: PrimFunc attribute of kernels that are element-wise although TVM's pattern analysis cannot
#: tell (a table lookup reads at a data-dependent index): fused like any element-wise op.
ELEMENT_WISE = "qcompiler.element_wise"


def fuse(mod):
    """Relax's kernel fusion (the ``zero`` pipeline: legalize, annotate op patterns, fold
    constants, fuse), with :data:`ELEMENT_WISE` kernels marked element-wise, then the
    kernels fused away dropped."""
    _, relax = _tvm()
    import tvm

    @tvm.transform.module_pass(opt_level=0, name="MarkElementWise")
    def mark_element_wise(mod, _ctx):
        for gvar, func in list(mod.functions.items()):
            if isinstance(func, tvm.tirx.PrimFunc) and func.attrs and ELEMENT_WISE in func.attrs:
                mod[gvar] = func.with_attr("op_pattern", 0)  # kElemWise
        return mod

    return tvm.transform.Sequential([
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),  # an op_pattern of 0 reads as unset: re-marked below
        mark_element_wise,
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
        relax.transform.DeadCodeElimination(["main"]),
    ])(mod)


#: PrimFunc attribute of the kernels this module schedules itself (left alone by _schedule_cpu).
SCHEDULED = "qcompiler.scheduled"
#: Below this many output elements a kernel runs on one thread (fork/join costs more).
_PARALLEL_MIN_ELEMENTS = 4096


def _schedule_cpu(mod, *, vectorize: bool = True):
    """Schedule every fused kernel that has no schedule of its own for a multi-core CPU:
    inline the element-wise producers into their consumers (no intermediate buffers),
    then run the fused spatial loop in parallel and the innermost spatial chunk as SIMD.
    Loop order within a reduction is untouched, so results are bit-identical."""
    import tvm

    mod = mod.clone()
    for gvar, func in list(mod.functions.items()):
        if isinstance(func, tvm.tirx.PrimFunc) and not (func.attrs and SCHEDULED in func.attrs):
            scheduled = _cpu_kernel_schedule(func, vectorize)
            if scheduled is not None:
                mod[gvar] = scheduled
    return mod


def _cpu_kernel_schedule(func, vectorize: bool = True):
    from tvm import s_tir
    from tvm.s_tir.dlight.analysis import normalize_prim_func

    sch = s_tir.Schedule(func)
    try:
        infos = normalize_prim_func(sch)
        if infos is None:
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
    except Exception:  # noqa: BLE001 - an unschedulable kernel keeps TVM's default loops
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
    that a larger consumer broadcasts: those are computed once."""
    import re

    def recomputed(block) -> bool:
        stmt = sch.get(block)
        if len(str(stmt.body)) <= _RECOMPUTE_MAX_CHARS or not stmt.writes:
            return False
        source = stmt.writes[0].source
        pattern = re.escape(getattr(source, "name", None) or str(source)) + r"\[[^\]]*\]"
        consumers = sch.get_consumers(block)  # several: wait until they have merged, then look again
        return len(consumers) > 1 or any(len(set(re.findall(pattern, str(sch.get(c).body)))) > 1 for c in consumers)

    def inline_one() -> bool:
        kept = {sch.get(info.block_rv).name_hint for info in infos
                if recomputed(info.block_rv) or _feeds_larger(sch, info.block_rv)}
        for index, info in enumerate(infos):
            block = info.block_rv
            if sch.get(block).name_hint in kept:
                continue
            ways = [sch.compute_inline]
            if not any(sch.get(p).name_hint in kept for p in sch.get_producers(block)):
                ways.append(sch.reverse_compute_inline)  # not into a block kept to be computed once
            for inline in ways:
                try:
                    inline(block)
                except Exception:  # noqa: BLE001 - not inlinable this way
                    continue
                infos.pop(index)
                return True
        return False

    while inline_one():
        pass
    return infos


def export(executable, path: Path, *, cc: str | None = None, options: Sequence[str] = ()) -> None:
    """Write the compiled module as a shared library (optionally with a cross compiler)."""
    kwargs: dict[str, Any] = {}
    if cc is not None:
        kwargs["cc"] = cc
    if options:
        kwargs["options"] = list(options)
    executable.export_library(str(path), **kwargs)


def module_kinds(executable) -> list[str]:
    """Kinds of every runtime module inside a compiled executable (``llvm``, ``cuda``, ...)."""
    seen: list[str] = []
    stack = [executable.mod]
    while stack:
        mod = stack.pop()
        seen.append(str(mod.kind))
        stack.extend(mod.imports)
    return seen


def device_source(executable, kind: str) -> str:
    """Source of the first imported module of ``kind`` (``cuda`` gives the .cu text, ``c`` C)."""
    stack = [executable.mod]
    while stack:
        mod = stack.pop()
        if str(mod.kind) == kind:
            return str(mod.inspect_source())
        stack.extend(mod.imports)
    raise TargetError(f"the build holds no '{kind}' module: a schedule is missing, code fell back to the host")


def assembly(executable, fmt: str = "s") -> str:
    """Assembly of the LLVM module inside an executable."""
    stack = [executable.mod]
    while stack:
        mod = stack.pop()
        if str(mod.kind) == "llvm":
            return str(mod.inspect_source(fmt))
        stack.extend(mod.imports)
    return ""


def cuda_available() -> bool:
    tvm, _ = _tvm()
    return bool(tvm.cuda(0).exist)


class VMModule:
    """A compiled library loaded into the Relax VM (``device``: ``cpu`` or ``cuda``); call with numpy arrays."""

    def __init__(self, library: Path | str | None = None, *, executable=None, device: str = "cpu"):
        tvm, relax = _tvm()
        lib = executable if executable is not None else tvm.runtime.load_module(str(library))
        self._tvm = tvm
        self._device = tvm.cuda(0) if device == "cuda" else tvm.cpu()
        self._vm = relax.VirtualMachine(lib, self._device)

    def __call__(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        tensor = self._tvm.runtime.tensor
        args = [tensor(np.ascontiguousarray(host_array(a)), self._device) for a in arrays]
        result = self._vm["main"](*args)
        return [t.numpy() for t in result]
