"""``fuse-layernorm``: decomposed LayerNorm subgraphs → one ``LayerNormalization`` node.

``LayerNorm(x) = (x − mean(x)) / √(mean((x − mean(x))²) + ε) · γ + β`` over the last axis,
as paddle2onnx, tf2onnx and pre-opset-17 torch exports write it: ``d = x − ReduceMean(x)``;
``d²`` as ``Pow(d, 2)`` or ``d·d``; its ``ReduceMean`` (axes as input or attribute, kept);
``+ ε``; ``√``; then ``d / √·`` or ``d · Reciprocal(√·)``; then ``· γ`` and ``+ β`` (either
operand order; each optional). The fused node is float-equal to the subgraph. One op is
what the integer lowering needs (``IntLayerNorm``): decomposed, the difference, its square,
the variance and the root each get a per-tensor scale, and the division stays in float.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter._pattern_ir import Constant, OrValue

from qcompiler.graph import const_array, ensure_opset
from qcompiler.pipeline import Pass
from qcompiler.rewriter import MatchResult, PatternRewriter, Rule, matches

LAYERNORM_OPSET = 17
_FLOAT = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE, ir.DataType.BFLOAT16)


def _either(fn, a, b):
    return OrValue([fn(a, b), fn(b, a)])


def _two():
    return OrValue([Constant(2.0, rel_tol=1e-6), Constant([2.0], rel_tol=1e-6)])


def _mean(op, x, name: str):
    """``ReduceMean`` with its axes as an input (opset 18) or an attribute (older)."""
    return op.ReduceMean(x, _allow_other_inputs=True, _allow_other_attributes=True, _outputs=[name])


class _LayerNorm(Rule):
    """One exported form: ``div`` (``d / √·``) or ``mul`` (``d · Reciprocal(√·)``), with or
    without ``γ`` and ``β``. The root of a pattern must be a node: each combination is a
    rule of its own."""

    def __init__(self, form: str, scale: bool, shift: bool, swapped: bool):
        super().__init__(name=f"LayerNorm[{form},{'γ' if scale else '-'},{'β' if shift else '-'}{',swapped' if swapped else ''}]")
        self.form, self.scale, self.shift, self.swapped = form, scale, shift, swapped

    def _binary(self, fn, a, b, root: bool):
        """``fn(a, b)`` in either operand order; the root node (which cannot be a choice)
        in the order this rule is for."""
        if not root:
            return _either(fn, a, b)
        return fn(b, a) if self.swapped else fn(a, b)

    def pattern(self, op, x, eps, gamma, beta):
        d = op.Sub(x, _mean(op, x, "mean"))
        square = OrValue([op.Pow(d, _two()), op.Mul(d, d)])
        root = op.Sqrt(_either(op.Add, _mean(op, square, "variance"), eps))
        last = not self.scale and not self.shift
        if self.form == "div":
            normed = op.Div(d, root)
        else:
            inverse = OrValue([op.Reciprocal(root), op.Div(Constant(1.0, rel_tol=1e-6), root)])
            normed = self._binary(op.Mul, d, inverse, last)
        out = self._binary(op.Mul, normed, gamma, not self.shift) if self.scale else normed
        return self._binary(op.Add, out, beta, True) if self.shift else out

    def check(self, context, x, eps, mean, variance, gamma=None, beta=None, **_):
        if x.dtype not in _FLOAT or x.shape is None or len(x.shape) == 0:
            return MatchResult().fail("not a float tensor of known rank")
        rank = len(x.shape)
        for reduced in (mean, variance):
            node = reduced.producer()
            axes = const_array(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else None
            if axes is None and "axes" in node.attributes:
                axes = np.asarray(node.attributes["axes"].as_ints())
            if axes is None or node.attributes.get_int("keepdims", 1) != 1:
                return MatchResult().fail("a mean without constant axes, or not kept")
            if [int(a) % rank for a in np.ravel(axes)] != [rank - 1]:
                return MatchResult().fail("not a mean over the last axis")
        eps_value = const_array(eps)
        if eps_value is None or eps_value.size != 1 or not 0 <= float(eps_value.reshape(-1)[0]) < 1:
            return MatchResult().fail("epsilon is not a small constant scalar")
        channels = x.shape[-1]
        for name, param in (("scale", gamma), ("shift", beta)):
            if param is None:
                continue
            p = const_array(param)
            if p is None or not isinstance(channels, int) or p.size not in (1, channels) or (
                p.ndim > 1 and p.shape[:-1] != (1,) * (p.ndim - 1)
            ):
                return MatchResult().fail(f"the {name} is not a constant per-channel vector")
        return True

    def rewrite(self, op, x, eps, gamma=None, beta=None, **_):
        channels = x.shape[-1]
        dtype = x.dtype.numpy()

        def vector(param, default):
            values = np.full(channels, default) if param is None else np.broadcast_to(const_array(param).reshape(-1), (channels,))
            return np.ascontiguousarray(values, dtype=dtype)

        scale = op.initializer(ir.tensor(vector(gamma, 1.0), name="layernorm_scale"))
        bias = op.initializer(ir.tensor(vector(beta, 0.0), name="layernorm_bias"))
        epsilon = float(const_array(eps).reshape(-1)[0])
        return op.LayerNormalization(x, scale, bias, axis=-1, epsilon=epsilon, stash_type=1)


def layernorm_rules() -> list:
    """Fullest forms first: a LayerNorm with γ and β contains one without them."""
    rules = []
    for scale, shift in ((True, True), (True, False), (False, True), (False, False)):
        for form in ("div", "mul"):
            commutative_root = scale or shift or form == "mul"
            rules += [_LayerNorm.rule(form, scale, shift, swapped) for swapped in ((False, True) if commutative_root else (False,))]
    return rules


@dataclass(frozen=True)
class FuseLayerNorm(Pass):
    """Fuse decomposed LayerNorm subgraphs into one LayerNormalization node (float-exact)."""

    name = "fuse-layernorm"
    stages = ("float",)

    def run(self, model: ir.Model, ctx) -> bool:
        if not any(node.op_type == "ReduceMean" for node in model.graph):
            return False
        rules = layernorm_rules()
        if not matches(model, rules, ("Add", "Mul", "Div")):
            return False
        ensure_opset(model, LAYERNORM_OPSET)  # before the op exists in the graph: the converter needs a valid model
        total = 0
        for rule in rules:  # one rule at a time: the fullest form claims its nodes first
            total += PatternRewriter([rule]).apply(model).total
        ctx.report["fuse_layernorm"] = ctx.report.get("fuse_layernorm", 0) + total
        ctx.log(f"fuse-layernorm: {total} LayerNorm(s) fused")
        return total > 0
