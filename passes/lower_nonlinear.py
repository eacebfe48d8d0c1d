"""Integer forms of the nonlinear ops for ``lower-integer``: softmax, GELU, LayerNorm and
element-wise functions of 8-bit tensors (lookup tables). Each integer variant's error
against float is measured on a sweep of its input grid; the first within the error budget
is chosen (``_pick``) and the measurement goes into the report."""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from qcompiler import intops
from qcompiler.graph import const_array
from qcompiler.opset import QC_DOMAIN
from qcompiler.qdq import constant_value as _dequantized_constant

from qcompiler.integer.ops.interpolate import IntInterpolate, interpolation_table
from qcompiler.integer.ops.rmsnorm import IntRMSNorm, rmsnorm_constants, rmsnorm_reference, sigma_frac_bits

from .exact_masks import is_mask_select
from .lowering_common import QT, Refuse as _Refuse, shape_of as _shape

_INT8 = (np.dtype(np.int8), np.dtype(np.uint8))
_ELEMENTWISE_TABLES = {
    "Sigmoid": lambda x: 1.0 / (1.0 + np.exp(-x)),
    "Tanh": np.tanh,
    "Erf": lambda x: np.vectorize(math.erf)(x),
    "Exp": np.exp,
    "HardSigmoid": lambda x: np.clip(0.2 * x + 0.5, 0.0, 1.0),
    "HardSwish": lambda x: x * np.clip(x / 6.0 + 0.5, 0.0, 1.0),
    "Softplus": lambda x: np.log1p(np.exp(x)),
    "Neg": lambda x: -x,
    "Abs": np.abs,
    "Sqrt": lambda x: np.sqrt(np.maximum(x, 0.0)),
    "Relu": lambda x: np.maximum(x, 0.0),
    "Sin": np.sin,
    "Cos": np.cos,
    "Reciprocal": lambda x: 1.0 / x,
    "Log": np.log,
    "Softsign": lambda x: x / (1.0 + np.abs(x)),
    "Mish": lambda x: x * np.tanh(np.log1p(np.exp(x))),
    "Floor": np.floor,
    "Ceil": np.ceil,
    "Round": np.round,
    "Sign": np.sign,
    "LeakyRelu": None,  # needs alpha: handled in _table_function
    "Elu": None,
    "Selu": None,
    "Celu": None,
    "ThresholdedRelu": None,
    "Gelu": None,
    "Pow": None,  # a constant exponent
}


class NonlinearLowering:
    """Mixin of the lowering: handlers of the nonlinear ops (``self.b``, ``self.qin``, ... come
    from the lowering)."""

    def _op_Softmax(self, node: ir.Node, out: QT):
        keep = None
        source = node.inputs[0]
        select = source.producer()
        if select is not None and is_mask_select(select):  # exact mask (exact-masks): probability 0 where masked
            keep, source = select.inputs[0], select.inputs[1]
        x = self.qin(source)
        if x is None:
            return None
        axis = node.attributes["axis"].as_int() if "axis" in node.attributes else -1
        choices = ["lut", "linear", "ibert"] if x.dtype in _INT8 else ["linear", "ibert"]
        if self.options.softmax != "auto":
            if self.options.softmax == "lut" and x.dtype not in _INT8:
                raise _Refuse("softmax=lut needs 8-bit inputs")
            choices = [self.options.softmax]
        variant = self._pick("Softmax", node, x, out, choices, lambda v, q: intops.int_softmax(q, x.zero, out.zero, x.s, out.s, -1, v),
                             lambda f: _softmax(f))
        inputs = [x.value, self.b.const("x_zero_point", x.zero), self.b.const("y_zero_point", out.zero)]
        if keep is not None:
            inputs.append(keep)
        return self.b.node("IntSoftmax", inputs, {"input_scale": x.s, "output_scale": out.s, "axis": axis, "variant": variant},
                           dtype=out.dtype, shape=_shape(node.outputs[0]), domain=QC_DOMAIN)

    def _op_Gelu(self, node: ir.Node, out: QT):
        x = self.qin(node.inputs[0])
        if x is None:
            return None
        approximate = node.attributes["approximate"].as_string() if "approximate" in node.attributes else "none"
        reference = _gelu_tanh if approximate == "tanh" else _gelu_erf
        choices = ["lut", "ibert"] if x.dtype in _INT8 else ["ibert"]
        if self.options.gelu != "auto":
            if self.options.gelu == "lut" and x.dtype not in _INT8:
                raise _Refuse("gelu=lut needs 8-bit inputs")
            choices = [self.options.gelu]

        def run(variant, q):
            if variant == "lut":
                return intops.int_lookup(q, self._lut(x, out, reference))
            return intops.int_gelu(q, x.zero, out.zero, x.s, out.s)

        variant = self._pick("Gelu", node, x, out, choices, run, reference, elementwise=True)
        if variant == "lut":
            return self._lookup(x, out, reference, _shape(node.outputs[0]))
        inputs = [x.value, self.b.const("x_zero_point", x.zero), self.b.const("y_zero_point", out.zero)]
        return self.b.node("IntGELU", inputs, {"input_scale": x.s, "output_scale": out.s}, dtype=out.dtype,
                           shape=_shape(node.outputs[0]), domain=QC_DOMAIN)

    def _op_LayerNormalization(self, node: ir.Node, out: QT):
        x = self.qin(node.inputs[0])
        if x is None:
            return None
        axis = node.attributes["axis"].as_int() if "axis" in node.attributes else -1
        rank = len(node.inputs[0].shape)
        if axis not in (-1, rank - 1):
            raise _Refuse("LayerNorm over more than the last axis")
        gamma = _dequantized_constant(node.inputs[1])
        beta = _dequantized_constant(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else np.zeros_like(gamma)
        if gamma is None or beta is None:
            raise _Refuse("LayerNorm scale/bias are not constant")
        channels = node.inputs[0].shape[-1]
        gamma = np.broadcast_to(gamma.reshape(-1), (channels,))
        beta = np.broadcast_to(beta.reshape(-1), (channels,))
        eps = node.attributes["epsilon"].as_float() if "epsilon" in node.attributes else 1e-5
        mult, bias, k, eps_q = intops.layernorm_constants(gamma, beta, x.s, out.s, eps)
        self._measure("LayerNormalization", node, x, out, "integer", lambda q: intops.int_layernorm(q, x.zero, out.zero, mult, bias, k, eps_q),
                      lambda f: _layernorm(f, gamma, beta, eps), rows=channels)
        inputs = [x.value, self.b.const("x_zero_point", x.zero), self.b.const("y_zero_point", out.zero),
                  self.b.const("ln_multiplier", mult.astype(np.int64)), self.b.const("ln_bias", bias.astype(np.int64))]
        return self.b.node("IntLayerNorm", inputs, {"shift": int(k), "eps_q": int(eps_q), "axis": -1},
                           dtype=out.dtype, shape=_shape(node.outputs[0]), domain=QC_DOMAIN)

    def _op_RMSNormalization(self, node: ir.Node, out: QT):
        x = self.qin(node.inputs[0])
        if x is None:
            return None
        rank = len(node.inputs[0].shape)
        axis = node.attributes["axis"].as_int() if "axis" in node.attributes else -1
        if axis not in (-1, rank - 1):
            raise _Refuse("RMSNorm over more than the last axis")
        channels = node.inputs[0].shape[-1]
        gamma = _dequantized_constant(node.inputs[1])
        if gamma is None or not isinstance(channels, int):
            raise _Refuse("RMSNorm scale is not constant")
        gamma = np.broadcast_to(gamma.reshape(-1), (channels,))
        eps = node.attributes["epsilon"].as_float() if "epsilon" in node.attributes else 1e-5
        frac = sigma_frac_bits(channels, np.dtype(x.dtype).itemsize * 8)
        mult, k, eps_q = rmsnorm_constants(gamma, x.s, out.s, eps, frac)
        attrs = {"shift": k, "eps_q": eps_q, "sigma_frac_bits": frac}
        arrays = lambda q: [q, np.asarray(x.zero), np.asarray(out.zero), mult]  # noqa: E731
        self._measure("RMSNormalization", node, x, out, "integer", lambda q: IntRMSNorm.evaluate(arrays(q), **attrs)[0],
                      lambda f: rmsnorm_reference(f, gamma, eps), rows=channels)
        inputs = [x.value, self.b.const("x_zero_point", x.zero), self.b.const("y_zero_point", out.zero),
                  self.b.const("rms_multiplier", mult.astype(np.int64))]
        return self.b.node("IntRMSNorm", inputs, attrs, dtype=out.dtype, shape=_shape(node.outputs[0]), domain=QC_DOMAIN)

    def _table(self, node: ir.Node, out: QT):
        """An element-wise function of one quantized input as a table; a chain of them whose
        intermediates are not quantized (``DQ → Div(c) → Erf → Q``, as a QDQ model made
        elsewhere leaves a decomposed GELU) becomes one table of the composition, which is
        exactly what the QDQ model computes on the input grid."""
        functions, absorbed = [], []
        current = node
        while True:
            step = _chain_step(current)
            if step is None:
                return None
            function, source = step
            functions.append(function)
            x = self.qin(source)
            if x is not None:
                break
            current = source.producer()
            if (current is None or source.is_graph_output() or len(source.uses()) != 1
                    or current.domain not in ("", "ai.onnx") or len(absorbed) >= 16):
                return None
            absorbed.append(current)
        if absorbed:
            names = {n.name for n in absorbed}
            self.kept = [k for k in self.kept if k["node"] not in names]
            self.variants.append({"node": node.name, "op": "+".join(n.op_type for n in [*reversed(absorbed), node]),
                                  "chosen": "composed-table", "errors": {}})

        chain = functions[::-1]  # innermost first

        def function(v):
            for f in chain:
                v = f(v)
            return v
        if x.dtype not in _INT8:  # a 16-bit input: a table of 257 knots, interpolated
            return self._interpolate(node, x, out, function)
        return self._lookup(x, out, function, _shape(node.outputs[0]))

    def _interpolate(self, node: ir.Node, x: QT, out: QT, function):
        table, shift = interpolation_table(function, x.s, x.z, out.s, out.z, x.dtype, out.dtype)
        self._measure(node.op_type, node, x, out, "interpolated",
                      lambda q: IntInterpolate.evaluate([q, table], shift=shift)[0], function)
        return self.b.node("IntInterpolate", [x.value, self.b.const("knots", table)], {"shift": shift},
                           dtype=out.dtype, shape=_shape(node.outputs[0]), domain=QC_DOMAIN)

    def _lut(self, x: QT, out: QT, function) -> np.ndarray:
        lo, hi = intops.int_range(x.dtype)
        grid = (np.arange(lo, hi + 1, dtype=np.float64) - x.z) * x.s
        y = np.round(function(grid) / out.s) + out.z
        ylo, yhi = intops.int_range(out.dtype)
        return np.clip(y, ylo, yhi).astype(out.dtype)

    def _lookup(self, x: QT, out: QT, function, shape):
        table = self.b.const("table", self._lut(x, out, function))
        return self.b.node("IntLookup", [x.value, table], dtype=out.dtype, shape=shape, domain=QC_DOMAIN)

    def _pick(self, op, node, x: QT, out: QT, choices, run, reference, elementwise=False) -> str:
        """Measure each variant against float on a sweep of the input grid; pick the first
        within the error budget (else the most accurate)."""
        errors = {}
        for variant in choices:
            errors[variant] = self._measure(op, node, x, out, variant, lambda q, v=variant: run(v, q), reference,
                                            rows=None if elementwise else 128, record=False)
        chosen = next((v for v in choices if errors[v] <= self.options.error_budget), min(errors, key=errors.get))
        self.variants.append({"node": node.name, "op": op, "errors": {v: round(e, 6) for v, e in errors.items()}, "chosen": chosen})
        return chosen

    def _measure(self, op, node, x: QT, out: QT, variant, run, reference, rows=None, record=True) -> float:
        """Max |integer − float| over a deterministic sweep, as a fraction of the output range."""
        lo, hi = intops.int_range(x.dtype)
        rng = np.random.default_rng(0)
        if rows is None:
            q = np.arange(lo, hi + 1, max(1, (hi - lo) // 4096)).astype(x.dtype)
        else:  # rows of realistic spread: a random subset of the calibrated range
            q = rng.integers(lo, hi + 1, size=(16, rows)).astype(x.dtype)
            q = (q.astype(np.int64) - x.z) // rng.integers(1, 8, size=(16, 1)) + x.z
            q = np.clip(q, lo, hi).astype(x.dtype)
        real = (q.astype(np.float64) - x.z) * x.s
        expected = reference(real)
        got = (run(q).astype(np.float64) - out.z) * out.s
        ylo, yhi = intops.int_range(out.dtype)
        span = (yhi - ylo) * out.s
        clipped = np.clip(expected, (ylo - out.z) * out.s, (yhi - out.z) * out.s)
        error = float(np.max(np.abs(got - clipped))) / span
        if record:
            self.variants.append({"node": node.name, "op": op, "errors": {variant: round(error, 6)}, "chosen": variant})
        return error


def _chain_step(node: ir.Node):
    """``(f, input)``: ``node`` computes ``f(input)`` element-wise, its other inputs constant
    (a table function, or arithmetic with a scalar constant)."""
    if node.op_type in ("Add", "Sub", "Mul", "Div") and len(node.inputs) == 2:
        a, b = node.inputs
        ca, cb = const_array(a), const_array(b)
        if (ca is None) == (cb is None):
            return None
        c = ca if ca is not None else cb
        if c.size != 1:
            return None
        c = float(c.reshape(-1)[0])
        first = ca is not None  # the constant is the first operand: c - x, c / x
        functions = {
            "Add": lambda x: x + c,
            "Mul": lambda x: x * c,
            "Sub": (lambda x: c - x) if first else (lambda x: x - c),
            "Div": (lambda x: c / x) if first else (lambda x: x / c),
        }
        raw = functions[node.op_type]

        def total(x):
            with np.errstate(all="ignore"):
                return np.nan_to_num(raw(x), nan=0.0, posinf=3e38, neginf=-3e38)
        return total, (b if first else a)
    if node.op_type not in _ELEMENTWISE_TABLES or any(v is not None and const_array(v) is None for v in node.inputs[1:]):
        return None
    function = _table_function(node)
    return (function, node.inputs[0]) if function is not None else None


def _table_function(node: ir.Node):
    """The element-wise function ``node`` computes of its first input (its other inputs are
    constants), made total: where it is undefined or infinite (log 0, 1/0) it saturates."""
    function = _raw_table_function(node)
    if function is None:
        return None

    def total(x):
        with np.errstate(all="ignore"):
            return np.nan_to_num(function(x), nan=0.0, posinf=3e38, neginf=-3e38)
    return total


def _raw_table_function(node: ir.Node):
    op = node.op_type
    attrs = {k: a.value for k, a in node.attributes.items()}
    if op == "Pow":
        exponent = const_array(node.inputs[1])
        if exponent is None or exponent.size != 1:
            return None
        e = float(exponent.reshape(-1)[0])
        return lambda x: np.power(x, e)
    if op == "Selu":
        alpha, gamma = float(attrs.get("alpha", 1.67326319217681884765625)), float(attrs.get("gamma", 1.05070102214813232421875))
        return lambda x: gamma * np.where(x > 0, x, alpha * (np.exp(np.minimum(x, 0)) - 1))
    if op == "Celu":
        alpha = float(attrs.get("alpha", 1.0))
        return lambda x: np.maximum(x, 0) + np.minimum(0, alpha * (np.exp(np.minimum(x, 0) / alpha) - 1))
    if op == "ThresholdedRelu":
        alpha = float(attrs.get("alpha", 1.0))
        return lambda x: np.where(x > alpha, x, 0.0)
    if op == "Gelu":
        if attrs.get("approximate", "none") == "tanh":
            return lambda x: 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))
        return lambda x: 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))
    if op == "LeakyRelu":
        alpha = float(attrs.get("alpha", 0.01))
        return lambda x: np.where(x >= 0, x, alpha * x)
    if op == "Elu":
        alpha = float(attrs.get("alpha", 1.0))
        return lambda x: np.where(x >= 0, x, alpha * (np.exp(np.minimum(x, 0)) - 1))
    if op == "HardSigmoid":
        alpha, beta = float(attrs.get("alpha", 0.2)), float(attrs.get("beta", 0.5))
        return lambda x: np.clip(alpha * x + beta, 0.0, 1.0)
    return _ELEMENTWISE_TABLES.get(op)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _gelu_erf(x: np.ndarray) -> np.ndarray:
    from scipy.special import erf

    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def _gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def _layernorm(x: np.ndarray, gamma, beta, eps) -> np.ndarray:
    mean = x.mean(axis=-1, keepdims=True)
    var = x.var(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * gamma + beta
