"""``fuse-gelu``: decomposed GELU subgraphs → one ``Gelu`` node (opset 20).

Exact form (``approximate="none"``):  ``GELU(x) = x · ½ · (1 + erf(x / √2))``
Tanh form (``approximate="tanh"``):   ``x · ½ · (1 + tanh(√(2/π) · (x + 0.044715·x³)))``

Exporter variants matched: ``Div(x, √2)`` or ``Mul(x, 1/√2)``; ``x³`` as ``Pow(x, 3)``
or ``x·(x·x)``; the ½ applied to ``x``, to ``(1 + erf)``, to the product, or as
``Div(·, 2)``; either operand order of every ``Add``/``Mul``. Constants must match
to 1e-5 relative, so the fused node is float-equal to the subgraph. A model below
opset 20 is upgraded first (only when something matches). Fused GELUs are one op
for the integer lowering (``IntGELU``) instead of an ``Erf`` table and three
requantized elementwise ops.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import onnx_ir as ir
from onnxscript.rewriter._pattern_ir import Constant, OrValue

from qcompiler.graph import ensure_opset
from qcompiler.pipeline import Pass
from qcompiler.rewriter import MatchResult, PatternRewriter, Rule, matches

GELU_OPSET = 20
SQRT2 = math.sqrt(2.0)
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _either(fn, a, b):
    """``fn(a, b)`` in either operand order (Add, Mul)."""
    return OrValue([fn(a, b), fn(b, a)])


def _const(value: float):
    """A constant scalar (shape ``[]`` or ``[1]``) equal to ``value`` within 1e-5 relative.

    Constants in the pattern (not variables) keep operand-order alternatives unambiguous:
    the matcher commits to the first alternative that matches."""
    return OrValue([Constant(value, rel_tol=1e-5), Constant([value], rel_tol=1e-5)])


class _Gelu(Rule):
    """``x·½·p`` with ``p = 1 + erf(x/√2)`` or ``p = 1 + tanh(√(2/π)·(x + 0.044715·x³))``;
    ``form`` says where the ½ goes, ``swap`` the operand order of the root."""

    approximate = "none"

    def __init__(self, form: str, swap: bool):
        super().__init__(name=f"{type(self).__name__}[{form}{',swapped' if swap else ''}]")
        self.form, self.swap = form, swap

    def core(self, op, x):
        raise NotImplementedError

    def pattern(self, op, x):
        p = _either(op.Add, self.core(op, x), _const(1.0))
        half = _const(0.5)

        def mul(a, b):
            return op.Mul(b, a) if self.swap else op.Mul(a, b)

        if self.form == "half_outer":  # (x·p)·½
            return mul(_either(op.Mul, x, p), half)
        if self.form == "half_x":  # (x·½)·p
            return mul(_either(op.Mul, x, half), p)
        if self.form == "half_p":  # x·(p·½)
            return mul(x, _either(op.Mul, p, half))
        return op.Div(_either(op.Mul, x, p), _const(2.0))  # (x·p)/2

    def check(self, context, x, **_):
        if x.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE, ir.DataType.BFLOAT16):
            return MatchResult().fail("not a float tensor")
        return True

    def rewrite(self, op, x, **_):
        return op.Gelu(x, approximate=self.approximate)


class ErfGelu(_Gelu):
    def core(self, op, x):
        return op.Erf(OrValue([op.Div(x, _const(SQRT2)), _either(op.Mul, x, _const(1.0 / SQRT2))]))


class TanhGelu(_Gelu):
    approximate = "tanh"

    def core(self, op, x):
        cube = OrValue([op.Pow(x, _const(3.0)), _either(op.Mul, x, op.Mul(x, x))])
        inner = _either(op.Add, x, _either(op.Mul, cube, _const(0.044715)))
        return op.Tanh(_either(op.Mul, inner, _const(SQRT_2_OVER_PI)))


def gelu_rules() -> list:
    forms = [(f, s) for f in ("half_outer", "half_x", "half_p") for s in (False, True)] + [("div2", False)]
    return [cls.rule(form, swap) for cls in (ErfGelu, TanhGelu) for form, swap in forms]


@dataclass(frozen=True)
class FuseGelu(Pass):
    """Fuse decomposed erf/tanh GELU subgraphs into one Gelu node (opset 20; float-exact)."""

    name = "fuse-gelu"
    stages = ("float",)

    def run(self, model: ir.Model, ctx) -> bool:
        rules = gelu_rules()
        if not matches(model, rules, ("Mul", "Div")):
            return False
        ensure_opset(model, GELU_OPSET)
        stats = PatternRewriter(rules).apply(model)
        by_form = {"none": 0, "tanh": 0}
        for rule, count in stats.counts.items():
            by_form["tanh" if rule.startswith("TanhGelu") else "none"] += count
        ctx.report.setdefault("fuse_gelu", {"erf": 0, "tanh": 0})
        ctx.report["fuse_gelu"]["erf"] += by_form["none"]
        ctx.report["fuse_gelu"]["tanh"] += by_form["tanh"]
        ctx.log(f"fuse-gelu: {by_form['none']} erf and {by_form['tanh']} tanh GELU(s) fused")
        return stats.total > 0
