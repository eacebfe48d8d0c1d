"""``lower-integer``: fold QDQ graphs into integer-only arithmetic (the integer stage).

Each float op whose inputs are dequantized tensors and whose output is quantized is
replaced by integer ops computing the quantized output directly:

* linear groups → ``MatMulInteger``/``ConvInteger``/``IntMatMul`` (int32 accumulation,
  int64 where the bound ``max|x−z_x| · max_j Σ_k |W_kj|`` could exceed int32),
  int32 bias ``round(b / (s_x·s_w))``, ``Requantize`` with
  ``M/2^k ≈ s_x·s_w / s_y`` and the fused ReLU/ReLU6 as clamp bounds;
* residual adds → ``IntAdd`` (scale alignment); products → ``IntMul``; scaling by a
  constant → ``Requantize``;
* softmax / GELU / LayerNorm → ``IntSoftmax`` / ``IntGELU`` (or a lookup table) /
  ``IntLayerNorm``, the variant chosen by measured error against float under
  ``error_budget`` (max error as a fraction of the output range);
* data movement keeps the integer tensor (requantizing only where scales differ);
  embedding tables are quantized with their output's parameters; attention-mask
  selects become integer selects.

After the pass no float tensor remains between the quantized inputs and the
dequantized outputs, except for ops the configuration keeps in float or that have
no integer form: those stay as QDQ islands and are listed in the report.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as ir_common

from qcompiler import intops, qstate
from qcompiler.graph import const_array, ensure_qc_opset, node_label
from qcompiler.opset import QC_DOMAIN
from qcompiler.pipeline import Pass, option
from qcompiler.passes.exact_masks import is_mask_select
from qcompiler.passes.lower_nonlinear import _ELEMENTWISE_TABLES, NonlinearLowering
from qcompiler.passes.lower_structural import StructuralLowering
from qcompiler.passes.lowering_weights import integer_weight
from qcompiler.passes.lowering_common import QT, Builder as _Builder, Refuse as _Refuse, shape_of as _shape
from qcompiler.qdq import (
    TRANSPARENT_OPS, constant_value as _dequantized_constant, is_float, linear_group, qdq_source,
)

_INT8 = (np.dtype(np.int8), np.dtype(np.uint8))
#: Node metadata: why lower-integer left the node in float.
KEPT_FLOAT_KEY = "qcompiler.kept_float"
#: Arithmetic with a scalar constant: ends a chain of element-wise functions lowered as one table.
_SCALAR_ARITHMETIC = frozenset({"Add", "Sub", "Mul", "Div"})


@dataclass(frozen=True)
class LowerInteger(Pass):
    """Replace QDQ + float ops by integer ops (MatMulInteger, Requantize, IntSoftmax, ...)."""

    name = "lower-integer"
    stages = ("fakequant",)
    produces = "integer"
    preserves_numerics = False

    softmax: Literal["auto", "ibert", "linear", "lut"] = option("auto", "integer softmax variant (auto: by error budget)")
    gelu: Literal["auto", "ibert", "lut"] = option("auto", "integer GELU variant (auto: by error budget)")
    error_budget: float = option(0.005, "max error of a nonlinear op's integer variant, as a fraction of its output range")
    keep_float: tuple[str, ...] = option((), "node-name globs or op types to leave in float")

    def run(self, model: ir.Model, ctx) -> bool:
        import fnmatch

        qstate.set_fakequant_snapshot(model, ir.to_proto(model))
        ensure_qc_opset(model)
        lowering = _Lowering(model, self, ctx)
        for node in list(model.graph):
            if node.graph is not model.graph:
                continue
            if node.op_type in self.keep_float or any(fnmatch.fnmatchcase(node.name or "", p) for p in self.keep_float):
                lowering.keep(node, "configured (keep_float)", group=True)
                continue
            lowering.lower(node)
        _drop_redundant_qdq(model)
        model.graph.sort()  # dead-code removal walks the graph backwards: in topological order
        ir_common.RemoveUnusedNodesPass()(model)
        report = ctx.report
        report["integer_lowering"] = {
            "lowered": lowering.lowered,
            "kept_float": lowering.kept,
            "variants": lowering.variants,
            "accumulators": lowering.accumulators,
        }
        report.setdefault("kept_float", []).extend(lowering.kept)
        _warn_wide_accumulators(lowering.accumulators, ctx)
        return lowering.lowered > 0


def _warn_wide_accumulators(accumulators: list[dict], ctx) -> None:
    """One warning for every product whose int32 accumulator could overflow (int64 instead)."""
    wide = [a for a in accumulators if a["accumulator"] != "int32"]
    if not wide:
        return
    worst = max(wide, key=lambda a: a["bound"])
    ctx.warn(
        f"lower-integer: {len(wide)} of {len(accumulators)} integer products could overflow an int32 "
        f"accumulator at the calibrated ranges (|x - z_x| * sum|w| + |bias| >= 2^31) and accumulate in "
        f"int64 instead; largest bound {worst['bound']:.3g} at node '{worst['node']}' ({worst['op']})"
    )


class _Lowering(NonlinearLowering, StructuralLowering):
    def __init__(self, model: ir.Model, options: LowerInteger, ctx):
        self.model = model
        self.options = options
        self.b = _Builder(model)
        self.lowered = 0
        self.kept: list[dict] = []
        self.variants: list[dict] = []
        self.accumulators: list[dict] = []
        self.ctx = ctx
        self.done: set[int] = set()

    # -- driver --------------------------------------------------------------------

    def keep(self, node: ir.Node, reason: str, group: bool = False) -> None:
        if id(node) in self.done:
            return
        members = linear_group(node) if group else None
        if members is not None:  # the bias add and activation stay with their linear op
            self.done.update(id(n) for n in (members.bias_add, members.activation) if n is not None)
        if any(is_float(o) for o in node.outputs) and node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            self.kept.append({"node": node.name, "op": node.op_type, "reason": reason})
            node.metadata_props[KEPT_FLOAT_KEY] = reason  # integer-only targets name it when they refuse

    def lower(self, node: ir.Node) -> None:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear", "Constant") or node.domain not in ("", "ai.onnx"):
            return
        if is_mask_select(node):
            return  # lowered with the softmax it feeds
        if id(node) in self.done:
            return
        if node.op_type == "Split" and len(node.outputs) > 1:
            self._split(node)
            return
        if node.op_type == "Reshape" and _dequantized_constant(node.outputs[0]) is not None:
            return  # a reshaped quantized constant (a (1, C, 1, 1) bias): read as a constant
        group = linear_group(node)
        if group is not None:
            self.done.update(id(n) for n in (group.bias_add, group.activation) if n is not None)
        last = group.activation or group.bias_add or group.linear if group else node
        out = last.outputs[0]
        target = self._output_params(out)
        if target is None:
            if any(is_float(o) for o in node.outputs) and not self._inside_group(node):
                self.keep(node, "output is not quantized")
            return
        q_node, out_qt = target
        self.b.anchor = q_node
        try:
            if group is not None:
                result = self._linear(group, out_qt)
            else:
                handler = getattr(self, f"_op_{node.op_type}", None)
                result = handler(node, out_qt) if handler else None
                if result is None and node.op_type in TRANSPARENT_OPS:
                    result = self._transparent(node, out_qt)
                if result is None and (node.op_type in _ELEMENTWISE_TABLES or node.op_type in _SCALAR_ARITHMETIC):
                    result = self._table(node, out_qt)
        except _Refuse as refusal:
            self.keep(node, str(refusal))
            return
        if result is None:
            self.keep(node, "no integer form for these inputs")
            return
        # Readers of the quantized output now read the integer result.
        result.name, q_node.outputs[0].name = q_node.outputs[0].name, self.b.names(f"{q_node.outputs[0].name}_old")
        q_node.outputs[0].replace_all_uses_with(result, replace_graph_outputs=True)
        self.lowered += 1

    @staticmethod
    def _inside_group(node: ir.Node) -> bool:
        for value in node.inputs:
            producer = value.producer() if value is not None else None
            if producer is not None:
                group = linear_group(producer)
                if group is not None and node in (group.bias_add, group.activation):
                    return True
        return False

    def _output_params(self, out: ir.Value):
        """The QuantizeLinear reading ``out`` (its only reader) and the quantized tensor it defines."""
        users = [u.node for u in out.uses()]
        qs = [u for u in users if u.op_type == "QuantizeLinear"]
        if len(qs) != 1 or len(users) != 1:
            return None
        q = qs[0]
        scale = const_array(q.inputs[1])
        zero = const_array(q.inputs[2]) if len(q.inputs) > 2 and q.inputs[2] is not None else np.uint8(0)
        if scale is None or scale.size != 1:
            return None
        return q, QT(q.outputs[0], scale.reshape(()), np.asarray(zero).reshape(()))

    def qin(self, value: ir.Value | None) -> QT | None:
        """The quantized tensor behind a dequantized input, if it is one."""
        source = qdq_source(value)
        if source is None:
            return None
        q, scale, zero, dq = source
        axis = dq.attributes["axis"].as_int() if "axis" in dq.attributes else 1
        if "block_size" in dq.attributes and dq.attributes["block_size"].as_int() > 0:
            raise _Refuse("blocked (per-group) quantization of a non-weight operand")
        return QT(q, scale, zero, axis if np.asarray(scale).size > 1 else None)

    # -- helpers -----------------------------------------------------------------------

    def requantize(self, value: ir.Value, real: np.ndarray | float, out: QT, *, x_zero=None, axis=1, qmin=None, qmax=None, shape=None) -> ir.Value:
        real = np.asarray(real, np.float64)
        m, k = intops.fixed_point_array(real) if real.size > 1 else [np.array(v, np.int32) for v in intops.fixed_point(float(real))]
        inputs = [value, self.b.const("multiplier", np.asarray(m, np.int32)), self.b.const("shift", np.asarray(k, np.int32)),
                  self.b.const("zero_point", out.zero)]
        if x_zero is not None:
            inputs.append(self.b.const("x_zero_point", np.asarray(x_zero)))
        attrs = {"axis": axis}
        if qmin is not None:
            attrs["qmin"] = int(qmin)
        if qmax is not None:
            attrs["qmax"] = int(qmax)
        return self.b.node("Requantize", inputs, attrs, dtype=out.dtype, shape=shape if shape is not None else _shape(value),
                           domain=QC_DOMAIN, base=value.name)

    def align(self, x: QT, out: QT, shape=None) -> ir.Value:
        """``x`` re-expressed with ``out``'s parameters (itself if they already match)."""
        if x.same_params(out):
            return x.value
        return self.requantize(x.value, x.s / out.s, out, x_zero=x.zero, shape=shape)

    # -- linear groups ----------------------------------------------------------------

    def _linear(self, group, out: QT) -> ir.Value | None:
        node = group.linear
        x = self.qin(node.inputs[0])
        if x is None:
            raise _Refuse("linear op without a quantized input")
        weight = integer_weight(node, self._range(x))
        if weight.regrid is not None:
            self.ctx.report.setdefault("decisions", []).append(
                {"node": node.name, "decision": "per-group weights re-expressed per output channel", **weight.regrid})
        w_int, zero, s_w = weight.data, weight.zero.reshape(-1), weight.scale
        op = node.op_type
        if op == "Gemm":
            attrs = {k: a.value for k, a in node.attributes.items()}
            if attrs.get("transA", 0):
                raise _Refuse("Gemm with transA")
            alpha = float(attrs.get("alpha", 1.0))
            if attrs.get("transB", 0):
                w_int = w_int.T
            s_w = s_w * alpha
        conv_attrs = {k: a.value for k, a in node.attributes.items()}
        if op == "ConvTranspose":
            if x.dtype not in _INT8:
                raise _Refuse("16-bit conv inputs have no integer lowering (ConvInteger is 8-bit)")
            if weight.asymmetric:
                raise _Refuse("asymmetric ConvTranspose weights")
            x, conv_attrs, w_int = self._transposed_as_conv(node, x, w_int)
            op = "Conv"
        acc_shape = _shape(node.outputs[0])
        x_range = self._range(x)
        if op == "Conv":
            centred = w_int.astype(np.int64) - (zero.astype(np.int64).reshape((-1,) + (1,) * (w_int.ndim - 1)) if zero.size > 1 else int(zero[0]))
            reduce = np.abs(centred).reshape(w_int.shape[0], -1).sum(axis=1)
        else:
            centred = w_int.astype(np.int64) - (zero.astype(np.int64) if zero.size > 1 else int(zero[0]))
            reduce = np.abs(centred).sum(axis=-2).reshape(-1)
        w_zero = [self.b.const("w_zero_point", zero.astype(w_int.dtype) if zero.size > 1 else zero.astype(w_int.dtype).reshape(()))] if weight.asymmetric else []
        bias_q = self._bias(group, node, s_w * x.s)
        bound = x_range * float(reduce.max(initial=0)) + (float(np.abs(bias_q).max()) if bias_q is not None else 0.0)
        acc = np.int64 if bound >= 2**31 else np.int32
        self.accumulators.append({"node": node.name, "op": node.op_type, "bound": bound, "accumulator": np.dtype(acc).name})
        if op == "Conv":
            if x.dtype not in _INT8:
                raise _Refuse("16-bit conv inputs have no integer lowering (ConvInteger is 8-bit)")
            if acc == np.int64:
                raise _Refuse(f"conv accumulator bound {bound:.3g} exceeds int32")
            if w_int.dtype.itemsize > 1:
                raise _Refuse("conv weights wider than 8 bits (ConvInteger is 8-bit)")
            if w_zero:
                w_zero = [self.b.const("w_zero_point", zero.astype(np.int8) if zero.size > 1 else zero.astype(np.int8).reshape(()))]
            acc_value = self.b.node("ConvInteger", [x.value, self.b.const(f"{node.name}_w", w_int.astype(np.int8)), self.b.const("x_zero_point", x.zero), *w_zero],
                                    conv_attrs, dtype=np.int32, shape=acc_shape, base=node.name)
            channel_axis = 1
        else:
            w_stored = w_int.astype(np.int8) if w_int.dtype.itemsize == 1 or w_int.dtype.name.startswith("int4") else w_int
            if x.dtype in _INT8 and w_stored.dtype == np.int8 and acc == np.int32 and w_int.dtype == np.int8:
                acc_value = self.b.node("MatMulInteger", [x.value, self.b.const(f"{node.name}_w", w_stored), self.b.const("x_zero_point", x.zero), *w_zero],
                                        dtype=np.int32, shape=acc_shape, base=node.name)
            else:
                acc_value = self.b.node("IntMatMul", [x.value, self.b.const(f"{node.name}_w", w_int), self.b.const("x_zero_point", x.zero), *w_zero],
                                        {"acc_type": np.dtype(acc).name}, dtype=acc, shape=acc_shape, domain=QC_DOMAIN, base=node.name)
            channel_axis = len(acc_shape) - 1 if acc_shape else -1
        if bias_q is not None:
            bias_shape = [1] * len(acc_shape)
            bias_shape[channel_axis] = -1 if bias_q.size > 1 else 1
            bias = self.b.const(f"{node.name}_bias_q", bias_q.astype(acc).reshape(bias_shape) if bias_q.size > 1 else bias_q.astype(acc).reshape(()))
            acc_value = self.b.node("Add", [acc_value, bias], dtype=acc, shape=acc_shape, base=node.name)
        qmin, qmax = self._activation_bounds(group.activation, out)
        real = x.s * s_w / out.s
        return self.requantize(acc_value, real if real.size > 1 else float(real[0]), out, axis=channel_axis, qmin=qmin, qmax=qmax, shape=_shape(group.output))

    def _range(self, x: QT) -> float:
        lo, hi = intops.int_range(x.dtype)
        return float(max(abs(lo - x.z), abs(hi - x.z)))

    def _bias(self, group, node, bias_scale: np.ndarray) -> np.ndarray | None:
        if group.bias_add is not None:
            add = group.bias_add
            value = add.inputs[1] if add.inputs[0] is node.outputs[0] else add.inputs[0]
        elif node.op_type in ("Gemm", "Conv", "ConvTranspose") and len(node.inputs) > 2 and node.inputs[2] is not None:
            value = node.inputs[2]
        else:
            return None
        float_bias = _dequantized_constant(value)
        if float_bias is None:
            raise _Refuse("bias is not constant")
        if node.op_type == "Gemm":
            float_bias = float_bias * float(node.attributes["beta"].as_float() if "beta" in node.attributes else 1.0)
        float_bias = float_bias.reshape(-1)
        q = np.round(float_bias / bias_scale)
        if np.any(np.abs(q) >= 2**31):
            raise _Refuse("bias does not fit int32 at scale s_x·s_w")
        return q.astype(np.int64)

    def _activation_bounds(self, activation: ir.Node | None, out: QT):
        if activation is None:
            return None, None
        if activation.op_type == "Relu":
            return out.z, None
        hi = const_array(activation.inputs[2]) if len(activation.inputs) > 2 and activation.inputs[2] is not None else None
        return out.z, _bound_level(hi, out, upper=True)

    # -- elementwise --------------------------------------------------------------------

    def _op_Add(self, node: ir.Node, out: QT, negate: bool = False):
        a, b = self.qin(node.inputs[0]), self.qin(node.inputs[1])
        shape = _shape(node.outputs[0])
        if a is not None and b is not None:
            ma, mb, k = intops.add_constants(a.s, b.s, out.s)
            if negate:
                mb = -mb
            return self._int_add(a.value, a.zero, b.value, b.zero, out, ma, mb, k, shape)
        negate_x = False  # c − x: the variable is the one subtracted
        if a is None and b is not None:
            a, b, node_inputs = b, None, (node.inputs[1], node.inputs[0])
            negate_x, negate = negate, False
        else:
            node_inputs = (node.inputs[0], node.inputs[1])
        if a is None:
            return None
        c = _dequantized_constant(node_inputs[1])
        if c is None:
            return None
        c = -c if negate else c
        c_scale = max(float(np.max(np.abs(c), initial=0.0)) / 2**30, out.s / 2**8, 1e-30)
        c_int = np.round(c / c_scale).astype(np.int32)
        ma, mb, k = intops.add_constants(a.s, c_scale, out.s)
        if negate_x:
            ma = -ma
        return self._int_add(a.value, a.zero, self.b.const("addend", c_int), np.int32(0), out, ma, mb, k, shape)

    def _int_add(self, a, za, b, zb, out: QT, ma, mb, k, shape):
        inputs = [a, self.b.const("a_zero_point", np.asarray(za)), b, self.b.const("b_zero_point", np.asarray(zb)), self.b.const("y_zero_point", out.zero)]
        return self.b.node("IntAdd", inputs, {"a_multiplier": int(ma), "b_multiplier": int(mb), "shift": int(k)},
                           dtype=out.dtype, shape=shape, domain=QC_DOMAIN)

    def _op_Sub(self, node, out):
        return self._op_Add(node, out, negate=True)

    def _op_Mul(self, node: ir.Node, out: QT):
        a, b = self.qin(node.inputs[0]), self.qin(node.inputs[1])
        shape = _shape(node.outputs[0])
        if a is not None and b is not None:
            return self._int_mul(a, b, out, shape)
        x, c_value = (a, node.inputs[1]) if a is not None else (b, node.inputs[0])
        c = _dequantized_constant(c_value)
        if x is None or c is None:
            return None
        return self._scale_by(x, c, out, shape)

    def _op_Div(self, node: ir.Node, out: QT):
        x = self.qin(node.inputs[0])
        c = _dequantized_constant(node.inputs[1])
        if x is None or c is None or np.any(c == 0):
            return None
        return self._scale_by(x, 1.0 / c, out, _shape(node.outputs[0]))

    def _int_mul(self, a: QT, b: QT, out: QT, shape):
        """``IntMul``: the product of two quantized tensors (a pre-shift keeps it below 2^31)."""
        real = a.s * b.s / out.s
        span = self._range(a) * self._range(b)
        pre = max(0, int(span).bit_length() - 31)
        m, k = intops.fixed_point(real * 2.0**pre, 31)
        inputs = [a.value, self.b.const("a_zero_point", a.zero), b.value, self.b.const("b_zero_point", b.zero), self.b.const("y_zero_point", out.zero)]
        return self.b.node("IntMul", inputs, {"multiplier": m, "shift": k, "pre_shift": pre}, dtype=out.dtype, shape=shape, domain=QC_DOMAIN)

    def _scale_by(self, x: QT, c: np.ndarray, out: QT, shape):
        """``x · c`` for a constant ``c``: a requantize when ``c`` is a scalar or varies along one
        axis; else (RoPE's cos/sin tables vary along positions and channels) an integer product
        with ``c`` quantized to int16 (symmetric, per tensor: error ≤ max|c| / 65534)."""
        c = np.asarray(c, np.float64)
        if c.size == 1:
            return self.requantize(x.value, x.s * float(c.reshape(-1)[0]) / out.s, out, x_zero=x.zero, shape=shape)
        if shape is None and x.value.shape is not None:
            shape = list(np.broadcast_shapes(tuple(x.value.shape), c.shape))
        rank = len(shape) if shape is not None else None
        squeezed = [i for i, d in enumerate(c.shape) if d != 1]
        caps = getattr(self.ctx, "target", None)
        per_channel = caps is None or getattr(caps, "per_channel_activation_scale", True)
        if rank is not None and len(squeezed) == 1 and rank >= c.ndim and per_channel:
            axis = squeezed[0] + rank - c.ndim
            return self.requantize(x.value, x.s * c.reshape(-1) / out.s, out, x_zero=x.zero, axis=axis, shape=shape)
        peak = float(np.max(np.abs(c), initial=0.0)) or 1.0
        c_scale = peak / 32767.0
        c_q = np.clip(np.round(c / c_scale), -32767, 32767).astype(np.int16)
        constant = QT(self.b.const("factor_q", c_q), np.float32(c_scale), np.int16(0))
        return self._int_mul(x, constant, out, shape)

    def _op_Neg(self, node, out):
        x = self.qin(node.inputs[0])
        if x is None:
            return None
        return self.requantize(x.value, -x.s / out.s, out, x_zero=x.zero, shape=_shape(node.outputs[0]))

    def _op_Relu(self, node, out):
        x = self.qin(node.inputs[0])
        if x is None:
            return None
        return self.requantize(x.value, x.s / out.s, out, x_zero=x.zero, qmin=out.z, shape=_shape(node.outputs[0]))

    def _op_Clip(self, node, out):
        x = self.qin(node.inputs[0])
        if x is None:
            return None
        lo = _dequantized_constant(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else None
        hi = _dequantized_constant(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
        qmin, qmax = _bound_level(lo, out, upper=False), _bound_level(hi, out, upper=True)
        return self.requantize(x.value, x.s / out.s, out, x_zero=x.zero, qmin=qmin, qmax=qmax, shape=_shape(node.outputs[0]))

    # -- matmul of two activations -------------------------------------------------------

    def _op_MatMul(self, node: ir.Node, out: QT):
        a, b = self.qin(node.inputs[0]), self.qin(node.inputs[1])
        if a is None or b is None or b.axis is not None or a.axis is not None:
            return None
        k_dim = node.inputs[0].shape[-1] if node.inputs[0].shape is not None else None
        if not isinstance(k_dim, int):
            raise _Refuse("unknown reduction length")
        bound = self._range(a) * self._range(b) * k_dim
        acc = np.int64 if bound >= 2**31 else np.int32
        self.accumulators.append({"node": node.name, "op": node.op_type, "bound": bound, "accumulator": np.dtype(acc).name})
        shape = _shape(node.outputs[0])
        if a.dtype in _INT8 and b.dtype in _INT8 and acc == np.int32:
            acc_value = self.b.node("MatMulInteger", [a.value, b.value, self.b.const("a_zero_point", a.zero), self.b.const("b_zero_point", b.zero)],
                                    dtype=np.int32, shape=shape, base=node.name)
        else:
            acc_value = self.b.node("IntMatMul", [a.value, b.value, self.b.const("a_zero_point", a.zero), self.b.const("b_zero_point", b.zero)],
                                    {"acc_type": np.dtype(acc).name}, dtype=acc, shape=shape, domain=QC_DOMAIN, base=node.name)
        return self.requantize(acc_value, a.s * b.s / out.s, out, shape=shape)

    # -- data movement ----------------------------------------------------------------------

    def _transparent(self, node: ir.Node, out: QT):
        data = node.inputs[0]
        x = self.qin(data)
        if x is None or x.axis is not None:
            return None
        if node.op_type == "Gather" and const_array(data) is not None:
            return None
        if node.op_type == "Split":
            return None  # several outputs: left to the float island
        inputs = [x.value] + list(node.inputs[1:])
        if any(is_float(v) for v in inputs[1:] if v is not None):
            return None
        attrs = {k: a.value for k, a in node.attributes.items()}
        moved = self.b.node(node.op_type, inputs, attrs, dtype=x.dtype, shape=_shape(node.outputs[0]), base=node.name)
        return self.align(QT(moved, x.scale, x.zero), out, _shape(node.outputs[0]))

    def _op_Gather(self, node: ir.Node, out: QT):
        table = _dequantized_constant(node.inputs[0])
        if table is None or is_float(node.inputs[1]):
            return None
        lo, hi = intops.int_range(out.dtype)
        table_q = np.clip(np.round(table / out.s) + out.z, lo, hi).astype(out.dtype)
        attrs = {k: a.value for k, a in node.attributes.items()}
        return self.b.node("Gather", [self.b.const(f"{node.name}_table_q", table_q), node.inputs[1]], attrs,
                           dtype=out.dtype, shape=_shape(node.outputs[0]), base=node.name)

    def _op_Concat(self, node: ir.Node, out: QT):
        parts = [self.qin(v) for v in node.inputs]
        if any(p is None for p in parts):
            return None
        aligned = [self.align(p, out, _shape(v)) for p, v in zip(parts, node.inputs)]
        attrs = {k: a.value for k, a in node.attributes.items()}
        return self.b.node("Concat", aligned, attrs, dtype=out.dtype, shape=_shape(node.outputs[0]), base=node.name)

    def _op_Where(self, node: ir.Node, out: QT):
        cond, a, b = node.inputs
        if is_float(cond):
            return None
        cond_producer = cond.producer()
        if cond_producer is not None and cond_producer.op_type == "IsNaN" and qdq_source(cond_producer.inputs[0]) is not None:
            other = self.qin(b)  # integers are never NaN: the condition is all false
            return self.align(other, out, _shape(node.outputs[0])) if other is not None else None
        branches = []
        for value in (a, b):
            qt = self.qin(value)
            if qt is not None:
                branches.append(self.align(qt, out, _shape(value)))
                continue
            c = const_array(value)
            if c is None:
                return None
            lo, hi = intops.int_range(out.dtype)
            with np.errstate(over="ignore", invalid="ignore"):
                quantized = np.clip(np.nan_to_num(np.round(c.astype(np.float64) / out.s)) + out.z, lo, hi)
            branches.append(self.b.const("branch", quantized.astype(out.dtype)))
        return self.b.node("Where", [cond, *branches], dtype=out.dtype, shape=_shape(node.outputs[0]), base=node.name)

    def _split(self, node: ir.Node) -> None:
        """``Split`` of a quantized tensor: the integer tensor split, each part re-expressed
        with its output's parameters where they differ."""
        x = self.qin(node.inputs[0])
        targets = [self._output_params(v) for v in node.outputs]
        if x is None or x.axis is not None or any(t is None for t in targets) or any(is_float(v) for v in node.inputs[1:] if v is not None):
            if any(is_float(o) for o in node.outputs):
                self.keep(node, "output is not quantized" if x is not None else "no integer form for these inputs")
            return
        self.b.anchor = node
        attrs = {k: a.value for k, a in node.attributes.items()}
        split = ir.node("Split", [x.value, *node.inputs[1:]], attrs, num_outputs=len(node.outputs), name=self.b.names(f"{node.name}_Split"))
        for part, value in zip(split.outputs, node.outputs):
            part.name = self.b.names(f"{value.name}_part")
            part.dtype = ir.DataType.from_numpy(np.dtype(x.dtype))
            part.shape = value.shape
        self.b.graph.insert_before(node, split)
        for part, value, (q_node, out_qt) in zip(split.outputs, node.outputs, targets):
            self.b.anchor = q_node
            result = self.align(QT(part, x.scale, x.zero), out_qt, _shape(value))
            result.name, q_node.outputs[0].name = q_node.outputs[0].name, self.b.names(f"{q_node.outputs[0].name}_old")
            q_node.outputs[0].replace_all_uses_with(result, replace_graph_outputs=True)
        self.lowered += 1


def _bound_level(bound, out: QT, *, upper: bool) -> int | None:
    """A clip bound as a level of the output's integer type; None when it lies beyond the
    type's range (``Clip(x, 0, FLT_MAX)``, ``inf``: the type saturates first)."""
    if bound is None:
        return None
    steps = float(np.asarray(bound, np.float64).reshape(-1)[0]) / out.s
    lo, hi = intops.int_range(out.dtype)
    if not np.isfinite(steps) or not lo - 1 <= steps + float(np.asarray(out.zero).reshape(-1)[0]) <= hi + 1:
        return None
    return out.z + (int(math.floor(steps + 0.5)) if upper else int(math.ceil(steps - 0.5)))


def _drop_redundant_qdq(model: ir.Model) -> None:
    """``Q(DQ(q))`` with equal parameters is ``q``: remove such pairs left by lowering."""
    for node in list(model.graph):
        if node.op_type != "QuantizeLinear" or node.graph is None:
            continue
        source = qdq_source(node.inputs[0])
        if source is None:
            continue
        q, scale, zero, _ = source
        s2 = const_array(node.inputs[1])
        z2 = const_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
        if s2 is None or z2 is None or np.asarray(scale).size != 1:
            continue
        if float(s2) == float(scale) and int(z2) == int(zero) and np.asarray(z2).dtype == np.asarray(zero).dtype:
            out = node.outputs[0]
            if out.is_graph_output():
                continue
            out.replace_all_uses_with(q)


__all__ = ["LowerInteger", "node_label"]
